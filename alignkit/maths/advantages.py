"""Masked statistics, whitening and GAE: tensors in, tensors out.

Shapes: ``B`` sequences, ``T`` tokens. Masks are bool ``(B, T)`` tensors, True on the response tokens
the policy generated (the "actions").

Departure from the paper: :func:`gae` skips masked positions instead of treating them as zero-reward
steps, so a hole in the mask (tool output inside a response) is not a time step and is not discounted
over.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check_mask(x: Tensor, mask: Tensor) -> None:
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
    if mask.shape != x.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != tensor shape {tuple(x.shape)}")


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over the entries where ``mask`` is True, over all entries or along ``dim``.

        mean = sum(x * m) / sum(m)

    ``x``, ``mask``: same shape. An all-False mask (or row, with ``dim``) gives NaN (0 / 0): there is no
    mean to report, and a silent 0 would hide the bug.
    """
    _check_mask(x, mask)
    # where, not x * mask: a NaN or inf at a padded position must not leak into the sum (inf * 0 = nan).
    total = torch.where(mask, x, torch.zeros_like(x))
    count = mask.sum() if dim is None else mask.sum(dim)
    return (total.sum() if dim is None else total.sum(dim)) / count


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of the masked entries of ``x`` (a 0-d tensor).

        var = sum(m * (x - mean)^2) / (n - 1 if unbiased else n),   n = sum(m)

    Raises ValueError when ``n`` is 0, or 1 with ``unbiased`` (this check costs a device sync).
    """
    _check_mask(x, mask)
    n = int(mask.sum().item())
    if n < (2 if unbiased else 1):
        raise ValueError(f"masked_var needs at least {2 if unbiased else 1} masked entries, got {n}")
    centered = x - masked_mean(x, mask)
    var = masked_mean(centered * centered, mask)
    return var * n / (n - 1) if unbiased else var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise the masked entries of ``x`` to mean 0 and variance 1 (unbiased); masked-out entries are 0.

        whiten(x) = (x - mean) / sqrt(var + eps)          (+ mean again if not shift_mean)

    ``shift_mean=False`` only rescales, keeping the mean: PPO implementations do this to rewards, whose
    sign carries meaning, and the full whitening to advantages.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask, unbiased=True)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, torch.zeros_like(whitened))


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, arXiv:1506.02438, eq. 16).

    ``rewards``, ``values``, ``mask``: (B, T); ``rewards[b, t]`` is the reward for token t (the KL penalty
    per token plus the sequence score on the last token, in RLHF PPO). Returns ``(advantages, returns)``,
    both (B, T) and 0 where ``mask`` is False. Over the masked-in tokens t_1 < t_2 < ... of a sequence:

        delta_k = r_{t_k} + gamma * V(t_{k+1}) - V(t_k)
        A(t_k)  = delta_k + gamma * lam * A(t_{k+1})   = sum_l (gamma * lam)^l * delta_{k+l}
        R(t_k)  = A(t_k) + V(t_k)                       (the value target)

    Bootstrap convention: the last masked-in token is terminal, ``V(after it) = 0`` and ``A(after it) = 0``.
    A response ends at EOS, or is truncated and then scored as if it had ended; we never bootstrap from
    the value of a state past the last token. Masked-out positions are skipped (values and rewards there
    are ignored, and no discount is applied across them).
    """
    _check_mask(rewards, mask)
    _check_mask(values, mask)
    if values.shape[1] == 0:  # no tokens: nothing to estimate (and nothing to stack below)
        return torch.zeros_like(values), torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])  # (B,): V of the next masked-in token, 0 past the end
    next_adv = torch.zeros_like(values[:, 0])  # (B,)
    columns: list[Tensor] = []  # advantages, last token first
    for t in reversed(range(values.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        columns.append(torch.where(m, adv, torch.zeros_like(adv)))
        # carry the state over masked-out positions unchanged, so they are not time steps
        next_value = torch.where(m, values[:, t], next_value)
        next_adv = torch.where(m, adv, next_adv)
    advantages = torch.stack(columns[::-1], dim=1)  # (B, T)
    returns = torch.where(mask, advantages + values, torch.zeros_like(values))
    return advantages, returns
