"""YAML recipe -> validated, resolved plan of stages.

A recipe::

    name: quickstart
    description: SFT SmolLM2 on arithmetic word problems
    defaults:            # copied into every stage whose config has the field (a stage's own value wins)
      model: smollm2-135m-instruct
      lora: {r: 16, alpha: 32}
    tracking: {report_to: wandb, wandb: {project: alignkit, mode: offline}}
    hub: {repo_id: me/arith-sft}      # optional
    stages:
      - kind: sft
        data: {source: arith, params: {n: 500}}
      - kind: dpo
        model: ${sft.model}           # an earlier stage's output, resolved at load time

Everything is checked before any work starts; every problem raises one :class:`RecipeError` naming the
recipe file and the field path (``stages.sft.lr``), and the CLI turns it into exit code 2.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from alignkit.core.artifacts import config_hash
from alignkit.core.config import DataSpec, HubSpec, TrackingSpec, hash_view, renamed_seen
from alignkit.core.errors import RecipeError
from alignkit.core.stage import STAGES, StageConfig, get_stage, known_kinds
from alignkit.generation.spec import BACKENDS, SPECS

TOP_LEVEL_KEYS = ("name", "description", "defaults", "tracking", "hub", "output_dir", "stages")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
REFERENCE = re.compile(r"\$\{([A-Za-z0-9_.\-]+)\.([A-Za-z0-9_]+)\}")
DATA_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".gz", ".txt")


@dataclass(frozen=True)
class PlannedStage:
    """One stage of a resolved recipe: its validated config and where its outputs will be."""

    index: int
    name: str
    kind: str
    config: StageConfig
    run_dir: Path
    outputs: dict[str, str]
    hash: str
    upstream: tuple[str, ...]
    legacy_hash: str = ""  # the hash alignkit <= 0.2.x wrote (it held the run folder's spelling); read until 0.3

    def same_config(self, manifest_hash: str) -> bool:
        """Whether a manifest's hash is this stage's config, by today's hash or the one older releases wrote."""
        return manifest_hash in (self.hash, self.legacy_hash)


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    file: str | None
    root: Path  # runs/<name>
    tracking: TrackingSpec
    hub: HubSpec | None
    stages: tuple[PlannedStage, ...]
    notes: tuple[str, ...] = ()  # one line per old field name read (see Spec.RENAMED), printed by the CLI

    def stage(self, name: str) -> PlannedStage:
        for planned in self.stages:
            if planned.name == name:
                return planned
        raise RecipeError(f"no stage named {name!r}; stages are {[s.name for s in self.stages]}", file=self.file)

    def resolved_dict(self) -> dict[str, Any]:
        """The recipe as it will run (references resolved, defaults applied), for saving and model cards."""
        return {
            "name": self.name,
            "description": self.description,
            "tracking": self.tracking.model_dump(mode="json"),
            "hub": self.hub.model_dump(mode="json") if self.hub else None,
            "stages": [s.config.model_dump(mode="json", exclude_none=True) for s in self.stages],
        }


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key written twice in one mapping (YAML's default: the last wins,
    so ``lr: 1e-4`` above a forgotten ``lr: 1e-3`` would silently train at 1e-3)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool, type(None))):  # `{{a: b}}:` (a mapping as a key)
                raise yaml.constructor.ConstructorError(
                    None, None, f"a key must be a plain name, got a {type(key).__name__} (doubled braces?)",
                    key_node.start_mark)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {seen[key] + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load_recipe(path: str | Path, overrides: list[str] = (), output_dir: str | None = None) -> Recipe:
    """Read, override (``--set a.b=c``), validate and resolve a recipe file."""
    path = Path(path)
    file = str(path)
    if not path.is_file():
        raise RecipeError("recipe file not found", file=file)
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader)
    except UnicodeDecodeError as exc:
        raise RecipeError(f"not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start})",
                          file=file) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(f"not valid YAML{where}: {getattr(exc, 'problem', exc)}", file=file) from None
    raw = apply_overrides(raw, overrides, file=file)
    return parse_recipe(raw, file=file, base_dir=path.parent, output_dir=output_dir)


