"""The SFT stage on a tiny model: loss falls, outputs chain, resume works, and a 2-process accelerate run."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from alignkit.artifacts import Manifest
from alignkit.pipeline import run_recipe
from alignkit.recipe import load_recipe
from alignkit.tracking import read_offline_run
from helpers import run_two_processes


def sft_recipe(tmp_path: Path, model: Path, extra: str = "") -> Path:
    path = tmp_path / "sft.yaml"
    path.write_text(textwrap.dedent(f"""
        name: tiny-sft
        tracking: {{report_to: none}}
        defaults:
          model: {model}
          lora: {{r: 8, alpha: 16, dropout: 0.0}}
        stages:
          - kind: sft
            data: {{source: arith, params: {{n: 64, steps: 1, max_operand: 9}}}}
            accuracy_data: {{source: arith, seed: 5, params: {{n: 4, steps: 1, max_operand: 9}}}}
            accuracy_max_new_tokens: 8
            lr: 5.0e-3
            max_steps: 24
            batch_size: 8
            max_length: 128
            logging_steps: 4
            save_steps: 12
        {textwrap.indent(textwrap.dedent(extra), '        ').strip()}
    """))
    return path


def test_sft_lowers_loss_and_writes_loadable_models(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    # full fine-tuning: a random tiny model learns the format far faster than through a rank-8 adapter
    recipe = load_recipe(sft_recipe(tmp_path, tiny_model_dir),
                         ["stages.sft.lora=null", "tracking.report_to=wandb", "tracking.wandb.mode=offline"],
                         output_dir=str(tmp_path / "runs"))
    run_recipe(recipe, echo=lambda *_: None)
    stage = recipe.stage("sft")
    manifest = Manifest.read(stage.run_dir)
    assert manifest.status == "done"
    metrics = manifest.metrics
    assert metrics["train_steps"] == 24
    assert metrics["last_logged_loss"] < 0.7 * metrics["first_logged_loss"], metrics
    assert metrics["tokens_per_second"] > 0 and metrics["peak_memory_gib"] > 0
    assert 0.0 <= metrics["accuracy_before"] <= 1.0 and 0.0 <= metrics["accuracy_after"] <= 1.0
    assert (stage.run_dir / "accuracy_after.jsonl").exists()
    model = AutoModelForCausalLM.from_pretrained(manifest.artifacts["model"])
    assert not hasattr(model, "peft_config")
    assert "adapter" not in manifest.artifacts
    assert (stage.run_dir / "checkpoints").is_dir()
    # TRL's training curve and our stage metrics land in the same (offline) W&B run
    (wandb_run,) = [read_offline_run(d) for d in (recipe.root / "wandb").glob("offline-run-*")]
    losses = [row["train/loss"] for row in wandb_run["history"] if "train/loss" in row]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert wandb_run["summary"]["accuracy_after"] == metrics["accuracy_after"]
    assert wandb_run["run"]["job_type"] == "sft" and wandb_run["config"]["lr"] == 5e-3


def test_sft_resumes_from_last_checkpoint(tmp_path, tiny_model_dir, monkeypatch):
    """Kill after the first checkpoint; the rerun continues from it instead of starting over."""
    from transformers import AutoModelForCausalLM, TrainerCallback

    class Crash(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            raise KeyboardInterrupt  # as if Ctrl-C right after checkpoint-12 was written

    from trl import SFTTrainer

    class CrashingTrainer(SFTTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(Crash())

    monkeypatch.setattr("trl.SFTTrainer", CrashingTrainer)
    recipe = load_recipe(sft_recipe(tmp_path, tiny_model_dir), output_dir=str(tmp_path / "runs"))
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, echo=lambda *_: None)
    stage = recipe.stage("sft")
    assert Manifest.read(stage.run_dir).status == "interrupted"
    assert (stage.run_dir / "checkpoints" / "checkpoint-12").is_dir()

    monkeypatch.setattr("trl.SFTTrainer", SFTTrainer)
    outcomes = run_recipe(load_recipe(sft_recipe(tmp_path, tiny_model_dir), output_dir=str(tmp_path / "runs")),
                          echo=lambda *_: None)
    assert outcomes[0].action == "resumed"
    manifest = Manifest.read(stage.run_dir)
    assert manifest.status == "done" and manifest.metrics["train_steps"] == 24
    # LoRA run: the adapter and a merged plain model (what later stages load) are both written
    merged = AutoModelForCausalLM.from_pretrained(manifest.artifacts["model"])
    assert not hasattr(merged, "peft_config")
    assert (Path(manifest.artifacts["adapter"]) / "adapter_config.json").exists()
    # exactly what from_pretrained, PEFT and vLLM load: one weight file each, no pickled training arguments
    for folder, weights in ((manifest.artifacts["model"], "model.safetensors"),
                            (manifest.artifacts["adapter"], "adapter_model.safetensors")):
        assert sorted(p.name for p in Path(folder).glob("*.safetensors")) == [weights]
        assert not list(Path(folder).glob("*.bin")) and not list(Path(folder).glob("*.pt"))
    state = json.loads((stage.run_dir / "checkpoints" / "checkpoint-24" / "trainer_state.json").read_text())
    # the resumed run logged only steps after 12: no second pass over the first half
    steps = [entry["step"] for entry in state["log_history"] if "loss" in entry]
    assert steps[0] == 4 and steps[-1] == 24 and len(steps) == len(set(steps))


def test_two_process_accelerate_run(tmp_path, tiny_model_dir):
    """`accelerate launch` with 2 CPU processes (gloo): one manifest, written once, stage done."""
    proc = run_two_processes(sft_recipe(tmp_path, tiny_model_dir), tmp_path / "runs", "stages.sft.max_steps=6",
                             "stages.sft.accuracy_data=null")
    manifest = Manifest.read(tmp_path / "runs" / "tiny-sft" / "sft")
    assert manifest.status == "done" and manifest.metrics["train_steps"] == 6
    assert proc.stdout.count("finished; outputs in") == 1  # only the main process reports
    assert (tmp_path / "runs" / "tiny-sft" / "sft" / "model" / "config.json").exists()
