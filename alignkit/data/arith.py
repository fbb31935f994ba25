"""``arith``: a seedable generator of multi-step arithmetic word problems, and an exact step checker.

A problem is a start value and a chain of operations (``+ k``, ``- k``, ``* k``) told as a word problem::

    Mia has 12 marbles. She gets 7 more, then gives away 5, then triples them.
    How many marbles does Mia have now?

and its solution is one operation per line, then the answer::

    Add 7: 12 + 7 = 19.
    Subtract 5: 19 - 5 = 14.
    Multiply by 3: 14 * 3 = 42.
    The answer is 42.

Every line is checkable, which is what makes this source useful: :func:`check_steps` finds the first wrong
step of any candidate solution, so Math-Shepherd labels and process reward models can be scored exactly.

Choices (documented once here):

1. Rows come from one ``random.Random(seed)`` in order, so the first ``n`` rows of a larger draw equal a
   draw of ``n`` (growing ``n`` never changes earlier problems).
2. Running values stay >= 1: a subtraction takes away at most ``value - 1``. When subtraction is the only
   operation the start value is at least ``steps + 1`` and each subtraction leaves 1 for every later step.
   Answers are therefore positive integers.
3. Multipliers are 2..min(5, max_operand) so that four steps stay in the thousands.
4. Planted errors (used for the ``stepwise`` and ``preference`` views) always make the value *larger*
   (an arithmetic slip of +1..3, or an operand off by one in the direction that raises the result), so a
   wrong chain can never go negative or land back on the gold answer; later steps are computed correctly
   from the wrong value, like a real slip that propagates.
"""

from __future__ import annotations

import random
import re
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator

from alignkit.core.config import Spec
from alignkit.core.errors import DataError

Op = Literal["+", "-", "*"]

_NAMES = [("Mia", "She"), ("Tom", "He"), ("Ava", "She"), ("Leo", "He"), ("Zoe", "She"), ("Sam", "He"),
          ("Ivy", "She"), ("Max", "He"), ("Nora", "She"), ("Ben", "He"), ("Lily", "She"), ("Omar", "He")]
_OBJECTS = [
    "marbles", "apples", "stickers", "coins", "books", "pencils", "shells", "cards", "stamps", "beads",
]
_INTROS = ["{name} has {a} {obj}.", "{name} starts with {a} {obj}.", "{name} collects {a} {obj}."]
_QUESTIONS = ["How many {obj} does {name} have now?", "How many {obj} does {name} have at the end?"]
# Phrase templates per operation; {k} is the operand. Multiplication by 2 and 3 uses a word instead.
_PHRASES: dict[str, list[str]] = {
    "+": ["gets {k} more", "finds {k} more", "buys {k} more", "is given {k} more"],
    "-": ["gives away {k}", "loses {k}", "sells {k}", "uses up {k}"],
    "*": ["ends up with {k} times as many"],
}
_MUL_WORDS = {2: "doubles them", 3: "triples them"}
_VERBS = {"+": "Add", "-": "Subtract", "*": "Multiply by"}

_INTRO_RE = re.compile(r"\b(?:has|starts with|collects) (\d+) [a-z]+\.")
_PHRASE_RE = re.compile(
    "|".join(
        [f"(?P<w{k}>{re.escape(word)})" for k, word in _MUL_WORDS.items()]
        + [
            f"(?P<{'add' if op == '+' else 'sub' if op == '-' else 'mul'}{i}>"
            + re.escape(t).replace(re.escape("{k}"), r"(\d+)") + ")"
            for op, templates in _PHRASES.items()
            for i, t in enumerate(templates)
        ]
    )
)
_STEP_RE = re.compile(
    r"^(?:(?P<verb>Add|Subtract|Multiply by) (?P<named>-?\d+): )?"
    r"(?P<left>-?\d+) (?P<op>[-+*]) (?P<right>-?\d+) = (?P<result>-?\d+)\.?$"
)
_ANSWER_RE = re.compile(r"^The answer is (?P<answer>-?\d+)\.?$")


class ArithParams(Spec):
    """``params:`` of the arith source (unknown keys are errors)."""

    n: int = Field(1000, gt=0, description="Number of problems.")
    steps: int | tuple[int, int] = Field((1, 3), description="Operations per problem, or an inclusive range.")
    max_operand: int = Field(20, ge=2, description="Largest start value / operand.")
    ops: list[Op] = Field(["+", "-", "*"], min_length=1, description="Operations to draw from.")
    seed: int | None = Field(None, description="Generator seed; default: the data spec's `seed`.")
    error_rate: float = Field(
        0.5, ge=0.0, le=1.0, description="stepwise view only: fraction of solutions with a planted error."
    )

    @field_validator("steps")
    @classmethod
    def _check_steps(cls, value: int | tuple[int, int]) -> tuple[int, int]:
        lo, hi = (value, value) if isinstance(value, int) else value
        if not 1 <= lo <= hi:
            raise ValueError(f"steps must be >= 1 (a range as [lo, hi] with lo <= hi), got {value!r}")
        return (lo, hi)


