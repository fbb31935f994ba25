"""Reward programs: load them by name, weight and combine them, grade a file of completions with one.

A reward program is a plain function with TRL's reward-function convention::

    fn(completions: list, **columns) -> list[float | None]

``completions`` are strings or conversational message lists (``[{"role": "assistant", "content": ...}]``);
dataset columns arrive as keyword lists of the same length (``answer=[...]``); extra keywords (TRL also
passes ``prompts``, ``trainer_state``, ``log_metric``...) are ignored by ``**kwargs``; ``None`` skips a
sample. So the same function goes unchanged into ``GRPOTrainer(reward_funcs=...)``, into our stages and into
``alignkit grade``. A score must be a finite number (bool, int, float) or None: anything else (NaN, "yes",
a wrong count) or an exception inside the program stops the consumer with a RewardError naming the program
and the row (:func:`check_scores`, :func:`call_reward`; :func:`bind_reward`'s functions check themselves).

Recipes name a program ``reward/<file>.py:<function>`` (the file is looked up relative to the recipe's
directory, then the working directory, then the shipped ``reward/`` folder: the clone's, or the copy inside the
installed package, see :mod:`alignkit.shipped`) or by import path
``package.module:function``. A ``RewardSpec`` adds a weight and keyword options bound with
``functools.partial``; an option the function does not name is an error (never silently swallowed by its
``**kwargs``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import importlib
import importlib.util
import inspect
import json
import logging
import math
import numbers
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from .config import Spec
from .errors import AlignkitError, DataError, RecipeError, RewardError
from .shipped import is_shipped, note, shipped_root

logger = logging.getLogger(__name__)

SHIPPED_ROOT = shipped_root()  # holds the shipped reward/ folder: the clone's top level, or the package's copy
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


# ------------------------------------------------------------------------------------------ checking scores
#
# Every place that consumes a reward's output goes through check_scores (call_reward, CheckedReward and
# check_step_scores use it): a reward is a finite number or None, nothing else. Python would accept more
# and quietly mean something wrong: bool(nan) and bool("no") are True (a wrong answer labelled right), NaN
# poisons a mean and is written as bare `NaN` (invalid JSON), a string sorts or sums by accident.


def check_scores(scores: Any, n: int, program: str, *, first_row: int = 0, of: str | None = None,
                 allow_none: bool = True) -> list[float | None]:
    """``scores`` as ``n`` floats (None kept where ``allow_none``), else a RewardError naming the program and row.

    Numbers are int, float, bool (True is 1.0) or a 0-d numpy/torch value; NaN, infinities, strings and
    anything else are errors. Rows are counted from ``first_row + 1`` "of ``of``" (a file), else of the batch.

    >>> check_scores([1, 0.5, True, None], 4, "reward/x.py:f")
    [1.0, 0.5, 1.0, None]
    >>> check_scores([1.0, "no"], 2, "reward/x.py:f", first_row=10, of="data.jsonl")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    alignkit.errors.RewardError: reward 'reward/x.py:f' returned 'no' (a str) for row 12 of data.jsonl; ...
    """
    values = _score_list(scores, program)
    if len(values) != n:
        raise RewardError(f"reward {program!r} returned {len(values)} scores for {n} completions "
                          f"({_rows(first_row, n, of)}); a reward returns one score per completion")
    where = of or f"a batch of {n}"
    return [_score(value, program, f"row {first_row + i + 1} of {where}", allow_none)
            for i, value in enumerate(values)]


def check_step_scores(scores: Any, steps: Sequence[Sequence[Any]], program: str) -> list[list[float]]:
    """A process reward model's output: per solution, a finite number per step (at most one per step of
    ``steps``: steps past the model's max length may be left unscored); else a RewardError."""
    rows = _score_list(scores, program)
    if len(rows) != len(steps):
        raise RewardError(f"reward {program!r} returned {len(rows)} step-score lists for {len(steps)} solutions")
    checked = []
    for i, (row, row_steps) in enumerate(zip(rows, steps)):
        values = _score_list(row, program)
        if len(values) > len(row_steps):
            raise RewardError(f"reward {program!r} returned {len(values)} step scores for the {len(row_steps)} "
                              f"steps of row {i + 1} of a batch of {len(rows)}")
        checked.append([_score(v, program, f"step {j + 1} of row {i + 1} of a batch of {len(rows)}", False)
                        for j, v in enumerate(values)])
    return checked


