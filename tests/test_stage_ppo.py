"""The ppo stage and alignkit.ppo: reward rises on a tiny model, KL stays bounded, PRM step rewards land on step
ends, the reference is the adapter-disabled policy, chunked log-probs equal the naive ones without keeping
vocabulary-sized tensors for backward, resume continues exactly, and a 2-process accelerate run."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

from alignkit.core.artifacts import Manifest
from alignkit.core.errors import RecipeError
from alignkit.run.pipeline import run_recipe
from alignkit.ppo.rewards import kl_penalty, last_token_rewards, locate_steps, place_rewards, step_positions
from alignkit.ppo.rollout import pack, step_prompt_indices
from alignkit.ppo.update import advantages_and_returns, mini_batches
from alignkit.run.recipe import load_recipe
from helpers import run_two_processes


# Rewards the tiny model can learn: the number of digit characters in the response.
REWARDS_PY = '''
from alignkit.rewards.values import completion_text

def digit_count(completions, **kwargs):
    return [float(sum(ch.isdigit() for ch in completion_text(c))) for c in completions]

def digits_or_none(completions, **kwargs):
    return [None if i % 4 == 0 else float(sum(ch.isdigit() for ch in completion_text(c)))
            for i, c in enumerate(completions)]
'''


@pytest.fixture(autouse=True)
def one_thread():
    """One BLAS thread: the CI machine has 2 shared cores, and several threads per test only contend."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_recipe(tmp_path: Path, model: Path, stage: str) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "rewards.py").write_text(REWARDS_PY)
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(f"""
        name: rl
        tracking: {{report_to: none}}
        defaults:
          model: {model}
          lora: {{r: 8, alpha: 16, dropout: 0.0}}
          data: {{source: arith, params: {{n: 64, steps: 1, max_operand: 9}}}}
          max_completion_length: 8
          max_length: 128
          lr: 1.0e-2
          logging_steps: 100
        stages:
    """) + textwrap.indent(textwrap.dedent(stage), "  "))
    return path


def run_stage(tmp_path: Path, model: Path, stage: str, overrides: list[str] | None = None):
    recipe = load_recipe(write_recipe(tmp_path, model, stage), overrides or [], output_dir=str(tmp_path / "runs"))
    outcomes = run_recipe(recipe, echo=lambda *_: None)
    run_dir = recipe.stages[0].run_dir
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    return Manifest.read(run_dir), history, outcomes


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


HACK_FRACTIONS = ("hack/no_answer_frac", "hack/rewarded_not_plain_frac", "hack/repeated_ngram_frac")


# ------------------------------------------------------------------------------------------- training runs

LEARN = """
    - kind: ppo
      rewards: [{program: rewards.py:digit_count}]
      batch_size: 8
      grad_accum: 2
      max_steps: 18
      save_steps: 18
"""


