"""Judges: the probability that one response beats another under a principle, read off a model's next-token
probabilities (the feedback model of RL-CAI, Bai et al. 2022, arXiv:2212.08073, sec. 4.1; RLAIF, Lee et al.
2023, arXiv:2309.00267, sec. 2.1).

The judge gets one user turn::

    Consider the following conversation between a human and an assistant:

    Human: ...                      (the prompt of the pair, as a transcript)

    <the principle's comparison question>
    A. <the response shown first>
    B. <the response shown second>
    Answer with the letter of the option that fits best (A to B) only.

and ``P(A)`` is its next-token probability of the label ``A`` renormalised over the two labels,
``p(A) / (p(A) + p(B))`` (:func:`two_way`). This is exactly the prompt of ``transformers serve``'s
``/v1/systemone`` endpoint for a two-option ``choice`` question (``transformers.decision.DECISION_PROMPT``) with
the transcript as its ``state``, so a local and a served judge read the same numbers off the same weights.

:func:`compare` asks every pair in both presentation orders and averages, ``p = (p_AB + 1 - p_BA) / 2``
(:func:`average_orders`), where ``p_BA`` is P(A) with the two responses swapped: a judge that always answers
"A" then gives 0.5 instead of a confident preference. :func:`position_bias` ``|p_AB - (1 - p_BA)|`` is how far
the order moved it.

Chain of thought (``cot: true``): the judge first writes a rationale (greedy, at most ``max_cot_length``),
then a second user turn asks for the letter only, and P(A) is read after that. CoT probabilities are clamped
into ``cot_clamp`` (Bai et al. use 40-60%: a judge that has argued itself into an answer is near 0 or 1).

Backends (both meet :class:`Judge`):

- :class:`HFJudge`: local weights (a folder, a Hub id, the ``smollm2-135m-instruct`` alias, or the policy's own
  loaded model): one forward pass per (pair, order), left-padded batches, logits of the last position only.
  The labels' variants with a leading space (``" A"``) count towards their label.
- :class:`HTTPJudge`: an OpenAI-compatible server, ``api:`` ``completions`` (``/completions`` with ``logprobs: k``:
  vLLM, SGLang; the chat template is applied here, so it needs the judge's tokenizer), ``chat``
  (``/chat/completions`` with ``logprobs: true, top_logprobs: k``: OpenAI, vLLM) or ``systemone``
  (``transformers serve``: its answer carries the two options' probabilities). transformers serve 5.23 accepts
  ``logprobs`` on ``/completions`` and ``/chat/completions`` but ignores it (it logs "Ignoring unsupported
  fields"): use ``api: systemone`` there. A server that sends no log-probs raises :class:`GenerationError`.

Departures from the papers:

1. The judge is a chat model answering a user turn with a letter, not a pretrained LM completing
   "The answer is: (" with "(A)"/"(B)" (Bai et al.) or "Preferred Summary=" (Lee et al.).
2. ``completions``/``chat`` see only the server's top-``top_logprobs`` tokens: a label not among them gets the
   lowest listed log-prob (an upper bound on its real one); with neither label listed P is nan, which
   ``cai-label`` counts and drops. ``systemone`` reads the exact tokens ``A``/``B`` only (no variants).
3. CoT needs generated text, which ``systemone`` does not give: ``cot`` with ``api: systemone`` is an error.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import os
import threading
from collections.abc import Sequence
from typing import Any, Literal, Protocol

from pydantic import Field, field_validator, model_validator

from alignkit.core.config import QuantSpec, Spec
from alignkit.core.errors import GenerationError, ModelError, RecipeError

LABELS = ("A", "B")
LEAD = "Consider the following conversation between a human and an assistant:"
ANSWER_LINE = "Answer with the letter of the option that fits best (A to B) only."  # DECISION_PROMPT's wording
COT_LINE = "Think step by step about which option fits best, then say which one it is."
COT_ANSWER = "So which option fits best? Answer with the letter of the option (A or B) only."
_ROLES = {"user": "Human", "assistant": "Assistant", "system": "System"}

Context = str | list[dict[str, str]]


@dataclasses.dataclass(frozen=True)
class Comparison:
    """One question to a judge: the conversation so far, two candidate replies, the principle's question."""

    context: Context
    first: str
    second: str
    question: str

    def swapped(self) -> Comparison:
        return dataclasses.replace(self, first=self.second, second=self.first)


