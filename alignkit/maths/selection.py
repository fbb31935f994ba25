"""Public estimators for eval suites and best-of-N selection: pass@k, votes, PRM step aggregation, and the
two tests our comparisons report (a bootstrap interval of a mean, an exact sign test on paired outcomes).

Plain Python on lists: no torch, no I/O. An answer is a normalised string (the extractor in ``reward/``
makes it) or None when no answer could be extracted; None never wins a vote and is never selected.

Selection curves (accuracy vs N) are computed from one shared pool of samples per problem
(:class:`Pool`) by subsampling N of them without replacement, so every N reuses the same generations and
the curves of different methods are directly comparable. Correctness is taken to be a function of the
answer string (:class:`Pool` checks this), which is what lets a vote over answers be scored.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

STEP_AGGREGATIONS = ("min", "prod", "last", "mean")
SELECTION_METHODS = ("pass", "majority", "best_of_n", "weighted_vote")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021, arXiv:2107.03374, eq. 1).

        pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n - c + 1}^{n} (1 - k / i)

    The product form avoids the huge binomials (C(200, 100) ~ 9e58) of the ratio form.

    >>> pass_at_k(4, 1, 2)
    0.5
    """
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def _first_max(totals: dict[str, float]) -> str | None:
    """Key with the largest total; ties go to the key inserted first (max returns the first maximum)."""
    return max(totals, key=totals.__getitem__) if totals else None


def majority_vote(answers: Sequence[str | None]) -> str | None:
    """Most frequent answer (self-consistency, Wang et al. 2022); None answers are ignored.

    Ties break toward the answer seen first. Returns None when no answer is given.

    >>> majority_vote(["7", None, "8", "8", "7"])
    '7'
    """
    counts: dict[str, float] = {}
    for answer in answers:
        if answer is not None:
            counts[answer] = counts.get(answer, 0) + 1
    return _first_max(counts)


def _check_scores(answers: Sequence[str | None], scores: Sequence[float]) -> None:
    if len(answers) != len(scores):
        raise ValueError(f"got {len(answers)} answers but {len(scores)} scores")
    for i, score in enumerate(scores):
        if math.isnan(score):
            raise ValueError(f"score {i} is NaN")


def weighted_vote(answers: Sequence[str | None], scores: Sequence[float]) -> str | None:
    """Answer with the largest sum of scores (reward-weighted self-consistency); None answers ignored.

    Ties break toward the answer seen first. Scores should be non-negative (probabilities from an ORM/PRM):
    with negative scores more votes can lower an answer's total.

    >>> weighted_vote(["7", "8", "8"], [0.9, 0.4, 0.4])
    '7'
    """
    _check_scores(answers, scores)
    totals: dict[str, float] = {}
    for answer, score in zip(answers, scores):
        if answer is not None:
            totals[answer] = totals.get(answer, 0.0) + float(score)
    return _first_max(totals)


def best_of_n(answers: Sequence[str | None], scores: Sequence[float]) -> int | None:
    """Index of the highest-scoring sample that has an answer (first one on ties); None if none has one.

    >>> best_of_n(["7", None, "8"], [0.2, 0.9, 0.5])
    2
    """
    _check_scores(answers, scores)
    candidates = [i for i, answer in enumerate(answers) if answer is not None]
    return max(candidates, key=lambda i: scores[i]) if candidates else None