def test_ppo_raises_reward_and_writes_loadable_models(tmp_path, steerable_model_dir):
    """Reliability checked with seeds 0, 1, 2: (first-3 mean, last-4 mean) = (0.71, 2.61), (0.65, 4.72),
    (0.56, 5.19) digits per response; a clean CI-like run of seed 0 (other thread timing) gave (0.71, 1.91),
    so the bar is a gain of 0.6 digits (about twice the noise of these means) and 1.5x the start."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    manifest, history, _ = run_stage(tmp_path, steerable_model_dir, LEARN)
    assert manifest.status == "done" and len(history) == 18
    scores = [row["reward/score"] for row in history]
    assert mean(scores[-4:]) > max(mean(scores[:3]) + 0.6, 1.5 * mean(scores[:3])), scores
    first, last = history[0], history[-1]
    assert first["samples"] == 16 and first["ppo/updates"] == 4  # 16 samples, 4 epochs x 1 mini-batch
    assert first["policy/ratio_mean"] == pytest.approx(1.0, abs=0.05)  # first update starts at ratio 1
    assert first["kl/sequence"] == pytest.approx(0.0, abs=1e-5)  # policy == reference before any update
    assert last["kl/sequence"] > 0.5  # the policy moved away from the reference to earn the reward
    for key in ("policy/entropy", "policy/clipfrac", "value/clipfrac", "value/explained_variance",
                "throughput/tokens_per_s", "memory/peak_gib", "response/length"):
        assert key in last
    for row in history:  # reward-hacking signals every step; every sample is scored, so length = response/length
        assert row["hack/completion_tokens"] == pytest.approx(row["response/length"])
        assert all(0.0 <= row[key] <= 1.0 for key in HACK_FRACTIONS), row
    # digit_count pays digits anywhere: what it pays states no answer (a hacked reward, as the docs describe)
    assert last["hack/rewarded_not_plain_frac"] > 0.5
    metrics = manifest.metrics
    last_quarter = [row["hack/rewarded_not_plain_frac"] for row in history[-4:]]  # 18 // 4 = 4 steps
    assert metrics["hack_rewarded_not_plain_frac_last"] == pytest.approx(mean(last_quarter))
    assert metrics["reward_last"] > metrics["reward_first"]
    assert metrics["train_steps"] == 18 and metrics["tokens_per_second"] > 0
    # the merged policy carries the learnt behaviour: its log-probs equal the adapter's
    merged = AutoModelForCausalLM.from_pretrained(manifest.artifacts["model"])
    assert not hasattr(merged, "peft_config")
    value = AutoModelForSequenceClassification.from_pretrained(manifest.artifacts["value_model"])
    assert value.config.num_labels == 1 and value.score.weight.abs().sum() > 0  # the zero head learnt
    assert (Path(manifest.artifacts["adapter"]) / "adapter_config.json").is_file()


def test_fixed_kl_coefficient_bounds_kl(tmp_path, steerable_model_dir):
    """With beta = 2 the reward cannot pay for leaving the reference. The first update, taken while the
    policy still equals the reference (no penalty yet), overshoots; the penalty then pulls the policy back and
    holds it there. (With beta = 0.05, the test above, KL climbs to 5-14 nats by step 18.)"""
    _, history, _ = run_stage(tmp_path, steerable_model_dir, LEARN, ["stages.ppo.beta=2.0",
                                                                     "stages.ppo.max_steps=12"])
    kls = [row["kl/sequence"] for row in history]
    assert max(kls[2:]) < 1.0 and mean(kls[-4:]) < 0.5, kls
    assert all(row["kl/coef"] == 2.0 for row in history)


def test_resume_continues_with_identical_state(tmp_path, tiny_model_dir, monkeypatch):
    """Interrupted after the step-2 checkpoint, the rerun resumes at step 3 and ends exactly where an
    uninterrupted run ends (adapters, value model, adaptive KL coefficient, metrics)."""
    from safetensors.torch import load_file

    from alignkit.ppo import checkpoint

    stage = """
        - kind: ppo
          rewards: [{program: rewards.py:digit_count}]
          adaptive_kl: {target: 0.5, horizon: 100}
          batch_size: 4
          max_steps: 4
          save_steps: 2
    """
    _, straight, _ = run_stage(tmp_path / "a", tiny_model_dir, stage)
    straight_dir = tmp_path / "a" / "runs" / "rl" / "ppo"

    original = checkpoint.save_checkpoint

    def crash_after_step_2(*args, **kwargs):
        out = original(*args, **kwargs)
        if args[1] == 2:
            raise KeyboardInterrupt  # as if Ctrl-C right after checkpoint step 2 was written
        return out

    monkeypatch.setattr(checkpoint, "save_checkpoint", crash_after_step_2)
    with pytest.raises(KeyboardInterrupt):
        run_stage(tmp_path / "b", tiny_model_dir, stage)
    run_dir = tmp_path / "b" / "runs" / "rl" / "ppo"
    assert Manifest.read(run_dir).status == "interrupted"
    monkeypatch.setattr(checkpoint, "save_checkpoint", original)
    manifest, resumed, outcomes = run_stage(tmp_path / "b", tiny_model_dir, stage)
    assert outcomes[0].action == "resumed" and manifest.metrics["resumed_from_step"] == 2
    assert [row["step"] for row in resumed] == [1, 2, 3, 4]
    assert len({row["kl/coef"] for row in straight}) > 2  # the adaptive coefficient moved every step
    for a, b in zip(straight, resumed):
        for key in ("reward/score", "kl/sequence", "kl/coef", "policy/loss", "value/loss", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), (a["step"], key)
    for folder in ("adapter", "value_adapter"):
        expected = load_file(straight_dir / folder / "adapter_model.safetensors")
        got = load_file(run_dir / folder / "adapter_model.safetensors")
        assert expected.keys() == got.keys()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6)


def test_nan_loss_fails_the_stage_at_its_step(tmp_path, tiny_model_dir, monkeypatch):
    """A nan policy loss in step 2 stops the run there: manifest failed with the step, no checkpoint of that step,
    no model written."""
    from alignkit.core.errors import TrainingDiverged
    from alignkit.ppo import loop, update

    calls, ppo_update, policy_loss = [], loop.ppo_update, update.ppo_policy_loss

    def counted(*args, **kwargs):
        calls.append(1)
        return ppo_update(*args, **kwargs)

    def poisoned(*args, **kwargs):
        loss, stats = policy_loss(*args, **kwargs)
        return (loss * float("nan") if len(calls) == 2 else loss), stats

    monkeypatch.setattr(loop, "ppo_update", counted)
    monkeypatch.setattr(update, "ppo_policy_loss", poisoned)
    stage = """
        - kind: ppo
          rewards: [{program: rewards.py:digit_count}]
          batch_size: 4
          max_steps: 3
          save_steps: 1
    """
    with pytest.raises(TrainingDiverged, match="^ppo: training diverged at step 2: policy/loss is nan"):
        run_stage(tmp_path, tiny_model_dir, stage)
    run_dir = tmp_path / "runs" / "rl" / "ppo"
    manifest = Manifest.read(run_dir)
    assert manifest.status == "failed" and manifest.metrics == {"failed_step": 2}
    assert [p.name for p in (run_dir / "checkpoints").glob("step-*")] == ["step-000001"]
    assert not (run_dir / "model").exists() and not (run_dir / "adapter").exists()


def test_orm_prm_and_value_model_from_a_reward_model(tmp_path, tiny_model_dir, tiny_seqcls_dir, tiny_tokencls_dir,
                                                    capsys):
    """Every reward source through the pipeline. Stage 1: a program that cannot score some samples (None: they
    leave the step) plus a PRM, with the value model started from a reward model. Stage 2: an outcome reward
    model (`model:<folder>`) as the only reward."""
    manifest, history, _ = run_stage(tmp_path, tiny_model_dir, f"""
        - kind: ppo
          rewards: [{{program: rewards.py:digits_or_none}}]
          prm: {{model: {tiny_tokencls_dir}, weight: 0.25}}
          value_model: {tiny_seqcls_dir}
          stop: ["\\n\\n"]
          missing_eos_penalty: 1.0
          gradient_checkpointing: true
          batch_size: 8
          max_steps: 2
          save_steps: 2
        - kind: ppo
          name: orm
          rewards: [{{program: "model:{tiny_seqcls_dir}", weight: 0.5}}]
          batch_size: 4
          max_steps: 1
          save_steps: 1
    """)
    assert manifest.status == "done"
    for row in history:
        assert row["samples"] == 6  # 8 sampled; samples 0 and 4 unscorable (None) and left out
        assert row["reward/unscored_frac"] == pytest.approx(0.25)
        assert 0 < row["hack/completion_tokens"] <= 8 and all(0.0 <= row[key] <= 1.0 for key in HACK_FRACTIONS)
        assert row["reward/steps_per_response"] > 0.5
        assert 0.0 < row["reward/step_score"] <= 0.25 * row["reward/steps_per_response"] + 1e-6
    assert history[0]["value/mean"] != 0.0  # the reward model's head, not a zero head
    printed = capsys.readouterr().out
    assert f"ppo step 2/2: score {history[1]['reward/score']:.3f} step reward " in printed
    (orm_line,) = [line for line in printed.splitlines() if "orm step 1/1:" in line]
    assert "step reward" not in orm_line  # no PRM in that stage
    orm_dir = tmp_path / "runs" / "rl" / "orm"
    assert Manifest.read(orm_dir).status == "done"
    (orm_row,) = [json.loads(line) for line in (orm_dir / "history.jsonl").read_text().splitlines()]
    assert orm_row["samples"] == 4 and orm_row["reward/score"] != 0.0 and orm_row["reward/step_score"] == 0.0
    assert set(HACK_FRACTIONS) <= set(orm_row)  # a reward model's score > 0 counts as rewarded, like a verifier's


def test_two_process_run(tmp_path, tiny_model_dir):
    """2 CPU processes (gloo): each samples its own prompts, gradients are summed, one process writes."""
    recipe_path = write_recipe(tmp_path, tiny_model_dir, """
        - kind: ppo
          rewards: [{program: rewards.py:digit_count}]
          batch_size: 4
          max_steps: 2
          save_steps: 1
    """)
    proc = run_two_processes(recipe_path, tmp_path / "runs")
    run_dir = tmp_path / "runs" / "rl" / "ppo"
    manifest = Manifest.read(run_dir)
    assert manifest.status == "done" and manifest.metrics["train_steps"] == 2
    assert proc.stdout.count("finished; outputs in") == 1  # only the main process reports
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert [row["samples"] for row in history] == [8, 8]  # 4 per process, metrics averaged over both
    rng_files = sorted(p.name for p in (run_dir / "checkpoints" / "step-000002").glob("rng-*.pt"))
    assert rng_files == ["rng-0.pt", "rng-1.pt"]
    assert (run_dir / "model" / "config.json").is_file() and (run_dir / "value_model" / "config.json").is_file()


def _sync_worker(rank: int, init_file: str, out_dir: str) -> None:
    from alignkit.ppo.update import all_reduce_sum, sync_gradients

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    params = [torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)]
    params[0].grad = torch.full((3,), float(rank + 1))  # rank 0: 1s, rank 1: 2s
    if rank == 1:
        params[1].grad = torch.tensor([5.0, 7.0])  # rank 0 has no gradient for this one
    sync_gradients(params)
    total = all_reduce_sum(torch.tensor(float(rank + 1)))
    torch.save({"grads": [p.grad for p in params], "total": total}, f"{out_dir}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_gradients_are_summed_over_processes(tmp_path):
    torch.multiprocessing.spawn(_sync_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["grads"][0].tolist() == [3.0, 3.0, 3.0] and got["grads"][1].tolist() == [5.0, 7.0]
        assert got["total"].item() == 3.0


# ------------------------------------------------------------------------------- reference and log-probs


def _policy_after_one_update(model_dir: Path):
    """A LoRA policy whose adapter is no longer zero (one optimizer step on random advantages)."""
    from alignkit.core.config import LoraSpec
    from alignkit.modeling.models import apply_lora, load_model

    torch.manual_seed(0)
    policy = apply_lora(load_model(str(model_dir)), LoraSpec(r=4, alpha=8, dropout=0.0), "causal-lm")
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    return policy.eval()


def _batch(tokenizer):
    prompts = [tokenizer("What is 3 + 4?", add_special_tokens=False).input_ids, [5, 6]]
    responses = [tokenizer(" 7. The answer is 7.", add_special_tokens=False).input_ids, [9, 10, 11]]
    return pack(prompts, responses, tokenizer.pad_token_id, texts=["", ""], finish_reasons=["length"] * 2,
                prompt_rows=[0, 1])


def _naive_logps(model, rollout, temperature: float = 1.0):
    ids, mask = rollout.inputs()
    width = rollout.query_ids.shape[1]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, width - 1: -1]
    logps = torch.log_softmax(logits.float() / temperature, -1).gather(-1, rollout.response_ids[..., None])[..., 0]
    return torch.where(rollout.response_mask, logps, torch.zeros_like(logps))


def test_reference_is_the_adapter_disabled_policy(tiny_model_dir):
    from alignkit.modeling.models import load_model, load_tokenizer
    from alignkit.ppo.logprobs import sequence_logps

    tokenizer = load_tokenizer(str(tiny_model_dir))
    rollout = _batch(tokenizer)
    policy = _policy_after_one_update(tiny_model_dir)
    ids, mask = rollout.inputs()
    with torch.no_grad():
        with policy.disable_adapter():
            ref, _ = sequence_logps(policy, ids, mask, rollout.response_mask)
        pol, _ = sequence_logps(policy, ids, mask, rollout.response_mask)
        base = _naive_logps(load_model(str(tiny_model_dir)).eval(), rollout)
    torch.testing.assert_close(ref, base, rtol=0, atol=1e-5)
    assert (pol - base).abs().max() > 1e-2  # the adapter is on outside the context


def test_training_models_have_no_dropout_and_keep_checkpointing(tiny_model_dir):
    """Dropout off by p = 0, not eval mode: transformers checkpoints activations only in training mode."""
    from alignkit.stages.ppo import Config, _load_for_training

    config = Config(model=str(tiny_model_dir), lora={"r": 4, "alpha": 8, "dropout": 0.1}, data="arith",
                    rewards=[{"program": "reward/math.py:answer_match"}], gradient_checkpointing=True)
    for task in ("causal-lm", "seq-cls"):
        model = _load_for_training(str(tiny_model_dir), task, config, torch.device("cpu"))
        dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
        assert dropouts and all(m.p == 0.0 for m in dropouts)  # LoRA's dropout 0.1 included
        assert model.training and model.get_base_model().is_gradient_checkpointing
    assert model.get_base_model().score.modules_to_save["default"].weight.abs().sum() == 0  # V = 0 at first


def test_chunked_logps_equal_naive_and_keep_no_vocab_tensors(tiny_model_dir):
    """Values and LoRA gradients equal the naive full-logits path; nothing of vocabulary size is saved."""
    from alignkit.modeling.models import load_tokenizer
    from alignkit.ppo.logprobs import sequence_logps

    tokenizer = load_tokenizer(str(tiny_model_dir))
    rollout = _batch(tokenizer)
    policy = _policy_after_one_update(tiny_model_dir)
    vocab = policy.get_base_model().config.vocab_size
    ids, mask = rollout.inputs()
    lora = [p for p in policy.parameters() if p.requires_grad]

    saved_shapes: list[torch.Size] = []

    def pack_hook(tensor):
        saved_shapes.append(tensor.shape)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
        chunked, _ = sequence_logps(policy, ids, mask, rollout.response_mask, temperature=0.7, chunk_tokens=3)
    assert not any(len(s) and s[-1] == vocab for s in saved_shapes), saved_shapes
    grads = torch.autograd.grad(chunked.sum(), lora)

    saved_shapes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
        naive = _naive_logps(policy, rollout, temperature=0.7)
    assert any(len(s) and s[-1] == vocab for s in saved_shapes)  # the naive path keeps (B, T, V) logits
    naive_grads = torch.autograd.grad(naive.sum(), lora)
    torch.testing.assert_close(chunked, naive, rtol=1e-5, atol=1e-5)
    for got, expected in zip(grads, naive_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # the experience pass: log-probs and entropies from one pass
        logps, entropy = sequence_logps(policy, ids, mask, rollout.response_mask, temperature=0.7, chunk_tokens=2,
                                        with_entropy=True)
        width = rollout.query_ids.shape[1]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = policy(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, width - 1: -1] / 0.7
        probs = torch.softmax(logits.float(), -1)
        naive_entropy = -(probs * torch.log_softmax(logits.float(), -1)).sum(-1) * rollout.response_mask
    torch.testing.assert_close(logps, naive.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy, naive_entropy, rtol=1e-5, atol=1e-5)


def test_micro_step_frees_the_policy_graph_before_the_value_forward(tiny_model_dir, monkeypatch):
    """Two backwards give the gradient of the summed loss, and no policy activation is alive (saved for
    backward) when the value model's forward starts: peak activation memory is one backbone's."""
    import weakref

    import alignkit.ppo.update as update
    from alignkit.maths import ppo_policy_loss, ppo_value_loss
    from alignkit.modeling.models import load_tokenizer
    from alignkit.ppo.logprobs import sequence_logps, sequence_values
    from alignkit.stages.ppo import Config, _load_for_training, hyper_from_config

    tokenizer = load_tokenizer(str(tiny_model_dir))
    rollout = _batch(tokenizer)
    config = Config(model=str(tiny_model_dir), lora={"r": 4, "alpha": 8, "dropout": 0.0}, data="arith",
                    rewards=[{"program": "reward/math.py:answer_match"}], vf_coef=0.3)
    policy = _policy_after_one_update(tiny_model_dir).train()
    value = _load_for_training(str(tiny_model_dir), "seq-cls", config, torch.device("cpu"))
    ids, mask = rollout.inputs()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        rollout.old_logps = sequence_logps(policy, ids, mask, rollout.response_mask)[0] + 0.05
        rollout.old_values = torch.randn(rollout.response_mask.shape, generator=generator)
    rollout.advantages = torch.randn(rollout.response_mask.shape, generator=generator)
    rollout.returns = torch.randn(rollout.response_mask.shape, generator=generator)
    params = [p for model in (policy, value) for p in model.parameters() if p.requires_grad]

    # the reference: one backward of the summed loss
    logps, _ = sequence_logps(policy, ids, mask, rollout.response_mask)
    values = sequence_values(value, ids, mask, rollout.response_mask)
    pg, _ = ppo_policy_loss(logps, rollout.old_logps, rollout.advantages, rollout.response_mask, config.epsilon)
    vf, _ = ppo_value_loss(values, rollout.old_values, rollout.returns, rollout.response_mask, config.value_epsilon)
    expected = torch.autograd.grad((pg + config.vf_coef * vf) * 0.5, params)

    alive: list[weakref.ref] = []  # every tensor saved for backward, weakly: dead once its graph is freed
    at_value_forward: list[int] = []
    original = update.sequence_values

    def counting_sequence_values(*args, **kwargs):
        at_value_forward.append(sum(ref() is not None for ref in alive))
        return original(*args, **kwargs)

    class Saved:  # a wrapper that can be weakly referenced (some saved tensors are views or parameters)
        def __init__(self, tensor):
            self.tensor = tensor

    def pack(tensor):
        box = Saved(tensor)
        alive.append(weakref.ref(box))
        return box

    monkeypatch.setattr(update, "sequence_values", counting_sequence_values)
    for p in params:
        p.grad = None
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.tensor):
        stats = update.micro_step(policy, value, rollout, hyper_from_config(config), scale=0.5)
    assert alive and at_value_forward == [0]
    for p, want in zip(params, expected):
        torch.testing.assert_close(p.grad, want, rtol=1e-5, atol=1e-7)
    assert stats["policy/loss"] == pytest.approx(pg.item()) and stats["value/loss"] == pytest.approx(vf.item())


def test_hyper_from_config_carries_every_field_the_phases_read():
    """Each PPOHyper field is the config value of the same name (or the derived one), and it is frozen."""
    import dataclasses

    from alignkit.stages.ppo import Config, hyper_from_config

    config = Config(model="m", lora={"r": 4, "alpha": 8}, data="arith",
                    rewards=[{"program": "reward/math.py:answer_match"}], batch_size=3, grad_accum=2,
                    num_mini_batches=2, num_generations=3, stop=["\n\n"], target_kl=0.1, missing_eos_penalty=1.0,
                    kl_estimator="k3", temperature=0.7, max_grad_norm=None)
    hyper = hyper_from_config(config)
    assert hyper.name == "ppo" and hyper.prompts_per_step == 4 and hyper.stop == ("\n\n",)
    for field in dataclasses.fields(hyper):
        if field.name not in ("name", "prompts_per_step", "stop"):
            assert getattr(hyper, field.name) == getattr(config, field.name), field.name
    with pytest.raises(dataclasses.FrozenInstanceError):
        hyper.batch_size = 1  # type: ignore[misc]


# --------------------------------------------------------------------------------- step reward placement


def test_locate_steps_matches_prm_split():
    from alignkit.rewards.prm import split_steps

    text = "Add 4: 3 + 4 = 7.\n\nThe answer is 7.\n"
    located = locate_steps(text, "\n")
    assert [step for step, _ in located] == split_steps(text, "\n")
    assert [end for _, end in located] == [18, 36]  # after each "\n" that follows a step
    assert locate_steps("a.\nb", "\n") == [("a.", 3), ("b", 4)]


def test_step_rewards_land_on_step_ends_with_merged_tokens():
    """A BPE that merges a step's end with the separator (".\\n" as one token): the score goes on that token."""
    pieces = ["Add", " 4", ":", " 7", ".\n", "Then", " 9", ".\n", "The", " answer", " is", " 9", ".", "<eos>"]

    def decode(ids: list[int]) -> str:
        return "".join(pieces[i] for i in ids)

    ids = list(range(len(pieces)))
    text = decode(ids[:-1])
    steps, positions = step_positions(ids, text, "\n", decode)
    assert steps == ["Add 4: 7.", "Then 9.", "The answer is 9."]
    assert positions == [4, 7, 13]  # the ".\n" tokens, then the last token (EOS) for the final step


