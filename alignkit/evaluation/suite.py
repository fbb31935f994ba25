r"""Evaluation suites: the spec of what an eval measures, and the pure functions that turn graded samples
into accuracies and accuracy-vs-N curves.

A suite is a YAML file (``eval/arith.yaml``, ``eval/gsm8k.yaml``) validated into :class:`Suite`. It runs
alone (``alignkit eval eval/gsm8k.yaml --model PATH``) or as a recipe stage (``kind: eval``); both go
through :func:`alignkit.stages.eval.run_suite`, which samples and scores; this module does the counting.

Tasks (``task:``):

- ``problems``: sample ``n`` completions per problem once, grade them, then select from that one pool in
  every way the suite lists (so all curves reuse the same generations and compare directly):
  ``greedy`` (one argmax decode), ``pass`` (pass@k, Chen et al. 2021's unbiased estimator), ``majority``
  (maj@k, self-consistency, Wang et al. 2022), ``best_of_n`` (the sample a verifier scores highest; ORM as in
  Cobbe et al. 2021, PRM with min/prod/last step aggregation as in Lightman et al. 2023 and Math-Shepherd)
  and ``weighted_vote`` (the answer with the largest total verifier score, Uesato et al. 2022). Curves
  subsample N of the n samples without replacement and average over draws
  (:func:`alignkit.maths.selection.selection_curve`).
- ``preference``: an ORM's pairwise accuracy on chosen/rejected pairs.
- ``stepwise``: a PRM's step-level accuracy and first-error detection on labelled step lists.

Choices, each a departure from a naive reading:

1. Votes group samples by the grader: every sample graded correct goes to one bucket (each equals the gold
   answer, so an exact equivalence check would group them together); wrong answers group by their
   normalised answer. This keeps :class:`alignkit.maths.selection.Pool`'s rule (correctness is a function of the
   answer) true when the grader accepts forms the normaliser keeps apart (``0.5`` and ``\frac{1}{2}``).
2. ORM scores are raw rewards (Bradley-Terry logits). Best-of-N uses them as they are; a weighted vote
   needs non-negative weights, so it sums ``sigmoid(score)``. PRM step scores are already probabilities.
3. For a PRM, a completion is split into steps on the PRM's own separator (``alignkit.rewards.prm.split_steps``;
   a newline by default, alignkit's one-step-per-line format); a completion without any gets step scores
   ``[]`` and score 0.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from alignkit.core.config import DataSpec, Spec
from alignkit.core.errors import RecipeError
from alignkit.generation import FastSpec, GenerationSpec
from alignkit.evaluation.search import SearchSpec
from alignkit.maths.selection import Pool, aggregate_steps, bootstrap_ci, selection_values
from alignkit.rewards.programs import RewardSpec
from alignkit.run.shipped import note, shipped_dir, shipped_names, shipped_root

SUITES_DIR = shipped_dir("eval")  # the shipped suites (the clone's eval/, or the installed package's copy)
METHODS = ("greedy", "pass", "majority", "best_of_n", "weighted_vote")
CORRECT_KEY = "\x00correct"  # the vote bucket of every sample graded correct (choice 1)
_SHORT = {"pass": "pass", "majority": "maj", "best_of_n": "bon", "weighted_vote": "wvote"}


# ------------------------------------------------------------------------------------------------ spec


class PromptSpec(Spec):
    """How a dataset prompt becomes model input (same rendering as training: alignkit.data.prompts)."""

    chat: bool = Field(True, description="Apply the model's chat template (false: raw text + newline).")
    system: str | None = Field(None, description="System message prepended in chat mode; None: none.")
    template: str = Field("{prompt}", description="User message; {prompt} is replaced by the problem text.")

    @field_validator("template")
    @classmethod
    def _has_placeholder(cls, value: str) -> str:
        if "{prompt}" not in value:
            raise ValueError("template must contain {prompt}, e.g. '{prompt}\\nEnd with: The answer is N.'")
        return value


class SamplingSpec(Spec):
    """The one shared pool of samples per problem that every selection method draws from."""

    RENAMED = {"max_new_tokens": "max_completion_length"}

    n: int = Field(16, gt=0, description="Samples per problem: N_max of the curves (pass@k needs n >= k).")
    temperature: float = Field(0.8, gt=0, description="Softmax temperature of the pool (greedy is separate).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus mass; 1 = off.")
    top_k: int = Field(0, ge=0, description="Keep the k likeliest tokens; 0 = off.")
    max_completion_length: int = Field(256, gt=0, description="Budget per completion; cut-off ones count as wrong.")
    stop: list[str] = Field(default_factory=list, description="Stop strings (excluded from the text).")
    seed: int = Field(0, description="Shard k samples with seed + k, so reruns and resumes reproduce it.")


class Suite(Spec):
    """One evaluation: data, prompt format, grader, sampling, selection methods and curve points."""

    name: str = Field(..., description="Suite name: report titles and the default output folder.")
    description: str = Field("", description="One line shown in the report.")
    task: Literal["problems", "preference", "stepwise"] = Field(
        "problems", description="problems: sample and select; preference: ORM pairwise accuracy; "
        "stepwise: PRM step accuracy and first-error detection.")
    dataset: DataSpec = Field(..., description="Rows in the task's format (problems/preference/stepwise).")
    prompt: PromptSpec = Field(default_factory=PromptSpec, description="Prompt rendering.")
    grader: RewardSpec = Field(
        default_factory=lambda: RewardSpec(program="reward/math.py:answer_match"),
        description="Reward program scoring a completion against the row's `answer`; a string is shorthand.")
    pass_threshold: float = Field(1.0, description="A sample is correct when its grader score is >= this.")
    extract: str = Field("reward/math.py:extract_answer", description="text -> answer phrase or None (votes).")
    normalise: str | None = Field(
        "reward/math.py:normalise_answer", description="phrase -> canonical vote key (None: use the phrase).")
    sampling: SamplingSpec = Field(default_factory=SamplingSpec, description="The shared sample pool.")
    methods: list[Literal["greedy", "pass", "majority", "best_of_n", "weighted_vote"]] = Field(
        default_factory=lambda: list(METHODS), description="Selection methods to report (task problems).")
    prm_aggregations: list[Literal["min", "prod", "last", "mean"]] = Field(
        default_factory=lambda: ["min", "prod", "last"], description="How PRM step scores become one score.")
    ns: list[int] | None = Field(None, description="Curve points; default 1, 2, 4, ... up to sampling.n.")
    search: list[SearchSpec] = Field(
        default_factory=list, description="PRM-guided searches (beam, dvts; alignkit.evaluation.search), each run "
        "with `beams` = every N of `search_ns` (needs a PRM).")
    search_ns: list[int] | None = Field(None, description="The searches' beam counts N; default the curve points.")
    draws: int = Field(200, gt=0, description="Random N-subsets per problem when there are more than this "
                       "(fewer are enumerated exactly); cost grows linearly.")
    step_threshold: float = Field(0.5, ge=0, le=1, description="stepwise: a step is judged correct at >= this.")
    orm: str | None = Field(None, description="Outcome reward model folder (a stage's `orm:` / --orm wins).")
    prm: str | None = Field(None, description="Process reward model folder (a stage's `prm:` / --prm wins).")
    generation: GenerationSpec = Field(default_factory=FastSpec, description="Sampling backend.")
    shuffle: bool = Field(True, description="Store each problem's samples in a seeded random order (ties in "
                          "votes go to the earlier sample; engines may return short samples first).")
    shard_size: int = Field(32, gt=0, description="Problems per shard: the unit of resume and of progress.")
    examples: int = Field(3, ge=0, description="Sample completions shown in report.md.")

    @field_validator("grader", mode="before")
    @classmethod
    def _grader_shorthand(cls, value: Any) -> Any:
        return {"program": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_ns(self) -> Suite:
        for n in self.ns or []:
            if not 1 <= n <= self.sampling.n:
                raise ValueError(f"ns: {n} is outside [1, sampling.n = {self.sampling.n}]; "
                                 "raise sampling.n or drop it")
        if self.search and self.task != "problems":
            raise ValueError("search runs on `task: problems` suites only")
        if any(n < 1 for n in self.search_ns or []):
            raise ValueError("search_ns must be positive beam counts")
        return self

    def search_runs(self) -> list[tuple[str, SearchSpec]]:
        """``(label, spec with beams = N)`` for every search and N: labels ``beam``/``dvts`` (numbered when a
        method appears twice) plus ``@N``; a dvts N that is not a multiple of its ``expand`` is left out."""
        counts = {m: sum(spec.method == m for spec in self.search) for m in ("beam", "dvts")}
        seen: dict[str, int] = {}
        runs = []
        for spec in self.search:
            seen[spec.method] = seen.get(spec.method, 0) + 1
            label = spec.method + (str(seen[spec.method]) if counts[spec.method] > 1 else "")
            for n in sorted(set(self.search_ns or self.curve_ns())):
                if spec.method == "dvts" and n % spec.expand:
                    continue
                runs.append((f"{label}@{n}", spec.model_copy(update={"beams": n})))
        return runs
    def fingerprint(self, model: str, n_rows: int) -> str:
        """Hash of what the sample pool depends on; shards made under another fingerprint are stale."""
        blob = {"model": model, "rows": n_rows, "greedy": "greedy" in self.methods, "shard": self.shard_size,
                "shuffle": self.shuffle, **self.model_dump(mode="json", include={"dataset", "prompt", "sampling"})}
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]

    def curve_ns(self) -> list[int]:
        """The N values of the curves: ``ns`` if given, else powers of two up to ``sampling.n`` (and n)."""
        if self.ns:
            return sorted(set(self.ns))
        n_max = self.sampling.n
        return sorted({2 ** i for i in range(int(math.log2(n_max)) + 1)} | {n_max})


def find_suite(name: str, search: Sequence[Path] = ()) -> Path:
    """A suite file: the path as given, else relative to each ``search`` folder (a bare name: the user's
    ``eval/<name>.yaml`` there or in the working directory), else the shipped ``eval/<name>.yaml``."""
    path = Path(name)
    candidates = [path] + [Path(d) / path for d in search]
    if not path.suffix and len(path.parts) == 1:  # a bare name: the user's own eval/<name>.yaml wins
        candidates += [Path(d) / "eval" / f"{name}.yaml" for d in [*search, Path.cwd()]]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    suites = shipped_dir("eval")
    shipped = [shipped_root() / path, suites / path, suites / f"{name}.yaml"]
    for candidate in shipped:
        if candidate.is_file():
            note("eval", name, candidate)
            return candidate
    raise RecipeError(f"eval suite {name!r} not found (looked in {[str(c) for c in candidates + shipped]}); "
                      f"shipped suites: {shipped_names('eval')}", field="suite")


def parse_sets(items: Sequence[str]) -> dict[str, Any]:
    """``["sampling.n=4", "dataset.limit=8"]`` -> ``{"sampling": {"n": 4}, "dataset": {"limit": 8}}``."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"--set {item!r}: expected KEY=VALUE, e.g. sampling.n=8", field="set")
        node = out
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(text) if text else ""
    return out


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep merge: mappings merge key by key, anything else in ``overrides`` replaces the base value."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_suite(path: str | Path, overrides: dict[str, Any] | None = None) -> Suite:
    """Read and validate a suite file with ``overrides`` merged in; RecipeError names the bad field.

    Relative data paths (``dataset.source``/``dataset.path``) that do not exist from the working directory
    are taken relative to the suite file.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise RecipeError(f"suite {path} is not valid YAML: {err}", field="suite") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"suite {path} must be a mapping of fields", field="suite")
    raw = merge(raw, overrides or {})
    try:
        suite = Suite.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "suite"
        raise RecipeError(f"suite {path}: {where}: {first['msg']}", field=where) from None
    return _localise_data_paths(suite, path.parent)


def _localise_data_paths(suite: Suite, suite_dir: Path) -> Suite:
    updates = {}
    for attr in ("source", "path"):
        text = getattr(suite.dataset, attr)
        if text and not Path(text).exists() and (suite_dir / text).exists():
            updates[attr] = str(suite_dir / text)
    return suite.model_copy(update={"dataset": suite.dataset.model_copy(update=updates)}) if updates else suite


def render(tokenizer: Any, prompt: Any, spec: PromptSpec) -> str:
    """Model input for a dataset prompt: the template filled, then the chat template (alignkit.data.prompts)."""
    from alignkit.data.prompts import render_prompt

    text = spec.template.replace("{prompt}", prompt) if isinstance(prompt, str) else prompt
    return render_prompt(tokenizer, text, chat=spec.chat, system=spec.system)


def pool_order(samples: list, seed: int, index: int, shuffle: bool) -> list:
    """A problem's samples in a seeded random order (in place): votes break ties toward the earlier sample,
    and an engine may return a prompt's samples in finish order (shortest first), favouring short answers."""
    if shuffle:
        random.Random(seed * 1_000_003 + index).shuffle(samples)
    return samples


