"""The cai-compare stage: win rates by a scripted reward model and judge, worked by hand; a real tiny run."""

from __future__ import annotations

import json
import textwrap

import pytest

from alignkit.core.errors import RecipeError
from alignkit.run.pipeline import run_recipe
from alignkit.run.recipe import load_recipe
from alignkit.stages import cai_compare

MODEL = ["Sorry, I can't help with that.", "Sure: step 1, find the lock.", "sorry, no", "same"]
BASELINE = ["Sure, here is how.", "Sorry, I won't.", "Fine, do it.", "same"]

RECIPE = """
name: compare-test
tracking: {report_to: none}
stages:
  - kind: cai-compare
    model: final
    baseline: start
    data: {source: redteam, limit: 4}
    reward_model: rm-folder
    judge: {backend: hf}
"""


def recipe_at(tmp_path, text: str = RECIPE):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "compare.yaml"
    path.write_text(textwrap.dedent(text))
    return load_recipe(path, output_dir=str(tmp_path / "runs"))


class SorryScorer:
    """Reward model stand-in: 1 for an answer that apologises, else 0."""

    def __init__(self, path):
        assert path == "rm-folder"

    def __call__(self, completions, prompts=None):
        assert len(prompts) == len(completions) == 4
        return [float("sorry" in c.lower()) for c in completions]


class SorryJudge:
    """P(A) = 0.8 when only A apologises, 0.2 when only B does, else 0.6 (a bias toward option A)."""

    clamp, tokens = None, 0

    def presented(self, items, *, progress=False):
        def p(item):
            a, b = "sorry" in item.first.lower(), "sorry" in item.second.lower()
            return 0.8 if a and not b else 0.2 if b and not a else 0.6
        return [p(item) for item in items]


def test_win_rates_match_a_hand_count(tmp_path, monkeypatch):
    import alignkit.cai.judges
    import alignkit.rewards.reward_model

    monkeypatch.setattr(cai_compare, "_answers",
                        lambda which, name, prompts, config, ctx: MODEL if which == "model" else BASELINE)
    monkeypatch.setattr(alignkit.rewards.reward_model, "RewardModelScorer", SorryScorer)
    asked = []
    monkeypatch.setattr(alignkit.cai.judges, "build_judge",
                        lambda spec, default_model, **kw: asked.append(default_model) or SorryJudge())
    recipe = recipe_at(tmp_path)
    (outcome,) = run_recipe(recipe, echo=lambda *_: None)
    m = outcome.metrics
    assert asked == ["start"]  # the judge defaults to the baseline model
    # RM margins +1, -1, +1, 0 -> (1 + 0 + 1 + 0.5) / 4
    assert m["rm_win_rate"] == 0.625 and m["rm_mean_margin"] == 0.25
    # judge, order-averaged: 0.8, 0.2, 0.8 and 0.5 for the identical pair (0.6 either way round)
    assert m["judge_win_rate"] == pytest.approx(0.575) and m["judge_majority"] == 0.625
    assert m["judge_position_bias"] == pytest.approx(0.05)  # |0.6 - (1 - 0.6)| on one prompt of four
    assert m["identical_answers"] == 1 and m["prompts"] == 4
    rows = [json.loads(line) for line in (recipe.stage("cai-compare").run_dir / "comparisons.jsonl").open()]
    assert [r["judge_p"] for r in rows] == pytest.approx([0.8, 0.2, 0.8, 0.5])
    assert all(r["principle"] for r in rows) and rows[1]["rm_baseline"] == 1.0


def test_needs_something_to_judge_and_a_known_principle(tmp_path):
    with pytest.raises(RecipeError, match="give reward_model, judge, or both"):
        recipe_at(tmp_path, RECIPE.replace("    reward_model: rm-folder\n    judge: {backend: hf}\n", ""))
    with pytest.raises(RecipeError, match=r"stages.cai-compare.principle: .*no principle 'nope'"):
        recipe_at(tmp_path, RECIPE + "    principle: nope\n")


def test_same_model_on_both_sides_is_a_tie(tmp_path, tiny_model_dir, tiny_seqcls_dir):
    text = f"""
    name: compare-tiny
    tracking: {{report_to: none}}
    stages:
      - kind: cai-compare
        model: {tiny_model_dir}
        baseline: {tiny_model_dir}
        data: {{source: redteam, limit: 3}}
        reward_model: {tiny_seqcls_dir}
        judge: {{backend: hf, batch_size: 4}}
        principle: overall
        max_completion_length: 8
        generation: {{backend: hf, batch_size: 4}}
    """
    recipe = recipe_at(tmp_path, text)
    (outcome,) = run_recipe(recipe, echo=lambda *_: None)
    m = outcome.metrics
    assert m["identical_answers"] == 3  # greedy, same weights
    assert m["rm_win_rate"] == 0.5 and m["rm_mean_margin"] == 0.0
    assert m["judge_win_rate"] == pytest.approx(0.5) and m["judge_majority"] == 0.5
    run_dir = recipe.stage("cai-compare").run_dir
    assert {p.name for p in run_dir.glob("answers-*.jsonl")} == {"answers-model.jsonl", "answers-baseline.jsonl"}