def test_fake_prm_scores_land_on_the_right_tokens(tiny_model_dir):
    """Real tokenizer (multi-byte characters split over byte tokens) and a fake PRM, through loop.score."""
    from alignkit.modeling.models import load_tokenizer
    from alignkit.ppo.loop import RewardSources, score

    tokenizer = load_tokenizer(str(tiny_model_dir))
    texts = ["x é€ 5.\n\nok", "3 + 4 = 7.\nThe answer is 7."]
    responses = [tokenizer(t, add_special_tokens=False).input_ids + [tokenizer.eos_token_id] for t in texts]

    class FakePRM:
        separator = "\n"

        def __init__(self):
            self.calls = []

        def score_batch(self, prompts, steps):
            self.calls.append((prompts, steps))
            return [[0.1 * (i + 1) + j for j in range(len(s))] for i, s in enumerate(steps)]

    rollout = pack([[1, 2]] * 2, responses, tokenizer.pad_token_id, texts=texts, finish_reasons=["eos"] * 2,
                   prompt_rows=[0, 1])
    fake = FakePRM()
    rows = [{"prompt": "p0", "answer": "5"}, {"prompt": "p1", "answer": "7"}]
    scores, step_rewards, stats = score(rollout, RewardSources(None, fake, step_weight=2.0), rows, tokenizer, None)
    assert fake.calls == [(["p0", "p1"], [["x é€ 5.", "ok"], ["3 + 4 = 7.", "The answer is 7."]])]
    for b, text in enumerate(texts):
        ids = responses[b]
        first_end = text.index("\n") + 1
        where = (step_rewards[b] != 0).nonzero().flatten().tolist()
        # the first step's reward sits on the first token whose prefix covers "<step 1>\n"
        assert tokenizer.decode(ids[: where[0] + 1]).startswith(text[:first_end])
        assert not tokenizer.decode(ids[: where[0]]).startswith(text[:first_end])
        assert where[1] == len(ids) - 1  # the last step's reward sits on the EOS
        expected = [2.0 * (0.1 * (b + 1)), 2.0 * (0.1 * (b + 1) + 1)]
        torch.testing.assert_close(step_rewards[b, where], torch.tensor(expected))
    assert scores == [0.0, 0.0] and stats["reward/steps_per_response"] == 2.0


