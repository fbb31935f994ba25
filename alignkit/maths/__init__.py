"""Pure maths shared by every stage: tensors in, tensors out; no configs, I/O or torch.distributed.

``advantages``: masked statistics, whitening, GAE, group baselines (GRPO, RLOO).
``kl``: per-token KL estimators (k1, k2, k3) and KL-coefficient controllers.
``losses``: PPO policy and value losses, loss reduction, entropy, explained variance, DPO-family losses.
"""

from alignkit.maths.advantages import (
    gae,
    group_advantages,
    masked_mean,
    masked_var,
    masked_whiten,
    rloo_advantages,
)
from alignkit.maths.kl import AdaptiveKLController, FixedKLController, kl_estimate
from alignkit.maths.losses import (
    aggregate_loss,
    dpo_loss,
    entropy_from_logits,
    explained_variance,
    ppo_policy_loss,
    ppo_value_loss,
)

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "aggregate_loss",
    "dpo_loss",
    "entropy_from_logits",
    "explained_variance",
    "gae",
    "group_advantages",
    "kl_estimate",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "ppo_policy_loss",
    "ppo_value_loss",
    "rloo_advantages",
]
