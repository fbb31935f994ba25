"""Experiment tracking: one W&B run per stage, grouped per recipe run.

Each stage is a W&B run with ``group`` = the recipe run and ``job_type`` = the stage kind. We open the run
ourselves before TRL's trainer starts, so TRL's ``WandbCallback`` logs its training curves into the same run.
Only the main process tracks.

The run's config has two keys: ``alignkit``, the resolved (redacted) stage config (``lr``, ``batch_size``), and
``trl``, everything the trainer's ``WandbCallback`` records (its TrainingArguments: ``learning_rate``,
``per_device_train_batch_size``, ...; the model's config; the parameter count), redacted too. The summary holds
each number once (:meth:`Tracker.summary`).
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any

from alignkit.core.config import TrackingSpec
from alignkit.core.errors import AlignkitError
from alignkit.core.secrets import redact, redact_argv, redact_text

#: the run config's two keys: our resolved stage config, and what the TRL/transformers trainer records
CONFIG_KEY, TRAINER_KEY = "alignkit", "trl"
# TRL's end-of-training summary values that restate a stage metric: ours win. `train_loss` is the mean over the
# steps this process ran, wrong after a resume, where `<stage>/train_loss` is the whole run's; `train_runtime` is
# `<stage>/train_seconds`
_TRAINER_SUMMARY_DROPPED = ("train_loss", "train_runtime")

# WANDB_MODE values wandb itself accepts, read as ours
_ENV_MODES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline",
              "disabled": "disabled"}


def wandb_mode(spec: TrackingSpec) -> str:
    """The recipe's ``tracking.wandb.mode`` when it sets one, else the environment's ``WANDB_MODE``, else online.

    A machine without network or login runs with ``WANDB_MODE=offline``: a recipe default must not override it.
    """
    if spec.wandb.mode is not None:
        return spec.wandb.mode
    return _ENV_MODES.get(os.environ.get("WANDB_MODE", "").strip().lower(), "online")


@contextlib.contextmanager
def _one_line_errors(mode: str):
    """A W&B login or connection problem is one line naming the way out, not wandb's traceback."""
    import wandb

    try:
        yield
    except (wandb.errors.Error, OSError) as exc:
        raise AlignkitError(f"W&B could not start a run in {mode} mode: {redact_text(str(exc)).splitlines()[0]} "
                            "Log in with `wandb login` (or set WANDB_API_KEY), or run with WANDB_MODE=offline "
                            "and `wandb sync` later, or set tracking.report_to: none") from None


@contextlib.contextmanager
def _masked_argv():
    """W&B records ``sys.argv`` in the run's metadata (and ``wandb sync`` uploads it): show it masked."""
    saved = sys.argv
    sys.argv = redact_argv(sys.argv)
    try:
        yield
    finally:
        sys.argv = saved


class Tracker:
    def __init__(self, spec: TrackingSpec, *, group: str, job_type: str, name: str, config: dict[str, Any],
                 directory: Path, enabled: bool = True):
        self.spec, self.group, self.job_type, self.name = spec, group, job_type, name
        self.config, self.directory = redact(config), Path(directory)
        self.mode = wandb_mode(spec)
        self.enabled = enabled and spec.report_to == "wandb" and self.mode != "disabled"
        self.run = None

    @property
    def report_to(self) -> str:
        """Value for TRL/transformers ``report_to`` (``none`` on non-main processes)."""
        if self.spec.report_to == "wandb" and not self.enabled:
            return "none"
        return self.spec.report_to

    def start(self) -> None:
        if not self.enabled:
            return
        import wandb

        wandb_spec = self.spec.wandb
        os.environ["WANDB_MODE"] = self.mode  # TRL's callback reads the environment, not our spec
        os.environ.setdefault("WANDB_SILENT", "true")
        os.environ.setdefault("WANDB_LOG_MODEL", "false")
        self.directory.mkdir(parents=True, exist_ok=True)
        with _masked_argv(), _one_line_errors(self.mode):
            self.run = wandb.init(
                project=wandb_spec.project,
                entity=wandb_spec.entity,
                group=redact(wandb_spec.group or self.group),
                job_type=self.job_type,
                name=redact(self.name),
                config={CONFIG_KEY: self.config},
                tags=redact(list(wandb_spec.tags)),
                dir=str(self.directory),
                mode=self.mode,
                reinit="finish_previous",
            )

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if self.run is not None:
            self.run.log(redact(metrics), step=step)

    def summary(self, metrics: dict[str, Any]) -> None:
        """Write ``metrics`` into the run summary, each number once.

        A metric that restates the last point of one of TRL's curves (``<stage>/train_steps`` is
        ``train/global_step``, ``<stage>/last_logged_loss`` is ``train/loss``) is left out, and taken out where
        ``ctx.log_metrics`` put it: TRL's curve keeps its number, as TRL's users know it under that name, and
        the metric stays in the manifest and the history.
        """
        if self.run is None:
            return
        for key, value in redact(metrics).items():
            curve = _restated_curve(key)
            if curve is not None and value is not None and self.run.summary.get(curve) == value:
                if self.run.summary.get(key) is not None:
                    del self.run.summary[key]
                continue
            self.run.summary[key] = value

    def log_image(self, key: str, path: str | Path) -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Image(str(path))})

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Table(columns=columns, data=redact(rows))})

    def finish(self, failed: bool = False) -> None:
        if self.run is not None:
            self.run.finish(exit_code=1 if failed else 0)
            self.run = None


