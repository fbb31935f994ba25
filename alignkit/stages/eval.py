"""Evaluation and inference-time scaling: sample once, grade, verify, select many ways, report.

Recipe example::

    - kind: eval
      suite: eval/arith.yaml            # or a shipped suite by name: arith, gsm8k
      model: ${sft.model}
      orm: ${rm.model}                  # optional: best-of-N / weighted vote by an outcome reward model
      prm: ${prm.model}                 # optional: ... by a process reward model (min/prod/last)
      overrides: {sampling: {n: 8}, dataset: {limit: 50}}

Alone: ``alignkit eval eval/gsm8k.yaml --model PATH [--orm PATH] [--prm PATH] [--out DIR] [--set k=v]``.

What a ``problems`` suite does, in order (the suite spec and the counting are in :mod:`alignkit.evaluation.suite`):

1. **Sample.** Shard by shard (``shard_size`` problems): a greedy decode and ``n`` samples per problem,
   written as shard K of ``shards/samples/`` (:mod:`alignkit.core.shards`: counts, then rows, each under a
   temporary name and then ``os.replace``d), so a rerun skips complete shards and redoes at most one. Shard K
   samples with ``seed + K``: a resumed run draws what an uninterrupted one would. Under ``accelerate launch``
   process r takes the shards with K % world == r.
2. **Verify.** The policy is freed, then each verifier scores every shard (shard K of ``shards/orm/`` and
   ``shards/prm/``, one row per problem; same resume rule, redone when the verifier path changes or the
   shard is sampled again).
3. **Grade and select** (main process): the suite's grader marks each sample, answers become vote keys,
   and every method is counted on the one pool (:func:`alignkit.evaluation.suite.selection_metrics`).
4. **Report**: report.md, metrics.json, samples.jsonl, accuracy_vs_n.png, W&B tables/images
   (:mod:`alignkit.evaluation.report`).

``preference`` suites score chosen/rejected pairs with the ORM, ``stepwise`` suites step lists with the
PRM; both skip steps 1-2. A changed suite (data, prompt or sampling) makes old shards stale: they are
removed when their fingerprint differs.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from alignkit.core import shards
from alignkit.core.errors import RecipeError
from alignkit.evaluation import suite as evalsuite
from alignkit.evaluation.suite import OutcomeScorer, StepScorer, Suite
from alignkit.core.stage import StageConfig, StageContext, StageResult


class Config(StageConfig):
    kind: str = "eval"
    suite: str = Field(..., description="Suite file (eval/arith.yaml) or a shipped suite's name (gsm8k).")
    model: str = Field(..., description="Policy to evaluate: folder, Hub id, alias, or ${stage.model}.")
    orm: str | None = Field(None, description="Outcome reward model for best-of-N / weighted vote.")
    prm: str | None = Field(None, description="Process reward model for best-of-N / weighted vote.")
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="Suite fields to change, as a nested mapping: {sampling: {n: 8}}.")


def outputs(run_dir: Path) -> dict[str, str]:
    return {"report": str(run_dir / "report.md"), "metrics": str(run_dir / "metrics.json"),
            "samples": str(run_dir / "samples.jsonl"), "dir": str(run_dir)}


def _stage_suite(config: Config, base_dir: Path) -> tuple[Suite, Path]:
    """The suite a stage runs: found next to the recipe or shipped, with the stage's fields applied."""
    path = evalsuite.find_suite(config.suite, [base_dir])
    extra = {key: value for key in ("orm", "prm") if (value := getattr(config, key)) is not None}
    try:
        return evalsuite.load_suite(path, evalsuite.merge(config.overrides, extra)), path
    except RecipeError as err:
        field = "suite" if err.field == "suite" else f"overrides.{err.field}"
        raise RecipeError(err.reason, field=field) from None


def check(config: Config, base_dir: Path) -> None:
    _stage_suite(config, base_dir)


def run(config: Config, ctx: StageContext) -> StageResult:
    base_dir = ctx.recipe_dir or Path.cwd()
    suite, path = _stage_suite(config, base_dir)
    result = run_suite(suite, config.model, ctx.run_dir, suite_dir=path.parent, tracker=ctx.tracker,
                       log_prefix=ctx.name, rank=ctx.state.process_index, world=ctx.state.num_processes, barrier=ctx.wait)
    if result is None:  # not the main process
        return StageResult()
    return StageResult(metrics=result["summary"], artifacts=result["artifacts"])


# -------------------------------------------------------------------------------------------- the runner


