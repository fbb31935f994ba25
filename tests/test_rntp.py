"""rntp: the byte/boundary matcher on hand-worked cases, entropy and bucket maths, the position sampler on a
real byte-level tokenizer, the reward programs (dense one against a naive oracle), and the stage on a tiny
model through the pipeline (artifacts, evaluation rows, resume, pre-filter, config errors, GSM8K text)."""

from __future__ import annotations

import functools
import json
import math
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from alignkit.core.errors import DataError, RecipeError
from alignkit.rewards.programs import load_reward
from alignkit.maths.rntp import (
    boxed_prediction,
    bucket,
    bucketed_accuracy,
    continuation_at,
    continuation_match,
    document_positions,
    entropy_thresholds,
    first_token_text,
    prefix_byte_lengths,
    target_logps,
    topk_entropy,
)

SHARED_GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"


def match(pred, cont, ends, **kw):
    return continuation_match(pred, cont, ends, **kw)


# --------------------------------------------------------------------------------------------- matcher


def test_match_accepts_whole_tokens_only():
    # true tokens " answer", " is", " 4", "2" -> " answer is 42": ends after 7, 10, 12, 13 bytes
    cont, ends = " answer is 42", [7, 10, 12, 13]
    assert match("answer", cont, ends) and match("answer is", cont, ends) and match("answer is 42", cont, ends)
    assert match("answer is 4", cont, ends)               # " 4" is a token of its own here
    assert not match("answ", cont, ends)                 # partial first token
    assert not match("answer i", cont, ends)             # partial second token
    assert not match("answer is 42.", cont, ends)        # longer than the stored continuation
    assert not match("question", cont, ends) and not match("", cont, ends) and not match(None, cont, ends)
    assert match("answer", cont, ends, first_token_only=True)
    assert not match("answer is", cont, ends, first_token_only=True)


def test_leading_space_lenient_and_exact():
    # one token " 42": the space belongs to the token
    assert match("42", " 42", [3]) and match(" 42", " 42", [3]) and match("  42", " 42", [3])
    assert not match("4", " 42", [3])                    # still a partial token after stripping
    assert not match("42", " 42", [3], leading_space="exact") and match(" 42", " 42", [3], leading_space="exact")
    # SmolLM2 style: the space is its own token " ", then "4", "2"
    assert match("4", " 42", [1, 2, 3]) and match("42", " 42", [1, 2, 3])
    assert match("4", " 42", [1, 2, 3], first_token_only=True)     # lenient: first token after the space
    assert not match("4", " 42", [1, 2, 3], leading_space="exact")  # exact: " 4" would be needed
    assert match(" ", " 42", [1, 2, 3], leading_space="exact", first_token_only=True)
    assert first_token_text(" 42", [1, 2, 3]) == "4" and first_token_text("\n\nThe", [1, 2, 5]) == "The"
    with pytest.raises(ValueError, match="leading_space"):
        match("4", "4", [1], leading_space="loose")


def test_multibyte_characters():
    # "日本" is 3 + 3 bytes; "é" is 2 bytes (c3 a9)
    assert match("日", "日本語", [3, 6, 9]) and match("日本", "日本語", [3, 6, 9])
    assert not match("本", "日本語", [3, 6, 9])
    assert not match("日", "日本語", [6, 9])             # "日本" is one token: "日" is a partial one
    # "café" as tokens "caf", "é" -> a byte-level tokenizer may split "é" into c3 | a9: the mid-character end
    # (4) is not listed (no string has those bytes), so the whole character is the smallest token prefix
    assert match("café", "café!", [3, 5, 6]) and match("caf", "café!", [3, 5, 6])
    assert not match("caf\ufffd", "café!", [3, 5, 6])   # what decoding the half-"é" token alone gives
    assert first_token_text("é!", [2, 3]) == "é"


