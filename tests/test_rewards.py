"""alignkit.rewards (loader, specs, weighted sums, value checks, grading a file) and reward/format.py."""

from __future__ import annotations

import asyncio
import doctest
import functools
import inspect
import json
import math
import os
import re
from pathlib import Path

import pytest

import alignkit.rewards as rewards
from alignkit.core.errors import DataError, RecipeError, RewardError
from alignkit.rewards.programs import RewardSpec, combine_rewards, load_reward, load_rewards
from alignkit.rewards.grading import grade_file, grade_main

REPO = Path(__file__).resolve().parents[1]


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def programs(tmp_path: Path) -> Path:
    """A recipe directory with two toy reward programs (lengths and a flag column)."""
    _write(tmp_path / "rw" / "toy.py",
           "def length(completions, **kwargs):\n    return [float(len(c)) for c in completions]\n\n"
           "def flag(completions, flag, scale=1.0, **kwargs):\n"
           "    return [None if f is None else scale * f for f in flag]\n\n"
           "NOT_A_FUNCTION = 3\n")
    return tmp_path


def test_docstring_examples() -> None:
    assert doctest.testmod(rewards).failed == 0
    assert doctest.testmod(inspect.getmodule(load_reward("reward/format.py:step_format"))).failed == 0


# ------------------------------------------------------------------------------------------- loading


def test_load_file_relative_to_base_dir(programs: Path, tmp_path_factory: pytest.TempPathFactory,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))  # not found via the working directory
    length = load_reward("rw/toy.py:length", base_dir=programs)
    assert length(["ab", "abcd"]) == [2.0, 4.0]
    with pytest.raises(RecipeError, match="not found; looked in"):
        load_reward("rw/toy.py:length")


