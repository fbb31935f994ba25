"""Pure maths shared by every stage: tensors in, tensors out; no configs, I/O or torch.distributed.

``advantages``: masked statistics, whitening, GAE.
``kl``: per-token KL estimators (k1, k2, k3) and KL-coefficient controllers.
``losses``: PPO policy and value losses, loss reduction, entropy, explained variance.
"""

import importlib

# Exported name -> its module, imported on first use: the torch-free modules (labels, selection, rntp's
# text maths) load without torch, so `--dry-run` of a recipe whose reward program uses them stays fast.
_EXPORTS = {
    "gae": "advantages", "masked_mean": "advantages", "masked_var": "advantages", "masked_whiten": "advantages",
    "AdaptiveKLController": "kl", "FixedKLController": "kl", "kl_estimate": "kl",
    "aggregate_loss": "losses", "entropy_from_logits": "losses", "explained_variance": "losses",
    "ppo_policy_loss": "losses", "ppo_value_loss": "losses",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"alignkit.maths.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'alignkit.maths' has no attribute {name!r}")


__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "aggregate_loss",
    "entropy_from_logits",
    "explained_variance",
    "gae",
    "kl_estimate",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "ppo_policy_loss",
    "ppo_value_loss",
]
