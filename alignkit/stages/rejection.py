"""Rejection sampling, the synthetic-data engine: sample, check, keep, revise (expert iteration / RFT / STaR).

Recipe example::

    - kind: rejection
      model: ${sft.model}                                   # the policy that writes the attempts
      data: {source: arith, seed: 1, params: {n: 256}}      # prompts with gold answers (`problems`)
      num_generations: 8                                    # n attempts per prompt
      keep: 2                                               # at most k passing, distinct ones per prompt
      rewards: [{program: reward/math.py:answer_match}]     # the check: verifiers, `model:${rm.model}` ...
      min_score: 1.0                                        # an attempt passes at weighted score >= this
      revise_rounds: 1                                      # a prompt with no pass gets one revision request
      generation: {backend: fast, batch_size: 64}

What it does, per shard of ``shard_size`` prompts:

1. Sample ``num_generations`` attempts per prompt (one ``generate`` call, seeded per shard).
2. Check: the ``rewards`` (weighted sum, as in ``grpo``: verifiers such as ``answer_match`` or ``unit_tests``,
   an ORM ``model:<folder>``, a PRM ``prm:<folder>``) score each attempt; it passes at ``score >= min_score``.
   With a ``judge:``, the judge is asked ``judge_question`` about each attempt with the options Yes/No (both
   orders, :mod:`alignkit.cai.judges`) and an attempt passes only if also ``P(Yes) >= judge_min_p``.
3. Keep up to ``keep`` passing attempts per prompt, best score first, without exact or near duplicates
   (:func:`alignkit.data.rejection.keep`).
4. Revise (``revise_rounds`` > 0): for each prompt with fewer than ``keep`` kept, its best-scored failing
   attempt goes back to the model as a conversation: the prompt, the attempt as the model's turn, and
   ``revision_request`` (with the checker's ``feedback`` where the reward program offers one, see below) as
   the next user turn. A passing, distinct revision is kept with its provenance (round, the attempt it
   revised); a failing one is the attempt of the next round.
5. The shard's rows (one per prompt: attempts, scores, verdicts, what was kept, revisions) go to
   ``shards/shard-<j>.jsonl``; a killed run redoes only the shard in progress.

Under ``accelerate launch`` rank r does shards ``j % world == r`` (as ``label``); the main process merges.
Outputs: ``${<name>.data}``, SFT rows ``{prompt, completion, score, source, round, prompt_index}`` (``source``
``sample`` or ``revision``); ``${<name>.pairs}``, preference pairs for ``dpo``: per prompt the best kept
attempt vs its worst-scored failing one, and each passing revision vs the attempt it fixed;
``${<name>.prompts}``, per prompt its pass rate, whether it was solved and how.

Metrics: ``pass_rate`` (passing attempts / attempts), ``pass_at_<k>`` (the unbiased estimator over the n
attempts, before revisions), ``prompts_without_pass`` (after revisions), ``kept``, ``duplicates_dropped``,
``revisions``, ``revisions_fixed``, ``revision_fix_rate``, ``pairs``, completions and tokens per second.

Feedback: a reward function may carry a ``feedback`` attribute, a function with its own signature that returns
one string (or None) per completion saying why it fell short (``reward/code.py:unit_tests`` names the failing
tests). Nothing else is shown to the model: the gold answer never is.

Departures from Llama 3's practice (Dubey et al. 2024, sec. 4.3.3): one revision request per failing prompt and
round (the best-scored failure), not one per failing attempt; and near-duplicates are judged by word 3-gram
Jaccard similarity rather than by embeddings.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from alignkit.cai.judges import JudgeSpec
from alignkit.core import shards
from alignkit.core.artifacts import write_jsonl_atomic
from alignkit.core.config import DataSpec, QuantSpec
from alignkit.core.errors import DataError, RewardError
from alignkit.core.stage import StageConfig, StageContext, StageResult
from alignkit.generation import FastSpec, GenerationSpec
from alignkit.rewards.programs import RewardSpec

REVISION_REQUEST = ("Your answer above did not pass the check.{feedback} Find the mistake and write a corrected "
                    "answer in full, in the same format.")
JUDGE_QUESTION = "Is the assistant's last reply a correct and complete answer to the human's request?"


class Config(StageConfig):
    kind: str = "rejection"
    model: str = Field(..., description="Policy that writes the attempts and their revisions.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Weights dtype.")
    quantization: QuantSpec | None = Field(None, description="bitsandbytes quantization of the policy.")
    data: DataSpec = Field(..., description="Prompts to sample on (`problems`: prompt + answer, or `prompts`).")
    data_format: Literal["problems", "prompts"] = Field(
        "problems", description="problems: rows carry a gold `answer` for verifiers; prompts: prompt only "
        "(a judge or reward model checks).")
    num_generations: int = Field(8, gt=0, description="Attempts sampled per prompt (n).")
    keep: int = Field(1, gt=0, description="Most passing, distinct attempts kept per prompt (k).")
    rewards: list[RewardSpec] = Field(
        default_factory=list, description="Reward programs summed with their weights (the check); `model:<folder>` "
        "is an ORM, `prm:<folder>` a PRM.")
    min_score: float = Field(1.0, description="An attempt passes when its weighted reward score is at least this.")
    judge: JudgeSpec | None = Field(None, description="Also ask a judge model whether each attempt is right.")
    judge_question: str = Field(JUDGE_QUESTION, min_length=1, description="What the judge is asked (Yes/No).")
    judge_min_p: float = Field(0.5, ge=0, le=1, description="P(Yes) an attempt needs from the judge.")
    near_duplicate: float | None = Field(
        0.9, gt=0, le=1, description="Drop a kept attempt this similar (word 3-gram Jaccard) to a kept one; "
        "null: exact duplicates only.")
    revise_rounds: int = Field(0, ge=0, description="Revision requests per prompt still short of `keep`.")
    revision_request: str = Field(
        REVISION_REQUEST, min_length=1, description="The user turn asking for a revision; `{feedback}` is "
        "replaced by ' ' + the checker's feedback (or nothing).")
    chat: bool = Field(True, description="Render prompts with the chat template.")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature of attempts and revisions.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    max_completion_length: int = Field(256, gt=0, description="Token budget of an attempt or a revision.")
    generation: GenerationSpec = Field(default_factory=FastSpec, description="Sampling backend and batch size.")
    shard_size: int = Field(32, gt=0, description="Prompts per shard (the unit of resumption).")
    seed: int = Field(0, description="Sampling seed (each shard derives its own).")

    @model_validator(mode="after")
    def _has_a_check(self) -> Config:
        if not self.rewards and self.judge is None:
            raise ValueError("give `rewards` (e.g. [{program: reward/math.py:answer_match}]) or a `judge`, or both: "
                             "rejection sampling needs a check")
        if "{feedback}" not in self.revision_request and self.revise_rounds:
            raise ValueError("revision_request must contain {feedback} (where the checker's feedback goes)")
        return self


def outputs(run_dir: Path) -> dict[str, str]:
    return {"data": str(run_dir / "data.jsonl"), "pairs": str(run_dir / "pairs.jsonl"),
            "prompts": str(run_dir / "prompts.jsonl"), "dir": str(run_dir)}


def check(config: Config, base_dir: Path) -> None:
    from alignkit.rewards.programs import check_rewards

    check_rewards([(f"rewards.{i}", spec) for i, spec in enumerate(config.rewards)], base_dir)


def run(config: Config, ctx: StageContext) -> StageResult:
    from alignkit.data import load_dataset

    prompts = load_dataset(config.data, config.data_format).to_list()
    shard_dir = ctx.run_dir / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    todo = shards.pending(shard_dir, len(prompts), config.shard_size, ctx.state.process_index,
                          ctx.state.num_processes)
    if todo:
        checker = Checker.build(config, ctx)
        _sample_shards(todo, prompts, checker, config, shard_dir, progress=ctx.is_main)
    ctx.wait()
    if not ctx.is_main:
        return StageResult()
    rows, metas = [], []
    for shard_rows, meta in shards.read_all(shard_dir, shards.count(len(prompts), config.shard_size), ctx.name):
        rows += shard_rows
        metas.append(meta)
    sft_rows, pair_rows = training_rows(rows), preference_pairs(rows)
    if not sft_rows:
        raise DataError(f"{ctx.name}: no attempt passed the check ({len(rows)} prompts x {config.num_generations} "
                        "attempts); raise temperature or num_generations, lower min_score, or start from a "
                        "stronger model")
    write_jsonl_atomic(ctx.run_dir / "data.jsonl", sft_rows)
    write_jsonl_atomic(ctx.run_dir / "pairs.jsonl", pair_rows)
    write_jsonl_atomic(ctx.run_dir / "prompts.jsonl", [prompt_summary(row) for row in rows])
    metrics = summarize(rows, metas, config, pairs=len(pair_rows))
    print(f"[alignkit] {ctx.name}: kept {metrics['kept']} rows from {metrics['prompts']} prompts, pass rate "
          f"{metrics['pass_rate']:.3f}, pass@{config.num_generations} {metrics[f'pass_at_{config.num_generations}']:.3f}"
          f", {metrics['revisions_fixed']}/{metrics['revisions']} revisions fixed a failure, "
          f"{metrics['prompts_without_pass']} prompts without a pass")
    ctx.log_metrics(metrics)
    return StageResult(metrics=metrics, artifacts={k: str(ctx.run_dir / f"{k}.jsonl") for k in ("data", "pairs",
                                                                                                 "prompts")})


# ---------------------------------------------------------------------------------- policy and check


class Checker:
    """The policy's engine and everything that says whether an attempt passes."""

    def __init__(self, engine: Any, tokenizer: Any, reward: Any, judge: Any, config: Config):
        self.engine, self.tokenizer, self.reward, self.judge, self.config = engine, tokenizer, reward, judge, config

    @classmethod
    def build(cls, config: Config, ctx: Any) -> Checker:
        from alignkit.cai.judges import build_judge
        from alignkit.rewards.programs import combine_rewards
        from alignkit.stages.common import sampling_policy

        engine, model, tokenizer = sampling_policy(config.model, config.generation, ctx,
                                                   quantization=config.quantization, dtype=config.dtype)
        reward = combine_rewards(list(config.rewards), ctx.recipe_dir) if config.rewards else None
        judge = None
        if config.judge is not None:
            judge = build_judge(config.judge, default_model=config.model, device=ctx.state.device,
                                loaded=(model, tokenizer) if model is not None else None,
                                quantization=config.quantization)
        return cls(engine, tokenizer, reward, judge, config)

    def render(self, conversation: Any) -> str:
        from alignkit.data.prompts import render_prompt

        return render_prompt(self.tokenizer, conversation, chat=self.config.chat)

    def scores(self, rows: list[dict[str, Any]], texts: list[str]) -> tuple[list[float | None], list[float | None]]:
        """(weighted reward score or None, judge P(Yes) or None) for ``texts[i]`` answering ``rows[i]``."""
        from alignkit.data.pairs import score_samples

        reward = [s[0] for s in score_samples(self.reward, rows, [[t] for t in texts])] if self.reward else \
            [None] * len(texts)
        return reward, self._judged(rows, texts)

    def passed(self, reward: float | None, judged: float | None) -> bool:
        config = self.config
        return ((not config.rewards or (reward is not None and reward >= config.min_score))
                and (config.judge is None or (judged is not None and judged >= config.judge_min_p)))

    def feedback(self, rows: list[dict[str, Any]], texts: list[str]) -> list[str | None]:
        """Per text, what the reward programs that offer ``feedback`` say about it (joined), else None."""
        said: list[list[str]] = [[] for _ in texts]
        for fn in self.reward.funcs if self.reward and texts else []:
            explain = feedback_function(fn.fn)
            if explain is None:
                continue
            columns: dict[str, list[Any]] = {}
            for row in rows:
                for key, value in row.items():
                    columns.setdefault("prompts" if key == "prompt" else key, []).append(value)
            notes = explain(completions=texts, **columns)
            if not isinstance(notes, (list, tuple)) or len(notes) != len(texts):
                raise RewardError(f"{fn.program}: feedback gave {type(notes).__name__} of "
                                  f"{len(notes) if isinstance(notes, (list, tuple)) else '?'} items for "
                                  f"{len(texts)} completions; it must return one string or None per completion")
            for i, note in enumerate(notes):
                if note:
                    said[i].append(str(note).strip())
        return [" ".join(notes) or None for notes in said]

    def _judged(self, rows: list[dict[str, Any]], texts: list[str]) -> list[float | None]:
        if self.judge is None or not texts:
            return [None] * len(texts)
        from alignkit.cai.judges import Comparison, compare
        from alignkit.data.prompts import as_messages

        items = [Comparison(as_messages(row["prompt"]) + [{"role": "assistant", "content": text}], "Yes", "No",
                            self.config.judge_question) for row, text in zip(rows, texts, strict=True)]
        return [verdict.p for verdict in compare(self.judge, items, swap=True)]


