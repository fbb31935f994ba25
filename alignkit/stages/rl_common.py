"""What the ``grpo`` and ``rloo`` stages share: config fields, load-time checks, prompts, the run, metrics.

Both stages wrap a TRL online trainer (``GRPOTrainer``, ``RLOOTrainer``) that samples ``num_generations``
completions per prompt, scores them with reward programs (:mod:`alignkit.rewards.programs`) and takes a policy
gradient step with a group baseline. They differ only in their TRL config class and a few loss fields, so
each stage module builds its TRL arguments and hands them to :func:`train_with_rewards`, which runs the
named steps: data -> model -> accuracy before -> train -> save -> accuracy after -> metrics.

Batch sizes follow TRL: ``batch_size`` counts *completions* per device and step, so one optimizer step sees
``batch_size * grad_accum * processes / num_generations`` prompts (8 * 1 * 1 / 4 = 2 prompts of 4).

Every batch's reward-hacking signals (:mod:`alignkit.rewards.hacking`) are logged beside TRL's reward through
:class:`HackingWatch`, which taps the reward functions TRL calls.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from alignkit.core.config import DataSpec
from alignkit.core.errors import DataError, RecipeError
from alignkit.generation.spec import RLGenerationSpec, TRLSamplingSpec
from alignkit.rewards.environments import EnvironmentSpec, check_environments
from alignkit.rewards.programs import RewardSpec, check_rewards
from alignkit.stages.common import (
    TrainStageConfig, check_trl_passthrough, fit, measure_accuracy, restore_trainable_dtype,
    save_trained_model,
)
from alignkit.core.stage import StageResult


class RLStageConfig(TrainStageConfig):
    """Fields of the reward-driven online RL stages (``grpo``, ``rloo``)."""

    RENAMED = {"accuracy_max_new_tokens": "accuracy_max_completion_length"}

    data: DataSpec | None = Field(None, description="Training problems ('problems' format: prompt, answer, ...); "
                                  "every column but prompt reaches the reward programs as a keyword list.")
    rewards: list[RewardSpec] | None = Field(
        None, min_length=1, description="Reward programs and weights (weights become TRL's reward_weights).")
    environments: list[EnvironmentSpec] | None = Field(
        None, min_length=1, description="Several tasks instead of data + rewards: each its own data and rewards, "
        "mixed by weight (a shipped name such as arith, gsm8k, code, format, or a mapping; docs/environments.md).")
    accuracy_data: DataSpec | None = Field(
        None, description="Held-out problems (prompt + gold answer) for greedy exact-match before/after.")
    accuracy_max_completion_length: int = Field(128, gt=0, description="Generation budget for the accuracy check.")
    chat: bool = Field(True, description="Send prompts as chat conversations (the model's chat template).")
    generation: RLGenerationSpec = Field(
        default_factory=TRLSamplingSpec, description="Who samples the completions: trl (TRL's model.generate, the "
        "default), fast (our engine inside TRL's trainer: one prefill per group), hf, or vllm (TRL's vLLM, server "
        "or colocate). docs/perf.md.")
    num_generations: int = Field(
        8, ge=2, description="Group size G: completions sampled per prompt (the baseline is the group's).")
    max_completion_length: int = Field(256, gt=0, description="Sampling budget per completion, in tokens.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (1.0 samples the policy itself).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (1.0: off).")
    num_iterations: int = Field(
        1, ge=1, description="Optimizer passes per generated batch (mu); >1 makes the clip epsilon matter.")
    epsilon: float = Field(0.2, gt=0, description="PPO-style clip range of the importance ratio.")
    beta: float = Field(0.0, ge=0, description="KL coefficient toward the starting policy (0: no reference "
                        "model is kept, as in TRL's GRPO default).")
    mask_truncated_completions: bool = Field(
        False, description="Leave completions cut at max_completion_length out of the loss (DAPO).")
    batch_size: int = Field(
        8, gt=0, description="Completions (not prompts) per device per micro-step; with grad_accum and the "
        "process count it must hold whole groups of num_generations.")
    max_length: int = Field(
        512, gt=0, description="Longest prompt + max_completion_length allowed, in tokens (checked on the data).")
    lr: float = Field(1e-5, gt=0, description="Peak learning rate (RL wants small steps; LoRA tolerates ~1e-4).")

    @model_validator(mode="after")
    def _data_or_environments(self) -> RLStageConfig:
        if self.environments is not None:
            if self.data is not None or self.rewards is not None:
                raise ValueError("give `environments` or `data` + `rewards`, not both (an environment has its own "
                                 "data and rewards)")
            check_environments(self.environments)
        elif self.data is None or self.rewards is None:
            raise ValueError("give `data` and `rewards` (or `environments`, each with its own)")
        return self


def reward_specs(config: Any) -> list[tuple[str, RewardSpec]]:
    """(field path, spec) of every reward program of an RL stage: its own, or each environment's."""
    if getattr(config, "environments", None):
        return [(f"environments.{env.name}.rewards.{i}", spec) for env in config.environments
                for i, spec in enumerate(env.rewards)]
    return [(f"rewards.{i}", spec) for i, spec in enumerate(config.rewards)]


