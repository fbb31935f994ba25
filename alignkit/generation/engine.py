"""The generation interface every generating stage uses: sampling parameters, completions, engines.

Stages (Math-Shepherd labelling, eval, DPO pair-making, PPO/GRPO rollouts, constitutional AI) call
``engine.generate(prompts, params)`` and never touch ``model.generate`` themselves, so one recipe field,
``generation: {backend: fast, batch_size: 64}``, picks how every stage generates.

Backends (the ``generation:`` block picks one, :mod:`alignkit.generation.spec` builds it):

- ``hf`` (:mod:`alignkit.generation.hf`): ``model.generate``; the reference the others are tested against.
- ``fast`` (:mod:`alignkit.generation.fast`): our decode loop: each distinct prompt is prefilled once and
  its KV cache copied to its ``n`` samples, finished rows leave the batch and queued prompts take their
  slots. Falls back to ``hf`` (with a one-line warning) for models it does not support.
- ``openai`` (:mod:`alignkit.generation.openai`): an OpenAI-compatible ``/completions`` server (vLLM,
  SGLang, ``transformers serve``).

Conventions shared by all backends:

1. Prompts are used as given: text is tokenized with ``add_special_tokens=False`` (apply the chat template
   first: ``tokenizer.apply_chat_template(..., tokenize=False, add_generation_prompt=True)``), token-id
   lists are used verbatim.
2. ``Completion.token_ids`` are the generated tokens only, up to and including the EOS token or the token
   that completed a stop string. ``Completion.text`` is their decoding *without* the EOS token and cut
   just before the first stop string (the stop string itself is not returned).
3. ``Completion.logprobs[i]`` is ``log_softmax(logits / temperature)[token_ids[i]]`` (temperature 0
   counts as 1) under the model's logits *before* top-k/top-p truncation: the same quantity TRL's
   GRPO/PPO trainers recompute for the policy, so old and new log-probs are comparable.
4. Progress counts completions as they finish (:func:`progress_bar`): ``fast`` when a row retires, ``hf``
   at the decode step a row reaches EOS, a stop string or ``max_new_tokens`` (not when its whole batch
   returns), ``openai`` per response.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any, Literal, Protocol

from pydantic import Field, field_validator

from alignkit.core.config import Spec
from alignkit.core.errors import DataError, GenerationError  # noqa: F401 (re-exported: backends raise it)

Backend = Literal["hf", "fast", "openai"]
FinishReason = Literal["eos", "stop", "length"]


class SamplingParams(Spec):
    """How to sample; one value per ``generate`` call, shared by all its prompts."""

    max_new_tokens: int = Field(256, gt=0, description="Most tokens generated per completion.")
    temperature: float = Field(1.0, ge=0.0, description="Softmax temperature; 0 = greedy (argmax).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass; 1 = off.")
    top_k: int = Field(0, ge=0, description="Keep the k most likely tokens; 0 = off.")
    n: int = Field(1, gt=0, description="Completions per prompt.")
    stop: list[str] = Field(
        default_factory=list,
        description="Stop strings: a row ends when its text contains one; the returned text excludes it.",
    )
    seed: int | None = Field(None, description="Seed for sampling; None = draw from torch's global RNG.")
    return_logprobs: bool = Field(False, description="Also return each generated token's log-prob.")

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, stop: list[str]) -> list[str]:
        if any(s == "" for s in stop):
            raise ValueError("stop strings must be non-empty (an empty string would end every row at once)")
        return stop


@dataclasses.dataclass
class Completion:
    """One generated continuation (see the module docstring for what exactly is included)."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    logprobs: list[float] | None = None


class Progress(Protocol):
    """A caller's progress bar (a ``tqdm`` bar, or anything with ``update(n)``) that an engine advances."""

    def update(self, n: int = 1) -> Any:
        ...


class Engine(Protocol):
    """Anything that turns prompts into completions."""

    def generate(
        self,
        prompts: list[str] | list[list[int]],
        params: SamplingParams,
        *,
        progress: bool | Progress = True,
    ) -> list[list[Completion]]:
        """Return ``params.n`` completions for each prompt: ``result[prompt][sample]``.

        ``progress``: True shows the engine's own bar, False none; a caller's bar (:class:`Progress`) is
        advanced instead, by one per finished completion, so a stage can keep one bar over many calls.
        """
        ...


# ---------------------------------------------------------------------------------------------------------
# Helpers shared by the local backends.


