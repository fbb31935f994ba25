"""alignkit.rewards (loader, specs, weighted sums, grading a file) and reward/format.py."""

from __future__ import annotations

import doctest
import functools
import inspect
import json
import math
import os
from pathlib import Path

import pytest

import alignkit.rewards as rewards
from alignkit.errors import DataError, RecipeError
from alignkit.rewards import RewardSpec, combine_rewards, grade_file, grade_main, load_reward, load_rewards

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
    ("alignkit.rewards:nope", "has no function 'nope'"),
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
    assert isinstance(funcs[0], functools.partial) and funcs[0].func.__name__ == "flag"
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
    import alignkit.prm as prm
    import alignkit.reward_model as reward_model
    from alignkit.rewards import RewardSpec, bind_reward, is_model_reward

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