def feedback_function(fn: Any) -> Any:
    """``fn``'s ``feedback`` function with the same options bound (through ``functools.partial``), or None."""
    import functools

    if isinstance(fn, functools.partial):
        inner = feedback_function(fn.func)
        return None if inner is None else functools.partial(inner, *fn.args, **fn.keywords)
    return getattr(fn, "feedback", None)


# ------------------------------------------------------------------------------------------------ shards


def _sample_shards(todo: list[int], prompts: list[dict[str, Any]], checker: Checker, config: Config,
                   shard_dir: Path, *, progress: bool) -> None:
    from tqdm.auto import tqdm

    size = config.shard_size
    bar = tqdm(total=sum(len(prompts[j * size:(j + 1) * size]) for j in todo), unit="prompt", desc="rejection",
               disable=not progress, dynamic_ncols=True, smoothing=0)
    kept = attempts = passed = 0
    for j in todo:
        rows, meta = sample_shard(prompts[j * size:(j + 1) * size], j * size, checker, config,
                                  seed=config.seed * 1_000_003 + j)
        shards.write(shard_dir, j, rows, meta)
        kept += sum(len(row["kept"]) for row in rows)
        attempts += sum(len(row["attempts"]) for row in rows)
        passed += sum(sum(row["passed"]) for row in rows)
        bar.update(len(rows))
        bar.set_postfix(pass_rate=f"{passed / max(attempts, 1):.2f}", kept=kept,
                        compl_per_s=f"{meta['completions'] / max(meta['seconds'], 1e-9):.1f}")
    bar.close()


