r"""Final-answer correctness for math completions: ``answer_match`` and its pure helpers.

``answer_match(completions, answer)`` scores 1.0 when the completion's final answer equals the gold answer,
0.0 otherwise, and None (skip the sample) when the gold answer is missing. Two steps, both pure functions:

1. :func:`extract_answer` finds the final answer phrase, in this order: the last ``\boxed{...}`` (nested
   braces; if that last box never closes, the generation was cut off mid-answer and there is no answer),
   else the last ``the answer is ...`` /
   ``the final answer is ...`` (case-insensitive; the phrase ends at the line end or at a sentence-ending
   period) or the last ``#### N`` line (GSM8K's own format), whichever comes later, else None. Later wins
   because GSM8K reference solutions write "the final answer is 15 * 8 = 120 pints" and then "#### 120".
2. :func:`is_equivalent` compares the phrase with the gold answer. A plain-number gold needs a phrase that
   :func:`plain_number` reads as one plain number of the same value (compared exactly, as fractions);
   a gold that is an expression (LaTeX, intervals, sets) goes to math-verify, under a timeout.

The rule (each clause has cases in ``tests/data/math_grader_cases.jsonl``):

- **When the gold answer is a plain number, the final answer phrase must state one plain number**: an
  integer, a decimal, ``a/b`` or ``\frac{a}{b}``, after the clean-up below. An equation chain reads as its
  last side (``6 * 3 = 18`` is 18; ``x = 5`` is 5). Anything else scores 0, however close to the gold it
  evaluates: operator expressions (``12 + 7 - 5``, ``3*6``, ``2^3``, ``(12+6)``, ``9 \cdot 2``, ``20 - 2``),
  roots and other LaTeX commands (``\sqrt{324}``), factorials (``5!``: a digit followed by ``!`` is a
  factorial, so ``18!`` is not 18), unary operator words (``18 squared``, ``half of 36``), and several
  numbers however they are separated (``12 7``, ``1 234``, ``17 or 18``, ``17, 18``). Paying for an
  expression lets a policy skip the arithmetic; paying for an operand list or a hedge pays a guess
  (math-verify sums ``12 7`` to 19).
- A fraction whose value is a whole number (``36/2``, ``\frac{4}{2}``) is an unevaluated division, not a
  plain number: whole numbers are written as integers. ``\frac{2}{4}`` for 0.5 is fine.
- Clean-up, which never changes the value: GSM8K calculator annotations (``<<48/2=24>>``), thousands
  commas (``1,234``; ``18,000`` is eighteen thousand), currency (``$``, ``\$``, euro/pound/yen signs),
  markdown (``**18**``, backticks), ``$...$`` math delimiters, ``\text{...}`` wrappers, trailing periods,
  unicode minus, degree signs. Unit words around the number are ignored (``18 dollars``, ``18 cm``,
  ``18 (dollars)``, ``a total of 18 apples``): GSM8K golds are bare numbers and the question fixes the unit.
- Percent: ``18%`` equals 18, not 0.18. GSM8K writes percentage answers as the bare number, so the sign
  is a unit like any other; ``0.18`` for a gold ``18`` scores 0.
- Exact numbers: ``5.00 == 5`` and ``0.5 == 1/2 == \frac{1}{2}``, but a rounded decimal is not its
  fraction (``0.33 != 1/3``): we cannot know what precision the question wanted.
- Golds that are themselves expressions (MATH-style ``\frac{\sqrt{3}}{2}``, ``(x+1)^2``, sets, intervals)
  are compared symbolically by math-verify, under a timeout.
- No "last number in the text" fallback by default. Rewarding any trailing number is reward hacking: a
  policy learns to end with a list of numbers (or the question's own numbers) and gets paid for a guess.
  ``fallback_last_number=True`` restores it for models that were never taught an answer format.
- Number words (``eighteen``) are not read: they score 0.

math-verify's ``parse``/``verify`` time out through ``signal.alarm``, which only works in the main thread;
elsewhere (e.g. a reward run from a worker thread) we call them without a timeout, so inputs longer than
``MAX_MATHVERIFY_CHARS`` or containing towers of powers (``10^{10^{10}}``, which sympy would try to
evaluate) are refused up front. Any error inside scoring gives 0.0 and a logged warning, never an exception.
"""

from __future__ import annotations

import logging
import re
import threading
from fractions import Fraction
from typing import Any

from alignkit.rewards.values import completion_text

logger = logging.getLogger("alignkit.reward.math")

MAX_MATHVERIFY_CHARS = 300
_TRUNCATED = object()  # a final \boxed{ that never closes

