"""Stage kinds and the protocol every stage module meets.

A stage is a *module* (``alignkit/stages/<kind>.py``) that reads top to bottom: a ``Config`` class, an
``outputs()`` function naming what later stages may reference, and ``run()``. There is no base class with
behaviour to inherit (torchtune's rule): the pipeline only relies on the three names below. Modules are
imported lazily so that ``alignkit run --dry-run`` and validation stay fast.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from pydantic import Field

from .config import Spec

#: kind -> module. New stage kinds register here (one line) and nowhere else.
STAGES: dict[str, str] = {
    "sft": "alignkit.stages.sft",
    "reward": "alignkit.stages.reward",
    "dpo": "alignkit.stages.dpo",
    "grpo": "alignkit.stages.grpo",
    "rloo": "alignkit.stages.rloo",
    "label": "alignkit.stages.label",
    "prm": "alignkit.stages.prm",
    "eval": "alignkit.stages.eval",
    "ppo": "alignkit.stages.ppo",
    "rntp": "alignkit.stages.rntp",
    "cai-revise": "alignkit.stages.cai_revise",
    "cai-label": "alignkit.stages.cai_label",
    "cai-compare": "alignkit.stages.cai_compare",
}


class StageConfig(Spec):
    """Fields every stage config has; stage configs subclass this and add their own."""

    kind: str = Field(..., description="Stage kind, one of the registry's keys.")
    name: str | None = Field(None, description="Stage name (default: the kind); folder and reference name.")


class Stage(Protocol):
    """What the pipeline needs from a stage module."""

    Config: type[StageConfig]

    def outputs(self, run_dir: Path) -> dict[str, str]:
        """Paths this stage will produce, known before it runs (so ``${stage.key}`` resolves at load)."""

    def run(self, config: Any, ctx: Any) -> Any:
        """Do the work; return a ``StageResult``. Must be resumable from what is already in ctx.run_dir."""


def known_kinds() -> list[str]:
    return sorted(STAGES)


def get_stage(kind: str) -> ModuleType:
    """Import the module of a stage kind (``KeyError`` if the kind is unknown)."""
    return importlib.import_module(STAGES[kind])
