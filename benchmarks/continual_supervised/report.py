"""Report of the supervised continual control (``run.py``): markdown tables, a JSON summary and plots.

Reads ``<results>/<stream>/<method>/seed<k>/{tasks.csv, done.json}`` and writes into ``<results>``:

* ``report.md``: per stream, online accuracy per method (task 0, first and last 10 tasks, the final task, with 95%
  confidence intervals over seeds), the ε-rank at task starts, the R² of the task's online accuracy on its task-start
  ε-rank across tasks × methods (fixed ε, ε relative to the task-0 range, ε relative to the current range; feature
  rank, dormant fraction and log λmax for comparison), the λmax trajectory, and the tasks at which the ε-rank
  collapsed and the accuracy declined;
* ``summary.json``: the same numbers, machine-readable; ``tasks_mean.csv``: seed means per stream, method and task;
* ``accuracy.png``, ``epsilon_rank.png``, ``lambda_max.png``, ``features.png``, ``r2_scatter.png``.

Usage::

    python benchmarks/continual_supervised/report.py [--results DIR]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from analysis import r_squared
from methods import LABELS
from methods import METHODS as METHOD_ORDER

HERE = Path(__file__).resolve().parent
STREAM_TITLES = {"permuted": "Permuted digits", "random_labels": "Random-label digits"}
# ε-rank definitions compared in the report: (column, label).
RANK_COLUMNS = (
    ("eps_rank_0.001", "ε = 1e-3"),
    ("eps_rank_0.01", "ε = 0.01 (paper)"),
    ("eps_rank_0.1", "ε = 0.1"),
    ("eps_rank_rel_task0_0.01", "ε = 1% of task-0 range"),
    ("eps_rank_rel_task0_0.05", "ε = 5% of task-0 range (`task0`)"),
    ("eps_rank_rel_current_0.01", "ε = 1% of current range"),
    ("eps_rank_rel_current_0.05", "ε = 5% of current range (`current`)"),
)
OTHER_PREDICTORS = (("erank", "feature effective rank"), ("dormant", "dormant fraction"), ("log_lambda_max", "log λmax"))
HEADLINE_RANKS = ("eps_rank_0.01", "eps_rank_rel_task0_0.05", "eps_rank_rel_current_0.05")
COLLAPSE_FRACTION = 0.25  # TrainabilityCallback's default collapse_threshold
DECLINE_POINTS = 0.05  # accuracy decline: 5 points below the peak of the moving average
WINDOW = 10


def read_runs(results: Path) -> dict[str, dict[str, dict[int, list[dict[str, float]]]]]:
    """``{stream: {method: {seed: rows}}}`` of the finished runs (rows as floats, missing cells as nan)."""
    runs: dict[str, dict[str, dict[int, list[dict[str, float]]]]] = defaultdict(lambda: defaultdict(dict))
    for done in sorted(results.glob("*/*/seed*/done.json")):
        meta = json.loads(done.read_text())
        with (done.parent / "tasks.csv").open() as handle:
            rows = [
                {key: float(value) if value != "" else math.nan for key, value in row.items()}
                for row in csv.DictReader(handle)
            ]
        for row in rows:
            lmax = row.get("lambda_max", math.nan)
            row["log_lambda_max"] = math.log(lmax) if lmax > 0 else math.nan
        runs[meta["stream"]][meta["method"]][int(meta["seed"])] = rows
    return runs


def protocols(results: Path) -> dict[str, dict[str, Any]]:
    """The protocol and wall time of each stream (from the runs' ``done.json``)."""
    found: dict[str, dict[str, Any]] = {}
    for done in sorted(results.glob("*/*/seed*/done.json")):
        meta = json.loads(done.read_text())
        entry = found.setdefault(meta["stream"], dict(protocol=meta["protocol"], seconds=[], methods={}))
        entry["seconds"].append(meta["seconds"])
        entry["methods"][meta["method"]] = meta["method_spec"]
    return found


def matrix(runs: dict[int, list[dict[str, float]]], column: str) -> np.ndarray:
    """``(seeds, tasks)`` array of one column (nan where not measured)."""
    return np.array([[row.get(column, math.nan) for row in rows] for _, rows in sorted(runs.items())], dtype=float)


def mean_ci(values: np.ndarray) -> tuple[float, float]:
    """Mean and half-width of the 95% normal interval ``1.96·s/√n`` over the finite values (0 for one value)."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return math.nan, math.nan
    half = 1.96 * float(finite.std(ddof=1)) / math.sqrt(finite.size) if finite.size > 1 else 0.0
    return float(finite.mean()), half


def fmt(mean: float, half: float, digits: int = 3) -> str:
    return "–" if math.isnan(mean) else f"{mean:.{digits}f} ± {half:.{digits}f}"


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (shorter windows at the start)."""
    cumulative = np.cumsum(np.insert(values, 0, 0.0))
    out = np.empty_like(values)
    for index in range(len(values)):
        start = max(0, index + 1 - window)
        out[index] = (cumulative[index + 1] - cumulative[start]) / (index + 1 - start)
    return out


def measured_mask(runs: dict[int, list[dict[str, float]]]) -> np.ndarray:
    return np.isfinite(matrix(runs, "lambda_max")).all(axis=0)


def regression_points(
    stream_runs: dict[str, dict[int, list[dict[str, float]]]],
    column: str,
    methods: Sequence[str],
    per_seed: bool,
    first_task: int = 0,
) -> tuple[list[float], list[float]]:
    """(predictor, accuracy) pairs at measured task starts over ``methods``: seed means, or one pair per run.

    :param stream_runs: ``{method: {seed: rows}}``.
    :param column: the predictor.
    :param methods: the methods whose points are pooled.
    :param per_seed: one point per run and task instead of seed means.
    :param first_task: leave out the task starts before this one (1: no fresh network at task 0).
    """
    xs: list[float] = []
    ys: list[float] = []
    for method in methods:
        runs = stream_runs.get(method)
        if not runs:
            continue
        mask = measured_mask(runs)
        mask[:first_task] = False
        predictor, accuracy = matrix(runs, column)[:, mask], matrix(runs, "accuracy")[:, mask]
        if per_seed:
            xs += predictor.ravel().tolist()
            ys += accuracy.ravel().tolist()
        else:
            xs += np.nanmean(predictor, axis=0).tolist()
            ys += accuracy.mean(axis=0).tolist()
    return xs, ys


def onset_tasks(tasks: np.ndarray, rank: np.ndarray, accuracy: np.ndarray) -> tuple[float, float]:
    """Onsets of the seed-mean series: the first measured task whose ε-rank is below ``COLLAPSE_FRACTION`` of its
    task-0 value (collapse, the flag of ``TrainabilityCallback``), and the first task after the peak of the
    ``WINDOW``-task moving-average accuracy where that average is ``DECLINE_POINTS`` below the peak (decline); nan when
    it never happens.

    :param tasks: the measured task indices.
    :param rank: the ε-rank at those tasks.
    :param accuracy: the online accuracy of every task (index = task).
    """
    collapse = math.nan
    reference = float(rank[0])
    for task, value in zip(tasks, rank, strict=True):
        if reference > 0 and value < COLLAPSE_FRACTION * reference:
            collapse = float(task)
            break
    smooth = moving_average(accuracy, WINDOW)
    peak = int(np.argmax(smooth))
    below = np.nonzero(smooth[peak:] < smooth[peak] - DECLINE_POINTS)[0]
    decline = float(peak + below[0]) if below.size else math.nan
    return collapse, decline


def stream_summary(stream_runs: dict[str, dict[int, list[dict[str, float]]]]) -> dict[str, Any]:
    """Every number of one stream's tables."""
    methods = [m for m in METHOD_ORDER if m in stream_runs]
    summary: dict[str, Any] = {"methods": methods, "accuracy": {}, "ranks": {}, "lambda_max": {}, "onsets": {}, "r2": {}}
    for method in methods:
        runs = stream_runs[method]
        accuracy = matrix(runs, "accuracy")
        n_tasks = accuracy.shape[1]
        window = min(WINDOW, n_tasks)
        summary["accuracy"][method] = {
            "seeds": accuracy.shape[0],
            "tasks": n_tasks,
            "task0": mean_ci(accuracy[:, 0]),
            "first10": mean_ci(accuracy[:, :window].mean(axis=1)),
            "peak10": mean_ci(np.array([moving_average(row, window).max() for row in accuracy])),
            "last10": mean_ci(accuracy[:, -window:].mean(axis=1)),
            "final": mean_ci(accuracy[:, -1]),
            "all": mean_ci(accuracy.mean(axis=1)),
        }
        mask = measured_mask(runs)
        tasks = np.arange(n_tasks)[mask]
        summary["ranks"][method] = {
            "tasks": tasks.tolist(),
            **{
                column: np.nanmean(matrix(runs, column)[:, mask], axis=0).tolist()
                for column, _ in RANK_COLUMNS
                if column in runs[min(runs)][0]
            },
            **{
                f"bracket_{column}": np.nanmean(
                    (
                        matrix(runs, column.replace("eps_rank_", "eps_rank_hi_"))
                        - matrix(runs, column.replace("eps_rank_", "eps_rank_lo_"))
                    )[:, mask],
                    axis=0,
                ).tolist()
                for column in HEADLINE_RANKS
            },
            **{name: np.nanmean(matrix(runs, name)[:, mask], axis=0).tolist() for name in ("erank", "dormant", "dead")},
        }
        lmax = matrix(runs, "lambda_max")[:, mask]
        summary["lambda_max"][method] = {
            "tasks": tasks.tolist(),
            "geomean": np.exp(np.nanmean(np.log(np.clip(lmax, 1e-30, None)), axis=0)).tolist(),
            "lambda_min": np.nanmean(matrix(runs, "lambda_min")[:, mask], axis=0).tolist(),
        }
        mean_accuracy = accuracy.mean(axis=0)
        summary["onsets"][method] = {
            column: onset_tasks(tasks, np.array(summary["ranks"][method][column]), mean_accuracy) for column in HEADLINE_RANKS
        }
    warm = [m for m in methods if m != "reset"]
    # "warm starts": no fresh network among the points (neither task 0 nor the reset method), so that the comparison
    # is not between trained and untrained networks.
    for subset_name, subset, first_task in (("all methods", methods, 0), ("without reset", warm, 0), ("warm starts", warm, 1)):
        table = {}
        for column, _ in (*RANK_COLUMNS, *OTHER_PREDICTORS):
            seed_mean = r_squared(*regression_points(stream_runs, column, subset, False, first_task))
            per_run = r_squared(*regression_points(stream_runs, column, subset, True, first_task))
            table[column] = {"seed_means": seed_mean, "runs": per_run}
            if subset_name == "warm starts":
                # ε-ranks span orders of magnitude: the same regression on log10 of the predictor (positive values).
                xs, ys = regression_points(stream_runs, column, subset, False, first_task)
                logs = [math.log10(x) if x > 0 else math.nan for x in xs]
                table[column]["log_seed_means"] = r_squared(logs, ys) if column not in ("log_lambda_max",) else seed_mean
        summary["r2"][subset_name] = table
    return summary


def checkpoints(tasks: Sequence[int], count: int = 6) -> list[int]:
    """Up to ``count`` measured tasks spread over the run (first and last included)."""
    if len(tasks) <= count:
        return list(range(len(tasks)))
    return sorted({round(i * (len(tasks) - 1) / (count - 1)) for i in range(count)})


def markdown(stream: str, summary: dict[str, Any], protocol: dict[str, Any], seconds: list[float]) -> list[str]:
    """The tables of one stream."""
    methods = summary["methods"]
    lines = [f"## {STREAM_TITLES.get(stream, stream)} (`{stream}`)", ""]
    p = protocol
    examples = "all 1,797" if p["examples"] is None else str(p["examples"])
    lines += [
        f"{p['tasks']} tasks; MLP 64-{'-'.join(map(str, p['hidden']))}-10 (ReLU), SGD step {p['lr']}, minibatch "
        f"{p['batch_size']}, {p['passes']} online pass(es) over {examples} examples per task; Hessian at every "
        f"{p['measure_every']}-th task start on {p['hessian_samples']} examples of the new task (SLQ, "
        f"{p['lanczos_steps']} Lanczos steps, {p['num_probes']} probes). {len(seconds)} runs, "
        f"{np.sum(seconds) / 60:.1f} CPU-minutes ({np.min(seconds):.0f}–{np.max(seconds):.0f} s per run).",
        "",
        "### Online accuracy (mean ± 95% CI over seeds)",
        "",
        "| method | seeds | task 0 | first 10 tasks | best 10-task window | last 10 tasks | final task | all tasks |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method in methods:
        acc = summary["accuracy"][method]
        cells = [fmt(*acc[key]) for key in ("task0", "first10", "peak10", "last10", "final", "all")]
        lines.append(f"| {LABELS[method]} | {acc['seeds']} | " + " | ".join(cells) + " |")
    tasks = summary["ranks"][methods[0]]["tasks"]
    marks = checkpoints(tasks)
    header = " | ".join(f"task {tasks[i]}" for i in marks)
    for column, title in (
        ("eps_rank_0.01", "ε-rank at task starts, ε = 0.01 (the paper's ε)"),
        ("eps_rank_rel_task0_0.05", 'ε-rank at task starts, ε = 5% of the task-0 spectral range (`epsilon_scale="task0"`)'),
        (
            "eps_rank_rel_current_0.05",
            'ε-rank at task starts, ε = 5% of the current spectral range (`epsilon_scale="current"`)',
        ),
    ):
        lines += ["", f"### {title}", "", "Seed means; in brackets the mean width of the guaranteed bracket (resolution).", ""]
        lines += [f"| method | {header} |", "|---|" + "---|" * len(marks)]
        for method in methods:
            ranks = summary["ranks"][method]
            cells = [f"{ranks[column][i]:.4f} [{ranks['bracket_' + column][i]:.2f}]" for i in marks]
            lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    lines += ["", "### λmax at task starts (geometric mean over seeds) and λmin (mean)", ""]
    lines += [f"| method | {header} | last / first |", "|---|" + "---|" * (len(marks) + 1)]
    for method in methods:
        lmax = summary["lambda_max"][method]
        cells = [f"{lmax['geomean'][i]:.3g} ({lmax['lambda_min'][i]:.2g})" for i in marks]
        lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + f" | {lmax['geomean'][-1] / lmax['geomean'][0]:.3g}× |")
    lines += ["", "### Feature effective rank and dormant fraction at task starts (mean over hidden layers and seeds)", ""]
    lines += [f"| method | {header} |", "|---|" + "---|" * len(marks)]
    for method in methods:
        ranks = summary["ranks"][method]
        cells = [f"{ranks['erank'][i]:.1f} / {ranks['dormant'][i]:.2f}" for i in marks]
        lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "### R² of a task's online accuracy on its task-start predictor, across tasks × methods",
        "",
        "Points: (method, measured task) pairs. 'seed means': accuracy and predictor averaged over seeds first; 'runs': "
        "one point per run and task. 'warm starts': without reset and without task 0, so that no point is a fresh "
        "network. 'log': on log10 of the predictor. The sign is that of the correlation (+: more ε-rank, more accuracy).",
        "",
        "| predictor | all methods (seed means) | all methods (runs) | without reset (seed means) | "
        "without reset (runs) | warm starts (seed means) | warm starts (runs) | warm starts (seed means, log) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for column, title in (*RANK_COLUMNS, *OTHER_PREDICTORS):
        cells = []
        for subset, kinds in (
            ("all methods", ("seed_means", "runs")),
            ("without reset", ("seed_means", "runs")),
            ("warm starts", ("seed_means", "runs", "log_seed_means")),
        ):
            for kind in kinds:
                value, sign, count = summary["r2"][subset][column][kind]
                cells.append("–" if math.isnan(value) else f"{value:.2f} ({'+' if sign > 0 else '−'}, n={count})")
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"### Onsets: first task start where the seed-mean ε-rank fell below {COLLAPSE_FRACTION:g}× its task-0 value "
        f"(collapse, as `TrainabilityCallback` flags it), and first task where the {WINDOW}-task moving-average "
        f"accuracy fell {DECLINE_POINTS:g} below its peak (decline)",
        "",
        "| method | collapse, ε = 0.01 | collapse, `task0` 5% | collapse, `current` 5% | accuracy decline |",
        "|---|---|---|---|---|",
    ]
    for method in methods:
        onsets = summary["onsets"][method]
        collapses = [onsets[column][0] for column in HEADLINE_RANKS]
        decline = onsets[HEADLINE_RANKS[0]][1]
        cells = ["never" if math.isnan(value) else f"{value:.0f}" for value in (*collapses, decline)]
        lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    return lines


