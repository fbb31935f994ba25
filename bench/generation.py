"""Benchmark the hf and fast generation backends side by side, in one process, on the same model.

Reports new tokens/s (tokens actually generated, so early EOS is accounted for) and the fast/hf ratio for:

- ``batch B``: B distinct prompts, one sample each (eval, DPO pair-making);
- ``prefix N``: ``--prefix-prompts`` prompts sharing a long prefix, N samples each (Math-Shepherd
  rollouts, GRPO groups), where fast prefills each prompt once.

Each workload runs once as warm-up, then ``--repeats`` timed runs (best taken). Prompts are random token
ids; sampling is temperature 1. This script reports; it asserts nothing.

    .venv/bin/python bench/generation.py                       # tiny random Llama (CPU-sized)
    .venv/bin/python bench/generation.py --model ~/.cache/alignkit/models/smollm2-135m-instruct \\
        --batch-sizes 1,16 --prefix-n 8 --new-tokens 32
    .venv/bin/python bench/generation.py --preset qwen3-0.6b   # GPU: random Qwen3-0.6B shape, bf16
    .venv/bin/python bench/generation.py --model DIR --openai-url http://127.0.0.1:8000/v1   # + a vLLM server of DIR
"""

from __future__ import annotations

import argparse
import tempfile
import time
from typing import Any

import torch

from alignkit.generation import SamplingParams, make_engine


class IdTokenizer:
    """Enough of a tokenizer for id prompts: ``decode`` spells ids (random models have no real vocabulary)."""

    def __init__(self, eos_token_id: int, pad_token_id: int):
        self.eos_token_id, self.pad_token_id = eos_token_id, pad_token_id

    def decode(self, ids: list[int], **kwargs: Any) -> str:
        return " ".join(map(str, ids))


def load(args: argparse.Namespace) -> tuple[Any, Any, int]:
    """(model, tokenizer, vocab size) for --model, --preset qwen3-0.6b, or the tiny test model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3Config

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    elif args.preset == "qwen3-0.6b":
        config = Qwen3Config(
            vocab_size=151936,
            hidden_size=1024,
            intermediate_size=3072,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            max_position_embeddings=40960,
            rope_theta=1e6,
            tie_word_embeddings=True,
            eos_token_id=151645,
            pad_token_id=151643,
        )
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)
        tokenizer = IdTokenizer(eos_token_id=151645, pad_token_id=151643)
    else:
        from alignkit.testing import make_tiny_model

        path = make_tiny_model(tempfile.mkdtemp(prefix="bench-gen-"))
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
        tokenizer = AutoTokenizer.from_pretrained(path)
    return model.eval(), tokenizer, model.config.vocab_size


def random_prompts(
    count: int, length: int, vocab: int, *, prefix: list[int] | None = None, seed: int = 0
) -> list[list[int]]:
    """``count`` prompts of ``length`` +/- 25% random ids (avoiding the first 16 ids: specials), after ``prefix``."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(1, length * 3 // 4), length * 5 // 4 + 1, (count,), generator=g)
    return [(prefix or []) + torch.randint(16, vocab, (int(n),), generator=g).tolist() for n in lengths]


def timed(engine: Any, prompts: list[list[int]], params: SamplingParams, repeats: int) -> float:
    """Best new tokens/s over ``repeats`` runs, after one warm-up run."""
    engine.generate(prompts, params, progress=False)
    best = 0.0
    for r in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = engine.generate(prompts, params.model_copy(update={"seed": r}), progress=False)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        tokens = sum(len(c.token_ids) for row in out for c in row)
        best = max(best, tokens / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a local model folder (default: tiny random model, or --preset)")
    parser.add_argument("--preset", choices=["tiny", "qwen3-0.6b"], default="tiny")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, help="float32/bfloat16/float16 (default bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--batch-sizes", default="1,64,256", help="comma-separated prompt counts")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prefix-len", type=int, default=512, help="shared prefix length for prefix workloads")
    parser.add_argument("--prefix-n", default="8,16", help="comma-separated samples per shared-prefix prompt")
    parser.add_argument("--prefix-prompts", type=int, default=8, help="prompts per prefix workload")
    parser.add_argument("--engine-batch", type=int, default=256, help="engines' batch_size (rows at once)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--openai-url", default=None, help="also an OpenAI-compatible server serving the SAME "
                        "--model (e.g. vLLM: http://127.0.0.1:8000/v1); a third column and its ratio to hf")
    parser.add_argument("--openai-model", default=None, help="the served model's name (default: --model)")
    parser.add_argument("--vllm-venv", default=None, help="start vLLM's CPU/GPU server on --model from this venv "
                        "(bash bench/vllm_cpu_env.sh makes one) and add it as the served column")
    args = parser.parse_args()
    if args.vllm_venv and not args.model:
        parser.error("--vllm-venv serves --model: give a model folder")
    run_served(args, run)


def run_served(args: argparse.Namespace, run: Any) -> None:
    """``run(args)``; with ``args.vllm_venv``, inside a vLLM server of ``args.model`` started from that venv, whose
    address becomes ``args.openai_url``/``args.openai_model`` (the benches' served column)."""
    if not args.vllm_venv:
        return run(args)
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from vllm_server import vllm_server  # the launcher the vLLM tests use

    with vllm_server(args.model, venv=args.vllm_venv) as served:
        print(f"vLLM server up in {served.startup_s:.0f} s", flush=True)
        args.openai_url, args.openai_model = served.base_url, served.model_name
        run(args)


def run(args: argparse.Namespace) -> None:

    model, tokenizer, vocab = load(args)
    print(
        f"model: {args.model or args.preset}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
        f"{model.device}, {model.dtype}, engine batch_size={args.engine_batch}, torch threads={torch.get_num_threads()}"
    )
    engines = {
        b: make_engine(b, model=model, tokenizer=tokenizer, batch_size=args.engine_batch) for b in ("hf", "fast")
    }
    if args.openai_url:  # token-id prompts and exact token ids: the same workload as the local engines
        engines["openai"] = make_engine("openai", base_url=args.openai_url, batch_size=args.engine_batch,
                                        model_name=args.openai_model or args.model, request_token_ids=True)
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0)
    workloads = [
        (f"batch {b}", random_prompts(b, args.prompt_len, vocab), 1) for b in map(int, args.batch_sizes.split(","))
    ]
    prefix = random_prompts(1, args.prefix_len, vocab, seed=1)[0][: args.prefix_len]
    for n in map(int, args.prefix_n.split(",")):
        prompts = random_prompts(args.prefix_prompts, 16, vocab, prefix=prefix, seed=2)
        workloads.append((f"prefix {args.prefix_prompts}x{n} (len {args.prefix_len})", prompts, n))

    served = "openai" in engines
    print(f"{'workload':<28}{'hf tok/s':>12}{'fast tok/s':>12}{'fast/hf':>9}"
          + (f"{'openai tok/s':>14}{'openai/hf':>11}" if served else ""))
    for name, prompts, n in workloads:
        p = params.model_copy(update={"n": n})
        rates = {b: timed(e, prompts, p, args.repeats) for b, e in engines.items()}
        line = f"{name:<28}{rates['hf']:>12.1f}{rates['fast']:>12.1f}{rates['fast'] / rates['hf']:>9.2f}"
        if served:
            line += f"{rates['openai']:>14.1f}{rates['openai'] / rates['hf']:>11.2f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
