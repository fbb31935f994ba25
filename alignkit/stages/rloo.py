"""REINFORCE Leave-One-Out with TRL's ``RLOOTrainer`` and alignkit reward programs.

RLOO (Ahmadian et al. 2024, "Back to Basics", arXiv:2402.14740, eq. 6; Kool et al. 2019) samples k
completions per prompt and gives completion i the advantage ``r_i - mean_{j != i} r_j``: the baseline is
the other k-1 samples' mean, so it is unbiased. No value model, no std scaling.

Recipe example::

    - kind: rloo
      model: ${sft.model}
      lora: {r: 16, alpha: 32}
      data: {source: arith, seed: 5, params: {n: 64, steps: 2}}
      rewards: [{program: reward/math.py:answer_match}]
      num_generations: 4
      batch_size: 8

The run is the same as ``grpo``'s (:func:`~alignkit.stages.rl_common.train_with_rewards`): same outputs
(``${<name>.model}``, ``${<name>.adapter}``) and metrics; see that module for the shared fields.

Departures from the paper and from plain TRL:
1. ``beta`` defaults to TRL's 0.05. RLOO subtracts ``beta * sum_t (log pi - log pi_ref)`` from each
   completion's reward (a sequence-level KL penalty, first-order estimate: can be negative per token),
   unlike GRPO which adds a k3 KL term to the loss. With LoRA the reference is the adapter switched off.
2. TRL clips the importance ratio (``epsilon``) as PPO does; the paper's RLOO is plain REINFORCE, which
   is what ``num_iterations: 1`` gives (the ratio is then 1 at every step).
3. ``normalize_advantages`` (off by default, as in TRL) whitens advantages over the whole generation batch.
4. ``generation`` picks who samples, as in ``grpo``: ``trl`` (default), ``fast``, ``hf`` or ``vllm``.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from alignkit.stages.common import trl_args
from alignkit.stages.rl_common import RLStageConfig, check_rl, rl_trl_args, train_with_rewards
from alignkit.core.stage import StageContext, StageResult


class Config(RLStageConfig):
    kind: str = "rloo"
    beta: float = Field(0.05, ge=0, description="KL penalty subtracted from the reward (TRL's RLOO default; "
                        "0 drops the reference model).")
    normalize_advantages: bool = Field(
        False, description="Whiten the leave-one-out advantages over the generation batch.")


def outputs(run_dir: Path) -> dict[str, str]:
    return {"model": str(run_dir / "model"), "adapter": str(run_dir / "adapter"), "dir": str(run_dir)}


def check(config: Config, base_dir: Path) -> None:
    check_rl(config, base_dir, "trl.RLOOConfig")


def run(config: Config, ctx: StageContext) -> StageResult:
    from trl import RLOOConfig, RLOOTrainer

    args = trl_args(RLOOConfig, config, ctx, **rl_trl_args(config),
                    normalize_advantages=config.normalize_advantages)
    return train_with_rewards(config, ctx, RLOOTrainer, args)