def run_suite(suite: Suite, model: str, out_dir: Path, *, suite_dir: Path | None = None, tracker: Any = None,
              log_prefix: str = "eval", engine: Any = None, tokenizer: Any = None, orm_scorer: OutcomeScorer | None = None,
              prm_scorer: StepScorer | None = None, rank: int = 0, world: int = 1, barrier=lambda: None,
              echo=print) -> dict[str, Any] | None:
    """Run ``suite`` on ``model``, writing everything under ``out_dir``; the main process returns
    ``{"summary", "metrics", "curves", "artifacts"}`` (others None).

    ``engine``/``tokenizer``/``*_scorer`` replace what would be loaded from ``model``/``suite.orm``/
    ``suite.prm`` (tests pass fakes; a scorer passed in counts as that verifier being present).
    """
    from alignkit.evaluation import report as evalreport
    from alignkit.data import load_dataset

    out_dir = Path(out_dir)
    rows = list(load_dataset(suite.dataset, suite.task))
    if not rows:
        raise RecipeError("the suite's dataset has no rows", field="dataset")
    verifiers = {"orm": orm_scorer or suite.orm, "prm": prm_scorer or suite.prm}
    if suite.task == "problems":
        outcome = _problems(suite, model, rows, out_dir / "shards", engine, tokenizer, verifiers, suite_dir,
                            rank, world, barrier)
    elif rank != 0:
        outcome = None
    elif suite.task == "preference":
        outcome = evalsuite.score_pairs(rows, _need(verifiers, "orm", suite))
    else:
        outcome = evalsuite.score_steps(rows, _need(verifiers, "prm", suite), suite.step_threshold)
    if outcome is None:
        return None
    outcome.update(suite=suite, model=model)
    artifacts = evalreport.write_report(outcome, out_dir, tracker=tracker, prefix=log_prefix)
    echo(evalreport.format_table(outcome))
    echo(f"[eval] report: {artifacts['report']}")
    return {**outcome, "artifacts": artifacts}


def _problems(suite: Suite, model: str, rows: list, shard_dir: Path, engine: Any, tokenizer: Any,
              verifiers: dict[str, Any], suite_dir: Path | None, rank: int, world: int, barrier) -> dict | None:
    """Steps 1-3 of the module docstring; the outcome on the main process, None elsewhere."""
    if rank == 0:
        _clear_stale(shard_dir, suite.fingerprint(model, len(rows)), _verifier_names(verifiers),
                     shards.count(len(rows), suite.shard_size))
    barrier()
    throughput = _sample(suite, model, rows, shard_dir, engine, tokenizer, rank, world)
    for kind, verifier in verifiers.items():
        if verifier is not None:
            _verify(kind, verifier, shard_dir, len(rows), suite.shard_size, rank, world)
    if suite.search:
        if verifiers["prm"] is None:
            _need(verifiers, "prm", suite)  # raises the one line naming `prm:`
        _search(suite, model, rows, shard_dir, engine, tokenizer, verifiers["prm"], rank, world)
    barrier()
    return _select(suite, rows, shard_dir, verifiers, suite_dir, throughput, model) if rank == 0 else None


def _need(verifiers: dict[str, Any], kind: str, suite: Suite) -> Any:
    verifier = verifiers[kind]
    if verifier is None:
        raise RecipeError(f"a {suite.task} suite scores with a {kind.upper()}: give `{kind}:` (stage) or "
                          f"--{kind} PATH", field=kind)
    return _load_verifier(kind, verifier) if isinstance(verifier, str) else verifier


def _load_verifier(kind: str, path: str) -> Any:
    """The reward-model and PRM stages' scorers, on this process's device; imported only when used."""
    from accelerate import PartialState

    if kind == "orm":
        from alignkit.rewards.reward_model import RewardModelScorer  # moves itself to CUDA when there is one

        return RewardModelScorer(path)
    from alignkit.rewards.prm import PRMScorer

    return PRMScorer(path, device=str(PartialState().device))


#: Shard folder layout, stamped beside the fingerprint: folders of an older layout are cleared, not mixed in.
LAYOUT = "samples/ orm/ prm/ (alignkit.core.shards)"


