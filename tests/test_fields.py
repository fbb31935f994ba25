"""One meaning per field name across stage kinds, old names read for one release, and docs/recipes.md."""

from __future__ import annotations

from pathlib import Path

import pytest

from alignkit.core.errors import RecipeError
from alignkit.run.fields import SHARED_FIELDS, markdown_table, old_names, stage_fields
from alignkit.run.recipe import parse_recipe

DOCS = Path(__file__).resolve().parents[1] / "docs" / "recipes.md"
# Synonyms the issue found (the KL weight, the group size, the clip, the length budget): none is a current field.
SYNONYMS = {"kl_coef", "clip_eps", "value_clip_eps", "samples_per_prompt", "samples_per_problem",
            "max_new_tokens", "solution_max_new_tokens", "continuation_max_new_tokens", "accuracy_max_new_tokens",
            "response_max_new_tokens", "critique_max_new_tokens", "revision_max_new_tokens", "cot_max_new_tokens"}


def test_every_shared_field_has_one_listed_meaning():
    shared = {name for name, kinds in stage_fields().items() if len(kinds) > 1}
    assert shared - set(SHARED_FIELDS) == set(), "add the field's one meaning to SHARED_FIELDS"
    assert set(SHARED_FIELDS) - shared == set(), "a listed field is no longer shared"


def test_no_stage_uses_an_old_name_or_a_synonym():
    current = set(stage_fields())
    assert SYNONYMS & current == set()
    olds = old_names()
    assert SYNONYMS <= set(olds)  # each is read, for one release, as its new name
    # an old name may be a current name elsewhere only if it meant something else there (then defaults skip it)
    assert {old for old in olds if old in current} <= {"max_steps"}


def test_docs_show_the_current_table():
    assert markdown_table() in DOCS.read_text(encoding="utf-8")


def _recipe(stage: dict, defaults: dict | None = None) -> dict:
    raw = {"name": "r", "stages": [{"kind": "label", "model": "m", "data": {"source": "arith"}, **stage}]}
    if defaults:
        raw["defaults"] = defaults
    return raw


def test_old_names_are_read_with_one_note_and_keep_the_config_hash(tmp_path):
    new = parse_recipe(_recipe({"num_generations": 3, "max_solution_steps": 5}), file="r.yaml", base_dir=tmp_path)
    old = parse_recipe(_recipe({"samples_per_problem": 3, "max_steps": 5}), file="r.yaml", base_dir=tmp_path)
    assert new.notes == ()
    assert [n.split(": ", 2)[2] for n in old.notes] == [
        "`samples_per_problem` is now `num_generations`; the old name is read until alignkit 0.3 "
        "(docs/recipes.md lists every field)",
        "`max_steps` is now `max_solution_steps`; the old name is read until alignkit 0.3 "
        "(docs/recipes.md lists every field)"]
    assert old.stages[0].config == new.stages[0].config
    assert old.stages[0].hash == new.stages[0].hash  # renaming a field never reruns a finished stage


def test_setting_both_names_is_an_error(tmp_path):
    with pytest.raises(RecipeError, match="`samples_per_problem` is the old name of `num_generations`"):
        parse_recipe(_recipe({"samples_per_problem": 3, "num_generations": 2}), file="r.yaml", base_dir=tmp_path)


def test_defaults_never_reach_a_field_by_an_old_name(tmp_path):
    # `max_steps` means optimizer steps; label's old `max_steps` (a filter) must not pick it up from defaults
    recipe = parse_recipe({"name": "r", "defaults": {"max_steps": 2}, "stages": [
        {"kind": "sft", "model": "m", "data": {"source": "arith"}},
        {"kind": "label", "model": "m", "data": {"source": "arith"}}]}, file="r.yaml", base_dir=tmp_path)
    assert recipe.stages[0].config.max_steps == 2
    assert recipe.stages[1].config.max_solution_steps == 16  # its own default, untouched
    with pytest.raises(RecipeError, match="no stage in this recipe has a field 'samples_per_problem'; "
                                          "it was renamed num_generations"):
        parse_recipe(_recipe({}, defaults={"samples_per_problem": 3}), file="r.yaml", base_dir=tmp_path)


def test_nested_blocks_read_old_names(tmp_path):
    raw = {"name": "r", "stages": [{"kind": "dpo", "model": "m", "pairs": {
        "prompts": {"source": "arith"}, "samples_per_prompt": 3, "max_new_tokens": 32,
        "rewards": [{"program": "reward/math.py:answer_match"}]}}]}
    recipe = parse_recipe(raw, file="r.yaml", base_dir=tmp_path)
    pairs = recipe.stages[0].config.pairs
    assert (pairs.num_generations, pairs.max_completion_length) == (3, 32)
    assert len(recipe.notes) == 2


def test_shipped_recipes_use_current_names_only():
    from alignkit.run.recipe import load_recipe
    from alignkit.run.shipped import shipped_dir

    for path in sorted(shipped_dir("recipes").glob("*.yaml")):
        assert load_recipe(path).notes == (), path.name
