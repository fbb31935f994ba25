"""Export a stage's model as a self-describing folder and push it to the Hugging Face Hub.

The export holds the weights (merged, or the LoRA adapter when ``merge_adapter: false``), the tokenizer,
the resolved recipe, every finished stage's metrics and a generated model card. Everything written is
passed through :func:`alignkit.secrets.redact` first. Pushing needs ``HF_TOKEN`` (or a cached login).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from .artifacts import Manifest, atomic_dir
from .config import DataSpec, HubSpec
from .errors import AlignkitError
from .recipe import PlannedStage, Recipe
from .secrets import redact, redact_text

# Trainer state a loader never needs; training_args.bin is pickled config that redact() cannot see into
NOT_EXPORTED = frozenset({"training_args.bin", "trainer_state.json", "optimizer.pt", "scheduler.pt",
                          "rng_state.pth", "scaler.pt"})


def export_stage(recipe: Recipe, stage: PlannedStage, manifest: Manifest, out_dir: Path | None = None) -> Path:
    """Write ``<stage>/export`` (or ``out_dir``): weights, tokenizer, recipe, metrics, README model card."""
    out_dir = Path(out_dir or stage.run_dir / "export")
    merge = recipe.hub.merge_adapter if recipe.hub else True
    source = manifest.artifacts.get("model") if merge or "adapter" not in manifest.artifacts \
        else manifest.artifacts["adapter"]
    if not source or not Path(source).is_dir():
        raise AlignkitError(f"stage {stage.name!r} has no model folder to export (artifacts: {manifest.artifacts})")
    metrics = _all_metrics(recipe, upto=stage.index)
    with atomic_dir(out_dir) as tmp:
        for item in Path(source).iterdir():
            if item.is_file() and item.name not in NOT_EXPORTED:
                shutil.copy2(item, tmp / item.name)
        (tmp / "alignkit_recipe.yaml").write_text(yaml.safe_dump(redact(recipe.resolved_dict()), sort_keys=False))
        (tmp / "alignkit_metrics.json").write_text(json.dumps(redact(metrics), indent=2, default=str))
        (tmp / "README.md").write_text(redact_text(model_card(recipe, stage, metrics)))
    return out_dir


def _all_metrics(recipe: Recipe, upto: int) -> dict[str, dict[str, Any]]:
    metrics = {}
    for stage in recipe.stages[: upto + 1]:
        manifest = Manifest.read(stage.run_dir)
        if manifest and manifest.status == "done":
            metrics[stage.name] = manifest.metrics
    return metrics


def model_card(recipe: Recipe, stage: PlannedStage, metrics: dict[str, dict[str, Any]]) -> str:
    """A Markdown model card: what it is, how it was made, how well it did, how to load it."""
    base = next((getattr(s.config, "model", None) for s in recipe.stages if getattr(s.config, "model", None)), None)
    datasets = sorted({spec.source for s in recipe.stages for _, spec in s.config if isinstance(spec, DataSpec)})
    repo = recipe.hub.repo_id if recipe.hub else "PATH"
    lines = [
        "---",
        "library_name: transformers",
        "tags: [alignkit, trl]",
        f"base_model: {base}" if base and "/" in str(base) and not str(base).startswith(("/", ".")) else "",
        "---",
        f"# {repo}",
        "",
        f"Post-trained with [alignkit](https://pypi.org/project/alignkit/) recipe `{recipe.name}`"
        + (f": {recipe.description}" if recipe.description else "."),
        "",
        f"- Base model: `{base}`",
        f"- Datasets: {', '.join(f'`{d}`' for d in datasets) or 'none'}",
        "- Stages: " + " -> ".join(f"`{s.name}` ({s.kind})" for s in recipe.stages[: stage.index + 1]),
        "",
        "## Metrics",
        "",
        "| stage | metric | value |",
        "|---|---|---|",
    ]
    for stage_name, values in metrics.items():
        for key, value in values.items():
            if isinstance(value, (int, float, str)):
                lines.append(f"| {stage_name} | {key} | {value:.4g} |" if isinstance(value, float)
                             else f"| {stage_name} | {key} | {value} |")
    lines += [
        "",
        "## How to load",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'model = AutoModelForCausalLM.from_pretrained("{repo}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
        "```",
        "",
        "The full recipe is in `alignkit_recipe.yaml` and every stage's metrics in `alignkit_metrics.json`.",
        "",
    ]
    return "\n".join(line for line in lines if line is not None)


def push_folder(folder: Path, spec: HubSpec, *, api=None) -> str:
    """Create the repository (private by default) and upload the folder; return the repo URL."""
    from huggingface_hub import HfApi

    api = api or HfApi()
    try:
        api.create_repo(spec.repo_id, private=spec.private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=spec.repo_id,
                          commit_message="Upload model trained with alignkit")
    except Exception as exc:  # network, auth, permissions: one clear message, no token in it
        raise AlignkitError(
            f"push to {spec.repo_id} failed: {redact_text(str(exc))[:300]}. Set HF_TOKEN (write access) or "
            f"run `hf auth login`; the export is kept in {folder}"
        ) from None
    return f"https://huggingface.co/{spec.repo_id}"
