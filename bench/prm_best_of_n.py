"""Best-of-N with a process reward model vs an outcome reward model vs majority vote vs a random pick.

The evidence for recipes/math-shepherd.yaml: on held-out arith problems (a seed the policy, labels and
reward models never saw) the SFT policy samples N solutions per problem; each is checked against the gold
answer and, step by step, against the exact arith checker. The PRM scores every step (aggregated by min,
the paper's choice, and prod/last/mean for comparison), the ORM its last step. Selection accuracy vs N is
computed with alignkit.maths.selection.selection_curve from the one pool of N samples per problem, so every method
sees the same generations. A bootstrap over problems gives a 95% interval for "PRM minus ORM" at the
largest N.

    python bench/prm_best_of_n.py --run runs/math-shepherd --problems 48 --n 8
    python bench/prm_best_of_n.py --policy P --prm M1 --orm M2 --out results.json

Samples are cached in ``<out dir>/bench_samples.jsonl`` (keyed by problems, N, seed and policy), so a rerun
after a crash, or with other scorers, does not sample again; each scorer's step scores in
``<out dir>/bench_scores_<key>.json`` (keyed by the model folder's files and the samples), so a scorer that
did not change is not run again. Every sample with its checks and step scores
goes to ``<out>_samples.jsonl``; ``best_of_n_misses`` in the results counts, per scorer, the problems whose
top pick is wrong although a right sample exists, by where the pick's first wrong step is, and
``distinct_pick_at_N`` the accuracy of a uniform pick among a problem's distinct solutions (where best-of-N of
a scorer that cannot tell a problem's solutions apart lands). Reports, never asserts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import time
from pathlib import Path
from typing import Any

from alignkit.core.config import DataSpec
from alignkit.data import check_steps, load_dataset
from alignkit.maths.labels import true_step_labels
from alignkit.maths.selection import Pool, aggregate_steps, best_of_n, bootstrap_ci, pairwise_ranking, selection_curve
from alignkit.rewards.prm import PRMScorer, split_steps, step_metrics
from alignkit.rewards.programs import load_reward
from alignkit.rewards.values import call_reward

MATH = "reward/math.py:answer_match"

AGGREGATIONS = ("min", "prod", "last", "mean")


def sample_solutions(policy: str, problems: list[dict[str, Any]], n: int, seed: int, cache: Path,
                     max_new_tokens: int, temperature: float, batch_size: int) -> tuple[list[list[str]], float]:
    """N solution texts per problem (from the cache when it matches), and the seconds spent sampling."""
    key = {"policy": str(policy), "problems": [p["prompt"] for p in problems], "n": n, "seed": seed,
           "max_new_tokens": max_new_tokens, "temperature": temperature}
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached["key"] == key:
            return cached["texts"], cached["seconds"]
    from alignkit.generation import SamplingParams, make_engine
    from alignkit.modeling.models import load_model, load_tokenizer
    from alignkit.data.prompts import render_prompt

    tokenizer, model = load_tokenizer(policy), load_model(policy)
    engine = make_engine("fast", model=model, tokenizer=tokenizer, batch_size=batch_size)
    params = SamplingParams(n=n, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
    started = time.perf_counter()
    outs = engine.generate([render_prompt(tokenizer, p["prompt"]) for p in problems], params)
    seconds = time.perf_counter() - started
    texts = [[c.text for c in samples] for samples in outs]
    cache.write_text(json.dumps({"key": key, "texts": texts, "seconds": seconds}))
    return texts, seconds


def model_fingerprint(model_dir: str) -> str:
    """Path, size and modification time of a model folder's files: changes when the folder is retrained."""
    files = sorted(f for f in Path(model_dir).iterdir() if f.is_file())
    return json.dumps([str(Path(model_dir).resolve())] + [[f.name, f.stat().st_size, f.stat().st_mtime_ns]
                                                           for f in files])


