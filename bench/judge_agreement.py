"""Agreement of an AI judge with the human labels of the shared HH-RLHF harmless pairs (chosen vs rejected).

The judge (default: SmolLM2-135M-Instruct, the ``smollm2-135m-instruct`` alias) answers a principle's comparison
question from the harmless constitution (one drawn per pair, as ``cai-label`` does) about each pair, in both
presentation orders, through :mod:`alignkit.cai.judges`. Every number comes from the same forward passes:

- ``swapped``: P(human-chosen preferred) averaged over both orders (what ``cai-label`` uses);
- ``one order``: one order per pair, chosen shown first or second by a seeded coin (what a judge without
  swapping gives); ``chosen shown as A`` / ``as B``: all pairs in one order, which exposes position bias;
- baselines: ``always A`` (with the coin's orders), ``pick shorter`` / ``pick longer`` (by characters).

Agreement counts a tie (P = 0.5 exactly, equal lengths) as half. 95% intervals: percentile bootstrap over pairs.

    .venv/bin/python bench/judge_agreement.py                  # the docs/judges.md figure (200 pairs)
    .venv/bin/python bench/judge_agreement.py --pairs 1794 --judge path/to/bigger-judge --batch-size 16

Reports, never asserts. Exits 2 with a message if the HH file is absent.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

from alignkit.maths.selection import bootstrap_ci

HH_FILE = Path(__file__).resolve().parents[1].parent / "shared/data/hh-rlhf/harmless-base-dev.jsonl.gz"


def agree(p_chosen: float) -> float:
    """1 if the judge prefers the human-chosen reply, 0 if the rejected one, 0.5 on a tie."""
    return 1.0 if p_chosen > 0.5 else 0.0 if p_chosen < 0.5 else 0.5


def shorter(chosen: str, rejected: str) -> float:
    return 1.0 if len(chosen) < len(rejected) else 0.0 if len(chosen) > len(rejected) else 0.5


def load_items(args: argparse.Namespace) -> list:
    from alignkit.core.config import DataSpec
    from alignkit.cai.constitution import load_constitution
    from alignkit.data import load_dataset
    from alignkit.cai.judges import Comparison
    from alignkit.rewards.values import completion_text

    spec = DataSpec(source="hh", path=str(args.data), shuffle=True, seed=args.seed, limit=args.pairs)
    constitution = load_constitution(args.constitution)
    items = []
    for i, row in enumerate(load_dataset(spec, "preference")):
        question = args.question or constitution.sample(random.Random(args.seed * 1_000_003 + i)).comparison
        items.append(Comparison(row["prompt"], completion_text(row["chosen"]), completion_text(row["rejected"]),
                                question))
    return items


def scores(items: list, verdicts: list, seed: int) -> dict[str, list[float]]:
    """Per-pair agreement (1/0/0.5) of every method; ``first`` = chosen (the item's first) shown as A."""
    coin = random.Random(seed + 1)
    chosen_first = [coin.random() < 0.5 for _ in items]
    return {
        "judge, swapped": [agree(v.p) for v in verdicts],
        "judge, one order": [agree(v.p_ab if f else 1 - v.p_ba) for v, f in zip(verdicts, chosen_first)],
        "judge, chosen shown as A": [agree(v.p_ab) for v in verdicts],
        "judge, chosen shown as B": [agree(1 - v.p_ba) for v in verdicts],
        "always A (one order)": [1.0 if f else 0.0 for f in chosen_first],
        "pick shorter": [shorter(i.first, i.second) for i in items],
        "pick longer": [1.0 - shorter(i.first, i.second) for i in items],
    }


def report(result: dict, threshold: float) -> str:
    """The result as a small table (the JSON has the same numbers)."""
    lines = [(f"{result['pairs']} pairs, judge {result['judge']}, {result['seconds']} s, "
             f"{result['judge_tokens_per_second']} judge tokens/s ({result['machine']})"),
             f"{'method':<28} agreement  95% CI"]
    for name, value in result["agreement"].items():
        lines.append(f"{name:<28} {value['mean']:<10.3f} [{value['ci95'][0]:.3f}, {value['ci95'][1]:.3f}]")
    lines.append(f"mean position bias {result['mean_position_bias']}, mean confidence {result['mean_confidence']}; "
                 f"kept at threshold {threshold}: {result[f'kept_at_{threshold}']} pairs, agreement "
                 f"{result[f'agreement_kept_at_{threshold}']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import torch

    from alignkit.cai.judges import HFJudge, compare, keep

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=HH_FILE)
    parser.add_argument("--pairs", type=int, default=200, help="pairs (a seeded shuffle of the file)")
    parser.add_argument("--judge", default="smollm2-135m-instruct", help="judge model (alias, folder, Hub id)")
    parser.add_argument("--constitution", default="harmless")
    parser.add_argument("--question", default=None, help="one fixed question instead of the constitution's")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threshold", type=float, default=0.55, help="also report agreement on kept pairs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the result (and per-pair P) as JSON")
    args = parser.parse_args(argv)
    if not args.data.is_file():
        print(f"no HH file at {args.data} (the shared data is absent); pass --data", file=sys.stderr)
        return 2

    items = load_items(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    judge = HFJudge.load(args.judge, batch_size=args.batch_size, device=device)
    started = time.perf_counter()
    verdicts = compare(judge, items, progress=True)
    seconds = time.perf_counter() - started
    per_pair = scores(items, verdicts, args.seed)
    kept = [i for i, v in enumerate(verdicts) if keep(v.p, args.threshold)]
    result = {
        "pairs": len(items), "judge": args.judge, "seconds": round(seconds, 1),
        "judge_tokens_per_second": round(judge.tokens / seconds, 1),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
                   f"{'cuda' if torch.cuda.is_available() else 'cpu'}",
        "agreement": {name: {"mean": round(statistics.fmean(hits), 3),
                             "ci95": [round(x, 3) for x in bootstrap_ci(hits, seed=args.seed)]}
                      for name, hits in per_pair.items()},
        "mean_position_bias": round(statistics.fmean(v.bias for v in verdicts), 3),
        "mean_confidence": round(statistics.fmean(v.confidence for v in verdicts), 3),
        f"kept_at_{args.threshold}": len(kept),
        f"agreement_kept_at_{args.threshold}": (round(statistics.fmean(per_pair["judge, swapped"][i] for i in kept), 3)
                                                if kept else None),
    }
    print(report(result, args.threshold))
    if args.out:
        pairs = [{"p": v.p, "p_ab": v.p_ab, "p_ba": v.p_ba} for v in verdicts]
        args.out.write_text(json.dumps({**result, "per_pair": pairs}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
