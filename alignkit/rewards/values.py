"""Reward values: what a reward program returns, checked before anything consumes it.

A score must be a finite number (bool, int, float) or None (skip the sample); anything else (NaN, "yes", a
wrong count) or an exception inside the program stops the consumer with a RewardError naming the program and
the row. Every consumer (label, grade, PPO, GRPO/RLOO, pairs, eval, the PRM and reward-model scorers) goes
through :func:`check_scores` or :func:`call_reward`.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from alignkit.core.errors import AlignkitError, RewardError

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
    alignkit.core.errors.RewardError: reward 'reward/x.py:f' returned 'no' (a str) for row 12 of data.jsonl; ...
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
