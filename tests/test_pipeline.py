"""Running recipes: skip, resume, --from, failures never marked done, W&B offline logs, CLI exits."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from alignkit.artifacts import Manifest
from alignkit.cli import main
from alignkit.pipeline import format_summary, plan_actions, run_recipe
from alignkit.recipe import load_recipe
from alignkit.registry import STAGES
from alignkit.tracking import read_offline_run

RECIPE = """
name: chain
tracking: {report_to: none}
stages:
  - kind: echo
    name: first
    message: a
  - kind: echo
    name: second
    message: b
    upstream: ${first.file}
"""


@pytest.fixture(autouse=True)
def echo_kind(monkeypatch):
    monkeypatch.setitem(STAGES, "echo", "echo_stage")


@pytest.fixture
def recipe_file(tmp_path):
    path = tmp_path / "chain.yaml"
    path.write_text(textwrap.dedent(RECIPE))
    return path


def runs(root: Path, name: str) -> int:
    path = root / f"{name}.runs"
    return int(path.read_text()) if path.exists() else 0


def test_run_writes_manifests_and_hands_outputs_on(tmp_path, recipe_file):
    recipe = load_recipe(recipe_file, output_dir=str(tmp_path / "runs"))
    outcomes = run_recipe(recipe, echo=lambda *_: None)
    assert [o.action for o in outcomes] == ["ran", "ran"]
    second = Manifest.read(recipe.stage("second").run_dir)
    assert second.status == "done" and second.metrics["length"] == 3
    assert (recipe.stage("second").run_dir / "out.txt").read_text() == "a|b"
    assert second.config["upstream"].endswith("first/out.txt")
    assert second.peak_memory_gib > 0 and second.duration_s >= 0
    assert "second" in format_summary(outcomes) and "length=3" in format_summary(outcomes)


def test_rerun_skips_done_and_config_change_reruns_downstream(tmp_path, recipe_file):
    out = str(tmp_path / "runs")
    recipe = load_recipe(recipe_file, output_dir=out)
    run_recipe(recipe, echo=lambda *_: None)
    outcomes = run_recipe(load_recipe(recipe_file, output_dir=out), echo=lambda *_: None)
    assert [o.action for o in outcomes] == ["skipped", "skipped"]
    assert runs(recipe.root, "first") == 1 and runs(recipe.root, "second") == 1
    changed = load_recipe(recipe_file, ["stages.first.message=z"], output_dir=out)
    assert [a for _, a in plan_actions(changed)] == ["run", "run"]
    run_recipe(changed, echo=lambda *_: None)
    assert (changed.stage("second").run_dir / "out.txt").read_text() == "z|b"


def test_from_reruns_that_stage_and_later(tmp_path, recipe_file):
    out = str(tmp_path / "runs")
    recipe = load_recipe(recipe_file, output_dir=out)
    run_recipe(recipe, echo=lambda *_: None)
    outcomes = run_recipe(recipe, from_stage="second", echo=lambda *_: None)
    assert [o.action for o in outcomes] == ["skipped", "ran"]
    assert runs(recipe.root, "first") == 1 and runs(recipe.root, "second") == 2


def test_failure_is_recorded_never_done_and_rerun_resumes(tmp_path, recipe_file):
    out = str(tmp_path / "runs")
    failing = load_recipe(recipe_file, ["stages.second.fail=true"], output_dir=out)
    with pytest.raises(RuntimeError, match="planned failure"):
        run_recipe(failing, echo=lambda *_: None)
    manifest = Manifest.read(failing.stage("second").run_dir)
    assert manifest.status == "failed" and "planned failure" in manifest.error
    assert [a for _, a in plan_actions(failing)] == ["skip", "resume"]


def test_interrupt_marks_interrupted(tmp_path, recipe_file, monkeypatch):
    import echo_stage

    def interrupted(config, ctx):
        raise KeyboardInterrupt

    monkeypatch.setattr(echo_stage, "run", interrupted)
    recipe = load_recipe(recipe_file, output_dir=str(tmp_path / "runs"))
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, echo=lambda *_: None)
    assert Manifest.read(recipe.stage("first").run_dir).status == "interrupted"


def test_secrets_never_reach_the_manifest(tmp_path, recipe_file, monkeypatch):
    token = "hf_" + "A1b2C3d4E5f6G7h8I9j0KlMnOp"
    monkeypatch.setenv("HF_TOKEN", token)
    recipe = load_recipe(recipe_file, [f"stages.first.message=key {token}"], output_dir=str(tmp_path / "r"))
    run_recipe(recipe, echo=lambda *_: None)
    for path in recipe.root.rglob("*.json"):
        assert token not in path.read_text()
    assert token not in (recipe.root / "recipe.resolved.yaml").read_text()


def _read_when_written(run_dir, timeout_s: float = 30.0):
    """W&B's service process can still be flushing a finished run's file on a loaded machine: poll briefly."""
    deadline = time.monotonic() + timeout_s
    while True:
        run = read_offline_run(run_dir)
        if run["run"] and run["summary"] or time.monotonic() > deadline:
            return run
        time.sleep(0.5)


def test_wandb_offline_run_files_hold_the_metrics(tmp_path, recipe_file):
    out = str(tmp_path / "runs")
    recipe = load_recipe(recipe_file, ["tracking.report_to=wandb", "tracking.wandb.mode=offline",
                                       "tracking.wandb.project=alignkit-test"], output_dir=out)
    run_recipe(recipe, echo=lambda *_: None)
    runs_read = [_read_when_written(d) for d in sorted((recipe.root / "wandb").glob("offline-run-*"))]
    assert len(runs_read) == 2  # one W&B run per stage
    group = json.loads((recipe.root / "run.json").read_text())["group"]
    by_name = {r["config"]["name"]: r for r in runs_read}
    assert by_name["first"]["summary"]["length"] == 1 and by_name["second"]["summary"]["length"] == 3
    assert by_name["second"]["summary"]["echo/length"] == 3  # logged by the stage through ctx.log
    assert any(row.get("echo/length") == 3 for row in by_name["second"]["history"])
    assert all(r["run"]["group"] == group and r["run"]["job_type"] == "echo" for r in runs_read)
    assert by_name["second"]["config"]["message"] == "b"


def test_cli_exit_codes_and_messages(tmp_path, recipe_file, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nstages:\n  - kind: echo\n    repeat: -1\n")
    assert main(["run", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "stages.echo.repeat" in err and "Traceback" not in err
    assert main(["run", str(recipe_file), "--dry-run", "--output-dir", str(tmp_path / "runs")]) == 0
    plan = capsys.readouterr().out
    assert "1. first (echo) [will run]" in plan and "-> file:" in plan
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2


def test_cli_subprocess_has_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nstages:\n  - kind: teleport\n")
    proc = subprocess.run([sys.executable, "-m", "alignkit", "run", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "unknown stage kind 'teleport'" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_lists_recipes_and_dispatches_grade(tmp_path, capsys):
    assert main(["recipes"]) == 0
    listing = capsys.readouterr().out
    assert "quickstart" in listing and "[sft" in listing
    rows = tmp_path / "out.jsonl"
    rows.write_text('{"completion": "The answer is 4.", "answer": "4"}\n{"completion": "5", "answer": "4"}\n')
    assert main(["grade", str(rows), "--reward", "reward/math.py:answer_match"]) == 0
    assert "0.5" in capsys.readouterr().out
    assert main(["grade", str(rows), "--reward", "reward/math.py:answer_match", "--answer-field", "gold"]) == 2