def _clear_stale(shard_dir: Path, fingerprint: str, verifiers: dict[str, str], n_shards: int) -> None:
    """Main process, before any sampling: remove every shard if the pool's fingerprint (or the layout) changed,
    and the score shards a verifier of another name wrote."""
    stamp = shard_dir / "fingerprint.txt"
    if shard_dir.exists() and (not stamp.exists() or stamp.read_text() != f"{fingerprint}\n{LAYOUT}\n"):
        shutil.rmtree(shard_dir)
    shard_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(f"{fingerprint}\n{LAYOUT}\n")
    for kind, name in verifiers.items():
        for k in range(n_shards):
            if shards.path(shard_dir / kind, k).is_file() and shards.meta(shard_dir / kind, k)["model"] != name:
                shards.discard(shard_dir / kind, k)


def _verifier_names(verifiers: dict[str, Any]) -> dict[str, str]:
    """The name each given verifier's score shards record: its path, or ``<ClassName>`` for an object."""
    return {kind: verifier if isinstance(verifier, str) else f"<{type(verifier).__name__}>"
            for kind, verifier in verifiers.items() if verifier is not None}


# ------------------------------------------------------------------------------------- 1. sampling


def _sample(suite: Suite, model: str, rows: list, shard_dir: Path, engine: Any, tokenizer: Any, rank: int,
            world: int) -> float | None:
    """Write the missing sample shards of this process; returns samples/s (None when nothing was left)."""
    from tqdm.auto import tqdm

    from alignkit.generation import SamplingParams

    size = suite.shard_size
    todo = shards.pending(shard_dir / "samples", len(rows), size, rank, world)
    if not todo:
        return None
    if engine is None:
        engine, tokenizer = _load_engine(suite, model)
    s = suite.sampling
    pool = {"max_new_tokens": s.max_completion_length, "top_p": s.top_p, "top_k": s.top_k, "stop": s.stop}
    per_problem = s.n + ("greedy" in suite.methods)
    total = sum(len(shards.items(k, len(rows), size)) for k in todo) * per_problem
    started, done = time.perf_counter(), 0
    with tqdm(total=total, unit="sample", desc=f"eval[{suite.name}]", disable=rank != 0, smoothing=0) as bar:
        for k in todo:
            indices = shards.items(k, len(rows), size)
            chunk = [rows[i] for i in indices]
            prompts = [evalsuite.render(tokenizer, row["prompt"], suite.prompt) for row in chunk]
            # the engine advances the bar per finished completion (progress=bar), not once per shard
            greedy = (engine.generate(prompts, SamplingParams(**pool, temperature=0.0, n=1), progress=bar)
                      if "greedy" in suite.methods else [[None]] * len(chunk))
            sampled = engine.generate(prompts, SamplingParams(**pool, temperature=s.temperature, n=s.n,
                                                              seed=s.seed + k), progress=bar)
            records = [{"index": i, "prompt": row["prompt"], "gold": row["answer"], "greedy": _completion(g[0]),
                        "samples": evalsuite.pool_order([_completion(c) for c in samples], s.seed, i, suite.shuffle)}
                       for i, row, g, samples in zip(indices, chunk, greedy, sampled)]
            for kind in ("orm", "prm"):  # scores of the shard's previous samples no longer apply
                shards.discard(shard_dir / kind, k)
            shards.write(shard_dir / "samples", k, records,
                         {"problems": len(records), "samples": len(chunk) * per_problem, "seed": s.seed + k})
            done += len(chunk) * per_problem
            bar.update(max(done - bar.n, 0))  # what an engine did not count (a fake's, say): the shard is done
    del engine
    _free_memory()
    return done / max(time.perf_counter() - started, 1e-9)


def _load_engine(suite: Suite, model: str) -> tuple[Any, Any]:
    from alignkit.modeling.models import is_quantized, load_model, load_tokenizer

    tokenizer = load_tokenizer(model, padding_side="left")
    if suite.generation.backend == "openai":
        return suite.generation.build(tokenizer=tokenizer), tokenizer
    policy = load_model(model)
    if not is_quantized(policy):
        from accelerate import PartialState

        policy.to(PartialState().device)
    policy.eval()
    return suite.generation.build(model=policy, tokenizer=tokenizer), tokenizer


def _completion(completion: Any) -> dict[str, Any] | None:
    if completion is None:
        return None
    return {"text": completion.text, "finish_reason": completion.finish_reason,
            "tokens": len(completion.token_ids)}


