"""Helpers the stage tests share: write a recipe, launch it under `accelerate launch` with 2 CPU processes,
and watch what a stage actually trained (QLoRA tests).

Import as ``from helpers import ...`` (pytest puts ``tests/`` on ``sys.path``: rootdir-relative imports).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CPU_2PROC = REPO / "recipes" / "accelerate" / "cpu_2proc.yaml"


def write_recipe(folder: Path, body: str, *, files: dict[str, str] | None = None, name: str = "recipe.yaml") -> Path:
    """Write ``body`` (a recipe in YAML, dedented) and any side ``files`` (reward programs, data) to ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for file, text in (files or {}).items():
        (folder / file).write_text(text)
    path = folder / name
    path.write_text(textwrap.dedent(body).lstrip())
    return path


def run_two_processes(recipe: Path, output_dir: Path, *overrides: str, stages: int = 1, timeout: int = 300):
    """``accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml -m alignkit run RECIPE`` (gloo).

    Returns the CompletedProcess after asserting exit code 0 and that two ranks really ran each of the recipe's
    ``stages`` (accelerate 1.15 quietly starts one process for a MULTI_CPU config; see cpu_2proc.yaml).
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_2PROC),
               "-m", "alignkit", "run", str(recipe), "--output-dir", str(output_dir)]
    for override in overrides:
        command += ["--set", override]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=recipe.parent, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the main rank alone echoes "<stage>: running (<kind>) on 2 processes" and the closing summary
    assert proc.stdout.count(": running (") == stages, proc.stdout[-3000:]
    assert proc.stdout.count(") on 2 processes") == stages, proc.stdout[-3000:]
    assert proc.stdout.count("finished; outputs in") == 1, proc.stdout[-3000:]
    return proc


class TrainedModelSpy:
    """Watches the model a stage hands to its TRL trainer (QLoRA tests).

    ``spy = TrainedModelSpy(monkeypatch, "alignkit.stages.reward")`` wraps that module's
    ``restore_trainable_dtype`` (called once the trainer is built, right before ``trainer.train()``) and
    ``save_trained_model``. After the run, ``spy.model`` is ``trainer.model`` (a PeftModel with LoRA) and
    ``spy.packed_at_train_start`` the number of 4-bit layers bitsandbytes had repacked into its CPU inference
    layout when training began (it must be 0; a state-dict save unpacks them again, so it is counted then).
    """

    def __init__(self, monkeypatch, module: str):
        import importlib

        target = importlib.import_module(module)
        restore, save = target.restore_trainable_dtype, target.save_trained_model
        self.model: Any = None
        self.packed_at_train_start: int | None = None

        def restore_and_count(trainer, *args, **kwargs):
            self.packed_at_train_start = packed_for_inference(trainer.model)
            return restore(trainer, *args, **kwargs)

        def save_and_keep(trainer, *args, **kwargs):
            self.model = trainer.model
            return save(trainer, *args, **kwargs)

        monkeypatch.setattr(target, "restore_trainable_dtype", restore_and_count)
        monkeypatch.setattr(target, "save_trained_model", save_and_keep)

    def quantized_layers(self) -> dict[str, int]:
        """Counts of the base linear layers' classes under the LoRA wrappers (``Linear4bit``, ``Linear``)."""
        counts: dict[str, int] = {}
        for name, module in self.model.named_modules():
            if name.endswith(".base_layer"):
                kind = type(module).__name__
                counts[kind] = counts.get(kind, 0) + 1
        return counts

    def lora_b_norm(self) -> float:
        """Sum of |lora_B|: zero at PEFT's init, so > 0 means the optimizer moved the adapter."""
        return float(sum(p.detach().abs().sum() for n, p in self.model.named_parameters() if "lora_B" in n))


def packed_for_inference(model: Any) -> int:
    """4-bit layers bitsandbytes repacked into its CPU inference layout (whose kernel has no autograd formula)."""
    import bitsandbytes as bnb

    return sum(bool(getattr(getattr(m.weight, "quant_state", None), "packing_format_for_cpu", False))
               for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))  # not PEFT's wrapper of the same name


QLORA = "{bits: 4}"  # what every QLoRA test sets; defaults: nf4, double quant, compute dtype auto (float32 on CPU)
