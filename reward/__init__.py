"""alignkit's shipped reward programs: a folder of programs, loaded by path, not imported as a package.

In a clone this is the top-level ``reward/``; the wheel carries a copy as ``alignkit/_shipped/reward/`` and
:mod:`alignkit.run.shipped` finds whichever applies (a ``reward/<file>.py`` in the user's folder wins).

Each program is a plain batched function with TRL's reward calling convention,
``fn(completions, **columns) -> list[float | None]``; recipes name them as ``reward/<file>.py:<function>``
and :func:`alignkit.rewards.programs.load_reward` loads them by path:

- ``math.py:answer_match``: final-answer correctness (GSM8K / MATH style), math-verify for LaTeX.
- ``format.py:step_format``: alignkit's step-by-step format, one step per line, ``The answer is N.`` last.
- ``code.py:unit_tests``: fraction of a row's unit tests the completion's code passes, in a sandbox.
"""
