"""Rewards: reward programs (:mod:`~alignkit.rewards.programs`), the checks every reward value passes
(:mod:`~alignkit.rewards.values`), grading a file (:mod:`~alignkit.rewards.grading`), the trained scorers
(reward model: :mod:`~alignkit.rewards.reward_model`; process reward model: :mod:`~alignkit.rewards.prm`) and
reward-hacking signals (:mod:`~alignkit.rewards.hacking`).

The names users import (``from alignkit.rewards import load_reward``) are re-exported here.
"""

from alignkit.rewards.grading import GradeResult, grade_file
from alignkit.rewards.programs import (
    CombinedReward,
    RewardSpec,
    bind_reward,
    combine_rewards,
    is_model_reward,
    load_reward,
    load_rewards,
    weighted_total,
)
from alignkit.rewards.values import (
    CheckedReward,
    RewardFn,
    call_reward,
    callable_name,
    check_scores,
    check_step_scores,
    checked,
    completion_text,
    reward_name,
)

__all__ = [
    "CheckedReward", "CombinedReward", "GradeResult", "RewardFn", "RewardSpec", "bind_reward", "call_reward",
    "callable_name", "check_scores", "check_step_scores", "checked", "combine_rewards", "completion_text",
    "grade_file", "is_model_reward", "load_reward", "load_rewards", "reward_name", "weighted_total",
]
