"""Running recipes: skip, resume, --from, failures never marked done, W&B offline logs, CLI exits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from alignkit.core.artifacts import Manifest
from alignkit.cli import main
from alignkit.run.pipeline import format_summary, plan_actions, run_recipe
from alignkit.run.recipe import load_recipe
from alignkit.core.stage import STAGES
from alignkit.core.tracking import read_offline_run

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
    by_name = {r["config"]["alignkit"]["name"]: r for r in runs_read}  # our stage config, under `alignkit`
    assert by_name["first"]["summary"]["first/length"] == 1 and by_name["second"]["summary"]["second/length"] == 3
    assert by_name["second"]["summary"]["echo/length"] == 3  # logged by the stage through ctx.log
    assert any(row.get("echo/length") == 3 for row in by_name["second"]["history"])
    assert all(r["run"]["group"] == group and r["run"]["job_type"] == "echo" for r in runs_read)
    assert by_name["second"]["config"]["alignkit"]["message"] == "b"


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


# --- one live run per run folder (alignkit.core.runlock) ---------------------------------------------------------

ECHO_CLI = Path(__file__).parent / "echo_cli.py"  # the CLI with the echo kind registered, in its own process


def _echo_cli(recipe: Path, out: Path, *overrides: str) -> list[str]:
    command = [sys.executable, str(ECHO_CLI), "run", str(recipe), "--output-dir", str(out)]
    for override in overrides:
        command += ["--set", override]
    return command


def _wait_until_running(stage_dir: Path, proc: subprocess.Popen, timeout_s: float = 120.0) -> Manifest:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        manifest = Manifest.read(stage_dir)
        if manifest is not None and manifest.status == "running":
            return manifest
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    raise AssertionError(f"{stage_dir} never said running")


def test_second_run_into_a_live_folder_is_refused_at_once(tmp_path, recipe_file):
    out, release = tmp_path / "runs", tmp_path / "release"
    token = "hf_" + "Z9y8X7w6V5u4T3s2R1q0PoNmLk"
    first_args = (f"stages.first.hold={release}", f"description=run with {token}")
    first = subprocess.Popen(_echo_cli(recipe_file, out, *first_args), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        recipe = load_recipe(recipe_file, list(first_args), output_dir=str(out))
        _wait_until_running(recipe.stage("first").run_dir, first)
        # a different config: unlocked, its stale-config clean-up would delete the first run's stage folder
        second = subprocess.run(_echo_cli(recipe_file, out, "stages.first.message=z"), capture_output=True,
                                text=True, timeout=120)
        assert second.returncode == 2
        (line,) = second.stderr.strip().splitlines()
        assert line.startswith(f"alignkit: error: {recipe.root} is in use by pid {first.pid} (echo_cli.py run ")
        assert line.endswith("); wait for it or use --output-dir") and "***" in line and token not in line
        assert "running" not in second.stdout
        assert token not in (recipe.root / ".lock").read_text()
        # the first run is untouched and finishes as itself
        release.touch()
        stdout, stderr = first.communicate(timeout=120)
        assert first.returncode == 0, stderr
    finally:
        first.kill()
    manifest = Manifest.read(recipe.stage("first").run_dir)
    assert manifest.status == "done" and manifest.config_hash == recipe.stage("first").hash
    assert manifest.config["message"] == "a" and runs(recipe.root, "first") == 1
    assert (recipe.stage("second").run_dir / "out.txt").read_text() == "a|b"


def test_a_killed_run_leaves_no_stale_lock(tmp_path, recipe_file):
    out, release = tmp_path / "runs", tmp_path / "release"
    first = subprocess.Popen(_echo_cli(recipe_file, out, f"stages.first.hold={release}"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    recipe = load_recipe(recipe_file, output_dir=str(out))
    _wait_until_running(recipe.stage("first").run_dir, first)
    first.send_signal(signal.SIGKILL)  # no clean-up of any kind: the kernel drops the lock with the process
    first.wait(timeout=60)
    rerun = subprocess.run(_echo_cli(recipe_file, out), capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert "in use" not in rerun.stderr
    assert Manifest.read(recipe.stage("second").run_dir).status == "done"


def test_the_lock_is_held_for_the_run_and_released_after(tmp_path, recipe_file):
    from alignkit.core.errors import RunFolderBusy
    from alignkit.core.runlock import RunLock

    recipe = load_recipe(recipe_file, output_dir=str(tmp_path / "runs"))
    with RunLock(recipe.root):  # another holder (a second open of the file: flock conflicts even in-process)
        with pytest.raises(RunFolderBusy, match=r"is in use by pid \d+ "):
            run_recipe(recipe, echo=lambda *_: None)
        assert main(["run", str(recipe_file), "--dry-run", "--output-dir", str(tmp_path / "runs")]) == 0  # no lock
    assert not (recipe.root / "run.json").exists()  # refused before anything was written
    run_recipe(recipe, echo=lambda *_: None)
    run_recipe(recipe, echo=lambda *_: None)  # released after each run


def test_ranks_of_one_accelerate_launch_share_the_lock(tmp_path, recipe_file):
    """A refused 2-process launch stops on every rank at once (none waits for a main rank that left); an
    unrefused one runs on both ranks under its main rank's lock."""
    from helpers import CPU_2PROC

    out, release = tmp_path / "runs", tmp_path / "release"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_2PROC)]
    first = subprocess.Popen(_echo_cli(recipe_file, out, f"stages.first.hold={release}"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        recipe = load_recipe(recipe_file, [f"stages.first.hold={release}"], output_dir=str(out))
        _wait_until_running(recipe.stage("first").run_dir, first)
        refused = subprocess.run(launch + _echo_cli(recipe_file, out)[1:], capture_output=True, text=True,
                                 env=env, timeout=240)
        assert refused.returncode != 0 and ": running (" not in refused.stdout
        assert refused.stderr.count(f"is in use by pid {first.pid} ") == 2, refused.stderr[-3000:]  # each rank
        release.touch()
        first.wait(timeout=120)
    finally:
        first.kill()
    shared = subprocess.run(launch + _echo_cli(recipe_file, out, "stages.first.message=z")[1:],
                            capture_output=True, text=True, env=env, timeout=240)
    assert shared.returncode == 0, shared.stdout[-3000:] + shared.stderr[-3000:]
    assert shared.stdout.count(") on 2 processes") == 2  # both stages ran, as one run of two ranks
    assert (recipe.stage("second").run_dir / "out.txt").read_text() == "z|b"


def test_barrier_timeout_is_long_by_default_and_set_by_the_environment(monkeypatch):
    from datetime import timedelta

    from alignkit.core.errors import RecipeError
    from alignkit.run.pipeline import BARRIER_TIMEOUT_ENV, barrier_timeout

    monkeypatch.delenv(BARRIER_TIMEOUT_ENV, raising=False)
    assert barrier_timeout() == timedelta(hours=6)  # far past torch's 30 (gloo) / 10 (NCCL) minutes
    monkeypatch.setenv(BARRIER_TIMEOUT_ENV, "90")
    assert barrier_timeout() == timedelta(seconds=90)
    for bad in ("soon", "0", "-5"):
        monkeypatch.setenv(BARRIER_TIMEOUT_ENV, bad)
        with pytest.raises(RecipeError, match=BARRIER_TIMEOUT_ENV):
            barrier_timeout()


def test_main_only_work_waits_out_the_other_ranks_within_the_barrier_timeout(tmp_path, recipe_file):
    """Under a 2-process launch the other rank waits at the barrier while the main rank works alone: the
    process group's timeout is ours (a 3 s one ends the run, a 60 s one lets 6 s of main-only work finish)."""
    from helpers import CPU_2PROC

    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_2PROC)]

    def run(timeout_s: str, out: Path) -> subprocess.CompletedProcess:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "ALIGNKIT_BARRIER_TIMEOUT_S": timeout_s}
        return subprocess.run(launch + _echo_cli(recipe_file, out, "stages.first.main_only_seconds=6")[1:],
                              capture_output=True, text=True, env=env, timeout=240)

    patient = run("60", tmp_path / "patient")
    assert patient.returncode == 0, patient.stdout[-2000:] + patient.stderr[-2000:]
    assert patient.stdout.count(") on 2 processes") == 2
    hasty = run("3", tmp_path / "hasty")
    assert hasty.returncode != 0


