"""rejection stage: hand-worked keep/dedupe/pass@k, a scripted policy through sample -> check -> keep -> revise,
and the real pipeline on a tiny model (outputs, resume, ranks, the SFT that reads its rows)."""

from __future__ import annotations

import doctest
import itertools
import json
import textwrap
from pathlib import Path

import pytest

from alignkit.core.artifacts import Manifest
from alignkit.core.errors import RecipeError
from alignkit.data import rejection
from alignkit.data.rejection import distinct, keep, pass_at_k, pass_at_k_curve
from alignkit.generation.engine import Completion
from alignkit.run.pipeline import run_recipe
from alignkit.run.recipe import load_recipe, parse_recipe
from alignkit.stages.rejection import (
    Checker,
    Config,
    preference_pairs,
    prompt_summary,
    sample_shard,
    summarize,
    training_rows,
)


def test_doctests():
    assert doctest.testmod(rejection).failed == 0


@pytest.mark.parametrize("n", [1, 3, 5])
def test_pass_at_k_equals_enumerating_every_draw(n):
    """The closed form against the definition: the share of k-subsets holding at least one pass."""
    for c in range(n + 1):
        for k in range(1, n + 1):
            draws = list(itertools.combinations([True] * c + [False] * (n - c), k))
            assert pass_at_k(n, c, k) == pytest.approx(sum(any(d) for d in draws) / len(draws))
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def test_keep_ranks_dedupes_and_caps():
    texts = ["The answer is 7.", "the answer is 7.", "So 3+4=7. The answer is 7.", "wrong", "The answer is 7 ."]
    scores = [1.0, 1.0, 1.0, 0.0, 1.0]
    # exact duplicate (case) dropped; "7 ." tokenises like "7." so it is a near-duplicate of the first
    assert keep(texts, scores, threshold=1.0, k=5) == [0, 2]
    assert keep(texts, scores, threshold=1.0, k=5, near=None) == [0, 2, 4]
    assert keep(texts, scores, threshold=1.0, k=1) == [0]
    # best first (3.0, 2.0); 0.5 and None fail; 1.0 passes but is a near-duplicate of the kept "the answer is 7."
    assert keep(texts, [0.5, 2.0, None, 3.0, 1.0], threshold=1.0, k=5) == [3, 1]
    assert distinct([]) == [] and pass_at_k_curve([], [1]) == {}


class ScriptedEngine:
    """Answers from a script: a prompt's attempts by its text; a revision request (n=1) by the first key of
    ``revisions`` found in the rendered conversation, else ``"still wrong"``."""

    def __init__(self, attempts: dict[str, list[str]], revisions: dict[str, str]):
        self.attempts, self.revisions, self.seen = attempts, revisions, []

    def generate(self, prompts, params, progress=False):
        self.seen.append((list(prompts), params))
        out = []
        for prompt in prompts:
            if params.n == 1:
                texts = [next((v for k, v in self.revisions.items() if k in prompt), "still wrong")]
            else:
                texts = self.attempts[prompt.strip()]
            assert len(texts) == params.n
            out.append([Completion(t, list(range(len(t.split()))), "eos") for t in texts])
        return out


def exact(completions, answer, **kwargs):
    return [1.0 if c.strip().endswith(f"is {a}.") else 0.0 for c, a in zip(completions, answer)]


def _exact_feedback(completions, answer, **kwargs):
    return [None if c.strip().endswith(f"is {a}.") else "Your last line does not state the answer."
            for c, a in zip(completions, answer)]


exact.feedback = _exact_feedback


def checker(engine, **overrides) -> Checker:
    """A Checker over a scripted engine (no tokenizer: prompts render as their raw text plus a newline)."""
    from alignkit.rewards.programs import CombinedReward

    config = Config(model="unused", data={"source": "arith"}, rewards=[{"program": "x.py:exact"}],
                    num_generations=3, **overrides)
    return Checker(engine, None, CombinedReward([exact], [1.0], ["x.py:exact"]), None, config)


