"""load_dataset / split_eval and the adapters: real GSM8K and HH files, hand-written rows, error messages."""

from __future__ import annotations

import gzip
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from alignkit.config import DataSpec
from alignkit.data import load_dataset, split_eval
from alignkit.data.adapters import (
    Prm800kParams,
    parse_gsm8k_answer,
    parse_math_shepherd,
    prm800k_row,
    rated_steps,
    split_transcript,
)
from alignkit.errors import DataError

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
GSM8K = DATA / "gsm8k" / "train.jsonl"
HH = DATA / "hh-rlhf" / "harmless-base-dev.jsonl.gz"
needs_gsm8k = pytest.mark.skipif(not GSM8K.exists(), reason="shared GSM8K data not present")
needs_hh = pytest.mark.skipif(not HH.exists(), reason="shared HH data not present")

ADAM = (
    "The amount of money deducted from Adam's daily pay is $40 / 10 = $<<40/10=4>>4.\n"
    "So after deducting 10%, Adam’s daily pay is $40 – $4 = $<<40-4=36>>36.\n"
    "This means that in 30 days he earns $36 * 30 = $<<36*30=1080>>1080.\n#### 1,080"
)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


# ---- gsm8k -------------------------------------------------------------------------------------------


def test_parse_gsm8k_answer_hand_checked():
    steps, answer = parse_gsm8k_answer(ADAM)
    assert answer == "1080"
    assert steps == [
        "The amount of money deducted from Adam's daily pay is $40 / 10 = $4.",
        "So after deducting 10%, Adam’s daily pay is $40 – $4 = $36.",
        "This means that in 30 days he earns $36 * 30 = $1080.",
    ]
    with pytest.raises(DataError, match="####"):
        parse_gsm8k_answer("no final line")


@needs_gsm8k
def test_gsm8k_train_file_parses_completely():
    ds = load_dataset(DataSpec(source="gsm8k", path=str(GSM8K)), "problems")
    assert len(ds) == 7473 and ds.column_names == ["prompt", "answer", "steps"]
    for answer in ds["answer"]:
        float(answer)  # numeric, commas removed
    assert not any("<<" in s or ">>" in s or not s for steps in ds["steps"] for s in steps)
    assert ds[0]["answer"] == "72" and ds[0]["steps"] == [
        "Natalia sold 48/2 = 24 clips in May.",
        "Natalia sold 48+24 = 72 clips altogether in April and May.",
    ]
    assert ds[345]["answer"] == "1080"
    # auto-detected from the file's columns; the sft view is our format
    sft = load_dataset(DataSpec(source=str(GSM8K), limit=2), "sft")
    assert sft[0]["completion"] == "\n".join(ds[0]["steps"] + ["The answer is 72."])
    assert sft[0]["prompt"].startswith("Natalia sold clips")


# ---- hh ----------------------------------------------------------------------------------------------


