"""Math-Shepherd step labels: hand-worked tables and a simulated ("oracle") completer."""

from __future__ import annotations

import random

import pytest

from alignkit.maths.labels import StepLabels, label_agreement, soft_label_agreement, step_labels, true_step_labels


# ---- hand-worked tables -------------------------------------------------------------------------------


def test_hand_worked_table():
    # step 0: 3/4 continuations reach the answer; step 1: 1/4; step 2: none; step 3: 2/4 (a recovery).
    outcomes = [
        [True, True, False, True],
        [False, False, True, False],
        [False, False, False, False],
        [True, False, True, False],
    ]
    labels = step_labels(outcomes)
    assert labels.hard == [True, True, False, True]
    assert labels.soft == [0.75, 0.25, 0.0, 0.5]
    assert labels.first_error == 2  # the first False, even though step 3 "recovers"


def test_all_good_has_no_first_error():
    labels = step_labels([[True], [False, True], [True, True, True]])  # N may differ per step
    assert labels == StepLabels(hard=[True, True, True], soft=[1.0, 0.5, 1.0], first_error=None)


def test_first_step_wrong():
    assert step_labels([[False, False], [False, False]]).first_error == 0


def test_empty_solution():
    assert step_labels([]) == StepLabels(hard=[], soft=[], first_error=None)


def test_step_without_continuations_names_the_step():
    with pytest.raises(ValueError, match="step 1"):
        step_labels([[True], [], [False]])


def test_labels_are_frozen():
    labels = step_labels([[True]])
    with pytest.raises(AttributeError):
        labels.first_error = 3  # type: ignore[misc]


def test_hard_is_soft_greater_than_zero():
    rng = random.Random(0)
    for _ in range(200):
        table = [[rng.random() < 0.3 for _ in range(rng.randint(1, 5))] for _ in range(rng.randint(0, 6))]
        labels = step_labels(table)
        assert labels.hard == [s > 0 for s in labels.soft]


# ---- agreement helpers --------------------------------------------------------------------------------


def test_true_step_labels():
    assert true_step_labels(2, 4) == [True, True, False, False]
    assert true_step_labels(None, 3) == [True, True, True]
    assert true_step_labels(0, 2) == [False, False]
    with pytest.raises(ValueError):
        true_step_labels(4, 4)


def test_label_agreement_hand_worked():
    # truth: error at 3 of 5 -> [T T T F F]; prediction error at 1 -> [T F F F F]: 3 of 5 steps agree.
    assert label_agreement(1, 3, 5) == {"step_accuracy": 0.6, "exact": False, "early": True, "late": False}
    assert label_agreement(3, 3, 5) == {"step_accuracy": 1.0, "exact": True, "early": False, "late": False}
    # prediction says all good: [T T T T T] vs [T T T F F].
    assert label_agreement(None, 3, 5) == {"step_accuracy": 0.6, "exact": False, "early": False, "late": True}
    assert label_agreement(None, None, 4)["exact"] is True


def test_soft_label_agreement_hand_worked():
    # truth [T, T, F]: |0.75 - 1| + |0.5 - 1| + |0.25 - 0| = 1.0 over 3 steps; threshold: [T, T, F] all agree.
    out = soft_label_agreement([0.75, 0.5, 0.25], true_first_error=2)
    assert out["mae"] == pytest.approx(1.0 / 3)
    assert out["accuracy@0.5"] == 1.0
    # [0.25 -> F vs T] wrong, [0.0 -> F vs F] right.
    out = soft_label_agreement([0.25, 0.0], true_first_error=1)
    assert out == {"mae": pytest.approx(0.375), "accuracy@0.5": 0.5}
    with pytest.raises(ValueError, match="step 1"):
        soft_label_agreement([0.5, 1.5], None)


# ---- oracle completer ---------------------------------------------------------------------------------


def oracle_outcomes(n_steps: int, first_wrong: int | None, p: float, n: int, rng: random.Random):
    """Rollout table of a completer that reaches the gold answer with probability p from a correct prefix
    (steps before ``first_wrong``) and never from a wrong one."""
    cut = n_steps if first_wrong is None else first_wrong
    return [[i < cut and rng.random() < p for _ in range(n)] for i in range(n_steps)]


@pytest.mark.parametrize("first_wrong", [0, 1, 4, 7, None])
def test_perfect_completer_finds_planted_error(first_wrong):
    rng = random.Random(1234)
    labels = step_labels(oracle_outcomes(8, first_wrong, p=1.0, n=8, rng=rng))
    assert labels.first_error == first_wrong
    assert label_agreement(labels.first_error, first_wrong, 8)["step_accuracy"] == 1.0
    assert soft_label_agreement(labels.soft, first_wrong)["mae"] == 0.0


def test_noisy_completer_never_flags_late_but_can_flag_early():
    """HE has only false negatives under a completer that cannot recover: the found first error is never
    after the planted one, and is before it at the rate 1 - (1 - (1-p)**N)**j of a step-wise coin flip."""
    rng = random.Random(7)
    k, j, p, n, trials = 6, 4, 0.3, 2, 4000
    early = 0
    for _ in range(trials):
        labels = step_labels(oracle_outcomes(k, j, p, n, rng))
        agreement = label_agreement(labels.first_error, j, k)
        assert not agreement["late"]
        assert labels.hard[j:] == [False] * (k - j)  # steps from the wrong one on are always bad
        early += agreement["early"]
    all_fail = (1 - p) ** n  # 0.49: a correct step looks bad
    expected = 1 - (1 - all_fail) ** j  # ~0.935
    assert early / trials == pytest.approx(expected, abs=0.02)


def test_agreement_with_truth_grows_with_n():
    """The quality check in miniature: HE's step accuracy rises toward 1 as N grows; SE's MAE tends to
    1 - p on good steps (a property of the completer, not of N)."""
    k, j, p, trials = 8, 5, 0.25, 400
    accuracies, maes = [], []
    for n in (1, 4, 16, 64):
        rng = random.Random(n)
        acc = mae = 0.0
        for _ in range(trials):
            labels = step_labels(oracle_outcomes(k, j, p, n, rng))
            acc += label_agreement(labels.first_error, j, k)["step_accuracy"]
            mae += soft_label_agreement(labels.soft, j)["mae"]
        accuracies.append(acc / trials)
        maes.append(mae / trials)
    assert accuracies == sorted(accuracies)
    assert accuracies[0] < 0.6 and accuracies[-1] > 0.99
    # good steps contribute 1 - p each, bad steps 0: (j / k) * (1 - p), whatever N is.
    assert maes[-1] == pytest.approx(j / k * (1 - p), abs=0.01)


def test_docstring_examples():
    import doctest

    import alignkit.maths.labels

    result = doctest.testmod(alignkit.maths.labels)
    assert result.attempted >= 1 and result.failed == 0
