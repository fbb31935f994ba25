"""Math-Shepherd step labels from completion rollouts (Wang et al. 2023, arXiv:2312.08935, sec. 3.3).

For a solution of K steps, a "completer" samples N continuations from each prefix ``s_1..s_i`` and checks
whether each reaches the gold answer. The table ``outcomes[i][j]`` (step i, continuation j) is all this
module sees; sampling and answer checking live elsewhere. From it the paper defines two step labels:

* hard estimation (HE), eq. 2: ``y_i = 1`` iff some continuation from step i reaches the gold answer;
* soft estimation (SE), eq. 3: ``y_i = (number that reach it) / N``.

HE is exact when the completer is perfect, but it has false negatives: a correct step whose N
continuations all happen to fail is labelled bad, with probability ``(1 - p)**N`` for a per-continuation
success rate ``p``. It has no false positives only if a wrong step can never be recovered from; a
completer that "repairs" a wrong step gives one. :func:`label_agreement` and :func:`soft_label_agreement`
measure both against known true labels, for the "agreement with truth as N grows" check.

Departures from the paper: none in the labels. ``first_error`` is our convenience (the paper trains on
every step's label); a PRM trained on "first error" views treats later steps as bad regardless.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class StepLabels:
    """Per-step labels of one solution.

    ``hard[i]``: HE label (any continuation from step i reached the gold answer).
    ``soft[i]``: SE label, the fraction of continuations from step i that did, in [0, 1].
    ``first_error``: index of the first step with ``hard[i] is False``; None when every step is good.
    """

    hard: list[bool]
    soft: list[float]
    first_error: int | None


def step_labels(outcomes: Sequence[Sequence[bool]]) -> StepLabels:
    """Math-Shepherd HE and SE labels from a (K steps x N continuations) table of outcomes.

    ``outcomes[i]`` holds, for each of the continuations sampled from the prefix ending at step i, whether
    it reached the gold answer. N may differ between steps (e.g. after de-duplication), but not be 0.

    >>> step_labels([[True, False], [False, False]])
    StepLabels(hard=[True, False], soft=[0.5, 0.0], first_error=1)
    """
    hard: list[bool] = []
    soft: list[float] = []
    for i, step in enumerate(outcomes):
        step = list(step)
        if not step:
            raise ValueError(f"step {i} has zero continuations; every step needs at least one to be labelled")
        hard.append(any(step))  # HE, eq. 2
        soft.append(sum(bool(o) for o in step) / len(step))  # SE, eq. 3
    first_error = next((i for i, good in enumerate(hard) if not good), None)
    return StepLabels(hard=hard, soft=soft, first_error=first_error)


def true_step_labels(true_first_error: int | None, n_steps: int) -> list[bool]:
    """Ground-truth labels of a solution whose first wrong step is ``true_first_error``.

    Step i is good iff ``i < true_first_error``; every step is good when it is None. Steps after a wrong
    one count as bad: they build on a wrong prefix, which is also what HE with a perfect completer says.
    """
    if n_steps < 0:
        raise ValueError(f"n_steps must be >= 0, got {n_steps}")
    if true_first_error is not None and not 0 <= true_first_error < n_steps:
        raise ValueError(f"true_first_error must be None or in [0, {n_steps}), got {true_first_error}")
    cut = n_steps if true_first_error is None else true_first_error
    return [i < cut for i in range(n_steps)]


def label_agreement(predicted_first_error: int | None, true_first_error: int | None, n_steps: int) -> dict:
    """Agreement of first-error labels with the truth, per step and per solution.

    Both sides are turned into prefix labels (step i good iff i < first_error) and compared.

    Returns a dict with:
      ``step_accuracy``: fraction of the ``n_steps`` steps whose labels agree (1.0 when n_steps is 0);
      ``exact``: True iff the first errors are equal;
      ``early``: True iff the prediction flags an error before the true one (HE's false negatives:
        correct steps whose continuations all failed);
      ``late``: True iff it flags the error after the true one, or not at all (a completer that
        recovered from a wrong step).
    """
    pred = true_step_labels(predicted_first_error, n_steps)
    true = true_step_labels(true_first_error, n_steps)
    agree = sum(p == t for p, t in zip(pred, true))
    # None means "no error": place it past the last step so that the comparisons below read naturally.
    pred_cut = n_steps if predicted_first_error is None else predicted_first_error
    true_cut = n_steps if true_first_error is None else true_first_error
    return {
        "step_accuracy": agree / n_steps if n_steps else 1.0,
        "exact": pred_cut == true_cut,
        "early": pred_cut < true_cut,
        "late": pred_cut > true_cut,
    }


def soft_label_agreement(soft: Sequence[float], true_first_error: int | None) -> dict:
    """Agreement of SE labels with the truth: mean absolute error, and accuracy after thresholding.

    ``mae`` (the headline number) is the mean over steps of ``|soft_i - truth_i|`` with truth in {0, 1}.
    We prefer it to thresholding because SE labels are trained on as soft targets (BCE against
    ``soft_i``), so their magnitude matters: 0.55 and 0.95 are both "good" after thresholding but very
    different targets. The MAE of a good step is ``1 - p_i``, of a bad one the recovery rate, so it also
    separates a weak completer from a wrong label. ``accuracy@0.5`` (good iff soft >= 0.5) is reported too,
    for comparison with hard labels; note HE is the threshold "soft > 0", not 0.5.
    Both are 0.0 / 1.0 for an empty solution.
    """
    truth = true_step_labels(true_first_error, len(soft))
    if not truth:
        return {"mae": 0.0, "accuracy@0.5": 1.0}
    for i, s in enumerate(soft):
        if not 0.0 <= s <= 1.0:
            raise ValueError(f"soft label of step {i} must be in [0, 1], got {s}")
    mae = sum(abs(s - float(t)) for s, t in zip(soft, truth)) / len(truth)
    accuracy = sum((s >= 0.5) == t for s, t in zip(soft, truth)) / len(truth)
    return {"mae": mae, "accuracy@0.5": accuracy}
