"""Aggregate the continual study (``study.py``) into CSV tables, PNG plots and a markdown table.

Writes, by default,

* ``docs/data/continual_returns.csv``: per variant, seed and task, the mean return of the training episodes that ended
  in the task's second half (the per-task score; the first half is the adaptation phase), and of all its episodes;
* ``docs/data/continual_task_starts.csv``: λmax, λmin, ε-ranks and the trainability ratio at every task start;
* ``docs/data/continual_features.csv``: per variant, seed and task, the mean effective rank and dormant-unit fraction of
  each hidden layer over the task's rollouts;
* ``docs/img/continual_returns.png``, ``docs/img/continual_curvature.png``, ``docs/img/continual_features.png``;
* the summary table on stdout (markdown), which docs/plasticity.md quotes, and the R² of a task's return on its
  task-start curvature measurements (ε-ranks at fixed ε, the trainability ε-rank relative to task 0, log λmax), across
  tasks 1+ × variants × seeds, as in the supervised control.

``--prefix`` replaces ``continual`` in the file names (``continual30`` for the 30-task study).

Usage::

    python benchmarks/continual/report.py [--results benchmarks/continual/results] [--docs docs] [--prefix continual]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from study import DEFAULT_OUT, DONE_MARKER, LABELS

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from analysis import r_squared

REPO = Path(__file__).resolve().parents[2]


def load_runs(results: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame, list[dict]]:
    episodes, starts, features, rollouts, metas = [], [], [], [], []
    for marker in sorted(results.glob(f"*/seed*/{DONE_MARKER}")):
        run_dir = marker.parent
        meta = json.loads(marker.read_text())
        metas.append(meta)
        tables = (
            (episodes, "episodes.csv"),
            (starts, "task_starts.csv"),
            (features, "features.csv"),
            (rollouts, "rollouts.csv"),
        )
        for frame, name in tables:
            table = pd.read_csv(run_dir / name)
            table.insert(0, "seed", meta["seed"])
            table.insert(0, "variant", meta["variant"])
            frame.append(table)
    if not metas:
        raise SystemExit(f"no finished runs under {results}")
    return pd.concat(episodes), pd.concat(starts), pd.concat(features), pd.concat(rollouts), metas


def per_task_returns(episodes: pd.DataFrame, task_length: int) -> pd.DataFrame:
    position = (episodes["timesteps"] - 1) % task_length
    late = episodes[position >= task_length // 2]
    keys = ["variant", "seed", "task"]
    table = late.groupby(keys)["return"].mean().rename("late_half_return").to_frame()
    table["all_episodes_return"] = episodes.groupby(keys)["return"].mean()
    return table.reset_index()


def ci95(values: np.ndarray) -> float:
    return 1.96 * float(np.std(values, ddof=1)) / np.sqrt(len(values)) if len(values) > 1 else 0.0


def r_squared_table(returns: pd.DataFrame, starts: pd.DataFrame) -> str:
    """Markdown: R² (and sign) of a task's late-half return on each task-start predictor of each parameter group, over
    the points (variant, seed, task ≥ 1) pooled, and over the same points without the reset variant (whose task starts
    are fresh networks). Task 0 is left out: its start is every variant's initialisation."""
    points = starts[starts["task"] > 0].merge(returns, on=["variant", "seed", "task"])
    predictors = {f"ε-rank, ε = {c[len('eps_rank_') :]}": c for c in starts.columns if c.startswith("eps_rank_")}
    predictors["trainability ε-rank (ε relative to task 0)"] = "trainability_eps_rank"
    predictors["trainability ratio (÷ task-0 ε-rank)"] = "trainability_ratio"
    if "current_eps_rank" in starts.columns:  # studies run since the epsilon_scale="current" columns were added
        predictors["trainability ε-rank, ε on each spectrum's own scale"] = "current_eps_rank"
        predictors["trainability ratio, own scale (÷ task-0 ε-rank)"] = "current_ratio"
    predictors["log λmax"] = "log_lambda_max"
    points = points.assign(log_lambda_max=np.log(points["lambda_max"].clip(lower=1e-12)))
    lines = [
        "| predictor at task start | group | R² (sign), all variants | R² (sign), without reset | points |",
        "|---|---|---|---|---|",
    ]
    for label, column in predictors.items():
        for group in ("actor", "critic"):
            # Runs recorded before a predictor existed lack it (the own-scale columns): those points are left out.
            rows = points[points["group"] == group].dropna(subset=[column])
            cells = []
            for subset in (rows, rows[rows["variant"] != "reset"]):
                value, sign, _ = r_squared(subset[column], subset["late_half_return"])
                cells.append("–" if np.isnan(value) else f"{value:.2f} ({'+' if sign > 0 else '−'})")
            lines.append(f"| {label} | {group} | {cells[0]} | {cells[1]} | {len(rows)} |")
    return "\n".join(lines)


