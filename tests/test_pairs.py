"""On-policy pair making: hand-worked best-vs-worst selection, reward-column flattening, resumable shards."""

from __future__ import annotations

import json
import math

import pytest

from alignkit.data.pairs import make_pairs, pair_rows, score_samples, select_pair, shard_path


@pytest.mark.parametrize(
    ("completions", "scores", "expected"),
    [
        (["a", "b", "c", "d"], [0.2, 0.9, -1.0, 0.5], (1, 2)),  # plain best vs worst
        (["a", "b", "c"], [1.0, 0.0, 1.0], (0, 1)),  # tied best: the first one
        (["a", "b", "c"], [0.0, 1.0, 0.0], (1, 0)),  # tied worst: the first one
        (["a", "b", "c"], [1.0, 1.0, 1.0], None),  # all tied: no signal
        (["a", "b"], [None, 3.0], None),  # one scorable sample is not a pair
        (["a", "b", "c"], [None, 0.0, 2.0], (2, 1)),  # None is skipped, not counted as 0
        (["same", "same"], [1.0, 0.0], None),  # identical texts: zero DPO gradient
        (["a", "b"], [0.3, 0.1], (0, 1)),
    ],
)
def test_select_pair_hand_worked(completions, scores, expected):
    assert select_pair(completions, scores) == expected


def test_select_pair_min_margin_is_strict():
    assert select_pair(["a", "b"], [0.5, 0.0], min_margin=0.5) is None  # 0.5 - 0.0 is not > 0.5
    assert select_pair(["a", "b"], [0.75, 0.0], min_margin=0.5) == (0, 1)
    with pytest.raises(ValueError, match="2 completions but 3 scores"):
        select_pair(["a", "b"], [0.0, 1.0, 2.0])


def test_pair_rows_record_every_prompt_with_or_without_a_pair():
    rows = pair_rows([7, 8], [{"prompt": "p7"}, {"prompt": "p8"}], [["x", "y"], ["u", "v"]],
                     [[0, 1], [1.0, 1.0]])
    assert rows[0] == {"index": 7, "prompt": "p7", "samples": ["x", "y"], "scores": [0.0, 1.0],
                       "chosen": "y", "rejected": "x", "chosen_score": 1.0, "rejected_score": 0.0}
    assert rows[1]["index"] == 8 and rows[1]["chosen"] is None and rows[1]["rejected"] is None


def test_score_samples_flattens_prompt_major_and_repeats_columns():
    seen = {}

    def reward(completions, prompts, answer, **kwargs):
        seen.update(completions=completions, prompts=prompts, answer=answer, extra=sorted(kwargs))
        return [float(len(c)) for c in completions]

    rows = [{"prompt": "p0", "answer": "1", "steps": []}, {"prompt": "p1", "answer": "2", "steps": ["s"]}]
    scores = score_samples(reward, rows, [["a", "bb", "ccc"], ["dddd", "e", "ff"]])
    assert scores == [[1.0, 2.0, 3.0], [4.0, 1.0, 2.0]]
    assert seen["completions"] == ["a", "bb", "ccc", "dddd", "e", "ff"]
    assert seen["prompts"] == ["p0"] * 3 + ["p1"] * 3
    assert seen["answer"] == ["1"] * 3 + ["2"] * 3
    assert seen["extra"] == ["steps"]
    with pytest.raises(ValueError, match="1 scores for 2 completions"):
        score_samples(lambda completions, **kw: [1.0], [{"prompt": "p"}], [["a", "b"]])


class FakePolicy:
    """Deterministic 'sampler': sample j of prompt i is 'p{i}-s{j}' with a length-dependent tail."""

    def __init__(self, k: int, fail_on_shard: int | None = None):
        self.k, self.fail_on_shard, self.calls = k, fail_on_shard, []

    def sample(self, shard, rows):
        if shard == self.fail_on_shard:
            raise KeyboardInterrupt  # killed while sampling this shard
        self.calls.append(shard)
        return [[f"{row['prompt']}-s{j}" + "x" * ((j * 7 + len(row["prompt"])) % 3) for j in range(self.k)]
                for row in rows]


def length_score(rows, samples):
    # prompt 3 ties on purpose: every sample gets the same score
    return [[0.0 if row["prompt"] == "p3" else float(len(t)) for t in texts] for row, texts in zip(rows, samples)]


PROMPTS = [{"prompt": f"p{i}", "answer": str(i)} for i in range(10)]


