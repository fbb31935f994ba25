"""load_dataset / split_eval and the adapters: real GSM8K and HH files, hand-written rows, error messages."""

from __future__ import annotations

import gzip
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from alignkit.core.config import DataSpec
from alignkit.data import load_dataset, split_eval
from alignkit.data.adapters import (
    Prm800kParams,
    parse_gsm8k_answer,
    parse_math_shepherd,
    prm800k_row,
    rated_steps,
    split_transcript,
)
from alignkit.core.errors import DataError

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


def test_skip_and_limit_cut_disjoint_slices_of_one_source(tmp_path):
    """held-out = limit 5; training = skip 5: no row in both, none lost; after the shuffle, as limit is."""
    path = str(write_jsonl(tmp_path / "d.jsonl", ROWS))
    columns = {"prompt": "question", "completion": "response"}

    def prompts(**kw) -> list[str]:
        return list(load_dataset(DataSpec(source=path, columns=columns, **kw), "sft")["prompt"])

    full = prompts(shuffle=True, seed=3)
    held, train, middle = prompts(shuffle=True, seed=3, limit=5), prompts(shuffle=True, seed=3, skip=5), \
        prompts(shuffle=True, seed=3, skip=5, limit=4)
    assert held == full[:5] and train == full[5:] and middle == full[5:9]
    assert prompts(skip=18) == ["q18", "q19"]
    arith = [row["prompt"] for row in load_dataset(DataSpec(source="arith", params={"n": 10}), "problems")]
    assert [row["prompt"] for row in load_dataset(DataSpec(source="arith", skip=7, params={"n": 10}), "problems")] \
        == arith[7:]
    mixed = DataSpec(source="mixture", skip=3, limit=2, mixture=[{"source": "arith", "params": {"n": 4}},
                                                                 {"source": "arith", "params": {"n": 4, "seed": 1}}])
    assert load_dataset(mixed, "problems").num_rows == 2
    with pytest.raises(DataError):
        load_dataset(DataSpec(source=path, columns=columns, skip=20), "sft")  # nothing left: an empty result
    with pytest.raises(ValueError):
        DataSpec(source=path, skip=-1)


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


# ---- TRL's conversational and implicit-prompt rows, save_to_disk folders, Hub subsets ---------------------


def chat(*turns: str) -> list[dict[str, str]]:
    """Alternating user/assistant messages."""
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


def test_messages_rows_load_as_sft_conversations(tmp_path):
    rows = [{"messages": chat("Hi", "Hello!", "2+2?", "4"), "id": 1}, {"messages": chat("Q", "A")}]
    ds = load_dataset(DataSpec(source=str(write_jsonl(tmp_path / "chat.jsonl", rows))), "sft")
    assert ds.column_names == ["messages"] and ds[0]["messages"] == rows[0]["messages"]
    bad = [rows[1], {"messages": chat("only a question")}]
    with pytest.raises(DataError, match=r"row 1 of .*bad.jsonl: column 'messages' has no non-empty assistant"):
        load_dataset(DataSpec(source=str(write_jsonl(tmp_path / "bad.jsonl", bad))), "sft")
    with pytest.raises(DataError, match=r"row 0 of .*: column 'messages' must be a non-empty list"):
        load_dataset(DataSpec(source=str(write_jsonl(tmp_path / "s.jsonl", [{"messages": "hi"}]))), "sft")
    # prompt/completion as message lists (TRL's conversational prompt-completion form) are kept as they are
    pc = [{"prompt": chat("Q"), "completion": [{"role": "assistant", "content": "A"}]}]
    ds = load_dataset(DataSpec(source=str(write_jsonl(tmp_path / "pc.jsonl", pc))), "sft")
    assert ds[0]["prompt"] == chat("Q") and ds[0]["completion"][0]["content"] == "A"
    # UltraChat-style rows carry a `prompt` string next to `messages`: the conversation is what trains
    ultra = [{"prompt": "Hi", "prompt_id": "x", "messages": chat("Hi", "Hello!")}]
    assert load_dataset(DataSpec(source=str(write_jsonl(tmp_path / "u.jsonl", ultra))), "sft").column_names == [
        "messages"]
    mixed = [{"prompt": "Q", "completion": "A"}, {"prompt": chat("Q"), "completion": "A"}]
    with pytest.raises(DataError, match="rows disagree on a column's type"):
        load_dataset(DataSpec(source=str(write_jsonl(tmp_path / "mixed.jsonl", mixed))), "sft")


