"""Reward programs: load them by name, weight and combine them, grade a file of completions with one.

A reward program is a plain function with TRL's reward-function convention::

    fn(completions: list, **columns) -> list[float | None]

``completions`` are strings or conversational message lists (``[{"role": "assistant", "content": ...}]``);
dataset columns arrive as keyword lists of the same length (``answer=[...]``); extra keywords (TRL also
passes ``prompts``, ``trainer_state``, ``log_metric``...) are ignored by ``**kwargs``; ``None`` skips a
sample. So the same function goes unchanged into ``GRPOTrainer(reward_funcs=...)``, into our stages and into
``alignkit grade``.

Recipes name a program ``reward/<file>.py:<function>`` (the file is looked up relative to the recipe's
directory, then the working directory, then the repository's shipped ``reward/`` folder) or by import path
``package.module:function``. A ``RewardSpec`` adds a weight and keyword options bound with
``functools.partial``; an option the function does not name is an error (never silently swallowed by its
``**kwargs``).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib
import importlib.util
import inspect
import json
import logging
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

import alignkit

from .config import Spec
from .errors import DataError, RecipeError

logger = logging.getLogger(__name__)

SHIPPED_ROOT = Path(alignkit.__file__).resolve().parents[1]  # holds the shipped reward/ folder
RewardFn = Callable[..., list]


def completion_text(completion: Any) -> str:
    """The text of one completion: a string, or the last message's content of a conversational completion.

    >>> completion_text("42"), completion_text([{"role": "assistant", "content": "The answer is 4."}])
    ('42', 'The answer is 4.')
    >>> completion_text([{"role": "assistant", "content": [{"type": "text", "text": "hi"}]}])
    'hi'
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content", "")
        if isinstance(content, list):  # multimodal parts: keep the text ones
            return "".join(part.get("text", "") for part in content if isinstance(part, dict))
        return "" if content is None else str(content)
    return "" if completion is None else str(completion)


# ------------------------------------------------------------------------------------------------ loading


def load_reward(ref: str, *, base_dir: str | Path | None = None) -> RewardFn:
    """The function named by ``ref``: ``path/to/file.py:function`` or ``package.module:function``.

    A relative file is looked up in ``base_dir`` (the recipe's directory), then the working directory, then
    the repository's shipped programs. Raises RecipeError (no file/field: the caller adds them) when the
    file, module or function is missing or not callable.
    """
    target, sep, name = ref.rpartition(":")
    if not sep or not target or not name:
        raise RecipeError(f"reward program {ref!r} must look like 'reward/math.py:answer_match' or "
                          "'package.module:function'")
    is_file = target.endswith(".py") or "/" in target or "\\" in target
    module = _load_file(target, base_dir) if is_file else _import_module(target)
    fn = getattr(module, name, None)
    if fn is None:
        available = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
                           and getattr(v, "__module__", None) == module.__name__)
        raise RecipeError(f"reward program {ref!r}: {target} has no function {name!r}; "
                          f"functions defined there: {available or 'none'}")
    if not callable(fn):
        raise RecipeError(f"reward program {ref!r}: {name!r} is a {type(fn).__name__}, not a function")
    return fn


def _candidates(path: Path, base_dir: str | Path | None) -> list[Path]:
    if path.is_absolute():
        return [path]
    roots = [Path(base_dir)] if base_dir is not None else []
    roots += [Path.cwd(), SHIPPED_ROOT, SHIPPED_ROOT / "reward"]
    return list(dict.fromkeys((root / path).resolve() for root in roots))


def _load_file(target: str, base_dir: str | Path | None) -> Any:
    candidates = _candidates(Path(target), base_dir)
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise RecipeError(f"reward program file {target!r} not found; looked in: "
                          + ", ".join(str(c) for c in candidates)
                          + ". Give a path relative to the recipe's directory, or 'package.module:function'.")
    # A unique module name per file: loading reward/math.py as "math" would shadow the standard library.
    digest = hashlib.sha1(str(found).encode()).hexdigest()[:10]
    module_name = f"alignkit_reward_{found.stem}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, found)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # registered before exec: pickling and dataclasses look it up
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[module_name]
        raise RecipeError(f"reward program file {found} failed to load: {type(error).__name__}: {error}") from error
    return module


def _import_module(target: str) -> Any:
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as error:
        if error.name and (target == error.name or target.startswith(error.name + ".")):
            raise RecipeError(f"reward module {target!r} cannot be imported: no module named {error.name!r}. "
                              "Install it, or give a file path like 'reward/math.py:answer_match'.") from error
        raise RecipeError(f"reward module {target!r} failed to import: {error}") from error
    except Exception as error:
        raise RecipeError(f"reward module {target!r} failed to import: {type(error).__name__}: {error}") from error


# ------------------------------------------------------------------------------------------- weighting


class RewardSpec(Spec):
    """One reward program in a recipe, with its weight and keyword options."""

    program: str = Field(..., description="'reward/<file>.py:<function>' or 'package.module:function'.")
    weight: float = Field(1.0, description="Multiplies this program's scores in the weighted sum.")
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Keyword options bound to the function (e.g. {timeout_s: 2})."
    )

    @field_validator("program")
    @classmethod
    def _has_function(cls, value: str) -> str:
        if ":" not in value:
            raise ValueError(f"{value!r} names no function; write 'reward/math.py:answer_match'")
        return value


