"""Fast backend: our own decode loop over a pre-allocated slot KV cache.

Built for the shape of alignkit's workloads: many samples of the same prefix (Math-Shepherd rollouts,
GRPO groups, pass@k) and ragged completion lengths.

How one ``generate`` call runs:

1. The cache holds ``min(batch_size, rows)`` *slots*, one per running sequence: ``[slots, kv_heads, S, head_dim]``
   per layer, with ``S`` = longest prompt + ``max_new_tokens``, allocated once per call.
2. *Admission*: queued prompts (longest first) are prefilled together, left-padded, each distinct prompt
   once; its KV rows are then copied into its ``n`` sample slots (prefix sharing), and each slot samples its
   own first token from the shared last-position logits. (A prompt whose samples do not all fit in the free
   slots is prefilled again when its remaining samples are admitted.)
3. *Decode*: one forward over the running slots per step. Slots do not share a write position: each has
   ``start`` (first valid KV column, after its left padding) and ``write`` (the column the next token goes
   to), so the attention mask is a per-slot ``[start, write]`` window and the position id ``write - start``.
   The model's attention calls :class:`SlotCache`'s ``update`` exactly like a transformers cache.
4. *Retirement*: a slot whose token is EOS, completes a stop string, or reaches ``max_new_tokens`` is
   finished; the last running slots are moved into the holes (one KV row copy each), so the running slots
   stay ``[0, A)`` and the next step computes only those. When a quarter of the slots are free, more
   prompts are admitted into them.
5. Sampling applies HF's processors in HF's order (temperature, top-k, top-p, :func:`process_logits`) to
   float32 logits and draws with ``torch.multinomial``, so the distribution is ``model.generate``'s.

Departures from ``model.generate``, numbered:

1. Greedy rows equal ``generate``'s up to float rounding: batches are composed differently, so a near-tie
   between two logits can (rarely) resolve differently.
2. Seeds are per call (a ``torch.Generator``), so a seeded call is reproducible for the same prompts and
   ``batch_size``, but draws differ from ``generate``'s for the same seed.
3. Unsupported models run on the ``hf`` backend with a one-line warning (:func:`unsupported_reason`):
   sliding-window/linear-attention layers, attention kernels other than sdpa/eager, encoder-decoders,
   PEFT prompt-learning adapters, models split over devices.
4. ``compile=True`` wraps the decode forward in ``torch.compile(dynamic=True)`` on CUDA only; it is off on
   CPU and has not been tested where no GPU was available.
"""

from __future__ import annotations

import collections
import warnings
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from alignkit.generation.engine import (
    Completion,
    Progress,
    SamplingParams,
    copy_completion,
    encode_prompts,
    eos_token_ids,
    finish_completion,
    inference_mode,
    pad_token_id,
    progress_bar,
)
from alignkit.generation.hf import HFEngine

REFILL_FRACTION = 0.25  # admit new prompts once this share of slots is free (prefill is a separate forward)


# ---------------------------------------------------------------------------------------------------------
# Sampling: pure functions, tensors in and out.


