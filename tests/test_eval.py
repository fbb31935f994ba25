"""Eval suites: the runner wires the estimators right (a fake engine with planned answers and fake verifiers,
numbers worked by hand), shards resume, reports and plots are written, the stage runs in a recipe, the CLI
runs, and the GSM8K grader agrees with every reference solution of the shared train file."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import pytest

from alignkit.core import shards
from alignkit.core.errors import RecipeError
from alignkit.evaluation.report import method_title
from alignkit.evaluation.suite import (
    CORRECT_KEY,
    Suite,
    first_error,
    load_suite,
    merge,
    parse_sets,
    stepwise_metrics,
    vote_key,
)
from alignkit.generation import Completion
from alignkit.stages.eval import eval_main, run_suite

REPO = Path(__file__).resolve().parents[1]
GSM8K_TRAIN = REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"

# Three problems, four planned samples each: (completion, ORM score, PRM step scores). Hand-worked values
# are in the test below; "maybe" lines carry no answer.
PLAN = {
    "p-a": ("5", "The answer is 5.", [
        ("Add 2: 3 + 2 = 5.\nThe answer is 5.", 0.1, [0.9, 0.5]),
        ("Add 2: 3 + 2 = 3.\nThe answer is 3.", 2.0, [0.6, 0.7]),
        ("Add 0: 3 + 0 = 3.\nThe answer is 3.", -1.0, [0.2, 0.3]),
        ("I am not sure.\nMaybe later.", 5.0, [1.0, 1.0]),
    ]),
    "p-b": ("7", "The answer is 2.", [
        ("Add 4: 3 + 4 = 7.\nThe answer is 7.", 0.0, [0.5, 0.5]),
        ("Add 4: 3 + 4 = 7.\nSo the answer is 7.", 1.0, [0.5, 0.5]),
        ("Subtract 1: 3 - 1 = 2.\nThe answer is 2.", 3.0, [0.4, 0.9]),
        ("3 + 4 = 7.\nThe answer is $7$.", -2.0, [0.5, 0.5]),
    ]),
    "p-c": ("4", "I do not know.", [
        ("2 - 1 = 1.\nThe answer is 1.", -1.0, [0.1, 0.1]),
        ("1 + 1 = 2.\nThe answer is 2.", 0.0, [0.1, 0.1]),
        ("0 + 1 = 1.\nThe answer is 1.", 1.0, [0.1, 0.1]),
        ("2 + 2 = 4.\nThe answer is 4.", 2.0, [0.8, 0.25]),
    ]),
}
TEXTS = {text: (orm, prm) for _, _, samples in PLAN.values() for text, orm, prm in samples}


class PlannedEngine:
    """Returns the planned completions: greedy for temperature 0, else the planned samples in order."""

    def __init__(self):
        self.prompts: list[str] = []

    def generate(self, prompts, params, *, progress=True):
        self.prompts += prompts
        out = []
        for prompt in prompts:
            _, greedy, samples = PLAN[prompt.strip()]
            texts = [greedy] if params.temperature == 0 else [t for t, _, _ in samples][:params.n]
            out.append([Completion(text=t, token_ids=[1] * len(t.split()), finish_reason="eos") for t in texts])
        return out


class FakeORM:
    def __init__(self):
        self.calls = 0

    def __call__(self, completions, prompts):
        self.calls += 1
        return [TEXTS[c][0] for c in completions]


class FakePRM:
    def __init__(self):
        self.calls = 0

    def score_batch(self, prompts, steps_lists):
        self.calls += 1
        return [TEXTS["\n".join(steps)][1] for steps in steps_lists]


class Exploding:
    """An engine or verifier that must not be called (everything it would do is already on disk)."""

    def generate(self, *args, **kwargs):
        raise AssertionError("engine called although every shard was complete")

    def __call__(self, *args, **kwargs):
        raise AssertionError("ORM called although every shard was scored")


def planned_suite(tmp_path: Path, **overrides) -> Suite:
    data = tmp_path / "planned.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "answer": gold}) + "\n" for p, (gold, _, _) in PLAN.items()))
    raw = {"name": "planned", "dataset": {"source": str(data)}, "prompt": {"chat": False},
           "sampling": {"n": 4, "seed": 0}, "shard_size": 2, "shuffle": False}  # keep the planned order
    return Suite.model_validate(merge(raw, overrides))


def test_runner_numbers_equal_hand_worked_values(tmp_path):
    orm, prm = FakeORM(), FakePRM()
    result = run_suite(planned_suite(tmp_path), "planned-model", tmp_path / "out", engine=PlannedEngine(),
                       orm_scorer=orm, prm_scorer=prm, echo=lambda *_: None)
    m = result["metrics"]
    # greedy: only problem a's greedy answer (5) is right.
    assert m["greedy"] == pytest.approx(1 / 3)
    # pass@k = 1 - C(n-c, k)/C(n, k) with n=4 and c = 1, 3, 1 correct samples.
    assert m["pass@1"] == pytest.approx((1 / 4 + 3 / 4 + 1 / 4) / 3)
    assert m["pass@2"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    assert m["pass@4"] == 1.0
    # maj@4: a votes 3 (x2) over 5, b votes 7, c votes 1 (x2). maj@2 over the 6 pairs (ties go to the
    # earlier sample): a 3/6, b 5/6, c 0/6.
    assert m["maj@4"] == pytest.approx(1 / 3)
    assert m["maj@2"] == pytest.approx((3 / 6 + 5 / 6 + 0) / 3)
    assert m["maj@1"] == pytest.approx(m["pass@1"])
    # best-of-4 by ORM picks the top-scored sample that has an answer: a 3 (x), b 2 (x), c 4 (ok);
    # best-of-2 over the 6 pairs: a 2/6, b 3/6, c 3/6.
    assert m["bon_orm@4"] == pytest.approx(1 / 3)
    assert m["bon_orm@2"] == pytest.approx((2 / 6 + 3 / 6 + 3 / 6) / 3)
    # weighted vote sums sigmoid(score): b: 7 gets s(0)+s(1)+s(-2) = 1.35 > s(3) = 0.95 (raw sums would
    # give -1 < 3 and pick 2); a: 3 wins 1.15 to 0.52; c: 1 wins 1.0 to 0.88.
    assert m["wvote_orm@4"] == pytest.approx(1 / 3)
    # PRM best-of-4: min picks a 3, b 7, c 4; prod picks a 5, b 2, c 4; last picks a 3, b 2, c 4.
    assert (m["bon_prm_min@4"], m["bon_prm_prod@4"], m["bon_prm_last@4"]) == pytest.approx((2 / 3, 2 / 3, 1 / 3))
    # PRM-min weighted vote: a 3 (0.8 > 0.5), b 7 (1.5 > 0.4), c 4 (0.25 > 0.2).
    assert m["wvote_prm_min@4"] == pytest.approx(2 / 3)
    assert result["summary"]["no_answer_rate"] == pytest.approx(1 / 12)
    assert orm.calls == prm.calls == 2  # one call per shard (2 problems + 1 problem)


class RecordingTracker:
    def __init__(self):
        self.logged, self.tables, self.images = {}, {}, {}

    def log(self, metrics, step=None):
        self.logged.update(metrics)

    def log_table(self, key, columns, rows):
        self.tables[key] = (columns, rows)

    def log_image(self, key, path):
        self.images[key] = Path(path)


def test_shuffled_pool_is_a_permutation(tmp_path):
    """Shuffling (the default) reorders each problem's samples; order-free numbers do not move."""
    planned = run_suite(planned_suite(tmp_path), "m", tmp_path / "a", engine=PlannedEngine(), orm_scorer=FakeORM(),
                        echo=lambda *_: None)
    shuffled = run_suite(planned_suite(tmp_path, shuffle=True), "m", tmp_path / "b", engine=PlannedEngine(),
                         orm_scorer=FakeORM(), echo=lambda *_: None)
    texts = [[s["text"] for s in p["samples"]] for p in shuffled["problems"]]
    assert texts != [[t for t, _, _ in samples] for _, _, samples in PLAN.values()]
    assert [sorted(t) for t in texts] == [sorted(t for t, _, _ in samples) for _, _, samples in PLAN.values()]
    for key in ("pass@1", "pass@2", "pass@4", "maj@4", "bon_orm@4", "wvote_orm@4", "maj@1"):
        assert shuffled["metrics"][key] == pytest.approx(planned["metrics"][key])


