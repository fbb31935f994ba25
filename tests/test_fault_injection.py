"""Fault injection: kill -9, SIGINT and SIGTERM at seeded random points of every resumable stage kind (tiny
models), rerun, and compare with an uninterrupted run: the same weights, the same rows, the same manifest
metrics, a rerun that resumes where the interrupted run stopped, and never a manifest that says done after an
interruption. Trial counts are in docs/run-safety.md; the stages are in tests/fault_recipes.py."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from alignkit.core.artifacts import Manifest
from fault_recipes import STAGES, recipe

CHILD = Path(__file__).with_name("fault_child.py")
# Metrics that measure time, speed or memory: they differ between any two runs.
TIMING = {"train_seconds", "tokens_per_second", "peak_memory_gib", "completions_per_second", "seconds",
          "duration_s", "pairs_per_second", "examples_per_second", "label_seconds", "judge_tokens_per_second",
          "pair_seconds", "samples_per_s", "seconds_per_step", "peak_memory_gib_steps"}
# The same in ppo's per-step history rows.
TIMING_PREFIXES = ("time/", "throughput/", "memory/")
# Metrics that record the resume itself, checked against the checkpoint the rerun resumed from
# (see check_resume_record), not against the uninterrupted run.
RESUME_RECORD = {"resumed_from_step", "completions_sampled"}
WEIGHTS = ("model/model.safetensors", "adapter/adapter_model.safetensors", "value_model/model.safetensors",
           "value_adapter/adapter_model.safetensors")
TRAINS = {"sft", "dpo", "dpo-pairs", "reward", "prm", "grpo", "rloo", "ppo", "rntp"}


def run(recipe_path: Path, out: Path, fault: tuple[str, str, int] | None = None) -> subprocess.CompletedProcess:
    """The CLI in a child process; with ``fault``, tests/fault_child.py (``("NONE", "-", 0)``: no signal, but it
    reports where training resumed)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "alignkit"] if fault is None else [sys.executable, str(CHILD), *map(str, fault)]
    return subprocess.run([*command, "run", str(recipe_path), "--output-dir", str(out)], capture_output=True,
                          text=True, env=env, timeout=600)


def rows(path: Path) -> list:
    found = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith(TIMING_PREFIXES)} if isinstance(row, dict) else row
            for row in found]


def outcome(run_dir: Path) -> dict:
    """What must not depend on an interruption: the manifest's metrics (less timings), the weights tensor by
    tensor, and every row file the stage leaves in its folder (data, pairs, samples, held-out scores, positions,
    ppo's step history less its timings). The metrics that record a resume are kept apart (``resume``)."""
    from safetensors.torch import load_file

    manifest = Manifest.read(run_dir)
    assert manifest is not None and manifest.status == "done", manifest
    metrics = {k: v for k, v in manifest.metrics.items() if k not in TIMING}
    result = {"metrics": {k: v for k, v in metrics.items() if k not in RESUME_RECORD},
              "resume": {k: v for k, v in metrics.items() if k in RESUME_RECORD}}
    for name in WEIGHTS:
        if (run_dir / name).is_file():
            result[name] = {k: t.tolist() for k, t in load_file(str(run_dir / name)).items()}
    for path in sorted(run_dir.glob("*.jsonl")):
        result[path.name] = rows(path)
    return result


def check_resume_record(got: dict, want: dict, resumed_at: int, total_steps: int) -> None:
    """The metrics that say how this run went, not what it produced: ``resumed_from_step`` (grpo, rloo, rntp,
    ppo) names the checkpoint step (None for a fresh start); ``completions_sampled`` (grpo, rloo, rntp) counts
    the completions this process sampled, so the steps before the resume are not in it."""
    assert got.keys() == want.keys()
    if "resumed_from_step" in want:
        assert want["resumed_from_step"] is None and got["resumed_from_step"] == (resumed_at or None)
    if "completions_sampled" in want:
        per_step = want["completions_sampled"] // total_steps
        assert got["completions_sampled"] == want["completions_sampled"] - resumed_at * per_step


def draw(seed: int, points: dict[str, list[int]]) -> tuple[str, int]:
    """A seeded (where, n) fault point out of the valid n of each place."""
    every = [(where, n) for where in sorted(points) for n in points[where]]
    return random.Random(seed).choice(every)


def trials(seed: int, count: int, points: dict[str, list[int]]) -> list[tuple[str, int]]:
    """``count`` distinct seeded (where, n) fault points out of the valid n of each place."""
    every = [(where, n) for where in sorted(points) for n in points[where]]
    return random.Random(seed).sample(every, count)


def steps(total: int, every: int, first: int = 1) -> dict[str, list[int]]:
    """A trainer's fault points: the end of step ``first`` or any later one, or just after any checkpoint."""
    return {"step": list(range(first, total + 1)), "save": list(range(every, total + 1, every))}


SHARDS_3 = {"shard": [1, 2, 3]}
# sft: 12 steps, a checkpoint every 4; label: 3 shards (the original trials, kept as they were drawn)
TRIALS = [("sft", sig, where, n) for sig, (where, n) in zip(["KILL", "KILL", "KILL", "INT", "TERM"],
                                                            trials(1, 5, steps(12, 4)))]
