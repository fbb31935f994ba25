"""Quick accuracy checks that training stages report before and after they train.

The full evaluation suites (pass@k, majority vote, best-of-N by verifiers, plots) live in the eval stage;
this module is the small shared piece: greedy exact-match accuracy on held-out problems.
"""

from __future__ import annotations

from typing import Any

from alignkit.data.prompts import render_prompt
from alignkit.generation.spec import FastSpec, HFSpec

MATH_REWARD = "reward/math.py:answer_match"


def greedy_accuracy(model: Any, tokenizer: Any, problems: Any, *, max_new_tokens: int = 128, chat: bool = True,
                    progress: bool = True, generation: HFSpec | FastSpec | None = None) -> dict[str, Any]:
    """Exact-match accuracy of greedy answers on ``problems`` (rows with ``prompt`` and ``answer``), sampled
    from ``model`` with the engine ``generation`` describes (default: ``hf``, 32 rows at a time).

    Returns ``{"accuracy": float, "n": int, "samples": [{prompt, completion, answer, correct}]}``.
    """
    from tqdm.auto import tqdm

    from alignkit.generation import SamplingParams
    from alignkit.rewards.programs import load_reward
    from alignkit.rewards.values import call_reward

    answer_match = load_reward(MATH_REWARD)
    prompts = [render_prompt(tokenizer, row["prompt"], chat=chat) for row in problems]
    engine = (generation or HFSpec(batch_size=32)).build(model=model, tokenizer=tokenizer)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, n=1)
    was_training = model.training
    model.eval()
    try:  # the engine advances the bar per answered problem, as each greedy answer ends (not per batch)
        with tqdm(total=len(prompts), unit="problem", desc="greedy accuracy", disable=not progress,
                  dynamic_ncols=True, smoothing=0) as bar:
            outputs = engine.generate(prompts, params, progress=bar)
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