def _free_memory() -> None:
    """Give a finished model's memory back before the next one loads (torch only if it is in use)."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------ 2. verifiers


def _verify(kind: str, verifier: Any, shard_dir: Path, n_rows: int, size: int, rank: int, world: int) -> None:
    """Score every sample of this process's shards with one verifier (``orm``: a float per sample;
    ``prm``: step scores per sample), one row per problem in shard K of ``shard_dir/<kind>``. Shards already
    scored are kept (those of another verifier were discarded by :func:`_clear_stale`)."""
    name = _verifier_names({kind: verifier})[kind]
    todo = shards.pending(shard_dir / kind, n_rows, size, rank, world)
    if not todo:
        return
    from alignkit.rewards.prm import DEFAULT_SEPARATOR, split_steps
    from alignkit.rewards.values import call_reward

    scorer = _load_verifier(kind, verifier) if isinstance(verifier, str) else verifier
    for k in todo:
        problems = shards.read(shard_dir / "samples", k)
        prompts = [p["prompt"] for p in problems for _ in p["samples"]]
        texts = [s["text"] for p in problems for s in p["samples"]]
        if kind == "orm":  # checked: a NaN score would rank samples arbitrarily
            flat: list[Any] = call_reward(scorer, name, texts, {"prompts": prompts}, allow_none=False)
        else:
            separator = getattr(scorer, "separator", DEFAULT_SEPARATOR)  # split as the PRM was trained
            flat = _prm_scores(scorer, name, prompts, [split_steps(t, separator) for t in texts])
        sizes = [len(p["samples"]) for p in problems]
        grouped = [flat[sum(sizes[:i]):sum(sizes[:i + 1])] for i in range(len(sizes))]
        shards.write(shard_dir / kind, k, [{"index": p["index"], "scores": g} for p, g in zip(problems, grouped)],
                     {"model": name, "problems": len(problems)})
    del scorer
    _free_memory()


def _prm_scores(scorer: StepScorer, name: str, prompts: list, steps: list[list[str]]) -> list[list[float]]:
    """PRM step scores (checked); completions without steps are not sent and get ``[]`` (evalsuite choice 3)."""
    from alignkit.rewards.values import check_step_scores

    keep = [i for i, s in enumerate(steps) if s]
    sent = [steps[i] for i in keep]
    scored = check_step_scores(scorer.score_batch([prompts[i] for i in keep], sent), sent, name) if keep else []
    out: list[list[float]] = [[] for _ in steps]
    for i, scores in zip(keep, scored):
        out[i] = scores
    return out


# ------------------------------------------------------------------------------------- 2b. search


def search_dir(shard_dir: Path, suite: Suite, model: str, n_rows: int, label: str, spec: Any, prm: Any) -> Path:
    """Shards of one search run; the folder name holds a hash of everything its results depend on, so a changed
    setting (model, PRM, data, prompt, search spec) writes a new folder instead of mixing in old results."""
    blob = {"pool": suite.fingerprint(model, n_rows), "spec": spec.model_dump(mode="json"),
            "prm": _verifier_names({"prm": prm})["prm"], "seed": suite.sampling.seed}
    digest = hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:12]
    return shard_dir / "search" / f"{label.replace('@', '-n')}-{digest}"


def _search(suite: Suite, model: str, rows: list, shard_dir: Path, engine: Any, tokenizer: Any, prm: Any,
            rank: int, world: int) -> None:
    """Run every search of the suite on this process's shards of problems (one record per problem); ``prm`` is
    the PRM's folder (loaded here, only if anything is left to search) or a scorer."""
    from tqdm.auto import tqdm

    from alignkit.evaluation.search import search

    size = suite.shard_size
    runs = [(label, spec, search_dir(shard_dir, suite, model, len(rows), label, spec, prm))
            for label, spec in suite.search_runs()]
    todo = [(label, spec, folder, k) for label, spec, folder in runs
            for k in shards.pending(folder, len(rows), size, rank, world)]
    if not todo:
        return
    if engine is None:
        engine, tokenizer = _load_engine(suite, model)
    prm = _load_verifier("prm", prm) if isinstance(prm, str) else prm
    total = sum(len(shards.items(k, len(rows), size)) for *_, k in todo)
    with tqdm(total=total, unit="problem", desc=f"eval[{suite.name}] search", disable=rank != 0, smoothing=0) as bar:
        for label, spec, folder, k in todo:
            bar.set_postfix_str(label)
            records = []
            for i in shards.items(k, len(rows), size):
                prompt = rows[i]["prompt"]
                result = search(engine, prm, prompt, evalsuite.render(tokenizer, prompt, suite.prompt), spec,
                                seed=suite.sampling.seed + i, tokenizer=tokenizer)
                best = result.best
                records.append({"index": i, "text": best.text(prm.separator) if best else "",
                                "score": best.score if best else None, "finished": bool(best and best.finished),
                                "solutions": len(result.solutions), **vars(result.cost)})
                bar.update(1)
            shards.write(folder, k, records, {"label": label, "problems": len(records)})


