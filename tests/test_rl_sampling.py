"""Who samples inside grpo/rloo (``generation:``): our fast engine inside TRL's trainers gives TRL's own batch
(prompt ids, completions, masks, rewards, advantages) under greedy decoding; it trains through the pipeline; the
``vllm`` block maps onto TRL's arguments; every mix-up is a RecipeError naming the field."""

from __future__ import annotations

import doctest

import pytest
import yaml

from alignkit.core.errors import RecipeError
from alignkit.generation import rollout
from alignkit.generation.engine import Completion, SamplingParams
from alignkit.generation.rollout import repeat_runs, sample_rows, unsupported_sampling, with_engine
from alignkit.generation.spec import FastSpec, VLLMSpec
from alignkit.run.recipe import load_recipe

from test_stage_grpo import REWARDS_PY  # the rewards the grpo stage tests use


def test_doctests():
    assert doctest.testmod(rollout).failed == 0


def test_repeat_runs_split_only_identical_neighbours():
    assert repeat_runs([]) == []
    assert repeat_runs([[5]]) == [(0, 1)]
    # the same prompt twice but not side by side: two runs (TRL's sampler never does this within a group)
    assert repeat_runs([[1], [2], [1]]) == [(0, 1), (1, 1), (2, 1)]
    assert repeat_runs([[1, 2]] * 4 + [[3]] * 4) == [(0, 4), (4, 4)]


class RecordingEngine:
    """Answers prompt p's sample k with [p..., 100 + k]; records each call's prompts and n."""

    def __init__(self):
        self.calls: list[tuple[list[list[int]], int]] = []

    def generate(self, prompts, params, *, progress=True):
        self.calls.append((prompts, params.n))
        return [[Completion("", [*p, 100 + k], "eos") for k in range(params.n)] for p in prompts]


def test_sample_rows_asks_one_prompt_per_group_and_fills_every_row():
    engine = RecordingEngine()
    rows = [[1]] * 3 + [[2]] * 3 + [[7]]  # two groups of 3, then a lone row (a tool-loop continuation)
    out = sample_rows(engine, rows, SamplingParams(n=1, max_new_tokens=4))
    assert out == [[1, 100], [1, 101], [1, 102], [2, 100], [2, 101], [2, 102], [7, 100]]
    assert sorted(engine.calls, key=lambda call: call[1]) == [([[7]], 1), ([[1], [2]], 3)]


def test_unsupported_sampling_names_what_the_engines_lack():
    from types import SimpleNamespace as NS

    assert unsupported_sampling(NS(min_p=None, repetition_penalty=1.0, generation_kwargs=None)) is None
    assert unsupported_sampling(NS(min_p=0.1)) == "min_p=0.1"
    assert unsupported_sampling(NS(repetition_penalty=1.2)) == "repetition_penalty=1.2"
    assert "generation_kwargs" in unsupported_sampling(NS(generation_kwargs={"typical_p": 0.9}))


# ------------------------------------------------------------------- the same batch as TRL's own sampling


@pytest.fixture(scope="module")
def varied_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny causal LM with its own random output layer (untied, std 1) and embeddings x3: greedy decoding then
    depends on the prompt (the tied tiny model repeats one token whatever it is given) and the top two logits of
    each greedy step are >= 0.07 apart, far beyond float rounding between two ways of batching."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("varied")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(torch.randn(model.lm_head.weight.shape,
                                                          generator=torch.Generator().manual_seed(1)))
    model.model.embed_tokens.weight.data *= 3
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


