"""Process reward models: the token layout shared by training and scoring, the step loss, and the scorer.

A PRM here is a token classifier with two labels (0 = bad step, 1 = good step) on a causal-LM backbone
(``AutoModelForTokenClassification``, ``num_labels=2``). Its input is the rendered prompt followed by each
step and the step separator; the prediction at the **last token of each separator** is that step's
score, ``p_good = softmax(logits)[1]``. Every other position carries the label -100 (ignored).

Token alignment. A sequence is built by tokenizing the pieces one by one (prompt, step 1, separator,
step 2, separator, ...) and concatenating the ids, so each separator's position is known by construction,
whatever the tokenizer. Searching for the separator in the tokenization of the merged text is wrong in
general: byte-level BPE merges across the boundary (``".\\n"``, ``"\\n\\n"`` become one token), and
sentencepiece tokenizers spell the same text differently mid-sentence than at a piece's start.
Training (:mod:`alignkit.stages.prm`) and scoring (:class:`PRMScorer`) both call :func:`encode_steps`,
so a model is always scored on exactly the layout it was trained on.

Choices and departures (from TRL <= 1.13 ``PRMTrainer`` and the Math-Shepherd paper, arXiv:2312.08935):

1. Two logits and cross-entropy, as TRL's PRMTrainer, rather than one logit with BCE. Soft labels
   (Math-Shepherd SE) are trained as cross-entropy against the target distribution ``(1 - s, s)``, which
   is exactly BCE on the logit difference ``z_good - z_bad`` (:func:`step_loss`), so one head serves both.
2. The paper scores a special tag token (``ки``) with the LM head's ``+``/``-`` logits; we score the
   separator with a classifier head, as TRL does. The separator is a config field (default ``"\\n"``).
   Our second head, ``lm-logprob`` (:func:`logprob_step_logits`), keeps the causal LM and scores a step by
   its own log-probability plus an offset: no new weights, so it starts from the backbone's knowledge.
3. Truncation drops whole trailing steps (a step is kept only with its separator), never part of a step:
   a label on a cut step would score text the model cannot see. TRL cuts tokens instead.
4. The prompt is rendered with the chat template (``chat: true``, as the policy saw it), and no BOS is
   added beyond what the template writes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignkit.core.errors import DataError, ModelError
from alignkit.maths.selection import STEP_AGGREGATIONS, aggregate_steps
from alignkit.data.prompts import render_prompt

IGNORE = -100
PRM_CONFIG = "alignkit_prm.json"  # written next to a trained PRM: how to lay out its input
DEFAULT_SEPARATOR = "\n"
HEADS = ("token-cls-2", "lm-logprob")  # classifier on the separator; the LM's log P of the step


# ------------------------------------------------------------------------------------------ token layout


@dataclass(frozen=True)
class EncodedSteps:
    """One sequence: ``input_ids`` and, for each step kept, the index of its separator's last token;
    ``step_spans[i]`` is ``(start, stop)`` of step i's own tokens (separator excluded, stop exclusive)."""

    input_ids: list[int]
    step_ends: list[int]
    step_spans: list[tuple[int, int]] = field(default_factory=list)


def split_steps(text: str, separator: str = DEFAULT_SEPARATOR) -> list[str]:
    """A solution's steps: the text split on ``separator``, each stripped, blank ones dropped.

    >>> split_steps("Add 2: 1 + 2 = 3.\\n\\nThe answer is 3.\\n")
    ['Add 2: 1 + 2 = 3.', 'The answer is 3.']
    """
    return [part.strip() for part in text.split(separator) if part.strip()]


def separator_ids(tokenizer: Any, separator: str) -> list[int]:
    """Token ids of the separator on its own; DataError if it tokenizes to nothing."""
    ids = tokenizer(separator, add_special_tokens=False)["input_ids"]
    if not ids:
        raise DataError(f"step separator {separator!r} tokenizes to no tokens; choose another separator")
    return list(ids)


