"""The one shard/resume scheme (alignkit.core.shards): numbering, striping over ranks, what counts as complete."""

from __future__ import annotations

import json

import pytest

from alignkit.core import shards


def test_items_count_and_striping():
    assert shards.count(10, 4) == 3 and shards.count(8, 4) == 2 and shards.count(0, 4) == 0
    assert [list(shards.items(j, 10, 4)) for j in range(3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert shards.pending("/nonexistent", 10, 1, rank=1, world=3) == [1, 4, 7]


def test_complete_exactly_when_the_rows_exist(tmp_path):
    shards.write(tmp_path, 0, [{"index": 0}, {"index": 1}], {"n": 2})
    (tmp_path / "shard-00001.meta.json").write_text('{"n": 2}')  # killed after the counts, before the rows
    (tmp_path / ".shard-00001.jsonl.77.tmp").write_text('{"index": 2')  # ... with the rows half in a temp file
    assert shards.pending(tmp_path, 4, 2, 0, 1) == [1]
    assert shards.read(tmp_path, 0) == [{"index": 0}, {"index": 1}] and shards.meta(tmp_path, 0) == {"n": 2}
    with pytest.raises(RuntimeError, match=r"label shards \[1\] are missing"):
        shards.read_all(tmp_path, 2, "label")
    shards.write(tmp_path, 1, [{"index": 2}, {"index": 3}], {"n": 2})
    assert shards.read_all(tmp_path, 2, "label")[1] == ([{"index": 2}, {"index": 3}], {"n": 2})


def test_rewritten_shard_never_pairs_new_counts_with_old_rows(tmp_path, monkeypatch):
    """Writing a shard again drops its rows first: killed between the counts and the rows, it is pending."""
    import alignkit.core.shards as module

    shards.write(tmp_path, 0, [{"v": "old"}], {"model": "a"})

    def killed(path, rows):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "write_jsonl_atomic", killed)
    with pytest.raises(KeyboardInterrupt):
        shards.write(tmp_path, 0, [{"v": "new"}], {"model": "b"})
    assert shards.pending(tmp_path, 1, 1, 0, 1) == [0]
    assert json.loads((tmp_path / "shard-00000.meta.json").read_text()) == {"model": "b"}


def test_discard(tmp_path):
    shards.write(tmp_path, 3, [{"i": 1}], {})
    shards.discard(tmp_path, 3)
    shards.discard(tmp_path, 4)  # absent: nothing to do
    assert list(tmp_path.iterdir()) == []