def step_scores(model_dir: str, problems: list[dict[str, Any]], steps: list[list[list[str]]],
                batch_size: int, cache_dir: Path) -> tuple[list[list[list[float]]], float]:
    """p_good per step of every sample, ``[problem][sample][step]``, and the seconds spent scoring.

    Cached in ``cache_dir/bench_scores_<key>.json`` (keyed by the model folder's files and the samples), so a
    rerun with another second scorer does not score the unchanged one again."""
    key = hashlib.sha1((model_fingerprint(model_dir) + json.dumps([[p["prompt"] for p in problems], steps]))
                       .encode()).hexdigest()[:16]
    cache = cache_dir / f"bench_scores_{key}.json"
    if cache.is_file():
        cached = json.loads(cache.read_text())
        return cached["scores"], cached["seconds"]
    scorer = PRMScorer(model_dir, batch_size=batch_size)
    prompts = [p["prompt"] for p, sols in zip(problems, steps) for _ in sols]
    flat = [s for sols in steps for s in sols]
    started = time.perf_counter()
    scores = scorer.score_batch(prompts, flat)
    seconds = time.perf_counter() - started
    out, i = [], 0
    for sols in steps:
        out.append(scores[i: i + len(sols)])
        i += len(sols)
    cache.write_text(json.dumps({"model": model_dir, "scores": out, "seconds": seconds}))
    return out, seconds


def solution_score(scores: list[float], how: str) -> float:
    return aggregate_steps(scores, how) if scores else 0.0


def per_problem(pools: list[Pool], method: str, n: int) -> list[float]:
    return [selection_curve([pool], method, [n])[n] for pool in pools]


def bootstrap_diff(a: list[float], b: list[float]) -> tuple[float, float]:
    """95% interval of mean(a) - mean(b) over problems resampled with replacement (paired by problem)."""
    return bootstrap_ci([x - y for x, y in zip(a, b, strict=True)])


def bootstrap_ranking(scores: list[list[float]], correct: list[list[bool]], draws: int = 2000,
                      seed: int = 0) -> tuple[float, float]:
    """95% interval of the pairwise-ranking fraction, problems resampled with replacement."""
    rng, m, values = random.Random(seed), len(scores), []
    for _ in range(draws):
        idx = [rng.randrange(m) for _ in range(m)]
        fraction, pairs = pairwise_ranking([scores[i] for i in idx], [correct[i] for i in idx])
        if pairs:
            values.append(fraction)
    values.sort()
    return values[int(0.025 * len(values))], values[int(0.975 * len(values)) - 1]


def misses(answers, correct, truth, scorers, n: int) -> dict[str, dict[str, int]]:
    """Where each scorer's top pick over all ``n`` samples is wrong although a right sample exists: how many
    such problems, and whether the picked wrong sample's first wrong step (exact checker) is an operation
    step or only its answer line, or none of its steps is wrong (a right chain, a wrong answer read-out)."""
    out = {}
    for name, scores in scorers.items():
        counts = {"problems": 0, "first_error_in_operation": 0, "first_error_at_answer_line": 0,
                  "no_wrong_step": 0}
        for p in range(len(answers)):
            if not any(correct[p][:n]):
                continue
            pick = best_of_n(answers[p][:n], scores[p][:n])  # the selection_curve's own pick
            if pick is None or correct[p][pick]:
                continue
            counts["problems"] += 1
            labels = truth[p][pick]
            if all(labels):
                counts["no_wrong_step"] += 1
            elif labels.index(False) == len(labels) - 1:
                counts["first_error_at_answer_line"] += 1
            else:
                counts["first_error_in_operation"] += 1
        out[name] = counts
    return out


def write_samples(path: Path, problems, texts, correct, truth, prm_steps, orm_steps) -> None:
    """Every sample with its correctness, true step labels and both scorers' step scores, for analysis."""
    with path.open("w") as f:
        for p, problem in enumerate(problems):
            for i, text in enumerate(texts[p]):
                f.write(json.dumps({"problem": p, "sample": i, "prompt": problem["prompt"],
                                    "answer": problem["answer"], "text": text, "correct": correct[p][i],
                                    "true_labels": truth[p][i], "prm_steps": prm_steps[p][i],
                                    "orm_steps": orm_steps[p][i]}) + "\n")