def check_rl(config: RLStageConfig, base_dir: Path, trl_config_class: str) -> None:
    """Load-time checks shared by grpo and rloo (``trl_config_class``: e.g. ``"trl.GRPOConfig"``); raise
    RecipeError naming the field."""
    check_trl_passthrough(config.trl, trl_config_class)
    check_rewards(reward_specs(config), base_dir)
    check_sampling(config)
    if "generation_batch_size" in config.trl or "steps_per_generation" in config.trl:
        return  # the user sized generation batches themselves; TRL checks them
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    completions = config.batch_size * config.grad_accum * processes
    if completions % config.num_generations:
        raise RecipeError(
            f"batch_size * grad_accum * processes = {config.batch_size} * {config.grad_accum} * {processes} = "
            f"{completions} completions per step does not hold whole groups of {config.num_generations}; make "
            "batch_size a multiple of num_generations (or change num_generations)", field="num_generations")


def check_sampling(config: RLStageConfig) -> None:
    """The ``generation`` block against the ``trl:`` pass-through: vLLM is switched on in one place only, and our
    engines refuse TRL sampling options they do not implement (:func:`~alignkit.generation.rollout.unsupported_sampling`)."""
    from types import SimpleNamespace

    from alignkit.generation.rollout import unsupported_sampling

    backend = config.generation.backend
    if "use_vllm" in config.trl:
        raise RecipeError("switch vLLM on with generation: {backend: vllm, mode: server} (docs/perf.md), not trl.use_vllm",
                          field="trl.use_vllm")
    stray = sorted(key for key in config.trl if key.startswith("vllm_"))
    if stray and backend != "vllm":
        raise RecipeError(f"trl.{stray[0]} applies to vLLM sampling only; this stage samples with backend {backend}",
                          field=f"trl.{stray[0]}")
    if backend == "openai" and not (config.generation.serve_adapter and config.lora):
        raise RecipeError("a served model cannot follow the policy's updates: with generation.backend openai set "
                          "serve_adapter: true and train a LoRA (`lora:`), so each step's adapter is loaded into the "
                          "server; or use backend vllm (TRL syncs full weights)", field="generation.serve_adapter")
    if backend in ("fast", "hf", "openai"):
        reason = unsupported_sampling(SimpleNamespace(**config.trl))
        if reason:
            raise RecipeError(f"generation.backend {backend} does not implement {reason}; use backend trl for it",
                              field="generation.backend")


def rl_trl_args(config: RLStageConfig) -> dict[str, Any]:
    """The TRL arguments both trainers take under the same names."""
    vllm = config.generation.trl_args() if config.generation.backend == "vllm" else {}
    return dict(
        **vllm,
        num_generations=config.num_generations,
        max_completion_length=config.max_completion_length,
        temperature=config.temperature,
        top_p=config.top_p,
        num_iterations=config.num_iterations,
        epsilon=config.epsilon,
        beta=config.beta,
        mask_truncated_completions=config.mask_truncated_completions,
        # environments: one function (EnvironmentReward) that applies each environment's own weights
        reward_weights=[1.0] if config.environments else [spec.weight for spec in config.rewards],
        remove_unused_columns=False,  # the reward programs need answer/steps
    )


def prompt_rows(problems: Any, tokenizer: Any, *, chat: bool) -> Any:
    """'problems' rows -> TRL prompt rows: a one-turn conversation (or the rendered text); other columns kept.

    >>> # {"prompt": "2+3?", "answer": "5"} -> {"prompt": [{"role": "user", "content": "2+3?"}], "answer": "5"}
    """
    from alignkit.data.prompts import render_prompt

    if chat and getattr(tokenizer, "chat_template", None):
        return problems.map(lambda row: {"prompt": [{"role": "user", "content": row["prompt"]}]})
    # Without a chat template, send exactly the text evaluation will send (render_prompt's plain form).
    return problems.map(lambda row: {"prompt": render_prompt(tokenizer, row["prompt"], chat=False)})


