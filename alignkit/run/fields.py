"""One meaning per field name: the fields several stage kinds share, what each means, and the old names.

``defaults:`` in a recipe copies a field into every stage that has one of that name, so a name must mean the
same thing in every stage that has it. The meanings below are the contract (TRL's names where TRL has the
concept); ``tests/test_fields.py`` checks that every field two stage kinds share is listed here, that no
stage uses an old name, and that ``docs/recipes.md`` shows :func:`markdown_table`.
"""

from __future__ import annotations

import typing
from collections import defaultdict
from typing import Any

from alignkit.core.config import Spec

#: field -> its one meaning, for every field that more than one stage kind has
SHARED_FIELDS: dict[str, str] = {
    "kind": "The stage kind (`alignkit recipes` lists them).",
    "name": "The stage's name: its folder, its `${name.output}` references and its W&B key prefix (default: the kind).",
    "model": "The model the stage starts from or uses: Hub id, local folder, alias or `${stage.model}`.",
    "data": "The stage's input rows; the format depends on the kind (docs/data.md).",
    "environments": "Several tasks in one RL run instead of `data` + `rewards`: each with its own data and rewards, "
                    "mixed by weight (docs/environments.md).",
    "data_format": "How `data` rows are read: `problems` (prompt + gold answer, for verifiers) or `prompts` (prompt "
                   "only, for a reward model or judge).",
    "dtype": "Weights dtype; auto = bfloat16 on CUDA, float32 on CPU.",
    "quantization": "bitsandbytes quantization of the loaded model (QLoRA together with `lora`).",
    "lora": "PEFT LoRA adapter settings; null trains all weights.",
    "attn_implementation": "Attention kernel passed to `from_pretrained` (sdpa, eager, flash_attention_2).",
    "gradient_checkpointing": "Recompute activations in the backward pass to save memory.",
    "seed": "Seed of everything random in the stage (shuffling, sampling, initialisation).",
    "lr": "Peak learning rate of the trained weights.",
    "lr_scheduler": "Learning-rate schedule after warm-up (TRL's `lr_scheduler_type`).",
    "warmup_ratio": "Fraction of the optimizer steps spent warming the learning rate up.",
    "weight_decay": "AdamW weight decay.",
    "epochs": "Passes over the training data (ignored when `max_steps` > 0).",
    "max_steps": "Training steps to take (-1: use `epochs`): optimizer steps; in ppo, rollout-and-update steps.",
    "batch_size": "Training rows per device per micro-step; a row is the stage's unit of training (an example, "
                  "a preference pair, a sampled completion).",
    "grad_accum": "Micro-steps per optimizer step (effective batch = batch_size x grad_accum x processes).",
    "logging_steps": "Optimizer steps between logged training metrics.",
    "save_steps": "Optimizer steps between checkpoints (the unit of resuming).",
    "save_total_limit": "Checkpoints kept on disk.",
    "max_length": "Longest sequence (prompt + completion) in tokens: training stages truncate longer rows, "
                  "sampling stages (grpo, rloo, rntp) refuse data that cannot fit.",
    "max_completion_length": "Most tokens sampled per completion (TRL's name).",
    "num_generations": "Completions sampled per prompt (TRL's group size).",
    "temperature": "Sampling temperature (0 = greedy where the stage allows it).",
    "top_p": "Nucleus sampling mass; 1 = off.",
    "beta": "Weight of the KL term toward the reference (starting) policy (TRL's name).",
    "epsilon": "Clip range of the policy probability ratio (TRL's name).",
    "epsilon_high": "Upper clip range when it differs from `epsilon` (DAPO's clip-higher).",
    "num_iterations": "Policy updates per batch of samples (TRL's mu).",
    "loss_type": "TRL's `loss_type` of the stage's trainer (a DPO loss for dpo; the loss aggregation for grpo/rntp).",
    "scale_rewards": "How group advantages are scaled (TRL's `scale_rewards`).",
    "importance_sampling_level": "Token- or sequence-level importance ratios (TRL's GSPO option).",
    "mask_truncated_completions": "Leave completions cut off by the length budget out of the loss.",
    "rewards": "Reward programs with weights, summed; `model:`/`prm:` name trained scorers.",
    "reward": "One reward program: the answer checker `fn(completions, answer=...)`.",
    "prm": "A process reward model that scores each step.",
    "chat": "Render prompts with the model's chat template.",
    "accuracy_data": "Held-out problems for the greedy exact-match check: before and after training; of each "
                     "ingredient and of the result in merge.",
    "accuracy_max_completion_length": "Most tokens per answer in the accuracy check.",
    "eval_data": "A separate held-out set (instead of splitting `data`).",
    "eval_batch_size": "Sequences per forward when scoring the held-out set.",
    "generation": "The engine that samples the stage's completions (in ppo, grpo, rloo and rntp: the training "
                  "rollouts): `backend` (hf, fast, openai; in grpo/rloo/rntp also trl and vllm) and its options "
                  "(docs/perf.md).",
    "separator": "The string that splits a solution into steps.",
    "shard_size": "Items per shard: the unit of resuming and of work split over processes.",
    "constitution": "A shipped constitution's name or a YAML path.",
    "judge": "The AI judge: which model, where it runs, how it answers (docs/judges.md).",
    "trl": "Extra TRL config arguments passed through as they are (our own fields win).",
}


