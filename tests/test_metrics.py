"""pass@k, votes, step aggregation and selection curves: brute force and hand-worked numbers."""

from __future__ import annotations

import itertools
import random

import pytest

from alignkit.maths.selection import (
    Pool,
    aggregate_steps,
    best_of_n,
    bootstrap_ci,
    majority_vote,
    pairwise_ranking,
    pass_at_k,
    selection_curve,
    sign_test,
    weighted_vote,
)

# ---- pass@k -------------------------------------------------------------------------------------------


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of the k-subsets of n samples (the first c correct) that contain a correct sample."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_brute_force():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_hand_worked():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the fraction correct
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 3, 3) == 1.0  # n - c = 2 < k: every 3-subset has a correct one
    assert pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)  # only {wrong, wrong} of C(4,2)=6 fails


def test_pass_at_k_stable_for_large_n():
    # the ratio of binomials C(200, k) overflows floats for naive implementations; the product does not
    value = pass_at_k(1000, 1, 500)
    assert value == pytest.approx(0.5)
    assert 0.0 <= pass_at_k(1000, 5, 100) <= 1.0


def test_pass_at_k_monotone_in_k_and_c():
    for k in range(1, 10):
        assert pass_at_k(10, 2, k) <= pass_at_k(10, 2, k + 1)
        assert pass_at_k(10, 2, k) <= pass_at_k(10, 3, k)


@pytest.mark.parametrize("n,c,k", [(3, 1, 4), (3, 1, 0), (3, 4, 1), (3, -1, 1)])
def test_pass_at_k_rejects_bad_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


# ---- votes --------------------------------------------------------------------------------------------


def test_majority_vote():
    assert majority_vote(["a", "b", "b", None, None, None]) == "b"  # None never wins
    assert majority_vote(["a", "b", "b", "a"]) == "a"  # tie: first seen
    assert majority_vote(["b", "a", "a", "b"]) == "b"
    assert majority_vote([None, None]) is None
    assert majority_vote([]) is None