def test_outputs_report_plot_samples_and_tracking(tmp_path):
    out, tracker = tmp_path / "out", RecordingTracker()
    run_suite(planned_suite(tmp_path), "planned-model", out, engine=PlannedEngine(), orm_scorer=FakeORM(),
              tracker=tracker, echo=lambda *_: None)
    assert tracker.logged["eval/maj@2"] == pytest.approx(4 / 9) and tracker.images["eval/accuracy_vs_n"].is_file()
    columns, curve_rows = tracker.tables["eval/curves"]
    assert columns == ["method", "N", "accuracy"] and ["best-of-N (ORM)", 4, pytest.approx(1 / 3)] in curve_rows
    columns, sample_rows = tracker.tables["eval/samples"]
    assert len(sample_rows) == 15 and sample_rows[0][columns.index("scores")] == "{}"  # greedy: no scores
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["curves"]["maj"] == {"1": pytest.approx(5 / 12), "2": pytest.approx(4 / 9), "4": pytest.approx(1 / 3)}
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * (4 + 1)
    row = next(r for r in rows if r["problem"] == 1 and r["sample"] == 3)
    assert (row["answer"], row["correct"], row["scores"]) == ("$7$", True, {"orm": -2.0})
    report = (out / "report.md").read_text()
    assert "| majority vote | 41.7 | 44.4 | 33.3 |" in report and "accuracy_vs_n.png" in report
    png = (out / "accuracy_vs_n.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_shards_resume_and_go_stale(tmp_path):
    out = tmp_path / "out"
    suite = planned_suite(tmp_path)
    first = run_suite(suite, "m", out, engine=PlannedEngine(), orm_scorer=FakeORM(), echo=lambda *_: None)
    # Everything on disk: neither the engine nor the ORM (same verifier name) runs again; same numbers.
    again = run_suite(suite, "m", out, engine=Exploding(), orm_scorer=_renamed(Exploding(), "FakeORM"),
                      echo=lambda *_: None)
    assert again["metrics"] == first["metrics"]
    # A lost shard is redone alone: only problem c (shard 1) is sampled.
    shards.path(out / "shards" / "samples", 1).unlink()
    engine, orm = PlannedEngine(), FakeORM()
    run_suite(suite, "m", out, engine=engine, orm_scorer=orm, echo=lambda *_: None)
    assert [p.strip() for p in engine.prompts] == ["p-c", "p-c"] and orm.calls == 1  # greedy + samples
    # Another sampling temperature makes every shard stale.
    engine = PlannedEngine()
    run_suite(planned_suite(tmp_path, sampling={"temperature": 0.5}), "m", out, engine=engine,
              echo=lambda *_: None)
    assert len(engine.prompts) == 6 and not shards.path(out / "shards" / "orm", 0).exists()


def test_half_written_shards_are_redone_and_complete_ones_kept(tmp_path):
    """What a kill -9 leaves behind: counts without rows, a torn temp file. Only those shards are redone,
    and the numbers equal the uninterrupted run's."""
    out, suite = tmp_path / "out", planned_suite(tmp_path)
    first = run_suite(suite, "m", out, engine=PlannedEngine(), orm_scorer=FakeORM(), prm_scorer=FakePRM(),
                      echo=lambda *_: None)
    first_rows = (out / "samples.jsonl").read_text()
    samples, orm_dir, prm_dir = (out / "shards" / kind for kind in ("samples", "orm", "prm"))
    assert sorted(p.name for p in samples.iterdir()) == [
        "shard-00000.jsonl", "shard-00000.meta.json", "shard-00001.jsonl", "shard-00001.meta.json"]
    # killed while writing sample shard 1 (its counts were in place, its rows only in a temp file) ...
    shards.path(samples, 1).unlink()
    (samples / ".shard-00001.jsonl.4242.tmp").write_text('{"index": 2, "prompt": "p-')
    # ... and, in another run, while writing ORM shard 0
    shards.path(orm_dir, 0).unlink()
    engine, orm, prm = PlannedEngine(), FakeORM(), FakePRM()
    again = run_suite(suite, "m", out, engine=engine, orm_scorer=orm, prm_scorer=prm, echo=lambda *_: None)
    assert [p.strip() for p in engine.prompts] == ["p-c", "p-c"]  # greedy + samples of shard 1 only
    assert (orm.calls, prm.calls) == (2, 1)  # ORM: shard 0 (half-written), shard 1 (sampled again); PRM: shard 1
    assert all(shards.meta(d, k)["model"] == f"<Fake{d.name.upper()}>" for d in (orm_dir, prm_dir) for k in (0, 1))
    assert again["metrics"] == first["metrics"] and (out / "samples.jsonl").read_text() == first_rows


def test_ranks_stripe_the_shards_and_count_what_one_process_counts(tmp_path):
    """Rank r of w samples and scores the shards K % w == r; the main process counts the union."""
    suite = planned_suite(tmp_path, shard_size=1)  # three shards: rank 0 takes 0 and 2, rank 1 takes 1
    one = run_suite(suite, "m", tmp_path / "one", engine=PlannedEngine(), orm_scorer=FakeORM(), echo=lambda *_: None)
    out, engines, orms, waits = tmp_path / "two", [PlannedEngine(), PlannedEngine()], [FakeORM(), FakeORM()], []

    def barrier():  # rank 1 runs to the end while rank 0 waits at its first barrier (after the stale check)
        if not waits:
            assert run_suite(suite, "m", out, engine=engines[1], orm_scorer=orms[1], rank=1, world=2,
                             echo=lambda *_: None) is None
        waits.append(1)

    two = run_suite(suite, "m", out, engine=engines[0], orm_scorer=orms[0], rank=0, world=2, barrier=barrier,
                    echo=lambda *_: None)
    assert [p.strip() for p in engines[0].prompts] == ["p-a", "p-a", "p-c", "p-c"]
    assert [p.strip() for p in engines[1].prompts] == ["p-b", "p-b"]
    assert (orms[0].calls, orms[1].calls, len(waits)) == (2, 1, 2)
    assert two["metrics"] == one["metrics"]


def _renamed(obj, name):
    """``obj`` under another class name (the verifier name recorded in score shards)."""
    return type(name, (type(obj),), {})()


def test_no_verifier_skips_verifier_methods_with_a_note(tmp_path):
    result = run_suite(planned_suite(tmp_path, ns=[1, 4]), "m", tmp_path / "out", engine=PlannedEngine(),
                       echo=lambda *_: None)
    assert set(result["curves"]) == {"pass", "maj"} and "pass@2" not in result["metrics"]
    assert any("best_of_n not run" in note for note in result["notes"])


def test_preference_and_stepwise_suites(tmp_path):
    # arith's planted errors always make the answer larger, so an ORM that prefers smaller final
    # answers ranks every pair right, and one preferring larger answers every pair wrong.
    class AnswerORM:
        def __init__(self, sign):
            self.sign = sign

        def __call__(self, completions, prompts):
            return [self.sign * float(c.rsplit(" ", 1)[-1].rstrip(".")) for c in completions]

    raw = {"name": "pairs", "task": "preference", "dataset": {"source": "arith", "params": {"n": 6, "steps": 2}}}
    for sign, expected in ((-1, 1.0), (1, 0.0)):
        result = run_suite(Suite.model_validate(raw), "m", tmp_path / f"pref{sign}", orm_scorer=AnswerORM(sign),
                           echo=lambda *_: None)
        assert result["metrics"]["pairwise_accuracy"] == expected
    steps = tmp_path / "steps.jsonl"
    steps.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "q1", "completions": ["a", "b", "c"], "labels": [True, False, False]},
        {"prompt": "q2", "completions": ["a", "b"], "labels": [True, True]}]))

    class PlannedPRM:
        def score_batch(self, prompts, steps_lists):
            return [{"q1": [0.9, 0.2, 0.7], "q2": [0.8, 0.6]}[p] for p in prompts]

    stepwise = Suite.model_validate({"name": "steps", "task": "stepwise", "dataset": {"source": str(steps)}})
    result = run_suite(stepwise, "m", tmp_path / "steps", prm_scorer=PlannedPRM(), echo=lambda *_: None)
    assert result["metrics"]["step_accuracy"] == pytest.approx(4 / 5)  # step 3 of q1 judged right, is wrong
    assert (result["metrics"]["first_error_found"], result["metrics"]["first_error_f1"]) == (1.0, 1.0)
    with pytest.raises(RecipeError, match="PRM"):
        run_suite(stepwise, "m", tmp_path / "none", echo=lambda *_: None)


