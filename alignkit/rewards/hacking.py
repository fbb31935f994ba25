r"""Reward-hacking signals of one RL batch: what the RL stages log per step beside the reward.

A rising reward says the policy earns more; these say *how*. Each is a plain number per batch, from the
completions' text, their token counts and (for one) the rewards the trainer paid:

``hack/completion_tokens``
    Mean length of the completions in tokens (the generated ids, EOS included when one was generated).
``hack/no_answer_frac``
    Share of completions with no final answer: the extractor (``reward/math.py:extract_answer``: the last
    ``\boxed{}``, "the answer is ...", ``#### N``) finds no phrase, or a blank one.
``hack/rewarded_not_plain_frac``
    Among *rewarded* completions (total reward > 0; a None reward is not rewarded), the share whose answer
    phrase does not state one plain number (``reward/math.py:plain_number`` gives None, or there is no
    phrase). 0.0 when nothing was rewarded (nothing was paid, so nothing was paid for the wrong thing).
    With the strict verifier alone on plain-number golds it stays 0 (``answer_match`` pays only a phrase
    stating the gold number); above 0, some reward term pays completions that do not state a number.
``hack/repeated_ngram_frac``
    Per completion, the share of its word n-grams (whitespace-split, n = 4) that repeat an earlier n-gram
    of the same completion; averaged over completions (one with fewer than n words counts 0).

Plain Python on lists (no torch): a trainer calls :func:`hacking_signals` with its own extractor; the
math stages use :func:`math_signals`. How to read the numbers: ``docs/grpo.md``, "Watching for reward hacking".
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

NGRAM = 4
#: The prefix of every signal's name in the stages' logs.
PREFIX = "hack/"


def repeated_ngram_frac(text: str, n: int = NGRAM) -> float:
    """Share of the word n-grams of ``text`` that repeat an earlier n-gram of it; 0.0 with fewer than n words.

    >>> repeated_ngram_frac("a b a b a b", n=2)   # ab ba ab ba ab: the last three repeat
    0.6
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    seen: set[tuple[str, ...]] = set()
    repeats = 0
    for gram in grams:
        repeats += gram in seen
        seen.add(gram)
    return repeats / len(grams) if grams else 0.0


def hacking_signals(texts: Sequence[str], token_lengths: Sequence[int], rewards: Sequence[float | None] | None = None,
                    *, extract: Callable[[str], str | None], plain: Callable[[str], Any] | None = None,
                    n: int = NGRAM) -> dict[str, float]:
    """The signals of one batch (definitions in the module docstring); ``{}`` for an empty batch.

    ``extract(text)`` gives a completion's answer phrase (None: none). ``hack/rewarded_not_plain_frac`` is
    computed only when both ``rewards`` and ``plain`` (phrase -> value, None when not one plain number) are
    given: a stage whose answers are not numbers (rntp) passes no ``plain``.

    >>> extract = lambda t: t.split("=")[-1].strip() if "=" in t else None
    >>> plain = lambda p: int(p) if p.isdigit() else None
    >>> hacking_signals(["x = 4", "x = 2+2", "no idea"], [3, 5, 4], [1.0, 0.5, None], extract=extract, plain=plain)
    ... # doctest: +NORMALIZE_WHITESPACE
    {'hack/completion_tokens': 4.0, 'hack/no_answer_frac': 0.3333333333333333,
     'hack/repeated_ngram_frac': 0.0, 'hack/rewarded_not_plain_frac': 0.5}
    """
    if len(token_lengths) != len(texts) or (rewards is not None and len(rewards) != len(texts)):
        raise ValueError(f"need one token length and reward per text: {len(texts)} texts, {len(token_lengths)} "
                         f"lengths, {None if rewards is None else len(rewards)} rewards")
    if not texts:
        return {}
    phrases = [extract(text) for text in texts]
    count = len(texts)
    signals = {
        PREFIX + "completion_tokens": sum(token_lengths) / count,
        PREFIX + "no_answer_frac": sum(p is None or not p.strip() for p in phrases) / count,
        PREFIX + "repeated_ngram_frac": sum(repeated_ngram_frac(text, n) for text in texts) / count,
    }
    if rewards is not None and plain is not None:
        paid = [p for p, r in zip(phrases, rewards) if r is not None and r > 0]
        not_plain = sum(p is None or plain(p) is None for p in paid)
        signals[PREFIX + "rewarded_not_plain_frac"] = not_plain / len(paid) if paid else 0.0
    return signals


@functools.cache
def math_answer_tools() -> tuple[Callable[[str], str | None], Callable[[str], Any]]:
    """``(extract_answer, plain_number)`` of the shipped ``reward/math.py``: the verifier's own reading."""
    from alignkit.rewards.programs import load_reward

    return load_reward("reward/math.py:extract_answer"), load_reward("reward/math.py:plain_number")


def math_signals(texts: Sequence[str], token_lengths: Sequence[int], rewards: Sequence[float | None] | None = None,
                 *, n: int = NGRAM) -> dict[str, float]:
    """:func:`hacking_signals` with the math verifier's answer extractor and plain-number rule."""
    extract, plain = math_answer_tools()
    return hacking_signals(texts, token_lengths, rewards, extract=extract, plain=plain, n=n)