def apply_overrides(raw: Any, overrides: list[str], *, file: str | None = None) -> Any:
    """Apply ``key.path=value`` overrides; ``stages.<name>.x`` addresses a stage by name (or kind)."""
    raw = copy.deepcopy(raw)
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key:
            raise RecipeError(f"--set {override!r}: expected KEY=VALUE, e.g. stages.sft.lr=1e-4", file=file)
        try:
            value = yaml.load(text, Loader=UniqueKeyLoader) if text else ""
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise RecipeError(f"--set {override!r}: the value is not valid YAML ({problem}); quote it, "
                              "e.g. --set 'stages.sft.lora={r: 8, alpha: 16}'", file=file, field=key) from None
        parts = key.split(".")
        node = raw
        for depth, part in enumerate(parts[:-1]):
            field = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                matches = [item for item in node if isinstance(item, dict) and _stage_name(item) == part]
                if not matches:
                    names = [_stage_name(item) for item in node if isinstance(item, dict)]
                    raise RecipeError(f"--set: no stage named {part!r} (stages: {names})", file=file, field=field)
                node = matches[0]
            elif isinstance(node, dict):
                node = node.setdefault(part, {})
                if not isinstance(node, (dict, list)):
                    raise RecipeError(f"--set: {field} is a value, not a section", file=file, field=field)
            else:
                raise RecipeError(f"--set: cannot descend into {field}", file=file, field=field)
        if not isinstance(node, dict):
            raise RecipeError("--set: target is not a mapping", file=file, field=key)
        node[parts[-1]] = value
    return raw


def _stage_name(stage: dict) -> str:
    return str(stage.get("name") or stage.get("kind"))


def parse_recipe(raw: Any, *, file: str | None, base_dir: Path, output_dir: str | None = None) -> Recipe:
    """Validate a recipe mapping and resolve it into a :class:`Recipe` (see the module docstring)."""
    if not isinstance(raw, dict):
        raise RecipeError("a recipe must be a mapping with 'name' and 'stages'", file=file)
    unknown = [key for key in raw if key not in TOP_LEVEL_KEYS]
    if unknown:
        raise RecipeError(f"unknown key(s) {unknown}; allowed: {list(TOP_LEVEL_KEYS)}", file=file, field=unknown[0])
    name = raw.get("name")
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise RecipeError(f"needs a name of letters, digits, '_', '-', '.' (got {name!r})", file=file, field="name")
    tracking = _validate_spec(TrackingSpec, raw.get("tracking") or {}, file, "tracking")
    hub = _validate_spec(HubSpec, raw["hub"], file, "hub") if raw.get("hub") else None
    root = Path(output_dir or raw.get("output_dir") or "runs") / name

    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, list) or not stages_raw:
        raise RecipeError("needs a non-empty list of stages", file=file, field="stages")
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise RecipeError("must be a mapping of field: value", file=file, field="defaults")

    planned: list[PlannedStage] = []
    notes: list[str] = []
    for index, stage_raw in enumerate(stages_raw):
        planned.append(_plan_stage(index, stage_raw, defaults, planned, root, file, base_dir, notes))
    _check_defaults_used(defaults, planned, file)
    _check_hub_stage(hub, planned, file)
    return Recipe(name, str(raw.get("description") or ""), file, root, tracking, hub, tuple(planned), tuple(notes))


def _check_hub_stage(hub: HubSpec | None, planned: list[PlannedStage], file) -> None:
    """``hub.stage`` names a stage of this recipe that writes a model, and is not combined with ``push: each``."""
    if hub is None or hub.stage is None:
        return
    if hub.push == "each":
        raise RecipeError("push: each exports every stage that writes a model; hub.stage picks one: drop one of them",
                          file=file, field="hub.stage")
    model_stages = [stage.name for stage in planned if "model" in stage.outputs]
    stage = next((s for s in planned if s.name == hub.stage), None)
    if stage is None:
        raise RecipeError(f"no stage named {hub.stage!r}; stages that write a model: {model_stages}",
                          file=file, field="hub.stage")
    if "model" not in stage.outputs:
        raise RecipeError(f"stage {hub.stage!r} ({stage.kind}) writes no model to export; stages that do: "
                          f"{model_stages}", file=file, field="hub.stage")