def test_implicit_prompt_preference_rows(tmp_path):
    rows = [{"chosen": chat("Sky?", "Blue.", "Sure?", "Yes."), "rejected": chat("Sky?", "Blue.", "Sure?", "No.")},
            {"chosen": chat("Sun?", "Hot."), "rejected": chat("Sun?", "Cold.")}]
    path = str(write_jsonl(tmp_path / "implicit.jsonl", rows))
    ds = load_dataset(DataSpec(source=path), "preference")
    assert ds[0]["prompt"] == chat("Sky?", "Blue.", "Sure?")
    assert ds[0]["chosen"] == [{"role": "assistant", "content": "Yes."}]
    assert ds[1]["rejected"] == [{"role": "assistant", "content": "Cold."}]
    assert load_dataset(DataSpec(source=path), "prompts")["prompt"] == [chat("Sky?", "Blue.", "Sure?"), chat("Sun?")]
    # UltraFeedback-binarized style: a string prompt next to whole conversations -> the shared turns (as TRL)
    uf = [{"prompt": "Sun?", "chosen": chat("Sun?", "Hot."), "rejected": chat("Sun?", "Cold.")},
          {"prompt": "Moon?", "chosen": [{"role": "assistant", "content": "Grey."}],
           "rejected": [{"role": "assistant", "content": "Pink."}]}]
    ds = load_dataset(DataSpec(source=str(write_jsonl(tmp_path / "uf.jsonl", uf[:1]))), "preference")
    assert ds[0]["prompt"] == chat("Sun?") and ds[0]["chosen"] == [{"role": "assistant", "content": "Hot."}]
    ds = load_dataset(DataSpec(source=str(write_jsonl(tmp_path / "uf2.jsonl", uf[1:]))), "preference")
    assert ds[0]["prompt"] == "Moon?"  # replies-only conversations: the string prompt stays
    for row, message in [
        ({"chosen": chat("A", "x"), "rejected": chat("B", "y")}, "share no first turns"),
        ({"chosen": chat("A", "x"), "rejected": chat("A", "x")}, "are the same conversation"),
        ({"chosen": "A x", "rejected": "A y"}, "must both be whole conversations"),
    ]:
        with pytest.raises(DataError, match=rf"row 1 of .*bad.jsonl: .*{message}"):
            load_dataset(DataSpec(source=str(write_jsonl(tmp_path / "bad.jsonl", [rows[1], row]))), "preference")


def test_save_to_disk_folders(tmp_path):
    from datasets import Dataset, DatasetDict

    one = Dataset.from_list([{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(4)])
    one.save_to_disk(str(tmp_path / "one"))
    assert load_dataset(DataSpec(source=str(tmp_path / "one")), "sft")["prompt"] == ["q0", "q1", "q2", "q3"]
    DatasetDict({"train": one, "test": one.select([0])}).save_to_disk(str(tmp_path / "dict"))
    assert len(load_dataset(DataSpec(source=str(tmp_path / "dict"), split="test"), "sft")) == 1
    with pytest.raises(DataError, match=r"dict: saved DatasetDict has no split 'dev'; its splits are \['test', 'train'\]"):
        load_dataset(DataSpec(source=str(tmp_path / "dict"), split="dev"), "sft")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="is a directory, not a data file"):
        load_dataset(DataSpec(source=str(tmp_path / "plain")), "sft")


def test_hub_subset_and_data_files_reach_datasets(monkeypatch):
    import datasets

    calls = []

    def fake(name, config=None, split=None, **kwargs):
        calls.append((name, config, split, kwargs))
        return datasets.Dataset.from_list([{"prompt": "q", "completion": "a"}])

    monkeypatch.setattr(datasets, "load_dataset", fake)
    load_dataset(DataSpec(source="someone/set", subset="en", split="dev", data_files="data/dev-*.parquet"), "sft")
    load_dataset(DataSpec(source="someone/set"), "sft")
    assert calls == [("someone/set", "en", "dev", {"data_files": "data/dev-*.parquet"}),
                     ("someone/set", None, "train", {})]


