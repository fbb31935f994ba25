"""grpo and rloo stages: rewards rise on a tiny model through the real pipeline, zero-std groups teach
nothing, config mistakes are RecipeErrors naming the field, and the shared helpers' arithmetic."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from alignkit.core.artifacts import Manifest
from alignkit.core.errors import DataError, RecipeError
from alignkit.run.pipeline import run_recipe
from alignkit.run.recipe import load_recipe
from alignkit.stages.rl_common import check_prompt_lengths, prompt_rows, reward_metrics, throughput
from helpers import QLORA, TrainedModelSpy, run_two_processes

# A reward the tiny random model can learn in a few steps: the share of digits in the completion (~5% at
# random init). A single target character ("7", ~1%) left most groups all-zero and was seed-dependent.
REWARDS_PY = '''
from alignkit.rewards.values import completion_text

def digit_fraction(completions, **kwargs):
    texts = [completion_text(c) for c in completions]
    return [sum(ch.isdigit() for ch in t) / len(t) if t else 0.0 for t in texts]

def constant(completions, **kwargs):
    return [1.0] * len(completions)
'''


def write_recipe(tmp_path: Path, model: Path, stage: str) -> Path:
    (tmp_path / "rewards.py").write_text(REWARDS_PY)
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(f"""
        name: rl
        tracking: {{report_to: none}}
        defaults:
          model: {model}
          data: {{source: arith, params: {{n: 32, steps: 1, max_operand: 9}}}}
          rewards: [{{program: rewards.py:digit_fraction}}]
          num_generations: 4
          batch_size: 8
          max_completion_length: 8
          logging_steps: 2
        stages:
    """) + textwrap.indent(textwrap.dedent(stage), "  "))
    return path


def run_stage(tmp_path: Path, model: Path, stage: str) -> tuple[Manifest, list[dict]]:
    """Run a one-stage recipe; return its manifest and TRL's log history (from the final checkpoint)."""
    recipe = load_recipe(write_recipe(tmp_path, model, stage), output_dir=str(tmp_path / "runs"))
    run_recipe(recipe, echo=lambda *_: None)
    run_dir = recipe.stages[0].run_dir
    checkpoint = sorted((run_dir / "checkpoints").glob("checkpoint-*"))[-1]
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    return Manifest.read(run_dir), [entry for entry in history if "reward" in entry]


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


HACK_FRACTIONS = ("hack/no_answer_frac", "hack/rewarded_not_plain_frac", "hack/repeated_ngram_frac")


def assert_hacking_signals_logged(logged: list[dict], metrics: dict, max_tokens: int) -> None:
    """Every logged step carries the reward-hacking signals (alignkit.rewards.hacking) in range, and the manifest their
    first and last values. The tokens are TRL's own completion length: both are the batch's mean in tokens."""
    for entry in logged:
        assert 0 < entry["hack/completion_tokens"] <= max_tokens, entry
        assert entry["hack/completion_tokens"] == pytest.approx(entry["completions/mean_length"])
        assert all(0.0 <= entry[key] <= 1.0 for key in HACK_FRACTIONS), entry
    for key in ("hack/completion_tokens",) + HACK_FRACTIONS:
        name = key.replace("hack/", "hack_")
        assert (metrics[f"{name}_first"], metrics[f"{name}_last"]) == (logged[0][key], logged[-1][key])


# ------------------------------------------------------------------------------------ training runs


