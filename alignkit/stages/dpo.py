"""Direct Preference Optimization with TRL's ``DPOTrainer``, on a preference set or on pairs made on-policy.

Recipe examples::

    - kind: dpo                       # (a) offline pairs: a dataset, or ${rm_pairs.pairs} of an earlier stage
      model: ${sft.model}
      lora: {r: 16, alpha: 32}
      data: {source: hh, path: harmless-base-dev.jsonl.gz}
      beta: 0.1

    - kind: dpo                       # (b) on-policy pairs: the starting policy samples k answers per prompt
      model: ${sft.model}
      lora: {r: 16, alpha: 32}
      pairs:
        prompts: {source: arith, seed: 2, params: {n: 256, steps: 2}}
        num_generations: 8
        rewards: [{program: reward/math.py:answer_match}]     # or {program: "model:${rm.model}"}
        temperature: 1.0
      accuracy_data: {source: arith, seed: 1, params: {n: 64, steps: 2}}

The loss (``loss_type: sigmoid``) is Rafailov et al. 2023, eq. 7:
``-log sigmoid(beta * [(log pi(y_c|x) - log pi_ref(y_c|x)) - (log pi(y_r|x) - log pi_ref(y_r|x))])``.
The reference ``pi_ref`` is the starting policy: with LoRA, the same weights with the adapter disabled (no
second copy in memory); in full fine-tuning, a frozen copy, or its log-probs computed once up front
(``precompute_ref_log_probs``).

What it does, in order: load the policy and tokenizer, measure greedy accuracy on ``accuracy_data`` (if
given), get pairs (from ``data``, or (b): sample, score, keep best vs worst, in resumable shards under
``<run_dir>/pairs/``, merged into ``pairs.jsonl``; see :mod:`alignkit.data.pairs`), train with TRL (resuming from
the last checkpoint), save the adapter and a merged model, measure accuracy again. Outputs:
``${<name>.model}``, ``${<name>.adapter}`` (LoRA), ``${<name>.pairs}`` (on-policy pairs, a ``preference``
jsonl another stage can train on).

Departures from plain TRL / the papers:
1. On-policy pairs are made once, from the starting policy, before training (one round of iterative DPO;
   Xiong et al. 2024 repeat this round, which here is one more ``dpo`` stage on ``${<name>.model}``).
2. Pairs are sampled and scored by the main process only, the others wait at a barrier; under
   ``accelerate launch`` the pair-making therefore does not scale with processes, the training does.
3. Prompts are sent as chat conversations (``chat: true``) so pairs are sampled and trained with the same
   template; a sample cut at ``max_completion_length`` is kept, and the template closes its turn in training.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from alignkit.core.config import DataSpec, Spec
from alignkit.core.errors import DataError, RecipeError
from alignkit.generation import FastSpec, GenerationSpec
from alignkit.rewards.programs import RewardSpec
from alignkit.stages.common import (
    TrainStageConfig, check_trl_passthrough, fit, measure_accuracy, restore_trainable_dtype,
    save_trained_model, train_metrics, trl_args,
)
from alignkit.core.stage import StageContext, StageResult
from alignkit.data.loading import read_jsonl


class PairsSpec(Spec):
    """How on-policy pairs are made: prompts, samples per prompt, rewards, sampling knobs."""

    RENAMED = {"samples_per_prompt": "num_generations", "max_new_tokens": "max_completion_length"}

    prompts: DataSpec = Field(..., description="Prompts with gold answers (`problems` format) to sample on.")
    num_generations: int = Field(4, ge=2, description="Completions sampled per prompt (k); more k, more pairs.")
    rewards: list[RewardSpec] = Field(
        ..., min_length=1, description="Reward programs summed with their weights; `model:<folder>` is a trained "
        "reward model (e.g. `model:${rm.model}`).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (> 0: greedy samples would all tie).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    max_completion_length: int = Field(256, gt=0, description="Most tokens per sampled completion.")
    min_margin: float = Field(0.0, ge=0, description="Keep a pair only if best - worst score exceeds this.")
    shard_size: int = Field(32, gt=0, description="Prompts per shard (the unit of resumption).")
    generation: GenerationSpec = Field(default_factory=FastSpec, description="Sampling backend.")


class Config(TrainStageConfig):
    kind: str = "dpo"
    RENAMED = {"accuracy_max_new_tokens": "accuracy_max_completion_length"}
    data: DataSpec | None = Field(None, description="Preference pairs (prompt/chosen/rejected); or use `pairs`.")
    pairs: PairsSpec | None = Field(None, description="Make pairs on-policy instead of reading `data`.")
    beta: float = Field(0.1, gt=0, description="KL strength: higher keeps the policy closer to the reference.")
    loss_type: str | list[str] = Field(
        "sigmoid", description="TRL loss(es): sigmoid (DPO), ipo, hinge, robust, apo_zero, sft, ...")
    precompute_ref_log_probs: bool = Field(
        False, description="Compute reference log-probs once before training (saves the reference's memory).")
    accuracy_data: DataSpec | None = Field(
        None, description="Held-out problems (prompt + gold answer) for greedy exact-match before/after.")
    accuracy_max_completion_length: int = Field(128, gt=0, description="Generation budget for the accuracy check.")
    chat: bool = Field(True, description="Format prompts with the model's chat template.")
    lr: float = Field(5e-5, gt=0, description="Peak learning rate (5e-5 suits LoRA; ~5e-7 for full).")

    @model_validator(mode="after")
    def _one_source(self) -> Config:
        if (self.data is None) == (self.pairs is None):
            raise ValueError("give exactly one of `data` (a preference set) or `pairs` (make pairs on-policy)")
        return self


def outputs(run_dir: Path) -> dict[str, str]:
    return {"model": str(run_dir / "model"), "adapter": str(run_dir / "adapter"),
            "pairs": str(run_dir / "pairs.jsonl"), "dir": str(run_dir)}


def check(config: Config, base_dir: Path) -> None:
    from alignkit.rewards.programs import check_rewards

    check_trl_passthrough(config.trl, "trl.DPOConfig")
    if config.quantization is not None and config.lora is None:
        raise RecipeError("quantized weights cannot be trained in full; add a `lora:` block (QLoRA) or drop "
                          "`quantization`", field="quantization")
    if config.pairs:
        check_rewards([(f"pairs.rewards.{i}", spec) for i, spec in enumerate(config.pairs.rewards)], base_dir)


def run(config: Config, ctx: StageContext) -> StageResult:
    from alignkit.data import load_dataset
    from alignkit.modeling.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(config.model)
    model = load_model(config.model, quantization=config.quantization, dtype=config.dtype,
                       attn_implementation=config.attn_implementation, trainable=True)
    problems = load_dataset(config.accuracy_data, "problems") if config.accuracy_data else None
    metrics: dict[str, Any] = {}
    if problems is not None:
        metrics["accuracy_before"] = measure_accuracy(model, tokenizer, problems, config, ctx, "before")

    if config.pairs is not None:
        pairs, pair_metrics = _on_policy_pairs(model, tokenizer, config, ctx)
        metrics.update(pair_metrics)
    else:
        pairs = [dict(row) for row in load_dataset(config.data, "preference")]
    trainer, trained = _train(model, tokenizer, pairs, config, ctx)
    metrics.update(trained)
    artifacts = save_trained_model(trainer, tokenizer, ctx)
    if config.pairs is not None and ctx.is_main:
        artifacts["pairs"] = str(ctx.run_dir / "pairs.jsonl")

    if problems is not None:
        metrics["accuracy_after"] = measure_accuracy(trainer.model, tokenizer, problems, config, ctx, "after")
    ctx.log_metrics(metrics)
    return StageResult(metrics=metrics, artifacts=artifacts)


def _train(model, tokenizer, pairs: list[dict[str, Any]], config: Config, ctx) -> tuple[Any, dict[str, Any]]:
    """TRL's DPOTrainer on ``pairs`` (LoRA via peft_config: the reference is the adapter-disabled model),
    resuming from the last checkpoint; returns the trainer and its metrics."""
    from trl import DPOConfig, DPOTrainer

    from alignkit.modeling.models import lora_config

    train_data = _training_rows(pairs, tokenizer, chat=config.chat)
    args = trl_args(
        DPOConfig, config, ctx,
        beta=config.beta,
        loss_type=[config.loss_type] if isinstance(config.loss_type, str) else list(config.loss_type),
        precompute_ref_log_probs=config.precompute_ref_log_probs,
        max_length=config.max_length,
    )
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=train_data,
        processing_class=tokenizer,
        peft_config=lora_config(config.lora, "causal-lm") if config.lora else None,
    )
    restore_trainable_dtype(trainer, config)  # QLoRA: keep the adapters in the model's dtype (TRL makes them bf16)
    fitted = fit(trainer, ctx)
    metrics = {"train_pairs": len(train_data), **_train_metrics(trainer, fitted.result, fitted.seconds)}
    return trainer, metrics


def _on_policy_pairs(model, tokenizer, config: Config, ctx) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Make (or finish making) the pair shards on the main process, then read ``pairs.jsonl`` everywhere."""
    from alignkit.data import load_dataset
    from alignkit.core.artifacts import write_jsonl_atomic
    from alignkit.data.pairs import make_pairs

    spec = config.pairs
    merged = ctx.run_dir / "pairs.jsonl"
    metrics: dict[str, Any] = {}
    if ctx.is_main:
        prompts = [dict(row) for row in load_dataset(spec.prompts, "problems")]
        bar = _pairs_bar(len(prompts), ctx.run_dir / "pairs", spec.shard_size, ctx.name)
        sample = _sampler(model, tokenizer, config, progress=_PromptProgress(bar, spec.num_generations))
        score = _scorer(config, ctx)
        started = time.perf_counter()
        with bar:
            rows, stats = make_pairs(prompts, ctx.run_dir / "pairs", shard_size=spec.shard_size, sample=sample,
                                     score=score, min_margin=spec.min_margin,
                                     on_shard=lambda done, total: bar.set_postfix_str(f"shard {done}/{total}"))
        seconds = time.perf_counter() - started
        usable = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"],
                   "chosen_score": r["chosen_score"], "rejected_score": r["rejected_score"]}
                  for r in rows if r["chosen"] is not None]
        write_jsonl_atomic(merged, usable)
        completions = stats.sampled_now * spec.num_generations
        metrics = {
            "pair_prompts": stats.prompts,
            "pairs_made": stats.pairs,
            "pair_usable_fraction": round(stats.usable_fraction, 4),
            "pair_mean_score_margin": stats.mean_margin,
            "pair_mean_score": _mean_score(rows),
            "pair_seconds": round(seconds, 2),
            "completions_per_second": round(completions / seconds, 2) if completions and seconds > 0 else None,
        }
        print(f"[alignkit] {ctx.name}: {stats.pairs}/{stats.prompts} prompts gave a pair "
              f"(mean score margin {stats.mean_margin:.3f})")
    ctx.wait()
    pairs = read_jsonl(merged)
    if not pairs:
        raise DataError(f"{ctx.name}: no prompt gave a usable pair (every prompt's {spec.num_generations} samples "
                        "scored the same); raise pairs.temperature or pairs.num_generations, or use a reward "
                        "that separates samples (e.g. an ORM: `model:${rm.model}`)")
    return pairs, metrics


