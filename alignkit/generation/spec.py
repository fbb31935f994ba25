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

    def build(self, *, model: Any = None, tokenizer: Any = None) -> Engine:
        """``tokenizer`` is optional: it fills ``token_ids`` when the server returns none; ``model`` is unused
        (the server holds the weights)."""
        from alignkit.generation.openai import OpenAIEngine

        return OpenAIEngine(self.base_url, self.model_name, tokenizer=tokenizer, batch_size=self.batch_size,
                            api_key_env=self.api_key_env, timeout_s=self.timeout_s, max_retries=self.max_retries,
                            request_token_ids=self.request_token_ids)


SPECS: dict[str, type[Spec]] = {"hf": HFSpec, "fast": FastSpec, "openai": OpenAISpec}
BACKENDS = tuple(SPECS)


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
        custom_error_message=f"generation.backend must be one of {list(BACKENDS)}",
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
