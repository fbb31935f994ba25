"""Hub export (loadable with from_pretrained, model card, no secrets) and push (fake API, no network)."""

from __future__ import annotations

import shutil
import textwrap

import pytest

from alignkit.core.artifacts import Manifest
from alignkit.core.config import HubSpec
from alignkit.core.errors import AlignkitError
from alignkit.run.hub import export_stage, push_folder
from alignkit.core.stage import StageResult
from alignkit.run.pipeline import run_recipe
from alignkit.run.recipe import load_recipe
from alignkit.core.stage import STAGES

TOKEN = "hf_" + "Zz9Yy8Xx7Ww6Vv5Uu4Tt3Ss2"


class FakeApi:
    def __init__(self, fail: bool = False):
        self.calls, self.fail = [], fail

    def create_repo(self, repo_id, private, exist_ok):
        self.calls.append(("create_repo", repo_id, private))
        if self.fail:
            raise RuntimeError(f"401 Unauthorized for token {TOKEN}")

    def upload_folder(self, folder_path, repo_id, commit_message):
        self.calls.append(("upload_folder", folder_path, repo_id))


@pytest.fixture
def trained_recipe(tmp_path, tiny_model_dir, monkeypatch):
    """A one-stage recipe whose stage 'trains' by copying the tiny model into its model/ folder."""
    import echo_stage

    monkeypatch.setitem(STAGES, "echo", "echo_stage")
    monkeypatch.setenv("HF_TOKEN", TOKEN)

    def fake_train(config, ctx):
        shutil.copytree(tiny_model_dir, ctx.run_dir / "model")
        return StageResult(metrics={"accuracy_after": 0.5}, artifacts={"model": str(ctx.run_dir / "model")})

    monkeypatch.setattr(echo_stage, "run", fake_train)
    path = tmp_path / "r.yaml"
    path.write_text(textwrap.dedent(f"""
        name: hubtest
        description: "a test recipe (token {TOKEN} must never leak)"
        tracking: {{report_to: none}}
        hub: {{repo_id: me/tiny, push: never}}
        stages:
          - kind: echo
            data: {{source: arith}}
    """))
    recipe = load_recipe(path, output_dir=str(tmp_path / "runs"))
    run_recipe(recipe, echo=lambda *_: None)
    return recipe


def test_export_loads_back_and_has_card_without_secrets(trained_recipe):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export = trained_recipe.stages[0].run_dir / "export"  # push: never still exports
    assert export.is_dir()
    model = AutoModelForCausalLM.from_pretrained(export)
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert model.config.vocab_size == len(tokenizer)
    card = (export / "README.md").read_text()
    assert "me/tiny" in card and "accuracy_after" in card and "`arith`" in card and "from_pretrained" in card
    for item in export.iterdir():
        if item.suffix in (".md", ".json", ".yaml"):
            assert TOKEN not in item.read_text(), item.name


def test_push_creates_private_repo_and_uploads(trained_recipe):
    api = FakeApi()
    stage = trained_recipe.stages[0]
    folder = export_stage(trained_recipe, stage, Manifest.read(stage.run_dir))
    url = push_folder(folder, HubSpec(repo_id="me/tiny"), api=api)
    assert url.endswith("me/tiny")
    assert api.calls == [("create_repo", "me/tiny", True), ("upload_folder", str(folder), "me/tiny")]


def test_push_failure_is_one_clear_message_without_token(trained_recipe, tmp_path):
    with pytest.raises(AlignkitError) as info:
        push_folder(tmp_path, HubSpec(repo_id="me/tiny", private=False), api=FakeApi(fail=True))
    assert "HF_TOKEN" in str(info.value) and TOKEN not in str(info.value)


# ------------------------------------------------------------------------------------------ loads where it says
# Each head is exported with `push: never`, then the card's own snippet is run in a fresh process, in an empty
# folder, after the run folder has been moved away: nothing may resolve into it.


def _recipe(tmp_path, monkeypatch, trainers: dict, stages: str, hub: str):
    """A recipe of echo stages; stage NAME 'trains' with trainers[NAME](config, ctx) -> artifacts (or none)."""
    import echo_stage

    monkeypatch.setitem(STAGES, "echo", "echo_stage")
    monkeypatch.setenv("HF_TOKEN", TOKEN)

    def fake_train(config, ctx):
        make = trainers.get(ctx.name)
        return StageResult(metrics={"score": 1.0}, artifacts=make(config, ctx) if make else {})

    monkeypatch.setattr(echo_stage, "run", fake_train)
    path = tmp_path / "r.yaml"
    path.write_text(f"name: hubload\ntracking: {{report_to: none}}\nhub: {hub}\nstages:\n{textwrap.dedent(stages)}")
    return load_recipe(path, output_dir=str(tmp_path / "runs"))


