"""Generation engines: ``fast`` against the ``hf`` reference, sampling statistics, the openai protocol.

The tiny test model's default initialisation (std 0.02) gives near-uniform next-token distributions and
constant greedy outputs, which would make every comparison vacuous. The ``sharp`` fixture redraws its
matrices with std 0.3: greedy outputs then vary with the prompt and distributions are peaked.
"""

from __future__ import annotations

import http.server
import json
import math
import threading
import warnings
from pathlib import Path

import pytest
import torch

from alignkit.core.errors import RecipeError
from alignkit.generation import GenerationError, SamplingParams, generation_spec, make_engine
from alignkit.generation import fast as fast_module
from alignkit.generation.engine import finish_completion
from alignkit.generation.hf import plan_calls

QUESTIONS = [
    "Hi",
    "Tom has 3 apples. He buys 4 more. How many apples does he have?",
    "The answer is",
    "Multiply 6 by 5: 6 * 5 = 30. Subtract 2: 30 - 2 = 28. The quick brown fox jumps over the lazy dog.",
    "How do I bake bread?",
    "Start with 3.",
]


@pytest.fixture(scope="module")
def sharp_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    path = tmp_path_factory.mktemp("sharp")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sharp(sharp_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(sharp_dir), AutoTokenizer.from_pretrained(sharp_dir)


@pytest.fixture(scope="module")
def prompts(sharp) -> list[str]:
    _, tok = sharp
    return [
        tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in QUESTIONS
    ]


def _ids(results) -> list[list[list[int]]]:
    return [[c.token_ids for c in row] for row in results]


class _DecodeRowCounter:
    """Counts rows fed to fast's decode forwards: finished rows must stop costing compute.

    Each running row takes one decode step per generated token after the first (which comes from the
    prefill), so a loop that retires rows on time makes exactly sum(len(token_ids) - 1) row-steps.
    """

    def __init__(self, model):
        self.rows = 0
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        cache = kwargs.get(fast_module.cache_argument(module))  # `cache` (`past_key_values` in older transformers)
        if isinstance(cache, fast_module.SlotCache):
            self.rows += kwargs["input_ids"].shape[0]


# ---------------------------------------------------------------------------------------------------------
# Greedy equality with the reference.


def test_fast_greedy_equals_hf_with_left_padding_and_refill(sharp, prompts):
    model, tok = sharp
    params = SamplingParams(max_new_tokens=24, temperature=0, n=3)
    unpadded = make_engine("hf", model=model, tokenizer=tok, batch_size=1).generate(prompts, params, progress=False)
    padded = make_engine("hf", model=model, tokenizer=tok, batch_size=8).generate(prompts, params, progress=False)
    # 4 slots for 6 prompts: admissions, retirements and a refill all happen.
    fast = make_engine("fast", model=model, tokenizer=tok, batch_size=4).generate(prompts, params, progress=False)
    assert _ids(fast) == _ids(padded) == _ids(unpadded)
    assert all(len(row) == 3 and row[0].token_ids == row[1].token_ids == row[2].token_ids for row in fast)
    assert len({tuple(row[0].token_ids) for row in fast}) == len(prompts)  # outputs depend on the prompt
    assert all(c.finish_reason == "length" and len(c.token_ids) == 24 for row in fast for c in row)
    assert [row[0].text for row in fast] == [row[0].text for row in padded]


def test_token_id_prompts_and_small_prefill_budget_give_the_same_rows(sharp, prompts):
    model, tok = sharp
    params = SamplingParams(max_new_tokens=8, temperature=0)
    engine = make_engine("fast", model=model, tokenizer=tok, batch_size=8)
    expected = _ids(engine.generate(prompts, params, progress=False))
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    assert _ids(engine.generate(ids, params, progress=False)) == expected
    # A 64-token prefill budget admits about one prompt per prefill forward.
    spec = generation_spec(backend="fast", batch_size=8, max_prefill_tokens=64)
    small = spec.build(model=model, tokenizer=tok)
    assert small.max_prefill_tokens == 64 and _ids(small.generate(prompts, params, progress=False)) == expected


def test_eos_retires_rows_at_different_steps(sharp, prompts, monkeypatch):
    model, tok = sharp
    params = SamplingParams(max_new_tokens=20, temperature=0)
    free = make_engine("hf", model=model, tokenizer=tok).generate(prompts, params, progress=False)
    # Plant an EOS: a token that occurs at different depths in some outputs and not at all in others.
    rows = [row[0].token_ids for row in free]
    planted = max({t for r in rows for t in r}, key=lambda t: (len({r.index(t) for r in rows if t in r}), -t))
    monkeypatch.setattr(model.generation_config, "eos_token_id", [tok.eos_token_id, planted])
    hf = make_engine("hf", model=model, tokenizer=tok, batch_size=8).generate(prompts, params, progress=False)
    counter = _DecodeRowCounter(model)
    fast = make_engine("fast", model=model, tokenizer=tok, batch_size=2).generate(prompts, params, progress=False)
    counter.handle.remove()
    assert _ids(fast) == _ids(hf)
    assert counter.rows == sum(len(row[0].token_ids) - 1 for row in fast)
    reasons = set()
    for row, full in zip(fast, rows):
        c = row[0]
        if planted in full:
            cut = full.index(planted) + 1
            assert (c.token_ids, c.finish_reason) == (full[:cut], "eos")
            assert c.text == tok.decode(full[: cut - 1])  # the EOS token is not in the text
        else:
            assert (c.token_ids, c.finish_reason) == (full, "length")
        reasons.add(c.finish_reason)
    assert reasons == {"eos", "length"}


@pytest.mark.parametrize("backend", ["hf", "fast"])
def test_stop_string_truncates_text_and_tokens(sharp, prompts, backend):
    model, tok = sharp
    engine = make_engine(backend, model=model, tokenizer=tok, batch_size=4)
    free = engine.generate(prompts, SamplingParams(max_new_tokens=30, temperature=0), progress=False)
    text, ids = free[1][0].text, free[1][0].token_ids
    stop = text[12:15]  # planted: a string the model is known to produce for prompt 1
    counter = _DecodeRowCounter(model)
    got = engine.generate(prompts, SamplingParams(max_new_tokens=30, temperature=0, stop=[stop]), progress=False)
    counter.handle.remove()
    if backend == "fast":
        assert counter.rows == sum(len(row[0].token_ids) - 1 for row in got)
    c = got[1][0]
    assert c.finish_reason == "stop" and c.text == text[: text.find(stop)]
    k = len(c.token_ids)
    assert c.token_ids == ids[:k] and stop in tok.decode(ids[:k]) and stop not in tok.decode(ids[: k - 1])
    for row, before in zip(got, free):  # other rows: cut only where the stop string occurs in them
        expected = before[0].text.find(stop)
        assert row[0].text == (before[0].text if expected < 0 else before[0].text[:expected])


def test_finish_completion_eos_stop_and_length():
    from alignkit.testing import make_tokenizer

    tok = make_tokenizer()
    ids = tok("answer is 7. Done", add_special_tokens=False)["input_ids"]
    eos = tok.eos_token_id
    c = finish_completion(ids + [eos, 5], [0.1] * (len(ids) + 2), tokenizer=tok, eos_ids=[eos], stop=[])
    assert (c.text, c.token_ids, c.finish_reason, len(c.logprobs)) == (
        "answer is 7. Done",
        ids + [eos],
        "eos",
        len(ids) + 1,
    )
    c = finish_completion(ids + [eos], None, tokenizer=tok, eos_ids=[eos], stop=["7.", "Done"])
    assert (c.text, c.finish_reason) == ("answer is ", "stop")
    assert "7." in tok.decode(c.token_ids) and "7." not in tok.decode(c.token_ids[:-1])
    c = finish_completion(ids, None, tokenizer=tok, eos_ids=[eos], stop=["xyz"])
    assert (c.text, c.token_ids, c.finish_reason) == ("answer is 7. Done", ids, "length")


# ---------------------------------------------------------------------------------------------------------
# Sampling: the processors and the distribution.


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 12, 0.8), (1.3, 0, 0.5), (1.0, 3, 1.0), (0.5, 0, 0.95)])
def test_process_logits_equals_hf_warpers(temperature, top_k, top_p):
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(16, 50, generator=torch.Generator().manual_seed(1)) * 3
    logits[0, :10] = 2.0  # ties at the top-k boundary
    expected = TemperatureLogitsWarper(temperature)(None, logits)
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1:
        expected = TopPLogitsWarper(top_p)(None, expected)
    assert torch.equal(fast_module.process_logits(logits, temperature, top_k, top_p), expected)