# ------------------------------------------------------------------------------------- verifier hooks


class OutcomeScorer(Protocol):
    """An ORM in TRL's reward convention (``alignkit.rewards.reward_model.RewardModelScorer`` is one): one score
    per (prompt, completion), higher is better, any scale (a raw Bradley-Terry reward)."""

    def __call__(self, completions: list[str], prompts: list[Any]) -> list[float]: ...


class StepScorer(Protocol):
    """A PRM: per step, the probability that the step (given those before it) is correct."""

    def score_batch(self, prompts: list[Any], steps_lists: list[list[str]]) -> list[list[float]]: ...


def sigmoid(x: float) -> float:
    """Logistic function, safe for large |x|."""
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def verifier_score_names(has_orm: bool, has_prm: bool, aggregations: Sequence[str]) -> list[str]:
    """Names of the per-sample scores selection can use: ``orm``, ``prm_min``, ``prm_prod``, ..."""
    return (["orm"] if has_orm else []) + ([f"prm_{a}" for a in aggregations] if has_prm else [])


def sample_scores(orm: float | None, prm_steps: list[float] | None, aggregations: Sequence[str]) -> dict[str, float]:
    """The named scores of one sample from its raw ORM score and PRM step scores (choice 3 for no steps)."""
    scores: dict[str, float] = {}
    if orm is not None:
        scores["orm"] = float(orm)
    if prm_steps is not None:
        for how in aggregations:
            scores[f"prm_{how}"] = aggregate_steps(prm_steps, how) if prm_steps else 0.0
    return scores


