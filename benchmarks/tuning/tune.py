"""Tune BLPO's zoo entries with the package's own launcher (``sb3-blpo-zoo train --algo blpo --optimize``).

One Optuna study per env, stored in a journal file ``<out>/blpo_<env>.log`` (kept in the repository: every trial,
its hyperparameters and its result). A study is worked on by ``--workers`` worker processes; each run of this script
is a list of ``(env, worker)`` runs, so a batch scheduler spreads the workers of all envs over machines with
``--shard I/N`` (the journal must then be on a shared file system). ``--max-total-trials`` bounds each study over all
workers and re-runs: a re-run resumes the study where it stopped (trials of dead workers are marked FAIL by the
launcher; see docs/zoo.md, "Fault behaviour and resume").

Tuning seeds are 1000 + worker index, so they never coincide with the evaluation seeds (0–4) of the returns suite.

Usage::

    python benchmarks/tuning/tune.py --envs Acrobot-v1 Pendulum-v1 --trials 30 --steps 50000 --jobs 2
    python benchmarks/tuning/tune.py --summary          # best trial per study
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sharding import add_campaign_arguments, parse_campaign_arguments, run_parallel, select_shard

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "tuning"
TUNING_SEED = 1000


def storage_path(out: Path, env_id: str) -> Path:
    return out / f"blpo_{env_id}.log"


def run_list(args: argparse.Namespace) -> list[tuple[str, int]]:
    """Every ``(env, worker)`` run, in a fixed order (shards index this list)."""
    return [(env_id, worker) for worker in range(args.workers) for env_id in args.envs]


def tune_command(env_id: str, worker: int, args: argparse.Namespace) -> list[str]:
    command = [sys.executable, "-m", "sb3_blpo.zoo", "train", "--algo", "blpo", "--env", env_id, "--optimize"]
    command += ["--storage", str(storage_path(args.out, env_id)), "--study-name", f"blpo_{env_id}"]
    command += ["--n-trials", str(args.trials), "--max-total-trials", str(args.trials), "-n", str(args.steps)]
    command += ["--sampler", "tpe", "--pruner", "median", "--n-startup-trials", "5", "--n-evaluations", "4"]
    command += ["--eval-episodes", "5", "--seed", str(TUNING_SEED + worker), "--num-threads", "1", "--no-optim-plots"]
    command += ["-f", str(args.out / "logs" / f"{env_id}_worker{worker}"), "--verbose", "0"]
    return command


def summary(args: argparse.Namespace) -> str:
    import optuna

    from sb3_blpo.zoo.storage import open_storage

    lines = ["| env | trials (complete / pruned / failed) | best mean eval return | best hyperparameters |"]
    lines.append("|---|---|---|---|")
    for env_id in args.envs:
        path = storage_path(args.out, env_id)
        if not path.exists():
            continue
        study = optuna.load_study(study_name=f"blpo_{env_id}", storage=open_storage(str(path)))
        states = [trial.state.name for trial in study.trials]
        counts = f"{states.count('COMPLETE')} / {states.count('PRUNED')} / {states.count('FAIL')}"
        best = study.best_trial if states.count("COMPLETE") else None
        value = f"{best.value:.1f}" if best else "–"
        params = ", ".join(f"{k}={v}" for k, v in sorted(best.params.items())) if best else "–"
        lines.append(f"| {env_id} | {counts} | {value} | {params} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", nargs="+", default=["Acrobot-v1", "LunarLander-v3", "Pendulum-v1"])
    parser.add_argument("--trials", type=int, default=30, help="trials per study, over all workers and re-runs")
    parser.add_argument("--steps", type=int, default=50_000, help="env steps per trial")
    parser.add_argument("--workers", type=int, default=1, help="worker processes per study")
    add_campaign_arguments(parser, DEFAULT_OUT)
    args = parse_campaign_arguments(parser, summary)
    if args is None:
        return
    args.out.mkdir(parents=True, exist_ok=True)
    runs = select_shard(run_list(args), args.shard)
    print(f"{len(runs)} tuning workers (shard {args.shard[0]}/{args.shard[1]})", flush=True)

    def launch(run: tuple[str, int]) -> None:
        env_id, worker = run
        started = time.perf_counter()
        result = subprocess.run(
            tune_command(env_id, worker, args),
            capture_output=True,
            text=True,
            cwd=REPO,
            env=dict(os.environ, OMP_NUM_THREADS="1"),
        )
        status = "ok" if result.returncode == 0 else f"FAILED (exit {result.returncode})\n{result.stderr[-2000:]}"
        print(f"{env_id} worker {worker}: {status} ({time.perf_counter() - started:.0f} s)", flush=True)

    run_parallel(launch, runs, args.jobs)


if __name__ == "__main__":
    main()
