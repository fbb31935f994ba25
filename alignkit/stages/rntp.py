r"""Reasoning next-token prediction (RNTP): GRPO on plain text, rewarded for predicting the next tokens.

Reinforcement Pre-Training (RPT, Dong et al. 2025, arXiv:2506.08007) turns any text into verifiable
problems: at a position t the model sees the text before t, thinks, and writes what comes next in
``\boxed{}``; the reward is 1 iff that is the true text up to one of its token boundaries. RLP (NVIDIA
2025, arXiv:2510.01265) rewards the thought densely by how much it raises the true token's log-prob.

Recipe example::

    - kind: rntp
      model: smollm2-135m-instruct
      lora: {r: 16, alpha: 32}
      data: {source: arith, seed: 3, params: {n: 64, steps: 2}}       # any `text` source
      eval_data: {source: arith, seed: 9002, params: {n: 24, steps: 2}}
      min_entropy: 0.5            # keep positions the proxy finds hard (nats, top-16)
      reward: match               # match | first_token | dense
      num_generations: 4
      batch_size: 8
      max_steps: 30

What it does, in order:

1. Positions (:func:`alignkit.maths.rntp.document_positions`): per document, one proxy forward gives the top-k
   entropy of every next token; up to ``positions_per_document`` positions with entropy >= ``min_entropy``
   are drawn. Documents are processed in shards of ``shard_size`` written to ``positions/<split>/`` (temp
   file, then rename), so a rerun resumes; the merged rows are ``train_positions.jsonl`` and
   ``eval_positions.jsonl`` (held-out documents, drawn with ``eval_min_entropy``, default 0: every
   difficulty). The proxy is the policy unless ``proxy`` names a model with the same tokenizer.
2. Evaluation before training on the held-out positions: (a) ``plain``: the model's greedy next token on
   the raw context, no thinking; (b) ``think``: greedy thinking from the prompt, the boxed prediction.
   Both are scored by the same matcher as the reward; accuracy overall and per entropy bucket.
3. Optional pre-filter (``prefilter_samples: k``): the starting policy samples k completions per training
   position; positions whose k rewards are all equal are dropped (DAPO's dynamic sampling, done once
   before training instead of per batch: TRL 1.16 gives such groups zero advantage and keeps them).
4. GRPO through TRL's ``GRPOTrainer`` (the ``grpo`` stage's fields and defaults: ``beta: 0``, dapo loss),
   reward ``reward/rntp.py:next_token_match`` or ``:thought_gain`` plus any extra ``rewards``. Each step
   logs the reward-hacking signals ``hack/*`` (:func:`boxed_signals`: length, no boxed answer, repetition).
5. Evaluation after: (c) ``think`` (and ``plain`` again) with the merged trained model.

Outputs: ``${<name>.model}``, ``${<name>.adapter}``, ``${<name>.positions}``, ``${<name>.evaluation}``
(one line per (when, mode) with the bucketed accuracies; per-position detail in ``eval_<when>.jsonl``).

Departures from the papers:

1. Buckets are terciles of the held-out positions' proxy entropy (or fixed ``entropy_buckets``); RPT
   reports easy/medium/hard splits by entropy thresholds of a larger proxy.
2. ``leading_space: lenient`` (default) ignores leading whitespace on both sides: a model boxing "42" for
   the true " 42" is right. Positions whose next token is whitespace only are skipped by default.
3. The proxy shares the policy's tokenizer, so positions are token positions of both (RPT used a separate
   small proxy, R1-Distill-Qwen-1.5B, with the same tokenizer as its policy).
4. The dense reward scores with a frozen copy of the starting policy (RLP: an EMA teacher for the
   no-think baseline); see ``reward/rntp.py:thought_gain``.
5. The context is at most ``context_tokens`` tokens (RPT gives the whole preceding text).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from alignkit.core import shards
from alignkit.core.artifacts import write_jsonl_atomic
from alignkit.core.config import DataSpec
from alignkit.generation import FastSpec, GenerationSpec
from alignkit.rewards.programs import RewardSpec
from alignkit.stages.grpo import Config as GRPOStageConfig
from alignkit.core.stage import StageContext, StageResult
from alignkit.data.loading import read_jsonl

DEFAULT_INSTRUCTION = (
    "Here is the beginning of a text. Think about what comes next, then write the next word or number of "
    "the text inside \\boxed{{}}.\n\nText:\n{context}"
)


class Config(GRPOStageConfig):
    kind: str = "rntp"
    data: DataSpec = Field(..., description="Plain-text documents (`text` format: arith, gsm8k, a file or Hub "
                           "dataset with a `text` column).")
    rewards: list[RewardSpec] = Field(
        default_factory=list, description="Extra reward programs added to the rntp reward (weight 1).")
    reward: Literal["match", "first_token", "dense"] = Field(
        "match", description="match: boxed text = true text up to any token boundary (RPT); first_token: "
        "exactly the first token; dense: log-prob gain of the true token from the thought (RLP).")
    leading_space: Literal["lenient", "exact"] = Field(
        "lenient", description="lenient: ignore leading whitespace of prediction and true text; exact: bytes.")
    proxy: str | None = Field(None, description="Model scoring next-token entropy (default: the policy); "
                              "must share the policy's tokenizer.")
    entropy_top_k: int = Field(16, gt=1, description="Entropy over the proxy's k most likely tokens (RPT: 16).")
    min_entropy: float = Field(0.5, ge=0, description="Keep training positions with proxy entropy >= this (nats).")
    positions_per_document: int = Field(2, gt=0, description="Most training positions drawn per document.")
    min_context_tokens: int = Field(8, ge=1, description="Positions need at least this many tokens before them.")
    context_tokens: int = Field(128, gt=0, description="Most tokens of preceding text shown in the prompt.")
    continuation_tokens: int = Field(8, gt=0, description="Tokens of true continuation kept (longest match).")
    max_document_tokens: int = Field(512, gt=0, description="Documents are cut to this many tokens.")
    skip_whitespace_tokens: bool = Field(True, description="Skip positions whose next token is whitespace only.")
    instruction: str = Field(DEFAULT_INSTRUCTION, description="Prompt template; `{context}` is the text before "
                             "the position (write literal braces doubled: `\\boxed{{}}`).")
    eval_data: DataSpec | None = Field(None, description="Held-out documents for the bucketed evaluation.")
    eval_positions_per_document: int = Field(2, gt=0, description="Held-out positions drawn per document.")
    eval_min_entropy: float = Field(0.0, ge=0, description="Entropy floor of held-out positions (0: all).")
    entropy_buckets: list[float] | None = Field(
        None, description="Two entropy edges [easy<=a<medium<=b<hard]; default: terciles of the held-out set.")
    prefilter_samples: int = Field(
        0, ge=0, description="Sample k completions per training position first; drop positions whose k "
        "rewards are all equal (0: keep all; TRL then gives those groups zero advantage).")
    eval_generation: GenerationSpec = Field(
        default_factory=lambda: FastSpec(batch_size=32),
        description="Backend for the evaluation and pre-filter sampling, which sample a fixed model (fast, hf, "
        "openai...); `generation` is the training sampler, as in grpo.")
    shard_size: int = Field(16, gt=0, description="Documents per position shard (the unit of resumption).")

    @field_validator("instruction")
    @classmethod
    def _has_context(cls, value: str) -> str:
        if "{context}" not in value:
            raise ValueError("instruction must contain {context} (where the preceding text goes)")
        try:
            value.format(context="")
        except (IndexError, KeyError, ValueError) as err:
            raise ValueError(f"instruction is not a valid template ({err}); double literal braces: \\boxed{{{{}}}}")
        return value

    @field_validator("entropy_buckets")
    @classmethod
    def _two_edges(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and (len(value) != 2 or not 0 <= value[0] < value[1]):
            raise ValueError(f"entropy_buckets must be two increasing edges [a, b] >= 0, got {value}")
        return value


def outputs(run_dir: Path) -> dict[str, str]:
    return {"model": str(run_dir / "model"), "adapter": str(run_dir / "adapter"),
            "positions": str(run_dir / "train_positions.jsonl"), "evaluation": str(run_dir / "evaluation.jsonl"),
            "dir": str(run_dir)}


def check(config: Config, base_dir: Path) -> None:
    from alignkit.core.errors import RecipeError
    from alignkit.stages.grpo import check as grpo_check

    if config.generation.backend == "openai" and not config.generation.serve_adapter:
        raise RecipeError("rntp's `generation` is its training sampler, as in grpo (trl, fast, hf, vllm, or openai with "
                          "serve_adapter: true); an OpenAI-compatible server for the evaluation and pre-filter goes in "
                          "`eval_generation`", field="generation")
    grpo_check(config, base_dir)
    if config.reward == "dense" and config.prefilter_samples:
        raise RecipeError("prefilter_samples drops groups of equal 0/1 rewards; dense rewards are continuous "
                          "and never tie, so set prefilter_samples: 0 with reward: dense", field="prefilter_samples")


def run(config: Config, ctx: StageContext) -> StageResult:
    import torch

    from alignkit.modeling.models import is_quantized, load_model, load_tokenizer
    from alignkit.stages.rl_common import vllm_available

    if config.generation.backend == "vllm":
        vllm_available(config.generation)  # before the positions, the model and the evaluation
    # 1. Positions (resumable shards), bucket edges from the held-out positions.
    tokenizer = load_tokenizer(config.model, padding_side="left")
    train = sample_split(config, ctx, tokenizer, "train", config.data)
    held = sample_split(config, ctx, tokenizer, "eval", config.eval_data) if config.eval_data else []
    thresholds = config.entropy_buckets or _terciles(held)
    metrics: dict[str, Any] = {"positions_train": len(train), "positions_eval": len(held),
                               "entropy_edges": [round(x, 4) for x in thresholds]}
    # 2. Evaluation before training: (a) plain and (b) think.
    # trainable=True: the evaluation below runs the 4-bit model without gradients, which would otherwise let
    # bitsandbytes repack its weights into an inference-only CPU layout that drops LoRA gradients.
    model = load_model(config.model, quantization=config.quantization, dtype=config.dtype,
                       attn_implementation=config.attn_implementation, trainable=True)
    if torch.cuda.is_available() and not is_quantized(model):
        model.to("cuda")  # TRL places the model itself for training
    before = evaluate_cached(model, tokenizer, held, thresholds, config, ctx, "before") if held and ctx.is_main else {}
    metrics.update(_problem_accuracy(model, tokenizer, config, ctx, "before"))
    # 3. Optional pre-filter, then GRPO.
    if config.prefilter_samples:
        train, metrics["prefilter_dropped"] = prefilter(model, tokenizer, train, config, ctx)
    artifacts, train_metrics = train_grpo(model, tokenizer, train, config, ctx)
    metrics.update(train_metrics)
    # 4. Evaluation after, (c), on the merged model later stages will load.
    after: dict[str, Any] = {}
    if ctx.is_main:
        trained = load_model(artifacts["model"], dtype=config.dtype).to("cuda" if torch.cuda.is_available() else "cpu")
        after = evaluate_cached(trained, tokenizer, held, thresholds, config, ctx, "after") if held else {}
        metrics.update(_problem_accuracy(trained, tokenizer, config, ctx, "after"))
    metrics.update(_flatten(before, "before") | _flatten(after, "after"))
    artifacts["positions"] = str(ctx.run_dir / "train_positions.jsonl")
    if held and ctx.is_main:
        artifacts["evaluation"] = write_evaluation(ctx.run_dir / "evaluation.jsonl", before, after)
        print(summary_table(before, after))
    ctx.log_metrics(metrics)
    return StageResult(metrics=metrics, artifacts=artifacts)


def _problem_accuracy(model, tokenizer, config: Config, ctx, when: str) -> dict[str, float]:
    """Greedy exact match on ``accuracy_data`` (as in grpo), when the recipe gives some."""
    from alignkit.data import load_dataset
    from alignkit.stages.common import measure_accuracy

    if config.accuracy_data is None:
        return {}
    problems = load_dataset(config.accuracy_data, "problems")
    return {f"accuracy_{when}": measure_accuracy(model, tokenizer, problems, config, ctx, when)}


def write_evaluation(path: Path, before: dict[str, Any], after: dict[str, Any]) -> str:
    """One line per (when, mode): the bucketed accuracies and counts."""
    write_jsonl_atomic(path, [{"when": when, "mode": mode, **report[mode]}
                        for when, report in (("before", before), ("after", after)) for mode in ("plain", "think")])
    return str(path)


# ------------------------------------------------------------------------------------------------ positions


def sample_split(config: Config, ctx: Any, tokenizer: Any, split: str, spec: DataSpec) -> list[dict[str, Any]]:
    """Positions of one split, shard by shard (resumable), merged into ``<split>_positions.jsonl``."""
    from tqdm.auto import tqdm

    from alignkit.data import load_dataset
    from alignkit.core.errors import DataError

    docs = [row["text"] for row in load_dataset(spec, "text")]
    shard_dir = ctx.run_dir / "positions" / split
    shard_dir.mkdir(parents=True, exist_ok=True)
    n_shards = shards.count(len(docs), config.shard_size)
    todo = [j for j in range(n_shards) if not shards.path(shard_dir, j).is_file()]
    if todo and ctx.is_main:
        entropies_fn = _proxy(config, tokenizer)
        bar = tqdm(total=len(todo), unit="shard", desc=f"rntp positions ({split})", dynamic_ncols=True)
        for j in todo:
            rows = []
            for i in range(j * config.shard_size, min(len(docs), (j + 1) * config.shard_size)):
                rows += [{"doc_index": i, **row} for row in _positions(docs[i], tokenizer, entropies_fn, config,
                                                                        split, seed=config.seed * 1_000_003 + i)]
            write_jsonl_atomic(shards.path(shard_dir, j), rows)
            bar.update(1)
        bar.close()
    ctx.wait()
    rows = [row for j in range(n_shards) for row in shards.read(shard_dir, j)]
    for row in rows:
        row["prompt"] = config.instruction.format(context=row["context"])
    if not rows:
        floor = config.min_entropy if split == "train" else config.eval_min_entropy
        raise DataError(f"{split}: no position of {len(docs)} documents qualified (entropy >= {floor}, at least "
                        f"{config.min_context_tokens} tokens of context); lower the entropy floor or add text")
    if ctx.is_main:
        write_jsonl_atomic(ctx.run_dir / f"{split}_positions.jsonl", rows)
    return rows


def _positions(text: str, tokenizer: Any, entropies_fn: Any, config: Config, split: str, seed: int) -> list[dict]:
    from alignkit.maths.rntp import document_positions

    train = split == "train"
    return document_positions(
        text, tokenizer, entropies_fn, seed=seed, leading_space=config.leading_space,
        min_entropy=config.min_entropy if train else config.eval_min_entropy,
        per_document=config.positions_per_document if train else config.eval_positions_per_document,
        min_context_tokens=config.min_context_tokens, context_tokens=config.context_tokens,
        continuation_tokens=config.continuation_tokens, max_document_tokens=config.max_document_tokens,
        skip_whitespace_tokens=config.skip_whitespace_tokens)


def _proxy(config: Config, tokenizer: Any) -> Any:
    """``ids -> entropies`` from the proxy model (loaded once per call site; same tokenizer required)."""
    import functools

    import torch

    from alignkit.core.errors import RecipeError
    from alignkit.modeling.models import load_model, load_tokenizer
    from alignkit.maths.rntp import proxy_entropies

    name = config.proxy or config.model
    if config.proxy and load_tokenizer(name).get_vocab() != tokenizer.get_vocab():
        raise RecipeError(f"proxy {name!r} has a different tokenizer from the policy {config.model!r}; positions "
                          "are token positions of both, so pick a proxy of the same model family", field="proxy")
    model = load_model(name, dtype=config.dtype).to("cuda" if torch.cuda.is_available() else "cpu").eval()
    return functools.partial(proxy_entropies, model, k=config.entropy_top_k)


def _terciles(rows: list[dict[str, Any]]) -> list[float]:
    from alignkit.maths.rntp import entropy_thresholds

    return entropy_thresholds([row["entropy"] for row in rows])


# ----------------------------------------------------------------------------------------------- evaluation


def evaluate_cached(model, tokenizer, rows, thresholds, config: Config, ctx, when: str) -> dict[str, Any]:
    """:func:`evaluate`, read back from ``eval_<when>.jsonl`` when a previous attempt finished it."""
    from alignkit.maths.rntp import bucketed_accuracy

    path = ctx.run_dir / f"eval_{when}.jsonl"
    if path.is_file():
        records = read_jsonl(path)
    else:
        records = evaluate(model, tokenizer, rows, config, progress=ctx.is_main)
        write_jsonl_atomic(path, records)
    entropies = [r["entropy"] for r in records]
    return {mode: bucketed_accuracy([r[f"{mode}_correct"] for r in records], entropies, thresholds)
            for mode in ("plain", "think")}


def evaluate(model, tokenizer, rows: list[dict[str, Any]], config: Config, *, progress: bool) -> list[dict]:
    """Per held-out position: (a) greedy next token on the raw context, (b) greedy thinking + boxed answer."""
    from alignkit.generation import SamplingParams
    from alignkit.data.prompts import render_prompt
    from alignkit.maths.rntp import boxed_prediction, continuation_match, greedy_next_tokens

    plain = greedy_next_tokens(model, tokenizer, [row["context_ids"] for row in rows])
    engine = config.eval_generation.build(model=model, tokenizer=tokenizer)
    prompts = [render_prompt(tokenizer, row["prompt"], chat=config.chat) for row in rows]
    params = SamplingParams(max_new_tokens=config.max_completion_length, temperature=0.0)
    model.eval()
    thoughts = [samples[0].text for samples in engine.generate(prompts, params, progress=progress)]
    first = config.reward == "first_token"
    records = []
    for row, token, thought in zip(rows, plain, thoughts):
        boxed = boxed_prediction(thought)
        records.append({
            "doc_index": row["doc_index"], "position": row["position"], "entropy": row["entropy"],
            "context_tail": row["context"][-40:], "continuation": row["continuation"], "plain": token,
            "think": boxed, "completion": thought,
            "plain_correct": continuation_match(token, row["continuation"], row["token_ends"], first_token_only=first,
                                                leading_space=config.leading_space),
            "think_correct": continuation_match(boxed, row["continuation"], row["token_ends"], first_token_only=first,
                                                leading_space=config.leading_space),
        })
    return records


def _flatten(report: dict[str, Any], when: str) -> dict[str, Any]:
    """``{"plain": {"all": .., "hard": ..}}`` -> ``{"plain_before_all": .., "plain_before_hard": ..}``."""
    flat = {f"{mode}_{when}_{key}": value for mode, accs in report.items() for key, value in accs.items()
            if not key.startswith("n_")}
    return flat | ({f"eval_{key}": value for key, value in report["plain"].items() if key.startswith("n_")}
                   if report else {})


def summary_table(before: dict[str, Any], after: dict[str, Any]) -> str:
    """Bucketed next-token accuracy, a row per (mode, when), a column per bucket (counts in the header)."""
    from alignkit.maths.rntp import BUCKETS

    columns = ("all",) + BUCKETS
    counts = before["plain"] if before else after["plain"]
    lines = ["[alignkit] rntp next-token accuracy  " + "  ".join(f"{c}(n={counts[f'n_{c}']})".rjust(12)
                                                              for c in columns)]
    for label, report, mode in (("(a) plain, before", before, "plain"), ("(b) think, before", before, "think"),
                                ("(c) think, after", after, "think"), ("    plain, after", after, "plain")):
        if report:
            cells = ["-" if report[mode][c] is None else f"{report[mode][c]:.3f}" for c in columns]
            lines.append(f"[alignkit]   {label:<22}" + "  ".join(cell.rjust(12) for cell in cells))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------- pre-filter, GRPO


def _reward_fn(config: Config) -> Any:
    """The rntp reward program with the stage's options bound (the dense one scores with the start model)."""
    from alignkit.modeling.models import resolve_model
    from alignkit.rewards.programs import bind_reward

    if config.reward == "dense":
        spec = RewardSpec(program="reward/rntp.py:thought_gain",
                          kwargs={"model": resolve_model(config.model), "leading_space": config.leading_space})
    else:
        spec = RewardSpec(program="reward/rntp.py:next_token_match",
                          kwargs={"first_token_only": config.reward == "first_token",
                                  "leading_space": config.leading_space})
    return bind_reward(spec)


