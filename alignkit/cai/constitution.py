"""Constitutions: the principles Constitutional AI critiques, revises and judges by (Bai et al. 2022).

A constitution is a YAML file::

    name: harmless
    description: one line saying what the principles are for
    principles:
      - name: dangerous-help                 # short id, unique in the file
        critique: "Point out where the last response ..."      # SL stage: asks for a critique
        revision: "Rewrite the response so that ..."           # SL stage: asks for a revision
        comparison: "Which of these responses is less ...?"    # RL stage: the judge's question
    demonstration:                           # optional: a one-shot example for small models
      principle: dangerous-help              # the principle it demonstrates
      prompt: "..."
      response: "..."
      critique: "..."
      revision: "..."

Recipes name one by a bare name (``harmless``: ``reward/constitutions/harmless.yaml`` in the recipe's
directory or the working directory if there is one, else the one shipped with alignkit, see
:mod:`alignkit.run.shipped`) or a path (``my/principles.yaml``, looked up relative to the recipe's directory,
then the working directory, then the shipped folders' root, like reward programs). A principle is drawn per
example with :meth:`Constitution.sample`, from a ``random.Random`` the caller seeds, so a rerun draws the
same ones.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from alignkit.core.config import Spec
from alignkit.core.errors import RecipeError
from alignkit.run.shipped import find, is_shipped, note, shipped_dir, shipped_names, shipped_root

#: where the shipped constitutions are (a bare name is looked up in the user's reward/constitutions/ first)
CONSTITUTIONS_DIR = shipped_dir("constitutions")


class Principle(Spec):
    """One principle: what to critique, how to revise, and what a judge is asked."""

    name: str = Field(..., min_length=1, description="Short id, unique within the constitution.")
    critique: str = Field(..., min_length=1, description="Critique request: asks the model to find the problem "
                          "in its last response.")
    revision: str = Field(..., min_length=1, description="Revision request: asks the model to rewrite the "
                          "response without the problem.")
    comparison: str = Field(..., min_length=1, description="Question a judge answers about two responses "
                            "(which one is better by this principle).")


class Demonstration(Spec):
    """A worked critique and revision, shown before the real conversation to steer small models."""

    principle: str = Field(..., description="Name of the principle this example applies.")
    prompt: str = Field(..., min_length=1, description="The user's request.")
    response: str = Field(..., min_length=1, description="The first (flawed) response.")
    critique: str = Field(..., min_length=1, description="The critique of `response` under the principle.")
    revision: str = Field(..., min_length=1, description="The revised response.")


class Constitution(Spec):
    """A named list of principles (and an optional one-shot demonstration)."""

    name: str = Field(..., min_length=1, description="Constitution name (the file stem for shipped ones).")
    description: str = Field("", description="One line: what the principles are for.")
    principles: list[Principle] = Field(..., min_length=1, description="The principles; one is drawn per example.")
    demonstration: Demonstration | None = Field(None, description="Optional one-shot critique/revision example.")

    @model_validator(mode="after")
    def _names(self) -> Constitution:
        names = [p.name for p in self.principles]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"principle names must be unique; repeated: {duplicates}")
        if self.demonstration is not None and self.demonstration.principle not in names:
            raise ValueError(f"demonstration.principle {self.demonstration.principle!r} is not one of the "
                             f"principles {names}")
        return self

    def sample(self, rng: random.Random) -> Principle:
        """One principle, uniformly at random (the caller's ``rng`` makes the draw reproducible)."""
        return self.principles[rng.randrange(len(self.principles))]

    def principle(self, name: str) -> Principle:
        """The principle called ``name`` (KeyError naming the known ones otherwise)."""
        for p in self.principles:
            if p.name == name:
                return p
        raise KeyError(f"constitution {self.name!r} has no principle {name!r}; it has "
                       f"{[p.name for p in self.principles]}")


# ------------------------------------------------------------------------------------------------ loading


def shipped_constitutions() -> list[str]:
    """Names of the constitutions that ship with alignkit."""
    return shipped_names("constitutions")


def constitution_path(ref: str, *, base_dir: str | Path | None = None) -> Path:
    """The file ``ref`` names: a bare name is a shipped constitution, anything else a path."""
    roots = [Path(base_dir)] if base_dir is not None else []
    if _is_bare_name(ref):
        path = find("constitutions", ref, roots)
        if path is None:
            raise RecipeError(f"no shipped constitution {ref!r}; shipped: {shipped_constitutions()}. "
                              "Give a path to your own YAML file instead.")
        return path
    path = Path(ref).expanduser()
    candidates = [path] if path.is_absolute() else [
        (root / path).resolve() for root in [*roots, Path.cwd(), shipped_root()]]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise RecipeError(f"constitution file {ref!r} not found; looked in: "
                          + ", ".join(str(c) for c in dict.fromkeys(candidates)))
    if is_shipped(found):
        note("constitutions", ref, found)
    return found


def load_constitution(ref: str | Path, *, base_dir: str | Path | None = None) -> Constitution:
    """Load and validate a constitution; errors are RecipeErrors naming the file and the field."""
    path = constitution_path(str(ref), base_dir=base_dir)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise RecipeError(f"not valid YAML: {err}", file=str(path)) from None
    if not isinstance(raw, dict):
        raise RecipeError("a constitution is a mapping with name, description and principles; got "
                          f"{type(raw).__name__}", file=str(path))
    raw.setdefault("name", path.stem)
    try:
        return Constitution.model_validate(raw)
    except ValidationError as err:
        # a misspelt key also reports the real key as missing: name the misspelling first
        first = min(err.errors(), key=lambda e: e["type"] != "extra_forbidden")
        field = ".".join(str(part) for part in first["loc"]) or None
        raise RecipeError(_describe(first, raw), file=str(path), field=field) from None


def _is_bare_name(ref: str) -> bool:
    return "/" not in ref and "\\" not in ref and not ref.endswith((".yaml", ".yml"))


def _describe(error: dict[str, Any], raw: dict[str, Any]) -> str:
    """A pydantic error as one sentence (the field path is added by RecipeError)."""
    if error["type"] == "missing":
        return "required field is missing"
    if error["type"] == "extra_forbidden":
        return "unknown field; allowed: name, description, principles, demonstration (a principle has " \
               "name, critique, revision, comparison)"
    return error["msg"].removeprefix("Value error, ")