def test_split_transcript_and_hh_row_rules(tmp_path):
    rows = [
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Joke?\n\nAssistant:  A pun.",
         "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Joke?\n\nAssistant: No."},
        # prompts differ
        {"chosen": "\n\nHuman: A\n\nAssistant: x", "rejected": "\n\nHuman: B\n\nAssistant: y"},
        {"chosen": "\n\nHuman: A\n\nAssistant:", "rejected": "\n\nHuman: A\n\nAssistant: y"},  # empty reply
        {"chosen": "\n\nHuman: A\n\nHuman: more\n\nAssistant: x",
         "rejected": "\n\nHuman: A\n\nHuman: more\n\nAssistant: y"},
    ]
    ds = load_dataset(DataSpec(source=str(write_jsonl(tmp_path / "hh.jsonl", rows))), "preference")
    assert len(ds) == 2
    assert ds[0]["prompt"] == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Joke?"},
    ]
    assert ds[0]["chosen"] == [{"role": "assistant", "content": "A pun."}]
    assert ds[0]["rejected"] == [{"role": "assistant", "content": "No."}]
    assert ds[1]["prompt"] == [{"role": "user", "content": "A\n\nmore"}]  # same-speaker turns merged
    assert split_transcript("\n\nHuman: q\n\nAssistant: a") == [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


@needs_hh
def test_hh_dev_file_skips_and_counts_bad_rows(caplog):
    with caplog.at_level(logging.WARNING, logger="alignkit.data.loading"):
        ds = load_dataset(DataSpec(source="hh", path=str(HH)), "preference")
    # 1,800 rows; 4 have an empty final reply, 2 a prompt that ends on an Assistant turn (hand-counted)
    assert len(ds) == 1794
    assert "skipped 6 unusable rows" in caplog.text and "4 x empty final Assistant turn" in caplog.text
    for row in ds.select(range(200)):
        assert row["prompt"][0]["role"] == "user" and row["prompt"][-1]["role"] == "user"
        assert [m["role"] for m in row["chosen"] + row["rejected"]] == ["assistant", "assistant"]
    assert ds[0]["prompt"][0]["content"] == "what are some pranks with a pen i can do?"
    assert ds[0]["chosen"][0]["content"].startswith("No, sorry!")
    with pytest.raises(DataError, match=r"gives formats \['preference', 'prompts'\], not 'sft'"):
        load_dataset(DataSpec(source=str(HH)), "sft")


# ---- math-shepherd and prm800k -----------------------------------------------------------------------


def test_math_shepherd_rows(tmp_path):
    text = "Tom has 3 apples and buys 4. How many? Step 1: 3 + 4 = 7 ки\nStep 2: The answer is: 8 ки"
    label = "Tom has 3 apples and buys 4. How many? Step 1: 3 + 4 = 7 +\nStep 2: The answer is: 8 -"
    assert parse_math_shepherd(text, label) == {
        "prompt": "Tom has 3 apples and buys 4. How many?",
        "completions": ["Step 1: 3 + 4 = 7", "Step 2: The answer is: 8"],
        "labels": [True, False],
    }
    rows = [
        {"input": text, "label": label, "task": "GSM8K"},
        {"input": "Q ки no step one ки", "label": "Q + no step one -", "task": "GSM8K"},  # skipped
        {"input": text, "label": label.replace("7 +", "7 ?"), "task": "GSM8K"},  # malformed: row 2
    ]
    path = write_jsonl(tmp_path / "ms.jsonl", rows)
    mismatch = r"row 2 of .*ms.jsonl: math-shepherd: 'label' does not match 'input' at step 1"
    with pytest.raises(DataError, match=mismatch):
        load_dataset(DataSpec(source=str(path)), "stepwise")
    ds = load_dataset(DataSpec(source=str(path), limit=1), "stepwise")  # stops before the bad row
    assert ds[0]["labels"] == [True, False]


def test_prm800k_neutral_modes_and_nested_rows(tmp_path):
    steps = [("a", 1), ("b", 0), ("c", -1)]
    assert rated_steps("Q", steps, "negative")["labels"] == [True, False, False]
    assert rated_steps("Q", steps, "positive")["labels"] == [True, True, False]
    assert rated_steps("Q", steps, "drop") == {"prompt": "Q", "completions": ["a"], "labels": [True]}
    assert rated_steps("Q", [("b", 0)], "drop") is None
    nested = {
        "question": {"problem": "What is 2+3*4?"},
        "label": {"steps": [
            {"completions": [{"text": "3*4=12", "rating": 1}, {"text": "2+3=5", "rating": -1}],
             "chosen_completion": 0},
            {"completions": None, "human_completion": {"text": "2+12=14", "rating": None},
             "chosen_completion": None},
            {"completions": [{"text": "So 15.", "rating": -1}], "chosen_completion": None},
        ]},
    }
    [main] = prm800k_row(nested, Prm800kParams())
    full = {"prompt": "What is 2+3*4?", "completions": ["3*4=12", "2+12=14", "So 15."],
            "labels": [True, True, False]}
    assert main == full
    with_alts = prm800k_row(nested, Prm800kParams(alternatives=True))
    assert {"prompt": "What is 2+3*4?", "completions": ["2+3=5"], "labels": [False]} in with_alts
    assert full in with_alts and len(with_alts) == 3  # the chosen path, the "2+3=5" branch, the terminal path
    flat = [{"prompt": "Q", "steps": ["a", "b", "c"], "ratings": [1, 0, -1]}]
    path = write_jsonl(tmp_path / "prm.jsonl", flat + [nested])
    ds = load_dataset(DataSpec(source="prm800k", path=str(path), params={"neutral": "positive"}), "stepwise")
    assert ds["labels"] == [[True, True, False], [True, True, False]]
    with pytest.raises(DataError, match="params.neutral"):
        load_dataset(DataSpec(source="prm800k", path=str(path), params={"neutral": "maybe"}), "stepwise")
    with pytest.raises(DataError, match="not on the Hub: pass `path:`"):
        load_dataset(DataSpec(source="prm800k"), "stepwise")


# ---- local files, columns, limit/shuffle -------------------------------------------------------------

ROWS = [{"question": f"q{i}", "response": f"r{i}", "prompt": "stray", "n": i} for i in range(20)]


@pytest.mark.parametrize("name", ["d.jsonl", "d.jsonl.gz", "d.json", "d.json.gz", "d.csv", "d.parquet"])
def test_local_file_types_with_column_mapping(tmp_path, name):
    path = tmp_path / name
    if ".json" in name:
        write_jsonl(path, ROWS)
    else:
        from datasets import Dataset

        table = Dataset.from_list(ROWS)
        table.to_csv(str(path), index=False) if name.endswith(".csv") else table.to_parquet(str(path))
    spec = DataSpec(source=str(path), columns={"prompt": "question", "completion": "response"})
    ds = load_dataset(spec, "sft")
    assert ds.column_names == ["prompt", "completion"]  # the stray `prompt` column lost to the mapping
    assert ds["prompt"] == [f"q{i}" for i in range(20)] and ds["completion"][3] == "r3"
    text = load_dataset(spec, "text")
    assert text[2]["text"] == "q2\nr2"


def test_shuffle_happens_before_limit(tmp_path):
    path = str(write_jsonl(tmp_path / "d.jsonl", ROWS))
    columns = {"prompt": "question", "completion": "response"}

    def prompts(**kw) -> list[str]:
        return list(load_dataset(DataSpec(source=path, columns=columns, shuffle=True, **kw), "sft")["prompt"])

    full, five, other = prompts(seed=3), prompts(seed=3, limit=5), prompts(seed=4, limit=5)
    assert five == full[:5] and sorted(full) == sorted(f"q{i}" for i in range(20))
    assert five != [f"q{i}" for i in range(5)] and other != five
    assert load_dataset(DataSpec(source="arith", limit=7, params={"n": 50}), "sft").num_rows == 7


def test_generic_stepwise_and_problems_rows_are_checked(tmp_path):
    rows = [{"prompt": "p", "completions": ["a", "b"], "labels": [1, 0], "soft_labels": [0.9, 0.2]}]
    ds = load_dataset(DataSpec(source=str(write_jsonl(tmp_path / "s.jsonl", rows))), "stepwise")
    assert ds[0] == {**rows[0], "labels": [True, False]}
    bad = rows + [{"prompt": "p", "completions": ["a", "b"], "labels": [True], "soft_labels": [0.1, 0.2]}]
    with pytest.raises(DataError, match=r"row 1 of .*s2.jsonl: column 'labels' must be 2 booleans"):
        load_dataset(DataSpec(source=str(write_jsonl(tmp_path / "s2.jsonl", bad))), "stepwise")
    problems = [{"q": "How many?", "a": "1,234"}, {"q": "And now?", "a": 7}]
    ds = load_dataset(DataSpec(source=str(write_jsonl(tmp_path / "p.jsonl", problems)),
                               columns={"prompt": "q", "answer": "a"}), "problems")
    assert ds["answer"] == ["1234", "7"] and ds["steps"] == [[], []]


# ---- errors --------------------------------------------------------------------------------------------


def test_missing_columns_message_names_needed_found_and_source(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"instruction": "i", "output": "o"}])
    with pytest.raises(DataError) as err:
        load_dataset(DataSpec(source=str(path)), "sft")
    message = str(err.value)
    assert "x.jsonl" in message and "['prompt', 'completion']" in message
    assert "found ['instruction', 'output']" in message
    with pytest.raises(DataError, match=r"`columns:` maps to \['question'\]"):
        load_dataset(DataSpec(source=str(path), columns={"prompt": "question"}), "sft")


