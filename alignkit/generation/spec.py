"""The ``generation:`` block of a stage config: one spec per backend, each building its engine.

``generation: {backend: fast, batch_size: 64}`` validates as :class:`FastSpec`; the ``backend`` key picks the
class (``fast`` when it is left out), so an option that belongs to another backend is an unknown field, not
silently ignored. ``spec.build(model=..., tokenizer=...)`` makes the engine; the backend module is imported
only then (torch and transformers are not needed to validate a recipe).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, TypeAdapter

from alignkit.core.config import Spec
from alignkit.core.errors import RecipeError
from alignkit.generation.engine import Engine

DEFAULT_BACKEND = "fast"


class _LocalSpec(Spec):
    batch_size: int = Field(64, gt=0, description="Most sequences decoded together (KV memory grows with it).")

    def _model_and_tokenizer(self, model: Any, tokenizer: Any) -> None:
        if model is None or tokenizer is None:
            raise RecipeError(f"the {self.backend} backend needs a loaded model and tokenizer",
                              field="generation.backend")


class HFSpec(_LocalSpec):
    """``model.generate``: the reference the other backends are tested against."""

    backend: Literal["hf"] = "hf"

    def build(self, *, model: Any = None, tokenizer: Any = None) -> Engine:
        from alignkit.generation.hf import HFEngine

        self._model_and_tokenizer(model, tokenizer)
        return HFEngine(model, tokenizer, batch_size=self.batch_size)


class FastSpec(_LocalSpec):
    """Our decode loop: shared prefixes prefilled once, finished rows replaced by queued prompts."""

    backend: Literal["fast"] = "fast"
    max_prefill_tokens: int = Field(8192, gt=0, description="Most (padded) prompt tokens prefilled in one forward.")
    compile: bool = Field(False, description="torch.compile the decode step (CUDA only; ignored on CPU).")

    def build(self, *, model: Any = None, tokenizer: Any = None) -> Engine:
        from alignkit.generation.fast import FastEngine

        self._model_and_tokenizer(model, tokenizer)
        return FastEngine(model, tokenizer, batch_size=self.batch_size,
                          max_prefill_tokens=self.max_prefill_tokens, compile=self.compile)


class OpenAISpec(Spec):
    """An OpenAI-compatible ``/completions`` server (vLLM, SGLang, ``transformers serve``)."""

    backend: Literal["openai"] = "openai"
    base_url: str = Field(..., description="Server root, e.g. http://127.0.0.1:8000/v1.")
    model_name: str = Field(..., description="The `model` field of each request.")
    batch_size: int = Field(64, gt=0, description="Concurrent requests.")
    api_key_env: str = Field("OPENAI_API_KEY", description="Env var holding the API key (optional).")
    timeout_s: float = Field(600.0, gt=0, description="Per-request timeout.")
    max_retries: int = Field(4, ge=0, description="Retries on 5xx/429/connection errors.")
    request_token_ids: bool = Field(
        False, description="Ask for token ids (vLLM's return_token_ids) instead of re-tokenizing text."
    )
    serve_adapter: bool = Field(
        False, description="ppo: the server holds the base model; before each step the policy's LoRA adapter is "
        "loaded into it (vLLM runtime LoRA: --enable-lora, VLLM_ALLOW_RUNTIME_LORA_UPDATING=True; docs/perf.md).")
    adapter_dir: str | None = Field(
        None, description="serve_adapter: where adapter versions are written for the server to read (default: "
        "the stage folder's served_adapters/; a shared mount when the server is on another machine).")

    def build(self, *, model: Any = None, tokenizer: Any = None) -> Engine:
        """``tokenizer`` is optional: it fills ``token_ids`` when the server returns none; ``model`` is unused
        (the server holds the weights). A block with ``serve_adapter`` is built by the on-policy stage that
        owns the adapter (:class:`~alignkit.generation.served_lora.AdapterSyncEngine`), not here."""
        if self.serve_adapter:
            raise RecipeError("serve_adapter follows the LoRA policy of a stage that trains one (ppo); this stage "
                              "samples a fixed model: leave it out", field="generation.serve_adapter")
        return self.served_engine(tokenizer)

    def served_engine(self, tokenizer: Any = None, *, token_ids: bool | None = None) -> Engine:
        """The plain HTTP engine of this block (``token_ids`` overrides ``request_token_ids``)."""
        from alignkit.generation.openai import OpenAIEngine

        return OpenAIEngine(self.base_url, self.model_name, tokenizer=tokenizer, batch_size=self.batch_size,
                            api_key_env=self.api_key_env, timeout_s=self.timeout_s, max_retries=self.max_retries,
                            request_token_ids=self.request_token_ids if token_ids is None else token_ids)


class TRLSamplingSpec(Spec):
    """``grpo``/``rloo`` only: TRL samples with ``model.generate`` inside its trainer (their default)."""

    backend: Literal["trl"] = "trl"


class VLLMSpec(Spec):
    """``grpo``/``rloo`` only: TRL's own vLLM integration (``GRPOConfig.use_vllm``), on CUDA machines.

    ``mode: server``: a ``trl vllm-serve --model <the stage's model>`` process on other GPUs holds a copy of the
    policy; TRL sends it the updated weights every step and samples there. ``mode: colocate``: vLLM runs inside
    each training process, sharing its GPU (``gpu_memory_utilization`` of it). docs/perf.md has the commands.
    """

    backend: Literal["vllm"] = "vllm"
    mode: Literal["server", "colocate"] = Field("server", description="A separate `trl vllm-serve` process "
                                                "(server) or vLLM inside each training process (colocate).")
    server_base_url: str | None = Field(None, description="server: the vllm-serve root, e.g. http://node2:8000 "
                                        "(default: server_host and server_port).")
    server_host: str = Field("127.0.0.1", description="server: host of `trl vllm-serve` when no base url.")
    server_port: int = Field(8000, gt=0, lt=65536, description="server: its port when no base url.")
    server_timeout_s: float = Field(240.0, gt=0, description="server: how long to wait for it to answer.")
    gpu_memory_utilization: float = Field(0.3, gt=0, le=1, description="colocate: share of each GPU for vLLM.")
    tensor_parallel_size: int = Field(1, gt=0, description="colocate: GPUs one vLLM engine spans.")
    max_model_length: int | None = Field(None, gt=0, description="colocate: vLLM's context length (default: "
                                         "the model's).")
    enable_sleep_mode: bool = Field(False, description="colocate: free vLLM's memory during the optimizer step.")
    importance_sampling_correction: bool = Field(
        True, description="Correct the loss for vLLM's sampling probabilities differing from the trainer's "
        "(TRL's truncated importance sampling).")

    def trl_args(self) -> dict[str, Any]:
        """The ``GRPOConfig``/``RLOOConfig`` arguments this block sets (TRL's names)."""
        args: dict[str, Any] = {"use_vllm": True, "vllm_mode": self.mode,
                                "vllm_importance_sampling_correction": self.importance_sampling_correction}
        if self.mode == "server":
            args.update(vllm_server_host=self.server_host, vllm_server_port=self.server_port,
                        vllm_server_timeout=self.server_timeout_s)
            if self.server_base_url:
                args["vllm_server_base_url"] = self.server_base_url
        else:
            args.update(vllm_gpu_memory_utilization=self.gpu_memory_utilization,
                        vllm_tensor_parallel_size=self.tensor_parallel_size,
                        vllm_enable_sleep_mode=self.enable_sleep_mode)
            if self.max_model_length:
                args["vllm_max_model_length"] = self.max_model_length
        return args

    def serve_command(self, model: str) -> str:
        """The command that starts the server this block points at (mode server)."""
        return f"trl vllm-serve --model {model} --host {self.server_host} --port {self.server_port}"


SPECS: dict[str, type[Spec]] = {"hf": HFSpec, "fast": FastSpec, "openai": OpenAISpec, "trl": TRLSamplingSpec,
                                "vllm": VLLMSpec}
#: Every backend name a ``generation`` block can hold (``trl`` and ``vllm`` only in grpo/rloo).
BACKENDS = tuple(SPECS)
#: The engines every generating stage can build (:func:`make_engine`).
ENGINE_BACKENDS = ("hf", "fast", "openai")
#: What samples inside TRL's online trainers (grpo, rloo): TRL itself, our local engines, or TRL's vLLM.
RL_BACKENDS = ("trl", "fast", "hf", "vllm", "openai")


def _backend_of(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("backend", DEFAULT_BACKEND)
    return getattr(value, "backend", None)


#: The type of every stage's ``generation`` field.
GenerationSpec = Annotated[
    Annotated[HFSpec, Tag("hf")] | Annotated[FastSpec, Tag("fast")] | Annotated[OpenAISpec, Tag("openai")],
    Discriminator(
        _backend_of,
        custom_error_type="backend",
        custom_error_message=f"generation.backend must be one of {list(ENGINE_BACKENDS)}",
    ),
]

#: The type of grpo's and rloo's ``generation`` field: who samples the completions TRL trains on.
RLGenerationSpec = Annotated[
    Annotated[TRLSamplingSpec, Tag("trl")] | Annotated[FastSpec, Tag("fast")] | Annotated[HFSpec, Tag("hf")]
    | Annotated[VLLMSpec, Tag("vllm")] | Annotated[OpenAISpec, Tag("openai")],
    Discriminator(
        _backend_of,
        custom_error_type="backend",
        custom_error_message=f"generation.backend must be one of {list(RL_BACKENDS)} in grpo and rloo",
    ),
]

_ADAPTER: TypeAdapter = TypeAdapter(GenerationSpec)


def generation_spec(**fields: Any) -> HFSpec | FastSpec | OpenAISpec:
    """The spec for ``fields`` as a recipe would write them: ``generation_spec(backend="hf", batch_size=8)``."""
    return _ADAPTER.validate_python(fields)


def make_engine(backend: str = DEFAULT_BACKEND, *, model: Any = None, tokenizer: Any = None, **options: Any) -> Engine:
    """Build an engine from keyword options (``batch_size``, ``base_url``, ``max_prefill_tokens``...); an option
    the backend does not take is an error naming it. Recipes go through their stage's ``generation`` spec."""
    from pydantic import ValidationError

    try:
        spec = generation_spec(backend=backend, **options)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(p) for p in error["loc"] if p not in BACKENDS) or "backend"
        message = error["msg"].replace("Extra inputs are not permitted", f"does not apply to backend {backend!r}")
        raise RecipeError(message, field=f"generation.{field}") from None
    return spec.build(model=model, tokenizer=tokenizer)
