"""Math-Shepherd automatic process labels (Wang et al. 2023, arXiv:2312.08935, sec. 3.3).

Recipe example::

    - kind: label
      model: ${sft.model}                      # the policy that writes solutions (and, by default, completes)
      data: {source: arith, seed: 1, params: {n: 200, steps: [2, 3]}}   # problems with gold answers
      num_generations: 4                       # k solutions per problem
      completions_per_step: 8                  # N continuations per step prefix (the paper's N)
      generation: {backend: fast, batch_size: 64}

What it does, per shard of ``shard_size`` problems:

1. Solutions: the policy samples ``num_generations`` per problem (``solutions: generate``), or the
   problems' own ``steps`` are used (``solutions: given``). Steps are the solution split on ``separator``.
2. Rollouts: from every step prefix ``s_1..s_i`` of every solution the completer samples N continuations to
   a final answer, all prefixes of the shard in one ``generate`` call with ``n = N``. A prefix that several
   solutions of a problem share is rolled out once and its outcomes serve them all.
3. Labels: ``reward`` (default ``answer_match``) checks each continuation against the gold answer;
   :func:`alignkit.maths.labels.step_labels` turns the (steps x N) table into hard (HE) and soft (SE) labels.
4. The shard's rows are written to ``shards/shard-<j>.jsonl`` (temp file, then rename), so a crash loses
   at most the shard in progress and a rerun skips complete shards.

Under ``accelerate launch`` rank r labels shards ``j % world == r``; the main process merges them into
``data.jsonl``: stepwise rows ``{prompt, completions, labels, soft_labels, answer, solution_correct, ...}``
that the ``prm`` stage reads as ``data: {source: ${label.data}}``. Output: ``${<name>.data}``.

Quality check (on ``arith`` problems, where :func:`alignkit.data.check_steps` gives the true first error):
every prefix gets ``max(N, max(agreement_ns))`` continuations, labels use the first N, and the metrics
report HE/SE agreement with the truth for each N in ``agreement_ns`` from the same pool (one run).

Departures from the paper:

1. The last step of a solution that ended by itself (EOS or stop string; every given solution) is labelled
   by its own final answer, without rollouts: the prefix is the whole solution, so a continuation could
   only restate or change the answer. Cut-off solutions get rollouts at every step.
2. Shards are striped over ranks (``j % world``), not single problems: shard files are then the same for
   any number of processes, so a rerun with another world size still resumes.
3. Solutions with no step or more than ``max_solution_steps`` steps are skipped (counted in the metrics).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from alignkit.core import shards
from alignkit.core.config import DataSpec, QuantSpec
from alignkit.core.errors import DataError, RecipeError
from alignkit.generation import HFSpec, GenerationSpec
from alignkit.core.artifacts import write_jsonl_atomic
from alignkit.core.stage import StageConfig, StageContext, StageResult


class Config(StageConfig):
    kind: str = "label"
    RENAMED = {"samples_per_problem": "num_generations", "solution_max_new_tokens": "max_completion_length",
               "continuation_max_new_tokens": "max_continuation_length", "max_steps": "max_solution_steps"}
    model: str = Field(..., description="Policy that writes the solutions (and completes them by default).")
    completer: str | None = Field(None, description="Model that samples the continuations (default: `model`).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Weights dtype.")
    quantization: QuantSpec | None = Field(None, description="bitsandbytes quantization of the models.")
    data: DataSpec = Field(..., description="Problems with gold answers (`problems` format: prompt, answer).")
    solutions: Literal["generate", "given"] = Field(
        "generate", description="Sample solutions from the policy, or label the problems' own `steps` "
        "(given solutions are complete: their last step must state the final answer).")
    num_generations: int = Field(4, gt=0, description="Solutions sampled per problem (k).")
    separator: str = Field("\n", min_length=1, description="Splits a solution into steps (and joins them back).")
    chat: bool = Field(True, description="Render problems with the chat template.")
    temperature: float = Field(0.8, ge=0, description="Sampling temperature of solutions and continuations.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    max_completion_length: int = Field(256, gt=0, description="Token budget of a solution.")
    completions_per_step: int = Field(8, gt=0, description="Continuations per step prefix (N; the paper's 8).")
    max_continuation_length: int = Field(256, gt=0, description="Token budget of a continuation.")
    max_solution_steps: int = Field(16, gt=0, description="Skip solutions with more steps than this.")
    reward: str = Field("reward/math.py:answer_match", description="Answer checker: fn(completions, answer=...).")
    quality_check: bool | Literal["auto"] = Field(
        "auto", description="Measure agreement with true step labels (arith only); auto = for `source: arith`.")
    agreement_ns: list[int] = Field([1, 4, 8, 16], description="N values of the agreement curve.")
    generation: GenerationSpec = Field(
        default_factory=HFSpec, description="Sampling backend and batch size.")
    shard_size: int = Field(16, gt=0, description="Problems per shard (the unit of resumption).")
    seed: int = Field(0, description="Sampling seed (each shard derives its own).")

    @field_validator("agreement_ns")
    @classmethod
    def _positive(cls, ns: list[int]) -> list[int]:
        if not ns or any(n < 1 for n in ns):
            raise ValueError("agreement_ns must be a non-empty list of positive integers, e.g. [1, 4, 8, 16]")
        return sorted(set(ns))


def outputs(run_dir: Path) -> dict[str, str]:
    return {"data": str(run_dir / "data.jsonl"), "shards": str(run_dir / "shards"), "dir": str(run_dir)}


def check(config: Config, base_dir: Path) -> None:
    from alignkit.rewards.programs import load_reward

    try:
        load_reward(config.reward, base_dir=base_dir)
    except RecipeError as err:
        raise RecipeError(err.reason, field="reward") from None
    if config.quality_check is True and config.data.source != "arith":
        raise RecipeError("the quality check needs true step labels, which only `source: arith` has; "
                          "set quality_check: auto or false", field="quality_check")


def run(config: Config, ctx: StageContext) -> StageResult:
    from alignkit.data import load_dataset
    from alignkit.rewards.programs import load_reward

    problems = list(load_dataset(config.data, "problems"))
    shard_dir = ctx.run_dir / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    todo = shards.pending(shard_dir, len(problems), config.shard_size, ctx.state.process_index,
                          ctx.state.num_processes)
    if todo:
        reward = load_reward(config.reward, base_dir=ctx.recipe_dir)
        policy, completer = build_samplers(config, ctx)
        _label_shards(todo, problems, policy, completer, reward, config, shard_dir, progress=ctx.is_main)
    ctx.wait()
    if not ctx.is_main:
        return StageResult()
    rows, metas = merge_shards(shard_dir, shards.count(len(problems), config.shard_size), ctx.run_dir / "data.jsonl")
    metrics = summarize(rows, metas, config, pool=_pool_size(config))
    print(f"[alignkit] {ctx.name}: {metrics['rows']} labelled solutions, solution accuracy "
          f"{metrics['solution_accuracy']:.3f}, {metrics['completions_per_second']:.1f} completions/s")
    ctx.log_metrics(metrics)
    return StageResult(metrics=metrics, artifacts={"data": str(ctx.run_dir / "data.jsonl")})


# ------------------------------------------------------------------------------------------------ sampling


@dataclass
class Sampler:
    """An engine plus how to render problems for its model (``tokenizer`` None: raw prompt + newline)."""

    engine: Any
    tokenizer: Any
    chat: bool = True

    def render(self, prompt: str) -> str:
        from alignkit.data.prompts import render_prompt

        return render_prompt(self.tokenizer, prompt, chat=self.chat)


def build_samplers(config: Config, ctx: Any) -> tuple[Sampler, Sampler]:
    """(policy, completer); the same sampler twice when no separate completer is named."""
    policy = _sampler(config.model, config, ctx)
    if config.completer is None or config.completer == config.model:
        return policy, policy
    return policy, _sampler(config.completer, config, ctx)


def _sampler(name: str, config: Config, ctx) -> Sampler:
    from alignkit.modeling.models import is_quantized, load_model, load_tokenizer

    tokenizer = load_tokenizer(name)
    spec = config.generation
    if spec.backend == "openai":  # the server holds the weights; `name` only gives the chat template
        if config.completer is not None and name == config.completer:
            spec = spec.model_copy(update={"model_name": name})
        return Sampler(spec.build(tokenizer=tokenizer), tokenizer, config.chat)
    model = load_model(name, quantization=config.quantization, dtype=config.dtype)
    if not is_quantized(model):
        model.to(ctx.state.device)
    model.eval()
    return Sampler(spec.build(model=model, tokenizer=tokenizer), tokenizer, config.chat)


def _checking(config: Config) -> bool:
    """Whether the quality check runs (true labels exist only for arith problems)."""
    return config.quality_check is True or (config.quality_check == "auto" and config.data.source == "arith")


def _pool_size(config: Config) -> int:
    """Continuations sampled per prefix: N, or the largest N of the agreement curve when it is measured."""
    return max([config.completions_per_step] + (config.agreement_ns if _checking(config) else []))


def _label_shards(todo, problems, policy, completer, reward, config, shard_dir: Path, *, progress: bool) -> None:
    from tqdm.auto import tqdm

    size = config.shard_size
    bar = tqdm(total=sum(len(problems[j * size:(j + 1) * size]) for j in todo), unit="problem",
               desc="label", disable=not progress, dynamic_ncols=True)
    done_completions, busy_s = 0, 0.0
    for j in todo:
        started = time.perf_counter()
        rows, meta = label_shard(problems[j * size:(j + 1) * size], j * size, policy, completer, reward, config,
                                 seed=config.seed * 1_000_003 + j)
        meta["seconds"] = round(time.perf_counter() - started, 3)
        shards.write(shard_dir, j, rows, meta)
        done_completions, busy_s = done_completions + meta["completions"], busy_s + meta["seconds"]
        bar.update(meta["problems"])
        bar.set_postfix(compl_per_s=f"{done_completions / max(busy_s, 1e-9):.1f}")
    bar.close()


def label_shard(problems: list[dict[str, Any]], first_index: int, policy: Sampler, completer: Sampler,
                reward: Any, config: Config, *, seed: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Label one shard: rows (one per kept solution) and counts for the metrics."""
    from alignkit.generation import SamplingParams

    pool = _pool_size(config)
    solutions, meta = _solutions(problems, first_index, policy, config, seed)
    # every (solution, step) prefix that needs rollouts: all steps but a finished solution's last
    queries = [(s, i) for s, sol in enumerate(solutions) for i in range(len(sol["steps"]))
               if not (sol["finished"] and i == len(sol["steps"]) - 1)]
    prefixes = [config.separator.join(solutions[s]["steps"][: i + 1]) + config.separator for s, i in queries]
    prompts = [completer.render(solutions[s]["prompt"]) + prefix for (s, _), prefix in zip(queries, prefixes)]
    # Solutions of one problem often share their first steps: an identical prompt + prefix is rolled out once
    # and its N outcomes serve every solution that has it (the same Monte Carlo estimate of the same prefix).
    first: dict[str, int] = {}  # prompt -> its first query, the one rolled out
    for q, prompt in enumerate(prompts):
        first.setdefault(prompt, q)
    params = SamplingParams(n=pool, temperature=config.temperature, top_p=config.top_p, seed=seed + 1,
                            max_new_tokens=config.max_continuation_length)
    outs = completer.engine.generate(list(first), params, progress=False) if first else []
    texts = [prefixes[q] + c.text for q, samples in zip(first.values(), outs) for c in samples]
    golds = [solutions[queries[q][0]]["answer"] for q in first.values() for _ in range(pool)]
    verdicts = _verdicts(reward, config.reward, texts, golds)
    pools = {prompt: verdicts[u * pool:(u + 1) * pool] for u, prompt in enumerate(first)}
    texts_full = [config.separator.join(sol["steps"]) for sol in solutions]
    correct = _verdicts(reward, config.reward, texts_full, [sol["answer"] for sol in solutions])
    outcomes = [[[correct[s]] * pool for _ in sol["steps"]] for s, sol in enumerate(solutions)]
    for q, (s, i) in enumerate(queries):
        outcomes[s][i] = pools[prompts[q]]
    rows = [_row(sol, outcomes[s], correct[s], config) for s, sol in enumerate(solutions)]
    meta.update(completions=meta["completions"] + len(texts), rollout_prefixes=len(first),
                shared_prefixes=len(queries) - len(first),
                tokens=meta["tokens"] + sum(len(c.token_ids) for samples in outs for c in samples))
    return rows, meta


