"""Prefix sharing in PRM-guided search: the same beam searches sampled by the ``fast`` engine and by ``hf``.

Each step of a beam search asks for ``expand`` continuations of every beam, and a beam's request is the whole
prompt plus every step so far. ``fast`` prefills a request once for its ``expand`` samples (and retires finished
rows); ``hf`` (``model.generate`` with ``num_return_sequences``) prefills it once per sample. A vLLM server
(``--openai-url``/``--vllm-venv``) also caches prefixes across requests and steps.

Same problems, model, PRM, search spec and seeds for every engine; the engines take turns problem by problem, so
load on the machine falls on each alike. Samples differ between engines (their random streams differ), so the
fair comparisons are generation time per new token and time per search; both are reported with the ratio to
``hf``. PRM scoring is the same work for every engine and is reported apart. Asserts nothing.

    .venv/bin/python bench/search_prefix.py --model runs/math-shepherd/sft/model \\
        --prm runs/math-shepherd/prm/model --problems 8 --beams 4
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


class Timed:
    """An engine that adds up the seconds and new tokens of its ``generate`` calls."""

    def __init__(self, engine: Any):
        self.engine, self.seconds, self.tokens, self.calls = engine, 0.0, 0, 0

    def generate(self, prompts: Any, params: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        out = self.engine.generate(prompts, params, **kwargs)
        self.seconds += time.perf_counter() - started
        self.tokens += sum(len(c.token_ids) for samples in out for c in samples)
        self.calls += 1
        return out


class TimedPRM:
    def __init__(self, prm: Any):
        self.prm, self.seconds = prm, 0.0
        self.separator, self.how, self.encode = prm.separator, prm.how, prm.encode

    def score_batch(self, prompts: Any, steps: Any) -> Any:
        started = time.perf_counter()
        out = self.prm.score_batch(prompts, steps)
        self.seconds += time.perf_counter() - started
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the policy folder")
    parser.add_argument("--prm", required=True, help="the PRM folder (written by the prm stage)")
    parser.add_argument("--suite", default=str(ROOT / "eval" / "arith-search.yaml"),
                        help="the suite whose problems, prompt and first search spec are used")
    parser.add_argument("--problems", type=int, default=8)
    parser.add_argument("--beams", type=int, default=4, help="beam search width N")
    parser.add_argument("--engines", default="fast,hf", help="comma-separated local backends")
    parser.add_argument("--batch-size", type=int, default=64, help="the local engines' batch_size")
    parser.add_argument("--openai-url", default=None, help="also a vLLM (OpenAI-compatible) server of --model")
    parser.add_argument("--openai-model", default=None, help="the served model's name (default: --model)")
    parser.add_argument("--vllm-venv", default=None, help="start vLLM's server on --model from this venv "
                        "(bash bench/vllm_cpu_env.sh makes one) and add it as a column")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "bench"))
    from generation import run_served  # a vLLM server started from --vllm-venv, when asked for

    run_served(args, run)


def run(args: argparse.Namespace) -> None:
    from alignkit.data import load_dataset
    from alignkit.evaluation import suite as evalsuite
    from alignkit.evaluation.search import search
    from alignkit.generation.spec import generation_spec
    from alignkit.modeling.models import load_model, load_tokenizer
    from alignkit.rewards.prm import PRMScorer

    suite = evalsuite.load_suite(args.suite, {"dataset": {"params": {"n": args.problems}}})
    if not suite.search:
        raise SystemExit(f"{args.suite} has no search: block")
    spec = suite.search[0].model_copy(update={"beams": args.beams})
    rows = list(load_dataset(suite.dataset, suite.task))[: args.problems]
    tokenizer = load_tokenizer(args.model, padding_side="left")
    model = load_model(args.model).eval()
    engines = {name: Timed(generation_spec(backend=name, batch_size=args.batch_size).build(model=model,
                                                                                         tokenizer=tokenizer))
               for name in args.engines.split(",")}
    if args.openai_url:
        served = generation_spec(backend="openai", base_url=args.openai_url,
                                 model_name=args.openai_model or args.model)
        engines["vllm"] = Timed(served.build(tokenizer=tokenizer))
    prm = PRMScorer(args.prm)
    scorers = {name: TimedPRM(prm) for name in engines}
    totals = {name: {"search_s": 0.0, "prefill": 0, "generated": 0} for name in engines}
    names = list(engines)
    print(f"{len(rows)} problems, {spec.method} N={spec.beams} x {spec.expand} per step, max_steps "
          f"{spec.max_steps}, temperature {spec.temperature}; engines {names}", flush=True)
    for i, row in enumerate(rows):
        order = names[i % len(names):] + names[: i % len(names)]  # each engine goes first in turn
        for name in order:
            started = time.perf_counter()
            result = search(engines[name], scorers[name], row["prompt"],
                            evalsuite.render(tokenizer, row["prompt"], suite.prompt), spec,
                            seed=suite.sampling.seed + i, tokenizer=tokenizer)
            total = totals[name]
            total["search_s"] += time.perf_counter() - started
            total["prefill"] += result.cost.prefill_tokens
            total["generated"] += result.cost.generated_tokens
        print(f"  problem {i + 1}/{len(rows)}: " + ", ".join(
            f"{n} {engines[n].seconds:.1f} s gen" for n in names), flush=True)
    base = "hf" if "hf" in engines else names[0]
    base_rate = engines[base].tokens / engines[base].seconds
    base_search = totals[base]["search_s"]
    print(f"\n| engine | generation s | new tokens | new tok/s | x {base} tok/s | prefill tokens asked | "
          f"PRM s | search s | {base} search time / this |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in names:
        engine, total = engines[name], totals[name]
        rate = engine.tokens / engine.seconds
        print(f"| {name} | {engine.seconds:.1f} | {engine.tokens} | {rate:.1f} | {rate / base_rate:.2f} | "
              f"{total['prefill']} | {scorers[name].seconds:.1f} | {total['search_s']:.1f} | "
              f"{base_search / total['search_s']:.2f} |")


if __name__ == "__main__":
    main()