def _plan_stage(index, stage_raw, defaults, earlier, root, file, base_dir, notes: list[str]) -> PlannedStage:
    field = f"stages[{index}]"
    if not isinstance(stage_raw, dict):
        raise RecipeError("each stage must be a mapping with a 'kind'", file=file, field=field)
    kind = stage_raw.get("kind")
    if kind not in STAGES:
        raise RecipeError(f"unknown stage kind {kind!r}; known kinds: {known_kinds()}", file=file, field=f"{field}.kind")
    name = _stage_name(stage_raw)
    field = f"stages.{name}"
    if not NAME_PATTERN.match(name):
        raise RecipeError(f"stage name {name!r} must be letters, digits, '_', '-', '.'", file=file, field=f"{field}.name")
    if any(stage.name == name for stage in earlier):
        raise RecipeError(f"two stages are named {name!r}; give one a 'name:'", file=file, field=f"{field}.name")

    module = get_stage(kind)
    fields = module.Config.model_fields
    # defaults go by current names only: an old name (`max_steps` of label, now `max_solution_steps`) may mean
    # something else in another stage, so it is never copied by its old name
    renamed = {new: old for old, new in module.Config.RENAMED.items()}
    merged = {key: copy.deepcopy(value) for key, value in defaults.items()
              if key in fields and key not in stage_raw and renamed.get(key) not in stage_raw}
    merged.update(stage_raw)
    merged["name"] = name
    upstream: set[str] = set()
    resolved = _resolve_references(merged, earlier, file, field, upstream)

    config = _validate_spec(module.Config, resolved, file, field, notes)
    config = _check_local_paths(config, resolved, merged, file, field, base_dir)
    if hasattr(module, "check"):
        try:
            module.check(config, base_dir)
        except RecipeError as exc:
            raise RecipeError(exc.reason, file=file, field=f"{field}.{exc.field}" if exc.field else field) from None
    run_dir = root / name
    # Fields at their default are left out, so adding an optional field to a stage later does not
    # invalidate finished runs (a value set explicitly to the default is, rightly, the same config).
    view = hash_view(config, config.model_dump(mode="json", exclude_defaults=True))
    earlier_upstream = [stage for stage in earlier if stage.name in upstream]
    # A ${stage.output} reference resolves to a path under the run folder; the hash sees it relative to the
    # folder, so `-o runs` and `-o /abs/runs` are one run (the upstream stage's own hash is in the digest).
    digest = config_hash(kind, _relative_to_run_folder(view, root), [stage.hash for stage in earlier_upstream])
    legacy = config_hash(kind, view, [stage.legacy_hash or stage.hash for stage in earlier_upstream])
    outputs = {key: str(value) for key, value in module.outputs(run_dir).items()}
    return PlannedStage(index, name, kind, config, run_dir, outputs, digest, tuple(sorted(upstream)), legacy)


RUN_FOLDER = "${run}"


def _relative_to_run_folder(value: Any, root: Path) -> Any:
    """``value`` with every path under ``root`` (however spelled: as given, absolute, resolved) as ``${run}/...``."""
    spellings = sorted({str(root), os.path.abspath(root), str(root.resolve())}, key=len, reverse=True)

    def rewrite(item: Any) -> Any:
        if isinstance(item, dict):
            return {key: rewrite(v) for key, v in item.items()}
        if isinstance(item, list):
            return [rewrite(v) for v in item]
        if isinstance(item, str):
            for spelling in spellings:
                if item == spelling or item.startswith(spelling + os.sep):
                    return RUN_FOLDER + item[len(spelling):]
        return item

    return rewrite(value)


