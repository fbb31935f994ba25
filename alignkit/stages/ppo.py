"""Actor-critic PPO with a value model, on LoRA adapters (Schulman et al. 2017, arXiv:1707.06347; the RLHF
form of Ziegler et al. 2019, arXiv:1909.08593; step rewards from a PRM as in Math-Shepherd, arXiv:2312.08935).

TRL 1.16 has no PPO trainer (1.12's ``trl.experimental.ppo.PPOTrainer`` was the last), so this stage owns a
short loop built from :mod:`alignkit.ppo` and :mod:`alignkit.maths`. Recipe example::

    - kind: ppo
      model: ${sft.model}
      lora: {r: 16, alpha: 32}
      data: {source: arith, seed: 5, params: {n: 256, steps: 2}}
      accuracy_data: {source: arith, seed: 9001, params: {n: 48, steps: 2}}
      rewards: [{program: reward/math.py:answer_match}]   # or model:<reward model folder> (an ORM)
      prm: {model: ${prm.model}, weight: 1.0}             # optional: step scores on step ends
      beta: 0.05                                           # Math-Shepherd's step-by-step PPO used 0.04
      batch_size: 8          # samples per forward/backward; rollout = batch_size * grad_accum * num_mini_batches

Each step (:func:`alignkit.ppo.ppo_step`): sample ``batch_size * grad_accum * num_mini_batches`` responses
per process; score them; compute the policy's, the reference's (adapters disabled) and the value model's
per-token outputs; rewards = ``-beta * KL`` per token + step scores on step ends + the sequence score on the
last token; GAE; ``ppo_epochs`` passes of clipped policy and value losses over mini-batches. Checkpoints every
``save_steps`` (adapters, optimizer, KL coefficient, random states) and resumes from the last one. Outputs:
``${<name>.model}`` (merged policy), ``${<name>.adapter}``, ``${<name>.value_model}`` (a one-label sequence
classifier folder: reusable as ``value_model:`` of a later PPO stage), ``${<name>.value_adapter}``.

Each step also records the reward-hacking signals ``hack/*`` (:mod:`alignkit.rewards.hacking`, scored on the sequence
rewards as paid; how to read them: ``docs/grpo.md``) in ``history.jsonl`` and the tracker, and the manifest
keeps their first- and last-quarter means as ``hack_<signal>_first/_last``.

Departures from the papers and from TRL 1.12's PPOTrainer:

1. LoRA only (``lora`` is required): the frozen reference is the policy with its adapters disabled, so the
   weights exist once. TRL 1.12 also allowed full fine-tuning with a separate reference copy.
2. Log-probs are computed from hidden states through the output layer in checkpointed chunks of
   ``logits_chunk_tokens`` response tokens; full-vocabulary float32 logits of the batch never exist (TRL 1.12
   materialised them for every forward, most of its peak memory; :mod:`alignkit.ppo.logprobs`).
3. The value model is a one-label sequence classifier with its own LoRA whose ``score`` head is read at every
   token. By default it starts from the policy's checkpoint with a zero head (V = 0 at first, so the first
   advantages are the rewards-to-go); ``value_model:`` starts it from a reward-model folder instead (TRL 1.12
   needed a full separate value model, usually the reward model).
4. Rewards are reward programs (verifiers; ``model:<folder>`` for an outcome reward model) and/or a PRM, summed
   with weights; a program's ``None`` removes that sample from the step. TRL 1.12 took one reward model.
5. PRM step scores (p_good in [0, 1]) are used as they are, like the paper: with many steps they add up, so a
   longer solution of good steps earns more; watch ``response/length`` (and ``hack/completion_tokens``).
6. No DistributedDataParallel: gradients of the LoRA weights are summed over processes by one all-reduce per
   optimizer step, and losses are scaled by the global token count (exact token-mean over processes).
   Gradient norms are clipped per model (policy, value), not jointly as TRL's wrapper did.
7. Early stop on KL (``target_kl``: remaining updates of a rollout are skipped once a mini-batch's approximate
   KL to the sampling policy passes 1.5x it, Spinning Up's rule) and an adaptive KL coefficient
   (``adaptive_kl``, Ziegler et al. 2019) are offered; TRL 1.12 had neither.
8. Dropout is off in every model (probabilities set to 0), as TRL does; responses are sampled with
   temperature only (no top-p/top-k), so the recomputed log-probs are those of the distribution that
   sampled. Advantages are whitened over each process's rollout, as in TRL.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from alignkit.core.config import DataSpec, Spec
from alignkit.core.errors import DataError, ModelError, RecipeError
from alignkit.generation import HFSpec, GenerationSpec
from alignkit.rewards.environments import EnvironmentSpec, check_environments
from alignkit.rewards.programs import RewardSpec
from alignkit.stages.common import TrainStageConfig, measure_accuracy
from alignkit.stages.rl_common import accuracy_sets, reward_specs
from alignkit.core.stage import StageContext, StageResult

if TYPE_CHECKING:
    from alignkit.ppo import PPOHyper


class PRMRewardSpec(Spec):
    """A process reward model giving each step of a response a reward at the step's last token."""

    model: str = Field(..., description="PRM folder written by the `prm` stage (e.g. ${prm.model}).")
    weight: float = Field(1.0, description="Multiplies every step score.")
    batch_size: int = Field(16, gt=0, description="Sequences per PRM forward.")