def plot(
    returns: pd.DataFrame,
    starts: pd.DataFrame,
    features: pd.DataFrame,
    entropy: pd.DataFrame,
    variants: list[str],
    docs: Path,
    prefix: str = "continual",
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {variant: f"C{index % 10}" for index, variant in enumerate(LABELS)}  # one colour per variant, every figure

    def band(ax, table: pd.DataFrame, column: str, x: str = "task") -> None:
        for variant in variants:
            rows = table[table["variant"] == variant]
            if rows.empty:
                continue
            grouped = rows.groupby(x)[column]
            mean, half = grouped.mean(), grouped.apply(lambda v: ci95(v.to_numpy()))
            ax.plot(mean.index, mean.values, marker="o", ms=3, label=LABELS[variant], color=colors[variant])
            ax.fill_between(mean.index, mean - half, mean + half, alpha=0.15, color=colors[variant])

    fig, (ax, ax_entropy) = plt.subplots(1, 2, figsize=(12, 4.2))
    band(ax, returns, "late_half_return")
    ax.set(xlabel="task", ylabel="return (late half of the task)", title="Permuted CartPole: return per task")
    ax.legend(fontsize=7)
    band(ax_entropy, entropy, "policy_entropy")
    ax_entropy.axhline(float(np.log(2)), color="grey", ls=":", lw=1)
    ax_entropy.set(xlabel="task", ylabel="policy entropy (nats; uniform: ln 2)", title="Policy entropy at task start")
    fig.tight_layout()
    fig.savefig(docs / "img" / f"{prefix}_returns.png", dpi=120)

    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5), sharex=True)
    for column, (group, metric, label) in enumerate(
        [("actor", "trainability_ratio", "ε-rank / task-0 ε-rank"), ("critic", "trainability_ratio", "")]
    ):
        band(axes[0, column], starts[starts["group"] == group], metric)
        axes[0, column].axhline(0.5, color="grey", ls=":", lw=1)
        axes[0, column].set(title=f"{group} Hessian at task start", ylabel=label or "ε-rank / task-0 ε-rank")
        band(axes[1, column], starts[starts["group"] == group], "lambda_max")
        axes[1, column].set(xlabel="task", ylabel="λmax", yscale="log")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(docs / "img" / f"{prefix}_curvature.png", dpi=120)

    layers = sorted(features["layer"].unique())
    fig, axes = plt.subplots(2, len(layers), figsize=(3.2 * len(layers), 6), sharex=True)
    for column, layer in enumerate(layers):
        rows = features[features["layer"] == layer]
        band(axes[0, column], rows, "erank")
        band(axes[1, column], rows, "dormant")
        axes[0, column].set(title=layer, ylabel="effective rank" if column == 0 else None)
        axes[1, column].set(xlabel="task", ylabel="dormant fraction" if column == 0 else None)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(docs / "img" / f"{prefix}_features.png", dpi=120)


def task_start_entropy(rollouts: pd.DataFrame) -> pd.DataFrame:
    """The policy's entropy on the first rollout of each task (collected under the old task's policy)."""
    return rollouts.sort_values("timesteps").groupby(["variant", "seed", "task"]).head(1).reset_index(drop=True)


