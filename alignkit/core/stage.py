"""The stage contract: what a stage module provides, what it is given, what it returns; and the registry.

A stage is a *module* (``alignkit/stages/<kind>.py``) that reads top to bottom: a ``Config`` class, an
``outputs()`` function naming what later stages may reference, and ``run(config, ctx) -> StageResult``. There
is no base class with behaviour to inherit (torchtune's rule): the pipeline relies only on the names in
:class:`Stage`. Modules are imported lazily so that ``alignkit run --dry-run`` and validation stay fast.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import Field

from alignkit.core.config import Spec

if TYPE_CHECKING:  # types only: the run package builds contexts, the core does not import it
    from alignkit.core.tracking import Tracker
    from alignkit.run.recipe import PlannedStage, Recipe

#: kind -> module. New stage kinds register here (one line) and nowhere else.
STAGES: dict[str, str] = {
    "sft": "alignkit.stages.sft",
    "reward": "alignkit.stages.reward",
    "dpo": "alignkit.stages.dpo",
    "grpo": "alignkit.stages.grpo",
    "rloo": "alignkit.stages.rloo",
    "label": "alignkit.stages.label",
    "rejection": "alignkit.stages.rejection",
    "prm": "alignkit.stages.prm",
    "eval": "alignkit.stages.eval",
    "ppo": "alignkit.stages.ppo",
    "rntp": "alignkit.stages.rntp",
    "cai-revise": "alignkit.stages.cai_revise",
    "cai-label": "alignkit.stages.cai_label",
    "cai-compare": "alignkit.stages.cai_compare",
    "merge": "alignkit.stages.merge",
}


class StageConfig(Spec):
    """Fields every stage config has; stage configs subclass this and add their own."""

    kind: str = Field(..., description="Stage kind, one of the registry's keys.")
    name: str | None = Field(None, description="Stage name (default: the kind); folder and reference name.")


@dataclass
class StageResult:
    """What a stage returns: metrics for the manifest/W&B/summary table and the paths it wrote."""

    metrics: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)


@dataclass
class StageContext:
    """Everything a stage needs besides its config."""

    recipe: Recipe
    stage: PlannedStage
    tracker: Tracker
    is_main: bool
    state: Any  # accelerate.PartialState

    @property
    def run_dir(self) -> Path:
        return self.stage.run_dir

    @property
    def name(self) -> str:
        return self.stage.name

    @property
    def recipe_dir(self) -> Path | None:
        """The recipe file's folder: relative paths in the recipe (reward programs, constitutions, suites) are
        looked up there first. None for a recipe built in memory."""
        return Path(self.recipe.file).parent if self.recipe.file else None

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Log ``metrics`` as they are (keys already chosen, e.g. TRL-style ``train/loss``)."""
        self.tracker.log(metrics, step=step)

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Log the numbers among a stage's metrics under its name (``<name>/<key>``): two stages of one kind
        in a recipe (``sft`` twice, ``prm`` and ``orm``) never share keys."""
        self.tracker.log({f"{self.name}/{k}": v for k, v in metrics.items()
                          if isinstance(v, (int, float)) and not isinstance(v, bool)}, step=step)

    def wait(self) -> None:
        """Barrier across processes (no-op in a single process)."""
        self.state.wait_for_everyone()


class Stage(Protocol):
    """What the pipeline needs from a stage module."""

    Config: type[StageConfig]

    def outputs(self, run_dir: Path) -> dict[str, str]:
        """Paths this stage will produce, known before it runs (so ``${stage.key}`` resolves at load)."""

    def run(self, config: StageConfig, ctx: StageContext) -> StageResult:
        """Do the work. Must be resumable from what is already in ``ctx.run_dir``."""


def known_kinds() -> list[str]:
    return sorted(STAGES)


def get_stage(kind: str) -> ModuleType:
    """Import the module of a stage kind (``KeyError`` if the kind is unknown)."""
    return importlib.import_module(STAGES[kind])