class AdaptiveKLSpec(Spec):
    """Ziegler et al.'s proportional controller for the KL coefficient (starts at `beta`)."""

    target: float = Field(6.0, gt=0, description="Wanted KL per response (sum over tokens, nats).")
    horizon: float = Field(10000, gt=0, description="Samples over which the coefficient may change by 20%.")


class Config(TrainStageConfig):
    kind: str = "ppo"
    RENAMED = {"samples_per_prompt": "num_generations", "clip_eps": "epsilon", "value_clip_eps": "value_epsilon",
               "kl_coef": "beta", "accuracy_max_new_tokens": "accuracy_max_completion_length"}
    # --- data and rewards
    data: DataSpec | None = Field(None, description="Training problems ('problems' format); every column but "
                                  "prompt reaches the reward programs as a keyword list.")
    data_format: Literal["problems", "prompts"] = Field(
        "problems", description="prompts: rows with only a prompt (red-team prompts scored by a reward model).")
    rewards: list[RewardSpec] = Field(
        default_factory=list, description="Sequence rewards (verifiers, `model:<folder>` reward models), "
        "weighted and summed; placed on the last token.")
    environments: list[EnvironmentSpec] | None = Field(
        None, min_length=1, description="Several tasks instead of data + rewards: each its own data and rewards, "
        "mixed by weight (a shipped name such as arith, gsm8k, code, format, or a mapping; docs/environments.md).")
    prm: PRMRewardSpec | None = Field(None, description="Step rewards from a PRM, placed on each step's end.")
    missing_eos_penalty: float | None = Field(
        None, ge=0, description="Subtracted from the score of responses cut at max_completion_length.")
    accuracy_data: DataSpec | None = Field(
        None, description="Held-out problems (prompt + gold answer) for greedy exact-match before/after.")
    accuracy_max_completion_length: int = Field(128, gt=0, description="Generation budget for the accuracy check.")
    chat: bool = Field(True, description="Send prompts through the model's chat template.")
    # --- models
    value_model: str | None = Field(
        None, description="Folder to start the value model from (a reward model); default: the policy's "
        "checkpoint with a zero value head.")
    value_lr: float | None = Field(None, gt=0, description="Learning rate of the value model (default: lr).")
    lr: float = Field(1e-4, gt=0, description="Peak learning rate of the policy adapter.")
    # --- sampling
    generation: GenerationSpec = Field(
        default_factory=HFSpec, description="Sampling engine: hf or fast (the policy in this process), or openai "
        "with serve_adapter: true (a vLLM server holding the base model, the policy's LoRA adapter loaded into it "
        "every step).")
    max_completion_length: int = Field(128, gt=0, description="Most tokens sampled per response.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature; log-probs use the same one.")
    stop: list[str] = Field(default_factory=list, description="Stop strings ending a response (besides EOS).")
    num_generations: int = Field(1, gt=0, description="Responses sampled per prompt.")
    # --- batch arithmetic
    batch_size: int = Field(8, gt=0, description="Samples per forward/backward (micro-batch) per process.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step (one mini-batch).")
    num_mini_batches: int = Field(1, gt=0, description="Optimizer steps per pass over a rollout.")
    ppo_epochs: int = Field(4, gt=0, description="Passes over each rollout.")
    max_steps: int = Field(-1, description="Training steps to take (-1: `epochs` passes over `data`); a PPO step is one rollout and its updates.")
    logits_chunk_tokens: int = Field(
        1024, gt=0, description="Response tokens whose full-vocabulary logits exist at once (memory knob: "
        "1024 x 152k-vocabulary float32 logits are 0.6 GB).")
    # --- losses and KL
    epsilon: float = Field(0.2, gt=0, description="Clip range of the policy ratio.")
    value_epsilon: float = Field(0.2, gt=0, description="Clip range of the value change (value units).")
    vf_coef: float = Field(0.1, ge=0, description="Weight of the value loss.")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount (1: none, usual for language).")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    whiten_advantages: bool = Field(True, description="Normalise advantages to mean 0, variance 1.")
    beta: float = Field(0.05, ge=0, description="KL penalty coefficient (TRL 1.12: 0.05; "
                           "Math-Shepherd: 0.04); the start value with adaptive_kl.")
    kl_estimator: Literal["k1", "k3"] = Field("k1", description="Per-token KL estimate in the reward.")
    adaptive_kl: AdaptiveKLSpec | None = Field(None, description="Steer the coefficient to a target KL.")
    target_kl: float | None = Field(
        None, gt=0, description="Stop a rollout's updates once KL(old || new) passes 1.5x this.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip each model's gradient norm (null: off).")

    @property
    def rollout_size(self) -> int:
        """Samples per process and step."""
        return self.batch_size * self.grad_accum * self.num_mini_batches

    @property
    def prompts_per_step(self) -> int:
        """Prompts per process and step."""
        return self.rollout_size // self.num_generations

    @model_validator(mode="after")
    def _data_or_environments(self) -> Config:
        if self.environments is not None:
            if self.data is not None or self.rewards:
                raise ValueError("give `environments` or `data` (+ `rewards`), not both (an environment has its own "
                                 "data and rewards; a `prm:` applies to every environment)")
            check_environments(self.environments)
        elif self.data is None:
            raise ValueError("give `data` (or `environments`, each with its own data and rewards)")
        return self


