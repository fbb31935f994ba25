"""Our engines inside TRL's online trainers: ``grpo``/``rloo`` with ``generation: {backend: fast}``.

TRL 1.16's ``GRPOTrainer`` and ``RLOOTrainer`` make a batch in three steps: tokenize the prompts (chat template,
tools), call ``_generate_single_turn(prompt_ids, ...)`` for the completions, then decode, score and compute the
advantages. :func:`with_engine` returns a subclass of the trainer whose ``_generate_single_turn`` samples with
one of our engines instead of ``model.generate``; everything before and after it is TRL's own code.

Why that method and not GRPOTrainer's ``rollout_func``: ``rollout_func`` is handed the prompts untokenized, so
we would re-implement TRL's prompt rendering (chat-template arguments, per-environment tool schemas), and any
difference would change what the policy is trained on; and ``RLOOTrainer`` 1.16 has no ``rollout_func``. The
override gets TRL's own prompt ids and returns what TRL's ``transformers`` branch returns.

TRL's sampling semantics, kept (the ``transformers`` branch of ``_generate_single_turn``):

1. One completion per prompt row. TRL's sampler puts a prompt's ``num_generations`` copies next to each other;
   each run of identical consecutive prompts is sampled as ``n`` samples of one prompt (one prefill: the speed-up).
2. ``do_sample`` with the trainer's ``temperature``, ``top_k`` and ``top_p``; ``max_new_tokens`` is
   ``max_completion_length``. ``min_p``, ``repetition_penalty`` other than 1 and ``generation_kwargs`` are
   refused (:func:`unsupported_sampling`): the engines do not implement them.
3. A completion ends at the first of the trainer's ``eos_token_ids`` (kept, as TRL keeps it) or at
   ``max_completion_length``; TRL's completion mask is then all ones over it, as after its own truncation.
4. Old log-probs: None, as TRL's ``transformers`` branch returns; TRL recomputes them when it needs them
   (``num_iterations > 1``), so the loss sees the same numbers.
5. Weights: the trainer's model unwrapped from DDP (LoRA active), in the mode the trainer has it in: TRL samples
   in train mode, so dropout (LoRA's ``dropout``, 0.05 by default) is on while sampling, in TRL's path and ours
   alike; under ``inference_mode``. DeepSpeed and FSDP shard the weights and are refused.
"""

from __future__ import annotations

from typing import Any

from alignkit.core.errors import GenerationError
from alignkit.generation.engine import SamplingParams


def repeat_runs(prompt_ids: list[list[int]]) -> list[tuple[int, int]]:
    """``(first row, length)`` of each run of identical consecutive prompts.

    >>> repeat_runs([[1, 2], [1, 2], [3], [3], [1, 2]])
    [(0, 2), (2, 2), (4, 1)]
    """
    runs: list[tuple[int, int]] = []
    for row, ids in enumerate(prompt_ids):
        if runs and list(prompt_ids[runs[-1][0]]) == list(ids):
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((row, 1))
    return runs


def unsupported_sampling(args: Any) -> str | None:
    """Why TRL's sampling arguments ``args`` cannot be reproduced by our engines, or None when they can."""
    if getattr(args, "min_p", None):
        return f"min_p={args.min_p}"
    if getattr(args, "repetition_penalty", 1.0) not in (None, 1.0):
        return f"repetition_penalty={args.repetition_penalty}"
    if getattr(args, "generation_kwargs", None):
        return f"generation_kwargs={args.generation_kwargs}"
    if getattr(args, "use_vllm", False):
        return "use_vllm (use generation.backend vllm for TRL's vLLM)"
    return None