PROMPTS = [{"prompt": "p0: 3+4?", "answer": "7"}, {"prompt": "p1: 2*5?", "answer": "10"},
           {"prompt": "p2: 9-1?", "answer": "8"}]
ATTEMPTS = {
    "p0: 3+4?": ["3+4=7. The answer is 7.", "the answer is 7.", "The answer is 7."],  # all pass; two alike
    "p1: 2*5?": ["2*5=12. The answer is 12.", "The answer is 10.", "ten"],  # one passes
    "p2: 9-1?": ["9-1=7. The answer is 7.", "no idea", "9-1=7"],  # none passes
}


def test_a_shard_samples_checks_keeps_and_revises(tmp_path):
    engine = ScriptedEngine(ATTEMPTS, {"2*5=12": "2*5=10. The answer is 10.", "9-1=7. The answer": "still 7"})
    check = checker(engine, keep=2, revise_rounds=2)
    rows, meta = sample_shard(PROMPTS, 10, check, check.config, seed=5)
    assert [row["index"] for row in rows] == [10, 11, 12]
    assert [row["passed"] for row in rows] == [[True] * 3, [False, True, False], [False] * 3]
    assert rows[0]["kept"] == [0, 1]  # equal scores: sample order; the third is the second up to case
    assert rows[0]["duplicates_dropped"] == 1 and rows[0]["revisions"] == []  # p0 has its 2: never revised
    assert rows[1]["kept"] == [1] and rows[2]["kept"] == []
    # round 1 revises p1 and p2 (short of keep=2), each from its best-scored failure (all 0: the first);
    # p1's revision passes and is kept, p2's fails and is what round 2 revises; round 2 asks p2 only
    assert [len(prompts) for prompts, _ in engine.seen] == [3, 2, 1]
    assert [(r["round"], r["revised"], r["text"], r["passed"], r["kept"]) for r in rows[1]["revisions"]] == [
        (1, "2*5=12. The answer is 12.", "2*5=10. The answer is 10.", True, True)]
    assert [(r["round"], r["revised"], r["passed"]) for r in rows[2]["revisions"]] == [
        (1, "9-1=7. The answer is 7.", False), (2, "still 7", False)]
    assert meta["completions"] == 9 + 2 + 1 and meta["prompts"] == 3
    assert [(r["prompt_index"], r["source"]) for r in training_rows(rows)] == [
        (10, "sample"), (10, "sample"), (11, "sample"), (11, "revision")]
    assert [prompt_summary(row)["solved"] for row in rows] == [True, True, False]


def test_revision_gets_the_failing_attempt_and_the_checkers_feedback(tmp_path):
    attempts = {"p2: 9-1?": ["no idea", "no idea either", "still none"]}
    engine = ScriptedEngine(attempts, {"no idea": "9-1=8. The answer is 8."})
    check = checker(engine, revise_rounds=1)
    rows, meta = sample_shard(PROMPTS[2:], 0, check, check.config, seed=0)
    revision_prompts, params = engine.seen[1]
    assert params.n == 1 and params.seed == 0 + 7919
    # the conversation: prompt, the failing attempt as the model's turn, the request with the feedback
    assert revision_prompts == ["p2: 9-1?\nno idea\nYour answer above did not pass the check. Your last line does "
                                "not state the answer. Find the mistake and write a corrected answer in full, in "
                                "the same format.\n"]
    assert "8" not in revision_prompts[0].split("p2: 9-1?")[1]  # the gold answer is never shown
    [revision] = rows[0]["revisions"]
    assert revision == {"round": 1, "revised": "no idea", "revised_score": 0.0,
                             "feedback": "Your last line does not state the answer.",
                             "text": "9-1=8. The answer is 8.", "score": 1.0, "judge_p": None, "passed": True,
                             "kept": True}
    assert meta["completions"] == 3 + 1
    assert training_rows(rows) == [{"prompt": "p2: 9-1?", "completion": "9-1=8. The answer is 8.", "score": 1.0,
                                    "source": "revision", "round": 1, "prompt_index": 0}]
    assert preference_pairs(rows) == [{"prompt": "p2: 9-1?", "chosen": "9-1=8. The answer is 8.",
                                       "rejected": "no idea", "chosen_score": 1.0, "rejected_score": 0.0,
                                       "source": "revision", "prompt_index": 0}]
    assert prompt_summary(rows[0])["fixed_in_round"] == 1 and prompt_summary(rows[0])["solved"]


