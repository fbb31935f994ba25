"""The eval sample table goes through a real offline W&B run (a fake tracker hid a type error)."""

from __future__ import annotations

import doctest

import alignkit.evaluation.report as evalreport
from alignkit.core.config import TrackingSpec
from alignkit.core.tracking import Tracker


def test_uniform_columns_docstring():
    assert doctest.testmod(evalreport).failed == 0


def test_samples_table_mixing_greedy_and_sample_numbers_logs_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    tracker = Tracker(TrackingSpec(report_to="wandb"), group="g", job_type="eval", name="eval", config={},
                      directory=tmp_path / "wandb")
    tracker.start()
    rows = [{"problem": 0, "sample": which, "completion": "The answer is 4.", "correct": which != 1,
             "scores": {"answer_match": 1.0}} for which in ("greedy", 0, 1)]
    outcome = {"summary": {"greedy_accuracy": 0.5}, "curves": {}}
    try:
        evalreport.log_to_tracker(tracker, outcome, rows, {})  # raised TypeError on "greedy" then 0
    finally:
        tracker.finish()
    assert list((tmp_path / "wandb").rglob("*.table.json")), "no table file written"
