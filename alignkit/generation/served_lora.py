"""Sampling an on-policy LoRA policy from a served base model: vLLM's runtime LoRA loading.

An on-policy stage (``ppo``) samples from the policy it is training. With ``generation: {backend: openai,
serve_adapter: true, ...}`` the server holds the *base* weights once (the stage's ``model``), and before every
sampling call :class:`AdapterSyncEngine` saves the policy's current LoRA adapter (a few MB) to a folder the server
can read and asks the server to load it under a new name (``POST {base_url}/load_lora_adapter``); the samples are
then requested with that name as the ``model``, and the previous version is unloaded and deleted. The server
never needs the full weights again.

The server (vLLM):

    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True python -m vllm.entrypoints.openai.api_server --model BASE \\
        --enable-lora --max-lora-rank 16 ...

``BASE`` must be the stage's starting model (the folder the policy's adapter was created on), the adapter folder
must be on a file system the server reads (same machine, or a shared mount: ``adapter_dir``), and
``--max-lora-rank`` at least the stage's ``lora.r``. Each process of a multi-process run loads its own copy
(names carry the rank). The time of each sync (save + load + unload) is kept in :attr:`last_sync_s` and
reported by the stage (``time/adapter_sync_s``).
"""

from __future__ import annotations

import secrets
import shutil
import time
from pathlib import Path
from typing import Any

from alignkit.core.errors import GenerationError
from alignkit.generation.engine import Completion, Progress, SamplingParams
from alignkit.generation.openai import OpenAIEngine, post_json


class AdapterSyncEngine:
    """An :class:`~alignkit.generation.openai.OpenAIEngine` that follows ``policy``'s LoRA adapter."""

    backend = "openai"

    def __init__(self, served: OpenAIEngine, policy: Any, adapter_dir: str | Path, *, name: str):
        if not hasattr(policy, "peft_config"):
            raise TypeError("serve_adapter needs a LoRA policy (a PEFT model): the server holds only the base weights")
        self.served, self.policy = served, policy
        # a token per engine: a rerun after a crash must not ask the server for a name the crashed run left loaded
        # (vLLM refuses a name twice), so versions are <name>-<token>-v<n>
        self.adapter_dir, self.name = Path(adapter_dir), f"{name}-{secrets.token_hex(3)}"
        self.root = served.url.rsplit("/completions", 1)[0]  # .../v1
        self.version = 0
        self.loaded: str | None = None
        self.last_sync_s: float | None = None

    @classmethod
    def from_spec(cls, spec: Any, policy: Any, tokenizer: Any, run_dir: Path, name: str) -> AdapterSyncEngine:
        """The engine of an ``openai`` block with ``serve_adapter`` (ppo, grpo, rloo): exact token ids (the stage
        scores the very tokens sampled), versions written to ``spec.adapter_dir`` or ``run_dir/served_adapters``."""
        folder = Path(spec.adapter_dir) if spec.adapter_dir else Path(run_dir) / "served_adapters"
        return cls(spec.served_engine(tokenizer, token_ids=True), policy, folder, name=name)

    def __repr__(self) -> str:
        return f"AdapterSyncEngine({self.served!r}, adapter={self.loaded!r})"

    def generate(self, prompts: list[str] | list[list[int]], params: SamplingParams, *,
                 progress: bool | Progress = True) -> list[list[Completion]]:
        """Sync the adapter, then sample from base + adapter (see the module docstring)."""
        self.sync()
        return self.served.generate(prompts, params, progress=progress)

    def sync(self) -> str:
        """Save the policy's adapter as a new version, load it on the server, retire the previous one."""
        started = time.perf_counter()
        self.version += 1
        name = f"{self.name}-v{self.version}"
        folder = (self.adapter_dir / name).resolve()
        if folder.exists():  # left by a crashed run: the server may have it cached under this name
            shutil.rmtree(folder)
        self.policy.save_pretrained(str(folder))
        try:
            self._post("load_lora_adapter", {"lora_name": name, "lora_path": str(folder)})
        except GenerationError as err:
            shutil.rmtree(folder, ignore_errors=True)
            answer = " ".join(str(err).split())  # one line, whatever the server's error page looks like
            raise GenerationError(
                f"the server did not load the policy's adapter from {folder} ({answer}); it must read that folder (run "
                "it on this machine, or set generation.adapter_dir to a mount it shares) and be started with "
                "--enable-lora, --max-lora-rank >= lora.r and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True") from None
        previous, self.loaded = self.loaded, name
        self.served.model_name = name
        if previous is not None:
            self._post("unload_lora_adapter", {"lora_name": previous})
            shutil.rmtree(self.adapter_dir / previous, ignore_errors=True)
        self.last_sync_s = time.perf_counter() - started
        return name

    def close(self) -> None:
        """Unload the last version and delete its folder (the server keeps running)."""
        if self.loaded is not None:
            try:
                self._post("unload_lora_adapter", {"lora_name": self.loaded})
            finally:
                shutil.rmtree(self.adapter_dir / self.loaded, ignore_errors=True)
                self.loaded = None

    def _post(self, endpoint: str, body: dict) -> Any:
        # vLLM answers these with plain text, not JSON: post_json's parsing is skipped (raw=True)
        return post_json(f"{self.root}/{endpoint}", body, api_key=self.served._api_key,
                         timeout_s=self.served.timeout_s, max_retries=self.served.max_retries,
                         backoff_s=self.served.backoff_s, raw=True)