# ------------------------------------------------------------------------------------ problems: counting


def vote_key(correct: bool, answer: str | None) -> str | None:
    """The vote bucket of a sample (choice 1): one shared bucket for correct ones, else the answer."""
    if correct:
        return CORRECT_KEY
    return None if answer is None or answer == CORRECT_KEY else answer


def problem_pool(samples: Sequence[dict[str, Any]], score: str | None = None, *, weights: bool = False) -> Pool:
    """A :class:`Pool` from graded samples (dicts with ``key``, ``correct`` and ``scores``).

    ``score`` names the verifier score to attach; ``weights`` maps ORM scores through a sigmoid (choice 2).
    """
    values = None
    if score is not None:
        values = [s["scores"][score] for s in samples]
        if weights and score == "orm":
            values = [sigmoid(v) for v in values]
    return Pool.of([s["key"] for s in samples], [s["correct"] for s in samples], values)


def selection_metrics(problems: Sequence[dict[str, Any]], suite: Suite, score_names: Sequence[str]
                      ) -> tuple[dict[str, float], dict[str, dict[int, float]], dict[str, dict[int, list[float]]]]:
    """Flat metrics, curves ``{label: {N: accuracy}}`` and each problem's value ``{label: {N: [per problem]}}``
    for the suite's methods.

    ``problems`` are graded records: ``greedy`` (a graded sample or None) and ``samples`` (graded samples).
    Labels: ``pass``, ``maj``, ``bon_<score>``, ``wvote_<score>`` for each available verifier score name;
    metrics are ``<label>@<N>`` plus ``greedy`` and ``pass@1``-style keys for every N.
    """
    ns = suite.curve_ns()
    metrics: dict[str, float] = {}
    values: dict[str, dict[int, list[float]]] = {}
    if "greedy" in suite.methods:
        metrics["greedy"] = sum(p["greedy"]["correct"] for p in problems) / len(problems)
    plain = [problem_pool(p["samples"]) for p in problems]
    for method in ("pass", "majority"):
        if method in suite.methods:
            values[_SHORT[method]] = selection_values(plain, method, ns, suite.draws, suite.sampling.seed)
    for method in ("best_of_n", "weighted_vote"):
        if method not in suite.methods:
            continue
        for name in score_names:
            pools = [problem_pool(p["samples"], name, weights=method == "weighted_vote") for p in problems]
            values[f"{_SHORT[method]}_{name}"] = selection_values(pools, method, ns, suite.draws, suite.sampling.seed)
    curves = {label: {n: sum(v) / len(v) for n, v in by_n.items()} for label, by_n in values.items()}
    for label, curve in curves.items():
        metrics.update({f"{label}@{n}": acc for n, acc in curve.items()})
    return metrics, curves, values