def test_grpo_raises_reward_through_the_pipeline(tmp_path, tiny_model_dir):
    manifest, logged = run_stage(tmp_path, tiny_model_dir, """
        - kind: grpo
          accuracy_data: {source: arith, seed: 9, params: {n: 4, steps: 1, max_operand: 9}}
          accuracy_max_completion_length: 8
          lr: 3.0e-2
          max_steps: 12
          save_steps: 12
    """)
    assert manifest.status == "done"
    metrics = manifest.metrics
    rewards = [entry["reward"] for entry in logged]
    assert len(rewards) == 6  # 12 steps, logged every 2
    # Seeds 0, 1, 2 of this run went from 0.04-0.10 to 0.94, 0.50, 0.99.
    assert mean(rewards[-2:]) > mean(rewards[:2]) + 0.15, rewards
    assert metrics["reward_first"] == rewards[0] and metrics["reward_last"] == rewards[-1]
    assert 0 <= metrics["frac_reward_zero_std_mean"] <= 1
    assert metrics["completions_sampled"] == 12 * 8 and metrics["completions_per_second"] > 0
    assert metrics["train_prompts"] == 32 and metrics["train_steps"] == 12
    assert 0 <= metrics["accuracy_before"] <= 1 and 0 <= metrics["accuracy_after"] <= 1
    assert_hacking_signals_logged(logged, metrics, max_tokens=8)
    # digit_fraction pays any digit, so rewarded completions of a random model state no answer: a hacked reward.
    assert logged[-1]["hack/rewarded_not_plain_frac"] > 0.5 and logged[-1]["hack/no_answer_frac"] > 0.5
    run_dir = Path(manifest.artifacts["model"]).parent
    assert (run_dir / "model" / "config.json").exists()
    samples = [json.loads(line) for line in (run_dir / "accuracy_after.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and {"completion", "answer", "correct"} <= set(samples[0])


def test_rloo_raises_reward(tmp_path, tiny_model_dir):
    # beta 0: with rewards of ~0.05, TRL's default KL penalty (0.05 x summed log-ratio) would swamp them.
    # 4 prompts per step (batch 16): with 2, one seed in three stayed flat. Seeds 0-2: 0.06 -> 0.51, 0.20, 0.52.
    manifest, logged = run_stage(tmp_path, tiny_model_dir, """
        - kind: rloo
          beta: 0.0
          batch_size: 16
          lr: 3.0e-2
          max_steps: 8
          save_steps: 8
    """)
    rewards = [entry["reward"] for entry in logged]
    assert len(rewards) == 4
    assert mean(rewards[-2:]) > mean(rewards[:2]) + 0.05, rewards
    assert manifest.metrics["completions_sampled"] == 8 * 16
    assert set(manifest.artifacts) == {"model"}  # full fine-tuning: no adapter
    assert_hacking_signals_logged(logged, manifest.metrics, max_tokens=8)


def test_groups_with_equal_rewards_leave_the_weights_alone(tmp_path, tiny_model_dir):
    """Every group scores 1.0: advantages are 0, and with beta 0 there is no other gradient (TRL behaviour),
    so the LoRA adapter's B stays at its zero init and the merged model equals the base bit for bit."""
    import torch
    from safetensors.torch import load_file

    manifest, logged = run_stage(tmp_path, tiny_model_dir, """
        - kind: grpo
          rewards: [{program: rewards.py:constant}]
          lora: {r: 4, alpha: 8, dropout: 0.0}
          lr: 1.0e-1
          max_steps: 2
          save_steps: 2
    """)
    assert [entry["frac_reward_zero_std"] for entry in logged] == [1.0]
    assert manifest.metrics["frac_reward_zero_std_mean"] == 1.0
    assert (Path(manifest.artifacts["adapter"]) / "adapter_config.json").exists()
    before = load_file(str(tiny_model_dir / "model.safetensors"))
    after = load_file(str(Path(manifest.artifacts["model"]) / "model.safetensors"))
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)


# ------------------------------------------------------------------------------------ config mistakes

GOOD_STAGE = {"kind": "grpo", "model": "{model}", "data": "arith", "rewards": [{"program": "rewards.py:constant"}],
              "num_generations": 4, "batch_size": 8}


@pytest.mark.parametrize("changes,field,words", [
    ({"loss_type": "ppo"}, "stages.grpo.loss_type", "'dapo'"),
    ({"rewards": [{"program": "missing.py:fn"}]}, "stages.grpo.rewards.0.program", "not found"),
    ({"rewards": [{"program": "rewards.py:nope"}]}, "stages.grpo.rewards.0.program", "no function 'nope'"),
    ({"rewards": [{"program": "rewards.py:constant", "kwargs": {"scale": 2}}]}, "stages.grpo.rewards.0.kwargs",
     "no option"),
    ({"rewards": []}, "stages.grpo.rewards", "at least 1"),
    ({"num_generations": 3}, "stages.grpo.num_generations", "whole groups of 3"),
    ({"num_generations": 1}, "stages.grpo.num_generations", "greater than or equal to 2"),
    ({"loss_type": "luspo"}, "stages.grpo.importance_sampling_level", "sequence"),
    ({"scale_rewards": "std"}, "stages.grpo.scale_rewards", "'group'"),
    ({"trl": {"num_generatons": 4}}, "stages.grpo.trl.num_generatons", "GRPOConfig has no argument"),
    ({"kind": "rloo", "loss_type": "dapo"}, "stages.rloo.loss_type", "unknown field"),
    ({"kind": "rloo", "trl": {"scale_rewards": "group"}}, "stages.rloo.trl.scale_rewards", "RLOOConfig"),
])
def test_config_mistakes_name_the_field(tmp_path, tiny_model_dir, changes, field, words):
    import yaml

    (tmp_path / "rewards.py").write_text(REWARDS_PY)
    stage = {**GOOD_STAGE, "model": str(tiny_model_dir), **changes}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "bad", "stages": [stage]}))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert info.value.field == field, str(info.value)
    assert words in str(info.value), str(info.value)