def test_score_adds_the_hacking_signals_by_hand():
    """loop.score adds the hack/* signals over every sample; "rewarded" reads the sequence score as paid (after
    missing_eos_penalty), and with no sequence reward (a PRM alone) there is no rewarded signal."""
    from alignkit.ppo.loop import RewardSources, score

    def pays_everything(completions, **kwargs):
        return [1.0] * len(completions)

    texts = ["The answer is 7.", "The answer is 3 + 4.", "7 7 7 7 7"]
    rollout = pack([[1, 2]] * 3, [[5] * 4, [5] * 6, [5] * 2], 0, texts=texts,
                   finish_reasons=["eos", "stop", "length"], prompt_rows=[0, 1, 2])
    rows = [{"prompt": f"p{i}", "answer": "7"} for i in range(3)]
    scores, _, stats = score(rollout, RewardSources(pays_everything), rows, None, missing_eos_penalty=1.0)
    assert scores == [1.0, 1.0, 0.0]  # the cut-off third one pays the penalty: not rewarded
    assert stats["hack/completion_tokens"] == 4.0  # (4 + 6 + 2) / 3
    assert stats["hack/no_answer_frac"] == pytest.approx(1 / 3)  # "7 7 7 7 7" states no answer
    assert stats["hack/rewarded_not_plain_frac"] == 0.5  # rewarded: 7 (plain), 3 + 4 (an expression)
    assert stats["hack/repeated_ngram_frac"] == pytest.approx((1 / 2) / 3)  # 2 four-grams of 7s, 1 repeats
    _, _, alone = score(rollout, RewardSources(), rows, None, missing_eos_penalty=None)
    assert "hack/rewarded_not_plain_frac" not in alone and alone["hack/no_answer_frac"] == pytest.approx(1 / 3)