def outputs(run_dir: Path) -> dict[str, str]:
    return {"model": str(run_dir / "model"), "adapter": str(run_dir / "adapter"),
            "value_model": str(run_dir / "value_model"), "value_adapter": str(run_dir / "value_adapter"),
            "dir": str(run_dir)}


def check(config: Config, base_dir: Path) -> None:
    """Load-time checks; RecipeError naming the field."""
    from alignkit.rewards.programs import check_rewards

    if config.lora is None:
        raise RecipeError("ppo trains LoRA adapters (the reference is the policy with adapters disabled); "
                          "add `lora: {r: 16, alpha: 32}`", field="lora")
    if config.trl:
        raise RecipeError("ppo runs alignkit's own loop, not a TRL trainer; move these settings to ppo's own "
                          f"fields: {sorted(config.trl)}", field="trl")
    if not config.rewards and config.prm is None and not config.environments:
        raise RecipeError("no reward: give `rewards:` (verifiers, model:<folder>) and/or `prm:`", field="rewards")
    check_rewards(reward_specs(config), base_dir)
    if config.rollout_size % config.num_generations:
        raise RecipeError(f"batch_size * grad_accum * num_mini_batches = {config.rollout_size} samples per step is "
                          f"not a multiple of num_generations={config.num_generations}",
                          field="num_generations")
    if config.generation.backend == "openai" and not config.generation.serve_adapter:
        raise RecipeError("ppo samples from the policy being trained: use generation.backend hf or fast, or openai "
                          "with serve_adapter: true (a vLLM server that loads each step's LoRA adapter)",
                          field="generation.serve_adapter")


