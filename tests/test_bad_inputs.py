"""The bad-input catalogue: every entry is one line on stderr naming the file and the field or row, exit 2,
no traceback, and nothing half-written that breaks a rerun. Add an entry for every new refusal."""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from alignkit.cli import main


@dataclass
class Case:
    name: str
    recipe: str | None  # recipe text ({model} and {tmp} filled in), or None for a non-`run` command
    expect: list[str]  # substrings of the one error line
    args: list[str] = field(default_factory=list)  # extra argv ({tmp} filled in)
    files: dict[str, bytes] = field(default_factory=dict)  # written under tmp before the run
    dry_run: bool = True  # refused at validation, before any model is loaded


def sft(extra: str) -> str:
    return textwrap.dedent("""\
        name: bad
        tracking: {report_to: none}
        stages:
          - kind: sft
            model: {model}
            data: arith
            max_steps: 2
        """) + textwrap.indent(textwrap.dedent(extra), "    ")


JSONL_OK = b'{"prompt": "1 + 1 = ?", "completion": "The answer is 2."}\n'
CASES = [
    Case("lr inf", sft("lr: .inf\n"), ["stages.sft.lr"]),
    Case("lr nan", sft("lr: .nan\n"), ["stages.sft.lr"]),
    Case("negative max_steps", sft("max_steps: -5\n").replace("    max_steps: 2\n", "", 1),
         ["stages.sft.max_steps", "-1 to train for `epochs`"]),
    Case("zero max_steps", sft("max_steps: 0\n").replace("    max_steps: 2\n", "", 1), ["stages.sft.max_steps"]),
    Case("duplicate key", sft("lr: 1.0e-4\nlr: 1.0e-3\n"), ["duplicate key 'lr'", "line"]),
    Case("mapping as a key", sft("{{lr: 1.0e-4}}: x\n"), ["a key must be a plain name", "doubled braces"]),
    Case("unknown field", sft("learning_rate: 1.0e-4\n"), ["stages.sft.learning_rate", "did you mean `lr`"]),
    Case("trl duplicates our field", sft("trl: {learning_rate: 0.5}\n"), ["stages.sft.trl.learning_rate", "`lr`"]),
    Case("trl secret", sft("trl: {hub_token: abc}\n"), ["stages.sft.trl.hub_token", "HF_TOKEN"]),
    Case("bad --set YAML", sft(""), ["--set 'stages.sft.lr=[1,'", "not valid YAML"],
         args=["--set", "stages.sft.lr=[1,"]),
    Case("--set without =", sft(""), ["expected KEY=VALUE"], args=["--set", "stages.sft.lr"]),
    Case("--set unknown stage", sft(""), ["no stage named 'dpo'"], args=["--set", "stages.dpo.lr=1"]),
    Case("--from unknown stage", sft(""), ["no stage named 'nope'"], args=["--from", "nope"]),
    Case("--from unknown stage, real run", sft(""), ["no stage named 'nope'"], args=["--from", "nope"],
         dry_run=False),
    Case("--output-dir under a regular file", sft(""), ["cannot use", "--output-dir"],
         args=["--output-dir", "{tmp}/afile/runs"], files={"afile": b"not a folder"}, dry_run=False),
    Case("recipe not UTF-8", "name: bad\xff\n", ["not UTF-8"]),
    Case("unknown recipe name", None, ["no recipe file or shipped recipe named 'quickstrat'"],
         args=["run", "quickstrat", "--dry-run"]),
    Case("missing recipe file", None, ["recipe file not found"], args=["run", "{tmp}/nope.yaml"]),
    Case("data not UTF-8", sft("data: {source: {tmp}/bad.jsonl}\n").replace("    data: arith\n", "", 1),
         ["bad.jsonl", "line 2", "not UTF-8"], files={"bad.jsonl": JSONL_OK + b'{"prompt": "\xff\xfe"}\n'},
         dry_run=False),
    Case("data is a directory", sft("data: {source: {tmp}/folder.jsonl}\n").replace("    data: arith\n", "", 1),
         ["folder.jsonl", "is a directory"], files={"folder.jsonl/": b""}, dry_run=False),
    Case("data line too long", sft("data: {source: {tmp}/huge.jsonl}\n").replace("    data: arith\n", "", 1),
         ["huge.jsonl", "line 2", "over the"],
         files={"huge.jsonl": JSONL_OK + json.dumps({"prompt": "x" * (5 << 20), "completion": "y"}).encode()},
         dry_run=False),
    Case("dry-run: bad row in a later stage's data",
         sft("").replace("    max_steps: 2\n", "    max_steps: 2\n  - kind: dpo\n    model: {model}\n"
                         "    data: {source: {tmp}/pairs.jsonl}\n", 1),
         ["data check: dpo.data (preference)", "row 1 of", "pairs.jsonl", "'rejected' must be"],
         files={"pairs.jsonl": b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n'
                               b'{"prompt": "p", "chosen": "a", "rejected": 3}\n'}),
    Case("grade: data not UTF-8", None, ["bad.jsonl", "UTF-8"],
         args=["grade", "{tmp}/bad.jsonl", "--reward", "reward/math.py:answer_match"],
         files={"bad.jsonl": b'{"completion": "The answer is 2.", "answer": "2"}\n{"completion": "\xff"}\n'}),
    Case("grade: file is a directory", None, ["folder.jsonl"],
         args=["grade", "{tmp}/folder.jsonl", "--reward", "reward/math.py:answer_match"],
         files={"folder.jsonl/": b""}),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_line_and_exit_2(case: Case, tmp_path: Path, tiny_model_dir: Path, capsys) -> None:
    for name, content in case.files.items():
        if name.endswith("/"):
            (tmp_path / name).mkdir()
        else:
            (tmp_path / name).write_bytes(content)
    args = [a.replace("{tmp}", str(tmp_path)) for a in case.args]
    if case.recipe is not None:
        recipe = tmp_path / "bad.yaml"
        text = case.recipe.replace("{model}", str(tiny_model_dir)).replace("{tmp}", str(tmp_path))
        recipe.write_bytes(text.encode("latin-1" if "\xff" in text else "utf-8"))  # latin-1: a raw 0xff byte
        args = ["run", str(recipe), "--output-dir", str(tmp_path / "runs"), *args]
        args += ["--dry-run"] if case.dry_run else []
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("alignkit: error:") and all(part in err for part in case.expect), err
    if case.recipe is not None and not case.files:
        assert not (tmp_path / "runs").exists()  # refused before anything was written


def test_bad_data_in_a_later_stage_is_refused_before_anything_runs(tmp_path: Path, tiny_model_dir: Path,
                                                                   capsys) -> None:
    (tmp_path / "later.jsonl").write_bytes(JSONL_OK + b'{"prompt": "2 + 2 = ?"}\n')  # row 2: no completion
    recipe = tmp_path / "two.yaml"
    recipe.write_text(sft("").replace("{model}", str(tiny_model_dir)) + textwrap.indent(textwrap.dedent(f"""\
          - kind: sft
            name: second
            model: {tiny_model_dir}
            data: {{source: {tmp_path}/later.jsonl}}
            max_steps: 2
        """), "  "))
    assert main(["run", str(recipe), "--output-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "later.jsonl" in err and "second" in err, err
    assert not (tmp_path / "runs").exists()  # the first stage never started