def test_a_failed_revision_is_the_next_rounds_attempt(tmp_path):
    attempts = {"p2: 9-1?": ["no idea", "no", "none"]}
    engine = ScriptedEngine(attempts, {"no idea": "maybe 7", "maybe 7": "9-1=8. The answer is 8."})
    check = checker(engine, revise_rounds=3)
    rows, meta = sample_shard(PROMPTS[2:], 0, check, check.config, seed=0)
    revisions = rows[0]["revisions"]
    assert [(r["round"], r["revised"], r["passed"]) for r in revisions] == [(1, "no idea", False),
                                                                             (2, "maybe 7", True)]
    assert len(engine.seen) == 3  # round 3 had nothing left to fix: no generate call
    assert meta["completions"] == 3 + 2


def test_outputs_and_metrics_by_hand(tmp_path):
    engine = ScriptedEngine(ATTEMPTS, {"9-1=7. The answer": "9-1=8. The answer is 8."})
    check = checker(engine, keep=1, revise_rounds=1)
    rows, meta = sample_shard(PROMPTS, 0, check, check.config, seed=0)
    assert [(r["prompt_index"], r["source"], r["completion"]) for r in training_rows(rows)] == [
        (0, "sample", "3+4=7. The answer is 7."), (1, "sample", "The answer is 10."),
        (2, "revision", "9-1=8. The answer is 8.")]
    pairs = preference_pairs(rows)
    # p0 has no failure (no sample pair); p1: kept "The answer is 10." vs its worst failure (tie at 0: the first)
    assert pairs[0] == {"prompt": "p1: 2*5?", "chosen": "The answer is 10.", "rejected": "2*5=12. The answer is 12.",
                        "chosen_score": 1.0, "rejected_score": 0.0, "source": "sample", "prompt_index": 1}
    assert pairs[1] == {"prompt": "p2: 9-1?", "chosen": "9-1=8. The answer is 8.", "rejected": "9-1=7. The answer is 7.",
                        "chosen_score": 1.0, "rejected_score": 0.0, "source": "revision", "prompt_index": 2}
    assert len(pairs) == 2
    meta["seconds"] = 2.0
    metrics = summarize(rows, [meta], check.config, pairs=len(pairs))
    assert metrics["prompts"] == 3 and metrics["attempts"] == 9
    assert metrics["pass_rate"] == pytest.approx(4 / 9)
    # pass@1 = mean(3/3, 1/3, 0/3); pass@2 = mean(1, 1 - C(2,2)/C(3,2), 0) = mean(1, 2/3, 0); pass@3 = mean(1, 1, 0)
    assert metrics["pass_at_1"] == pytest.approx((1 + 1 / 3) / 3)
    assert metrics["pass_at_2"] == pytest.approx((1 + 2 / 3) / 3)
    assert metrics["pass_at_3"] == pytest.approx(2 / 3)
    assert metrics["prompts_with_pass"] == 2
    assert metrics["revisions"] == metrics["revisions_fixed"] == 1  # p0, p1 have their keep=1: only p2 is revised
    assert metrics["prompts_without_pass"] == 0 and metrics["kept"] == 3 and metrics["kept_revisions"] == 1
    assert metrics["revision_fix_rate"] == 1.0 and metrics["pairs"] == 2 and metrics["duplicates_dropped"] == 1
    assert metrics["completions"] == 10 and metrics["completions_per_second"] == pytest.approx(5.0)


