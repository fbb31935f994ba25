"""Reference backend: ``model.generate`` with left padding.

It is the oracle the ``fast`` backend is tested against, so it favours obvious correctness:

1. Prompts are sorted by length and cut into calls of at most ``batch_size`` rows (prompts x samples),
   left-padded, with ``num_return_sequences`` giving the samples (a prompt with more samples than
   ``batch_size`` is split over several calls).
2. Greedy decoding (temperature 0) is deterministic, so each prompt is generated once and copied ``n`` times.
3. Every sampling field is passed explicitly: ``generate`` fills unset fields from the checkpoint's
   ``generation_config.json`` and then from global defaults, which include ``top_k=50``.
   Processors we do not expose (``repetition_penalty``, ``min_p``...) are set to their no-op values.
4. Stop strings use ``stop_strings=`` (HF's ``StopStringCriteria``); rows are then truncated by
   :func:`~alignkit.generation.engine.finish_completion`, like every backend's.
5. Progress: a call's rows finish at different decode steps, but ``generate`` returns them together; a
   stopping criterion that stops nothing (:class:`_FinishedRows`) counts each row at the step it ends, so the
   bar moves per finished sequence, not per call.
"""

from __future__ import annotations

from typing import Any

import torch

from alignkit.generation.engine import (
    Completion,
    Progress,
    SamplingParams,
    bar_is_shown,
    copy_completion,
    encode_prompts,
    eos_token_ids,
    finish_completion,
    inference_mode,
    pad_token_id,
    progress_bar,
)


def plan_calls(order: list[int], rows_per_prompt: int, batch_size: int) -> list[tuple[list[int], int]]:
    """Split prompts (in ``order``) into ``generate`` calls of at most ``batch_size`` rows.

    Returns ``[(prompt_indices, rows_each), ...]``; a prompt needing more rows than ``batch_size`` gets
    several single-prompt calls.

    >>> plan_calls([0, 1, 2], rows_per_prompt=2, batch_size=4)
    [([0, 1], 2), ([2], 2)]
    >>> plan_calls([0], rows_per_prompt=5, batch_size=2)
    [([0], 2), ([0], 2), ([0], 1)]
    """
    if rows_per_prompt > batch_size:
        calls = []
        for i in order:
            left = rows_per_prompt
            while left > 0:
                calls.append(([i], min(left, batch_size)))
                left -= batch_size
        return calls
    per_call = batch_size // rows_per_prompt
    return [(order[s : s + per_call], rows_per_prompt) for s in range(0, len(order), per_call)]