def pairwise_ranking(scores: Sequence[Sequence[float]], correct: Sequence[Sequence[bool]]) -> tuple[float, int]:
    """How often a scorer ranks a right solution above a wrong one *of the same problem*: over every
    (right, wrong) pair within each problem, the fraction with score(right) > score(wrong), ties counting
    half. Chance is 0.5 whatever the accuracy; problems with only right or only wrong samples add no pair.
    Returns (fraction, number of pairs); the fraction is NaN with no pair.

    >>> pairwise_ranking([[0.9, 0.2, 0.5], [0.1, 0.3]], [[True, False, False], [True, False]])
    (0.6666666666666666, 3)
    """
    wins, pairs = 0.0, 0
    for problem_scores, problem_correct in zip(scores, correct, strict=True):
        right = [s for s, c in zip(problem_scores, problem_correct, strict=True) if c]
        wrong = [s for s, c in zip(problem_scores, problem_correct, strict=True) if not c]
        for r in right:
            for w in wrong:
                wins += 1.0 if r > w else 0.5 if r == w else 0.0
                pairs += 1
    return (wins / pairs if pairs else float("nan")), pairs


def bootstrap_ci(values: Sequence[float], *, draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean of ``values``, resampled with replacement ``draws`` times.

    For a paired comparison pass the per-problem differences (e.g. ``after - before`` correctness), so the
    interval is of the mean change and keeps the pairing. Seeded: the same call gives the same interval.

    >>> bootstrap_ci([0.5, 0.5, 0.5])
    (0.5, 0.5)
    """
    if not values:
        raise ValueError("bootstrap_ci needs at least one value")
    rng, m = random.Random(seed), len(values)
    means = sorted(sum(values[rng.randrange(m)] for _ in range(m)) / m for _ in range(draws))
    return means[int(0.025 * draws)], means[int(0.975 * draws) - 1]


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test: the chance, if either outcome were equally likely, of a split at least as
    uneven as ``wins`` : ``losses`` (ties are left out before calling). 1.0 when there is nothing to test.

        p = min(1, 2 * P[Binomial(n, 1/2) <= min(wins, losses)]),  n = wins + losses

    >>> round(sign_test(20, 7), 4)
    0.0192
    """
    if wins < 0 or losses < 0:
        raise ValueError(f"need wins, losses >= 0, got {wins}, {losses}")
    n, k = wins + losses, min(wins, losses)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def aggregate_steps(step_scores: Sequence[float], how: str) -> float:
    """One solution score from a PRM's per-step scores.

    ``min``: the weakest step (Lightman et al. 2023 use prod, Math-Shepherd min; both punish one bad
    step); ``prod``: probability every step is right, if steps were independent; ``last``: the final step,
    which already conditions on the whole prefix; ``mean``: average, forgiving of one bad step.

    >>> aggregate_steps([0.9, 0.5, 0.8], "prod")
    0.36000000000000004
    """
    if how not in STEP_AGGREGATIONS:
        raise ValueError(f"how must be one of {', '.join(STEP_AGGREGATIONS)}; got {how!r}")
    if not step_scores:
        raise ValueError("cannot aggregate an empty list of step scores")
    scores = [float(s) for s in step_scores]
    if how == "min":
        return min(scores)
    if how == "prod":
        return math.prod(scores)
    if how == "last":
        return scores[-1]
    return sum(scores) / len(scores)


@dataclass(frozen=True)
class Pool:
    """All samples generated for one problem: the shared pool that selection curves subsample.

    ``answers[i]``: extracted answer of sample i (None: none found); ``correct[i]``: whether it is right;
    ``scores[i]``: a verifier's score (ORM score, or a PRM's aggregated step scores), needed only by
    ``best_of_n`` and ``weighted_vote``. Samples with the same answer must agree on ``correct``, and a
    None answer must be incorrect.
    """

    answers: tuple[str | None, ...]
    correct: tuple[bool, ...]
    scores: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        n = len(self.answers)
        if len(self.correct) != n or (self.scores is not None and len(self.scores) != n):
            raise ValueError("answers, correct and scores must have one entry per sample")
        verdict: dict[str | None, bool] = {}
        for answer, ok in zip(self.answers, self.correct):
            if answer is None and ok:
                raise ValueError("a sample without an answer cannot be correct")
            if verdict.setdefault(answer, ok) != ok:
                raise ValueError(f"answer {answer!r} is marked both correct and incorrect")

    @classmethod
    def of(
        cls, answers: Sequence[str | None], correct: Sequence[bool], scores: Sequence[float] | None = None
    ) -> Pool:
        """Build from any sequences (tuples keep the pool immutable)."""
        return cls(tuple(answers), tuple(bool(c) for c in correct), None if scores is None else tuple(scores))


def _selected_correct(pool: Pool, idx: Sequence[int], method: str) -> bool:
    """Whether ``method`` picks a correct answer from the samples ``idx`` (in pool order) of ``pool``."""
    answers = [pool.answers[i] for i in idx]
    if method == "majority":
        choice = majority_vote(answers)
    else:
        scores = [pool.scores[i] for i in idx]  # type: ignore[index]
        if method == "best_of_n":
            pick = best_of_n(answers, scores)
            return pick is not None and pool.correct[idx[pick]]
        choice = weighted_vote(answers, scores)
    return choice is not None and pool.correct[pool.answers.index(choice)]


def _mean_over_subsets(pool: Pool, n: int, method: str, draws: int, rng: random.Random) -> float:
    """Expected correctness of ``method`` over N-subsets of the pool: exact if there are at most ``draws``
    subsets (all are enumerated), else the mean of ``draws`` random subsets."""
    m = len(pool.answers)
    if math.comb(m, n) <= draws:
        subsets: Sequence[Sequence[int]] = list(itertools.combinations(range(m), n))
    else:
        # Sorting keeps pool order inside a subset, so ties go to the earlier sample in the pool: pool
        # order is itself random (i.i.d. samples), and enumeration and sampling then agree.
        subsets = [sorted(rng.sample(range(m), n)) for _ in range(draws)]
    return sum(_selected_correct(pool, s, method) for s in subsets) / len(subsets)


def selection_curve(
    pools: Sequence[Pool], method: str, ns: Sequence[int], draws: int = 200, seed: int = 0
) -> dict[int, float]:
    """Accuracy vs N for a selection method, averaged over problems: ``{N: accuracy}``.

    ``pass``: pass@N (some sample correct), exactly, via :func:`pass_at_k`; ``majority``: the majority
    answer is correct; ``best_of_n``: the highest-scoring sample is correct; ``weighted_vote``: the answer
    with the largest total score is correct. For the last three, each problem's accuracy at N is the mean
    over N-subsets of its pool: all of them when there are at most ``draws`` (exact), else ``draws``
    random ones drawn without replacement from a ``random.Random(seed)`` (:func:`selection_values`).
    """
    return {n: sum(values) / len(values) for n, values in selection_values(pools, method, ns, draws, seed).items()}


def selection_values(
    pools: Sequence[Pool], method: str, ns: Sequence[int], draws: int = 200, seed: int = 0
) -> dict[int, list[float]]:
    """Each problem's accuracy at each N, ``{N: [value per problem]}``: what :func:`selection_curve` averages
    (bootstrap bands and per-difficulty choices need the problems apart)."""
    if method not in SELECTION_METHODS:
        raise ValueError(f"method must be one of {', '.join(SELECTION_METHODS)}; got {method!r}")
    if not pools:
        raise ValueError("selection_curve needs at least one problem pool")
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    if method in ("best_of_n", "weighted_vote") and any(p.scores is None for p in pools):
        raise ValueError(f"method {method!r} needs scores in every pool")
    smallest = min(len(p.answers) for p in pools)
    for n in ns:
        if not 1 <= n <= smallest:
            raise ValueError(f"every N must be in [1, {smallest}] (the smallest pool); got {n}")
    rng = random.Random(seed)
    per_problem: Callable[[Pool, int], float]
    if method == "pass":
        per_problem = lambda p, n: pass_at_k(len(p.answers), sum(p.correct), n)  # noqa: E731
    else:
        per_problem = lambda p, n: _mean_over_subsets(p, n, method, draws, rng)  # noqa: E731
    return {n: [per_problem(p, n) for p in pools] for n in ns}