def _search_outcome(suite: Suite, model: str, rows: list, shard_dir: Path, prm: Any, golds: list,
                    suite_dir: Path | None) -> tuple[dict[str, dict[int, list[float]]], dict[str, dict[int, float]]]:
    """``(values, compute)``: per search label and N, each problem's correctness (1/0, in problem order) and
    the mean generated tokens per problem."""
    n_shards = shards.count(len(rows), suite.shard_size)
    values: dict[str, dict[int, list[float]]] = {}
    compute: dict[str, dict[int, float]] = {}
    for label, spec in suite.search_runs():
        folder = search_dir(shard_dir, suite, model, len(rows), label, spec, prm)
        records = [r for done, _ in shards.read_all(folder, n_shards, f"eval search {label}") for r in done]
        correct = _graded([r["text"] for r in records], [golds[r["index"]] for r in records], suite, suite_dir)
        method, n = label.rsplit("@", 1)
        values.setdefault(method, {})[int(n)] = [float(c) for c in correct]
        compute.setdefault(method, {})[int(n)] = sum(r["generated_tokens"] for r in records) / len(records)
    return values, compute


def _graded(texts: list[str], golds: list[Any], suite: Suite, suite_dir: Path | None) -> list[bool]:
    """Whether each text is right by the suite's grader (the check :func:`_grade` applies to samples)."""
    from alignkit.rewards.programs import bind_reward

    grader = bind_reward(suite.grader, base_dir=suite_dir)
    out: list[bool] = []
    for start in range(0, len(texts), 1024):
        scores = grader(texts[start:start + 1024], answer=golds[start:start + 1024])
        out += [score is not None and float(score) >= suite.pass_threshold for score in scores]
    return out


# ------------------------------------------------------------------------------- 3. grade and select


def _select(suite: Suite, rows: list, shard_dir: Path, verifiers: dict[str, Any], suite_dir: Path | None,
            throughput: float | None, model: str) -> dict[str, Any]:
    n_shards = shards.count(len(rows), suite.shard_size)
    problems = [p for done, _ in shards.read_all(shard_dir / "samples", n_shards, "eval samples") for p in done]
    raw = {kind: [row["scores"] for done, _ in shards.read_all(shard_dir / kind, n_shards, f"eval {kind}")
                  for row in done]
           for kind, verifier in verifiers.items() if verifier is not None}
    _grade(problems, suite, suite_dir)
    for i, problem in enumerate(problems):
        for j, sample in enumerate(problem["samples"]):
            if "prm" in raw:
                sample["prm_steps"] = raw["prm"][i][j]
            sample["scores"] = evalsuite.sample_scores(raw["orm"][i][j] if "orm" in raw else None,
                                             sample.get("prm_steps"), suite.prm_aggregations)
    names = evalsuite.verifier_score_names("orm" in raw, "prm" in raw, suite.prm_aggregations)
    metrics, curves, values = evalsuite.selection_metrics(problems, suite, names)
    stats = evalsuite.pool_stats(problems)
    if throughput is not None:
        stats["samples_per_s"] = throughput
    skipped = [m for m in ("best_of_n", "weighted_vote") if m in suite.methods and not names]
    notes = [f"{m} not run: no verifier (give orm:/prm: or --orm/--prm)" for m in skipped]
    compute = {label: {n: n * stats["mean_tokens"] for n in curve} for label, curve in curves.items()}
    optimal: list[dict[str, Any]] = []
    paired: list[dict[str, Any]] = []
    if suite.search:
        searched, search_cost = _search_outcome(suite, model, rows, shard_dir, verifiers["prm"],
                                                [p["gold"] for p in problems], suite_dir)
        values.update(searched)
        compute.update(search_cost)
        for label, by_n in searched.items():
            curves[label] = {n: sum(v) / len(v) for n, v in by_n.items()}
            metrics.update({f"{label}@{n}": acc for n, acc in curves[label].items()})
            stats.update({f"{label}@{n}_tokens": search_cost[label][n] for n in by_n})
        pass_rates = [sum(s["correct"] for s in p["samples"]) / len(p["samples"]) for p in problems]
        optimal = evalsuite.compute_optimal(values, compute, evalsuite.difficulty_buckets(pass_rates, 3))
        paired = evalsuite.search_vs_sampling(values, compute, list(searched), draws=500, seed=suite.sampling.seed)
    headline = metrics.get("greedy", metrics.get("pass@1"))
    summary = {**({"accuracy": headline} if headline is not None else {}), **metrics, **stats,
               "problems": len(problems)}
    return {"summary": summary, "metrics": metrics, "stats": stats, "curves": curves, "problems": problems,
            "notes": notes, "compute": compute, "bands": evalsuite.bands(values, draws=500, seed=suite.sampling.seed),
            "compute_optimal": optimal, "search_vs_sampling": paired}


