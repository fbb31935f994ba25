"""The cai-label stage: pair logic with a scripted policy and judge, resume after a crash, ranks, and a real
tiny-model run whose pairs the dpo and reward stages read."""

from __future__ import annotations

import json
import random
import textwrap

import pytest

from alignkit.core import shards as shards_module
from alignkit.core.config import DataSpec
from alignkit.cai.constitution import load_constitution
from alignkit.data import load_dataset
from alignkit.core.errors import RecipeError
from alignkit.generation import Completion
from alignkit.run.pipeline import run_recipe
from alignkit.run.recipe import load_recipe
from alignkit.stages import cai_label
from alignkit.core.stage import StageContext
from alignkit.testing import stage_context

# prompt k -> its two responses: k % 5 picks identical, one empty, a tie for the judge, safe first, safe second
REPLIES = [("same", "same"), ("", "x"), ("meh one", "meh two"), ("safe reply", "risky reply"),
           ("risky reply", "safe reply")]


class ScriptedPolicy:
    """Answers prompt ``p<k>`` with ``REPLIES[k % 5]`` (prompts are rendered raw: text + newline)."""

    def __init__(self):
        self.calls: list[list[str]] = []

    def generate(self, prompts, params, *, progress=True):
        assert params.n == 2 and params.temperature == 1.0
        self.calls.append([p.strip() for p in prompts])
        return [[Completion(text, [0], "eos") for text in REPLIES[int(p.strip()[1:]) % 5]] for p in prompts]


class ScriptedJudge:
    """P(A) = 0.85 when 'safe' is shown as A, 0.25 when 'risky' is (a preference of 0.8 for safe plus a pull
    of 0.05 towards A), 0.55 otherwise (no preference, the same pull)."""

    clamp = None

    def __init__(self):
        self.tokens, self.asked = 0, []

    def presented(self, items, *, progress=False):
        self.asked += list(items)
        self.tokens += 10 * len(items)
        return [0.85 if item.first.startswith("safe") else 0.25 if item.first.startswith("risky") else 0.55
                for item in items]


def scripted(monkeypatch):
    policy, judge = ScriptedPolicy(), ScriptedJudge()
    monkeypatch.setattr(cai_label, "build_policy_and_judge",
                        lambda config, ctx: (cai_label.Policy(policy, None), judge))
    return policy, judge


RECIPE = """
name: cai-label-test
tracking: {{report_to: none}}
stages:
  - kind: cai-label
    name: cai
    model: scripted-policy
    data: {{source: {data}}}
    threshold: 0.7
    shard_size: 2
"""


def recipe_at(tmp_path, n: int = 10, text: str = RECIPE):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"p{k}"}) + "\n" for k in range(n)))
    path = tmp_path / "cai.yaml"
    path.write_text(textwrap.dedent(text.format(data=data)))
    return load_recipe(path, output_dir=str(tmp_path / "runs"))


def read_rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_pairs_are_judged_both_ways_and_kept_by_confidence(tmp_path, monkeypatch):
    _, judge = scripted(monkeypatch)
    recipe = recipe_at(tmp_path)
    (outcome,) = run_recipe(recipe, echo=lambda *_: None)
    m = outcome.metrics
    assert (m["prompts"], m["judged"], m["kept"]) == (10, 6, 4)
    assert (m["dropped_identical"], m["dropped_empty"], m["dropped_low_confidence"]) == (2, 2, 2)
    assert m["mean_confidence"] == pytest.approx(0.8)  # (0.85 + 1 - 0.25) / 2 for every kept pair
    assert m["position_bias"] == pytest.approx(0.1)  # |0.85 - 0.75| and |0.55 - 0.45|
    assert m["first_preferred"] == 0.5 and m["judge_tokens_per_second"] > 0
    assert len(judge.asked) == 12  # 6 usable pairs x 2 orders; identical and empty ones never asked

    pairs = read_rows(recipe.stage("cai").run_dir / "data.jsonl")
    assert [p["index"] for p in pairs] == [3, 4, 8, 9]
    constitution = load_constitution("harmless")
    for pair in pairs:
        assert (pair["chosen"], pair["rejected"]) == ("safe reply", "risky reply")
        assert pair["p_first"] == pytest.approx(0.8 if pair["index"] % 5 == 3 else 0.2)
        assert pair["confidence"] == pytest.approx(0.8)
        # the principle is drawn per prompt index, so any shard layout or rerun draws the same one
        assert pair["principle"] == constitution.sample(random.Random(pair["index"])).name
    questions = {item.question for item in judge.asked}
    assert questions <= {p.comparison for p in constitution.principles}
    # what the reward and dpo stages read
    data = load_dataset(DataSpec(source=str(recipe.stage("cai").run_dir / "data.jsonl")), "preference")
    assert data.column_names == ["prompt", "chosen", "rejected"] and len(data) == 4


def test_without_swap_the_position_pull_is_not_cancelled(tmp_path, monkeypatch):
    scripted(monkeypatch)
    recipe = recipe_at(tmp_path, text=RECIPE.replace("threshold: 0.7", "threshold: 0.55") + "    swap: false\n")
    (outcome,) = run_recipe(recipe, echo=lambda *_: None)
    pairs = read_rows(recipe.stage("cai").run_dir / "data.jsonl")
    # one order only: safe-first reads 0.85, risky-first 0.25 (0.75 for safe), ties read 0.55 and pass 0.55
    assert {p["index"] % 5: round(p["confidence"], 6) for p in pairs} == {2: 0.55, 3: 0.85, 4: 0.75}
    assert all(p["p_ba"] is None for p in pairs) and outcome.metrics["kept"] == 6


