"""Reward programs: load them by name, weight and combine them.

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
installed package, see :mod:`alignkit.run.shipped`) or by import path
``package.module:function``. A ``RewardSpec`` adds a weight and keyword options bound with
``functools.partial``; an option the function does not name is an error (never silently swallowed by its
``**kwargs``).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import inspect
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from alignkit.core.config import Spec
from alignkit.core.errors import RecipeError
from alignkit.rewards.values import CheckedReward, RewardFn, checked
from alignkit.run.shipped import is_shipped, note, shipped_root

logger = logging.getLogger(__name__)

SHIPPED_ROOT = shipped_root()  # holds the shipped reward/ folder: the clone's top level, or the package's copy

# ------------------------------------------------------------------------------------------------ loading


def load_reward(ref: str, *, base_dir: str | Path | None = None) -> RewardFn:
    """The function named by ``ref``: ``path/to/file.py:function`` or ``package.module:function``.

    A relative file is looked up in ``base_dir`` (the recipe's directory), then the working directory, then
    the shipped programs (:mod:`alignkit.run.shipped`). Raises RecipeError (no file/field: the caller adds them)
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


def check_rewards(specs: list[tuple[str, RewardSpec]], base_dir: str | Path | None) -> None:
    """The load-time check of reward blocks, ``(field path, spec)`` each: the program exists, then takes the
    given ``kwargs``; RecipeError naming ``<field>.program`` or ``<field>.kwargs``. Model folders (``model:``,
    ``prm:``) may be made by an earlier stage, so they are checked when loaded."""
    for where, spec in specs:
        if is_model_reward(spec.program):
            continue
        try:
            load_reward(spec.program, base_dir=base_dir)
        except RecipeError as error:
            raise RecipeError(error.reason, field=f"{where}.program") from None
        try:
            bind_reward(spec, base_dir)  # now only the kwargs can be wrong
        except RecipeError as error:
            raise RecipeError(error.reason, field=f"{where}.kwargs") from None


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
        from alignkit.rewards.prm import PRMScorer as scorer_class
    else:
        from alignkit.rewards.reward_model import RewardModelScorer as scorer_class
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