_ANSWER_MARKER_RE = re.compile(r"\bthe\s+(?:final\s+)?answer\s+is\b", re.IGNORECASE)
_PHRASE_RE = re.compile(r"\s*:?\s*([^\n]*)")
_HASHES_RE = re.compile(r"####\s*([^\n]*)")
# a period that ends a sentence (followed by space or the end), not a decimal point
_SENTENCE_END_RE = re.compile(r"\.(?=\s|$)")
_NUMBER = r"[-+]?(?:\d{1,3}(?:,\d{3})+(?![\d,])(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
_FRAC = r"[-+]?\\frac\s*(?:\{\s*([-+]?[\d.]+)\s*\}|(\d))\s*(?:\{\s*([-+]?[\d.]+)\s*\}|(\d))"
_NUMBER_TOKEN_RE = re.compile(rf"{_FRAC}|(?<![\w.]){_NUMBER}(?:\s*/\s*{_NUMBER})?(?![\w])")
# what may stand around the one number of a plain answer: words (units, counted nouns), spaces, sentence
# punctuation; a parenthesised unit word (``18 (dollars)``) is dropped first
_UNIT_WORDS_RE = re.compile(r"(?:[A-Za-z]+(?:[-'][A-Za-z]+)*|[\s.,;:?'\"]|-(?=[A-Za-z]))*")
_PAREN_WORDS_RE = re.compile(r"\(\s*(?:[A-Za-z]+(?:[-'. ][A-Za-z]+)*)?\s*\.?\s*\)")
_FACTORIAL_RE = re.compile(r"\d\s*!")
# words that apply an operation to the number beside them: ``18 squared`` does not state 18
_OPERATOR_WORDS = frozenset("squared cubed factorial sqrt root half twice double triple thrice quadruple "
                            "plus minus".split())
_LATEX_COMMAND_RE = re.compile(r"\\[A-Za-z]+")
_TEXT_WRAPPER_RE = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_CALCULATOR_RE = re.compile(r"<<[^<>\n]*>>")
_POWER_TOWER_RE = re.compile(r"\^\s*\{[^}]*\^|\^\s*\d{4,}|\^\s*\{\s*\d{4,}")


def extract_answer(text: str) -> str | None:
    r"""The final answer phrase of a completion, or None when it states none.

    >>> extract_answer(r"so $x = \boxed{\frac{1}{2}}$. The answer is 3.")
    '\\frac{1}{2}'
    >>> extract_answer("3 + 4 = 7. The final answer is: 7 apples. I hope it is correct.")
    '7 apples'
    >>> extract_answer("Natalia sold 48/2 = 24 clips.\n#### 72"), extract_answer("I think 18")
    ('72', None)
    """
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip() if boxed is not _TRUNCATED else None
    markers = list(_ANSWER_MARKER_RE.finditer(text))
    hashes = list(_HASHES_RE.finditer(text))
    if hashes and (not markers or hashes[-1].start() > markers[-1].start()):
        return hashes[-1].group(1).strip()  # a later #### line is the final word (GSM8K reference style)
    if markers:  # the last marker, even if it shares a line with an earlier one
        phrase = _PHRASE_RE.match(text, markers[-1].end()).group(1)
        return _SENTENCE_END_RE.split(phrase, maxsplit=1)[0].strip()
    return None


