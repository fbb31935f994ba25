"""Hub export (loadable with from_pretrained, model card, no secrets) and push (fake API, no network)."""

from __future__ import annotations

import shutil
import textwrap

import pytest

from alignkit.artifacts import Manifest
from alignkit.config import HubSpec
from alignkit.errors import AlignkitError
from alignkit.hub import export_stage, push_folder
from alignkit.pipeline import StageResult, run_recipe
from alignkit.recipe import load_recipe
from alignkit.registry import STAGES

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
