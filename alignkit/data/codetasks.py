"""``source: code``: a small built-in set of Python function tasks with unit tests, written for alignkit.

The ``code`` environment of the RL stages (and the ``rejection`` stage) needs tasks whose answers can be
executed: each row asks for one function and carries its tests, which ``reward/code.py:unit_tests`` runs in
the kernel sandbox. The expected values are computed here by a reference implementation, never typed by hand,
and every test compares with a literal (``assert f(x) == <literal>``), the form the sandbox judges outside
the untrusted process (docs/sandbox.md).

Rows are ``{"prompt": str, "tests": [str, ...]}`` (format ``code``) in the order below; shuffle and limit with
the usual DataSpec fields.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

PROMPT = ("Write a Python function `{signature}` that {task}. Reply with the function in one ```python block, "
          "with no example calls.")


@dataclass(frozen=True)
class Task:
    signature: str  # "add(a, b)"
    task: str  # what it does, completing "Write a Python function `f(x)` that ..."
    reference: Callable[..., Any]
    cases: tuple[tuple[Any, ...], ...]  # argument tuples; each becomes one test

    @property
    def name(self) -> str:
        return self.signature.split("(", 1)[0]

    def row(self) -> dict[str, Any]:
        tests = [f"assert {self.name}({', '.join(map(repr, args))}) == {self.reference(*args)!r}" for args in self.cases]
        return {"prompt": PROMPT.format(signature=self.signature, task=self.task), "tests": tests}


def _is_prime(n: int) -> bool:
    return n > 1 and all(n % d for d in range(2, math.isqrt(n) + 1))


def _fib(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def _collatz(n: int) -> int:
    steps = 0
    while n != 1:
        n = n // 2 if n % 2 == 0 else 3 * n + 1
        steps += 1
    return steps


def _run_length(s: str) -> str:
    out, i = [], 0
    while i < len(s):
        j = i
        while j < len(s) and s[j] == s[i]:
            j += 1
        out.append(f"{s[i]}{j - i}")
        i = j
    return "".join(out)


TASKS: tuple[Task, ...] = (
    Task("add(a, b)", "returns the sum of two integers", lambda a, b: a + b, ((1, 2), (-3, 3), (10, 25))),
    Task("square(n)", "returns n squared", lambda n: n * n, ((0,), (4,), (-7,))),
    Task("is_even(n)", "returns True if the integer n is even and False otherwise", lambda n: n % 2 == 0,
         ((0,), (7,), (-4,), (11,))),
    Task("maximum(xs)", "returns the largest number in a non-empty list without using max()", max,
         (([3, 9, 2],), ([-5, -2, -9],), ([4],))),
    Task("total(xs)", "returns the sum of a list of numbers (0 for an empty list)", sum,
         (([1, 2, 3],), ([],), ([-1, 5, 10],))),
    Task("reverse_string(s)", "returns the string s reversed", lambda s: s[::-1],
         (("abc",), ("",), ("racecar",), ("Hello, World",))),
    Task("count_vowels(s)", "returns how many of the characters of s are vowels (a, e, i, o, u, either case)",
         lambda s: sum(ch in "aeiouAEIOU" for ch in s), (("hello",), ("AEIOU xyz",), ("rhythm",))),
    Task("is_palindrome(s)", "returns True if s reads the same backwards, ignoring case and non-letters",
         lambda s: [c.lower() for c in s if c.isalpha()] == [c.lower() for c in s if c.isalpha()][::-1],
         (("Racecar",), ("A man, a plan, a canal: Panama",), ("hello",))),
    Task("factorial(n)", "returns n! for an integer n >= 0", math.factorial, ((0,), (5,), (10,))),
    Task("fibonacci(n)", "returns the n-th Fibonacci number, with fibonacci(0) == 0 and fibonacci(1) == 1", _fib,
         ((0,), (1,), (10,), (20,))),
    Task("is_prime(n)", "returns True if the integer n is a prime number", _is_prime,
         ((1,), (2,), (15,), (97,), (91,))),
    Task("gcd(a, b)", "returns the greatest common divisor of two positive integers without importing anything",
         math.gcd, ((12, 18), (17, 5), (100, 75))),
    Task("fizzbuzz(n)", "returns 'Fizz' if n is divisible by 3, 'Buzz' if by 5, 'FizzBuzz' if by both, else str(n)",
         lambda n: "FizzBuzz" if n % 15 == 0 else "Fizz" if n % 3 == 0 else "Buzz" if n % 5 == 0 else str(n),
         ((3,), (10,), (30,), (7,))),
    Task("count_words(s)", "returns the number of words in s (words are separated by whitespace)",
         lambda s: len(s.split()), (("the quick brown fox",), ("",), ("  one   two ",))),
    Task("unique_sorted(xs)", "returns the distinct items of a list of integers in increasing order",
         lambda xs: sorted(set(xs)), (([3, 1, 3, 2],), ([],), ([5, 5, 5],))),
    Task("second_largest(xs)", "returns the second largest distinct number in a list with at least two distinct "
         "numbers", lambda xs: sorted(set(xs))[-2], (([1, 2, 3],), ([5, 5, 4],), ([-1, -7, 0, 0],))),
    Task("digit_sum(n)", "returns the sum of the decimal digits of a non-negative integer n",
         lambda n: sum(int(d) for d in str(n)), ((0,), (1234,), (99999,))),
    Task("celsius_to_fahrenheit(c)", "converts a temperature from Celsius to Fahrenheit (F = C * 9 / 5 + 32)",
         lambda c: c * 9 / 5 + 32, ((0,), (100,), (-40,))),
    Task("flatten(xss)", "flattens a list of lists into one list, in order", lambda xss: [x for xs in xss for x in xs],
         (([[1, 2], [3], []],), ([],), ([["a"], ["b", "c"]],))),
    Task("char_counts(s)", "returns a dict mapping each character of s to how many times it occurs",
         lambda s: {ch: s.count(ch) for ch in dict.fromkeys(s)}, (("hello",), ("",), ("aaa",))),
    Task("collatz_steps(n)", "returns how many steps of the Collatz map (n/2 if n is even, else 3n+1) take n to 1",
         _collatz, ((1,), (6,), (27,))),
    Task("run_length(s)", "returns the run-length encoding of s, each run as the character followed by its count "
         "(run_length('aabccc') == 'a2b1c3')", _run_length, (("aabccc",), ("",), ("abc",), ("zzzz",))),
    Task("title_case(s)", "returns s with the first letter of every space-separated word upper-cased and the rest "
         "lower-cased", lambda s: " ".join(w[:1].upper() + w[1:].lower() for w in s.split(" ")),
         (("hello world",), ("PYTHON is FUN",), ("a",))),
    Task("mean(xs)", "returns the arithmetic mean of a non-empty list of numbers", lambda xs: sum(xs) / len(xs),
         (([1, 2, 3, 4],), ([5],), ([-2, 2],))),
)


def rows() -> list[dict[str, Any]]:
    """Every task as a ``code`` row: ``{"prompt", "tests"}``."""
    return [task.row() for task in TASKS]
