"""Sample reuse: return against epochs per rollout for PPO, BLPO nested-only and BLPO, at equal env steps.

With a best-responding critic the improvement-form hypergradient is the exact policy gradient at the *current* policy,
so BLPO should tolerate a staler surrogate (more epochs per rollout) than PPO. This study tests that on a base where
PPO's return can fall as epochs grow: **PPO's rl-zoo3 config of each env** (many small minibatches; for BLPO the
drop-in config of ``suite.py``, i.e. the same entry with ``vf_coef`` removed, and with PPO's default ``batch_size=64``
written out where the entry relies on it, since BLPO's default is 512), varying only ``n_epochs`` (and, with
``--clip-ranges``, ``clip_range``). All three methods therefore run identical rollouts, minibatches and networks.
Methods:

* ``ppo``: rl-zoo3's PPO entry;
* ``blpo_nested``: BLPO on that entry with ``ihvp_solver=None`` (nested critic steps, plain actor gradient);
* ``blpo``: BLPO on that entry with its defaults (improvement form, Nyström IHVP).

Every run is ``suite.py``'s run (rl-zoo3's ``train`` in its own process, the same evaluations and CSV), with
TensorBoard logging on so that the per-update ``train/approx_kl`` and ``train/clip_fraction`` can be read back; they are
averaged over the run's updates into ``<out>/stats/<env>/<variant>/seed<k>.json`` and the logs are deleted. Finished
runs are skipped, so the study resumes; ``--shard I/N`` splits it over machines.

Usage::

    python benchmarks/returns/sample_reuse.py --envs Pendulum-v1 --seeds 0 1 2 --jobs 2
    python benchmarks/returns/sample_reuse.py --envs LunarLander-v3 --methods ppo blpo_nested --seeds 1 2
    python benchmarks/returns/sample_reuse.py --report          # table, docs/data/sample_reuse.csv, docs/img/...
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import suite

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sharding import add_campaign_arguments, parse_campaign_arguments, select_shard

DEFAULT_OUT = suite.DEFAULT_OUT / "sample_reuse"
ENVS = ("Pendulum-v1", "LunarLander-v3", "Hopper-v5")
EPOCHS = (5, 10, 20, 40)
CLIP_RANGES = (0.2,)
PPO_DEFAULT_BATCH_SIZE = 64
SHARED_CONFIG = "shared_config"  # BLPO's entry: suite.py's drop-in config with PPO's batch size (see shared_config)
#: method: (algo, config, overrides) in suite.VARIANTS' format, before the epoch/clip overrides.
METHODS: dict[str, tuple[str, str | None, list[str]]] = {
    "ppo": ("ppo", None, []),
    "blpo_nested": ("blpo", SHARED_CONFIG, ["ihvp_solver:None"]),
    "blpo": ("blpo", SHARED_CONFIG, []),
}
METHOD_LABELS = {"ppo": "PPO (zoo config)", "blpo_nested": "BLPO nested-only (same config)", "blpo": "BLPO (same config)"}
STATISTICS = ("train/approx_kl", "train/clip_fraction")


def variant_name(method: str, epochs: int, clip_range: float) -> str:
    """``reuse_<method>_e<epochs>_c<clip>``: the name under which suite.py runs and stores the setting."""
    return f"reuse_{method}_e{epochs}_c{clip_range:g}"


def shared_config(out: Path) -> Path:
    """suite.py's drop-in entries (PPO's rl-zoo3 config, ``vf_coef`` removed) with ``batch_size`` written out where
    PPO's entry relies on PPO's default: BLPO then runs exactly PPO's minibatches."""
    return suite.edited_config(
        suite.drop_in_config(out),
        out / "ppo_zoo_shared_v5.yml",
        lambda entry: entry.setdefault("batch_size", PPO_DEFAULT_BATCH_SIZE),
    )


