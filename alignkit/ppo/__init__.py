"""Actor-critic PPO for language models, as small functions the ``ppo`` stage calls step by step.

- :mod:`~alignkit.ppo.hyper`: the hyper-parameters the phases read (built once by the stage).
- :mod:`~alignkit.ppo.rollout`: which prompts a step samples, sampling, packing into (B, P + R) tensors.
- :mod:`~alignkit.ppo.logprobs`: sampled tokens' log-probs (chunked; no full-vocabulary batch logits) and values.
- :mod:`~alignkit.ppo.rewards`: KL penalty, sequence scores on the last token, PRM step scores on step ends.
- :mod:`~alignkit.ppo.update`: GAE, mini-batches, clipped losses, gradient sync, early stop on KL.
- :mod:`~alignkit.ppo.loop`: one PPO step as named phases.
- :mod:`~alignkit.ppo.checkpoint`: save and resume (adapters, optimizer, KL coefficient, random states).

The maths (GAE, whitening, KL estimators, losses) lives in :mod:`alignkit.maths`; the stage, its config and
the list of departures from the papers and from TRL 1.12's PPOTrainer in :mod:`alignkit.stages.ppo`.
"""

from alignkit.ppo.hyper import PPOHyper
from alignkit.ppo.loop import PPOModels, RewardSources, ppo_step
from alignkit.ppo.rewards import locate_steps, place_rewards, step_positions

__all__ = ["PPOHyper", "PPOModels", "RewardSources", "locate_steps", "place_rewards", "ppo_step", "step_positions"]
