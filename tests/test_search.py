"""PRM-guided test-time search: a toy policy whose right answer is reachable only step by step, a toy PRM
that recognises right steps, and the costs counted exactly."""

from __future__ import annotations

import doctest
import json
import random
from types import SimpleNamespace

import pytest

from alignkit.evaluation import search as search_module
from alignkit.evaluation.search import Candidate, SearchSpec, search, select
from alignkit.generation.engine import Completion

STEPS = 3  # a solution is three steps and an answer line; right only if all three steps are right


class ToyPolicy:
    """Each step is "right<k>-<id>" with probability ``p_right``, else "wrong<k>-<id>" (a random id: samples
    differ in text, as real ones do; stopped at the separator); after
    three steps the answer line ends the solution (EOS). Seeded by the request and the call's seed, so a search
    is reproducible. Each sample is 2 tokens."""

    def __init__(self, p_right: float = 0.3, empty_every: int = 0):
        self.p_right, self.empty_every, self.calls = p_right, empty_every, []

    def generate(self, prompts, params, progress=False):
        self.calls.append((list(prompts), params))
        out = []
        for prompt in prompts:
            done = prompt.count("\n")
            rng = random.Random(f"{params.seed}|{prompt}")
            samples = []
            for i in range(params.n):
                if done == STEPS:
                    samples.append(Completion("The answer.", [1, 2], "eos"))
                elif self.empty_every and i % self.empty_every == 0:
                    samples.append(Completion("  ", [1, 2], "stop"))
                else:
                    word = "right" if rng.random() < self.p_right else "wrong"
                    samples.append(Completion(f"{word}{done}-{rng.randrange(10**6)}", [1, 2], "stop"))
            out.append(samples)
        return out


class ToyPRM:
    separator = "\n"
    how = "min"

    def score_batch(self, prompts, steps):
        return [[0.9 if s.startswith("right") else 0.1 if s.startswith("wrong") else 1.0 for s in one] for one in steps]

    def encode(self, prompt, steps):
        return SimpleNamespace(input_ids=[0] * (1 + len(steps)))  # the prompt as one token, a token per step


def right(candidate: Candidate) -> bool:
    return candidate.finished and all(s.startswith("right") for s in candidate.steps[:STEPS])


def test_doctests():
    assert doctest.testmod(search_module).failed == 0


def test_search_finds_what_plain_sampling_almost_never_does():
    """P(a sampled solution is right) = 0.3^3 = 2.7%. Beam search (4 beams x 4: 16 continuations a step, P(none
    right) = 0.7^16 = 0.3%) keeps right prefixes and finds it nearly always; DVTS (4 subtrees x 4: a subtree
    survives a step with P = 1 - 0.7^4 = 0.76, all three with 0.44, some subtree of 4 with 0.90) most times."""
    seeds = range(20)
    plain = SearchSpec(beams=1, expand=1)  # no choice at any step: one sampled solution
    beam = SearchSpec(method="beam", beams=4, expand=4)
    dvts = SearchSpec(method="dvts", beams=16, expand=4)
    found = {name: sum(right(search(ToyPolicy(), ToyPRM(), "Q", "Q:", spec, seed=s).best) for s in seeds)
             for name, spec in (("plain", plain), ("beam", beam), ("dvts", dvts))}
    assert found["plain"] <= 3 and found["beam"] >= 19 and found["dvts"] >= 15, found


def test_beam_search_costs_are_counted_exactly():
    policy = ToyPolicy()
    result = search(policy, ToyPRM(), "Q", "Q:", SearchSpec(method="beam", beams=2, expand=3), seed=1)
    # step 0: the root x 6; steps 1-2: 2 beams x 3; step 3: 2 beams x 3 answer lines (all finish)
    assert [len(prompts) * params.n for prompts, params in policy.calls] == [6, 6, 6, 6]
    assert all(params.stop == ["\n"] and params.max_new_tokens == 64 for _, params in policy.calls)
    assert result.cost.generated_tokens == 24 * 2 and result.cost.steps == 4
    # the PRM read every scored candidate: 6 of 1 step, 6 of 2, 6 of 3, then 6 answers of 4 (prompt + steps)
    assert result.cost.prm_tokens == 6 * 2 + 6 * 3 + 6 * 4 + 6 * 5
    assert len(result.solutions) == 2 and result.solutions[0].score >= result.solutions[1].score
    assert result.best.text("\n").endswith("The answer.")


