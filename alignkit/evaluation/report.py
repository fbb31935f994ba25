"""What an eval leaves behind: report.md, metrics.json, samples.jsonl, accuracy_vs_n.png, W&B logs, and
the short table printed at the end.

Everything here reads the ``outcome`` dict that :func:`alignkit.stages.eval.run_suite` builds (``suite``,
``model``, ``summary``, ``metrics``, ``curves``, ``notes``, and ``problems`` for a problems suite or
``records`` for a preference/stepwise one) and writes files; nothing is computed that the report alone
would show, so metrics.json is the source of truth.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from alignkit.core.artifacts import write_json_atomic

PLOT = "accuracy_vs_n.png"
COMPUTE_PLOT = "accuracy_vs_tokens.png"
_MAX_TRACKED_SAMPLES = 500  # rows of the W&B samples table; the full set is in samples.jsonl


def method_title(label: str) -> str:
    """Readable name of a curve label (``bon_prm_min`` -> ``best-of-N (PRM, min)``).

    >>> method_title("pass"), method_title("wvote_orm"), method_title("bon_prm_last"), method_title("dvts2")
    ('pass@N', 'weighted vote (ORM)', 'best-of-N (PRM, last)', 'DVTS2 (PRM)')
    """
    if label == "pass":
        return "pass@N"
    if label == "maj":
        return "majority vote"
    if label.startswith(("beam", "dvts")):  # PRM-guided searches (alignkit.evaluation.search): N = beams
        number = label[4:]  # "beam2": the second beam search of the suite
        return ("beam search" if label.startswith("beam") else "DVTS") + number + " (PRM)"
    method, _, score = label.partition("_")
    verifier, _, how = score.partition("_")
    name = {"bon": "best-of-N", "wvote": "weighted vote"}[method]
    return f"{name} ({verifier.upper()}{', ' + how if how else ''})"


def _finite(value: Any) -> Any:
    """NaN/inf become None so metrics.json stays standard JSON."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def sample_rows(outcome: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat row per completion (problems) or per labelled row (preference/stepwise)."""
    if "problems" not in outcome:
        return outcome["records"]
    rows = []
    for problem in outcome["problems"]:
        pairs = ([("greedy", problem["greedy"])] if problem["greedy"] else []) + list(enumerate(problem["samples"]))
        for which, sample in pairs:
            rows.append({"problem": problem["index"], "sample": which, "prompt": problem["prompt"],
                         "gold": problem["gold"], "completion": sample["text"], "answer": sample["answer"],
                         "correct": sample["correct"], "finish_reason": sample["finish_reason"],
                         "tokens": sample["tokens"], "scores": sample.get("scores", {}),
                         **({"prm_steps": sample["prm_steps"]} if "prm_steps" in sample else {})})
    return rows


