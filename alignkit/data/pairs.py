"""On-policy preference pairs: sample k completions per prompt, score them, keep best vs worst.

This is the pair-making step of rejection-sampling / iterative DPO (Xiong et al. 2024, "Iterative
Preference Learning from Human Feedback", Alg. 1; Pang et al. 2024, "Iterative Reasoning Preference
Optimization", sec. 2): the policy being trained samples ``k`` completions per prompt, a reward (a verifier
such as ``reward/math.py:answer_match``, a trained ORM via :class:`alignkit.rewards.reward_model.RewardModelScorer`,
or a PRM) scores them, and the highest- and lowest-scored completions become (chosen, rejected).

The work is done in shards of prompts (:mod:`alignkit.core.shards`: ``<dir>/shard-00000.meta.json``, then
``<dir>/shard-00000.jsonl``, each temp file + ``os.replace``) written only once fully sampled and scored, so a
killed run redoes at most the shard in progress and never duplicates or loses a prompt. Every prompt gets a
row, with or without a usable pair, so the shard also records which prompts gave no pair (all samples tied,
or unscorable).

Departures from the papers:
1. Ties: a prompt whose best and worst scores differ by ``min_margin`` or less gives no pair (Pang et al. keep
   only prompts with at least one correct and one wrong sample, which is the ``min_margin=0`` case for a 0/1
   verifier); among equal best (or worst) scores the first sample is taken, so the choice is reproducible.
2. Two samples with identical text are never paired (their DPO gradient is exactly zero).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignkit.core import shards
from alignkit.core.shards import path as shard_path
from alignkit.rewards.values import call_reward, reward_name


#: (shard number, its prompt rows) -> samples[prompt][k] (texts); seed sampling by shard for reproducibility
SampleFn = Callable[[int, list[dict[str, Any]]], list[list[str]]]
#: (prompt rows, samples[prompt][k]) -> scores[prompt][k] (float, or None = unscorable)
ScoreFn = Callable[[list[dict[str, Any]], list[list[str]]], list[list[float | None]]]


def select_pair(completions: Sequence[str], scores: Sequence[float | None], *,
                min_margin: float = 0.0) -> tuple[int, int] | None:
    """``(chosen_idx, rejected_idx)``: the best- and worst-scored completions, or None if no usable pair.

    None scores are ignored. No pair when fewer than two completions are scored, when
    ``best - worst <= min_margin`` (ties), or when the two texts are identical. Ties within the best (worst)
    group go to the lowest index.

    >>> select_pair(["a", "b", "c"], [0.0, 1.0, 0.0])
    (1, 0)
    >>> select_pair(["a", "b"], [1.0, 1.0]) is None
    True
    """
    if len(completions) != len(scores):
        raise ValueError(f"{len(completions)} completions but {len(scores)} scores")
    scored = [(s, i) for i, s in enumerate(scores) if s is not None]
    if len(scored) < 2:
        return None
    best = max(scored, key=lambda pair: (pair[0], -pair[1]))[1]  # highest score, then lowest index
    worst = min(scored, key=lambda pair: (pair[0], pair[1]))[1]  # lowest score, then lowest index
    if scores[best] - scores[worst] <= min_margin or completions[best] == completions[worst]:
        return None
    return best, worst


def pair_rows(indices: Sequence[int], prompts: Sequence[dict[str, Any]], samples: Sequence[Sequence[str]],
              scores: Sequence[Sequence[float | None]], *, min_margin: float = 0.0) -> list[dict[str, Any]]:
    """One shard row per prompt: its index, prompt, samples, scores and the pair (``chosen``/``rejected``,
    None when :func:`select_pair` finds none)."""
    rows = []
    for index, row, texts, values in zip(indices, prompts, samples, scores, strict=True):
        values = [None if v is None else float(v) for v in values]
        pick = select_pair(texts, values, min_margin=min_margin)
        rows.append({
            "index": index,
            "prompt": row["prompt"],
            "samples": list(texts),
            "scores": values,
            "chosen": texts[pick[0]] if pick else None,
            "rejected": texts[pick[1]] if pick else None,
            "chosen_score": values[pick[0]] if pick else None,
            "rejected_score": values[pick[1]] if pick else None,
        })
    return rows


@dataclass
class PairStats:
    prompts: int  # prompts in all shards
    pairs: int  # prompts with a usable pair
    sampled_now: int  # prompts sampled by this call (0 when every shard already existed)
    mean_margin: float  # mean chosen_score - rejected_score over the pairs (nan without pairs)

    @property
    def usable_fraction(self) -> float:
        return self.pairs / self.prompts if self.prompts else 0.0


def make_pairs(prompts: Sequence[dict[str, Any]], directory: str | Path, *, shard_size: int, sample: SampleFn,
               score: ScoreFn, min_margin: float = 0.0, on_shard: Callable[[int, int], None] | None = None
               ) -> tuple[list[dict[str, Any]], PairStats]:
    """Sample, score and pair ``prompts`` shard by shard under ``directory``, skipping finished shards.

    Returns every prompt's row (in prompt order) and the statistics. ``on_shard(done, total)`` is called
    after each shard is written (``done`` counts the shards complete so far, earlier runs' included). Shard
    ``s`` holds prompts ``[s * shard_size, (s + 1) * shard_size)`` (:func:`alignkit.core.shards.items`).
    Complete shards are read back and checked before anything is sampled.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    n_shards = shards.count(len(prompts), shard_size)
    todo = shards.pending(directory, len(prompts), shard_size, rank=0, world=1)
    by_shard = {j: read_shard(directory, j, shards.items(j, len(prompts), shard_size))
                for j in range(n_shards) if j not in todo}
    sampled_now = 0
    for j in todo:
        indices = shards.items(j, len(prompts), shard_size)
        chunk = [prompts[i] for i in indices]
        texts = sample(j, chunk)
        rows = pair_rows(indices, chunk, texts, score(chunk, texts), min_margin=min_margin)
        shards.write(directory, j, rows, {"prompts": len(rows), "pairs": sum(r["chosen"] is not None for r in rows)})
        by_shard[j] = rows
        sampled_now += len(indices)
        if on_shard is not None:
            on_shard(len(by_shard), n_shards)
    rows = [row for j in range(n_shards) for row in by_shard[j]]
    return rows, _stats(rows, sampled_now)


def read_shard(directory: Path, shard: int, indices: Sequence[int]) -> list[dict[str, Any]]:
    """A finished shard's rows; it must hold exactly the prompts ``indices`` (else it is from another run)."""
    rows = shards.read(directory, shard)
    found = [row["index"] for row in rows]
    if found != list(indices):
        raise RuntimeError(f"{shard_path(directory, shard)} holds prompts {found[:3]}... but this run expects "
                           f"{list(indices)[:3]}...; it was written with other prompts or shard_size: delete the "
                           "pairs folder")
    return rows


def _stats(rows: list[dict[str, Any]], sampled_now: int) -> PairStats:
    pairs = [row for row in rows if row["chosen"] is not None]
    margin = sum(r["chosen_score"] - r["rejected_score"] for r in pairs) / len(pairs) if pairs else float("nan")
    return PairStats(prompts=len(rows), pairs=len(pairs), sampled_now=sampled_now, mean_margin=margin)


def score_samples(reward: Callable[..., list], prompts: Sequence[dict[str, Any]],
                  samples: Sequence[Sequence[str]]) -> list[list[float | None]]:
    """Score ``samples[prompt][k]`` with a TRL-convention reward in one call: completions flattened
    prompt-major, each prompt column (``prompt`` as ``prompts=``, ``answer``, ``steps``...) repeated per
    sample, exactly as GRPOTrainer calls reward functions."""
    flat = [text for texts in samples for text in texts]
    columns: dict[str, list[Any]] = {}
    for row, texts in zip(prompts, samples, strict=True):
        for key, value in row.items():
            columns.setdefault("prompts" if key == "prompt" else key, []).extend([value] * len(texts))
    values = call_reward(reward, reward_name(reward), flat, columns)  # finite floats or None, one per sample
    out, start = [], 0
    for texts in samples:
        out.append(values[start: start + len(texts)])
        start += len(texts)
    return out