@dataclasses.dataclass(frozen=True)
class Verdict:
    """``p`` = P(``first`` is preferred): the order average with swapping, else ``p_ab``. ``p_ab`` = P(judge
    answers A) with ``first`` shown as A; ``p_ba`` = P(judge answers A) with ``second`` shown as A (None
    without swapping). Probabilities are already clamped for a CoT judge."""

    p: float
    p_ab: float
    p_ba: float | None = None

    @property
    def confidence(self) -> float:
        return confidence(self.p)

    @property
    def bias(self) -> float | None:
        return None if self.p_ba is None else position_bias(self.p_ab, self.p_ba)


class Judge(Protocol):
    """What :func:`compare` and the ``cai-label`` stage need from a backend."""

    clamp: tuple[float, float] | None  # CoT band applied to every P(A), None without CoT
    tokens: int  # tokens read and written so far (prompt + rationale), for throughput

    def presented(self, items: Sequence[Comparison], *, progress: bool = False) -> list[float]:
        """P(the judge answers A) for each item exactly as presented (``first`` is option A)."""
        ...


# ------------------------------------------------------------------------------------------- pure helpers


def two_way(logp_a: float, logp_b: float) -> float:
    """P(A) renormalised over the two labels, ``exp(la) / (exp(la) + exp(lb))``, from log-probs (or logits:
    any shared offset cancels). nan when both are -inf (the model puts no mass on either label)."""
    if logp_a == logp_b == -math.inf:
        return math.nan
    d = logp_b - logp_a
    return 1.0 / (1.0 + math.exp(d)) if d < 0 else math.exp(-d) / (1.0 + math.exp(-d))  # no overflow


def average_orders(p_ab: float, p_ba: float) -> float:
    """P(first preferred) averaged over both orders: ``(p_AB + (1 - p_BA)) / 2``."""
    return (p_ab + 1.0 - p_ba) / 2.0


def position_bias(p_ab: float, p_ba: float) -> float:
    """How much the presentation order changed the judge's answer: ``|p_AB - (1 - p_BA)|`` (0 = none)."""
    return abs(p_ab - (1.0 - p_ba))


def clamp(p: float, band: tuple[float, float]) -> float:
    """``p`` limited to ``band = (lo, hi)`` (nan stays nan)."""
    return p if math.isnan(p) else min(max(p, band[0]), band[1])


def confidence(p: float) -> float:
    """How sure the judge is, whichever way: ``max(p, 1 - p)`` in [0.5, 1]."""
    return max(p, 1.0 - p)


def keep(p: float, threshold: float) -> bool:
    """Whether a pair with P(first preferred) = ``p`` is kept: a preference (p != 0.5, not nan) at least
    ``threshold`` sure."""
    return not math.isnan(p) and p != 0.5 and confidence(p) >= threshold


def label_logprob(top: dict[str, float], label: str) -> float | None:
    """Log of the total probability of the tokens that spell ``label`` up to surrounding whitespace, from a
    server's ``{token: logprob}`` top list; None if none is listed."""
    hits = [lp for token, lp in top.items() if token.strip() == label]
    if not hits:
        return None
    peak = max(hits)
    return peak + math.log(sum(math.exp(lp - peak) for lp in hits))