def write_report(outcome: dict[str, Any], out_dir: Path, *, tracker: Any = None, prefix: str = "eval"
                 ) -> dict[str, str]:
    """Write every output file (and log them under ``prefix/`` when a tracker is given); returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    suite = outcome["suite"]
    rows = sample_rows(outcome)
    artifacts = {"report": str(out_dir / "report.md"), "metrics": str(out_dir / "metrics.json"),
                 "samples": str(out_dir / "samples.jsonl")}
    with open(artifacts["samples"], "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    write_json_atomic(Path(artifacts["metrics"]), {
        "suite": suite.name, "model": outcome["model"], "task": suite.task,
        "metrics": {k: _finite(v) for k, v in outcome["summary"].items()},
        "curves": {label: {str(n): acc for n, acc in curve.items()} for label, curve in outcome["curves"].items()},
        "generated_tokens": {label: {str(n): t for n, t in c.items()} for label, c in outcome.get("compute", {}).items()},
        "bands_95": {label: {str(n): list(band) for n, band in by_n.items()}
                     for label, by_n in outcome.get("bands", {}).items()},
        "compute_optimal": outcome.get("compute_optimal", []),
        "search_vs_sampling": outcome.get("search_vs_sampling", []),
        "notes": outcome["notes"], "suite_config": suite.model_dump(mode="json")})
    if outcome["curves"]:
        artifacts["plot"] = str(out_dir / PLOT)
        plot_curves(outcome, Path(artifacts["plot"]))
    if suite.task == "problems" and suite.search:
        artifacts["compute_plot"] = str(out_dir / COMPUTE_PLOT)
        plot_compute(outcome, Path(artifacts["compute_plot"]))
    Path(artifacts["report"]).write_text(markdown_report(outcome), encoding="utf-8")
    if tracker is not None:
        log_to_tracker(tracker, outcome, rows, artifacts, prefix)
    return artifacts


# ------------------------------------------------------------------------------------------------ plot


# One colour per verifier score, the same in both panels; pass@N and majority vote are in every panel.
_COLORS = {"pass": "black", "maj": "tab:blue", "orm": "tab:orange", "prm_min": "tab:green",
           "prm_prod": "tab:red", "prm_last": "tab:purple", "prm_mean": "tab:brown", "beam": "tab:cyan",
           "dvts": "tab:olive"}
# Where families share a colour (the compute plot draws them on one axis): weighted votes dash-dotted with
# squares, searches thicker with diamonds.
_STYLES = {"wvote": ("-.", "s", 1.5), "beam": ("-", "D", 2.5), "dvts": ("-", "D", 2.5)}
_FAMILIES = (("best-of-N", "bon_"), ("weighted vote", "wvote_"))


def plot_panels(curves: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """``[(panel title, curve labels)]``: one panel per verifier family (each with pass@N and majority as
    references), or a single panel when no verifier ran.

    >>> plot_panels({"pass": {}, "maj": {}, "bon_orm": {}, "wvote_orm": {}})
    [('best-of-N', ['pass', 'maj', 'bon_orm']), ('weighted vote', ['pass', 'maj', 'wvote_orm'])]
    """
    shared = [label for label in curves if label in ("pass", "maj")]
    panels = [(title, shared + [label for label in curves if label.startswith(prefix)])
              for title, prefix in _FAMILIES if any(label.startswith(prefix) for label in curves)]
    return panels or [("", shared)]


def _draw(ax: Any, label: str, curve: dict[int, float], band: dict[int, tuple[float, float]] | None = None,
          x: dict[int, float] | None = None) -> None:
    """pass@N (an oracle upper bound) dashed; every other method solid with markers; the 95% bootstrap band
    over problems shaded. ``x`` places the points (default N; generated tokens in the compute plot)."""
    ns = sorted(curve)
    xs = [x[n] for n in ns] if x else ns
    family, _, score = label.partition("_")
    linestyle, marker, width = _STYLES.get(family, ("--" if label == "pass" else "-", "o", 1.5))
    line, = ax.plot(xs, [100 * curve[n] for n in ns], color=_COLORS.get(score or family), marker=marker,
                    markersize=4, linestyle=linestyle, linewidth=width, label=method_title(label))
    if band:
        ax.fill_between(xs, [100 * band[n][0] for n in ns], [100 * band[n][1] for n in ns],
                        color=line.get_color(), alpha=0.12, linewidth=0)


def plot_curves(outcome: dict[str, Any], path: Path) -> None:
    """Accuracy vs N on a log2 x-axis (the papers' figure): a panel per selection family, greedy dotted."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    suite, curves = outcome["suite"], outcome["curves"]
    ns = sorted({n for curve in curves.values() for n in curve})
    greedy = outcome["metrics"].get("greedy")
    values = [100 * acc for curve in curves.values() for acc in curve.values()]
    values += [100 * greedy] if greedy is not None else []
    pad = max(5.0, 0.08 * (max(values) - min(values)))
    panels = plot_panels(curves)
    fig, axes = plt.subplots(1, len(panels), figsize=(6.0 * len(panels), 4.6), dpi=120, sharey=True,
                             squeeze=False)
    for ax, (title, labels) in zip(axes[0], panels):
        for label in labels:
            _draw(ax, label, curves[label], outcome.get("bands", {}).get(label))
        if greedy is not None:
            ax.axhline(100 * greedy, color="grey", linestyle=":", label=f"greedy ({100 * greedy:.1f}%)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.minorticks_off()
        ax.set_ylim(max(-1.0, min(values) - pad), min(101.0, max(values) + pad))  # 0% stays off the axis
        ax.set_yticks([t for t in ax.get_yticks() if 0 <= t <= 100])
        ax.set_xlabel("N (samples per problem, log scale)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    axes[0][0].set_ylabel("accuracy (%)")
    no_answer = outcome["summary"].get("no_answer_rate", 0.0)
    fig.suptitle(f"{suite.name}: {Path(str(outcome['model'])).name}\n{len(outcome['problems'])} problems, "
                 f"{suite.sampling.n} samples at T={suite.sampling.temperature}; "
                 f"{100 * no_answer:.0f}% of samples state no answer", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_compute(outcome: dict[str, Any], path: Path) -> None:
    """Accuracy vs generated tokens per problem (log x): sampling methods at N samples' worth of tokens and the
    PRM-guided searches at what they really sampled, so methods compare at equal compute."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 4.6), dpi=120)
    for label, tokens in outcome["compute"].items():
        _draw(ax, label, outcome["curves"][label], outcome.get("bands", {}).get(label), x=tokens)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("generated tokens per problem (log scale)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(f"{outcome['suite'].name}: accuracy vs compute", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def compute_table(outcome: dict[str, Any]) -> list[list[str]]:
    """Rows of ``method | N | accuracy % | generated tokens per problem``, the header first."""
    rows = [["method", "N", "accuracy (%)", "tokens / problem"]]
    for label, tokens in outcome.get("compute", {}).items():
        for n in sorted(tokens):
            rows.append([method_title(label), str(n), f"{100 * outcome['curves'][label][n]:.1f}", f"{tokens[n]:.0f}"])
    return rows


# ----------------------------------------------------------------------------------------- report text


def curve_table(outcome: dict[str, Any]) -> list[list[str]]:
    """Rows of ``method | N=1 | N=2 | ...`` (accuracy in %), the header first."""
    curves = outcome["curves"]
    ns = sorted({n for curve in curves.values() for n in curve})
    rows = [["method"] + [f"N={n}" for n in ns]]
    for label, curve in curves.items():
        rows.append([method_title(label)] + [f"{100 * curve[n]:.1f}" if n in curve else "" for n in ns])
    return rows


def format_table(outcome: dict[str, Any]) -> str:
    """The short text table printed when an eval finishes."""
    suite = outcome["suite"]
    lines = [f"[eval] {suite.name} on {outcome['model']}"]
    if not outcome["curves"]:
        lines += [f"  {k}: {v:.4f}" if isinstance(v, float) else f"  {k}: {v}" for k, v in outcome["metrics"].items()]
        return "\n".join(lines)
    if "greedy" in outcome["metrics"]:
        lines.append(f"  greedy: {100 * outcome['metrics']['greedy']:.1f}%")
    rows = curve_table(outcome)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines += ["  " + "  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
              for row in rows]
    return "\n".join(lines + [f"  note: {note}" for note in outcome["notes"]])


def _markdown_table(rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
            + ["| " + " | ".join(row) + " |" for row in rows[1:]])


def search_vs_sampling_table(rows: list[dict[str, Any]]) -> list[list[str]]:
    """Per search point, the pairing with the strongest sampling method (the smallest search - method)."""
    strongest: dict[tuple[str, int], dict[str, Any]] = {}
    for row in rows:
        key = (row["search"], row["n"])
        if key not in strongest or row["diff"] < strongest[key]["diff"]:
            strongest[key] = row
    table = [["search", "N", "tokens / problem", "strongest sampling method (N, tokens)", "search - it (points) [95%]"]]
    for (label, n), row in sorted(strongest.items()):
        low, high = row["band"]
        table.append([method_title(label), str(n), f"{row['tokens']:.0f}",
                      f"{method_title(row['method'])} ({row['method_n']}, {row['method_tokens']:.0f})",
                      "{:+.1f} [{:+.1f}, {:+.1f}]".format(*(round(100 * x, 1) + 0.0 for x in (row["diff"], low, high)))])
    return table


def markdown_report(outcome: dict[str, Any]) -> str:
    """report.md: settings, the accuracy table and plot, pool health, notes, a few examples."""
    suite, summary = outcome["suite"], outcome["summary"]
    s = suite.sampling
    lines = [f"# Eval `{suite.name}`: `{outcome['model']}`", "", suite.description, "",
             f"- task: {suite.task}; dataset: `{suite.dataset.source}`"
             + (f" (`{suite.dataset.path}`)" if suite.dataset.path else ""),
             f"- grader: `{suite.grader.program}`; verifiers: ORM `{suite.orm}`, PRM `{suite.prm}`"]
    if outcome["curves"]:
        lines.append(f"- sampling: n={s.n}, temperature={s.temperature}, top_p={s.top_p}, top_k={s.top_k}, "
                     f"max_completion_length={s.max_completion_length}, seed={s.seed}; curves average {suite.draws} "
                     "subsets per N (all of them when fewer)")
        lines += ["", "## Accuracy (%)", ""]
        if "greedy" in outcome["metrics"]:
            lines += [f"Greedy: **{100 * outcome['metrics']['greedy']:.1f}**", ""]
        lines += _markdown_table(curve_table(outcome)) + ["", f"![accuracy vs N]({PLOT})", "", "## Sample pool", ""]
        lines += [f"- {key}: {summary[key]:.4g}" for key in ("no_answer_rate", "truncated_rate", "mean_tokens",
                                                               "samples_per_s") if key in summary]
        if suite.search:
            lines += ["", "## Accuracy vs compute", "", "Sampling methods cost N samples' tokens; a search costs what "
                      "it sampled (N = its beams).", ""]
            lines += _markdown_table(compute_table(outcome)) + ["", f"![accuracy vs tokens]({COMPUTE_PLOT})"]
            if outcome.get("search_vs_sampling"):
                lines += ["", "## Search vs sampling at no more compute (paired)", "",
                          "Each search point against the sampling method that does best on no more tokens per problem "
                          "(its largest N within the search's budget); the difference is paired over problems, with "
                          "its 95% bootstrap interval. Every pairing: `search_vs_sampling` in metrics.json.", ""]
                lines += _markdown_table(search_vs_sampling_table(outcome["search_vs_sampling"]))
            if outcome.get("compute_optimal"):
                lines += ["", "## Compute-optimal choice by difficulty", "",
                          "Problems in 3 buckets by the pool's pass rate (0 = hardest); at each budget (tokens per "
                          "problem) each bucket takes the method best on it, against the best single method. "
                          "The choice is made on the same problems (an upper bound for a difficulty predictor).", ""]
                lines += _markdown_table([["budget", "per bucket (hard -> easy)", "chosen (%)", "best single (%)"]] + [
                    [f"{row['budget']:.0f}", ", ".join(method_title(m) for m in row["per_bucket"]),
                     f"{100 * row['chosen']:.1f}", f"{100 * row['single']:.1f} ({method_title(row['single_method'])})"]
                    for row in outcome["compute_optimal"]])
    else:
        lines += ["", "## Metrics", ""] + [f"- {k}: {_finite(v)}" for k, v in outcome["metrics"].items()]
    if outcome["notes"]:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in outcome["notes"]]
    if outcome["curves"] and suite.examples:
        lines += ["", "## Examples", ""] + _examples(outcome["problems"], suite.examples)
    return "\n".join(lines) + "\n"


def _examples(problems: list[dict[str, Any]], count: int) -> list[str]:
    """The first problems' prompt, gold and first sample (greedy when there is one)."""
    lines = []
    for problem in problems[:count]:
        sample = problem["greedy"] or problem["samples"][0]
        which = "greedy" if problem["greedy"] else "sample 0"
        verdict = "correct" if sample["correct"] else "wrong"
        lines += [f"### Problem {problem['index']} (gold `{problem['gold']}`)", "", f"> {problem['prompt']}", "",
                  f"{which}, answer `{sample['answer']}` ({verdict}):", "", "```", sample["text"].strip(), "```", ""]
    return lines


# ---------------------------------------------------------------------------------------------- W&B


def log_to_tracker(tracker: Any, outcome: dict[str, Any], rows: list[dict[str, Any]], artifacts: dict[str, str],
                   prefix: str = "eval") -> None:
    """Numbers as metrics, curves and samples as tables, the plot as an image."""
    tracker.log({f"{prefix}/{k}": v for k, v in outcome["summary"].items() if isinstance(v, (int, float))})
    if outcome["curves"]:
        curve_rows = [[method_title(label), n, acc] for label, curve in outcome["curves"].items()
                      for n, acc in curve.items()]
        tracker.log_table(f"{prefix}/curves", ["method", "N", "accuracy"], curve_rows)
        tracker.log_image(f"{prefix}/accuracy_vs_n", artifacts["plot"])
    if rows:
        columns = list(rows[0])
        table = uniform_columns([[_cell(row.get(c)) for c in columns] for row in rows[:_MAX_TRACKED_SAMPLES]])
        tracker.log_table(f"{prefix}/samples", columns, table)


def uniform_columns(table: list[list[Any]]) -> list[list[Any]]:
    """W&B types a table column by its first row and refuses a later cell of another type ("greedy" above
    sample numbers 0, 1, ...): a column holding more than one type of value is written as text throughout.

    >>> uniform_columns([["greedy", 1.0], [0, 0.5], [1, None]])
    [['greedy', 1.0], ['0', 0.5], ['1', None]]
    """
    kinds = [{type(row[i]) for row in table if row[i] is not None} for i in range(len(table[0]) if table else 0)]
    mixed = [i for i, k in enumerate(kinds) if len(k) > 1 and k != {int, float}]
    return [[str(cell) if i in mixed and cell is not None else cell for i, cell in enumerate(row)] for row in table]


def _cell(value: Any) -> Any:
    """W&B table cells must be scalars or strings."""
    return value if isinstance(value, (str, int, float, bool)) or value is None else json.dumps(value)
