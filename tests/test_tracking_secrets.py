"""Secrets given on the command line, in W&B tags or in ``trl:`` reach no file under the run folder; the
environment's WANDB_MODE wins over the recipe's default."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from alignkit.cli import main
from alignkit.core.config import TrackingSpec
from alignkit.core.stage import STAGES
from alignkit.core.tracking import wandb_mode

TOKEN = "hf_" + "Zq8Xw2Vb4Nm6Lk1Jh3Gf5Ds7"  # Hugging Face token shape
RECIPE = """\
name: leak
stages:
  - kind: echo
    name: first
    message: a
tracking:
  report_to: wandb
  wandb: {project: alignkit-test}
"""


@pytest.fixture(autouse=True)
def echo_kind(monkeypatch):
    monkeypatch.setitem(STAGES, "echo", "echo_stage")


def files_holding(root: Path, secret: str) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def test_set_values_and_wandb_tags_reach_no_file(tmp_path, monkeypatch):
    recipe = tmp_path / "leak.yaml"
    recipe.write_text(RECIPE)
    out = tmp_path / "runs"
    argv = ["run", str(recipe), "--output-dir", str(out), "--set", f"description=note {TOKEN}",
            "--set", f"tracking.wandb.tags=[{TOKEN}]", "--set", f"tracking.wandb.group=g-{TOKEN}"]
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(sys, "argv", ["alignkit", *argv])  # W&B records sys.argv in the run's metadata
    assert main(argv) == 0
    written = list(out.rglob("*.wandb"))
    assert written, "no offline W&B run was written"
    assert files_holding(out, TOKEN) == []
    assert files_holding(out, TOKEN[3:15]) == []  # no fragment either


def test_secret_named_set_value_is_masked_in_the_recorded_command_line(tmp_path, monkeypatch):
    recipe = tmp_path / "leak.yaml"
    recipe.write_text(RECIPE)
    out = tmp_path / "runs"
    plain_secret = "correct-horse-battery-staple"  # no token shape: only its key says it is a secret
    argv = ["run", str(recipe), "--output-dir", str(out)]
    monkeypatch.setenv("WANDB_MODE", "offline")
    # the command line W&B records holds a credential-named --set (here one the run itself never parses, so
    # that it runs and writes its W&B files); only its key says it is a secret
    monkeypatch.setattr(sys, "argv", ["alignkit", *argv, "--set", f"hub.api_key={plain_secret}"])
    assert main(argv) == 0
    assert list(out.rglob("*.wandb")), "no offline W&B run was written"
    assert files_holding(out, plain_secret) == []


def test_trl_secret_keys_are_refused_before_any_work(tmp_path, capsys):
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        name: sft-secret
        stages:
          - kind: sft
            model: tiny
            data: {{source: arith, params: {{n: 8}}}}
            trl: {{hub_token: {TOKEN}}}
        """))
    assert main(["run", str(recipe), "--output-dir", str(tmp_path / "runs"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "stages.sft.trl.hub_token" in err and "HF_TOKEN" in err and TOKEN not in err
    assert not (tmp_path / "runs").exists() or files_holding(tmp_path / "runs", TOKEN) == []


@pytest.mark.parametrize("env, recipe_mode, expected", [
    (None, None, "online"), ("offline", None, "offline"), ("dryrun", None, "offline"),
    ("disabled", None, "disabled"), ("offline", "online", "online"), (None, "disabled", "disabled"),
])
def test_environment_wandb_mode_wins_unless_the_recipe_sets_one(monkeypatch, env, recipe_mode, expected):
    if env is None:
        monkeypatch.delenv("WANDB_MODE", raising=False)
    else:
        monkeypatch.setenv("WANDB_MODE", env)
    spec = TrackingSpec(wandb={"mode": recipe_mode} if recipe_mode else {})
    assert wandb_mode(spec) == expected


def test_wandb_online_without_login_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    recipe = tmp_path / "leak.yaml"
    recipe.write_text(RECIPE.replace("wandb: {project: alignkit-test}", "wandb: {project: alignkit-test, mode: online}"))
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert main(["run", str(recipe), "--output-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "W&B could not start a run in online mode" in err and "WANDB_MODE=offline" in err