def sample_rows(engine: Any, prompt_ids: list[list[int]], params: SamplingParams) -> list[list[int]]:
    """One completion's token ids per prompt row (see the module docstring, 1 and 3); ``params.n`` is ignored:
    each run of identical rows asks for as many samples as it has rows."""
    runs = repeat_runs(prompt_ids)
    completions: list[list[int] | None] = [None] * len(prompt_ids)
    for size in sorted({length for _, length in runs}):  # one generate call per group size (usually one)
        chosen = [first for first, length in runs if length == size]
        sampled = engine.generate([list(prompt_ids[first]) for first in chosen],
                                  params.model_copy(update={"n": size}), progress=False)
        for first, samples in zip(chosen, sampled, strict=True):
            for offset, completion in enumerate(samples):
                completions[first + offset] = list(completion.token_ids)
    return completions  # type: ignore[return-value]


class EngineSampling:
    """Mixin over a TRL online trainer: completions from an alignkit engine (see the module docstring)."""

    engine_spec: Any = None  # the stage's generation block (fast, hf, or openai with serve_adapter)

    def _engine_completions(self, prompt_ids: list[list[int]], images: Any) -> list[list[int]]:
        if images is not None and any(image is not None for image in images):
            raise GenerationError(f"generation.backend {self.engine_spec.backend} samples text only; images need "
                                  "generation.backend trl")
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise GenerationError(f"generation.backend {self.engine_spec.backend} needs the whole model in each "
                                  "process (single process or DDP); with DeepSpeed or FSDP use backend trl or vllm")
        model = self.accelerator.unwrap_model(self.model)
        engine = getattr(self, "_alignkit_engine", None)
        if engine is None or self._alignkit_engine_model is not model:
            engine = self._alignkit_engine = self._build_engine(model)
            self._alignkit_engine_model = model
        args = self.args
        params = SamplingParams(max_new_tokens=args.max_completion_length, temperature=args.temperature,
                                top_p=args.top_p, top_k=args.top_k or 0)
        return sample_rows(engine, [list(ids) for ids in prompt_ids], params)

    def _build_engine(self, model: Any) -> Any:
        """The spec's engine over ``model``; for ``openai`` with ``serve_adapter``, a server that is sent the
        policy's LoRA adapter before each call (:mod:`alignkit.generation.served_lora`; no dropout there)."""
        spec = self.engine_spec
        if spec.backend == "openai":
            from pathlib import Path

            from alignkit.generation.served_lora import AdapterSyncEngine

            run_dir = Path(self.args.output_dir).parent  # the stage folder (TRL writes into its checkpoints/)
            return AdapterSyncEngine.from_spec(spec, model, self._tokenizer, run_dir,
                                               name=f"{run_dir.name}-rank{self.accelerator.process_index}")
        engine = spec.build(model=model, tokenizer=self._tokenizer)
        # TRL's eos list (every eos the model declares, and the tokenizer's) and TRL's train-mode sampling (5.)
        for sampler in (engine, getattr(engine, "fallback", None)):  # fast's hf fallback, when it has one
            if sampler is not None:
                sampler.eos_ids, sampler.eval_mode = list(self.eos_token_ids), False
        return engine


def with_engine(trainer_class: type, spec: Any) -> type:
    """``trainer_class`` (TRL's GRPOTrainer or RLOOTrainer) sampling with ``spec``'s engine (fast, hf, or openai
    with ``serve_adapter``)."""
    from trl import GRPOTrainer, RLOOTrainer

    if issubclass(trainer_class, GRPOTrainer):
        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations,
                                  has_tool_images=False):
            return self._engine_completions(prompt_ids, images), None  # (completion ids, old log-probs: 4.)
    elif issubclass(trainer_class, RLOOTrainer):
        def _generate_single_turn(self, prompt_ids, images, multimodal_fields):
            return self._engine_completions(prompt_ids, images)
    else:
        raise TypeError(f"{trainer_class.__name__}: engine sampling is wired for GRPOTrainer and RLOOTrainer only")
    return type(f"{spec.backend.capitalize()}{trainer_class.__name__}", (EngineSampling, trainer_class),
                {"engine_spec": spec, "_generate_single_turn": _generate_single_turn})