def call_reward(fn: RewardFn, program: str, completions: list, columns: dict[str, Any], *, first_row: int = 0,
                of: str | None = None, allow_none: bool = True) -> list[float | None]:
    """``fn(completions=completions, **columns)`` checked by :func:`check_scores`; an exception it raises
    becomes a RewardError naming the program and the rows (the CLI prints one line, not a traceback).
    ``columns`` is a dict, not keywords, so that no dataset column can collide with these options."""
    with _reward_failures(program, _rows(first_row, len(completions), of)):
        scores = fn(completions=completions, **columns)
    return check_scores(scores, len(completions), program, first_row=first_row, of=of, allow_none=allow_none)


class CheckedReward:
    """A reward program checked on every call (:func:`call_reward`), for callers we do not own: GRPOTrainer and
    RLOOTrainer call :func:`bind_reward`'s functions themselves. Named like the program for TRL's logs."""

    def __init__(self, fn: RewardFn, program: str):
        self.fn, self.program = fn, program
        self.__name__ = callable_name(fn)

    def __call__(self, completions: list, **columns: Any) -> list[float | None]:
        return call_reward(self.fn, self.program, completions, columns)


class AsyncCheckedReward(CheckedReward):
    """An async program, checked alike (TRL awaits a reward whose ``__call__`` is a coroutine function)."""

    async def __call__(self, completions: list, **columns: Any) -> list[float | None]:  # type: ignore[override]
        with _reward_failures(self.program, _rows(0, len(completions), None)):
            scores = await self.fn(completions=completions, **columns)
        return check_scores(scores, len(completions), self.program)


def checked(fn: RewardFn, program: str) -> CheckedReward:
    """``fn`` wrapped in a :class:`CheckedReward` (itself when it already is one)."""
    if isinstance(fn, CheckedReward):
        return fn
    inner = fn.func if isinstance(fn, functools.partial) else fn
    is_async = inspect.iscoroutinefunction(inner) or inspect.iscoroutinefunction(getattr(inner, "__call__", None))
    return (AsyncCheckedReward if is_async else CheckedReward)(fn, program)