def prefilter(model, tokenizer, rows: list[dict[str, Any]], config: Config, ctx) -> tuple[list[dict], int]:
    """Keep positions where the starting policy's k samples disagree (0 < successes < k); cached on disk."""
    from alignkit.core.errors import DataError
    from alignkit.generation import SamplingParams
    from alignkit.data.prompts import render_prompt

    path = ctx.run_dir / "prefilter.jsonl"
    if path.is_file():
        successes = [row["successes"] for row in read_jsonl(path)]
    else:
        k = config.prefilter_samples
        engine = config.eval_generation.build(model=model, tokenizer=tokenizer)
        params = SamplingParams(n=k, max_new_tokens=config.max_completion_length, temperature=config.temperature,
                                top_p=config.top_p, seed=config.seed)
        model.eval()
        outs = engine.generate([render_prompt(tokenizer, r["prompt"], chat=config.chat) for r in rows], params,
                               progress=ctx.is_main)
        reward = _reward_fn(config)
        successes = [int(sum(reward([c.text for c in samples], continuation=[r["continuation"]] * k,
                                    token_ends=[r["token_ends"]] * k)))
                     for r, samples in zip(rows, outs)]
        if ctx.is_main:
            write_jsonl_atomic(path, [{"doc_index": r["doc_index"], "position": r["position"], "successes": s}
                                for r, s in zip(rows, successes)])
    kept = [r for r, s in zip(rows, successes) if 0 < s < config.prefilter_samples]
    if not kept:
        raise DataError(f"prefilter: all {len(rows)} training positions were solved by all or none of "
                        f"{config.prefilter_samples} samples; raise temperature, change min_entropy or turn it off")
    return kept, len(rows) - len(kept)


