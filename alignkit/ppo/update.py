"""The PPO update: advantages, mini-batches, the clipped losses, gradient sync across processes, early stop.

One rollout of ``B`` samples per process is reused for ``ppo_epochs`` passes. Each pass shuffles it into
``num_mini_batches`` mini-batches (one optimizer step each), and each mini-batch runs as ``grad_accum``
micro-batches of ``batch_size`` samples (one forward/backward each). Shapes: (B, R) per-token tensors.

Loss scaling: every micro-batch's token-mean losses are rescaled by ``tokens in micro-batch / tokens in the
whole mini-batch over all processes``, and gradients are summed (not averaged) across processes, so an
optimizer step follows the exact token-mean loss of the global mini-batch however it was split (see
:func:`alignkit.maths.aggregate_loss`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import torch
from torch import Tensor

from alignkit.maths import explained_variance, gae, masked_mean, masked_whiten, ppo_policy_loss, ppo_value_loss
from alignkit.ppo.hyper import PPOHyper
from alignkit.ppo.logprobs import sequence_logps, sequence_values
from alignkit.ppo.rollout import Rollout


def advantages_and_returns(rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float, lam: float,
                           whiten: bool) -> tuple[Tensor, Tensor]:
    """GAE advantages (whitened over the masked tokens when ``whiten``) and value targets, (B, R) each.

    Returns are computed before whitening (R = A + V), as in TRL's PPOTrainer and OpenRLHF; whitening needs
    at least two masked tokens.
    """
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    if whiten and int(mask.sum()) >= 2:  # one token has no variance to divide by; leave it unwhitened
        advantages = masked_whiten(advantages, mask)
    return advantages, returns


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def _collective_device() -> torch.device:
    """Where a collective's tensor must live: NCCL reduces CUDA tensors only, gloo CPU ones."""
    if "nccl" in str(torch.distributed.get_backend()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: Tensor) -> Tensor:
    """Sum a tensor over processes, returned on its own device (unchanged in a single process)."""
    if world_size() > 1:
        work = values.to(_collective_device(), copy=True)
        torch.distributed.all_reduce(work, op=torch.distributed.ReduceOp.SUM)
        values = work.to(values.device)
    return values


def sync_gradients(params: list[Tensor]) -> None:
    """Sum the gradients of ``params`` over processes, in one flat all-reduce.

    We do not wrap the models in DistributedDataParallel: PPO runs several differently shaped forwards
    (sampling, reference, value) per step, and only LoRA weights train, so one explicit reduction of their
    gradients is simpler and as fast. A parameter without a gradient contributes zeros, so every process
    reduces the same flat buffer.
    """
    if world_size() == 1:
        return
    # float32 buffer: a bf16 score head and float32 LoRA weights share one reduction
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).float().reshape(-1) for p in params])
    flat = all_reduce_sum(flat)
    offset = 0
    for p in params:
        size = p.numel()
        p.grad = flat[offset: offset + size].view_as(p).to(p.dtype)
        offset += size


def micro_step(policy: Any, value_model: Any, micro: Rollout, hyper: PPOHyper, scale: float) -> dict[str, float]:
    """Forward and backward of one micro-batch; returns its stats (floats, token-weighted by the caller).

    ``scale`` = this micro-batch's tokens / the global mini-batch's tokens (module docstring).

    The policy and the value model share no parameters, so the gradient of ``pg_loss + vf_coef * vf_loss``
    is the two backwards run one after the other: the policy's graph is freed before the value model's
    forward, and activation memory peaks at one backbone's instead of both at once.
    """
    input_ids, attention_mask = micro.inputs()
    mask = micro.response_mask
    logps, _ = sequence_logps(policy, input_ids, attention_mask, mask, temperature=hyper.temperature,
                              chunk_tokens=hyper.logits_chunk_tokens)
    pg_loss, pg_stats = ppo_policy_loss(logps, micro.old_logps, micro.advantages, mask, hyper.epsilon)
    (pg_loss * scale).backward()
    values = sequence_values(value_model, input_ids, attention_mask, mask)
    vf_loss, vf_stats = ppo_value_loss(values, micro.old_values, micro.returns, mask, hyper.value_epsilon)
    (hyper.vf_coef * vf_loss * scale).backward()
    with torch.no_grad():
        error = masked_mean((values - micro.returns).abs(), mask)
    return {"policy/loss": pg_loss.item(), "policy/clipfrac": pg_stats["clipfrac"].item(),
            "policy/approx_kl": pg_stats["approx_kl"].item(), "policy/ratio_mean": pg_stats["ratio_mean"].item(),
            "value/loss": vf_loss.item(), "value/clipfrac": vf_stats["clipfrac"].item(),
            "value/abs_error": error.item()}