def p_from_top_logprobs(top: dict[str, float]) -> float:
    """P(A) from a server's top log-probs at the answer position (departure 2 of the module docstring)."""
    la, lb = label_logprob(top, LABELS[0]), label_logprob(top, LABELS[1])
    if la is None and lb is None:
        return math.nan
    floor = min(top.values())
    return two_way(floor if la is None else la, floor if lb is None else lb)


# ---------------------------------------------------------------------------------------------- prompts


def transcript(context: Context) -> str:
    """The conversation as ``Human: ...`` / ``Assistant: ...`` paragraphs (a string is one Human turn)."""
    if isinstance(context, str):
        return f"Human: {context.strip()}"
    return "\n\n".join(f"{_ROLES.get(m['role'], m['role'].title())}: {m['content'].strip()}" for m in context)


def state(item: Comparison) -> str:
    """What the judge is told before the question (the ``state`` of a systemone request)."""
    return f"{LEAD}\n\n{transcript(item.context)}"


def judge_text(item: Comparison, last_line: str = ANSWER_LINE) -> str:
    """The judge's user turn (see the module docstring)."""
    return f"{state(item)}\n\n{item.question.strip()}\nA. {item.first}\nB. {item.second}\n{last_line}"


def judge_messages(item: Comparison) -> list[dict[str, str]]:
    return [{"role": "user", "content": judge_text(item)}]


def cot_messages(item: Comparison) -> list[dict[str, str]]:
    """The CoT turn: the same question, asking for reasoning first."""
    return [{"role": "user", "content": judge_text(item, COT_LINE)}]


def answer_messages(item: Comparison, rationale: str) -> list[dict[str, str]]:
    """After a CoT rationale: the judge's reasoning as its turn, then a request for the letter only."""
    return cot_messages(item) + [{"role": "assistant", "content": rationale.strip()},
                                 {"role": "user", "content": COT_ANSWER}]


def compare(judge: Judge, items: Sequence[Comparison], *, swap: bool = True,
            progress: bool = False) -> list[Verdict]:
    """A :class:`Verdict` per item; with ``swap`` both orders are asked in one batch and averaged."""
    asked = list(items) + ([item.swapped() for item in items] if swap else [])
    probs = judge.presented(asked, progress=progress)
    if judge.clamp is not None:
        probs = [clamp(p, judge.clamp) for p in probs]
    n = len(items)
    if not swap:
        return [Verdict(p, p) for p in probs]
    return [Verdict(average_orders(a, b), a, b) for a, b in zip(probs[:n], probs[n:], strict=True)]


# ------------------------------------------------------------------------------------------ local weights


def label_token_ids(tokenizer: Any, label: str, *, variants: bool = True) -> list[int]:
    """Ids of the single tokens spelling ``label`` (and, with ``variants``, ``" " + label``)."""
    ids = []
    for text in [label, f" {label}"] if variants else [label]:
        encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(encoded) == 1 and encoded[0] not in ids:
            ids.append(encoded[0])
    if not ids:
        raise ModelError(f"the judge's tokenizer has no single token for the label {label!r}; a judge reads "
                         "the next-token probability of each label, so each must be one token")
    return ids


