"""The canonical formats every stage relies on, and the per-row check that a record fits one.

=============  =============================================================================================
format         columns
=============  =============================================================================================
``sft``        ``prompt``, ``completion``: strings (or, from a generic file, TRL conversational message lists);
               or ``messages`` alone: a whole conversation (TRL's conversational language-modeling form),
               trained on its assistant turns only
``problems``   ``prompt`` (str), ``answer`` (str, normalised: no commas), ``steps`` (list[str], may be
               empty); arith adds ``values`` (list[int], running value after each step)
``preference`` ``prompt``, ``chosen``, ``rejected``: strings, or TRL's conversational form (HH): prompt a
               list of {role, content} messages, chosen/rejected ``[{"role": "assistant", ...}]``; without
               ``prompt``, chosen/rejected are whole conversations and their shared first turns are the prompt
               (TRL's implicit-prompt form, split with ``trl.data_utils.extract_prompt``)
``stepwise``   ``prompt`` (str), ``completions`` (list[str]), ``labels`` (list[bool]), optional
               ``soft_labels`` (list[float] in [0, 1]): TRL's stepwise supervision format
``text``       ``text`` (str)
``code``       ``prompt`` (str), ``tests``: a string of Python (each top-level ``assert`` one test) or a list of
               strings (one test each), run by ``reward/code.py:unit_tests``
``prompts``    ``prompt``: a string or a message list (requests to answer: red-team prompts, HH prompts); or
               implicit-prompt preference rows, whose shared first turns are the prompt
=============  =============================================================================================

Only these columns are kept: extra columns would make TRL guess differently (e.g. a stray ``text`` column
next to prompt/completion changes what SFTTrainer trains on).
"""

from __future__ import annotations

from typing import Any

from alignkit.core.errors import DataError

# format -> (required columns, optional columns kept when present)
FORMATS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "sft": (("prompt", "completion"), ()),
    "problems": (("prompt", "answer"), ("steps", "values")),
    "preference": (("prompt", "chosen", "rejected"), ()),
    "stepwise": (("prompt", "completions", "labels"), ("soft_labels",)),
    "text": (("text",), ()),
    "prompts": (("prompt",), ()),
    "code": (("prompt", "tests"), ()),
}


# formats whose Dataset columns have fixed types (:func:`features`; the others' are inferred), and those types:
# an Arrow type name, or a one-item list for a list of that type
TYPED_FORMATS = ("problems", "stepwise", "text")
COLUMN_TYPES: dict[str, str | list[str]] = {
    "prompt": "string", "answer": "string", "steps": ["string"], "values": ["int64"], "completions": ["string"],
    "labels": ["bool"], "soft_labels": ["float64"], "text": "string",
}


def check_format(fmt: str) -> None:
    """DataError unless ``fmt`` is a known format."""
    if fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r}; expected one of {sorted(FORMATS)}")


def normalise_answer(answer: Any) -> str:
    """A gold answer as a string without thousands separators or surrounding space.

    >>> normalise_answer("1,234"), normalise_answer(5), normalise_answer(2.0), normalise_answer(" -2.5 ")
    ('1234', '5', '2', '-2.5')
    """
    if isinstance(answer, float) and answer.is_integer():
        answer = int(answer)
    return str(answer).replace(",", "").strip()


def missing_columns(columns: list[str], fmt: str) -> list[str]:
    """Columns ``fmt`` needs that ``columns`` lacks (``text`` can be built from prompt + completion, ``sft``
    can be a ``messages`` conversation, a preference or prompt can be implicit in ``chosen``/``rejected``)."""
    required = FORMATS[fmt][0]
    if fmt == "text" and "text" not in columns and {"prompt", "completion"} <= set(columns):
        return []
    if fmt == "sft" and "messages" in columns and "completion" not in columns:
        return []
    if fmt in ("preference", "prompts") and "prompt" not in columns and {"chosen", "rejected"} <= set(columns):
        return []
    return [c for c in required if c not in columns]


def _is_messages(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in value)
    )


