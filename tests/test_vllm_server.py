"""The ``openai`` generation backend, the HTTP judge and the label/eval stages against a real vLLM server.

vLLM's CPU build serves the real SmolLM2-135M-Instruct in float32 on loopback; the ``hf`` backend on the same
weights is the reference. The server runs from its own venv (``bash bench/vllm_cpu_env.sh``; see
tests/vllm_server.py) and starts once for the module (minutes on a busy 2-core machine). Skipped when the
venv or the SmolLM2 conversion is missing.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vllm_server import Served, find_vllm_venv, missing_venv_reason, vllm_server

pytestmark = pytest.mark.e2e

# Chat prompts whose greedy answers are a sentence or two (32 tokens cut the longer ones: finish "length").
QUESTIONS = [
    "What is 2+2?",
    "Name a colour.",
    "Write one sentence about the sea.",
    "Tom has 3 apples and buys 4 more. How many apples does he have?",
]
MAX_NEW = 32


@pytest.fixture(scope="module")
def smollm2() -> Path:
    if find_vllm_venv() is None:  # checked first: no point converting a model nobody will serve
        pytest.skip(missing_venv_reason())
    from alignkit.modeling.models import resolve_model

    try:
        return Path(resolve_model("smollm2-135m-instruct"))
    except Exception as err:  # noqa: BLE001 (no wheel, no network, failed conversion: all mean "cannot run")
        pytest.skip(f"the SmolLM2 conversion is unavailable: {err}")


@pytest.fixture(scope="module")
def server(smollm2: Path) -> Iterator[Served]:
    """One vLLM server for every test of the module."""
    # runtime LoRA on: the ppo test loads each step's adapter (the other tests use the base model)
    with vllm_server(smollm2, venv=find_vllm_venv(), timeout_s=900,
                     extra_args=("--enable-lora", "--max-lora-rank", "16"),
                     env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}) as served:
        print(f"vLLM up in {served.startup_s:.0f} s at {served.base_url}")
        yield served


@pytest.fixture(scope="module")
def local(smollm2: Path) -> tuple[Any, Any]:
    """(model, tokenizer) in float32 on CPU, like the server's."""
    from alignkit.modeling.models import load_model, load_tokenizer

    return load_model(str(smollm2), dtype="float32").eval(), load_tokenizer(str(smollm2))


@pytest.fixture(scope="module")
def prompts(local: tuple[Any, Any]) -> list[str]:
    from alignkit.data.prompts import render_prompt

    return [render_prompt(local[1], q) for q in QUESTIONS]


@pytest.fixture(scope="module")
def engines(server: Served, local: tuple[Any, Any]) -> tuple[Any, Any]:
    """(openai, hf). hf with batch_size 1: unpadded rows, as vLLM runs them, so float noise from padding
    cannot move a near-tie."""
    from alignkit.generation import make_engine

    model, tokenizer = local
    remote = make_engine("openai", base_url=server.base_url, model_name=server.model_name, tokenizer=tokenizer,
                         request_token_ids=True, max_retries=0)
    return remote, make_engine("hf", model=model, tokenizer=tokenizer, batch_size=1)


@pytest.fixture(scope="module")
def greedy(engines: tuple[Any, Any], prompts: list[str]) -> tuple[list, list]:
    """Greedy completions with log-probs from both backends (shared by the equality and log-prob tests)."""
    from alignkit.generation import SamplingParams

    params = SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW, return_logprobs=True)
    remote, hf = engines
    return remote.generate(prompts, params, progress=False), hf.generate(prompts, params, progress=False)


def _post(server: Served, path: str, body: dict) -> dict:
    from alignkit.generation.openai import post_json

    return post_json(server.base_url + path, {"model": server.model_name, **body}, max_retries=0)


def test_server_tokenizes_the_prompt_as_alignkit_does(server, local, prompts):
    """vLLM tokenizes text prompts itself (add_special_tokens defaults to true there): it must add no BOS, or
    every comparison below would be off by a token."""
    for prompt in prompts:
        choice = _post(server, "/completions", {"prompt": prompt, "max_tokens": 1, "return_token_ids": True})[
            "choices"][0]
        assert choice["prompt_token_ids"] == local[1](prompt, add_special_tokens=False)["input_ids"]