def encode_steps(
    tokenizer: Any, prompt_text: str, steps: Sequence[str], separator: str = DEFAULT_SEPARATOR,
    max_length: int | None = None,
) -> EncodedSteps:
    """Tokenize ``prompt_text`` then each step followed by ``separator``, piece by piece.

    ``step_ends[i]`` is the position of the last token of the separator after step i, where its label or
    score lives. With ``max_length`` trailing steps that do not fit whole (step and separator) are left
    out, so ``len(step_ends)`` may be less than ``len(steps)`` (0 when not even the first step fits).
    """
    sep = separator_ids(tokenizer, separator)
    ids = list(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
    pieces = tokenizer(list(steps), add_special_tokens=False)["input_ids"] if steps else []
    ends: list[int] = []
    spans: list[tuple[int, int]] = []
    for piece in pieces:
        if max_length is not None and len(ids) + len(piece) + len(sep) > max_length:
            break
        spans.append((len(ids), len(ids) + len(piece)))
        ids += list(piece) + sep
        ends.append(len(ids) - 1)
    if max_length is not None and not ends:
        ids = ids[:max_length]
    return EncodedSteps(ids, ends, spans)


def step_token_index(encoded: EncodedSteps) -> list[int]:
    """Per position of ``encoded.input_ids``: the step end a token's log-probability adds into (the
    ``lm-logprob`` head), -1 for prompt, separator and padding tokens.

    >>> step_token_index(EncodedSteps([7, 7, 1, 2, 0, 3, 0], [4, 6], [(2, 4), (5, 6)]))
    [-1, -1, 4, 4, -1, 6, -1]
    """
    index = [-1] * len(encoded.input_ids)
    for (start, stop), end in zip(encoded.step_spans, encoded.step_ends, strict=True):
        index[start:stop] = [end] * (stop - start)
    return index


def step_targets(
    labels: Sequence[bool], soft_labels: Sequence[float] | None = None, *, last_step_only: bool = False,
    solution_correct: bool | None = None,
) -> list[float | None]:
    """Per-step training target P(good) (None: no label): hard 0/1, or the soft estimate when given.

    ``last_step_only`` keeps only the final step's target: an outcome reward model (ORM) trained on the
    same rows, whose target is the correctness of the solution's own final answer: ``solution_correct``
    when the row has it (the label stage writes it), else the last step's label. They differ for a solution
    cut off by length: its last step's label comes from rollouts that went on to an answer, while the
    solution itself never gave one (e.g. "3 + 4 = 7 / 7 * 2 = 14 / So the total": labelled good, not correct).

    >>> step_targets([True, False], [0.75, 0.0]), step_targets([True, False], last_step_only=True)
    ([0.75, 0.0], [None, 0.0])
    >>> step_targets([True, True], [1.0, 0.5], last_step_only=True, solution_correct=False)
    [None, 0.0]
    """
    values = [float(v) for v in (soft_labels if soft_labels is not None else labels)]
    if last_step_only:
        outcome = values[-1:] if solution_correct is None or not values else [float(solution_correct)]
        return [None] * (len(values) - 1) + outcome
    return list(values)


def token_labels(encoded: EncodedSteps, targets: Sequence[float | None]) -> list[float]:
    """Labels over ``encoded.input_ids``: a step's target at its separator's last token, -100 elsewhere.

    Steps truncated away by :func:`encode_steps` lose their targets (``targets`` may be longer).
    """
    labels = [float(IGNORE)] * len(encoded.input_ids)
    for end, target in zip(encoded.step_ends, targets):
        if target is not None:
            labels[end] = float(target)
    return labels


# ------------------------------------------------------------------------------------------------- maths


def step_loss(logits: Any, targets: Any, num_items: Any = None) -> Any:
    """Cross-entropy of two-class step predictions against (soft) targets at labelled positions.

    ``logits`` [B, T, 2] (index 1 = good), ``targets`` [B, T] float: P(good) in [0, 1], or -100 where
    there is no label. Per labelled position::

        loss = -(t * log p_good + (1 - t) * log p_bad) = BCE(sigmoid(z_good - z_bad), t)

    which for t in {0, 1} is ``F.cross_entropy(logits, t.long(), ignore_index=-100)``'s term. Returns the
    sum over labelled positions divided by ``num_items`` (the Trainer's count over the whole accumulated
    batch, so gradient accumulation and data parallelism do not change the loss), else by this batch's
    count (0.0 with a gradient path when nothing is labelled).
    """
    import torch

    mask = targets != IGNORE  # [B, T] bool
    logps = torch.log_softmax(logits.float(), dim=-1)  # [B, T, 2]
    t = torch.where(mask, targets.float(), torch.zeros_like(targets, dtype=torch.float32))
    per_token = -(t * logps[..., 1] + (1.0 - t) * logps[..., 0])  # [B, T]
    total = (per_token * mask).sum()
    denominator = num_items if num_items is not None else mask.sum().clamp(min=1)
    return total / denominator


def logprob_step_logits(lm_logits: Any, input_ids: Any, step_index: Any, offset: float) -> Any:
    """The ``lm-logprob`` head: two-class step logits [B, T, 2] from a causal LM's logits [B, T, V].

    Step i's margin is ``z_i = log P(step i's tokens | everything before them) + offset``: the LM's own
    probability of the step, summed over its tokens, placed at the step's end position (``step_index``
    [B, T], from :func:`step_token_index`, -1 where a token belongs to no step); every other position
    gets ``offset`` (unlabelled, so unused). Logits are ``(0, z)``, so ``p_good = sigmoid(z)`` and
    :func:`step_loss`, :func:`solution_ranking_loss` and :func:`score_encoded` apply unchanged. A step the
    policy finds unlikely (a wrong sum, an operation the problem does not ask for) starts with a low score,
    before any training; ``offset`` sets where "unlikely" begins (p_good = 0.5 at log P = -offset).
    """
    import torch

    logits = lm_logits.float()
    next_ids = input_ids[:, 1:].unsqueeze(-1)  # the token each position predicts
    token_logps = logits[:, :-1].gather(-1, next_ids).squeeze(-1) - torch.logsumexp(logits[:, :-1], dim=-1)
    token_logps = torch.cat([torch.zeros_like(token_logps[:, :1]), token_logps], dim=1)  # [B, T]: log P(id_t)
    in_step = step_index >= 0
    z = torch.zeros_like(token_logps).scatter_add(1, step_index.clamp(min=0), token_logps * in_step) + offset
    return torch.stack([torch.zeros_like(z), z], dim=-1)


def solution_logits(logits: Any, targets: Any, aggregation: str) -> Any:
    """One score per sequence from its labelled steps, on the logit scale: [B, T, 2] logits -> [B].

    With ``z`` the step margin ``z_good - z_bad`` (the logit of ``p_good``) at each labelled position:
    ``min`` -> min z, ``last`` -> the last labelled z, ``mean`` -> mean z, ``prod`` -> sum of log p_good.
    Each orders a problem's solutions as :func:`alignkit.maths.selection.aggregate_steps` does on ``p_good``
    (``mean`` only approximately), and each but ``prod`` is unbounded, so a ranking loss on it does not
    saturate when both solutions look good. Rows with no labelled position score 0.
    """
    import torch

    if aggregation not in STEP_AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {', '.join(STEP_AGGREGATIONS)}; got {aggregation!r}")
    mask = targets != IGNORE  # [B, T]
    z = logits[..., 1].float() - logits[..., 0].float()  # [B, T]
    count = mask.sum(dim=1)  # [B]
    if aggregation == "min":
        scores = torch.where(mask, z, torch.full_like(z, float("inf"))).min(dim=1).values
    elif aggregation == "last":
        positions = torch.arange(z.shape[1], device=z.device).expand_as(z)
        last = torch.where(mask, positions, torch.full_like(positions, -1)).max(dim=1).values  # [B]
        scores = z.gather(1, last.clamp(min=0).unsqueeze(1)).squeeze(1)
    elif aggregation == "mean":
        scores = (z * mask).sum(dim=1) / count.clamp(min=1)
    else:
        scores = (torch.nn.functional.logsigmoid(z) * mask).sum(dim=1)
    return torch.where(count > 0, scores, torch.zeros_like(scores))


def solution_ranking_loss(logits: Any, targets: Any, pairs: Any, aggregation: str) -> Any:
    """Bradley-Terry loss that a problem's right solution outscores its wrong one.

    ``pairs`` [P, 2] holds batch row indices (right, wrong) of solutions *to the same problem*;
    per pair ``loss = -log sigmoid(s_right - s_wrong)`` with ``s`` from :func:`solution_logits`, averaged
    over the pairs (0.0 with a gradient path when there are none). Pointwise step labels alone let a
    model score problems (easy ones high, hard ones low) without telling a problem's solutions apart,
    which is all best-of-N selection needs; this term rewards exactly that and is blind to difficulty.
    """
    import torch

    scores = solution_logits(logits, targets, aggregation)  # [B]
    if pairs.numel() == 0:
        return scores.sum() * 0.0
    margins = scores[pairs[:, 0]] - scores[pairs[:, 1]]  # [P]
    return -torch.nn.functional.logsigmoid(margins).mean()


def ranking_pairs(correct_by_group: Sequence[Sequence[bool]]) -> list[tuple[int, int]]:
    """Every (right, wrong) pair of row indices within each group, groups laid out one after another.

    >>> ranking_pairs([[True, False, False], [False], [False, True]])
    [(0, 1), (0, 2), (5, 4)]
    """
    pairs, offset = [], 0
    for group in correct_by_group:
        right = [offset + i for i, c in enumerate(group) if c]
        wrong = [offset + i for i, c in enumerate(group) if not c]
        pairs.extend((r, w) for r in right for w in wrong)
        offset += len(group)
    return pairs


def step_metrics(probs: Sequence[Sequence[float]], labels: Sequence[Sequence[bool]],
                 threshold: float = 0.5) -> dict[str, float]:
    """How well predicted step scores match step labels, per step and per solution.

    A step is predicted good iff ``p_good >= threshold``. ``step_accuracy``: fraction of steps right;
    ``step_f1``: F1 of finding *bad* steps (positive class = error: the PRM's job); ``first_error_found``:
    over solutions with a bad step, the fraction whose first predicted-bad step is the labelled first bad
    step (ProcessBench's error-identification accuracy); ``no_error_kept``: over all-good solutions, the
    fraction with no step predicted bad.
    """
    tp = fp = fn = right = total = 0
    found, with_error, kept, without_error = 0, 0, 0, 0
    for p_row, l_row in zip(probs, labels, strict=True):
        if len(p_row) != len(l_row):
            raise ValueError(f"a solution has {len(p_row)} scores but {len(l_row)} labels")
        pred_bad = [p < threshold for p in p_row]
        for bad, good in zip(pred_bad, l_row):
            right += bad != good
            tp, fp, fn = tp + (bad and not good), fp + (bad and good), fn + (not bad and not good)
        total += len(l_row)
        first_pred = next((i for i, bad in enumerate(pred_bad) if bad), None)
        first_true = next((i for i, good in enumerate(l_row) if not good), None)
        if first_true is None:
            without_error, kept = without_error + 1, kept + (first_pred is None)
        else:
            with_error, found = with_error + 1, found + (first_pred == first_true)
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0
    return {
        "step_accuracy": right / total if total else math.nan,
        "step_f1": f1,
        "first_error_found": found / with_error if with_error else math.nan,
        "no_error_kept": kept / without_error if without_error else math.nan,
    }


# ------------------------------------------------------------------------------------------------ scoring


def _right_pad(rows: Sequence[Sequence[float]], fill: float, dtype: Any, width: int | None = None) -> Any:
    """Rows of different lengths as one [B, width] tensor, right-padded with ``fill``."""
    import torch

    out = torch.full((len(rows), width or max(len(r) for r in rows)), fill, dtype=dtype)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=dtype)
    return out


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int,
              labels: Sequence[Sequence[float]] | None = None) -> dict[str, Any]:
    """Right-pad id lists into tensors: ``{input_ids, attention_mask[, labels]}`` ([B, T] each)."""
    import torch

    ids = _right_pad(sequences, pad_id, torch.long)
    mask = _right_pad([[1] * len(s) for s in sequences], 0, torch.long)
    batch = {"input_ids": ids, "attention_mask": mask}
    if labels is not None:
        batch["labels"] = _right_pad(labels, float(IGNORE), torch.float32, width=ids.shape[1])
    return batch