def _text_or_messages(row: dict[str, Any], column: str) -> str | None:
    """Problem with a column that must be a non-empty string or a message list; None if fine."""
    value = row[column]
    if isinstance(value, str) and value.strip():
        return None
    if _is_messages(value):
        return None
    return (
        f"column {column!r} must be a non-empty string or a list of {{role, content}} messages, "
        f"got {value!r:.80}"
    )


def _conversation(record: dict[str, Any]) -> str | None:
    """Problem with a ``messages`` conversation (a message list with at least one assistant turn); None if fine."""
    value = record["messages"]
    if not _is_messages(value):
        return f"column 'messages' must be a non-empty list of {{role, content}} messages, got {value!r:.80}"
    if not any(m["role"] == "assistant" and m["content"].strip() for m in value):
        return "column 'messages' has no non-empty assistant turn to train on"
    return None


def _implicit_prompt(record: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """An implicit-prompt preference record (chosen/rejected whole conversations) -> (explicit record, None),
    or (None, problem). The prompt is the turns both conversations share (:func:`extract_prompt`, TRL's rule)."""
    chosen, rejected = record["chosen"], record["rejected"]
    if not (_is_messages(chosen) and _is_messages(rejected)):
        return None, ("without a 'prompt' column, 'chosen' and 'rejected' must both be whole conversations "
                      f"(lists of {{role, content}} messages), got {chosen!r:.60} / {rejected!r:.60}")
    split = extract_prompt({"chosen": chosen, "rejected": rejected})
    if not split["prompt"]:
        return None, "'chosen' and 'rejected' share no first turns, so there is no prompt to extract"
    if not split["chosen"] or not split["rejected"] or split["chosen"] == split["rejected"]:
        return None, "'chosen' and 'rejected' are the same conversation (no differing reply after the shared prompt)"
    return {**record, **split}, None


def extract_prompt(example: dict[str, list]) -> dict[str, list]:
    """Split an implicit-prompt preference row as TRL does (``trl.data_utils.extract_prompt``): the prompt is
    what ``chosen`` and ``rejected`` (two conversations, or two texts) share before they first differ.

    Two details of TRL's rule are kept, so that a row split here is the row TRL would train on: when one
    reply is a prefix of the other, the last shared item stays with the replies (so neither reply is empty),
    and in text a space just before the difference goes with the replies. Written here rather than imported
    because importing ``trl`` takes seconds and ``--dry-run`` checks these rows without it;
    tests/test_dry_run_speed.py checks that the two agree.

    >>> user, blue, green = [{"role": r, "content": c} for r, c in
    ...                      [("user", "Sky?"), ("assistant", "Blue."), ("assistant", "Green.")]]
    >>> extract_prompt({"chosen": [user, blue], "rejected": [user, green]})["prompt"] == [user]
    True
    >>> extract_prompt({"chosen": "Sky? Blue.", "rejected": "Sky? Green."})["chosen"]
    ' Blue.'
    """
    chosen, rejected = example["chosen"], example["rejected"]
    shared = min(len(chosen), len(rejected))
    first_difference = next((i for i in range(shared) if chosen[i] != rejected[i]), None)
    if first_difference is None:
        cut = shared - 1
    elif first_difference > 0 and chosen[first_difference - 1] == " ":
        cut = first_difference - 1
    else:
        cut = first_difference
    return {"prompt": chosen[:cut], "chosen": chosen[cut:], "rejected": rejected[cut:]}


def _string(row: dict[str, Any], column: str) -> str | None:
    value = row[column]
    if isinstance(value, str) and value.strip():
        return None
    return f"column {column!r} must be a non-empty string, got {value!r:.80}"


def _coerce_labels(value: Any) -> list[bool] | None:
    """Booleans (0/1 accepted) or None if ``value`` is not such a list."""
    if not isinstance(value, list) or not all(isinstance(v, bool) or v in (0, 1) for v in value):
        return None
    return [bool(v) for v in value]


def _tests(row: dict[str, Any]) -> str | None:
    tests = row["tests"]
    if isinstance(tests, str) and tests.strip():
        return None
    if isinstance(tests, list) and tests and all(isinstance(t, str) and t.strip() for t in tests):
        return None
    return f"column 'tests' must be Python test code (a string, or a non-empty list of strings), got {tests!r:.80}"


def _stepwise(row: dict[str, Any]) -> str | None:
    steps, labels = row["completions"], _coerce_labels(row["labels"])
    if not isinstance(steps, list) or not steps or not all(isinstance(s, str) for s in steps):
        return f"column 'completions' must be a non-empty list of strings, got {steps!r:.80}"
    if labels is None or len(labels) != len(steps):
        return f"column 'labels' must be {len(steps)} booleans (one per step), got {row['labels']!r:.80}"
    row["labels"] = labels
    soft = row.get("soft_labels")
    if soft is not None and (
        not isinstance(soft, list) or len(soft) != len(steps)
        or not all(isinstance(v, (int, float)) and 0.0 <= v <= 1.0 for v in soft)
    ):
        return f"column 'soft_labels' must be {len(steps)} floats in [0, 1], got {soft!r:.80}"
    if soft is not None:
        row["soft_labels"] = [float(v) for v in soft]
    return None


def _problems(row: dict[str, Any]) -> str | None:
    steps = row.get("steps")
    if steps is None:
        row["steps"] = []
    elif not isinstance(steps, list) or not all(isinstance(s, str) for s in steps):
        return f"column 'steps' must be a list of strings, got {steps!r:.80}"
    if row["answer"] is None or normalise_answer(row["answer"]) == "":
        return f"column 'answer' must be a non-empty answer, got {row['answer']!r}"
    row["answer"] = normalise_answer(row["answer"])
    return _string(row, "prompt")


def to_format(record: dict[str, Any], fmt: str, where: str) -> dict[str, Any]:
    """Project a record onto ``fmt``'s columns and check their types; DataError naming ``where`` if bad.

    ``where`` names the row for the message (``"row 17 of train.jsonl"``). Missing columns are checked
    once per dataset by :func:`missing_columns` before rows are converted.
    """
    required, optional = FORMATS[fmt]
    if fmt == "text" and "text" not in record:
        record = {"text": f"{record['prompt']}\n{record['completion']}"}
    if fmt == "sft" and "messages" in record and "completion" not in record:  # a stray `prompt` (ultrachat) is dropped
        problem = _conversation(record)
        if problem:
            raise DataError(f"{where}: {problem} (format {fmt!r})")
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in record["messages"]]}
    if fmt in ("preference", "prompts") and "prompt" not in record and "chosen" in record and "rejected" in record:
        record, problem = _implicit_prompt(record)
        if problem:
            raise DataError(f"{where}: {problem} (format {fmt!r})")
    elif fmt == "preference" and isinstance(record.get("prompt"), str) and _is_messages(record["chosen"]):
        # a string prompt next to whole conversations (UltraFeedback-binarized): the conversations' shared turns
        # are the prompt, as TRL's maybe_extract_prompt does; replies-only conversations keep the string prompt
        explicit, _ = _implicit_prompt(record)
        if explicit is not None:
            record = explicit
    row = {c: record[c] for c in required}
    row.update({c: record[c] for c in optional if record.get(c) is not None})
    if fmt == "sft":
        problem = _text_or_messages(row, "prompt") or _text_or_messages(row, "completion")
    elif fmt == "preference":
        problem = next((p for c in required if (p := _text_or_messages(row, c))), None)
    elif fmt == "stepwise":
        problem = _string(row, "prompt") or _stepwise(row)
    elif fmt == "prompts":
        problem = _text_or_messages(row, "prompt")
    elif fmt == "problems":
        problem = _problems(row)
    elif fmt == "code":
        problem = _string(row, "prompt") or _tests(row)
    else:
        problem = _string(row, "text")
    if problem:
        raise DataError(f"{where}: {problem} (format {fmt!r})")
    return row


def features(fmt: str, columns: list[str]):
    """datasets Features for the typed formats (so empty lists keep their type), else None (inferred)."""
    if fmt not in TYPED_FORMATS:
        return None
    from datasets import Features, List, Value  # here, not at the top: it takes seconds, and is needed only now

    def feature(kind: str | list[str]):
        return List(Value(kind[0])) if isinstance(kind, list) else Value(kind)

    return Features({c: feature(COLUMN_TYPES[c]) for c in columns})
