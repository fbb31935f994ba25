"""Progress bars that tell the truth: the generation engines count each completion at the decode step it
finishes (not when its whole batch returns), and the stages that generate in shards (on-policy DPO pairs, eval
samples, the greedy accuracy check) hand the engine their own bar, so it moves within a shard."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from alignkit.generation import Completion, SamplingParams, make_engine


class RecordingBar:
    """Stands in for a tqdm bar: records each ``update(n)`` with the number of model forwards run so far."""

    def __init__(self, model=None):
        self.n, self.updates, self.forwards = 0, [], 0
        if model is not None:
            self.handle = model.register_forward_pre_hook(self._forward)

    def _forward(self, *_):
        self.forwards += 1

    def update(self, n: int = 1) -> None:
        self.n += n
        self.updates.append((self.forwards, n))


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def ragged(tiny, monkeypatch):
    """The tiny model with every 4th token an EOS: its near-uniform samples end at many different steps."""
    model, tok = tiny
    monkeypatch.setattr(model.generation_config, "eos_token_id", list(range(3, len(tok), 4)))
    return model, tok


PROMPTS = ["Tom has 3 apples.", "How many?", "The answer is"]


def _ids(results) -> list[list[list[int]]]:
    return [[c.token_ids for c in row] for row in results]


def test_hf_counts_each_row_at_the_step_it_ends(ragged):
    model, tok = ragged
    engine = make_engine("hf", model=model, tokenizer=tok, batch_size=16)  # one generate call for all 12 rows
    params = SamplingParams(max_new_tokens=12, temperature=1.0, n=4, seed=1)
    quiet = engine.generate(PROMPTS, params, progress=False)
    bar = RecordingBar(model)
    try:
        out = engine.generate(PROMPTS, params, progress=bar)
    finally:
        bar.handle.remove()
    assert _ids(out) == _ids(quiet)  # counting changes nothing
    ended = Counter(len(c.token_ids) for row in out for c in row)  # a row of L tokens ends after forward L
    assert len(ended) > 2, ended  # rows really end at different steps
    counted = Counter()
    for forwards, n in bar.updates:
        counted[forwards] += n
    assert counted == ended and bar.n == 12


def test_hf_greedy_rows_count_n_and_stop_strings_end_rows(ragged):
    model, tok = ragged
    engine = make_engine("hf", model=model, tokenizer=tok, batch_size=2)  # two calls
    params = SamplingParams(max_new_tokens=10, temperature=0, n=3, stop=["e"])
    bar = RecordingBar()
    out = engine.generate(PROMPTS, params, progress=bar)
    assert _ids(out) == _ids(engine.generate(PROMPTS, params, progress=False))
    assert bar.n == 9 and all(n % 3 == 0 for _, n in bar.updates)  # a greedy row stands for its n copies


def test_fast_counts_each_row_as_it_retires(ragged):
    model, tok = ragged
    engine = make_engine("fast", model=model, tokenizer=tok, batch_size=4)
    params = SamplingParams(max_new_tokens=12, temperature=1.0, n=4, seed=2)
    bar = RecordingBar(model)
    try:
        out = engine.generate(PROMPTS, params, progress=bar)
    finally:
        bar.handle.remove()
    assert _ids(out) == _ids(engine.generate(PROMPTS, params, progress=False))
    assert bar.n == 12 and len({forwards for forwards, _ in bar.updates}) > 2, bar.updates


def test_openai_counts_each_response(monkeypatch):
    from alignkit.generation.openai import OpenAIEngine

    engine = OpenAIEngine("http://127.0.0.1:9/v1", "policy", batch_size=2)
    monkeypatch.setattr(engine, "_complete", lambda prompt, params: [
        Completion(text=f"{prompt}#{j}", token_ids=[], finish_reason="eos") for j in range(params.n)])
    bar = RecordingBar()
    out = engine.generate(["a", "b", "c"], SamplingParams(n=2), progress=bar)
    assert [c.text for c in out[2]] == ["c#0", "c#1"]
    assert [n for _, n in bar.updates] == [2, 2, 2]


def test_own_bar_averages_its_rate_over_the_call(capsys):
    from alignkit.generation.engine import bar_is_shown, progress_bar

    with progress_bar(5, enabled=True, backend="hf") as bar:
        assert bar.total == 5 and bar.smoothing == 0  # rate and ETA: over the whole call, not the last burst
    with progress_bar(5, enabled=False, backend="hf") as bar:
        assert not bar_is_shown(bar)  # hidden: the hf engine does not count rows for it
    theirs = RecordingBar()
    with progress_bar(5, enabled=theirs, backend="hf") as bar:
        assert bar is theirs  # a caller's bar is advanced, not replaced


def test_greedy_accuracy_bar_counts_problems(tiny, capsys):
    from alignkit.evaluation.accuracy import greedy_accuracy

    model, tok = tiny
    problems = [{"prompt": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(5)]
    report = greedy_accuracy(model, tok, problems, max_new_tokens=4, chat=False, progress=True)
    assert report["n"] == 5
    err = capsys.readouterr().err
    assert "greedy accuracy" in err and "5/5" in err and "problem/s" in err


# ------------------------------------------------------------------------------------- stages' own bars


def test_pairs_bar_counts_resumed_shards_as_done_and_moves_per_prompt(tmp_path):
    from alignkit.core import shards
    from alignkit.stages.dpo import _PromptProgress, _pairs_bar

    shards.write(tmp_path, 1, [{"index": i} for i in range(4, 8)], {"prompts": 4})  # shard 1 of 0..2 is done
    bar = _pairs_bar(10, tmp_path, 4, "dpo")
    assert (bar.n, bar.total, bar.unit) == (4, 10, "prompt")
    bar.close()

    prompts = RecordingBar()
    tracker = _PromptProgress(prompts, k=3)
    for n in (1, 1, 1, 2, 1, 3, 3):  # completions as the engine finishes them: 12 = 4 prompts' worth
        tracker.update(n)
    assert prompts.n == 4 and [n for _, n in prompts.updates] == [1, 1, 1, 1]


def test_dpo_sampler_hands_the_engine_its_bar(tiny, monkeypatch):
    from alignkit.stages import dpo

    model, tok = tiny
    config = dpo.Config.model_validate({
        "model": "unused", "pairs": {"prompts": {"source": "arith", "params": {"n": 2}}, "num_generations": 2,
                                     "rewards": [{"program": "reward/math.py:answer_match"}],
                                     "max_completion_length": 4, "generation": {"backend": "hf"}}})
    bar = RecordingBar()
    sample = dpo._sampler(model, tok, config, progress=dpo._PromptProgress(bar, 2))
    texts = sample(0, [{"prompt": "What is 1 + 1?"}, {"prompt": "What is 2 + 2?"}])
    assert [len(t) for t in texts] == [2, 2] and bar.n == 2


def test_eval_bar_moves_per_completion_not_per_shard(tmp_path):
    from alignkit.evaluation.suite import Suite
    from alignkit.stages.eval import run_suite

    data = tmp_path / "problems.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": "1"}) + "\n" for i in range(3)))
    suite = Suite.model_validate({"name": "p", "dataset": {"source": str(data)}, "prompt": {"chat": False},
                                  "sampling": {"n": 2, "seed": 0}, "shard_size": 3, "methods": ["pass", "greedy"]})
    seen = []

    class CountingEngine:
        def generate(self, prompts, params, *, progress=True):
            out = []
            for prompt in prompts:
                out.append([Completion(text="1", token_ids=[1], finish_reason="eos") for _ in range(params.n)])
                progress.update(params.n)
                seen.append(progress.n)
            return out

    run_suite(suite, "m", tmp_path / "out", engine=CountingEngine(), echo=lambda *_: None)
    assert seen == [1, 2, 3, 5, 7, 9]  # one shard of 3 problems: greedy, then 2 samples each