def _json_safe(value: Any) -> Any:
    """NaN (a metric with no cases, e.g. no all-good solution) -> null, so the file is strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="recipe run folder with sft/, prm/, orm/ (runs/math-shepherd)")
    parser.add_argument("--policy"), parser.add_argument("--prm"), parser.add_argument("--orm")
    parser.add_argument("--problems", type=int, default=48)
    parser.add_argument("--steps", type=int, default=2, help="operations per arith problem")
    parser.add_argument("--n", type=int, default=8, help="samples per problem (largest N)")
    parser.add_argument("--seed", type=int, default=9001, help="arith seed of the held-out problems")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", help="results JSON (default: <run>/bench_best_of_n.json)")
    args = parser.parse_args()
    run = Path(args.run) if args.run else None
    policy = args.policy or str(run / "sft" / "model")
    prm, orm = args.prm or str(run / "prm" / "model"), args.orm or str(run / "orm" / "model")
    out = Path(args.out) if args.out else run / "bench_best_of_n.json"

    spec = DataSpec(source="arith", seed=args.seed, params={"n": args.problems, "steps": args.steps,
                                                             "max_operand": 20})
    problems = list(load_dataset(spec, "problems"))
    texts, gen_s = sample_solutions(policy, problems, args.n, args.seed, out.parent / "bench_samples.jsonl",
                                    args.max_new_tokens, args.temperature, args.batch_size)
    answer_match = load_reward(MATH)
    extract = load_reward("reward/math.py:extract_answer")
    normalise = load_reward("reward/math.py:normalise_answer")
    steps = [[split_steps(t) for t in sols] for sols in texts]
    correct = [[bool(s) for s in call_reward(answer_match, MATH, sols, {"answer": [p["answer"]] * len(sols)})]
               for p, sols in zip(problems, texts)]  # checked: a NaN or "no" is an error, not a right answer
    answers = [[normalise(extract(t)) for t in sols] for sols in texts]
    truth = [[true_step_labels(check_steps(p["prompt"], s), len(s)) for s in sols] for p, sols in zip(problems, steps)]

    prm_steps, prm_s = step_scores(prm, problems, steps, args.batch_size, out.parent)
    orm_steps, orm_s = step_scores(orm, problems, steps, args.batch_size, out.parent)
    scorers = {f"prm_{how}": [[solution_score(s, how) for s in sols] for sols in prm_steps] for how in AGGREGATIONS}
    scorers["orm"] = [[solution_score(s, "last") for s in sols] for sols in orm_steps]

    ns = [n for n in (1, 2, 4, 8, 16, 32) if n <= args.n]
    base = [Pool.of(a, c) for a, c in zip(answers, correct)]
    curves: dict[str, dict[int, float]] = {
        "random_pick": {n: sum(map(sum, correct)) / sum(map(len, correct)) for n in ns},
        "pass@n (oracle)": selection_curve(base, "pass", ns),
        "majority_vote": selection_curve(base, "majority", ns),
    }
    for name, scores in scorers.items():
        pools = [Pool.of(a, c, s) for a, c, s in zip(answers, correct, scores)]
        curves[f"best_of_n/{name}"] = selection_curve(pools, "best_of_n", ns)
        if name in ("prm_min", "orm"):
            curves[f"weighted_vote/{name}"] = selection_curve(pools, "weighted_vote", ns)
    top = ns[-1]
    prm_pools = [Pool.of(a, c, s) for a, c, s in zip(answers, correct, scorers["prm_min"])]
    orm_pools = [Pool.of(a, c, s) for a, c, s in zip(answers, correct, scorers["orm"])]
    # PRM best-of-N minus the ORM's and minus a random pick's (a problem's share of right samples), per
    # problem, with bootstrap intervals at every N ("better than chance" at selection is the second).
    random_per_problem = [sum(cs) / len(cs) for cs in correct]
    by_n = {}
    for n in ns:
        prm_n = per_problem(prm_pools, "best_of_n", n)
        by_n[n] = {"mean_minus_orm": curves["best_of_n/prm_min"][n] - curves["best_of_n/orm"][n],
                   "minus_orm_ci95": bootstrap_diff(prm_n, per_problem(orm_pools, "best_of_n", n)),
                   "mean_minus_random_pick": curves["best_of_n/prm_min"][n] - curves["random_pick"][n],
                   "minus_random_pick_ci95": bootstrap_diff(prm_n, random_per_problem)}
    diff, diff_random = by_n[top]["minus_orm_ci95"], by_n[top]["minus_random_pick_ci95"]

    # Ranking within a problem (chance = 0.5 whatever the accuracy): does the scorer put a right solution
    # above a wrong one of the same problem? Best-of-N also depends on ties and on which wrong answers win.
    ranking = {name: pairwise_ranking(scores, correct) for name, scores in scorers.items()}
    ranking_ci = {name: bootstrap_ranking(scorers[name], correct) for name in ("prm_min", "orm")}

    # A scorer that gives identical texts identical scores and is otherwise uninformative picks each distinct
    # solution about equally often; a random pick weights them by how often the policy wrote them. With a
    # near-deterministic policy whose common solution is usually right, the first is the fairer "chance".
    distinct = [{t: c for t, c in zip(sols[:top], cs[:top])} for sols, cs in zip(texts, correct)]
    distinct_pick = sum(sum(d.values()) / len(d) for d in distinct) / len(distinct)

    flat_truth = [t for sols in truth for t in sols if t]
    results = {
        "args": vars(args), "problems": len(problems), "samples": sum(map(len, texts)), "ns": ns,
        "curves": curves, f"prm_min_minus_orm_at_{top}_ci95": diff,
        f"prm_min_minus_random_pick_at_{top}_ci95": diff_random, "prm_min_differences_by_n": by_n,
        "sample_accuracy": curves["random_pick"][ns[0]], f"distinct_pick_at_{top}": distinct_pick,
        "pairwise_ranking": {name: {"fraction": f, "pairs": n} for name, (f, n) in ranking.items()},
        "pairwise_ranking_ci95": ranking_ci,
        "right_answer_wrong_steps": sum(c and not all(t) for cs, ts in zip(correct, truth) for c, t in zip(cs, ts)),
        "prm_vs_true_steps": step_metrics([s for sols in prm_steps for s in sols if s], flat_truth),
        "orm_vs_true_steps": step_metrics([s for sols in orm_steps for s in sols if s], flat_truth),
        "seconds": {"generate": round(gen_s, 1), "score_prm": round(prm_s, 1), "score_orm": round(orm_s, 1)},
    }
    results["best_of_n_misses"] = misses(answers, correct, truth, scorers, top)
    results = _json_safe(results)
    out.write_text(json.dumps(results, indent=2) + "\n")
    write_samples(out.with_name(out.stem + "_samples.jsonl"), problems, texts, correct, truth, prm_steps,
                  orm_steps)
    print("| method | " + " | ".join(f"N={n}" for n in ns) + " |")
    print("|---|" + "---|" * len(ns))
    for name, curve in curves.items():
        print(f"| {name} | " + " | ".join(f"{curve[n]:.3f}" for n in ns) + " |")
    print(f"PRM(min) - ORM at N={top}: 95% bootstrap interval [{diff[0]:+.3f}, {diff[1]:+.3f}]")
    for n, d in list(by_n.items())[1:]:
        print(f"N={n}: PRM(min) - ORM {d['mean_minus_orm']:+.3f} [{d['minus_orm_ci95'][0]:+.3f}, "
              f"{d['minus_orm_ci95'][1]:+.3f}], PRM(min) - random pick {d['mean_minus_random_pick']:+.3f} "
              f"[{d['minus_random_pick_ci95'][0]:+.3f}, {d['minus_random_pick_ci95'][1]:+.3f}] (95% bootstrap)")
    print(f"a uniform pick among the distinct solutions of a problem at N={top}: {distinct_pick:.3f} "
          "(best-of-N of a scorer blind within a problem lands here, below a random pick)")
    print("pairwise ranking within problems (right above wrong; chance 0.5): " + ", ".join(
        f"{name} {f:.3f}" + (f" [{ranking_ci[name][0]:.3f}, {ranking_ci[name][1]:.3f}]" if name in ranking_ci else "")
        for name, (f, _) in ranking.items()) + f" over {ranking['orm'][1]} pairs")
    print(json.dumps({k: v for k, v in results.items() if k not in ("curves", "args")}, indent=1))


if __name__ == "__main__":
    main()
