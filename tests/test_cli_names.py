"""Names users bring from TRL, Axolotl and LLaMA-Factory get a pointer to ours; --version; unknown recipe names."""

from __future__ import annotations

import textwrap

import pytest

from alignkit import __version__
from alignkit.cli import main

STAGE = "name: x\nstages:\n  - kind: {kind}\n    model: m\n    data: arith\n    {line}\n"


@pytest.mark.parametrize("line, field, ours", [
    ("learning_rate: 1.0e-4", "learning_rate", "`lr`"),
    ("per_device_train_batch_size: 4", "per_device_train_batch_size", "`batch_size`"),
    ("gradient_accumulation_steps: 2", "gradient_accumulation_steps", "`grad_accum`"),
    ("num_train_epochs: 2", "num_train_epochs", "`epochs`"),
    ("lora_r: 8", "lora_r", "`lora: {r: ...}`"),
    ("lora_rank: 8", "lora_rank", "`lora: {r: ...}`"),
    ("load_in_4bit: true", "load_in_4bit", "`quantization: {bits: 4}`"),
    ("cutoff_len: 512", "cutoff_len", "`max_length`"),
    ("sequence_len: 512", "sequence_len", "`max_length`"),
    ("model_name_or_path: m", "model_name_or_path", "`model`"),
    ("base_model: m", "base_model", "`model`"),
    ("epoch: 2", "epoch", "`epochs`"),  # a near miss of our own name
])
def test_foreign_field_names_point_at_ours(tmp_path, capsys, line, field, ours):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(STAGE.format(kind="sft", line=line))
    assert main(["run", str(recipe), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"stages.sft.{field}: unknown field" in err and f"did you mean {ours}" in err


@pytest.mark.parametrize("kind, key, ours", [
    ("sft", "learning_rate", "lr"), ("sft", "output_dir", "--output-dir"), ("dpo", "num_train_epochs", "epochs"),
    ("sft", "per_device_train_batch_size", "batch_size"), ("reward", "gradient_accumulation_steps", "grad_accum"),
])
def test_trl_keys_that_duplicate_our_fields_are_refused(tmp_path, capsys, kind, key, ours):
    recipe = tmp_path / "r.yaml"
    line = f"trl: {{{key}: 1}}"
    recipe.write_text(STAGE.format(kind=kind, line=line))
    assert main(["run", str(recipe), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"stages.{kind}.trl.{key}" in err and f"`{ours}" in err and "Traceback" not in err


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"alignkit {__version__}"


def test_unknown_recipe_name_lists_the_shipped_ones(capsys):
    assert main(["run", "quickstrat", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'quickstart'" in err and "rlvr-arith" in err and err.count("\n") == 1


def test_shipped_name_still_resolves(tmp_path, capsys):
    assert main(["run", "quickstart", "--dry-run", "--output-dir", str(tmp_path)]) == 0
    assert "recipe quickstart" in capsys.readouterr().out


def test_dry_run_shows_what_to_check_before_a_long_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert main(["run", "rlvr-arith", "--dry-run", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "lr 0.0001, max_steps 24, batch 8 x grad_accum 4 x 1 process(es) = 32" in out  # the grpo stage
    assert "lr 0.001, epochs 1.0" in out and "'target_modules': 'all-linear'" in out
    assert "quantization: 4-bit nf4 (" in out and "tracking: wandb, mode offline (from the recipe)" in out