def bands(values: dict[str, dict[int, list[float]]], *, draws: int = 1000, seed: int = 0
          ) -> dict[str, dict[int, tuple[float, float]]]:
    """95% bootstrap band over problems of every curve point (:func:`alignkit.maths.selection.bootstrap_ci`)."""
    return {label: {n: bootstrap_ci(v, draws=draws, seed=seed) for n, v in by_n.items()}
            for label, by_n in values.items()}


def difficulty_buckets(pass_rates: Sequence[float], buckets: int) -> list[int]:
    """Each problem's difficulty bucket, 0 = hardest: problems ranked by pass rate (ties by position) and cut
    into ``buckets`` groups of (nearly) equal size, as Snell et al. 2024 bin by the policy's own pass@1.

    >>> difficulty_buckets([0.9, 0.0, 0.5, 0.25, 1.0, 0.5], 3)
    [2, 0, 1, 0, 2, 1]
    """
    order = sorted(range(len(pass_rates)), key=lambda i: (pass_rates[i], i))
    out = [0] * len(pass_rates)
    for rank, i in enumerate(order):
        out[i] = rank * buckets // len(pass_rates)
    return out


def within_budget(cost: dict[int, float], budget: float) -> int | None:
    """The N whose cost is the largest that is still <= ``budget`` (what a method can do on it), or None.

    >>> within_budget({1: 40.0, 4: 160.0, 8: 320.0}, 200.0), within_budget({4: 160.0}, 100.0)
    (4, None)
    """
    affordable = [n for n in cost if cost[n] <= budget]
    return max(affordable, key=lambda n: cost[n]) if affordable else None