def register_variants(epochs: tuple[int, ...], clip_ranges: tuple[float, ...], out: Path) -> list[tuple[str, str, int, float]]:
    """Add every (method, epochs, clip range) to ``suite.VARIANTS``/``suite.LABELS``; returns them as
    ``(variant, method, epochs, clip_range)``."""
    settings = []
    for method, (algo, config, overrides) in METHODS.items():
        if config == SHARED_CONFIG:
            config = str(shared_config(out))
        for n_epochs in epochs:
            for clip_range in clip_ranges:
                name = variant_name(method, n_epochs, clip_range)
                suite.VARIANTS[name] = (algo, config, [*overrides, f"n_epochs:{n_epochs}", f"clip_range:{clip_range}"])
                suite.LABELS[name] = f"{METHOD_LABELS[method]}, {n_epochs} epochs, clip {clip_range:g}"
                settings.append((name, method, n_epochs, clip_range))
    return settings


def stats_path(out: Path, env_id: str, variant: str, seed: int) -> Path:
    return out / "stats" / env_id / variant / f"seed{seed}.json"


def update_statistics(log_dir: Path) -> dict[str, float]:
    """Mean over the run's updates of each of :data:`STATISTICS`, read back from its TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[str, list[float]] = {tag: [] for tag in STATISTICS}
    for events in log_dir.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in STATISTICS:
            if tag in accumulator.Tags()["scalars"]:
                values[tag] += [event.value for event in accumulator.Scalars(tag)]
    return {tag.split("/")[1]: float(np.mean(v)) if v else math.nan for tag, v in values.items()}


def run(env_id: str, variant: str, seed: int, steps: int, args: argparse.Namespace) -> str:
    """suite.py's run with TensorBoard on; the statistics are kept, the logs are not."""
    message = suite.run(env_id, variant, seed, steps, args)
    log_dir = args.out / "logs" / f"{env_id}_{variant}_seed{seed}"
    if message.startswith("ok"):
        target = stats_path(args.out, env_id, variant, seed)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(update_statistics(log_dir)))
    shutil.rmtree(log_dir, ignore_errors=True)
    return message


def finished(args: argparse.Namespace, env_id: str, variant: str, seed: int) -> bool:
    return suite.csv_path(args.out, env_id, variant, seed).exists() and stats_path(args.out, env_id, variant, seed).exists()


def results_table(args: argparse.Namespace, settings: list[tuple[str, str, int, float]]):
    """One row per finished run: env, method, epochs, clip range, seed, final evaluation, training return, statistics."""
    import pandas as pd

    rows = []
    for env_id in args.envs:
        for variant, method, n_epochs, clip_range in settings:
            for seed in args.seeds:
                if not finished(args, env_id, variant, seed):
                    continue
                evals = pd.read_csv(suite.csv_path(args.out, env_id, variant, seed))
                stats = json.loads(stats_path(args.out, env_id, variant, seed).read_text())
                last = evals.iloc[-1]
                rows.append(
                    dict(env=env_id, method=method, n_epochs=n_epochs, clip_range=clip_range, seed=seed,
                         final_eval=float(last["mean_return"]), train_return=float(last["train_return"]),
                         seconds=float(last["seconds"]), **stats)
                )  # fmt: skip
    return pd.DataFrame(rows)