def pad_index(rows: Sequence[Sequence[int]]) -> Any:
    """Right-pad :func:`step_token_index` rows with -1 into a [B, T] long tensor."""
    import torch

    return _right_pad(rows, -1, torch.long)


def shared_prefix(rows: Sequence[Sequence[int]], first_outputs: Sequence[int]) -> int:
    """How many leading tokens all ``rows`` have in common before any row needs an output (``first_outputs``: per
    row, the first position whose logits are read): what one forward can read once for the whole batch. Each row
    keeps at least one token of its own.

    >>> shared_prefix([[5, 6, 7, 8, 9], [5, 6, 7, 1], [5, 6, 7, 8]], [4, 3, 3])
    3
    >>> shared_prefix([[5, 6, 7, 8], [5, 6, 7, 8]], [3, 3]), shared_prefix([[5, 6], [5, 6, 7]], [1, 2])
    (3, 1)
    """
    limit = min(min(len(row) for row in rows) - 1, min(first_outputs))
    first = rows[0]
    shared = 0
    while shared < limit and all(row[shared] == first[shared] for row in rows):
        shared += 1
    return shared


def first_output(encoded: EncodedSteps, head: str) -> int:
    """The first position whose logits scoring reads: the first step end (``token-cls-2``), or the position that
    predicts the first step token (``lm-logprob``)."""
    return encoded.step_spans[0][0] - 1 if head == "lm-logprob" else encoded.step_ends[0]