class HFJudge:
    """A :class:`Judge` on local weights (see the module docstring)."""

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int = 8, cot: bool = False,
                 cot_clamp: tuple[float, float] = (0.4, 0.6), max_cot_length: int = 256,
                 variants: bool = True):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.label_ids = [label_token_ids(tokenizer, label, variants=variants) for label in LABELS]
        if set(self.label_ids[0]) & set(self.label_ids[1]):
            raise ModelError(f"the judge's tokenizer spells labels {LABELS} with a shared token")
        self.cot, self.max_cot_length = cot, max_cot_length
        self.clamp = tuple(cot_clamp) if cot else None
        self.tokens = 0

    @classmethod
    def load(cls, name: str, *, dtype: str = "auto", quantization: QuantSpec | None = None,
             device: Any = None, **options: Any) -> HFJudge:
        """Load a judge model by name (folder, Hub id or alias) onto ``device``."""
        from alignkit.modeling.models import is_quantized, load_model, load_tokenizer

        model = load_model(name, quantization=quantization, dtype=dtype)
        if device is not None and not is_quantized(model):
            model.to(device)
        return cls(model.eval(), load_tokenizer(name), **options)

    def presented(self, items: Sequence[Comparison], *, progress: bool = False) -> list[float]:
        from alignkit.data.prompts import render_prompt

        if self.cot:
            rationales = self._rationales([render_prompt(self.tokenizer, cot_messages(i)) for i in items])
            conversations = [answer_messages(i, r) for i, r in zip(items, rationales)]
        else:
            conversations = [judge_messages(i) for i in items]
        return self.label_probs([render_prompt(self.tokenizer, c) for c in conversations], progress=progress)

    def _rationales(self, prompts: list[str]) -> list[str]:
        from alignkit.generation import SamplingParams, make_engine

        engine = make_engine("hf", model=self.model, tokenizer=self.tokenizer, batch_size=self.batch_size)
        outs = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=self.max_cot_length),
                               progress=False)
        self.tokens += sum(len(samples[0].token_ids) for samples in outs)
        return [samples[0].text for samples in outs]

    def label_probs(self, texts: Sequence[str], *, progress: bool = False) -> list[float]:
        """P(A) after each rendered prompt: batches of similar length, left-padded so that the last position
        of every row is its own last token."""
        import torch
        from tqdm.auto import tqdm

        from alignkit.generation.engine import eos_token_ids, inference_mode, pad_token_id

        encoded = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        order = sorted(range(len(texts)), key=lambda i: -len(encoded[i]))  # longest first: OOM shows at once
        pad = pad_token_id(self.tokenizer, eos_token_ids(self.model, self.tokenizer))
        device = next(self.model.parameters()).device
        ids_a, ids_b = (torch.tensor(ids, device=device) for ids in self.label_ids)
        probs = [math.nan] * len(texts)
        with inference_mode(self.model):
            for start in tqdm(range(0, len(order), self.batch_size), desc="judge", unit="batch",
                              disable=not progress, dynamic_ncols=True):
                chunk = order[start:start + self.batch_size]
                width = max(len(encoded[i]) for i in chunk)
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)  # (B, T)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)  # (B, T)
                for row, i in enumerate(chunk):
                    ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i])
                    mask[row, width - len(encoded[i]):] = 1
                # positions count real tokens only, so a left-padded row is read as if unpadded
                positions = (mask.cumsum(-1) - 1).clamp(min=0)
                logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                                    position_ids=positions.to(device), logits_to_keep=1).logits[:, -1]  # (B, V)
                logps = torch.log_softmax(logits.float(), dim=-1)
                la, lb = logps[:, ids_a].logsumexp(-1), logps[:, ids_b].logsumexp(-1)  # (B,)
                for row, i in enumerate(chunk):
                    probs[i] = two_way(float(la[row]), float(lb[row]))
                self.tokens += int(mask.sum())
        return probs


# -------------------------------------------------------------------------------------------------- HTTP


