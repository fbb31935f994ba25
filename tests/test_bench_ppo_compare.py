"""bench/ppo_compare.py, the command behind docs/ppo.md's PPO table, on hand-made stage folders."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "ppo_compare.py"


def write_stage(folder: Path, before: list[bool], after: list[bool], scores: list[float]) -> Path:
    folder.mkdir(parents=True)
    for when, correct in (("before", before), ("after", after)):
        rows = [{"prompt": f"problem {i}", "correct": c} for i, c in enumerate(correct)]
        (folder / f"accuracy_{when}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    history = [{"step": i + 1, "reward/score": s, "reward/step_score": 0.0, "kl/sequence": 0.1 * i,
                "time/step_s": 10.0, "memory/peak_gib": 1.5} for i, s in enumerate(scores)]
    (folder / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    return folder


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, check=False)


def test_table_counts_changes_and_compares_runs(tmp_path):
    # 10 problems: a goes 4 -> 7 right (3 fixed, none broken); b goes 4 -> 3 (1 broken)
    before = [True] * 4 + [False] * 6
    a = write_stage(tmp_path / "a", before, [True] * 7 + [False] * 3, [0.2, 0.3, 0.5, 0.8])
    b = write_stage(tmp_path / "b", before, [True] * 3 + [False] * 7, [0.2, 0.2, 0.1, 0.1])
    out = tmp_path / "numbers.json"
    result = run(f"a={a}", f"b={b}", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "| a | 0.400 -> 0.700 | +0.300" in result.stdout
    assert "3 / 0 (p = 0.250)" in result.stdout  # two-sided sign test, 3 : 0
    assert "| b | 0.400 -> 0.300 | -0.100" in result.stdout and "0 / 1 (p = 1.000)" in result.stdout
    assert "0.20 -> 0.80" in result.stdout  # a's score, first -> last quarter (one step each)
    # head to head after training: a right alone on problems 3..6 (4), b on none
    assert "after training, a - b: +0.400" in result.stdout and "4 / 0 (sign p = 0.125)" in result.stdout
    numbers = json.loads(out.read_text())
    assert [n["name"] for n in numbers] == ["a", "b"] and numbers[0]["reward_curve"] == [0.2, 0.3, 0.5, 0.8]


def test_refuses_runs_on_different_problems_and_missing_files(tmp_path):
    a = write_stage(tmp_path / "a", [True, False], [True, True], [0.1])
    b = write_stage(tmp_path / "b", [True, False, False], [True, True, False], [0.1])
    result = run(f"a={a}", f"b={b}")
    assert result.returncode != 0 and "other problems" in result.stderr
    (a / "accuracy_after.jsonl").unlink()
    result = run(f"a={a}")
    assert result.returncode != 0 and "accuracy_after.jsonl is missing" in result.stderr
    result = run(str(a))
    assert result.returncode != 0 and "expected NAME=STAGE_DIR" in result.stderr