def test_make_pairs_resumes_after_a_kill_without_duplicating_or_losing_prompts(tmp_path):
    reference, ref_stats = make_pairs(PROMPTS, tmp_path / "ref", shard_size=4, sample=FakePolicy(3).sample,
                                      score=length_score)
    assert [row["index"] for row in reference] == list(range(10))
    assert ref_stats.prompts == 10 and ref_stats.pairs == 9 and ref_stats.sampled_now == 10
    assert ref_stats.usable_fraction == pytest.approx(0.9)
    # samples differ in length by 0..2 extra chars; best - worst margin averaged over the 9 pairs
    assert ref_stats.mean_margin == pytest.approx(sum(r["chosen_score"] - r["rejected_score"]
                                                      for r in reference if r["chosen"]) / 9)

    out = tmp_path / "run"
    killed = FakePolicy(3, fail_on_shard=1)
    with pytest.raises(KeyboardInterrupt):
        make_pairs(PROMPTS, out, shard_size=4, sample=killed.sample, score=length_score)
    assert killed.calls == [0]
    assert sorted(p.name for p in out.iterdir()) == ["shard-00000.jsonl", "shard-00000.meta.json"]  # nothing half-written
    # leftovers of a kill -9 while writing shard 1: a torn temp file, and its counts without its rows
    (out / ".shard-00001.jsonl.tmp-999").write_text('{"index": 4, "prompt"')
    (out / "shard-00001.meta.json").write_text('{"prompts": 99, "pairs": 99}')

    resumed = FakePolicy(3)
    done = []
    rows, stats = make_pairs(PROMPTS, out, shard_size=4, sample=resumed.sample, score=length_score,
                             on_shard=lambda n, total: done.append((n, total)))
    assert resumed.calls == [1, 2]  # shard 0 is read back, not sampled again; the half-written shard 1 is redone
    assert done == [(2, 3), (3, 3)]
    assert json.loads((out / "shard-00001.meta.json").read_text()) == {"prompts": 4, "pairs": 4}
    assert stats.sampled_now == 6 and stats.prompts == 10 and stats.pairs == 9
    assert [row["index"] for row in rows] == list(range(10))
    assert rows == reference  # same pairs as the run that was never killed
    on_disk = [json.loads(line) for s in range(3) for line in shard_path(out, s).read_text().splitlines()]
    assert [row["index"] for row in on_disk] == list(range(10))

    again = FakePolicy(3)
    _, stats = make_pairs(PROMPTS, out, shard_size=4, sample=again.sample, score=length_score)
    assert again.calls == [] and stats.sampled_now == 0


def test_make_pairs_refuses_shards_of_another_layout(tmp_path):
    make_pairs(PROMPTS, tmp_path, shard_size=4, sample=FakePolicy(2).sample, score=length_score)
    with pytest.raises(RuntimeError, match="delete the pairs folder"):
        make_pairs(PROMPTS, tmp_path, shard_size=5, sample=FakePolicy(2).sample, score=length_score)
    shard_path(tmp_path, 0).unlink()  # shard 1 is checked before the missing shard 0 is sampled
    policy = FakePolicy(2)
    with pytest.raises(RuntimeError, match="delete the pairs folder"):
        make_pairs(PROMPTS, tmp_path, shard_size=5, sample=policy.sample, score=length_score)
    assert policy.calls == []


def test_make_pairs_reads_shards_written_before_counts_were_kept(tmp_path):
    """Pair shards of earlier versions have no .meta.json: a complete .jsonl is still a complete shard."""
    reference, _ = make_pairs(PROMPTS, tmp_path, shard_size=4, sample=FakePolicy(3).sample, score=length_score)
    for meta in tmp_path.glob("shard-*.meta.json"):
        meta.unlink()
    policy = FakePolicy(3)
    rows, stats = make_pairs(PROMPTS, tmp_path, shard_size=4, sample=policy.sample, score=length_score)
    assert policy.calls == [] and stats.sampled_now == 0 and rows == reference


def test_stats_without_any_pair(tmp_path):
    _, stats = make_pairs([{"prompt": "p3"}], tmp_path, shard_size=4, sample=FakePolicy(2).sample,
                          score=length_score)
    assert stats.pairs == 0 and stats.usable_fraction == 0.0 and math.isnan(stats.mean_margin)


def test_docstring_examples():
    import doctest

    import alignkit.data.pairs

    assert doctest.testmod(alignkit.data.pairs).failed == 0