def run(config: Config, ctx: StageContext) -> StageResult:
    import torch

    from alignkit.data import load_dataset
    from alignkit.modeling.models import load_tokenizer
    from alignkit.ppo import ppo_step
    from alignkit.ppo.checkpoint import latest_checkpoint, load_checkpoint

    # 1. Data, tokenizer and reward sources.
    torch.manual_seed(config.seed)
    tokenizer = load_tokenizer(config.model, padding_side="left")
    if config.environments:
        from alignkit.rewards.environments import environment_rows

        data = environment_rows(list(config.environments), seed=config.seed)
    else:
        data = load_dataset(config.data, config.data_format).to_list()
    longest = _check_prompt_lengths(data, tokenizer, config)
    sources = _reward_sources(config, ctx)
    # 2. Policy (LoRA; reference = adapters disabled) and value model (own LoRA, score head at every token).
    device = ctx.state.device
    models, groups = _build_models(config, tokenizer, device, ctx)
    # 3. Optimizer, schedule and KL controller; resume from the stage folder's last checkpoint.
    total = _total_steps(config, len(data), ctx.state.num_processes)
    optimizer, scheduler = _optimizer(config, groups, total)
    kl_controller = _kl_controller(config)
    start, history, found = 0, [], latest_checkpoint(ctx.run_dir)
    if found is not None:
        state = load_checkpoint(found, policy=models.policy, value=models.value, optimizer=optimizer,
                                scheduler=scheduler, rank=ctx.state.process_index)
        start, history, kl_controller.value = state["step"], state["history"], state["kl_coef"]
    metrics: dict[str, Any] = {"train_prompts": len(data), "longest_prompt_tokens": longest, "total_steps": total,
                               "resumed_from_step": start or None}
    if config.environments:
        metrics.update({f"train_prompts_{env}": n for env, n in Counter(row["env"] for row in data).items()})
    # 4. Accuracy before (kept in the stage folder, so a resumed run reports the real starting point).
    held_out = accuracy_sets(config)
    for suffix, problems in held_out.items():
        metrics[f"accuracy{suffix}_before"] = _accuracy(models, problems, config, ctx, f"before{suffix}", reuse=True)
    # 5. Train.
    hyper = hyper_from_config(config)
    started = time.perf_counter()
    for step in range(start, total):
        step_metrics = ppo_step(step, models, sources, data, optimizer, groups, kl_controller, hyper,
                                ctx.state.process_index, device)
        scheduler.step()
        history.append({"step": step + 1, "lr": scheduler.get_last_lr()[0], **step_metrics})
        _report(history[-1], total, config, ctx)
        if (step + 1) % config.save_steps == 0 or step + 1 == total:
            _save(ctx, step + 1, models, optimizer, scheduler, kl_controller, history, config)
    seconds = time.perf_counter() - started
    if hasattr(models.engine, "close"):  # a served adapter: unload the last version
        models.engine.close()
    # 6. Save the adapters, the merged policy and the merged value model; accuracy after.
    artifacts = _save_outputs(models, tokenizer, ctx)
    metrics.update(_summary(history, start, seconds))
    for suffix, problems in held_out.items():
        metrics[f"accuracy{suffix}_after"] = _accuracy(models, problems, config, ctx, f"after{suffix}", reuse=False)
    ctx.log_metrics(metrics)
    return StageResult(metrics=metrics, artifacts=artifacts)


# ------------------------------------------------------------------------------------------ building blocks


def hyper_from_config(config: Config) -> PPOHyper:
    """What the phases of :mod:`alignkit.ppo` read, from the stage config: the one place that maps this config's
    field names to theirs."""
    from alignkit.ppo import PPOHyper

    return PPOHyper(
        name=config.name or "ppo", seed=config.seed,
        prompts_per_step=config.prompts_per_step, num_generations=config.num_generations, chat=config.chat,
        max_completion_length=config.max_completion_length, temperature=config.temperature,
        stop=tuple(config.stop),
        missing_eos_penalty=config.missing_eos_penalty, kl_estimator=config.kl_estimator,
        gamma=config.gamma, lam=config.lam, whiten_advantages=config.whiten_advantages,
        batch_size=config.batch_size, logits_chunk_tokens=config.logits_chunk_tokens,
        ppo_epochs=config.ppo_epochs, num_mini_batches=config.num_mini_batches, epsilon=config.epsilon,
        value_epsilon=config.value_epsilon, vf_coef=config.vf_coef, max_grad_norm=config.max_grad_norm,
        target_kl=config.target_kl)


def _check_prompt_lengths(data: list[dict[str, Any]], tokenizer: Any, config: Config) -> int:
    """The longest rendered prompt in tokens; DataError naming the row if it cannot fit with a response."""
    from alignkit.data.prompts import render_prompt

    if not data:
        raise DataError("ppo: the training data has no rows")
    texts = [render_prompt(tokenizer, row["prompt"], chat=config.chat) for row in data]
    sizes = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    where = max(range(len(sizes)), key=sizes.__getitem__)
    if sizes[where] + config.max_completion_length > config.max_length:
        raise DataError(f"data row {where}: prompt of {sizes[where]} tokens + max_completion_length "
                        f"{config.max_completion_length} > max_length {config.max_length}; raise max_length or "
                        "shorten the prompts")
    return sizes[where]


