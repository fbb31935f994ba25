"""Constitutions: the shipped files load, principles are drawn reproducibly, mistakes name file and field."""

from __future__ import annotations

import collections
import random
from pathlib import Path

import pytest

from alignkit.cai.constitution import (
    CONSTITUTIONS_DIR,
    Constitution,
    load_constitution,
    shipped_constitutions,
)
from alignkit.core.errors import RecipeError

GOOD = """\
name: mine
description: two principles
principles:
  - {name: a, critique: "find a", revision: "remove a", comparison: "which has less a?"}
  - {name: b, critique: "find b", revision: "remove b", comparison: "which has less b?"}
"""


def test_shipped_constitutions_load_with_distinct_principles():
    assert {"harmless", "helpful"} <= set(shipped_constitutions())
    harmless, helpful = load_constitution("harmless"), load_constitution("helpful")
    assert 10 <= len(harmless.principles) <= 16 and 3 <= len(helpful.principles) <= 6
    for c in (harmless, helpful):
        assert c.name == Path(CONSTITUTIONS_DIR / f"{c.name}.yaml").stem and c.description
        # every request is a full sentence, not a copy of another principle's
        assert len({p.critique for p in c.principles}) == len(c.principles)
        assert all(p.comparison.rstrip().endswith("?") for p in c.principles)
        assert c.demonstration is not None and c.principle(c.demonstration.principle)


def test_sample_is_uniform_and_reproducible():
    c = load_constitution("harmless")
    draws = [c.sample(random.Random(7)).name for _ in range(3)]
    assert len(set(draws)) == 1  # same seed, same principle
    rng = random.Random(0)
    counts = collections.Counter(c.sample(rng).name for _ in range(14_000))
    assert set(counts) == {p.name for p in c.principles}
    assert max(counts.values()) < 1.2 * 1000 and min(counts.values()) > 0.8 * 1000  # 14 principles, ~1000 each


def test_path_relative_to_base_dir_and_name_defaults_to_stem(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "rules.yaml").write_text(GOOD.replace("name: mine\n", ""))
    c = load_constitution("sub/rules.yaml", base_dir=tmp_path)
    assert isinstance(c, Constitution) and c.name == "rules" and [p.name for p in c.principles] == ["a", "b"]
    assert load_constitution(tmp_path / "sub" / "rules.yaml").principle("b").revision == "remove b"


@pytest.mark.parametrize("text, field, words", [
    (GOOD.replace('revision: "remove a", ', ""), "principles.0.revision", "missing"),
    (GOOD.replace('critique: "find b"', 'critque: "find b"'), "principles.1.critque", "unknown field"),
    (GOOD.replace("name: b", "name: a"), None, "unique"),
    ("name: x\nprinciples: []\n", "principles", "at least 1"),
    (GOOD + "demonstration: {principle: zz, prompt: p, response: r, critique: c, revision: v}\n", None, "'zz'"),
    ("- just a list\n", None, "mapping"),
])
def test_errors_name_file_and_field(tmp_path, text, field, words):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as info:
        load_constitution(str(path))
    assert info.value.file == str(path) and info.value.field == field
    assert words in str(info.value)


def test_unknown_names_and_missing_files():
    with pytest.raises(RecipeError, match=r"no shipped constitution 'nope'.*harmless"):
        load_constitution("nope")
    with pytest.raises(RecipeError, match="not found; looked in"):
        load_constitution("nowhere/rules.yaml")