def clip_and_step(optimizer: Any, groups: list[list[Tensor]], max_grad_norm: float | None) -> list[float]:
    """Sync gradients, clip each group (policy, value) to ``max_grad_norm`` separately, step, zero grads.

    Returns each group's gradient norm before clipping.
    """
    norms = []
    for params in groups:
        sync_gradients(params)
        limit = max_grad_norm if max_grad_norm is not None else math.inf
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, limit)))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norms


def mini_batches(n: int, count: int, generator: torch.Generator) -> list[Tensor]:
    """A shuffled split of ``range(n)`` into exactly ``count`` index tensors (the last ones may be empty).

    Always ``count`` of them, so every process takes the same number of optimizer steps (and meets the same
    collectives) even when its rollout lost rows to unscorable samples.
    """
    order = torch.randperm(n, generator=generator)
    size = max(-(-n // count), 1)
    pieces = list(order.split(size))
    return pieces + [order[:0]] * (count - len(pieces))


def ppo_update(policy: Any, value_model: Any, optimizer: Any, rollout: Rollout, hyper: PPOHyper,
               groups: list[list[Tensor]], generator: torch.Generator) -> dict[str, float]:
    """``ppo_epochs`` passes over ``rollout`` in shuffled mini-batches; stops early on KL (``target_kl``).

    After each optimizer step the mini-batch's approximate KL(pi_old || pi) (k3, averaged over processes)
    is compared with ``1.5 * target_kl`` (Spinning Up's rule); past it, the remaining updates of this
    rollout are skipped on every process. Returns token-weighted means of the micro-batch stats plus
    ``ppo/updates`` (optimizer steps taken) and ``ppo/early_stopped``.
    """
    sums: dict[str, float] = defaultdict(float)
    weight, updates, stopped = 0.0, 0, False
    for _ in range(hyper.ppo_epochs):
        for index in mini_batches(len(rollout), hyper.num_mini_batches, generator):
            mini = rollout.select(index)
            mini_tokens = mini.response_mask.sum().item()
            global_tokens = all_reduce_sum(torch.tensor(float(mini_tokens), dtype=torch.float64)).item()
            if global_tokens == 0:  # every process drew an empty mini-batch: nothing to learn from
                continue
            kl_sum = 0.0
            for start in range(0, len(mini), hyper.batch_size):
                micro = mini.select(range(start, min(start + hyper.batch_size, len(mini))))
                tokens = micro.response_mask.sum().item()
                stats = micro_step(policy, value_model, micro, hyper, tokens / global_tokens)
                for key, value in stats.items():
                    sums[key] += value * tokens
                weight += tokens
                kl_sum += stats["policy/approx_kl"] * tokens
            norms = clip_and_step(optimizer, groups, hyper.max_grad_norm)
            sums["policy/grad_norm"] += norms[0] * mini_tokens
            sums["value/grad_norm"] += norms[1] * mini_tokens
            updates += 1
            mini_kl = all_reduce_sum(torch.tensor(kl_sum, dtype=torch.float64)).item() / global_tokens
            if hyper.target_kl is not None and mini_kl > 1.5 * hyper.target_kl:
                stopped = True
                break
        if stopped:
            break
    out = {key: value / weight for key, value in sums.items()} if weight else {}
    return {**out, "ppo/updates": float(updates), "ppo/early_stopped": float(stopped)}


def value_stats(rollout: Rollout) -> dict[str, float]:
    """Explained variance of the rollout's values for its returns, and the mean value and return."""
    mask = rollout.response_mask
    ev = explained_variance(rollout.old_values, rollout.returns, mask)
    return {"value/explained_variance": float(ev), "value/mean": float(masked_mean(rollout.old_values, mask)),
            "value/return_mean": float(masked_mean(rollout.returns, mask))}
