"""The W&B run of a TRL stage, read back from a real offline run: our resolved stage config under `alignkit`, TRL's
arguments under `trl` (nothing of either at the top level), secrets masked in both, and each number once in the
summary."""

from __future__ import annotations

import json
import textwrap
import time

from alignkit.core.artifacts import Manifest
from alignkit.core.tracking import _restated_curve, read_offline_run
from alignkit.run.pipeline import run_recipe
from alignkit.run.recipe import load_recipe

SECRET = "horsebatterystaple42"  # no token shape: masked because it is HF_TOKEN's value


def read_when_written(run_dir, last_key: str, timeout_s: float = 30.0) -> dict:
    """W&B's service process can still be flushing a finished run's file on a loaded machine: poll briefly."""
    deadline = time.monotonic() + timeout_s
    while True:
        run = read_offline_run(run_dir)
        if last_key in run["summary"] or time.monotonic() > deadline:
            return run
        time.sleep(0.5)


def test_config_apart_secrets_masked_and_each_summary_number_once(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    path = tmp_path / "sft.yaml"
    path.write_text(textwrap.dedent(f"""
        name: tiny
        tracking: {{report_to: wandb, wandb: {{mode: offline, project: alignkit-test}}}}
        stages:
          - kind: sft
            model: {tiny_model_dir}
            lora: {{r: 8, alpha: 16, dropout: 0.0}}
            data: {{source: arith, params: {{n: 16, steps: 1, max_operand: 9}}}}
            accuracy_data: {{source: arith, seed: 5, params: {{n: 2, steps: 1, max_operand: 9}}}}
            accuracy_max_completion_length: 4
            max_steps: 2
            batch_size: 4
            max_length: 64
            logging_steps: 1
    """))
    # the recipe's name reaches TRL's arguments (run_name, output_dir), and so the config TRL's callback records
    recipe = load_recipe(path, [f"name=tiny-{SECRET}", "stages.sft.lr=5.0e-3"], output_dir=str(tmp_path / "runs"))
    run_recipe(recipe, echo=lambda *_: None)
    metrics = Manifest.read(recipe.stage("sft").run_dir).metrics
    (run_dir,) = (recipe.root / "wandb").glob("offline-run-*")
    run = read_when_written(run_dir, "sft/peak_memory_gib")  # written last

    config = run["config"]
    assert set(config) - {"_wandb"} == {"alignkit", "trl"}
    ours, theirs = config["alignkit"], config["trl"]
    assert ours["lr"] == 5e-3 and ours["batch_size"] == 4 and ours["lora"]["r"] == 8
    assert "learning_rate" not in ours and "per_device_train_batch_size" not in ours
    assert theirs["learning_rate"] == 5e-3 and theirs["per_device_train_batch_size"] == 4
    assert "lr" not in theirs and "batch_size" not in theirs
    assert theirs["peft_config"]["default"]["r"] == 8 and theirs["model/num_parameters"] > 0
    assert theirs["run_name"] == "tiny-***/sft" and theirs["hub_token"] == "***"
    assert SECRET not in json.dumps(config)

    summary = {key: value for key, value in run["summary"].items() if not key.startswith("_")}
    # ours once, under `<stage>/<key>`, never a bare copy; TRL's restatements of ours dropped
    assert not set(metrics) & set(summary), summary
    assert summary["sft/train_loss"] == metrics["train_loss"] and summary["sft/duration_s"] == metrics["duration_s"]
    assert summary["sft/accuracy_after"] == metrics["accuracy_after"]
    # the last point of a TRL curve is TRL's key alone
    assert summary["train/global_step"] == metrics["train_steps"] == 2 and "sft/train_steps" not in summary
    assert summary["train/loss"] == metrics["last_logged_loss"] and "sft/last_logged_loss" not in summary
    assert summary["sft/first_logged_loss"] == metrics["first_logged_loss"]
    assert "train_loss" not in summary and "train_runtime" not in summary  # TRL's restatements of ours


def test_restated_curve_names():
    assert _restated_curve("rm/last_logged_accuracy") == "train/accuracy"
    assert _restated_curve("dpo/last_logged_reward_accuracies") == "train/rewards/accuracies"
    assert _restated_curve("sft/first_logged_loss") is None and _restated_curve("sft/accuracy_after") is None