def _last_boxed(text: str) -> Any:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (balanced braces); None if absent; _TRUNCATED."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    open_at = text.index("{", start)
    depth = 0
    for i in range(open_at, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[open_at + 1 : i]
    return _TRUNCATED  # the generation stopped inside its final box: its answer is unknown


def is_equivalent(predicted: str, gold: str, *, timeout_s: int = 5) -> bool:
    r"""Whether an extracted answer phrase means the gold answer (rules in the module docstring).

    >>> is_equivalent("$1,234.00", "1234"), is_equivalent(r"\frac{1}{2}", "0.5"), is_equivalent("17 or 18", "18")
    (True, True, False)
    >>> is_equivalent("12 + 7 - 5", "14"), is_equivalent("12 7", "19"), is_equivalent("6 * 3 = 18", "18")
    (False, False, True)
    """
    gold_value = _number_phrase(gold, whole_fractions=True)
    if gold_value is not None:  # a plain-number gold: only a plain-number answer can match it
        value = plain_number(predicted)
        return value is not None and value == gold_value
    pred, gold = _clean(predicted), _clean(gold)
    if not pred or not gold:
        return False
    return _math_verify_equal(pred, gold, timeout_s)


def plain_number(phrase: str | None) -> Fraction | None:
    r"""The value of an answer phrase that states one plain number, else None (the rule in the module doc).

    >>> plain_number("**$1,234**"), plain_number("6 * 3 = 18"), plain_number("18 (dollars)")
    (Fraction(1234, 1), Fraction(18, 1), Fraction(18, 1))
    >>> [plain_number(p) for p in ("12 + 7 - 5", "12 7", "5!", r"\sqrt{324}", "36/2", "17 or 18")]
    [None, None, None, None, None, None]
    """
    if phrase is None:
        return None
    return _number_phrase(phrase, whole_fractions=False)


def normalise_answer(predicted: str | None) -> str | None:
    """A canonical string for voting: equal numbers give equal strings (``$18.00`` -> ``18``).

    A phrase with several numbers joined by words or commas (a hedge) gets None: it casts no vote.

    >>> normalise_answer("**$1,234**"), normalise_answer(r"\\frac{2}{4}"), normalise_answer("3 or 4")
    ('1234', '1/2', None)
    """
    if predicted is None:
        return None
    value = plain_number(predicted)
    if value is not None:
        return str(value)
    cleaned = _clean(predicted)
    if not cleaned or _is_hedge(cleaned):
        return None
    return cleaned


def _clean(text: str) -> str:
    """Strip formatting that never changes an answer's value (see the module docstring)."""
    text = text.replace("\u2212", "-").replace("{,}", ",")
    text = _CALCULATOR_RE.sub("", text)  # GSM8K's <<15*8=120>> annotations, which models learn to copy
    for _ in range(3):  # \text{\textbf{x}} nests
        text = _TEXT_WRAPPER_RE.sub(r" \1 ", text)
    for old, new in (("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\left", ""), ("\\right", ""),
                     ("\\!", ""), ("\\,", ""), ("\\;", " "), ("\\%", ""), ("%", ""), ("\\$", ""), ("$", ""),
                     ("^\\circ", ""), ("^{\\circ}", ""), ("\u00b0", ""), ("**", ""), ("__", ""), ("`", "")):
        text = text.replace(old, new)
    text = re.sub(r"[\u20ac\u00a3\u00a5]", "", text)
    text = re.sub(r"(\d)([A-Za-z]{2,})", r"\1 \2", text)  # 18cm -> 18 cm (one letter may be a variable: 2x)
    text = " ".join(text.split()).lstrip(" ,;:*").rstrip(" .,;:*")
    return text if _FACTORIAL_RE.search(text) else text.rstrip(" !")  # "great!" ends a sentence; "5!" does not


def _number_phrase(text: str, *, whole_fractions: bool) -> Fraction | None:
    """The one plain number ``text`` states, else None; ``whole_fractions`` accepts ``36/2`` (gold side)."""
    text = _clean(text)
    if _FACTORIAL_RE.search(text):
        return None
    text = text.rsplit("=", 1)[-1].strip()  # an equation chain states its last side
    tokens = list(_NUMBER_TOKEN_RE.finditer(text))
    if len(tokens) != 1:
        return None
    rest = _PAREN_WORDS_RE.sub(" ", _NUMBER_TOKEN_RE.sub(" ", text))
    words = {w.lower() for w in re.findall(r"[A-Za-z]+", rest)}
    if not _UNIT_WORDS_RE.fullmatch(rest) or words & _OPERATOR_WORDS:
        return None
    value = _token_value(tokens[0])
    is_fraction = "/" in tokens[0].group(0) or "frac" in tokens[0].group(0)
    if value is not None and is_fraction and value.denominator == 1 and not whole_fractions:
        return None  # 36/2 is a division left undone, not the number 18
    return value


def _is_hedge(cleaned: str) -> bool:
    """Several numbers joined by words or commas (``3 apples and 4 pears``, ``17, 18``): no single answer."""
    tokens = list(_NUMBER_TOKEN_RE.finditer(cleaned))
    rest = _LATEX_COMMAND_RE.sub(" ", _NUMBER_TOKEN_RE.sub(" ", cleaned))
    return len(tokens) > 1 and bool(re.search(r"[A-Za-z,;&]", rest))


def _token_value(match: re.Match[str]) -> Fraction | None:
    token = match.group(0).replace(",", "").replace(" ", "")
    try:
        if token.lstrip("+-").startswith("\\frac"):
            sign = -1 if token.startswith("-") else 1
            top, bottom = match.group(1) or match.group(2), match.group(3) or match.group(4)
            return sign * Fraction(top) / Fraction(bottom)
        if "/" in token:
            top, bottom = token.split("/")
            return Fraction(top) / Fraction(bottom)
        return Fraction(token)
    except (ValueError, ZeroDivisionError):
        return None


def _math_verify_equal(pred: str, gold: str, timeout_s: int) -> bool:
    """math-verify equality, with a timeout in the main thread and an input guard everywhere."""
    in_main = threading.current_thread() is threading.main_thread()
    too_big = any(len(s) > MAX_MATHVERIFY_CHARS or _POWER_TOWER_RE.search(s) for s in (pred, gold))
    if too_big:
        logger.warning("answer too long or a tower of powers; not sent to math-verify: %.80r", pred)
        return False
    from math_verify import parse, verify  # lazy: importing sympy costs about a second

    timeout = timeout_s if in_main else None
    try:
        gold_parsed = parse(f"${gold}$", parsing_timeout=timeout)
        pred_parsed = parse(f"${pred}$", parsing_timeout=timeout)
        if not gold_parsed or not pred_parsed:
            return False
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))
    except BaseException as error:  # math-verify's TimeoutException is a BaseException
        if isinstance(error, (KeyboardInterrupt, SystemExit)):
            raise
        logger.warning("math-verify failed on %.80r vs %.80r: %r", pred, gold, error)
        return False