def check_prompt_lengths(rows: Any, tokenizer: Any, config: RLStageConfig) -> int:
    """The longest prompt in tokens; DataError naming the row if prompt + completion budget > max_length."""
    from alignkit.data.prompts import render_prompt

    longest, where = 0, 0
    for index, row in enumerate(rows):
        text = render_prompt(tokenizer, row["prompt"], chat=config.chat) if isinstance(row["prompt"], list) \
            else row["prompt"]
        size = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if size > longest:
            longest, where = size, index
    if longest + config.max_completion_length > config.max_length:
        raise DataError(f"data row {where}: prompt of {longest} tokens + max_completion_length "
                        f"{config.max_completion_length} > max_length {config.max_length}; raise max_length or "
                        "shorten the prompts")
    return longest


def train_with_rewards(config: RLStageConfig, ctx, trainer_class: type, args: Any) -> Any:
    """Run an online RL stage with a TRL trainer: the steps every reward-driven stage shares.

    ``args`` is the built TRL config (``GRPOConfig``/``RLOOConfig``). Returns a ``StageResult`` whose
    metrics hold reward first/last, accuracy before/after, throughput and TRL's ``frac_reward_zero_std``.
    """
    from alignkit.data import load_dataset
    from alignkit.rewards.hacking import math_signals
    from alignkit.modeling.models import load_model, load_tokenizer, lora_config
    from alignkit.rewards.programs import load_rewards

    if config.generation.backend == "vllm":
        vllm_available(config.generation)  # before minutes of loading and accuracy checks, not at TRL's import
    # 1. Data and rewards: prompts become TRL rows; the answer column rides along for answer_match.
    tokenizer = load_tokenizer(config.model, padding_side="left")
    base_dir = ctx.recipe_dir  # reward paths are recipe-relative
    if config.environments:
        from datasets import Dataset

        from alignkit.rewards.environments import environment_reward, environment_rows

        problems_rows = Dataset.from_list(environment_rows(list(config.environments), seed=config.seed))
        reward_funcs, weights = [environment_reward(list(config.environments), base_dir)], [1.0]
    else:
        problems_rows = load_dataset(config.data, "problems")
        reward_funcs, weights = load_rewards(list(config.rewards), base_dir)
    train_rows = prompt_rows(problems_rows, tokenizer, chat=config.chat)
    longest_prompt = check_prompt_lengths(train_rows, tokenizer, config)
    held_out = accuracy_sets(config)
    reward_funcs = HackingWatch(reward_funcs, weights, math_signals).funcs  # logs hack/* per step

    # 2. Model, and accuracy before training.
    model = load_model(config.model, quantization=config.quantization, dtype=config.dtype,
                       attn_implementation=config.attn_implementation, trainable=True)
    metrics: dict[str, Any] = {"train_prompts": len(train_rows), "longest_prompt_tokens": longest_prompt}
    if config.environments:
        metrics.update({f"train_prompts_{env}": n for env, n in Counter(train_rows["env"]).items()})
    for suffix, problems in held_out.items():
        metrics[f"accuracy{suffix}_before"] = measure_accuracy(model, tokenizer, problems, config, ctx,
                                                               f"before{suffix}", label=_label("before", suffix))

    # 3. Train (LoRA through peft_config; resumes from the stage folder's last checkpoint).
    trainer = sampling_trainer(config, trainer_class)(
        model=model, reward_funcs=reward_funcs, args=args, train_dataset=train_rows, processing_class=tokenizer,
        peft_config=lora_config(config.lora, "causal-lm") if config.lora else None,
    )
    restore_trainable_dtype(trainer, config)  # QLoRA: keep the adapters in the model's dtype (TRL makes them bf16)
    fitted = fit_sampling(trainer, ctx)

    # 4. Save adapter + merged model, then accuracy after.
    artifacts = save_trained_model(trainer, tokenizer, ctx)
    metrics.update(reward_metrics(trainer.state.log_history))
    metrics.update(throughput(trainer.state.global_step, args, fitted.seconds, resumed_from=fitted.resumed_from))
    for suffix, problems in held_out.items():
        metrics[f"accuracy{suffix}_after"] = measure_accuracy(trainer.model, tokenizer, problems, config, ctx,
                                                              f"after{suffix}", label=_label("after", suffix))
    ctx.log_metrics(metrics)
    return StageResult(metrics=metrics, artifacts=artifacts)