def test_config_needs_a_check_and_a_feedback_slot():
    with pytest.raises(ValueError, match="needs a check"):
        Config(model="m", data={"source": "arith"})
    with pytest.raises(ValueError, match=r"\{feedback\}"):
        Config(model="m", data={"source": "arith"}, rewards=[{"program": "a.py:f"}], revise_rounds=1,
               revision_request="Try again.")
    assert Config(model="m", data={"source": "arith"}, judge={"backend": "hf"}).judge is not None


# ------------------------------------------------------------------------------------- the real pipeline


REWARD = '''
def even_length(completions, **kwargs):
    """Passes about half of a random model's samples: enough to keep some and revise others."""
    return [1.0 if len(c) % 2 == 0 else 0.0 for c in completions]
'''


def write_recipe(tmp_path: Path, model: Path, extra: str = "", then: str = "") -> Path:
    (tmp_path / "even.py").write_text(REWARD)
    recipe = tmp_path / "rej.yaml"
    recipe.write_text(textwrap.dedent(f"""
        name: rej
        tracking: {{report_to: none}}
        stages:
          - kind: rejection
            model: {model}
            data: {{source: arith, seed: 1, params: {{n: 6, steps: 1, max_operand: 9}}}}
            rewards: [{{program: even.py:even_length}}]
            num_generations: 4
            keep: 2
            revise_rounds: 1
            max_completion_length: 6
            shard_size: 2
            generation: {{backend: hf, batch_size: 8}}
    """) + textwrap.indent(textwrap.dedent(extra), "    ") + textwrap.indent(textwrap.dedent(then), "  "))
    return recipe


