r"""Reasoning next-token prediction (RNTP): the pure pieces the ``rntp`` stage and ``reward/rntp.py`` share.

A position t of a document is a question: given the text before t, what comes next? The model thinks, then
writes its prediction in ``\boxed{...}``. This module holds the maths, with no model, config or disk:

- :func:`prefix_byte_lengths` / :func:`continuation_at`: where the true text's token boundaries are, in
  bytes (the matcher works on bytes, so multi-byte characters split across tokens are handled exactly).
- :func:`continuation_match`: the RPT reward (Dong et al. 2025, arXiv:2506.08007, sec. 3.2): 1 iff the
  prediction's bytes equal a prefix of the true continuation that ends on one of its token boundaries.
- :func:`topk_entropy`: the position filter's difficulty score (RPT sec. 3.3: entropy of a proxy model's
  top-16 next-token distribution).
- :func:`entropy_thresholds`, :func:`bucket`, :func:`bucketed_accuracy`: evaluation split by difficulty.
- :func:`boxed_prediction`: the last ``\boxed{...}`` after the thinking part.
- :func:`target_logps`: summed log-probs of target tokens after a prefix, for the dense (RLP) reward.

Conventions: byte offsets are into ``text.encode("utf-8")``; ``token_ends[i]`` is the byte length of the
continuation's first i+1 tokens, listed only where that length falls on a character boundary (an end inside
a multi-byte character cannot be matched by any string, so it is left out).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

#: Bytes that ``leading_space: lenient`` strips from the start of the prediction and of the continuation.
WHITESPACE = b" \t\r\n"

BUCKETS = ("easy", "medium", "hard")


# --------------------------------------------------------------------------------------------- boundaries


def prefix_byte_lengths(decode: Callable[[list[int]], str], ids: Sequence[int]) -> tuple[bytes, list[int | None]]:
    r"""The document's bytes and, for k = 0..len(ids), the byte length of its first k tokens.

    ``lengths[k]`` is ``len(decode(ids[:k]).encode())`` when that decoding is a prefix of the whole text's
    bytes, else None: k cuts through a multi-byte character (a byte-level token holding half of one decodes
    to U+FFFD, which is no prefix). Cost: one decode per k (O(n^2) in tokens; documents are capped).

    >>> table = {1: "ab", 2: " c", 3: "é"}          # a toy vocabulary: id -> text
    >>> prefix_byte_lengths(lambda ids: "".join(table[i] for i in ids), [1, 2, 3])
    (b'ab c\xc3\xa9', [0, 2, 4, 6])
    """
    text = decode(list(ids)).encode("utf-8")
    lengths: list[int | None] = []
    for k in range(len(ids) + 1):
        prefix = decode(list(ids[:k])).encode("utf-8")
        lengths.append(len(prefix) if text.startswith(prefix) else None)
    return text, lengths


def continuation_at(text: bytes, lengths: Sequence[int | None], t: int, max_tokens: int) -> tuple[str, list[int]]:
    r"""The true continuation after token position t (up to ``max_tokens`` tokens) and its token ends in bytes.

    ``t`` must be a character boundary (``lengths[t]`` not None). The continuation stops at the last
    character boundary within ``max_tokens`` tokens; empty when there is none.

    >>> continuation_at(b'ab c\xc3\xa9', [0, 2, 4, None, 6], 1, 3)   # token 3 holds half of the e-acute
    (' cé', [2, 4])
    """
    start = lengths[t]
    if start is None:
        raise ValueError(f"position {t} is inside a multi-byte character")
    ends = [lengths[k] - start for k in range(t + 1, min(len(lengths), t + 1 + max_tokens)) if lengths[k] is not None]
    return (text[start:start + ends[-1]].decode("utf-8") if ends else ""), ends


# ------------------------------------------------------------------------------------------------ matching


def continuation_match(predicted: str | None, continuation: str, token_ends: Sequence[int], *,
                       first_token_only: bool = False, leading_space: str = "lenient") -> bool:
    """Whether ``predicted`` is the true continuation cut at one of its token boundaries (the RPT reward).

    The prediction's UTF-8 bytes must equal ``continuation``'s first b bytes for some b in ``token_ends``:
    one token or several count, a partial token does not, nor does an empty prediction. With
    ``first_token_only`` only the first boundary counts. ``leading_space="lenient"`` strips leading
    whitespace from both sides first (the true text's " 42" matches a boxed "42"; boundaries inside that
    whitespace drop out, so the first token is then the first one after it); ``"exact"`` compares as is.

    >>> ends = [1, 2, 3, 4]                                 # true tokens " ", "6", "0", "." of " 60."
    >>> [continuation_match(p, " 60.", ends) for p in ["6", "60", "60.", "600", " 6", "", "6."]]
    [True, True, True, False, True, False, False]
    >>> continuation_match("60", " 60.", ends, first_token_only=True), continuation_match("6", " 60.", ends,
    ...     leading_space="exact")
    (False, False)
    """
    if predicted is None:
        return False
    pred, cont, ends = predicted.encode("utf-8"), continuation.encode("utf-8"), list(token_ends)
    if leading_space == "lenient":
        cut = len(cont) - len(cont.lstrip(WHITESPACE))
        pred, cont, ends = pred.lstrip(WHITESPACE), cont[cut:], [e - cut for e in ends if e > cut]
    elif leading_space != "exact":
        raise ValueError(f"leading_space must be 'lenient' or 'exact', got {leading_space!r}")
    if first_token_only:
        ends = ends[:1]
    return bool(pred) and cont.startswith(pred) and len(pred) in ends


def first_token_text(continuation: str, token_ends: Sequence[int], *, leading_space: str = "lenient") -> str:
    """The text of the first token that :func:`continuation_match` with ``first_token_only`` would accept.

    >>> first_token_text(" 60.", [1, 2, 3, 4]), first_token_text(" 60.", [1, 2, 3, 4], leading_space="exact")
    ('6', ' ')
    """
    cont = continuation.encode("utf-8")
    cut = len(cont) - len(cont.lstrip(WHITESPACE)) if leading_space == "lenient" else 0
    ends = [e for e in token_ends if e > cut]
    return cont[cut:ends[0]].decode("utf-8") if ends else ""


def boxed_prediction(completion: str) -> str | None:
    r"""The content of the last ``\boxed{...}`` after the thinking part, braces balanced; None if absent/unclosed.

    The thinking part ends at the last ``</think>`` when there is one (a box inside the thoughts is a draft).
    The content is returned as written: whitespace is the matcher's business.

    >>> boxed_prediction(r"so \boxed{5} no: \boxed{ {6}0}"), boxed_prediction(r"\boxed{7</think>none")
    (' {6}0', None)
    """
    answer_part = completion.rsplit("</think>", 1)[-1]
    start = answer_part.rfind("\\boxed{")
    if start < 0:
        return None
    depth = 0
    for i in range(start + len("\\boxed"), len(answer_part)):
        depth += {"{": 1, "}": -1}.get(answer_part[i], 0)
        if depth == 0:
            return answer_part[start + len("\\boxed{"):i]
    return None


# ------------------------------------------------------------------------------------------------ entropy


def topk_entropy(logits: Any, k: int = 16) -> Any:
    """Entropy in nats of the softmax over the k largest logits, renormalised: ``(..., V) -> (...)``.

    k equal logits give ``log k`` (the largest value); one dominant logit gives ~0. RPT's filter (sec. 3.3)
    keeps positions whose proxy entropy is high: the next token is not obvious from the text alone.
    """
    top = logits.float().topk(min(k, logits.shape[-1]), dim=-1).values  # (..., k)
    logp = top.log_softmax(dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def entropy_thresholds(entropies: Sequence[float], quantiles: Sequence[float] = (1 / 3, 2 / 3)) -> list[float]:
    """Bucket edges at the given quantiles (nearest-rank, lower): terciles by default.

    >>> entropy_thresholds([0.0, 0.5, 1.0, 1.5, 2.0, 2.5])
    [0.5, 1.5]
    """
    ordered = sorted(entropies)
    if not ordered:
        return [0.0] * len(quantiles)
    return [ordered[min(len(ordered) - 1, max(0, int(q * len(ordered)) - 1))] for q in quantiles]


def bucket(entropy: float, thresholds: Sequence[float]) -> str:
    """``easy`` (entropy <= first edge), ``medium`` (<= second edge) or ``hard``.

    >>> [bucket(e, [0.5, 1.5]) for e in (0.5, 0.6, 1.5, 1.6)]
    ['easy', 'medium', 'medium', 'hard']
    """
    low, high = thresholds
    return "easy" if entropy <= low else "medium" if entropy <= high else "hard"


def bucketed_accuracy(correct: Sequence[bool], entropies: Sequence[float], thresholds: Sequence[float]) -> dict:
    """Accuracy overall and per bucket, with counts: ``{"all": .., "easy": .., "n_easy": .., ...}``.

    An empty bucket has accuracy None.

    >>> bucketed_accuracy([True, False, True], [0.1, 1.0, 2.0], [0.5, 1.5])["hard"]
    1.0
    """
    out: dict[str, Any] = {"all": sum(correct) / len(correct) if correct else None, "n_all": len(correct)}
    for name in BUCKETS:
        picked = [c for c, e in zip(correct, entropies) if bucket(e, thresholds) == name]
        out[name] = sum(picked) / len(picked) if picked else None
        out[f"n_{name}"] = len(picked)
    return out


# ---------------------------------------------------------------------------------------------- log-probs


def target_logps(model: Any, prefix_ids: Sequence[Sequence[int]], target_ids: Sequence[Sequence[int]],
                 *, pad_id: int = 0) -> list[float]:
    """``sum_j log p(target_j | prefix, target_<j)`` per row, from one right-padded forward pass.

    Shapes: B rows, L = longest prefix + target; ``logits`` (B, L, V); token log-probs (B, L-1) where entry
    i scores token i+1. Row b's target tokens sit at i = len(prefix_b) - 1 .. len(prefix_b) + len(target_b) - 2.
    The naive oracle is one forward per row over ``prefix + target`` (tested against it).
    """
    import torch

    seqs = [list(p) + list(t) for p, t in zip(prefix_ids, target_ids)]
    width = max(len(s) for s in seqs)
    device = next(model.parameters()).device
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(input_ids)
    for b, seq in enumerate(seqs):
        input_ids[b, : len(seq)] = torch.tensor(seq, device=device)
        mask[b, : len(seq)] = 1
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=mask).logits.float()  # (B, L, V)
    token_logps = logits[:, :-1].log_softmax(-1).gather(-1, input_ids[:, 1:, None])[..., 0]  # (B, L-1)
    out = []
    for b, (prefix, target) in enumerate(zip(prefix_ids, target_ids)):
        start = len(prefix) - 1
        out.append(float(token_logps[b, start:start + len(target)].sum()))
    return out


def greedy_next_tokens(model: Any, tokenizer: Any, contexts: Sequence[Sequence[int]], batch_size: int = 16) -> list[str]:
    """The decoded argmax next token after each context (right-padded batches; logits at each last token)."""
    import torch

    device = next(model.parameters()).device
    out = []
    model.eval()
    for start in range(0, len(contexts), batch_size):
        part = contexts[start:start + batch_size]
        width = max(len(c) for c in part)
        ids = torch.full((len(part), width), tokenizer.pad_token_id, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for b, context in enumerate(part):
            ids[b, :len(context)], mask[b, :len(context)] = torch.tensor(context, device=device), 1
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits  # (B, L, V)
        last = mask.sum(1) - 1  # (B,) index of each row's last real token
        best = logits[torch.arange(len(part), device=device), last].argmax(-1)  # (B,)
        out += [tokenizer.decode([int(t)], clean_up_tokenization_spaces=False) for t in best]
    return out


def proxy_entropies(model: Any, ids: Sequence[int], k: int = 16) -> list[float]:
    """``out[t]`` = top-k entropy of the proxy's distribution for token t given tokens < t (``out[0]`` = nan).

    One forward over the document: logits (1, n, V); row t-1 predicts token t.
    """
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([list(ids)], device=device)).logits[0]  # (n, V)
    return [float("nan")] + topk_entropy(logits[:-1], k).tolist()


# ------------------------------------------------------------------------------------------------ positions


def document_positions(text: str, tokenizer: Any, entropies_fn: Callable[[list[int]], list[float]], *,
                       min_entropy: float, per_document: int, min_context_tokens: int, context_tokens: int,
                       continuation_tokens: int, max_document_tokens: int, skip_whitespace_tokens: bool,
                       leading_space: str, seed: int) -> list[dict[str, Any]]:
    """Positions of one document worth asking about, as rows (at most ``per_document``, drawn with ``seed``).

    A position t qualifies when it sits on a character boundary, has at least ``min_context_tokens`` tokens
    before it, its true next token is not whitespace only (with ``skip_whitespace_tokens``), the matcher can
    accept something there, and the proxy's top-k entropy for token t is >= ``min_entropy``. Each row holds
    the context (at most ``context_tokens`` tokens before t, as text and ids), the true ``continuation``
    (``continuation_tokens`` tokens), its ``token_ends``, ``next_token_id`` and the ``entropy``.
    """
    import random

    def decode(part: list[int]) -> str:
        return tokenizer.decode(part, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_document_tokens]
    if len(ids) <= min_context_tokens:
        return []
    body, lengths = prefix_byte_lengths(decode, ids)
    entropies = entropies_fn(ids)
    candidates = []
    for t in range(min_context_tokens, len(ids)):
        if lengths[t] is None or not entropies[t] >= min_entropy:
            continue
        continuation, ends = continuation_at(body, lengths, t, continuation_tokens)
        first = body[lengths[t]:lengths[t + 1]] if lengths[t + 1] is not None else b"?"
        if skip_whitespace_tokens and not first.strip(WHITESPACE):
            continue
        if first_token_text(continuation, ends, leading_space=leading_space):
            candidates.append((t, continuation, ends))
    rng = random.Random(seed)
    picked = sorted(rng.sample(candidates, min(per_document, len(candidates))), key=lambda c: c[0])
    rows = []
    for t, continuation, ends in picked:
        start = max(0, t - context_tokens)
        while lengths[start] is None:  # never start inside a character
            start += 1
        rows.append({"position": t, "context": body[lengths[start]:lengths[t]].decode("utf-8"),
                     "context_ids": list(ids[start:t]), "continuation": continuation, "token_ends": ends,
                     "next_token_id": ids[t], "entropy": round(entropies[t], 6)})
    return rows