def _save(figure: Any, axes: Any, path: Path, legend_size: int) -> None:
    """Legend in the first panel, tight layout, PNG at 110 dpi, figure closed."""
    import matplotlib.pyplot as plt

    axes[0][0].legend(fontsize=legend_size)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plots(runs: dict[str, dict[str, dict[int, list[dict[str, float]]]]], summaries: dict[str, Any], out: Path) -> None:
    """The report's figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    streams = list(summaries)
    colors = {method: f"C{index}" for index, method in enumerate(METHOD_ORDER)}

    figure, axes = plt.subplots(1, len(streams), figsize=(6 * len(streams), 4), squeeze=False)
    for axis, stream in zip(axes[0], streams, strict=True):
        for method in summaries[stream]["methods"]:
            accuracy = matrix(runs[stream][method], "accuracy").mean(axis=0)
            axis.plot(moving_average(accuracy, 5), label=LABELS[method], color=colors[method], lw=1.2)
        axis.set(title=f"{STREAM_TITLES.get(stream, stream)}: online accuracy (5-task mean)", xlabel="task", ylabel="accuracy")
        axis.grid(alpha=0.3)
    _save(figure, axes, out / "accuracy.png", legend_size=8)

    titles = {
        "eps_rank_0.01": "ε = 0.01",
        "eps_rank_rel_task0_0.05": "ε = 5% of task-0 range",
        "eps_rank_rel_current_0.05": "ε = 5% of current range",
    }
    figure, axes = plt.subplots(len(streams), 3, figsize=(15, 3.6 * len(streams)), squeeze=False)
    for row, stream in enumerate(streams):
        for col, column in enumerate(HEADLINE_RANKS):
            axis = axes[row][col]
            for method in summaries[stream]["methods"]:
                ranks = summaries[stream]["ranks"][method]
                axis.plot(ranks["tasks"], ranks[column], label=LABELS[method], color=colors[method], lw=1.2)
            axis.set(title=f"{stream}: ε-rank, {titles[column]}", xlabel="task start", yscale="log")
            axis.grid(alpha=0.3)
    _save(figure, axes, out / "epsilon_rank.png", legend_size=7)

    figure, axes = plt.subplots(1, len(streams), figsize=(6 * len(streams), 4), squeeze=False)
    for axis, stream in zip(axes[0], streams, strict=True):
        for method in summaries[stream]["methods"]:
            lmax = summaries[stream]["lambda_max"][method]
            axis.plot(lmax["tasks"], lmax["geomean"], label=LABELS[method], color=colors[method], lw=1.2)
        axis.set(title=f"{stream}: λmax at task starts", xlabel="task start", yscale="log")
        axis.grid(alpha=0.3)
    _save(figure, axes, out / "lambda_max.png", legend_size=8)

    figure, axes = plt.subplots(len(streams), 2, figsize=(11, 3.6 * len(streams)), squeeze=False)
    for row, stream in enumerate(streams):
        for col, (name, title) in enumerate((("erank", "feature effective rank"), ("dormant", "dormant fraction"))):
            axis = axes[row][col]
            for method in summaries[stream]["methods"]:
                ranks = summaries[stream]["ranks"][method]
                axis.plot(ranks["tasks"], ranks[name], label=LABELS[method], color=colors[method], lw=1.2)
            axis.set(title=f"{stream}: {title} (hidden-layer mean)", xlabel="task start")
            axis.grid(alpha=0.3)
    _save(figure, axes, out / "features.png", legend_size=7)

    figure, axes = plt.subplots(len(streams), 3, figsize=(15, 3.8 * len(streams)), squeeze=False)
    for row, stream in enumerate(streams):
        for col, column in enumerate(HEADLINE_RANKS):
            axis = axes[row][col]
            for method in summaries[stream]["methods"]:
                xs, ys = regression_points(runs[stream], column, [method], per_seed=False)
                axis.scatter(xs, ys, s=8, label=LABELS[method], color=colors[method])
            value = summaries[stream]["r2"]["all methods"][column]["seed_means"][0]
            axis.set(title=f"{stream}: {titles[column]}, R² = {value:.2f}", xlabel="ε-rank at task start", ylabel="accuracy")
            axis.set_xscale("log")
            axis.grid(alpha=0.3)
    _save(figure, axes, out / "r2_scatter.png", legend_size=7)


def write_task_means(runs: dict[str, dict[str, dict[int, list[dict[str, float]]]]], out: Path) -> None:
    """Seed means of every column per stream, method and task."""
    columns = [
        "accuracy",
        "lambda_max",
        "lambda_min",
        *(c for c, _ in RANK_COLUMNS),
        "erank",
        "dormant",
        "dead",
        "weight_norm",
    ]
    with (out / "tasks_mean.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["stream", "method", "task", "seeds", *columns])
        for stream, methods in runs.items():
            for method in [m for m in METHOD_ORDER if m in methods]:
                seeds = methods[method]
                values = {column: matrix(seeds, column) for column in columns}
                for task in range(values["accuracy"].shape[1]):
                    cells = []
                    for column in columns:
                        finite = values[column][:, task][np.isfinite(values[column][:, task])]
                        cells.append(f"{finite.mean():.6g}" if finite.size else "")
                    writer.writerow([stream, method, task, len(seeds), *cells])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    runs = read_runs(args.results)
    if not runs:
        raise SystemExit(f"no finished runs under {args.results}")
    meta = protocols(args.results)
    summaries = {stream: stream_summary(runs[stream]) for stream in sorted(runs, key=lambda s: (s != "permuted", s))}
    lines = ["# Supervised continual control: results", ""]
    lines += [f"Written by `report.py` from the runs under `{args.results.name}/`. Figures: `accuracy.png`, "]
    lines[-1] += "`epsilon_rank.png`, `lambda_max.png`, `features.png`, `r2_scatter.png`."
    for stream, summary in summaries.items():
        lines += ["", *markdown(stream, summary, meta[stream]["protocol"], meta[stream]["seconds"])]
    text = "\n".join(lines) + "\n"
    (args.results / "report.md").write_text(text)
    payload = {
        stream: dict(
            summary,
            protocol=meta[stream]["protocol"],
            method_specs=meta[stream]["methods"],
            run_seconds=meta[stream]["seconds"],
        )
        for stream, summary in summaries.items()
    }
    (args.results / "summary.json").write_text(json.dumps(payload, indent=1, default=float))
    write_task_means(runs, args.results)
    if not args.no_plots:
        plots(runs, summaries, args.results)
    print(text)
    return payload


if __name__ == "__main__":
    main()