def _grade(problems: list[dict[str, Any]], suite: Suite, suite_dir: Path | None) -> None:
    """Mark every completion in place: ``answer`` (extracted phrase), ``correct``, ``key`` (vote bucket)."""
    from alignkit.rewards.programs import load_reward

    extract = load_reward(suite.extract, base_dir=suite_dir)
    normalise = load_reward(suite.normalise, base_dir=suite_dir) if suite.normalise else (lambda x: x)
    graded = [(s, p["gold"]) for p in problems for s in [p["greedy"], *p["samples"]] if s is not None]
    correct = _graded([s["text"] for s, _ in graded], [gold for _, gold in graded], suite, suite_dir)
    for (sample, _), right in zip(graded, correct, strict=True):
        sample["correct"] = right
        sample["answer"] = extract(sample["text"])
        sample["key"] = evalsuite.vote_key(sample["correct"], normalise(sample["answer"]))


# ------------------------------------------------------------------------------------------- command line


def eval_main(argv: list[str]) -> int:
    """``alignkit eval SUITE --model PATH [--orm P] [--prm P] [--out DIR] [--set k=v ...] [--wandb MODE]``."""
    parser = argparse.ArgumentParser(prog="alignkit eval", description="Run an eval suite on a model: "
                                     "accuracy, pass@k, maj@k, best-of-N, curves vs N; report.md + plots.")
    parser.add_argument("suite", help="suite file (eval/gsm8k.yaml) or shipped suite name (gsm8k)")
    parser.add_argument("--model", required=True, help="model folder, Hub id or alias")
    parser.add_argument("--orm", help="outcome reward model folder (best-of-N, weighted vote)")
    parser.add_argument("--prm", help="process reward model folder (best-of-N, weighted vote)")
    parser.add_argument("--out", help="output folder (default: runs/eval/<suite>/<model folder name>)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override a suite field, e.g. sampling.n=8 or dataset.limit=50 (repeatable)")
    parser.add_argument("--wandb", choices=["online", "offline"], help="also log to W&B in this mode")
    args = parser.parse_args(argv)
    path = evalsuite.find_suite(args.suite)
    extra = {key: value for key in ("orm", "prm") if (value := getattr(args, key)) is not None}
    suite = evalsuite.load_suite(path, evalsuite.merge(evalsuite.parse_sets(args.sets), extra))
    out = Path(args.out or Path("runs") / "eval" / suite.name / Path(args.model.rstrip("/")).name)
    # Under `accelerate launch` each process samples, scores and searches its share of the shards and the main one
    # writes the report and logs to W&B (without this, every process would do all the work as its own "main").
    # A second eval into a folder in use is refused before it is touched (a changed setting would clear the shards
    # of the run in progress), with the same lock as `alignkit run`'s run folder.
    from alignkit.run.pipeline import process_state, quiet, run_folder_lock

    state = process_state()  # gloo on CPU-only machines, as `alignkit run` joins it
    main = state.is_main_process
    with run_folder_lock(out, state, "--out"):
        tracker = _cli_tracker(args.wandb if main else None, suite, args.model, out)
        tracker.start()
        try:
            run_suite(suite, args.model, out, suite_dir=path.parent, tracker=tracker, rank=state.process_index,
                      world=state.num_processes, barrier=state.wait_for_everyone, echo=print if main else quiet)
        except BaseException:
            tracker.finish(failed=True)
            raise
        tracker.finish()
    return 0


def _cli_tracker(mode: str | None, suite: Suite, model: str, out: Path) -> Any:
    from alignkit.core.config import TrackingSpec
    from alignkit.core.tracking import Tracker

    spec = TrackingSpec(report_to="wandb" if mode else "none", wandb={"mode": mode or "offline"})
    return Tracker(spec, group=f"eval-{suite.name}", job_type="eval", name=f"eval/{suite.name}/{Path(model).name}",
                   config={"suite": suite.model_dump(mode="json"), "model": model}, directory=out)
