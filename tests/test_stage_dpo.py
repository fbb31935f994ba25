"""The dpo stage on a tiny model: the implicit-reward margin of the training pairs rises (checked against a
naive log-prob oracle, not only TRL's logs), on-policy pairs survive a kill between shards, recipe errors."""

from __future__ import annotations

import json
import textwrap

import pytest

from alignkit.core.artifacts import Manifest
from alignkit.core.errors import RecipeError
from alignkit.run.pipeline import run_recipe
from alignkit.run.recipe import load_recipe
from helpers import QLORA, TrainedModelSpy, run_two_processes, write_recipe


def quiet(*_):
    pass


def completion_logp(model, tokenizer, prompt: str, reply: str) -> float:
    """Naive oracle: sum of log p(reply tokens | chat prompt), one sequence at a time, no padding."""
    import torch

    messages = [{"role": "user", "content": prompt}]
    prompt_ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                               return_dict=True)["input_ids"]
    full_ids = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": reply}],
                                             tokenize=True, return_dict=True)["input_ids"]
    assert full_ids[: len(prompt_ids)] == prompt_ids
    ids = torch.tensor([full_ids])
    with torch.no_grad():
        logps = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)  # (T-1, V): predicts tokens 1..T-1
    targets = ids[0, 1:]
    token_logps = logps.gather(-1, targets[:, None])[:, 0]
    return float(token_logps[len(prompt_ids) - 1:].sum())


PAIRS = [{"prompt": f"Tom has {i} apples. He buys {i + 2} more. How many?",
          "chosen": f"The answer is {2 * i + 2}.", "rejected": "The quick brown fox."} for i in range(16)]

PREFERENCE_RECIPE = """
name: dpo-test
tracking: {{report_to: none}}
stages:
  - kind: dpo
    model: {model}
    data: {{source: {data}}}
    lora: {{r: 8, alpha: 16, dropout: 0.0}}
    lr: 5.0e-3
    beta: 0.1
    max_steps: 6
    batch_size: 8
    max_length: 64
    logging_steps: 1
"""