def test_weighted_vote():
    # a: 0.9; b: 0.4 + 0.3 = 0.7 -> a despite fewer votes
    assert weighted_vote(["a", "b", "b"], [0.9, 0.4, 0.3]) == "a"
    # a: 0.5; b: 0.25 + 0.25 = 0.5 -> tie, first seen
    assert weighted_vote(["b", "a", "b"], [0.25, 0.5, 0.25]) == "b"
    assert weighted_vote(["a", None], [0.1, 5.0]) == "a"  # a None answer carries no score
    assert weighted_vote([None], [1.0]) is None
    with pytest.raises(ValueError, match="2 answers but 1 scores"):
        weighted_vote(["a", "b"], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        weighted_vote(["a"], [float("nan")])


def test_best_of_n():
    assert best_of_n(["a", "b", "c"], [0.1, 0.7, 0.7]) == 1  # first max
    assert best_of_n(["a", None, "c"], [0.1, 0.9, 0.2]) == 2  # a None answer is never selected
    assert best_of_n([None], [0.3]) is None


# ---- step aggregation ---------------------------------------------------------------------------------


def test_aggregate_steps_hand_worked():
    steps = [0.9, 0.5, 0.8]
    assert aggregate_steps(steps, "min") == 0.5
    assert aggregate_steps(steps, "prod") == pytest.approx(0.36)
    assert aggregate_steps(steps, "last") == 0.8
    assert aggregate_steps(steps, "mean") == pytest.approx(2.2 / 3)


def test_aggregate_steps_errors():
    with pytest.raises(ValueError, match="min, prod, last, mean"):
        aggregate_steps([0.5], "max")
    with pytest.raises(ValueError, match="empty"):
        aggregate_steps([], "min")


# ---- selection curves ---------------------------------------------------------------------------------

# Problem 1: a right (score 0.9), b wrong twice (0.2, 0.5). Problem 2: always right.
POOLS = [
    Pool.of(["a", "b", "b"], [True, False, False], [0.9, 0.2, 0.5]),
    Pool.of(["x", "x", "x"], [True, True, True], [0.1, 0.1, 0.1]),
]


def test_selection_curve_hand_worked():
    # Problem 1, subsets of size 2 (pool order): {0,1} -> a,b ; {0,2} -> a,b ; {1,2} -> b,b.
    #   majority: tie a/b -> a (first) twice, b once: 2/3; at N=3 b wins: 0; at N=1 one in three: 1/3.
    #   best_of_n: 0.9 wins wherever sample 0 is: 2/3 at N=2, 1 at N=3.
    #   weighted: a 0.9 vs b 0.7 at N=3 -> a; at N=2 same as best_of_n.
    #   pass: pass@1 = 1/3, pass@2 = 1 - 1/3 = 2/3, pass@3 = 1.
    # Problem 2 adds 1 to every entry; the curve is the mean over the two problems.
    expected = {
        "pass": {1: 1 / 3, 2: 2 / 3, 3: 1.0},
        "majority": {1: 1 / 3, 2: 2 / 3, 3: 0.0},
        "best_of_n": {1: 1 / 3, 2: 2 / 3, 3: 1.0},
        "weighted_vote": {1: 1 / 3, 2: 2 / 3, 3: 1.0},
    }
    for method, curve in expected.items():
        got = selection_curve(POOLS, method, ns=[1, 2, 3])
        assert got == pytest.approx({n: (v + 1) / 2 for n, v in curve.items()}), method


def test_selection_curve_sampling_matches_enumeration():
    rng = random.Random(3)
    pools = []
    for _ in range(5):
        answers = [rng.choice(["1", "2", "3", None]) for _ in range(12)]
        pools.append(Pool.of(answers, [a == "1" for a in answers], [rng.random() for _ in answers]))
    for method in ("majority", "best_of_n", "weighted_vote"):
        exact = selection_curve(pools, method, ns=[4], draws=10_000)  # C(12, 4) = 495 <= draws
        sampled = selection_curve(pools, method, ns=[4], draws=400, seed=1)  # 400 < 495: random subsets
        assert sampled[4] == pytest.approx(exact[4], abs=0.05), method
        assert sampled == selection_curve(pools, method, ns=[4], draws=400, seed=1)  # seeded


def test_pass_curve_upper_bounds_the_others():
    rng = random.Random(5)
    pools = []
    for _ in range(8):
        answers = [rng.choice(["1", "2", "3"]) for _ in range(6)]
        pools.append(Pool.of(answers, [a == "1" for a in answers], [rng.random() for _ in answers]))
    ns = [1, 2, 4, 6]
    upper = selection_curve(pools, "pass", ns)
    for method in ("majority", "best_of_n", "weighted_vote"):
        curve = selection_curve(pools, method, ns)
        assert all(curve[n] <= upper[n] + 1e-12 for n in ns), method
        assert curve[1] == pytest.approx(upper[1])  # with one sample every method picks it


def test_selection_curve_errors():
    with pytest.raises(ValueError, match="pass, majority"):
        selection_curve(POOLS, "oracle", ns=[1])
    with pytest.raises(ValueError, match=r"\[1, 3\]"):
        selection_curve(POOLS, "majority", ns=[4])
    with pytest.raises(ValueError, match="needs scores"):
        selection_curve([Pool.of(["a"], [True])], "best_of_n", ns=[1])
    with pytest.raises(ValueError, match="both correct and incorrect"):
        Pool.of(["a", "a"], [True, False])
    with pytest.raises(ValueError, match="without an answer"):
        Pool.of([None], [True])


def test_docstring_examples():
    import doctest

    import alignkit.maths.selection

    result = doctest.testmod(alignkit.maths.selection)
    assert result.attempted >= 5 and result.failed == 0


# ---- pairwise ranking ---------------------------------------------------------------------------------


def test_pairwise_ranking_hand_worked():
    # problem 1: right 0.9 beats wrong 0.2 and 0.5 (2 wins); right 0.4 loses to 0.5, beats 0.2 (1 win)
    # problem 2: right 0.3 ties wrong 0.3 (half); problem 3 (all right) adds no pair
    scores = [[0.9, 0.2, 0.5, 0.4], [0.3, 0.3], [0.8, 0.1]]
    correct = [[True, False, False, True], [True, False], [True, True]]
    fraction, pairs = pairwise_ranking(scores, correct)
    assert pairs == 5 and fraction == pytest.approx(3.5 / 5)
    assert pairwise_ranking([[0.1, 0.9]], [[True, False]]) == (0.0, 1)
    fraction, pairs = pairwise_ranking([[0.5]], [[True]])
    assert pairs == 0 and fraction != fraction  # NaN: nothing to rank
    with pytest.raises(ValueError):
        pairwise_ranking([[0.1, 0.2]], [[True]])


# ---- bootstrap interval and sign test -----------------------------------------------------------------


def test_sign_test_hand_worked():
    # 3 wins, 0 losses: P[X <= 0] = 1/8 for X ~ Bin(3, 1/2), two-sided 2/8
    assert sign_test(3, 0) == pytest.approx(0.25)
    assert sign_test(0, 3) == pytest.approx(0.25)
    # 5 : 1 -> P[X <= 1] = (1 + 6) / 64, two-sided 14/64
    assert sign_test(5, 1) == pytest.approx(14 / 64)
    assert sign_test(4, 4) == 1.0 and sign_test(0, 0) == 1.0  # capped; nothing to test
    # the PPO table's 20 wrong->right vs 7 right->wrong
    assert sign_test(20, 7) == pytest.approx(0.01916, abs=1e-5)
    with pytest.raises(ValueError):
        sign_test(-1, 2)


def test_bootstrap_ci_brackets_the_mean_and_is_seeded():
    assert bootstrap_ci([0.25] * 10) == (0.25, 0.25)
    values = [1.0] * 30 + [0.0] * 70  # mean 0.3, standard error ~0.046
    low, high = bootstrap_ci(values)
    assert low < 0.3 < high
    assert 0.2 < low < 0.25 and 0.35 < high < 0.4  # about mean -/+ 1.96 standard errors
    assert bootstrap_ci(values) == (low, high)  # same seed, same interval
    assert bootstrap_ci(values, seed=1) != (low, high)
    with pytest.raises(ValueError):
        bootstrap_ci([])