def sampling_trainer(config: RLStageConfig, trainer_class: type) -> type:
    """The TRL trainer class that samples as ``config.generation`` says: TRL's generate or TRL's vLLM (``trl``,
    ``vllm``: the class itself, configured through :func:`rl_trl_args`), or one of our engines inside it
    (``fast``, ``hf``, ``openai`` with a served adapter: :func:`alignkit.generation.rollout.with_engine`)."""
    if config.generation.backend in ("fast", "hf", "openai"):
        from alignkit.generation.rollout import with_engine

        return with_engine(trainer_class, config.generation)
    return trainer_class


def fit_sampling(trainer: Any, ctx: Any) -> Any:
    """:func:`~alignkit.stages.common.fit`, then unload a served adapter's last version from its server."""
    fitted = fit(trainer, ctx)
    served = getattr(trainer, "_alignkit_engine", None)
    if hasattr(served, "close"):
        served.close()
    return fitted


def vllm_available(spec: Any) -> None:
    """RecipeError unless TRL's vLLM path can start here: vllm importable (the trainer process needs it in both
    modes: it sends weights to the server over NCCL) and, to colocate, a CUDA GPU."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise RecipeError("generation.backend vllm needs vLLM in this environment (pip install vllm, on a CUDA "
                          "machine); on CPU use backend fast", field="generation.backend")
    if spec.mode == "colocate":
        import torch

        if not torch.cuda.is_available():
            raise RecipeError("generation.mode colocate runs vLLM on this process's GPU and there is no CUDA GPU "
                              "here", field="generation.mode")


def accuracy_sets(config: Any) -> dict[str, Any]:
    """Held-out problems by metric suffix: ``""`` for the stage's ``accuracy_data``, ``"_<env>"`` for each
    environment's (``accuracy_<env>_before``/``_after``)."""
    from alignkit.data import load_dataset

    sets = {"": load_dataset(config.accuracy_data, "problems")} if config.accuracy_data else {}
    for env in getattr(config, "environments", None) or []:
        if env.accuracy_data is not None:
            sets[f"_{env.name}"] = load_dataset(env.accuracy_data, "problems")
    return sets


def _label(when: str, suffix: str) -> str:
    return f"{when} training" + (f" ({suffix[1:]})" if suffix else "")


def reward_metrics(log_history: list[dict[str, Any]]) -> dict[str, Any]:
    """Reward trend and group statistics from a TRL trainer's ``state.log_history``.

    ``reward_first``/``reward_last``: the first and last logged mean reward (each a mean over
    ``logging_steps`` steps); ``frac_reward_zero_std_mean``: the average share of groups whose completions
    all scored alike (zero advantage: they teach nothing without a KL term).

    >>> reward_metrics([{"reward": 0.25, "frac_reward_zero_std": 0.5, "step": 5},
    ...                 {"reward": 0.75, "frac_reward_zero_std": 0.0, "step": 10}])["reward_gain"]
    0.5
    """
    logged = [entry for entry in log_history if "reward" in entry]
    if not logged:
        return {}
    zero_std = [entry["frac_reward_zero_std"] for entry in logged if "frac_reward_zero_std" in entry]
    metrics: dict[str, Any] = {
        "reward_first": logged[0]["reward"],
        "reward_last": logged[-1]["reward"],
        "reward_gain": logged[-1]["reward"] - logged[0]["reward"],
        "reward_logs": len(logged),
    }
    if zero_std:
        metrics["frac_reward_zero_std_mean"] = sum(zero_std) / len(zero_std)
        metrics["frac_reward_zero_std_last"] = zero_std[-1]
    for key in logged[-1]:
        if key.startswith("rewards/") and key.endswith("/mean"):  # per program: rewards/<name>/mean
            name = key[len("rewards/"):-len("/mean")]
            metrics[f"reward_{name}_first"] = logged[0].get(key)
            metrics[f"reward_{name}_last"] = logged[-1][key]
    for key in ("completions/mean_length", "completions/clipped_ratio", "kl", "entropy"):
        if key in logged[-1]:
            metrics[key.replace("completions/", "completion_").replace("/", "_") + "_last"] = logged[-1][key]
    env_keys = dict.fromkeys(k for entry in logged for k in entry if k.startswith("env/") and k.endswith("/reward"))
    for key in env_keys:  # EnvironmentReward: env/<name>/reward (an environment may be absent from a batch)
        name, values = key[len("env/"):-len("/reward")], [entry[key] for entry in logged if key in entry]
        metrics[f"reward_env_{name}_first"], metrics[f"reward_env_{name}_last"] = values[0], values[-1]
    for key in logged[-1]:
        if key.startswith("hack/"):  # reward-hacking signals (HackingWatch): hack_<signal>_first/_last
            metrics[f"hack_{key[len('hack/'):]}_first"] = logged[0].get(key)
            metrics[f"hack_{key[len('hack/'):]}_last"] = logged[-1][key]
    return metrics


