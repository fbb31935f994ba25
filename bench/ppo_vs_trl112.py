"""Our ``ppo`` stage against TRL 1.12.0's ``trl.experimental.ppo.PPOTrainer``, side by side, same settings.

Both sides train a LoRA policy (reference = adapters disabled) on the same random model, prompts and random
reward model, for the same number of PPO steps; each runs in its own fresh process so peak memory is its own.
Reported: median seconds per step (first step, warm-up, left out), peak memory, our/TRL ratios, and both
reward curves (mean reward-model score per step). This script reports; it asserts nothing.

    .venv/bin/python bench/ppo_vs_trl112.py                          # tiny model, CPU-sized (minutes)
    .venv/bin/python bench/ppo_vs_trl112.py --preset wide-vocab      # 152k vocabulary, tiny body (CPU)
    .venv/bin/python bench/ppo_vs_trl112.py --preset 135m            # SmolLM2-135M's dimensions (CPU, ~1 h)
    .venv/bin/python bench/ppo_vs_trl112.py --preset qwen3-0.6b      # GPU: TARGETS.md's anchor settings

TRL 1.12.0 goes into its own virtualenv (``--venv``, default /tmp/trl112-venv; created on first use with
``pip install torch==<our torch version> trl==1.12.0 peft``), since alignkit pins TRL 1.16, which has no PPO.

Presets: ``tiny`` (the test suite's tiny Llama, vocab 384), ``wide-vocab`` (Qwen3 vocabulary of 151,936 on a
2-layer 128-wide body: the logits dominate memory as in the anchor, CPU-sized), ``135m`` (SmolLM2-135M's
dimensions: 30 layers, 576 wide, vocab 49,152, on a Qwen3 body; batch 8, prompt 64, response 64: a real model's
size on a CPU) and ``qwen3-0.6b`` (TARGETS.md: 1024 hidden, 28 layers, batch 32, prompt 128, response 128,
4 PPO epochs, one mini-batch, bf16). The three word-vocabulary presets use a word-level tokenizer ``w<id>``
over the full vocabulary (no Hub download).

Memory: on CUDA, ``torch.cuda.max_memory_allocated`` over the whole run; on CPU, the process's peak RSS and its
growth from the start of training (RSS includes the Python/torch baseline, which dilutes the ratio).

Differences that remain between the sides (by design of each trainer): TRL trains a *full* value model, ours a
LoRA one; TRL's reward model reads the sampled token ids, ours re-encodes the decoded text (the same tokens here).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

PRESETS = {
    "tiny": {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "head_dim": 16, "inter": 128, "vocab": None,
             "batch": 8, "prompt": 24, "response": 16, "steps": 6, "lora_r": 8, "lr": 1e-3},
    "wide-vocab": {"hidden": 128, "layers": 2, "heads": 4, "kv_heads": 2, "head_dim": 32, "inter": 256,
                   "vocab": 151936, "batch": 8, "prompt": 64, "response": 32, "steps": 5, "lora_r": 16, "lr": 1e-4},
    "135m": {"hidden": 576, "layers": 30, "heads": 9, "kv_heads": 3, "head_dim": 64, "inter": 1536, "vocab": 49152,
             "batch": 8, "prompt": 64, "response": 64, "steps": 4, "lora_r": 16, "lr": 1e-4},
    "qwen3-0.6b": {"hidden": 1024, "layers": 28, "heads": 16, "kv_heads": 8, "head_dim": 128, "inter": 3072,
                   "vocab": 151936, "batch": 32, "prompt": 128, "response": 128, "steps": 6, "lora_r": 16,
                   "lr": 1e-4},
}
SHARED = {"ppo_epochs": 4, "num_mini_batches": 1, "beta": 0.05, "epsilon": 0.2, "value_epsilon": 0.2,
          "vf_coef": 0.1, "gamma": 1.0, "lam": 0.95, "temperature": 1.0}


# ------------------------------------------------------------------------------------- setup (our venv)


def ensure_venv(venv: Path) -> Path:
    """The TRL 1.12.0 virtualenv's python, creating the venv on first use."""
    import torch

    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import trl, sys; sys.exit(trl.__version__ != '1.12.0')"]
    if python.exists() and subprocess.run(probe, capture_output=True, check=False).returncode == 0:
        return python
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run(pip + [f"torch=={torch.__version__.split('+')[0]}"], check=True)
    subprocess.run(pip + ["trl==1.12.0", "peft", "datasets"], check=True)
    return python


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer over ``vocab_size`` ids: ``<pad>``, ``<eos>``, ``<unk>``, then ``w3``, ``w4``..."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2} | {f"w{i}": i for i in range(3, vocab_size)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def build_models(preset: dict, workdir: Path) -> tuple[Path, Path]:
    """Random policy and reward model folders (the reward model also starts both value models)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, Qwen3Config

    from alignkit.testing import make_tiny_model

    policy_dir, rm_dir = workdir / "policy", workdir / "reward_model"
    if preset["vocab"] is None:
        make_tiny_model(policy_dir, task="causal-lm", seed=0)
        make_tiny_model(rm_dir, task="seq-cls", seed=1)
        return policy_dir, rm_dir
    tokenizer = word_tokenizer(preset["vocab"])
    config = Qwen3Config(vocab_size=preset["vocab"], hidden_size=preset["hidden"], intermediate_size=preset["inter"],
                         num_hidden_layers=preset["layers"], num_attention_heads=preset["heads"],
                         num_key_value_heads=preset["kv_heads"], head_dim=preset["head_dim"],
                         max_position_embeddings=4096, tie_word_embeddings=True, pad_token_id=0, eos_token_id=1,
                         bos_token_id=1, num_labels=1)
    for folder, cls, seed in ((policy_dir, AutoModelForCausalLM, 0), (rm_dir, AutoModelForSequenceClassification, 1)):
        torch.manual_seed(seed)
        cls.from_config(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return policy_dir, rm_dir


def build_prompts(preset: dict, policy_dir: Path, n: int) -> list[dict]:
    """``n`` prompts: raw text for our stage and the exact token ids TRL gets (same tokens by construction)."""
    import random

    from alignkit.modeling.models import load_tokenizer
    from alignkit.data.prompts import render_prompt

    tokenizer = load_tokenizer(str(policy_dir))
    rng = random.Random(0)
    rows = []
    for _ in range(n):
        if preset["vocab"] is None:  # arithmetic-style text through the chat template
            text, chat = f"What is {rng.randint(1, 99)} + {rng.randint(1, 99)}? Show each step.", True
        else:  # exactly `prompt` words (the word-level tokenizer maps each to one id)
            text, chat = " ".join(f"w{rng.randrange(3, preset['vocab'])}" for _ in range(preset["prompt"])), False
        ids = tokenizer(render_prompt(tokenizer, text, chat=chat), add_special_tokens=False)["input_ids"]
        rows.append({"prompt": text, "input_ids": ids, "chat": chat})
    return rows


# ------------------------------------------------------------------------------------------- the two sides


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def current_rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def memory_report(rss_start: float) -> dict:
    import torch

    if torch.cuda.is_available():
        return {"peak_gib": torch.cuda.max_memory_allocated() / 2**30, "kind": "cuda max allocated"}
    return {"peak_gib": peak_rss_gib(), "growth_gib": peak_rss_gib() - rss_start, "kind": "cpu peak rss"}


def run_ours(s: dict) -> dict:
    """Our stage's pieces, as ``alignkit.stages.ppo.run`` wires them (no checkpoints, no accuracy checks)."""
    import torch

    from alignkit.modeling.models import load_tokenizer
    from alignkit.ppo import RewardSources, ppo_step
    from alignkit.rewards.programs import combine_rewards
    from alignkit.rewards.programs import RewardSpec
    from alignkit.stages.ppo import Config, _build_models, _kl_controller, _optimizer, hyper_from_config

    rows = [{"prompt": r["prompt"]} for r in s["prompts"]]
    config = Config(model=s["policy"], value_model=s["reward_model"], lora={"r": s["lora_r"], "alpha": 2 * s["lora_r"],
                    "dropout": 0.0}, data="arith", rewards=[{"program": f"model:{s['reward_model']}"}],
                    batch_size=s["batch"], max_completion_length=s["response"], lr=s["lr"], max_steps=s["steps"],
                    chat=s["prompts"][0]["chat"], max_length=4096, generation={"backend": s["backend"]},
                    gradient_checkpointing=s.get("gradient_checkpointing", False),
                    **{k: v for k, v in SHARED.items()})
    torch.manual_seed(0)
    tokenizer = load_tokenizer(config.model)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models, groups = _build_models(config, tokenizer, device)
    sources = RewardSources(combine_rewards([RewardSpec(program=f"model:{s['reward_model']}")]))
    optimizer, scheduler = _optimizer(config, groups, config.max_steps)
    kl = _kl_controller(config)
    hyper = hyper_from_config(config)
    rss_start, times, scores, kls = current_rss_gib(), [], [], []
    phases: dict[str, list[float]] = {"sample": [], "experience": [], "update": []}
    for step in range(config.max_steps):
        started = time.perf_counter()
        metrics = ppo_step(step, models, sources, rows, optimizer, groups, kl, hyper, 0, device)
        scheduler.step()
        times.append(time.perf_counter() - started)
        scores.append(metrics["reward/score"])
        kls.append(metrics["kl/sequence"])
        for phase, seconds in phases.items():
            seconds.append(metrics[f"time/{phase}_s"])
    return {"step_s": times, "scores": scores, "kl": kls, "phases_s": phases, **memory_report(rss_start)}


