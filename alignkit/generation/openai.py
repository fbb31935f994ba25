"""Backend for an OpenAI-compatible completions server (vLLM, SGLang, ``transformers serve``).

One ``POST {base_url}/completions`` per prompt (with ``n`` samples), ``batch_size`` requests in flight from
a thread pool; the server batches them. Standard library only (``urllib``).

Mapping onto :class:`~alignkit.generation.engine.Completion`, numbered where it departs from local backends:

1. ``finish_reason``: ``length`` -> ``length``; ``stop`` -> ``stop`` when the server names a stop *string*
   in ``stop_reason`` (vLLM, SGLang), else ``eos`` (a plain OpenAI server does not say which).
2. ``token_ids``: the choice's ``token_ids`` when the server returns them (vLLM with
   ``return_token_ids``, requested when ``request_token_ids=True``); otherwise the text re-tokenized with
   ``tokenizer`` (approximate: no EOS, and BPE merges may differ), or ``[]`` without a tokenizer.
3. ``top_k`` is sent only when set (> 0): it is a vLLM/SGLang extension that OpenAI itself rejects.
4. ``logprobs=0`` asks for the sampled tokens' log-probs only. Servers compute them from their own
   processed or raw logits depending on their settings (vLLM: ``--logprobs-mode``).

The API key is read from the environment variable named by ``api_key_env`` and sent as a bearer token;
it is never logged or put into an error message. 5xx, 429 and connection errors are retried with
exponential backoff (``backoff_s * 2**attempt``); other HTTP errors fail at once.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import time
import urllib.error
import urllib.request
from typing import Any

from alignkit.generation.engine import Completion, GenerationError, Progress, SamplingParams, progress_bar


def request_body(prompt: str | list[int], params: SamplingParams, model_name: str, *, token_ids: bool) -> dict:
    """The JSON body of one ``/completions`` request (a token-id prompt is sent as a list of ids)."""
    body: dict[str, Any] = {
        "model": model_name,
        "prompt": prompt,
        "n": params.n,
        "max_tokens": params.max_new_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
    }
    if params.top_k > 0:
        body["top_k"] = params.top_k
    if params.stop:
        body["stop"] = list(params.stop)
    if params.seed is not None:
        body["seed"] = params.seed
    if params.return_logprobs:
        body["logprobs"] = 0
    if token_ids:
        body["return_token_ids"] = True
    return body


def parse_choice(choice: dict, *, tokenizer: Any, return_logprobs: bool) -> Completion:
    """One response choice -> Completion (see the numbered mapping in the module docstring)."""
    text = choice.get("text") or ""
    reason = choice.get("finish_reason")
    if reason == "length":
        finish = "length"
    elif isinstance(choice.get("stop_reason"), str):
        finish = "stop"
    else:
        finish = "eos"
    if choice.get("token_ids") is not None:
        ids = [int(t) for t in choice["token_ids"]]
    elif tokenizer is not None:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = []
    logprobs = None
    if return_logprobs:
        logprobs = [float(x) for x in ((choice.get("logprobs") or {}).get("token_logprobs") or [])]
    return Completion(text=text, token_ids=ids, finish_reason=finish, logprobs=logprobs)


class OpenAIEngine:
    """:class:`~alignkit.generation.engine.Engine` over HTTP (see the module docstring)."""

    backend = "openai"

    def __init__(
        self,
        base_url: str,
        model_name: str,
        *,
        tokenizer: Any = None,
        batch_size: int = 64,
        api_key_env: str = "OPENAI_API_KEY",
        timeout_s: float = 600.0,
        max_retries: int = 4,
        backoff_s: float = 1.0,
        request_token_ids: bool = False,
    ):
        self.url = base_url.rstrip("/") + "/completions"
        self.model_name, self.tokenizer, self.batch_size = model_name, tokenizer, batch_size
        self.timeout_s, self.max_retries, self.backoff_s = timeout_s, max_retries, backoff_s
        self.request_token_ids = request_token_ids
        self._api_key = os.environ.get(api_key_env) or None  # private: never printed

    def __repr__(self) -> str:
        return f"OpenAIEngine(url={self.url!r}, model_name={self.model_name!r})"

    def generate(
        self, prompts: list[str] | list[list[int]], params: SamplingParams, *, progress: bool | Progress = True
    ) -> list[list[Completion]]:
        """See :class:`~alignkit.generation.engine.Engine`; one request per prompt, ``batch_size`` at a time."""
        results: list[list[Completion]] = [[] for _ in prompts]
        with (
            concurrent.futures.ThreadPoolExecutor(self.batch_size) as pool,
            progress_bar(len(prompts) * params.n, enabled=progress, backend=self.backend) as bar,
        ):
            futures = {pool.submit(self._complete, p, params): i for i, p in enumerate(prompts)}
            try:
                for future in concurrent.futures.as_completed(futures):
                    results[futures[future]] = future.result()
                    bar.update(params.n)
            except BaseException:
                for future in futures:  # do not send the queued requests after a failure
                    future.cancel()
                raise
        return results

    def _complete(self, prompt: str | list[int], params: SamplingParams) -> list[Completion]:
        body = request_body(
            prompt if isinstance(prompt, str) else [int(t) for t in prompt],
            params,
            self.model_name,
            token_ids=self.request_token_ids,
        )
        choices = sorted(self._post(body).get("choices", []), key=lambda c: c.get("index", 0))
        if len(choices) != params.n:
            raise GenerationError(f"{self.url} returned {len(choices)} choices for n={params.n}")
        return [parse_choice(c, tokenizer=self.tokenizer, return_logprobs=params.return_logprobs) for c in choices]

    def _post(self, body: dict) -> dict:
        return post_json(self.url, body, api_key=self._api_key, timeout_s=self.timeout_s,
                         max_retries=self.max_retries, backoff_s=self.backoff_s)


def post_json(url: str, body: dict, *, api_key: str | None = None, timeout_s: float = 600.0, max_retries: int = 4,
              backoff_s: float = 1.0, raw: bool = False) -> Any:
    """POST ``body`` as JSON and return the parsed answer (``raw``: the answer's text, for endpoints that do not
    answer JSON), retrying 5xx/429/connection errors with exponential backoff; raises GenerationError when out of
    attempts or at once on another HTTP error. Shared with :mod:`alignkit.cai.judges` and
    :mod:`alignkit.generation.served_lora`. The API key is sent as a bearer token and never put into a message."""
    data = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    last = ""
    for attempt in range(max_retries + 1):
        if attempt:
            time.sleep(backoff_s * 2 ** (attempt - 1))
        request = urllib.request.Request(url, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                return response.read().decode(errors="replace") if raw else json.load(response)
        except urllib.error.HTTPError as err:
            detail = err.read()[:500].decode(errors="replace")
            last = f"HTTP {err.code}: {detail}"
            if err.code < 500 and err.code != 429:  # our request is wrong: retrying will not help
                raise GenerationError(f"{url} answered {last}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
            last = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
    raise GenerationError(f"{url} failed {max_retries + 1} times; last error: {last}")
