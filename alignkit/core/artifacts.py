"""Run folders and stage manifests.

Layout of a run::

    runs/<recipe>/
      run.json                 # run id and W&B group, shared by every stage of this recipe run
      recipe.resolved.yaml     # the validated recipe, references resolved, secrets redacted
      <stage>/
        stage.json             # the manifest: status, config + hash, metrics, artifacts, timings, memory
        ...                    # whatever the stage writes (model/, checkpoints/, data shards, report)

A manifest is only ever replaced atomically (write to a temp file, then ``os.replace``), and it says
``done`` only after every artifact of the stage is in place, so a crash or Ctrl-C can never leave a stage
that a rerun would wrongly skip.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

from alignkit.core.secrets import redact

Status = Literal["running", "done", "failed", "interrupted"]
MANIFEST = "stage.json"


def config_hash(kind: str, config: dict[str, Any], upstream: list[str]) -> str:
    """Hash of what determines a stage's result: its kind, resolved config and its upstream stages' hashes.

    Including the upstream hashes means a change early in the recipe invalidates every stage that
    consumes its outputs, even though the referenced *paths* stay the same.
    """
    blob = json.dumps({"kind": kind, "config": config, "upstream": upstream}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class Manifest:
    stage: str
    kind: str
    status: Status
    config_hash: str
    config: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    started_at: float | None = None
    finished_at: float | None = None
    duration_s: float | None = None
    peak_memory_gib: float | None = None
    error: str | None = None

    @classmethod
    def read(cls, stage_dir: Path) -> "Manifest | None":
        path = Path(stage_dir) / MANIFEST
        if not path.exists():
            return None
        try:
            return cls(**json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError):
            return None  # unreadable manifest: treat the stage as never run

    def write(self, stage_dir: Path) -> None:
        payload = asdict(self)
        payload["config"] = redact(payload["config"])
        write_json_atomic(Path(stage_dir) / MANIFEST, payload)


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON so that readers see either the old file or the complete new one, never half of it."""
    _write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def write_jsonl_atomic(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write one JSON object per line so that readers see the whole file or none."""
    _write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def _write_text_atomic(path: Path, text: str) -> None:
    """A temp file in the same folder, fsynced, then renamed over ``path``: the rename is atomic, so a crash
    leaves the old file or the new one (and at worst a stray ``.<name>.*.tmp``, never a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temp folder beside ``final``; on success it replaces ``final`` in one rename.

    Used for model exports and merged weights: an interrupted save never leaves a folder that looks
    complete.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def now() -> float:
    return time.time()
