"""Rollouts: which prompts a step samples, sampling them, and packing the samples into tensors.

Layout of a packed batch (``B`` samples, ``P`` prompt width, ``R`` response width)::

    input_ids = [pad ... pad, prompt tokens | response tokens, pad ... pad]      (B, P + R)
                 <------------- P ------------><--------------- R --------------->

Prompts are left-padded and responses right-padded, so response token j of every row sits at column P + j
and is predicted by column P + j - 1 (:mod:`alignkit.ppo.logprobs`). A response holds the generated tokens up
to and including the EOS token or the token that completed a stop string (the engine's truncation).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


def step_prompt_indices(step: int, n_prompts: int, per_step: int, seed: int) -> list[int]:
    """Dataset rows sampled at PPO step ``step`` (0-based): consecutive slices of per-epoch permutations.

    Epoch e is ``randperm(n_prompts)`` seeded with ``seed + e``, so the order is a pure function of the
    step: a resumed run draws exactly the prompts the interrupted one would have.

    >>> a = step_prompt_indices(0, 5, 4, seed=0) + step_prompt_indices(1, 5, 4, seed=0)
    >>> sorted(a[:5]) == list(range(5))   # the first 5 draws are one full epoch
    True
    """
    if per_step <= 0 or n_prompts <= 0:
        raise ValueError(f"per_step and n_prompts must be > 0, got {per_step}, {n_prompts}")
    out: list[int] = []
    position = step * per_step
    while len(out) < per_step:
        epoch, offset = divmod(position, n_prompts)
        order = torch.randperm(n_prompts, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        take = order[offset: offset + per_step - len(out)]
        out += take
        position += len(take)
    return out


@dataclasses.dataclass
class Rollout:
    """A batch of sampled responses with the tensors the PPO update reads (all on one device).

    ``query_ids`` (B, P) left-padded prompts and ``query_mask`` (B, P) bool; ``response_ids`` (B, R)
    right-padded responses and ``response_mask`` (B, R) bool. Filled in later by the experience pass:
    ``old_logps``, ``ref_logps``, ``old_values``, ``rewards``, ``advantages``, ``returns`` (B, R) and
    ``scores`` (B,). ``texts``/``finish_reasons``/``prompt_rows`` are per sample (prompt_rows: dataset row
    index of each sample's prompt).
    """

    query_ids: Tensor
    query_mask: Tensor
    response_ids: Tensor
    response_mask: Tensor
    texts: list[str]
    finish_reasons: list[str]
    prompt_rows: list[int]
    old_logps: Tensor | None = None
    ref_logps: Tensor | None = None
    old_values: Tensor | None = None
    entropy: Tensor | None = None
    rewards: Tensor | None = None
    advantages: Tensor | None = None
    returns: Tensor | None = None
    scores: Tensor | None = None

    def __len__(self) -> int:
        return self.response_ids.shape[0]

    def inputs(self) -> tuple[Tensor, Tensor]:
        """``(input_ids, attention_mask)`` of prompt + response, (B, P + R) each."""
        ids = torch.cat([self.query_ids, self.response_ids], dim=1)
        mask = torch.cat([self.query_mask, self.response_mask], dim=1).long()
        return ids, mask

    def select(self, index: Sequence[int] | Tensor) -> Rollout:
        """The rows in ``index``, with columns that are padding in every selected row cut off."""
        index = torch.as_tensor(index, dtype=torch.long)
        q_mask, r_mask = self.query_mask[index], self.response_mask[index]
        first = int(q_mask.any(0).long().argmax())  # first prompt column any selected row uses
        width = max(int(r_mask.sum(1).max()), 1) if len(index) else 1
        fields = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, Tensor) and value.dim() == 2:
                value = value[index][:, first:] if field.name.startswith("query") else value[index][:, :width]
            elif isinstance(value, Tensor):
                value = value[index]
            elif isinstance(value, list):
                value = [value[i] for i in index.tolist()]
            fields[field.name] = value
        return Rollout(**fields)


def pack(prompt_ids: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int, *,
         texts: Sequence[str], finish_reasons: Sequence[str], prompt_rows: Sequence[int],
         device: torch.device | str = "cpu") -> Rollout:
    """Left-pad prompts and right-pad responses (``pad_id``) into a :class:`Rollout`.

    ``prompt_ids[i]`` and ``responses[i]`` are sample i's prompt and generated token ids (a prompt appears
    once per sample). Every response must have at least one token.
    """
    if not len(prompt_ids) == len(responses) == len(texts) == len(finish_reasons) == len(prompt_rows):
        raise ValueError("prompt_ids, responses, texts, finish_reasons and prompt_rows must be equally long")
    if any(len(r) == 0 for r in responses):
        raise ValueError("every response needs at least one token")
    width, length = max(len(p) for p in prompt_ids), max(len(r) for r in responses)
    query = torch.full((len(responses), width), pad_id, dtype=torch.long)
    response = torch.full((len(responses), length), pad_id, dtype=torch.long)
    query_mask = torch.zeros(query.shape, dtype=torch.bool)
    response_mask = torch.zeros(response.shape, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompt_ids, responses)):
        query[i, width - len(p):], query_mask[i, width - len(p):] = torch.tensor(list(p)), True
        response[i, : len(r)], response_mask[i, : len(r)] = torch.tensor(list(r)), True
    return Rollout(query.to(device), query_mask.to(device), response.to(device), response_mask.to(device),
                   list(texts), list(finish_reasons), list(prompt_rows))


def sample(engine: Any, tokenizer: Any, prompt_texts: Sequence[str], prompt_rows: Sequence[int], params: Any,
           device: torch.device | str) -> tuple[Rollout, int]:
    """Sample ``params.n`` responses per prompt with a generation engine and pack them (prompt-major).

    Returns the rollout and the number of generated tokens. Prompts are tokenized exactly as the engine
    tokenizes them (no special tokens added), so the packed prompt is the one that was sampled from.
    """
    prompt_ids = tokenizer(list(prompt_texts), add_special_tokens=False)["input_ids"]
    outputs = engine.generate(prompt_ids, params, progress=False)
    rows = [(p, row, c) for p, row, samples in zip(prompt_ids, prompt_rows, outputs) for c in samples]
    rollout = pack([p for p, _, _ in rows], [c.token_ids for _, _, c in rows], tokenizer.pad_token_id,
                   texts=[c.text for _, _, c in rows], finish_reasons=[c.finish_reason for _, _, c in rows],
                   prompt_rows=[row for _, row, _ in rows], device=device)
    return rollout, sum(len(c.token_ids) for _, _, c in rows)
