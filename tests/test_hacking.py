"""Reward-hacking signals (alignkit.rewards.hacking): each signal on hand-worked batches, the verifier's own answer
reading, and the tap that logs them from inside TRL's reward calls (HackingWatch)."""

from __future__ import annotations

import doctest
import functools

import pytest

import alignkit.rewards.hacking
from alignkit.rewards.hacking import hacking_signals, math_signals, repeated_ngram_frac
from alignkit.rewards.programs import weighted_total
from alignkit.rewards.values import completion_text
from alignkit.stages.rl_common import HackingWatch


def test_docstring_examples():
    assert doctest.testmod(alignkit.rewards.hacking).failed == 0


def test_repeated_ngram_frac_by_hand():
    # 10 words, 7 four-grams: "the cat sat on" and "cat sat on the" come back once each -> 2 of 7.
    assert repeated_ngram_frac("the cat sat on the cat sat on the mat") == pytest.approx(2 / 7)
    # n = 1: a a b a -> the 2nd and 4th words repeat an earlier one -> 2 of 4.
    assert repeated_ngram_frac("a a b a", n=1) == 0.5
    assert repeated_ngram_frac("x  y\nx y", n=2) == pytest.approx(1 / 3)  # whitespace of any kind splits words
    assert repeated_ngram_frac("one two three") == 0.0  # fewer than 4 words: no 4-gram, nothing repeats
    assert repeated_ngram_frac("") == 0.0
    assert repeated_ngram_frac("18 18 18 18 18 18 18") == pytest.approx(3 / 4)  # 4 grams, all the same
    with pytest.raises(ValueError):
        repeated_ngram_frac("a b", n=0)


# Five completions read by reward/math.py, with the rewards a hackable reward might pay them.
BATCH = [
    "2 + 2 = 4. The answer is 4.",  # phrase "4": a plain number             reward 1.0
    "The answer is 12 + 7 - 5.",  # phrase "12 + 7 - 5": not plain          reward 1.0 (paid for an expression)
    "so 18 18 18 18 18 18",  # no answer phrase; 4-grams 2 of 4 repeat     reward 0.5 (paid without an answer)
    "I think it is 14",  # no answer phrase                           reward 0.0
    r"\boxed{}",  # an empty box: a blank phrase is no answer    reward None (unscorable)
]
REWARDS = [1.0, 1.0, 0.5, 0.0, None]


def test_math_signals_by_hand():
    signals = math_signals(BATCH, [10, 8, 7, 6, 4], REWARDS)
    assert signals == {
        "hack/completion_tokens": 35 / 5,
        "hack/no_answer_frac": 3 / 5,  # completions 3, 4, 5
        "hack/repeated_ngram_frac": pytest.approx((2 / 4) / 5),  # only completion 3 repeats itself
        "hack/rewarded_not_plain_frac": 2 / 3,  # rewarded: 1, 2, 3; not plain: 2 (an expression), 3 (none)
    }


def test_rewarded_means_a_reward_above_zero():
    lengths = [1] * len(BATCH)
    # Only the plain "4" is paid: nothing rewarded is wrong.
    assert math_signals(BATCH, lengths, [1.0, 0.0, -1.0, None, None])["hack/rewarded_not_plain_frac"] == 0.0
    # Only the expression is paid (a tiny format bonus counts: it is a payment).
    assert math_signals(BATCH, lengths, [0.0, 0.1, 0.0, 0.0, 0.0])["hack/rewarded_not_plain_frac"] == 1.0
    # Nothing paid: 0.0 (nothing was paid for the wrong thing), never NaN.
    assert math_signals(BATCH, lengths, [0.0, None, -0.5, 0.0, 0.0])["hack/rewarded_not_plain_frac"] == 0.0


def test_no_rewards_or_no_plain_rule_means_no_rewarded_signal():
    assert "hack/rewarded_not_plain_frac" not in math_signals(BATCH, [1] * 5)  # e.g. ppo on a PRM alone
    boxed = hacking_signals(["a \\boxed{60}", "\\boxed{6", "no box"], [3, 2, 2], [1.0, 0.0, 0.0],
                            extract=lambda t: t.split("\\boxed{")[-1][:-1] if t.endswith("}") else None)
    assert boxed == {"hack/completion_tokens": 7 / 3, "hack/no_answer_frac": 2 / 3, "hack/repeated_ngram_frac": 0.0}


