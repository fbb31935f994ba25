"""``alignkit.tracking``: the experiment tracking, kept importable under the name earlier issues and docs use;
the code lives in :mod:`alignkit.core.tracking`."""

from alignkit.core.tracking import (
    Tracker,
    read_offline_run,
    wandb_mode,
)

__all__ = ['Tracker', 'read_offline_run', 'wandb_mode']
