"""Config building blocks shared by every stage.

Stage configs are pydantic models with ``extra="forbid"`` (a misspelt YAML key is an error, never silently
ignored) and ``frozen=True`` (a resolved config is a value: it is hashed for skip/resume). Help is written
once, as each field's ``description``. Nested specs (:class:`QuantSpec`, :class:`LoraSpec`,
:class:`DataSpec`) replace flat flags.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: Old field names met while validating, as (old, new); the recipe loader drains it into one note each.
renamed_seen: list[tuple[str, str]] = []


class Spec(BaseModel):
    """Base for every config block: unknown keys are errors, values are immutable, numbers are finite
    (``lr: .inf`` would pass ``gt=0`` and train a nan model).

    ``RENAMED`` maps a field's old name to its new one: the old name is read for one release (with a note
    from the recipe loader), and the config hash uses the old name, so a rename never reruns a finished stage.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=(), allow_inf_nan=False)
    RENAMED: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _read_old_names(cls, data: Any) -> Any:
        if not (cls.RENAMED and isinstance(data, dict)):
            return data
        data = dict(data)
        for old, new in cls.RENAMED.items():
            if old in data:
                if new in data:
                    raise ValueError(f"`{old}` is the old name of `{new}`: set only `{new}`")
                data[new] = data.pop(old)
                renamed_seen.append((old, new))
        return data


def hash_view(spec: Spec, dumped: dict[str, Any]) -> dict[str, Any]:
    """``dumped`` (``spec.model_dump(mode="json")``) with renamed fields under their old names, nested specs
    included: what the config hash is computed from, so renaming a field keeps finished stages finished."""
    out = {}
    for key, value in dumped.items():
        inner = getattr(spec, key, None)
        if isinstance(inner, Spec) and isinstance(value, dict):
            value = hash_view(inner, value)
        old = {new: old for old, new in type(spec).RENAMED.items()}.get(key, key)
        out[old] = value
    return out


class QuantSpec(Spec):
    """bitsandbytes quantization of the base model (QLoRA when a ``lora`` block is also set)."""

    bits: Literal[4, 8] = Field(4, description="4 (nf4/fp4) or 8 (LLM.int8) bit weights.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type; nf4 as in QLoRA.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too (QLoRA).")
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype of the matmuls; auto = bfloat16 on CUDA, float32 on CPU."
    )
    cuda_only: bool = Field(
        False,
        description="Apply only when CUDA is available; on CPU load unquantized instead (4-bit on CPU "
        "works but is several times slower, so CPU demos set this).",
    )


class LoraSpec(Spec):
    """PEFT LoRA adapter settings."""

    r: int = Field(16, gt=0, description="Adapter rank.")
    alpha: int = Field(32, gt=0, description="Scaling numerator; the update is scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    target_modules: str | list[str] = Field(
        "all-linear", description="Module names to adapt, or 'all-linear' (every linear but the head)."
    )
    modules_to_save: list[str] | None = Field(
        None, description="Extra modules trained in full and saved with the adapter (e.g. ['score'])."
    )


