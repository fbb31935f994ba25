"""PPO policy and value losses, loss reduction, entropy and explained variance.

Shapes: ``B`` sequences, ``T`` tokens, ``V`` vocabulary. Token-level functions take (B, T) tensors and a
bool ``mask`` (B, T) marking the response tokens; they return a scalar loss and a dict of detached 0-d
tensor stats (not floats: converting would force a device sync per call; the logger does it once).
"""

from __future__ import annotations

import torch
from torch import Tensor

from alignkit.maths.advantages import _check_mask, masked_mean, masked_var
from alignkit.maths.kl import kl_estimate

LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")


def aggregate_loss(
    per_token_loss: Tensor, mask: Tensor, how: str = "token-mean", normalizer: float | Tensor | None = None
) -> Tensor:
    """Reduce a (B, T) per-token loss to a scalar over the masked-in tokens.

    ``token-mean``: sum over all tokens / number of tokens (DAPO, Yu et al. 2025): every token weighs the
    same, so long responses are not down-weighted.
    ``seq-mean-token-sum``: per-sequence sum, mean over sequences (Dr. GRPO uses a constant normaliser).
    ``seq-mean-token-mean``: per-sequence mean, mean over sequences (the GRPO paper): a token of a short
    answer weighs more than one of a long answer. Sequences with no masked-in token are left out.

    Why token-level is invariant to data-parallel sharding: with ``token-mean`` each token's weight is
    1 / (number of tokens), whatever other sequences share its micro-batch. Pass ``normalizer`` = the
    token count of the whole global batch (summed over ranks and accumulation steps) and the sum of the
    shard losses is exactly the full-batch loss, however the sequences were split. Sequence-level means
    give a token a weight that depends on its shard's sequence count, and so on how the batch was cut.
    """
    _check_mask(per_token_loss, mask)
    kept = torch.where(mask, per_token_loss, torch.zeros_like(per_token_loss))
    if how == "token-mean":
        return kept.sum() / (mask.sum() if normalizer is None else normalizer)
    if normalizer is not None:
        raise ValueError(f"normalizer is only used with how='token-mean', not {how!r}")
    has_tokens = mask.any(dim=-1)  # (B,)
    if how == "seq-mean-token-sum":
        per_seq = kept.sum(dim=-1)  # (B,)
    elif how == "seq-mean-token-mean":
        per_seq = kept.sum(dim=-1) / mask.sum(dim=-1).clamp(min=1)  # (B,); empty rows are dropped below
    else:
        raise ValueError(f"how must be one of {', '.join(LOSS_AGGREGATIONS)}; got {how!r}")
    return per_seq[has_tokens].mean()


def ppo_policy_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float,
    how: str = "token-mean",
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017, arXiv:1707.06347, eq. 7), negated to be minimised.

        ratio_t = exp(logp_t - old_logp_t)
        loss_t  = max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - clip_eps, 1 + clip_eps))

    All inputs (B, T); reduced over ``mask`` with :func:`aggregate_loss` (``how``). Stats, over masked
    tokens: ``clipfrac`` (share of tokens where the clipped term is the larger, i.e. has zero gradient),
    ``approx_kl`` (k3 estimate of KL(pi_old || pi), the tokens being sampled from pi_old),
    ``ratio_mean``.
    """
    _check_mask(logps, mask)
    ratio = torch.exp(logps - old_logps)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    loss = aggregate_loss(torch.maximum(unclipped, clipped), mask, how)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(logps.dtype), mask),
            "approx_kl": masked_mean(kl_estimate(old_logps, logps, "k3"), mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


def ppo_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_eps: float,
    how: str = "token-mean",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss of PPO implementations (baselines' ppo2; Ziegler et al. 2019's lm-human-prefs).

        V_clip = old_V + clip(V - old_V, -clip_eps, clip_eps)
        loss_t = 0.5 * max((V - R)^2, (V_clip - R)^2)

    All inputs (B, T). ``clip_eps`` is in the units of the value (not a ratio). Stat ``clipfrac``: share
    of masked tokens where the clipped error is the larger.
    """
    _check_mask(values, mask)
    clipped_values = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    unclipped_err = (values - returns) ** 2
    clipped_err = (clipped_values - returns) ** 2
    loss = aggregate_loss(0.5 * torch.maximum(unclipped_err, clipped_err), mask, how)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped_err > unclipped_err).to(values.dtype), mask)}
    return loss, stats


def entropy_from_logits(logits: Tensor, chunk_rows: int = 1024) -> Tensor:
    """Entropy of the softmax over the last dim: (..., V) -> (...). Same quantity as TRL's
    ``trl.trainer.utils.entropy_from_logits`` (checked against it in tests/test_maths.py).

        H = -sum_v p_v * log p_v,   log p = log_softmax(l)

    Not ``logsumexp(l) - sum_v p_v * l_v``: for a peaked distribution both terms are near max(l) and
    their float32 difference loses ~1e-5 (1e-4 at V = 50k), while log p stays small where p is not.
    Processed ``chunk_rows`` rows (flattened leading dims) at a time, in at least float32 per chunk
    (bf16 softmax loses ~2 digits; float64 stays float64): the float32 softmax of a whole (B, T, V)
    batch is often larger than the logits themselves (bf16 logits of 8 x 2048 x 150k are 5 GB; their
    float32 softmax 10 GB). Chunking bounds that peak under ``no_grad``; with autograd each chunk's
    softmax is kept for backward anyway. A ``-inf`` logit gives NaN (0 * -inf), as in TRL.
    """
    flat = logits.reshape(-1, logits.shape[-1])  # (N, V)
    dtype = torch.promote_types(logits.dtype, torch.float32)
    out = []
    for chunk in flat.split(chunk_rows):
        logp = torch.log_softmax(chunk.to(dtype), dim=-1)
        out.append(-(logp.exp() * logp).sum(dim=-1))
    entropy = torch.cat(out) if out else flat.new_zeros(0, dtype=dtype)
    return entropy.reshape(logits.shape[:-1])


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """How much of the returns' variance the value head explains, over masked tokens (a 0-d tensor).

        EV = 1 - Var[R - V] / Var[R]

    1 is perfect, 0 is no better than predicting the mean return, < 0 is worse. NaN (or inf) when the
    returns have zero variance. Biased variances: the (n - 1) factors cancel in the ratio.
    """
    residual_var = masked_var(returns - values, mask, unbiased=False)
    return 1.0 - residual_var / masked_var(returns, mask, unbiased=False)