def stage_fields() -> dict[str, list[str]]:
    """field name -> the stage kinds whose config has it (imports every stage module)."""
    from alignkit.core.stage import STAGES, get_stage

    kinds: dict[str, list[str]] = defaultdict(list)
    for kind in STAGES:
        for name in get_stage(kind).Config.model_fields:
            kinds[name].append(kind)
    return dict(kinds)


def old_names() -> dict[str, list[tuple[str, str]]]:
    """old field name -> [(where, its new name)], from ``RENAMED`` of every stage config and of the blocks
    nested in them (``pairs``, ``judge``...), and of eval suites; ``where`` is e.g. ``dpo.pairs``."""
    from alignkit.core.stage import STAGES, get_stage
    from alignkit.evaluation.suite import Suite

    olds: dict[str, list[tuple[str, str]]] = defaultdict(list)
    seen: set[type] = set()

    def walk(spec: type[Spec], where: str) -> None:
        if spec in seen:  # a block met before (or one that nests itself, like a data mixture)
            return
        seen.add(spec)
        for old, new in spec.RENAMED.items():
            olds[old].append((where, new))
        for name, info in spec.model_fields.items():
            for inner in nested_specs(info.annotation):
                walk(inner, f"{where}.{name}")

    for kind in STAGES:
        walk(get_stage(kind).Config, kind)
    walk(Suite, "eval suite")
    return dict(olds)


def nested_specs(annotation: Any) -> list[type[Spec]]:
    """The config blocks inside a field's type (``X | None``, ``list[X]``, a tagged union...)."""
    args = typing.get_args(annotation)
    if not args:
        return [annotation] if isinstance(annotation, type) and issubclass(annotation, Spec) else []
    return [spec for arg in args for spec in nested_specs(arg)]


def markdown_table() -> str:
    """The shared-field table of docs/recipes.md."""
    from alignkit.core.stage import STAGES

    kinds = stage_fields()
    lines = ["| field | meaning | stages |", "|---|---|---|"]
    for name, meaning in SHARED_FIELDS.items():
        have = kinds.get(name, [])
        missing = [kind for kind in STAGES if kind not in have]
        shown = "all" if not missing else f"all but {', '.join(missing)}" if len(missing) <= 2 else ", ".join(have)
        lines.append(f"| `{name}` | {meaning} | {shown} |")
    renamed = old_names()
    if renamed:
        lines += ["", "| old name (read until alignkit 0.3) | now |", "|---|---|"]
        for old, uses in sorted(renamed.items()):
            lines.append(f"| `{old}` | " + "; ".join(f"`{new}` ({where})" for where, new in uses) + " |")
    return "\n".join(lines)