# ------------------------------------------------------------------------------------- pure pieces


def test_stepwise_metrics_hand_worked():
    scores = [[0.9, 0.2, 0.7], [0.8, 0.6], [0.9, 0.9], [0.3, 0.9]]
    labels = [[True, False, False], [True, True], [True, False], [True, True]]
    m = stepwise_metrics(scores, labels, 0.5)
    # 6 of 9 steps right; bad steps found: tp 1 (row 1 step 2), fp 1 (row 4 step 1), fn 2 -> F1 2/5.
    assert (m["step_accuracy"], m["step_f1"]) == pytest.approx((6 / 9, 0.4))
    # first errors: truth 1, -, 1, -; predicted 1, -, -, 0 -> found 1/2, kept 1/2, harmonic mean 1/2.
    assert (m["first_error_found"], m["no_error_kept"], m["first_error_f1"]) == pytest.approx((0.5, 0.5, 0.5))
    assert math.isnan(stepwise_metrics([[0.9]], [[True]], 0.5)["first_error_f1"])  # no erroneous solution
    assert stepwise_metrics([[0.9], [0.1]], [[False], [True]], 0.5)["first_error_f1"] == 0.0
    assert first_error([True, True, False]) == 2 and first_error([True]) == -1


def test_small_helpers():
    assert vote_key(True, "3") == CORRECT_KEY and vote_key(False, "3") == "3" and vote_key(False, None) is None
    assert parse_sets(["sampling.n=8", "dataset.params.n=5", "prompt.system=Be brief"]) == {
        "sampling": {"n": 8}, "dataset": {"params": {"n": 5}}, "prompt": {"system": "Be brief"}}
    assert method_title("bon_prm_min") == "best-of-N (PRM, min)"
    suite = Suite.model_validate({"name": "s", "dataset": "arith", "sampling": {"n": 12}})
    assert suite.curve_ns() == [1, 2, 4, 8, 12] and suite.grader.program == "reward/math.py:answer_match"