def summary(args: argparse.Namespace) -> str:
    """Markdown: per env and clip range, mean ± sd over seeds of the final evaluation, with approx_kl, clip fraction
    and wall time per run, one row per (method, epochs)."""
    table = results_table(args, register_variants(tuple(args.epochs), tuple(args.clip_ranges), args.out))
    if table.empty:
        return "no finished runs"
    lines = [
        "| env | clip | method | epochs | seeds | final evaluation | training return | approx_kl | clip fraction "
        "| s per run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    keys = ["env", "clip_range", "method", "n_epochs"]
    order = {m: i for i, m in enumerate(METHODS)}
    groups = sorted(table.groupby(keys), key=lambda g: (args.envs.index(g[0][0]), g[0][1], order[g[0][2]], g[0][3]))
    for (env_id, clip_range, method, n_epochs), group in groups:

        def cell(column: str, group=group) -> str:
            values = group[column].to_numpy()
            spread = np.std(values, ddof=1) if len(values) > 1 else 0.0
            return f"{np.mean(values):.1f} ± {spread:.1f}"

        lines.append(
            f"| {env_id} | {clip_range:g} | {METHOD_LABELS[method]} | {n_epochs} | {len(group)} | {cell('final_eval')} | "
            f"{cell('train_return')} | {group['approx_kl'].mean():.4f} | {group['clip_fraction'].mean():.3f} | "
            f"{group['seconds'].median():.0f} |"
        )
    return "\n".join(lines)


def report(args: argparse.Namespace) -> None:
    """The table, ``docs/data/sample_reuse.csv`` and ``docs/img/sample_reuse.png`` (return and approx_kl against
    epochs, one panel per env, mean ± sd over seeds, the suite's colour per method)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from report import COLORS

    table = results_table(args, register_variants(tuple(args.epochs), tuple(args.clip_ranges), args.out))
    if table.empty:
        raise SystemExit(f"no finished runs under {args.out}")
    (args.docs / "data").mkdir(parents=True, exist_ok=True)
    (args.docs / "img").mkdir(parents=True, exist_ok=True)
    table.to_csv(args.docs / "data" / "sample_reuse.csv", index=False)
    print(summary(args))
    envs = [env for env in args.envs if env in set(table["env"])]
    fig, axes = plt.subplots(2, len(envs), figsize=(4.4 * len(envs), 6.4), squeeze=False)
    for column, env_id in enumerate(envs):
        for method in METHODS:
            for clip_range, style in zip(args.clip_ranges, ("-", "--", ":"), strict=False):
                rows = table[(table["env"] == env_id) & (table["method"] == method) & (table["clip_range"] == clip_range)]
                if rows.empty:
                    continue
                grouped = rows.groupby("n_epochs")
                label = METHOD_LABELS[method] + (f", clip {clip_range:g}" if len(args.clip_ranges) > 1 else "")
                for row, stat in enumerate(("final_eval", "approx_kl")):
                    mean, spread = grouped[stat].mean(), grouped[stat].std().fillna(0.0)
                    ax = axes[row, column]
                    ax.errorbar(mean.index, mean.to_numpy(), yerr=spread.to_numpy(), color=COLORS[method], ls=style,
                                marker="o", capsize=3, label=label)  # fmt: skip
        axes[0, column].set(title=env_id, ylabel="final evaluation return", xscale="log", xticks=list(args.epochs))
        axes[1, column].set(xlabel="epochs per rollout", ylabel="approx_kl (mean over updates)", xscale="log",
                            yscale="log", xticks=list(args.epochs))  # fmt: skip
        for ax in axes[:, column]:
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # only the epoch values as x labels
            ax.set_xticklabels([str(e) for e in args.epochs])
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.docs / "img" / "sample_reuse.png", dpi=110)


def run_list(args: argparse.Namespace, settings: list[tuple[str, str, int, float]]) -> list[tuple[str, str, int, int]]:
    """Every run as ``(env, variant, seed, steps)`` in a fixed order (seed-major, so a partial study has whole seeds)."""
    steps = {env_id: args.steps or suite.PROFILES["cpu"][env_id] for env_id in args.envs}
    return [(env_id, variant, seed, steps[env_id]) for seed in args.seeds for env_id in args.envs for variant, *_ in settings]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", nargs="+", default=list(ENVS), choices=list(ENVS))
    parser.add_argument("--epochs", nargs="+", type=int, default=list(EPOCHS))
    parser.add_argument("--clip-ranges", nargs="+", type=float, default=list(CLIP_RANGES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="methods to run")
    parser.add_argument("--steps", type=int, default=None, help="override the cpu profile's steps per run (all envs)")
    parser.add_argument("--evals", type=int, default=10, help="evaluations per run")
    parser.add_argument("--eval-episodes", type=int, default=5)
    parser.add_argument("--report", action="store_true", help="write the table and figure of the finished runs")
    parser.add_argument("--docs", type=Path, default=suite.REPO / "docs")
    add_campaign_arguments(parser, DEFAULT_OUT)
    args = parse_campaign_arguments(parser, summary)
    if args is None:
        return
    args.keep_logs, args.tensorboard = True, True  # the statistics are read from the logs, which run() then deletes
    if args.report:
        report(args)
        return
    settings = register_variants(tuple(args.epochs), tuple(args.clip_ranges), args.out)
    settings = [setting for setting in settings if setting[1] in args.methods]
    jobs = [job for job in select_shard(run_list(args, settings), args.shard) if not finished(args, *job[:3])]
    print(f"{len(jobs)} runs to do", flush=True)
    suite.run_jobs(jobs, args, run)


if __name__ == "__main__":
    main()