TRIALS += [("label", sig, "shard", n) for sig, n in (("KILL", 1), ("KILL", 2), ("TERM", 1))]
# every other resumable kind: (kind, signal, its fault points), the point drawn with the trial's seed. Training
# faults come after the first checkpoint (the sft trials cover a kill before any), so every rerun resumes.
PLAN = [
    ("dpo", "KILL", steps(6, 2, first=3)),           # preference file: 6 steps, a checkpoint every 2
    ("dpo-pairs", "KILL", SHARDS_3),                 # on-policy pairs: 3 shards, then 4 steps
    ("dpo-pairs", "TERM", steps(4, 2, first=3)),
    ("reward", "KILL", steps(6, 2, first=3)),
    ("prm", "INT", steps(6, 2, first=3)),
    ("grpo", "KILL", steps(6, 2, first=3)),
    ("rloo", "KILL", steps(6, 2, first=3)),
    ("ppo", "KILL", {"step": [3, 5]}),               # our own loop, between checkpoints: the rerun redoes a step
    ("ppo", "TERM", {"save": [2, 4, 6]}),
    ("rntp", "KILL", steps(4, 2, first=3)),
    ("eval", "INT", SHARDS_3),                       # sample shards
    ("cai-label", "KILL", SHARDS_3),
    ("cai-revise", "TERM", SHARDS_3),
    ("rejection", "KILL", SHARDS_3),                 # attempts, checks and a revision round per shard
]
TRIALS += [(kind, sig, *draw(100 + i, points)) for i, (kind, sig, points) in enumerate(PLAN)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir):
    """Every stage once, uninterrupted, in one recipe (one process: the stages run one after the other, as in a
    real pipeline, and a resumed stage then runs alone in a fresh process)."""
    folder = tmp_path_factory.mktemp("whole")
    proc = run(recipe(folder, tiny_model_dir, list(STAGES)), folder / "runs")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {name: outcome(folder / "runs" / "fault" / name) for name in STAGES}


def snapshot(run_dir: Path) -> tuple[str | None, dict[str, tuple[int, int]]]:
    """After an interruption: the newest complete checkpoint (a Trainer's ``checkpoint-K`` or ppo's
    ``step-K``) and each complete data shard's identity (inode, mtime)."""
    done = [p for p in (run_dir / "checkpoints").glob("*-*")
            if (p / "trainer_state.json").is_file() or (p / "state.json").is_file()]
    newest = max(done, key=lambda p: int(p.name.rsplit("-", 1)[1]), default=None)
    shard_files = {str(p.relative_to(run_dir)): (p.stat().st_ino, p.stat().st_mtime_ns)
                   for p in run_dir.rglob("shard-*.jsonl")}
    return (newest.name if newest else None), shard_files


@pytest.mark.parametrize("kind, sig, where, n", TRIALS, ids=[f"{k}-{s}-{w}{n}" for k, s, w, n in TRIALS])
def test_interrupted_then_rerun_equals_uninterrupted(kind, sig, where, n, tmp_path, tiny_model_dir, uninterrupted):
    recipe_path = recipe(tmp_path, tiny_model_dir, [kind])
    run_dir = tmp_path / "runs" / "fault" / kind
    killed = run(recipe_path, tmp_path / "runs", (sig, where, n))
    assert killed.returncode == {"KILL": -signal.SIGKILL, "INT": 130, "TERM": 130}[sig], killed.stderr[-3000:]
    manifest = Manifest.read(run_dir)
    assert manifest is None or manifest.status != "done"  # never done after an interruption
    if sig != "KILL":
        assert manifest.status == "interrupted"
    newest, shard_files = snapshot(run_dir)
    if where == "save":
        assert newest is not None and int(newest.rsplit("-", 1)[1]) == n  # the fault came where it was aimed
    if where == "shard":
        assert len(shard_files) == n

    rerun = run(recipe_path, tmp_path / "runs", ("NONE", "-", 0))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{kind}: resuming" in rerun.stdout
    resumes = [line for line in rerun.stdout.splitlines() if line.startswith("[fault_child] resume_from=")]
    assert resumes == ([f"[fault_child] resume_from={newest}"] if kind in TRAINS else [])
    after = snapshot(run_dir)[1]
    assert {k: after.get(k) for k in shard_files} == shard_files  # complete shards were kept, not redone

    got, want = outcome(run_dir), uninterrupted[kind]
    resumed_at = int(newest.rsplit("-", 1)[1]) if newest else 0
    check_resume_record(got.pop("resume"), want["resume"], resumed_at, want["metrics"].get("train_steps", 0))
    assert got == {k: v for k, v in want.items() if k != "resume"}


def test_two_concurrent_runs_one_is_refused(tmp_path, tiny_model_dir):
    recipe_path = recipe(tmp_path, tiny_model_dir, ["sft"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    command = [sys.executable, "-m", "alignkit", "run", str(recipe_path), "--output-dir", str(tmp_path / "runs")]
    first, second = (subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                     for _ in range(2))
    (_, err1), (_, err2) = first.communicate(timeout=600), second.communicate(timeout=600)
    codes = sorted([first.returncode, second.returncode])
    assert codes == [0, 2], (err1[-1500:], err2[-1500:])
    refused = err1 if first.returncode == 2 else err2
    assert "is in use by pid" in refused and refused.strip().count("\n") == 0
    assert Manifest.read(tmp_path / "runs" / "fault" / "sft").status == "done"
