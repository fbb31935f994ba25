"""The hyper-parameters PPO's phases read, as one small frozen object.

The ``ppo`` stage builds it once from its ``Config`` (:func:`alignkit.stages.ppo.hyper_from_config`, the only
place that maps config field names to these), and the phases of :mod:`alignkit.ppo` take it instead of the
stage config. The KL coefficient is not here: it changes during training and lives in the KL controller.
"""

from __future__ import annotations

import dataclasses
from typing import Literal


@dataclasses.dataclass(frozen=True)
class PPOHyper:
    # identity and seeding: the name in a TrainingDiverged error; the seed of prompt order, sampling, shuffles
    name: str
    seed: int
    # sampling: prompts per process and step, responses per prompt, how prompts are rendered and sampled
    prompts_per_step: int
    num_generations: int
    chat: bool
    max_completion_length: int
    temperature: float  # also divides the logits when log-probs are recomputed
    stop: tuple[str, ...]
    # rewards: penalty for responses cut at the length limit; the per-token KL estimate in the reward
    missing_eos_penalty: float | None
    kl_estimator: Literal["k1", "k3"]
    # advantages (GAE)
    gamma: float
    lam: float
    whiten_advantages: bool
    # forwards: samples per forward/backward (experience pass and micro-batches); response tokens whose
    # full-vocabulary logits exist at once
    batch_size: int
    logits_chunk_tokens: int
    # update: passes and optimizer steps per rollout, clipped losses, gradient clipping, early stop on KL
    ppo_epochs: int
    num_mini_batches: int
    epsilon: float
    value_epsilon: float
    vf_coef: float
    max_grad_norm: float | None
    target_kl: float | None