#: ``program`` prefixes naming a trained model folder instead of a function: an outcome reward model
#: (``model:runs/x/rm/model`` or ``model:${rm.model}``) or a process reward model (``prm:${prm.model}``,
#: scored per step and aggregated with the PRM's own rule). The spec's ``kwargs`` go to the scorer.
MODEL_PREFIXES = ("model:", "prm:")


def is_model_reward(program: str) -> bool:
    """Whether ``program`` names a trained reward model folder rather than a function."""
    return program.startswith(MODEL_PREFIXES)


def bind_reward(spec: RewardSpec, base_dir: str | Path | None = None) -> RewardFn:
    """The spec's program with its ``kwargs`` bound; an option the program does not take is a RecipeError."""
    if is_model_reward(spec.program):
        return _model_reward(spec, base_dir)
    fn = load_reward(spec.program, base_dir=base_dir)
    if not spec.kwargs:
        return fn
    _check_options(spec, fn)
    return functools.partial(fn, **spec.kwargs)


def _check_options(spec: RewardSpec, fn: Callable, skip: frozenset = frozenset({"completions"})) -> None:
    params = inspect.signature(fn).parameters
    named = [p for p, v in params.items() if v.kind in (v.POSITIONAL_OR_KEYWORD, v.KEYWORD_ONLY)]
    unknown = sorted(set(spec.kwargs) - set(named) - skip)
    if unknown:
        raise RecipeError(f"reward {spec.program!r} has no option(s) {unknown}; its options are "
                          f"{[n for n in named if n not in skip]}")


def _model_reward(spec: RewardSpec, base_dir: str | Path | None) -> RewardFn:
    """A reward model folder as a TRL-convention reward function (RewardModelScorer or PRMScorer)."""
    prefix, _, folder = spec.program.partition(":")
    path = Path(folder).expanduser()
    if not path.is_absolute() and base_dir is not None and (Path(base_dir) / path).exists():
        path = Path(base_dir) / path
    if prefix == "prm":
        from .prm import PRMScorer as scorer_class
    else:
        from .reward_model import RewardModelScorer as scorer_class
    _check_options(spec, scorer_class.__init__, skip=frozenset({"self", "model_path"}))
    return scorer_class(str(path), **spec.kwargs)


def load_rewards(specs: list[RewardSpec], base_dir: str | Path | None = None) -> tuple[list[RewardFn], list[float]]:
    """``(funcs, weights)`` for ``GRPOTrainer(reward_funcs=funcs)`` and ``GRPOConfig(reward_weights=weights)``."""
    return [bind_reward(s, base_dir) for s in specs], [s.weight for s in specs]


class CombinedReward:
    """The weighted sum of several reward programs, itself a TRL-convention reward function.

    None handling matches GRPOTrainer 1.16 (which ``nansum``s weighted rewards and marks a row NaN only when
    every function gave None), so combining here and passing ``load_rewards`` to TRL score alike: a None
    counts as 0 in the sum; a row where every program gave None is None (unscorable, skipped). Nones are
    counted per program in ``none_counts`` and, inside a trainer, logged as ``<program>/none_frac``.
    """

    __name__ = "combined_reward"  # TRL names a reward by its __name__ in logs

    def __init__(self, funcs: list[RewardFn], weights: list[float], names: list[str]):
        self.funcs, self.weights, self.names = funcs, weights, names
        self.none_counts = {name: 0 for name in names}

    def __call__(self, completions: list, **kwargs: Any) -> list[float | None]:
        totals: list[float | None] = [None] * len(completions)
        for fn, weight, name in zip(self.funcs, self.weights, self.names):
            scores = list(fn(completions=completions, **kwargs))
            if len(scores) != len(completions):
                raise RecipeError(f"reward {name!r} returned {len(scores)} scores for {len(completions)} completions")
            nones = sum(s is None for s in scores)
            self.none_counts[name] += nones
            if kwargs.get("log_metric") is not None and completions:
                kwargs["log_metric"](f"{name}/none_frac", nones / len(completions))
            for i, score in enumerate(scores):
                if score is not None:
                    totals[i] = (totals[i] or 0.0) + weight * float(score)
        return totals


def combine_rewards(specs: list[RewardSpec], base_dir: str | Path | None = None) -> CombinedReward:
    """One function returning ``sum_i weight_i * score_i`` per completion (None rules on CombinedReward)."""
    funcs, weights = load_rewards(specs, base_dir)
    return CombinedReward(funcs, weights, [s.program for s in specs])


# ------------------------------------------------------------------------------------------------ grading


@dataclass(frozen=True)
class GradeResult:
    mean: float  # over scored rows (None scores excluded); nan if none was scored
    n: int  # rows read
    out_path: str  # the graded jsonl written
    skipped: int = 0  # rows the program scored None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}: line {number} is not valid JSON ({error.msg}); fix or delete it") from error
            if not isinstance(row, dict):
                raise DataError(f"{path}: line {number} is a JSON {type(row).__name__}, expected an object")
            rows.append(row)
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
        out = list(fn([row[completion_field] for row in batch], **kwargs))
        if len(out) != len(batch):
            raise RecipeError(f"reward {reward!r} returned {len(out)} scores for {len(batch)} completions")
        scores += [None if s is None else float(s) for s in out]
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
