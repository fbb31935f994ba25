"""GRPO step time and sampling time: plain TRL vs alignkit's grpo stage (TRL sampling, and our fast engine).

Every side trains the same model for ``--steps`` optimizer steps of TRL 1.16's ``GRPOTrainer`` with the same
settings: LoRA r=16, alpha=32, dropout 0 on all linear layers; the same built-in arith problems
(``--problems`` of them, seed 0) sent as one-turn chat prompts and drawn in the same order (TRL's sampler,
seed 0); ``--group`` (num_generations, default 8) completions per prompt; ``--batch-size`` completions per
step (default 16 = 2 prompts x 8), grad_accum 1; ``max_completion_length`` ``--max-new-tokens`` (default
64); temperature 1.0, top_p 1, top_k off; lr 1e-5; beta 0; loss ``dapo``; gradient checkpointing off; seed 0;
float32 on CPU (bf16 on CUDA); reward = the shipped ``reward/math.py:answer_match`` (1 when the final answer
equals the gold answer):

- ``trl``: what a user writes by hand: ``AutoModelForCausalLM.from_pretrained`` + a peft ``LoraConfig`` +
  ``GRPOTrainer``/``GRPOConfig`` (with ``bf16=False`` and gradient checkpointing off set explicitly: TRL's
  defaults are on), sampling with TRL's own ``model.generate``; time = seconds inside ``trainer.train()``;
- ``alignkit``: a one-stage ``grpo`` recipe through the pipeline (``alignkit run``), ``generation`` left at
  its default (``trl``: the same ``model.generate``); time = the manifest's ``train_seconds`` (seconds inside
  ``trainer.train()``; loading, the merge and the save are outside it on every side);
- ``alignkit-fast``: the same recipe with ``generation: {backend: fast, batch_size: 64}``: our prefix-sharing
  engine samples inside TRL's trainer (alignkit/generation/rollout.py; one prefill per group).

Each side runs in its own fresh subprocess (so peak RSS is that side's alone and no side warms another's
caches); the order alternates over ``--repeats`` and the best run of each side (lowest s/step) is kept.
Reported per side: seconds per optimizer step (train seconds / steps); sampling seconds per step (time spent
in the trainer's ``_generate_single_turn``, the one method the engine replaces, wrapped in the child to
accumulate seconds; the rest of a step, i.e. the loss forward/backward, optimizer and rewards, is TRL's own
code on every side); completions/s; the mean completion length in tokens and the share cut at
``--max-new-tokens`` (TRL's ``completions/mean_length`` and ``completions/clipped_ratio``, averaged over the
logged steps: sampling is random, so the sides sample a little differently and these show by how much) and
the batch's longest completion (``completions/max_length``, averaged over steps: TRL pads every completion to
it, so it sets the cost of the loss forward/backward); the mean reward; the same times as process CPU seconds
(``time.process_time``, all threads), and the CPU share (CPU seconds / wall seconds in ``train()``): with one
thread on a core that other processes also use, wall time depends on their load and CPU time does not, so
compare the CPU columns there (on an unshared machine, or with several threads, the wall columns are the
measure); peak memory during training (CUDA max allocated, else the process's peak RSS when ``train()``
returns); and the ratios side / trl of step time and sampling time. The project's target is a
step-time ratio alignkit-fast / trl <= 0.5x on CPU with group >= 8. This script reports; it asserts nothing.

    .venv/bin/python bench/grpo_sampling.py                                        # SmolLM2-135M-Instruct
    .venv/bin/python bench/grpo_sampling.py --model runs/<run>/<recipe>/sft/model  # a model that ends its answers
    .venv/bin/python bench/grpo_sampling.py --steps 8 --repeats 2 --json grpo.json
    taskset -c 1 env OMP_NUM_THREADS=1 .venv/bin/python bench/grpo_sampling.py ...  # one pinned CPU core
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SIDES = ("trl", "alignkit", "alignkit-fast")
REWARD = "reward/math.py:answer_match"
FAST = {"backend": "fast", "batch_size": 64}
LORA_R, LORA_ALPHA, LR, SEED = 16, 32, 1e-5, 0


def problems_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The training problems of every side: alignkit's built-in arith source (as a recipe ``data`` block)."""
    return {"source": "arith", "seed": 0, "params": {"n": args.problems, "steps": 2, "max_operand": 20}}


def model_ref(name: str) -> str:
    """A local folder as an absolute path (the recipe lives in a temporary folder), else the alias or Hub id."""
    return str(Path(name).resolve()) if Path(name).exists() else name


# ------------------------------------------------------------------------------------- measuring in the child