class HackingWatch:
    """Taps a TRL trainer's reward functions so that each batch's reward-hacking signals are logged.

    TRL 1.16 calls its (synchronous) reward functions one after the other on the same batch, passing
    ``completions``, ``completion_ids`` and ``log_metric``. Each tap in :attr:`funcs` returns its function's
    scores unchanged and keeps them; after the last one, ``signals(texts, token_lengths, rewards)`` gets the
    batch and the weighted total (TRL's weighted sum, before any KL term) and its values go to ``log_metric``.
    TRL averages those per logged step into ``state.log_history``, hence the tracker and the checkpoints'
    ``trainer_state.json`` (with several processes: the mean of the processes' values, as for any
    ``log_metric``). Taps keep the functions' names, so TRL's ``rewards/<name>/mean`` logs are unchanged.
    """

    def __init__(self, funcs: list[Any], weights: list[float], signals: Any):
        if len(funcs) != len(weights):
            raise ValueError(f"{len(funcs)} reward functions for {len(weights)} weights")
        self.weights, self.signals = list(weights), signals
        self.funcs = [_RewardTap(self, index, fn) for index, fn in enumerate(funcs)]
        self._scores: list[list[float | None]] = []

    def scored(self, index: int, scores: list, completions: list, kwargs: dict[str, Any]) -> None:
        """Keep function ``index``'s scores of this batch; after the last function's, log the signals."""
        from alignkit.rewards.programs import weighted_total
        from alignkit.rewards.values import completion_text

        if index == 0:  # a new batch
            self._scores = []
        self._scores.append([None if s is None else float(s) for s in scores])
        log_metric = kwargs.get("log_metric")
        if index < len(self.funcs) - 1 or log_metric is None or len(self._scores) != len(self.funcs):
            return
        texts = [completion_text(c) for c in completions]
        lengths = [len(ids) for ids in kwargs["completion_ids"]]
        for name, value in self.signals(texts, lengths, weighted_total(self._scores, self.weights)).items():
            log_metric(name, value)


class _RewardTap:
    """One reward function of a :class:`HackingWatch`: called as TRL calls it, named as TRL names it."""

    def __init__(self, watch: HackingWatch, index: int, fn: Any):
        from alignkit.rewards.values import callable_name

        self.watch, self.index, self.fn = watch, index, fn
        self.__name__ = callable_name(fn)  # TRL logs rewards/<__name__>/mean

    def __call__(self, completions: list, **kwargs: Any) -> list:
        scores = list(self.fn(completions=completions, **kwargs))
        self.watch.scored(self.index, scores, completions, kwargs)
        return scores


def throughput(global_step: int, args: Any, seconds: float, *, resumed_from: str | None) -> dict[str, Any]:
    """Completions sampled and their rate, from the TRL config's batch arithmetic.

    One generation batch (``generation_batch_size`` completions over all processes) feeds
    ``steps_per_generation * num_iterations / gradient_accumulation_steps`` optimizer steps. On a resumed
    run only the steps taken after the checkpoint count against ``seconds``.
    """
    start = int(Path(resumed_from).name.rsplit("-", 1)[-1]) if resumed_from else 0
    steps = global_step - start
    steps_per_batch = args.steps_per_generation * args.num_iterations / args.gradient_accumulation_steps
    completions = int(-(-steps // steps_per_batch) * args.generation_batch_size) if steps > 0 else 0
    return {
        "train_steps": global_step,
        "train_seconds": round(seconds, 2),
        "completions_sampled": completions,
        "completions_per_second": round(completions / seconds, 3) if seconds > 0 else None,
        "resumed_from_step": start or None,
    }
