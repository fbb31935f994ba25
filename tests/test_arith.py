"""arith: determinism, gold answers against an independent oracle, and the exact step checker."""

from __future__ import annotations

import random
import re
import time

import pytest

from alignkit.core.config import DataSpec
from alignkit.data import arith_text, check_steps, load_dataset
from alignkit.data.arith import ArithParams, corrupt, generate, parse_params
from alignkit.core.errors import DataError

MIA = (
    "Mia has 12 marbles. She gets 7 more, then gives away 5, then triples them. "
    "How many marbles does Mia have now?"
)
MIA_GOLD = [
    "Add 7: 12 + 7 = 19.", "Subtract 5: 19 - 5 = 14.", "Multiply by 3: 14 * 3 = 42.", "The answer is 42.",
]

# The test's own reading of the word problems: phrase -> (op, operand from group 1 or fixed).
_ORACLE = [
    (r"(?:gets|finds|buys|is given) (\d+) more", "+"),
    (r"(?:gives away|loses|sells|uses up) (\d+)", "-"),
    (r"ends up with (\d+) times as many", "*"),
    (r"doubles them", "*2"),
    (r"triples them", "*3"),
]


def oracle_answer(prompt: str) -> int:
    """Evaluate the problem with Python's own arithmetic (eval), independent of arith.py."""
    expr = re.search(r"(?:has|starts with|collects) (\d+)", prompt).group(1)
    found = []
    for pattern, op in _ORACLE:
        for m in re.finditer(pattern, prompt):
            found.append((m.start(), op if len(op) == 2 else f"{op}{m.group(1)}"))
    for _, op in sorted(found):
        expr = f"({expr}){op}"
    return eval(expr)


def _gen(**params) -> list[dict]:
    return generate(parse_params(params))


def test_same_seed_same_rows_other_seed_other_rows():
    assert _gen(n=50, seed=3) == _gen(n=50, seed=3)
    assert [r["prompt"] for r in _gen(n=50, seed=3)] != [r["prompt"] for r in _gen(n=50, seed=4)]
    # growing n never changes earlier problems
    assert _gen(n=20, seed=3) == _gen(n=50, seed=3)[:20]


def test_gold_answers_match_independent_oracle():
    rows = _gen(n=400, seed=11, steps=[1, 4], max_operand=30)
    for r in rows:
        assert int(r["answer"]) == oracle_answer(r["prompt"]) >= 1
        assert r["completion"].split("\n") == r["steps"] + [f"The answer is {r['answer']}."]
        # every step's arithmetic evaluates, and chains from the previous value
        previous = None
        for line, value in zip(r["steps"], r["values"]):
            left, expr, result = re.match(r".*: ((\d+) [-+*] \d+) = (\d+)\.$", line).group(2, 1, 3)
            assert eval(expr) == int(result) == value
            assert previous is None or int(left) == previous
            previous = value
        assert r["values"][-1] == int(r["answer"])
        assert check_steps(r, r["completion"].split("\n")) is None


def test_params_shape_the_problems():
    rows = _gen(n=200, seed=1, steps=[2, 3], ops=["+", "-"], max_operand=9)
    assert {len(r["steps"]) for r in rows} == {2, 3}
    assert all("Multiply" not in s for r in rows for s in r["steps"])
    operands = [int(n) for r in rows for n in re.findall(r"(?:Add|Subtract) (\d+)", "\n".join(r["steps"]))]
    assert max(operands) <= 9
    only_sub = _gen(n=200, seed=2, steps=4, ops=["-"], max_operand=5)
    assert all(len(r["steps"]) == 4 and int(r["answer"]) >= 1 for r in only_sub)
    assert len({r["prompt"].split()[0] for r in rows}) > 5  # names vary


def test_bad_params_raise_data_error_naming_field():
    with pytest.raises(DataError, match="params.steps"):
        parse_params({"steps": [3, 1]})
    with pytest.raises(DataError, match="params.nn"):
        parse_params({"nn": 5})
    with pytest.raises(DataError, match=r"params.ops"):
        parse_params({"ops": ["/"]})


