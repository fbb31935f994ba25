"""Generation for every generating stage: ``make_engine(...)`` or ``engine_from_spec(spec)``, then
``engine.generate(prompts, SamplingParams(...))``. See :mod:`alignkit.generation.engine`."""

from alignkit.generation.engine import (
    Completion,
    Engine,
    GenerationError,
    GenerationSpec,
    SamplingParams,
    engine_from_spec,
    make_engine,
)

__all__ = [
    "Completion",
    "Engine",
    "GenerationError",
    "GenerationSpec",
    "SamplingParams",
    "engine_from_spec",
    "make_engine",
]
