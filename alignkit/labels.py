"""``alignkit.labels``: the Math-Shepherd step labels, kept importable under the name earlier issues and docs use;
the code lives in :mod:`alignkit.maths.labels`."""

from alignkit.maths.labels import (
    StepLabels,
    label_agreement,
    soft_label_agreement,
    step_labels,
    true_step_labels,
)

__all__ = ['StepLabels', 'label_agreement', 'soft_label_agreement', 'step_labels', 'true_step_labels']