def test_good_config_loads_with_trl_defaults(tmp_path, tiny_model_dir):
    import yaml

    (tmp_path / "rewards.py").write_text(REWARDS_PY)
    path = tmp_path / "good.yaml"
    path.write_text(yaml.safe_dump({"name": "ok", "stages": [{**GOOD_STAGE, "model": str(tiny_model_dir)},
                                                             {**GOOD_STAGE, "kind": "rloo",
                                                              "model": str(tiny_model_dir)}]}))
    grpo, rloo = (stage.config for stage in load_recipe(path).stages)
    assert (grpo.loss_type, grpo.beta, grpo.scale_rewards) == ("dapo", 0.0, "group")
    assert (rloo.beta, rloo.normalize_advantages) == (0.05, False)


# ------------------------------------------------------------------------------------ shared helpers


def test_reward_metrics_reads_trl_log_history():
    history = [
        {"loss": 0.1, "step": 1},  # a plain loss log without rewards is ignored
        {"reward": 0.2, "frac_reward_zero_std": 0.5, "rewards/answer_match/mean": 0.2, "step": 5},
        {"reward": 0.4, "frac_reward_zero_std": 0.25, "rewards/answer_match/mean": 0.3, "step": 10},
        {"reward": 0.6, "frac_reward_zero_std": 0.0, "rewards/answer_match/mean": 0.5, "kl": 0.01,
         "completions/mean_length": 30.0, "hack/no_answer_frac": 0.25, "step": 15},
    ]
    metrics = reward_metrics(history)
    assert metrics["reward_first"] == 0.2 and metrics["reward_last"] == 0.6
    assert metrics["reward_gain"] == pytest.approx(0.4) and metrics["reward_logs"] == 3
    assert metrics["frac_reward_zero_std_mean"] == pytest.approx(0.25)
    assert metrics["frac_reward_zero_std_last"] == 0.0
    assert (metrics["reward_answer_match_first"], metrics["reward_answer_match_last"]) == (0.2, 0.5)
    assert metrics["kl_last"] == 0.01 and metrics["completion_mean_length_last"] == 30.0
    assert (metrics["hack_no_answer_frac_first"], metrics["hack_no_answer_frac_last"]) == (None, 0.25)
    assert reward_metrics([{"loss": 1.0}]) == {}


def test_throughput_counts_generation_batches():
    # 16 completions per generation batch, feeding 2 * 2 / 2 = 2 optimizer steps.
    args = SimpleNamespace(steps_per_generation=2, num_iterations=2, gradient_accumulation_steps=2,
                           generation_batch_size=16)
    assert throughput(10, args, 4.0, resumed_from=None)["completions_sampled"] == 5 * 16
    assert throughput(11, args, 4.0, resumed_from=None)["completions_sampled"] == 6 * 16  # a started batch counts
    resumed = throughput(10, args, 2.0, resumed_from="/run/checkpoints/checkpoint-6")
    assert resumed["completions_sampled"] == 2 * 16 and resumed["completions_per_second"] == 16.0
    assert resumed["resumed_from_step"] == 6 and resumed["train_steps"] == 10


def test_prompt_rows_keep_answer_and_check_lengths(tiny_model_dir):
    from datasets import Dataset

    from alignkit.modeling.models import load_tokenizer
    from alignkit.stages.grpo import Config

    tokenizer = load_tokenizer(str(tiny_model_dir))
    problems = Dataset.from_list([{"prompt": "2 + 3?", "answer": "5"}, {"prompt": "7 * 6 = ? " * 8, "answer": "42"}])
    rows = prompt_rows(problems, tokenizer, chat=True)
    assert rows[0] == {"prompt": [{"role": "user", "content": "2 + 3?"}], "answer": "5"}
    plain = prompt_rows(problems, tokenizer, chat=False)
    assert plain[0]["prompt"] == "2 + 3?\n" and plain[0]["answer"] == "5"

    config = Config(model="m", data="arith", rewards=[{"program": "r.py:f"}], max_completion_length=8,
                    max_length=512)
    longest = check_prompt_lengths(rows, tokenizer, config)
    assert longest > len(tokenizer("7 * 6 = ? " * 8)["input_ids"])  # chat template tokens included
    tight = config.model_copy(update={"max_length": longest + 7})
    with pytest.raises(DataError, match="data row 1"):
        check_prompt_lengths(rows, tokenizer, tight)


