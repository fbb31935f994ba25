"""``alignkit run --dry-run``'s data check: the first rows of every local dataset a stage will read, checked
against the format that stage asks for, so that a bad file in stage 3 is found before stage 1 trains.

The check runs the loader's own conversion (adapter, ``columns:``, per-row format check) on the first
:data:`HEAD_ROWS` rows of a local file or ``save_to_disk`` folder. Hub datasets, built-in generators and files an
earlier stage will write are not read (named as skipped); the built-in generators are run; a mixture is
checked part by part.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alignkit.core.config import DataSpec
from alignkit.core.errors import DataError

HEAD_ROWS = 100

# stage kind -> {config field (dotted for nested specs): format it is loaded as}; a format starting with "@"
# is read from that config field. Every `accuracy_data` is `problems`.
STAGE_FORMATS: dict[str, dict[str, str]] = {
    "sft": {"data": "sft"},
    "dpo": {"data": "preference", "pairs.prompts": "problems"},
    "reward": {"data": "preference", "eval_data": "preference"},
    "prm": {"data": "stepwise", "eval_data": "stepwise"},
    "grpo": {"data": "problems"},
    "rloo": {"data": "problems"},
    "ppo": {"data": "@data_format"},
    "label": {"data": "problems"},
    "rejection": {"data": "@data_format"},
    "rntp": {"data": "text", "eval_data": "text"},
    "cai-revise": {"data": "prompts"},
    "cai-label": {"data": "prompts"},
    "cai-compare": {"data": "prompts"},
    "merge": {"select_data": "problems"},
}


def stage_data(kind: str, config: Any) -> list[tuple[str, DataSpec, str]]:
    """(field, spec, format) for each dataset a stage of ``kind`` reads that is set in ``config``."""
    fields = dict(STAGE_FORMATS.get(kind, {}))
    fields.setdefault("accuracy_data", "problems")
    found = []
    for field, fmt in fields.items():
        value: Any = config
        for part in field.split("."):
            value = getattr(value, part, None)
        if isinstance(value, DataSpec):
            found.append((field, value, getattr(config, fmt[1:]) if fmt.startswith("@") else fmt))
    for env in getattr(config, "environments", None) or []:  # RL stages: each environment's own rows
        found.append((f"environments.{env.name}.data", env.data, env.data_format))
        if env.accuracy_data is not None:
            found.append((f"environments.{env.name}.accuracy_data", env.accuracy_data, "problems"))
    return found


def check_head(spec: DataSpec, fmt: str, head: int = HEAD_ROWS) -> str:
    """Check the first ``head`` rows of ``spec`` as ``fmt``: a one-line verdict (``ok``/``skipped``), or
    DataError naming the file, row and problem."""
    from alignkit.data.adapters import ADAPTERS
    from alignkit.data.loading import _convert, _rows, check_rows, is_saved_dataset, read_jsonl, read_saved

    if spec.mixture is not None:
        return "; ".join(f"part {i}: {check_head(part, fmt, head)}" for i, part in enumerate(spec.mixture))
    if spec.source in ("arith", "redteam", "code"):  # cheap to make: checked whole (its params, the format asked for)
        check_rows(_rows(spec, fmt), fmt)
        return f"ok (built-in {spec.source!r} as {fmt!r})"
    named = ADAPTERS.get(spec.source)
    location = spec.path if named is not None else spec.source
    if location is None or not Path(location).exists():
        looks_local = location is not None and (Path(location).suffix or location.startswith(("/", ".", "~")))
        return "skipped (not here yet: an earlier stage's output?)" if looks_local else "skipped (Hub dataset)"
    path = Path(location)
    if is_saved_dataset(path):
        saved = read_saved(path, spec.split)
        table = saved.select(range(min(head, len(saved))))
    elif [s for s in path.suffixes if s != ".gz"][-1:] == [".jsonl"]:
        table = read_jsonl(path, head=head)
    else:
        from alignkit.data.loading import read_file

        full = read_file(path)
        table = full.select(range(min(head, len(full))))
    checked = spec.model_copy(update={"limit": None, "skip": 0, "shuffle": False})  # the head is checked as is
    rows = _convert(table, checked, fmt, location, named.name if named else None)
    if not rows:
        return f"ok (the first {len(table)} rows were all skipped as unusable; later rows not checked)"
    check_rows(rows, fmt)  # what building the Dataset would refuse, without importing datasets for plain rows
    return f"ok (first {len(table)} rows as {fmt!r})"


def check_recipe_data(stages: list[Any]) -> list[str]:
    """Check every local dataset of ``stages`` (planned stages: ``.name``, ``.kind``, ``.config``): report lines;
    one DataError listing every problem found (each naming stage, field, file and row) if any is bad."""
    lines, problems = [], []
    for stage in stages:
        for field, spec, fmt in stage_data(stage.kind, stage.config):
            try:
                lines.append(f"   {stage.name}.{field}: {check_head(spec, fmt)}")
            except DataError as err:
                problems.append(f"{stage.name}.{field} ({fmt}): {err}")
    if problems:  # one line, like every alignkit error
        raise DataError("data check: " + "; ".join(problems))
    return lines