class Probe:
    """Wraps the trainer class's ``_generate_single_turn`` (seconds spent sampling) and ``train`` (the trainer,
    and peak memory when training ends) on every side, before any trainer is built."""

    def __init__(self) -> None:
        self.sampling_seconds, self.sampling_calls, self.sampling_cpu_seconds = 0.0, 0, 0.0
        self.train_cpu_seconds = 0.0
        self.rusage: dict[str, Any] = {}  # user/sys seconds and page faults inside train()
        self.trainer: Any = None
        self.peak_gib: float | None = None
        self.prompts = hashlib.sha1()  # every sampled batch's prompt ids: equal digests = same prompts, same order

    def install(self) -> None:
        from trl import GRPOTrainer

        from alignkit.generation import rollout

        GRPOTrainer._generate_single_turn = self._timed(GRPOTrainer._generate_single_turn)
        original_train = GRPOTrainer.train
        probe = self

        def train(trainer, *args, **kwargs):
            probe.trainer = trainer
            reset_peak()
            cpu, usage = time.process_time(), resource.getrusage(resource.RUSAGE_SELF)
            try:
                return original_train(trainer, *args, **kwargs)
            finally:
                probe.train_cpu_seconds += time.process_time() - cpu
                after = resource.getrusage(resource.RUSAGE_SELF)
                probe.rusage = {"user_s": round(after.ru_utime - usage.ru_utime, 2),
                                "sys_s": round(after.ru_stime - usage.ru_stime, 2),
                                "minor_faults": after.ru_minflt - usage.ru_minflt,
                                "involuntary_switches": after.ru_nivcsw - usage.ru_nivcsw}
                probe.peak_gib = peak_memory_gib()

        GRPOTrainer.train = train
        with_engine = rollout.with_engine

        def timed_with_engine(trainer_class: type, spec: Any) -> type:
            # the engine's subclass defines its own _generate_single_turn (it does not call TRL's): time that one
            subclass = with_engine(trainer_class, spec)
            subclass._generate_single_turn = self._timed(subclass.__dict__["_generate_single_turn"])
            return subclass

        rollout.with_engine = timed_with_engine  # rl_common imports it from the module when the stage runs

    def _timed(self, method: Any) -> Any:
        probe = self

        def timed(trainer, *args, **kwargs):
            import torch

            probe.prompts.update(json.dumps([list(map(int, ids)) for ids in args[0]]).encode())
            started, cpu = time.perf_counter(), time.process_time()
            try:
                return method(trainer, *args, **kwargs)
            finally:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                probe.sampling_seconds += time.perf_counter() - started
                probe.sampling_cpu_seconds += time.process_time() - cpu
                probe.sampling_calls += 1

        return timed

    def logged(self) -> dict[str, Any]:
        """Means over TRL's logged steps: completion length, clipped share, reward; and the trainer's settings
        that the sides must share (checked by eye in the JSON)."""
        history = [e for e in self.trainer.state.log_history if "completions/mean_length" in e]

        def mean(key: str) -> float | None:
            values = [e[key] for e in history if key in e]
            return round(sum(values) / len(values), 3) if values else None

        a = self.trainer.args
        settings = {k: getattr(a, k, None) for k in (
            "per_device_train_batch_size", "gradient_accumulation_steps", "num_generations", "max_completion_length",
            "temperature", "top_p", "top_k", "learning_rate", "beta", "loss_type", "seed", "bf16",
            "activation_checkpointing", "gradient_checkpointing", "generation_batch_size", "steps_per_generation")}
        return {"mean_completion_tokens": mean("completions/mean_length"),
                "max_completion_tokens": mean("completions/max_length"),
                "clipped_ratio": mean("completions/clipped_ratio"), "reward": mean("reward"),
                "logged_steps": len(history), "prompts_digest": self.prompts.hexdigest()[:12], "settings": settings}


def reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib() -> float:
    from alignkit.core.perf import peak_memory_gib as peak

    return round(peak(), 3)


# ------------------------------------------------------------------------------------------------- sides


def run_trl(args: argparse.Namespace) -> float:
    """Plain TRL, written the way its docs show, with the bench's settings; returns seconds in ``train()``."""
    import dataclasses

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from alignkit.core.config import DataSpec
    from alignkit.data import load_dataset
    from alignkit.modeling.models import resolve_model
    from alignkit.rewards.programs import load_reward

    path = resolve_model(args.model)
    cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if cuda else torch.float32,
                                                 device_map={"": 0} if cuda else None)
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    problems = load_dataset(DataSpec(**problems_spec(args)), "problems")
    data = Dataset.from_list([{**row, "prompt": [{"role": "user", "content": row["prompt"]}]} for row in problems])
    answer_match = load_reward(REWARD)  # the plain function alignkit's recipe names
    lora = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    # TRL's configs turn checkpointing on by default; transformers >= 5.23 calls it activation_checkpointing
    names = {f.name for f in dataclasses.fields(GRPOConfig)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-grpo-trl-"), max_steps=args.steps,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1, learning_rate=LR,
        num_generations=args.group, max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0,
        beta=0.0, loss_type="dapo", seed=SEED, logging_steps=1, save_strategy="no", report_to=[],
        bf16=cuda, use_cpu=not cuda, dataloader_num_workers=0, disable_tqdm=True, **{checkpointing: False},
    )
    trainer = GRPOTrainer(model=model, reward_funcs=[answer_match], args=config, train_dataset=data,
                          processing_class=tokenizer, peft_config=lora)
    started = time.perf_counter()
    trainer.train()
    return time.perf_counter() - started


