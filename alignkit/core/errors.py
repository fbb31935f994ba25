"""User-facing errors.

Every mistake a user can make (a bad recipe field, a dataset without the columns a stage needs, a model
that cannot be found) raises an :class:`AlignkitError`. The CLI prints its message, with no traceback, and
exits with status 2. ``assert`` is only for our own invariants.
"""

from __future__ import annotations


class AlignkitError(Exception):
    """A mistake the user can fix; the message says what and how."""

    exit_code = 2


class RecipeError(AlignkitError, ValueError):
    """A recipe (or ``--set`` override) is invalid.

    ``file`` is the recipe path and ``field`` the dotted path of the offending field
    (``stages.sft.lr``); both are prefixed to the message so the user knows exactly where to look.
    """

    def __init__(self, message: str, *, file: str | None = None, field: str | None = None):
        self.file, self.field, self.reason = file, field, message
        where = ": ".join(part for part in (file, field) if part)
        super().__init__(f"{where}: {message}" if where else message)


class DataError(AlignkitError, ValueError):
    """A dataset cannot be used: missing columns, empty, malformed row (the message names it)."""


class RewardError(AlignkitError, ValueError):
    """A reward program (or reward model) returned something that is not a score, or raised: the message names
    the program and the row, so that a bad score stops the run instead of being trained or graded on."""


class ModelError(AlignkitError):
    """A model cannot be resolved or loaded."""


class GenerationError(AlignkitError, RuntimeError):
    """Generation failed for a reason outside our code (e.g. the completions server kept failing)."""


class RunFolderBusy(AlignkitError):
    """Another live ``alignkit run`` holds the run folder (:mod:`alignkit.core.runlock`); the message names it."""


class TrainingDiverged(AlignkitError, RuntimeError):
    """Training produced a nan/inf loss or gradient norm. The stage stops at that step, before anything trained
    on it is saved, and its manifest says ``failed`` with ``failed_step``: a diverged model is never ``done``."""

    def __init__(self, stage: str, step: int, what: str, value: float):
        self.step = step
        super().__init__(f"{stage}: training diverged at step {step}: {what} is {value}; stopped without saving "
                         "a model (lower lr, or check the data)")
