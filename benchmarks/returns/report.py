"""Aggregate the returns suite (``suite.py``) with rliable: IQM and 95% stratified-bootstrap CIs, profiles, curves.

Score of a run: the mean return of its final evaluation. For the aggregate over environments each score is normalised
as ``(score − random) / (reference − random)``, with ``random`` the return of uniformly random actions measured by the
suite (``random_scores.json``) and ``reference`` rl-zoo3's published PPO score of that env (its ``benchmark.md``, one
run each, older env versions: LunarLander-v2, MuJoCo v3, 1e5–1e6 steps), so 1.0 means "zoo's PPO at its full budget".

Writes ``docs/data/returns_evals.csv`` (every evaluation of every run), ``docs/img/returns_curves.png`` (IQM learning
curves with CIs), ``docs/img/returns_profiles.png`` (performance profiles of the normalised scores) and prints the
markdown tables that ``docs/benchmarks.md`` quotes.

Usage::

    pip install -e ".[plots]"
    python benchmarks/returns/report.py [--results benchmarks/returns/results] [--docs docs]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
from suite import DEFAULT_OUT, ENVS, RANDOM_SCORES_FILE
from suite import LABELS as SUITE_LABELS

REPO = Path(__file__).resolve().parents[2]
# rl-zoo3 benchmark.md, PPO (sb3-conventions reference §3.5): the normalisation's 1.0.
ZOO_PPO_REFERENCE = {
    "CartPole-v1": 500.0,
    "Acrobot-v1": -73.506,
    "LunarLander-v3": 242.119,
    "Pendulum-v1": -172.225,
    "Hopper-v5": 2410.435,
    "HalfCheetah-v5": 5819.099,
}
BOOTSTRAP_REPS = 2000
#: Section 1 of the suite: the variants a user chooses between (the others are studies and history).
MAIN_REPORT_VARIANTS = ("ppo", "blpo", "blpo_nested", "blpo_authors", "blpo_dropin")
#: matplotlib's tab10, the light shades of tab20, then dark shades of tab20b (the suite has more than ten variants).
_PALETTE = [f"C{index}" for index in range(10)]
_PALETTE += ["#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5", "#c7c7c7"]
_PALETTE += ["#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173"]
#: One colour per variant in every figure, no two alike, in the order of suite.LABELS; the drop-in, a main variant,
#: swaps with a history variant for a strong colour.
#: A report-only variant: BLPO's default with the runs of re-tuned zoo entries in place of the suite's (``--current-entries``).
CURRENT = "blpo_current"
LABELS = {**SUITE_LABELS, CURRENT: "BLPO (default), current entries"}
COLORS = {variant: _PALETTE[index] for index, variant in enumerate(LABELS)}
COLORS["blpo_dropin"], COLORS["blpo_rollout_adv"] = COLORS["blpo_rollout_adv"], COLORS["blpo_dropin"]


def with_current_entries(evals: pd.DataFrame, folders: list[Path]) -> pd.DataFrame:
    """``evals`` plus the variant :data:`CURRENT`: the ``blpo`` runs, those of an env replaced by the ``blpo`` runs
    under ``folders`` (suite result folders of re-tuned entries, run with the same seeds, budget and evaluation)."""
    tuned = pd.concat([load(folder) for folder in folders], ignore_index=True)
    tuned = tuned[tuned["variant"] == "blpo"]
    kept = evals[(evals["variant"] == "blpo") & ~evals["env"].isin(set(tuned["env"]))]
    current = pd.concat([kept, tuned], ignore_index=True).assign(variant=CURRENT)
    return pd.concat([evals, current], ignore_index=True)


def load(results: Path) -> pd.DataFrame:
    frames = []
    for path in sorted((results / "csv").glob("*/*/seed*.csv")):
        table = pd.read_csv(path)
        table.insert(0, "seed", int(path.stem[len("seed") :]))
        table.insert(0, "variant", path.parent.name)
        table.insert(0, "env", path.parent.parent.name)
        frames.append(table)
    if not frames:
        raise SystemExit(f"no finished runs under {results / 'csv'}")
    return pd.concat(frames, ignore_index=True)


def final_scores(evals: pd.DataFrame) -> pd.DataFrame:
    last = evals.sort_values("timesteps").groupby(["env", "variant", "seed"]).tail(1)
    return last[["env", "variant", "seed", "timesteps", "mean_return", "seconds"]].reset_index(drop=True)


def normalised_scores(scores: pd.DataFrame, random_scores: dict[str, float]) -> pd.DataFrame:
    """``scores`` with the column ``normalised``: ``(score − random) / (zoo PPO − random)`` (module docstring)."""
    reference = scores["env"].map(ZOO_PPO_REFERENCE)
    random = scores["env"].map(random_scores)
    return scores.assign(normalised=(scores["mean_return"] - random) / (reference - random))


def score_matrix(scores: pd.DataFrame, variant: str, envs: list[str], column: str) -> np.ndarray:
    """``(runs, envs)`` for one variant; runs are the seeds finished on every one of ``envs``."""
    table = scores[scores["variant"] == variant].pivot(index="seed", columns="env", values=column)
    return table.reindex(columns=envs).dropna().to_numpy()


def interval_estimates(score_dict: dict[str, np.ndarray], statistic) -> tuple[dict, dict]:
    from rliable import library as rly

    return rly.get_interval_estimates(score_dict, statistic, reps=BOOTSTRAP_REPS)


def per_env_table(scores: pd.DataFrame, variants: list[str], envs: list[str]) -> str:
    from rliable import metrics

    header = "| env | " + " | ".join(LABELS[v] for v in variants) + " |"
    lines = [header, "|---" * (len(variants) + 1) + "|"]
    for env in envs:
        score_dict = {v: score_matrix(scores, v, [env], "mean_return") for v in variants}
        point, ci = interval_estimates(score_dict, lambda x: np.array([metrics.aggregate_iqm(x)]))
        cells = [f"{point[v][0]:.1f} [{ci[v][0, 0]:.1f}, {ci[v][1, 0]:.1f}]" for v in variants]
        lines.append(f"| {env} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def aggregate_table(scores: pd.DataFrame, variants: list[str], envs: list[str]) -> tuple[str, dict[str, np.ndarray]]:
    from rliable import metrics

    normalised = {v: score_matrix(scores, v, envs, "normalised") for v in variants}
    # A bootstrap over fewer than two complete runs says nothing: such variants only appear in the per-env table.
    normalised = {v: matrix for v, matrix in normalised.items() if len(matrix) >= 2}
    names = ("IQM", "median", "mean", "optimality gap")

    def statistic(x: np.ndarray) -> np.ndarray:
        return np.array(
            [
                metrics.aggregate_iqm(x),
                metrics.aggregate_median(x),
                metrics.aggregate_mean(x),
                metrics.aggregate_optimality_gap(x),
            ]
        )

    point, ci = interval_estimates(normalised, statistic)
    lines = ["| variant | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for v in normalised:
        cells = [f"{point[v][k]:.2f} [{ci[v][0, k]:.2f}, {ci[v][1, k]:.2f}]" for k in range(len(names))]
        lines.append(f"| {LABELS[v]} | " + " | ".join(cells) + " |")
    return "\n".join(lines), normalised


def plot_curves(evals: pd.DataFrame, variants: list[str], envs: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from rliable import metrics

    columns = 3
    rows = -(-len(envs) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    for ax, env in zip(axes.flat, envs, strict=False):
        for variant in variants:
            table = evals[(evals["env"] == env) & (evals["variant"] == variant)]
            curves = table.pivot(index="seed", columns="timesteps", values="mean_return").dropna(axis=1)
            if curves.empty:
                continue
            frames = curves.to_numpy()[:, None, :]  # (runs, tasks=1, frames)
            point, ci = interval_estimates(
                {variant: frames},
                lambda x: np.array([metrics.aggregate_iqm(x[..., f]) for f in range(x.shape[-1])]),
            )
            steps = curves.columns.to_numpy()
            ax.plot(steps, point[variant], label=LABELS[variant], color=COLORS[variant])
            ax.fill_between(steps, ci[variant][0], ci[variant][1], alpha=0.2, color=COLORS[variant])
        ax.set(title=env, xlabel="env steps", ylabel="IQM return")
    for ax in list(axes.flat)[len(envs) :]:
        ax.axis("off")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def plot_profiles(normalised: dict[str, np.ndarray], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from rliable import library as rly

    taus = np.linspace(-0.25, 1.5, 71)
    profiles, profile_cis = rly.create_performance_profile(normalised, taus, reps=BOOTSTRAP_REPS)
    fig, ax = plt.subplots(figsize=(6, 4))
    for variant in normalised:
        ax.plot(taus, profiles[variant], label=LABELS[variant], color=COLORS[variant])
        ax.fill_between(taus, profile_cis[variant][0], profile_cis[variant][1], alpha=0.2, color=COLORS[variant])
    ax.set(xlabel="normalised score τ (1 = rl-zoo3 PPO, published)", ylabel="fraction of runs with score > τ")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--docs", type=Path, default=REPO / "docs")
    parser.add_argument("--variants", nargs="+", default=list(MAIN_REPORT_VARIANTS), choices=list(SUITE_LABELS))
    parser.add_argument(
        "--current-entries",
        nargs="+",
        type=Path,
        default=[],
        help="suite result folders of re-tuned blpo.yml entries: also print the tables with them in place of the "
        "suite's blpo runs of those envs (figures and the CSV stay the suite's)",
    )
    args = parser.parse_args()
    evals = load(args.results)
    evals = evals[evals["variant"].isin(args.variants)]
    random_scores = json.loads((args.results / RANDOM_SCORES_FILE).read_text())
    envs = [env for env in ENVS if env in set(evals["env"])]
    variants = [v for v in args.variants if v in set(evals["variant"])]
    scores = normalised_scores(final_scores(evals), random_scores)
    (args.docs / "data").mkdir(parents=True, exist_ok=True)
    (args.docs / "img").mkdir(parents=True, exist_ok=True)
    evals.to_csv(args.docs / "data" / "returns_evals.csv", index=False)
    print("Final-evaluation return, IQM over seeds [95% bootstrap CI]\n")
    print(per_env_table(scores, variants, envs))
    table, normalised = aggregate_table(scores, variants, envs)
    print("\nNormalised score over all envs, (score − random) / (zoo PPO published − random)\n")
    print(table)
    budgets = scores.groupby("env")["timesteps"].max()
    print("\nsteps per run:", {env: int(budgets[env]) for env in envs})
    runs = scores.groupby(["variant", "env"]).size().unstack().reindex(index=variants, columns=envs)
    print("\nseeds per (variant, env); the aggregate uses the seeds finished on every env:\n")
    print("| variant | " + " | ".join(envs) + " |\n" + "|---" * (len(envs) + 1) + "|")
    for variant, counts in runs.fillna(0).astype(int).iterrows():
        print(f"| {LABELS[variant]} | " + " | ".join(str(n) for n in counts) + " |")
    print("random-action scores:", {env: round(random_scores[env], 1) for env in envs})
    plot_curves(evals, variants, envs, args.docs / "img" / "returns_curves.png")
    plot_profiles(normalised, args.docs / "img" / "returns_profiles.png")
    if args.current_entries:
        current = with_current_entries(evals, args.current_entries)
        scores = normalised_scores(final_scores(current), random_scores)
        compared = [v for v in ("ppo", "blpo", CURRENT) if v in set(scores["variant"])]
        print("\nWith the current entries (runs from", ", ".join(str(folder) for folder in args.current_entries), ")\n")
        print(per_env_table(scores, compared, envs))
        print(aggregate_table(scores, compared, envs)[0])


if __name__ == "__main__":
    main()