def run_alignkit(args: argparse.Namespace, fast: bool) -> tuple[float, dict[str, Any]]:
    """A one-stage grpo recipe through alignkit's pipeline; returns the manifest's train_seconds and metrics."""
    import yaml

    from alignkit.core.artifacts import Manifest
    from alignkit.run.pipeline import run_recipe
    from alignkit.run.recipe import load_recipe

    work = Path(tempfile.mkdtemp(prefix="bench-grpo-alignkit-"))
    spec: dict[str, Any] = {
        "kind": "grpo", "model": model_ref(args.model), "data": problems_spec(args),
        "rewards": [{"program": REWARD}],
        "lora": {"r": LORA_R, "alpha": LORA_ALPHA, "dropout": 0.0, "target_modules": "all-linear"},
        "lr": LR, "max_steps": args.steps, "batch_size": args.batch_size, "grad_accum": 1,
        "num_generations": args.group, "max_completion_length": args.max_new_tokens, "temperature": 1.0,
        "top_p": 1.0, "beta": 0.0, "loss_type": "dapo", "gradient_checkpointing": False, "seed": SEED,
        "chat": True, "logging_steps": 1, "save_steps": 10_000,  # no checkpoint inside train() (trl saves none)
    }
    if fast:
        spec["generation"] = dict(FAST)
    recipe_file = work / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump({"name": "bench-grpo", "tracking": {"report_to": "none"},
                                           "stages": [spec]}))
    run_recipe(load_recipe(recipe_file, output_dir=str(work / "runs")), echo=lambda *a, **k: None)
    metrics = Manifest.read(work / "runs" / "bench-grpo" / "grpo").metrics
    return metrics["train_seconds"], metrics


