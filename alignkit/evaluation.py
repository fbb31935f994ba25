"""Quick accuracy checks that training stages report before and after they train.

The full evaluation suites (pass@k, majority vote, best-of-N by verifiers, plots) live in the eval stage;
this module is the small shared piece: greedy exact-match accuracy on held-out problems.
"""

from __future__ import annotations

from typing import Any

from .prompts import render_prompt

MATH_REWARD = "reward/math.py:answer_match"


def greedy_accuracy(model: Any, tokenizer: Any, problems: Any, *, max_new_tokens: int = 128,
                    batch_size: int = 32, chat: bool = True, progress: bool = True,
                    backend: str = "hf") -> dict[str, Any]:
    """Exact-match accuracy of greedy answers on ``problems`` (rows with ``prompt`` and ``answer``).

    Returns ``{"accuracy": float, "n": int, "samples": [{prompt, completion, answer, correct}]}``.
    """
    from .generation import SamplingParams, make_engine
    from .rewards import call_reward, load_reward

    answer_match = load_reward(MATH_REWARD)
    prompts = [render_prompt(tokenizer, row["prompt"], chat=chat) for row in problems]
    engine = make_engine(backend, model=model, tokenizer=tokenizer, batch_size=batch_size)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, n=1)
    was_training = model.training
    model.eval()
    try:
        outputs = engine.generate(prompts, params, progress=progress)
    finally:
        model.train(was_training)
    completions = [samples[0].text for samples in outputs]
    answers = [row["answer"] for row in problems]
    scores = call_reward(answer_match, MATH_REWARD, completions, {"answer": answers})  # bool(nan) would be True
    samples = [
        {"prompt": row["prompt"], "completion": text, "answer": gold, "correct": bool(score)}
        for row, text, gold, score in zip(problems, completions, answers, scores)
    ]
    accuracy = sum(bool(s) for s in scores) / max(len(scores), 1)
    return {"accuracy": accuracy, "n": len(samples), "samples": samples}