class _LogprobRecorder:
    """Records ``log_softmax(logits / T)`` of each chosen token during ``generate``.

    ``generate`` exposes no per-step "chosen token + its logits" hook, and keeping ``output_logits`` costs
    steps x rows x vocab floats. So a logits processor (custom processors run before the sampling warpers,
    i.e. see raw logits) keeps one step's log-softmax, and a stopping criterion (called right after the token
    is appended) reads the chosen token from ``input_ids[:, -1]``: memory is one step's rows x vocab.
    """

    def __init__(self, temperature: float):
        from transformers import LogitsProcessor, StoppingCriteria

        recorder = self
        self.temperature = temperature if temperature > 0 else 1.0
        self.step_logps: torch.Tensor | None = None  # [rows, V]
        self.steps: list[torch.Tensor] = []  # each [rows]

        class Keep(LogitsProcessor):
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
                recorder.step_logps = torch.log_softmax(scores.float() / recorder.temperature, dim=-1)
                return scores

        class Read(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
                recorder.steps.append(recorder.step_logps.gather(-1, input_ids[:, -1:]).squeeze(-1).cpu())
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        self.processor, self.criterion = Keep(), Read()

    def per_row(self) -> list[list[float]]:
        return torch.stack(self.steps, dim=1).tolist()  # [rows, steps]


class _FinishedRows:
    """Advances a progress bar by ``weight`` per row of one ``generate`` call, at the decode step the row ends.

    ``generate`` calls its stopping criteria right after each new token is appended; this one stops nothing
    and marks the rows whose new token is an EOS id, completes one of ``params.stop`` (the same
    ``StopStringCriteria`` test ``generate`` runs for ``stop_strings=``) or is the ``max_new_tokens``-th:
    exactly the rows ``generate`` finishes at that step. Finished rows keep receiving padding and are counted
    once. :meth:`finish` counts any row left (one that ``generate`` ended for a reason of the checkpoint's own
    ``generation_config``), so the bar always advances by ``rows * weight`` per call.
    """

    def __init__(self, bar: Any, weight: int, *, rows: int, prompt_width: int, eos_ids: list[int],
                 params: SamplingParams, tokenizer: Any):
        from transformers import StoppingCriteria, StopStringCriteria

        counter = self
        self.bar, self.weight, self.rows, self.counted = bar, weight, rows, 0
        self.end = prompt_width + params.max_new_tokens  # sequence length at the last generated token
        self.eos = torch.tensor(eos_ids)
        self.stop = StopStringCriteria(tokenizer, list(params.stop)) if params.stop else None
        self.done: torch.Tensor | None = None  # [rows] bool

        class Count(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
                counter.step(input_ids)
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        self.criterion = Count()

    def step(self, input_ids: torch.Tensor) -> None:
        if self.done is None:
            self.done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            self.eos = self.eos.to(input_ids.device)
        if input_ids.shape[1] >= self.end:
            ended = torch.ones_like(self.done)
        else:
            ended = torch.isin(input_ids[:, -1], self.eos)
            if self.stop is not None:
                ended |= self.stop(input_ids, None)
        new = int((ended & ~self.done).sum())  # one small sync; generate syncs on its own stop check each step
        if new:
            self.done |= ended
            self._advance(new)

    def finish(self) -> None:
        self._advance(self.rows - self.counted)

    def _advance(self, rows: int) -> None:
        if rows > 0:
            self.counted += rows
            self.bar.update(rows * self.weight)


def _generation_kwargs(params: SamplingParams, *, eos_ids: list[int], pad_id: int) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(
        max_new_tokens=params.max_new_tokens,
        do_sample=params.temperature > 0,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
        num_beams=1,
        # No-op values, so nothing in the checkpoint's generation_config.json changes the distribution.
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        min_new_tokens=0,
    )
    if params.temperature > 0:  # sampling-only fields (generate warns about them when greedy)
        kwargs.update(
            temperature=params.temperature,
            top_k=params.top_k,  # passed even when 0: generate's own default is 50
            top_p=params.top_p,
            min_p=0.0,
            typical_p=1.0,
            epsilon_cutoff=0.0,
            eta_cutoff=0.0,
        )
    return kwargs


class HFEngine:
    """:class:`~alignkit.generation.engine.Engine` over ``model.generate`` (also PEFT and 4-bit models)."""

    backend = "hf"
    eval_mode = True  # sample with dropout off; engines inside TRL's trainers keep its mode (generation.rollout)

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int = 64):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.pad_id = pad_token_id(tokenizer, self.eos_ids)

    def generate(
        self, prompts: list[str] | list[list[int]], params: SamplingParams, *, progress: bool | Progress = True
    ) -> list[list[Completion]]:
        """See :class:`~alignkit.generation.engine.Engine`."""
        ids = encode_prompts(prompts, self.tokenizer)
        greedy = params.temperature == 0
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # similar lengths share a call
        results: list[list[Completion]] = [[] for _ in ids]
        with (
            inference_mode(self.model, eval_mode=self.eval_mode),
            _seeded(params.seed, self.model),
            progress_bar(len(ids) * params.n, enabled=progress, backend=self.backend) as bar,
        ):
            for call, rows_each in plan_calls(order, 1 if greedy else params.n, self.batch_size):
                # Greedy: each row stands for the prompt's n identical completions.
                rows = self._generate_call([ids[i] for i in call], rows_each, params, bar, params.n if greedy else 1)
                for k, i in enumerate(call):
                    got = rows[k * rows_each : (k + 1) * rows_each]
                    # Greedy: n identical rows; copies, so a caller mutating one does not change the others.
                    results[i].extend(got if not greedy else [copy_completion(got[0]) for _ in range(params.n)])
        return results

    def _generate_call(
        self, batch: list[list[int]], rows_each: int, params: SamplingParams, bar: Any = None, weight: int = 1
    ) -> list[Completion]:
        """One left-padded ``generate`` call; returns ``len(batch) * rows_each`` completions, prompt-major.

        ``bar`` is advanced by ``weight`` per row as it finishes (see :class:`_FinishedRows`).
        """
        from transformers import StoppingCriteriaList

        device = self.model.device
        width = max(len(p) for p in batch)
        input_ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in batch], device=device)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        kwargs = _generation_kwargs(params, eos_ids=self.eos_ids, pad_id=self.pad_id)
        if params.stop:
            kwargs.update(stop_strings=list(params.stop), tokenizer=self.tokenizer)
        criteria = StoppingCriteriaList()
        recorder = _LogprobRecorder(params.temperature) if params.return_logprobs else None
        if recorder is not None:
            from transformers import LogitsProcessorList

            kwargs.update(logits_processor=LogitsProcessorList([recorder.processor]))
            criteria.append(recorder.criterion)
        rows = len(batch) * rows_each
        counter = None
        if bar is not None and bar_is_shown(bar):
            counter = _FinishedRows(bar, weight, rows=rows, prompt_width=width, eos_ids=self.eos_ids, params=params,
                                    tokenizer=self.tokenizer)
            criteria.append(counter.criterion)
        if criteria:
            kwargs.update(stopping_criteria=criteria)
        out = self.model.generate(
            input_ids=input_ids, attention_mask=attention_mask, num_return_sequences=rows_each, **kwargs
        )
        if counter is not None:
            counter.finish()
        elif bar is not None:
            bar.update(rows * weight)
        generated = out[:, width:].tolist()
        logps = recorder.per_row() if recorder is not None else [None] * len(generated)
        return [
            finish_completion(row, lp, tokenizer=self.tokenizer, eos_ids=self.eos_ids, stop=params.stop)
            for row, lp in zip(generated, logps)
        ]


class _seeded:
    """Seed torch's RNG for one call without disturbing the caller's RNG state (no-op when seed is None)."""

    def __init__(self, seed: int | None, model: Any):
        self.seed, self.device = seed, model.device
        self._fork = None

    def __enter__(self) -> None:
        if self.seed is None:
            return
        devices = [self.device] if self.device.type == "cuda" else []
        self._fork = torch.random.fork_rng(devices=devices)
        self._fork.__enter__()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc: Any) -> None:
        if self._fork is not None:
            self._fork.__exit__(*exc)
