"""PPO checkpoints: everything a rerun needs to continue at step k + 1 exactly as if it had not stopped.

``<run_dir>/checkpoints/step-<k>/`` holds::

    policy/            the policy's LoRA adapter (PEFT folder)
    value/             the value model's LoRA adapter and score head (PEFT folder)
    optimizer.pt       optimizer and learning-rate scheduler states
    state.json         steps done, the KL coefficient (adaptive controller), the history of step metrics
    rng-<rank>.pt      each process's torch / python / numpy (and CUDA) random states

A checkpoint is written into a temporary folder and renamed when complete, so a folder named ``step-<k>`` is
always whole; a crash mid-save leaves only a ``.tmp-`` folder, removed by the next save.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

PREFIX = "step-"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"{PREFIX}{step:06d}"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint with the most steps, or None."""
    folder = Path(run_dir) / "checkpoints"
    found = [p for p in folder.glob(f"{PREFIX}*") if (p / "state.json").is_file()] if folder.is_dir() else []
    return max(found, key=lambda p: int(p.name[len(PREFIX):]), default=None)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, *, policy: Any, value: Any, optimizer: Any, scheduler: Any,
                    state: dict[str, Any], rank: int, is_main: bool, barrier: Callable[[], None],
                    keep: int) -> Path:
    """Write ``step-<step>`` (every process calls this; the main one writes the shared files).

    Weights and optimizer states are the same on every process (gradients are summed before each step), so
    only the main process saves them; each process saves its own random states. ``keep`` newest kept.
    """
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(f".tmp-{final.name}")
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    torch.save(rng_state(), tmp / f"rng-{rank}.pt")
    barrier()
    if is_main:
        policy.save_pretrained(str(tmp / "policy"))
        value.save_pretrained(str(tmp / "value"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=1) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        _prune(final.parent, keep)
    barrier()
    return final


def _prune(folder: Path, keep: int) -> None:
    done = sorted((p for p in folder.glob(f"{PREFIX}*") if (p / "state.json").is_file()),
                  key=lambda p: int(p.name[len(PREFIX):]))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(folder: Path, *, policy: Any, value: Any, optimizer: Any, scheduler: Any,
                    rank: int) -> dict[str, Any]:
    """Restore adapters, optimizer, scheduler and this process's random states; returns ``state.json``.

    A process whose rank has no saved random state (a run resumed with more processes) keeps its own.
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    for model, name in ((policy, "policy"), (value, "value")):
        weights = load_file(str(Path(folder) / name / "adapter_model.safetensors"))
        result = set_peft_model_state_dict(model, weights)
        if getattr(result, "unexpected_keys", None):
            raise RuntimeError(f"checkpoint {folder}/{name} does not fit the model: {result.unexpected_keys[:3]}")
    device = next(policy.parameters()).device
    saved = torch.load(Path(folder) / "optimizer.pt", map_location=device, weights_only=False)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    rng_file = Path(folder) / f"rng-{rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads((Path(folder) / "state.json").read_text())
