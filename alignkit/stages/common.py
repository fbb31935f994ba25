"""What training stages share: the common config fields, TRL argument mapping, resume and saving."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
import importlib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from alignkit.core.config import LoraSpec, QuantSpec
from alignkit.core.errors import RecipeError
from alignkit.core.stage import StageConfig
from alignkit.core.secrets import redact


class TrainStageConfig(StageConfig):
    """Fields of every stage that trains a model with a TRL trainer (or our own loop)."""

    model: str = Field(..., description="Hub id, local folder, `smollm2-135m-instruct`, or ${stage.model}.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype; auto = bfloat16 on CUDA, float32 on CPU.")
    quantization: QuantSpec | None = Field(None, description="bitsandbytes quantization (QLoRA with lora).")
    attn_implementation: str | None = Field(
        None, description="Attention kernel passed to transformers (sdpa, eager, flash_attention_2, or a "
        "kernels-community/... hub kernel); default: transformers' choice. Padding-free packing needs flash.")
    lora: LoraSpec | None = Field(None, description="Train a LoRA adapter instead of all weights.")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training data (ignored if max_steps > 0).")
    max_steps: int = Field(-1, description="Stop after this many optimizer steps (-1: use epochs).")

    @field_validator("max_steps")
    @classmethod
    def _steps_or_epochs(cls, value: int) -> int:
        if value == 0 or value < -1:  # TRL reads any value <= 0 as "use epochs": -5 would silently run them
            raise ValueError("must be a positive number of steps, or -1 to train for `epochs`")
        return value
    batch_size: int = Field(8, gt=0, description="Per-device batch size.")
    grad_accum: int = Field(1, gt=0, description="Gradient accumulation steps.")
    max_length: int = Field(512, gt=0, description="Truncate sequences to this many tokens.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Fraction of steps for linear warm-up.")
    lr_scheduler: str = Field("linear", description="transformers scheduler name (linear, cosine, constant).")
    weight_decay: float = Field(0.0, ge=0)
    gradient_checkpointing: bool = Field(False, description="Trade compute for activation memory.")
    seed: int = Field(0, description="Seed for data order, init and sampling.")
    logging_steps: int = Field(5, gt=0)
    save_steps: int = Field(50, gt=0, description="Checkpoint every N steps (resume point after a crash).")
    save_total_limit: int = Field(2, gt=0, description="Keep at most this many checkpoints.")
    trl: dict[str, Any] = Field(
        default_factory=dict, description="Extra arguments passed as they are to the TRL config class.")


# TRL arguments that trl_args() sets from our own fields or the run layout: a ``trl:`` value for one of them
# would silently beat the stage's field (``trl: {learning_rate: 0.5}`` over ``lr: 1e-4``), so it is refused
OWNED_TRL_ARGS = {
    "learning_rate": "lr", "num_train_epochs": "epochs", "max_steps": "max_steps",
    "per_device_train_batch_size": "batch_size", "gradient_accumulation_steps": "grad_accum",
    "warmup_steps": "warmup_ratio", "warmup_ratio": "warmup_ratio", "lr_scheduler_type": "lr_scheduler",
    "weight_decay": "weight_decay", "gradient_checkpointing": "gradient_checkpointing",
    "activation_checkpointing": "gradient_checkpointing", "seed": "seed",
    "logging_steps": "logging_steps", "save_steps": "save_steps", "save_total_limit": "save_total_limit",
    "bf16": "dtype", "fp16": "dtype", "output_dir": "--output-dir (the run folder)",
    "run_name": "the stage's name", "report_to": "tracking.report_to",
}


def check_trl_passthrough(trl: dict[str, Any], config_class: str) -> None:
    """Unknown keys in ``trl:`` are recipe errors (raised at load, naming the key), not TRL crashes later;
    so are keys our own fields set (:data:`OWNED_TRL_ARGS`) and credentials.

    ``config_class`` names the config dataclass (``"trl.SFTConfig"``), imported only when ``trl:`` has keys:
    importing TRL (and torch) takes seconds, which ``--dry-run`` and validation must not spend.
    """
    if not trl:
        return
    module, _, class_name = config_class.rpartition(".")
    known = {f.name for f in dataclasses.fields(getattr(importlib.import_module(module), class_name))}
    for key, value in trl.items():
        if key in OWNED_TRL_ARGS:
            raise RecipeError(f"set by alignkit from the stage's own field: use `{OWNED_TRL_ARGS[key]}` instead",
                              field=f"trl.{key}")
        if redact({key: value}) != {key: value}:  # e.g. hub_token: it would be pickled into every checkpoint
            raise RecipeError("secrets are not accepted in a recipe (TRL pickles its arguments into every "
                              "checkpoint's training_args.bin); set HF_TOKEN / WANDB_API_KEY in the environment",
                              field=f"trl.{key}")
        if key not in known:
            close = sorted(k for k in known if key.split("_")[0] in k)[:5]
            hint = f"; similar: {close}" if close else ""
            raise RecipeError(f"{class_name} has no argument {key!r}{hint}", field=f"trl.{key}")


def trl_args(config_class: type, config: TrainStageConfig, ctx, **stage_args: Any):
    """Map our stage config (plus stage-specific arguments) onto a TRL config dataclass."""
    import torch

    from alignkit.core.config import torch_dtype

    on_cuda = torch.cuda.is_available()
    dtype = torch_dtype(config.dtype)
    args: dict[str, Any] = dict(
        output_dir=str(ctx.run_dir / "checkpoints"),
        run_name=f"{ctx.recipe.name}/{ctx.name}",
        report_to=[] if ctx.tracker.report_to == "none" else [ctx.tracker.report_to],
        learning_rate=config.lr,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        warmup_steps=config.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of total steps
        lr_scheduler_type=config.lr_scheduler,
        weight_decay=config.weight_decay,
        # transformers >= 5.23 renamed it activation_checkpointing (the old name warns, and TRL's configs
        # default it to True: the new name must be set to keep it quiet)
        **{_checkpointing_arg(config_class): config.gradient_checkpointing},
        seed=config.seed,
        logging_steps=config.logging_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        bf16=on_cuda and dtype == torch.bfloat16,
        fp16=on_cuda and dtype == torch.float16,
        use_cpu=not on_cuda,
        disable_tqdm=not ctx.is_main,
        dataloader_num_workers=0,
        logging_nan_inf_filter=False,  # a nan loss must reach stop_on_nonfinite, not be logged as the mean so far
    )
    args.update(stage_args)
    clash = sorted(set(config.trl) & set(stage_args))
    if clash:  # a stage-specific argument (e.g. DPO's beta) that the stage sets from its own field
        raise RecipeError("set by the stage from its own fields; remove it from trl:", field=f"trl.{clash[0]}")
    args.update(config.trl)
    return config_class(**args)


def _checkpointing_arg(config_class: type) -> str:
    """The TRL config's name for activation checkpointing: ``activation_checkpointing`` where transformers has
    it (``gradient_checkpointing`` is then a deprecated alias), else ``gradient_checkpointing``."""
    names = {f.name for f in dataclasses.fields(config_class)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


class _PastTheEnd(Exception):
    """Raised by :class:`_NoStepPastTheEnd` to leave ``Trainer.train`` before a step beyond ``max_steps``."""


def _no_step_past_the_end():
    from transformers import TrainerCallback

    class NoStepPastTheEnd(TrainerCallback):
        """transformers 5.24, resumed from the final checkpoint of a run that ends mid-epoch, checks the step
        budget only after a step and so takes one more: stop before that step starts (no forward has run)."""

        def on_step_begin(self, args, state, control, **kwargs):
            if 0 < state.max_steps <= state.global_step:
                raise _PastTheEnd

    return NoStepPastTheEnd()


@dataclass(frozen=True)
class Fitted:
    """What :func:`fit` hands back: TRL's ``TrainOutput``, the wall time of this process's training, and the
    checkpoint it resumed from (None for a fresh start)."""

    result: Any
    seconds: float
    resumed_from: str | None


def fit(trainer, ctx) -> Fitted:
    """Train a stage's TRL/transformers trainer to the end, the one way every training stage does it:

    - resumed from the newest checkpoint in the stage folder (resumed at the final one it trains no further,
      so a kill between the last checkpoint and the model save costs nothing and changes nothing);
    - stopped at the first nan/inf loss or gradient norm (:func:`stop_on_nonfinite`);
    - with W&B's config split into ours (``alignkit``) and TRL's arguments (``trl``).
    """
    from transformers.trainer_utils import TrainOutput

    from alignkit.core.tracking import use_nested_wandb_callback

    checkpoint = last_checkpoint(ctx.run_dir)
    stop_on_nonfinite(trainer, ctx)
    trainer.add_callback(_no_step_past_the_end())
    use_nested_wandb_callback(trainer)
    started = time.perf_counter()
    try:
        result = trainer.train(resume_from_checkpoint=checkpoint)
    except _PastTheEnd:  # the weights and optimizer are the checkpoint's; the loss record is in the state
        result = TrainOutput(trainer.state.global_step, 0.0, {})
    return Fitted(result, time.perf_counter() - started, checkpoint)


def train_metrics(trainer, result, seconds: float, *, logged: tuple[str, ...] = ("loss",)) -> dict[str, Any]:
    """What every TRL-trained stage reports: loss over the whole run (the same after a resume as without one),
    steps, time, tokens/s, and the first and last logged value of each ``logged`` key (``rewards/margins``
    is reported as ``first_logged_reward_margins``)."""
    state = trainer.state
    history = [entry for entry in state.log_history if "loss" in entry]
    tokens = max((entry.get("num_tokens", 0) for entry in state.log_history), default=0)
    first_step = getattr(trainer, "_initial_global_step", 0)  # > 0 when resumed from a checkpoint
    metrics: dict[str, Any] = {
        "train_loss": whole_run_loss(history, result.training_loss, state.global_step, first_step),
        "train_steps": state.global_step,
        "train_seconds": round(seconds, 2),
        "tokens_per_second": round(tokens / seconds, 1) if seconds > 0 and tokens else None,
    }
    for key in logged:
        if history and key in history[0]:
            name = key.replace("rewards/", "reward_")
            metrics[f"first_logged_{name}"] = history[0][key]
            metrics[f"last_logged_{name}"] = history[-1][key]
    return metrics


def whole_run_loss(history: list[dict[str, Any]], run_loss: float, steps: int, first_step: int) -> float:
    """Mean loss per step over a whole run that this process resumed at ``first_step``.

    The Trainer's ``training_loss`` averages only the steps this process ran; the steps before the resume
    are in the restored log (each entry the mean over its window of steps). Exact when checkpoints fall on
    logging steps; otherwise the unlogged steps before the resume are left out of the mean.

    >>> log = [{"step": 4, "loss": 2.0}, {"step": 8, "loss": 1.0}, {"step": 12, "loss": 0.5}]
    >>> round(whole_run_loss(log, 0.5, 12, 8), 4), whole_run_loss(log, 0.75, 12, 0)   # (8 + 4 + 2) / 12
    (1.1667, 0.75)
    >>> round(whole_run_loss(log, 0.0, 12, 12), 4)   # killed after the last checkpoint: nothing left to run
    1.1667
    """
    if first_step <= 0:
        return run_loss
    before, last = 0.0, 0
    for entry in history:
        if entry["step"] > first_step:
            break
        before += entry["loss"] * (entry["step"] - last)
        last = entry["step"]
    counted = last + max(steps - first_step, 0)  # resumed at the very end: only the logged steps count
    return (before + run_loss * max(steps - first_step, 0)) / counted if counted else run_loss


def restore_trainable_dtype(trainer, config: TrainStageConfig) -> None:
    """Undo TRL's bf16 cast of the trainable parameters of a quantized model when the model computes in another dtype.

    TRL 1.16's trainers (reward, dpo, grpo, rloo, sft) cast every trainable parameter of a bitsandbytes model to
    bfloat16 after wrapping it in LoRA (the QLoRA paper's recommendation for CUDA bf16 runs), whatever the
    model's dtype. On CPU (float32; also ``dtype: float32`` on CUDA) that (1) crashes the reward model: its new
    ``score`` head is trained in full (``modules_to_save``), now bf16, and gets float32 hidden states ("expected m1
    and m2 to have the same dtype"); and (2) rounds LoRA updates to bf16 (PEFT casts the adapters' input, so they
    run, but a float32-sized lr * update below bf16's spacing of a lora_A entry is lost). So: cast them back to the
    dtype the stage loaded the model in. A no-op for bf16 runs (the CUDA default) and for unquantized models.
    Call after the trainer is built and before ``train()`` (the optimizer is created in ``train()``).
    """
    from alignkit.core.config import torch_dtype
    from alignkit.modeling.models import is_quantized

    model = trainer.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not is_quantized(base):
        return
    dtype = torch_dtype(config.dtype)
    for param in model.parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)


def stop_on_nonfinite(trainer, ctx) -> None:
    """Stop ``trainer`` at the first nan/inf loss or gradient norm: :class:`~alignkit.core.errors.TrainingDiverged`
    names the stage and the step, the manifest says ``failed``, and no model or checkpoint of that step is saved.

    Without it a diverged run trains on to the end and is saved as ``done`` (the Trainer logs a nan loss as the
    mean so far, 0.0 at the start). The loss is checked after every optimizer step: the Trainer's running loss
    since the last log (non-finite once any step's was; gathered over processes so that every rank stops at the
    same step); the gradient norm, which the Trainer keeps to itself, when it is logged. :func:`fit` adds it.
    """
    import math

    import torch
    from transformers import TrainerCallback

    from alignkit.core.errors import TrainingDiverged

    class StopOnNonFinite(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            running = getattr(trainer, "_tr_loss", None)  # private in transformers 5; the log check covers its loss
            if isinstance(running, torch.Tensor):
                values = trainer.accelerator.gather(running.detach().float().reshape(1)).tolist()
                bad = [v for v in values if not math.isfinite(v)]
                if bad:
                    raise TrainingDiverged(ctx.name, state.global_step, "the loss", bad[0])

        def on_log(self, args, state, control, logs=None, **kwargs):
            for key in ("loss", "grad_norm"):
                value = (logs or {}).get(key)
                # fp16 loss scaling skips steps whose gradients overflowed, by design: not a divergence
                skipped = key == "grad_norm" and trainer.accelerator.optimizer_step_was_skipped
                if isinstance(value, (int, float)) and not math.isfinite(value) and not skipped:
                    raise TrainingDiverged(ctx.name, state.global_step, f"the {key.replace('_', ' ')}", value)

    trainer.add_callback(StopOnNonFinite())


def last_checkpoint(run_dir: Path) -> str | None:
    """The newest complete Trainer checkpoint under ``run_dir/checkpoints`` (None to start fresh)."""
    from transformers.trainer_utils import get_last_checkpoint

    folder = Path(run_dir) / "checkpoints"
    return get_last_checkpoint(str(folder)) if folder.is_dir() else None


def save_trained_model(trainer, tokenizer, ctx, *, merged_dtype: str = "auto") -> dict[str, str]:
    """Save the result: the adapter (if LoRA) and a merged full model that later stages can load.

    Merging into a full-precision copy of the base (not into 4-bit weights) keeps the merged model exact;
    chaining stages then only ever load plain model folders.
    """
    from alignkit.modeling.models import check_finite_weights, merge_adapter

    artifacts: dict[str, str] = {}
    model_dir, adapter_dir = ctx.run_dir / "model", ctx.run_dir / "adapter"
    is_peft = hasattr(trainer.model, "peft_config")
    target = adapter_dir if is_peft else model_dir
    check_finite_weights(trainer.model.state_dict().items(), f"{ctx.name}: trained model")  # on every rank
    trainer.save_model(str(target))  # main process only; handles FSDP/DeepSpeed gathering
    if ctx.is_main:
        # the pickled TrainingArguments: config in a form redact() never sees, and nothing a loader needs
        (target / "training_args.bin").unlink(missing_ok=True)
        tokenizer.save_pretrained(str(target))
        if is_peft:
            merge_adapter(str(adapter_dir), str(model_dir), dtype=merged_dtype)
            artifacts["adapter"] = str(adapter_dir)
        artifacts["model"] = str(model_dir)
    ctx.wait()
    return artifacts


def sampling_policy(name: str, generation: Any, ctx, *, quantization: QuantSpec | None = None,
                    dtype: str = "auto") -> tuple[Any, Any, Any]:
    """``(engine, model, tokenizer)`` for a stage that samples from ``name`` (the ``generation`` block builds the
    engine): the weights loaded, on this process's device unless quantized, in eval mode. A served policy
    (``backend: openai``) loads no weights (``model`` None): ``name`` then gives only the chat template."""
    from alignkit.modeling.models import is_quantized, load_model, load_tokenizer

    tokenizer = load_tokenizer(name)
    if generation.backend == "openai":
        return generation.build(tokenizer=tokenizer), None, tokenizer
    model = load_model(name, quantization=quantization, dtype=dtype)
    if not is_quantized(model):
        model.to(ctx.state.device)
    model.eval()
    return generation.build(model=model, tokenizer=tokenizer), model, tokenizer


def measure_accuracy(model, tokenizer, problems, config, ctx, when: str, *, generation: Any = None,
                     reuse: bool = False, label: str | None = None) -> float:
    """Greedy exact match on held-out problems (``config.accuracy_max_completion_length``, ``config.chat``): the one
    accuracy check of every training stage. ``generation`` is a local engine spec (default: ``hf``).

    Writes ``accuracy_<when>.jsonl`` (one row per problem) in the stage folder and prints the figure (``label``
    names what was measured in that line; default ``<when> training``); ``reuse`` reads that file back instead
    when it exists (a resumed stage measured it before the crash).
    """
    from alignkit.core.artifacts import write_jsonl_atomic
    from alignkit.data.loading import read_jsonl
    from alignkit.evaluation.accuracy import greedy_accuracy

    path = ctx.run_dir / f"accuracy_{when}.jsonl"
    if reuse and path.is_file():
        rows = read_jsonl(path)
        return sum(bool(row["correct"]) for row in rows) / max(len(rows), 1)
    report = greedy_accuracy(model, tokenizer, problems, max_new_tokens=config.accuracy_max_completion_length,
                             chat=config.chat, progress=ctx.is_main, generation=generation)
    if ctx.is_main:
        write_jsonl_atomic(ctx.run_dir / f"accuracy_{when}.jsonl", report["samples"])
        print(f"[alignkit] {ctx.name}: greedy accuracy {label or f'{when} training'} = {report['accuracy']:.3f} "
              f"on {report['n']} held-out problems")
    return report["accuracy"]
