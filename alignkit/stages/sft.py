"""Supervised fine-tuning with TRL's ``SFTTrainer``.

Recipe example::

    - kind: sft
      model: smollm2-135m-instruct
      lora: {r: 16, alpha: 32}
      data: {source: arith, params: {n: 400, steps: 2}}
      accuracy_data: {source: arith, seed: 1, params: {n: 64, steps: 2}}   # held out: other seed

What it does, in order: load data (``sft`` format: prompt/completion, or ``messages`` conversations: see
docs/data.md), load the model (quantized if asked)
and tokenizer, measure greedy accuracy on ``accuracy_data`` (if given), train with TRL (LoRA via
``peft_config``; completion-only loss; resumes from the last checkpoint in the stage folder), save the
adapter and a merged model, measure accuracy again. Outputs: ``${<name>.model}`` (merged model folder),
``${<name>.adapter}`` (LoRA adapter, when LoRA is used).

Departures from plain TRL:
1. Prompts are sent as chat conversations (``chat: true``) so training sees exactly the template that
   sampling and evaluation use later; models without a chat template fall back to plain text.
2. ``packing`` defaults to off: TRL's padding-free packing keeps examples apart only with
   flash-attention kernels; with SDPA/eager on CPU packed examples would attend to each other.
3. ``messages`` conversations are tokenized here, with the model's chat template, into ``input_ids`` and an
   ``assistant_masks`` column marking every assistant turn (with its end-of-turn token): TRL's own
   ``assistant_only_loss`` needs ``{% generation %}`` markers, which ChatML/SmolLM2 templates lack.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from alignkit.core.config import DataSpec
from alignkit.core.errors import DataError
from alignkit.stages.common import (
    TrainStageConfig, check_trl_passthrough, fit, measure_accuracy, restore_trainable_dtype,
    save_trained_model, train_metrics, trl_args,
)
from alignkit.core.stage import StageContext, StageResult


class Config(TrainStageConfig):
    kind: str = "sft"
    RENAMED = {"accuracy_max_new_tokens": "accuracy_max_completion_length"}
    data: DataSpec = Field(..., description="Training data, converted to prompt/completion.")
    accuracy_data: DataSpec | None = Field(
        None, description="Held-out problems (prompt + gold answer) for greedy exact-match before/after.")
    accuracy_max_completion_length: int = Field(128, gt=0, description="Generation budget for the accuracy check.")
    chat: bool = Field(True, description="Format examples with the model's chat template.")
    completion_only_loss: bool = Field(True, description="Loss on the completion tokens only.")
    packing: bool = Field(False, description="Pack examples into full sequences (needs flash attention).")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate (2e-4 suits LoRA; use ~1e-5 for full).")


def outputs(run_dir: Path) -> dict[str, str]:
    return {"model": str(run_dir / "model"), "adapter": str(run_dir / "adapter"), "dir": str(run_dir)}


def check(config: Config, base_dir: Path) -> None:
    check_trl_passthrough(config.trl, "trl.SFTConfig")


def run(config: Config, ctx: StageContext) -> StageResult:
    from trl import SFTConfig, SFTTrainer

    from alignkit.data import load_dataset
    from alignkit.modeling.models import load_model, load_tokenizer, lora_config

    rows = load_dataset(config.data, "sft")
    problems = load_dataset(config.accuracy_data, "problems") if config.accuracy_data else None
    tokenizer = load_tokenizer(config.model, padding_side="right")
    if "messages" in rows.column_names:
        train_data = _assistant_masked(rows, tokenizer, chat=config.chat, mask=config.completion_only_loss)
    else:
        train_data = _as_training_rows(rows, chat=config.chat)
    model = load_model(config.model, quantization=config.quantization, dtype=config.dtype,
                       attn_implementation=config.attn_implementation, trainable=True)
    metrics: dict[str, Any] = {"train_examples": len(train_data)}

    if problems is not None:
        metrics["accuracy_before"] = measure_accuracy(model, tokenizer, problems, config, ctx, "before")

    args = trl_args(
        SFTConfig, config, ctx,
        max_length=config.max_length,
        completion_only_loss=config.completion_only_loss,
        packing=config.packing,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_data,
        processing_class=tokenizer,
        peft_config=lora_config(config.lora, "causal-lm") if config.lora else None,
    )
    restore_trainable_dtype(trainer, config)  # QLoRA: keep the adapters in the model's dtype (TRL makes them bf16)
    fitted = fit(trainer, ctx)
    metrics.update(train_metrics(trainer, fitted.result, fitted.seconds))
    artifacts = save_trained_model(trainer, tokenizer, ctx)

    if problems is not None:
        metrics["accuracy_after"] = measure_accuracy(trainer.model, tokenizer, problems, config, ctx, "after")
    ctx.log_metrics(metrics)
    return StageResult(metrics=metrics, artifacts=artifacts)


def _as_training_rows(dataset, *, chat: bool):
    """prompt/completion strings -> TRL conversational rows (or left as text when chat is off).

    A prompt that is already a conversation (HH red-team prompts revised by cai-revise) is kept as it is.
    """
    if not chat:
        return dataset
    return dataset.map(
        lambda row: {
            "prompt": _as_messages(row["prompt"], "user"),
            "completion": _as_messages(row["completion"], "assistant"),
        },
        remove_columns=[c for c in dataset.column_names if c not in ("prompt", "completion")],
    )


def _as_messages(value, role: str) -> list[dict[str, str]]:
    return value if isinstance(value, list) else [{"role": role, "content": value}]


def _assistant_masked(dataset, tokenizer, *, chat: bool, mask: bool):
    """``messages`` conversations -> pre-tokenized rows: ``input_ids`` (the chat template's rendering) and,
    when ``mask``, ``assistant_masks`` (1 on each assistant turn's tokens, end-of-turn included), from which
    TRL builds labels with the loss on assistant turns only (and truncates to ``max_length``)."""
    if not chat or not getattr(tokenizer, "chat_template", None):
        raise DataError("`messages` conversations need the model's chat template (`chat: true` and a tokenizer "
                        "with a chat_template); give prompt/completion rows instead")

    def ids(messages, generation_prompt: bool) -> list[int]:
        if not messages:
            return []
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode(row, index: int):
        messages = row["messages"]
        full = ids(messages, False)
        if not mask:
            return {"input_ids": full}
        assistant = [0] * len(full)
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before, through = ids(messages[:i], True), ids(messages[: i + 1], False)
            if through != full[: len(through)] or before != through[: len(before)]:
                raise DataError(f"row {index}: the model's chat template does not render this conversation's "
                                f"turn {i} as a prefix of the whole, so its assistant tokens cannot be masked; "
                                "give prompt/completion rows instead")
            assistant[len(before): len(through)] = [1] * (len(through) - len(before))
        return {"input_ids": full, "assistant_masks": assistant}

    return dataset.map(encode, with_indices=True, remove_columns=dataset.column_names)
