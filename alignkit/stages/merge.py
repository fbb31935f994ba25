"""Model merging ("soups"): average fine-tuned models, or combine their task vectors, into one model.

Recipe example::

    - kind: merge
      models:                                            # the ingredients: model folders or LoRA adapters
        - ${grpo_a.model}
        - ${grpo_b.model}
      method: greedy                                     # uniform, weighted, greedy, task_arithmetic, ties...
      accuracy_data: {source: arith, seed: 9001, params: {n: 48, steps: 2}}   # the table, and greedy's choice
    - kind: merge
      name: ties
      models: ["${math.model}", "${code.model}"]            # quoted: `{` starts a mapping inside [...]
      base: ${sft.model}                                 # what both were fine-tuned from
      method: ties
      density: 0.2

Methods (``w`` the weights, ``t`` an ingredient's tensor, ``b`` the base's, per tensor):

- ``uniform`` (uniform soup, Wortsman et al. 2022): the mean of the ingredients' weights.
- ``weighted``: ``sum(w_i t_i)`` with ``weights`` normalised to sum 1.
- ``greedy`` (greedy soup, Wortsman et al. 2022, recipe 1): score each ingredient on held-out problems, sort
  best first, and add the next one to the soup only if the uniform soup of the kept ones plus it scores no lower
  than the soup without it. Every decision is recorded (``greedy.jsonl``, manifest ``kept``).
- ``task_arithmetic`` (Ilharco et al. 2023): ``b + sum(w_i (t_i - b))``.
- ``ties`` (Yadav et al. 2023): trim each task vector to its ``density`` largest magnitudes, elect each entry's
  sign, average the entries that agree with it.
- ``dare_linear`` / ``dare_ties`` (Yu et al. 2024): drop entries at random (keep ``density``, rescale by
  1/density), then task arithmetic / the TIES sign election.
- ``magnitude_prune``: trim as TIES does, then task arithmetic (no sign election).

The maths is PEFT's, not ours: for full models, the task-vector methods call ``peft.utils.merge_utils``
(``task_arithmetic``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``) on each tensor's task
vectors, and the soups are a plain weighted mean (:func:`merge_tensors`). When every ingredient is a LoRA adapter
of one base, the adapters are combined by ``PeftModel.add_weighted_adapter`` (``cat`` by default for the averages
and task arithmetic: the exact sum of the weighted updates; ``ties_svd``/``dare_*_svd``/``magnitude_prune_svd``
for the others: the method on each layer's full update, then an SVD back to ``svd_rank``), saved as an adapter and
merged into the base (:func:`alignkit.modeling.models.merge_adapter`). A mix of adapters and full models goes the
full-model way (each adapter merged into its base in memory first).

Outputs: ``${<name>.model}`` (the merged model: config, safetensors, tokenizer, as every stage's ``model``),
``${<name>.adapter}`` (the combined adapter, LoRA ingredients only), ``${<name>.table}`` (``table.jsonl``; also
``table.md``): each ingredient's and the soup's held-out greedy accuracy
(:func:`alignkit.stages.common.measure_accuracy`, the training stages' check) when ``accuracy_data`` is set, and,
with ``compare_uniform``, the uniform soup's. Metrics: ``accuracy_ingredient_<i>``, ``accuracy_soup``, ``best_ingredient``,
``soup_minus_best``, ``accuracy_uniform_soup``, ``soup_minus_uniform``, greedy's ``kept``.

Resuming: each accuracy is a file (``accuracy_<tag>.jsonl``, written atomically) that a rerun reads back instead
of measuring again; the merged model is written to a temp folder and renamed, so a ``model`` folder is complete;
a rerun after a crash redoes only what is missing. DARE's random drops are seeded by ``seed``.

Departures:

1. Merging is done in float32 whatever the ingredients' dtype; the result is saved in ``merged_dtype`` (auto:
   the first ingredient's checkpoint dtype). A merged model with a nan/inf weight is never written.
2. Greedy selects on ``select_data`` when given, else on ``accuracy_data``: then the soup's reported accuracy is
   the one it was chosen on (optimistic, as a validation score is). Give a separate ``select_data`` for an
   honest table.
3. LoRA ingredients and candidate soups are scored through PEFT with the adapter active; the final soup is
   scored from the saved, merged folder (what later stages load).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from alignkit.core.config import DataSpec
from alignkit.core.errors import ModelError, RecipeError
from alignkit.core.stage import StageConfig, StageContext, StageResult
from alignkit.generation import GenerationSpec, HFSpec

SOUPS = ("uniform", "weighted", "greedy")  # averages of the ingredients' weights: no base
TASK_VECTORS = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune")  # base + f(t_i - base)
DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
SIGN_ELECTION = ("ties", "dare_ties")
Method = Literal["uniform", "weighted", "greedy", "task_arithmetic", "ties", "dare_linear", "dare_ties",
                 "magnitude_prune"]
# PEFT add_weighted_adapter combination types that fit each method (the first is the default)
LORA_COMBINATIONS: dict[str, tuple[str, ...]] = {
    **{m: ("cat", "svd", "linear") for m in (*SOUPS, "task_arithmetic")},
    "ties": ("ties_svd", "ties"),
    "dare_linear": ("dare_linear_svd", "dare_linear"),
    "dare_ties": ("dare_ties_svd", "dare_ties"),
    "magnitude_prune": ("magnitude_prune_svd", "magnitude_prune"),
}
LoraCombination = Literal["cat", "svd", "linear", "ties", "ties_svd", "dare_linear", "dare_linear_svd", "dare_ties",
                          "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd"]
# config.json keys that must agree between ingredients (and the base)
ARCHITECTURE_KEYS = ("model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "vocab_size", "tie_word_embeddings")


class Config(StageConfig):
    kind: str = "merge"
    models: list[str] = Field(
        ..., min_length=1, description="The ingredients: model folders (`${stage.model}`), LoRA adapter folders of "
        "one base (`${stage.adapter}`), or Hub ids; all of one architecture.")
    base: str | None = Field(
        None, description="The model the ingredients were fine-tuned from; task vectors are ingredient - base "
        "(task_arithmetic, ties, dare_*, magnitude_prune). Default: the adapters' base when every ingredient is a "
        "LoRA adapter, else required. The soups (uniform, weighted, greedy) take none.")
    method: Method = Field(
        "uniform", description="uniform / weighted average of the weights; greedy soup (add an ingredient, best "
        "first, only if the held-out accuracy does not drop); task_arithmetic, ties, dare_linear, dare_ties, "
        "magnitude_prune on task vectors (docs/merge.md).")
    weights: list[float] | None = Field(
        None, description="One per model. weighted: mixing weights (>= 0, normalised to sum 1); task-vector methods: "
        "each task vector's scale (default 1.0 each). uniform and greedy take none.")
    density: float | None = Field(
        None, gt=0, le=1, description="ties, dare_*, magnitude_prune (required there): the fraction of each task "
        "vector's entries kept (ties, magnitude_prune: the largest; dare: at random, the kept ones scaled by 1/density).")
    majority_sign_method: Literal["total", "frequency"] = Field(
        "total", description="ties, dare_ties: each entry's sign is the sign of the summed task vectors (total, the "
        "TIES paper) or the more frequent sign (frequency).")
    lora_combination: LoraCombination | None = Field(
        None, description="LoRA adapters only: PEFT add_weighted_adapter's combination_type. Default: cat for the "
        "averages and task_arithmetic (exact), <method>_svd for the others (the method on each layer's full "
        "update, then an SVD to svd_rank); the plain ties/dare_*/linear combine A and B factors separately.")
    svd_rank: int | None = Field(
        None, gt=0, description="LoRA, svd combinations: rank of the combined adapter (default: the largest "
        "ingredient rank; higher keeps more of the merged update before it is merged into the base).")
    accuracy_data: DataSpec | None = Field(
        None, description="Held-out problems: greedy exact match of each ingredient and of the result (the "
        "table); greedy soup also selects on them unless select_data is given.")
    select_data: DataSpec | None = Field(
        None, description="greedy only: held-out problems the greedy soup is chosen on (default: accuracy_data); "
        "a separate set keeps the reported accuracy of the soup unbiased by the choice.")
    accuracy_max_completion_length: int = Field(128, gt=0, description="Generation budget for the accuracy check.")
    chat: bool = Field(True, description="Send prompts through the model's chat template.")
    generation: GenerationSpec = Field(
        default_factory=lambda: HFSpec(batch_size=32), description="Engine of the accuracy check (hf or fast).")
    compare_uniform: bool = Field(
        True, description="When accuracy_data is set and the method is not uniform: also score the uniform soup "
        "of all ingredients (one more check), for the table's comparison.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype of the models scored; auto = bfloat16 on CUDA, float32 on CPU (merging "
        "itself is always float32).")
    merged_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype the merged model is saved in; auto = the first ingredient's checkpoint dtype.")
    seed: int = Field(0, description="Seed of DARE's random drops.")


def outputs(run_dir: Path) -> dict[str, str]:
    return {"model": str(run_dir / "model"), "adapter": str(run_dir / "adapter"),
            "table": str(run_dir / "table.jsonl"), "dir": str(run_dir)}


def check(config: Config, base_dir: Path) -> None:
    """Field combinations, checked at load (before any stage runs); ingredients are checked when they exist."""
    n, method = len(config.models), config.method
    if method in SOUPS and n < 2:
        raise RecipeError(f"a {method} soup needs two or more models (got {n})", field="models")
    for i, name in enumerate(config.models):
        if name in config.models[:i]:
            raise RecipeError(f"{name!r} is models[{config.models.index(name)}] again; list each ingredient once "
                              "(weights say how much of each)", field=f"models[{i}]")
    if config.weights is not None and method in ("uniform", "greedy"):
        raise RecipeError(f"{method} averages with equal weights; drop weights, or use method: weighted",
                          field="weights")
    if config.weights is None and method == "weighted":
        raise RecipeError("method weighted needs weights: one per model", field="weights")
    if config.weights is not None:
        if len(config.weights) != n:
            raise RecipeError(f"{len(config.weights)} weights for {n} models; give one per model", field="weights")
        if method == "weighted" and (min(config.weights) < 0 or sum(config.weights) <= 0):
            raise RecipeError("weighted averages need weights >= 0 with a positive sum (task_arithmetic takes "
                              "negative scales)", field="weights")
    if method in DENSITY and config.density is None:
        raise RecipeError(f"method {method} needs density: the fraction of each task vector kept (e.g. 0.2 for ties, "
                          "0.1-0.3 for dare)", field="density")
    if method not in DENSITY and config.density is not None:
        raise RecipeError(f"density applies to {', '.join(DENSITY)}, not {method}", field="density")
    if method not in SIGN_ELECTION and "majority_sign_method" in config.model_fields_set:
        raise RecipeError(f"majority_sign_method applies to {', '.join(SIGN_ELECTION)}, not {method}",
                          field="majority_sign_method")
    if config.lora_combination is not None and config.lora_combination not in LORA_COMBINATIONS[method]:
        raise RecipeError(f"method {method} combines adapters by {' or '.join(LORA_COMBINATIONS[method])}, not "
                          f"{config.lora_combination}", field="lora_combination")
    if config.svd_rank is not None and "svd" not in (config.lora_combination or LORA_COMBINATIONS[method][0]):
        raise RecipeError(f"svd_rank applies to the svd combinations; {method} combines adapters by "
                          f"{config.lora_combination or LORA_COMBINATIONS[method][0]}", field="svd_rank")
    if method in SOUPS and config.base is not None:
        raise RecipeError(f"a {method} soup averages the ingredients themselves and takes no base; base is for "
                          f"{', '.join(TASK_VECTORS)}", field="base")
    if method == "greedy" and config.accuracy_data is None and config.select_data is None:
        raise RecipeError("greedy soup keeps an ingredient only if the held-out accuracy does not drop: set "
                          "accuracy_data (and, for an unbiased table, select_data)", field="accuracy_data")
    if config.select_data is not None and method != "greedy":
        raise RecipeError(f"select_data is what greedy soup selects on; method {method} selects nothing "
                          "(accuracy_data is the table's)", field="select_data")
    if config.generation.backend == "openai":
        raise RecipeError("merge scores the models it loads: use generation.backend hf or fast",
                          field="generation.backend")
    if method in TASK_VECTORS and config.base is None:
        _check_base_needed(config)


def _check_base_needed(config: Config) -> None:
    """A task-vector method without base: fine only if every ingredient is a LoRA adapter (their base is the
    default). Ingredients an earlier stage will write are not there yet; they are checked when the stage runs."""
    from alignkit.modeling.models import is_adapter_dir

    for i, name in enumerate(config.models):
        folder = Path(name).expanduser()
        if (folder / "config.json").is_file() and not is_adapter_dir(folder):
            raise RecipeError(f"method {config.method} works on task vectors (ingredient - base) and models[{i}] is "
                              "a full model: set base to the model the ingredients were fine-tuned from "
                              "(e.g. ${sft.model})", field="base")


# ---------------------------------------------------------------- the maths (PEFT's), per tensor


def soup_weights(config: Config, n: int) -> list[float]:
    """The weight of each of ``n`` ingredients: 1/n (uniform, greedy's soup of n), normalised ``weights``
    (weighted), or each task vector's scale (``weights``, default 1.0)."""
    if config.method in ("uniform", "greedy"):
        return [1.0 / n] * n
    if config.method == "weighted":
        total = sum(config.weights)
        return [w / total for w in config.weights]
    return list(config.weights) if config.weights is not None else [1.0] * n


def merge_tensors(method: str, tensors: list[Any], weights: list[float], *, base: Any = None,
                  density: float | None = None, majority_sign_method: str = "total") -> Any:
    """One merged tensor, in float32.

    Soups (uniform, weighted, greedy): the weighted mean ``sum(w_i t_i)`` (``weights`` sum to 1). Task-vector
    methods: ``base + f([t_i - base], weights)`` with ``f`` PEFT's ``peft.utils.merge_utils`` function of that name.
    """
    import torch
    from peft.utils import merge_utils

    stacked = torch.stack([t.float() for t in tensors])
    scale = torch.tensor(weights, dtype=torch.float32, device=stacked.device)
    if method in SOUPS:
        return (stacked * scale.view(-1, *([1] * (stacked.dim() - 1)))).sum(dim=0)
    if base is None:
        raise ModelError(f"merge method {method} needs the base tensor")
    base = base.float()
    task_vectors = [t - base for t in stacked]
    if method == "task_arithmetic":
        delta = merge_utils.task_arithmetic(task_vectors, scale)
    elif method == "magnitude_prune":
        delta = merge_utils.magnitude_prune(task_vectors, scale, density)
    elif method == "dare_linear":
        delta = merge_utils.dare_linear(task_vectors, scale, density)
    elif method in ("ties", "dare_ties"):
        delta = getattr(merge_utils, method)(task_vectors, scale, density, majority_sign_method)
    else:
        raise ModelError(f"unknown merge method {method!r}")
    return base + delta


def greedy_soup(order: list[int], score: Callable[[list[int]], float], first_score: float,
                record: Callable[[list[dict[str, Any]]], None] = lambda _: None) -> tuple[list[int], list[dict]]:
    """Wortsman et al.'s greedy soup: ``order`` is the ingredients best first (``first_score`` the best one's
    held-out score); each next one is kept if ``score(kept + [it])`` (the uniform soup's held-out score) is not
    lower than the soup's so far. Returns the kept indices (in the order added) and one decision per ingredient;
    ``record`` gets the decisions so far after each one."""
    kept, current = [order[0]], first_score
    decisions: list[dict[str, Any]] = [{"ingredient": order[0], "soup_before": None, "soup_with": first_score,
                                        "kept": True, "soup": [order[0]]}]
    record(decisions)
    for index in order[1:]:
        candidate = score(kept + [index])
        keep = candidate >= current
        decisions.append({"ingredient": index, "soup_before": current, "soup_with": candidate, "kept": keep,
                          "soup": sorted(kept + [index]) if keep else sorted(kept)})
        if keep:
            kept, current = kept + [index], candidate
        record(decisions)
    return kept, decisions


# ---------------------------------------------------------------- the stage


def run(config: Config, ctx: StageContext) -> StageResult:
    """Merge on the main process (the others wait): check the ingredients, score them, choose (greedy), merge,
    save, score the result, write the table."""
    result = StageResult()
    if ctx.is_main:
        result = _run_main(config, ctx)
    ctx.wait()
    return result


def _run_main(config: Config, ctx: StageContext) -> StageResult:
    from alignkit.core.artifacts import write_jsonl_atomic
    from alignkit.data import load_dataset

    ingredients = _inspect(config, ctx)
    lora = all(item["adapter"] for item in ingredients)
    if config.lora_combination is not None and not lora:
        raise _field_error(ctx, "lora_combination", "applies when every ingredient is a LoRA adapter; these are "
                           "(or include) full models, merged tensor by tensor")
    base = _base(config, ctx, ingredients, lora)
    work = (LoraMerger if lora else FullMerger)(config, ctx, ingredients, base)
    problems = load_dataset(config.accuracy_data, "problems") if config.accuracy_data is not None else None
    select = load_dataset(config.select_data, "problems") if config.select_data is not None else problems
    names = [item["name"] for item in ingredients]
    n = len(names)

    accuracy: dict[str, float] = {}
    if problems is not None:
        for i in range(n):
            accuracy[f"ingredient-{i}"] = score(config, ctx, problems, f"ingredient-{i}", f"of models[{i}]",
                                                lambda i=i: work.ingredient(i))
    metrics: dict[str, Any] = {"method": config.method, "ingredients": n}
    kept = list(range(n))
    decisions: list[dict[str, Any]] = []
    if config.method == "greedy":
        prefix = "select-" if config.select_data is not None else ""
        chosen_on = {i: score(config, ctx, select, f"{prefix}ingredient-{i}",
                              f"of models[{i}]" + (" (selection set)" if prefix else ""),
                              lambda i=i: work.ingredient(i)) for i in range(n)}
        order = sorted(range(n), key=lambda i: -chosen_on[i])  # stable: ties keep the recipe's order

        def soup_score(indices: list[int]) -> float:
            tag = prefix + _soup_tag(indices)
            return score(config, ctx, select, tag, f"of the uniform soup of models{sorted(indices)}"
                         + (" (selection set)" if prefix else ""), lambda: work.soup(sorted(indices)))

        def record(rows: list[dict[str, Any]]) -> None:
            write_jsonl_atomic(ctx.run_dir / "greedy.jsonl",
                               [{**row, "model": names[row["ingredient"]],
                                 "ingredient_score": chosen_on[row["ingredient"]]} for row in rows])
            last = rows[-1]
            if last["soup_before"] is not None:
                print(f"[alignkit] {ctx.name}: greedy soup: models[{last['ingredient']}] "
                      f"{'kept' if last['kept'] else 'left out'} ({last['soup_with']:.3f} with it, "
                      f"{last['soup_before']:.3f} without)")

        kept, decisions = greedy_soup(order, soup_score, chosen_on[order[0]], record)
        kept = sorted(kept)
        metrics.update(kept=kept, kept_models=[names[i] for i in kept],
                       **({f"select_accuracy_ingredient_{i}": chosen_on[i] for i in range(n)} if prefix else {}))
    weights = soup_weights(config, len(kept))
    metrics["weights"] = [round(w, 6) for w in weights]

    if problems is not None and config.compare_uniform and config.method != "uniform":
        # greedy may have scored it already (when it selects on accuracy_data and tried every ingredient)
        accuracy["uniform"] = score(config, ctx, problems, _soup_tag(range(n)), "of the uniform soup of all models",
                                    lambda: work.soup(list(range(n))))
    artifacts = work.write(kept, weights)
    if problems is not None:
        accuracy["soup"] = score(config, ctx, problems, "soup", f"of the {config.method} merge", work.saved)
        metrics.update(_accuracy_metrics(accuracy, n))
    work.close()
    table = _table(config, ctx, names, kept, weights, accuracy, metrics)
    write_jsonl_atomic(ctx.run_dir / "table.jsonl", table)
    (ctx.run_dir / "table.md").write_text(markdown_table(table), encoding="utf-8")
    if decisions:
        artifacts["greedy"] = str(ctx.run_dir / "greedy.jsonl")
    artifacts["table"] = str(ctx.run_dir / "table.jsonl")
    ctx.log_metrics(metrics)
    return StageResult(metrics=metrics, artifacts=artifacts)


def score(config: Config, ctx: StageContext, problems: Any, tag: str, what: str,
          load: Callable[[], tuple[Any, Any]]) -> float:
    """Greedy exact-match accuracy of the model ``load()`` gives (model, tokenizer) on ``problems``: the shared
    check (:func:`alignkit.stages.common.measure_accuracy`), kept in ``accuracy_<tag>.jsonl``; a rerun reads that
    file back without loading anything."""
    from alignkit.stages.common import measure_accuracy

    if (ctx.run_dir / f"accuracy_{tag}.jsonl").is_file():
        return measure_accuracy(None, None, problems, config, ctx, tag, reuse=True)
    model, tokenizer = load()
    return measure_accuracy(model, tokenizer, problems, config, ctx, tag, generation=config.generation,
                            reuse=True, label=what)


def _soup_tag(indices: Any) -> str:
    """The accuracy file tag of the uniform soup of ``indices`` (``soup-0-2``)."""
    return "soup-" + "-".join(map(str, sorted(indices)))


def _accuracy_metrics(accuracy: dict[str, float], n: int) -> dict[str, Any]:
    metrics: dict[str, Any] = {f"accuracy_ingredient_{i}": accuracy[f"ingredient-{i}"] for i in range(n)}
    best = max(range(n), key=lambda i: accuracy[f"ingredient-{i}"])  # the first of equals
    metrics.update(accuracy_soup=accuracy["soup"], best_ingredient=best,
                   soup_minus_best=round(accuracy["soup"] - accuracy[f"ingredient-{best}"], 6))
    if "uniform" in accuracy:
        metrics.update(accuracy_uniform_soup=accuracy["uniform"],
                       soup_minus_uniform=round(accuracy["soup"] - accuracy["uniform"], 6))
    return metrics


def _table(config: Config, ctx: StageContext, names: list[str], kept: list[int], weights: list[float],
           accuracy: dict[str, float], metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per ingredient, the uniform soup (when scored) and the result."""
    def counted(tag: str) -> int | None:
        path = ctx.run_dir / f"accuracy_{tag}.jsonl"
        return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip()) \
            if path.is_file() else None

    weight_of = dict(zip(kept, weights))
    rows = []
    for i, name in enumerate(names):
        row = {"row": f"ingredient {i}", "model": name, "weight": weight_of.get(i, 0.0),
               "accuracy": accuracy.get(f"ingredient-{i}"), "n": counted(f"ingredient-{i}")}
        if config.method == "greedy":
            row["kept"] = i in kept
            if config.select_data is not None:
                row["select_accuracy"] = metrics.get(f"select_accuracy_ingredient_{i}")
        rows.append(row)
    if "uniform" in accuracy:
        rows.append({"row": "uniform soup", "model": "all ingredients, equal weights", "weight": None,
                     "accuracy": accuracy["uniform"], "n": counted(_soup_tag(range(len(names))))})
    rows.append({"row": f"{config.method} merge", "model": str(ctx.run_dir / "model"), "weight": None,
                 "accuracy": accuracy.get("soup"), "n": counted("soup")})
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """``table.jsonl``'s rows as a markdown table (accuracy as a fraction and a count)."""
    def cell(row: dict[str, Any]) -> str:
        if row["accuracy"] is None:
            return "-"
        n = row.get("n")
        return f"{row['accuracy']:.3f}" + (f" ({round(row['accuracy'] * n)}/{n})" if n else "")

    greedy = any("kept" in row for row in rows)
    head = ["", "model", "weight", "held-out accuracy"] + (["kept"] if greedy else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        weight = "" if row["weight"] is None else f"{row['weight']:.4g}"
        model = row["model"] if row["row"] == "uniform soup" else f"`{row['model']}`"
        cells = [row["row"], model, weight, cell(row)]
        if greedy:
            cells.append({True: "yes", False: "no"}.get(row.get("kept"), ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _field_error(ctx: StageContext, field: str, message: str) -> RecipeError:
    """A recipe error found when the stage runs (the ingredients exist only then), named as at load."""
    return RecipeError(message, file=ctx.recipe.file, field=f"stages.{ctx.name}.{field}")


def _inspect(config: Config, ctx: StageContext) -> list[dict[str, Any]]:
    """Each ingredient: name, resolved path, adapter or not, the adapter's base; checked to be causal LMs of one
    architecture (adapters: of one base)."""
    from alignkit.modeling.models import is_adapter_dir, read_adapter_config, resolve_model

    items = []
    for i, name in enumerate(config.models):
        path = resolve_model(name)
        item: dict[str, Any] = {"name": name, "path": path, "adapter": is_adapter_dir(path), "base": None}
        if item["adapter"]:
            adapter = read_adapter_config(path)
            item["base"] = adapter.get("base_model_name_or_path")
            if not item["base"]:
                raise _field_error(ctx, f"models[{i}]", f"adapter {name!r} names no base_model_name_or_path")
            if (adapter.get("task_type") or "CAUSAL_LM") != "CAUSAL_LM":
                raise _field_error(ctx, f"models[{i}]", f"adapter {name!r} is a {adapter.get('task_type')} "
                                   "adapter; merge combines causal LMs")
        item["architecture"] = _architecture(item["base"] if item["adapter"] else path)
        items.append(item)
    first = items[0]
    kinds = first["architecture"].get("architectures") or []
    if kinds and not all(str(k).endswith("ForCausalLM") for k in kinds):
        raise _field_error(ctx, "models[0]", f"{first['name']!r} is a {', '.join(kinds)}; merge combines causal LMs")
    for i, item in enumerate(items[1:], 1):
        diff = _architecture_diff(first["architecture"], item["architecture"])
        if diff:
            raise _field_error(ctx, f"models[{i}]", f"{item['name']!r} has {diff[0]}={diff[2]!r} where models[0] "
                               f"has {diff[1]!r}: ingredients must share one architecture")
    adapters = [item for item in items if item["adapter"]]
    if len(adapters) == len(items):
        bases = [_same_model_key(item["base"]) for item in adapters]
        for i, key in enumerate(bases):
            if key != bases[0]:
                raise _field_error(ctx, f"models[{i}]", f"adapter {items[i]['name']!r} was trained on "
                                   f"{items[i]['base']!r}, models[0] on {items[0]['base']!r}: LoRA ingredients "
                                   "must share one base")
    return items


def _architecture(name: str) -> dict[str, Any]:
    from transformers import AutoConfig

    from alignkit.modeling.models import resolve_model

    try:
        values = AutoConfig.from_pretrained(resolve_model(name)).to_dict()
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(f"model {name!r}: cannot read its config: {err}") from err
    return {key: values.get(key) for key in ARCHITECTURE_KEYS}


def _architecture_diff(first: dict[str, Any], other: dict[str, Any]) -> tuple[str, Any, Any] | None:
    for key in ARCHITECTURE_KEYS:
        if first.get(key) != other.get(key):
            return key, first.get(key), other.get(key)
    return None


def _same_model_key(name: str) -> str:
    """A model name compared by where it is: a local folder's real path, else the name (a Hub id)."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def _base(config: Config, ctx: StageContext, ingredients: list[dict[str, Any]], lora: bool) -> str | None:
    """The base of the task vectors (None for the soups), checked against the ingredients."""
    if config.method in SOUPS:
        return None
    if lora:
        common = ingredients[0]["base"]
        if config.base is not None and _same_model_key(config.base) != _same_model_key(common):
            raise _field_error(ctx, "base", f"the adapters were trained on {common!r}, not {config.base!r}: leave "
                               "base unset (the adapters' base is the default) or give that one")
        return config.base or common
    if config.base is None:
        raise _field_error(ctx, "base", f"method {config.method} works on task vectors (ingredient - base), and "
                           "not every ingredient is a LoRA adapter: set base to the model they were fine-tuned "
                           "from (e.g. ${sft.model})")
    diff = _architecture_diff(ingredients[0]["architecture"], _architecture(config.base))
    if diff:
        raise _field_error(ctx, "base", f"{config.base!r} has {diff[0]}={diff[2]!r} where the ingredients have "
                           f"{diff[1]!r}: the base must be the model they were fine-tuned from")
    return config.base


def _device(ctx: StageContext) -> Any:
    import torch

    device = getattr(ctx.state, "device", None)
    return device if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _move(model: Any, ctx: StageContext) -> Any:
    """``model`` on this process's device, unless it was placed at load (a device map)."""
    return model if getattr(model, "hf_device_map", None) else model.to(_device(ctx))


class FullMerger:
    """Full models: each merged tensor from the ingredients' (and the base's) tensors, one name at a time.

    Tensors are read from the safetensors files one at a time when the files hold every name the model has
    (what ``save_pretrained`` writes); otherwise (an adapter, a ``.bin`` checkpoint, a Hub id) the model is
    loaded in float32 and its state dict used. The result is the first ingredient's model (config, generation
    config, tokenizer) with the merged weights.
    """

    def __init__(self, config: Config, ctx: StageContext, ingredients: list[dict[str, Any]], base: str | None):
        self.config, self.ctx, self.ingredients, self.base = config, ctx, ingredients, base
        self._sources: list[Any] | None = None
        self._base_source: Any = None

    def ingredient(self, i: int) -> tuple[Any, Any]:
        from alignkit.modeling.models import load_model, load_tokenizer

        name = self.ingredients[i]["name"]
        model = load_model(name, dtype=self.config.dtype)
        return _move(model, self.ctx), load_tokenizer(name)

    def soup(self, indices: list[int]) -> tuple[Any, Any]:
        """The uniform soup of ``indices``, in memory, for scoring."""
        from alignkit.modeling.models import load_tokenizer

        model = self._merged(indices, [1.0 / len(indices)] * len(indices), "uniform", self.config.dtype)
        return _move(model, self.ctx), load_tokenizer(self.ingredients[0]["name"])

    def saved(self) -> tuple[Any, Any]:
        from alignkit.modeling.models import load_model, load_tokenizer

        folder = str(self.ctx.run_dir / "model")
        return _move(load_model(folder, dtype=self.config.dtype), self.ctx), load_tokenizer(folder)

    def write(self, kept: list[int], weights: list[float]) -> dict[str, str]:
        """The merged model folder (skipped when a complete one is there: a resumed run)."""
        import torch

        from alignkit.core.artifacts import atomic_dir
        from alignkit.modeling.models import _checkpoint_dtype, check_finite_weights, load_tokenizer, resolve_model

        out = self.ctx.run_dir / "model"
        if (out / "config.json").is_file():
            return {"model": str(out)}
        method = "uniform" if self.config.method == "greedy" else self.config.method
        model = self._merged(kept, weights, method, "float32", seed=self.config.seed)
        first = self.ingredients[0]
        dtype = (_checkpoint_dtype(resolve_model(first["base"] if first["adapter"] else first["path"]))
                 if self.config.merged_dtype == "auto" else getattr(torch, self.config.merged_dtype))
        model = model.to(dtype)
        check_finite_weights(model.state_dict().items(), f"{self.ctx.name}: merged model")
        with atomic_dir(out) as tmp:
            model.save_pretrained(tmp)
            load_tokenizer(first["name"], padding_side="right").save_pretrained(tmp)
        print(f"[alignkit] {self.ctx.name}: wrote the {self.config.method} merge of {len(kept)} model(s) to {out}")
        return {"model": str(out)}

    def close(self) -> None:
        self._sources = self._base_source = None

    def _merged(self, indices: list[int], weights: list[float], method: str, dtype: str,
                seed: int | None = None) -> Any:
        """The first ingredient's model with every floating tensor replaced by the merge of ``indices`` (DARE's
        random drops seeded by ``seed``)."""
        import torch

        from alignkit.core.config import torch_dtype
        from alignkit.modeling.models import load_model

        sources = self._ingredient_sources()
        model = load_model(self.ingredients[0]["name"], dtype="float32")
        seen: set[int] = set()
        names = []
        for name, tensor in model.state_dict(keep_vars=True).items():
            if tensor.is_floating_point() and id(tensor) not in seen:  # a tied weight once
                seen.add(id(tensor))
                names.append((name, tensor))
        base = self._base_tensors() if method in TASK_VECTORS else None
        if seed is not None:
            torch.manual_seed(seed)
        with torch.no_grad():
            for name, tensor in names:
                parts = [sources[i].get(name) for i in indices]
                for i, part in zip(indices, parts):
                    if part.shape != tensor.shape:
                        raise _field_error(self.ctx, f"models[{i}]", f"tensor {name} has shape {tuple(part.shape)}, "
                                           f"models[0] has {tuple(tensor.shape)}: not one architecture")
                merged = merge_tensors(method, parts, weights, base=base.get(name) if base else None,
                                       density=self.config.density,
                                       majority_sign_method=self.config.majority_sign_method)
                tensor.data.copy_(merged.to(tensor.dtype))
        return model.to(torch_dtype(dtype))

    def _ingredient_sources(self) -> list[Any]:
        if self._sources is None:
            self._sources = [_tensor_source(item["name"], item["path"], item["adapter"]) for item in self.ingredients]
        return self._sources

    def _base_tensors(self) -> Any:
        from alignkit.modeling.models import is_adapter_dir, resolve_model

        if self._base_source is None:
            path = resolve_model(self.base)
            self._base_source = _tensor_source(self.base, path, is_adapter_dir(path))
        return self._base_source


class _Safetensors:
    """Tensors by name from a model folder's safetensors files, read when asked for (float32)."""

    def __init__(self, files: dict[str, Path]):
        self.files, self._open = files, {}

    def names(self) -> set[str]:
        return set(self.files)

    def get(self, name: str) -> Any:
        from safetensors import safe_open

        file = self.files[name]
        if file not in self._open:
            self._open[file] = safe_open(str(file), framework="pt", device="cpu")
        return self._open[file].get_tensor(name).float()


class _Loaded:
    """Tensors by name from a model loaded in float32 (adapters merged, any checkpoint format)."""

    def __init__(self, name: str):
        from alignkit.modeling.models import load_model

        self.state = load_model(name, dtype="float32").state_dict()

    def names(self) -> set[str]:
        return set(self.state)

    def get(self, name: str) -> Any:
        return self.state[name].float()


def _tensor_source(name: str, path: str, adapter: bool) -> Any:
    """Where an ingredient's tensors are read from: its safetensors files when they hold every parameter name
    the loaded model has, else the loaded model."""
    folder = Path(path)
    files: dict[str, Path] = {}
    if not adapter and folder.is_dir():
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            files = {key: folder / file for key, file in json.loads(index.read_text())["weight_map"].items()}
        elif (folder / "model.safetensors").is_file():
            from safetensors import safe_open

            with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
                files = {key: folder / "model.safetensors" for key in handle.keys()}
    if files and _names_match(name, set(files)):
        return _Safetensors(files)
    return _Loaded(name)


def _names_match(name: str, names: set[str]) -> bool:
    """Whether a checkpoint's tensor names are the model's own (no load-time renaming), tied weights aside."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from alignkit.modeling.models import resolve_model

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolve_model(name)))
    seen: set[int] = set()
    needed = set()
    for key, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            needed.add(key)
    return needed <= names


class LoraMerger:
    """LoRA adapters of one base: loaded side by side into one ``PeftModel`` and combined by PEFT's
    ``add_weighted_adapter``; the result is saved as an adapter and merged into the base."""

    def __init__(self, config: Config, ctx: StageContext, ingredients: list[dict[str, Any]], base: str | None):
        self.config, self.ctx, self.ingredients = config, ctx, ingredients
        self.base = base or ingredients[0]["base"]
        self._model: Any = None
        self._tokenizer: Any = None

    def combination(self, soup: bool = False) -> str:
        """PEFT's combination_type for the configured method, or (``soup``) for a uniform soup."""
        if soup and self.config.method not in SOUPS:
            return "cat"  # the uniform soup beside a task-vector method: the exact mean
        return self.config.lora_combination or LORA_COMBINATIONS["uniform" if soup else self.config.method][0]

    def _peft(self) -> Any:
        """The base with every ingredient's adapter loaded (``ingredient-<i>``), built once."""
        if self._model is None:
            from peft import PeftModel

            from alignkit.modeling.models import load_model, load_tokenizer

            model = load_model(self.base, dtype=self.config.dtype)
            first = self.ingredients[0]
            model = PeftModel.from_pretrained(model, first["path"], adapter_name="ingredient-0")
            for i, item in enumerate(self.ingredients[1:], 1):
                model.load_adapter(item["path"], adapter_name=f"ingredient-{i}")
            self._model = _move(model, self.ctx)
            self._tokenizer = load_tokenizer(first["name"])
        return self._model

    def ingredient(self, i: int) -> tuple[Any, Any]:
        model = self._peft()
        model.set_adapter(f"ingredient-{i}")
        return model, self._tokenizer

    def soup(self, indices: list[int]) -> tuple[Any, Any]:
        name = _soup_tag(indices)
        self._combine(indices, [1.0 / len(indices)] * len(indices), name, self.combination(soup=True))
        self._model.set_adapter(name)
        return self._model, self._tokenizer

    def _combine(self, indices: list[int], weights: list[float], name: str, combination: str) -> None:
        model = self._peft()
        if name in model.peft_config:
            return
        import torch

        if "svd" in combination and self.config.svd_rank is not None:
            self._check_svd_rank(model)
        torch.manual_seed(self.config.seed)  # DARE's drops
        try:
            model.add_weighted_adapter([f"ingredient-{i}" for i in indices], weights, name,
                                       combination_type=combination, svd_rank=self.config.svd_rank,
                                       density=self.config.density,
                                       majority_sign_method=self.config.majority_sign_method)
        except ValueError as err:  # PEFT's refusals: ranks differ for linear/ties, shared modules_to_save...
            raise _field_error(self.ctx, "lora_combination", f"PEFT add_weighted_adapter({combination}) refused "
                               f"these adapters: {err}") from None

    def _check_svd_rank(self, model: Any) -> None:
        """An SVD keeps at most min(in, out) directions of a layer: PEFT would save factors narrower than the
        adapter's rank, which no one can load."""
        from peft.tuners.lora import LoraLayer

        layers = [(name, min(m.in_features, m.out_features)) for name, m in model.named_modules()
                  if isinstance(m, LoraLayer) and any(f"ingredient-{i}" in m.lora_A for i in range(len(self.ingredients)))]
        name, most = min(layers, key=lambda item: item[1])
        if self.config.svd_rank > most:
            raise _field_error(self.ctx, "svd_rank", f"{self.config.svd_rank} is more than an SVD of {name} can keep "
                               f"({most} = min(in, out)); give at most {most}")

    def saved(self) -> tuple[Any, Any]:
        from alignkit.modeling.models import load_model, load_tokenizer

        if self._model is not None:  # free the side-by-side adapters before loading the merged model
            self.close()
        folder = str(self.ctx.run_dir / "model")
        return _move(load_model(folder, dtype=self.config.dtype), self.ctx), load_tokenizer(folder)

    def write(self, kept: list[int], weights: list[float]) -> dict[str, str]:
        """The combined adapter (``adapter/``) and the base with it merged in (``model/``), each written to a temp
        folder and renamed; a complete one from an earlier attempt is kept."""
        import shutil

        from peft import get_peft_model_state_dict

        from alignkit.core.artifacts import atomic_dir
        from alignkit.modeling.models import check_finite_weights, load_tokenizer, merge_adapter

        adapter_dir, model_dir = self.ctx.run_dir / "adapter", self.ctx.run_dir / "model"
        if not (adapter_dir / "adapter_config.json").is_file():
            self._combine(kept, weights, "merged", self.combination(soup=self.config.method == "greedy"))
            model = self._model
            check_finite_weights(get_peft_model_state_dict(model, adapter_name="merged").items(),
                                 f"{self.ctx.name}: combined adapter")
            with atomic_dir(adapter_dir) as tmp:
                model.save_pretrained(str(tmp / "peft"), selected_adapters=["merged"])
                saved = tmp / "peft" / "merged"  # PEFT saves a non-default adapter in a folder of its name
                for file in saved.iterdir():
                    shutil.move(str(file), str(tmp / file.name))
                shutil.rmtree(tmp / "peft")
                load_tokenizer(self.ingredients[0]["name"], padding_side="right").save_pretrained(tmp)
        if not (model_dir / "config.json").is_file():
            self.close()
            merge_adapter(str(adapter_dir), str(model_dir), dtype=self.config.merged_dtype)
            print(f"[alignkit] {self.ctx.name}: wrote the {self.config.method} merge of {len(kept)} adapter(s) to "
                  f"{model_dir}")
        return {"model": str(model_dir), "adapter": str(adapter_dir)}

    def close(self) -> None:
        self._model = None