def process_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, then top-k, then top-p, exactly as ``generate``'s warpers (filtered logits are -inf).

    ``logits``: ``[B, V]`` float32. Top-k keeps ties with the k-th largest logit; top-p sorts ascending and
    drops tokens whose cumulative probability is ``<= 1 - top_p``, always keeping the most likely token
    (HF's ``TopPLogitsWarper``).
    """
    if temperature != 1.0:
        logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)  # [B, V] ascending
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= (1 - top_p)
        drop_sorted[..., -1:] = False
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), -float("inf"))
    return logits


def sample_next(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Draw one token per row. ``logits``: ``[B, V]`` float32 -> (tokens ``[B]``, logprobs ``[B]`` or None).

    Logprobs are ``log_softmax(logits / T)`` before truncation (T=0 counts as 1), see engine.py.
    """
    if params.temperature == 0:
        tokens = logits.argmax(dim=-1)
    else:
        probs = process_logits(logits, params.temperature, params.top_k, params.top_p).softmax(dim=-1)
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    if not params.return_logprobs:
        return tokens, None
    scale = params.temperature if params.temperature > 0 else 1.0
    logps = torch.log_softmax(logits / scale, dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
    return tokens, logps


# ---------------------------------------------------------------------------------------------------------
# The slot cache, driven through the model's cache argument (``cache``; ``past_key_values`` in older transformers).


class SlotLayer(CacheLayerMixin):
    """One layer's ``[slots, H, S, D]`` keys/values; writes each running slot at its own column."""

    is_sliding = False

    def __init__(self, owner: Any, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.owner, self.keys, self.values, self.is_initialized = owner, keys, values, True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise AssertionError("SlotLayer is allocated up front")

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``[A, H, 1, D]`` states at column ``write[a]`` of slot ``a``; return slots ``[0, A)``'s KV."""
        assert key_states.shape[2] == 1, "SlotCache takes decode steps only; prompts go through load_prefill"
        owner = self.owner
        # Advanced indices around a slice put their dims first: keys[rows, :, write] is [A, H, D].
        self.keys[owner.rows, :, owner.write] = key_states[:, :, 0].to(self.keys.dtype)
        self.values[owner.rows, :, owner.write] = value_states[:, :, 0].to(self.values.dtype)
        active, kv_len = owner.rows.shape[0], owner.kv_len
        return self.keys[:active, :, :kv_len], self.values[:active, :, :kv_len]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.kv_len, 0

    def get_seq_length(self) -> int:
        return self.owner.kv_len

    def get_max_length(self) -> int:
        return self.keys.shape[2]


class SlotCache(Cache):
    """A transformers ``Cache`` over :class:`SlotLayer` s; the engine sets ``write``/``kv_len`` per step.

    Only decode steps (one new token per slot) go through it; prompts are prefilled with the model's own
    ``DynamicCache`` and copied in by :meth:`load_prefill`.
    """

    def __init__(self, prefill_cache: Any, slots: int, max_len: int):
        layers = []
        for layer in prefill_cache.layers:
            _, heads, _, dim = layer.keys.shape
            kw = dict(dtype=layer.keys.dtype, device=layer.keys.device)
            keys = torch.zeros(slots, heads, max_len, dim, **kw)
            values = torch.zeros(slots, heads, max_len, layer.values.shape[-1], **kw)
            layers.append(SlotLayer(self, keys, values))
        super().__init__(layers=layers)
        self.write = self.rows = torch.zeros(0, dtype=torch.long)
        self.kv_len = 0

    def set_step(self, write: torch.Tensor, kv_len: int) -> None:
        """Before a forward: ``write`` ``[A]`` columns the new tokens go to; attend to ``[0, kv_len)``."""
        self.write, self.kv_len = write, kv_len
        self.rows = torch.arange(write.shape[0], device=write.device)

    def load_prefill(self, prefill_cache: Any, src: torch.Tensor, first: int, width: int) -> None:
        """Copy prefill rows ``src`` (``[R]``, repeats = shared prefixes) into slots ``first..first+R``."""
        for layer, pre in zip(self.layers, prefill_cache.layers):
            layer.keys[first : first + len(src), :, :width] = pre.keys[src]
            layer.values[first : first + len(src), :, :width] = pre.values[src]

    def move(self, src: list[int], dst: list[int]) -> None:
        """Copy slots ``src`` onto slots ``dst`` (disjoint), in every layer."""
        device = self.layers[0].keys.device
        s, d = torch.tensor(src, device=device), torch.tensor(dst, device=device)
        for layer in self.layers:
            layer.keys[d] = layer.keys[s]
            layer.values[d] = layer.values[s]


def cache_argument(model: Any) -> str:
    """The keyword ``model``'s forward takes its KV cache by: ``cache`` in current transformers (``past_key_values``
    is deprecated there and warns on every call), ``past_key_values`` in the 5.x releases before the rename.
    A PEFT model forwards keywords to its base model, whose signature decides."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def returned_cache(output: Any) -> Any:
    """The KV cache a forward returned, read by its current name (``output.past_key_values`` logs a deprecation)."""
    return output["cache"] if "cache" in output.keys() else output["past_key_values"]


# ---------------------------------------------------------------------------------------------------------
# Engine.


def unsupported_reason(model: Any) -> str | None:
    """Why the fast loop cannot run ``model`` (None if it can); see departure 3 in the module docstring."""
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder models are not supported"
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
        return "PEFT prompt-learning adapters inject their own past_key_values"
    attn = getattr(config, "_attn_implementation", None)
    if attn not in ("sdpa", "eager"):
        return f"attention implementation {attn!r} (only sdpa and eager take our per-slot mask)"
    layer_types = getattr(config, "layer_types", None)
    if layer_types and any(t != "full_attention" for t in layer_types):
        return f"layer types {sorted(set(layer_types))} (only full attention)"
    if not layer_types and getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "sliding-window attention"
    if len(set(getattr(model, "hf_device_map", {"": 0}).values())) > 1:
        return "model split over several devices"
    return None


class FastEngine:
    """:class:`~alignkit.generation.engine.Engine` with prefix sharing and slot refill (see module docstring).

    ``batch_size`` is the number of slots (sequences decoded together); KV memory is
    ``2 * layers * batch_size * kv_heads * (longest prompt + max_new_tokens) * head_dim`` elements.
    ``max_prefill_tokens`` bounds ``prompts x padded length`` of one prefill forward.
    """

    backend = "fast"
    eval_mode = True  # sample with dropout off; engines inside TRL's trainers keep its mode (generation.rollout)

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        batch_size: int = 64,
        max_prefill_tokens: int = 8192,
        compile: bool = False,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_prefill_tokens = batch_size, max_prefill_tokens
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.pad_id = pad_token_id(tokenizer, self.eos_ids)
        self.fallback: HFEngine | None = None
        reason = unsupported_reason(model)
        if reason is not None:
            warnings.warn(f"fast generation: {reason}; using the hf backend instead", RuntimeWarning, stacklevel=2)
            self.fallback = HFEngine(model, tokenizer, batch_size=batch_size)
        self.decode_forward = model
        self.cache_argument = cache_argument(model)
        if compile and model.device.type == "cuda":
            self.decode_forward = torch.compile(model, dynamic=True)
        elif compile:
            warnings.warn("fast generation: compile=True is CUDA-only; running eagerly", RuntimeWarning, stacklevel=2)

    def generate(
        self, prompts: list[str] | list[list[int]], params: SamplingParams, *, progress: bool | Progress = True
    ) -> list[list[Completion]]:
        """See :class:`~alignkit.generation.engine.Engine`."""
        if self.fallback is not None:
            return self.fallback.generate(prompts, params, progress=progress)
        ids = encode_prompts(prompts, self.tokenizer)
        if not ids:
            return []
        with (
            inference_mode(self.model, eval_mode=self.eval_mode),
            progress_bar(len(ids) * params.n, enabled=progress, backend=self.backend) as bar,
        ):
            return _Run(self, ids, params, bar).run()


class _Run:
    """State of one ``generate`` call: the queue, the running slots, the finished completions."""

    def __init__(self, engine: FastEngine, ids: list[list[int]], params: SamplingParams, bar: Any):
        self.e, self.ids, self.params, self.bar = engine, ids, params, bar
        self.device = engine.model.device
        self.greedy = params.temperature == 0
        rows_each = 1 if self.greedy else params.n  # greedy rows are identical: decode once, copy n times
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        self.queue = collections.deque((i, rows_each) for i in order)
        self.max_len = max(len(p) for p in ids) + params.max_new_tokens
        self.cache: Any = None
        # Never more slots than rows: the KV cache is allocated for every slot.
        self.slots = slots = min(engine.batch_size, len(ids) * rows_each)
        # Per-slot state. Tensors on CPU (small; one copy to the device per step), lists for Python-side text.
        self.start = torch.zeros(slots, dtype=torch.long)  # first valid KV column
        self.write = torch.zeros(slots, dtype=torch.long)  # column the next fed token is written to
        self.last = torch.zeros(slots, dtype=torch.long)  # token fed at the next step
        self.owner: list[int] = []  # prompt index of each running slot
        self.admitted: list[int] = []  # admission number of each running slot (orders a prompt's samples)
        self.next_admission = 0
        self.tokens: list[list[int]] = []
        self.logps: list[list[float]] = []
        # (admission number, completion): rows finish shortest-first, but callers (votes that break ties
        # toward the first sample) must not see samples ordered by length, so results are re-sorted.
        self.results: list[list[tuple[int, Completion]]] = [[] for _ in ids]
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.eos = set(engine.eos_ids)
        # Tokens to decode when looking for a stop string: its UTF-8 bytes bound its token count (byte-level
        # BPE); the margin covers decoders that drop a leading space at the window start (SentencePiece).
        self.stop_window = max((len(s.encode()) for s in params.stop), default=0) + 8

    def run(self) -> list[list[Completion]]:
        while self.queue or self.owner:
            free = self.slots - len(self.owner)
            if self.queue and (not self.owner or free >= max(1, int(self.slots * REFILL_FRACTION))):
                self._admit()
            if self.owner:
                self._decode()
        return [[c for _, c in sorted(row, key=lambda item: item[0])] for row in self.results]

    def _take(self) -> list[tuple[int, int]]:
        """Pop ``(prompt, rows)`` pieces that fit the free slots and the prefill token budget."""
        free, width, take = self.slots - len(self.owner), 0, []
        while self.queue and free > 0:
            i, rows = self.queue[0]
            new_width = max(width, len(self.ids[i]))
            if take and (len(take) + 1) * new_width > self.e.max_prefill_tokens:
                break
            got = min(rows, free)
            take.append((i, got))
            free, width = free - got, new_width
            if got == rows:
                self.queue.popleft()
            else:  # the rest of this prompt's samples wait for free slots (and a second prefill)
                self.queue[0] = (i, rows - got)
        return take

    def _admit(self) -> None:
        take = self._take()
        prompts = [self.ids[i] for i, _ in take]
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[self.e.pad_id] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # real tokens at 0..L-1, as generate does
        out = self.e.model(
            input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1
        )
        prefill_cache = returned_cache(out)
        if self.cache is None:
            self.cache = SlotCache(prefill_cache, self.slots, self.max_len)
        src = [k for k, (_, rows) in enumerate(take) for _ in range(rows)]  # prefill row of each new slot
        first, count = len(self.owner), len(src)
        self.cache.load_prefill(prefill_cache, torch.tensor(src, device=self.device), first, width)
        lengths = torch.tensor([len(prompts[k]) for k in src])
        self.start[first : first + count] = width - lengths
        self.write[first : first + count] = width
        for k in src:
            self.owner.append(take[k][0])
            self.admitted.append(self.next_admission)
            self.next_admission += 1
            self.tokens.append([])
            self.logps.append([])
        logits = out.logits[:, -1].float()[torch.tensor(src, device=self.device)]  # [count, V]
        self._record(first, *sample_next(logits, self.params, self.generator))

    def _decode(self) -> None:
        active = len(self.owner)
        write, start = self.write[:active].to(self.device), self.start[:active].to(self.device)
        kv_len = int(self.write[:active].max()) + 1
        cols = torch.arange(kv_len, device=self.device)
        valid = (cols >= start[:, None]) & (cols <= write[:, None])  # [A, kv_len]
        if self.e.model.config._attn_implementation == "eager":  # eager adds the mask to the scores
            dtype = self.cache.layers[0].keys.dtype
            valid = torch.zeros(valid.shape, dtype=dtype, device=self.device).masked_fill(
                ~valid, torch.finfo(dtype).min
            )
        self.cache.set_step(write, kv_len)
        out = self.e.decode_forward(
            input_ids=self.last[:active, None].to(self.device),
            position_ids=(write - start)[:, None],
            attention_mask=valid[:, None, None, :],  # 4D: transformers uses it as-is
            use_cache=True,
            **{self.e.cache_argument: self.cache},
        )
        self.write[:active] += 1
        self._record(0, *sample_next(out.logits[:, -1].float(), self.params, self.generator))

    def _record(self, first: int, tokens: torch.Tensor, logps: torch.Tensor | None) -> None:
        """Append sampled tokens of slots ``first..``; then retire the slots that are done."""
        new = tokens.tolist()  # the one device->host sync per step
        lps = logps.tolist() if logps is not None else None
        self.last[first : first + len(new)] = tokens.cpu()
        for k, token in enumerate(new):
            self.tokens[first + k].append(token)
            if lps is not None:
                self.logps[first + k].append(lps[k])
        done = [r for r in range(first, first + len(new)) if self._done(r)]
        if done:
            self._retire(done)

    def _done(self, r: int) -> bool:
        row = self.tokens[r]
        if row[-1] in self.eos or len(row) >= self.params.max_new_tokens:
            return True
        if not self.params.stop:
            return False
        tail = self.e.tokenizer.decode(row[-self.stop_window :])
        return any(s in tail for s in self.params.stop)

    def _retire(self, done: list[int]) -> None:
        for r in done:
            lps = self.logps[r] if self.params.return_logprobs else None
            c = finish_completion(
                self.tokens[r], lps, tokenizer=self.e.tokenizer, eos_ids=self.e.eos_ids, stop=self.params.stop
            )
            copies = self.params.n if self.greedy else 1
            rows = [c] + [copy_completion(c) for _ in range(copies - 1)]
            self.results[self.owner[r]].extend((self.admitted[r], row) for row in rows)
            self.bar.update(copies)
        # Compact: running slots at the tail move into the holes, so running slots stay [0, A).
        keep = len(self.owner) - len(done)
        finished = set(done)
        holes = [r for r in done if r < keep]
        movers = [r for r in range(keep, len(self.owner)) if r not in finished]
        if movers:
            self.cache.move(movers, holes)
            for s, d in zip(movers, holes):
                self.owner[d], self.tokens[d], self.logps[d] = self.owner[s], self.tokens[s], self.logps[s]
                self.admitted[d] = self.admitted[s]
            for t in (self.start, self.write, self.last):
                t[holes] = t[movers]
        del self.owner[keep:], self.tokens[keep:], self.logps[keep:], self.admitted[keep:]
