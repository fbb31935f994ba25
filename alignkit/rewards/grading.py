"""``alignkit grade``: score a jsonl of completions with one reward program."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignkit.core.errors import DataError
from alignkit.data.loading import read_jsonl
from alignkit.rewards.programs import load_reward
from alignkit.rewards.values import call_reward

@dataclass(frozen=True)
class GradeResult:
    mean: float  # over scored rows (None scores excluded); nan if none was scored
    n: int  # rows read
    out_path: str  # the graded jsonl written
    skipped: int = 0  # rows the program scored None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = read_jsonl(path)
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def _require(rows: list[dict[str, Any]], field: str, path: Path, option: str) -> None:
    for number, row in enumerate(rows, start=1):
        if field not in row:
            raise DataError(f"{path}: row {number} has no field {field!r} (fields found: {sorted(row)}); "
                            f"pass {option} to name the right one")


def grade_file(path: str | Path, reward: str, *, completion_field: str = "completion",
               answer_field: str | None = "answer", out_path: str | Path | None = None,
               base_dir: str | Path | None = None, batch_size: int = 512) -> GradeResult:
    """Score every row of a jsonl with one reward program; write each row plus ``score`` beside it.

    The program gets the ``completion_field`` column as ``completions``, the ``answer_field`` column as
    ``answer`` (``None``: none passed), and every other column under its own name. The output defaults to
    ``<stem>.graded.jsonl`` next to the input.
    """
    path = Path(path)
    fn = load_reward(reward, base_dir=base_dir)
    rows = _read_jsonl(path)
    _require(rows, completion_field, path, "--completion-field")
    if answer_field is not None:
        _require(rows, answer_field, path, "--answer-field")
    reserved = {completion_field, "completions"} | ({answer_field, "answer"} if answer_field is not None else set())
    others = sorted({k for row in rows for k in row} - reserved)
    scores: list[float | None] = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        kwargs = {k: [row.get(k) for row in batch] for k in others}
        if answer_field is not None:
            kwargs["answer"] = [row[answer_field] for row in batch]
        scores += call_reward(fn, reward, [row[completion_field] for row in batch], kwargs, first_row=start,
                              of=str(path))  # never a bare NaN in the output: a bad score is an error
    out = Path(out_path) if out_path is not None else path.with_name(f"{path.stem}.graded.jsonl")
    with out.open("w", encoding="utf-8") as f:
        for row, score in zip(rows, scores):
            f.write(json.dumps({**row, "score": score}, ensure_ascii=False) + "\n")
    scored = [s for s in scores if s is not None]
    mean = sum(scored) / len(scored) if scored else math.nan
    return GradeResult(mean=mean, n=len(rows), out_path=str(out), skipped=len(rows) - len(scored))


def grade_main(args: list[str]) -> int:
    """``alignkit grade FILE --reward R [--completion-field F] [--answer-field A] [--out PATH]``."""
    parser = argparse.ArgumentParser(prog="alignkit grade", description="Score a jsonl of completions with a "
                                     "reward program; writes <file>.graded.jsonl with a score per row.")
    parser.add_argument("file", help="jsonl, one object per line")
    parser.add_argument("--reward", required=True, help="e.g. reward/math.py:answer_match")
    parser.add_argument("--completion-field", default="completion", help="column holding the completion")
    parser.add_argument("--answer-field", default="answer",
                        help="column passed to the program as `answer`; 'none' to pass none")
    parser.add_argument("--out", default=None, help="output path (default: <file stem>.graded.jsonl beside it)")
    ns = parser.parse_args(args)
    answer_field = None if ns.answer_field.lower() == "none" else ns.answer_field
    result = grade_file(ns.file, ns.reward, completion_field=ns.completion_field, answer_field=answer_field,
                        out_path=ns.out)
    skipped = f" ({result.skipped} skipped)" if result.skipped else ""
    print(f"mean score {result.mean:.4f} over {result.n - result.skipped} rows{skipped}")
    print(f"graded rows: {result.out_path}")
    return 0