#: A shared prefix shorter than this is read per row (one extra forward would cost more than it saves).
MIN_SHARED_PREFIX = 8


def score_encoded(model: Any, encoded: Sequence[EncodedSteps], pad_id: int, batch_size: int = 16, *,
                  head: str = "token-cls-2", offset: float = 0.0) -> list[list[float]]:
    """``p_good`` at every step end of every sequence, ``batch_size`` sequences per forward.

    ``head``: ``token-cls-2`` (``model`` is a 2-label token classifier) or ``lm-logprob`` (``model`` is a
    causal LM, scored by :func:`logprob_step_logits` with ``offset``).

    Sequences are sorted by length first (less padding); results come back in input order. Tokens every sequence
    of a batch shares before its first scored position (the chat template and the problem, when a search scores
    the candidates of one problem: :func:`shared_prefix`) are read once, and their KV cache serves every row, so
    the PRM reads each prefix once as the ``fast`` engine samples it once. The model is put in eval mode (no
    dropout) for the call and its training flag restored after.
    """
    import torch

    device = next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    scores: list[list[float]] = [[] for _ in encoded]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chunk = [i for i in order[start: start + batch_size] if encoded[i].step_ends]
                if not chunk:
                    continue
                rows = [encoded[i].input_ids for i in chunk]
                shared = shared_prefix(rows, [first_output(encoded[i], head) for i in chunk]) if len(chunk) > 1 else 0
                if shared < MIN_SHARED_PREFIX:
                    shared = 0
                batch = {k: v.to(device) for k, v in pad_batch([row[shared:] for row in rows], pad_id).items()}
                logits = _forward(model, batch, rows[0][:shared], device)  # [b, T - shared, 2 or V]
                if head == "lm-logprob":
                    index = pad_index([[p - shared if p >= 0 else -1 for p in step_token_index(encoded[i])[shared:]]
                                       for i in chunk]).to(device)
                    logits = logprob_step_logits(logits, batch["input_ids"], index, offset)
                p_good = torch.softmax(logits.float(), dim=-1)[..., 1].cpu()  # [b, T - shared]
                for row, i in enumerate(chunk):
                    scores[i] = p_good[row, [end - shared for end in encoded[i].step_ends]].tolist()
    finally:
        model.train(was_training)
    return scores


