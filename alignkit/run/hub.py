"""Export a stage's model as a self-describing folder and push it to the Hugging Face Hub.

The export holds the weights (merged, or the LoRA adapter when ``merge_adapter: false``), the tokenizer,
the resolved recipe, every finished stage's metrics and a model card built with ``huggingface_hub``'s
:class:`~huggingface_hub.ModelCard`. The card's load snippet is chosen by what the folder holds (causal LM,
reward model, PRM, LoRA adapter), so it loads the head that was trained. An adapter never points at a run
folder: its ``base_model_name_or_path`` is rewritten to the Hub id the chain started from, or the base is
exported too, into ``base/``. Everything written is passed through :func:`alignkit.core.secrets.redact` first.
Pushing needs ``HF_TOKEN`` (or a cached login). See docs/hub.md.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from alignkit.core.artifacts import Manifest, atomic_dir
from alignkit.core.config import DataSpec, HubSpec
from alignkit.core.errors import AlignkitError
from alignkit.run.recipe import PlannedStage, Recipe
from alignkit.core.secrets import redact, redact_text

# Trainer state a loader never needs; training_args.bin is pickled config that redact() cannot see into
NOT_EXPORTED = frozenset({"training_args.bin", "trainer_state.json", "optimizer.pt", "scheduler.pt",
                          "rng_state.pth", "scaler.pt"})
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # where the built-in alias's weights come from
BASE_SUBFOLDER = "base"  # an adapter's base model, exported beside it when it is not on the Hub ...
ADAPTER_SUBFOLDER = "adapter"  # ... and then the adapter itself (see _point_adapter_at_portable_base)
_AUTO = {"causal-lm": "AutoModelForCausalLM", "seq-cls": "AutoModelForSequenceClassification",
         "token-cls": "AutoModelForTokenClassification"}
_PIPELINE_TAG = {"causal-lm": "text-generation", "seq-cls": "text-classification",
                 "token-cls": "token-classification"}
_PEFT_TASKS = {"CAUSAL_LM": "causal-lm", "SEQ_CLS": "seq-cls", "TOKEN_CLS": "token-cls"}


@dataclass(frozen=True)
class Head:
    """What an export folder holds: its task, whether it is a LoRA adapter, whether it is an alignkit PRM."""

    task: str  # causal-lm, seq-cls, token-cls
    adapter: bool = False
    prm: bool = False
    num_labels: int | None = None
    base_in_folder: bool = False  # adapter in adapter/ whose base was exported into base/

    @property
    def name(self) -> str:
        kind = "PRM" if self.prm else {"causal-lm": "causal LM", "seq-cls": "reward model (sequence classifier)",
                                       "token-cls": "token classifier"}[self.task]
        return f"LoRA adapter ({kind})" if self.adapter else kind


# ------------------------------------------------------------------------------------------ what to export


def export_target(recipe: Recipe) -> PlannedStage:
    """The stage ``push: final``/``never`` exports: ``hub.stage``, else the last stage."""
    return recipe.stage(recipe.hub.stage) if recipe.hub and recipe.hub.stage else recipe.stages[-1]


def stage_repo_id(spec: HubSpec, stage: PlannedStage) -> str:
    """The repository a stage goes to: ``repo_id``, or ``<repo_id>-<stage>`` with ``push: each``."""
    return f"{spec.repo_id}-{stage.name}" if spec.push == "each" else spec.repo_id


def export_decision(recipe: Recipe, stage: PlannedStage, manifest: Manifest) -> tuple[str | None, str | None]:
    """After ``stage`` finished: ``(repo_id, None)`` to export it, or ``(None, message)`` (message None: quiet).

    ``push: each`` exports every stage that wrote a model (quietly skipping eval, label...); otherwise only
    the target stage (:func:`export_target`) is exported, and a target without a model says so.
    """
    spec = recipe.hub
    if spec is None:
        return None, None
    has_model = bool(manifest.artifacts.get("model"))
    if spec.push == "each":
        return (stage_repo_id(spec, stage), None) if has_model else (None, None)
    if stage.name != export_target(recipe).name:
        return None, None
    if has_model:
        return spec.repo_id, None
    candidates = [s.name for s in recipe.stages if "model" in s.outputs]
    how = f"set hub.stage to one of {candidates}" if candidates else "no stage of this recipe writes a model"
    which = "hub.stage" if spec.stage else "the last stage"
    return None, (f"hub: nothing exported or pushed: {which} {stage.name!r} ({stage.kind}) writes no model; {how}")


# ------------------------------------------------------------------------------------------ export


def export_stage(recipe: Recipe, stage: PlannedStage, manifest: Manifest, out_dir: Path | None = None, *,
                 repo_id: str | None = None) -> Path:
    """Write ``<stage>/export`` (or ``out_dir``): weights, tokenizer, recipe, metrics, README model card.

    A PRM is always exported merged (:class:`alignkit.rewards.prm.PRMScorer` reads a full model folder).
    """
    out_dir = Path(out_dir or stage.run_dir / "export")
    repo_id = repo_id or (stage_repo_id(recipe.hub, stage) if recipe.hub else "PATH")
    merge = recipe.hub.merge_adapter if recipe.hub else True
    model_dir = manifest.artifacts.get("model")
    adapter_dir = manifest.artifacts.get("adapter")
    if adapter_dir and _is_prm(Path(adapter_dir)):
        merge = True
    source = model_dir if merge or not adapter_dir else adapter_dir
    if not source or not Path(source).is_dir():
        raise AlignkitError(f"stage {stage.name!r} has no model folder to export (artifacts: {manifest.artifacts})")
    source = Path(source)
    metrics = _all_metrics(recipe, upto=stage.index)
    with atomic_dir(out_dir) as tmp:
        _copy_model_files(source, tmp)
        if (tmp / "adapter_config.json").is_file():
            _point_adapter_at_portable_base(tmp)
        (tmp / "alignkit_recipe.yaml").write_text(yaml.safe_dump(redact(recipe.resolved_dict()), sort_keys=False))
        (tmp / "alignkit_metrics.json").write_text(json.dumps(redact(metrics), indent=2, default=str))
        head = detect_head(tmp)
        card = model_card(recipe, stage, metrics, head=head, repo_id=repo_id)
        (tmp / "README.md").write_text(redact_text(str(card)))
    return out_dir


def _copy_model_files(source: Path, target: Path) -> None:
    for item in source.iterdir():
        if item.is_file() and item.name not in NOT_EXPORTED:
            shutil.copy2(item, target / item.name)


def _is_prm(folder: Path) -> bool:
    from alignkit.rewards.prm import PRM_CONFIG

    return (folder / PRM_CONFIG).is_file()


def portable_base(name: str) -> str | None:
    """A base model name that resolves on any machine: a Hub id (the alias maps to its Hub id), else None.

    The built-in alias ``smollm2-135m-instruct`` (and its converted cache folder) map to
    ``HuggingFaceTB/SmolLM2-135M-Instruct``, the model its GGUF was made from.
    """
    from alignkit.modeling.models import _HUB_ID, SMOLLM2_ALIAS, cache_root

    if not name:
        return None
    if name == SMOLLM2_ALIAS:
        return SMOLLM2_HUB_ID
    path = Path(name).expanduser()
    alias_dir = cache_root() / "models" / SMOLLM2_ALIAS
    if path.exists():
        try:
            return SMOLLM2_HUB_ID if path.resolve() == alias_dir.resolve() else None
        except OSError:
            return None
    return name if _HUB_ID.match(name) and not name.startswith(".") else None


def _point_adapter_at_portable_base(folder: Path) -> bool:
    """Make the exported adapter's base resolve outside the run folder; True if the base was exported too.

    A Hub id (or the alias) is written into ``base_model_name_or_path`` as that Hub id. Any local folder (an
    earlier stage's ``model/``, a private checkpoint) is copied into ``<export>/base/`` and the adapter moves
    to ``<export>/adapter/``, naming ``../base``: transformers and PEFT resolve a relative base against the
    working folder, not the adapter's, so the card loads ``subfolder="base"`` then ``subfolder="adapter"``
    explicitly; the tokenizer stays at the top. The top then holds no ``adapter_config.json``, so nothing
    auto-loads a base from a name that would not resolve.
    """
    config_file = folder / "adapter_config.json"
    config = json.loads(config_file.read_text())
    original = str(config.get("base_model_name_or_path") or "")
    hub_id = portable_base(original)
    if hub_id is not None:
        config["base_model_name_or_path"] = hub_id
        config_file.write_text(json.dumps(redact(config), indent=2, sort_keys=True) + "\n")
        return False
    base = Path(original).expanduser()
    if not (base / "config.json").is_file():
        raise AlignkitError(
            f"the adapter's base model {redact_text(original)!r} is neither a Hub id nor a model folder that "
            "still exists, so the export could not load; set hub.merge_adapter: true or rerun its stage")
    (folder / BASE_SUBFOLDER).mkdir()
    for item in base.iterdir():  # the model only: the tokenizer is the adapter's, at the top
        if item.is_file() and item.name not in NOT_EXPORTED and (
                item.name in ("config.json", "generation_config.json") or item.suffix in (".safetensors", ".bin")
                or item.name.endswith(".index.json")):
            shutil.copy2(item, folder / BASE_SUBFOLDER / item.name)
    (folder / ADAPTER_SUBFOLDER).mkdir()
    for item in list(folder.iterdir()):
        if item.is_file() and item.name.startswith("adapter_"):
            item.rename(folder / ADAPTER_SUBFOLDER / item.name)
    config["base_model_name_or_path"] = f"../{BASE_SUBFOLDER}"
    (folder / ADAPTER_SUBFOLDER / "adapter_config.json").write_text(
        json.dumps(redact(config), indent=2, sort_keys=True) + "\n")
    return True


def detect_head(folder: Path) -> Head:
    """What ``folder`` holds, from ``adapter_config.json`` / ``config.json`` and ``alignkit_prm.json``."""
    folder = Path(folder)
    prm = _is_prm(folder)
    split = (folder / ADAPTER_SUBFOLDER / "adapter_config.json").is_file()
    adapter_dir = folder / ADAPTER_SUBFOLDER if split else folder
    if (adapter_dir / "adapter_config.json").is_file():
        from alignkit.modeling.models import adapter_num_labels

        config = json.loads((adapter_dir / "adapter_config.json").read_text())
        task = _PEFT_TASKS.get(str(config.get("task_type") or "CAUSAL_LM"), "causal-lm")
        labels = adapter_num_labels(adapter_dir) if task != "causal-lm" else None
        return Head(task, adapter=True, prm=prm, num_labels=labels, base_in_folder=split)
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    architecture = (config.get("architectures") or ["ForCausalLM"])[0]
    task = ("seq-cls" if architecture.endswith("ForSequenceClassification")
            else "token-cls" if architecture.endswith("ForTokenClassification") else "causal-lm")
    labels = (len(config.get("id2label") or {}) or None) if task != "causal-lm" else None
    return Head(task, prm=prm, num_labels=labels)


def _all_metrics(recipe: Recipe, upto: int) -> dict[str, dict[str, Any]]:
    metrics = {}
    for stage in recipe.stages[: upto + 1]:
        manifest = Manifest.read(stage.run_dir)
        if manifest and manifest.status == "done":
            metrics[stage.name] = manifest.metrics
    return metrics


# ------------------------------------------------------------------------------------------ model card


def stage_chain(recipe: Recipe, stage: PlannedStage) -> list[PlannedStage]:
    """The stages ``stage`` was built from (following ``${stage.output}`` references), in run order."""
    names, todo = {stage.name}, [stage]
    while todo:
        for name in todo.pop().upstream:
            if name not in names:
                names.add(name)
                todo.append(recipe.stage(name))
    return [s for s in recipe.stages if s.name in names]


def _base_model(chain: list[PlannedStage]) -> str | None:
    """The Hub id the chain started from (its first stage's ``model``), when it is one."""
    for planned in chain:
        model = getattr(planned.config, "model", None)
        if model:
            return portable_base(str(model))
    return None


def _datasets(chain: list[PlannedStage]) -> tuple[list[str], list[str]]:
    """``(every data source, the Hub dataset ids among them)`` of the chain's stages."""
    from alignkit.modeling.models import _HUB_ID

    sources, hub_ids = [], []
    for planned in chain:
        for _, spec in planned.config:
            if not isinstance(spec, DataSpec):
                continue
            sources.append(spec.source)
            for name in (spec.source, spec.path):
                local = name and (Path(name).expanduser().exists() or Path(name).suffix in
                                  (".jsonl", ".json", ".parquet", ".csv", ".gz", ".txt"))
                if name and "/" in name and _HUB_ID.match(name) and not local:
                    hub_ids.append(name)
    return sorted(set(sources)), sorted(set(hub_ids))


def load_snippet(head: Head, repo: str) -> str:
    """Python that loads ``repo`` with the head that was trained (what the card prints)."""
    if head.prm:
        return "\n".join([
            "from alignkit.rewards.prm import PRMScorer  # pip install alignkit",
            f'scorer = PRMScorer("{repo}")',
            'print(scorer.score_steps("Tom has 3 apples. He buys 4 more. How many?", '
            '["Add 4: 3 + 4 = 7.", "The answer is 7."]))  # p(good) per step',
        ])
    auto = _AUTO[head.task]
    labels = f", num_labels={head.num_labels}" if head.adapter and head.num_labels else ""
    if head.adapter and head.base_in_folder:
        lines = [
            "from peft import PeftModel",
            f"from transformers import {auto}, AutoTokenizer",
            f'base = {auto}.from_pretrained("{repo}", subfolder="{BASE_SUBFOLDER}"{labels})',
            f'model = PeftModel.from_pretrained(base, "{repo}", subfolder="{ADAPTER_SUBFOLDER}")',
        ]
    elif head.adapter:
        peft_auto = auto.replace("AutoModel", "AutoPeftModel")
        lines = [
            f"from peft import {peft_auto}",
            "from transformers import AutoTokenizer",
            f'model = {peft_auto}.from_pretrained("{repo}"{labels})',
        ]
    else:
        lines = [f"from transformers import {auto}, AutoTokenizer", f'model = {auto}.from_pretrained("{repo}")']
    lines.append(f'tokenizer = AutoTokenizer.from_pretrained("{repo}")')
    if head.task == "seq-cls":
        lines += [
            'inputs = tokenizer("How do I bake bread? Mix flour, water, yeast and salt.", return_tensors="pt")',
            "print(model(**inputs).logits[0, 0].item())  # the scalar reward",
        ]
    return "\n".join(lines)


def model_card(recipe: Recipe, stage: PlannedStage, metrics: dict[str, dict[str, Any]], *,
               head: Head | None = None, repo_id: str | None = None):
    """A :class:`huggingface_hub.ModelCard`: metadata, how it was made, how well it did, how to load it."""
    from huggingface_hub import ModelCard, ModelCardData

    head = head or Head("causal-lm")
    repo = repo_id or (recipe.hub.repo_id if recipe.hub else "PATH")
    chain = stage_chain(recipe, stage)
    base = _base_model(chain)
    sources, hub_datasets = _datasets(chain)
    kinds = list(dict.fromkeys(s.kind for s in chain))
    data = ModelCardData(
        library_name="peft" if head.adapter else "transformers",
        pipeline_tag=_PIPELINE_TAG[head.task],
        base_model=base,
        datasets=hub_datasets or None,
        tags=["alignkit", "trl", *kinds, *(["lora"] if head.adapter else []), *(["prm"] if head.prm else [])],
    )
    first_model = next((getattr(s.config, "model", None) for s in chain if getattr(s.config, "model", None)), None)
    lines = [
        f"# {repo}",
        "",
        f"A {head.name} post-trained with [alignkit](https://pypi.org/project/alignkit/) recipe `{recipe.name}`"
        + (f": {recipe.description}" if recipe.description else "."),
        "",
        f"- Base model: `{base}`" if base else
        f"- Base model: {'a local model folder' if first_model else 'unknown'} (not on the Hub)",
        f"- Datasets: {', '.join(f'`{d}`' for d in sources) or 'none'}",
        "- Stages: " + " -> ".join(f"`{s.name}` ({s.kind})" for s in chain),
        f"- Exported stage: `{stage.name}`",
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
    lines += ["", "## How to load", "", "```python", load_snippet(head, repo), "```", ""]
    if head.adapter and head.base_in_folder:
        lines += [f"The adapter is in `{ADAPTER_SUBFOLDER}/` and the model it was trained on in `{BASE_SUBFOLDER}/` "
                  "(a local model folder, not a Hub model), so both load from this repository.", ""]
    elif head.adapter and base == SMOLLM2_HUB_ID:
        lines += [f"The adapter was trained on alignkit's `smollm2-135m-instruct` alias (`{SMOLLM2_HUB_ID}` "
                  "dequantized from its Q4_1 GGUF); on the original weights it behaves slightly differently.", ""]
    if head.task == "seq-cls" and not head.adapter:
        lines += ["To score (prompt, completion) pairs exactly as in training, use "
                  f'`alignkit.rewards.reward_model.RewardModelScorer("{repo}")(completions, prompts=prompts)`.', ""]
    lines += ["The full recipe is in `alignkit_recipe.yaml` and every stage's metrics in `alignkit_metrics.json`.",
              ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n" + "\n".join(lines))


# ------------------------------------------------------------------------------------------ push


def push_folder(folder: Path, spec: HubSpec, *, api=None, repo_id: str | None = None) -> str:
    """Create the repository (private by default) and upload the folder; return the repo URL."""
    from huggingface_hub import HfApi

    api = api or HfApi()
    repo_id = repo_id or spec.repo_id
    try:
        api.create_repo(repo_id, private=spec.private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id,
                          commit_message="Upload model trained with alignkit")
    except Exception as exc:  # network, auth, permissions: one clear message, no token in it
        raise AlignkitError(
            f"push to {repo_id} failed: {redact_text(str(exc))[:300]}. Set HF_TOKEN (write access) or "
            f"run `hf auth login`; the export is kept in {folder}"
        ) from None
    return f"https://huggingface.co/{repo_id}"