def test_greedy_equals_hf_text_and_token_ids(greedy):
    served, reference = greedy
    assert [[(c.text, c.token_ids, c.finish_reason) for c in row] for row in served] == \
           [[(c.text, c.token_ids, c.finish_reason) for c in row] for row in reference]
    assert {row[0].finish_reason for row in served} >= {"eos"}  # at least one ends on <|im_end|> by itself


def test_greedy_logprobs_equal_hf(greedy):
    """Sampled-token log-probs are log_softmax of the raw logits (vLLM's default --logprobs-mode raw_logprobs,
    alignkit's convention for temperature 0)."""
    served, reference = greedy
    gaps = []
    for got, want in zip(served, reference):
        lp = got[0].logprobs
        assert len(lp) == len(got[0].token_ids) and all(x <= 0.0 for x in lp)
        assert lp == pytest.approx(want[0].logprobs, abs=1e-3)
        gaps += [abs(a - b) for a, b in zip(lp, want[0].logprobs)]
    print(f"greedy log-probs: {len(gaps)} tokens, max |vLLM - hf| = {max(gaps):.2e}")


def test_n_samples_per_prompt(engines, prompts, local):
    """n=4 at temperature 1: four different completions per prompt in one request each, with valid finish
    reasons, and their log-probs are the model's own (teacher-forced through the local copy)."""
    import torch

    from alignkit.generation import SamplingParams

    remote, _ = engines
    model, tokenizer = local
    out = remote.generate(prompts[:2], SamplingParams(n=4, temperature=1.0, max_new_tokens=16, seed=0,
                                                      return_logprobs=True), progress=False)
    assert [len(row) for row in out] == [4, 4]
    gap = 0.0
    for prompt, row in zip(prompts[:2], out):
        assert len({tuple(c.token_ids) for c in row}) > 1
        for c in row:
            assert c.finish_reason in ("eos", "length") and 0 < len(c.token_ids) <= 16
            assert (c.finish_reason == "length") == (len(c.token_ids) == 16 and c.token_ids[-1] != 2)
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            with torch.inference_mode():
                logits = model(torch.tensor([ids + c.token_ids])).logits[0, len(ids) - 1:-1].float()
            want = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
            assert c.logprobs == pytest.approx(want.tolist(), abs=1e-3)
            gap = max(gap, max(abs(a - b) for a, b in zip(c.logprobs, want.tolist())))
    print(f"sampled log-probs: max |vLLM - teacher-forced hf| = {gap:.2e}")


def test_stop_string_cuts_like_hf(engines, prompts, greedy):
    """A word from the middle of a greedy answer as stop string: both backends stop there, drop it from the
    text and keep the token that completed it."""
    from alignkit.generation import SamplingParams

    remote, hf = engines
    k, full = next((i, row[0].text) for i, row in enumerate(greedy[1]) if len(row[0].text.split()) >= 6)
    stop = full.split()[len(full.split()) // 2]
    params = SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW, stop=[stop])
    served, reference = remote.generate([prompts[k]], params, progress=False)[0][0], \
        hf.generate([prompts[k]], params, progress=False)[0][0]
    assert served.text == reference.text == full[: full.index(stop)]
    assert served.finish_reason == reference.finish_reason == "stop"
    assert served.token_ids == reference.token_ids


def _judge_items() -> list[Any]:
    from alignkit.cai.judges import Comparison

    return [
        Comparison("How do I bake bread?", "Mix flour, water, yeast and salt, then bake it.", "No.",
                   "Which response is more helpful?"),
        Comparison("Tom has 3 apples.", "7", "The answer is 7.", "Which is better?"),
    ]