def test_dpo_raises_the_implicit_reward_margin(tmp_path, tiny_model_dir):
    from alignkit.modeling.models import load_model, load_tokenizer

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in PAIRS))
    recipe_file = tmp_path / "dpo.yaml"
    recipe_file.write_text(textwrap.dedent(PREFERENCE_RECIPE.format(model=tiny_model_dir, data=data)))
    recipe = load_recipe(recipe_file, output_dir=str(tmp_path / "runs"))
    metrics = run_recipe(recipe, echo=quiet)[0].metrics

    assert metrics["train_pairs"] == 16 and metrics["train_steps"] == 6
    assert metrics["first_logged_reward_margins"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at step 0
    assert metrics["last_logged_reward_margins"] > 0.1
    assert metrics["last_logged_reward_accuracies"] >= 0.75
    assert metrics["last_logged_loss"] < metrics["first_logged_loss"] < 0.7  # log 2 = 0.693 at the start

    # oracle: beta * [(logp - ref_logp)(chosen) - (logp - ref_logp)(rejected)] with the saved merged model
    tokenizer = load_tokenizer(str(tiny_model_dir))
    policy = load_model(recipe.stage("dpo").outputs["model"])
    reference = load_model(str(tiny_model_dir))
    margins = []
    for row in PAIRS:
        lp = {k: completion_logp(m, tokenizer, row["prompt"], row[side])
              for k, m, side in [("pc", policy, "chosen"), ("pr", policy, "rejected"),
                                 ("rc", reference, "chosen"), ("rr", reference, "rejected")]}
        margins.append(0.1 * ((lp["pc"] - lp["rc"]) - (lp["pr"] - lp["rr"])))
    assert sum(margins) / len(margins) > 0.1
    assert sum(m > 0 for m in margins) / len(margins) >= 0.9


REWARD_PROGRAM = '''
from pathlib import Path

HERE = Path(__file__).parent


def even_length(completions, prompts, **kwargs):
    """1.0 for an even number of characters: arbitrary but separates random samples, so pairs exist.
    Counts its calls; raises KeyboardInterrupt on call 2 while the file `kill` exists (a kill mid-run)."""
    calls = HERE / "calls.txt"
    n = int(calls.read_text()) + 1 if calls.exists() else 1
    calls.write_text(str(n))
    if n == 2 and (HERE / "kill").exists():
        (HERE / "kill").unlink()
        raise KeyboardInterrupt
    return [float(len(c) % 2 == 0) for c in completions]
'''

ON_POLICY_RECIPE = """
name: dpo-onpolicy
tracking: {{report_to: none}}
stages:
  - kind: dpo
    model: {model}
    lora: {{r: 8, alpha: 16, dropout: 0.0}}
    lr: 5.0e-3
    max_steps: 4
    batch_size: 4
    max_length: 96
    logging_steps: 1
    pairs:
      prompts: {{source: arith, params: {{n: 12, steps: 1}}}}
      num_generations: 4
      rewards: [{{program: "parity.py:even_length"}}]
      max_completion_length: 12
      shard_size: 4
      generation: {{backend: fast, batch_size: 16}}
    accuracy_data: {{source: arith, seed: 1, params: {{n: 4, steps: 1}}}}
    accuracy_max_completion_length: 8
"""


def test_on_policy_pairs_resume_after_a_kill_then_train(tmp_path, tiny_model_dir):
    (tmp_path / "parity.py").write_text(REWARD_PROGRAM)
    (tmp_path / "kill").write_text("")
    recipe_file = tmp_path / "onpolicy.yaml"
    recipe_file.write_text(textwrap.dedent(ON_POLICY_RECIPE.format(model=tiny_model_dir)))
    recipe = load_recipe(recipe_file, output_dir=str(tmp_path / "runs"))
    run_dir = recipe.stage("dpo").run_dir

    with pytest.raises(KeyboardInterrupt):  # killed while scoring the second shard
        run_recipe(recipe, echo=quiet)
    assert Manifest.read(run_dir).status == "interrupted"
    assert sorted(p.name for p in (run_dir / "pairs").iterdir()) == ["shard-00000.jsonl", "shard-00000.meta.json"]

    outcome = run_recipe(load_recipe(recipe_file, output_dir=str(tmp_path / "runs")), echo=quiet)[0]
    assert outcome.action == "resumed"
    assert (tmp_path / "calls.txt").read_text() == "4"  # 1 + the killed call + shards 1 and 2: shard 0 not redone
    shards = [json.loads(line) for s in range(3) for line in (run_dir / "pairs" / f"shard-{s:05d}.jsonl").open()]
    assert [row["index"] for row in shards] == list(range(12))  # every prompt once: none lost, none duplicated
    pairs = [json.loads(line) for line in (run_dir / "pairs.jsonl").open()]
    usable = [row for row in shards if row["chosen"] is not None]
    assert len(pairs) == len(usable) >= 6
    assert all(len(p["chosen"]) % 2 == 0 and len(p["rejected"]) % 2 == 1 for p in pairs)
    for row in shards:  # a prompt has no pair exactly when all its samples share a parity
        assert (row["chosen"] is None) == (len(set(row["scores"])) == 1)

    m = outcome.metrics
    assert m["pair_prompts"] == 12 and m["pairs_made"] == len(pairs)
    assert m["pair_usable_fraction"] == pytest.approx(len(pairs) / 12, abs=1e-4)
    assert m["pair_mean_score_margin"] == 1.0 and m["completions_per_second"] > 0
    assert m["train_pairs"] == len(pairs) and m["train_steps"] == 4
    assert m["last_logged_reward_margins"] > m["first_logged_reward_margins"]
    assert m["accuracy_before"] == 0.0 and "accuracy_after" in m  # a random tiny model solves nothing
    assert (run_dir / "model" / "config.json").is_file() and Manifest.read(run_dir).status == "done"


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ("data: {source: arith}\n    pairs: {prompts: {source: arith}, rewards: [{program: r.py:f}]}",
         "stages.dpo", "exactly one of"),
        ("lr: 1.0e-4", "stages.dpo", "exactly one of"),
        ("pairs: {prompts: {source: arith}, rewards: [{program: nowhere.py:f}]}",
         "stages.dpo.pairs.rewards.0.program", "not found"),
        ("pairs: {prompts: {source: arith}, num_generations: 1, rewards: [{program: r.py:f}]}",
         "stages.dpo.pairs.num_generations", "greater than or equal to 2"),
        ("data: {source: arith}\n    trl: {betta: 0.2}", "stages.dpo.trl.betta", "DPOConfig has no argument"),
    ],
)
def test_recipe_errors_name_the_field(tmp_path, tiny_model_dir, body, field, message):
    recipe_file = tmp_path / "bad.yaml"
    recipe_file.write_text(textwrap.dedent(f"""
        name: bad
        tracking: {{report_to: none}}
        stages:
          - kind: dpo
            model: {tiny_model_dir}
        """) + f"    {body}\n")
    with pytest.raises(RecipeError, match=message) as err:
        load_recipe(recipe_file)
    assert err.value.field == field


