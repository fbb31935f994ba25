"""Run a resolved recipe: skip finished stages, resume interrupted ones, hand outputs on.

First the run folder is locked (:mod:`.runlock`): a second ``alignkit run`` into it while this one lives is
refused at once. Then, for each stage, in order:

1. **Decide.** ``done`` with the same config hash -> skip. Otherwise run; if the previous attempt had a
   different hash its folder is stale and is cleared, if it had the same hash the stage resumes from what
   it left (checkpoints, data shards). ``--from STAGE`` clears and reruns that stage and every later one.
2. **Run.** Manifest ``running`` -> ``stage.run(config, ctx)`` -> manifest ``done`` with metrics, artifacts,
   timings and peak memory. Any exception (Ctrl-C and SIGTERM included) writes ``failed``/``interrupted``:
   never ``done``. A training stage whose loss or gradient norm goes nan/inf fails at that step
   (``failed_step`` in the manifest's metrics).
3. **Export/push** to the Hub when the recipe's ``hub:`` asks for it.

Under ``accelerate launch`` every process walks the same plan (so distributed trainers meet in the same
collectives), but only the main process writes manifests, logs and exports.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from datetime import timedelta
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from alignkit.core.artifacts import Manifest, write_json_atomic
from alignkit.core.errors import RecipeError, RunFolderBusy
from alignkit.core.perf import peak_memory_gib, reset_peak_memory
from alignkit.run.recipe import PlannedStage, Recipe
from alignkit.core.stage import StageContext, get_stage
from alignkit.core.runlock import RunLock
from alignkit.core.secrets import redact
from alignkit.core.tracking import Tracker


@dataclass
class StageOutcome:
    name: str
    kind: str
    action: str  # "skipped", "ran", "resumed", "planned"
    metrics: dict[str, Any]
    duration_s: float | None


def plan_actions(recipe: Recipe, from_stage: str | None = None) -> list[tuple[PlannedStage, str]]:
    """For each stage: ``skip``, ``run`` (fresh) or ``resume`` (same config, unfinished attempt)."""
    start = recipe.stage(from_stage).index if from_stage else None
    actions = []
    for stage in recipe.stages:
        manifest = Manifest.read(stage.run_dir)
        forced = start is not None and stage.index >= start
        if manifest and stage.same_config(manifest.config_hash) and not forced:
            actions.append((stage, "skip" if manifest.status == "done" else "resume"))
        else:
            actions.append((stage, "run"))
    return actions


def process_state():
    """accelerate's ``PartialState``, joining a gloo process group on machines without an accelerator.

    ``PartialState()`` takes accelerate's multi-CPU (gloo) path only when built with ``cpu=True``. Without it,
    each process of a CPU-only ``torchrun`` / ``accelerate launch`` (``WORLD_SIZE`` > 1) believes it is alone:
    every rank is "main", writes the manifest and merges the model, and barriers are no-ops. So: ``cpu=True``
    when several processes were launched and torch sees no accelerator (or accelerate asked for CPU).
    A single process is unaffected. The state is a singleton: later ``PartialState()`` calls share it (TRL's
    trainers included), so the process group's timeout set here is every barrier's: :func:`barrier_timeout`.
    """
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or (several and not torch.accelerator.is_available())
    return PartialState(cpu=cpu, timeout=barrier_timeout())


BARRIER_TIMEOUT_ENV = "ALIGNKIT_BARRIER_TIMEOUT_S"


def barrier_timeout() -> timedelta:
    """How long a rank waits at a barrier for the others: 6 hours unless ``ALIGNKIT_BARRIER_TIMEOUT_S`` says.

    Some work runs on the main process only while the other ranks wait (merging and saving a large model,
    writing a stage's outputs, converting the default model on first use); torch's default (30 minutes for
    gloo, 10 for NCCL) would kill a long run there. A rank that really died still ends the run: its peers
    see the broken connection at once, not at the timeout.
    """
    value = os.environ.get(BARRIER_TIMEOUT_ENV, "").strip()
    try:
        seconds = float(value) if value else 6 * 3600.0
    except ValueError:
        raise RecipeError(f"{BARRIER_TIMEOUT_ENV}={value!r} is not a number of seconds") from None
    if not seconds > 0:
        raise RecipeError(f"{BARRIER_TIMEOUT_ENV}={value!r} must be a positive number of seconds")
    return timedelta(seconds=seconds)


def run_recipe(recipe: Recipe, *, from_stage: str | None = None, echo=print) -> list[StageOutcome]:
    if from_stage is not None:
        recipe.stage(from_stage)  # an unknown name is refused before the run folder is touched
    state = process_state()
    with run_folder_lock(recipe.root, state):  # before anything is written: run.json, clean-up, manifests
        return _run_stages(recipe, state, from_stage, echo)


@contextmanager
def run_folder_lock(root: Path, state, option: str = "--output-dir"):
    """Hold the run folder's lock (:mod:`.runlock`) for the whole run, or raise :class:`RunFolderBusy` at once
    (naming ``option``, the flag that picks another folder). Also the ``alignkit eval`` output folder's lock.

    The main process takes it and the other ranks of this launch work under it; they learn whether it was
    refused, so that every rank stops alike instead of waiting in a barrier for a main process that left.
    """
    lock, refusal = RunLock(root, option), None
    if state.is_main_process:
        try:
            lock.acquire()
        except RunFolderBusy as exc:
            refusal = str(exc)
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        refusal = broadcast_object_list([refusal])[0]
    if refusal:
        raise RunFolderBusy(refusal)
    try:
        yield
    finally:
        lock.release()


def _run_stages(recipe: Recipe, state, from_stage: str | None, echo) -> list[StageOutcome]:
    is_main = state.is_main_process
    if not is_main:
        echo = quiet  # one console line per event under accelerate launch, not one per rank
    processes = f" on {state.num_processes} processes" if state.num_processes > 1 else ""
    run_info = _run_info(recipe, is_main)
    state.wait_for_everyone()
    if is_main:
        recipe.root.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(redact(recipe.resolved_dict()), sort_keys=False)
        (recipe.root / "recipe.resolved.yaml").write_text(text)

    outcomes = []
    for stage, action in plan_actions(recipe, from_stage):
        if action == "skip":
            manifest = Manifest.read(stage.run_dir)
            echo(f"[alignkit] {stage.name}: done with the same config, skipping")
            outcomes.append(StageOutcome(stage.name, stage.kind, "skipped", manifest.metrics, manifest.duration_s))
            continue
        if action == "run" and is_main and stage.run_dir.exists():
            shutil.rmtree(stage.run_dir)  # stale outputs of another config (or --from): start clean
        state.wait_for_everyone()
        echo(f"[alignkit] {stage.name}: {'resuming' if action == 'resume' else 'running'} ({stage.kind}){processes}")
        manifest = _run_stage(recipe, stage, state, is_main, run_info["group"])
        outcomes.append(StageOutcome(stage.name, stage.kind, "resumed" if action == "resume" else "ran",
                                     manifest.metrics, manifest.duration_s))
        if is_main and recipe.hub is not None:
            _maybe_push(recipe, stage, manifest, echo)
        state.wait_for_everyone()
    return outcomes


def quiet(*_args: Any) -> None:
    """``echo`` of the processes that are not the main one."""


def _run_info(recipe: Recipe, is_main: bool) -> dict[str, str]:
    """The run id/W&B group, created by the first run of this recipe folder and reused by reruns."""
    path = recipe.root / "run.json"
    if path.exists():
        return json.loads(path.read_text())
    run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
    info = {"run_id": run_id, "group": f"{recipe.name}-{run_id}"}
    if is_main:
        write_json_atomic(path, info)
    return info


def _run_stage(recipe: Recipe, stage: PlannedStage, state, is_main: bool, group: str) -> Manifest:
    module = get_stage(stage.kind)
    config_dict = stage.config.model_dump(mode="json")
    manifest = Manifest(stage.name, stage.kind, "running", stage.hash, config_dict, started_at=time.time())
    tracker = Tracker(recipe.tracking, group=group, job_type=stage.kind, name=f"{recipe.name}/{stage.name}",
                      config=config_dict, directory=recipe.root, enabled=is_main)
    if is_main:
        stage.run_dir.mkdir(parents=True, exist_ok=True)
        manifest.write(stage.run_dir)
    state.wait_for_everyone()
    reset_peak_memory()
    started = time.perf_counter()
    ctx = StageContext(recipe, stage, tracker, is_main, state)
    try:
        tracker.start()
        result = module.run(stage.config, ctx)
    except BaseException as exc:  # Ctrl-C and SIGTERM too: record, then let it propagate
        manifest.status = "interrupted" if isinstance(exc, (KeyboardInterrupt, SystemExit)) else "failed"
        manifest.error = f"{type(exc).__name__}: {exc}"
        if getattr(exc, "step", None) is not None:  # TrainingDiverged: the step that went nan/inf
            manifest.metrics = {"failed_step": exc.step}
        manifest.duration_s = time.perf_counter() - started
        if is_main:
            manifest.write(stage.run_dir)
        tracker.finish(failed=True)
        raise
    manifest.duration_s = round(time.perf_counter() - started, 2)
    manifest.peak_memory_gib = round(peak_memory_gib(), 3)
    manifest.metrics = {**result.metrics, "duration_s": manifest.duration_s,
                        "peak_memory_gib": manifest.peak_memory_gib}
    manifest.artifacts = result.artifacts
    manifest.finished_at = time.time()
    manifest.status = "done"
    # W&B summary: the stage's metrics once each, under `<stage>/<key>`: the names ctx.log_metrics logs them under
    # (unique across a recipe's stages, so its runs compare in one table), not a second copy under the bare key
    tracker.summary({f"{stage.name}/{key}": value for key, value in manifest.metrics.items()})
    tracker.finish()
    if is_main:
        manifest.write(stage.run_dir)
    return manifest


def _maybe_push(recipe: Recipe, stage: PlannedStage, manifest: Manifest, echo) -> None:
    """Export (and push) ``stage`` if ``hub:`` asks for it: hub.stage or the last stage, or each model stage."""
    from alignkit.run.hub import export_decision, export_stage, push_folder

    repo_id, message = export_decision(recipe, stage, manifest)
    if repo_id is None:
        if message:
            echo(f"[alignkit] {message}")
        return
    folder = export_stage(recipe, stage, manifest, repo_id=repo_id)
    echo(f"[alignkit] {stage.name}: exported to {folder}")
    if recipe.hub.push != "never":
        url = push_folder(folder, recipe.hub, repo_id=repo_id)
        echo(f"[alignkit] {stage.name}: pushed to {url}")


def format_summary(outcomes: list[StageOutcome], keys_per_stage: int = 4) -> str:
    """A short table of what the run did, one row per stage."""
    rows = [("stage", "kind", "action", "time", "metrics")]
    for outcome in outcomes:
        shown = {k: v for k, v in outcome.metrics.items() if k not in ("duration_s",)}
        preferred = sorted(shown, key=lambda k: (not any(w in k for w in ("accuracy", "loss", "reward")), k))
        text = ", ".join(f"{k}={_fmt(shown[k])}" for k in preferred[:keys_per_stage])
        duration = f"{outcome.duration_s:.0f}s" if outcome.duration_s is not None else "-"
        rows.append((outcome.name, outcome.kind, outcome.action, duration, text))
    widths = [max(len(str(row[i])) for row in rows) for i in range(4)]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row[:4], widths)) + "  " + row[4]
             for row in rows]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
