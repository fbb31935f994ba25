"""Per-token rewards of a rollout: the KL penalty on every token, sequence scores on the last token, and a
process reward model's step scores on the last token of each step.

Shapes: ``B`` samples, ``R`` response tokens; masks are bool (B, R), True on generated tokens.

Reward sources (any combination, summed):

- **Sequence scores** (verifiers such as ``answer_match``, or an outcome reward model, ``model:<folder>``):
  one number per response, placed on its last token (EOS included), as in Ziegler et al. 2019.
- **Step scores** (a PRM, Math-Shepherd step-by-step PPO, arXiv:2312.08935 sec. 3.3): the response text is
  split into steps on the PRM's separator exactly as :func:`alignkit.rewards.prm.split_steps` does; step i's score
  goes on the token that completes the separator after step i, and the last step's (when no separator
  follows it) on the response's last token. 0 on every other token.
- **KL penalty**: ``-beta * kl_t`` on every token, ``kl_t`` a per-token estimate of KL(pi || pi_ref).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from alignkit.maths import kl_estimate
from alignkit.rewards.values import call_reward, check_step_scores, reward_name


class StepScorer(Protocol):
    """What a per-step reward source offers (``alignkit.rewards.prm.PRMScorer`` meets it)."""

    separator: str

    def score_batch(self, prompts: Sequence[Any], steps: Sequence[Sequence[str]]) -> list[list[float]]:
        """p_good of each step of each (prompt, steps); may return fewer scores than steps (truncation)."""
        ...


def locate_steps(text: str, separator: str) -> list[tuple[str, int]]:
    """Steps of ``text`` (as ``split_steps`` finds them) and the character index where each one's reward lands.

    A step followed by the separator ends after that separator; the last step, if no separator follows it,
    ends at ``len(text)``. Blank pieces are not steps.

    >>> locate_steps("1 + 2 = 3.\\n\\nThe answer is 3.", "\\n")
    [('1 + 2 = 3.', 11), ('The answer is 3.', 28)]
    """
    steps, start = [], 0
    pieces = text.split(separator)
    for k, piece in enumerate(pieces):
        end = start + len(piece)
        if piece.strip():
            followed = k < len(pieces) - 1
            steps.append((piece.strip(), end + len(separator) if followed else len(text)))
        start = end + len(separator)
    return steps


def token_index_for_char(token_ids: Sequence[int], decode: Callable[[list[int]], str], text: str,
                         char_end: int) -> int | None:
    """The index of the first response token by which ``text[:char_end]`` has been fully generated.

    That is ``k - 1`` for the smallest ``k`` with ``decode(token_ids[:k]).startswith(text[:char_end])``,
    found by binary search (coverage only grows as tokens are appended). Comparing decoded prefixes, never
    re-tokenized text, keeps this right when BPE merges a step's end with its separator (``".\\n"`` as one
    token) or a token holds part of a multi-byte character. None if even the full response does not cover it.
    """
    target = text[:char_end]
    if char_end <= 0:
        return 0
    if not decode(list(token_ids)).startswith(target):
        return None
    lo, hi = 1, len(token_ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if decode(list(token_ids[:mid])).startswith(target):
            hi = mid
        else:
            lo = mid + 1
    return lo - 1


def step_positions(token_ids: Sequence[int], text: str, separator: str,
                   decode: Callable[[list[int]], str]) -> tuple[list[str], list[int]]:
    """``(steps, token positions)``: each step of ``text`` and the response token its reward goes on.

    A last step with no separator after it gets the last response token (the EOS, when there is one), where
    sequence scores go too. A step whose end cannot be found in the decoded tokens (a tokenizer that does not
    decode to ``text``) also falls back to the last token.
    """
    last = len(token_ids) - 1
    steps, positions = [], []
    for step, char_end in locate_steps(text, separator):
        index = last if char_end >= len(text) else token_index_for_char(token_ids, decode, text, char_end)
        steps.append(step)
        positions.append(last if index is None else index)
    return steps, positions


def place_rewards(values: Sequence[Sequence[float]], positions: Sequence[Sequence[int]], mask: Tensor) -> Tensor:
    """Put ``values[b][i]`` at ``(b, positions[b][i])`` of a (B, R) zero tensor (sums where they coincide).

    ``values[b]`` may be shorter than ``positions[b]`` (a PRM that truncated trailing steps): extra positions
    get nothing. Raises ValueError for a position outside the response (``mask`` False there).
    """
    out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    for b, (row_values, row_positions) in enumerate(zip(values, positions)):
        for value, position in zip(row_values, row_positions):
            if not bool(mask[b, position]):
                raise ValueError(f"sample {b}: reward position {position} is outside its response")
            out[b, position] += float(value)
    return out


def last_token_rewards(scores: Tensor, mask: Tensor) -> Tensor:
    """(B,) sequence scores -> (B, R) with each score on its row's last response token, 0 elsewhere."""
    last = mask.long().sum(1) - 1  # (B,): responses are right-padded and non-empty
    out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    return out.scatter(1, last[:, None], scores.float()[:, None])


def kl_penalty(logps: Tensor, ref_logps: Tensor, mask: Tensor, beta: float, kind: str) -> tuple[Tensor, Tensor]:
    """``(non_score_rewards, kl)``: per-token ``-beta * kl_t`` and ``kl_t``, (B, R), 0 outside ``mask``.

    ``logps`` are the sampling policy's log-probs of its tokens, ``ref_logps`` the reference's; ``kind``
    k1 (``logp - ref_logp``, TRL PPO's default) or k3 (``(r - 1) - log r``, never negative).
    """
    kl = torch.where(mask, kl_estimate(logps, ref_logps, kind), torch.zeros_like(logps))
    return -beta * kl, kl


def score_sequences(reward_fn: Callable[..., list], prompts: Sequence[Any], texts: Sequence[str],
                    columns: dict[str, list]) -> list[float | None]:
    """One score per response from a TRL-convention reward function (None: the response cannot be scored);
    anything but a finite number or None is a RewardError (NaN would reach the advantages)."""
    return call_reward(reward_fn, reward_name(reward_fn), list(texts), {"prompts": list(prompts), **columns})


def score_steps(scorer: StepScorer, prompts: Sequence[Any], texts: Sequence[str],
                token_ids: Sequence[Sequence[int]], decode: Callable[[list[int]], str]
                ) -> tuple[list[list[float]], list[list[int]]]:
    """Step scores of each response and the token positions they go on (see :func:`step_positions`)."""
    located = [step_positions(ids, text, scorer.separator, decode) for ids, text in zip(token_ids, texts)]
    steps = [steps for steps, _ in located]
    scores = check_step_scores(scorer.score_batch(list(prompts), steps), steps, reward_name(scorer))
    return scores, [positions for _, positions in located]