def _pairs_bar(n_prompts: int, shard_dir: Path, shard_size: int, name: str):
    """A bar over the prompts of on-policy pair-making; the prompts of shards an earlier run finished count as
    done from the start (the shards :func:`alignkit.data.pairs.make_pairs` will skip)."""
    from tqdm.auto import tqdm

    from alignkit.core import shards

    todo = shards.pending(shard_dir, n_prompts, shard_size, rank=0, world=1)
    left = sum(len(shards.items(j, n_prompts, shard_size)) for j in todo)
    return tqdm(total=n_prompts, initial=n_prompts - left, unit="prompt", desc=f"{name}: pairs", dynamic_ncols=True,
                smoothing=0)


class _PromptProgress:
    """Hands the generation engine a bar it advances per finished completion, and moves the prompt bar by one
    per ``k`` of them (a prompt's worth of samples), so the bar moves within a shard and its rate and ETA
    are in prompts. Every shard generates exactly ``k`` completions per prompt, so shards end on whole prompts."""

    def __init__(self, bar: Any, k: int):
        self.bar, self.k, self.completions = bar, k, 0
        self.disable = getattr(bar, "disable", False)

    def update(self, n: int = 1) -> None:
        before = self.completions // self.k
        self.completions += n
        if self.completions // self.k > before:
            self.bar.update(self.completions // self.k - before)


def _sampler(model, tokenizer, config: Config, *, progress: Any = False):
    """Shard sampler: k completions per prompt from the current policy, seeded by shard (reproducible);
    ``progress`` is passed to the engine (a bar it advances per finished completion, or a bool)."""
    from alignkit.generation import SamplingParams
    from alignkit.data.prompts import render_prompt

    spec = config.pairs
    engine = spec.generation.build(model=model, tokenizer=tokenizer)

    def sample(shard: int, rows: list[dict[str, Any]]) -> list[list[str]]:
        params = SamplingParams(max_new_tokens=spec.max_completion_length, temperature=spec.temperature, top_p=spec.top_p,
                                n=spec.num_generations, seed=config.seed * 100_003 + shard)
        prompts = [render_prompt(tokenizer, row["prompt"], chat=config.chat) for row in rows]
        return [[c.text for c in samples] for samples in engine.generate(prompts, params, progress=progress)]

    return sample


def _scorer(config: Config, ctx):
    from alignkit.data.pairs import score_samples
    from alignkit.rewards.programs import combine_rewards

    base_dir = ctx.recipe_dir
    reward = combine_rewards(list(config.pairs.rewards), base_dir)
    return lambda rows, samples: score_samples(reward, rows, samples)


def _mean_score(rows: list[dict[str, Any]]) -> float | None:
    scores = [s for row in rows for s in row["scores"] if s is not None]
    return sum(scores) / len(scores) if scores else None


def _training_rows(pairs: list[dict[str, Any]], tokenizer, *, chat: bool):
    """Pairs -> TRL rows: conversational (prompt messages, assistant replies) when chatting, else text with
    the prompt rendered exactly as the sampler saw it."""
    from datasets import Dataset

    from alignkit.data.prompts import as_messages, render_prompt
    from alignkit.rewards.values import completion_text

    use_chat = chat and bool(getattr(tokenizer, "chat_template", None))

    def reply(value: Any) -> list[dict[str, Any]]:
        if isinstance(value, list) and len(value) > 1:  # several turns left after an implicit prompt: kept whole
            return value
        return [{"role": "assistant", "content": completion_text(value)}]

    def convert(row: dict[str, Any]) -> dict[str, Any]:
        chosen, rejected = completion_text(row["chosen"]), completion_text(row["rejected"])
        if use_chat:
            return {"prompt": as_messages(row["prompt"]), "chosen": reply(row["chosen"]),
                    "rejected": reply(row["rejected"])}
        return {"prompt": render_prompt(tokenizer, row["prompt"], chat=False), "chosen": chosen, "rejected": rejected}

    return Dataset.from_list([convert(row) for row in pairs])


def _train_metrics(trainer, result, seconds: float) -> dict[str, Any]:
    """Loss, steps, throughput, and TRL's implicit-reward margin/accuracy at the first vs last logged step."""
    return train_metrics(trainer, result, seconds, logged=("loss", "rewards/margins", "rewards/accuracies"))
