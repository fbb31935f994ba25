"""Does the policy itself know which arith steps are wrong? A zero-training baseline for bench/prm_best_of_n.py.

Scores every sample of the best-of-N bench's ``<out>_samples.jsonl`` by the SFT policy's own probability of
what each step wrote as its result: ``log P(result tokens | everything before them)`` for the number after
the last ``= `` of an operation step or after ``answer is`` of the answer line, and a solution by the minimum
over its steps. Then reports, on the same pool and with the same functions as the bench, the within-problem
pairwise ranking, best-of-N and the step-level gap. Arith-specific (it reads the results as numbers); it
tells whether a PRM's failure to rank a problem's solutions is for want of the knowledge in the backbone or
of the training signal.

    python bench/result_likelihood.py --samples runs/math-shepherd/bench_best_of_n_samples.jsonl \
        --policy runs/math-shepherd/sft/model

``--span line --within min`` scores each step by its least likely token instead, which needs no knowledge
of arith's format: the zero-training form a likelihood-based PRM head would start from.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import time

import torch

from alignkit.maths.selection import Pool, pairwise_ranking, selection_curve
from alignkit.modeling.models import load_model, load_tokenizer
from alignkit.data.prompts import render_prompt
from alignkit.rewards.programs import load_reward

RESULT = re.compile(r"(?:= |answer is )(-?\d+)")


def line_spans(text: str, offset: int) -> list[tuple[int, int]]:
    """Character spans (in prompt + text) of each non-blank line: the whole step, nothing arith-specific."""
    spans, start = [], 0
    for line in text.split("\n"):
        if line.strip():
            spans.append((offset + start, offset + start + len(line)))
        start += len(line) + 1
    return spans


def result_spans(text: str, offset: int) -> list[tuple[int, int]]:
    """Character spans (in prompt + text) of each non-blank line's last written result."""
    spans = []
    for start, stop in line_spans(text, offset):
        found = list(RESULT.finditer(text, start - offset, stop - offset))
        if found:
            spans.append((offset + found[-1].start(1), offset + found[-1].end(1)))
    return spans


SPANS = {"result": result_spans, "line": line_spans}


@torch.no_grad()
def result_logps(policy: str, pairs: list[tuple[str, str]], batch_size: int, span: str = "result",
                 within: str = "sum") -> dict[tuple[str, str], list[float]]:
    """``{(prompt, text): [log P(span of step i)]}`` under ``policy``, in batches of right-padded texts.

    ``span``: the step's written result (``result``) or its whole line (``line``); ``within``: the span's
    log-probability (``sum`` over its tokens) or its least likely token (``min``)."""
    tokenizer, model = load_tokenizer(policy, padding_side="right"), load_model(policy)
    out = {}
    for i in range(0, len(pairs), batch_size):
        batch = pairs[i: i + batch_size]
        rendered = [render_prompt(tokenizer, p) for p, _ in batch]
        enc = tokenizer([r + t for r, (_, t) in zip(rendered, batch)], return_tensors="pt", padding=True,
                        return_offsets_mapping=True)
        offsets = enc.pop("offset_mapping").tolist()
        logps = torch.log_softmax(model(**enc).logits.float(), -1)  # (B, T, V): fine for a 135M model
        for b, ((prompt, text), prefix) in enumerate(zip(batch, rendered)):
            steps = []
            for s, e in SPANS[span](text, len(prefix)):
                token_logps = [logps[b, j - 1, enc["input_ids"][b, j]].item() for j, (a, z) in enumerate(offsets[b])
                               if j > 0 and enc["attention_mask"][b, j] and z > s and a < e]
                steps.append((sum if within == "sum" else min)(token_logps))
            out[(prompt, text)] = steps
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", required=True, help="<out>_samples.jsonl of bench/prm_best_of_n.py")
    parser.add_argument("--policy", required=True, help="the policy that wrote the samples")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--span", choices=sorted(SPANS), default="result",
                        help="score each step's written result (arith-specific) or its whole line")
    parser.add_argument("--within", choices=("sum", "min"), default="sum",
                        help="a span's log-probability, or its least likely token's")
    args = parser.parse_args()
    rows = [json.loads(line) for line in open(args.samples)]
    started = time.perf_counter()
    scores = result_logps(args.policy, sorted({(r["prompt"], r["text"]) for r in rows}), args.batch_size,
                          args.span, args.within)
    seconds = time.perf_counter() - started

    by_problem = collections.defaultdict(list)
    for row in rows:
        by_problem[row["problem"]].append(row)
    extract, normalise = load_reward("reward/math.py:extract_answer"), load_reward("reward/math.py:normalise_answer")
    solution_scores, correct, answers = [], [], []
    for key in sorted(by_problem):
        samples = by_problem[key]
        solution_scores.append([min(scores[(r["prompt"], r["text"])], default=float("-inf")) for r in samples])
        correct.append([r["correct"] for r in samples])
        answers.append([normalise(extract(r["text"])) for r in samples])  # as bench/prm_best_of_n.py reads them
    ranking, pairs = pairwise_ranking(solution_scores, correct)
    pools = [Pool.of(a, c, s) for a, c, s in zip(answers, correct, solution_scores)]
    ns = [n for n in (1, 2, 4, 8, 16, 32) if n <= min(len(c) for c in correct)]
    step_gap = collections.defaultdict(list)  # the exact checker's label of each step -> its log-probs
    for row in rows:
        for value, label in zip(scores[(row["prompt"], row["text"])], row["true_labels"]):
            step_gap["good" if label else "bad"].append(value)
    print(json.dumps({
        "span": args.span, "within": args.within, "pairwise_ranking": ranking, "pairs": pairs,
        "best_of_n": selection_curve(pools, "best_of_n", ns),
        "random_pick": sum(map(sum, correct)) / sum(map(len, correct)),
        "mean_result_logp": {k: sum(v) / len(v) for k, v in step_gap.items()},
        "distinct_samples": len(scores), "seconds": round(seconds, 1),
    }, indent=1))


if __name__ == "__main__":
    main()