def _resolve_references(value: Any, earlier: list[PlannedStage], file, field: str, upstream: set[str]) -> Any:
    """Replace ``${stage.key}`` with that earlier stage's output path (recursively)."""
    if isinstance(value, dict):
        return {k: _resolve_references(v, earlier, file, f"{field}.{k}", upstream) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve_references(v, earlier, file, f"{field}[{i}]", upstream) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def substitute(match: re.Match) -> str:
        stage_name, key = match.groups()
        source = next((stage for stage in earlier if stage.name == stage_name), None)
        if source is None:
            names = [stage.name for stage in earlier] or "none"
            raise RecipeError(
                f"{match.group(0)} refers to no earlier stage named {stage_name!r} (earlier stages: {names}); "
                "a stage can only use outputs of stages listed before it",
                file=file,
                field=field,
            )
        if key not in source.outputs:
            raise RecipeError(
                f"{match.group(0)}: stage {stage_name!r} ({source.kind}) has no output {key!r}; "
                f"it has {sorted(source.outputs)}",
                file=file,
                field=field,
            )
        upstream.add(stage_name)
        return source.outputs[key]

    resolved = REFERENCE.sub(substitute, value)
    if "${" in resolved:
        raise RecipeError(f"malformed reference in {value!r}; write ${{stage.output}}", file=file, field=field)
    return resolved


def _validate_spec(spec_class: type[BaseModel], value: Any, file, field: str, notes: list[str] | None = None):
    renamed_seen.clear()
    try:
        config = spec_class.model_validate(value)
        for old, new in dict.fromkeys(renamed_seen) if notes is not None else ():
            notes.append(f"{file or 'recipe'}: {field}: `{old}` is now `{new}`; the old name is read until "
                         f"alignkit 0.3 (docs/recipes.md lists every field)")
        return config
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc = _shown_loc(error["loc"])
            path = f"{field}.{loc}" if loc else field
            got = error.get("input")
            hint = f" (got {got!r})" if error["type"] != "missing" and not isinstance(got, dict) else ""
            message = error["msg"].replace("Extra inputs are not permitted", "unknown field")
            message = message.removeprefix("Value error, ")  # our validators' own words, without pydantic's tag
            problems.append((path, f"{message}{hint}", error["loc"]))
        first_path, first_message, first_loc = problems[0]
        more = "".join(f"\n  {path}: {message}" for path, message, _ in problems[1:])
        allowed = ""
        if "unknown field" in first_message:
            fields = _fields_at(spec_class, list(first_loc))
            allowed = _did_you_mean(first_path.rsplit(".", 1)[-1], fields) + f"; allowed fields: {sorted(fields)}"
            allowed += _other_backends(first_path)
        raise RecipeError(first_message + allowed + more, file=file, field=first_path) from None


def _shown_loc(loc: tuple) -> str:
    """A pydantic error location as the recipe spells it: without validator names and without the tag a
    discriminated union adds (``generation.fast.batchsize`` is ``generation.batchsize`` in the recipe)."""
    parts = [str(part) for part in loc if not str(part).startswith("function-")]
    return ".".join(p for i, p in enumerate(parts) if not (i and parts[i - 1] == "generation" and p in BACKENDS))


def _other_backends(path: str) -> str:
    """For a ``generation`` option of another backend: which backends take it."""
    parent, _, name = path.rpartition(".")
    if not parent.endswith("generation"):
        return ""
    takers = [backend for backend, spec in SPECS.items() if name in spec.model_fields]
    return f" ({name} is an option of backend {' or '.join(takers)})" if takers else ""


def _fields_at(spec_class: type[BaseModel], loc: list) -> list[str]:
    """Field names of the (nested) spec that contains the last part of the error location ``loc``."""
    current, parts = spec_class, [str(p) for p in loc[:-1]]
    while parts:
        part = parts.pop(0)
        annotation = current.model_fields[part].annotation if part in current.model_fields else None
        candidates = [a for a in _flat_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        if len(candidates) > 1 and parts:  # a discriminated union: the next part is the tag that chose one
            tagged = [c for c in candidates if c.model_fields.get("backend") and c.model_fields["backend"].default == parts[0]]
            if tagged:
                parts.pop(0)
                candidates = tagged
        if not candidates:
            break
        current = candidates[0]
    return list(current.model_fields)


def _flat_args(annotation: Any) -> list[Any]:
    """The types inside ``X | Y``, ``Optional[X]`` and ``Annotated[X, ...]``, flattened."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Annotated:
        return _flat_args(args[0])
    if not args:
        return [annotation]
    return [flat for arg in args for flat in _flat_args(arg)]


# Field names users bring from TRL, Axolotl and LLaMA-Factory configs, and ours for the same thing
FOREIGN_NAMES = {
    "learning_rate": "lr", "per_device_train_batch_size": "batch_size", "micro_batch_size": "batch_size",
    "train_batch_size": "batch_size", "gradient_accumulation_steps": "grad_accum", "num_train_epochs": "epochs",
    "num_epochs": "epochs", "lora_r": "lora: {r: ...}", "lora_rank": "lora: {r: ...}",
    "lora_alpha": "lora: {alpha: ...}", "lora_dropout": "lora: {dropout: ...}",
    "lora_target": "lora: {target_modules: ...}", "lora_target_modules": "lora: {target_modules: ...}",
    "load_in_4bit": "quantization: {bits: 4}", "load_in_8bit": "quantization: {bits: 8}",
    "cutoff_len": "max_length", "sequence_len": "max_length", "max_seq_length": "max_length",
    "model_name_or_path": "model", "base_model": "model", "dataset": "data", "datasets": "data",
    "lr_scheduler_type": "lr_scheduler", "output_dir": "--output-dir",
}


def _did_you_mean(name: str, fields: list[str]) -> str:
    """``; did you mean `lr`?`` for a name another tool uses or a near-miss spelling, else ''."""
    ours = FOREIGN_NAMES.get(name)
    if ours is not None and (ours.startswith("--") or ours.split(":")[0] in fields):
        return f"; did you mean `{ours}`?"
    close = difflib.get_close_matches(name, fields, n=1, cutoff=0.75)
    return f"; did you mean `{close[0]}`?" if close else ""


def _looks_like_path(text: str) -> bool:
    return text.startswith(("/", "./", "../", "~")) or text.endswith(DATA_FILE_SUFFIXES)


def _check_local_paths(config, resolved, merged, file, field, base_dir: Path):
    """Local files a stage reads must exist now; outputs of earlier stages are exempt (not made yet)."""
    updates: dict[str, Any] = {}
    model = getattr(config, "model", None)
    if isinstance(model, str) and _looks_like_path(model) and "${" not in str(merged.get("model", "")):
        updates["model"] = _existing(model, base_dir, file, f"{field}.model", "model folder")
    for key, spec in config:
        if isinstance(spec, DataSpec):
            checked = _check_data_paths(spec, merged.get(key), file, f"{field}.{key}", base_dir)
            if checked is not spec:
                updates[key] = checked
    environments = getattr(config, "environments", None)
    if environments:  # RL stages: each environment's data files, checked like a stage's own
        raw_envs = merged.get("environments") if isinstance(merged.get("environments"), list) else []
        checked_envs = []
        for index, env in enumerate(environments):
            raw = raw_envs[index] if index < len(raw_envs) and isinstance(raw_envs[index], dict) else {}
            moved = {key: _check_data_paths(getattr(env, key), raw.get(key), file,
                                            f"{field}.environments.{env.name}.{key}", base_dir)
                     for key in ("data", "accuracy_data") if getattr(env, key) is not None}
            checked_envs.append(env.model_copy(update=moved))
        updates["environments"] = checked_envs
    return config.model_copy(update=updates) if updates else config


def _check_data_paths(spec: DataSpec, raw: Any, file, field: str, base_dir: Path) -> DataSpec:
    """``spec`` with its local paths (and those of its mixture parts) resolved; the same object if none moved."""
    if spec.mixture is not None:
        raw_parts = raw.get("mixture") if isinstance(raw, dict) else raw
        raw_parts = raw_parts if isinstance(raw_parts, list) else [None] * len(spec.mixture)
        parts = [_check_data_paths(part, raw_part, file, f"{field}[{i}]", base_dir)
                 for i, (part, raw_part) in enumerate(zip(spec.mixture, raw_parts))]
        return spec.model_copy(update={"mixture": parts}) if any(a is not b for a, b in zip(parts, spec.mixture)) \
            else spec
    raw = raw if isinstance(raw, dict) else {"source": raw}
    data_updates = {}
    for attr in ("source", "path"):
        text = getattr(spec, attr)
        if text and _looks_like_path(text) and "${" not in str(raw.get(attr, "")):
            data_updates[attr] = _existing(text, base_dir, file, f"{field}.{attr}", "data file")
    return spec.model_copy(update=data_updates) if data_updates else spec


def _existing(text: str, base_dir: Path, file, field: str, what: str) -> str:
    path = Path(text).expanduser()
    for candidate in (path, base_dir / path):
        if candidate.exists():
            return str(candidate)
    raise RecipeError(f"{what} {text!r} does not exist (looked in the current folder and {base_dir})",
                      file=file, field=field)


def _check_defaults_used(defaults: dict, planned: list[PlannedStage], file) -> None:
    for key in defaults:
        if not any(key in type(stage.config).model_fields for stage in planned):
            now = sorted({type(stage.config).RENAMED[key] for stage in planned if key in type(stage.config).RENAMED})
            hint = f"; it was renamed {' or '.join(now)}" if now else ""
            raise RecipeError(f"no stage in this recipe has a field {key!r}{hint}", file=file, field=f"defaults.{key}")
