"""Recipe validation: each bad recipe gives one RecipeError naming the file and the field path."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from alignkit.core.errors import RecipeError
from alignkit.run.recipe import apply_overrides, load_recipe
from alignkit.core.stage import STAGES

GOOD = """
name: demo
defaults:
  model: tiny
stages:
  - kind: sft
    data: {source: arith, params: {n: 8}}
  - kind: echo
    name: after
    upstream: ${sft.model}
"""


@pytest.fixture(autouse=True)
def echo_kind(monkeypatch):
    monkeypatch.setitem(STAGES, "echo", "echo_stage")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_good_recipe_resolves_defaults_and_references(tmp_path):
    recipe = load_recipe(write(tmp_path, GOOD), output_dir=str(tmp_path / "runs"))
    sft, after = recipe.stages
    assert sft.config.model == "tiny"  # from defaults
    assert after.config.model == "tiny"  # echo has a model field too
    assert after.config.upstream == str(tmp_path / "runs" / "demo" / "sft" / "model")
    assert after.upstream == ("sft",)
    assert sft.run_dir == tmp_path / "runs" / "demo" / "sft"


def test_hash_changes_with_config_and_upstream(tmp_path):
    path = write(tmp_path, GOOD)
    base = load_recipe(path)
    changed_lr = load_recipe(path, ["stages.sft.lr=1e-4"])
    assert changed_lr.stages[0].hash != base.stages[0].hash
    # the echo stage did not change, but its upstream did: it must rerun too
    assert changed_lr.stages[1].hash != base.stages[1].hash
    changed_echo = load_recipe(path, ["stages.after.message=bye"])
    assert changed_echo.stages[0].hash == base.stages[0].hash


def test_hash_ignores_fields_left_at_their_default(tmp_path):
    path = write(tmp_path, GOOD)
    base = load_recipe(path)
    sft_defaults = type(base.stages[0].config).model_fields
    # Writing a default out (as a recipe written before that field existed would not) keeps the hash.
    explicit = load_recipe(path, [f"stages.sft.seed={sft_defaults['seed'].default}",
                                  f"stages.sft.gradient_checkpointing={sft_defaults['gradient_checkpointing'].default}"])
    assert [s.hash for s in explicit.stages] == [s.hash for s in base.stages]
    assert load_recipe(path, ["stages.sft.seed=7"]).stages[0].hash != base.stages[0].hash


def test_overrides_parse_yaml_values(tmp_path):
    recipe = load_recipe(write(tmp_path, GOOD), ["stages.sft.lr=0.001", "stages.sft.lora.r=4",
                                                 "stages.after.repeat=3"])
    assert recipe.stages[0].config.lr == pytest.approx(1e-3)
    assert recipe.stages[0].config.lora.r == 4
    assert recipe.stages[1].config.repeat == 3


BAD_RECIPES = [
    # (recipe text, field path expected in the message, words expected in the message)
    ("name: x\nstages: []\n", "stages", "non-empty"),
    ("stages:\n  - kind: echo\n", "name", "name"),
    ("name: x\nstagez: []\nstages: [{kind: echo}]\n", "stagez", "unknown key"),
    ("name: x\nstages:\n  - kind: nope\n", "stages[0].kind", "unknown stage kind 'nope'"),
    ("name: x\nstages:\n  - kind: echo\n    mesage: hi\n", "stages.echo.mesage", "unknown field"),
    ("name: x\nstages:\n  - kind: echo\n    repeat: many\n", "stages.echo.repeat", "integer"),
    ("name: x\nstages:\n  - kind: echo\n    repeat: 0\n", "stages.echo.repeat", "greater than 0"),
    ("name: x\nstages:\n  - kind: echo\n  - kind: echo\n", "stages.echo.name", "two stages"),
    ("name: x\nstages:\n  - kind: echo\n    upstream: ${later.file}\n  - {kind: echo, name: later}\n",
     "stages.echo.upstream", "no earlier stage named 'later'"),
    ("name: x\nstages:\n  - kind: echo\n  - kind: echo\n    name: b\n    upstream: ${echo.weights}\n",
     "stages.b.upstream", "has no output 'weights'"),
    ("name: x\nstages:\n  - kind: echo\n    data: {source: ./missing.jsonl}\n", "stages.echo.data.source",
     "does not exist"),
    ("name: x\nstages:\n  - kind: echo\n    model: ./no/such/folder\n", "stages.echo.model", "does not exist"),
    ("name: x\ndefaults: {temperature: 3}\nstages:\n  - kind: echo\n", "defaults.temperature", "no stage"),
    ("name: x\nstages:\n  - kind: sft\n    model: m\n    data: arith\n    trl: {learning_rat: 1}\n",
     "stages.sft.trl.learning_rat", "SFTConfig has no argument"),
    ("name: x\nstages:\n  - kind: sft\n    data: arith\n", "stages.sft.model", "required"),
    ("name: x\nstages:\n  - kind: sft\n    model: m\n    data: arith\n    lora: {r: 8, rank: 2}\n",
     "stages.sft.lora.rank", "allowed fields"),
    ("name: x\nstages:\n  - kind: sft\n    model: m\n    data: arith\n    quantization: {bits: 3}\n",
     "stages.sft.quantization.bits", "4 or 8"),
    ("name: x\ntracking: {report_to: mlflow}\nstages: [{kind: echo}]\n", "tracking.report_to", "wandb"),
    ("name: x\nstages:\n  - kind: echo\n    upstream: ${echo\n", "stages.echo.upstream", "malformed"),
    ("name: [x\n", None, "not valid YAML at line"),
    ("name: bad name!\nstages: [{kind: echo}]\n", "name", "letters"),
]


@pytest.mark.parametrize("text,field,words", BAD_RECIPES, ids=[f"bad{i}" for i in range(len(BAD_RECIPES))])
def test_bad_recipe_gives_one_clear_error(tmp_path, text, field, words):
    path = write(tmp_path, text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    message = str(info.value)
    assert message.startswith(str(path)), message  # names the recipe file first
    if field:
        assert info.value.field == field, message
        assert f": {field}: " in message
    assert words in message, message


def test_bad_override_names_the_stage(tmp_path):
    with pytest.raises(RecipeError, match="no stage named 'dpo'"):
        load_recipe(write(tmp_path, GOOD), ["stages.dpo.lr=1"])
    with pytest.raises(RecipeError, match="KEY=VALUE"):
        apply_overrides({}, ["nonsense"])


@pytest.mark.parametrize("value", [".inf", ".nan", "-.inf", "1e400"])
def test_non_finite_numbers_are_refused(tmp_path, value, capsys):
    """``gt=0`` lets inf through (and a diverged nan run used to end ``done``): every float must be finite."""
    from alignkit.cli import main

    path = write(tmp_path, f"name: x\nstages:\n  - kind: sft\n    model: m\n    data: arith\n    lr: {value}\n")
    with pytest.raises(RecipeError, match=r": stages\.sft\.lr: Input should be a finite number") as info:
        load_recipe(path)
    assert info.value.field == "stages.sft.lr"
    good = write(tmp_path, "name: x\nstages:\n  - kind: sft\n    model: m\n    data: arith\n")
    for override in (f"stages.sft.lr={value}", f"stages.sft.lora.dropout={value}"):  # --set goes through it too
        assert main(["run", str(good), "--set", override, "--set", "stages.sft.lora.r=4", "--dry-run"]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        field = override.split("=")[0]
        assert line.startswith(f"alignkit: error: {good}: {field}: Input should be a finite number"), line


def test_every_shipped_recipe_loads():
    recipes = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
    assert recipes, "no shipped recipes found"
    for path in recipes:
        recipe = load_recipe(path)
        assert recipe.stages
