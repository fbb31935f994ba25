"""PRM scoring with the batch's shared prefix read once vs every row read whole, on search-like batches.

A beam search scores many partial solutions of one problem at a time; they share the chat template and the
problem. From an eval run's ``samples.jsonl`` each problem's solutions are cut into every step prefix (what a
search scores), one ``score_batch`` per problem, timed with sharing on and off in turns (``--repeats`` each,
after a warm-up). Prints both times, the ratio and the largest score difference. Asserts nothing.

    .venv/bin/python bench/prm_prefix.py --prm runs/math-shepherd/prm/model \\
        --samples runs/eval-arith-search/samples.jsonl --problems 6
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prm", required=True, help="the PRM folder (written by the prm stage)")
    parser.add_argument("--samples", required=True, help="an eval run's samples.jsonl (problem, prompt, completion)")
    parser.add_argument("--problems", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from alignkit.rewards import prm as prm_module
    from alignkit.rewards.prm import PRMScorer, split_steps

    scorer = PRMScorer(args.prm)
    by_problem: dict[int, list[dict]] = {}
    with open(args.samples) as handle:
        for line in handle:
            row = json.loads(line)
            if row["sample"] != "greedy":
                by_problem.setdefault(row["problem"], []).append(row)
    batches = []
    for rows in list(by_problem.values())[: args.problems]:
        candidates = [steps[:k] for row in rows for steps in [split_steps(row["completion"], scorer.separator)]
                      for k in range(1, len(steps) + 1)]
        batches.append(([rows[0]["prompt"]] * len(candidates), candidates))

    def score() -> tuple[float, list]:
        started = time.perf_counter()
        out = [scorer.score_batch(prompts, steps) for prompts, steps in batches]
        return time.perf_counter() - started, out

    shared_floor = prm_module.MIN_SHARED_PREFIX
    score()  # warm-up
    seconds: dict[str, list[float]] = {"shared": [], "per-row": []}
    scores = {}
    for _ in range(args.repeats):
        for mode in seconds:
            prm_module.MIN_SHARED_PREFIX = shared_floor if mode == "shared" else 10**9
            took, scores[mode] = score()
            seconds[mode].append(took)
    prm_module.MIN_SHARED_PREFIX = shared_floor
    diff = max(abs(a - b) for x, y in zip(scores["shared"], scores["per-row"]) for u, v in zip(x, y)
               for a, b in zip(u, v))
    n = sum(len(steps) for _, steps in batches)
    print(f"{n} candidates of {len(batches)} problems; shared {[round(s, 2) for s in seconds['shared']]} s, "
          f"per-row {[round(s, 2) for s in seconds['per-row']]} s; per-row / shared "
          f"{min(seconds['per-row']) / min(seconds['shared']):.2f}x; max |score diff| {diff:.1e}")


if __name__ == "__main__":
    main()
