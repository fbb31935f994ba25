"""SL-CAI: critique and revise a model's own answers by a constitution (Bai et al. 2022, arXiv:2212.08073, sec. 3).

Recipe example::

    - kind: cai-revise
      model: smollm2-135m-instruct             # answers, critiques and revises (the paper's helpful-only model)
      data: {source: redteam, eval_size: 0.25}  # or {source: hh, path: .../harmless-base-train.jsonl.gz}
      constitution: harmless                   # reward/constitutions/harmless.yaml, or a path to your own
      rounds: 1                                # critique -> revision rounds per prompt
      generation: {backend: fast, batch_size: 32}
    - kind: sft
      model: smollm2-135m-instruct
      data: {source: "${cai-revise.data}"}    # prompt -> final revision

What it does, per shard of ``shard_size`` prompts (every step one batched ``generate`` call over the shard):

1. Response: the model answers each prompt (a string, or a conversation whose last turn is the user's).
2. For each of ``rounds`` rounds: a principle is drawn per prompt (:meth:`Constitution.sample`, seeded by
   shard), the principle's critique request is appended to the conversation and the model writes a
   critique; then the revision request is appended and the model writes a revision. Conversations keep
   growing, so round 2 critiques round 1's revision, as in the paper.
3. The final revision becomes the SFT target: rows ``{prompt, completion, initial, chain, ...}`` where
   ``chain`` lists each round's principle, requests, critique and revision for inspection.
4. The shard's rows are written to ``shards/shard-<j>.jsonl`` (temp file, then rename): a crash loses at
   most the shard in progress and a rerun continues. Under ``accelerate launch`` rank r takes shards
   ``j % world == r``; the main process merges them into ``data.jsonl``.

Prompts held out by ``data.eval_size`` are not revised; they are written to ``heldout.jsonl`` (``prompts``
format) for comparing the final model with the start model. Outputs: ``${<name>.data}`` (``sft`` format:
the ``sft`` stage reads it as it is), ``${<name>.heldout}``.

Departures from the paper:

1. Few-shot: the paper prefixes critique/revision requests with a few hand-written examples; we prepend
   the constitution's single ``demonstration`` (when it has one and ``demonstration: true``), because
   tiny models' context is short. It is not shown when the first response is written.
2. A revision that comes back empty (after dropping a "Revision:"-style label) keeps the previous response
   for the next round and as the target; such rows are counted (``empty_revisions``), not dropped.
3. The model sees its conversation through its own chat template (the paper used a plain Human/Assistant
   transcript with "Critique:"/"Revision:" prefixes); models without a template get that transcript.
"""

from __future__ import annotations

import random
import re
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from alignkit.core import shards
from alignkit.core.config import DataSpec, QuantSpec
from alignkit.core.errors import DataError, RecipeError
from alignkit.generation import FastSpec, GenerationSpec
from alignkit.core.stage import StageConfig, StageContext, StageResult

Messages = list[dict[str, str]]


class Config(StageConfig):
    kind: str = "cai-revise"
    RENAMED = {"response_max_new_tokens": "max_completion_length", "critique_max_new_tokens": "max_critique_length",
               "revision_max_new_tokens": "max_revision_length"}
    model: str = Field(..., description="The model that answers, critiques and revises (helpful, not yet harmless).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Weights dtype.")
    quantization: QuantSpec | None = Field(None, description="bitsandbytes quantization of the model.")
    data: DataSpec = Field(..., description="Prompts (`prompts` format: a string or a conversation ending with "
                           "the user's turn); `eval_size` holds some out for the final comparison.")
    constitution: str = Field("harmless", description="A shipped constitution's name or a path to a YAML file.")
    rounds: int = Field(1, ge=1, description="Critique -> revision rounds per prompt (a principle drawn each).")
    demonstration: bool = Field(True, description="Prepend the constitution's one-shot example to critique "
                                "and revision requests (if it has one).")
    first_turn_only: bool = Field(False, description="Keep only a conversation prompt's first user turn "
                                  "(HH red-team transcripts carry earlier, often harmful, assistant turns).")
    system: str | None = Field(None, description="System message for every call (default: the template's own).")
    temperature: float = Field(0.7, ge=0, description="Sampling temperature of every call; 0 = greedy.")
    top_p: float = Field(0.9, gt=0, le=1, description="Nucleus sampling mass.")
    max_completion_length: int = Field(160, gt=0, description="Token budget of the first response.")
    max_critique_length: int = Field(96, gt=0, description="Token budget of a critique.")
    max_revision_length: int = Field(160, gt=0, description="Token budget of a revision.")
    generation: GenerationSpec = Field(default_factory=FastSpec, description="Backend and batch size.")
    shard_size: int = Field(16, gt=0, description="Prompts per shard (the unit of resumption).")
    seed: int = Field(0, description="Seed of principle draws and sampling (each shard derives its own).")


