"""Adapters: convert one row of a public dataset into alignkit's native records.

Each adapter is a pure function ``row -> list of records`` (usually one) plus a description of the columns
it reads, the formats its records can be viewed as, and where its data lives on the Hub. Rows a public
dataset is known to contain but that cannot be used (an HH transcript whose two sides have different
prompts, a Math-Shepherd row whose question swallowed a step tag) raise :class:`SkipRow`: the loader
counts and logs them instead of failing the run. A row that is structurally wrong (a missing ``####``,
non-list steps) raises :class:`DataError`, which the loader prefixes with the row index.

Departures from the reference conversions (TRL ``examples/datasets/{math_shepherd,prm800k}.py``):

1. prm800k: one row per labelled solution, following the chosen completion at each step; the unchosen
   alternatives TRL expands into extra rows are added only with ``params.alternatives: true``.
2. prm800k ``neutral: drop`` cuts a solution before its first neutral (0) step instead of deleting that
   step, because later steps were written in the context of the neutral one.
3. hh: consecutive turns of the same speaker in the prompt are merged (a few transcripts have them) so that
   strict chat templates, which demand alternating roles, accept every prompt.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Literal

from pydantic import Field, ValidationError

from alignkit.core.config import Spec
from alignkit.core.errors import DataError


class SkipRow(Exception):
    """A known-unusable row of a public dataset; ``str(err)`` is the reason, used to count skips."""


@dataclass(frozen=True)
class Adapter:
    """How to read one dataset family."""

    name: str
    needs: tuple[tuple[str, ...], ...]  # acceptable input column sets (any one of them)
    formats: tuple[str, ...]  # formats its records can be viewed as
    convert: Callable[[dict[str, Any], Any], list[dict[str, Any]]]  # (row, params) -> records
    hub: tuple[str, str | None] | None = None  # (dataset id, config) used when `path:` is not given
    params: type[Spec] | None = None  # schema of `params:`; None means params must be empty


# ---------------------------------------------------------------- gsm8k

_CALC_RE = re.compile(r"<<[^<>]*>>")


def parse_gsm8k_answer(text: str) -> tuple[list[str], str]:
    """GSM8K's answer field -> (steps, gold answer).

    Steps are the non-empty lines before ``####`` with calculator annotations ``<<48/2=24>>`` removed; the
    gold answer is the text after ``####`` without commas (the normalisation of the GSM8K paper's eval).

    >>> parse_gsm8k_answer("She sold 48/2 = <<48/2=24>>24 clips.\\n\\n#### 1,024")
    (['She sold 48/2 = 24 clips.'], '1024')
    """
    if "####" not in text:
        raise DataError("gsm8k: 'answer' has no '#### N' final line")
    body, _, final = text.rpartition("####")
    steps = [line.strip() for line in _CALC_RE.sub("", body).split("\n") if line.strip()]
    answer = final.strip().replace(",", "")
    if not answer:
        raise DataError("gsm8k: nothing after '####'")
    return steps, answer


def gsm8k_row(row: dict[str, Any], params: Any = None) -> list[dict[str, Any]]:
    """{question, answer} -> a problems record (prompt, steps, answer, completion in our format)."""
    if not isinstance(row["question"], str) or not isinstance(row["answer"], str):
        raise DataError("gsm8k: 'question' and 'answer' must be strings")
    steps, answer = parse_gsm8k_answer(row["answer"])
    completion = "\n".join(steps + [f"The answer is {answer}."])
    return [{"prompt": row["question"].strip(), "steps": steps, "answer": answer, "completion": completion}]


# ---------------------------------------------------------------- hh

_TURN_RE = re.compile(r"\n\n(Human|Assistant):")
_ROLES = {"Human": "user", "Assistant": "assistant"}


def split_transcript(text: str) -> list[dict[str, str]]:
    """An HH transcript ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` -> messages (role user/assistant).

    >>> split_transcript("\\n\\nHuman: Hi\\n\\nAssistant: Hello!")
    [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello!'}]
    """
    parts = _TURN_RE.split(text)
    if parts[0].strip():
        raise SkipRow("text before the first 'Human:' turn")
    return [{"role": _ROLES[who], "content": said.strip()} for who, said in zip(parts[1::2], parts[2::2])]


def _merge_same_speaker(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    merged: list[dict[str, str]] = []
    for m in messages:
        if merged and merged[-1]["role"] == m["role"]:
            merged[-1] = {"role": m["role"], "content": f"{merged[-1]['content']}\n\n{m['content']}"}
        else:
            merged.append(dict(m))
    return merged


def _prompt_and_reply(text: str) -> tuple[list[dict[str, str]], dict[str, str]]:
    messages = split_transcript(text)
    if not messages or messages[-1]["role"] != "assistant":
        raise SkipRow("transcript does not end with an Assistant turn")
    if not messages[-1]["content"]:
        raise SkipRow("empty final Assistant turn")
    prompt = _merge_same_speaker(messages[:-1])
    if not prompt or prompt[-1]["role"] != "user":
        raise SkipRow("final Assistant turn does not answer a Human turn")
    return prompt, messages[-1]


def hh_row(row: dict[str, Any], params: Any = None) -> list[dict[str, Any]]:
    """{chosen, rejected} transcripts -> a conversational preference record."""
    if not isinstance(row["chosen"], str) or not isinstance(row["rejected"], str):
        raise DataError("hh: 'chosen' and 'rejected' must be transcript strings")
    prompt, chosen = _prompt_and_reply(row["chosen"])
    other_prompt, rejected = _prompt_and_reply(row["rejected"])
    if prompt != other_prompt:
        raise SkipRow("chosen and rejected transcripts have different prompts")
    return [{"prompt": prompt, "chosen": [chosen], "rejected": [rejected]}]


# ---------------------------------------------------------------- math-shepherd

STEP_TAG = "ки"
_FIRST_STEP_RE = re.compile(r"[Ss]tep 1:")


def parse_math_shepherd(text: str, label: str) -> dict[str, Any]:
    """Math-Shepherd ``input``/``label`` -> {prompt, completions, labels}.

    ``input`` is the question then the solution, each step ending in the tag ``ки``; ``label`` is the same
    text with ``+`` (step leads to the right answer) or ``-`` in place of each tag. The question ends where
    ``Step 1:`` begins.

    >>> text = "Q? Step 1: 1+1=2 ки\\nStep 2: The answer is 3 ки"
    >>> parse_math_shepherd(text, text.replace("2 ки", "2 +").replace("3 ки", "3 -"))
    {'prompt': 'Q?', 'completions': ['Step 1: 1+1=2', 'Step 2: The answer is 3'], 'labels': [True, False]}
    """
    segments = text.split(STEP_TAG)
    labels, pos = [], 0
    for seg in segments[:-1]:  # the text after the last tag carries no label
        tag = label[pos + len(seg): pos + len(seg) + 1]
        if label[pos: pos + len(seg)] != seg or tag not in ("+", "-"):
            raise DataError(f"math-shepherd: 'label' does not match 'input' at step {len(labels) + 1}")
        labels.append(tag == "+")
        pos += len(seg) + 1
    if not labels:
        raise DataError(f"math-shepherd: no step tag {STEP_TAG!r} in 'input'")
    first = _FIRST_STEP_RE.search(segments[0])
    if first is None:
        raise SkipRow("no 'Step 1:' separating the question from the solution")
    steps = [segments[0][first.start():]] + segments[1:-1]
    return {
        "prompt": segments[0][: first.start()].strip(),
        "completions": [s.strip() for s in steps],
        "labels": labels,
    }


def math_shepherd_row(row: dict[str, Any], params: Any = None) -> list[dict[str, Any]]:
    """{input, label} -> a stepwise record."""
    if not isinstance(row["input"], str) or not isinstance(row["label"], str):
        raise DataError("math-shepherd: 'input' and 'label' must be strings")
    return [parse_math_shepherd(row["input"], row["label"])]


# ---------------------------------------------------------------- prm800k


class Prm800kParams(Spec):
    """``params:`` of the prm800k adapter."""

    neutral: Literal["positive", "negative", "drop"] = Field(
        "negative", description="Label of a neutral (0) step; drop cuts the solution before it."
    )
    alternatives: bool = Field(False, description="Also emit a row per unchosen rated alternative step.")


def rated_steps(
    prompt: str, steps: list[tuple[str, int | None]], neutral: str
) -> dict[str, Any] | None:
    """(text, rating) steps -> a stepwise record; ratings +1 good, -1 bad, 0 neutral, None human-written.

    Returns None when nothing is left (``neutral: drop`` and the first step is neutral).

    >>> rated_steps("Q", [("a", 1), ("b", 0), ("c", -1)], "positive")["labels"]
    [True, True, False]
    >>> rated_steps("Q", [("a", 1), ("b", 0), ("c", -1)], "drop")["labels"]
    [True]
    """
    texts, labels = [], []
    for text, rating in steps:
        if rating not in (-1, 0, 1, None):
            raise DataError(f"prm800k: ratings must be -1, 0 or 1, got {rating!r}")
        if rating == 0 and neutral == "drop":
            break
        texts.append(text)
        labels.append(rating in (1, None) or (rating == 0 and neutral == "positive"))
    return {"prompt": prompt, "completions": texts, "labels": labels} if texts else None


def _trajectories(label: dict[str, Any], alternatives: bool) -> list[list[tuple[str, int | None]]]:
    """Walk PRM800K's ``label.steps``: the chosen path, plus (optionally) each unchosen alternative."""
    path: list[tuple[str, int | None]] = []
    extra: list[list[tuple[str, int | None]]] = []
    for step in label.get("steps") or []:
        completions, chosen = step.get("completions") or [], step.get("chosen_completion")
        if alternatives:
            extra += [path + [(c["text"], c["rating"])] for i, c in enumerate(completions) if i != chosen]
        if chosen is not None:
            path.append((completions[chosen]["text"], completions[chosen]["rating"]))
        elif step.get("human_completion"):
            path.append((step["human_completion"]["text"], None))
        else:  # labelling stopped here: the first (rated) completion ends the solution
            if completions and not alternatives:
                path.append((completions[0]["text"], completions[0]["rating"]))
            break
    return [path] + extra


def prm800k_row(row: dict[str, Any], params: Prm800kParams) -> list[dict[str, Any]]:
    """PRM800K's nested rows ({question: {problem}, label: {steps}}) or flat rows ({prompt, steps,
    ratings}, or steps as [{text, rating}]) -> stepwise records."""
    if "question" in row and isinstance(row.get("label"), dict):
        try:
            prompt = row["question"]["problem"]
            paths = _trajectories(row["label"], params.alternatives)
        except (KeyError, TypeError, IndexError) as err:
            raise DataError(f"prm800k: malformed 'label.steps' ({err!r})") from None
    else:
        prompt, steps = row.get("prompt"), row.get("steps")
        inline = [s.get("rating") if isinstance(s, dict) else None for s in steps or []]
        ratings = row.get("ratings") or inline
        if not isinstance(steps, list) or len(ratings) != len(steps):
            raise DataError("prm800k: 'steps' must be a list with one rating per step ('ratings' column)")
        paths = [[(s["text"] if isinstance(s, dict) else s, r) for s, r in zip(steps, ratings)]]
    records = [rated_steps(prompt, path, params.neutral) for path in paths if path]
    return [r for r in records if r is not None]


# ---------------------------------------------------------------- registry and detection

ADAPTERS: dict[str, Adapter] = {
    "gsm8k": Adapter("gsm8k", (("question", "answer"),), ("sft", "problems", "text", "prompts"), gsm8k_row,
                     hub=("openai/gsm8k", "main")),
    # prompts: the conversation before the final reply (the requests Constitutional AI answers and revises)
    "hh": Adapter("hh", (("chosen", "rejected"),), ("preference", "prompts"), hh_row,
                  hub=("Anthropic/hh-rlhf", None)),
    "math-shepherd": Adapter("math-shepherd", (("input", "label"),), ("stepwise",), math_shepherd_row,
                             hub=("peiyi9979/Math-Shepherd", None)),
    # PRM800K is published on GitHub, not the Hub: `path:` is required.
    "prm800k": Adapter("prm800k", (("question", "label"), ("prompt", "steps")), ("stepwise",), prm800k_row,
                       params=Prm800kParams),
}


def detect(columns: list[str], first: dict[str, Any]) -> str:
    """The adapter ``auto`` picks for a dataset with these columns and first row ("none": take as is)."""
    cols = set(columns)
    if {"question", "answer"} <= cols and "####" in str(first["answer"]):
        return "gsm8k"
    if {"chosen", "rejected"} <= cols and "Human:" in str(first["chosen"]):
        return "hh"
    if {"input", "label"} <= cols and STEP_TAG in str(first["input"]):
        return "math-shepherd"
    if {"question", "label"} <= cols and isinstance(first["label"], dict) and "steps" in first["label"]:
        return "prm800k"
    if {"prompt", "steps", "ratings"} <= cols:
        return "prm800k"
    return "none"


def adapter_params(adapter: Adapter, params: dict[str, Any]) -> Any:
    """Validate ``params:`` against the adapter's schema, raising DataError naming the bad field."""
    if adapter.params is None:
        if params:
            raise DataError(f"{adapter.name}: takes no params, got {sorted(params)}")
        return None
    try:
        return adapter.params(**params)
    except ValidationError as err:
        problems = "; ".join(f"params.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise DataError(f"{adapter.name}: invalid params: {problems}") from None