class DataSpec(Spec):
    """Where a stage's data comes from.

    ``source`` is a built-in generator (``arith``), a named adapter over a file or Hub dataset
    (``gsm8k``, ``hh``), a local file (.jsonl/.json/.parquet/.csv, optionally .gz), a ``save_to_disk``
    folder, or a Hub dataset id. A list of specs is a mixture (``source: mixture``, ``mixture: [...]``),
    each part's rows repeated ``weight`` times. Every accepted row format: docs/data.md.
    """

    source: str = Field(..., description="Built-in name, local file path, or Hub dataset id.")
    adapter: Literal["auto", "none", "arith", "gsm8k", "hh", "math-shepherd", "prm800k"] = Field(
        "auto", description="How rows are converted to alignkit's formats; auto picks by source/columns."
    )
    path: str | None = Field(
        None, description="For named adapters: the local file or Hub id to read (e.g. gsm8k's train.jsonl)."
    )
    split: str = Field("train", description="Split to read from a Hub dataset or a saved DatasetDict folder.")
    subset: str | None = Field(None, description="Hub dataset config/subset name (datasets' `name`).")
    data_files: str | list[str] | dict[str, str | list[str]] | None = Field(
        None, description="Hub dataset: only these files (datasets' `data_files`, e.g. 'data/train-*.parquet').")
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Map alignkit column names to the dataset's, e.g. {prompt: question, completion: answer}.",
    )
    limit: int | None = Field(None, gt=0, description="Use at most this many rows (after shuffling).")
    skip: int = Field(0, ge=0, description="Leave out this many rows first (after shuffling, before `limit`): "
                      "disjoint slices of one source, e.g. held-out problems (`limit: 200`) and training ones "
                      "(`skip: 200`).")
    shuffle: bool = Field(False, description="Shuffle (with `seed`) before `limit`.")
    seed: int = Field(0, description="Seed for shuffling and for built-in generators.")
    params: dict[str, Any] = Field(
        default_factory=dict, description="Parameters of a built-in generator (arith: n, steps, max_operand, ops, seed, "
        "error_rate) or of an adapter (prm800k: neutral, alternatives).",
    )
    eval_size: int | float | None = Field(
        None, description="Hold out this many rows (or this fraction) for evaluation."
    )
    weight: float = Field(
        1.0, gt=0, description="In a mixture: how many times this part's rows are used (2: each twice; 0.5: a "
        "seeded half).")
    mixture: list[DataSpec] | None = Field(
        None, min_length=1, description="The parts of a mixture (`data: [{source: a, weight: 2}, {source: b}]`); "
        "their rows are pooled (then shuffled if `shuffle`, cut at `limit`).")

    @model_validator(mode="before")
    @classmethod
    def _accept_plain_string(cls, value: Any) -> Any:
        # `data: arith` is shorthand for `data: {source: arith}`; `data: [a, b]` for a mixture of a and b.
        if isinstance(value, str):
            return {"source": value}
        if isinstance(value, (list, tuple)):
            return {"source": "mixture", "mixture": list(value)}
        if isinstance(value, dict) and "mixture" in value and "source" not in value:
            return {**value, "source": "mixture"}
        return value

    @model_validator(mode="after")
    def _mixture_fields(self) -> DataSpec:
        if (self.source == "mixture") != (self.mixture is not None):
            raise ValueError("`source: mixture` and `mixture: [...]` go together (a list of data specs)")
        if self.mixture is not None:
            own = sorted(set(self.model_fields_set) - {"source", "mixture", "limit", "skip", "shuffle", "seed",
                                                           "eval_size"})
            if own:
                raise ValueError(f"a mixture takes only limit, skip, shuffle, seed and eval_size itself; put {own} on its "
                                 "parts")
        return self


class WandbSpec(Spec):
    project: str = Field("alignkit", description="W&B project.")
    entity: str | None = Field(None, description="W&B entity (team or user).")
    group: str | None = Field(None, description="Run group; default: '<recipe>-<run id>'.")
    mode: Literal["online", "offline", "disabled"] | None = Field(
        None, description="W&B mode; unset: the environment's WANDB_MODE, else online.")
    tags: list[str] = Field(default_factory=list)


class TrackingSpec(Spec):
    report_to: Literal["wandb", "tensorboard", "none"] = Field("wandb", description="Where metrics go.")
    wandb: WandbSpec = Field(default_factory=WandbSpec)


class HubSpec(Spec):
    repo_id: str = Field(..., description="Target repository, 'user/name'.")
    private: bool = Field(True, description="Create the repository private.")
    push: Literal["final", "each", "never"] = Field(
        "final", description="Push the exported stage's model to repo_id (final), every stage that writes a "
        "model to its own repo '<repo_id>-<stage>' (each), or only export into <stage>/export (never)."
    )
    stage: str | None = Field(
        None, description="Name of the stage to export (final/never); default: the last stage. Not with push: each."
    )
    merge_adapter: bool = Field(True, description="Merge LoRA into the base weights before exporting; false "
                                "exports the adapter, pointed at a Hub base or with its base in base/.")


def torch_dtype(name: str):
    """Map a config dtype name to a torch dtype; ``auto`` is bf16 on CUDA (if supported) else fp32."""
    import torch

    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)