def _reward_sources(config: Config, ctx) -> Any:
    from alignkit.ppo import RewardSources
    from alignkit.rewards.programs import combine_rewards

    base_dir = ctx.recipe_dir  # reward paths are recipe-relative
    if config.environments:
        from alignkit.rewards.environments import environment_reward

        sequence = environment_reward(list(config.environments), base_dir)
    else:
        sequence = combine_rewards(list(config.rewards), base_dir) if config.rewards else None
    steps = None
    if config.prm is not None:
        from alignkit.rewards.prm import PRMScorer

        steps = PRMScorer(config.prm.model, batch_size=config.prm.batch_size, dtype=config.dtype,
                          device=str(ctx.state.device))
    return RewardSources(sequence, steps, config.prm.weight if config.prm else 1.0)


def _load_for_training(name: str, task: str, config: Config, device: Any) -> Any:
    """Load ``name`` for ``task`` (quantized if asked), on ``device``, with a fresh LoRA adapter, dropout off.

    Dropout is switched off by setting every dropout probability to 0 rather than by eval mode: transformers
    only checkpoints activations in training mode, so eval mode would silently ignore gradient_checkpointing.
    """
    import torch

    from alignkit.modeling.models import apply_lora, is_quantized, load_model

    model = load_model(name, task=task, num_labels=1, quantization=config.quantization, dtype=config.dtype,
                       attn_implementation=config.attn_implementation, trainable=True)
    if hasattr(model, "peft_config"):
        raise ModelError(f"model {name!r} is a LoRA adapter on a quantized base; give the merged model folder "
                         "(e.g. ${sft.model}, not ${sft.adapter})")
    if task == "seq-cls" and name == config.model:
        # Value head initialised at zero: V = 0 until it learns (departure 3).
        model.score.weight.data.zero_()
    if not is_quantized(model):
        model = model.to(device)
    model = apply_lora(model, config.lora, task, gradient_checkpointing=config.gradient_checkpointing)
    for module in model.modules():  # LoRA's own dropout included: PPO ratios must start at exactly 1
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model.train()


def _build_models(config: Config, tokenizer: Any, device: Any, ctx) -> tuple[Any, list[list[Any]]]:
    """The models and the two groups of trainable parameters (policy, value)."""
    from alignkit.ppo import PPOModels

    policy = _load_for_training(config.model, "causal-lm", config, device)
    value = _load_for_training(config.value_model or config.model, "seq-cls", config, device)
    if config.generation.backend == "openai":  # served base + this step's adapter (alignkit.generation.served_lora)
        from alignkit.generation.served_lora import AdapterSyncEngine

        engine = AdapterSyncEngine.from_spec(config.generation, policy, tokenizer, ctx.run_dir,
                                             name=f"{ctx.name}-rank{ctx.state.process_index}")
    else:
        engine = config.generation.build(model=policy, tokenizer=tokenizer)
    groups = [[p for p in model.parameters() if p.requires_grad] for model in (policy, value)]
    return PPOModels(policy, value, tokenizer, engine), groups


def _total_steps(config: Config, n_prompts: int, processes: int) -> int:
    if config.max_steps > 0:
        return config.max_steps
    return max(1, math.ceil(config.epochs * n_prompts / (config.prompts_per_step * processes)))


def _optimizer(config: Config, groups: list[list[Any]], total: int) -> tuple[Any, Any]:
    """AdamW over the policy and value adapters (own learning rates); the schedule steps once per PPO step."""
    import torch
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW(
        [{"params": groups[0], "lr": config.lr}, {"params": groups[1], "lr": config.value_lr or config.lr}],
        weight_decay=config.weight_decay)
    scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=round(config.warmup_ratio * total),
                              num_training_steps=total)
    return optimizer, scheduler


def _kl_controller(config: Config) -> Any:
    from alignkit.maths import AdaptiveKLController, FixedKLController

    if config.adaptive_kl is None:
        return FixedKLController(config.beta)
    if config.beta <= 0:
        raise RecipeError("adaptive_kl needs a starting beta > 0", field="beta")
    return AdaptiveKLController(config.beta, config.adaptive_kl.target, config.adaptive_kl.horizon)