class HTTPJudge:
    """A :class:`Judge` behind an OpenAI-compatible server (see the module docstring); ``batch_size``
    requests in flight."""

    def __init__(self, base_url: str, model_name: str, *, api: str = "completions", tokenizer: Any = None,
                 batch_size: int = 8, top_logprobs: int = 20, cot: bool = False,
                 cot_clamp: tuple[float, float] = (0.4, 0.6), max_cot_length: int = 256,
                 api_key_env: str = "OPENAI_API_KEY", timeout_s: float = 600.0, max_retries: int = 4,
                 backoff_s: float = 1.0):
        if api == "systemone" and cot:
            raise RecipeError("api: systemone answers without generating text, so it cannot judge with a "
                              "chain of thought; use api: completions or chat, or cot: false", field="judge.cot")
        if api == "completions" and tokenizer is None:
            raise RecipeError("api: completions sends the prompt with the chat template already applied, so it "
                              "needs the judge's tokenizer: set judge.model to the served model's folder or id",
                              field="judge.model")
        self.root, self.model_name, self.api, self.tokenizer = base_url.rstrip("/"), model_name, api, tokenizer
        self.batch_size, self.top_logprobs = batch_size, top_logprobs
        self.cot, self.max_cot_length = cot, max_cot_length
        self.clamp = tuple(cot_clamp) if cot else None
        self._post_options = {"timeout_s": timeout_s, "max_retries": max_retries, "backoff_s": backoff_s}
        self._api_key = os.environ.get(api_key_env) or None  # private: never printed
        self.tokens, self._lock = 0, threading.Lock()

    def __repr__(self) -> str:
        return f"HTTPJudge(root={self.root!r}, model_name={self.model_name!r}, api={self.api!r})"

    def presented(self, items: Sequence[Comparison], *, progress: bool = False) -> list[float]:
        from tqdm.auto import tqdm

        with concurrent.futures.ThreadPoolExecutor(self.batch_size) as pool:
            return list(tqdm(pool.map(self._one, items), total=len(items), desc="judge", unit="pair",
                             disable=not progress, dynamic_ncols=True))

    def _one(self, item: Comparison) -> float:
        if self.api == "systemone":
            return self._systemone(item)
        messages = judge_messages(item)
        if self.cot:
            messages = answer_messages(item, self._ask(cot_messages(item), max_tokens=self.max_cot_length)[0])
        text, top = self._ask(messages, max_tokens=1, logprobs=True)
        if top is None:
            raise GenerationError(
                f"{self.root} sent no log-probs for the judge's answer ({text!r}), so its probabilities cannot be "
                "read; transformers serve ignores `logprobs` (use judge.api: systemone there), vLLM and SGLang "
                "return them")
        return p_from_top_logprobs(top)

    def _ask(self, messages: list[dict[str, str]], *, max_tokens: int,
             logprobs: bool = False) -> tuple[str, dict[str, float] | None]:
        """(generated text, ``{token: logprob}`` of the first position's top list or None) for one turn."""
        body: dict[str, Any] = {"model": self.model_name, "max_tokens": max_tokens, "temperature": 0.0}
        if self.api == "chat":
            body["messages"] = messages
            body.update({"logprobs": True, "top_logprobs": self.top_logprobs} if logprobs else {})
            choice = self._post("/chat/completions", body)["choices"][0]
            entries = ((choice.get("logprobs") or {}).get("content") or [{}])[0].get("top_logprobs")
            top = {e["token"]: float(e["logprob"]) for e in entries} if entries else None
            return (choice.get("message") or {}).get("content") or "", top
        from alignkit.data.prompts import render_prompt

        body["prompt"] = render_prompt(self.tokenizer, messages)
        body.update({"logprobs": self.top_logprobs} if logprobs else {})
        choice = self._post("/completions", body)["choices"][0]
        tops = (choice.get("logprobs") or {}).get("top_logprobs")
        top = {k: float(v) for k, v in tops[0].items()} if tops and tops[0] else None
        return choice.get("text") or "", top

    def _systemone(self, item: Comparison) -> float:
        if item.first == item.second:  # one option twice: the request's criteria would hold a single key
            return 0.5
        question = {"type": "choice", "instructions": item.question.strip(),
                    "criteria": {item.first: None, item.second: None}}
        answer = self._post("/systemone", {"model": self.model_name, "state": state(item),
                                           "questions": {"judge": question}})
        probs = answer["answers"]["judge"]["probabilities"]
        return probs[item.first] / (probs[item.first] + probs[item.second])

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        from alignkit.generation.openai import post_json

        answer = post_json(self.root + path, body, api_key=self._api_key, **self._post_options)
        usage = answer.get("usage") or {}
        with self._lock:
            self.tokens += int(usage.get("total_tokens") or usage.get("input_tokens") or 0)
        return answer


