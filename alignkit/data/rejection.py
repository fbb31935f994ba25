"""Rejection sampling's pure parts: which samples pass, which of them are distinct, and pass@k.

The ``rejection`` stage (:mod:`alignkit.stages.rejection`) samples ``n`` completions per prompt, scores them,
and keeps up to ``k`` that pass and differ from each other. This module holds the decisions, each a small
function with hand-worked doctests:

- :func:`passing`: a score passes at ``score >= threshold`` (None, i.e. unscorable, never passes).
- :func:`distinct`: exact duplicates (after case folding and whitespace collapsing) and near duplicates
  (Jaccard similarity of word 3-gram sets at or above ``near``; Broder 1997's resemblance) are dropped, the
  first of each group kept.
- :func:`keep`: the passing samples, best score first (ties by sample order), de-duplicated, at most ``k``.
- :func:`pass_at_k`: the unbiased estimator of Chen et al. 2021 (arXiv:2107.03374, eq. 1),
  ``1 - C(n - c, k) / C(n, k)`` for ``c`` passing samples out of ``n``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_WORD = re.compile(r"\w+|[^\w\s]")


def passing(scores: Sequence[float | None], threshold: float) -> list[bool]:
    """Whether each score passes: not None and at least ``threshold``.

    >>> passing([1.0, 0.0, None, 0.5], 0.5)
    [True, False, False, True]
    """
    return [score is not None and score >= threshold for score in scores]


def normalized(text: str) -> str:
    """``text`` case-folded with runs of whitespace as one space: the key of exact de-duplication.

    >>> normalized("  The answer is\\n 18. ") == normalized("the ANSWER is 18.")
    True
    """
    return " ".join(text.casefold().split())


def shingles(text: str, size: int = 3) -> frozenset[tuple[str, ...]]:
    """The set of ``size``-token windows of ``text`` (words and punctuation marks, case-folded); a text shorter
    than ``size`` tokens is one window of all of them.

    >>> sorted(shingles("a b c d"))
    [('a', 'b', 'c'), ('b', 'c', 'd')]
    """
    tokens = _WORD.findall(text.casefold())
    if len(tokens) <= size:
        return frozenset([tuple(tokens)])
    return frozenset(tuple(tokens[i:i + size]) for i in range(len(tokens) - size + 1))


def jaccard(a: frozenset, b: frozenset) -> float:
    """``|a & b| / |a | b|`` (1.0 for two empty sets).

    >>> jaccard(frozenset({1, 2, 3}), frozenset({2, 3, 4}))
    0.5
    """
    union = len(a | b)
    return len(a & b) / union if union else 1.0


def distinct(texts: Sequence[str], *, near: float | None = 0.9) -> list[int]:
    """Indices of ``texts`` to keep, in order: the first of each exact-duplicate group (:func:`normalized`) and,
    when ``near`` is set, not within Jaccard ``near`` of a text already kept (:func:`shingles`).

    >>> distinct(["x = 1", "X  =  1", "y = 2"], near=None)
    [0, 2]
    >>> distinct(["so 3 + 4 = 7 and 7 * 2 = 14 . the answer is 14",
    ...           "so 3 + 4 = 7 and 7 * 2 = 14 . the answer is 14 !", "the answer is 14"], near=0.8)
    [0, 2]
    """
    kept: list[int] = []
    seen: set[str] = set()
    kept_shingles: list[frozenset] = []
    for i, text in enumerate(texts):
        key = normalized(text)
        if key in seen:
            continue
        if near is not None:
            mine = shingles(text)
            if any(jaccard(mine, other) >= near for other in kept_shingles):
                continue
            kept_shingles.append(mine)
        seen.add(key)
        kept.append(i)
    return kept


def keep(texts: Sequence[str], scores: Sequence[float | None], *, threshold: float, k: int,
         near: float | None = 0.9) -> list[int]:
    """Up to ``k`` indices of passing, mutually distinct texts: best score first, ties in sample order.

    Duplicates are judged among the passing texts only, so a failing text never hides a passing one.

    >>> keep(["a", "b", "a", "c"], [1.0, 0.0, 1.0, 2.0], threshold=1.0, k=2)
    [3, 0]
    >>> keep(["a", "b"], [0.0, None], threshold=1.0, k=2)
    []
    """
    if len(texts) != len(scores):
        raise ValueError(f"{len(texts)} texts but {len(scores)} scores")
    ok = [i for i, passed in enumerate(passing(scores, threshold)) if passed]
    ranked = sorted(ok, key=lambda i: (-float(scores[i]), i))
    chosen = distinct([texts[i] for i in ranked], near=near)
    return [ranked[j] for j in chosen][:k]


def pass_at_k(n: int, c: int, k: int) -> float:
    """P(at least one of ``k`` samples drawn without replacement from ``n``, ``c`` of them passing, passes).

    ``1 - C(n-c, k) / C(n, k)``, computed as ``1 - prod_{i=n-c+1}^{n} (1 - k / i)`` (Chen et al. 2021).

    >>> pass_at_k(4, 1, 1), pass_at_k(4, 1, 2), pass_at_k(4, 0, 4), pass_at_k(4, 3, 2)
    (0.25, 0.5, 0.0, 1.0)
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product


def pass_at_k_curve(counts: Sequence[tuple[int, int]], ks: Sequence[int]) -> dict[int, float]:
    """Mean pass@k over prompts, for each ``k`` in ``ks`` no larger than every prompt's ``n``.

    ``counts`` holds ``(n, c)`` per prompt.

    >>> pass_at_k_curve([(4, 1), (4, 0)], [1, 2, 4])
    {1: 0.125, 2: 0.25, 4: 0.5}
    """
    if not counts:
        return {}
    smallest = min(n for n, _ in counts)
    return {k: sum(pass_at_k(n, c, k) for n, c in counts) / len(counts) for k in ks if 1 <= k <= smallest}


def powers_of_two(n: int) -> list[int]:
    """1, 2, 4, ... up to ``n``, and ``n`` itself: the k values of the pass@k curve.

    >>> powers_of_two(6), powers_of_two(8)
    ([1, 2, 4, 6], [1, 2, 4, 8])
    """
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]