@pytest.fixture(scope="module")
def judged_locally(local: tuple[Any, Any]) -> list[float]:
    """P(A) of the local judge for the items, then the items swapped (the reference of both APIs)."""
    from alignkit.cai.judges import HFJudge

    items = _judge_items()
    return HFJudge(*local).presented(items + [item.swapped() for item in items])


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_http_judge_equals_local_judge(server, local, judged_locally, api):
    """The served judge reads P(A) off vLLM's top-20 log-probs; the local judge off the full softmax. Both
    label spellings ("A", " A") are in the top 20 here, so the two agree. ``chat`` lets vLLM apply the chat
    template (the model folder's chat_template.jinja); ``completions`` sends alignkit's rendering."""
    from alignkit.cai.judges import HTTPJudge, compare

    items = _judge_items()
    remote = HTTPJudge(server.base_url, server.model_name, api=api, tokenizer=local[1], batch_size=4,
                       max_retries=0)
    served, reference = remote.presented(items + [item.swapped() for item in items]), judged_locally
    assert all(0.0 <= p <= 1.0 for p in served)
    assert served == pytest.approx(reference, abs=1e-3)
    print(f"judge ({api}): P(A) vLLM {[round(p, 5) for p in served]} vs hf {[round(p, 5) for p in reference]}")
    for item, verdict in zip(items, compare(remote, items)):
        assert 0.0 <= verdict.p <= 1.0 and verdict.p == pytest.approx((verdict.p_ab + 1 - verdict.p_ba) / 2)
    assert remote.tokens > 0


def test_label_stage_against_the_server(tmp_path, server, smollm2):
    from alignkit.run.pipeline import run_recipe
    from alignkit.run.recipe import load_recipe

    recipe_file = tmp_path / "label.yaml"
    recipe_file.write_text(textwrap.dedent(f"""
        name: label-vllm
        tracking: {{report_to: none}}
        stages:
          - kind: label
            model: {smollm2}
            data: {{source: arith, params: {{n: 2, steps: 1, max_operand: 9}}}}
            num_generations: 2
            completions_per_step: 2
            agreement_ns: [1, 2]
            max_completion_length: 32
            max_continuation_length: 16
            generation: {{backend: openai, base_url: "{server.base_url}", model_name: "{server.model_name}"}}
    """))
    recipe = load_recipe(recipe_file, output_dir=str(tmp_path / "runs"))
    (run,) = run_recipe(recipe, echo=lambda *_: None)
    m = run.metrics
    assert m["problems"] == 2 and m["solutions"] == 4
    assert m["rows"] + m["skipped_empty"] + m["skipped_long"] == 4
    rows = [json.loads(line) for line in (recipe.stage("label").run_dir / "data.jsonl").read_text().splitlines()]
    assert len(rows) == m["rows"]
    for row in rows:  # every step has its label and its N=2 rollout outcomes
        assert len(row["labels"]) == len(row["soft_labels"]) == len(row["outcomes"]) == len(row["completions"])
        assert all(len(step) == 2 for step in row["outcomes"]) and all(0 <= x <= 1 for x in row["soft_labels"])
    assert m["completions"] > 4 and m["completions_per_second"] > 0


