"""Environments: several tasks in one RL run, each with its own data and its own rewards.

``grpo``, ``rloo`` and ``ppo`` take ``environments:`` instead of ``data`` + ``rewards``::

    environments:
      - arith                                     # a shipped environment by name
      - {use: code, weight: 0.5}                  # a shipped one with a field changed
      - name: mine                                # your own
        data: {source: my_problems.jsonl}
        rewards: [{program: reward/math.py:answer_match}]
        accuracy_data: {source: my_heldout.jsonl} # optional: greedy accuracy before/after, per environment

The rows of every environment are pooled, each environment's used ``weight`` times (the data-mixture rule,
:func:`alignkit.data.loading.weighted_pool`), and tagged with an ``env`` column; the trainer's sampler
shuffles the pool, so a batch mixes environments in proportion to their share of it. One reward function,
:class:`EnvironmentReward`, scores each completion with its own row's environment (that environment's
programs summed with their weights, :class:`alignkit.rewards.programs.CombinedReward`) and logs
``env/<name>/reward`` per step, which the stage's manifest reports as ``reward_env_<name>_first/_last``.

Shipped environments (:data:`SHIPPED`): ``arith`` (generated arithmetic word problems, ``answer_match``),
``gsm8k`` (``../shared/data/gsm8k/train.jsonl`` from the working folder or the recipe's, ``answer_match``),
``code`` (the built-in Python function tasks of :mod:`alignkit.data.codetasks`, ``unit_tests`` in the
sandbox) and ``format`` (arithmetic prompts, rewarded only for the ``step_format`` answer layout).
"""

from __future__ import annotations

import copy
from typing import Any, Literal

from pydantic import Field, model_validator

from alignkit.core.config import DataSpec, Spec
from alignkit.core.errors import DataError
from alignkit.rewards.programs import RewardSpec

ANSWER_MATCH = [{"program": "reward/math.py:answer_match"}]

#: name -> the fields of a shipped environment (``use: <name>`` starts from these).
SHIPPED: dict[str, dict[str, Any]] = {
    "arith": {"data": {"source": "arith", "seed": 5, "params": {"n": 256, "steps": 2, "max_operand": 20}},
              "rewards": ANSWER_MATCH,
              "accuracy_data": {"source": "arith", "seed": 9001, "params": {"n": 48, "steps": 2, "max_operand": 20}}},
    "gsm8k": {"data": {"source": "gsm8k", "path": "../shared/data/gsm8k/train.jsonl", "skip": 200},
              "rewards": ANSWER_MATCH,
              "accuracy_data": {"source": "gsm8k", "path": "../shared/data/gsm8k/train.jsonl", "limit": 48}},
    "code": {"data": {"source": "code"}, "data_format": "code",
             "rewards": [{"program": "reward/code.py:unit_tests"}]},
    "format": {"data": {"source": "arith", "seed": 6, "params": {"n": 256, "steps": 2, "max_operand": 20}},
               "data_format": "prompts", "rewards": [{"program": "reward/format.py:step_format"}]},
}


class EnvironmentSpec(Spec):
    """One environment of an RL stage: its rows, its rewards, its share of the pool."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$", description="Its name in logs and metrics.")
    data: DataSpec = Field(..., description="Its prompts (and the columns its rewards read).")
    data_format: Literal["problems", "code", "prompts"] = Field(
        "problems", description="problems: prompt + gold answer; code: prompt + tests; prompts: prompt only.")
    rewards: list[RewardSpec] = Field(..., min_length=1, description="Its reward programs, summed with weights.")
    weight: float = Field(1.0, gt=0, description="How many times its rows are used in the pool (fractions "
                          "sample), as a data mixture's weight.")
    accuracy_data: DataSpec | None = Field(
        None, description="Held-out problems (prompt + gold answer): greedy accuracy before/after, per environment.")

    @model_validator(mode="before")
    @classmethod
    def _shipped(cls, value: Any) -> Any:
        """``"arith"`` or ``{use: arith, weight: 2}``: a shipped environment, with the given fields changed."""
        if isinstance(value, str):
            value = {"use": value}
        if isinstance(value, dict) and "use" in value:
            use = value["use"]
            if use not in SHIPPED:
                raise ValueError(f"no shipped environment {use!r}; shipped: {sorted(SHIPPED)}")
            value = {"name": use, **copy.deepcopy(SHIPPED[use]),
                     **{k: v for k, v in value.items() if k != "use"}}
        return value


def check_environments(environments: list[EnvironmentSpec]) -> None:
    """Names are unique (they key the rows, the logs and the metrics)."""
    names = [env.name for env in environments]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ValueError(f"environment names must differ, {twice} appear twice; give one a `name:`")


def environment_rows(environments: list[EnvironmentSpec], *, seed: int) -> list[dict[str, Any]]:
    """The pooled rows, each with its environment's name as ``env`` and every column any environment has
    (None where its own has none), so that the rows make one table."""
    from alignkit.data import load_dataset
    from alignkit.data.loading import weighted_pool

    parts = []
    for env in environments:
        try:
            rows = load_dataset(env.data, env.data_format).to_list()
        except DataError as err:
            raise DataError(f"environment {env.name!r}: {err}") from None
        parts.append(([{**row, "env": env.name} for row in rows], env.weight, f"environment {env.name!r}"))
    pooled = weighted_pool(parts, seed=seed)
    columns = list(dict.fromkeys(key for rows, _, _ in parts for key in rows[0]))
    return [{key: row.get(key) for key in columns} for row in pooled]


class EnvironmentReward:
    """One TRL-convention reward function over many environments: each completion is scored by the rewards of
    its row's ``env``, with only that environment's rows and columns; ``log_metric`` (TRL's per-step logger)
    gets each environment's mean reward in the batch as ``env/<name>/reward``."""

    __name__ = "environments"  # TRL logs rewards/environments/mean (the weighted total of every row)

    def __init__(self, rewards: dict[str, Any]):
        self.rewards = rewards

    def __call__(self, completions: list, env: list, **columns: Any) -> list[float | None]:
        n = len(completions)
        scores: list[float | None] = [None] * n
        log_metric = columns.get("log_metric")
        per_row = {k: v for k, v in columns.items() if isinstance(v, list) and len(v) == n}
        shared = {k: v for k, v in columns.items() if k not in per_row}
        unknown = sorted(set(env) - set(self.rewards))
        if unknown:
            raise DataError(f"rows of environment(s) {unknown}, which this stage does not have: {sorted(self.rewards)}")
        for name, reward in self.rewards.items():
            rows = [i for i, e in enumerate(env) if e == name]
            if not rows:
                continue
            got = reward(completions=[completions[i] for i in rows],
                         **{k: [v[i] for i in rows] for k, v in per_row.items()}, **shared)
            for i, score in zip(rows, got, strict=True):
                scores[i] = score
            scored = [s for s in got if s is not None]
            if log_metric is not None and scored:
                log_metric(f"env/{name}/reward", sum(scored) / len(scored))
        return scores


def environment_reward(environments: list[EnvironmentSpec], base_dir: Any) -> EnvironmentReward:
    from alignkit.rewards.programs import combine_rewards

    return EnvironmentReward({env.name: combine_rewards(list(env.rewards), base_dir) for env in environments})
