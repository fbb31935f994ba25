"""Environments in RL stages: shipped and own environments, the weighted pool, per-row reward routing with
per-environment logs, the built-in code tasks, and a grpo run over two environments on a tiny model."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from alignkit.core.artifacts import Manifest
from alignkit.core.errors import DataError, RecipeError
from alignkit.data import codetasks
from alignkit.rewards.environments import EnvironmentReward, EnvironmentSpec, environment_rows
from alignkit.run.pipeline import run_recipe
from alignkit.run.recipe import load_recipe


def test_shipped_environments_by_name_and_with_a_field_changed():
    arith = EnvironmentSpec.model_validate("arith")
    assert arith.name == "arith" and arith.data.source == "arith" and arith.weight == 1.0
    assert [r.program for r in arith.rewards] == ["reward/math.py:answer_match"]
    code = EnvironmentSpec.model_validate({"use": "code", "weight": 0.5, "name": "py"})
    assert (code.name, code.weight, code.data_format, code.data.source) == ("py", 0.5, "code", "code")
    assert [r.program for r in code.rewards] == ["reward/code.py:unit_tests"]
    with pytest.raises(ValueError, match=r"no shipped environment 'chess'; shipped: \['arith', 'code', 'format', 'gsm8k'\]"):
        EnvironmentSpec.model_validate("chess")
    gsm8k = EnvironmentSpec.model_validate("gsm8k")  # held-out = the first 48 rows, training skips the first 200
    assert gsm8k.accuracy_data.limit == 48 and gsm8k.data.skip == 200


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_the_pool_weights_tags_and_unites_columns(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"a{i}", "answer": str(i)} for i in range(4)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"b{i}", "tests": [f"assert f() == {i}"]} for i in range(2)])
    envs = [EnvironmentSpec(name="maths", data={"source": a}, rewards=[{"program": "x.py:f"}], weight=0.5),
            EnvironmentSpec(name="py", data={"source": b}, data_format="code", rewards=[{"program": "x.py:g"}],
                            weight=2)]
    rows = environment_rows(envs, seed=0)
    assert [row["env"] for row in rows] == ["maths"] * 2 + ["py"] * 4  # 4 x 0.5 sampled, 2 x 2 repeated
    assert [row["prompt"] for row in rows[2:]] == ["b0", "b1", "b0", "b1"]
    assert all(set(row) == {"prompt", "answer", "steps", "tests", "env"} for row in rows)
    assert rows[0]["tests"] is None and rows[2]["answer"] is None and rows[2]["tests"] == ["assert f() == 0"]
    with pytest.raises(DataError, match="environment 'py'"):
        environment_rows([envs[0], EnvironmentSpec(name="py", data={"source": a}, data_format="code",
                                                   rewards=[{"program": "x.py:g"}])], seed=0)


def test_each_completion_is_scored_by_its_own_environment():
    calls, logged = {}, {}

    def length(completions, **columns):
        calls["length"] = columns
        return [float(len(c)) for c in completions]

    def has_tests(completions, tests, **columns):
        calls["tests"] = tests
        return [1.0 if t else None for t in tests]

    reward = EnvironmentReward({"len": length, "code": has_tests})
    scores = reward(["aa", "b", "ccc", "dddd"], env=["len", "code", "len", "code"], answer=["1", None, "3", None],
                    tests=[None, ["t"], None, []], completion_ids=[[1], [2], [3], [4]], trainer_state="shared",
                    log_metric=lambda key, value: logged.__setitem__(key, value))
    assert scores == [2.0, 1.0, 3.0, None]
    assert calls["tests"] == [["t"], []]  # only its own rows, sliced per column
    assert calls["length"]["answer"] == ["1", "3"] and calls["length"]["completion_ids"] == [[1], [3]]
    assert calls["length"]["trainer_state"] == "shared"  # not a per-row column: passed as it is
    assert logged == {"env/len/reward": 2.5, "env/code/reward": 1.0}  # None is left out of the mean
    with pytest.raises(DataError, match=r"environment\(s\) \['chess'\]"):
        reward(["x"], env=["chess"])


def test_every_code_task_passes_its_own_tests_with_the_reference():
    for task in codetasks.TASKS:
        row = task.row()
        assert row["prompt"].startswith(f"Write a Python function `{task.signature}`")
        for test in row["tests"]:
            exec(test, {task.name: task.reference})  # noqa: S102 - our own reference code and literals
        assert len(row["tests"]) >= 3 and all(" == " in t for t in row["tests"])  # judged outside the sandbox
    assert len(codetasks.rows()) == len(codetasks.TASKS) == len({t.name for t in codetasks.TASKS})


def test_code_environment_pays_a_right_function_in_the_sandbox():
    from alignkit.data import load_dataset
    from alignkit.core.config import DataSpec
    from alignkit.rewards.programs import load_reward

    unit_tests = load_reward("reward/code.py:unit_tests")
    rows = load_dataset(DataSpec(source="code", limit=2), "code").to_list()
    right = ["```python\ndef add(a, b):\n    return a + b\n```", "def square(n):\n    return n * n"]
    wrong = ["def add(a, b):\n    return 3", "def square(n):\n    return n"]
    assert unit_tests(right, tests=[r["tests"] for r in rows]) == [1.0, 1.0]
    assert unit_tests(wrong, tests=[r["tests"] for r in rows]) == [pytest.approx(1 / 3), pytest.approx(1 / 3)]


REWARDS_PY = '''
def even_length(completions, **kwargs):
    return [float(len(str(c)) % 2 == 0) for c in completions]


def digit_fraction(completions, **kwargs):
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [sum(ch.isdigit() for ch in t) / len(t) if t else 0.0 for t in texts]
'''


def env_recipe(tmp_path: Path, model: Path, stage: str) -> Path:
    (tmp_path / "rewards.py").write_text(REWARDS_PY)
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent("""
        name: envs
        tracking: {report_to: none}
        stages:
    """) + textwrap.indent(textwrap.dedent(stage.format(model=model)), "  "))
    return path


GRPO_TWO_ENVS = """
- kind: grpo
  model: {model}
  environments:
    - name: even
      data: {{source: arith, params: {{n: 8, steps: 1, max_operand: 9}}}}
      rewards: [{{program: rewards.py:even_length}}]
      accuracy_data: {{source: arith, seed: 9, params: {{n: 4, steps: 1, max_operand: 9}}}}
    - name: digits
      data: {{source: arith, seed: 2, params: {{n: 8, steps: 1, max_operand: 9}}}}
      rewards: [{{program: rewards.py:digit_fraction, weight: 2.0}}]
      weight: 0.5
  num_generations: 4
  batch_size: 8
  max_completion_length: 8
  accuracy_max_completion_length: 8
  max_steps: 4
  save_steps: 4
  logging_steps: 1