def test_mixture_weights_and_checks(tmp_path):
    a = str(write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"a{i}", "completion": "x"} for i in range(4)]))
    b = str(write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"b{i}", "completion": "y"} for i in range(4)]))
    mix = DataSpec.model_validate([{"source": a, "weight": 2}, {"source": b, "weight": 0.5}])
    prompts = load_dataset(mix, "sft")["prompt"]
    assert sorted(p for p in prompts if p[0] == "a") == sorted([f"a{i}" for i in range(4)] * 2)
    assert len([p for p in prompts if p[0] == "b"]) == 2 and len(set(prompts)) == 6
    shuffled = DataSpec(source="mixture", mixture=[DataSpec(source=a), DataSpec(source=b)], shuffle=True, limit=5)
    assert len(load_dataset(shuffled, "sft")) == 5
    implicit = str(write_jsonl(tmp_path / "i.jsonl", [{"chosen": chat("Q", "good"), "rejected": chat("Q", "bad")}]))
    explicit = str(write_jsonl(tmp_path / "e.jsonl", [{"prompt": chat("R"), "chosen": [{"role": "assistant",
                                                      "content": "c"}], "rejected": [{"role": "assistant", "content": "r"}]}]))
    assert load_dataset(DataSpec.model_validate([implicit, explicit]), "preference")["prompt"] == [chat("Q"), chat("R")]
    for bad, words in [({"source": "mixture"}, "go together"), ({"mixture": [a], "columns": {"prompt": "q"}},
                       r"put \['columns'\] on its parts")]:
        with pytest.raises(ValueError, match=words):
            DataSpec.model_validate(bad)
    with pytest.raises(DataError, match=r"row 0 of .*bad.jsonl"):
        load_dataset(DataSpec.model_validate([a, str(write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p",
                                                                                         "completion": 3}]))]), "sft")


def test_mixture_parts_paths_resolve_from_the_recipe_folder(tmp_path, monkeypatch):
    from alignkit.core.errors import RecipeError
    from alignkit.run.recipe import load_recipe
    from alignkit.core.stage import STAGES

    monkeypatch.setitem(STAGES, "echo", "echo_stage")
    folder = tmp_path / "recipes"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"prompt": "p", "completion": "c"}])
    (folder / "r.yaml").write_text("name: m\nstages:\n  - kind: echo\n    data: [{source: ./a.jsonl, weight: 2}, arith]\n")
    monkeypatch.chdir(tmp_path)
    spec = load_recipe(folder / "r.yaml").stage("echo").config.data
    assert spec.mixture[0].source == str(folder / "a.jsonl") and spec.mixture[0].weight == 2
    (folder / "r.yaml").write_text("name: m\nstages:\n  - kind: echo\n    data: {mixture: [arith, ./no.jsonl]}\n")
    with pytest.raises(RecipeError, match="no.jsonl"):
        load_recipe(folder / "r.yaml")


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
    from alignkit.data import adapters, arith, formats, loading

    for module in (alignkit.data, adapters, arith, formats, loading):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__


def test_dry_run_checks_the_first_rows_of_every_local_dataset(tmp_path, tiny_model_dir, capsys):
    from datasets import Dataset

    from alignkit.cli import main

    chats = str(write_jsonl(tmp_path / "chat.jsonl", [{"messages": chat("Q", "A")}] * 3))
    pairs = str(write_jsonl(tmp_path / "pairs.jsonl", [{"chosen": chat("Q", "good"), "rejected": chat("Q", "bad")}]))
    Dataset.from_list([{"prompt": "p", "chosen": "c", "rejected": "r"}]).save_to_disk(str(tmp_path / "saved"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
name: dry
tracking: {{report_to: none}}
defaults: {{model: {tiny_model_dir}}}
stages:
  - kind: sft
    data: [{{source: {chats}, weight: 2}}, someone/hub-set]
  - kind: reward
    data: {{source: {tmp_path / 'saved'}}}
  - kind: dpo
    model: ${{sft.model}}
    data: {{source: {pairs}}}
""")
    assert main(["run", str(recipe), "--dry-run", "--output-dir", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "sft.data: part 0: ok (first 3 rows as 'sft'); part 1: skipped (Hub dataset)" in out
    assert "reward.data: ok (first 1 rows as 'preference')" in out and "dpo.data: ok" in out
    write_jsonl(tmp_path / "pairs.jsonl", [{"chosen": chat("Q", "good"), "rejected": chat("Q", "bad")},
                                          {"chosen": chat("Q", "same"), "rejected": chat("Q", "same")}])
    assert main(["run", str(recipe), "--dry-run", "--output-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "data check: dpo.data (preference): row 1 of" in err and "same conversation" in err
    assert not (tmp_path / "runs").exists()
