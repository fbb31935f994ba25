"""Compare finished ``ppo`` stage runs on the same held-out problems: the table in docs/ppo.md.

Each run is a ``ppo`` stage folder (``<run>/ppo``) that measured greedy accuracy before and after training
(``accuracy_data`` set: ``accuracy_before.jsonl`` / ``accuracy_after.jsonl``, one row per problem, in the
same order) and logged ``history.jsonl``. For each run: accuracy before -> after, the change with a 95%
bootstrap interval over problems, how many problems went wrong -> right and right -> wrong, and the exact
sign test on those; the reward, step reward and KL of the first and last quarter of the steps; seconds per
step and peak memory. Then every pair of runs head to head on their *after* accuracy (same problems, so the
comparison is paired). This script reports; it asserts nothing.

    .venv/bin/python bench/ppo_compare.py verifier=runs/ppo-arith/ppo prm=runs/ppo-prm/ppo-arith/ppo
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

from alignkit.data.loading import read_jsonl
from alignkit.maths.selection import bootstrap_ci, sign_test


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        sys.exit(f"error: {path} is missing (did the run finish, with accuracy_data set?)")
    return read_jsonl(path)


def correctness(stage_dir: Path, when: str) -> tuple[list[str], list[float]]:
    rows = read_rows(stage_dir / f"accuracy_{when}.jsonl")
    return [row["prompt"] for row in rows], [1.0 if row["correct"] else 0.0 for row in rows]


def paired(a: list[float], b: list[float]) -> dict:
    """``a`` against ``b`` on the same problems: mean difference, its interval, the discordant counts, p."""
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    a_only, b_only = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    return {"diff": sum(diffs) / len(diffs), "ci95": bootstrap_ci(diffs), "a_only": a_only, "b_only": b_only,
            "sign_p": sign_test(a_only, b_only)}


def quarters(history: list[dict], key: str) -> tuple[float, float]:
    """Mean of ``key`` over the first and the last quarter of the steps (at least one step each)."""
    values = [row[key] for row in history if key in row]
    if not values:
        return float("nan"), float("nan")
    q = max(len(values) // 4, 1)
    return sum(values[:q]) / q, sum(values[-q:]) / q


def summarise(name: str, stage_dir: Path) -> dict:
    prompts, before = correctness(stage_dir, "before")
    prompts_after, after = correctness(stage_dir, "after")
    if prompts != prompts_after:
        sys.exit(f"error: {stage_dir}: accuracy_before and accuracy_after hold different problems")
    history = read_rows(stage_dir / "history.jsonl")
    steps = [row["time/step_s"] for row in history]
    return {
        "name": name, "dir": str(stage_dir), "prompts": prompts, "before": before, "after": after,
        "accuracy_before": sum(before) / len(before), "accuracy_after": sum(after) / len(after),
        "change": paired(after, before), "steps": len(history),
        "score": quarters(history, "reward/score"), "step_score": quarters(history, "reward/step_score"),
        "kl": quarters(history, "kl/sequence"),
        "reward_curve": [round(row.get("reward/score", 0.0) + row.get("reward/step_score", 0.0), 4)
                         for row in history],
        "seconds_per_step": sum(steps) / max(len(steps), 1),
        "peak_gib": max((row.get("memory/peak_gib", float("nan")) for row in history), default=float("nan")),
    }


def fmt_ci(ci: tuple[float, float]) -> str:
    return f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"


def report(runs: list[dict]) -> str:
    lines = ["| run | accuracy before -> after | change [95% CI] | wrong->right / right->wrong (sign p) | "
             "score, first -> last quarter | step reward, first -> last | KL, first -> last | s/step | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        c = r["change"]
        lines.append(
            f"| {r['name']} | {r['accuracy_before']:.3f} -> {r['accuracy_after']:.3f} | {c['diff']:+.3f} "
            f"{fmt_ci(c['ci95'])} | {c['a_only']} / {c['b_only']} (p = {c['sign_p']:.3f}) | "
            f"{r['score'][0]:.2f} -> {r['score'][1]:.2f} | {r['step_score'][0]:.2f} -> {r['step_score'][1]:.2f} | "
            f"{r['kl'][0]:.2f} -> {r['kl'][1]:.2f} | {r['seconds_per_step']:.0f} | {r['peak_gib']:.1f} |")
    for a, b in itertools.combinations(runs, 2):
        h = paired(a["after"], b["after"])
        lines.append(f"\nafter training, {a['name']} - {b['name']}: {h['diff']:+.3f} {fmt_ci(h['ci95'])}; "
                     f"right only under {a['name']} / only under {b['name']}: {h['a_only']} / {h['b_only']} "
                     f"(sign p = {h['sign_p']:.3f})")
    for r in runs:
        lines.append(f"\nreward curve {r['name']} (score + step reward per step): "
                     + " ".join(f"{v:.2f}" for v in r["reward_curve"]))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="NAME=STAGE_DIR", help="a name and a ppo stage folder")
    parser.add_argument("--out", default=None, help="also write the numbers as JSON here")
    args = parser.parse_args()
    runs = []
    for spec in args.runs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            sys.exit(f"error: {spec!r}: expected NAME=STAGE_DIR, e.g. verifier=runs/ppo-arith/ppo")
        runs.append(summarise(name, Path(path)))
    for r in runs[1:]:
        if r["prompts"] != runs[0]["prompts"]:
            sys.exit(f"error: {r['name']} was measured on other problems than {runs[0]['name']}: not comparable")
    print(report(runs))
    if args.out:
        Path(args.out).write_text(json.dumps([{k: v for k, v in r.items() if k != "prompts"} for r in runs], indent=1))


if __name__ == "__main__":
    main()