def _solutions(problems, first_index: int, policy: Sampler, config: Config, seed: int):
    """The solutions to label, as dicts (problem_index, solution_index, prompt, answer, steps, finished)."""
    from alignkit.generation import SamplingParams
    from alignkit.rewards.prm import split_steps

    meta = {"problems": len(problems), "solutions": 0, "skipped_empty": 0, "skipped_long": 0,
            "completions": 0, "tokens": 0}
    if config.solutions == "given":
        drafts = [[(row.get("steps") or [], "given")] for row in problems]
    else:
        params = SamplingParams(n=config.num_generations, temperature=config.temperature,
                                top_p=config.top_p, max_new_tokens=config.max_completion_length, seed=seed)
        outs = policy.engine.generate([policy.render(row["prompt"]) for row in problems], params, progress=False)
        drafts = [[(split_steps(c.text, config.separator), c.finish_reason) for c in samples] for samples in outs]
        meta["completions"] = sum(len(samples) for samples in outs)
        meta["tokens"] = sum(len(c.token_ids) for samples in outs for c in samples)
    solutions = []
    for p, (row, samples) in enumerate(zip(problems, drafts)):
        for k, (steps, reason) in enumerate(samples):
            meta["solutions"] += 1
            if not steps or len(steps) > config.max_solution_steps:
                meta["skipped_empty" if not steps else "skipped_long"] += 1
                continue
            solutions.append({"problem_index": first_index + p, "solution_index": k, "prompt": row["prompt"],
                              "answer": row["answer"], "steps": [str(s).strip() for s in steps],
                              "finished": reason in ("eos", "stop", "given")})
    return solutions, meta