def test_shipped_suites_load_and_bad_fields_name_the_field(tmp_path):
    arith, gsm8k = load_suite(REPO / "eval" / "arith.yaml"), load_suite(REPO / "eval" / "gsm8k.yaml")
    assert arith.curve_ns() == [1, 2, 4, 8, 16] and gsm8k.dataset.source == "gsm8k"
    for name in ("arith-search", "gsm8k-search"):  # every search runs at each N it can (dvts: multiples of 4)
        labels = [label for label, _ in load_suite(REPO / "eval" / f"{name}.yaml").search_runs()]
        assert labels == ["beam@1", "beam@2", "beam@4", "beam@8", "beam@16", "dvts@4", "dvts@8", "dvts@16"], name
    assert sorted(p.stem for p in (REPO / "eval").glob("*.yaml")) == ["arith", "arith-search", "gsm8k",
                                                                      "gsm8k-search"]
    with pytest.raises(RecipeError) as err:
        load_suite(REPO / "eval" / "arith.yaml", {"sampling": {"nn": 3}})
    assert err.value.field == "sampling.nn"
    with pytest.raises(RecipeError, match="outside"):
        load_suite(REPO / "eval" / "arith.yaml", {"ns": [32]})


# ------------------------------------------------------------------------------ real model, pipeline, CLI

