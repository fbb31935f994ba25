"""Expert iteration vs continuing plain SFT for the same number of steps: the table in docs/rejection.md.

Reads a finished ``recipes/expert-iteration.yaml`` run (``--run runs/expert-iteration``): its first SFT stage, and
the two rounds ``round1``/``round2``, each an SFT on what ``sample1``/``sample2`` kept (the model's own answers
that ``answer_match`` paid, revisions included). The baseline continues the same first SFT model with plain SFT
on the gold solutions of the *same* new problems (arith seeds 11 and 12, the problems the rejection stages
sampled), with the same learning rate, batch size, LoRA and the same number of optimizer steps as each round
(``max_steps``; the gold set is cycled when a round took more steps than it has rows / batch). It is run here as
a two-stage recipe (``<run>/../expert-iteration-baseline``; skipped stage by stage when already done).

Every model is then compared on the recipe's 48 held-out problems (the stages' own ``accuracy_after.jsonl``),
and, with ``--eval-n N``, on N more held-out problems of a seed no training set uses (greedy, the same check
with the ``fast`` engine), because 48 problems give intervals of about +-0.13. Reported: accuracy with a 95%
bootstrap interval, and per round expert iteration - plain SFT on the same problems (paired: interval of the
mean difference, discordant counts and the exact sign test). This script runs the baseline, then reports; it
asserts nothing.

    .venv/bin/python bench/expert_iteration_compare.py --run runs/expert-iteration --eval-n 200
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from alignkit.core.artifacts import Manifest
from alignkit.data.loading import read_jsonl
from alignkit.maths.selection import bootstrap_ci, sign_test

ROUNDS = (("round1", "sample1", "plain1"), ("round2", "sample2", "plain2"))


def baseline_recipe(run: Path) -> dict:
    """The plain-SFT continuation: each round's own resolved SFT stage (learning rate, batch, LoRA, accuracy check:
    every setting), with the gold solutions of that round's problems as data and the round's step count."""
    resolved = yaml.safe_load((run / "recipe.resolved.yaml").read_text())
    stages = {stage.get("name", stage["kind"]): stage for stage in resolved["stages"]}
    out = []
    previous = str((run / "sft" / "model").resolve())
    for round_name, sample_name, plain_name in ROUNDS:
        steps = Manifest.read(run / round_name).metrics["train_steps"]
        gold = {**stages[sample_name]["data"]}  # the same new problems (arith seeds 11, 12), as SFT rows
        out.append({**stages[round_name], "name": plain_name, "model": previous, "data": gold, "max_steps": steps})
        previous = f"${{{plain_name}.model}}"
    return {"name": "expert-iteration-baseline",
            "description": "plain SFT on gold solutions of the rounds' problems, for the same steps as each round",
            "tracking": {"report_to": "none"}, "stages": out}


def run_baseline(run: Path) -> Path:
    recipe = baseline_recipe(run)
    root = run.parent
    path = root / "expert-iteration-baseline.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    done = subprocess.run([sys.executable, "-m", "alignkit", "run", str(path), "--output-dir", str(root)],
                          env=os.environ.copy())
    if done.returncode:
        sys.exit(f"error: the baseline run failed (exit {done.returncode}); rerun this script to resume it")
    return root / "expert-iteration-baseline"


def correctness(stage_dir: Path, when: str = "after") -> tuple[list[str], list[float]]:
    rows = read_jsonl(stage_dir / f"accuracy_{when}.jsonl")
    return [row["prompt"] for row in rows], [1.0 if row["correct"] else 0.0 for row in rows]


def extra_eval(model_dirs: dict[str, Path], n: int, seed: int) -> dict[str, list[float]]:
    """Greedy exact match of each model on ``n`` arith problems of ``seed`` (the stages' check, fast engine)."""
    from alignkit.data import load_dataset
    from alignkit.core.config import DataSpec
    from alignkit.evaluation.accuracy import greedy_accuracy
    from alignkit.generation import FastSpec
    from alignkit.modeling.models import load_model, load_tokenizer

    problems = load_dataset(DataSpec(source="arith", seed=seed, params={"n": n, "steps": 2, "max_operand": 20}),
                            "problems")
    scores = {}
    for name, folder in model_dirs.items():
        model, tokenizer = load_model(str(folder), dtype="float32"), load_tokenizer(str(folder))
        report = greedy_accuracy(model, tokenizer, problems, max_new_tokens=96, progress=False,
                                 generation=FastSpec(batch_size=64))
        scores[name] = [1.0 if row["correct"] else 0.0 for row in report["samples"]]
        print(f"[extra eval] {name}: {report['accuracy']:.3f} on {n} problems", flush=True)
    return scores


def paired(a: list[float], b: list[float]) -> str:
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    wins, losses = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    low, high = bootstrap_ci(diffs)
    return (f"{sum(diffs) / len(diffs):+.3f} [{low:+.3f}, {high:+.3f}], {wins} / {losses} "
            f"(p = {sign_test(wins, losses):.3f})")


def table(title: str, scores: dict[str, list[float]], steps: dict[str, int], rows: dict[str, int]) -> str:
    lines = [f"### {title}", "", "| model | SFT steps after the first SFT | training rows | accuracy [95% CI] | "
             "expert iteration - plain SFT, wins / losses (sign p) |", "|---|---|---|---|---|"]
    for name, values in scores.items():
        low, high = bootstrap_ci(values)
        versus = ""
        if name.startswith("round"):
            versus = paired(values, scores["plain" + name[len("round"):]])
        lines.append(f"| {name} | {steps.get(name, 0)} | {rows.get(name, '')} | {sum(values) / len(values):.3f} "
                     f"[{low:.3f}, {high:.3f}] | {versus} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="the expert-iteration run folder (<output-dir>/expert-iteration)")
    parser.add_argument("--eval-n", type=int, default=0, help="also compare on this many more held-out problems")
    parser.add_argument("--eval-seed", type=int, default=9003, help="their arith seed (no training set uses it)")
    parser.add_argument("--json", default=None, help="also write the per-problem scores here")
    args = parser.parse_args()
    run = Path(args.run)
    for stage in ("sft", "round1", "round2"):
        if Manifest.read(run / stage).status != "done":
            sys.exit(f"error: {run / stage} is not done; finish the expert-iteration run first")
    base = run_baseline(run)
    stage_dirs = {"sft": run / "sft", "round1": run / "round1", "plain1": base / "plain1",
                  "round2": run / "round2", "plain2": base / "plain2"}
    steps, rows, total = {}, {}, {"round": 0, "plain": 0}
    for name, folder in stage_dirs.items():
        if name == "sft":
            continue
        metrics = Manifest.read(folder).metrics
        kind = "round" if name.startswith("round") else "plain"
        total[kind] += metrics["train_steps"]
        steps[name] = total[kind]
        rows[name] = metrics["train_examples"]  # a round's: the rows its rejection stage kept
    prompts, _ = correctness(run / "sft")
    held = {}
    for name, folder in stage_dirs.items():
        these, values = correctness(folder)
        if these != prompts:
            sys.exit(f"error: {folder} was checked on other problems than {run / 'sft'}")
        held[name] = values
    print(table("The recipe's 48 held-out problems (arith seed 9001)", held, steps, rows))
    extra = {}
    if args.eval_n:
        extra = extra_eval({name: folder / "model" for name, folder in stage_dirs.items()}, args.eval_n,
                           args.eval_seed)
        print()
        print(table(f"{args.eval_n} more held-out problems (arith seed {args.eval_seed})", extra, steps, rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"held_out_48": held, "extra": extra, "steps": steps, "rows": rows}))


if __name__ == "__main__":
    main()
