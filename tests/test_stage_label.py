"""The label stage: exact labels from an oracle completer, agreement vs N, resume after a crash, ranks."""

from __future__ import annotations

import json
import random
import re
import textwrap

import pytest

from alignkit.core import shards as shards_module
from alignkit.core.config import DataSpec
from alignkit.data import check_steps, load_dataset
from alignkit.data.arith import (
    answer_line,
    apply_op,
    corrupt,
    make_record,
    parse_problem,
    step_line,
)
from alignkit.generation import Completion
from alignkit.maths.labels import step_labels, true_step_labels
from alignkit.run.pipeline import run_recipe
from alignkit.rewards.prm import split_steps
from alignkit.run.recipe import load_recipe
from alignkit.stages import label
from alignkit.core.stage import StageContext
from alignkit.testing import stage_context

_RESULT_RE = re.compile(r"= (-?\d+)\.?$")


class FakePolicy:
    """Writes ``n`` solutions per problem: even samples are the gold solution, odd ones carry a planted
    error (alignkit.data.arith.corrupt), so true first errors are known. Prompts are rendered without a
    tokenizer: the problem, then a newline."""

    def __init__(self):
        self.calls: list[list[str]] = []

    def generate(self, prompts, params, *, progress=True):
        self.calls.append([p.rstrip("\n") for p in prompts])
        out = []
        for prompt in prompts:
            problem = prompt.rstrip("\n")
            start, chain = parse_problem(problem)
            gold = make_record(problem, start, chain)
            samples = []
            for k in range(params.n):
                if k % 2 == 0:
                    lines = gold["steps"] + [answer_line(int(gold["answer"]))]
                else:
                    lines, _ = corrupt(gold, random.Random(f"{params.seed}-{problem}-{k}"))
                samples.append(Completion("\n".join(lines), [0] * len(lines), "eos"))
            out.append(samples)
        return out


class FakeCompleter:
    """Continues a prefix to a final answer, computing every later step correctly from the prefix's last
    value. From an error-free prefix the answer is right with probability ``p`` (else the answer line slips
    by one); from a wrong prefix it is always wrong (planted errors only raise the value)."""

    def __init__(self, p: float = 1.0):
        self.p, self.prompts = p, 0

    def generate(self, prompts, params, *, progress=True):
        rng = random.Random(params.seed)
        self.prompts += len(prompts)
        return [[self._continue(prompt, rng) for _ in range(params.n)] for prompt in prompts]

    def _continue(self, prompt: str, rng: random.Random) -> Completion:
        problem, _, body = prompt.partition("\n")
        steps = split_steps(body)
        start, chain = parse_problem(problem)
        if len(steps) > len(chain):  # the prefix already ends with the answer line
            return Completion("", [], "eos")
        value = int(_RESULT_RE.search(steps[-1]).group(1)) if steps else start
        lines = []
        for op, k in chain[len(steps):]:
            result = apply_op(value, op, k)
            lines.append(step_line(value, op, k, result))
            value = result
        slip = 0 if check_steps(problem, steps) is not None or rng.random() < self.p else 1
        lines.append(answer_line(value + slip))
        return Completion("\n".join(lines), [0] * len(lines), "eos")


def fake_samplers(monkeypatch, p: float = 1.0):
    policy, completer = FakePolicy(), FakeCompleter(p)
    monkeypatch.setattr(label, "build_samplers",
                        lambda config, ctx: (label.Sampler(policy, None), label.Sampler(completer, None)))
    return policy, completer


RECIPE = """
name: label-test
tracking: {report_to: none}
stages:
  - kind: label
    model: fake-policy
    data: {source: arith, params: {n: 7, steps: [1, 3], max_operand: 9}}
    num_generations: 2
    completions_per_step: 4
    agreement_ns: [1, 2, 4, 8]
    shard_size: 2
"""


def recipe_at(tmp_path, text: str = RECIPE):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "label.yaml"
    path.write_text(textwrap.dedent(text))
    return load_recipe(path, output_dir=str(tmp_path / "runs"))