def summary_table(
    returns: pd.DataFrame, starts: pd.DataFrame, features: pd.DataFrame, entropy: pd.DataFrame, variants: list[str]
) -> str:
    last = int(returns["task"].max())
    per_seed_last = returns[returns["task"] == last].set_index(["variant", "seed"])["late_half_return"]
    ppo_last = per_seed_last.loc["ppo"].mean() if "ppo" in per_seed_last.index.get_level_values(0) else np.nan
    lines = [
        "| variant | seeds | task 0 return | tasks 1–"
        f"{last} return | last task ({last}) return | last / PPO | actor ε-rank ratio, last start "
        "| critic ε-rank ratio, last start | feature erank (last task) | dormant (last task) "
        "| policy entropy at task starts 1+ |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for variant in variants:
        rows = returns[returns["variant"] == variant]
        if rows.empty:
            continue
        seeds = rows["seed"].nunique()
        first = rows[rows["task"] == 0]["late_half_return"].to_numpy()
        later = rows[rows["task"] > 0].groupby("seed")["late_half_return"].mean().to_numpy()
        final = per_seed_last.loc[variant].to_numpy()
        ratios = []
        for group in ("actor", "critic"):
            values = starts[(starts["variant"] == variant) & (starts["group"] == group) & (starts["task"] == last)]
            ratios.append(values["trainability_ratio"].to_numpy())
        feats = features[(features["variant"] == variant) & (features["task"] == last)].groupby("seed")
        erank, dormant = feats["erank"].mean().to_numpy(), feats["dormant"].mean().to_numpy()
        start_entropy = entropy[(entropy["variant"] == variant) & (entropy["task"] > 0)].groupby("seed")["policy_entropy"]

        def fmt(values: np.ndarray, digits: int = 1) -> str:
            return f"{np.mean(values):.{digits}f} ± {ci95(values):.{digits}f}"

        lines.append(
            f"| {LABELS[variant]} | {seeds} | {fmt(first)} | {fmt(later)} | {fmt(final)} | "
            f"{np.mean(final) / ppo_last:.2f} | {fmt(ratios[0], 2)} | {fmt(ratios[1], 2)} | {fmt(erank)} | "
            f"{fmt(dormant, 2)} | {fmt(start_entropy.mean().to_numpy(), 2)} |"
        )
    return "\n".join(lines)


def current_scale_table(starts: pd.DataFrame, variants: list[str], threshold: float = 0.25) -> str:
    """Markdown: per variant and group, the trainability ratio at task starts 1+ on the task-0 scale and on each
    spectrum's own scale (``epsilon_scale="current"``): mean ± 95 % CI over seeds of the per-seed mean over tasks, the
    last task start, and the share of task starts flagged as a collapse (ratio < ``threshold``)."""
    lines = [
        "| variant | group | ratio, task-0 scale (tasks 1+) | ratio, own scale (tasks 1+) | own scale, last start "
        f"| flagged (own scale < {threshold:g}) | flagged (task-0 scale) |",
        "|---|---|---|---|---|---|---|",
    ]
    last = int(starts["task"].max())
    starts = starts.dropna(subset=["current_ratio"])  # runs recorded before the own-scale columns existed
    for variant in variants:
        for group in ("actor", "critic"):
            rows = starts[(starts["variant"] == variant) & (starts["group"] == group) & (starts["task"] > 0)]
            if rows.empty:
                continue
            fixed = rows.groupby("seed")["trainability_ratio"].mean().to_numpy()
            own = rows.groupby("seed")["current_ratio"].mean().to_numpy()
            own_last = rows[rows["task"] == last]["current_ratio"].to_numpy()
            flagged_own = float((rows["current_ratio"] < threshold).mean())
            flagged_fixed = float((rows["trainability_ratio"] < threshold).mean())
            lines.append(
                f"| {LABELS[variant]} | {group} | {np.mean(fixed):.2f} ± {ci95(fixed):.2f} | "
                f"{np.mean(own):.2f} ± {ci95(own):.2f} | {np.mean(own_last):.2f} ± {ci95(own_last):.2f} | "
                f"{flagged_own:.0%} | {flagged_fixed:.0%} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--docs", type=Path, default=REPO / "docs")
    parser.add_argument("--prefix", default="continual", help="file-name prefix of the CSVs and figures")
    args = parser.parse_args()
    episodes, starts, features, rollouts, metas = load_runs(args.results)
    task_length = metas[0]["task_steps_per_env"] * metas[0]["n_envs"]
    variants = [variant for variant in LABELS if variant in set(episodes["variant"])]
    returns = per_task_returns(episodes, task_length)
    feature_means = features.groupby(["variant", "seed", "task", "layer"])[["erank", "srank", "dormant"]].mean().reset_index()
    (args.docs / "data").mkdir(parents=True, exist_ok=True)
    (args.docs / "img").mkdir(parents=True, exist_ok=True)
    returns.round(3).to_csv(args.docs / "data" / f"{args.prefix}_returns.csv", index=False)
    starts.round(6).to_csv(args.docs / "data" / f"{args.prefix}_task_starts.csv", index=False)
    feature_means.round(4).to_csv(args.docs / "data" / f"{args.prefix}_features.csv", index=False)
    entropy = task_start_entropy(rollouts)
    entropy.round(4).to_csv(args.docs / "data" / f"{args.prefix}_task_start_entropy.csv", index=False)
    plot(returns, starts, feature_means, entropy, variants, args.docs, args.prefix)
    seconds = pd.DataFrame(metas).groupby("variant")["seconds"].median()
    print(summary_table(returns, starts, feature_means, entropy, variants))
    print("\nR² of a task's return (late half) on its task-start measurement, tasks 1+ × variants × seeds\n")
    print(r_squared_table(returns, starts))
    if "current_ratio" in starts.columns:
        print("\nTrainability ratio at task starts on the task-0 scale and on each spectrum's own scale\n")
        print(current_scale_table(starts, variants))
    print("\nmedian seconds per run:", seconds.round(0).to_dict())
    print(f"protocol: {metas[0]['tasks']} tasks x {task_length} steps, env {metas[0]['env']}")


if __name__ == "__main__":
    main()