def outputs(run_dir: Path) -> dict[str, str]:
    return {"data": str(run_dir / "data.jsonl"), "heldout": str(run_dir / "heldout.jsonl"),
            "shards": str(run_dir / "shards"), "dir": str(run_dir)}


def check(config: Config, base_dir: Path) -> None:
    from alignkit.cai.constitution import load_constitution

    try:
        load_constitution(config.constitution, base_dir=base_dir)
    except RecipeError as err:
        # the constitution file's own errors keep their file and field; a missing file is this field's
        raise RecipeError(str(err), field=None if err.file else "constitution") from None


def run(config: Config, ctx: StageContext) -> StageResult:
    from alignkit.core.artifacts import write_json_atomic
    from alignkit.cai.constitution import load_constitution
    from alignkit.core.artifacts import write_jsonl_atomic

    constitution = load_constitution(config.constitution, base_dir=ctx.recipe_dir)
    prompts, heldout = load_prompts(config)
    shard_dir = ctx.run_dir / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    n_shards = shards.count(len(prompts), config.shard_size)
    todo = shards.pending(shard_dir, len(prompts), config.shard_size, ctx.state.process_index,
                          ctx.state.num_processes)
    if todo:
        reviser = build_reviser(config, ctx)
        _revise_shards(todo, prompts, reviser, constitution, config, shard_dir, progress=ctx.is_main)
    ctx.wait()
    if not ctx.is_main:
        return StageResult()
    rows, metas = _merge(shard_dir, n_shards)
    write_jsonl_atomic(ctx.run_dir / "data.jsonl", rows)
    write_jsonl_atomic(ctx.run_dir / "heldout.jsonl", [{"prompt": p} for p in heldout])
    metrics = summarize(rows, metas, heldout=len(heldout))
    write_json_atomic(ctx.run_dir / "metrics.json", metrics)
    print(f"[alignkit] {ctx.name}: {metrics['rows']} revised answers ({constitution.name}, {config.rounds} "
          f"round(s)); revision differs from the first answer in {metrics['revised_fraction']:.0%}; "
          f"{len(heldout)} prompts held out; {metrics['tokens_per_second']:.1f} tokens/s")
    ctx.log_metrics(metrics)
    return StageResult(metrics=metrics, artifacts={"data": str(ctx.run_dir / "data.jsonl"),
                                                   "heldout": str(ctx.run_dir / "heldout.jsonl")})



def load_prompts(config: Config) -> tuple[list[str | Messages], list[str | Messages]]:
    """(prompts to revise, held-out prompts), each a string or a conversation ending with a user turn."""
    from alignkit.data import load_dataset, split_eval

    dataset = load_dataset(config.data, "prompts")
    dataset = dataset.add_column("row", list(range(len(dataset))))  # errors name the row as loaded
    train, held = split_eval(dataset, config.data.eval_size, config.data.seed)
    return ([_checked_prompt(row["prompt"], row["row"], config) for row in train],
            [_checked_prompt(row["prompt"], row["row"], config) for row in held or []])


def _checked_prompt(prompt: str | Messages, index: int, config: Config) -> str | Messages:
    if isinstance(prompt, str):
        return prompt
    if not prompt or prompt[-1]["role"] != "user":
        raise DataError(f"prompt row {index} of {config.data.source}: a conversation prompt must end with "
                        f"the user's turn, got roles {[m['role'] for m in prompt]}")
    if config.first_turn_only:
        return next(m["content"] for m in prompt if m["role"] == "user")
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


