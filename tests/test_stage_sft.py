"""The SFT stage on a tiny model: loss falls, outputs chain, resume works, and a 2-process accelerate run."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from alignkit.core.artifacts import Manifest
from alignkit.run.pipeline import run_recipe
from alignkit.run.recipe import load_recipe
from alignkit.core.tracking import read_offline_run
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
            accuracy_max_completion_length: 8
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
    assert wandb_run["summary"]["sft/accuracy_after"] == metrics["accuracy_after"]
    assert wandb_run["run"]["job_type"] == "sft" and wandb_run["config"]["alignkit"]["lr"] == 5e-3


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
    # the manifest's train_loss is the whole run's (logged every 4 steps), not the mean after the resume only
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert manifest.metrics["train_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-6)
    assert manifest.metrics["train_loss"] != pytest.approx(sum(losses[3:]) / 3, rel=1e-3)


def test_two_process_accelerate_run(tmp_path, tiny_model_dir):
    """`accelerate launch` with 2 CPU processes (gloo): one manifest, written once, stage done."""
    proc = run_two_processes(sft_recipe(tmp_path, tiny_model_dir), tmp_path / "runs", "stages.sft.max_steps=6",
                             "stages.sft.accuracy_data=null")
    manifest = Manifest.read(tmp_path / "runs" / "tiny-sft" / "sft")
    assert manifest.status == "done" and manifest.metrics["train_steps"] == 6
    assert proc.stdout.count("finished; outputs in") == 1  # only the main process reports
    assert (tmp_path / "runs" / "tiny-sft" / "sft" / "model" / "config.json").exists()


# --- a diverged run fails at its step and saves no model -----------------------------------------------------

DIVERGE = ["stages.sft.accuracy_data=null", "stages.sft.max_steps=6", "stages.sft.save_steps=2"]


def _failed(recipe) -> Manifest:
    stage = recipe.stage("sft")
    manifest = Manifest.read(stage.run_dir)
    assert manifest.status == "failed", manifest
    assert not (stage.run_dir / "model").exists() and not (stage.run_dir / "adapter").exists()
    return manifest


def test_huge_lr_fails_at_the_step_it_diverges(tmp_path, tiny_model_dir):
    from alignkit.core.errors import TrainingDiverged

    # finite, so validation lets it through; the second step's forward overflows to nan
    recipe = load_recipe(sft_recipe(tmp_path, tiny_model_dir), [*DIVERGE, "stages.sft.lr=1e30"],
                         output_dir=str(tmp_path / "runs"))
    with pytest.raises(TrainingDiverged, match=r"^sft: training diverged at step \d: the loss is nan") as info:
        run_recipe(recipe, echo=lambda *_: None)
    manifest = _failed(recipe)
    assert manifest.metrics["failed_step"] == info.value.step and f"at step {info.value.step}:" in manifest.error


def test_nan_loss_stops_at_that_very_step(tmp_path, tiny_model_dir, monkeypatch):
    """Checked after every optimizer step, not only at logging steps (logging_steps is 4 here)."""
    from trl import SFTTrainer

    from alignkit.core.errors import TrainingDiverged

    compute_loss = SFTTrainer.compute_loss

    def poisoned(self, *args, **kwargs):
        out = compute_loss(self, *args, **kwargs)
        if self.state.global_step != 2:  # the third optimizer step
            return out
        return (out[0] * float("nan"), *out[1:]) if isinstance(out, tuple) else out * float("nan")

    monkeypatch.setattr(SFTTrainer, "compute_loss", poisoned)
    recipe = load_recipe(sft_recipe(tmp_path, tiny_model_dir), DIVERGE, output_dir=str(tmp_path / "runs"))
    with pytest.raises(TrainingDiverged, match="at step 3: the loss is nan"):
        run_recipe(recipe, echo=lambda *_: None)
    assert _failed(recipe).metrics == {"failed_step": 3}
    checkpoints = sorted(p.name for p in (recipe.stage("sft").run_dir / "checkpoints").glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-2"]  # nothing saved from the nan step


def test_nan_gradient_norm_is_caught_when_logged(tmp_path, tiny_model_dir, monkeypatch):
    from transformers import Trainer

    from alignkit.core.errors import TrainingDiverged

    monkeypatch.setattr(Trainer, "_get_grad_norm", lambda self, model, grad_norm=None: float("inf"))
    recipe = load_recipe(sft_recipe(tmp_path, tiny_model_dir), [*DIVERGE, "stages.sft.logging_steps=1"],
                         output_dir=str(tmp_path / "runs"))
    with pytest.raises(TrainingDiverged, match="at step 1: the grad norm is inf"):
        run_recipe(recipe, echo=lambda *_: None)
    assert _failed(recipe).metrics == {"failed_step": 1}


def test_nan_weights_are_never_saved(tmp_path, tiny_model_dir, monkeypatch):
    """The last line of defence: with the training check off, the save refuses the nan model."""
    from alignkit.core.errors import ModelError

    monkeypatch.setattr("alignkit.stages.common.stop_on_nonfinite", lambda trainer, ctx: None)
    recipe = load_recipe(sft_recipe(tmp_path, tiny_model_dir), [*DIVERGE, "stages.sft.lr=1e30"],
                         output_dir=str(tmp_path / "runs"))
    with pytest.raises(ModelError, match=r"^sft: trained model: tensor \S+ has \d+ nan/inf values of \d+; not writing"):
        run_recipe(recipe, echo=lambda *_: None)
    _failed(recipe)


# ---- other data forms (docs/data.md): 2-step runs ------------------------------------------------------

CHATS = [[{"role": "user", "content": f"What is {i} + 1?"}, {"role": "assistant", "content": f"{i + 1}"},
          {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes."}] for i in range(8)]


def two_step_recipe(tmp_path: Path, model: Path, data: str) -> Path:
    path = tmp_path / "sft-data.yaml"
    path.write_text(textwrap.dedent(f"""
        name: tiny-sft-data
        tracking: {{report_to: none}}
        stages:
          - kind: sft
            model: {model}
            data: {data}
            max_steps: 2
            batch_size: 4
            max_length: 96
            logging_steps: 1
    """))
    return path


def test_sft_on_messages_jsonl_trains_on_assistant_turns(tmp_path, tiny_model_dir):
    from datasets import Dataset

    from alignkit.modeling.models import load_tokenizer
    from alignkit.stages.sft import _assistant_masked

    tokenizer = load_tokenizer(str(tiny_model_dir), padding_side="right")
    row = _assistant_masked(Dataset.from_dict({"messages": CHATS[:1]}), tokenizer, chat=True, mask=True)[0]
    trained = [t for t, m in zip(row["input_ids"], row["assistant_masks"]) if m]
    assert tokenizer.decode(trained) == "1<|im_end|>\nYes.<|im_end|>\n"  # both assistant turns, nothing else

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CHATS))
    recipe = load_recipe(two_step_recipe(tmp_path, tiny_model_dir, f"{{source: {data}}}"),
                         output_dir=str(tmp_path / "runs"))
    run_recipe(recipe, echo=lambda *_: None)
    manifest = Manifest.read(recipe.stage("sft").run_dir)
    assert manifest.status == "done" and manifest.metrics["train_steps"] == 2
    assert manifest.metrics["train_examples"] == 8


def test_sft_on_a_save_to_disk_folder(tmp_path, tiny_model_dir):
    from datasets import Dataset, DatasetDict

    rows = [{"prompt": f"What is {i} + 1?", "completion": f"{i + 1}"} for i in range(8)]
    DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "saved"))
    recipe = load_recipe(two_step_recipe(tmp_path, tiny_model_dir, f"{{source: {tmp_path / 'saved'}, split: train}}"),
                         output_dir=str(tmp_path / "runs"))
    run_recipe(recipe, echo=lambda *_: None)
    manifest = Manifest.read(recipe.stage("sft").run_dir)
    assert manifest.status == "done" and manifest.metrics["train_steps"] == 2


def test_kill_right_after_the_final_checkpoint_resumes_to_the_same_record(tmp_path, tiny_model_dir, monkeypatch):
    """A kill between the last checkpoint and the model save: the rerun takes no extra step and reports the
    uninterrupted run's metrics (an earlier version took a 25th step of 24 and halved the loss record)."""
    from transformers import TrainerCallback
    from trl import SFTTrainer

    class CrashAtTheEnd(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 24:
                raise KeyboardInterrupt

    class CrashingTrainer(SFTTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(CrashAtTheEnd())

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    whole = run_recipe(load_recipe(sft_recipe(tmp_path / "a", tiny_model_dir), output_dir=str(tmp_path / "a")),
                       echo=lambda *_: None)[0].metrics
    monkeypatch.setattr("trl.SFTTrainer", CrashingTrainer)
    recipe = load_recipe(sft_recipe(tmp_path / "b", tiny_model_dir), output_dir=str(tmp_path / "b"))
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, echo=lambda *_: None)
    monkeypatch.setattr("trl.SFTTrainer", SFTTrainer)
    resumed = run_recipe(recipe, echo=lambda *_: None)[0].metrics
    assert resumed["train_steps"] == whole["train_steps"] == 24
    for key in ("train_loss", "first_logged_loss", "last_logged_loss"):
        assert resumed[key] == pytest.approx(whole[key], rel=1e-4), key


@pytest.mark.e2e
def test_smollm2_template_masks_every_assistant_turn(smollm2_dir):
    """SmolLM2's template (default system turn, no generation markers) still masks assistant turns only."""
    from datasets import Dataset

    from alignkit.modeling.models import load_tokenizer
    from alignkit.stages.sft import _assistant_masked

    tokenizer = load_tokenizer(str(smollm2_dir), padding_side="right")
    row = _assistant_masked(Dataset.from_dict({"messages": CHATS[:1]}), tokenizer, chat=True, mask=True)[0]
    assert "<|im_start|>system" in tokenizer.decode(row["input_ids"])
    assert tokenizer.decode([t for t, m in zip(row["input_ids"], row["assistant_masks"]) if m]) == \
        "1<|im_end|>\nYes.<|im_end|>\n"
