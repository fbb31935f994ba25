"""AI preference labels by a constitution (RL-CAI, Bai et al. 2022, arXiv:2212.08073, sec. 4; RLAIF, Lee et al.
2023, arXiv:2309.00267): the policy answers each prompt twice, a judge says which answer a principle prefers.

Recipe example::

    - kind: cai-label
      model: ${revise.model}                   # the policy that writes the two responses
      data: {source: hh, path: ../shared/data/hh-rlhf/harmless-base-dev.jsonl.gz}   # prompts (`prompts` format)
      constitution: harmless                   # a shipped name or a YAML path (alignkit.cai.constitution)
      judge: {backend: hf}                     # default: the policy judges itself; or
      # judge: {backend: http, api: systemone, base_url: http://127.0.0.1:8000/v1, model_name: my-judge}
      threshold: 0.55                          # drop pairs the judge is less sure about than this
      generation: {backend: fast, batch_size: 64}

What it does, per shard of ``shard_size`` prompts:

1. Sample: the policy writes two responses per prompt (one ``generate`` call with ``n = 2``, seeded per shard).
2. Judge: a principle is drawn per prompt from the constitution (seeded by the prompt's index, so a rerun
   draws the same one) and the judge (:mod:`alignkit.cai.judges`) answers its comparison question about the two
   responses, in both presentation orders (``swap``), all pairs of the shard in one batch.
3. Keep: ``p_first`` = P(the first response is preferred), ``confidence = max(p, 1 - p)``; the pair is kept
   when ``confidence >= threshold`` (never an exact tie), with the preferred response as ``chosen``.
4. The shard's rows, kept or not (with the reason), go to ``shards/shard-<j>.jsonl`` (temp file, then
   rename): a killed run resumes at the first missing shard and never repeats or loses a prompt.

Under ``accelerate launch`` rank r does shards ``j % world == r``; the main process merges the kept pairs into
``data.jsonl``: ``{prompt, chosen, rejected, confidence, p_first, p_ab, p_ba, principle, index}``, a
``preference`` set the ``reward`` and ``dpo`` stages read as ``data: {source: ${<name>.data}}`` (replies are
assistant messages when the prompt is a conversation, as in HH). Output: ``${<name>.data}``.

Metrics: prompts, ``kept``, drops by reason (``dropped_low_confidence``, ``dropped_identical``,
``dropped_empty``, ``dropped_unreadable``), ``mean_confidence`` (kept pairs), ``position_bias`` (mean
``|p_AB - (1 - p_BA)|`` over judged pairs), ``judge_tokens_per_second`` and ``completions_per_second``.

Departures from the papers:

1. The soft label is kept as ``confidence`` beside a hard (chosen, rejected) pair; ``reward`` and ``dpo`` train
   on the hard pair (Bai et al. train the preference model on the soft targets). Pairs below ``threshold`` are
   dropped rather than down-weighted.
2. Two responses identical in text, or one of them empty, are dropped before judging (a preference between
   them carries no signal, and the ``preference`` format rejects empty replies).
3. One principle per pair, drawn at random; Bai et al. also ensemble several principles' probabilities.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from alignkit.core import shards
from alignkit.core.config import DataSpec, QuantSpec
from alignkit.core.errors import DataError, RecipeError
from alignkit.generation import HFSpec, GenerationSpec
from alignkit.cai.judges import JudgeSpec
from alignkit.core.stage import StageConfig, StageContext, StageResult


class Config(StageConfig):
    kind: str = "cai-label"
    RENAMED = {"max_new_tokens": "max_completion_length"}
    model: str = Field(..., description="Policy that writes the two responses (and judges, by default).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Policy weights dtype.")
    quantization: QuantSpec | None = Field(None, description="bitsandbytes quantization of local models.")
    data: DataSpec = Field(..., description="Prompts (`prompts` format: a string or a conversation each).")
    constitution: str = Field("harmless", description="Shipped constitution name or a YAML path.")
    judge: JudgeSpec = Field(default_factory=JudgeSpec, description="Who judges and how (alignkit.cai.judges).")
    swap: bool = Field(True, description="Judge both presentation orders and average (cancels position bias).")
    threshold: float = Field(0.55, ge=0.5, le=1.0, description="Keep pairs with max(p, 1 - p) at least this.")
    chat: bool = Field(True, description="Render prompts with the policy's chat template.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (> 0: greedy gives two equal replies).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    max_completion_length: int = Field(256, gt=0, description="Token budget of a response.")
    generation: GenerationSpec = Field(
        default_factory=HFSpec, description="Sampling backend and batch size.")
    shard_size: int = Field(16, gt=0, description="Prompts per shard (the unit of resumption).")
    seed: int = Field(0, description="Sampling and principle seed.")


def outputs(run_dir: Path) -> dict[str, str]:
    return {"data": str(run_dir / "data.jsonl"), "shards": str(run_dir / "shards"), "dir": str(run_dir)}


def check(config: Config, base_dir: Path) -> None:
    from alignkit.cai.constitution import load_constitution

    try:
        load_constitution(config.constitution, base_dir=base_dir)
    except RecipeError as err:
        raise RecipeError(err.reason if err.file is None else str(err), field="constitution") from None
    if config.judge.cot:
        lo, hi = config.judge.cot_clamp
        if config.threshold > max(hi, 1 - lo):
            raise RecipeError(f"a CoT judge's probabilities are clamped into {[lo, hi]}, so no pair can reach "
                              f"threshold {config.threshold}; lower it to at most {max(hi, 1 - lo)} or widen "
                              "judge.cot_clamp", field="threshold")


def run(config: Config, ctx: StageContext) -> StageResult:
    from alignkit.cai.constitution import load_constitution
    from alignkit.data import load_dataset

    prompts = [row["prompt"] for row in load_dataset(config.data, "prompts")]
    constitution = load_constitution(config.constitution, base_dir=ctx.recipe_dir)
    shard_dir = ctx.run_dir / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    n_shards = shards.count(len(prompts), config.shard_size)
    todo = shards.pending(shard_dir, len(prompts), config.shard_size, ctx.state.process_index,
                          ctx.state.num_processes)
    if todo:
        policy, judge = build_policy_and_judge(config, ctx)
        _label_shards(todo, prompts, policy, judge, constitution, config, shard_dir, progress=ctx.is_main)
    ctx.wait()
    if not ctx.is_main:
        return StageResult()
    rows, metas = merge_shards(shard_dir, n_shards, len(prompts), config.shard_size, ctx.run_dir / "data.jsonl")
    metrics = summarize(rows, metas)
    print(f"[alignkit] {ctx.name}: kept {metrics['kept']}/{metrics['prompts']} pairs, mean confidence "
          f"{metrics['mean_confidence']:.3f}, position bias {metrics['position_bias']:.3f}, judge "
          f"{metrics['judge_tokens_per_second']:.0f} tokens/s")
    ctx.log_metrics(metrics)
    return StageResult(metrics=metrics, artifacts={"data": str(ctx.run_dir / "data.jsonl")})



# ------------------------------------------------------------------------------------ policy and judge


class Policy:
    """An engine plus how prompts are rendered for its model (``tokenizer`` None: raw prompt + newline)."""

    def __init__(self, engine: Any, tokenizer: Any, chat: bool = True):
        self.engine, self.tokenizer, self.chat = engine, tokenizer, chat

    def render(self, prompt: Any) -> str:
        from alignkit.data.prompts import render_prompt

        return render_prompt(self.tokenizer, prompt, chat=self.chat)


def build_policy_and_judge(config: Config, ctx: Any) -> tuple[Policy, Any]:
    """The sampling policy and the judge; an hf judge without its own model shares the policy's weights."""
    from alignkit.cai.judges import build_judge
    from alignkit.stages.common import sampling_policy

    engine, model, tokenizer = sampling_policy(config.model, config.generation, ctx, quantization=config.quantization,
                                               dtype=config.dtype)
    judge = build_judge(config.judge, default_model=config.model, device=ctx.state.device,
                        loaded=(model, tokenizer) if model is not None else None, quantization=config.quantization)
    return Policy(engine, tokenizer, config.chat), judge


