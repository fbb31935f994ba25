"""Process reward model (PRM) training on step labels: Math-Shepherd's verifier (arXiv:2312.08935, sec. 3.4).

Recipe example::

    - kind: prm
      model: smollm2-135m-instruct
      data: {source: ${label.data}, eval_size: 0.1}     # stepwise rows: prompt, completions, labels
      lora: {r: 16, alpha: 32}
    - kind: prm
      name: orm                                          # the outcome-only baseline on the same rows
      model: smollm2-135m-instruct
      data: {source: ${label.data}, eval_size: 0.1}
      train_on_last_step_only: true

What it does, in order: load stepwise rows (our format, TRL's stepwise format, the public Math-Shepherd
``input``/``label`` format or PRM800K ratings, through :func:`alignkit.data.load_dataset`'s adapters) and
hold out an eval split; load the backbone as a two-label token classifier (quantized if asked; LoRA if
asked, the new ``score`` head trained in full); lay out each row with :func:`alignkit.rewards.prm.encode_steps`
(label at the last token of the separator after each step, -100 elsewhere); measure the held-out step
metrics; train with ``transformers.Trainer`` and our collator and loss (TRL 1.16 has no PRMTrainer;
resumes from the last checkpoint in the stage folder); save the adapter and a merged model with
``alignkit_prm.json`` (separator, chat, aggregation) that :class:`alignkit.rewards.prm.PRMScorer` reads; measure
again. Outputs: ``${<name>.model}``, ``${<name>.adapter}``.

Held-out metrics (:func:`alignkit.rewards.prm.step_metrics`): step accuracy, F1 of finding bad steps, "first error
found" (the first step scored below 0.5 is the labelled first bad step) and "no error kept".

Departures from the paper and from TRL <= 1.13's PRMTrainer (see also :mod:`alignkit.rewards.prm`):

1. A classifier head on the separator token, trained with cross-entropy (soft labels: against
   ``(1 - s, s)``); the paper reads ``+``/``-`` logits of the LM head at a tag token.
2. ``train_on_last_step_only`` (TRL's flag, our ORM emulation) keeps only the final step's label, and
   sets it to "the solution's final answer is right": the row's ``solution_correct`` when it has one,
   else the last step's hard label (the same thing for a finished solution; a solution cut off by length
   has a rollout label there but no answer of its own). An ORM on the same rows, which makes the
   PRM-vs-ORM comparison fair (same data, model and budget).
3. Rows too long for ``max_length`` lose whole trailing steps (never part of one); rows left with no
   labelled step are dropped and counted (``rows_dropped``).
4. ``head: lm-logprob`` (ours) keeps the causal LM (LoRA) and scores step i by
   ``sigmoid(log P(step i) + logprob_offset)`` (:func:`alignkit.rewards.prm.logprob_step_logits`), trained with
   the same losses: it starts as the policy's own judgement of its steps instead of a random head.
5. ``ranking_loss_weight`` (ours, off by default) adds a Bradley-Terry loss between a prompt's right and
   wrong solutions (:func:`alignkit.rewards.prm.solution_ranking_loss`, on the solution score the model will be
   ranked by: min over steps for a PRM, the last step for an ORM). Pointwise labels let a model learn
   which *problems* are hard; best-of-N needs it to tell one problem's solutions apart. A solution is right
   by its row's ``solution_correct`` (the label stage writes it), else by its last step's hard label.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from alignkit.core.config import DataSpec
from alignkit.core.errors import DataError, RecipeError
from alignkit.stages.common import (
    TrainStageConfig,
    check_trl_passthrough,
    fit,
    save_trained_model,
    train_metrics,
    trl_args,
)
from alignkit.core.stage import StageContext, StageResult


class Config(TrainStageConfig):
    kind: str = "prm"
    data: DataSpec = Field(..., description="Stepwise rows (prompt, completions, labels[, soft_labels]); "
                           "`eval_size` holds some out for the step metrics.")
    eval_data: DataSpec | None = Field(
        None, description="Held-out stepwise rows (instead of splitting `data` with its `eval_size`).")
    separator: str = Field("\n", min_length=1, description="Text after each step; its last token is scored.")
    chat: bool = Field(True, description="Render the prompt with the chat template (as the policy saw it).")
    train_on_last_step_only: bool = Field(
        False, description="Label only the final step (an outcome reward model on the same rows).")
    soft_labels: bool = Field(
        False, description="Train on `soft_labels` (Math-Shepherd SE) instead of hard `labels` (HE, the paper's "
        "default).")
    aggregation: Literal["min", "prod", "last", "mean"] = Field(
        "min", description="How PRMScorer turns step scores into a solution score by default (the paper: min; "
        "an ORM is scored by its last step whatever this says).")
    ranking_loss_weight: float = Field(
        0.0, ge=0, description="Weight of a within-problem ranking loss beside the step loss: for every pair of "
        "solutions to the same prompt, one right and one wrong, -log sigmoid(s_right - s_wrong) on the "
        "aggregated solution score. When > 0 a prompt's rows are batched together and batch_size counts "
        "prompts, not rows.")
    head: Literal["token-cls", "lm-logprob"] = Field(
        "token-cls", description="token-cls: a new 2-label classifier on the separator token (TRL's PRM shape); "
        "lm-logprob: keep the causal LM and score a step by its log-probability plus logprob_offset, so the "
        "score starts from what the backbone already knows.")
    logprob_offset: float = Field(
        1.0, description="lm-logprob head only: p_good = sigmoid(log P(step) + offset), i.e. a step is judged "
        "good at the start when its log-probability is above -offset.")
    eval_batch_size: int = Field(16, gt=0, description="Sequences per forward when scoring the eval split.")
    lr: float = Field(1e-4, gt=0, description="Peak learning rate (LoRA; use ~1e-5 for full fine-tuning).")


def outputs(run_dir: Path) -> dict[str, str]:
    return {"model": str(run_dir / "model"), "adapter": str(run_dir / "adapter"), "dir": str(run_dir)}


def check(config: Config, base_dir: Path) -> None:
    check_trl_passthrough(config.trl, "transformers.TrainingArguments")
    if config.data.eval_size is not None and config.eval_data is not None:
        raise RecipeError("give either data.eval_size or eval_data, not both", field="eval_data")


def run(config: Config, ctx: StageContext) -> StageResult:
    from transformers import Trainer

    from alignkit.data import load_dataset, split_eval
    from alignkit.modeling.models import apply_lora, load_model, load_tokenizer
    from alignkit.rewards.prm import write_prm_config

    train_rows, eval_rows = _load_rows(config, load_dataset, split_eval)
    tokenizer = load_tokenizer(config.model, padding_side="right")
    train_set, dropped = encode_dataset(train_rows, tokenizer, config)
    eval_set, _ = encode_dataset(eval_rows, tokenizer, config) if eval_rows is not None else ([], 0)
    metrics: dict[str, Any] = {"train_rows": len(train_set), "rows_dropped": dropped,
                               "train_labelled_steps": sum(_labelled(r) for r in train_set)}
    train_items: list[dict[str, Any]] = train_set
    if config.ranking_loss_weight > 0:
        from alignkit.rewards.prm import ranking_pairs

        train_items = group_by_prompt(train_set)  # a batch holds whole prompts, so pairs stay within it
        metrics.update(train_prompts=len(train_items), train_ranking_pairs=len(ranking_pairs(
            [[e["correct"] for e in item["solutions"]] for item in train_items])))

    from transformers import set_seed

    set_seed(config.seed)  # the score head is initialised here, before the Trainer seeds anything
    task = "causal-lm" if config.head == "lm-logprob" else "token-cls"
    model = load_model(config.model, task=task, num_labels=2, quantization=config.quantization,
                       dtype=config.dtype, attn_implementation=config.attn_implementation, trainable=True)
    if config.lora is not None:
        model = apply_lora(model, config.lora, task, gradient_checkpointing=config.gradient_checkpointing)
    if eval_set:
        metrics.update({f"{k}_before": v for k, v in evaluate(model, tokenizer, eval_set, config).items()})

    trainer_args = dict(
        model=model,
        args=training_args(config, ctx),
        train_dataset=train_items,  # a list of examples (or of prompt groups); the collator pads
        data_collator=Collator(tokenizer.pad_token_id, step_index=config.head == "lm-logprob"),
        compute_loss_func=loss_func,
    )
    if config.ranking_loss_weight > 0 or config.head == "lm-logprob":
        trainer = prm_trainer(ranking_loss_weight=config.ranking_loss_weight, aggregation=_ranked_by(config),
                              head=config.head, logprob_offset=config.logprob_offset, **trainer_args)
    else:
        trainer = Trainer(**trainer_args)
    fitted = fit(trainer, ctx)
    metrics.update(train_metrics(trainer, fitted.result, fitted.seconds),
                   examples_per_second=round(fitted.result.metrics.get("train_samples_per_second", 0.0), 2))
    artifacts = save_trained_model(trainer, tokenizer, ctx)
    if ctx.is_main:
        for folder in artifacts.values():
            write_prm_config(folder, separator=config.separator, chat=config.chat,
                             aggregation=_ranked_by(config),
                             last_step_only=config.train_on_last_step_only, head=_head_name(config),
                             logprob_offset=config.logprob_offset)
    if eval_set:
        report = evaluate(trainer.model, tokenizer, eval_set, config)
        metrics.update(report, eval_rows=len(eval_set))
        if ctx.is_main:
            print(f"[alignkit] {ctx.name}: held-out step accuracy {report['step_accuracy']:.3f}, "
                  f"bad-step F1 {report['step_f1']:.3f}, first error found {report['first_error_found']:.3f}, "
                  f"within-prompt ranking {report['ranking_accuracy']:.3f} ({report['ranking_pairs']} pairs)")
    ctx.log_metrics(metrics)
    return StageResult(metrics=metrics, artifacts=artifacts)


def _head_name(config: Config) -> str:
    """The head as alignkit_prm.json and :func:`alignkit.rewards.prm.score_encoded` name it."""
    return "lm-logprob" if config.head == "lm-logprob" else "token-cls-2"


def _ranked_by(config: Config) -> str:
    """The aggregation solutions are ranked by: the last step for an ORM, else the configured one."""
    return "last" if config.train_on_last_step_only else config.aggregation


def _load_rows(config: Config, load_dataset, split_eval):
    """(train rows, eval rows or None) as lists of dicts in the stepwise format."""
    data = load_dataset(config.data, "stepwise")
    train, held_out = split_eval(data, config.data.eval_size, config.data.seed)
    if config.eval_data is not None:
        held_out = load_dataset(config.eval_data, "stepwise")
    return list(train), (list(held_out) if held_out is not None else None)


def encode_dataset(rows: list[dict[str, Any]], tokenizer: Any, config: Config) -> tuple[list[dict[str, Any]], int]:
    """Stepwise rows -> ``{input_ids, labels, step_labels}`` examples, and how many rows were dropped.

    ``labels`` is the per-token float target (P(good) at each labelled step end, -100 elsewhere);
    ``step_labels`` keeps the hard labels of the steps that fit, for the eval metrics.
    """
    from alignkit.rewards.prm import IGNORE, encode_steps, step_targets, token_labels
    from alignkit.data.prompts import render_prompt

    examples, dropped = [], 0
    for index, row in enumerate(rows):
        soft = row.get("soft_labels") if config.soft_labels else None
        if config.soft_labels and soft is None:
            raise DataError(f"row {index}: soft_labels: true needs a 'soft_labels' column (Math-Shepherd SE "
                            "labels, e.g. from the label stage); set soft_labels: false to train on 'labels'")
        prompt_text = render_prompt(tokenizer, row["prompt"], chat=config.chat)
        encoded = encode_steps(tokenizer, prompt_text, row["completions"], config.separator, config.max_length)
        correct = row.get("solution_correct")
        targets = step_targets(row["labels"], soft, last_step_only=config.train_on_last_step_only,
                               solution_correct=correct)
        labels = token_labels(encoded, targets)
        if all(value == IGNORE for value in labels):
            dropped += 1  # nothing labelled fits in max_length
            continue
        examples.append({"input_ids": encoded.input_ids, "labels": labels, "step_ends": encoded.step_ends,
                         "step_spans": encoded.step_spans,
                         "step_labels": [bool(v) for v in row["labels"][: len(encoded.step_ends)]],
                         "prompt_key": json.dumps(row["prompt"], sort_keys=True),
                         "correct": bool(row["labels"][-1]) if correct is None else bool(correct)})
    return examples, dropped


def group_by_prompt(examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``[{"solutions": [examples with one prompt]}]``, prompts in order of first appearance."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for example in examples:
        groups.setdefault(example["prompt_key"], []).append(example)
    return [{"solutions": solutions} for solutions in groups.values()]


def _labelled(example: dict[str, Any]) -> int:
    return sum(value != -100 for value in example["labels"])


@dataclasses.dataclass
class Collator:
    """Right-pads ``input_ids`` (with ``pad_id``) and float ``labels`` (with -100); adds the attention mask.

    Items that are prompt groups (``{"solutions": [...]}``, from :func:`group_by_prompt`) are flattened,
    and the batch gains ``ranking_pairs`` [P, 2]: row indices (right, wrong) within each group.
    """

    pad_id: int
    step_index: bool = False  # add step_index [B, T] (-1 padded) for the lm-logprob head

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        from alignkit.rewards.prm import EncodedSteps, pad_batch, pad_index, ranking_pairs, step_token_index

        grouped = "solutions" in items[0]
        examples = [e for item in items for e in item["solutions"]] if grouped else items
        batch = pad_batch([e["input_ids"] for e in examples], self.pad_id, [e["labels"] for e in examples])
        if self.step_index:
            batch["step_index"] = pad_index([step_token_index(EncodedSteps(e["input_ids"], e["step_ends"],
                                                                           e["step_spans"])) for e in examples])
        if grouped:
            pairs = ranking_pairs([[e["correct"] for e in item["solutions"]] for item in items])
            batch["ranking_pairs"] = torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)
        return batch


def prm_trainer(*, ranking_loss_weight: float, aggregation: str, head: str, logprob_offset: float,
                **trainer_args: Any) -> Any:
    """A ``transformers.Trainer`` for the ``lm-logprob`` head and/or the ranking term.

    The loss is :func:`alignkit.rewards.prm.step_loss` on the step logits (the model's own, or
    :func:`alignkit.rewards.prm.logprob_step_logits` of a causal LM), plus ``ranking_loss_weight`` times
    :func:`alignkit.rewards.prm.solution_ranking_loss`. ``step_index`` and ``ranking_pairs`` are taken out of the
    batch before the forward (the model does not accept them). The step loss is normalised over the
    accumulated batch (``num_items_in_batch``, scaled by the process count as the Trainer does for
    ``compute_loss_func``); the ranking term is a mean over this micro-batch's pairs, so it is divided by
    the accumulation steps to match.
    """
    from transformers import Trainer

    from alignkit.rewards.prm import logprob_step_logits, solution_ranking_loss, step_loss

    class PRMTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            pairs, step_index = inputs.pop("ranking_pairs", None), inputs.pop("step_index", None)
            labels = inputs.pop("labels")
            outputs = model(**inputs)
            logits = outputs.logits
            if head == "lm-logprob":
                logits = logprob_step_logits(logits, inputs["input_ids"], step_index, logprob_offset)
            loss = step_loss(logits, labels, num_items_in_batch)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes
            if ranking_loss_weight > 0 and pairs is not None:
                ranking = solution_ranking_loss(logits, labels, pairs, aggregation)
                loss = loss + ranking_loss_weight * ranking / self.current_gradient_accumulation_steps
            return (loss, outputs) if return_outputs else loss

    return PRMTrainer(**trainer_args)


def loss_func(outputs: Any, labels: Any, num_items_in_batch: Any = None) -> Any:
    """``Trainer(compute_loss_func=...)`` hook: :func:`alignkit.rewards.prm.step_loss` on the token logits."""
    from alignkit.rewards.prm import step_loss

    return step_loss(outputs.logits, labels, num_items_in_batch)


def evaluate(model: Any, tokenizer: Any, examples: list[dict[str, Any]], config: Config) -> dict[str, float]:
    """Held-out step metrics of ``model`` (:func:`alignkit.rewards.prm.step_metrics` against the hard labels), and
    ``ranking_accuracy``: how often a right solution outscores a wrong one to the same prompt
    (:func:`alignkit.maths.selection.pairwise_ranking`, on the solution score the model is ranked by; NaN when the
    split holds no such pair; ``ranking_pairs`` counts them)."""
    from alignkit.maths.selection import aggregate_steps, pairwise_ranking
    from alignkit.rewards.prm import EncodedSteps, score_encoded, step_metrics

    encoded = [EncodedSteps(e["input_ids"], e["step_ends"], e["step_spans"]) for e in examples]
    probs = score_encoded(model, encoded, tokenizer.pad_token_id, config.eval_batch_size, head=_head_name(config),
                          offset=config.logprob_offset)
    report = step_metrics(probs, [e["step_labels"] for e in examples])
    groups = group_by_prompt([dict(e, score=aggregate_steps(p, _ranked_by(config)))
                              for e, p in zip(examples, probs, strict=True)])
    report["ranking_accuracy"], report["ranking_pairs"] = pairwise_ranking(
        [[e["score"] for e in g["solutions"]] for g in groups], [[e["correct"] for e in g["solutions"]] for g in groups])
    return report


def training_args(config: Config, ctx: Any) -> Any:
    """``transformers.TrainingArguments`` for this stage, from the shared mapping in :mod:`.common`."""
    from transformers import TrainingArguments

    return trl_args(TrainingArguments, config, ctx, remove_unused_columns=False)  # our collator builds batches
