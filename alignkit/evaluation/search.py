"""Test-time search with a process reward model: step-level beam search and diverse verifier tree search.

A PRM scores partial solutions, so it can steer sampling step by step instead of only ranking finished
solutions (best-of-N). Both methods here grow solutions one step at a time (a step ends at the PRM's
separator, a newline by default: the policy is sampled with that separator as a stop string), score every
partial solution with the PRM (its step scores aggregated with ``aggregation``: min, prod, last or mean), and
keep the best:

- **beam search** (``method: beam``; Snell et al. 2024, arXiv:2408.03314, sec. 5): ``beams`` partial
  solutions; each step every one of them is continued ``expand`` times and the best ``beams`` of all the
  continuations go on (distinct in text; a finished one keeps its place and the search goes on with the
  rest). The root is continued ``beams * expand`` times.
- **DVTS** (``method: dvts``, diverse verifier tree search; Beeching et al. 2024, "Scaling test-time compute
  with open models"): ``beams // expand`` independent subtrees of width one; each step each subtree's one
  partial solution is continued ``expand`` times and only its best goes on. Subtrees never compete, so the
  search cannot collapse onto one prefix.

A continuation that ends by itself (EOS) finishes its solution; one that stops at the separator is one more
step; an empty step is dropped. At ``max_steps`` the search stops and unfinished solutions are scored as they
are. The answer is the finished solution with the best aggregated score (ties: the first found).

Cost (to compare methods at equal compute rather than equal N): ``generated_tokens`` counts every token
sampled, ``prm_tokens`` every token the PRM read (each scored partial solution, prompt included), and
``prefill_tokens`` the prompt and prefix tokens each continuation request had to process (what an engine
without prefix caching re-reads every step).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from pydantic import Field, model_validator

from alignkit.core.config import Spec
from alignkit.maths.selection import aggregate_steps


class StepScorer(Protocol):
    """What search needs from a PRM (:class:`alignkit.rewards.prm.PRMScorer` is one)."""

    separator: str

    def score_batch(self, prompts: Sequence[Any], steps: Sequence[Sequence[str]]) -> list[list[float]]: ...


class SearchSpec(Spec):
    """How a PRM-guided search runs (the ``search:`` block of an eval suite)."""

    method: Literal["beam", "dvts"] = Field("beam", description="beam: one beam of `beams`; dvts: `beams // "
                                            "expand` independent subtrees of width one.")
    beams: int = Field(4, gt=0, description="Partial solutions kept per step (N), over all subtrees.")
    expand: int = Field(4, gt=0, description="Continuations sampled per kept partial solution and step (M).")
    max_steps: int = Field(8, gt=0, description="Most steps a solution grows before the search stops.")
    max_step_tokens: int = Field(64, gt=0, description="Token budget of one step.")
    temperature: float = Field(0.8, gt=0, description="Sampling temperature of the steps.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    aggregation: Literal["min", "prod", "last", "mean"] | None = Field(
        None, description="How a partial solution's step scores become one; default: the PRM's own.")

    @model_validator(mode="after")
    def _subtrees(self) -> SearchSpec:
        if self.method == "dvts" and self.beams % self.expand:
            raise ValueError(f"dvts splits `beams` into subtrees of `expand`: {self.beams} is not a multiple of "
                             f"{self.expand}")
        return self

    @property
    def groups(self) -> int:
        """Independent subtrees."""
        return self.beams // self.expand if self.method == "dvts" else 1

    @property
    def width(self) -> int:
        """Partial solutions each subtree keeps per step."""
        return 1 if self.method == "dvts" else self.beams


@dataclass
class Candidate:
    """A (partial) solution: its steps, its aggregated PRM score and whether it ended by itself."""

    steps: list[str]
    score: float = 0.0
    finished: bool = False
    group: int = 0

    def text(self, separator: str) -> str:
        return separator.join(self.steps)


@dataclass
class SearchCost:
    generated_tokens: int = 0
    prm_tokens: int = 0
    prefill_tokens: int = 0
    steps: int = 0


@dataclass
class SearchResult:
    """The finished solutions (best first) and what the search cost."""

    solutions: list[Candidate]
    cost: SearchCost = field(default_factory=SearchCost)

    @property
    def best(self) -> Candidate | None:
        return self.solutions[0] if self.solutions else None


def select(candidates: Sequence[Candidate], width: int) -> list[Candidate]:
    """The best ``width`` candidates with distinct steps, by score (ties: the earlier one).

    >>> [c.steps for c in select([Candidate(["a"], 0.2), Candidate(["b"], 0.9), Candidate(["b"], 0.9),
    ...                           Candidate(["c"], 0.5)], 2)]
    [['b'], ['c']]
    """
    seen: set[tuple[str, ...]] = set()
    kept = []
    for candidate in sorted(candidates, key=lambda c: -c.score):  # sorted() is stable: ties keep their order
        key = tuple(candidate.steps)
        if key not in seen:
            seen.add(key)
            kept.append(candidate)
        if len(kept) == width:
            break
    return kept


def search(engine: Any, prm: StepScorer, prompt: Any, rendered: str, spec: SearchSpec, *, seed: int = 0,
           tokenizer: Any = None) -> SearchResult:
    """Search one problem. ``prompt`` is what the PRM reads (text or messages), ``rendered`` what the policy
    is fed (``prompt`` through the chat template); ``tokenizer`` (the policy's) only counts prefill tokens."""
    from alignkit.generation import SamplingParams

    separator = prm.separator
    how = spec.aggregation or getattr(prm, "how", "min")
    cost = SearchCost()
    active = [Candidate([])]  # the root, shared by every subtree
    finished: list[Candidate] = []
    for step in range(spec.max_steps):
        if not active:
            break
        # The root is asked once for every subtree's first continuations (identical requests with one seed
        # could be sampled alike by a per-request-seeded engine), then split: group g gets the g-th block.
        per_root = spec.width * spec.expand
        n = spec.groups * per_root if step == 0 else spec.expand
        params = SamplingParams(n=n, temperature=spec.temperature, top_p=spec.top_p, stop=[separator],
                                max_new_tokens=spec.max_step_tokens, seed=seed * 1_000_003 + step)
        requests = [rendered + "".join(s + separator for s in c.steps) for c in active]
        outs = engine.generate(requests, params, progress=False)
        cost.steps += 1
        cost.prefill_tokens += _count(tokenizer, requests) * n
        grown = []
        for parent, samples in zip(active, outs, strict=True):
            for index, sample in enumerate(samples):
                cost.generated_tokens += len(sample.token_ids)
                text = sample.text.strip()
                ended = sample.finish_reason == "eos"
                if not text and not ended:
                    continue  # an empty step: nothing to score or grow
                group = index // per_root if step == 0 else parent.group
                grown.append(Candidate(parent.steps + ([text] if text else []), finished=ended, group=group))
        scorable = [c for c in grown if c.steps]
        if scorable:
            scores = prm.score_batch([prompt] * len(scorable), [c.steps for c in scorable])
            cost.prm_tokens += _prm_tokens(prm, prompt, scorable)
            for candidate, step_scores in zip(scorable, scores, strict=True):
                candidate.score = aggregate_steps(step_scores, how) if step_scores else 0.0
        active = []
        for group in range(spec.groups):
            kept = select([c for c in grown if c.group == group and c.steps], spec.width)
            finished += [c for c in kept if c.finished]
            active += [c for c in kept if not c.finished]
    finished += active  # out of steps: scored as they are
    return SearchResult(sorted(finished, key=lambda c: -c.score), cost)


def _count(tokenizer: Any, texts: list[str]) -> int:
    if tokenizer is None or not texts:
        return 0
    return sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])


def _prm_tokens(prm: Any, prompt: Any, candidates: list[Candidate]) -> int:
    """Tokens the PRM read for these candidates (0 for a scorer that cannot say)."""
    encode = getattr(prm, "encode", None)
    return sum(len(encode(prompt, c.steps).input_ids) for c in candidates) if encode else 0