TEMPERATURE, TOP_K, TOP_P = 0.7, 12, 0.8


def _reference_probs(logits: torch.Tensor) -> torch.Tensor:
    """Exact sampling distribution by transformers' own warpers, in generate's order."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    scores = TemperatureLogitsWarper(TEMPERATURE)(None, logits)
    scores = TopPLogitsWarper(TOP_P)(None, TopKLogitsWarper(TOP_K)(None, scores))
    return scores.softmax(-1)


@pytest.fixture(scope="module")
def exact_two_token_distribution(sharp, prompts):
    """(p(first token), p(second token)) for prompt 1, the second marginalised over the first."""
    model, tok = sharp
    ids = tok(prompts[1], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        p1 = _reference_probs(model(torch.tensor([ids])).logits[:, -1].float())[0]
        support = p1.nonzero().squeeze(-1)
        nxt = model(torch.tensor([ids + [t] for t in support.tolist()])).logits[:, -1].float()
        p2 = (p1[support, None] * _reference_probs(nxt)).sum(0)
    return p1, p2


def chi_square_p_value(samples: list[int], probs: torch.Tensor) -> float:
    """Goodness-of-fit p-value (bins with expected count < 5 pooled; Wilson-Hilferty approximation).

    A sample outside the support has probability 0 under ``probs``: p-value 0.
    """
    counts = torch.bincount(torch.tensor(samples), minlength=len(probs)).double()
    if (counts[probs == 0] > 0).any():
        return 0.0
    expected = probs.double() * counts.sum()
    big = expected >= 5
    observed = torch.cat([counts[big], counts[~big].sum()[None]])
    expected = torch.cat([expected[big], expected[~big].sum()[None]])
    observed, expected = observed[expected > 0], expected[expected > 0]
    x2, dof = ((observed - expected) ** 2 / expected).sum().item(), len(observed) - 1
    z = ((x2 / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


def _two_token_p_values(engine, prompt, exact, seed) -> tuple[float, float]:
    params = SamplingParams(max_new_tokens=2, temperature=TEMPERATURE, top_k=TOP_K, top_p=TOP_P, n=2000, seed=seed)
    out = engine.generate([prompt], params, progress=False)[0]
    assert len(out) == 2000
    return tuple(chi_square_p_value([c.token_ids[i] for c in out], p) for i, p in enumerate(exact))


@pytest.mark.parametrize("backend,seed", [("fast", 1), ("hf", 2)])
def test_sampled_tokens_follow_generates_distribution(sharp, prompts, exact_two_token_distribution, backend, seed):
    model, tok = sharp
    engine = make_engine(backend, model=model, tokenizer=tok, batch_size=1000)
    p_first, p_second = _two_token_p_values(engine, prompts[1], exact_two_token_distribution, seed)
    assert p_first > 1e-3 and p_second > 1e-3


def _temperature_after_top_p(logits, t, k, p):
    return ORIGINAL_PROCESS(logits, 1.0, k, p) / t


def _no_temperature(logits, t, k, p):
    return ORIGINAL_PROCESS(logits, 1.0, k, p)


def _top_k_off_by_one(logits, t, k, p):
    return ORIGINAL_PROCESS(logits, t, k + 1, p)


def _top_p_keeps_one_more(logits, t, k, p):
    logits = ORIGINAL_PROCESS(logits, t, k, 1.0)
    sorted_logits, order = torch.sort(logits)
    drop = sorted_logits.softmax(-1).cumsum(-1) <= (1 - p)
    drop = torch.cat([drop[..., 1:], torch.zeros_like(drop[..., :1])], dim=-1)  # off by one
    return logits.masked_fill(drop.scatter(1, order, drop), -float("inf"))


ORIGINAL_PROCESS = fast_module.process_logits


@pytest.mark.parametrize(
    "broken", [_temperature_after_top_p, _no_temperature, _top_k_off_by_one, _top_p_keeps_one_more]
)
def test_distribution_check_rejects_broken_samplers(sharp, prompts, exact_two_token_distribution, monkeypatch, broken):
    # The check above is only worth something if it fails for plausible sampler bugs.
    model, tok = sharp
    monkeypatch.setattr(fast_module, "process_logits", broken)
    engine = make_engine("fast", model=model, tokenizer=tok, batch_size=1000)
    assert min(_two_token_p_values(engine, prompts[1], exact_two_token_distribution, seed=1)) < 1e-6


def test_seeded_sampling_is_reproducible(sharp, prompts):
    model, tok = sharp
    params = SamplingParams(max_new_tokens=4, temperature=1.0, n=3, seed=7)
    for backend in ("hf", "fast"):
        engine = make_engine(backend, model=model, tokenizer=tok, batch_size=8)
        first = _ids(engine.generate(prompts[:2], params, progress=False))
        assert first == _ids(engine.generate(prompts[:2], params, progress=False))
        assert first != _ids(engine.generate(prompts[:2], params.model_copy(update={"seed": 8}), progress=False))


@pytest.mark.parametrize("backend", ["hf", "fast"])
def test_more_samples_than_slots(sharp, prompts, backend):
    model, tok = sharp
    out = make_engine(backend, model=model, tokenizer=tok, batch_size=4).generate(
        prompts[:3], SamplingParams(max_new_tokens=5, n=10, seed=0), progress=False
    )
    assert [len(row) for row in out] == [10, 10, 10]
    assert all(1 <= len(c.token_ids) <= 5 for row in out for c in row)
    assert len({tuple(c.token_ids) for c in out[1]}) > 1  # samples, not copies


# ---------------------------------------------------------------------------------------------------------
# Log-probs, LoRA, 4-bit, fallback.


@pytest.mark.parametrize("backend", ["hf", "fast"])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_logprobs_equal_teacher_forced_log_softmax(sharp, prompts, backend, temperature):
    model, tok = sharp
    params = SamplingParams(max_new_tokens=10, temperature=temperature, top_p=0.9, n=3, seed=3, return_logprobs=True)
    out = make_engine(backend, model=model, tokenizer=tok, batch_size=4).generate(prompts[:3], params, progress=False)
    scale = temperature or 1.0
    for prompt, row in zip(prompts, out):
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        for c in row:
            with torch.no_grad():
                logits = model(torch.tensor([ids + c.token_ids])).logits[0, len(ids) - 1 : -1].float()
            expected = torch.log_softmax(logits / scale, -1).gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
            assert len(c.logprobs) == len(c.token_ids)
            torch.testing.assert_close(torch.tensor(c.logprobs), expected, atol=1e-4, rtol=0)


def test_lora_model_greedy_matches_hf(sharp, prompts):
    from peft import LoraConfig, get_peft_model

    model, tok = sharp
    params = SamplingParams(max_new_tokens=10, temperature=0)
    prompts = prompts[:4]
    base = make_engine("hf", model=model, tokenizer=tok).generate(prompts, params, progress=False)
    torch.manual_seed(0)
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    try:
        hf = make_engine("hf", model=lora, tokenizer=tok, batch_size=8).generate(prompts, params, progress=False)
        fast = make_engine("fast", model=lora, tokenizer=tok, batch_size=4).generate(prompts, params, progress=False)
    finally:
        lora.unload()  # give the shared fixture its plain modules back
    assert _ids(fast) == _ids(hf)
    assert _ids(fast) != _ids(base)  # the adapter is active


def test_4bit_model_greedy_matches_hf(sharp_dir, prompts):
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(sharp_dir, quantization_config=quant)
    tok = AutoTokenizer.from_pretrained(sharp_dir)
    params = SamplingParams(max_new_tokens=8, temperature=0)
    hf = make_engine("hf", model=model, tokenizer=tok, batch_size=8).generate(prompts[:3], params, progress=False)
    fast = make_engine("fast", model=model, tokenizer=tok, batch_size=8).generate(prompts[:3], params, progress=False)
    assert _ids(fast) == _ids(hf)


@pytest.mark.parametrize("arch,attn", [("llama", "eager"), ("qwen3", "sdpa")])
def test_other_architecture_and_attention_kernel(sharp_dir, prompts, arch, attn):
    # Qwen3 (q/k norms, explicit head_dim) from config; eager attention takes an additive float mask.
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3Config

    tok = AutoTokenizer.from_pretrained(sharp_dir)
    if arch == "llama":
        model = AutoModelForCausalLM.from_pretrained(sharp_dir, attn_implementation=attn)
    else:
        config = Qwen3Config(
            vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )  # fmt: skip
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
        with torch.no_grad():
            for param in model.parameters():
                if param.dim() == 2:
                    param.normal_(0, 0.3)
    assert model.config._attn_implementation == attn
    params = SamplingParams(max_new_tokens=12, temperature=0, n=2)
    hf = make_engine("hf", model=model, tokenizer=tok, batch_size=8).generate(prompts, params, progress=False)
    fast = make_engine("fast", model=model, tokenizer=tok, batch_size=3).generate(prompts, params, progress=False)
    assert _ids(fast) == _ids(hf) and len({tuple(row[0].token_ids) for row in fast}) > 1


def test_unsupported_model_falls_back_to_hf_with_one_warning(sharp, prompts, monkeypatch):
    model, tok = sharp
    monkeypatch.setattr(
        model.config, "layer_types", ["sliding_attention"] * model.config.num_hidden_layers, raising=False
    )
    assert "sliding_attention" in fast_module.unsupported_reason(model)
    with pytest.warns(RuntimeWarning, match="using the hf backend") as record:
        engine = make_engine("fast", model=model, tokenizer=tok)
    assert len(record) == 1
    monkeypatch.undo()
    params = SamplingParams(max_new_tokens=6, temperature=0)
    assert engine.fallback is not None
    assert _ids(engine.generate(prompts, params, progress=False)) == _ids(
        make_engine("hf", model=model, tokenizer=tok).generate(prompts, params, progress=False)
    )


def test_compile_is_ignored_on_cpu_with_a_warning(sharp):
    model, tok = sharp
    with pytest.warns(RuntimeWarning, match="CUDA-only"):
        engine = make_engine("fast", model=model, tokenizer=tok, compile=True)
    assert engine.decode_forward is model


# ---------------------------------------------------------------------------------------------------------
# Specs and the factory.


def test_plan_calls_splits_rows_by_batch_size():
    assert plan_calls([2, 0, 1], rows_per_prompt=2, batch_size=4) == [([2, 0], 2), ([1], 2)]
    assert plan_calls([0, 1], rows_per_prompt=5, batch_size=2) == [
        ([0], 2),
        ([0], 2),
        ([0], 1),
        ([1], 2),
        ([1], 2),
        ([1], 1),
    ]


def test_specs_reject_mistakes():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="base_url\n  Field required"):
        generation_spec(backend="openai", model_name="m")
    with pytest.raises(ValidationError, match="extra"):
        generation_spec(batchsize=3)
    with pytest.raises(ValidationError, match="extra"):  # an option of another backend is not silently ignored
        generation_spec(backend="hf", max_prefill_tokens=64)
    with pytest.raises(ValidationError, match="backend must be one of"):
        generation_spec(backend="vllm")
    assert generation_spec(batch_size=8).backend == "fast"  # the default backend when the block names none
    with pytest.raises(ValidationError):
        SamplingParams(stop=[""])
    with pytest.raises(ValidationError):
        SamplingParams(top_p=0)
    with pytest.raises(RecipeError, match="generation.compile"):
        make_engine("hf", model=object(), tokenizer=object(), compile=True)
    with pytest.raises(RecipeError, match="generation.backend"):
        make_engine("vllm")


# ---------------------------------------------------------------------------------------------------------
# openai backend against a local stub server.


class _Stub(http.server.BaseHTTPRequestHandler):
    """Answers POST /v1/completions from ``server.script`` (a list of (status, reply or None)), then echoes."""

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.requests.append((self.path, dict(self.headers), body))
            status, reply = self.server.script.pop(0) if self.server.script else (200, None)
        if reply is None and status == 200:
            reply = {"choices": [_echo_choice(body, i) for i in reversed(range(body["n"]))]}  # any order
        payload = json.dumps(reply or {"error": "boom"}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def _echo_choice(body: dict, i: int) -> dict:
    finish = [("stop", None), ("length", None), ("stop", "\n\n")][i % 3]
    return {
        "index": i,
        "text": f"{body['prompt']}#{i}",
        "finish_reason": finish[0],
        "stop_reason": finish[1],
        "logprobs": {"token_logprobs": [-0.5, -0.25]},
        "token_ids": [i, i + 1],
    }


@pytest.fixture
def stub():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    server.requests, server.script, server.lock = [], [], threading.Lock()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _openai(stub):
    spec = generation_spec(
        backend="openai",
        base_url=f"http://127.0.0.1:{stub.server_address[1]}/v1/",
        model_name="policy",
        batch_size=3,
        api_key_env="ALIGNKIT_TEST_KEY",
        max_retries=2,
    )
    engine = spec.build()
    engine.backoff_s = 0.01
    return engine


def test_openai_request_fields_and_response_mapping(stub, monkeypatch):
    monkeypatch.setenv("ALIGNKIT_TEST_KEY", "sk-secret")
    engine = _openai(stub)
    params = SamplingParams(
        max_new_tokens=7, temperature=0.6, top_p=0.9, top_k=5, n=3, stop=["\n\n"], seed=4, return_logprobs=True
    )
    prompts = [f"p{i}" for i in range(5)]
    out = engine.generate(prompts, params, progress=False)
    assert [[c.text for c in row] for row in out] == [[f"p{i}#{j}" for j in range(3)] for i in range(5)]
    assert [c.finish_reason for c in out[0]] == ["eos", "length", "stop"]
    assert out[0][2].token_ids == [2, 3] and out[0][2].logprobs == [-0.5, -0.25]
    assert len(stub.requests) == 5
    path, headers, body = stub.requests[0]
    assert path == "/v1/completions" and headers["Authorization"] == "Bearer sk-secret"
    assert {k: v for k, v in body.items() if k != "prompt"} == {
        "model": "policy",
        "n": 3,
        "max_tokens": 7,
        "temperature": 0.6,
        "top_p": 0.9,
        "top_k": 5,
        "stop": ["\n\n"],
        "seed": 4,
        "logprobs": 0,
    }
    assert "sk-secret" not in repr(engine)
    ids_out = engine.generate([[5, 6, 7]], SamplingParams(max_new_tokens=2, top_k=0), progress=False)
    assert stub.requests[-1][2]["prompt"] == [5, 6, 7] and "top_k" not in stub.requests[-1][2]
    assert ids_out[0][0].logprobs is None


def test_openai_retries_5xx_then_succeeds(stub):
    stub.script[:] = [(500, None), (503, None)]
    out = _openai(stub).generate(["x"], SamplingParams(n=1), progress=False)
    assert out[0][0].text == "x#0" and len(stub.requests) == 3


def test_openai_gives_up_after_max_retries_and_fails_fast_on_4xx(stub, monkeypatch):
    monkeypatch.setenv("ALIGNKIT_TEST_KEY", "sk-secret")
    stub.script[:] = [(500, None)] * 10
    with pytest.raises(GenerationError, match="failed 3 times; last error: HTTP 500") as err:
        _openai(stub).generate(["x"], SamplingParams(), progress=False)
    assert "sk-secret" not in str(err.value) and len(stub.requests) == 3
    stub.script[:] = [(400, {"error": "bad top_k"})]
    with pytest.raises(GenerationError, match="HTTP 400.*bad top_k"):
        _openai(stub).generate(["x"], SamplingParams(), progress=False)
    assert len(stub.requests) == 4


def test_openai_connection_refused_is_retried_then_reported(stub):
    engine = _openai(stub)
    stub.shutdown()
    stub.server_close()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        with pytest.raises(GenerationError, match="failed 3 times; last error: URLError"):
            engine.generate(["x"], SamplingParams(), progress=False)


def test_fast_returns_samples_in_admission_order_not_by_length(sharp, prompts, monkeypatch):
    """Rows finish shortest-first; callers whose vote ties go to the first sample must not see that order."""
    model, tok = sharp
    params = SamplingParams(max_new_tokens=12, temperature=1.5, n=8, seed=3)
    sampled = make_engine("hf", model=model, tokenizer=tok).generate(prompts[:3], params, progress=False)
    counts: dict[int, int] = {}
    for row in sampled:
        for c in row:
            for t in c.token_ids[1:6]:
                counts[t] = counts.get(t, 0) + 1
    planted = max(counts, key=counts.get)  # a frequent token as EOS: lengths vary from sample to sample
    monkeypatch.setattr(model.generation_config, "eos_token_id", [tok.eos_token_id, planted])
    fast = make_engine("fast", model=model, tokenizer=tok, batch_size=64).generate(prompts[:3], params,
                                                                                  progress=False)
    lengths = [[len(c.token_ids) for c in row] for row in fast]
    assert any(len(set(row)) > 1 for row in lengths), lengths
    assert not all(row == sorted(row) for row in lengths), lengths  # was always shortest-first
    again = make_engine("fast", model=model, tokenizer=tok, batch_size=64).generate(prompts[:3], params,
                                                                                   progress=False)
    assert _ids(again) == _ids(fast)  # seeded and ordered: the same samples in the same places


def test_generation_block_errors_name_the_recipe_field(tmp_path):
    """A recipe's generation block is one spec per backend: mistakes are one line naming the field as the
    recipe spells it (no union tag), with the backend an option belongs to."""
    from alignkit.core.errors import RecipeError
    from alignkit.run.recipe import load_recipe

    def error(block: str) -> str:
        path = tmp_path / "r.yaml"
        path.write_text("name: r\nstages:\n  - kind: label\n    model: m\n    data: {source: arith}\n"
                        f"    generation: {block}\n")
        with pytest.raises(RecipeError) as info:
            load_recipe(path)
        return str(info.value)

    assert "stages.label.generation.base_url: Field required" in error("{backend: openai, model_name: m}")
    message = error("{backend: hf, max_prefill_tokens: 8}")
    assert "stages.label.generation.max_prefill_tokens: unknown field" in message
    assert "option of backend fast" in message and "allowed fields: ['backend', 'batch_size']" in message
    assert "did you mean `batch_size`" in error("{backend: fast, batchsize: 8}")
    assert "must be one of ['hf', 'fast', 'openai']" in error("{backend: vllm}")


def test_each_spec_builds_its_own_engine(sharp):
    from alignkit.generation import FastSpec, HFSpec
    from alignkit.generation.fast import FastEngine
    from alignkit.generation.hf import HFEngine

    model, tok = sharp
    assert isinstance(HFSpec(batch_size=2).build(model=model, tokenizer=tok), HFEngine)
    fast = FastSpec(batch_size=2, max_prefill_tokens=32).build(model=model, tokenizer=tok)
    assert isinstance(fast, FastEngine) and fast.max_prefill_tokens == 32
    with pytest.raises(Exception, match="needs a loaded model"):
        HFSpec().build()