def compute_optimal(values: dict[str, dict[int, list[float]]], cost: dict[str, dict[int, float]],
                    bucket_of: Sequence[int]) -> list[dict[str, Any]]:
    """At each budget (every cost some method reached), the best method per difficulty bucket vs one for all.

    A method's value at budget B is its point with the largest cost <= B (none below: it cannot run at B).
    ``chosen`` is the accuracy when each bucket uses its own best method; ``single`` the best one method for
    every problem. The choice is made on the same problems it is scored on: an upper bound of what a
    difficulty predictor could gain, not an out-of-sample figure. ``pass`` (an oracle, needs the gold) is
    not a candidate.

    >>> rows = compute_optimal({"a": {1: [1, 0, 0, 0]}, "b": {1: [0, 0, 1, 1]}}, {"a": {1: 8.0}, "b": {1: 8.0}},
    ...                        [0, 0, 1, 1])
    >>> rows[0]["per_bucket"], rows[0]["chosen"], rows[0]["single"], rows[0]["single_method"]
    (['a', 'b'], 0.75, 0.5, 'b')
    """
    n_buckets = max(bucket_of) + 1 if bucket_of else 0
    candidates = {label: by_n for label, by_n in values.items() if label != "pass" and label in cost}
    rows = []
    for budget in sorted({c for label in candidates for c in cost[label].values()}):
        usable = {}
        for label, by_n in candidates.items():
            n = within_budget(cost[label], budget)
            if n is not None:
                usable[label] = by_n[n]
        if not usable:
            continue
        per_bucket, total = [], 0.0
        for b in range(n_buckets):
            members = [i for i, bucket in enumerate(bucket_of) if bucket == b]
            best = max(usable, key=lambda label: sum(usable[label][i] for i in members))  # first on ties
            per_bucket.append(best)
            total += sum(usable[best][i] for i in members)
        single = max(usable, key=lambda label: sum(usable[label]))
        rows.append({"budget": budget, "per_bucket": per_bucket, "chosen": total / len(bucket_of),
                     "single_method": single, "single": sum(usable[single]) / len(bucket_of)})
    return rows


def search_vs_sampling(values: dict[str, dict[int, list[float]]], cost: dict[str, dict[int, float]],
                       searches: Sequence[str], *, draws: int = 1000, seed: int = 0) -> list[dict[str, Any]]:
    """Each search point against every sampling method given no more compute, paired over problems.

    For search ``s`` at N (cost c) and each other method (``pass``, an oracle, excluded), the method's point with
    the largest cost <= c (the most it can do on the search's budget; none: skipped); ``diff`` is the mean over
    problems of ``search - method`` and ``band`` its 95% bootstrap interval (pairs kept: the same problems).

    >>> rows = search_vs_sampling({"beam": {1: [1, 1, 0, 1]}, "maj": {1: [1, 0, 0, 0], 4: [1, 1, 1, 1]}},
    ...                           {"beam": {1: 100.0}, "maj": {1: 40.0, 4: 160.0}}, ["beam"])
    >>> [(r["search"], r["n"], r["method"], r["method_n"], r["diff"]) for r in rows]
    [('beam', 1, 'maj', 1, 0.5)]
    """
    rows = []
    for label in searches:
        for n, mine in sorted(values.get(label, {}).items()):
            budget = cost[label][n]
            for method, by_n in values.items():
                if method in searches or method == "pass" or method not in cost:
                    continue
                m = within_budget(cost[method], budget)
                if m is None:
                    continue
                diffs = [a - b for a, b in zip(mine, by_n[m], strict=True)]
                rows.append({"search": label, "n": n, "tokens": budget, "method": method, "method_n": m,
                             "method_tokens": cost[method][m], "diff": sum(diffs) / len(diffs),
                             "band": bootstrap_ci(diffs, draws=draws, seed=seed)})
    return rows