def child(args: argparse.Namespace) -> None:
    probe = Probe()
    probe.install()
    side = args.child
    if side == "trl":
        seconds, metrics = run_trl(args), {}
    else:
        seconds, metrics = run_alignkit(args, fast=side == "alignkit-fast")
    steps = probe.trainer.state.global_step
    completions = metrics.get("completions_sampled", steps * args.batch_size)
    result = {
        "side": side, "train_seconds": round(seconds, 2), "steps": steps,
        "seconds_per_step": round(seconds / steps, 3) if steps else None,
        "sampling_seconds": round(probe.sampling_seconds, 2), "sampling_calls": probe.sampling_calls,
        "sampling_seconds_per_step": round(probe.sampling_seconds / steps, 3) if steps else None,
        "train_cpu_seconds": round(probe.train_cpu_seconds, 2),
        "cpu_seconds_per_step": round(probe.train_cpu_seconds / steps, 3) if steps else None,
        "sampling_cpu_seconds_per_step": round(probe.sampling_cpu_seconds / steps, 3) if steps else None,
        "completions": completions,
        "completions_per_second": metrics.get("completions_per_second", round(completions / seconds, 3)),
        "peak_gib": probe.peak_gib, "peak_gib_process": peak_memory_gib(), "train_rusage": probe.rusage,
        **probe.logged(),
    }
    print("BENCH_RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------------ parent


def spawn(args: argparse.Namespace, side: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", side] + passthrough(args)
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            return {**json.loads(line[len("BENCH_RESULT "):]), "wall_seconds": round(time.perf_counter() - started, 1)}
    raise SystemExit(f"{side} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def passthrough(args: argparse.Namespace) -> list[str]:
    return ["--model", args.model, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
            "--group", str(args.group), "--max-new-tokens", str(args.max_new_tokens),
            "--problems", str(args.problems)]


def ratio(value: float | None, ref: float | None) -> str:
    return f"{value / ref:.2f}x" if value is not None and ref else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="alias, local folder or Hub id")
    parser.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated, of {', '.join(SIDES)}")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int, default=16, help="completions per step (whole groups)")
    parser.add_argument("--group", type=int, default=8, help="num_generations: completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="max_completion_length")
    parser.add_argument("--problems", type=int, default=64, help="arith prompts in the training set")
    parser.add_argument("--repeats", type=int, default=1, help="runs per side (order alternates; best kept)")
    parser.add_argument("--json", metavar="OUT", help="also write the results here as JSON")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.batch_size % args.group:
        parser.error(f"--batch-size {args.batch_size} must hold whole groups of --group {args.group}")
    if args.problems < args.steps * args.batch_size // args.group:
        parser.error(f"--problems {args.problems} < {args.steps * args.batch_size // args.group} prompts that "
                     f"{args.steps} steps of {args.batch_size // args.group} prompts need")
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    unknown = sorted(set(sides) - set(SIDES))
    if unknown:
        parser.error(f"unknown side(s) {unknown}; use {', '.join(SIDES)}")
    if args.child:
        return child(args)

    import torch
    import transformers
    import trl

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else \
        f"CPU ({len(os.sched_getaffinity(0))} of {os.cpu_count()} cores, OMP_NUM_THREADS=" \
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')})"
    header = (f"# {time.strftime('%Y-%m-%d')} {device}; torch {torch.__version__}, transformers "
              f"{transformers.__version__}, trl {trl.__version__}; model {args.model}; {args.steps} steps x "
              f"{args.batch_size} completions ({args.batch_size // args.group} prompts x group {args.group}), "
              f"max_completion_length {args.max_new_tokens}, LoRA r={LORA_R}, fast = {FAST}")
    print(header, flush=True)
    started = time.perf_counter()
    best: dict[str, dict[str, Any]] = {}
    runs: list[dict[str, Any]] = []
    for repeat in range(args.repeats):
        for side in (sides if repeat % 2 == 0 else sides[::-1]):
            r = spawn(args, side)
            runs.append(r)
            print(f"# run {repeat + 1}/{args.repeats} {side}: {r['seconds_per_step']:.2f} s/step, sampling "
                  f"{r['sampling_seconds_per_step']:.2f} s/step; CPU {r['cpu_seconds_per_step']:.2f} s/step, sampling "
                  f"{r['sampling_cpu_seconds_per_step']:.2f}; {r['wall_seconds']:.0f} s wall", flush=True)
            if side not in best or r["seconds_per_step"] < best[side]["seconds_per_step"]:
                best[side] = r
    ref = best.get("trl")

    def vs_trl(r: dict[str, Any], key: str) -> str:
        return ratio(r[key], ref and ref[key])

    print()
    print("| side | s/step | sampling s/step | compl/s | mean compl tokens | max compl tokens | clipped | reward "
          "| peak GiB | step ratio vs trl | sampling ratio vs trl | CPU s/step | sampling CPU s/step | CPU step ratio "
          "| CPU sampling ratio | CPU share |")
    print("|---|" + "---:|" * 15)
    for side in sides:
        r = best[side]
        print(f"| {side} | {r['seconds_per_step']:.2f} | {r['sampling_seconds_per_step']:.2f} | "
              f"{r['completions_per_second']:.2f} | {r['mean_completion_tokens']} | {r['max_completion_tokens']} | "
              f"{r['clipped_ratio']} | {r['reward']} | {r['peak_gib']:.3f} | {vs_trl(r, 'seconds_per_step')} | "
              f"{vs_trl(r, 'sampling_seconds_per_step')} | {r['cpu_seconds_per_step']:.2f} | "
              f"{r['sampling_cpu_seconds_per_step']:.2f} | {vs_trl(r, 'cpu_seconds_per_step')} | "
              f"{vs_trl(r, 'sampling_cpu_seconds_per_step')} | {r['train_cpu_seconds'] / r['train_seconds']:.0%} |")
    if ref:
        print()
        for side in sides:
            if side == "trl":
                continue
            r = best[side]

            def rest(x: dict[str, Any], unit: str = "") -> float:  # seconds per step outside sampling
                return x[f"{unit}seconds_per_step"] - x[f"sampling_{unit}seconds_per_step"]

            print(f"# {side} / trl: step time {vs_trl(r, 'seconds_per_step')}, sampling time "
                  f"{vs_trl(r, 'sampling_seconds_per_step')}, non-sampling time {ratio(rest(r), rest(ref))}; "
                  f"CPU: step {vs_trl(r, 'cpu_seconds_per_step')}, sampling "
                  f"{vs_trl(r, 'sampling_cpu_seconds_per_step')}, non-sampling "
                  f"{ratio(rest(r, 'cpu_'), rest(ref, 'cpu_'))}")
    digests = {best[side]["prompts_digest"] for side in sides}
    same = "the same on every side, in the same order" if len(digests) == 1 else "DIFFER between sides"
    print(f"# prompt ids sampled: {same} (digest {', '.join(sorted(digests))})")
    total = time.perf_counter() - started
    print(f"# total wall time {total:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "args": {k: v for k, v in vars(args).items()
                                                                          if k != "child"},
                                               "best": best, "runs": runs, "wall_seconds": round(total, 1)},
                                              indent=2) + "\n")


if __name__ == "__main__":
    main()