def test_prefix_byte_lengths_on_a_byte_level_tokenizer():
    from alignkit.testing import make_tokenizer

    tok = make_tokenizer()  # trained on ASCII text: "é" and "日" come out as one token per byte
    text = "The café 日本"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    decode = functools.partial(tok.decode, clean_up_tokenization_spaces=False)
    body, lengths = prefix_byte_lengths(decode, ids)
    assert body == text.encode() and lengths[0] == 0 and lengths[-1] == len(body)
    boundaries = {n for n in lengths if n is not None}
    char_ends = {len(text[:i].encode()) for i in range(len(text) + 1)}
    assert boundaries <= char_ends                       # never inside a character
    assert None in lengths                               # the multi-byte characters were split
    t = next(k for k in range(len(ids)) if lengths[k] == len("The caf"))
    cont, ends = continuation_at(body, lengths, t, max_tokens=10)
    assert cont.startswith("é") and ends[0] == 2         # the half-"é" token end is skipped
    assert all(cont.encode()[:e].decode() for e in ends)  # every listed end decodes cleanly


def test_boxed_prediction():
    assert boxed_prediction(r"I think \boxed{4} then \boxed{42}") == "42"
    assert boxed_prediction(r"\boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    assert boxed_prediction(r"<think>\boxed{1}</think> so \boxed{ 2}") == " 2"
    assert boxed_prediction(r"<think>\boxed{1}</think> no box") is None
    assert boxed_prediction(r"\boxed{4") is None and boxed_prediction("42") is None


# ------------------------------------------------------------------------------------- entropy, buckets


def test_topk_entropy_hand_worked():
    import torch

    uniform = torch.zeros(32)
    assert float(topk_entropy(uniform, k=16)) == pytest.approx(math.log(16))
    # top-2 of [log 3, log 1, -inf...] renormalised: p = (3/4, 1/4), H = -(.75 ln .75 + .25 ln .25) = 0.5623
    logits = torch.tensor([math.log(3), 0.0, -50.0, -50.0])
    assert float(topk_entropy(logits, k=2)) == pytest.approx(0.562335, abs=1e-5)
    # the tail beyond k is ignored: adding mass outside the top 2 leaves it unchanged
    assert float(topk_entropy(torch.tensor([math.log(3), 0.0, -0.1, -0.2]), k=2)) == pytest.approx(0.562335, abs=1e-5)
    assert float(topk_entropy(torch.tensor([30.0, 0.0, 0.0]), k=3)) < 1e-9
    assert topk_entropy(torch.zeros(2, 5, 8), k=4).shape == (2, 5)


def test_buckets_hand_worked():
    assert entropy_thresholds([3.0, 0.1, 2.0, 0.5, 1.0, 1.5]) == [0.5, 1.5]
    assert [bucket(e, [0.5, 1.5]) for e in (0.0, 0.5, 1.0, 1.5, 9.0)] == ["easy", "easy", "medium", "medium", "hard"]
    acc = bucketed_accuracy([True, False, True, True, False], [0.1, 0.2, 1.0, 2.0, 3.0], [0.5, 1.5])
    assert acc == {"all": 0.6, "n_all": 5, "easy": 0.5, "n_easy": 2, "medium": 1.0, "n_medium": 1,
                   "hard": 0.5, "n_hard": 2}
    assert bucketed_accuracy([True], [0.1], [0.5, 1.5])["hard"] is None


# ------------------------------------------------------------------------------------------- sampler


def test_document_positions_rows_are_the_true_text(tiny_model_dir):
    from alignkit.modeling.models import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    doc = "Tom has 3 apples. He buys 4 more.\nAdd 4: 3 + 4 = 7.\nThe answer is 7."

    def fake_entropies(ids):  # entropy rises with the position: positions >= 20 pass a 20.0 floor
        return [float(t) for t in range(len(ids))]

    common = {"per_document": 100, "min_context_tokens": 5, "context_tokens": 6, "continuation_tokens": 3,
                  "max_document_tokens": 512, "skip_whitespace_tokens": True, "leading_space": "lenient", "seed": 0}
    rows = document_positions(doc, tok, fake_entropies, min_entropy=20.0, **common)
    ids = tok(doc, add_special_tokens=False)["input_ids"]
    assert rows and all(r["position"] >= 20 and r["entropy"] == r["position"] for r in rows)
    for row in rows:
        t = row["position"]
        assert row["context_ids"] == ids[max(0, t - 6):t] and row["next_token_id"] == ids[t]
        assert (row["context"] + row["continuation"]) in doc  # context then continuation, contiguous
        assert row["continuation"] == tok.decode(ids[t:t + len(row["token_ends"])])
        assert tok.decode([ids[t]]).strip()                    # whitespace-only next tokens were skipped
        assert match(row["continuation"], row["continuation"], row["token_ends"])
    capped = document_positions(doc, tok, fake_entropies, min_entropy=0.0, **{**common, "per_document": 3})
    assert len(capped) == 3 and capped == document_positions(doc, tok, fake_entropies, min_entropy=0.0,
                                                             **{**common, "per_document": 3})  # seeded
    assert document_positions(doc, tok, fake_entropies, min_entropy=1e9, **common) == []


# --------------------------------------------------------------------------------------- reward programs


def test_next_token_match_reward_program():
    fn = load_reward("reward/rntp.py:next_token_match")
    completions = [r"hmm \boxed{4}", [{"role": "assistant", "content": r"\boxed{42}"}], r"\boxed{420}", "4", "x"]
    scores = fn(completions, continuation=[" 42."] * 4 + [None], token_ends=[[1, 2, 3, 4]] * 4 + [None])
    assert scores == [1.0, 1.0, 0.0, 0.0, None]
    first = fn(completions[:2], continuation=[" 42."] * 2, token_ends=[[1, 2, 3, 4]] * 2, first_token_only=True)
    assert first == [1.0, 0.0]
    fmt = load_reward("reward/rntp.py:boxed_format")
    assert fmt([r"\boxed{x}", r"\boxed{}", "x"]) == [1.0, 0.0, 0.0]


def test_target_logps_equals_one_forward_per_row(tiny_model_dir):
    import torch

    from alignkit.modeling.models import load_model

    model = load_model(str(tiny_model_dir)).eval()
    prefixes, targets = [[5, 6, 7, 8], [9, 10]], [[11, 12], [13, 14, 15]]
    batched = target_logps(model, prefixes, targets, pad_id=3)
    for prefix, target, got in zip(prefixes, targets, batched):
        seq = torch.tensor([prefix + target])
        with torch.no_grad():
            logp = model(input_ids=seq).logits[0].log_softmax(-1)  # (L, V)
        naive = sum(float(logp[len(prefix) - 1 + j, tok]) for j, tok in enumerate(target))
        assert got == pytest.approx(naive, abs=1e-4)


def test_greedy_next_tokens_match_one_context_at_a_time(tiny_model_dir):
    """Right-padded batches give each context's own argmax (padding after a row never reaches it)."""
    import torch

    from alignkit.modeling.models import load_model, load_tokenizer
    from alignkit.maths.rntp import greedy_next_tokens

    model, tok = load_model(str(tiny_model_dir)).eval(), load_tokenizer(str(tiny_model_dir))
    contexts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
    batched = greedy_next_tokens(model, tok, contexts, batch_size=3)
    with torch.no_grad():
        alone = [tok.decode([int(model(input_ids=torch.tensor([c])).logits[0, -1].argmax())],
                            clean_up_tokenization_spaces=False) for c in contexts]
    assert batched == alone


def test_thought_gain_is_the_log_prob_difference(tiny_model_dir):
    from alignkit.modeling.models import load_model, load_tokenizer

    fn = load_reward("reward/rntp.py:thought_gain")
    prompt = [{"role": "user", "content": "Text: 3 + 4 ="}]
    completions = [r"three and four make seven \boxed{7}", "no box at all", r"\boxed{7}"]
    scores = fn(completions, prompts=[prompt] * 3, continuation=[" 7.", " 7.", None],
                token_ends=[[2, 3], [2, 3], None], model=str(tiny_model_dir))
    assert scores[2] is None
    model, tok = load_model(str(tiny_model_dir)).eval(), load_tokenizer(str(tiny_model_dir))
    rendered = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    ids = functools.partial(lambda t: tok(t, add_special_tokens=False)["input_ids"])
    for text, got in zip(["three and four make seven ", "no box at all"], scores[:2]):
        with_t, = target_logps(model, [ids(rendered + text + "\\boxed{")], [ids("7")], pad_id=tok.pad_token_id)
        without, = target_logps(model, [ids(rendered + "\\boxed{")], [ids("7")], pad_id=tok.pad_token_id)
        assert got == pytest.approx(with_t - without, abs=1e-4) and got != 0.0


# ------------------------------------------------------------------------------------------------ stage


def write_recipe(tmp_path: Path, model: Path, stage: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(f"""
        name: rntp-test
        tracking: {{report_to: none}}
        defaults:
          model: {model}
          num_generations: 4
          batch_size: 8
          max_completion_length: 8
          logging_steps: 1
        stages:
    """) + textwrap.indent(textwrap.dedent(stage), "  "))
    return path


ARITH_STAGE = """
    - kind: rntp
      data: {source: arith, seed: 3, params: {n: 6, steps: 1, max_operand: 9}}
      eval_data: {source: arith, seed: 9, params: {n: 6, steps: 1, max_operand: 9}}
      min_entropy: 0.0
      shard_size: 4
      max_steps: 2
      save_steps: 2
"""


def test_stage_runs_evaluates_and_resumes(tmp_path, tiny_model_dir):
    from alignkit.core.artifacts import Manifest
    from alignkit.run.pipeline import run_recipe
    from alignkit.run.recipe import load_recipe

    stage = ARITH_STAGE + ("      accuracy_data: {source: arith, seed: 5, params: {n: 2, steps: 1}}\n"
                           "      accuracy_max_completion_length: 4\n")
    recipe = load_recipe(write_recipe(tmp_path, tiny_model_dir, stage), output_dir=str(tmp_path / "runs"))
    run_recipe(recipe, echo=lambda *_: None)
    run_dir = recipe.stages[0].run_dir
    manifest = Manifest.read(run_dir)
    metrics = manifest.metrics
    assert manifest.status == "done" and metrics["train_steps"] == 2
    assert metrics["positions_train"] == 12 and metrics["positions_eval"] == 12   # 6 documents x 2
    assert metrics["eval_n_all"] == 12 and sum(metrics[f"eval_n_{b}"] for b in ("easy", "medium", "hard")) == 12
    for key in ("plain_before_all", "think_before_all", "think_after_all", "plain_after_hard"):
        assert 0.0 <= metrics[key] <= 1.0
    lines = [json.loads(x) for x in Path(manifest.artifacts["evaluation"]).read_text().splitlines()]
    assert [(x["when"], x["mode"]) for x in lines] == [("before", "plain"), ("before", "think"),
                                                      ("after", "plain"), ("after", "think")]
    records = [json.loads(x) for x in (run_dir / "eval_before.jsonl").read_text().splitlines()]
    assert len(records) == 12 and {"plain", "think", "plain_correct", "entropy"} <= set(records[0])
    positions = [json.loads(x) for x in Path(manifest.artifacts["positions"]).read_text().splitlines()]
    assert len(positions) == 12 and {"continuation", "token_ends", "entropy", "prompt"} <= set(positions[0])
    assert (run_dir / "model" / "config.json").is_file()
    assert 0.0 <= metrics["accuracy_before"] <= 1.0 and (run_dir / "accuracy_after.jsonl").is_file()
    # Reward-hacking signals every step: length, no boxed answer, repetition; no plain-number one (not maths).
    state = json.loads((run_dir / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    logged = [entry for entry in state["log_history"] if "reward" in entry]
    assert len(logged) == 2
    for entry in logged:
        assert entry["hack/completion_tokens"] == pytest.approx(entry["completions/mean_length"])
        assert entry["hack/no_answer_frac"] == 1.0  # the random model never closes a box in 8 tokens
        assert 0.0 <= entry["hack/repeated_ngram_frac"] <= 1.0 and "hack/rewarded_not_plain_frac" not in entry
    assert metrics["hack_no_answer_frac_last"] == 1.0

    # Resume: a lost shard is redone (and only it), giving the same rows.
    ctx = SimpleNamespace(run_dir=run_dir, is_main=True, wait=lambda: None)
    shard = run_dir / "positions" / "train" / "shard-00001.jsonl"
    kept = (run_dir / "positions" / "train" / "shard-00000.jsonl").stat().st_mtime_ns
    shard.unlink()
    from alignkit.modeling.models import load_tokenizer
    from alignkit.stages import rntp

    config = recipe.stages[0].config
    again = rntp.sample_split(config, ctx, load_tokenizer(str(tiny_model_dir)), "train", config.data)
    assert [{k: v for k, v in r.items() if k != "prompt"} for r in again] == \
        [{k: v for k, v in r.items() if k != "prompt"} for r in positions]
    assert shard.is_file() and (run_dir / "positions" / "train" / "shard-00000.jsonl").stat().st_mtime_ns == kept


def test_dense_reward_trains_through_the_stage(tmp_path, tiny_model_dir):
    """reward: dense gives continuous rewards, so no group ties (frac_reward_zero_std 0), unlike the 0/1
    match reward on a model that never boxes anything (every group all-zero)."""
    from alignkit.core.artifacts import Manifest
    from alignkit.run.pipeline import run_recipe
    from alignkit.run.recipe import load_recipe

    stage = ARITH_STAGE.replace("      eval_data: {source: arith, seed: 9, params: {n: 6, steps: 1, max_operand: 9}}\n",
                                "").replace("max_steps: 2", "max_steps: 1\n      reward: dense")
    recipe = load_recipe(write_recipe(tmp_path, tiny_model_dir, stage), output_dir=str(tmp_path / "runs"))
    run_recipe(recipe, echo=lambda *_: None)
    metrics = Manifest.read(recipe.stages[0].run_dir).metrics
    assert metrics["train_steps"] == 1 and metrics["frac_reward_zero_std_mean"] == 0.0
    assert metrics["reward_thought_gain_first"] is not None and "positions_eval" in metrics


def test_prefilter_drops_groups_that_all_agree(tmp_path, tiny_model_dir, monkeypatch):
    from alignkit.modeling.models import load_model, load_tokenizer
    from alignkit.run.recipe import load_recipe
    from alignkit.stages import rntp

    recipe = load_recipe(write_recipe(tmp_path, tiny_model_dir, ARITH_STAGE.replace(
        "max_steps: 2", "max_steps: 2\n      prefilter_samples: 4")), output_dir=str(tmp_path / "runs"))
    config = recipe.stages[0].config
    rows = [{"doc_index": i, "position": 9, "prompt": "Text: a b", "continuation": " c", "token_ends": [2]}
            for i in range(3)]
    # row 0: every sample right; row 1: half right; row 2: none right (by a stand-in reward)
    wins = iter([[1.0] * 4, [1.0, 0.0, 1.0, 0.0], [0.0] * 4])
    monkeypatch.setattr(rntp, "_reward_fn", lambda config: lambda completions, **kw: next(wins))
    run_dir = tmp_path / "pf"
    run_dir.mkdir()
    ctx = SimpleNamespace(run_dir=run_dir, is_main=True)
    model, tok = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    kept, dropped = rntp.prefilter(model, tok, rows, config, ctx)
    assert [r["doc_index"] for r in kept] == [1] and dropped == 2
    cached = [json.loads(x)["successes"] for x in (run_dir / "prefilter.jsonl").read_text().splitlines()]
    assert cached == [4, 2, 0]
    assert rntp.prefilter(model, tok, rows, config, ctx)[0] == kept  # read back, no sampling
    (run_dir / "prefilter.jsonl").write_text("".join(json.dumps({"successes": 0}) + "\n" for _ in rows))
    with pytest.raises(DataError, match="all or none"):
        rntp.prefilter(model, tok, rows, config, ctx)


@pytest.mark.parametrize("bad, field, message", [
    (["instruction: 'no placeholder'"], "instruction", "must contain {context}"),
    (["entropy_buckets: [2.0, 1.0]"], "entropy_buckets", "two increasing edges"),
    (["reward: dense", "prefilter_samples: 4"], "prefilter_samples", "dense rewards are continuous"),
    # `generation` is the training sampler (as in grpo); a server for the evaluation goes in eval_generation
    (["generation: {backend: openai, base_url: 'http://127.0.0.1:9/v1', model_name: m}"], "generation",
     "eval_generation"),
])
def test_config_mistakes_name_the_field(tmp_path, tiny_model_dir, bad, field, message):
    from alignkit.run.recipe import load_recipe

    extra = "".join(f"      {line}\n" for line in bad)
    with pytest.raises(RecipeError, match=message) as err:
        load_recipe(write_recipe(tmp_path, tiny_model_dir, ARITH_STAGE + extra))
    assert field in str(err.value)


@pytest.mark.skipif(not SHARED_GSM8K.is_file(), reason="../shared/data/gsm8k/train.jsonl is absent")
def test_gsm8k_solution_text(tmp_path, tiny_model_dir):
    """Sampler, matcher and the whole stage on GSM8K solution text (tiny model: pipeline, not quality)."""
    from alignkit.core.artifacts import Manifest
    from alignkit.core.config import DataSpec
    from alignkit.data import load_dataset
    from alignkit.run.pipeline import run_recipe
    from alignkit.run.recipe import load_recipe

    stage = f"""
        - kind: rntp
          data: {{source: gsm8k, path: {SHARED_GSM8K}, limit: 4}}
          eval_data: {{source: gsm8k, path: {SHARED_GSM8K}, limit: 4, shuffle: true, seed: 7}}
          min_entropy: 0.0
          context_tokens: 64
          max_length: 512
          max_steps: 1
          save_steps: 1
    """
    recipe = load_recipe(write_recipe(tmp_path, tiny_model_dir, stage), output_dir=str(tmp_path / "runs"))
    run_recipe(recipe, echo=lambda *_: None)
    manifest = Manifest.read(recipe.stages[0].run_dir)
    assert manifest.status == "done" and manifest.metrics["positions_train"] == 8
    rows = [json.loads(x) for x in Path(manifest.artifacts["positions"]).read_text().splitlines()]
    docs = [r["text"] for r in load_dataset(DataSpec(source="gsm8k", path=str(SHARED_GSM8K), limit=4), "text")]
    assert "The answer is" in docs[0]  # GSM8K's solution text, calculator annotations removed
    for row in rows:
        assert row["context"] + row["continuation"] in docs[row["doc_index"]]
        assert match(row["continuation"], row["continuation"], row["token_ends"])
        assert match(first_token_text(row["continuation"], row["token_ends"]), row["continuation"], row["token_ends"])
        assert not match(row["continuation"] + "zz", row["continuation"], row["token_ends"])


@pytest.mark.e2e
def test_smollm2_arith_positions(smollm2_dir):
    """SmolLM2's tokenizer splits digits and puts the space before a number in a token of its own: the
    sampler's rows there start at the first digit; its greedy plain next token after "= " is mostly right
    (19 of 24 positions measured, 0.79), which is why arith results are not high-entropy positions for it."""
    from alignkit.data import arith_text
    from alignkit.modeling.models import load_model, load_tokenizer
    from alignkit.maths.rntp import greedy_next_tokens, proxy_entropies

    tok, model = load_tokenizer(str(smollm2_dir)), load_model(str(smollm2_dir)).eval()
    body, lengths = prefix_byte_lengths(functools.partial(tok.decode, clean_up_tokenization_spaces=False),
                                        tok("Grüße über", add_special_tokens=False)["input_ids"])
    assert None in lengths and body.decode() == "Grüße über"  # "ü" is split across two byte tokens
    entropies = functools.partial(proxy_entropies, model, k=16)
    rows = []
    for i, doc in enumerate(arith_text(12, seed=9002, steps=2, max_operand=20)):
        rows += document_positions(doc, tok, entropies, min_entropy=0.0, per_document=100, min_context_tokens=8,
                                   context_tokens=128, continuation_tokens=8, max_document_tokens=512,
                                   skip_whitespace_tokens=True, leading_space="lenient", seed=i)
    results = [r for r in rows if r["context"].endswith("= ")]
    assert len(results) == 24 and all(r["continuation"][0].isdigit() and r["token_ends"][0] == 1 for r in results)
    assert all(0.0 <= r["entropy"] <= math.log(16) + 1e-6 for r in rows)
    plain = greedy_next_tokens(model, tok, [r["context_ids"] for r in results])
    accuracy = sum(match(p, r["continuation"], r["token_ends"]) for p, r in zip(plain, results)) / len(results)
    assert accuracy >= 0.6, accuracy