def test_check_steps_hand_worked():
    assert check_steps(MIA, MIA_GOLD) is None
    assert check_steps(MIA, MIA_GOLD[:2]) is None  # a correct prefix
    assert check_steps(MIA, [s.split(": ", 1)[1] for s in MIA_GOLD[:3]]) is None  # prefix "Add 7:" optional
    cases = {
        # arithmetic slip at step 1; later steps consistent with the wrong value
        1: ["Add 7: 12 + 7 = 19.", "Subtract 5: 19 - 5 = 15.", "Multiply by 3: 15 * 3 = 45.",
            "The answer is 45"],
        # wrong operand vs the problem (arithmetic itself is right)
        0: ["Add 8: 12 + 8 = 20.", "Subtract 5: 20 - 5 = 15."],
        2: ["Add 7: 12 + 7 = 19.", "Subtract 5: 19 - 5 = 14.", "Multiply by 2: 14 * 2 = 28."],
    }
    for index, steps in cases.items():
        assert check_steps(MIA, steps) == index
    # wrong running value: right arithmetic on a number that is not the previous result
    assert check_steps(MIA, ["Add 7: 12 + 7 = 19.", "Subtract 5: 20 - 5 = 15."]) == 1
    # ... or a wrong left operand whose (wrong) arithmetic happens to land on the right value
    assert check_steps(MIA, ["Add 7: 12 + 7 = 19.", "Subtract 5: 20 - 5 = 14."]) == 1
    # wrong operation, label disagreeing with the expression, garbage, blank line
    assert check_steps(MIA, ["Subtract 7: 12 - 7 = 5."]) == 0
    assert check_steps(MIA, ["Add 7: 12 * 7 = 84."]) == 0
    assert check_steps(MIA, ["Add 7: 12 + 7 = 19.", "so 14"]) == 1
    assert check_steps(MIA, ["Add 7: 12 + 7 = 19.", ""]) == 1
    # answer line: too early, wrong, extra lines after it, extra operation
    assert check_steps(MIA, ["Add 7: 12 + 7 = 19.", "The answer is 19."]) == 1
    assert check_steps(MIA, MIA_GOLD[:3] + ["The answer is 41."]) == 3
    assert check_steps(MIA, MIA_GOLD + ["Thanks!"]) == 4
    assert check_steps(MIA, MIA_GOLD[:3] + ["Add 1: 42 + 1 = 43."]) == 3


def test_check_steps_finds_planted_errors_at_exact_index():
    rng = random.Random(0)
    for record in _gen(n=300, seed=5, steps=[1, 4]):
        steps = record["completion"].split("\n")
        k = rng.randrange(len(record["steps"]))
        slipped = re.sub(r"= (\d+)\.$", lambda m: f"= {int(m.group(1)) + 1}.", steps[k])
        planted = steps[:k] + [slipped] + steps[k + 1:]
        assert check_steps(record["prompt"], planted) == k
        lines, bad = corrupt(record, rng)
        assert check_steps(record, lines) == bad
        assert lines[-1] != steps[-1]  # a planted error never lands on the gold answer


def test_check_steps_rejects_non_arith_prompt():
    with pytest.raises(DataError, match="not an arith problem"):
        check_steps("What is the capital of France?", ["Paris."])


def test_views_stepwise_and_preference_are_labelled_by_the_checker():
    spec = DataSpec(source="arith", seed=2, params={"n": 200, "error_rate": 0.5})
    stepwise = load_dataset(spec, "stepwise")
    n_bad = 0
    for row in stepwise:
        first_wrong = check_steps(row["prompt"], row["completions"])
        n = len(row["labels"])
        expected = [True] * n if first_wrong is None else [i < first_wrong for i in range(n)]
        assert row["labels"] == expected
        n_bad += first_wrong is not None
    assert 70 <= n_bad <= 130  # ~ error_rate * n
    pref = load_dataset(spec, "preference")
    for row in pref:
        assert check_steps(row["prompt"], row["chosen"].split("\n")) is None
        assert check_steps(row["prompt"], row["rejected"].split("\n")) is not None


def test_arith_text_and_timing():
    docs = arith_text(5, seed=9, steps=2)
    assert len(docs) == 5 and docs == arith_text(5, seed=9, steps=2)
    for doc in docs:
        prompt, *lines = doc.split("\n")
        assert len(lines) == 3 and check_steps(prompt, lines) is None
    import datasets  # noqa: F401  (time the generator, not the one-off import)

    start = time.perf_counter()
    load_dataset(DataSpec(source="arith", params={"n": 1000}), "sft")
    assert time.perf_counter() - start < 1.0


def test_params_default_seed_is_spec_seed():
    assert parse_params({}, seed=7).seed == 7 and parse_params({"seed": 1}, seed=7).seed == 1
    assert ArithParams().steps == (1, 3)