def test_place_rewards_rejects_positions_outside_the_response():
    mask = torch.tensor([[True, True, False]])
    assert place_rewards([[1.0, 2.0]], [[0, 0]], mask).tolist() == [[3.0, 0.0, 0.0]]
    assert place_rewards([[1.0]], [[0, 1]], mask).tolist() == [[1.0, 0.0, 0.0]]  # PRM truncated a step
    with pytest.raises(ValueError, match="outside"):
        place_rewards([[1.0]], [[2]], mask)


# ------------------------------------------------------------------------------------- small pure pieces


def test_rewards_kl_and_advantages_by_hand():
    mask = torch.tensor([[True, True, True], [True, False, False]])
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -0.25], [-2.0, 0.0, 0.0]])
    non_score, kl = kl_penalty(logps, ref, mask, beta=0.1, kind="k1")
    torch.testing.assert_close(kl, torch.tensor([[0.5, 0.0, -0.25], [1.0, 0.0, 0.0]]))
    torch.testing.assert_close(non_score, -0.1 * kl)
    scores = last_token_rewards(torch.tensor([2.0, -1.0]), mask)
    assert scores.tolist() == [[0.0, 0.0, 2.0], [-1.0, 0.0, 0.0]]
    rewards = non_score + scores
    values = torch.tensor([[0.5, 1.0, 1.5], [0.25, 9.0, 9.0]])
    adv, ret = advantages_and_returns(rewards, values, mask, gamma=1.0, lam=1.0, whiten=False)
    # lam = gamma = 1: A_t = (sum of rewards from t on) - V_t; returns = rewards-to-go
    to_go = torch.tensor([[2.0 - 0.05 + 0.025, 2.0 + 0.025, 2.0 + 0.025], [-1.1, 0.0, 0.0]])
    torch.testing.assert_close(ret, to_go)
    torch.testing.assert_close(adv, torch.where(mask, to_go - values, torch.zeros_like(values)))


