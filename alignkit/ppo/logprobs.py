"""Log-probs of sampled tokens and per-token values, without full-vocabulary logits for a whole batch.

Shapes: ``B`` sequences, ``P`` prompt tokens (left-padded), ``R`` response tokens (right-padded),
``H`` hidden size, ``V`` vocabulary, ``N`` response tokens kept by the mask.

Why not ``model(...).logits``: a causal LM's forward returns float logits for every position, (B, P + R, V).
For a 152k vocabulary, batch 32 and 256 positions that is 5 GB in float32 before ``log_softmax`` doubles it,
and under autograd every such tensor is kept for backward. That is most of TRL 1.12 PPOTrainer's peak memory
(docs/ppo.md). Here the decoder runs once to give hidden states, only the R positions that predict response
tokens are kept, masked-out (padding) positions are dropped, and the output layer runs on ``chunk_tokens``
rows at a time. With autograd each chunk runs under activation checkpointing: backward recomputes that chunk's
logits, so at most one chunk of (chunk_tokens, V) float32 logits (and its gradient) exists at any time.

The reference, naive version every function here must equal (a test oracle)::

    logits = model(input_ids, attention_mask=mask).logits[:, P - 1 : P + R - 1]   # (B, R, V)
    logps = torch.log_softmax(logits.float() / temperature, -1).gather(-1, response[..., None])[..., 0]
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from alignkit.core.errors import ModelError

# Config attributes of models whose logits are not just output_layer(hidden): our hidden-state path would
# silently skip the extra step, so such models are refused (ModelError) instead.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions counted over real tokens only, (B, T) -> (B, T): left padding does not shift them.

    >>> position_ids(torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])).tolist()
    [[0, 0, 0, 1, 2], [0, 1, 2, 3, 3]]

    ``model.generate`` numbers positions the same way, so sampling and scoring see the same positions.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def backbone_and_head(model: Any, head: str = "lm") -> tuple[Any, Any]:
    """The decoder stack (returns hidden states) and the output layer of a (PEFT-wrapped) transformers model.

    ``head``: ``"lm"`` for a causal LM's vocabulary projection, ``"score"`` for a sequence classifier's head.
    LoRA layers live inside the modules themselves, so calling the decoder directly still applies them, and
    ``PeftModel.disable_adapter()`` still switches them off.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    for name in _LOGIT_POSTPROCESSING:
        if getattr(config, name, None) not in (None, 1.0):
            raise ModelError(f"{config.model_type}: config.{name}={getattr(config, name)} post-processes the "
                             "logits, which alignkit's PPO log-prob path does not reproduce; use another model")
    backbone = getattr(base, base.base_model_prefix)
    output = base.get_output_embeddings() if head == "lm" else base.score
    return backbone, output


def response_hidden(backbone: Any, input_ids: Tensor, attention_mask: Tensor, prompt_width: int) -> Tensor:
    """Hidden states at the positions that predict the response tokens: (B, P + R) ids -> (B, R, H).

    The response token at column ``P + j`` is predicted by the position before it, ``P + j - 1``.
    """
    out = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                   use_cache=False)
    hidden = out.last_hidden_state  # (B, P + R, H)
    return hidden[:, prompt_width - 1 : -1]  # (B, R, H)


def _chunk_logps(hidden: Tensor, targets: Tensor, head: Any, temperature: float) -> Tensor:
    """(n, H) hidden, (n,) targets -> (n,) log softmax(head(hidden) / T)[target], in float32."""
    logits = head(hidden).float() / temperature  # (n, V): the only vocabulary-sized tensor
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _chunk_logps_entropy(hidden: Tensor, targets: Tensor, head: Any, temperature: float) -> tuple[Tensor, Tensor]:
    """(n, H), (n,) -> ((n,) log-probs of the targets, (n,) entropies), from one float32 logits chunk."""
    logits = head(hidden).float() / temperature  # (n, V)
    logps = torch.log_softmax(logits, dim=-1)  # (n, V)
    return logps.gather(-1, targets[:, None]).squeeze(-1), -(logps.exp() * logps).sum(-1)


