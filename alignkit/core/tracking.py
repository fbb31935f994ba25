"""Experiment tracking: one W&B run per stage, grouped per recipe run.

Each stage is a W&B run with ``group`` = the recipe run, ``job_type`` = the stage kind and ``config`` = the
resolved (redacted) stage config. We open the run ourselves before TRL's trainer starts, so TRL's
``WandbCallback`` logs its training curves into the same run. Only the main process tracks.
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
                config=self.config,
                tags=redact(list(wandb_spec.tags)),
                dir=str(self.directory),
                mode=self.mode,
                reinit="finish_previous",
            )

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if self.run is not None:
            self.run.log(redact(metrics), step=step)

    def summary(self, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            for key, value in redact(metrics).items():
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


def read_offline_run(run_dir: str | Path) -> dict[str, Any]:
    """Read a W&B offline run folder back: ``{"run", "config", "history", "summary"}`` dicts.

    W&B writes offline runs as a LevelDB-style log of protobuf ``Record``s (``run-<id>.wandb``): a 7-byte
    header, then 32 KiB blocks of chunks, each ``crc32 (4) | length (2, little endian) | type (1) | data``,
    type 1 = a full record, 2/3/4 = first/middle/last piece. Used by tests and handy for checking what a run
    will upload before ``wandb sync``.
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
    return {"run": run, "config": config, "history": history, "summary": summary}