def _restated_curve(key: str) -> str | None:
    """The TRL curve whose last point a stage metric (``<stage>/<name>``, named by ``stages.common.train_metrics``)
    restates: ``train_steps`` -> ``train/global_step``, ``last_logged_<x>`` -> ``train/<x>`` (``reward_`` back
    to ``rewards/``); None for any other metric.

    >>> [_restated_curve(key) for key in ("sft/train_steps", "dpo/last_logged_reward_margins", "sft/train_loss")]
    ['train/global_step', 'train/rewards/margins', None]
    """
    name = key.rsplit("/", 1)[-1]
    if name == "train_steps":
        return "train/global_step"
    if name.startswith("last_logged_"):
        return "train/" + name.removeprefix("last_logged_").replace("reward_", "rewards/", 1)
    return None


def use_nested_wandb_callback(trainer) -> None:
    """Swap the transformers ``WandbCallback`` that ``report_to: wandb`` gave ``trainer`` for one that records its
    config under ``trl`` (see the module docstring) and leaves out the end-of-training summary values that
    restate ours; same place in the callback list, so the order of logging and stopping is unchanged."""
    from transformers.integrations import WandbCallback

    callbacks = trainer.callback_handler.callbacks
    for index, callback in enumerate(callbacks):
        if type(callback) is WandbCallback:
            callbacks[index] = _nested_wandb_callback(WandbCallback)


def _nested_wandb_callback(base: type):
    class NestedWandbCallback(base):
        """transformers' ``WandbCallback``, its config under ``trl`` and redacted; TRL's summary duplicates dropped."""

        def setup(self, args, state, model, **kwargs):
            wandb = self._wandb
            self._wandb = _NestingWandb(wandb)  # setup() writes config through self._wandb.config only
            try:
                super().setup(args, state, model, **kwargs)
            finally:
                self._wandb = wandb

        def on_log(self, args, state, control, model=None, logs=None, **kwargs):
            logs = {key: value for key, value in (logs or {}).items() if key not in _TRAINER_SUMMARY_DROPPED}
            super().on_log(args, state, control, model=model, logs=logs, **kwargs)

    return NestedWandbCallback()


class _NestingWandb:
    """The ``wandb`` module as ``WandbCallback.setup`` sees it: the same, except that ``config`` nests what is
    written to it under :data:`TRAINER_KEY`, JSON-friendly and redacted."""

    def __init__(self, wandb):
        self._wandb, self.config = wandb, _NestedConfig(wandb.config)

    def __getattr__(self, name: str):
        return getattr(self._wandb, name)


class _NestedConfig:
    def __init__(self, config):
        self._config, self._values = config, {}

    def update(self, values: dict[str, Any], allow_val_change: bool = False) -> None:
        from wandb.util import json_friendly_val  # dataclasses (peft configs) to dicts, so redact() sees inside

        self._values.update(json_friendly_val(dict(values)))
        self._config.update({TRAINER_KEY: redact(self._values)}, allow_val_change=True)

    def __setitem__(self, key: str, value: Any) -> None:
        self.update({key: value})

    def get(self, key: str, default: Any = None) -> Any:
        return self._values.get(key, default)


def read_offline_run(run_dir: str | Path) -> dict[str, Any]:
    """Read a W&B offline run folder back: ``{"run", "config", "history", "summary"}`` dicts.

    W&B writes offline runs as a LevelDB-style log of protobuf ``Record``s (``run-<id>.wandb``): a 7-byte
    header, then 32 KiB blocks of chunks, each ``crc32 (4) | length (2, little endian) | type (1) | data``,
    type 1 = a full record, 2/3/4 = first/middle/last piece. A record whose last piece is not written yet (a
    live run) is left out. Used by tests and handy for checking what a run will upload before ``wandb sync``.
    """
    import json as _json

    from wandb.proto import wandb_internal_pb2

    (path,) = Path(run_dir).glob("run-*.wandb")
    data = path.read_bytes()
    block, offset, pieces, records = 32768, 7, b"", []
    while offset + 7 <= len(data):
        room = block - offset % block
        if room < 7:  # a block's tail too short for a chunk header is padding
            offset += room
            continue
        length = int.from_bytes(data[offset + 4:offset + 6], "little")
        kind = data[offset + 6]
        if offset + 7 + length > len(data):  # a run W&B is still writing: its last chunk is not all there yet
            break
        chunk = data[offset + 7:offset + 7 + length]
        offset += 7 + length
        if kind == 0 and length == 0:
            continue
        pieces = chunk if kind in (1, 2) else pieces + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            records.append(record)
    config: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    run: dict[str, Any] = {}
    for record in records:
        field = record.WhichOneof("record_type")
        if field == "run":
            run = {"group": record.run.run_group, "job_type": record.run.job_type,
                   "name": record.run.display_name, "project": record.run.project}
            for item in record.run.config.update:
                config[item.key] = _json.loads(item.value_json)
        elif field == "config":
            for item in record.config.update:
                config[item.key] = _json.loads(item.value_json)
        elif field == "history":
            history.append({item.key or "/".join(item.nested_key): _json.loads(item.value_json)
                            for item in record.history.item})
        elif field == "summary":
            for item in record.summary.update:
                summary[item.key or "/".join(item.nested_key)] = _json.loads(item.value_json)
            for item in record.summary.remove:
                summary.pop(item.key or "/".join(item.nested_key), None)
    return {"run": run, "config": config, "history": history, "summary": summary}