def test_dvts_subtrees_stay_apart_and_each_finishes_one_solution():
    policy = ToyPolicy(p_right=0.5)
    result = search(policy, ToyPRM(), "Q", "Q:", SearchSpec(method="dvts", beams=6, expand=2), seed=3)
    assert sorted(c.group for c in result.solutions) == [0, 1, 2]  # 6 // 2 subtrees, one solution each
    # the root: one request for all 3 subtrees (3 x width 1 x expand 2); then each subtree's partial solution x 2
    assert [(len(prompts), params.n) for prompts, params in policy.calls] == [(1, 6), (3, 2), (3, 2), (3, 2)]


def test_empty_steps_are_dropped_and_max_steps_stops_the_search():
    result = search(ToyPolicy(empty_every=2), ToyPRM(), "Q", "Q:", SearchSpec(beams=2, expand=4), seed=0)
    assert all("" not in c.steps for c in result.solutions)
    cut = search(ToyPolicy(), ToyPRM(), "Q", "Q:", SearchSpec(beams=2, expand=2, max_steps=2), seed=0)
    assert [len(c.steps) for c in cut.solutions] == [2, 2] and not any(c.finished for c in cut.solutions)


def test_select_and_spec_rules():
    assert select([], 3) == []
    assert [c.score for c in select([Candidate(["x"], 0.5), Candidate(["y"], 0.5)], 1)] == [0.5]
    with pytest.raises(ValueError, match="multiple of 4"):
        SearchSpec(method="dvts", beams=6, expand=4)
    assert (SearchSpec(method="dvts", beams=8, expand=4).groups, SearchSpec(beams=8, expand=4).width) == (2, 8)


# ------------------------------------------------------------------------------------ in an eval suite


class ToySolver:
    """Both ways an eval samples: whole solutions (no stop string: the pool) and one step at a time (stop at the
    separator: search). A step is right with probability 0.3; the answer line says 3 only after three right
    steps. The raw prompt is "<problem>\\n" (chat off), so a request's steps are its lines after the first."""

    def __init__(self):
        self.searched = 0

    def generate(self, prompts, params, progress=False):
        out = []
        for prompt in prompts:
            rng = random.Random(f"{params.seed}|{params.temperature}|{prompt}")
            done = prompt.split("\n")[1:-1]
            samples = []
            for _ in range(params.n):
                if params.stop:
                    self.searched += 1
                    steps = done + [self._step(rng, len(done))] if len(done) < STEPS else done
                    text = steps[-1] if len(done) < STEPS else self._answer(done)
                    samples.append(Completion(text, [1, 2], "stop" if len(done) < STEPS else "eos"))
                else:
                    steps = [self._step(rng, k) for k in range(STEPS)]
                    text = "\n".join(steps + [self._answer(steps)])
                    samples.append(Completion(text, [1] * 8, "eos"))
            out.append(samples)
        return out

    @staticmethod
    def _step(rng, k):
        return f"{'right' if rng.random() < 0.3 else 'wrong'}{k}-{rng.randrange(10**6)}"

    @staticmethod
    def _answer(steps):
        return f"The answer is {3 if all(s.startswith('right') for s in steps) else 0}."


def test_an_eval_suite_runs_beam_search_and_dvts_and_compares_at_equal_compute(tmp_path):
    from alignkit.evaluation.suite import Suite
    from alignkit.stages.eval import run_suite

    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{i}", "answer": "3"}) + "\n" for i in range(12)))
    suite = Suite.model_validate({
        "name": "toy", "dataset": {"source": str(data)}, "prompt": {"chat": False}, "sampling": {"n": 8},
        "methods": ["pass", "best_of_n"], "prm_aggregations": ["min"], "shard_size": 4,
        "search": [{"method": "beam", "expand": 4}, {"method": "dvts", "expand": 4}], "search_ns": [2, 4, 8]})
    solver = ToySolver()
    result = run_suite(suite, "toy-model", tmp_path / "out", engine=solver, prm_scorer=ToyPRM(), echo=lambda *_: None)
    metrics, compute = result["metrics"], result["compute"]
    assert {"beam@2", "beam@4", "beam@8", "dvts@4", "dvts@8"} <= set(metrics) and "dvts@2" not in metrics
    # a sampled solution is right 2.7% of the time; beam search with 8 beams x 4 nearly always finds it
    assert metrics["pass@1"] < 0.15 and metrics["beam@8"] >= 0.9 and metrics["beam@8"] >= metrics["bon_prm_min@8"]
    # compute: the pool costs N x 8 tokens a problem; beam@N samples N x 4 continuations of 2 tokens in each of
    # 4 rounds (3 steps and the answer line); dvts@N has N / 4 subtrees of width 1 x 4: N a round
    assert compute["pass"][8] == 64 and compute["beam"][8] == 8 * 4 * 2 * 4 and compute["dvts"][8] == 8 * 2 * 4
    assert (tmp_path / "out" / "accuracy_vs_tokens.png").is_file()
    assert "## Accuracy vs compute" in (tmp_path / "out" / "report.md").read_text()
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["generated_tokens"]["beam"]["8"] == compute["beam"][8]
    # a rerun finds every search shard done: the engine is not asked again
    before = solver.searched
    again = run_suite(suite, "toy-model", tmp_path / "out", engine=solver, prm_scorer=ToyPRM(), echo=lambda *_: None)
    assert solver.searched == before and again["metrics"]["beam@8"] == metrics["beam@8"]


