"""``alignkit run RECIPE --dry-run`` takes a couple of seconds: validation, the plan and the data check import none
of torch, transformers, trl or accelerate (each takes seconds), nor ``datasets`` for plain JSONL or built-in data.

Checked on what a fresh process has imported when the dry run ends, which, unlike a timing, does not depend on
the machine's load.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "trl", "accelerate", "datasets")
DRY_RUN = f"""
import json, sys
from alignkit.cli import main
code = main(sys.argv[1:])
print(json.dumps({{"code": code, "imported": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""


def dry_run(recipe: Path, output_dir: Path) -> dict:
    """``alignkit run RECIPE --dry-run`` in a fresh process: its exit code and the heavy modules it imported."""
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", DRY_RUN, "run", str(recipe), "--dry-run", "--output-dir",
                           str(output_dir)], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["code"] == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return result


# rntp's reward program imports alignkit.maths.rntp (pure Python), and alignkit/maths/__init__.py re-exports the
# torch modules eagerly: until that package imports them lazily, its dry run imports torch
SHIPPED = [pytest.param(path, id=path.stem) for path in sorted((REPO / "recipes").glob("*.yaml"))]


@pytest.mark.parametrize("recipe", SHIPPED)
def test_dry_run_of_shipped_recipe_imports_no_training_library(recipe, tmp_path):
    assert dry_run(recipe, tmp_path / "runs")["imported"] == []


def test_dry_run_of_plain_jsonl_data_needs_no_training_library(tmp_path):
    """sft on prompt/completion and on ``messages`` rows, dpo on implicit-prompt pairs, grpo on problems."""
    def chat(*turns: str) -> list[dict[str, str]]:
        return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]

    files = {
        "pc.jsonl": [{"prompt": "2+2?", "completion": "4"}] * 3,
        "chat.jsonl": [{"messages": chat("Q", "A")}] * 3,
        "pairs.jsonl": [{"chosen": chat("Q", "good"), "rejected": chat("Q", "bad")}] * 2,
        "problems.jsonl": [{"prompt": "2+2?", "answer": "4", "steps": []}, {"prompt": "3+3?", "answer": 6}],
    }
    for name, rows in files.items():
        (tmp_path / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    recipe = tmp_path / "plain.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        name: plain
        tracking: {{report_to: none}}
        defaults: {{model: smollm2-135m-instruct}}
        stages:
          - kind: sft
            data: [{tmp_path / 'pc.jsonl'}, {tmp_path / 'chat.jsonl'}]
            accuracy_data: {tmp_path / 'problems.jsonl'}
          - kind: dpo
            model: ${{sft.model}}
            data: {tmp_path / 'pairs.jsonl'}
        """))
    assert dry_run(recipe, tmp_path / "runs")["imported"] == []


ROWS = {  # format -> sets of rows: each must be refused by the light check exactly when building a Dataset is
    "sft": [
        [{"prompt": "Q", "completion": "A"}, {"prompt": "R", "completion": "B"}],
        [{"prompt": "Q", "completion": "A"}, {"prompt": [{"role": "user", "content": "Q"}], "completion": "A"}],
        [{"prompt": [{"role": "user", "content": "Q", "name": "x"}], "completion": "A"},
         {"prompt": [{"role": "user", "content": "Q", "name": 1}], "completion": "A"}],
        [{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}],
        [{"messages": [{"role": "user", "content": "Q"}]}, {"prompt": "Q", "completion": "A"}],
        [{"prompt": "bad \ud800 text", "completion": "A"}],
    ],
    "problems": [
        [{"prompt": "Q", "answer": "1", "steps": []}, {"prompt": "R", "answer": "2", "steps": ["a"]}],
        [{"prompt": "Q", "answer": "1", "values": [1, 2]}, {"prompt": "R", "answer": "2", "values": [3]}],
        [{"prompt": "Q", "answer": "1", "values": ["x"]}],
        [{"prompt": "Q", "answer": "1", "values": [2 ** 70]}],
        [{"prompt": "Q", "answer": "1", "values": [1]}, {"prompt": "R", "answer": "2"}],
    ],
    "stepwise": [[{"prompt": "Q", "completions": ["a", "b"], "labels": [True, False], "soft_labels": [0.9, 0.1]}]],
}
CASES = [pytest.param(fmt, rows, id=f"{fmt}-{i}") for fmt, sets in ROWS.items() for i, rows in enumerate(sets)]


@pytest.mark.parametrize("fmt, rows", CASES)
def test_light_row_check_refuses_what_building_the_dataset_refuses(fmt, rows):
    from alignkit.data.loading import _to_dataset, check_rows

    def outcome(check) -> str:
        try:
            check([dict(row) for row in rows], fmt)
        except Exception as err:  # a DataError, or whatever building the Dataset raises
            return f"{type(err).__name__}: {err}"
        return "ok"

    assert outcome(check_rows) == outcome(_to_dataset)


def test_extract_prompt_agrees_with_trl():
    from trl.data_utils import extract_prompt as trl_extract_prompt

    from alignkit.data.formats import extract_prompt

    def chat(*turns: str) -> list[dict[str, str]]:
        return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]

    examples = [
        {"chosen": chat("Q", "good"), "rejected": chat("Q", "bad")},
        {"chosen": chat("Q", "A", "R", "yes"), "rejected": chat("Q", "A", "R", "no")},
        {"chosen": chat("Q", "same"), "rejected": chat("Q", "same")},
        {"chosen": chat("Q", "A", "more"), "rejected": chat("Q", "A")},
        {"chosen": chat("P", "x"), "rejected": chat("Q", "x")},
        {"chosen": "The sky is blue.", "rejected": "The sky is green."},
        {"chosen": "Q: hi A: yes", "rejected": "Q: hi A: no"},
        {"chosen": "abc", "rejected": "abcd"},
    ]
    for example in examples:
        assert extract_prompt(dict(example)) == trl_extract_prompt(dict(example)), example