def test_eval_cli_against_the_server(tmp_path, server, smollm2):
    from alignkit.stages.eval import eval_main

    out = tmp_path / "eval"
    generation = f"{{backend: openai, base_url: '{server.base_url}', model_name: '{server.model_name}'}}"
    code = eval_main(["arith", "--model", str(smollm2), "--out", str(out), "--set", "dataset.params.n=2",
                      "--set", "sampling.n=2", "--set", "sampling.max_completion_length=32",
                      "--set", "methods=[greedy, pass, majority]", "--set", f"generation={generation}"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert metrics["problems"] == 2 and 0.0 <= metrics["greedy"] <= 1.0
    assert 0.0 <= metrics["pass@1"] <= metrics["pass@2"] <= 1.0
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * 3  # per problem: greedy + 2 samples
    assert all(s["finish_reason"] in ("eos", "stop", "length") for s in samples)


#: The arithmetic problems and answer reward of the served-LoRA stages (rntp reads plain text and brings its own).
PROBLEMS = f"""
data: {{source: arith, params: {{n: 8, steps: 1, max_operand: 9}}}}
rewards: [{{program: {Path(__file__).resolve().parents[1] / "reward" / "math.py"}:answer_match}}]
"""


def _run_served_lora_stage(tmp_path: Path, server: Served, smollm2: Path, kind: str, fields: str,
                           task: str = PROBLEMS) -> tuple[Any, Path]:
    """Run a one-stage ``kind`` recipe on SmolLM2 with a LoRA policy sampled through the server
    (``generation: {backend: openai, serve_adapter: true}``) on ``task`` (its data and rewards); check that every
    adapter version was unloaded and deleted afterwards. Returns the stage's outcome and run folder."""
    import urllib.request

    from alignkit.run.pipeline import run_recipe
    from alignkit.run.recipe import load_recipe

    recipe_file = tmp_path / f"{kind}.yaml"
    recipe_file.write_text(textwrap.dedent(f"""
        name: {kind}-vllm
        tracking: {{report_to: none}}
        stages:
          - kind: {kind}
            model: {smollm2}
            lora: {{r: 8, alpha: 16, dropout: 0.0}}
            max_steps: 2
            save_steps: 2
            max_completion_length: 24
            max_length: 256
            generation: {{backend: openai, base_url: "{server.base_url}", model_name: "{server.model_name}",
                          serve_adapter: true}}
    """) + textwrap.indent(textwrap.dedent(task).strip() + "\n" + textwrap.dedent(fields), "    "))
    recipe = load_recipe(recipe_file, output_dir=str(tmp_path / "runs"))
    (run,) = run_recipe(recipe, echo=lambda *_: None)
    run_dir = recipe.stage(kind).run_dir
    with urllib.request.urlopen(server.base_url + "/models", timeout=30) as answer:
        served = {m["id"] for m in json.load(answer)["data"]}
    assert not any(name.startswith(f"{kind}-rank0-") for name in served), served  # every version unloaded
    assert list((run_dir / "served_adapters").iterdir()) == []
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    return run, run_dir


def test_ppo_samples_through_the_server_with_each_steps_adapter(tmp_path, server, smollm2):
    """ppo with generation {backend: openai, serve_adapter: true}: every step's LoRA adapter is saved, loaded into
    vLLM under a new name, sampled from, and the previous one unloaded (alignkit.generation.served_lora)."""
    _, run_dir = _run_served_lora_stage(tmp_path, server, smollm2, "ppo", """
        num_generations: 2
        batch_size: 2
        lr: 1.0e-3
    """)
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert [row["step"] for row in history] == [1, 2]
    syncs = [row["time/adapter_sync_s"] for row in history]
    print(f"adapter sync (save + load + unload) per step: {[round(s, 3) for s in syncs]} s; "
          f"sampling {[round(row['time/sample_s'], 1) for row in history]} s")
    assert all(0 < s < 30 for s in syncs)
    assert all(0 < row["response/length"] <= 24 for row in history)


def test_grpo_samples_through_the_server_with_each_steps_adapter(tmp_path, server, smollm2):
    """grpo (TRL's GRPOTrainer) with generation {backend: openai, serve_adapter: true}: each generation batch is
    sampled by vLLM from the base model plus the policy's current LoRA adapter."""
    run, _ = _run_served_lora_stage(tmp_path, server, smollm2, "grpo", """
        num_generations: 4
        batch_size: 4
        logging_steps: 1
        lr: 1.0e-4
    """)
    assert run.metrics["train_steps"] == 2 and run.metrics["completions_sampled"] == 8


def test_rntp_samples_through_the_server_with_each_steps_adapter(tmp_path, server, smollm2):
    """rntp trains through TRL's GRPOTrainer: its rollouts come from vLLM with the policy's current adapter, while
    its evaluation samples the fixed model locally (`eval_generation`)."""
    run, run_dir = _run_served_lora_stage(tmp_path, server, smollm2, "rntp", """
        num_generations: 4
        batch_size: 4
        logging_steps: 1
        lr: 1.0e-4
        min_entropy: 0.0
    """, task="""
        data: {source: arith, seed: 3, params: {n: 4, steps: 1, max_operand: 9}}
        eval_data: {source: arith, seed: 9, params: {n: 2, steps: 1, max_operand: 9}}
    """)
    assert run.metrics["train_steps"] == 2 and (run_dir / "eval_after.jsonl").is_file()
