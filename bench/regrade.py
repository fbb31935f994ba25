"""Grade the same completions with today's ``answer_match`` and with the one of an older commit, side by side.

What changed when the verifier became strict (docs/grpo.md, "The strict verifier"): for each jsonl of
graded completions (a stage's ``accuracy_<when>.jsonl``, an eval samples file, on-policy DPO sample shards)
it prints the accuracy under both verifiers on identical text, the paired difference with a 95% bootstrap
interval, and every completion the old verifier paid and the new one does not, sorted into what it was paid
for: an operand list (several numbers, no operator), an unevaluated expression, a factorial, or other.
It reports; it asserts nothing.

    .venv/bin/python bench/regrade.py --old-rev 27aae92 runs/grpo-long/rlvr-arith/*/accuracy_*.jsonl
    .venv/bin/python bench/regrade.py --old-rev 27aae92 --completion-field text FILE.jsonl --show 5
    # on-policy DPO sample shards (8 samples a prompt, no gold in them): golds from the recipe's data spec
    .venv/bin/python bench/regrade.py --old-rev 27aae92 runs/grpo-long/rlvr-arith/dpo/pairs/shard-*.jsonl \
        --answers-from '{source: arith, seed: 2, params: {n: 128, steps: 2, max_operand: 20}}'
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from alignkit.data.loading import read_jsonl
from alignkit.maths.selection import bootstrap_ci
from alignkit.rewards.programs import load_reward

_OPERATOR_RE = re.compile(r"[-+*/^×÷]|\\(?:cdot|times|div|sqrt|frac)|\bsquared\b")


def old_verifier(rev: str) -> tuple:
    """``(answer_match, extract_answer)`` of ``reward/math.py`` as it was at ``rev``."""
    source = subprocess.run(["git", "show", f"{rev}:reward/math.py"], capture_output=True, text=True)
    if source.returncode != 0:
        sys.exit(f"error: git show {rev}:reward/math.py failed: {source.stderr.strip()}")
    path = Path(tempfile.mkdtemp(prefix="regrade-")) / f"math_{rev}.py"
    path.write_text(source.stdout)
    return load_reward(f"{path}:answer_match"), load_reward(f"{path}:extract_answer")


def why_paid(phrase: str | None) -> str:
    """What a phrase the old verifier paid (and the new one does not) was paid for."""
    if phrase is None:
        return "other"
    if re.search(r"\d\s*!", phrase):
        return "factorial"
    last_side = phrase.split("=")[-1]
    if _OPERATOR_RE.search(last_side):
        return "expression"
    return "operand list" if len(re.findall(r"\d+(?:\.\d+)?", last_side)) > 1 else "other"


def read_rows(path: Path, completion_field: str, answer_field: str, answers: dict | None = None) -> list[dict]:
    rows = read_jsonl(path)
    if rows and "samples" in rows[0]:  # a sample shard: one row per sample, completion under "completion"
        rows = [{**row, completion_field: sample} for row in rows for sample in row["samples"]]
    if answers is not None:
        rows = [{**row, answer_field: answers[row["prompt"]]} for row in rows]
    missing = [f for f in (completion_field, answer_field) if rows and f not in rows[0]]
    if missing:
        sys.exit(f"error: {path}: rows have no field(s) {missing}; fields: {sorted(rows[0])}")
    return rows


def regrade(path: Path, old: tuple, new: tuple, args: argparse.Namespace) -> collections.Counter:
    rows = read_rows(path, args.completion_field, args.answer_field, args.answers)
    texts = [str(row[args.completion_field]) for row in rows]
    golds = [row[args.answer_field] for row in rows]
    old_scores = [s or 0.0 for s in old[0](texts, answer=golds)]
    new_scores = [s or 0.0 for s in new[0](texts, answer=golds)]
    diffs = [n - o for n, o in zip(new_scores, old_scores)]
    low, high = bootstrap_ci(diffs) if rows else (float("nan"), float("nan"))
    n = max(len(rows), 1)
    print(f"{path}: {len(rows)} rows, old {sum(old_scores) / n:.3f} -> new {sum(new_scores) / n:.3f} "
          f"(new - old {sum(diffs) / n:+.3f} [{low:+.3f}, {high:+.3f}])")
    kinds: collections.Counter = collections.Counter()
    shown = 0
    for text, gold, o, s in zip(texts, golds, old_scores, new_scores):
        if o > s:
            phrase = old[1](text)
            kinds[why_paid(phrase)] += 1
            if shown < args.show:
                print(f"    paid before, not now ({why_paid(phrase)}): gold {gold!r}, phrase {phrase!r}")
                shown += 1
        elif s > o:
            kinds["paid only now"] += 1
    if kinds:
        print("    " + ", ".join(f"{kind}: {count}" for kind, count in sorted(kinds.items())))
    return kinds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--old-rev", required=True, help="git revision whose reward/math.py is 'old'")
    parser.add_argument("--completion-field", default="completion")
    parser.add_argument("--answer-field", default="answer")
    parser.add_argument("--show", type=int, default=3, help="examples printed per file")
    parser.add_argument("--answers-from", help="a recipe data spec (YAML) whose problems give each prompt's gold")
    args = parser.parse_args()
    args.answers = None
    if args.answers_from:
        from alignkit.core.config import DataSpec
        from alignkit.data import load_dataset

        problems = load_dataset(DataSpec.model_validate(yaml.safe_load(args.answers_from)), "problems")
        args.answers = {row["prompt"]: row["answer"] for row in problems}
    old = old_verifier(args.old_rev)
    new = load_reward("reward/math.py:answer_match"), load_reward("reward/math.py:extract_answer")
    total: collections.Counter = collections.Counter()
    for path in args.files:
        total += regrade(path, old, new, args)
    print("all files: " + (", ".join(f"{k}: {v}" for k, v in sorted(total.items())) or "no disagreement"))


if __name__ == "__main__":
    main()
