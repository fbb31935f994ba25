"""Generation for every generating stage: a stage's ``generation:`` spec builds the engine
(``spec.build(model=..., tokenizer=...)``, or ``make_engine(backend, ...)`` outside recipes), then
``engine.generate(prompts, SamplingParams(...))``. See :mod:`alignkit.generation.engine` for the conventions
every backend keeps and :mod:`alignkit.generation.spec` for the backends' options."""

from alignkit.generation.engine import Completion, Engine, GenerationError, SamplingParams
from alignkit.generation.spec import FastSpec, GenerationSpec, HFSpec, OpenAISpec, generation_spec, make_engine

__all__ = [
    "Completion",
    "Engine",
    "FastSpec",
    "GenerationError",
    "GenerationSpec",
    "HFSpec",
    "OpenAISpec",
    "SamplingParams",
    "generation_spec",
    "make_engine",
]