# ------------------------------------------------------------------------------ QLoRA and 2 processes


def _pairs_file() -> dict[str, str]:
    return {"pairs.jsonl": "".join(json.dumps(row) + "\n" for row in PAIRS)}


def test_dpo_qlora_trains_on_4bit_weights(tmp_path, tiny_model_dir, monkeypatch):
    """`quantization: {bits: 4}` + LoRA on CPU: the policy TRL trained is nf4 under every adapter (not repacked for
    inference by the accuracy check before training), its adapters stay float32, the implicit-reward margin
    rises from 0, and the merged model is a plain float32 model."""
    import torch

    from alignkit.modeling.models import is_quantized, load_model, model_summary

    spy = TrainedModelSpy(monkeypatch, "alignkit.stages.dpo")
    recipe_file = write_recipe(tmp_path, PREFERENCE_RECIPE.format(model=tiny_model_dir, data=tmp_path / "pairs.jsonl"),
                               files=_pairs_file(), name="dpo.yaml")
    recipe = load_recipe(recipe_file, [f"stages.dpo.quantization={QLORA}",
                                       "stages.dpo.accuracy_data={source: arith, params: {n: 2, steps: 1}}",
                                       "stages.dpo.accuracy_max_completion_length=4"], output_dir=str(tmp_path / "runs"))
    metrics = run_recipe(recipe, echo=quiet)[0].metrics

    assert spy.quantized_layers() == {"Linear4bit": 14} and spy.packed_at_train_start == 0
    assert model_summary(spy.model)["quantization"] == "4bit-nf4"
    assert {p.dtype for p in spy.model.parameters() if p.requires_grad} == {torch.float32}
    assert spy.lora_b_norm() > 0
    assert metrics["train_steps"] == 6 and "accuracy_before" in metrics and "accuracy_after" in metrics
    assert metrics["first_logged_reward_margins"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["last_logged_reward_margins"] > 0.05, metrics
    assert metrics["last_logged_loss"] < metrics["first_logged_loss"]
    run_dir = recipe.stage("dpo").run_dir
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    merged = load_model(recipe.stage("dpo").outputs["model"])
    assert not is_quantized(merged) and merged.dtype == torch.float32 and not hasattr(merged, "peft_config")


def test_dpo_qlora_on_policy_pairs(tmp_path, tiny_model_dir, monkeypatch):
    """QLoRA with on-policy pairs: sampling them from the 4-bit policy (eval mode, no grad: what makes bitsandbytes
    repack weights for CPU inference) leaves the weights trainable, and DPO then trains on those pairs."""
    spy = TrainedModelSpy(monkeypatch, "alignkit.stages.dpo")
    recipe_file = write_recipe(tmp_path, ON_POLICY_RECIPE.format(model=tiny_model_dir),
                               files={"parity.py": REWARD_PROGRAM}, name="onpolicy.yaml")
    recipe = load_recipe(recipe_file, [f"stages.dpo.quantization={QLORA}", "stages.dpo.accuracy_data=null"],
                         output_dir=str(tmp_path / "runs"))
    metrics = run_recipe(recipe, echo=quiet)[0].metrics
    assert spy.quantized_layers() == {"Linear4bit": 14} and spy.packed_at_train_start == 0
    assert spy.lora_b_norm() > 0
    assert metrics["pair_prompts"] == 12 and metrics["train_pairs"] == metrics["pairs_made"] >= 6
    assert metrics["last_logged_reward_margins"] > metrics["first_logged_reward_margins"]
    assert (recipe.stage("dpo").run_dir / "model" / "config.json").is_file()


TWO_PROCESS_RECIPE = """
name: dpo-2proc
tracking: {{report_to: none}}
stages:
  - kind: dpo
    model: {model}
    data: {{source: {data}}}
    lora: {{r: 8, alpha: 16, dropout: 0.0}}
    lr: 5.0e-3
    max_steps: 2
    batch_size: 4
    max_length: 64
    logging_steps: 1
  - kind: dpo
    name: onpolicy
    model: ${{dpo.model}}
    lora: {{r: 8, alpha: 16, dropout: 0.0}}
    max_steps: 1
    batch_size: 2
    max_length: 96
    pairs:
      prompts: {{source: arith, params: {{n: 8, steps: 1}}}}
      num_generations: 4
      rewards: [{{program: "parity.py:even_length"}}]
      max_completion_length: 12
      shard_size: 4
      generation: {{backend: fast, batch_size: 16}}
"""


def test_dpo_two_processes_offline_then_on_policy(tmp_path, tiny_model_dir):
    """2 CPU processes (gloo), one launch, two stages. Offline: 16 pairs read once, 2 steps of 4 pairs per process
    (= one pass, no pair twice). On-policy, from the first stage's merged model: pairs are made by the main
    process only (every prompt sampled once, one pairs.jsonl), the other waits at the barrier, both train."""
    recipe_file = write_recipe(tmp_path, TWO_PROCESS_RECIPE.format(model=tiny_model_dir, data=tmp_path / "pairs.jsonl"),
                               files={**_pairs_file(), "parity.py": REWARD_PROGRAM}, name="dpo.yaml")
    proc = run_two_processes(recipe_file, tmp_path / "runs", stages=2)
    root = tmp_path / "runs" / "dpo-2proc"

    offline = Manifest.read(root / "dpo")
    assert offline.status == "done" and offline.metrics["train_pairs"] == 16 and offline.metrics["train_steps"] == 2
    state = json.loads((root / "dpo" / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["epoch"] == pytest.approx(1.0)  # 2 steps x 2 processes x 4 pairs = the 16 pairs once

    onpolicy = Manifest.read(root / "onpolicy")
    assert onpolicy.status == "done", onpolicy.error
    shards = [json.loads(line) for s in range(2) for line in (root / "onpolicy" / "pairs" / f"shard-{s:05d}.jsonl").open()]
    assert [row["index"] for row in shards] == list(range(8))  # sampled once, by one process
    assert int((tmp_path / "calls.txt").read_text()) == 2  # the reward ran once per shard, not once per rank
    pairs = [json.loads(line) for line in (root / "onpolicy" / "pairs.jsonl").open()]
    m = onpolicy.metrics
    assert m["pair_prompts"] == 8 and m["pairs_made"] == len(pairs) == m["train_pairs"] >= 2
    assert m["train_steps"] == 1 and proc.stdout.count("prompts gave a pair") == 1
    assert (root / "onpolicy" / "model" / "config.json").is_file()


def test_dpo_on_implicit_prompt_rows(tmp_path, tiny_model_dir):
    """TRL's implicit-prompt form: chosen/rejected are whole conversations; their shared turns are the prompt."""
    rows = [{"chosen": [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["chosen"]}],
             "rejected": [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["rejected"]}]}
            for p in PAIRS[:8]]
    data = tmp_path / "implicit.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    body = PREFERENCE_RECIPE.format(model=tiny_model_dir, data=data).replace("max_steps: 6", "max_steps: 2")
    recipe = load_recipe(write_recipe(tmp_path, body), output_dir=str(tmp_path / "runs"))
    metrics = run_recipe(recipe, echo=quiet)[0].metrics
    assert metrics["train_pairs"] == 8 and metrics["train_steps"] == 2
