"""Outcome reward models at inference: encode (prompt, completion), score batches, pairwise accuracy, and a
TRL-convention reward program backed by a trained model folder.

One encoder for training and scoring. The ``reward`` stage tokenizes its pairs with :func:`encode_pair` and
hands TRL's ``RewardTrainer`` the ids (it accepts pre-tokenized ``chosen_ids``/``rejected_ids``), and every
later use of the model (:class:`RewardModelScorer`, :func:`pairwise_accuracy`) encodes with the same
function, so a reward is always read off the exact token sequence the model was trained on:

- a tokenizer with a chat template renders ``prompt`` (with the assistant turn opened) and the completion
  turn separately, without extra special tokens: the same prompt text the sampling engine sees;
- a tokenizer without one (an encoder such as MiniLM/BERT, or a bare causal LM) gets a text *pair*
  ``(prompt, completion)`` with its own special tokens (``[CLS] p [SEP] c [SEP]``); conversational prompts
  are flattened to ``Role: content`` lines, and causal LMs get their EOS appended (TRL's convention);
- sequences longer than ``max_length`` lose tokens from the **left** of the longer part, so the reply and
  the end of the conversation (where chosen and rejected differ) survive.

Departures from TRL 1.16's ``RewardTrainer`` preprocessing:

1. Over-long pairs are truncated from the left rather than dropped (TRL filters out pairs longer than
   ``max_length``); on HH-style data dropping would bias the training set towards short conversations.
2. ``token_type_ids`` are never passed (TRL's collator passes only ``input_ids``/``attention_mask``), so
   scoring matches training for encoders too.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from alignkit.core.errors import DataError

Prompt = str | list[dict[str, Any]]


def _flatten_messages(messages: list[dict[str, Any]]) -> str:
    """Messages as ``Role: content`` lines, for tokenizers without a chat template."""
    from alignkit.rewards.values import completion_text

    return "\n".join(f"{m.get('role', 'user').capitalize()}: {completion_text([m])}" for m in messages)


def pair_texts(tokenizer: Any, prompt: Prompt, completion: Any) -> tuple[str, str, bool]:
    """``(prompt_text, completion_text, add_special_tokens)`` for one (prompt, completion), as scored.

    ``completion`` is a string or TRL conversational ``[{"role": "assistant", "content": ...}]``.
    With a chat template, ``completion_text`` is the rendered assistant turn (template suffix included).
    """
    from alignkit.data.prompts import as_messages
    from alignkit.rewards.values import completion_text

    reply = completion_text(completion)
    if getattr(tokenizer, "chat_template", None):
        messages = as_messages(prompt)
        prompt_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": reply}], tokenize=False)
        if not full.startswith(prompt_text):  # a template that rewrites earlier turns: keep its rendering whole
            return "", full, False
        return prompt_text, full[len(prompt_text):], False
    prompt_text = prompt if isinstance(prompt, str) else _flatten_messages(prompt)
    eos = getattr(tokenizer, "eos_token", None)
    if eos and not reply.endswith(eos):
        reply += eos  # causal LMs read the reward at the last token: end it like TRL does
    return prompt_text, reply, True


def encode_pair(tokenizer: Any, prompt: Prompt, completion: Any, max_length: int) -> list[int]:
    """Token ids of (prompt, completion) as the reward model reads them, at most ``max_length`` long."""
    prompt_text, reply_text, special = pair_texts(tokenizer, prompt, completion)
    side = tokenizer.truncation_side
    tokenizer.truncation_side = "left"  # keep the reply and the latest turns (see the module docstring)
    try:
        if not prompt_text:
            return tokenizer(reply_text, add_special_tokens=special, truncation=True,
                             max_length=max_length)["input_ids"]
        return tokenizer(prompt_text, reply_text, add_special_tokens=special, truncation="longest_first",
                         max_length=max_length)["input_ids"]
    finally:
        tokenizer.truncation_side = side


def score_ids(model: Any, pad_token_id: int, sequences: Sequence[list[int]], *, batch_size: int = 16) -> list[float]:
    """The scalar reward (logit 0) of each token sequence, batched by similar length, without gradients.

    ``sequences[i]`` is one encoded (prompt, completion); returns ``len(sequences)`` floats in input order.
    Batches are right-padded; sorting by length first keeps padding (wasted compute) small.
    """
    import torch

    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    scores = [0.0] * len(sequences)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                chunk = order[start: start + batch_size]
                width = max(len(sequences[i]) for i in chunk)
                ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)  # (B, T)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)  # (B, T)
                for row, i in enumerate(chunk):
                    ids[row, : len(sequences[i])] = torch.tensor(sequences[i])
                    mask[row, : len(sequences[i])] = 1
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # (B, 1)
                for row, i in enumerate(chunk):
                    scores[i] = float(logits[row, 0])
    finally:
        model.train(was_training)
    return scores


def pairwise_stats(chosen: Sequence[float], rejected: Sequence[float]) -> dict[str, float]:
    """Accuracy (fraction with r(chosen) > r(rejected), ties count as wrong) and mean margin of N pairs.

    >>> pairwise_stats([1.0, 0.5, 2.0], [0.0, 0.5, 3.0])
    {'accuracy': 0.3333333333333333, 'margin': 0.0, 'n': 3}
    """
    if len(chosen) != len(rejected) or not chosen:
        raise ValueError(f"need equally many chosen and rejected scores, got {len(chosen)} and {len(rejected)}")
    wins = sum(c > r for c, r in zip(chosen, rejected))
    margin = sum(c - r for c, r in zip(chosen, rejected)) / len(chosen)
    return {"accuracy": wins / len(chosen), "margin": margin, "n": len(chosen)}


def pairwise_accuracy(model: Any, tokenizer: Any, pairs: Any, *, max_length: int, batch_size: int = 16) -> dict[str, Any]:
    """Score every pair of a ``preference`` dataset; :func:`pairwise_stats` plus the per-pair scores.

    Returns ``{"accuracy", "margin", "n", "chosen": [float], "rejected": [float]}``.
    """
    chosen = [encode_pair(tokenizer, row["prompt"], row["chosen"], max_length) for row in pairs]
    rejected = [encode_pair(tokenizer, row["prompt"], row["rejected"], max_length) for row in pairs]
    scores = score_ids(model, tokenizer.pad_token_id, chosen + rejected, batch_size=batch_size)
    chosen_scores, rejected_scores = scores[: len(chosen)], scores[len(chosen):]
    return {**pairwise_stats(chosen_scores, rejected_scores), "chosen": chosen_scores, "rejected": rejected_scores}


class RewardModelScorer:
    """A trained sequence-classification reward model as a TRL-convention reward program.

    ``scorer(completions, prompts=[...]) -> list[float]``: each completion is scored together with its
    prompt (strings or conversational messages), encoded exactly as in training (:func:`encode_pair`).
    Other keyword columns (``answer=``, ``trainer_state=``...) are ignored. The model is loaded once, on
    CUDA when available, and kept in eval mode.

    >>> scorer = RewardModelScorer("runs/hh/rm/model")  # doctest: +SKIP
    >>> scorer(["Sure, here is how."], prompts=["How do I bake bread?"])  # doctest: +SKIP
    [1.73]
    """

    def __init__(self, model_path: str | Path, batch_size: int = 16, max_length: int = 1024, dtype: str = "auto"):
        import torch

        from alignkit.modeling.models import load_model, load_tokenizer

        self.model_path, self.batch_size, self.max_length = str(model_path), batch_size, max_length
        self.__name__ = f"reward_model:{Path(self.model_path).name}"  # TRL logs a reward by its __name__
        self.tokenizer = load_tokenizer(self.model_path, padding_side="right")
        self.model = load_model(self.model_path, task="seq-cls", num_labels=1, dtype=dtype)
        if torch.cuda.is_available():
            self.model = self.model.to("cuda")
        self.model.eval()

    def __call__(self, completions: list, prompts: list | None = None, **kwargs: Any) -> list[float]:
        if prompts is None:
            raise DataError(f"reward model {self.model_path} scores (prompt, completion) pairs: pass prompts=[...]")
        if len(prompts) != len(completions):
            raise DataError(f"reward model {self.model_path}: {len(prompts)} prompts for {len(completions)} completions")
        encoded = [encode_pair(self.tokenizer, p, c, self.max_length) for p, c in zip(prompts, completions)]
        return score_ids(self.model, self.tokenizer.pad_token_id, encoded, batch_size=self.batch_size)
