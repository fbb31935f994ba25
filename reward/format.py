"""Format reward for alignkit's step-by-step answers (the format of ``alignkit/data/arith.py`` and SFT data).

The format: one step per non-empty line, then a final line that is exactly ``The answer is <number>.``
(``<number>``: optional minus, digits, optional decimal part; no thousands commas or units, so the math
reward reads it unambiguously), and nothing after it. Lines are compared after stripping surrounding
whitespace; blank lines are ignored.

Scores (partial credit is deliberately coarse, so the policy cannot farm it):

- 1.0: at least one step line, then the exact final line.
- 0.5: the exact final line but no step before it (answers without working).
- 0.0: anything else: no final line, a malformed one (``the answer is 4.``, ``The answer is 4``,
  ``The answer is $4.``), text after it, or a second ``The answer is`` line among the steps (a hedge: two
  answers, the math reward would read only the last).

This reward checks shape only, never correctness: pair it with ``reward/math.py:answer_match``.
"""

from __future__ import annotations

import re
from typing import Any

from alignkit.rewards.values import completion_text

ANSWER_LINE_RE = re.compile(r"The answer is -?\d+(?:\.\d+)?\.")
FULL, ANSWER_ONLY, NONE = 1.0, 0.5, 0.0


def format_score(text: str) -> float:
    """The format score of one completion text (rules in the module docstring).

    >>> format_score("12 + 7 = 19.\\n19 - 5 = 14.\\nThe answer is 14.")
    1.0
    >>> format_score("The answer is 14."), format_score("The answer is 14.\\nHope that helps!")
    (0.5, 0.0)
    """
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines or not ANSWER_LINE_RE.fullmatch(lines[-1]):
        return NONE
    steps = lines[:-1]
    if any(line.lower().startswith("the answer is") for line in steps):
        return NONE
    return FULL if steps else ANSWER_ONLY


def step_format(completions: list, **kwargs: Any) -> list[float]:
    """Format score per completion (strings or conversational message lists); other columns ignored.

    >>> step_format(["2 + 3 = 5.\\nThe answer is 5.", [{"role": "assistant", "content": "The answer is 5."}],
    ...              "The answer is five."])
    [1.0, 0.5, 0.0]
    """
    return [format_score(completion_text(completion)) for completion in completions]