def test_the_same_run_folder_spelled_another_way_skips_finished_stages(tmp_path, recipe_file, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_recipe(load_recipe(recipe_file, output_dir="runs"), echo=lambda *_: None)
    again = run_recipe(load_recipe(recipe_file, output_dir=str(tmp_path / "runs")), echo=lambda *_: None)
    assert [o.action for o in again] == ["skipped", "skipped"]
    (tmp_path / "link").symlink_to(tmp_path / "runs")
    via_link = run_recipe(load_recipe(recipe_file, output_dir="link"), echo=lambda *_: None)
    assert [o.action for o in via_link] == ["skipped", "skipped"]
    # a different folder is a different run: the reference points elsewhere, so the hash still tells
    moved = load_recipe(recipe_file, output_dir="elsewhere")
    assert moved.stage("second").hash == load_recipe(recipe_file, output_dir="runs").stage("second").hash
    assert [action for _, action in plan_actions(moved)] == ["run", "run"]


def test_a_stage_finished_by_an_older_release_is_still_skipped(tmp_path, recipe_file):
    """Releases up to 0.2 hashed the resolved reference path; those manifests are read until 0.3."""
    recipe = load_recipe(recipe_file, output_dir=str(tmp_path / "runs"))
    run_recipe(recipe, echo=lambda *_: None)
    for stage in recipe.stages:
        manifest = Manifest.read(stage.run_dir)
        manifest.config_hash = stage.legacy_hash
        manifest.write(stage.run_dir)
    second = recipe.stage("second")
    assert second.legacy_hash != second.hash  # its config holds a reference: the two schemes differ
    again = run_recipe(load_recipe(recipe_file, output_dir=str(tmp_path / "runs")), echo=lambda *_: None)
    assert [o.action for o in again] == ["skipped", "skipped"]
    assert runs(recipe.root, "second") == 1