def test_empty_and_malformed_inputs(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="no rows"):
        load_dataset(DataSpec(source=str(empty)), "sft")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": \n')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        load_dataset(DataSpec(source=str(broken)), "sft")
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": None}, {"prompt": "c"}]
    with pytest.raises(DataError, match=r"row 1 of .*: column 'completion' must be a non-empty string"):
        load_dataset(DataSpec(source=str(write_jsonl(tmp_path / "m.jsonl", rows))), "sft")
    with pytest.raises(DataError, match=r"row 1 of .*m2.jsonl: missing column 'completion'"):
        load_dataset(DataSpec(source=str(write_jsonl(tmp_path / "m2.jsonl", rows[::2]))), "sft")
    gsm = [{"question": "q", "answer": "x\n#### 3"}, {"question": "q", "answer": "no marker"}]
    with pytest.raises(DataError, match=r"row 1 of .*: gsm8k: 'answer' has no '#### N'"):
        load_dataset(DataSpec(source="gsm8k", path=str(write_jsonl(tmp_path / "g.jsonl", gsm))), "problems")
    with pytest.raises(DataError, match="file not found"):
        load_dataset(DataSpec(source=str(tmp_path / "missing.jsonl")), "sft")
    with pytest.raises(DataError, match="unknown data format"):
        load_dataset(DataSpec(source="arith"), "chat")


