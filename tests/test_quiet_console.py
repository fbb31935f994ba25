"""A quiet console: no deprecation warning that our own calls cause (a tiny generation with each local backend,
LoRA with activation checkpointing, a 2-step sft stage), and under ``accelerate launch`` each line a stage
prints appears once, not once per process.

Deprecations raised inside TRL/transformers/torch by their own calls are not ours to silence and are allowed.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from pathlib import Path

import pytest

import alignkit
from helpers import run_two_processes, write_recipe

PACKAGE = str(Path(alignkit.__file__).resolve().parent)

#: Deprecations that calls of ours used to cause (the fix uses the current names); none may come back.
OURS = (
    "`past_key_values` is deprecated",  # a model forward given past_key_values= (now cache=)
    "`past_key_values`/`cache_params` are deprecated",  # output.past_key_values read (now output["cache"])
    "`gradient_checkpointing` is deprecated",  # TrainingArguments(gradient_checkpointing=...)
    "`gradient_checkpointing_kwargs` is deprecated",  # peft.prepare_model_for_kbit_training(...)
    "`gradient_checkpointing_enable` is deprecated",  # model.gradient_checkpointing_enable(...)
    "`is_gradient_checkpointing` is deprecated",
)


class _recording:
    """``with _recording() as said:`` -- every warning raised in the block: ``(category, filename, message)``
    of each ``warnings`` warning, and transformers' ``logger.warning_once`` calls (shown only once per process,
    so recorded here instead of let through, whatever ran before)."""

    def __enter__(self) -> list[tuple[str, str, str]]:
        self.patch = pytest.MonkeyPatch()
        self.said: list[tuple[str, str, str]] = []

        def warning_once(logger, message, *args, **kwargs):
            self.said.append(("logger:" + logger.name, "", str(message)))

        self.patch.setattr(logging.Logger, "warning_once", warning_once)
        self.caught = warnings.catch_warnings(record=True)
        self.records = self.caught.__enter__()
        warnings.simplefilter("always")
        return self.said

    def __exit__(self, *exc) -> None:
        self.caught.__exit__(*exc)
        self.patch.undo()
        self.said += [(w.category.__name__, w.filename, str(w.message)) for w in self.records]



def tiny_sft_recipe(tmp_path, model, name: str, *, rows: int, extra: str = ""):
    """A 2-step LoRA sft on ``rows`` arith problems with a 2-problem accuracy check, before and after."""
    return write_recipe(tmp_path, f"""
        name: {name}
        tracking: {{report_to: none}}
        defaults:
          model: {model}
          lora: {{r: 4, alpha: 8, dropout: 0.0}}
        stages:
          - kind: sft
            data: {{source: arith, params: {{n: {rows}, steps: 1, max_operand: 9}}}}
            accuracy_data: {{source: arith, seed: 5, params: {{n: 2, steps: 1, max_operand: 9}}}}
            accuracy_max_completion_length: 4
            max_steps: 2
            batch_size: 4
            max_length: 64
            {extra}
    """)

def ours(said: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """The deprecations among ``said`` that point at our code: raised from a file of the alignkit package, or one
    of the messages our calls used to cause."""
    return [(kind, file, message) for kind, file, message in said
            if (kind in ("FutureWarning", "DeprecationWarning") and str(Path(file).resolve()).startswith(PACKAGE))
            or any(text in message for text in OURS)]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("backend", ["hf", "fast"])
def test_generation_raises_no_deprecation_of_ours(tiny, backend):
    from alignkit.generation import SamplingParams, make_engine

    model, tok = tiny
    engine = make_engine(backend, model=model, tokenizer=tok, batch_size=4)
    with _recording() as said:
        engine.generate(["Hi", "Tom has 3 apples."], SamplingParams(max_new_tokens=5, n=2, seed=0, stop=["x"],
                                                                   return_logprobs=True), progress=False)
        engine.generate(["Hi"], SamplingParams(max_new_tokens=5, temperature=0), progress=False)
    assert ours(said) == []


def test_lora_with_activation_checkpointing_raises_no_deprecation_of_ours(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from alignkit.core.config import LoraSpec
    from alignkit.modeling.models import apply_lora

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with _recording() as said:
        lora = apply_lora(model, LoraSpec(r=4, alpha=8), "causal-lm", gradient_checkpointing=True)
    assert ours(said) == []
    assert lora.get_base_model().is_activation_checkpointing  # still on, under its new name


def test_sft_stage_raises_no_deprecation_of_ours(tmp_path, tiny_model_dir):
    from alignkit.core.artifacts import Manifest
    from alignkit.run.pipeline import run_recipe
    from alignkit.run.recipe import load_recipe

    path = tiny_sft_recipe(tmp_path, tiny_model_dir, "quiet", rows=8, extra="gradient_checkpointing: true")
    recipe = load_recipe(path, output_dir=str(tmp_path / "runs"))
    with _recording() as said:
        run_recipe(recipe, echo=lambda *_: None)
    assert Manifest.read(recipe.stage("sft").run_dir).status == "done"
    assert ours(said) == []


def test_trl_args_set_checkpointing_by_its_current_name():
    """TRL's configs default ``gradient_checkpointing`` to True: only setting the new name keeps it quiet."""
    from trl import SFTConfig

    from alignkit.stages.common import _checkpointing_arg

    name = _checkpointing_arg(SFTConfig)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        args = SFTConfig(output_dir="unused", use_cpu=True, **{name: False})
    assert args.gradient_checkpointing is False


def test_two_processes_print_each_stage_line_once(tmp_path, tiny_model_dir):
    """Under ``accelerate launch`` (2 CPU processes) every ``[alignkit]`` line appears once, the pipeline's
    ``<stage>: running (<kind>) on 2 processes`` included."""
    path = tiny_sft_recipe(tmp_path, tiny_model_dir, "twice", rows=16)
    proc = run_two_processes(path, tmp_path / "runs")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[alignkit]")]
    assert "[alignkit] sft: running (sft) on 2 processes" in lines
    assert sum("greedy accuracy" in line for line in lines) == 2, proc.stdout[-3000:]  # before and after
    assert all(count == 1 for count in Counter(lines).values()), proc.stdout[-3000:]