TINY_SUITE = """
name: tiny
dataset: {source: arith, seed: 3, params: {n: 3, steps: 1}}
sampling: {n: 2, max_completion_length: 6}
generation: {backend: fast, batch_size: 8}
shard_size: 2
"""


def test_stage_in_a_recipe_and_the_cli(tmp_path, tiny_model_dir, tiny_seqcls_dir, tiny_tokencls_dir):
    from alignkit.core.artifacts import Manifest
    from alignkit.run.pipeline import run_recipe
    from alignkit.run.recipe import load_recipe

    (tmp_path / "tiny.yaml").write_text(textwrap.dedent(TINY_SUITE))
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(textwrap.dedent(f"""
        name: evalrun
        tracking: {{report_to: none}}
        stages:
          - kind: eval
            suite: tiny.yaml
            model: {tiny_model_dir}
            overrides: {{dataset: {{params: {{n: 4}}}}}}
    """))
    recipe = load_recipe(recipe_file, output_dir=str(tmp_path / "runs"))
    outcomes = run_recipe(recipe, echo=lambda *_: None)
    manifest = Manifest.read(recipe.stage("eval").run_dir)
    assert outcomes[0].action == "ran" and manifest.status == "done"
    assert manifest.metrics["problems"] == 4 and 0.0 <= manifest.metrics["pass@2"] <= 1.0
    assert Path(manifest.artifacts["plot"]).stat().st_size > 10_000
    assert len(Path(manifest.artifacts["samples"]).read_text().splitlines()) == 4 * 3
    bad = recipe_file.read_text().replace("params: {n: 4}", "params: {n: 4}}, sampling: {temp: 1")
    recipe_file.write_text(bad)
    with pytest.raises(RecipeError, match=r"stages\.eval\.overrides\.sampling\.temp"):
        load_recipe(recipe_file, output_dir=str(tmp_path / "runs"))

    # The CLI, with the real verifier scorers (tiny random ORM and PRM) behind the hooks.
    out = tmp_path / "cli"
    code = eval_main([str(tmp_path / "tiny.yaml"), "--model", str(tiny_model_dir), "--out", str(out),
                      "--orm", str(tiny_seqcls_dir), "--prm", str(tiny_tokencls_dir),
                      "--set", "methods=[pass, best_of_n]", "--set", "prm_aggregations=[min]"])
    saved = json.loads((out / "metrics.json").read_text())
    assert code == 0 and set(saved["curves"]) == {"pass", "bon_orm", "bon_prm_min"} and saved["metrics"]["problems"] == 3
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 2 and all(set(r["scores"]) == {"orm", "prm_min"} for r in rows)
    assert all(0.0 <= p <= 1.0 for r in rows for p in r["prm_steps"])