def token_logps(hidden: Tensor, targets: Tensor, head: Any, *, temperature: float = 1.0,
                chunk_tokens: int = 1024) -> Tensor:
    """Log-prob of each target token, ``chunk_tokens`` rows at a time: (N, H), (N,) -> (N,) float32.

    Equals ``log_softmax(head(hidden).float() / T, -1).gather(-1, targets[:, None])[:, 0]``. With autograd
    on, each chunk is checkpointed (only ``hidden`` is saved; backward recomputes the chunk's logits).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (a greedy policy has no log-probs), got {temperature}")
    pieces = []
    for h, t in zip(hidden.split(chunk_tokens), targets.split(chunk_tokens)):
        if torch.is_grad_enabled() and h.requires_grad:
            pieces.append(checkpoint(_chunk_logps, h, t, head, temperature, use_reentrant=False))
        else:
            pieces.append(_chunk_logps(h, t, head, temperature))
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)


@torch.no_grad()
def token_logps_and_entropy(hidden: Tensor, targets: Tensor, head: Any, *, temperature: float = 1.0,
                            chunk_tokens: int = 1024) -> tuple[Tensor, Tensor]:
    """Without gradients: :func:`token_logps` and the entropy of each row's (tempered) next-token
    distribution, from one pass over the output layer: (N, H), (N,) -> ((N,), (N,)) float32."""
    pieces = [_chunk_logps_entropy(h, t, head, temperature)
              for h, t in zip(hidden.split(chunk_tokens), targets.split(chunk_tokens))]
    if not pieces:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty
    return torch.cat([p[0] for p in pieces]), torch.cat([p[1] for p in pieces])


def _scatter(mask: Tensor, flat: Tensor) -> Tensor:
    """(N,) values of the True entries of a (B, R) mask -> (B, R), 0 elsewhere (differentiable)."""
    return torch.zeros(mask.shape, dtype=flat.dtype, device=flat.device).masked_scatter(mask, flat)


def sequence_logps(model: Any, input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor, *,
                   temperature: float = 1.0, chunk_tokens: int = 1024,
                   with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """Log-probs (and optionally entropies) of a causal LM's response tokens: ``(logps, entropy)``, (B, R).

    ``with_entropy`` is for the no-gradient experience pass (entropies are logged, never trained on).

    ``input_ids``/``attention_mask``: (B, P + R), prompt left-padded to P, response right-padded to R;
    ``response_mask``: (B, R) bool, True on generated tokens. Entries outside the mask are 0.
    """
    backbone, head = backbone_and_head(model, "lm")
    width = input_ids.shape[1] - response_mask.shape[1]
    hidden = response_hidden(backbone, input_ids, attention_mask, width)  # (B, R, H)
    kept = hidden[response_mask]  # (N, H): padding positions never reach the output layer
    targets = input_ids[:, width:][response_mask]  # (N,)
    if with_entropy:  # the experience pass: no gradient, one output-layer pass for both
        logps, entropy = token_logps_and_entropy(kept, targets, head, temperature=temperature,
                                                 chunk_tokens=chunk_tokens)
        return _scatter(response_mask, logps), _scatter(response_mask, entropy)
    logps = token_logps(kept, targets, head, temperature=temperature, chunk_tokens=chunk_tokens)
    return _scatter(response_mask, logps), None


def sequence_values(value_model: Any, input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor) -> Tensor:
    """The value head's estimate V(s_t) of the state before each response token, (B, R) float32.

    ``value_model`` is a (PEFT-wrapped) sequence classifier with one label; its ``score`` head is applied at
    every position instead of only the last (as TRL's PPO value model did). V(s_t) is read at the position
    that predicts response token t, the same position as that token's log-prob.
    """
    backbone, head = backbone_and_head(value_model, "score")
    width = input_ids.shape[1] - response_mask.shape[1]
    hidden = response_hidden(backbone, input_ids, attention_mask, width)  # (B, R, H)
    values = head(hidden).squeeze(-1).float()  # (B, R)
    return torch.where(response_mask, values, torch.zeros_like(values))
