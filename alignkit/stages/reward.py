"""Outcome reward model (ORM) training with TRL's ``RewardTrainer``: a Bradley-Terry head on preference pairs.

Recipe example::

    - kind: reward
      name: rm
      model: smollm2-135m-instruct        # a causal LM gets a new scalar `score` head
      lora: {r: 16, alpha: 32}            # the head is trained in full (modules_to_save)
      data: {source: hh, path: /work/shared/data/hh-rlhf/harmless-base-dev.jsonl.gz}
      eval_size: 300                       # held-out pairs for pairwise accuracy before/after
      center_rewards_coefficient: 0.01

The loss is ``-log sigmoid(r(x, y_chosen) - r(x, y_rejected))`` (Bradley-Terry; InstructGPT, Ouyang et al.
2022, eq. 1), plus ``c * mean((r_chosen + r_rejected)^2)`` when ``center_rewards_coefficient`` is set
(Eisenstein et al. 2023, eq. 2), which pins the reward's offset so scores of different runs compare.

What it does, in order: load pairs (``preference`` format: strings, HH conversations, or a jsonl written by an
earlier stage), hold out ``eval_size`` of them (or read ``eval_data``), load the model as a 1-label sequence
classifier, encode pairs with :func:`alignkit.rewards.reward_model.encode_pair`, measure held-out pairwise accuracy,
train (resuming from the last checkpoint in the stage folder), save the adapter and a merged model, measure
again and write the held-out scores to ``eval_scores.jsonl``. Outputs: ``${<name>.model}`` (a merged seq-cls
folder: ``load_model(path, task="seq-cls")``, or ``RewardModelScorer(path)`` as a reward program),
``${<name>.adapter}`` (with LoRA).

Departures from plain TRL:
1. We tokenize (TRL trains on our ``chosen_ids``/``rejected_ids``), so training and every later scoring use
   one encoder; over-long pairs are left-truncated instead of dropped (see :mod:`alignkit.rewards.reward_model`).
2. Accuracy is measured by our own scorer on the held-out split before and after training, not by
   ``trainer.evaluate``: the "before" number (an untrained head, ~0.5) is the baseline the gain is read
   against, and the same code later scores completions for DPO pairs and best-of-N.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import Field

from alignkit.core.config import DataSpec
from alignkit.core.errors import RecipeError
from alignkit.stages.common import (
    TrainStageConfig, check_trl_passthrough, fit, restore_trainable_dtype, save_trained_model,
    train_metrics, trl_args,
)
from alignkit.core.stage import StageContext, StageResult


class Config(TrainStageConfig):
    kind: str = "reward"
    data: DataSpec = Field(..., description="Preference pairs (prompt/chosen/rejected; HH via `source: hh`).")
    eval_size: int | float | None = Field(
        0.1, description="Held-out pairs (count or fraction) for pairwise accuracy; `data.eval_size` wins if set, "
        "null = no held-out check.")
    eval_data: DataSpec | None = Field(
        None, description="A separate held-out preference set (instead of splitting `data`).")
    center_rewards_coefficient: float | None = Field(
        None, ge=0, description="Weight of the mean-zero penalty mean((r_c + r_r)^2); 0.01 is the paper's value.")
    max_length: int = Field(512, gt=0, description="Tokens per (prompt, reply); longer ones lose their start.")
    eval_batch_size: int = Field(32, gt=0, description="Sequences per forward when scoring held-out pairs.")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate (2e-4 suits LoRA; ~1e-5 to 5e-5 for full).")


def outputs(run_dir: Path) -> dict[str, str]:
    return {"model": str(run_dir / "model"), "adapter": str(run_dir / "adapter"), "dir": str(run_dir)}


def check(config: Config, base_dir: Path) -> None:
    check_trl_passthrough(config.trl, "trl.RewardConfig")
    if config.quantization is not None and config.lora is None:
        raise RecipeError("quantized weights cannot be trained in full; add a `lora:` block (QLoRA) or drop "
                          "`quantization`", field="quantization")
    if config.eval_data is not None and config.data.eval_size is not None:
        raise RecipeError("give either `eval_data` or `data.eval_size`, not both", field="eval_data")


def run(config: Config, ctx: StageContext) -> StageResult:
    from trl import RewardConfig, RewardTrainer

    from alignkit.modeling.models import load_model, load_tokenizer, lora_config

    train_pairs, eval_pairs = _load_pairs(config)
    tokenizer = load_tokenizer(config.model, padding_side="right")
    from transformers import set_seed

    set_seed(config.seed)  # the score head is initialised here, before the Trainer seeds anything
    model = load_model(config.model, task="seq-cls", num_labels=1, quantization=config.quantization,
                       dtype=config.dtype, attn_implementation=config.attn_implementation, trainable=True)
    metrics: dict[str, Any] = {"train_pairs": len(train_pairs), "eval_pairs": len(eval_pairs or [])}
    if eval_pairs is not None:
        metrics.update(_held_out(model, tokenizer, eval_pairs, config, ctx, "before"))

    args = trl_args(
        RewardConfig, config, ctx,
        max_length=None,  # already truncated by encode_pair; TRL would drop (not cut) longer pairs
        center_rewards_coefficient=config.center_rewards_coefficient,
        remove_unused_columns=False,
    )
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=_encode(train_pairs, tokenizer, config.max_length),
        processing_class=tokenizer,
        peft_config=lora_config(config.lora, "seq-cls") if config.lora else None,
    )
    restore_trainable_dtype(trainer, config)  # QLoRA on CPU: TRL's bf16 score head would meet float32 inputs
    fitted = fit(trainer, ctx)
    metrics.update(_train_metrics(trainer, fitted.result, fitted.seconds))
    artifacts = save_trained_model(trainer, tokenizer, ctx)

    if eval_pairs is not None:
        metrics.update(_held_out(trainer.model, tokenizer, eval_pairs, config, ctx, "after"))
    ctx.log_metrics(metrics)
    return StageResult(metrics=metrics, artifacts=artifacts)


def _load_pairs(config: Config):
    """(train pairs, held-out pairs or None): ``eval_data``, else a seeded split of ``data``."""
    from alignkit.data import load_dataset, split_eval

    pairs = load_dataset(config.data, "preference")
    if config.eval_data is not None:
        return pairs, load_dataset(config.eval_data, "preference")
    eval_size = config.data.eval_size if config.data.eval_size is not None else config.eval_size
    return split_eval(pairs, eval_size, seed=config.seed)


def _encode(pairs, tokenizer, max_length: int):
    """preference rows -> TRL's pre-tokenized form: ``chosen_ids``, ``rejected_ids`` (lists of ints)."""
    from alignkit.rewards.reward_model import encode_pair

    return pairs.map(
        lambda row: {
            "chosen_ids": encode_pair(tokenizer, row["prompt"], row["chosen"], max_length),
            "rejected_ids": encode_pair(tokenizer, row["prompt"], row["rejected"], max_length),
        },
        remove_columns=pairs.column_names,
    )