def _verdicts(reward, program: str, texts: list[str], golds: list[str]) -> list[bool]:
    """Whether each text reaches its gold answer (a None score, i.e. no gold, counts as not reached).

    Scores are checked first: ``bool`` would call NaN or the string "no" a right answer."""
    from alignkit.rewards.values import call_reward

    if not texts:
        return []
    return [bool(score) for score in call_reward(reward, program, texts, {"answer": golds})]


def _row(solution: dict[str, Any], outcomes: list[list[bool]], correct: bool, config: Config) -> dict[str, Any]:
    """One stepwise row: labels from the first N outcomes of each step; the whole pool kept for the curve."""
    from alignkit.data import check_steps
    from alignkit.maths.labels import step_labels

    labels = step_labels([step[: config.completions_per_step] for step in outcomes])
    row = {
        "problem_index": solution["problem_index"], "solution_index": solution["solution_index"],
        "prompt": solution["prompt"], "answer": solution["answer"], "completions": solution["steps"],
        "labels": labels.hard, "soft_labels": labels.soft, "solution_correct": correct,
        "outcomes": [[int(o) for o in step] for step in outcomes],
    }
    if _checking(config):
        row["true_first_error"] = check_steps(solution["prompt"], solution["steps"])
    return row


# ----------------------------------------------------------------------------------------- shards, merging



