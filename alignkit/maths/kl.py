"""Per-token KL estimators and KL-coefficient controllers.

The estimators are Schulman's (http://joschu.net/blog/kl-approx.html): with tokens sampled from the policy
pi, ``log r = ref_logp - logp`` is a one-sample view of ``log(pi_ref / pi)`` and each ``k`` below is a
per-token estimate of KL(pi || pi_ref) = E_pi[-log r].
"""

from __future__ import annotations

import torch
from torch import Tensor

KL_KINDS = ("k1", "k2", "k3")


def kl_estimate(logps: Tensor, ref_logps: Tensor, kind: str, log_ratio_clamp: float | None = None) -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the sampled tokens' log-probs, same shape as the input.

    ``logps``: log pi(token) under the policy the tokens were sampled from, e.g. (B, T);
    ``ref_logps``: the reference model's log-probs of the same tokens, same shape. No mask is applied:
    reduce with ``masked_mean``. ``log_ratio_clamp``, if set, clamps ``log r`` to ``[-c, c]`` first
    (k3's exp overflows for very negative log-ratios); off by default, so nothing is clipped silently.
    """
    if logps.shape != ref_logps.shape:
        raise ValueError(f"logps shape {tuple(logps.shape)} != ref_logps shape {tuple(ref_logps.shape)}")
    log_r = ref_logps - logps  # log(pi_ref / pi)
    if log_ratio_clamp is not None:
        log_r = log_r.clamp(-log_ratio_clamp, log_ratio_clamp)
    if kind == "k1":
        # k1 = -log r: unbiased, high variance, negative on some tokens.
        return -log_r
    if kind == "k2":
        # k2 = (log r)^2 / 2: biased (it estimates an f-divergence equal to KL to second order), low
        # variance, always >= 0.
        return 0.5 * log_r * log_r
    if kind == "k3":
        # k3 = (r - 1) - log r: unbiased (E_pi[r] = 1) and >= 0 (log r <= r - 1), lower variance than k1.
        return torch.expm1(log_r) - log_r
    raise ValueError(f"kind must be one of {', '.join(KL_KINDS)}; got {kind!r}")


class FixedKLController:
    """A constant KL coefficient ``value``; ``update`` does nothing (it exists to match the adaptive one)."""

    def __init__(self, kl_coef: float) -> None:
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op."""


class AdaptiveKLController:
    """Proportional controller steering the measured KL toward ``target`` (Ziegler et al. 2019,
    arXiv:1909.08593, sec. 2.2):

        e_t      = clip(KL_t / target - 1, -max_error, max_error)
        beta_t+1 = beta_t * (1 + K_beta * e_t),    K_beta = n_steps / horizon

    ``n_steps`` is the number of samples (or steps) since the last update, so the coefficient moves by
    at most ``max_error`` (0.2 in the paper) per ``horizon`` samples, however often it is updated.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float, max_error: float = 0.2) -> None:
        if init_kl_coef <= 0 or target <= 0 or horizon <= 0 or max_error <= 0:
            raise ValueError(
                "init_kl_coef, target, horizon and max_error must all be > 0; got "
                f"{init_kl_coef}, {target}, {horizon}, {max_error}"
            )
        self.value, self.target, self.horizon, self.max_error = init_kl_coef, target, horizon, max_error

    def update(self, current_kl: float, n_steps: int) -> None:
        """Multiply ``value`` by ``1 + clip(current_kl / target - 1) * n_steps / horizon``.

        Raises ValueError if ``n_steps`` is negative or so large (``> horizon / max_error``) that the
        multiplier could reach 0 or below: update more often than that.
        """
        if not 0 <= n_steps * self.max_error < self.horizon:
            limit = self.horizon / self.max_error
            raise ValueError(f"n_steps must be in [0, horizon / max_error) = [0, {limit}), got {n_steps}")
        error = min(max(current_kl / self.target - 1.0, -self.max_error), self.max_error)
        self.value *= 1.0 + error * n_steps / self.horizon