def callable_name(fn: Any) -> str:
    """A reward's name as TRL logs it (TRL 1.16's ``get_callable_name`` rule, without importing TRL): the
    function's (through ``functools.partial``), else the class's."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__name__", type(fn).__name__)


def reward_name(fn: Any) -> str:
    """How messages name a reward: its program (checked), its model folder (scorers), else its function name."""
    return getattr(fn, "program", None) or getattr(fn, "model_path", None) or callable_name(fn)


def _score_list(scores: Any, program: str) -> list:
    if isinstance(scores, (str, bytes, dict)) or not isinstance(scores, Iterable):
        raise RewardError(f"reward {program!r} returned {_shown(scores)}, not a list with one score per completion")
    return list(scores)


def _score(value: Any, program: str, where: str, allow_none: bool) -> float | None:
    if value is None and allow_none:
        return None
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # a numpy scalar or 0-d tensor
        value = value.item()
    if isinstance(value, numbers.Real):  # bool, int, float, Fraction
        try:
            number = float(value)
        except OverflowError:  # an int too large for a float
            number = math.inf
        if math.isfinite(number):
            return number
    need = "a finite number or None" if allow_none else "a finite number"
    raise RewardError(f"reward {program!r} returned {_shown(value)} for {where}; a reward must return {need}")


def _shown(value: Any) -> str:
    text, kind = repr(value), type(value).__name__
    return f"{text if len(text) <= 60 else text[:57] + '...'} ({'an' if kind[0] in 'aeiou' else 'a'} {kind})"


def _rows(first_row: int, n: int, of: str | None) -> str:
    return f"rows {first_row + 1}-{first_row + n} of {of}" if of else f"a batch of {n} rows"


@contextlib.contextmanager
def _reward_failures(program: str, rows: str) -> Iterator[None]:
    """Re-raise an exception from inside a reward program as one RewardError line naming it and the rows."""
    try:
        yield
    except AlignkitError:
        raise  # already says what is wrong (a scorer's DataError, a nested reward's RewardError)
    except Exception as error:
        raise RewardError(f"reward {program!r} raised {type(error).__name__} on {rows}: {error}") from error


# ------------------------------------------------------------------------------------------------ loading


def load_reward(ref: str, *, base_dir: str | Path | None = None) -> RewardFn:
    """The function named by ``ref``: ``path/to/file.py:function`` or ``package.module:function``.

    A relative file is looked up in ``base_dir`` (the recipe's directory), then the working directory, then
    the shipped programs (:mod:`alignkit.shipped`). Raises RecipeError (no file/field: the caller adds them)
    when the file, module or function is missing or not callable.
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
    root = shipped_root()
    roots += [Path.cwd(), root, root / "reward"]
    return list(dict.fromkeys((root / path).resolve() for root in roots))


def _load_file(target: str, base_dir: str | Path | None) -> Any:
    candidates = _candidates(Path(target), base_dir)
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise RecipeError(f"reward program file {target!r} not found; looked in: "
                          + ", ".join(str(c) for c in candidates)
                          + ". Give a path relative to the recipe's directory, or 'package.module:function'.")
    if is_shipped(found):
        note("reward", target, found)
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


def bind_reward(spec: RewardSpec, base_dir: str | Path | None = None) -> CheckedReward:
    """The spec's program with its ``kwargs`` bound, as a :class:`CheckedReward` (a score that is not a finite
    number or None is a RewardError); an option the program does not take is a RecipeError."""
    if is_model_reward(spec.program):
        return checked(_model_reward(spec, base_dir), spec.program)
    fn = load_reward(spec.program, base_dir=base_dir)
    if spec.kwargs:
        _check_options(spec, fn)
        fn = functools.partial(fn, **spec.kwargs)
    return checked(fn, spec.program)  # TRL gets these functions: they check their own scores


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
        self.funcs = [checked(fn, name) for fn, name in zip(funcs, names, strict=True)]
        self.weights, self.names = weights, names
        self.none_counts = {name: 0 for name in names}

    def __call__(self, completions: list, **kwargs: Any) -> list[float | None]:
        per_program = []
        for fn, name in zip(self.funcs, self.names):
            scores = fn(completions=completions, **kwargs)  # checked: finite floats or None, one per completion
            nones = sum(s is None for s in scores)
            self.none_counts[name] += nones
            if kwargs.get("log_metric") is not None and completions:
                kwargs["log_metric"](f"{name}/none_frac", nones / len(completions))
            per_program.append(scores)
        return weighted_total(per_program, self.weights) if per_program else [None] * len(completions)


def weighted_total(scores: list[list[float | None]], weights: list[float]) -> list[float | None]:
    """Per completion, ``sum_k weights[k] * scores[k][i]`` with TRL 1.16's None rule: a None counts 0, and a
    completion every program scored None stays None.

    >>> weighted_total([[1.0, None, None], [0.5, 0.5, None]], [1.0, 0.1])
    [1.05, 0.05, None]
    """
    if len(scores) != len(weights):
        raise ValueError(f"{len(scores)} score lists for {len(weights)} weights")
    totals: list[float | None] = [None] * (len(scores[0]) if scores else 0)
    for row, weight in zip(scores, weights):
        for i, score in enumerate(row):
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
    from .data.loading import read_jsonl

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