# ---------------------------------------------------------------------------------------- recipe block


class JudgeSpec(Spec):
    """The ``judge:`` block of a stage: which model judges, where it runs, how it answers."""

    RENAMED = {"cot_max_new_tokens": "max_cot_length"}

    backend: Literal["hf", "http"] = Field("hf", description="hf: local weights; http: an OpenAI-compatible "
                                           "server (vLLM, SGLang, transformers serve).")
    model: str | None = Field(None, description="hf: the judge's weights (default: the stage's policy, sharing "
                              "its loaded weights); http: its tokenizer, for api: completions (default: the policy's).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="hf: weights dtype.")
    batch_size: int = Field(8, gt=0, description="hf: sequences per forward; http: requests in flight.")
    cot: bool = Field(False, description="Reason first, then answer (probabilities clamped into cot_clamp).")
    cot_clamp: tuple[float, float] = Field((0.4, 0.6), description="Band CoT probabilities are clamped into "
                                           "(Bai et al.: 0.4-0.6).")
    max_cot_length: int = Field(256, gt=0, description="Longest CoT rationale, in tokens.")
    api: Literal["completions", "chat", "systemone"] = Field(
        "completions", description="http: /completions with logprobs (vLLM, SGLang), /chat/completions with "
        "top_logprobs (OpenAI), or /systemone (transformers serve).")
    base_url: str | None = Field(None, description="http: server root, e.g. http://127.0.0.1:8000/v1.")
    model_name: str | None = Field(None, description="http: the `model` field of each request.")
    top_logprobs: int = Field(20, gt=0, le=20, description="http completions/chat: top tokens asked for.")
    api_key_env: str = Field("OPENAI_API_KEY", description="http: env var holding the API key (optional).")
    timeout_s: float = Field(600.0, gt=0, description="http: per-request timeout.")
    max_retries: int = Field(4, ge=0, description="http: retries on 5xx/429/connection errors.")

    @field_validator("cot_clamp")
    @classmethod
    def _band(cls, band: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 <= band[0] <= 0.5 <= band[1] <= 1.0:
            raise ValueError(f"cot_clamp must be [lo, hi] with 0 <= lo <= 0.5 <= hi <= 1, got {list(band)}")
        return band

    @model_validator(mode="after")
    def _http_needs_server(self) -> JudgeSpec:
        if self.backend == "http" and (self.base_url is None or self.model_name is None):
            raise ValueError("judge.base_url and judge.model_name are required when judge.backend is 'http'")
        if self.backend == "http" and self.api == "systemone" and self.cot:
            raise ValueError("judge.api systemone generates no text, so it cannot judge with cot: true")
        return self


def build_judge(spec: JudgeSpec, *, default_model: str, device: Any = None, loaded: tuple[Any, Any] | None = None,
                quantization: QuantSpec | None = None) -> Judge:
    """The judge ``spec`` describes. ``loaded`` = (model, tokenizer) of ``default_model`` already in memory:
    an hf judge without its own ``model`` reuses them instead of loading a second copy."""
    cot = {"cot": spec.cot, "cot_clamp": spec.cot_clamp, "max_cot_length": spec.max_cot_length,
           "batch_size": spec.batch_size}
    name = spec.model or default_model
    if spec.backend == "hf":
        if loaded is not None and name == default_model:
            return HFJudge(*loaded, **cot)
        return HFJudge.load(name, dtype=spec.dtype, quantization=quantization, device=device, **cot)
    from alignkit.modeling.models import load_tokenizer

    tokenizer = load_tokenizer(name) if spec.api == "completions" else None
    return HTTPJudge(spec.base_url, spec.model_name, api=spec.api, tokenizer=tokenizer,
                     top_logprobs=spec.top_logprobs, api_key_env=spec.api_key_env, timeout_s=spec.timeout_s,
                     max_retries=spec.max_retries, **cot)
