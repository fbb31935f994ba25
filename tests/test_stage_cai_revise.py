"""The cai-revise stage: the critique/revision chain on a scripted engine, resume, ranks, held-out prompts,
the prompts data format, and real engines feeding the sft stage."""

from __future__ import annotations

import json
import random
import textwrap

import pytest

from alignkit.core import shards as shards_module
from alignkit.core.config import DataSpec
from alignkit.cai.constitution import load_constitution
from alignkit.data import load_dataset
from alignkit.data.redteam import PROMPTS
from alignkit.core.errors import DataError, RecipeError
from alignkit.generation import Completion
from alignkit.run.pipeline import run_recipe
from alignkit.run.recipe import load_recipe
from alignkit.stages import cai_revise
from alignkit.core.stage import StageContext
from alignkit.testing import stage_context

HARMLESS = load_constitution("harmless")
CRITIQUES = {p.critique: p.name for p in HARMLESS.principles}
REVISIONS = {p.revision: p.name for p in HARMLESS.principles}


class ScriptedEngine:
    """Answers from the last Human turn of a plain transcript (the stage renders one without a tokenizer):
    a prompt gets ``A<n>``, a critique request ``C[<principle>](<last answer>)``, a revision request
    ``Revision: <principle>(<answer before the critique>)``. Prompts containing "EMPTY" get empty revisions."""

    def __init__(self):
        self.calls: list[list[str]] = []

    def generate(self, prompts, params, *, progress=True):
        self.calls.append(list(prompts))
        return [[self._answer(text)] for text in prompts]

    def _answer(self, text: str) -> Completion:
        turns = ("\n\n" + text).rsplit("\n\nAssistant:", 1)[0].split("\n\nHuman: ")
        request = turns[-1]

        def answer(k: int) -> str:  # the assistant's reply in the k-th last exchange
            return turns[-k].rsplit("\n\nAssistant: ", 1)[-1]

        if request in CRITIQUES:
            out = f"C[{CRITIQUES[request]}]({answer(2)})"
        elif request in REVISIONS:  # revises the response before the critique
            out = "" if "EMPTY" in text.split("\n\n")[0] else f"Revision: {REVISIONS[request]}({answer(3)})"
        else:
            out = f"A{len(request)}"
        return Completion(" " + out, [1] * (1 + len(out) // 4), "eos")


def scripted(monkeypatch) -> ScriptedEngine:
    engine = ScriptedEngine()
    monkeypatch.setattr(cai_revise, "build_reviser", lambda config, ctx: cai_revise.Reviser(engine, None))
    return engine


RECIPE = """
name: cai-test
tracking: {report_to: none}
stages:
  - kind: cai-revise
    model: fake
    data: {source: redteam, limit: 10}
    rounds: 2
    shard_size: 3
"""


def recipe_at(tmp_path, text: str = RECIPE):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "cai.yaml"
    path.write_text(textwrap.dedent(text))
    return load_recipe(path, output_dir=str(tmp_path / "runs"))


def read_rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def expected_principles(n_prompts: int, shard_size: int, rounds: int, seed: int = 0) -> list[list[str]]:
    """Principle names per prompt and round, drawn as the stage draws them: per shard, round-major."""
    names: list[list[str]] = []
    for j in range(0, n_prompts, shard_size):
        rng = random.Random(seed * 1_000_003 + (j // shard_size) * 1009)
        size = min(shard_size, n_prompts - j)
        draws = [[HARMLESS.sample(rng).name for _ in range(size)] for _ in range(rounds)]
        names += [[draws[r][i] for r in range(rounds)] for i in range(size)]
    return names


def test_chain_revises_the_previous_revision_with_sampled_principles(tmp_path, monkeypatch):
    engine = scripted(monkeypatch)
    recipe = recipe_at(tmp_path)
    (outcome,) = run_recipe(recipe, echo=lambda *_: None)
    rows = read_rows(recipe.stage("cai-revise").run_dir / "data.jsonl")
    assert [r["index"] for r in rows] == list(range(10)) and [r["prompt"] for r in rows] == list(PROMPTS[:10])
    for row, (p1, p2) in zip(rows, expected_principles(10, 3, 2)):
        first = f"A{len(row['prompt'])}"
        assert row["initial"] == first
        assert [step["principle"] for step in row["chain"]] == [p1, p2]
        assert row["chain"][0]["critique"] == f"C[{p1}]({first})"
        # the "Revision:" label is dropped; round 2 critiques and revises round 1's revision
        assert row["chain"][0]["revision"] == f"{p1}({first})"
        assert row["chain"][1]["critique"] == f"C[{p2}]({p1}({first}))"
        assert row["completion"] == f"{p2}({p1}({first}))" and row["revised"]
    # 4 shards x (answer + 2 x (critique + revision)) calls; the demonstration only in critique/revision calls
    assert len(engine.calls) == 4 * 5
    demo = HARMLESS.demonstration.prompt
    assert all(demo not in p for p in engine.calls[0]) and all(demo in p for p in engine.calls[1])
    m = outcome.metrics
    assert m["rows"] == 10 and m["revised_fraction"] == 1.0 and m["empty_revisions"] == 0
    assert sum(m["principles"].values()) == 20 and m["tokens"] > 0
    # what the sft stage reads
    sft = load_dataset(DataSpec(source=str(recipe.stage("cai-revise").run_dir / "data.jsonl")), "sft")
    assert sft.column_names == ["prompt", "completion"] and sft[3]["completion"] == rows[3]["completion"]


def test_empty_revision_keeps_the_previous_answer_and_is_counted(tmp_path, monkeypatch):
    scripted(monkeypatch)
    path = tmp_path / "prompts.jsonl"
    prompts = ["Say EMPTY things", "How do I pick a lock?"]
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    recipe = recipe_at(tmp_path, RECIPE.replace("{source: redteam, limit: 10}", f"{{source: {path}}}")
                       + "    demonstration: false\n")
    (outcome,) = run_recipe(recipe, echo=lambda *_: None)
    rows = read_rows(recipe.stage("cai-revise").run_dir / "data.jsonl")
    assert rows[0]["completion"] == rows[0]["initial"] == "A16" and not rows[0]["revised"]
    assert [s["revision"] for s in rows[0]["chain"]] == ["A16", "A16"]
    assert rows[1]["revised"] and outcome.metrics["empty_revisions"] == 2
    assert outcome.metrics["revised_fraction"] == 0.5


def test_heldout_prompts_are_disjoint_and_conversations_stay_conversations(tmp_path, monkeypatch):
    scripted(monkeypatch)
    path = tmp_path / "convs.jsonl"
    convs = [[{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": "sure"},
              {"role": "user", "content": f"and more {i}?"}] for i in range(8)]
    path.write_text("".join(json.dumps({"prompt": c}) + "\n" for c in convs))
    recipe = recipe_at(tmp_path, RECIPE.replace("{source: redteam, limit: 10}", f"{{source: {path}, eval_size: 0.25}}"))
    (outcome,) = run_recipe(recipe, echo=lambda *_: None)
    run_dir = recipe.stage("cai-revise").run_dir
    rows, held = read_rows(run_dir / "data.jsonl"), read_rows(run_dir / "heldout.jsonl")
    assert len(rows) == 6 and len(held) == 2 and outcome.metrics["heldout"] == 2
    seen = [r["prompt"] for r in rows] + [h["prompt"] for h in held]
    assert sorted(json.dumps(s) for s in seen) == sorted(json.dumps(c) for c in convs)
    assert rows[0]["initial"] == f"A{len(rows[0]['prompt'][-1]['content'])}"  # answers the last user turn
    assert len(load_dataset(DataSpec(source=str(run_dir / "heldout.jsonl")), "prompts")) == 2
    sft = load_dataset(DataSpec(source=str(run_dir / "data.jsonl")), "sft")
    assert sft[0]["prompt"] == rows[0]["prompt"]  # the whole conversation is the SFT prompt


def test_killed_run_resumes_without_duplicate_or_missing_rows(tmp_path, monkeypatch):
    scripted(monkeypatch)
    reference = recipe_at(tmp_path / "ref")
    run_recipe(reference, echo=lambda *_: None)
    expected = read_rows(reference.stage("cai-revise").run_dir / "data.jsonl")

    engine = scripted(monkeypatch)
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
    shards = recipe.stage("cai-revise").run_dir / "shards"
    assert sorted(p.name for p in shards.glob("shard-*.jsonl")) == ["shard-00000.jsonl", "shard-00001.jsonl"]
    (shards / "shard-00002.meta.json").write_text('{"prompts": 99}')  # counts without rows: not trusted

    monkeypatch.setattr(shards_module, "write", real_write)
    engine.calls.clear()
    (outcome,) = run_recipe(recipe, echo=lambda *_: None)
    assert outcome.action == "resumed" and len(engine.calls) == 2 * 5  # shards 2 and 3 only
    rows = read_rows(recipe.stage("cai-revise").run_dir / "data.jsonl")
    assert [r["index"] for r in rows] == list(range(10)) and rows == expected


def test_ranks_take_alternate_shards_and_main_merges(tmp_path, monkeypatch):
    engine = scripted(monkeypatch)
    recipe = recipe_at(tmp_path)
    stage = recipe.stage("cai-revise")
    stage.run_dir.mkdir(parents=True)

    def ctx(rank: int) -> StageContext:
        return stage_context(recipe, "cai-revise", rank=rank, world=2)

    assert cai_revise.run(stage.config, ctx(1)).metrics == {}
    assert sorted(p.name for p in (stage.run_dir / "shards").glob("*.jsonl")) == [
        "shard-00001.jsonl", "shard-00003.jsonl"]
    assert len(engine.calls[0]) == 3 and len(engine.calls[5]) == 1  # shard 1: prompts 3-5; shard 3: prompt 9
    result = cai_revise.run(stage.config, ctx(0))
    assert result.metrics["rows"] == 10 and len(engine.calls) == 4 * 5
    rows = read_rows(stage.run_dir / "data.jsonl")
    assert [step["principle"] for r in rows for step in r["chain"]] == [
        name for names in expected_principles(10, 3, 2) for name in names]


def test_prompts_format_and_redteam_source():
    red = load_dataset(DataSpec(source="redteam"), "prompts")
    assert len(red) == len(PROMPTS) == len(set(PROMPTS)) and 60 <= len(red) <= 100
    picked = load_dataset(DataSpec(source="redteam", shuffle=True, seed=3, limit=5), "prompts")
    assert len(picked) == 5 and set(picked["prompt"]) <= set(PROMPTS) and picked["prompt"] != list(PROMPTS[:5])
    with pytest.raises(DataError, match="format 'prompts'"):
        load_dataset(DataSpec(source="redteam"), "sft")
    arith = load_dataset(DataSpec(source="arith", params={"n": 3}), "prompts")
    assert arith.column_names == ["prompt"] and len(arith) == 3


def test_mistakes_are_named(tmp_path, monkeypatch):
    bad = tmp_path / "rules.yaml"
    bad.write_text("name: r\nprinciples:\n  - {name: a, critique: c, revision: r}\n")
    with pytest.raises(RecipeError, match=r"stages.cai-revise: .*rules.yaml: principles.0.comparison: required"):
        recipe_at(tmp_path, RECIPE + f"    constitution: {bad}\n")
    with pytest.raises(RecipeError, match=r"stages.cai-revise.constitution: no shipped constitution 'harmles'"):
        recipe_at(tmp_path, RECIPE + "    constitution: harmles\n")
    scripted(monkeypatch)
    path = tmp_path / "convs.jsonl"
    good = [{"role": "user", "content": "hi"}]
    bad = good + [{"role": "assistant", "content": "yo"}]
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in (good, good, bad, good)))
    recipe = recipe_at(tmp_path, RECIPE.replace("{source: redteam, limit: 10}", f"{{source: {path}, eval_size: 1}}"))
    with pytest.raises(DataError, match="prompt row 2 .* must end with the user's turn"):  # the file's row
        run_recipe(recipe, echo=lambda *_: None)


def test_real_engine_feeds_the_sft_stage(tmp_path, tiny_model_dir):
    text = f"""
    name: cai-sft
    tracking: {{report_to: none}}
    stages:
      - kind: cai-revise
        model: {tiny_model_dir}
        data: {{source: redteam, limit: 6, eval_size: 2}}
        shard_size: 2
        max_completion_length: 12
        max_critique_length: 6
        max_revision_length: 12
        generation: {{backend: fast, batch_size: 8}}
      - kind: sft
        model: {tiny_model_dir}
        data: {{source: "${{cai-revise.data}}"}}
        max_steps: 1
        batch_size: 4
    """
    recipe = recipe_at(tmp_path, text)
    revise, sft = run_recipe(recipe, echo=lambda *_: None)
    m = revise.metrics
    assert m["rows"] == 4 and m["heldout"] == 2 and m["tokens_per_second"] > 0
    # every call is capped: 4 prompts x (12 + 6 + 12) tokens at most
    assert 4 * 3 <= m["tokens"] <= 4 * 30 and m["mean_revision_chars"] > 0
    assert sft.metrics["train_examples"] == 4 and sft.metrics["train_steps"] == 1


def test_clean_revision_examples():
    import doctest

    assert doctest.testmod(cai_revise).failed == 0
    assert cai_revise.clean_revision("Revision:\n\n  Ask the owner first.  ") == "Ask the owner first."
    assert cai_revise.clean_revision('"Quoted"') == "Quoted" and cai_revise.clean_revision("Revision:") == ""


@pytest.mark.e2e
def test_smollm2_critiques_and_revises_in_english(tmp_path, smollm2_dir):
    """The real chat template end to end: greedy SmolLM2 answers, critiques and revises 4 red-team prompts."""
    text = f"""
    name: cai-smollm2
    tracking: {{report_to: none}}
    stages:
      - kind: cai-revise
        model: {smollm2_dir}
        data: {{source: redteam, limit: 4}}
        temperature: 0
        max_completion_length: 24
        max_critique_length: 16
        max_revision_length: 24
        generation: {{backend: fast, batch_size: 4}}
    """
    recipe = recipe_at(tmp_path, text)
    (outcome,) = run_recipe(recipe, echo=lambda *_: None)
    rows = read_rows(recipe.stage("cai-revise").run_dir / "data.jsonl")

    def english(s: str) -> float:
        return sum(c.isascii() and (c.isalpha() or c.isspace()) for c in s) / max(len(s), 1)

    texts = [t for r in rows for t in (r["initial"], r["chain"][0]["critique"], r["completion"])]
    assert all(len(t) >= 20 and english(t) > 0.8 for t in texts)  # random tiny model: 0.59 mean, 0.77 max
    assert outcome.metrics["revised_fraction"] >= 0.75 and outcome.metrics["tokens"] <= 4 * (24 + 16 + 24)
