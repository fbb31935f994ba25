r"""Rewards for reasoning next-token prediction (the ``rntp`` stage): did the thought lead to the true text?

Both read the columns the ``rntp`` position sampler writes and TRL passes through: ``continuation`` (the
true text after the position, a few tokens long) and ``token_ends`` (byte lengths of its token prefixes).

- :func:`next_token_match` (RPT, Dong et al. 2025, arXiv:2506.08007): 1.0 iff the last ``\boxed{...}``
  after the thinking part is the true continuation cut at one of its token boundaries (one token or several;
  a partial token scores 0), else 0.0. ``first_token_only`` accepts exactly the first token.
- :func:`boxed_format`: 1.0 when there is a non-empty closed box after the thinking part (a small shaping
  reward for models that do not yet answer in a box; it says nothing about the prediction).
- :func:`thought_gain` (dense, after RLP, NVIDIA 2025, arXiv:2510.01265): the information gain of the
  thought, ``log p(x | context, thought) - log p(x | context)`` for the true next token x, both under a
  frozen scoring model (see its docstring for how this departs from RLP).

Rows without a continuation (``None``) are skipped (score None), like ungraded rows of ``answer_match``.
"""

from __future__ import annotations

from typing import Any

from alignkit.rewards.values import completion_text
from alignkit.maths.rntp import (
    boxed_prediction,
    continuation_match,
    first_token_text,
    target_logps,
)

_SCORERS: dict[str, Any] = {}  # model path -> (model, tokenizer): loaded once per process


def next_token_match(completions: list, continuation: list, token_ends: list, first_token_only: bool = False,
                     leading_space: str = "lenient", **kwargs: Any) -> list[float | None]:
    r"""1.0 when the boxed prediction is the true continuation up to a token boundary, else 0.0.

    >>> next_token_match(["think... \\boxed{60}", "\\boxed{6}", "\\boxed{600}", "no box"],
    ...                  continuation=[" 60."] * 4, token_ends=[[1, 2, 3, 4]] * 4)
    [1.0, 1.0, 0.0, 0.0]
    """
    scores: list[float | None] = []
    for completion, cont, ends in zip(completions, continuation, token_ends):
        if cont is None or ends is None:
            scores.append(None)
            continue
        predicted = boxed_prediction(completion_text(completion))
        scores.append(float(continuation_match(predicted, cont, ends, first_token_only=first_token_only,
                                               leading_space=leading_space)))
    return scores


def boxed_format(completions: list, **kwargs: Any) -> list[float]:
    r"""1.0 when the completion ends its thinking with a closed, non-empty ``\boxed{...}``, else 0.0.

    >>> boxed_format(["so \\boxed{6}", "\\boxed{}", "\\boxed{6", "6"])
    [1.0, 0.0, 0.0, 0.0]
    """
    return [float(bool(boxed_prediction(completion_text(c)))) for c in completions]


def thought_gain(completions: list, prompts: list, continuation: list, token_ends: list, model: str,
                 leading_space: str = "lenient", batch_size: int = 16, **kwargs: Any) -> list[float | None]:
    r"""Log-prob gain of the true next token given the thought versus without it (nats; dense, RLP-style).

    For each completion, with ``P`` the rendered prompt and ``T`` the thought (the completion up to its last
    ``\boxed{``, or all of it when there is no box) and x the true first token (:func:`first_token_text`)::

        gain = log p(x | P + T + "\boxed{") - log p(x | P + "\boxed{")

    under the model at ``model`` (a frozen copy: the stage passes the starting policy), x tokenized on its
    own after the prefix. Departures from RLP: the scorer is frozen (RLP uses an EMA of the policy as the
    no-think baseline and the current policy for the thought term), and x is the first token of the true
    continuation after leading whitespace, as the matcher sees it.
    """
    scorer, tokenizer = _scorer(model)
    texts = [completion_text(c) for c in completions]
    rendered = [_render(tokenizer, p) for p in prompts]
    with_thought, without, targets, keep = [], [], [], []
    for i, (text, prompt, cont, ends) in enumerate(zip(texts, rendered, continuation, token_ends)):
        target = first_token_text(cont, ends, leading_space=leading_space) if cont is not None and ends else ""
        if not target:
            continue
        thought = text[: text.rfind("\\boxed{")] if "\\boxed{" in text else text
        with_thought.append(_ids(tokenizer, prompt + thought + "\\boxed{"))
        without.append(_ids(tokenizer, prompt + "\\boxed{"))
        targets.append(_ids(tokenizer, target))
        keep.append(i)
    scores: list[float | None] = [None] * len(completions)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(keep), batch_size):
        part = slice(start, start + batch_size)
        gained = target_logps(scorer, with_thought[part], targets[part], pad_id=pad)
        base = target_logps(scorer, without[part], targets[part], pad_id=pad)
        for i, g, b in zip(keep[part], gained, base):
            scores[i] = g - b
    return scores


def _scorer(path: str) -> tuple[Any, Any]:
    if path not in _SCORERS:
        import torch

        from alignkit.modeling.models import load_model, load_tokenizer

        model = load_model(path, dtype="auto")
        model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
        _SCORERS[path] = (model, load_tokenizer(path, padding_side="right"))
    return _SCORERS[path]


def _render(tokenizer: Any, prompt: Any) -> str:
    from alignkit.data.prompts import render_prompt

    return prompt if isinstance(prompt, str) else render_prompt(tokenizer, prompt, chat=True)


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]