"""


def test_grpo_over_two_environments_reports_each(tmp_path, tiny_model_dir):
    recipe = load_recipe(env_recipe(tmp_path, tiny_model_dir, GRPO_TWO_ENVS), output_dir=str(tmp_path / "runs"))
    run_recipe(recipe, echo=lambda *_: None)
    manifest = Manifest.read(recipe.stages[0].run_dir)
    metrics = manifest.metrics
    assert manifest.status == "done" and metrics["train_steps"] == 4
    assert metrics["train_prompts"] == 12 and metrics["train_prompts_even"] == 8 and metrics["train_prompts_digits"] == 4
    # every environment appears in the logs (4 steps x 2 prompts from a pool of 12), with its own reward scale
    logged = [k for k in metrics if k.startswith("reward_env_")]
    assert set(logged) <= {f"reward_env_{e}_{w}" for e in ("even", "digits") for w in ("first", "last")}
    assert "reward_env_even_first" in metrics or "reward_env_digits_first" in metrics
    for key in logged:
        upper = 1.0 if "_even_" in key else 2.0  # the digits environment's reward has weight 2
        assert 0.0 <= metrics[key] <= upper
    # per-environment accuracy only where the environment has held-out problems
    assert {"accuracy_even_before", "accuracy_even_after"} <= set(metrics)
    assert not any(k.startswith("accuracy_digits") for k in metrics)
    assert (recipe.stages[0].run_dir / "accuracy_before_even.jsonl").is_file()


@pytest.mark.parametrize("stage, message", [
    ("""
     - kind: grpo
       model: {model}
       data: {{source: arith}}
       rewards: [{{program: rewards.py:even_length}}]
       environments: [arith]
     """, "not both"),
    ("""
     - kind: rloo
       model: {model}
       environments: [arith, arith]
     """, r"\['arith'\] appear twice"),
    ("""
     - kind: grpo
       model: {model}
       environments: [{{name: e, data: {{source: arith}}, rewards: [{{program: nope.py:f}}]}}]
     """, r"stages.grpo.environments.e.rewards.0.program"),
    ("""
     - kind: grpo
       model: {model}
       data: {{source: arith}}
     """, "give `data` and `rewards`"),
])
def test_bad_environment_blocks_name_the_field(tmp_path, tiny_model_dir, stage, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(env_recipe(tmp_path, tiny_model_dir, stage))


def test_a_missing_environment_file_is_named_at_load(tmp_path, tiny_model_dir):
    stage = """
    - kind: grpo
      model: {model}
      environments: [{{name: mine, data: {{source: missing.jsonl}}, rewards: [{{program: rewards.py:even_length}}]}}]
    """
    with pytest.raises(RecipeError, match=r"stages.grpo.environments.mine.data.source.*missing.jsonl"):
        load_recipe(env_recipe(tmp_path, tiny_model_dir, stage))


PPO_TWO_ENVS = """
- kind: ppo
  model: {model}
  lora: {{r: 8, alpha: 16, dropout: 0.0}}
  environments:
    - name: even
      data: {{source: arith, params: {{n: 8, steps: 1, max_operand: 9}}}}
      rewards: [{{program: rewards.py:even_length}}]
    - name: digits
      data: {{source: arith, seed: 2, params: {{n: 8, steps: 1, max_operand: 9}}}}
      rewards: [{{program: rewards.py:digit_fraction, weight: 2.0}}]
  batch_size: 4
  num_generations: 2
  ppo_epochs: 1
  max_completion_length: 8
  max_length: 128
  max_steps: 4
  save_steps: 4
  logging_steps: 1
"""


def test_ppo_over_two_environments_reports_each(tmp_path, tiny_model_dir):
    recipe = load_recipe(env_recipe(tmp_path, tiny_model_dir, PPO_TWO_ENVS), output_dir=str(tmp_path / "runs"))
    run_recipe(recipe, echo=lambda *_: None)
    run_dir = recipe.stages[0].run_dir
    manifest = Manifest.read(run_dir)
    metrics = manifest.metrics
    assert manifest.status == "done" and metrics["train_steps"] == 4
    assert metrics["train_prompts_even"] == metrics["train_prompts_digits"] == 8
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    seen = {k for row in history for k in row if k.startswith("env/")}
    assert seen == {"env/even/reward", "env/digits/reward"}  # 4 steps x 2 prompts of a 16-row pool: both drawn
    for row in history:  # each environment's mean is over its own rows, on its own scale
        assert 0.0 <= row.get("env/even/reward", 0.0) <= 1.0 and 0.0 <= row.get("env/digits/reward", 0.0) <= 2.0
    assert {"reward_env_even_first", "reward_env_even_last", "reward_env_digits_first",
            "reward_env_digits_last"} <= set(metrics)