# ------------------------------------------------------------------------------------------------ the chain


class Reviser:
    """An engine plus how to turn a conversation into its model's input text."""

    def __init__(self, engine: Any, tokenizer: Any, system: str | None = None):
        self.engine, self.tokenizer, self.system = engine, tokenizer, system

    def render(self, messages: Messages) -> str:
        """The chat template with the assistant turn opened; a Human/Assistant transcript without one."""
        if self.tokenizer is not None and getattr(self.tokenizer, "chat_template", None):
            from alignkit.data.prompts import render_prompt

            return render_prompt(self.tokenizer, messages, system=self.system)
        names = {"user": "Human", "assistant": "Assistant", "system": "System"}
        turns = [f"{names[m['role']]}: {m['content']}" for m in messages]
        return "\n\n".join(turns) + "\n\nAssistant:"


def build_reviser(config: Config, ctx: Any) -> Reviser:
    from alignkit.stages.common import sampling_policy

    engine, _, tokenizer = sampling_policy(config.model, config.generation, ctx, quantization=config.quantization,
                                           dtype=config.dtype)
    return Reviser(engine, tokenizer, config.system)


def revise_shard(prompts: list[str | Messages], first_index: int, reviser: Reviser, constitution: Any,
                 config: Config, *, seed: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Answer, then critique and revise ``config.rounds`` times; rows and counts of one shard."""
    rng = random.Random(seed)
    demo = _demonstration(constitution) if config.demonstration else []
    conversations = [[{"role": "user", "content": p}] if isinstance(p, str) else list(p) for p in prompts]
    meta = {"prompts": len(prompts), "tokens": 0, "empty_revisions": 0, "truncated_revisions": 0}
    initial = _generate(reviser, conversations, config.max_completion_length, config, seed, meta)
    current = [c.text.strip() for c in initial]
    conversations = [conv + [{"role": "assistant", "content": text}] for conv, text in zip(conversations, current)]
    chains: list[list[dict[str, Any]]] = [[] for _ in prompts]
    for r in range(config.rounds):
        principles = [constitution.sample(rng) for _ in prompts]
        conversations = [conv + [{"role": "user", "content": p.critique}] for conv, p in zip(conversations, principles)]
        critiques = _generate(reviser, [demo + conv for conv in conversations], config.max_critique_length,
                              config, seed + 2 * r + 1, meta)
        conversations = [conv + [{"role": "assistant", "content": c.text.strip()},
                                 {"role": "user", "content": p.revision}]
                         for conv, c, p in zip(conversations, critiques, principles)]
        revisions = _generate(reviser, [demo + conv for conv in conversations], config.max_revision_length,
                              config, seed + 2 * r + 2, meta)
        for i, (p, c, v) in enumerate(zip(principles, critiques, revisions)):
            text = clean_revision(v.text)
            meta["truncated_revisions"] += v.finish_reason == "length"
            if not text:  # keep the previous response rather than train on nothing
                meta["empty_revisions"] += 1
                text = current[i]
            current[i] = text
            conversations[i].append({"role": "assistant", "content": text})
            chains[i].append({"principle": p.name, "critique_request": p.critique, "critique": c.text.strip(),
                              "revision_request": p.revision, "revision": text, "raw_revision": v.text})
    rows = [{"index": first_index + i, "prompt": prompt, "completion": current[i], "initial": initial[i].text.strip(),
             "revised": current[i] != initial[i].text.strip(), "chain": chains[i]} for i, prompt in enumerate(prompts)]
    return rows, meta


def _generate(reviser: Reviser, conversations: list[Messages], max_new_tokens: int, config: Config, seed: int,
              meta: dict[str, Any]) -> list[Any]:
    """One completion per conversation, in one batched call."""
    from alignkit.generation import SamplingParams

    params = SamplingParams(n=1, temperature=config.temperature, top_p=config.top_p, seed=seed,
                            max_new_tokens=max_new_tokens)
    outs = reviser.engine.generate([reviser.render(c) for c in conversations], params, progress=False)
    meta["tokens"] += sum(len(samples[0].token_ids) for samples in outs)
    return [samples[0] for samples in outs]


def _demonstration(constitution: Any) -> Messages:
    """The constitution's worked example as a finished exchange, or nothing."""
    demo = constitution.demonstration
    if demo is None:
        return []
    principle = constitution.principle(demo.principle)
    return [{"role": "user", "content": demo.prompt}, {"role": "assistant", "content": demo.response},
            {"role": "user", "content": principle.critique}, {"role": "assistant", "content": demo.critique},
            {"role": "user", "content": principle.revision}, {"role": "assistant", "content": demo.revision}]


_LABEL_RE = re.compile(r"^\s*(?:here(?:'s| is) (?:the|a|my) )?(?:revised|rewritten|new)?\s*(?:revision|response|"
                       r"answer|version)\s*:\s*", re.IGNORECASE)


def clean_revision(text: str) -> str:
    """A revision without a leading "Revision:"-style label or wrapping quotes (small models add both).

    >>> clean_revision('Revised response: "I can\\'t help with that."')
    "I can't help with that."
    >>> clean_revision("Here is the rewritten response:\\nCall a locksmith.")
    'Call a locksmith.'
    >>> clean_revision("The response was fine.")
    'The response was fine.'
    """
    text = _LABEL_RE.sub("", text.strip(), count=1).strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1].strip()
    return text