def pool_stats(problems: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Health of the pool: share of samples without an answer, cut off at the budget, and their length."""
    samples = [s for p in problems for s in p["samples"]]
    return {
        "no_answer_rate": sum(s["answer"] is None for s in samples) / len(samples),
        "truncated_rate": sum(s["finish_reason"] == "length" for s in samples) / len(samples),
        "mean_tokens": sum(s["tokens"] for s in samples) / len(samples),
    }


# ------------------------------------------------------------------------------- verifiers on labelled data


def first_error(labels: Sequence[bool]) -> int:
    """Index of the first incorrect step, or -1 when every step is correct.

    >>> first_error([True, False, False]), first_error([True, True])
    (1, -1)
    """
    return next((i for i, ok in enumerate(labels) if not ok), -1)


def stepwise_metrics(scores: Sequence[Sequence[float]], labels: Sequence[Sequence[bool]], threshold: float
                     ) -> dict[str, float]:
    """A PRM against step labels: the PRM stage's :func:`alignkit.rewards.prm.step_metrics` (step accuracy, F1 of
    finding bad steps, ``first_error_found`` on solutions with an error, ``no_error_kept`` on those
    without) plus ``first_error_f1``, the harmonic mean of the last two (ProcessBench's score: a PRM that
    flags nothing is perfect on correct solutions alone). NaN when either kind of solution is missing.
    """
    from alignkit.rewards.prm import step_metrics

    out = {**step_metrics(scores, labels, threshold), "solutions": float(len(labels))}
    found, kept = out["first_error_found"], out["no_error_kept"]
    if math.isnan(found) or math.isnan(kept):
        out["first_error_f1"] = math.nan
    else:
        out["first_error_f1"] = 2 * found * kept / (found + kept) if found + kept > 0 else 0.0
    return out


def score_pairs(rows: Sequence[dict[str, Any]], orm: OutcomeScorer) -> dict[str, Any]:
    """A preference suite's outcome: the ORM scores chosen and rejected of every row."""
    from alignkit.rewards.reward_model import pairwise_stats  # the reward stage's numbers (ties count as wrong there too)
    from alignkit.rewards.values import call_reward, reward_name

    prompts = [row["prompt"] for row in rows]
    chosen, rejected = (call_reward(orm, reward_name(orm), [row[side] for row in rows], {"prompts": prompts},
                                    allow_none=False) for side in ("chosen", "rejected"))
    stats = pairwise_stats(chosen, rejected)
    metrics = {"pairwise_accuracy": stats["accuracy"], "mean_margin": stats["margin"], "pairs": stats["n"]}
    records = [{"prompt": row["prompt"], "chosen_score": c, "rejected_score": r, "correct": c > r}
               for row, c, r in zip(rows, chosen, rejected)]
    return {"summary": {"accuracy": metrics["pairwise_accuracy"], **metrics}, "metrics": metrics,
            "records": records, "curves": {}, "notes": []}


def score_steps(rows: Sequence[dict[str, Any]], prm: StepScorer, threshold: float) -> dict[str, Any]:
    """A stepwise suite's outcome: the PRM scores each row's steps, compared with their labels."""
    from alignkit.rewards.values import check_step_scores, reward_name

    steps = [r["completions"] for r in rows]
    scores = check_step_scores(prm.score_batch([r["prompt"] for r in rows], steps), steps, reward_name(prm))
    metrics = stepwise_metrics(scores, [r["labels"] for r in rows], threshold)
    records = [{"prompt": r["prompt"], "steps": r["completions"], "labels": r["labels"], "step_scores": s,
                "first_error": first_error(r["labels"]),
                "predicted_first_error": first_error([x >= threshold for x in s])}
               for r, s in zip(rows, scores)]
    return {"summary": {"accuracy": metrics["step_accuracy"], **metrics}, "metrics": metrics,
            "records": records, "curves": {}, "notes": []}