def parse_params(params: dict[str, Any], seed: int = 0) -> ArithParams:
    """Validate ``params`` (a DataSpec's) into :class:`ArithParams`, raising DataError naming the field."""
    try:
        parsed = ArithParams(**params)
    except ValidationError as err:
        problems = "; ".join(f"params.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise DataError(f"arith: invalid params: {problems}") from None
    return parsed if parsed.seed is not None else parsed.model_copy(update={"seed": seed})


def apply_op(value: int, op: str, k: int) -> int:
    """``value op k`` for op in + - *."""
    return value + k if op == "+" else value - k if op == "-" else value * k


def step_line(left: int, op: str, k: int, result: int) -> str:
    """One solution line, e.g. ``Add 7: 12 + 7 = 19.``."""
    return f"{_VERBS[op]} {k}: {left} {op} {k} = {result}."


def answer_line(answer: int) -> str:
    """The final line, ``The answer is N.``."""
    return f"The answer is {answer}."


def _draw_chain(rng: random.Random, p: ArithParams) -> tuple[int, list[tuple[str, int]]]:
    """A start value and a list of (op, operand) respecting the positivity rules (module note 2)."""
    n_steps = rng.randint(*p.steps)
    only_sub = set(p.ops) == {"-"}
    lowest = n_steps + 1 if only_sub else 2
    start = rng.randint(lowest, max(lowest, p.max_operand))
    value, chain = start, []
    for i in range(n_steps):
        # with subtraction only, leave 1 for each later step so that every step can subtract
        reserve = n_steps - i - 1 if only_sub else 0
        op = rng.choice([op for op in p.ops if op != "-" or value >= 2])
        if op == "*":
            k = rng.randint(2, min(5, p.max_operand))
        elif op == "-":
            k = rng.randint(1, min(p.max_operand, value - 1 - reserve))
        else:
            k = rng.randint(1, p.max_operand)
        chain.append((op, k))
        value = apply_op(value, op, k)
    return start, chain


def _phrase(rng: random.Random, op: str, k: int) -> str:
    if op == "*" and k in _MUL_WORDS:
        return _MUL_WORDS[k]
    return rng.choice(_PHRASES[op]).format(k=k)


def _word_problem(rng: random.Random, start: int, chain: list[tuple[str, int]]) -> str:
    name, pronoun = rng.choice(_NAMES)
    obj = rng.choice(_OBJECTS)
    intro = rng.choice(_INTROS).format(name=name, a=start, obj=obj)
    actions = ", then ".join(_phrase(rng, op, k) for op, k in chain)
    question = rng.choice(_QUESTIONS).format(name=name, obj=obj)
    return f"{intro} {pronoun} {actions}. {question}"


def solve(start: int, chain: list[tuple[str, int]]) -> tuple[list[str], list[int]]:
    """Solution lines (without the answer line) and the running value after each step."""
    steps, values, value = [], [], start
    for op, k in chain:
        result = apply_op(value, op, k)
        steps.append(step_line(value, op, k, result))
        values.append(result)
        value = result
    return steps, values


def make_record(prompt: str, start: int, chain: list[tuple[str, int]]) -> dict[str, Any]:
    """The native arith record: prompt, steps, answer, completion, values."""
    steps, values = solve(start, chain)
    answer = values[-1]
    return {
        "prompt": prompt,
        "steps": steps,
        "answer": str(answer),
        "completion": "\n".join(steps + [answer_line(answer)]),
        "values": values,
    }


def generate(params: ArithParams) -> list[dict[str, Any]]:
    """``params.n`` native records, deterministic in ``params.seed``."""
    rng = random.Random(params.seed)
    records = []
    for _ in range(params.n):
        start, chain = _draw_chain(rng, params)
        records.append(make_record(_word_problem(rng, start, chain), start, chain))
    return records


def arith_text(n: int, seed: int = 0, **params: Any) -> list[str]:
    """``n`` plain documents (question, newline, worked solution) for the ``text`` format.

    >>> arith_text(1, seed=3)[0].splitlines()[-1].startswith("The answer is ")
    True
    """
    p = parse_params({**params, "n": n, "seed": seed})
    return [f"{r['prompt']}\n{r['completion']}" for r in generate(p)]


def parse_problem(prompt: str) -> tuple[int, list[tuple[str, int]]]:
    """Recover (start, [(op, operand), ...]) from an arith word problem; DataError if it is not one."""
    intro = _INTRO_RE.search(prompt)
    if intro is None:
        raise DataError(f"not an arith problem (no start value found): {prompt[:80]!r}")
    chain = []
    for m in _PHRASE_RE.finditer(prompt, intro.end()):
        group = m.lastgroup
        if group.startswith("w"):
            chain.append(("*", int(group[1:])))
        else:
            op = {"add": "+", "sub": "-", "mul": "*"}[group[:3]]
            chain.append((op, int(m.group(m.lastindex + 1))))
    if not chain:
        raise DataError(f"not an arith problem (no operations found): {prompt[:80]!r}")
    return int(intro.group(1)), chain


def _step_is_right(line: str, op: str, k: int, value: int) -> bool:
    """One operation line against the problem's i-th operation and the correct running value."""
    m = _STEP_RE.match(line.strip())
    if m is None:
        return False
    named_ok = m["verb"] is None or (m["verb"] == _VERBS[op] and int(m["named"]) == k)
    return (
        named_ok
        and m["op"] == op
        and int(m["right"]) == k
        and int(m["left"]) == value
        and int(m["result"]) == apply_op(value, op, k)
    )


def check_steps(prompt_or_record: str | dict[str, Any], steps: list[str]) -> int | None:
    """Index of the first wrong step of a candidate solution to an arith problem, or None if none is wrong.

    ``steps`` are solution lines (e.g. ``completion.split("\\n")``). Step ``i < n_ops`` is right when it
    reads ``[Verb k: ]left op k = result[.]`` with: the problem's i-th operation and operand (in the optional
    ``Add 7:`` prefix too), ``left`` equal to the correct running value (the start value for i = 0), and
    ``result`` the exact value of ``left op k``. A line ``The answer is N[.]`` is right only after all
    ``n_ops`` operations and with N the gold answer. Anything else is wrong: an unparseable or blank line,
    an operation beyond the problem's last, any line after the answer line. A correct *prefix* (fewer lines,
    no answer yet) returns None: this judges the steps given, not completeness.

    >>> p = "Mia has 12 marbles. She gets 7 more, then gives away 5. How many marbles does Mia have now?"
    >>> check_steps(p, ["Add 7: 12 + 7 = 19.", "Subtract 5: 19 - 5 = 14.", "The answer is 14."]) is None
    True
    >>> check_steps(p, ["Add 7: 12 + 7 = 19.", "Subtract 5: 19 - 5 = 15.", "The answer is 15."])
    1
    """
    prompt = prompt_or_record["prompt"] if isinstance(prompt_or_record, dict) else prompt_or_record
    value, chain = parse_problem(prompt)
    for i, line in enumerate(steps):
        if i < len(chain):
            op, k = chain[i]
            if not _step_is_right(line, op, k, value):
                return i
            value = apply_op(value, op, k)
            continue
        m = _ANSWER_RE.match(line.strip())
        if i > len(chain) or m is None or int(m["answer"]) != value:
            return i
    return None


def corrupt(record: dict[str, Any], rng: random.Random) -> tuple[list[str], int]:
    """Solution lines (answer line included) with one planted error, and the index of the wrong step.

    The error is an arithmetic slip (result + 1..3) or an operand off by one; later steps are computed
    correctly from the wrong value (module note 4).
    """
    start, chain = parse_problem(record["prompt"])
    bad = rng.randrange(len(chain))
    value, lines = start, []
    for i, (op, k) in enumerate(chain):
        shown_k, slip = k, 0
        if i == bad:
            shifted = {"+": k + 1, "*": k + 1, "-": k - 1}[op]
            if rng.random() < 0.5 and shifted >= 1:
                shown_k = shifted
            else:
                slip = rng.randint(1, 3)
        result = apply_op(value, op, shown_k) + slip
        lines.append(step_line(value, op, shown_k, result))
        value = result
    return lines + [answer_line(value)], bad


def view(record: dict[str, Any], fmt: str, params: ArithParams, index: int) -> dict[str, Any]:
    """A native record as format ``fmt``.

    ``stepwise``: the solution's lines (answer line included) labelled True up to a planted error and False
    from it on (Math-Shepherd's "can this step still reach the answer"); a fraction ``error_rate`` of rows
    get an error. ``preference``: chosen the gold solution, rejected one with a planted error. The error
    draw is seeded by (seed, row index), so it does not depend on shuffling or limit.
    """
    rng = random.Random(params.seed * 1_000_003 + index)
    gold = record["steps"] + [answer_line(int(record["answer"]))]
    if fmt == "stepwise":
        if rng.random() < params.error_rate:
            lines, bad = corrupt(record, rng)
            return {"prompt": record["prompt"], "completions": lines,
                    "labels": [i < bad for i in range(len(lines))]}
        return {"prompt": record["prompt"], "completions": gold, "labels": [True] * len(gold)}
    if fmt == "preference":
        lines, _ = corrupt(record, rng)
        return {"prompt": record["prompt"], "chosen": record["completion"], "rejected": "\n".join(lines)}
    if fmt == "sft":
        return {"prompt": record["prompt"], "completion": record["completion"]}
    if fmt == "text":
        return {"text": f"{record['prompt']}\n{record['completion']}"}
    if fmt == "prompts":
        return {"prompt": record["prompt"]}
    return {k: record[k] for k in ("prompt", "answer", "steps", "values")}
