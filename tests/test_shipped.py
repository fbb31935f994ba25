"""Shipped files (recipes, reward programs, suites, constitutions) are found from any folder, the user's own
file of the same name wins, `--dry-run` says which shipped ones were used, and `alignkit init` writes a
starter project that validates, grades and runs. The installed-wheel case is tests/test_wheel.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from alignkit.run import shipped
from alignkit.cli import find_recipe, main
from alignkit.cai.constitution import constitution_path
from alignkit.evaluation.suite import find_suite
from alignkit.run.starter import write_starter

REPO = Path(__file__).resolve().parents[1]
GRADED = '{"completion": "The answer is 4.", "answer": "4"}\n{"completion": "5", "answer": "4"}\n'


def test_a_clone_uses_its_own_top_level_folders():
    assert shipped.shipped_root() == REPO
    assert shipped.shipped_dir("constitutions") == REPO / "reward" / "constitutions"
    assert shipped.shipped_names("recipes") == sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))


def test_the_users_own_files_win(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert find_recipe("quickstart") == REPO / "recipes" / "quickstart.yaml"
    assert find_suite("gsm8k") == REPO / "eval" / "gsm8k.yaml"
    assert constitution_path("harmless") == REPO / "reward" / "constitutions" / "harmless.yaml"
    mine = {"recipes/quickstart.yaml": "name: mine\nstages: []\n", "eval/gsm8k.yaml": "name: mine\n",
            "reward/constitutions/harmless.yaml": "name: mine\n",
            "reward/math.py": "def answer_match(completions, **kw):\n    return [0.25] * len(completions)\n"}
    for relative, text in mine.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(text)
    assert find_recipe("quickstart") == tmp_path / "recipes" / "quickstart.yaml"
    assert find_suite("gsm8k") == tmp_path / "eval" / "gsm8k.yaml"
    assert constitution_path("harmless") == tmp_path / "reward" / "constitutions" / "harmless.yaml"
    (tmp_path / "rows.jsonl").write_text(GRADED)
    assert main(["grade", "rows.jsonl", "--reward", "reward/math.py:answer_match"]) == 0
    assert "mean score 0.2500" in capsys.readouterr().out


def test_package_copy_is_used_outside_a_clone(tmp_path, monkeypatch, capsys):
    """What an installed wheel does (alignkit/_shipped inside the package), faked by moving the package dir."""
    package = tmp_path / "site-packages" / "alignkit"
    for folder in ("recipes", "reward", "eval"):
        shutil.copytree(REPO / folder, package / "_shipped" / folder, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(shipped, "PACKAGE_DIR", package)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert shipped.shipped_root() == package / "_shipped"
    assert main(["run", "rlvr-arith", "--dry-run", "--output-dir", "runs"]) == 0
    out = capsys.readouterr().out
    assert f"recipe: rlvr-arith (shipped: {package}/_shipped/recipes/rlvr-arith.yaml)" in out
    assert f"reward program: reward/math.py (shipped: {package}/_shipped/reward/math.py)" in out
    assert main(["run", "constitutional-dpo", "--dry-run", "--output-dir", "runs"]) == 0
    assert f"constitution: harmless (shipped: {package}/_shipped/reward/constitutions/harmless.yaml)" in \
        capsys.readouterr().out
    assert find_suite("gsm8k") == package / "_shipped" / "eval" / "gsm8k.yaml"
    (work / "rows.jsonl").write_text(GRADED)
    assert main(["grade", "rows.jsonl", "--reward", "reward/math.py:answer_match"]) == 0
    assert "mean score 0.5000" in capsys.readouterr().out
    assert main(["recipes"]) == 0
    assert capsys.readouterr().out.count("\n") == len(shipped.shipped_names("recipes"))


def test_init_writes_a_project_that_validates_and_grades(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["init", "proj"]) == 0
    assert "wrote a starter project" in capsys.readouterr().out
    files = sorted(str(p.relative_to(tmp_path / "proj")) for p in (tmp_path / "proj").rglob("*") if p.is_file())
    assert files == ["README.md", "data/train.jsonl", "recipe.yaml", "reward/my_reward.py"]
    rows = [json.loads(line) for line in (tmp_path / "proj" / "data" / "train.jsonl").read_text().splitlines()]
    assert len(rows) >= 4 and all(set(row) == {"prompt", "completion", "answer"} for row in rows)
    assert main(["init", "proj"]) == 2  # not empty: refused with one line
    assert capsys.readouterr().err.count("\n") == 1
    # from another folder (paths are relative to the recipe), and from inside it
    assert main(["run", "proj/recipe.yaml", "--dry-run", "--output-dir", "runs"]) == 0
    plan = capsys.readouterr().out
    assert "1. sft (sft)" in plan and "2. grpo (grpo)" in plan and "shipped" not in plan
    monkeypatch.chdir(tmp_path / "proj")
    assert main(["grade", "data/train.jsonl", "--reward", "reward/my_reward.py:my_reward",
                 "--out", str(tmp_path / "graded.jsonl")]) == 0
    assert "mean score 1.0000" in capsys.readouterr().out
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text("".join(json.dumps({**row, "answer": "-1"}) + "\n" for row in rows))
    assert main(["grade", str(wrong), "--reward", "reward/my_reward.py:my_reward"]) == 0
    assert "mean score 0.0000" in capsys.readouterr().out


def test_init_refuses_a_file(tmp_path):
    (tmp_path / "x").write_text("")
    with pytest.raises(Exception, match="exists and is not empty"):
        write_starter(tmp_path / "x")


def test_starter_recipe_runs_on_a_tiny_model(tmp_path, tiny_model_dir, monkeypatch):
    """The written recipe as it is, on the tiny offline model instead of SmolLM2 (the only change)."""
    from alignkit.core.artifacts import Manifest
    from alignkit.run.pipeline import run_recipe
    from alignkit.run.recipe import load_recipe

    write_starter(tmp_path / "proj")
    monkeypatch.chdir(tmp_path / "proj")
    recipe = load_recipe(Path("recipe.yaml"), [f"defaults.model={tiny_model_dir}"], output_dir="runs")
    run_recipe(recipe, echo=lambda *_: None)
    for stage in recipe.stages:
        assert Manifest.read(stage.run_dir).status == "done"
        assert (stage.run_dir / "model").is_dir()