def test_killed_run_resumes_without_duplicate_or_missing_rows(tmp_path, monkeypatch):
    scripted(monkeypatch)
    reference = recipe_at(tmp_path / "ref")
    run_recipe(reference, echo=lambda *_: None)
    expected = read_rows(reference.stage("cai").run_dir / "data.jsonl")

    policy, _ = scripted(monkeypatch)
    real_write, written = shards_module.write, []

    def crash_after_two(shard_dir, j, rows, meta):
        if len(written) == 2:
            raise RuntimeError("injected crash")
        real_write(shard_dir, j, rows, meta)
        written.append(j)

    monkeypatch.setattr(shards_module, "write", crash_after_two)
    recipe = recipe_at(tmp_path / "run")
    with pytest.raises(RuntimeError, match="injected crash"):
        run_recipe(recipe, echo=lambda *_: None)
    shards = recipe.stage("cai").run_dir / "shards"
    assert sorted(p.name for p in shards.glob("shard-*.jsonl")) == ["shard-00000.jsonl", "shard-00001.jsonl"]
    # leftovers of a write in progress: a temp file and counts without rows; neither may be trusted
    (shards / ".shard-00002.jsonl.tmp-999").write_text('{"half": ')
    (shards / "shard-00002.meta.json").write_text('{"prompts": 99}')

    monkeypatch.setattr(shards_module, "write", real_write)
    policy.calls.clear()
    (outcome,) = run_recipe(recipe, echo=lambda *_: None)
    assert outcome.action == "resumed"
    assert policy.calls == [["p4", "p5"], ["p6", "p7"], ["p8", "p9"]]  # the finished shards were not redone
    rows = [json.loads(line) for j in range(5) for line in (shards / f"shard-{j:05d}.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(10))  # none missing, none twice
    assert read_rows(recipe.stage("cai").run_dir / "data.jsonl") == expected
    assert outcome.metrics["prompts"] == 10 and outcome.metrics["kept"] == 4


def test_ranks_take_alternate_shards_and_main_merges(tmp_path, monkeypatch):
    policy, _ = scripted(monkeypatch)
    recipe = recipe_at(tmp_path)
    stage = recipe.stage("cai")
    stage.run_dir.mkdir(parents=True)

    def ctx(rank: int) -> StageContext:
        return stage_context(recipe, "cai", rank=rank, world=2)

    assert cai_label.run(stage.config, ctx(1)).metrics == {}  # not main: its shards only, no merge
    assert sorted(p.name for p in (stage.run_dir / "shards").glob("*.jsonl")) == [
        "shard-00001.jsonl", "shard-00003.jsonl"]
    assert policy.calls == [["p2", "p3"], ["p6", "p7"]]
    result = cai_label.run(stage.config, ctx(0))
    assert result.metrics["kept"] == 4 and len(policy.calls) == 5
    assert [p["index"] for p in read_rows(stage.run_dir / "data.jsonl")] == [3, 4, 8, 9]


def test_recipe_errors_name_the_field(tmp_path):
    with pytest.raises(RecipeError, match="threshold") as err:
        recipe_at(tmp_path, text=RECIPE + "    judge: {{cot: true}}\n")  # clamp 0.4-0.6 cannot reach 0.7
    assert err.value.field.endswith("threshold")
    with pytest.raises(RecipeError, match="no shipped constitution 'kindness'") as err:
        recipe_at(tmp_path, text=RECIPE + "    constitution: kindness\n")
    assert err.value.field.endswith("constitution")


CHAIN = """
name: cai-chain
tracking: {{report_to: none}}
stages:
  - kind: cai-label
    name: cai
    model: {model}
    data: {{source: {data}}}
    threshold: 0.5
    max_completion_length: 8
    shard_size: 4
    judge: {{batch_size: 4}}
  - kind: dpo
    model: {model}
    data: {{source: "${{cai.data}}"}}
    lora: {{r: 4, alpha: 8, dropout: 0.0}}
    max_steps: 1
    batch_size: 4
    max_length: 96
"""


def test_tiny_policy_judges_itself_and_dpo_trains_on_the_pairs(tmp_path, tiny_model_dir):
    data = tmp_path / "conversations.jsonl"
    rows = [{"prompt": [{"role": "user", "content": f"How many apples are {k} and {k + 1}?"}]} for k in range(6)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = tmp_path / "chain.yaml"
    path.write_text(textwrap.dedent(CHAIN.format(model=tiny_model_dir, data=data)))
    recipe = load_recipe(path, output_dir=str(tmp_path / "runs"))
    label, dpo = run_recipe(recipe, echo=lambda *_: None)
    m = label.metrics
    assert m["prompts"] == 6 and m["kept"] >= 3  # a random model: distinct samples, p != 0.5
    assert 0.5 < m["mean_confidence"] < 1 and m["position_bias"] > 0 and m["judge_tokens_per_second"] > 0
    pairs = read_rows(recipe.stage("cai").run_dir / "data.jsonl")
    for pair in pairs:  # a conversation prompt gets assistant-message replies, as HH rows have
        assert pair["chosen"][0]["role"] == "assistant" and pair["chosen"] != pair["rejected"]
        assert pair["confidence"] == pytest.approx(max(pair["p_first"], 1 - pair["p_first"]))
        assert pair["p_first"] == pytest.approx((pair["p_ab"] + 1 - pair["p_ba"]) / 2)
    assert dpo.metrics["train_pairs"] == len(pairs) and dpo.metrics["train_steps"] == 1