def test_prompt_order_is_a_pure_function_of_the_step():
    draws = [step_prompt_indices(step, 10, 4, seed=3) for step in range(5)]  # 20 draws = 2 epochs
    flat = [i for d in draws for i in d]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert draws[2] == step_prompt_indices(2, 10, 4, seed=3)  # a resumed run draws the same
    assert flat[:10] != flat[10:]  # each epoch reshuffles


def test_pack_layout_and_select_trims_padding():
    rollout = pack([[1, 2, 3], [4]], [[7], [8, 9, 10]], pad_id=0, texts=["a", "b"],
                   finish_reasons=["eos", "length"], prompt_rows=[0, 1])
    ids, mask = rollout.inputs()
    assert ids.tolist() == [[1, 2, 3, 7, 0, 0], [0, 0, 4, 8, 9, 10]]
    assert mask.tolist() == [[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]]
    one = rollout.select([1])
    assert one.inputs()[0].tolist() == [[4, 8, 9, 10]] and one.texts == ["b"]
    assert [len(b) for b in mini_batches(5, 4, torch.Generator().manual_seed(0))] == [2, 2, 1, 0]


@pytest.mark.parametrize("change, field", [
    ("lora: null", "lora"),
    ("trl: {kl_coef: 0.1}", "trl"),
    ("rewards: []", "rewards"),
    ("num_generations: 3", "num_generations"),
    ("rewards: [{program: rewards.py:no_such}]", "rewards.0.program"),
])
def test_recipe_mistakes_name_the_field(tmp_path, tiny_model_dir, change, field):
    rewards = "" if change.startswith("rewards:") else "rewards: [{program: rewards.py:digit_count}]"
    stage = f"""
        - kind: ppo
          {rewards}
          {change}
    """  # a key written twice is itself an error now: the change replaces the rewards line
    with pytest.raises(RecipeError) as error:
        load_recipe(write_recipe(tmp_path, tiny_model_dir, stage), output_dir=str(tmp_path / "runs"))
    assert error.value.field == f"stages.ppo.{field}"