def test_hub_failure_becomes_data_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"'openai/gsm8k'.*Offline\? Pass a local file"):
        load_dataset(DataSpec(source="gsm8k"), "problems")
    with pytest.raises(DataError, match=r"'someone/some-set'.*ConnectionError: no network"):
        load_dataset(DataSpec(source="someone/some-set"), "sft")


# ---- split_eval and laziness ---------------------------------------------------------------------------


def test_split_eval_counts_fractions_and_errors():
    ds = load_dataset(DataSpec(source="arith", params={"n": 40}), "sft")
    train, held = split_eval(ds, 10, seed=0)
    assert (len(train), len(held)) == (30, 10)
    assert sorted(list(train["prompt"]) + list(held["prompt"])) == sorted(ds["prompt"])
    again, other = split_eval(ds, 10, seed=0)[1], split_eval(ds, 10, seed=1)[1]
    assert list(again["prompt"]) == list(held["prompt"]) != list(other["prompt"])
    assert len(split_eval(ds, 0.25, seed=0)[1]) == 10
    assert split_eval(ds, None, seed=0) == (ds, None)
    for bad in (40, 1.5, True):
        with pytest.raises(DataError, match="eval_size"):
            split_eval(ds, bad, seed=0)


def test_importing_the_data_layer_does_not_import_datasets():
    code = "import sys, alignkit.data; assert 'datasets' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_docstring_examples():
    import doctest

    import alignkit.data
    from alignkit.data import adapters, arith, formats

    for module in (alignkit.data, adapters, arith, formats):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__