def _copy_trainer(source):
    def train(config, ctx):
        shutil.copytree(source, ctx.run_dir / "model")
        return {"model": str(ctx.run_dir / "model")}
    return train


def _snippet(export):
    import re

    card = (export / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    assert len(blocks) == 1, card
    return card, blocks[0]


def _run_snippet_elsewhere(export, repo_id, recipe, tmp_path, extra: str = "") -> str:
    """Move the run folder away, copy nothing; run the card's snippet (repo id -> export path) in a fresh
    interpreter whose working folder is empty and outside the run folder. Returns its stdout."""
    import os
    import subprocess
    import sys

    card, code = _snippet(export)
    moved_export = tmp_path / "shipped" / "export"
    moved_export.parent.mkdir()
    shutil.move(str(export), str(moved_export))
    shutil.move(str(recipe.root), str(tmp_path / "runs-gone"))  # a leftover pointer into runs/ now fails
    assert not recipe.root.exists()
    code = code.replace(f'"{repo_id}"', repr(str(moved_export)))
    assert repo_id not in code
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    done = subprocess.run([sys.executable, "-c", code + "\n" + extra], cwd=empty, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, f"{code}\n--- stderr:\n{done.stderr[-3000:]}"
    return done.stdout


def _card_data(export):
    from huggingface_hub import ModelCard

    return ModelCard.load(export / "README.md").data


def test_reward_model_export_loads_with_its_card_snippet(tmp_path, monkeypatch, tiny_seqcls_dir):
    recipe = _recipe(tmp_path, monkeypatch, {"rm": _copy_trainer(tiny_seqcls_dir)},
                     "  - {kind: echo, name: rm, model: HuggingFaceTB/SmolLM2-135M-Instruct, data: trl-lib/hh}\n",
                     "{repo_id: me/rm, push: never}")
    run_recipe(recipe, echo=lambda *_: None)
    export = recipe.stage("rm").run_dir / "export"
    card, code = _snippet(export)
    assert "AutoModelForSequenceClassification" in code and "AutoModelForCausalLM" not in code
    data = _card_data(export)
    assert (data.library_name, data.pipeline_tag) == ("transformers", "text-classification")
    assert data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and data.datasets == ["trl-lib/hh"]
    assert "alignkit" in data.tags and "trl" in data.tags and TOKEN not in card
    out = _run_snippet_elsewhere(export, "me/rm", recipe, tmp_path,
                                 "assert type(model).__name__.endswith('ForSequenceClassification')\n"
                                 "assert model(**inputs).logits.shape == (1, 1)")
    float(out.strip().splitlines()[-1])  # the scalar reward the snippet prints


def test_prm_export_loads_with_its_card_snippet(tmp_path, monkeypatch, tiny_tokencls_dir):
    from alignkit.rewards.prm import write_prm_config

    def train(config, ctx):
        artifacts = _copy_trainer(tiny_tokencls_dir)(config, ctx)
        write_prm_config(artifacts["model"], separator="\n", chat=True, aggregation="min", last_step_only=False)
        return artifacts

    recipe = _recipe(tmp_path, monkeypatch, {"prm": train}, "  - {kind: echo, name: prm, data: arith}\n",
                     "{repo_id: me/prm, push: never}")
    run_recipe(recipe, echo=lambda *_: None)
    export = recipe.stage("prm").run_dir / "export"
    card, code = _snippet(export)
    assert "PRMScorer" in code and "AutoModelForCausalLM" not in code
    data = _card_data(export)
    assert data.pipeline_tag == "token-classification" and "prm" in data.tags
    out = _run_snippet_elsewhere(export, "me/prm", recipe, tmp_path,
                                 "assert scorer.separator == '\\n' and scorer.how == 'min'")
    scores = eval(out.strip().splitlines()[-1])
    assert len(scores) == 2 and all(0.0 <= s <= 1.0 for s in scores)


def _lora_trainer(config, ctx):
    """A LoRA 'training' on the upstream stage's model folder: adapter/ points into the run folder, as TRL's do."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(config.model)
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                            task_type="CAUSAL_LM", init_lora_weights=False))
    model.save_pretrained(ctx.run_dir / "adapter")
    AutoTokenizer.from_pretrained(config.model).save_pretrained(ctx.run_dir / "adapter")
    model.merge_and_unload().save_pretrained(ctx.run_dir / "model")
    AutoTokenizer.from_pretrained(config.model).save_pretrained(ctx.run_dir / "model")
    return {"model": str(ctx.run_dir / "model"), "adapter": str(ctx.run_dir / "adapter")}


def test_lora_adapter_export_carries_its_base_and_loads_with_its_card_snippet(tmp_path, monkeypatch, tiny_model_dir):
    import json

    recipe = _recipe(tmp_path, monkeypatch, {"sft": _copy_trainer(tiny_model_dir), "tune": _lora_trainer},
                     "  - {kind: echo, name: sft, data: arith}\n"
                     "  - {kind: echo, name: check, data: arith}\n"
                     "  - {kind: echo, name: tune, model: '${sft.model}', data: arith}\n",
                     "{repo_id: me/lora, push: never, merge_adapter: false}")
    run_recipe(recipe, echo=lambda *_: None)
    export = recipe.stage("tune").run_dir / "export"
    adapter_config = json.loads((export / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "../base" and (export / "base" / "config.json").is_file()
    assert not (export / "adapter_config.json").exists()  # nothing auto-loads a base named relatively
    assert str(recipe.root) not in (export / "adapter" / "adapter_config.json").read_text()
    card, code = _snippet(export)
    assert "- Stages: `sft` (echo) -> `tune` (echo)" in card  # `check` did not feed it
    data = _card_data(export)
    assert (data.library_name, data.pipeline_tag) == ("peft", "text-generation") and "lora" in data.tags
    _run_snippet_elsewhere(export, "me/lora", recipe, tmp_path,
                           "from peft import PeftModel\nassert isinstance(model, PeftModel)\n"
                           "ids = tokenizer('The answer is', return_tensors='pt')\n"
                           "assert model(**ids).logits.shape[-1] == len(tokenizer)")


def test_adapter_on_the_alias_points_at_its_hub_id(tmp_path, monkeypatch, tiny_model_dir):
    """An adapter trained on the built-in alias's converted folder names the alias's Hub id, and the card loads
    it with AutoPeftModel (no network here: the Hub model is not fetched)."""
    import json

    from alignkit.run.hub import SMOLLM2_HUB_ID, portable_base

    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))
    alias_dir = tmp_path / "cache" / "models" / "smollm2-135m-instruct"
    shutil.copytree(tiny_model_dir, alias_dir)
    assert portable_base(str(alias_dir)) == SMOLLM2_HUB_ID == portable_base("smollm2-135m-instruct")
    assert portable_base("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    assert portable_base(str(tiny_model_dir)) is None and portable_base("runs/x/sft/model") is None

    recipe = _recipe(tmp_path, monkeypatch, {"tune": _lora_trainer},
                     f"  - {{kind: echo, name: tune, model: '{alias_dir}', data: arith}}\n",
                     "{repo_id: me/lora, push: never, merge_adapter: false}")
    run_recipe(recipe, echo=lambda *_: None)
    export = recipe.stage("tune").run_dir / "export"
    assert json.loads((export / "adapter_config.json").read_text())["base_model_name_or_path"] == SMOLLM2_HUB_ID
    assert not (export / "base").exists()
    _, code = _snippet(export)
    assert 'AutoPeftModelForCausalLM.from_pretrained("me/lora")' in code
    assert _card_data(export).base_model == SMOLLM2_HUB_ID


# ------------------------------------------------------------------------------------------ hub.stage, push: each


def test_hub_stage_picks_the_exported_stage(tmp_path, monkeypatch, tiny_model_dir):
    lines = []
    recipe = _recipe(tmp_path, monkeypatch, {"sft": _copy_trainer(tiny_model_dir)},
                     "  - {kind: echo, name: sft}\n  - {kind: echo, name: ev}\n",
                     "{repo_id: me/tiny, push: never, stage: sft}")
    run_recipe(recipe, echo=lines.append)
    assert (recipe.stage("sft").run_dir / "export" / "README.md").is_file()
    assert not (recipe.stage("ev").run_dir / "export").exists()
    assert not any("nothing exported" in line for line in lines)


def test_last_stage_without_a_model_says_nothing_was_exported(tmp_path, monkeypatch, tiny_model_dir):
    lines = []
    recipe = _recipe(tmp_path, monkeypatch, {"sft": _copy_trainer(tiny_model_dir)},
                     "  - {kind: echo, name: sft}\n  - {kind: echo, name: ev}\n", "{repo_id: me/tiny}")
    run_recipe(recipe, echo=lines.append)
    said = [line for line in lines if "nothing exported" in line]
    assert len(said) == 1 and "'ev'" in said[0] and "hub.stage" in said[0], lines
    assert not (recipe.stage("sft").run_dir / "export").exists()


def test_unknown_hub_stage_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    from alignkit.cli import main
    from alignkit.core.errors import RecipeError

    monkeypatch.setitem(STAGES, "echo", "echo_stage")
    path = tmp_path / "r.yaml"
    path.write_text("name: x\nhub: {repo_id: me/x, stage: sfft}\nstages:\n  - {kind: echo, name: sft}\n")
    with pytest.raises(RecipeError, match="sfft"):
        load_recipe(path)
    assert main(["run", str(path), "--dry-run", "--output-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "hub.stage" in err and "sfft" in err
    path.write_text("name: x\nhub: {repo_id: me/x, stage: sft, push: each}\nstages:\n  - {kind: echo, name: sft}\n")
    with pytest.raises(RecipeError, match="push: each"):
        load_recipe(path)


def test_push_each_sends_each_model_stage_to_its_own_repo(tmp_path, monkeypatch, tiny_model_dir):
    import huggingface_hub

    api = FakeApi()
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: api)
    recipe = _recipe(tmp_path, monkeypatch, {"sft": _copy_trainer(tiny_model_dir),
                                             "dpo": _copy_trainer(tiny_model_dir)},
                     "  - {kind: echo, name: sft}\n  - {kind: echo, name: ev}\n  - {kind: echo, name: dpo}\n",
                     "{repo_id: me/tiny, push: each}")
    lines = []
    run_recipe(recipe, echo=lines.append)
    assert [call[:2] for call in api.calls if call[0] == "create_repo"] == [
        ("create_repo", "me/tiny-sft"), ("create_repo", "me/tiny-dpo")]
    assert "# me/tiny-dpo" in (recipe.stage("dpo").run_dir / "export" / "README.md").read_text()
    assert not any("nothing exported" in line for line in lines)


def test_real_reward_stage_adapter_export_loads_its_trained_head(tmp_path, tiny_model_dir):
    """A real `reward` stage with LoRA (merge_adapter: false): the exported adapter carries its base and its
    trained score head; the card's snippet, run elsewhere, scores like the stage's own merged model."""
    import json

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rows = [{"prompt": f"Question {i}?", "chosen": "the answer is here.", "rejected": "the quick dog."}
            for i in range(16)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    path = tmp_path / "rm.yaml"
    path.write_text(textwrap.dedent(f"""
        name: rmhub
        tracking: {{report_to: none}}
        hub: {{repo_id: me/rm-lora, push: never, merge_adapter: false}}
        stages:
          - kind: reward
            name: rm
            model: {tiny_model_dir}
            data: {{source: {data}}}
            lora: {{r: 4, alpha: 8, dropout: 0.0}}
            lr: 1.0e-2
            max_steps: 2
            batch_size: 8
            max_length: 32
    """))
    recipe = load_recipe(path, output_dir=str(tmp_path / "runs"))
    run_recipe(recipe, echo=lambda *_: None)
    export = recipe.stage("rm").run_dir / "export"
    assert (export / "adapter" / "adapter_config.json").is_file() and (export / "base" / "config.json").is_file()
    data_ = _card_data(export)
    assert (data_.library_name, data_.pipeline_tag) == ("peft", "text-classification")
    merged = recipe.stage("rm").outputs["model"]
    tokenizer = AutoTokenizer.from_pretrained(merged)
    with torch.no_grad():
        inputs = tokenizer("How do I bake bread? Mix flour, water, yeast and salt.", return_tensors="pt")
        expected = AutoModelForSequenceClassification.from_pretrained(merged)(**inputs).logits[0, 0].item()
    out = _run_snippet_elsewhere(export, "me/rm-lora", recipe, tmp_path,
                                 "from peft import PeftModel\nassert isinstance(model, PeftModel)")
    assert abs(float(out.strip().splitlines()[-1]) - expected) < 1e-4