def test_a_search_suite_without_a_prm_is_one_clear_error(tmp_path):
    from alignkit.core.errors import RecipeError
    from alignkit.evaluation.suite import Suite
    from alignkit.stages.eval import run_suite

    data = tmp_path / "toy.jsonl"
    data.write_text(json.dumps({"prompt": "Q0", "answer": "3"}) + "\n")
    suite = Suite.model_validate({"name": "toy", "dataset": {"source": str(data)}, "prompt": {"chat": False},
                                  "sampling": {"n": 2}, "methods": ["pass"], "search": [{"method": "beam"}]})
    with pytest.raises(RecipeError, match="prm"):
        run_suite(suite, "toy-model", tmp_path / "out", engine=ToySolver(), echo=lambda *_: None)
    with pytest.raises(ValueError, match="problems"):
        Suite.model_validate({"name": "t", "task": "stepwise", "dataset": {"source": str(data)},
                              "search": [{"method": "beam"}]})


def test_bands_and_the_compute_optimal_table_reach_the_report(tmp_path):
    from alignkit.evaluation.suite import Suite
    from alignkit.stages.eval import run_suite

    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{i}", "answer": "3"}) + "\n" for i in range(9)))
    suite = Suite.model_validate({
        "name": "toy", "dataset": {"source": str(data)}, "prompt": {"chat": False}, "sampling": {"n": 4},
        "methods": ["pass", "majority", "best_of_n"], "prm_aggregations": ["min"], "shard_size": 3,
        "search": [{"method": "beam", "expand": 2}], "search_ns": [1, 2]})
    result = run_suite(suite, "toy-model", tmp_path / "out", engine=ToySolver(), prm_scorer=ToyPRM(),
                       echo=lambda *_: None)
    for label, by_n in result["bands"].items():  # every curve point has a band that holds its mean
        for n, (lo, hi) in by_n.items():
            assert lo <= result["curves"][label][n] <= hi
    rows = result["compute_optimal"]
    assert rows and [r["budget"] for r in rows] == sorted(r["budget"] for r in rows)
    for row in rows:  # choosing per bucket is never worse than one method for all (same problems)
        assert len(row["per_bucket"]) == 3 and row["chosen"] >= row["single"] and "pass" not in row["per_bucket"]
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["bands_95"]["beam"]["2"][0] <= saved["curves"]["beam"]["2"] and saved["compute_optimal"] == rows
    assert "## Compute-optimal choice by difficulty" in (tmp_path / "out" / "report.md").read_text()
    # each search point paired with every sampling method on no more tokens, exactly as the per-problem values say
    paired = result["search_vs_sampling"]
    assert {(r["search"], r["n"]) for r in paired} == {("beam", 1), ("beam", 2)}
    for row in paired:
        assert row["method"] not in ("pass", "beam") and row["method_tokens"] <= row["tokens"]
        search = result["curves"]["beam"][row["n"]]
        assert row["diff"] == pytest.approx(search - result["curves"][row["method"]][row["method_n"]])
        assert row["band"][0] <= row["diff"] <= row["band"][1]
    assert saved["search_vs_sampling"] == [{**r, "band": list(r["band"])} for r in paired]
    assert "## Search vs sampling at no more compute (paired)" in (tmp_path / "out" / "report.md").read_text()