def _gold_text(gold: Any) -> str:
    """A gold answer as text; a full GSM8K solution keeps only what follows its last ``####``."""
    text = str(gold)
    return text.rsplit("####", 1)[-1] if "####" in text else text


def _last_number(text: str) -> str | None:
    numbers = [m.group(0) for m in _NUMBER_TOKEN_RE.finditer(_clean(text))]
    return numbers[-1] if numbers else None


def answer_match(completions: list, answer: list, *, fallback_last_number: bool = False, timeout_s: int = 5,
                 **kwargs: Any) -> list[float | None]:
    r"""1.0 if a completion's final answer equals its row's gold ``answer``, else 0.0; None if no gold.

    ``completions`` are strings or TRL conversational message lists; ``answer`` is the dataset column (a bare
    answer, or a full GSM8K solution ending in ``#### N``). Other columns arrive in ``kwargs`` and are
    ignored. ``fallback_last_number`` scores the text's last number when no answer phrase is found (off: see
    the module docstring). ``timeout_s`` bounds each math-verify call (main thread only).

    >>> answer_match(["2 + 2 = 4. The answer is 4.", [{"role": "assistant", "content": r"\boxed{0.5}"}],
    ...               "I think it is 4", "The answer is 5."], answer=["4", r"\frac{1}{2}", "4", None])
    [1.0, 1.0, 0.0, None]
    """
    scores: list[float | None] = []
    for completion, gold in zip(completions, answer, strict=True):
        if gold is None or not str(gold).strip():
            scores.append(None)  # no label: the sample cannot be scored, so TRL should skip it
            continue
        try:
            text = completion_text(completion)
            predicted = extract_answer(text)
            if predicted is None and fallback_last_number:
                predicted = _last_number(text)
            scores.append(float(predicted is not None and is_equivalent(predicted, _gold_text(gold),
                                                                        timeout_s=timeout_s)))
        except Exception as error:  # a reward must never take the trainer down
            logger.warning("answer_match: scoring failed, 0.0 given: %r", error)
            scores.append(0.0)
    return scores


def _answer_match_feedback(completions: list, answer: list, *, fallback_last_number: bool = False,
                           timeout_s: int = 5, **kwargs: Any) -> list[str | None]:
    """Why ``answer_match`` did not pay, for a revision request (the ``rejection`` stage): no final answer
    found, or the one found was not right. The gold answer is never said. None where it paid or had no gold.

    >>> answer_match.feedback(["The answer is 4.", "I think it is 4", "The answer is 5."], answer=["4"] * 3)
    [None, 'No final answer was found: end with a line "The answer is N." stating one number.', 'The final answer 5 is not correct.']
    """
    scores = answer_match(completions, answer, fallback_last_number=fallback_last_number, timeout_s=timeout_s)
    notes: list[str | None] = []
    for completion, score in zip(completions, scores, strict=True):
        if score is None or score > 0:
            notes.append(None)
            continue
        predicted = extract_answer(completion_text(completion))
        notes.append('No final answer was found: end with a line "The answer is N." stating one number.'
                     if predicted is None else f"The final answer {predicted} is not correct.")
    return notes


answer_match.feedback = _answer_match_feedback  # read by the rejection stage's revision requests