def read(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_rejection_stage_end_to_end_and_sft_reads_its_rows(tmp_path, tiny_model_dir):
    recipe_path = write_recipe(tmp_path, tiny_model_dir, then=f"""
        - kind: sft
          model: {tiny_model_dir}
          data: {{source: "${{rejection.data}}"}}
          max_steps: 2
          batch_size: 2
          max_length: 64
          save_steps: 2
    """)
    recipe = load_recipe(recipe_path, output_dir=str(tmp_path / "runs"))
    outcomes = run_recipe(recipe, echo=lambda *_: None)
    assert [o.action for o in outcomes] == ["ran", "ran"]
    manifest = Manifest.read(recipe.stage("rejection").run_dir)
    metrics = manifest.metrics
    data = read(manifest.artifacts["data"])
    prompts = read(manifest.artifacts["prompts"])
    assert len(prompts) == metrics["prompts"] == 6 and metrics["attempts"] == 24
    # every kept row passes the check, no prompt keeps more than 2, and the counts agree
    assert data and all(len(row["completion"]) % 2 == 0 for row in data)
    assert max(sum(r["prompt_index"] == i for r in data) for i in range(6)) <= 2
    assert metrics["kept"] == len(data) and metrics["pairs"] == len(read(manifest.artifacts["pairs"]))
    passed = sum(p["passed"] for p in prompts)
    assert metrics["pass_rate"] == pytest.approx(passed / 24)
    assert 0 < metrics["pass_rate"] < 1 and metrics["pass_at_4"] >= metrics["pass_at_2"] >= metrics["pass_at_1"]
    assert metrics["pass_at_1"] == pytest.approx(metrics["pass_rate"])  # pass@1 is the mean pass rate
    assert metrics["revisions"] >= 1 and metrics["completions_per_second"] > 0
    assert Manifest.read(recipe.stage("sft").run_dir).status == "done"
    again = run_recipe(load_recipe(recipe_path, output_dir=str(tmp_path / "runs")), echo=lambda *_: None)
    assert [o.action for o in again] == ["skipped", "skipped"]


def test_two_ranks_write_the_rows_one_process_writes(tmp_path, tiny_model_dir):
    """Shards striped over ranks (j % world) and seeded by shard: the merged outputs do not depend on world."""
    from alignkit.stages import rejection as stage
    from alignkit.testing import stage_context

    recipe_path = write_recipe(tmp_path, tiny_model_dir)
    one = load_recipe(recipe_path, output_dir=str(tmp_path / "one"))
    run_recipe(one, echo=lambda *_: None)
    two = load_recipe(recipe_path, output_dir=str(tmp_path / "two"))
    config = two.stage("rejection").config
    stage.run(config, stage_context(two, "rejection", rank=1, world=2))  # rank 1 first: shard 1 only
    assert sorted(p.name for p in (two.stage("rejection").run_dir / "shards").glob("*.jsonl")) == ["shard-00001.jsonl"]
    result = stage.run(config, stage_context(two, "rejection", rank=0, world=2))
    for key in ("data", "pairs", "prompts"):
        assert read(result.artifacts[key]) == read(Manifest.read(one.stage("rejection").run_dir).artifacts[key])


def test_bad_recipes_name_the_field(tmp_path, tiny_model_dir):
    recipe = {"name": "r", "stages": [{"kind": "rejection", "model": str(tiny_model_dir),
                                       "data": {"source": "arith"}, "rewards": [{"program": "nope.py:f"}]}]}
    with pytest.raises(RecipeError, match="stages.rejection.rewards"):
        parse_recipe(recipe, file="r.yaml", base_dir=tmp_path)
    recipe["stages"][0].pop("rewards")
    with pytest.raises(RecipeError, match="needs a check"):
        parse_recipe(recipe, file="r.yaml", base_dir=tmp_path)


def test_judge_only_rejection_keeps_exactly_what_the_judge_passes(tmp_path, tiny_model_dir):
    """No reward program: a local judge (the policy's own weights, asked Yes/No in both orders) is the whole check.
    The first run (judge_min_p 0) records each attempt's P(Yes); the second, with the threshold at their median,
    passes exactly the attempts at or above it (same seeds, same attempts), and ranks the kept ones by P(Yes)."""
    def run(name: str, min_p: float):
        recipe_path = tmp_path / f"{name}.yaml"
        recipe_path.write_text(textwrap.dedent(f"""
            name: {name}
            tracking: {{report_to: none}}
            stages:
              - kind: rejection
                model: {tiny_model_dir}
                data: {{source: arith, seed: 1, params: {{n: 4, steps: 1, max_operand: 9}}}}
                judge: {{backend: hf, batch_size: 8}}
                judge_min_p: {min_p}
                num_generations: 4
                keep: 4
                near_duplicate: 1.0
                max_completion_length: 6
                shard_size: 2
                generation: {{backend: hf, batch_size: 8}}
        """))
        recipe = load_recipe(recipe_path, output_dir=str(tmp_path / "runs"))
        run_recipe(recipe, echo=lambda *_: None)
        run_dir = recipe.stage("rejection").run_dir
        rows = sorted((r for path in sorted(run_dir.glob("**/shard-*.jsonl")) for r in read(path)),
                      key=lambda r: r["index"])
        return Manifest.read(run_dir), rows

    everything, rows = run("all", 0.0)
    probs = [p for row in rows for p in row["judge_p"]]
    assert len(probs) == 16 and all(0.0 <= p <= 1.0 for p in probs) and len(set(probs)) > 1
    assert everything.metrics["pass_rate"] == 1.0 and all(row["scores"] == [None] * 4 for row in rows)
    median = sorted(probs)[len(probs) // 2]
    half, rows_half = run("half", median)
    assert [row["attempts"] for row in rows_half] == [row["attempts"] for row in rows]  # same draws
    assert [v for row in rows_half for v in row["passed"]] == [p >= median for p in probs]
    assert half.metrics["pass_rate"] == pytest.approx(sum(p >= median for p in probs) / 16)
    for row in rows_half:  # kept attempts are passing ones, best P(Yes) first
        kept = [row["judge_p"][i] for i in row["kept"]]
        assert all(p >= median for p in kept) and kept == sorted(kept, reverse=True)