def read_rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_oracle_completer_gives_exact_labels(tmp_path, monkeypatch):
    fake_samplers(monkeypatch, p=1.0)
    recipe = recipe_at(tmp_path)
    (outcome,) = run_recipe(recipe, echo=lambda *_: None)
    rows = read_rows(recipe.stage("label").run_dir / "data.jsonl")
    assert len(rows) == 14 and outcome.metrics["rows"] == 14  # 7 problems x 2 solutions
    planted = 0
    for row in rows:
        truth = check_steps(row["prompt"], row["completions"])
        planted += truth is not None
        assert row["labels"] == true_step_labels(truth, len(row["completions"]))
        assert row["soft_labels"] == [float(v) for v in row["labels"]]  # a perfect completer: SE is 0 or 1
        assert row["solution_correct"] == (truth is None) and row["true_first_error"] == truth
        assert all(len(step) == 8 for step in row["outcomes"])  # pool = max(N=4, agreement 8)
    assert planted == 7  # every odd sample has an error
    m = outcome.metrics
    assert m["solution_accuracy"] == 0.5 and m["rollouts_per_prefix"] == 8
    for n in (1, 2, 4, 8):
        assert m[f"hard_step_accuracy_n{n}"] == 1.0 and m[f"hard_exact_n{n}"] == 1.0
        assert m[f"soft_mae_n{n}"] == 0.0
    # the data file is what the prm stage reads
    data = load_dataset(DataSpec(source=str(recipe.stage("label").run_dir / "data.jsonl")), "stepwise")
    assert len(data) == 14 and data.column_names == ["prompt", "completions", "labels", "soft_labels"]


def test_a_prefix_shared_by_solutions_is_rolled_out_once(tmp_path, monkeypatch):
    _, completer = fake_samplers(monkeypatch, p=0.5)
    recipe = recipe_at(tmp_path, RECIPE.replace("num_generations: 2", "num_generations: 4"))
    (outcome,) = run_recipe(recipe, echo=lambda *_: None)
    rows = read_rows(recipe.stage("label").run_dir / "data.jsonl")
    # samples 0 and 2 are the same gold solution; every prefix before a planted error is shared too
    queries = {(r["prompt"], "\n".join(r["completions"][: i + 1])) for r in rows for i in range(len(r["completions"]) - 1)}
    all_queries = sum(len(r["completions"]) - 1 for r in rows)
    assert completer.prompts == len(queries) < all_queries
    m = outcome.metrics
    assert m["shared_prefixes"] == all_queries - len(queries)
    assert m["completions"] == 7 * 4 + len(queries) * 8  # solutions + one pool of 8 per distinct prefix
    by_prefix: dict = {}
    for r in rows:  # one estimate per distinct prefix, whichever solution it came from
        for i in range(len(r["completions"]) - 1):
            key = (r["prompt"], "\n".join(r["completions"][: i + 1]))
            assert by_prefix.setdefault(key, r["outcomes"][i]) == r["outcomes"][i]
    assert any(0 < sum(o) < 8 for o in by_prefix.values())  # a noisy completer: shared pools are not trivial


def test_agreement_grows_with_n_for_a_noisy_completer(tmp_path, monkeypatch):
    fake_samplers(monkeypatch, p=0.4)
    recipe = recipe_at(tmp_path, RECIPE.replace("n: 7,", "n: 40,").replace("[1, 2, 4, 8]", "[1, 4, 16]"))
    (outcome,) = run_recipe(recipe, echo=lambda *_: None)
    m = outcome.metrics
    # HE false negatives: a right step whose N rollouts all fail, probability 0.6**N (0.6, 0.13, 0.0003)
    assert m["hard_step_accuracy_n1"] < m["hard_step_accuracy_n4"] < m["hard_step_accuracy_n16"]
    assert m["hard_early_n1"] > 0.3 and m["hard_early_n16"] < 0.05
    assert m["hard_late_n1"] == m["hard_late_n16"] == 0.0  # this completer never recovers from an error
    rows = read_rows(recipe.stage("label").run_dir / "data.jsonl")
    for row in rows:  # labels come from the first N = 4 outcomes of the 16 sampled
        expected = step_labels([step[:4] for step in row["outcomes"]])
        assert row["labels"] == expected.hard and row["soft_labels"] == expected.soft
    # non-final steps of right solutions: the SE estimate is the completer's success rate, 0.4
    estimates = [s for row in rows if row["true_first_error"] is None for s in row["soft_labels"][:-1]]
    assert 0.3 < sum(estimates) / len(estimates) < 0.5