def _held_out(model, tokenizer, pairs, config: Config, ctx, when: str) -> dict[str, float]:
    """Pairwise accuracy and mean margin on the held-out pairs; the scores go to a jsonl (main process)."""
    from alignkit.rewards.reward_model import pairwise_accuracy

    report = pairwise_accuracy(model, tokenizer, pairs, max_length=config.max_length,
                               batch_size=config.eval_batch_size)
    if ctx.is_main:
        rows = [{"chosen": c, "rejected": r} for c, r in zip(report["chosen"], report["rejected"])]
        (ctx.run_dir / f"eval_scores_{when}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"[alignkit] {ctx.name}: held-out pairwise accuracy {when} training = {report['accuracy']:.3f} "
              f"(margin {report['margin']:+.3f}) on {report['n']} pairs")
    return {f"accuracy_{when}": report["accuracy"], f"margin_{when}": report["margin"]}


def _train_metrics(trainer, result, seconds: float) -> dict[str, Any]:
    """Loss, steps, throughput and TRL's logged training accuracy/margin, first vs last logged step."""
    metrics = train_metrics(trainer, result, seconds, logged=("loss", "accuracy", "margin"))
    # approximate: counts full batches, and steps done before a resume as if timed in this run
    pairs_seen = trainer.state.global_step * trainer.args.per_device_train_batch_size \
        * trainer.args.gradient_accumulation_steps * trainer.args.world_size
    metrics["pairs_per_second"] = round(pairs_seen / seconds, 2) if seconds > 0 else None
    return metrics