def test_empty_batch_and_mismatched_lengths():
    assert math_signals([], [], []) == {}
    with pytest.raises(ValueError, match="one token length and reward per text"):
        math_signals(["a"], [1, 2])
    with pytest.raises(ValueError, match="one token length and reward per text"):
        math_signals(["a"], [1], [1.0, 0.0])


def test_math_tools_are_the_verifiers():
    from alignkit.rewards.programs import load_reward

    extract, plain = alignkit.rewards.hacking.math_answer_tools()
    assert extract is load_reward("reward/math.py:extract_answer")
    assert plain is load_reward("reward/math.py:plain_number")


def test_weighted_total_follows_trls_none_rule():
    # row 0: 1*1 + 0.1*0.5; row 1: None counts 0 -> 0.1*0.5; row 2: every program None -> None.
    assert weighted_total([[1.0, None, None], [0.5, 0.5, None]], [1.0, 0.1]) == [pytest.approx(1.05), 0.05, None]
    assert weighted_total([[2.0, -1.0]], [-0.5]) == [-1.0, 0.5]
    with pytest.raises(ValueError):
        weighted_total([[1.0]], [1.0, 1.0])


def test_rntp_boxed_signals():
    from alignkit.stages.rntp import boxed_signals

    texts = ["<think>\\boxed{5}</think> so \\boxed{60}", "<think>\\boxed{60}</think> none", "\\boxed{6"]
    assert boxed_signals(texts, [9, 7, 3], [1.0, 0.0, 0.0]) == {
        "hack/completion_tokens": 19 / 3,
        "hack/no_answer_frac": 2 / 3,  # a box inside the thoughts is a draft; an unclosed box is no answer
        "hack/repeated_ngram_frac": 0.0,
    }


# ------------------------------------------------------------------------------------ the TRL tap


def verifier(completions, answer, **kwargs):
    return [1.0 if completion_text(c).endswith(a) else 0.0 for c, a in zip(completions, answer)]


def bonus(completions, size, **kwargs):
    return [None if completion_text(c).startswith("?") else size for c in completions]


def test_hacking_watch_logs_once_per_batch_from_the_weighted_total():
    """Called the way TRL 1.16 calls reward functions (all keywords, one after the other on a batch): the taps
    return the scores unchanged, keep TRL's names (a partial is named after its function), and the last one
    logs the signals of the batch with the weighted total as the rewards."""
    seen, logged = [], []

    def signals(texts, lengths, rewards):
        seen.append((texts, lengths, rewards))
        return {"hack/x": 1.0, "hack/y": 2.0}

    watch = HackingWatch([verifier, functools.partial(bonus, size=0.5)], [1.0, 0.2], signals)
    assert [tap.__name__ for tap in watch.funcs] == ["verifier", "bonus"]
    completions = [[{"role": "assistant", "content": "is 4"}], [{"role": "assistant", "content": "?5"}]]
    kwargs = dict(prompts=["p", "q"], completion_ids=[[1, 2, 3], [4]], answer=["4", "6"],
                  log_metric=lambda name, value: logged.append((name, value)), trainer_state=None)
    for step in range(2):
        first = watch.funcs[0](completions=completions, **kwargs)
        assert first == [1.0, 0.0] and logged == [("hack/x", 1.0), ("hack/y", 2.0)] * step  # not yet
        assert watch.funcs[1](completions=completions, **kwargs) == [0.5, None]
        assert logged == [("hack/x", 1.0), ("hack/y", 2.0)] * (step + 1)
    texts, lengths, rewards = seen[-1]
    assert texts == ["is 4", "?5"] and lengths == [3, 1] and rewards == [pytest.approx(1.1), 0.0]


def test_hacking_watch_without_log_metric_is_silent():
    watch = HackingWatch([verifier], [1.0], lambda *args: pytest.fail("signals computed without a logger"))
    assert watch.funcs[0](completions=["4"], answer=["4"], completion_ids=[[1]]) == [1.0]
    with pytest.raises(ValueError):
        HackingWatch([verifier], [1.0, 2.0], lambda *args: {})