def test_killed_run_resumes_without_duplicate_or_missing_rows(tmp_path, monkeypatch):
    fake_samplers(monkeypatch)
    reference = recipe_at(tmp_path / "ref")
    run_recipe(reference, echo=lambda *_: None)
    expected = read_rows(reference.stage("label").run_dir / "data.jsonl")

    policy, _ = fake_samplers(monkeypatch)
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
    shards = recipe.stage("label").run_dir / "shards"
    assert sorted(p.name for p in shards.glob("shard-*.jsonl")) == ["shard-00000.jsonl", "shard-00001.jsonl"]
    # leftovers of a write in progress: a temp file and counts without rows; neither may be trusted
    (shards / ".shard-00002.jsonl.999.tmp").write_text('{"half": ')
    (shards / "shard-00002.meta.json").write_text('{"problems": 99}')

    monkeypatch.setattr(shards_module, "write", real_write)
    policy.calls.clear()
    (outcome,) = run_recipe(recipe, echo=lambda *_: None)
    assert outcome.action == "resumed"
    assert len(policy.calls) == 2  # shards 2 and 3 only: the two complete shards were not redone
    rows = read_rows(recipe.stage("label").run_dir / "data.jsonl")
    keys = [(r["problem_index"], r["solution_index"]) for r in rows]
    assert sorted(keys) == [(p, k) for p in range(7) for k in range(2)]  # none missing, none twice
    assert rows == expected and outcome.metrics["problems"] == 7


def test_ranks_take_alternate_shards_and_main_merges(tmp_path, monkeypatch):
    policy, _ = fake_samplers(monkeypatch)
    recipe = recipe_at(tmp_path)
    stage = recipe.stage("label")
    stage.run_dir.mkdir(parents=True)

    def ctx(rank: int) -> StageContext:
        return stage_context(recipe, "label", rank=rank, world=2)

    assert label.run(stage.config, ctx(1)).metrics == {}  # not main: labels its shards, merges nothing
    assert sorted(p.name for p in (stage.run_dir / "shards").glob("*.jsonl")) == [
        "shard-00001.jsonl", "shard-00003.jsonl"]
    rank1_problems = [p for call in policy.calls for p in call]
    assert len(rank1_problems) == 3  # shard 1 has problems 2, 3; shard 3 has problem 6
    result = label.run(stage.config, ctx(0))
    assert result.metrics["rows"] == 14 and len(policy.calls) == 4
    rows = read_rows(stage.run_dir / "data.jsonl")
    assert [r["problem_index"] for r in rows] == [p for p in range(7) for _ in range(2)]


def test_given_solutions_are_labelled_without_a_policy(tmp_path, monkeypatch):
    policy, completer = fake_samplers(monkeypatch)
    problems = load_dataset(DataSpec(source="arith", params={"n": 3, "steps": 2, "max_operand": 9}), "problems")
    rows = []
    for i, row in enumerate(problems):
        lines, _ = corrupt({"prompt": row["prompt"]}, random.Random(i))
        rows.append({"prompt": row["prompt"], "answer": row["answer"], "steps": lines})
    path = tmp_path / "given.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = RECIPE.replace("{source: arith, params: {n: 7, steps: [1, 3], max_operand: 9}}", f"{{source: {path}}}")
    recipe = recipe_at(tmp_path, text + "    solutions: given\n    quality_check: false\n")
    (outcome,) = run_recipe(recipe, echo=lambda *_: None)
    assert policy.calls == []
    labelled = read_rows(recipe.stage("label").run_dir / "data.jsonl")
    for row, given in zip(labelled, rows):
        assert row["labels"] == true_step_labels(check_steps(given["prompt"], given["steps"]), 3)
        assert "true_first_error" not in row
    assert completer.prompts == 3 * 2  # two operation steps each; the answer line is judged as written
    assert "hard_step_accuracy_n1" not in outcome.metrics