def train_grpo(model, tokenizer, rows: list[dict[str, Any]], config: Config, ctx) -> tuple[dict, dict]:
    """TRL GRPO on the position prompts (resumes from the stage's last checkpoint); artifacts and metrics."""

    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from alignkit.modeling.models import lora_config
    from alignkit.rewards.programs import load_rewards
    from alignkit.stages.common import restore_trainable_dtype, save_trained_model, trl_args
    from alignkit.stages.rl_common import (
        HackingWatch,
        check_prompt_lengths,
        fit_sampling,
        prompt_rows,
        reward_metrics,
        rl_trl_args,
        sampling_trainer,
        throughput,
    )

    columns = ("prompt", "continuation", "token_ends", "entropy")
    dataset = prompt_rows(Dataset.from_list([{c: r[c] for c in columns} for r in rows]), tokenizer, chat=config.chat)
    longest = check_prompt_lengths(dataset, tokenizer, config)
    extra, weights = load_rewards(list(config.rewards), ctx.recipe_dir)
    args = trl_args(GRPOConfig, config, ctx, **{
        **rl_trl_args(config), "reward_weights": [1.0] + weights,
        "loss_type": config.loss_type, "scale_rewards": config.scale_rewards,
        "importance_sampling_level": config.importance_sampling_level, "epsilon_high": config.epsilon_high})
    watch = HackingWatch([_reward_fn(config)] + extra, [1.0] + weights, boxed_signals)  # logs hack/* per step
    trainer = sampling_trainer(config, GRPOTrainer)(  # TRL's sampling, TRL's vLLM, or our engine / served adapter
        model=model, reward_funcs=watch.funcs, args=args, train_dataset=dataset, processing_class=tokenizer,
        peft_config=lora_config(config.lora, "causal-lm") if config.lora else None)
    restore_trainable_dtype(trainer, config)  # QLoRA: keep the adapters in the model's dtype (TRL makes them bf16)
    fitted = fit_sampling(trainer, ctx)
    artifacts = save_trained_model(trainer, tokenizer, ctx)
    metrics = {"train_prompts": len(dataset), "longest_prompt_tokens": longest,
               **reward_metrics(trainer.state.log_history),
               **throughput(trainer.state.global_step, args, fitted.seconds, resumed_from=fitted.resumed_from)}
    return artifacts, metrics


def boxed_signals(texts: list[str], token_lengths: list[int], rewards: list[float | None]) -> dict[str, float]:
    """The reward-hacking signals of an rntp batch: the answer is the boxed prediction (none: no closed box
    after the thinking). A prediction is a piece of text, not a number, so there is no plain-number signal."""
    from alignkit.rewards.hacking import hacking_signals
    from alignkit.maths.rntp import boxed_prediction

    return hacking_signals(texts, token_lengths, rewards, extract=boxed_prediction)