def run_trl(s: dict, out_dir: Path) -> dict:
    """TRL 1.12.0's PPOTrainer with LoRA (reference = adapters disabled), in the TRL 1.12 virtualenv."""
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(s["policy"], padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(s["policy"], dtype=dtype)
    value = AutoModelForSequenceClassification.from_pretrained(s["reward_model"], num_labels=1, dtype=dtype)
    reward = AutoModelForSequenceClassification.from_pretrained(s["reward_model"], num_labels=1, dtype=dtype)
    data = datasets.Dataset.from_list([{"input_ids": r["input_ids"]} for r in s["prompts"]])
    args = PPOConfig(
        output_dir=str(out_dir / "trl-out"), per_device_train_batch_size=s["batch"], gradient_accumulation_steps=1,
        num_mini_batches=SHARED["num_mini_batches"], num_ppo_epochs=SHARED["ppo_epochs"],
        total_episodes=s["steps"] * s["batch"], local_rollout_forward_batch_size=s["batch"],
        response_length=s["response"], temperature=SHARED["temperature"], kl_coef=SHARED["beta"],
        cliprange=SHARED["epsilon"], cliprange_value=SHARED["value_epsilon"], vf_coef=SHARED["vf_coef"],
        gamma=SHARED["gamma"], lam=SHARED["lam"], learning_rate=s["lr"], lr_scheduler_type="linear",
        logging_steps=1, save_strategy="no", report_to=[], num_sample_generations=0, stop_token="eos",
        bf16=cuda, use_cpu=not cuda, seed=0, gradient_checkpointing=s.get("gradient_checkpointing", False),
        disable_tqdm=True,
    )
    times: list[float] = []
    state = {"rss_start": 0.0, "last": 0.0}

    class Timer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            state["rss_start"], state["last"] = current_rss_gib(), time.perf_counter()

        def on_step_end(self, *a, **k):
            now = time.perf_counter()
            times.append(now - state["last"])
            state["last"] = now

    peft_config = LoraConfig(r=s["lora_r"], lora_alpha=2 * s["lora_r"], lora_dropout=0.0, target_modules="all-linear",
                             task_type="CAUSAL_LM")
    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=None, reward_model=reward,
                         train_dataset=data, value_model=value, peft_config=peft_config, callbacks=[Timer()])
    trainer.train()
    logged = [e for e in trainer.state.log_history if "objective/scores" in e]
    return {"step_s": times, "scores": [e["objective/scores"] for e in logged],
            "kl": [e["objective/kl"] for e in logged], **memory_report(state["rss_start"])}