def test_the_cli_under_accelerate_launch_splits_the_work_and_reports_once(tmp_path, tiny_model_dir, tiny_tokencls_dir):
    """`accelerate launch -m alignkit eval` on two processes: each rank takes its shards (a rank that thought itself
    the only one would sample, score and search everything again and write its own report), the main process
    writes one report, equal to a one-process run's."""
    import os
    import subprocess
    import sys

    from helpers import CPU_2PROC

    (tmp_path / "tiny.yaml").write_text(textwrap.dedent(TINY_SUITE).replace("shard_size: 2", "shard_size: 1") +
                                        "search: [{method: beam, expand: 2, max_steps: 2, max_step_tokens: 4}]\n"
                                        "search_ns: [1, 2]\n")
    common = [str(tmp_path / "tiny.yaml"), "--model", str(tiny_model_dir), "--prm", str(tiny_tokencls_dir),
              "--set", "dataset.params.n=4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_2PROC), "-m",
                          "alignkit", "eval", *common, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert two.stdout.count("[eval] report:") == 1, two.stdout[-3000:]
    assert eval_main([*common, "--out", str(tmp_path / "one")]) == 0
    one, both = ({k: v for k, v in json.loads((tmp_path / out / "metrics.json").read_text())["metrics"].items()
                  if k != "samples_per_s"} for out in ("one", "two"))  # the same, but for the timing
    assert both == one and both["problems"] == 4 and "beam@2" in both
    # each process wrote its own shards: 4 sample shards, 4 per search, all complete
    for folder in [tmp_path / "two" / "shards" / "samples", *(tmp_path / "two" / "shards" / "search").iterdir()]:
        assert sorted(p.name for p in folder.glob("*.jsonl")) == [f"shard-{k:05d}.jsonl" for k in range(4)], folder


def test_a_second_eval_into_a_folder_in_use_is_refused_before_touching_it(tmp_path, tiny_model_dir):
    """A second `alignkit eval --out DIR` while one runs there (a changed setting would clear the first's shards
    mid-run): one line naming the folder, its holder and --out; nothing of the folder is touched."""
    from alignkit.core.errors import RunFolderBusy
    from alignkit.core.runlock import RunLock

    (tmp_path / "tiny.yaml").write_text(textwrap.dedent(TINY_SUITE))
    out = tmp_path / "out"
    (out / "shards").mkdir(parents=True)
    (out / "shards" / "keep.txt").write_text("the first run's")
    with RunLock(out):
        with pytest.raises(RunFolderBusy, match="in use by .*--out"):
            eval_main([str(tmp_path / "tiny.yaml"), "--model", str(tiny_model_dir), "--out", str(out)])
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == [".lock", "keep.txt"]
    assert eval_main([str(tmp_path / "tiny.yaml"), "--model", str(tiny_model_dir), "--out", str(out)]) == 0


# ----------------------------------------------------------------------------------------------- GSM8K


@pytest.mark.skipif(not GSM8K_TRAIN.is_file(), reason="the shared GSM8K train file is absent")
def test_gsm8k_grader_agrees_with_every_reference_solution():
    """Each gold solution graded as a completion against its gold answer must score 1, for all 7,473 rows:
    as the gsm8k adapter parses it (calculator annotations stripped, "The answer is N." last), and raw
    (the answer field itself: <<...>> annotations, "#### N" last)."""
    from alignkit.data.adapters import gsm8k_row
    from alignkit.data.loading import read_file
    from alignkit.rewards.programs import load_reward

    answer_match = load_reward("reward/math.py:answer_match")
    rows = read_file(GSM8K_TRAIN)
    records = [gsm8k_row(row)[0] for row in rows]
    gold = [r["answer"] for r in records]
    parsed = answer_match([r["completion"] for r in records], answer=gold)
    raw = answer_match([row["answer"] for row in rows], answer=gold)
    assert len(rows) == 7473
    assert [(i, records[i]["completion"][-80:], gold[i]) for i, s in enumerate(parsed) if s != 1.0] == []
    assert [(i, rows[i]["answer"][-80:], gold[i]) for i, s in enumerate(raw) if s != 1.0] == []


@pytest.mark.e2e
def test_smollm2_on_arith_writes_report_and_plot(tmp_path, smollm2_dir):
    out = tmp_path / "smol"
    suite = load_suite(REPO / "eval" / "arith.yaml", {"dataset": {"params": {"n": 3}}, "shard_size": 2,
                                                      "sampling": {"n": 4, "max_completion_length": 96}})
    result = run_suite(suite, str(smollm2_dir), out, echo=lambda *_: None)
    m = result["metrics"]
    assert m["pass@1"] <= m["pass@2"] <= m["pass@4"] <= 1.0 and 0.0 <= m["greedy"] <= 1.0
    assert result["summary"]["samples_per_s"] > 0 and result["summary"]["mean_tokens"] > 0
    assert (out / "accuracy_vs_n.png").stat().st_size > 10_000 and "## Examples" in (out / "report.md").read_text()
    assert len((out / "samples.jsonl").read_text().splitlines()) == 3 * 5


def test_docstring_examples():
    import doctest

    from alignkit.evaluation import report as evalreport
    from alignkit.evaluation import suite as evalsuite

    for module in (evalsuite, evalreport):
        result = doctest.testmod(module)
        assert result.failed == 0 and result.attempted > 0