def merge_shards(shard_dir: Path, n_shards: int, out: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Concatenate the shards in order into ``out`` (atomically); returns (rows, shard counts)."""
    done = shards.read_all(shard_dir, n_shards, "label")
    rows = [row for shard_rows, _ in done for row in shard_rows]
    metas = [meta for _, meta in done]
    if not rows:
        raise DataError(f"no solution could be labelled ({sum(m['solutions'] for m in metas)} sampled, all "
                        "empty or longer than max_solution_steps): check the policy's output format and `separator`")
    write_jsonl_atomic(out, rows)
    return rows, metas


# ------------------------------------------------------------------------------------------------- metrics


def summarize(rows: list[dict[str, Any]], metas: list[dict[str, Any]], config: Config, *, pool: int) -> dict:
    """Counts, throughput, label statistics and (with true labels) agreement with the truth vs N."""
    seconds = sum(m.get("seconds", 0.0) for m in metas)
    completions = sum(m["completions"] for m in metas)
    steps = [label for row in rows for label in row["labels"]]
    metrics: dict[str, Any] = {
        "problems": sum(m["problems"] for m in metas), "solutions": sum(m["solutions"] for m in metas),
        "rows": len(rows), "skipped_empty": sum(m["skipped_empty"] for m in metas),
        "skipped_long": sum(m["skipped_long"] for m in metas), "steps": len(steps),
        "completions": completions, "rollouts_per_prefix": pool,
        "shared_prefixes": sum(m.get("shared_prefixes", 0) for m in metas),
        "completions_per_second": completions / seconds if seconds else 0.0,
        "tokens_per_second": sum(m["tokens"] for m in metas) / seconds if seconds else 0.0,
        "solution_accuracy": sum(r["solution_correct"] for r in rows) / len(rows),
        "good_step_fraction": sum(steps) / len(steps),
    }
    if all("true_first_error" in row for row in rows):
        metrics.update(agreement_curve(rows, [n for n in config.agreement_ns if n <= pool]))
    return metrics


def agreement_curve(rows: list[dict[str, Any]], ns: list[int]) -> dict[str, float]:
    """HE/SE agreement with the true labels when only the first N outcomes of each step are used.

    Keys per N: ``hard_step_accuracy_n{N}`` (fraction of steps whose HE label is right), ``hard_exact_n{N}``
    (solutions whose first error is found exactly), ``hard_early_n{N}`` (an error flagged before the true
    one: HE's false negatives), ``hard_late_n{N}``, ``soft_mae_n{N}`` and ``soft_accuracy_n{N}`` (SE >= 0.5).
    """
    from alignkit.maths.labels import label_agreement, soft_label_agreement, step_labels

    curve: dict[str, float] = {}
    for n in ns:
        totals = {"step_accuracy": 0.0, "exact": 0.0, "early": 0.0, "late": 0.0, "mae": 0.0, "accuracy@0.5": 0.0}
        for row in rows:
            labels = step_labels([step[:n] for step in row["outcomes"]])
            hard = label_agreement(labels.first_error, row["true_first_error"], len(labels.hard))
            soft = soft_label_agreement(labels.soft, row["true_first_error"])
            for key, value in {**hard, **soft}.items():
                totals[key] += float(value)
        names = {"step_accuracy": "hard_step_accuracy", "exact": "hard_exact", "early": "hard_early",
                 "late": "hard_late", "mae": "soft_mae", "accuracy@0.5": "soft_accuracy"}
        curve.update({f"{names[k]}_n{n}": v / len(rows) for k, v in totals.items()})
    return curve