def encode_prompts(prompts: Sequence[str] | Sequence[Sequence[int]], tokenizer: Any) -> list[list[int]]:
    """Token ids of each prompt: text is tokenized without adding special tokens; id lists pass through."""
    if len(prompts) == 0:
        return []
    if all(isinstance(p, str) for p in prompts):
        ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    elif all(isinstance(p, (list, tuple)) for p in prompts):
        ids = [[int(t) for t in p] for p in prompts]
    else:
        raise TypeError("prompts must be all strings or all lists of token ids")
    empty = [i for i, p in enumerate(ids) if len(p) == 0]
    if empty:
        raise DataError(f"prompt(s) {empty[:5]} are empty; every prompt needs at least one token")
    return ids


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """EOS ids: the model's ``generation_config.eos_token_id`` (int or list) plus the tokenizer's EOS."""
    ids: set[int] = set()
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif eos is not None:
        ids.update(int(t) for t in eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


def pad_token_id(tokenizer: Any, eos_ids: list[int]) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]


def _first_stop(text: str, stop: Sequence[str]) -> int | None:
    """Index in ``text`` where the earliest stop string starts, or None."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(hits) if hits else None


def _stop_token_end(token_ids: list[int], tokenizer: Any, stop: Sequence[str]) -> int | None:
    """Smallest k such that ``decode(token_ids[:k])`` contains a stop string (None if none does).

    Binary search: containment only grows as tokens are appended, so O(log T) decodes.
    """
    if not stop or _first_stop(tokenizer.decode(token_ids), stop) is None:
        return None
    lo, hi = 1, len(token_ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if _first_stop(tokenizer.decode(token_ids[:mid]), stop) is None:
            lo = mid + 1
        else:
            hi = mid
    return lo


def finish_completion(
    token_ids: list[int],
    logprobs: list[float] | None,
    *,
    tokenizer: Any,
    eos_ids: Sequence[int],
    stop: Sequence[str],
) -> Completion:
    """Truncate raw generated tokens at the first EOS or completed stop string and decode them.

    Every local backend calls this on its raw rows, so truncation is identical across backends
    (e.g. HF keeps padding finished rows; our engine stops them; both end up here).
    """
    eos = set(eos_ids)
    eos_at = next((i for i, t in enumerate(token_ids) if t in eos), None)
    body = token_ids if eos_at is None else token_ids[:eos_at]
    cut, reason = (len(token_ids), "length") if eos_at is None else (eos_at + 1, "eos")
    stop_end = _stop_token_end(body, tokenizer, stop)
    if stop_end is not None:
        cut, reason, body = stop_end, "stop", body[:stop_end]
    text = tokenizer.decode(body)
    if reason == "stop":
        text = text[: _first_stop(text, stop)]
    return Completion(
        text=text,
        token_ids=list(token_ids[:cut]),
        finish_reason=reason,
        logprobs=None if logprobs is None else list(logprobs[:cut]),
    )


def copy_completion(c: Completion) -> Completion:
    """An independent copy (greedy rows are decoded once and handed out ``n`` times)."""
    return Completion(c.text, list(c.token_ids), c.finish_reason, None if c.logprobs is None else list(c.logprobs))


@contextlib.contextmanager
def inference_mode(model: Any, *, eval_mode: bool = True) -> Iterator[None]:
    """Eval mode (no dropout) and no autograd for the duration; restores the model's training flag.
    ``eval_mode=False`` keeps the model's own mode (dropout on when training: how TRL's trainers sample)."""
    import torch

    was_training = model.training
    if eval_mode:
        model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def progress_bar(total: int, *, enabled: bool | Progress, backend: str) -> contextlib.AbstractContextManager[Any]:
    """The bar a ``generate`` call advances by one per finished completion, as each one finishes (the local
    backends at the decode step a row ends, the openai backend per response).

    ``enabled`` is ``generate``'s ``progress``: a bool gives our own tqdm bar of ``total`` completions (hidden
    when False), whose rate and ETA average over the whole call (``smoothing=0``: completions finish in bursts,
    and a moving average of bursts swings); a caller's bar is handed back as it is, to be advanced, not closed.
    """
    if not isinstance(enabled, bool):
        return contextlib.nullcontext(enabled)
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="compl", desc=f"generate[{backend}]", disable=not enabled, dynamic_ncols=True,
                smoothing=0)


def bar_is_shown(bar: Any) -> bool:
    """Whether advancing ``bar`` shows anything (a disabled tqdm bar does not: skip work done only for it)."""
    return not getattr(bar, "disable", False)
