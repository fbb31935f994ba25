"""Group Relative Policy Optimization with TRL's ``GRPOTrainer`` and alignkit reward programs.

GRPO (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300, eq. 3) samples a group of G completions per
prompt, scores them, and uses the group-normalised reward ``A_i = (r_i - mean(r)) / std(r)`` as the
advantage of every token of completion i in a clipped policy-gradient loss; no value model.

Recipe example::

    - kind: grpo
      model: ${sft.model}
      lora: {r: 16, alpha: 32}
      data: {source: arith, seed: 5, params: {n: 64, steps: 2}}
      accuracy_data: {source: arith, seed: 9001, params: {n: 48, steps: 2}}
      rewards:
        - {program: reward/math.py:answer_match, weight: 1.0}
        - {program: reward/format.py:step_format, weight: 0.1}
      num_generations: 8
      batch_size: 16          # completions per step: 2 prompts x 8

What it does, in order (:func:`~alignkit.stages.rl_common.train_with_rewards`): turn ``problems`` rows
into TRL prompts (keeping ``answer`` etc. for the rewards), load model and tokenizer, measure greedy
accuracy on ``accuracy_data``, train (LoRA via ``peft_config``; resumes from the last checkpoint in the
stage folder), save adapter + merged model, measure accuracy again. Outputs: ``${<name>.model}``,
``${<name>.adapter}``. Metrics: reward first/last logged, accuracy before/after, completions/s,
``frac_reward_zero_std``. Every step also logs the reward-hacking signals ``hack/*`` (completion length,
rewarded answers that are not a plain number, no answer, repeated 4-grams: :mod:`alignkit.rewards.hacking`; how to
read them: ``docs/grpo.md``), kept in ``trainer_state.json`` and as ``hack_<signal>_first/_last`` metrics.

Departures from the paper and from plain TRL:
1. ``loss_type`` defaults to TRL's ``dapo`` (token-level sum over the whole batch, DAPO arXiv:2503.14476),
   not the paper's per-sequence length normalisation (``grpo``), which favours short right answers and
   long wrong ones. All of TRL 1.16's losses can be chosen by name; unknown names fail at load.
2. ``beta`` defaults to 0 (TRL's default; the paper uses 0.04): no reference model, no KL term.
3. Groups whose completions all score the same get zero advantage (TRL: ``r - mean(r) = 0``, divided by
   ``std + 1e-4``), so with ``beta: 0`` they contribute no gradient. Their share is TRL's
   ``frac_reward_zero_std``, reported as ``frac_reward_zero_std_mean``/``_last``: near 1 means the task is
   too easy or too hard for the policy and the step was wasted.
4. ``generation`` picks who samples: ``trl`` (default: TRL's ``transformers.generate``), ``fast`` (our engine
   inside TRL's trainer, one prefill per group, TRL's sampling semantics: :mod:`alignkit.generation.rollout`),
   ``hf``, or ``vllm`` (TRL's own vLLM integration, server or colocate, CUDA only). docs/perf.md compares them.
5. ``batch_size`` counts completions, as in TRL; ``gradient_checkpointing`` is off unless asked (TRL's
   default is on), matching the other alignkit stages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from alignkit.stages.common import trl_args
from alignkit.stages.rl_common import RLStageConfig, check_rl, rl_trl_args, train_with_rewards
from alignkit.core.stage import StageContext, StageResult

#: TRL 1.16's GRPOTrainer loss names (grpo_trainer.py `_compute_loss`); anything else fails at load.
LossType = Literal["grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo"]


class Config(RLStageConfig):
    kind: str = "grpo"
    loss_type: LossType = Field(
        "dapo", description="Loss aggregation: grpo (per-sequence mean), dr_grpo (/ max_completion_length), "
        "dapo (per token over the batch), bnpo, cispo, sapo, luspo (needs importance_sampling_level: "
        "sequence), vespo.")
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="Divide advantages by the group's reward std (paper), the batch's, or not at all "
        "(Dr. GRPO: std scaling over-weights too-easy/too-hard prompts).")
    importance_sampling_level: Literal["token", "sequence"] = Field(
        "token", description="Importance ratio per token (GRPO) or per sequence (GSPO, arXiv:2507.18071).")
    epsilon_high: float | None = Field(
        None, gt=0, description="Upper clip range if different from epsilon (DAPO's clip-higher uses 0.28).")


def outputs(run_dir: Path) -> dict[str, str]:
    return {"model": str(run_dir / "model"), "adapter": str(run_dir / "adapter"), "dir": str(run_dir)}


def check(config: Config, base_dir: Path) -> None:
    from alignkit.core.errors import RecipeError

    check_rl(config, base_dir, "trl.GRPOConfig")
    if config.loss_type == "luspo" and config.importance_sampling_level != "sequence":
        raise RecipeError("loss_type luspo is a sequence-level loss; set importance_sampling_level: sequence",
                          field="importance_sampling_level")


def run(config: Config, ctx: StageContext) -> StageResult:
    from trl import GRPOConfig, GRPOTrainer

    args = trl_args(
        GRPOConfig, config, ctx,
        **rl_trl_args(config),
        loss_type=config.loss_type,
        scale_rewards=config.scale_rewards,
        importance_sampling_level=config.importance_sampling_level,
        epsilon_high=config.epsilon_high,
    )
    return train_with_rewards(config, ctx, GRPOTrainer, args)