def _report(row: dict[str, Any], total: int, config: Config, ctx) -> None:
    ctx.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])
    if ctx.is_main and (row["step"] % config.logging_steps == 0 or row["step"] == total):
        nan = float("nan")
        steps = f"step reward {row.get('reward/step_score', nan):.3f} " if config.prm is not None else ""
        print(f"[alignkit] {ctx.name} step {row['step']}/{total}: score {row.get('reward/score', nan):.3f} "
              f"{steps}kl {row.get('kl/sequence', nan):.3f} entropy {row.get('policy/entropy', nan):.3f} "
              f"len {row.get('response/length', nan):.1f} {row['time/step_s']:.1f}s", flush=True)


def _save(ctx, step: int, models: Any, optimizer: Any, scheduler: Any, kl_controller: Any,
          history: list[dict[str, Any]], config: Config) -> None:
    from alignkit.ppo.checkpoint import save_checkpoint

    save_checkpoint(ctx.run_dir, step, policy=models.policy, value=models.value, optimizer=optimizer,
                    scheduler=scheduler, state={"kl_coef": kl_controller.value, "history": history},
                    rank=ctx.state.process_index, is_main=ctx.is_main, barrier=ctx.wait, keep=config.save_total_limit)
    if ctx.is_main:
        (ctx.run_dir / "history.jsonl").write_text("".join(json.dumps(row) + "\n" for row in history))


def _save_outputs(models: Any, tokenizer: Any, ctx) -> dict[str, str]:
    """Adapters of both models and their merges into full-precision copies of their bases."""
    from alignkit.modeling.models import merge_adapter

    paths = outputs(ctx.run_dir)
    if ctx.is_main:
        pairs = ((models.policy, "adapter", "model"), (models.value, "value_adapter", "value_model"))
        for model, adapter, merged in pairs:
            model.save_pretrained(paths[adapter])
            tokenizer.save_pretrained(paths[adapter])
            merge_adapter(paths[adapter], paths[merged])
    ctx.wait()
    return {key: paths[key] for key in ("model", "adapter", "value_model", "value_adapter")}


def _summary(history: list[dict[str, Any]], start: int, seconds: float) -> dict[str, Any]:
    """Sequence and step (PRM) rewards, KL and the reward-hacking signals at the start and end of training
    (means over the first and last quarter of the steps)."""
    if not history:
        return {"train_steps": 0}
    k = max(1, len(history) // 4)

    def mean(rows: list[dict[str, Any]], key: str) -> float:
        return sum(r.get(key, 0.0) for r in rows) / len(rows)

    ran = len(history) - start
    summary = {
        "train_steps": history[-1]["step"], "train_seconds": round(seconds, 2),
        "reward_first": mean(history[:k], "reward/score"), "reward_last": mean(history[-k:], "reward/score"),
        "step_reward_first": mean(history[:k], "reward/step_score"),
        "step_reward_last": mean(history[-k:], "reward/step_score"),
        "kl_last": mean(history[-k:], "kl/sequence"), "entropy_last": mean(history[-k:], "policy/entropy"),
        "seconds_per_step": round(seconds / ran, 3) if ran > 0 else None,
        "tokens_per_second": round(mean(history[start:], "throughput/tokens_per_s"), 1) if ran > 0 else None,
        "peak_memory_gib_steps": max(r.get("memory/peak_gib", 0.0) for r in history),
    }
    env_keys = dict.fromkeys(k for r in history for k in r if k.startswith("env/") and k.endswith("/reward"))
    for key in env_keys:  # env/<name>/reward: over the steps whose rollout had that environment's rows
        name, rows = key[len("env/"):-len("/reward")], [r for r in history if key in r]
        part = max(1, len(rows) // 4)
        summary[f"reward_env_{name}_first"], summary[f"reward_env_{name}_last"] = \
            mean(rows[:part], key), mean(rows[-part:], key)
    for key in history[-1]:
        if key.startswith("hack/"):  # hack/no_answer_frac -> hack_no_answer_frac_first, _last
            name = f"hack_{key[len('hack/'):]}"
            summary[f"{name}_first"], summary[f"{name}_last"] = mean(history[:k], key), mean(history[-k:], key)
    return summary


def _accuracy(models: Any, problems: Any, config: Config, ctx, when: str, *, reuse: bool) -> float:
    """The policy's greedy exact match (the shared check, sampled with this stage's local generation backend; with
    a served adapter, hf in this process: the check reads the local weights)."""
    local = config.generation if config.generation.backend != "openai" else None
    accuracy = measure_accuracy(models.policy, models.tokenizer, problems, config, ctx, when,
                                generation=local, reuse=reuse)
    ctx.wait()  # the file is written by the main process; a resume on any rank reads it back
    return accuracy