def _trainer(kind: str, model_dir, tmp_path, spec=None, *, extra_eos: int | None = None):
    """A GRPO or RLOO trainer on ``model_dir``, greedy through TRL's sampler (top_k 1), and the
    inputs of one batch; ``trainer.scored`` collects what the reward function was given. ``extra_eos``: one more
    end-of-sequence id (TRL takes every eos the model's generation config declares)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    config_class, trainer_class = {"grpo": (GRPOConfig, GRPOTrainer), "rloo": (RLOOConfig, RLOOTrainer)}[kind]
    if spec is not None:
        trainer_class = with_engine(trainer_class, spec)
    args = config_class(output_dir=str(tmp_path / f"{kind}-{spec is not None}"), per_device_train_batch_size=8,
                        num_generations=4, max_completion_length=12, top_k=1, temperature=1.0, report_to=[],
                        use_cpu=True, seed=0, logging_steps=1, beta=0.0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if extra_eos is not None:
        model.generation_config.eos_token_id = [tokenizer.eos_token_id, extra_eos]
    rows = [{"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}]} for a, b in [(2, 3), (17, 4)]]
    scored: list[tuple[list[str], list[float]]] = []

    def digits(completions, **kwargs):
        from alignkit.rewards.values import completion_text

        texts = [completion_text(c) for c in completions]
        scores = [float(len(t) + 10 * sum(ch.isdigit() for ch in t)) for t in texts]
        scored.append((texts, scores))
        return scores

    trainer = trainer_class(model=model, reward_funcs=[digits], args=args, train_dataset=Dataset.from_list(rows),
                            processing_class=tokenizer)
    trainer.scored = scored
    trainer.model.train()  # TRL makes batches in train mode; from_pretrained returns eval mode
    inputs = [row for row in rows for _ in range(4)]  # TRL's sampler: each prompt's group side by side
    return trainer, inputs


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_fast_engine_gives_trls_batch_under_greedy_decoding(kind, varied_model_dir, tmp_path):
    """Greedy (top_k 1) makes sampling deterministic, so the two samplers must agree token for token. An extra
    eos id, the first token of TRL's first group that the second group never generates, ends the first group
    early: the masks then cover completions of different lengths, and the rewards of the two groups differ."""
    import torch

    probe, inputs = _trainer(kind, varied_model_dir, tmp_path / "probe")
    first = probe._generate_and_score_completions(inputs)["completion_ids"].tolist()
    cut = next(p for p in range(1, 11) if first[0][p] not in first[4])
    stop = first[0][cut]
    batches, scored = {}, {}
    for name, spec in (("trl", None), ("fast", FastSpec(batch_size=16))):
        trainer, inputs = _trainer(kind, varied_model_dir, tmp_path / name, spec, extra_eos=stop)
        torch.manual_seed(0)
        batches[name] = trainer._generate_and_score_completions(inputs)
        scored[name] = trainer.scored
    trl, fast = batches["trl"], batches["fast"]
    assert trl["completion_ids"].shape == fast["completion_ids"].shape
    for key in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask"):
        assert torch.equal(trl[key], fast[key]), key
    assert torch.allclose(trl["advantages"], fast["advantages"])
    assert scored["trl"] == scored["fast"]  # the reward function saw the same texts and gave the same scores
    lengths = fast["completion_mask"].sum(1).tolist()
    assert lengths == [cut + 1] * 4 + [12] * 4, lengths  # group 1 ends at the extra eos (kept), group 2 at 12
    assert int(fast["completion_ids"][0, cut]) == stop
    rewards = scored["fast"][0][1]
    assert rewards[0] != rewards[4]
    assert trl.get("sampling_per_token_logps") is None and fast.get("sampling_per_token_logps") is None


def test_fast_engine_samples_once_per_group(varied_model_dir, tmp_path):
    """One prefill per distinct prompt: the engine is asked for 2 prompts x n=4, not 8 prompts x 1."""
    trainer, inputs = _trainer("grpo", varied_model_dir, tmp_path, FastSpec(batch_size=16))
    seen = []
    original = rollout.sample_rows

    def spy(engine, prompt_ids, params):
        real = engine.generate

        def generate(prompts, params, **kw):
            seen.append((len(prompts), params.n, params.top_k, params.max_new_tokens))
            return real(prompts, params, **kw)

        engine.generate = generate
        try:
            return original(engine, prompt_ids, params)
        finally:
            del engine.generate

    rollout.sample_rows = spy
    try:
        trainer._generate_and_score_completions(inputs)
    finally:
        rollout.sample_rows = original
    assert seen == [(2, 4, 1, 12)]


@pytest.mark.parametrize("backend", ["trl", "fast"])
def test_sampling_runs_in_the_trainers_mode_like_trl(backend, varied_model_dir, tmp_path):
    """TRL samples with the model in train mode (LoRA dropout on); the engine inside its trainer does the same,
    and leaves the model in train mode afterwards."""
    trainer, inputs = _trainer("grpo", varied_model_dir, tmp_path, None if backend == "trl" else FastSpec())
    modes = []
    hook = trainer.model.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    trainer._generate_and_score_completions(inputs)
    hook.remove()
    assert modes and all(modes), modes  # every forward, sampling and TRL's own, saw train mode
    assert trainer.model.training


def test_engine_sampling_refuses_images(varied_model_dir, tmp_path):
    from alignkit.core.errors import GenerationError

    trainer, _ = _trainer("grpo", varied_model_dir, tmp_path, FastSpec())
    with pytest.raises(GenerationError, match="images need generation.backend trl"):
        trainer._engine_completions([[1, 2]], images=[["an image"]])


# ------------------------------------------------------------------------- through the pipeline


def test_grpo_with_fast_sampling_raises_reward_through_the_pipeline(tmp_path, tiny_model_dir):
    """The grpo test of test_stage_grpo, sampled by the fast engine: same data, rewards and steps."""
    from test_stage_grpo import mean, run_stage

    manifest, logged = run_stage(tmp_path, tiny_model_dir, """
        - kind: grpo
          generation: {backend: fast, batch_size: 16}
          lr: 3.0e-2
          max_steps: 12
          save_steps: 12
    """)
    assert manifest.status == "done"
    rewards = [entry["reward"] for entry in logged]
    assert len(rewards) == 6
    assert mean(rewards[-2:]) > mean(rewards[:2]) + 0.15, rewards
    assert manifest.metrics["completions_sampled"] == 12 * 8
    assert all(0 < entry["completions/mean_length"] <= 8 for entry in logged)


# ------------------------------------------------------------------------------ config and vLLM


def _load(tmp_path, model_dir, **changes):
    (tmp_path / "rewards.py").write_text(REWARDS_PY)
    stage = {"kind": "grpo", "model": str(model_dir), "data": "arith", "rewards": [{"program": "rewards.py:constant"}],
             "num_generations": 4, "batch_size": 8, **changes}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"name": "rl", "tracking": {"report_to": "none"}, "stages": [stage]}))
    return load_recipe(path, output_dir=str(tmp_path / "runs"))


@pytest.mark.parametrize("changes,field,words", [
    ({"generation": {"backend": "openai", "base_url": "http://x/v1", "model_name": "m"}},
     "stages.grpo.generation.serve_adapter", "cannot follow the policy's updates"),
    ({"generation": {"backend": "sglang"}}, "stages.grpo.generation", "must be one of ['trl', 'fast', 'hf', 'vllm', "
     "'openai']"),
    ({"trl": {"use_vllm": True}}, "stages.grpo.trl.use_vllm", "generation: {backend: vllm"),
    ({"trl": {"vllm_importance_sampling_mode": "token_mask"}}, "stages.grpo.trl.vllm_importance_sampling_mode",
     "vLLM sampling only"),
    ({"generation": {"backend": "fast"}, "trl": {"min_p": 0.05}}, "stages.grpo.generation.backend", "min_p=0.05"),
    ({"generation": {"backend": "fast"}, "trl": {"repetition_penalty": 1.1}}, "stages.grpo.generation.backend",
     "repetition_penalty"),
    ({"generation": {"backend": "vllm", "mode": "remote"}}, "stages.grpo.generation.mode", "'server'"),
    ({"generation": {"backend": "vllm", "max_prefill_tokens": 8}}, "stages.grpo.generation.max_prefill_tokens",
     "option of backend fast"),
    ({"generation": {"backend": "trl", "batch_size": 8}}, "stages.grpo.generation.batch_size", "unknown field"),
])
def test_generation_mistakes_name_the_field(tmp_path, tiny_model_dir, changes, field, words):
    with pytest.raises(RecipeError) as info:
        _load(tmp_path, tiny_model_dir, **changes)
    assert info.value.field == field, str(info.value)
    assert words in str(info.value), str(info.value)


def test_default_is_trls_own_sampling_and_leaves_the_hash_alone(tmp_path, tiny_model_dir):
    plain = _load(tmp_path, tiny_model_dir).stages[0]
    explicit = _load(tmp_path, tiny_model_dir, generation={"backend": "trl"}).stages[0]
    fast = _load(tmp_path, tiny_model_dir, generation={"backend": "fast"}).stages[0]
    assert plain.config.generation.backend == "trl"
    assert plain.hash == explicit.hash != fast.hash  # runs finished before this field existed stay done


def test_vllm_block_becomes_trls_arguments(tmp_path, tiny_model_dir):
    from alignkit.stages.rl_common import rl_trl_args

    server = _load(tmp_path, tiny_model_dir, generation={"backend": "vllm", "server_base_url": "http://gpu2:8000",
                                                         "importance_sampling_correction": False},
                   trl={"vllm_importance_sampling_mode": "token_mask"}).stages[0].config
    args = rl_trl_args(server)
    assert args["use_vllm"] is True and args["vllm_mode"] == "server"
    assert args["vllm_server_base_url"] == "http://gpu2:8000" and args["vllm_importance_sampling_correction"] is False
    colocate = VLLMSpec(mode="colocate", gpu_memory_utilization=0.5, max_model_length=2048).trl_args()
    assert colocate == {"use_vllm": True, "vllm_mode": "colocate", "vllm_importance_sampling_correction": True,
                        "vllm_gpu_memory_utilization": 0.5, "vllm_tensor_parallel_size": 1,
                        "vllm_enable_sleep_mode": False, "vllm_max_model_length": 2048}
    from trl import GRPOConfig

    GRPOConfig(output_dir=str(tmp_path / "o"), **{k: v for k, v in args.items()}, use_cpu=True, report_to=[])
    assert VLLMSpec().serve_command("runs/x/sft/model") == \
        "trl vllm-serve --model runs/x/sft/model --host 127.0.0.1 --port 8000"


def test_vllm_missing_is_a_recipe_error_before_loading(tmp_path, tiny_model_dir, monkeypatch):
    """Without vllm installed the stage stops at its first line (RecipeError: one line, exit 2 from the CLI),
    before data, model or accuracy checks, and leaves no model behind."""
    import importlib.util

    from alignkit.run.pipeline import run_recipe

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    loaded = []
    monkeypatch.setattr("alignkit.modeling.models.load_model", lambda *a, **k: loaded.append(a))
    recipe = _load(tmp_path, tiny_model_dir, generation={"backend": "vllm"})
    with pytest.raises(RecipeError) as info:
        run_recipe(recipe, echo=lambda *_: None)
    assert info.value.field == "generation.backend" and "pip install vllm" in str(info.value)
    assert "backend fast" in str(info.value)
    assert loaded == [] and not (recipe.stages[0].run_dir / "model").exists()


def test_dry_run_prints_the_vllm_serve_command(tmp_path, tiny_model_dir, capsys):
    from alignkit.cli import main

    _load(tmp_path, tiny_model_dir, generation={"backend": "vllm", "server_port": 8123})
    assert main(["run", str(tmp_path / "recipe.yaml"), "--dry-run", "--output-dir", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert f"trl vllm-serve --model {tiny_model_dir} --host 127.0.0.1 --port 8123" in out