# -------------------------------------------------------------------------------------------- orchestration


def side(name: str, python: str, settings_file: Path) -> dict:
    out = settings_file.parent / f"result-{name}.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [python, str(Path(__file__).resolve()), "--side", name, "--settings", str(settings_file)]
    started = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=str(Path(__file__).resolve().parents[1]))
    result = json.loads(out.read_text())
    result["wall_s"] = time.perf_counter() - started
    return result


def report(results: dict, settings: dict) -> str:
    ours, trl = results["ours"], results["trl"]

    def median(r: dict) -> float:  # the first step is warm-up
        return statistics.median(r["step_s"][1:] or r["step_s"])

    checkpointing = ", gradient checkpointing" if settings.get("gradient_checkpointing") else ""
    lines = [(f"preset {settings['preset']}: batch {settings['batch']}, response {settings['response']}, "
              f"{SHARED['ppo_epochs']} PPO epochs, {settings['steps']} steps{checkpointing}, "
              f"memory = {ours['kind']}"),
             f"{'':6} {'s/step':>8} {'peak GiB':>9} {'growth GiB':>11}"]
    for name, r in (("ours", ours), ("trl", trl)):
        growth = f"{r['growth_gib']:11.3f}" if "growth_gib" in r else f"{'-':>11}"
        lines.append(f"{name:6} {median(r):8.3f} {r['peak_gib']:9.3f} {growth}")
    lines.append(f"ratio ours/trl: step time {median(ours) / median(trl):.2f}x, peak memory "
                 f"{ours['peak_gib'] / trl['peak_gib']:.2f}x"
                 + (f", memory growth {ours['growth_gib'] / trl['growth_gib']:.2f}x" if "growth_gib" in ours else ""))
    if "phases_s" in ours:  # where our step time goes (TRL logs no phase times)
        lines.append("ours per step: " + ", ".join(f"{phase} {statistics.median(v[1:] or v):.2f} s"
                                                    for phase, v in ours["phases_s"].items()))
    for name, r in (("ours", ours), ("trl", trl)):
        lines.append(f"reward curve {name}: " + " ".join(f"{v:.3f}" for v in r["scores"]))
        lines.append(f"KL curve     {name}: " + " ".join(f"{v:.3f}" for v in r["kl"]))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--steps", type=int, default=None, help="PPO steps (default: the preset's)")
    parser.add_argument("--backend", choices=["hf", "fast"], default="hf", help="our sampling engine")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="activation checkpointing, both sides")
    parser.add_argument("--venv", default="/tmp/trl112-venv", help="virtualenv holding TRL 1.12.0")
    parser.add_argument("--workdir", default=None, help="where models, prompts and results go")
    parser.add_argument("--side", choices=["ours", "trl"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--settings", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side is not None:  # a child process: run one side, write its result beside the settings
        settings = json.loads(Path(args.settings).read_text())
        result = run_ours(settings) if args.side == "ours" else run_trl(settings, Path(args.settings).parent)
        (Path(args.settings).parent / f"result-{args.side}.json").write_text(json.dumps(result))
        return
    preset = PRESETS[args.preset]
    workdir = Path(args.workdir or f"/tmp/ppo-bench-{args.preset}")
    workdir.mkdir(parents=True, exist_ok=True)
    python = ensure_venv(Path(args.venv))
    policy_dir, rm_dir = build_models(preset, workdir)
    steps = args.steps or preset["steps"]
    settings = {**preset, "preset": args.preset, "steps": steps, "backend": args.backend,
                "gradient_checkpointing": args.gradient_checkpointing, "policy": str(policy_dir),
                "reward_model": str(rm_dir), "prompts": build_prompts(preset, policy_dir, steps * preset["batch"])}
    settings_file = workdir / "settings.json"
    settings_file.write_text(json.dumps(settings))
    results = {"ours": side("ours", sys.executable, settings_file), "trl": side("trl", str(python), settings_file)}
    (workdir / "results.json").write_text(json.dumps(results, indent=1))
    print(report(results, settings))


if __name__ == "__main__":
    main()