def _forward(model: Any, batch: dict[str, Any], prefix: list[int], device: Any) -> Any:
    """Logits of ``batch`` (right-padded rows) that all follow ``prefix``: the prefix is read once and its KV cache
    repeated for every row (the rows' positions then start after it). No prefix: one plain forward."""
    import torch

    if not prefix:
        return model(**batch).logits
    from transformers import DynamicCache

    from alignkit.generation.fast import cache_argument

    rows, argument = batch["input_ids"].shape[0], cache_argument(model)
    cache = DynamicCache(config=model.config)  # filled in place: token classifiers do not return their cache
    model(input_ids=torch.tensor([prefix], device=device), use_cache=True, **{argument: cache})
    cache.batch_repeat_interleave(rows)
    mask = torch.cat([torch.ones(rows, len(prefix), dtype=batch["attention_mask"].dtype, device=device),
                      batch["attention_mask"]], dim=1)
    return model(input_ids=batch["input_ids"], attention_mask=mask, use_cache=True, **{argument: cache}).logits


def write_prm_config(folder: str | Path, *, separator: str, chat: bool, aggregation: str,
                     last_step_only: bool, head: str = "token-cls-2", logprob_offset: float | None = None) -> None:
    """Record, next to a trained PRM, how its input is laid out and scored (read by :class:`PRMScorer`)."""
    payload: dict[str, Any] = {"separator": separator, "chat": chat, "aggregation": aggregation,
                               "train_on_last_step_only": last_step_only, "head": head}
    if head == "lm-logprob":
        payload["logprob_offset"] = logprob_offset
    (Path(folder) / PRM_CONFIG).write_text(json.dumps(payload, indent=2) + "\n")