# ------------------------------------------------------------------------------------------------ shards


def _label_shards(todo: list[int], prompts: list[Any], policy: Policy, judge: Any, constitution: Any,
                  config: Config, shard_dir: Path, *, progress: bool) -> None:
    from tqdm.auto import tqdm

    size = config.shard_size
    bar = tqdm(total=sum(len(prompts[j * size:(j + 1) * size]) for j in todo), unit="prompt", desc="cai-label",
               disable=not progress, dynamic_ncols=True)
    kept = done = 0
    for j in todo:
        rows, meta = label_shard(prompts[j * size:(j + 1) * size], j * size, policy, judge, constitution, config,
                                 seed=config.seed * 1_000_003 + j)
        shards.write(shard_dir, j, rows, meta)
        kept, done = kept + sum(r["kept"] for r in rows), done + len(rows)
        bar.update(len(rows))
        bar.set_postfix(kept=f"{kept}/{done}", judge_tok_s=f"{meta['judge_tokens'] / max(meta['judge_s'], 1e-9):.0f}")
    bar.close()


def label_shard(prompts: list[Any], first_index: int, policy: Policy, judge: Any, constitution: Any,
                config: Config, *, seed: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Sample two responses per prompt, judge the usable pairs, keep the confident ones: a row per prompt."""
    from alignkit.generation import SamplingParams
    from alignkit.cai.judges import Comparison, compare, keep

    started = time.perf_counter()
    params = SamplingParams(n=2, temperature=config.temperature, top_p=config.top_p,
                            max_new_tokens=config.max_completion_length, seed=seed)
    outs = policy.engine.generate([policy.render(p) for p in prompts], params, progress=False)
    sampled = time.perf_counter()
    rows = []
    for k, (prompt, samples) in enumerate(zip(prompts, outs, strict=True)):
        index = first_index + k
        principle = constitution.sample(random.Random(config.seed * 1_000_003 + index))
        responses = [c.text.strip() for c in samples]
        dropped = "empty" if not all(responses) else "identical" if responses[0] == responses[1] else None
        rows.append({"index": index, "prompt": prompt, "responses": responses, "principle": principle.name,
                     "question": principle.comparison, "dropped": dropped})
    judged = [r for r in rows if r["dropped"] is None]
    tokens_before = judge.tokens
    verdicts = compare(judge, [Comparison(r["prompt"], r["responses"][0], r["responses"][1], r["question"])
                               for r in judged], swap=config.swap) if judged else []
    for row, verdict in zip(judged, verdicts, strict=True):
        row.update(p_first=verdict.p, p_ab=verdict.p_ab, p_ba=verdict.p_ba, confidence=verdict.confidence)
        if not keep(verdict.p, config.threshold):
            row["dropped"] = "unreadable" if math.isnan(verdict.p) else "low_confidence"
    for row in rows:
        row["kept"] = row["dropped"] is None
        del row["question"]
    meta = {"prompts": len(prompts), "completions": sum(len(s) for s in outs),
            "sample_s": sampled - started, "judge_s": time.perf_counter() - sampled,
            "judge_tokens": judge.tokens - tokens_before}
    return rows, meta



def merge_shards(shard_dir: Path, n_shards: int, n_prompts: int, size: int,
                 out: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every prompt's row in order (checked: each shard holds exactly its prompts), and the shard counts;
    writes the kept pairs to ``out`` in the ``preference`` shape."""
    from alignkit.core.artifacts import write_jsonl_atomic

    rows, metas = [], []
    for j, (shard, meta) in enumerate(shards.read_all(shard_dir, n_shards, "cai-label")):
        expected = list(range(j * size, min((j + 1) * size, n_prompts)))
        if [r["index"] for r in shard] != expected:
            raise RuntimeError(f"{shards.path(shard_dir, j)} holds other prompts than this run's (another "
                               "dataset or shard_size?): delete the shards folder and rerun")
        rows += shard
        metas.append(meta)
    pairs = [preference_row(r) for r in rows if r["kept"]]
    if not pairs:
        raise DataError(f"no pair was kept out of {len(rows)} prompts (drops: "
                        f"{ {k: v for k, v in _drop_counts(rows).items() if v} }); lower `threshold`, raise "
                        "`temperature` if responses are identical, or use a stronger judge")
    write_jsonl_atomic(out, pairs)
    return rows, metas


def preference_row(row: dict[str, Any]) -> dict[str, Any]:
    """A kept shard row as a ``preference`` record (replies as assistant messages for a conversation)."""
    first, second = row["responses"]
    chosen, rejected = (first, second) if row["p_first"] > 0.5 else (second, first)
    if not isinstance(row["prompt"], str):
        chosen, rejected = ([{"role": "assistant", "content": text}] for text in (chosen, rejected))
    return {"prompt": row["prompt"], "chosen": chosen, "rejected": rejected, "confidence": row["confidence"],
            "p_first": row["p_first"], "p_ab": row["p_ab"], "p_ba": row["p_ba"], "principle": row["principle"],
            "index": row["index"]}


# ------------------------------------------------------------------------------------------------ metrics


def _drop_counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    reasons = ("low_confidence", "identical", "empty", "unreadable")
    return {reason: sum(r["dropped"] == reason for r in rows) for reason in reasons}


def summarize(rows: list[dict[str, Any]], metas: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts, confidence, position bias and throughput over all shards."""
    from alignkit.cai.judges import position_bias

    kept = [r for r in rows if r["kept"]]
    judged = [r for r in rows if "p_first" in r and not math.isnan(r["p_first"])]
    swapped = [r for r in judged if r["p_ba"] is not None]
    sample_s, judge_s = sum(m["sample_s"] for m in metas), sum(m["judge_s"] for m in metas)
    metrics: dict[str, Any] = {
        "prompts": len(rows), "judged": len(judged), "kept": len(kept),
        **{f"dropped_{reason}": count for reason, count in _drop_counts(rows).items()},
        "mean_confidence": sum(r["confidence"] for r in kept) / len(kept),
        "mean_confidence_judged": sum(r["confidence"] for r in judged) / len(judged) if judged else math.nan,
        "first_preferred": sum(r["p_first"] > 0.5 for r in kept) / len(kept),
        "position_bias": (sum(position_bias(r["p_ab"], r["p_ba"]) for r in swapped) / len(swapped)
                          if swapped else math.nan),
        "completions_per_second": sum(m["completions"] for m in metas) / sample_s if sample_s else 0.0,
        "judge_tokens_per_second": sum(m["judge_tokens"] for m in metas) / judge_s if judge_s else 0.0,
    }
    return metrics
