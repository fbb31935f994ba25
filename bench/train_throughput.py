"""SFT and DPO training throughput: alignkit's stage vs plain TRL with the same settings, side by side.

For each stage (``--stages sft,dpo``) both sides train the same model on the same rows for ``--steps``
optimizer steps with the same LoRA, batch size, learning rate, max length and dtype (optionally QLoRA
4-bit with ``--bits 4``, CUDA only):

- ``trl``: what a user writes by hand: ``AutoModelForCausalLM.from_pretrained`` + a peft ``LoraConfig`` +
  ``SFTTrainer``/``DPOTrainer`` with ``SFTConfig``/``DPOConfig``;
- ``alignkit``: a one-stage recipe run through the pipeline (``alignkit run``), with its defaults;
- ``alignkit-fast`` (``--presets``): the same with the faster preset of docs/perf.md, where one applies on
  this machine (padding-free packing needs flash attention, so on CPU it is skipped with a note).

Each side runs in its own fresh subprocess (so CPU peak RSS is that side's alone, and no side warms the
other's caches); the order alternates over ``--repeats`` and the best run of each side is kept. Reported:
train-loop tokens/s (tokens the trainer saw / seconds inside ``train()``; loading, saving and merging are
excluded on both sides), peak memory (CUDA max allocated, else peak RSS of the process), and the ratios
alignkit/trl. This script reports; it asserts nothing.

    .venv/bin/python bench/train_throughput.py                                 # SmolLM2-135M, CPU-sized
    .venv/bin/python bench/train_throughput.py --steps 30 --batch-size 16      # GPU
    .venv/bin/python bench/train_throughput.py --bits 4                        # QLoRA (CUDA)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SIDES = ("trl", "alignkit")


def rows(stage: str, n: int) -> list[dict[str, Any]]:
    """The same training rows for both sides: built-in arith problems (sft) or gold vs corrupted (dpo)."""
    from alignkit.core.config import DataSpec
    from alignkit.data import load_dataset

    fmt = "sft" if stage == "sft" else "preference"
    return load_dataset(DataSpec(source="arith", seed=0, params={"n": n, "steps": 2, "max_operand": 20}), fmt).to_list()


def conversational(stage: str, data: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows as TRL conversational examples (what the alignkit stages send with ``chat: true``)."""
    def user(text: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": text}]

    def assistant(text: str) -> list[dict[str, str]]:
        return [{"role": "assistant", "content": text}]

    if stage == "sft":
        return [{"prompt": user(r["prompt"]), "completion": assistant(r["completion"])} for r in data]
    return [{"prompt": user(r["prompt"]), "chosen": assistant(r["chosen"]), "rejected": assistant(r["rejected"])}
            for r in data]


def peak_memory_gib() -> float:
    from alignkit.core.perf import peak_memory_gib as peak

    return round(peak(), 3)


def run_trl(args: argparse.Namespace, stage: str) -> dict[str, Any]:
    """Plain TRL, written the way its docs show, with the bench's settings."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from alignkit.modeling.models import resolve_model

    path = resolve_model(args.model)
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    quant = None
    if args.bits == 4:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, quantization_config=quant,
                                                 device_map={"": 0} if cuda else None)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    data = Dataset.from_list(conversational(stage, rows(stage, args.steps * args.batch_size)))
    common = dict(output_dir=tempfile.mkdtemp(prefix="bench-trl-"), max_steps=args.steps,
                  per_device_train_batch_size=args.batch_size, learning_rate=args.lr, max_length=args.max_length,
                  logging_steps=1, save_strategy="no", report_to=[], bf16=cuda, use_cpu=not cuda,
                  gradient_checkpointing=args.gradient_checkpointing, dataloader_num_workers=0, disable_tqdm=True)
    if stage == "sft":
        trainer = SFTTrainer(model=model, args=SFTConfig(**common, completion_only_loss=True, packing=False),
                             train_dataset=data, processing_class=tokenizer, peft_config=lora)
    else:
        trainer = DPOTrainer(model=model, args=DPOConfig(**common, beta=0.1), train_dataset=data,
                             processing_class=tokenizer, peft_config=lora)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    tokens = int(max((e.get("num_tokens", 0) for e in trainer.state.log_history), default=0))
    return {"train_seconds": round(seconds, 2), "tokens": tokens,
            "tokens_per_second": round(tokens / seconds, 1) if tokens else None, "peak_gib": peak_memory_gib()}


def run_alignkit(args: argparse.Namespace, stage: str, preset: str) -> dict[str, Any]:
    """A one-stage recipe through alignkit's pipeline; the figures are the stage's own manifest metrics."""
    import yaml

    from alignkit.core.artifacts import Manifest
    from alignkit.run.pipeline import run_recipe
    from alignkit.run.recipe import load_recipe

    work = Path(tempfile.mkdtemp(prefix="bench-alignkit-"))
    data = work / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows(stage, args.steps * args.batch_size)))
    spec: dict[str, Any] = {
        "kind": stage, "model": args.model, "data": {"source": str(data)},
        "lora": {"r": args.lora_r, "alpha": 2 * args.lora_r, "dropout": 0.0},
        "lr": args.lr, "max_steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length,
        "logging_steps": 1, "save_steps": 10_000, "gradient_checkpointing": args.gradient_checkpointing,
    }
    if args.bits == 4:
        spec["quantization"] = {"bits": 4}
    if stage == "dpo":
        spec["beta"] = 0.1
    if preset == "fast":
        spec.update(fast_preset(stage))
    recipe_file = work / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump({"name": f"bench-{stage}", "tracking": {"report_to": "none"},
                                           "stages": [spec]}))
    run_recipe(load_recipe(recipe_file, output_dir=str(work / "runs")), echo=lambda *a, **k: None)
    manifest = Manifest.read(work / "runs" / f"bench-{stage}" / stage)
    m = manifest.metrics
    tokens = round(m["tokens_per_second"] * m["train_seconds"]) if m.get("tokens_per_second") else 0
    return {"train_seconds": m["train_seconds"], "tokens": tokens, "tokens_per_second": m.get("tokens_per_second"),
            "peak_gib": peak_memory_gib()}


def fast_preset(stage: str) -> dict[str, Any]:
    """docs/perf.md's faster preset: padding-free batches (SFT: packed) on flash attention, plus Liger's
    fused kernels when installed; needs CUDA and flash-attn."""
    import importlib.util

    trl = {"padding_free": True}
    if importlib.util.find_spec("liger_kernel") is not None:
        trl["use_liger_kernel"] = True
    return {"packing": True, "trl": trl} if stage == "sft" else {"trl": trl}


def fast_preset_available() -> str | None:
    """None if the fast preset can run here, else why not."""
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        return "needs CUDA (padding-free packing relies on flash-attention kernels)"
    if importlib.util.find_spec("flash_attn") is None and importlib.util.find_spec("kernels") is None:
        return "needs flash-attn (or the `kernels` package) installed"
    return None


def child(args: argparse.Namespace) -> None:
    side, stage = args.child.split(":")
    result = run_trl(args, stage) if side == "trl" else run_alignkit(args, stage, "fast" if side == "alignkit-fast" else "")
    print("BENCH_RESULT " + json.dumps(result), flush=True)


def spawn(args: argparse.Namespace, side: str, stage: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", f"{side}:{stage}"] + passthrough(args)
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            return json.loads(line[len("BENCH_RESULT "):])
    raise SystemExit(f"{side} {stage} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")


def passthrough(args: argparse.Namespace) -> list[str]:
    out = ["--model", args.model, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
           "--max-length", str(args.max_length), "--lr", str(args.lr), "--lora-r", str(args.lora_r),
           "--bits", str(args.bits)]
    return out + (["--gradient-checkpointing"] if args.gradient_checkpointing else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="alias, local folder or Hub id")
    parser.add_argument("--stages", default="sft,dpo")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--bits", type=int, choices=(0, 4), default=0, help="4 = QLoRA (CUDA only)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--repeats", type=int, default=1, help="runs per side (order alternates; best kept)")
    parser.add_argument("--presets", action="store_true", help="also run alignkit's faster preset")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    import torch
    import transformers
    import trl

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(f"# {time.strftime('%Y-%m-%d')} {device}; torch {torch.__version__}, transformers "
          f"{transformers.__version__}, trl {trl.__version__}; model {args.model}, {args.steps} steps x batch "
          f"{args.batch_size}, max_length {args.max_length}, LoRA r={args.lora_r}"
          f"{', 4-bit' if args.bits == 4 else ''}")
    sides = list(SIDES)
    if args.presets:
        why_not = fast_preset_available()
        if why_not:
            print(f"# alignkit-fast skipped: {why_not}")
        else:
            sides.append("alignkit-fast")
    print(f"{'stage':6} {'side':14} {'train s':>8} {'tokens':>8} {'tok/s':>9} {'peak GiB':>9} {'tok/s ratio':>12} "
          f"{'mem ratio':>10}")
    for stage in args.stages.split(","):
        best: dict[str, dict[str, Any]] = {}
        for repeat in range(args.repeats):
            order = sides if repeat % 2 == 0 else sides[::-1]
            for side in order:
                result = spawn(args, side, stage)
                if side not in best or (result["tokens_per_second"] or 0) > (best[side]["tokens_per_second"] or 0):
                    best[side] = result
        ref = best["trl"]
        for side in sides:
            r = best[side]
            speed = (r["tokens_per_second"] or 0) / ref["tokens_per_second"] if ref["tokens_per_second"] else float("nan")
            memory = r["peak_gib"] / ref["peak_gib"] if ref["peak_gib"] else float("nan")
            print(f"{stage:6} {side:14} {r['train_seconds']:8.1f} {r['tokens']:8d} {r['tokens_per_second'] or 0:9.1f} "
                  f"{r['peak_gib']:9.3f} {speed:12.2f} {memory:10.2f}")


if __name__ == "__main__":
    main()