# ------------------------------------------------------------------------------------ QLoRA and 2 processes


def test_grpo_qlora_trains_on_4bit_weights(tmp_path, steerable_model_dir, monkeypatch):
    """`quantization: {bits: 4}` + LoRA on CPU: TRL samples and trains an nf4 policy (not repacked for inference by
    the accuracy check before training), the adapters stay float32, the reward rises, and the merged model is a
    plain float32 model. The steerable tiny model (conftest): through an adapter the plain random one does not
    move in 12 steps. Seeds 0-3 of this run (without the accuracy check), mean reward of the first 2 logs ->
    last 2: 0.12 -> 0.73, 0.15 -> 0.55, 0.08 -> 0.15, 0.06 -> 0.15; the bar is +0.05."""
    import torch

    from alignkit.modeling.models import is_quantized, load_model, model_summary

    spy = TrainedModelSpy(monkeypatch, "alignkit.stages.rl_common")
    manifest, logged = run_stage(tmp_path, steerable_model_dir, f"""
        - kind: grpo
          quantization: {QLORA}
          lora: {{r: 8, alpha: 32, dropout: 0.0}}
          accuracy_data: {{source: arith, seed: 9, params: {{n: 2, steps: 1, max_operand: 9}}}}
          accuracy_max_completion_length: 4
          lr: 1.0e-1
          max_steps: 12
          save_steps: 12
    """)
    assert manifest.status == "done"
    assert spy.quantized_layers() == {"Linear4bit": 14} and spy.packed_at_train_start == 0
    assert model_summary(spy.model)["quantization"] == "4bit-nf4"
    assert {p.dtype for p in spy.model.parameters() if p.requires_grad} == {torch.float32}
    rewards = [entry["reward"] for entry in logged]
    assert len(rewards) == 6 and mean(rewards[-2:]) > mean(rewards[:2]) + 0.05, rewards
    metrics = manifest.metrics
    assert metrics["train_steps"] == 12 and metrics["completions_sampled"] == 12 * 8
    assert (Path(manifest.artifacts["adapter"]) / "adapter_config.json").is_file()
    merged = load_model(manifest.artifacts["model"])
    assert not is_quantized(merged) and merged.dtype == torch.float32 and not hasattr(merged, "peft_config")


@pytest.mark.parametrize("sampling", ["trl", "fast"])
def test_grpo_two_processes(tmp_path, tiny_model_dir, sampling):
    """2 CPU processes (gloo): each samples 4 completions (one group) per step, so a step is 2 prompts x 4 over
    both; 2 optimizer steps are counted once (not per rank) and the throughput counts both ranks' samples. With
    ``fast``, each rank's engine samples from the model unwrapped from DDP (alignkit.generation.rollout)."""
    recipe = write_recipe(tmp_path, tiny_model_dir, f"""
        - kind: grpo
          lora: {{r: 4, alpha: 8, dropout: 0.0}}
          generation: {{backend: {sampling}}}
          batch_size: 4
          lr: 3.0e-2
          max_steps: 2
          save_steps: 2
          logging_steps: 1
    """)
    proc = run_two_processes(recipe, tmp_path / "runs")
    run_dir = tmp_path / "runs" / "rl" / "grpo"
    manifest = Manifest.read(run_dir)
    assert manifest.status == "done", manifest.error
    metrics = manifest.metrics
    assert metrics["train_steps"] == 2 and metrics["reward_logs"] == 2
    assert metrics["completions_sampled"] == 2 * 8  # generation_batch_size spans both processes
    state = json.loads((run_dir / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and [e["step"] for e in state["log_history"] if "reward" in e] == [1, 2]
    assert sorted(p.name for p in (run_dir / "checkpoints" / "checkpoint-2").glob("rng_state*.pth")) == [
        "rng_state_0.pth", "rng_state_1.pth"]  # both ranks trained and checkpointed
    assert (run_dir / "model" / "config.json").is_file() and (run_dir / "adapter" / "adapter_config.json").is_file()
    assert proc.stdout.count("finished; outputs in") == 1
