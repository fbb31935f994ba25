"""One PPO step, as named phases: sample -> experience -> score -> shape rewards -> advantages -> update.

``ppo_step`` is what the ``ppo`` stage calls once per step; every phase is a function of this package that can
be tested alone. Per-token tensors are (B, R): ``B`` samples of this process, ``R`` response tokens.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from alignkit.core.errors import TrainingDiverged
from alignkit.rewards.hacking import math_signals
from alignkit.maths import masked_mean
from alignkit.core.perf import peak_memory_gib, reset_peak_memory
from alignkit.ppo.hyper import PPOHyper
from alignkit.ppo.logprobs import sequence_logps, sequence_values
from alignkit.ppo.rewards import (
    StepScorer,
    kl_penalty,
    last_token_rewards,
    place_rewards,
    score_sequences,
    score_steps,
)
from alignkit.ppo.rollout import Rollout, sample, step_prompt_indices
from alignkit.ppo.update import advantages_and_returns, all_reduce_sum, ppo_update, value_stats, world_size


@dataclasses.dataclass
class PPOModels:
    """The trained models. The reference is ``policy`` with its adapters disabled: no second copy of weights."""

    policy: Any  # PeftModel over a causal LM
    value: Any  # PeftModel over a one-label sequence classifier (score head applied at every token)
    tokenizer: Any
    engine: Any  # alignkit.generation engine sampling from ``policy``


@dataclasses.dataclass
class RewardSources:
    """Where scores come from: a combined sequence reward (verifiers, ORMs) and/or a step scorer (PRM)."""

    sequence: Callable[..., list] | None = None
    steps: StepScorer | None = None
    step_weight: float = 1.0


@torch.no_grad()
def fill_experience(models: PPOModels, rollout: Rollout, hyper: PPOHyper) -> None:
    """Set ``old_logps``, ``entropy``, ``ref_logps`` and ``old_values`` of ``rollout``, ``batch_size`` rows
    per forward, with the same code (and dropout off) as the training forward, so the first ratios are 1."""
    shape = rollout.response_mask.shape
    fields = {name: torch.zeros(shape, device=rollout.response_ids.device) for name in
              ("old_logps", "entropy", "ref_logps", "old_values")}
    for start in range(0, len(rollout), hyper.batch_size):
        rows = list(range(start, min(start + hyper.batch_size, len(rollout))))
        part = rollout.select(rows)
        ids, attention = part.inputs()
        mask, width = part.response_mask, part.response_mask.shape[1]
        options = {"temperature": hyper.temperature, "chunk_tokens": hyper.logits_chunk_tokens}
        logps, entropy = sequence_logps(models.policy, ids, attention, mask, with_entropy=True, **options)
        with models.policy.disable_adapter():
            ref_logps, _ = sequence_logps(models.policy, ids, attention, mask, **options)
        values = sequence_values(models.value, ids, attention, mask)
        for name, value in zip(fields, (logps, entropy, ref_logps, values)):
            fields[name][rows, :width] = value
    for name, value in fields.items():
        setattr(rollout, name, value)


def score(rollout: Rollout, sources: RewardSources, rows: Sequence[dict[str, Any]], tokenizer: Any,
          missing_eos_penalty: float | None) -> tuple[list[float | None], Tensor, dict[str, float]]:
    """``(scores, step_rewards, stats)``: per-sample sequence scores (None: unscorable), PRM step rewards
    (B, R) already weighted, and score statistics, the reward-hacking signals ``hack/*`` included.

    ``rows[i]`` is sample i's dataset row: its ``prompt`` goes to the reward programs as ``prompts=`` and
    every other column under its own name. ``missing_eos_penalty`` is subtracted from the sequence score of
    responses that hit the length limit (neither EOS nor a stop string), as TRL's PPOTrainer does.
    """
    prompts = [row["prompt"] for row in rows]
    columns = {key: [row[key] for row in rows] for key in rows[0] if key != "prompt"} if rows else {}
    scores: list[float | None] = [0.0] * len(rollout)
    if sources.sequence is not None:
        scores = score_sequences(sources.sequence, prompts, rollout.texts, columns)
    stats: dict[str, float] = {}
    for env in dict.fromkeys(columns.get("env") or []):  # environments: each one's mean score in this rollout
        mine = [s for s, e in zip(scores, columns["env"]) if e == env and s is not None]
        if mine:
            stats[f"env/{env}/reward"] = sum(mine) / len(mine)
    if missing_eos_penalty:
        scores = [s if s is None or reason != "length" else s - missing_eos_penalty
                  for s, reason in zip(scores, rollout.finish_reasons)]
    step_rewards = torch.zeros(rollout.response_mask.shape, device=rollout.response_mask.device)
    if sources.steps is not None:
        token_ids = [row[mask].tolist() for row, mask in zip(rollout.response_ids, rollout.response_mask)]
        values, positions = score_steps(sources.steps, prompts, rollout.texts, token_ids, tokenizer.decode)
        weighted = [[sources.step_weight * v for v in row] for row in values]
        step_rewards = place_rewards(weighted, positions, rollout.response_mask)
        stats["reward/steps_per_response"] = sum(len(v) for v in values) / max(len(values), 1)
    stats["reward/unscored_frac"] = sum(s is None for s in scores) / max(len(scores), 1)
    # Over every sample, unscorable ones too; "rewarded" means a sequence score > 0 as paid (after the missing-EOS
    # penalty; PRM step rewards and the KL term aside): without sequence rewards there is no such signal.
    lengths = rollout.response_mask.sum(1).tolist()
    stats.update(math_signals(rollout.texts, lengths, scores if sources.sequence is not None else None))
    return scores, step_rewards, stats


def shape_rewards(rollout: Rollout, scores: Tensor, step_rewards: Tensor, beta: float, kl_kind: str) -> Tensor:
    """Per-token rewards: ``-beta * kl_t`` everywhere, plus step rewards, plus the score on the last token."""
    non_score, _ = kl_penalty(rollout.old_logps, rollout.ref_logps, rollout.response_mask, beta, kl_kind)
    return non_score + step_rewards + last_token_rewards(scores, rollout.response_mask)


def sample_step(models: PPOModels, data: Sequence[dict[str, Any]], step: int, hyper: PPOHyper, rank: int,
                device: torch.device) -> tuple[Rollout, int]:
    """Sample this process's share of step ``step``'s prompts (``num_generations`` responses each)."""
    from alignkit.generation import SamplingParams
    from alignkit.data.prompts import render_prompt

    per_process = hyper.prompts_per_step
    chosen = step_prompt_indices(step, len(data), per_process * world_size(), hyper.seed)
    mine = chosen[rank * per_process: (rank + 1) * per_process]
    texts = [render_prompt(models.tokenizer, data[i]["prompt"], chat=hyper.chat) for i in mine]
    params = SamplingParams(max_new_tokens=hyper.max_completion_length, temperature=hyper.temperature,
                            n=hyper.num_generations, stop=list(hyper.stop),
                            seed=hyper.seed + 7919 * step + 104729 * rank)
    return sample(models.engine, models.tokenizer, texts, mine, params, device)


def ppo_step(step: int, models: PPOModels, sources: RewardSources, data: Sequence[dict[str, Any]],
             optimizer: Any, groups: list[list[Tensor]], kl_controller: Any, hyper: PPOHyper, rank: int,
             device: torch.device) -> dict[str, float]:
    """Run PPO step ``step`` (0-based) on this process; returns metrics averaged over processes."""
    reset_peak_memory()
    started = time.perf_counter()
    # 1. Sample responses with the current policy.
    rollout, generated = sample_step(models, data, step, hyper, rank, device)
    sampled = time.perf_counter()
    # 2. Score them; unscorable samples (a reward program returned None) leave the batch.
    scores, step_rewards, score_stats = score(rollout, sources, [data[i] for i in rollout.prompt_rows],
                                              models.tokenizer, hyper.missing_eos_penalty)
    keep = [i for i, s in enumerate(scores) if s is not None]
    rollout = rollout.select(keep)
    step_rewards = step_rewards[keep][:, : rollout.response_mask.shape[1]]  # select() trims padding columns
    rollout.scores = torch.tensor([scores[i] for i in keep], dtype=torch.float32, device=device)
    # 3. Old log-probs, reference log-probs and values of the samples, then per-token rewards and GAE.
    fill_experience(models, rollout, hyper)
    beta = kl_controller.value
    rollout.rewards = shape_rewards(rollout, rollout.scores, step_rewards, beta, hyper.kl_estimator)
    rollout.advantages, rollout.returns = advantages_and_returns(
        rollout.rewards, rollout.old_values, rollout.response_mask, gamma=hyper.gamma, lam=hyper.lam,
        whiten=hyper.whiten_advantages)
    scored = time.perf_counter()
    # 4. PPO epochs over mini-batches (seeded per step: a resumed run shuffles as the original would).
    generator = torch.Generator().manual_seed(hyper.seed * 1_000_003 + step)
    update = ppo_update(models.policy, models.value, optimizer, rollout, hyper, groups, generator)
    # A nan/inf loss or gradient norm fails the stage at this step, before anything of it is saved (a nan loss on
    # one process makes every process's gradient norms nan: they are taken after the all-reduce).
    for key in ("policy/loss", "value/loss", "policy/grad_norm", "value/grad_norm"):
        if not math.isfinite(update.get(key, 0.0)):
            raise TrainingDiverged(hyper.name, step + 1, key, update[key])
    finished = time.perf_counter()
    # 5. The KL coefficient follows the measured KL (adaptive controller only).
    stats = rollout_stats(rollout, step_rewards, beta, hyper.kl_estimator)
    metrics = average_over_processes({**stats, **score_stats, **update}, len(rollout))
    if metrics["samples"] > 0:
        kl_controller.update(metrics["kl/sequence"], int(metrics["samples"]))
    metrics.update({
        "kl/coef": beta, "time/step_s": finished - started, "time/sample_s": sampled - started,
        "time/experience_s": scored - sampled, "time/update_s": finished - scored,
        "throughput/generated_tokens_per_s": all_reduce_sum(torch.tensor(float(generated))).item()
        / max(sampled - started, 1e-9),
        "throughput/tokens_per_s": metrics["samples"] * metrics.get("response/length", 0.0)
        / max(finished - started, 1e-9),
        "memory/peak_gib": peak_memory_gib(),
    })
    sync = getattr(models.engine, "last_sync_s", None)  # a served LoRA adapter's save + load + unload
    if sync is not None:
        metrics["time/adapter_sync_s"] = sync
    return metrics


@torch.no_grad()
def rollout_stats(rollout: Rollout, step_rewards: Tensor, beta: float, kl_kind: str) -> dict[str, float]:
    """What practitioners watch on a rollout (means over samples or tokens of this process)."""
    if len(rollout) == 0:
        return {}
    mask = rollout.response_mask
    non_score, kl = kl_penalty(rollout.old_logps, rollout.ref_logps, mask, beta, kl_kind)
    step_sum = step_rewards.sum(1)
    return {
        "reward/score": rollout.scores.mean().item(),
        "reward/step_score": step_sum.mean().item(),
        "reward/non_score": non_score.sum(1).mean().item(),
        "reward/total": (rollout.scores + step_sum + non_score.sum(1)).mean().item(),
        "kl/sequence": kl.sum(1).mean().item(),
        "kl/token": masked_mean(kl, mask).item(),
        "policy/entropy": masked_mean(rollout.entropy, mask).item(),
        "response/length": mask.sum(1).float().mean().item(),
        "response/eos_frac": sum(r != "length" for r in rollout.finish_reasons) / len(rollout),
        **(value_stats(rollout) if mask.sum() >= 2 else {}),
    }


def average_over_processes(stats: dict[str, float], samples: int) -> dict[str, float]:
    """Sample-weighted means of per-process stats; ``samples`` becomes the global sample count.

    Every process must pass the same keys (processes with no samples pass none and weigh 0).
    """
    keys = sorted(stats)
    if world_size() > 1:
        names: list[Any] = [None] * world_size()
        torch.distributed.all_gather_object(names, keys)
        keys = sorted({k for group in names for k in group})
    weighted = torch.tensor([stats.get(k, 0.0) * samples for k in keys] + [float(samples)], dtype=torch.float64)
    total = all_reduce_sum(weighted)
    count = total[-1].item()
    out = {k: (total[i].item() / count if count else float("nan")) for i, k in enumerate(keys)}
    out["samples"] = count
    return out
