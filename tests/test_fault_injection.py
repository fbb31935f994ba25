"""Fault injection: kill -9, SIGINT and SIGTERM at seeded random points of resumable stages (tiny models), rerun,
and compare with an uninterrupted run: the same weights, the same rows, the same manifest metrics, and never a
manifest that says done after an interruption. Trial counts are in docs/run-safety.md."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from alignkit.core.artifacts import Manifest

CHILD = Path(__file__).with_name("fault_child.py")
TIMING = {"train_seconds", "tokens_per_second", "peak_memory_gib", "completions_per_second", "seconds",
          "duration_s", "pairs_per_second", "examples_per_second", "label_seconds"}


def sft_recipe(folder: Path, model: Path) -> Path:
    path = folder / "sft.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: fault-sft
        tracking: {{report_to: none}}
        stages:
          - kind: sft
            model: {model}
            lora: {{r: 8, alpha: 16, dropout: 0.0}}
            data: {{source: arith, params: {{n: 64, steps: 1, max_operand: 9}}}}
            lr: 5.0e-3
            max_steps: 12
            batch_size: 8
            max_length: 128
            logging_steps: 2
            save_steps: 4
        """))
    return path


def label_recipe(folder: Path, model: Path) -> Path:
    path = folder / "label.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: fault-label
        tracking: {{report_to: none}}
        stages:
          - kind: label
            model: {model}
            data: {{source: arith, params: {{n: 6, steps: 1, max_operand: 9}}}}
            num_generations: 2
            completions_per_step: 2
            agreement_ns: [1, 2]
            max_completion_length: 16
            max_continuation_length: 8
            shard_size: 2
            generation: {{backend: hf, batch_size: 8}}
        """))
    return path


def run(recipe: Path, out: Path, fault: tuple[str, str, int] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "alignkit"] if fault is None else [sys.executable, str(CHILD), *map(str, fault)]
    return subprocess.run([*command, "run", str(recipe), "--output-dir", str(out)], capture_output=True, text=True,
                          env=env, timeout=600)


def outcome(run_dir: Path) -> dict:
    """What must not depend on an interruption: the manifest's metrics (less timings) and the artifacts."""
    from safetensors.torch import load_file

    manifest = Manifest.read(run_dir)
    assert manifest is not None and manifest.status == "done", manifest
    result = {"metrics": {k: v for k, v in manifest.metrics.items() if k not in TIMING}}
    for name in ("model/model.safetensors", "adapter/adapter_model.safetensors"):
        if (run_dir / name).is_file():
            result[name] = {k: t.tolist() for k, t in load_file(str(run_dir / name)).items()}
    if (run_dir / "data.jsonl").is_file():
        result["data.jsonl"] = [json.loads(line) for line in (run_dir / "data.jsonl").read_text().splitlines()]
    return result


def trials(seed: int, count: int, points: dict[str, list[int]]) -> list[tuple[str, int]]:
    """``count`` distinct seeded (where, n) fault points out of the valid n of each place."""
    every = [(where, n) for where in sorted(points) for n in points[where]]
    return random.Random(seed).sample(every, count)


# sft: 12 steps, a checkpoint every 4 (kill at a step's end, or just after its checkpoint); label: 3 shards
SFT_POINTS = {"step": list(range(1, 13)), "save": [4, 8, 12]}
SFT_TRIALS = [(sig, where, n) for sig, (where, n) in zip(["KILL", "KILL", "KILL", "INT", "TERM"],
                                                        trials(1, 5, SFT_POINTS))]
LABEL_TRIALS = [(sig, "shard", n) for sig, n in (("KILL", 1), ("KILL", 2), ("TERM", 1))]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("whole")
    results = {}
    for name, make in (("sft", sft_recipe), ("label", label_recipe)):
        recipe = make(folder, tiny_model_dir)
        proc = run(recipe, folder / "runs")
        assert proc.returncode == 0, proc.stderr[-2000:]
        results[name] = outcome(folder / "runs" / f"fault-{name}" / name)
    return results


@pytest.mark.parametrize("sig, where, n", SFT_TRIALS, ids=[f"{s}-{w}{n}" for s, w, n in SFT_TRIALS])
def test_sft_interrupted_then_rerun_equals_uninterrupted(sig, where, n, tmp_path, tiny_model_dir, uninterrupted):
    recipe = sft_recipe(tmp_path, tiny_model_dir)
    killed = run(recipe, tmp_path / "runs", (sig, where, n))
    expected_code = {"KILL": -signal.SIGKILL, "INT": 130, "TERM": 130}[sig]
    assert killed.returncode == expected_code, killed.stderr[-2000:]
    manifest = Manifest.read(tmp_path / "runs" / "fault-sft" / "sft")
    assert manifest is None or manifest.status != "done"  # never done after an interruption
    rerun = run(recipe, tmp_path / "runs")
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert outcome(tmp_path / "runs" / "fault-sft" / "sft") == uninterrupted["sft"]


@pytest.mark.parametrize("sig, where, n", LABEL_TRIALS, ids=[f"{s}-{w}{n}" for s, w, n in LABEL_TRIALS])
def test_label_interrupted_then_rerun_equals_uninterrupted(sig, where, n, tmp_path, tiny_model_dir, uninterrupted):
    recipe = label_recipe(tmp_path, tiny_model_dir)
    killed = run(recipe, tmp_path / "runs", (sig, where, n))
    assert killed.returncode != 0, killed.stdout[-2000:]
    rerun = run(recipe, tmp_path / "runs")
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert outcome(tmp_path / "runs" / "fault-label" / "label") == uninterrupted["label"]


def test_two_concurrent_runs_one_is_refused(tmp_path, tiny_model_dir):
    recipe = sft_recipe(tmp_path, tiny_model_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    command = [sys.executable, "-m", "alignkit", "run", str(recipe), "--output-dir", str(tmp_path / "runs")]
    first, second = (subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                     for _ in range(2))
    (_, err1), (_, err2) = first.communicate(timeout=600), second.communicate(timeout=600)
    codes = sorted([first.returncode, second.returncode])
    assert codes == [0, 2], (err1[-1500:], err2[-1500:])
    refused = err1 if first.returncode == 2 else err2
    assert "is in use by pid" in refused and refused.strip().count("\n") == 0
    assert Manifest.read(tmp_path / "runs" / "fault-sft" / "sft").status == "done"