def read_prm_config(folder: str | Path) -> dict[str, Any]:
    """The layout recorded by :func:`write_prm_config`; defaults (``"\\n"``, chat, min) when absent."""
    path = Path(folder) / PRM_CONFIG
    defaults = {"separator": DEFAULT_SEPARATOR, "chat": True, "aggregation": "min",
                "train_on_last_step_only": False, "head": "token-cls-2"}
    if not Path(folder).expanduser().is_dir():  # a Hub id (an exported PRM): fetch the file when it has one
        path = _hub_prm_config(str(folder))
    if path is None or not path.is_file():
        return defaults
    return {**defaults, **json.loads(path.read_text())}


def _hub_prm_config(repo_id: str) -> Path | None:
    """The ``alignkit_prm.json`` of a Hub model repository (from the cache when offline), or None."""
    from alignkit.modeling.models import _HUB_ID

    if not _HUB_ID.match(repo_id):
        return None
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id, PRM_CONFIG))
    except Exception:  # no such file or repo, offline and not cached: the defaults apply
        return None


class PRMScorer:
    """Score solutions step by step with a trained PRM (a folder written by the ``prm`` stage).

    >>> scorer = PRMScorer("runs/math-shepherd/prm/model")                    # doctest: +SKIP
    >>> scorer.score_steps("Tom has 3 apples...", ["Add 4: 3 + 4 = 7.", "The answer is 7."])  # doctest: +SKIP
    [0.93, 0.88]

    The separator, chat rendering and default aggregation come from the folder's ``alignkit_prm.json``
    (keyword arguments override). Called as ``scorer(completions, prompts=...)`` it is a TRL-convention
    reward function: each completion is split into steps on the separator and scored with ``how``; a
    completion without steps scores 0.0 (the lowest p_good), never None, so a policy is not paid for an
    empty answer.
    """

    def __init__(self, model_path: str, *, batch_size: int = 16, dtype: str = "auto", device: str | None = None,
                 separator: str | None = None, chat: bool | None = None, how: str | None = None) -> None:
        from alignkit.modeling.models import load_model, load_tokenizer

        self.model_path = str(model_path)  # names it in error messages
        layout = read_prm_config(model_path)  # a Hub id or a folder without the file: defaults
        self.separator = separator if separator is not None else layout["separator"]
        self.chat = chat if chat is not None else layout["chat"]
        self.how = how if how is not None else layout["aggregation"]
        if self.how not in STEP_AGGREGATIONS:
            raise ModelError(f"PRMScorer: how must be one of {STEP_AGGREGATIONS}, got {self.how!r}")
        self.batch_size = batch_size
        self.head, self.offset = layout["head"], float(layout.get("logprob_offset") or 0.0)
        if self.head not in HEADS:
            raise ModelError(f"PRMScorer: {model_path}/{PRM_CONFIG} names head {self.head!r}; known: {HEADS}")
        self.tokenizer = load_tokenizer(model_path, padding_side="right")
        if self.head == "lm-logprob":
            self.model = load_model(model_path, task="causal-lm", dtype=dtype)
        else:
            self.model = load_model(model_path, task="token-cls", num_labels=2, dtype=dtype)
        if device is not None:
            self.model.to(device)
        self.model.eval()
        self.__name__ = "prm"  # TRL logs reward functions by __name__

    def encode(self, prompt: str | list[dict[str, str]], steps: Sequence[str]) -> EncodedSteps:
        return encode_steps(self.tokenizer, render_prompt(self.tokenizer, prompt, chat=self.chat), steps,
                            self.separator)

    def score_batch(self, prompts: Sequence[str | list[dict[str, str]]],
                    steps: Sequence[Sequence[str]]) -> list[list[float]]:
        """``p_good`` per step for each (prompt, steps) pair; an empty step list gives ``[]``. A broken model's
        NaN is a RewardError here, before ``min`` or ``prod`` can hide or spread it."""
        from alignkit.rewards.values import check_step_scores

        if len(prompts) != len(steps):
            raise ValueError(f"got {len(prompts)} prompts but {len(steps)} step lists")
        encoded = [self.encode(p, s) for p, s in zip(prompts, steps)]
        scores = score_encoded(self.model, encoded, self.tokenizer.pad_token_id, self.batch_size, head=self.head,
                               offset=self.offset)
        return check_step_scores(scores, steps, self.model_path)

    def score_steps(self, prompt: str | list[dict[str, str]], steps: Sequence[str]) -> list[float]:
        """``p_good`` of each step of one solution."""
        return self.score_batch([prompt], [steps])[0]

    def score_solution(self, prompt: str | list[dict[str, str]], steps: Sequence[str],
                       how: str | None = None) -> float:
        """One score for a solution: its step scores aggregated (min/prod/last/mean, default the PRM's)."""
        scores = self.score_steps(prompt, steps)
        return aggregate_steps(scores, how or self.how) if scores else 0.0

    def __call__(self, completions: list, prompts: list | None = None, **kwargs: Any) -> list[float]:
        """TRL reward-function form: one aggregated score per completion (``how`` from the constructor)."""
        from alignkit.rewards.values import completion_text

        if prompts is None:
            raise ValueError("a PRM reward needs the prompts: call it as prm(completions, prompts=...)")
        steps = [split_steps(completion_text(c), self.separator) for c in completions]
        scores = self.score_batch(prompts, steps)
        return [aggregate_steps(s, self.how) if s else 0.0 for s in scores]