def sample_shard(prompts: list[dict[str, Any]], first_index: int, checker: Checker, config: Config, *,
                 seed: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Attempts, checks, keeps and revisions of one shard: a row per prompt and the shard's counts."""
    from alignkit.data.rejection import keep
    from alignkit.generation import SamplingParams

    started = time.perf_counter()
    params = SamplingParams(n=config.num_generations, temperature=config.temperature, top_p=config.top_p,
                            max_new_tokens=config.max_completion_length, seed=seed)
    outs = checker.engine.generate([checker.render(row["prompt"]) for row in prompts], params, progress=False)
    texts = [[c.text for c in samples] for samples in outs]
    flat_rows = [row for row, attempts in zip(prompts, texts) for _ in attempts]
    reward, judged = checker.scores(flat_rows, [t for attempts in texts for t in attempts])
    meta = {"prompts": len(prompts), "completions": sum(map(len, texts)),
            "tokens": sum(len(c.token_ids) for samples in outs for c in samples)}
    rows, start = [], 0
    for p, (row, attempts) in enumerate(zip(prompts, texts)):
        scores, probs = reward[start:start + len(attempts)], judged[start:start + len(attempts)]
        start += len(attempts)
        verdicts = [checker.passed(s, q) for s, q in zip(scores, probs)]
        # keep() ranks by score; with a judge only (no rewards) P(Yes) is the score
        ranking = scores if config.rewards else probs
        chosen = keep(attempts, [r if ok else None for r, ok in zip(ranking, verdicts)], threshold=float("-inf"),
                      k=config.keep, near=config.near_duplicate)
        rows.append({"index": first_index + p, "prompt": row["prompt"], "attempts": attempts, "scores": scores,
                     "judge_p": probs if config.judge is not None else None, "passed": verdicts, "kept": chosen,
                     "duplicates_dropped": _duplicates(attempts, verdicts, config.near_duplicate),
                     "revisions": []})
    for round_ in range(1, config.revise_rounds + 1):
        meta["completions"] += _revise(prompts, rows, checker, config, round_, seed=seed + 7919 * round_, meta=meta)
    meta["seconds"] = round(time.perf_counter() - started, 3)
    return rows, meta


def _duplicates(attempts: list[str], verdicts: list[bool], near: float | None) -> int:
    """Passing attempts that :func:`alignkit.data.rejection.distinct` drops (before the ``keep`` cap)."""
    from alignkit.data.rejection import distinct

    ok = [text for text, passed in zip(attempts, verdicts) if passed]
    return len(ok) - len(distinct(ok, near=near))


def _revise(prompts: list[dict[str, Any]], rows: list[dict[str, Any]], checker: Checker, config: Config,
            round_: int, *, seed: int, meta: dict[str, Any]) -> int:
    """One revision round over the prompts still short of ``keep``; returns the completions it sampled."""
    from alignkit.data.rejection import distinct
    from alignkit.generation import SamplingParams

    short = [p for p, row in enumerate(rows) if len(_kept_texts(row)) < config.keep and _failing(row)]
    if not short:
        return 0
    attempts = [_failing(rows[p]) for p in short]
    notes = checker.feedback([prompts[p] for p in short], [a["text"] for a in attempts])
    conversations = [
        _as_conversation(prompts[p]["prompt"]) + [
            {"role": "assistant", "content": attempt["text"]},
            {"role": "user", "content": config.revision_request.format(feedback=f" {note}" if note else "")}]
        for p, attempt, note in zip(short, attempts, notes)]
    params = SamplingParams(n=1, temperature=config.temperature, top_p=config.top_p,
                            max_new_tokens=config.max_completion_length, seed=seed)
    outs = checker.engine.generate([checker.render(c) for c in conversations], params, progress=False)
    revised = [samples[0].text for samples in outs]
    meta["tokens"] += sum(len(samples[0].token_ids) for samples in outs)
    reward, judged = checker.scores([prompts[p] for p in short], revised)
    for p, attempt, text, note, score, prob in zip(short, attempts, revised, notes, reward, judged):
        ok = checker.passed(score, prob)
        new = ok and len(distinct(_kept_texts(rows[p]) + [text], near=config.near_duplicate)) \
            == len(_kept_texts(rows[p])) + 1
        rows[p]["revisions"].append({"round": round_, "revised": attempt["text"], "revised_score": attempt["score"],
                                     "feedback": note, "text": text, "score": score, "judge_p": prob,
                                     "passed": ok, "kept": new})
    return len(short)


def _as_conversation(prompt: Any) -> list[dict[str, str]]:
    from alignkit.data.prompts import as_messages

    return as_messages(prompt)


def _kept_texts(row: dict[str, Any]) -> list[str]:
    return [row["attempts"][i] for i in row["kept"]] + [r["text"] for r in row["revisions"] if r["kept"]]


def _failing(row: dict[str, Any]) -> dict[str, Any] | None:
    """The attempt a revision round starts from: the last failing revision, else the best-scored failing attempt
    (ties: the first); None when every attempt passed."""
    failed = [r for r in row["revisions"] if not r["passed"]]
    if failed:
        return {"text": failed[-1]["text"], "score": failed[-1]["score"]}
    if row["revisions"]:  # the last revision passed (kept or a duplicate): nothing left to fix
        return None
    candidates = [i for i, ok in enumerate(row["passed"]) if not ok]
    if not candidates:
        return None
    rank = row["scores"] if any(s is not None for s in row["scores"]) else row["judge_p"] or row["scores"]
    best = max(candidates, key=lambda i: (-float("inf") if rank[i] is None else rank[i], -i))
    return {"text": row["attempts"][best], "score": row["scores"][best]}


# ------------------------------------------------------------------------------------------------ outputs


def training_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """SFT rows: each prompt's kept attempts, then its kept revisions, in prompt order."""
    out = []
    for row in rows:
        for i in row["kept"]:
            out.append({"prompt": row["prompt"], "completion": row["attempts"][i], "score": row["scores"][i],
                        "source": "sample", "round": 0, "prompt_index": row["index"]})
        for revision in row["revisions"]:
            if revision["kept"]:
                out.append({"prompt": row["prompt"], "completion": revision["text"], "score": revision["score"],
                            "source": "revision", "round": revision["round"], "prompt_index": row["index"]})
    return out


def preference_pairs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``dpo`` pairs: the best kept attempt vs the worst-scored failing attempt of the same prompt, and every
    kept revision vs the attempt it revised. Identical texts are never paired."""
    pairs = []
    for row in rows:
        failing = [i for i, ok in enumerate(row["passed"]) if not ok]
        if row["kept"] and failing:
            rank = [s if s is not None else float("-inf") for s in row["scores"]]
            worst = min(failing, key=lambda i: (rank[i], i))
            best = row["kept"][0]
            if row["attempts"][best] != row["attempts"][worst]:
                pairs.append({"prompt": row["prompt"], "chosen": row["attempts"][best],
                              "rejected": row["attempts"][worst], "chosen_score": row["scores"][best],
                              "rejected_score": row["scores"][worst], "source": "sample",
                              "prompt_index": row["index"]})
        for revision in row["revisions"]:
            if revision["kept"] and revision["text"] != revision["revised"]:
                pairs.append({"prompt": row["prompt"], "chosen": revision["text"], "rejected": revision["revised"],
                              "chosen_score": revision["score"], "rejected_score": revision["revised_score"],
                              "source": "revision", "prompt_index": row["index"]})
    return pairs


def prompt_summary(row: dict[str, Any]) -> dict[str, Any]:
    """One line per prompt: its pass rate over the attempts and how (or whether) it was solved."""
    n, c = len(row["attempts"]), sum(row["passed"])
    fixed = next((r["round"] for r in row["revisions"] if r["passed"]), None)
    return {"prompt_index": row["index"], "prompt": row["prompt"], "attempts": n, "passed": c,
            "pass_rate": c / n if n else 0.0, "kept": len(_kept_texts(row)), "fixed_in_round": fixed,
            "solved": c > 0 or fixed is not None}


def summarize(rows: list[dict[str, Any]], metas: list[dict[str, Any]], config: Config, *, pairs: int) -> dict:
    from alignkit.data.rejection import pass_at_k_curve, powers_of_two

    attempts = sum(len(row["attempts"]) for row in rows)
    passed = sum(sum(row["passed"]) for row in rows)
    revisions = [r for row in rows for r in row["revisions"]]
    seconds = sum(m.get("seconds", 0.0) for m in metas)
    completions = sum(m["completions"] for m in metas)
    summaries = [prompt_summary(row) for row in rows]
    metrics: dict[str, Any] = {
        "prompts": len(rows), "attempts": attempts, "pass_rate": passed / attempts if attempts else 0.0,
        "prompts_with_pass": sum(s["passed"] > 0 for s in summaries),
        "prompts_without_pass": sum(not s["solved"] for s in summaries),
        "kept": sum(s["kept"] for s in summaries),
        "kept_revisions": sum(r["kept"] for r in revisions),
        "duplicates_dropped": sum(row["duplicates_dropped"] for row in rows),
        "revisions": len(revisions), "revisions_fixed": sum(r["passed"] for r in revisions),
        "revision_fix_rate": sum(r["passed"] for r in revisions) / len(revisions) if revisions else None,
        "pairs": pairs, "completions": completions,
        "completions_per_second": completions / seconds if seconds else 0.0,
        "tokens_per_second": sum(m["tokens"] for m in metas) / seconds if seconds else 0.0,
    }
    curve = pass_at_k_curve([(len(row["attempts"]), sum(row["passed"])) for row in rows],
                            powers_of_two(config.num_generations))
    metrics.update({f"pass_at_{k}": value for k, value in curve.items()})
    return metrics