def test_load_file_relative_to_cwd_and_absolute(programs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(programs)
    assert load_reward("rw/toy.py:length")(["abc"]) == [3.0]
    assert load_reward(f"{programs}/rw/toy.py:length")(["a"]) == [1.0]


def test_shipped_programs_found_from_anywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    answer_match = load_reward("reward/math.py:answer_match")
    assert answer_match(["The answer is 4."], answer=["4"]) == [1.0]
    # loaded under a private name: the standard library's math module is untouched
    assert answer_match.__module__.startswith("alignkit_reward_math_")
    assert math.sqrt(4) == 2.0


def test_load_dotted_path() -> None:
    assert load_reward("alignkit.rewards:completion_text") is rewards.completion_text
    assert load_reward("os.path:basename") is os.path.basename


@pytest.mark.parametrize("ref, message", [
    ("rw/missing.py:length", "not found"),
    ("rw/toy.py:nope", r"has no function 'nope'; functions defined there: \['flag', 'length'\]"),
    ("rw/toy.py:NOT_A_FUNCTION", "is a int, not a function"),
    ("rw/toy.py", "must look like"),
    ("no_such_package_xyz.mod:fn", "no module named 'no_such_package_xyz'"),
    ("alignkit.rewards.programs:nope", "has no function 'nope'"),
])
def test_load_errors_say_what_and_how(programs: Path, ref: str, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        load_reward(ref, base_dir=programs)


def test_broken_program_file_is_a_recipe_error(tmp_path: Path) -> None:
    _write(tmp_path / "bad.py", "def f(completions, **kwargs)\n    return []\n")
    with pytest.raises(RecipeError, match=r"failed to load: SyntaxError"):
        load_reward("bad.py:f", base_dir=tmp_path)


# ------------------------------------------------------------------------------- specs and weights


def test_spec_binds_options_and_rejects_unknown_ones(programs: Path) -> None:
    funcs, weights = load_rewards([RewardSpec(program="rw/toy.py:flag", weight=2.0, kwargs={"scale": 10.0}),
                                   RewardSpec(program="rw/toy.py:length")], base_dir=programs)
    assert isinstance(funcs[0].fn, functools.partial) and funcs[0].fn.func.__name__ == "flag"
    assert funcs[0].__name__ == "flag" and funcs[1].__name__ == "length"  # the names TRL logs them by
    assert funcs[0](["x"], flag=[0.5]) == [5.0] and weights == [2.0, 1.0]
    options = r"no option\(s\) \['scal'\]; its options are \['flag', 'scale'\]"
    with pytest.raises(RecipeError, match=options):
        load_rewards([RewardSpec(program="rw/toy.py:flag", kwargs={"scal": 10.0})], base_dir=programs)
    with pytest.raises(ValueError, match="names no function"):
        RewardSpec(program="reward/math.py")
    with pytest.raises(ValueError, match="Extra inputs"):
        RewardSpec(program="rw/toy.py:flag", wieght=2.0)


def test_combine_weights_and_none_like_trl(programs: Path) -> None:
    combined = combine_rewards([RewardSpec(program="rw/toy.py:length", weight=0.5),
                                RewardSpec(program="rw/toy.py:flag", weight=-2.0)], base_dir=programs)
    # hand-worked: 0.5 * len + (-2) * flag, a None flag counting as 0
    assert combined(["abcd", "ab", "abcdef"], flag=[1.0, None, 0.25]) == [0.0, 1.0, 2.5]
    assert combined.none_counts == {"rw/toy.py:length": 0, "rw/toy.py:flag": 1}


def test_combine_row_with_only_nones_is_skipped_and_logged(programs: Path) -> None:
    logged: list[tuple[str, float]] = []
    combined = combine_rewards([RewardSpec(program="rw/toy.py:flag")], base_dir=programs)
    # called as GRPOTrainer 1.16 calls a reward: keywords only, plus its own extras
    out = combined(prompts=["p", "q"], completions=["a", "b"], completion_ids=[[1], [2]], trainer_state=None,
                   log_extra=lambda *a: None, log_metric=lambda name, value: logged.append((name, value)),
                   flag=[None, 3.0])
    assert out == [None, 3.0]
    assert logged == [("rw/toy.py:flag/none_frac", 0.5)]
    assert combined.__name__ == "combined_reward"


# ----------------------------------------------------------------------------------------- grading


def test_grade_file_end_to_end(tmp_path: Path) -> None:
    rows = [
        {"completion": "2 + 2 = 4.\nThe answer is 4.", "answer": "4", "id": 1},
        {"completion": "The answer is 5.", "answer": "4", "id": 2},
        {"completion": r"So \boxed{\frac{1}{2}}", "answer": "0.5", "id": 3},
        {"completion": "The answer is 9.", "answer": None, "id": 4},  # no gold: skipped
    ]
    data = _write(tmp_path / "runs" / "samples.jsonl", "".join(json.dumps(r) + "\n" for r in rows) + "\n")
    result = grade_file(data, "reward/math.py:answer_match")
    assert (result.mean, result.n, result.skipped) == (pytest.approx(2 / 3), 4, 1)  # (1 + 0 + 1) / 3
    assert result.out_path == str(tmp_path / "runs" / "samples.graded.jsonl")
    graded = [json.loads(line) for line in Path(result.out_path).read_text().splitlines()]
    assert [g["score"] for g in graded] == [1.0, 0.0, 1.0, None]
    assert [g["id"] for g in graded] == [1, 2, 3, 4]


def test_grade_file_passes_other_columns_and_renamed_fields(programs: Path) -> None:
    data = _write(programs / "d.jsonl",
                  '{"text": "abc", "gold": 1, "flag": 0.5}\n{"text": "a", "gold": 2, "flag": 2}\n')
    result = grade_file(data, "rw/toy.py:flag", completion_field="text", answer_field="gold",
                        out_path=programs / "out.jsonl", base_dir=programs)
    assert (result.mean, result.out_path) == (1.25, str(programs / "out.jsonl"))


def test_grade_file_data_errors(tmp_path: Path) -> None:
    bad_json = _write(tmp_path / "bad.jsonl", '{"completion": "x", "answer": "1"}\n{"completion": \n')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        grade_file(bad_json, "reward/math.py:answer_match")
    missing = _write(tmp_path / "missing.jsonl", '{"response": "x", "answer": "1"}\n')
    with pytest.raises(DataError, match=r"row 1 has no field 'completion' \(fields found: \['answer', 'response'\]\)"):
        grade_file(missing, "reward/math.py:answer_match")
    with pytest.raises(DataError, match="no field 'gold'.*--answer-field"):
        grade_file(missing, "reward/math.py:answer_match", completion_field="response", answer_field="gold")
    with pytest.raises(DataError, match="no rows"):
        grade_file(_write(tmp_path / "empty.jsonl", "\n"), "reward/math.py:answer_match")


def test_grade_main_prints_mean_and_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _write(tmp_path / "s.jsonl", '{"out": "1 + 1 = 2.\\nThe answer is 2."}\n{"out": "The answer is 2"}\n')
    assert grade_main([str(data), "--reward", "reward/format.py:step_format", "--completion-field", "out",
                       "--answer-field", "none"]) == 0
    printed = capsys.readouterr().out
    assert "mean score 0.5000 over 2 rows" in printed  # (1.0 + 0.0) / 2: the second lacks its period
    assert str(tmp_path / "s.graded.jsonl") in printed


# ------------------------------------------------------------------------------------ format reward


@pytest.mark.parametrize("text, score", [
    ("Add 7: 12 + 7 = 19.\nSubtract 5: 19 - 5 = 14.\nThe answer is 14.", 1.0),
    ("12 + 7 = 19.\n\n   \nThe answer is 19.\n\n", 1.0),  # blank lines and trailing newlines are fine
    ("  3 * -2 = -6.  \n  The answer is -6.  ", 1.0),  # surrounding spaces stripped; negative answer
    ("0.5 + 1 = 1.5\nThe answer is 1.5.", 1.0),  # decimal answer
    ("The answer is 14.", 0.5),  # right final line, no working
    ("12 + 7 = 19.\nThe answer is 19", 0.0),  # missing period
    ("12 + 7 = 19.\nthe answer is 19.", 0.0),  # must match exactly
    ("12 + 7 = 19.\nThe answer is 19.\nHope this helps!", 0.0),  # text after the answer
    ("12 + 7 = 19.\nThe answer is 19 apples.", 0.0),  # unit
    ("12 + 7 = 19.\nThe answer is 1,900.", 0.0),  # thousands separator
    ("12 + 7 = 19.\nThe answer is $19.", 0.0),  # currency
    ("The answer is 18.\nThe answer is 19.", 0.0),  # two answers: a hedge
    ("12 + 7 = 19. The answer is 19.", 0.0),  # answer not on its own line
    ("", 0.0),
])
def test_step_format(text: str, score: float) -> None:
    step_format = load_reward("reward/format.py:step_format")
    assert step_format([text]) == [score]
    assert step_format([[{"role": "assistant", "content": text}]], answer=["ignored"]) == [score]


def test_model_prefixes_load_trained_scorers(tmp_path, tiny_seqcls_dir, tiny_tokencls_dir, monkeypatch):
    """`model:<folder>` is an outcome reward model and `prm:<folder>` a process reward model, both as
    TRL-convention reward functions; scorer options come from the spec's kwargs."""
    import alignkit.rewards.prm as prm
    import alignkit.rewards.reward_model as reward_model
    from alignkit.rewards.programs import RewardSpec, bind_reward, is_model_reward

    built = []

    class FakeScorer:
        def __init__(self, model_path, *, batch_size=16, max_length=1024, dtype="auto"):
            built.append((type(self).__name__, model_path, batch_size))

        def __call__(self, completions, prompts=None, **kwargs):
            return [float(len(c)) for c in completions]

    class FakePRM(FakeScorer):
        pass

    monkeypatch.setattr(reward_model, "RewardModelScorer", FakeScorer)
    monkeypatch.setattr(prm, "PRMScorer", FakePRM)
    assert is_model_reward("model:x") and is_model_reward("prm:x") and not is_model_reward("reward/math.py:f")
    orm = bind_reward(RewardSpec(program=f"model:{tiny_seqcls_dir}", kwargs={"batch_size": 4}))
    assert orm(["ab", "abc"], prompts=["q", "q"]) == [2.0, 3.0]
    (tmp_path / "rm").mkdir()
    bind_reward(RewardSpec(program="prm:rm"), base_dir=tmp_path)  # relative to the recipe's folder
    assert built == [("FakeScorer", str(tiny_seqcls_dir), 4), ("FakePRM", str(tmp_path / "rm"), 16)]
    with pytest.raises(RecipeError, match="no option"):
        bind_reward(RewardSpec(program="model:x", kwargs={"temperature": 2}))


# --------------------------------------------------------------------------------- checked scores
#
# A reward value that is not a finite number or None is an error at every consumer, and so is an exception
# inside the program: one RewardError naming the program and the row. Each consumer is driven through its
# cheapest entry point with a program whose output the test plans (`OUT`: a list, a non-list, or an
# exception to raise), always for two completions.

PLANNED = ("OUT = None\n\n"
           "def planned(completions, **kwargs):\n"
           "    if isinstance(OUT, Exception):\n"
           "        raise OUT\n"
           "    return OUT\n")
PLANNED_REF = "rw/planned.py:planned"


@pytest.fixture
def planned(programs: Path):
    """``plan(out)``: the next calls of rw/planned.py:planned return (or raise) ``out``."""
    _write(programs / "rw" / "planned.py", PLANNED)
    module = inspect.getmodule(load_reward(PLANNED_REF, base_dir=programs))

    def plan(out):
        module.OUT = out
    return plan


def _two_rows(base: Path) -> Path:
    return _write(base / "two.jsonl", '{"completion": "a", "answer": "1"}\n{"completion": "b", "answer": "2"}\n')


def _trl_call(fn):
    """Call a reward function the way GRPOTrainer / RLOOTrainer 1.16 do: keywords only, plus their extras."""
    return fn(prompts=["p", "q"], completions=["a", "b"], completion_ids=[[1], [2]], trainer_state=None,
              log_extra=lambda *a: None, log_metric=lambda *a: None, answer=["1", "2"])


def _grade_cli(base: Path):
    from alignkit.cli import main

    code = main(["grade", str(_two_rows(base)), "--reward", str(base / "rw" / "planned.py") + ":planned"])
    if code:
        raise SystemExit(code)


def _eval_grader(base: Path):
    from alignkit.evaluation.suite import Suite
    from alignkit.stages.eval import _grade

    suite = Suite.model_validate({"name": "t", "dataset": {"source": "arith"}, "grader": PLANNED_REF})
    _grade([{"gold": "1", "greedy": {"text": "a"}, "samples": [{"text": "b"}]}], suite, base)


def _eval_orm(base: Path):
    from alignkit.evaluation.suite import score_pairs

    score_pairs([{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "c", "rejected": "d"}],
                load_reward(PLANNED_REF, base_dir=base))


def _ppo(base: Path):
    from alignkit.ppo.rewards import score_sequences

    score_sequences(load_reward(PLANNED_REF, base_dir=base), ["p", "q"], ["a", "b"], {"answer": ["1", "2"]})


def _pairs(base: Path):
    from alignkit.data.pairs import score_samples

    score_samples(load_reward(PLANNED_REF, base_dir=base), [{"prompt": "p", "answer": "1"}], [["a", "b"]])


def _label(base: Path):
    from alignkit.stages.label import _verdicts

    _verdicts(load_reward(PLANNED_REF, base_dir=base), PLANNED_REF, ["a", "b"], ["1", "2"])


CONSUMERS = {
    "grade": lambda base: grade_file(_two_rows(base), PLANNED_REF, base_dir=base),
    "combined": lambda base: combine_rewards([RewardSpec(program=PLANNED_REF)], base)(["a", "b"], answer=["1", "2"]),
    "trl": lambda base: _trl_call(load_rewards([RewardSpec(program=PLANNED_REF)], base)[0][0]),
    "label": _label,
    "pairs": _pairs,
    "ppo": _ppo,
    "eval-grader": _eval_grader,
    "eval-orm": _eval_orm,
}

BAD = [  # (what the program returns for two completions, the message)
    ([1.0, math.nan], r"returned nan \(a float\) for row 2"),
    ([math.inf, 0.0], r"returned inf \(a float\) for row 1"),
    ([0.0, -math.inf], r"returned -inf \(a float\) for row 2"),
    (["yes", 1.0], r"returned 'yes' \(a str\) for row 1"),
    ([0.0, "no"], r"returned 'no' \(a str\) for row 2"),
    (["1.0", 1.0], r"returned '1.0' \(a str\) for row 1"),
    ([[1], 0.0], r"returned \[1\] \(a list\) for row 1"),
    ([0.0, {}], r"returned \{\} \(a dict\) for row 2"),
    ([object(), 0.0], r"returned <object object at \w+> \(an object\) for row 1"),
    ([1.0], r"returned 1 scores for 2 completions"),
    ([1.0, 0.0, 1.0], r"returned 3 scores for 2 completions"),
    ("yes", r"returned 'yes' \(a str\), not a list"),
    (1.0, r"returned 1.0 \(a float\), not a list"),
    (ZeroDivisionError("division by zero"), r"raised ZeroDivisionError on .*2.*: division by zero"),
]


@pytest.mark.parametrize("consumer", list(CONSUMERS))
@pytest.mark.parametrize("out, message", BAD, ids=[repr(o)[:20] for o, _ in BAD])
def test_a_bad_score_is_one_error_naming_the_program_and_row(planned, programs, consumer, out, message):
    planned(out)
    with pytest.raises(RewardError, match=message) as caught:
        CONSUMERS[consumer](programs)
    assert "planned" in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("out, message", BAD, ids=[repr(o)[:20] for o, _ in BAD])
def test_grade_command_prints_one_line_and_exits_2(planned, programs, capsys, out, message):
    planned(out)
    with pytest.raises(SystemExit) as code:
        _grade_cli(programs)
    assert code.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("alignkit: error: reward ") and "Traceback" not in err
    assert re.search(message, err) and "planned" in err
    assert not (programs / "two.graded.jsonl").exists()  # nothing half-graded is written


@pytest.mark.parametrize("body, message", [
    ("return [float('nan')] * len(completions)", r"returned nan \(a float\) for row 1 of .*two.jsonl"),
    ("return ['yes', 'no']", r"returned 'yes' \(a str\) for row 1 of .*two.jsonl"),
    ("raise RuntimeError('judge down')", r"raised RuntimeError on rows 1-2 of .*two.jsonl: judge down"),
])
def test_python_m_alignkit_grade_exits_2_without_traceback(tmp_path, body, message):
    import subprocess
    import sys

    _write(tmp_path / "bad.py", f"def bad(completions, **kwargs):\n    {body}\n")
    done = subprocess.run([sys.executable, "-m", "alignkit", "grade", str(_two_rows(tmp_path)), "--reward",
                           "bad.py:bad"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert re.search(r"^alignkit: error: reward 'bad.py:bad' " + message, done.stderr)


GOOD = [  # (returned, checked): numbers become floats, None stays None
    ([1, 0], [1.0, 0.0]),
    ([True, False], [1.0, 0.0]),
    ([0.25, None], [0.25, None]),
    ((-3, 2.5), [-3.0, 2.5]),
]


@pytest.mark.parametrize("out, expected", GOOD)
def test_numbers_bools_and_none_pass_unchanged(planned, programs, out, expected):
    planned(out)
    assert rewards.check_scores(out, 2, "p") == expected
    assert _trl_call(load_rewards([RewardSpec(program=PLANNED_REF)], programs)[0][0]) == expected
    assert combine_rewards([RewardSpec(program=PLANNED_REF, weight=2.0)], programs)(["a", "b"]) == [
        None if v is None else 2.0 * v for v in expected]
    graded = Path(grade_file(_two_rows(programs), PLANNED_REF, base_dir=programs).out_path).read_text()
    assert [json.loads(line)["score"] for line in graded.splitlines()] == expected
    from alignkit.stages.label import _verdicts

    assert _verdicts(load_reward(PLANNED_REF, base_dir=programs), PLANNED_REF, ["a", "b"], ["1", "2"]) == [
        bool(v) for v in expected]


def test_numpy_and_torch_scalars_are_numbers():
    import numpy as np
    import torch

    assert rewards.check_scores([np.float32(0.5), np.bool_(True)], 2, "p") == [0.5, 1.0]
    assert rewards.check_scores(torch.tensor([1.0, 0.0]), 2, "p") == [1.0, 0.0]
    assert rewards.check_scores(np.array([2, 3]), 2, "p") == [2.0, 3.0]
    with pytest.raises(RewardError, match=r"returned nan \(a float\) for row 1"):
        rewards.check_scores(np.array([np.nan]), 1, "p")
    with pytest.raises(RewardError, match=r"returned 'x' \(a str\)"):
        rewards.check_scores([np.str_("x")], 1, "p")


def test_none_is_an_error_where_a_number_is_needed():
    with pytest.raises(RewardError, match=r"returned None \(a NoneType\) for row 2 of a batch of 2; a reward "
                       r"must return a finite number$"):
        rewards.check_scores([1.0, None], 2, "runs/rm/model", allow_none=False)


def test_step_scores_are_checked(planned, programs):
    from alignkit.evaluation.suite import score_steps
    from alignkit.ppo.rewards import score_steps as ppo_score_steps

    check = rewards.check_step_scores
    assert check([[0.5, 1], []], [["a", "b"], []], "prm") == [[0.5, 1.0], []]
    assert check([[0.5]], [["a", "b"]], "prm") == [[0.5]]  # a PRM may leave truncated steps unscored
    for scores, message in [([[0.5, math.nan]], r"returned nan \(a float\) for step 2 of row 1 of a batch of 1"),
                            ([[None, 0.5]], r"returned None \(a NoneType\) for step 1 of row 1"),
                            ([[0.5, 0.5, 0.5]], r"returned 3 step scores for the 2 steps of row 1"),
                            ([], r"returned 0 step-score lists for 1 solutions")]:
        with pytest.raises(RewardError, match=message):
            check(scores, [["a", "b"]], "prm")

    class NaNPRM:
        separator = "\n"
        model_path = "runs/prm/model"

        def score_batch(self, prompts, steps):
            return [[math.nan] * len(s) for s in steps]

    with pytest.raises(RewardError, match=r"reward 'runs/prm/model' returned nan .* for step 1 of row 1"):
        score_steps([{"prompt": "q", "completions": ["a", "b"], "labels": [True, True]}], NaNPRM(), 0.5)
    text = "1 + 1 = 2.\nThe answer is 2."
    with pytest.raises(RewardError, match=r"reward 'runs/prm/model' returned nan"):
        ppo_score_steps(NaNPRM(), ["q"], [text], [list(range(len(text)))], lambda ids: "".join(text[i] for i in ids))


def test_model_scorers_with_nan_name_their_folder(monkeypatch, tiny_tokencls_dir):
    """A broken reward model (NaN out of the forward) stops the run, named by its folder."""
    import alignkit.rewards.prm as prm
    import alignkit.rewards.reward_model as reward_model
    from alignkit.rewards.programs import bind_reward

    class NaNScorer:
        def __init__(self, model_path, **kwargs):
            self.model_path = model_path

        def __call__(self, completions, prompts=None, **kwargs):
            return [math.nan for _ in completions]

    monkeypatch.setattr(reward_model, "RewardModelScorer", NaNScorer)
    with pytest.raises(RewardError, match=r"reward 'model:runs/rm' returned nan \(a float\) for row 1"):
        _trl_call(bind_reward(RewardSpec(program="model:runs/rm")))
    scorer = prm.PRMScorer(str(tiny_tokencls_dir))
    monkeypatch.setattr(prm, "score_encoded", lambda model, encoded, *a, **k: [[0.9, math.nan] for _ in encoded])
    with pytest.raises(RewardError, match=rf"reward '{tiny_tokencls_dir}' returned nan .* for step 2 of row 1"):
        scorer(["a\nb"], prompts=["q"])  # min() would have hidden it: min([0.9, nan]) == 0.9


def test_checked_rewards_keep_trl_names_and_async(programs):
    from trl.trainer.utils import get_callable_name, is_async_callable

    _write(programs / "rw" / "slow.py", "async def judge(completions, **kwargs):\n"
                                        "    return [float('nan') if c == 'b' else 1.0 for c in completions]\n")
    (length,), _ = load_rewards([RewardSpec(program="rw/toy.py:length")], programs)
    (judge,), _ = load_rewards([RewardSpec(program="rw/slow.py:judge")], programs)
    assert get_callable_name(length) == "length" and not is_async_callable(length)
    assert get_callable_name(judge) == "judge" and is_async_callable(judge)  # TRL awaits it
    assert asyncio.run(judge(completions=["a"])) == [1.0]
    with pytest.raises(RewardError, match=r"reward 'rw/slow.py:judge' returned nan \(a float\) for row 2"):
        asyncio.run(judge(completions=["a", "b"]))
    assert rewards.checked(length, "x") is length  # wrapped once, however often it is combined