def test_quality_check_on_needs_arith(tmp_path):
    from alignkit.core.errors import RecipeError

    text = RECIPE.replace("{source: arith, params: {n: 7, steps: [1, 3], max_operand: 9}}", "{source: gsm8k}")
    with pytest.raises(RecipeError, match="quality_check"):
        recipe_at(tmp_path, text + "    quality_check: true\n")


@pytest.mark.parametrize("backend", ["hf", "fast"])
def test_real_engines_label_and_feed_the_prm_stage(tmp_path, tiny_model_dir, backend):
    text = f"""
    name: label-prm
    tracking: {{report_to: none}}
    stages:
      - kind: label
        model: {tiny_model_dir}
        data: {{source: arith, params: {{n: 3, steps: 1, max_operand: 9}}}}
        num_generations: 2
        completions_per_step: 2
        agreement_ns: [1, 2]
        max_completion_length: 24
        max_continuation_length: 12
        generation: {{backend: {backend}, batch_size: 8}}
      - kind: prm
        model: {tiny_model_dir}
        data: {{source: "${{label.data}}"}}
        max_steps: 1
        batch_size: 4
    """
    recipe = recipe_at(tmp_path, text)
    label_run, prm_run = run_recipe(recipe, echo=lambda *_: None)
    m = label_run.metrics
    assert m["problems"] == 3 and m["solutions"] == 6 and m["rows"] + m["skipped_empty"] + m["skipped_long"] == 6
    rows = read_rows(recipe.stage("label").run_dir / "data.jsonl")
    assert all(len(step) == 2 for row in rows for step in row["outcomes"])
    assert m["completions"] > 6 and m["completions_per_second"] > 0
    assert prm_run.metrics["train_rows"] == m["rows"] and prm_run.metrics["train_steps"] == 1


def test_cut_off_solution_is_not_correct_and_its_orm_target_is_wrong():
    """A solution cut off by length: the rollouts from its last step reach the gold answer, so that step is
    labelled good, but the solution itself gives no answer. Its ORM target (train_on_last_step_only) is the
    solution's own correctness, as stages/prm.py says, not the last step's rollout label."""
    from alignkit.rewards.programs import load_reward
    from alignkit.stages import prm as prm_stage
    from alignkit.testing import make_tokenizer

    class CutOff:  # the policy: one solution, stopped by max_new_tokens mid-sentence
        def generate(self, prompts, params, *, progress=True):
            return [[Completion("3 + 4 = 7\n7 * 2 = 14\nSo the total", [0] * 3, "length")] for _ in prompts]

    class Finisher:  # the completer: every prefix goes on to the right answer
        def generate(self, prompts, params, *, progress=True):
            return [[Completion("The answer is 14.", [0], "eos")] * params.n for _ in prompts]

    config = label.Config(model="m", data={"source": "arith"}, num_generations=1, completions_per_step=2,
                          agreement_ns=[2], quality_check=False)
    problem = {"prompt": "Tom has 3 apples and gets 4 more, then doubles them. How many?", "answer": "14"}
    (row,), _ = label.label_shard([problem], 0, label.Sampler(CutOff(), None), label.Sampler(Finisher(), None),
                                  load_reward(config.reward), config, seed=0)
    assert row["completions"] == ["3 + 4 = 7", "7 * 2 = 14", "So the total"]
    assert row["labels"] == [True, True, True] and row["solution_correct"] is False  # the PRM's data: unchanged
    for soft in (False, True):
        orm = prm_stage.Config(model="m", data={"source": "arith"}, train_on_last_step_only=True, soft_labels=soft)
        (example,), _ = prm_stage.encode_dataset([row], make_tokenizer(), orm)
        assert [v for v in example["labels"] if v != -100] == [0.0]  # wrong: it never answered
        assert example["correct"] is False
