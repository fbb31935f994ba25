"""Resumable work in numbered shards: the one scheme of the generating steps (the ``label``, ``cai-label`` and
``cai-revise`` stages, on-policy DPO pairs in :mod:`alignkit.data.pairs`, the eval suite's samples and
verifier scores in :mod:`alignkit.stages.eval`).

Shard ``j`` holds items ``[j * size, (j + 1) * size)`` and is two files in the stage's shard folder:
``shard-<j>.meta.json`` (its counts) written first, then ``shard-<j>.jsonl`` (its rows), each atomically, so a
shard is complete exactly when its ``.jsonl`` exists and a crash loses at most the shard in progress. Under
``accelerate launch`` rank ``r`` of ``w`` does the shards ``j % w == r``: the files are the same for any number
of processes, so a rerun with another world size still resumes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from alignkit.core.artifacts import write_json_atomic, write_jsonl_atomic


def count(n_items: int, size: int) -> int:
    """Number of shards of ``size`` items that hold ``n_items``."""
    return (n_items + size - 1) // size


def items(j: int, n_items: int, size: int) -> range:
    """The item indices shard ``j`` holds: ``[j * size, (j + 1) * size)``, cut at ``n_items``."""
    return range(j * size, min((j + 1) * size, n_items))


def path(shard_dir: Path, j: int) -> Path:
    return Path(shard_dir) / f"shard-{j:05d}.jsonl"


def pending(shard_dir: Path, n_items: int, size: int, rank: int, world: int) -> list[int]:
    """This rank's shards that are not complete yet."""
    return [j for j in range(count(n_items, size)) if j % world == rank and not path(shard_dir, j).is_file()]


def write(shard_dir: Path, j: int, rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    """Counts first, rows last: a shard is complete exactly when its .jsonl exists. A shard written again
    loses its old rows first, so a crash mid-write never leaves new counts beside old rows."""
    path(shard_dir, j).unlink(missing_ok=True)
    write_json_atomic(path(shard_dir, j).with_suffix(".meta.json"), meta)
    write_jsonl_atomic(path(shard_dir, j), rows)


def discard(shard_dir: Path, j: int) -> None:
    """Make shard ``j`` pending again (its rows first, then its counts); nothing happens if it is absent."""
    path(shard_dir, j).unlink(missing_ok=True)
    path(shard_dir, j).with_suffix(".meta.json").unlink(missing_ok=True)


def read(shard_dir: Path, j: int) -> list[dict[str, Any]]:
    """The rows of complete shard ``j``."""
    text = path(shard_dir, j).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def meta(shard_dir: Path, j: int) -> dict[str, Any]:
    """The counts written with shard ``j`` (present whenever the shard is complete)."""
    return json.loads(path(shard_dir, j).with_suffix(".meta.json").read_text(encoding="utf-8"))


def read_all(shard_dir: Path, n_shards: int, stage: str) -> list[tuple[list[dict[str, Any]], dict[str, Any]]]:
    """(rows, meta) of every shard in order; RuntimeError naming ``stage`` if one is missing."""
    missing = [j for j in range(n_shards) if not path(shard_dir, j).is_file()]
    if missing:
        raise RuntimeError(f"{stage} shards {missing[:5]} are missing after every process finished; rerun the stage")
    return [(read(shard_dir, j), meta(shard_dir, j)) for j in range(n_shards)]