# ----------------------------------------------------------------------------------------- shards, merging




def _revise_shards(todo: list[int], prompts: list, reviser: Reviser, constitution: Any, config: Config,
                   shard_dir: Path, *, progress: bool) -> None:
    from tqdm.auto import tqdm

    size = config.shard_size
    bar = tqdm(total=sum(len(prompts[j * size:(j + 1) * size]) for j in todo), unit="prompt",
               desc="cai-revise", disable=not progress, dynamic_ncols=True)
    tokens, busy_s = 0, 0.0
    for j in todo:
        started = time.perf_counter()
        rows, meta = revise_shard(prompts[j * size:(j + 1) * size], j * size, reviser, constitution, config,
                                  seed=config.seed * 1_000_003 + j * 1009)
        meta["seconds"] = round(time.perf_counter() - started, 3)
        shards.write(shard_dir, j, rows, meta)
        tokens, busy_s = tokens + meta["tokens"], busy_s + meta["seconds"]
        bar.update(meta["prompts"])
        bar.set_postfix(tok_per_s=f"{tokens / max(busy_s, 1e-9):.1f}")
    bar.close()



def _merge(shard_dir: Path, n_shards: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    done = shards.read_all(shard_dir, n_shards, "cai-revise")
    rows = [row for shard_rows, _ in done for row in shard_rows]
    metas = [meta for _, meta in done]
    empty = [row["index"] for row in rows if not row["completion"]]
    if empty:
        raise DataError(f"cai-revise: prompts {empty[:5]} ended with an empty answer and revision; raise "
                        "max_completion_length or check the model's chat template")
    return rows, metas


# ------------------------------------------------------------------------------------------------- metrics


def summarize(rows: list[dict[str, Any]], metas: list[dict[str, Any]], *, heldout: int) -> dict[str, Any]:
    """Counts, throughput, how often revising changed the answer, mean lengths (characters), principles."""
    from collections import Counter

    seconds = sum(m.get("seconds", 0.0) for m in metas)
    n = len(rows)
    principles = Counter(step["principle"] for row in rows for step in row["chain"])
    return {
        "rows": n, "heldout": heldout,
        "tokens": sum(m["tokens"] for m in metas),
        "tokens_per_second": sum(m["tokens"] for m in metas) / seconds if seconds else 0.0,
        "revised_fraction": sum(row["revised"] for row in rows) / n,
        "empty_revisions": sum(m["empty_revisions"] for m in metas),
        "truncated_revisions": sum(m["truncated_revisions"] for m in metas),
        "mean_initial_chars": sum(len(row["initial"]) for row in rows) / n,
        "mean_critique_chars": _mean([len(s["critique"]) for row in rows for s in row["chain"]]),
        "mean_revision_chars": sum(len(row["completion"]) for row in rows) / n,
        "principles": dict(sorted(principles.items())),
    }


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
