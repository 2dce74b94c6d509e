"""Returns suite: BLPO (Nyström), BLPO nested-only, BLPO with CG and PPO on six environments, several seeds.

Every run is rl-zoo3's ``train`` through ``sb3-blpo-zoo`` (``python -m sb3_blpo.zoo``), one process per run, so runs
parallelise (``--jobs``) and use exactly the configs users get:

* ``blpo``: ``zoo_hyperparams/blpo.yml`` with BLPO's defaults (improvement-form leader objective, target coupling,
  Gauss–Newton curvature, Nyström: Gaussian sketch of rank 5, ρ = 1, two preconditioned-CG steps);
* ``blpo_coupled_follower`` / ``blpo_mse_follower``: the same with ``follower_objective`` pinned;
* ``blpo_columns`` / ``blpo_columns_rollout_adv``: the coupled follower with the plain column-sampling Nyström (no
  refinement), the solver before the refinement; the second with ``actor_advantages="rollout"``;
* ``blpo_nested``: the same entry with ``ihvp_solver=None`` and no solver settings (nested critic steps, plain actor
  gradient: the ablation);
* ``blpo_rollout_adv``: the same entry with ``actor_advantages="rollout"``;
* ``blpo_cg``: the same entry with ``ihvp_solver="cg"`` and CG's default settings;
* ``blpo_authors``: the authors' recipe, ``zoo_hyperparams/blpo_authors.yml``;
* ``blpo_dropin``: PPO's rl-zoo3 entry with the algorithm swapped (``vf_coef`` removed, which BLPO refuses);
* ``ppo_defaults`` / ``blpo_defaults`` / ``blpo_defaults_b64``: no config at all, the constructors' defaults (what
  ``PPO("MlpPolicy", env)`` and ``BLPO("MlpPolicy", env)`` give; the last with BLPO's former ``batch_size=64``);
  ``blpo_defaults_lr6e-4`` / ``blpo_defaults_lr1e-3``: BLPO's defaults with a larger actor learning rate (candidates
  for the default with minibatches of 512); ``blpo_defaults_clr3e-3``: the same with a larger critic learning rate;
* ``ppo``: rl-zoo3's own ``ppo.yml`` entry (its ``-v4`` entry for the MuJoCo ``-v5`` envs, which zoo lacks);
* history, the defaults before the improvement form (plain surrogate, Hessian curvature): ``blpo_distribution``
  (distribution coupling, the default before it), ``blpo_target`` / ``blpo_cg_target`` (target coupling, the default
  of the first recorded suite).

The policy is evaluated ``--evals`` times per run (deterministic actions, ``--eval-episodes`` episodes, rl-zoo3's
EvalCallback with normalisation statistics synced). Each finished run becomes ``<out>/csv/<env>/<variant>/seed<k>.csv``
with one row per evaluation (``timesteps, mean_return, std_return, episodes, seconds, train_return``, the last being
the mean return of the last 20 training episodes of the run); a run whose CSV exists is skipped, so an interrupted
suite resumes where it stopped. ``--summary`` prints the per-env table (mean ± sd over seeds) of what is finished.

Usage::

    python benchmarks/returns/suite.py --jobs 2                 # the "cpu" profile of docs/benchmarks.md
    python benchmarks/returns/suite.py --profile full --jobs 16 # rl-zoo3's budgets (1e5 to 1e6 steps per run)
    python benchmarks/returns/suite.py --summary --variants blpo blpo_nested   # mean ± sd table of finished runs
    python benchmarks/returns/report.py                         # rliable aggregates, plots, markdown tables
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sharding import add_campaign_arguments, parse_campaign_arguments, run_parallel, select_shard

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
DEFAULT_OUT = HERE / "results"

ENVS = ("CartPole-v1", "Acrobot-v1", "LunarLander-v3", "Pendulum-v1", "Hopper-v5", "HalfCheetah-v5")
# Steps per run. "cpu": what a 2-core machine finishes in about an hour for 4 variants x 5 seeds; "full": the
# budgets of the configs themselves (rl-zoo3's n_timesteps; Acrobot: the authors' 5e5).
PROFILES = {
    "cpu": {
        "CartPole-v1": 50_000,
        "Acrobot-v1": 50_000,
        "LunarLander-v3": 100_000,
        "Pendulum-v1": 50_000,
        "Hopper-v5": 50_000,
        "HalfCheetah-v5": 50_000,
    },
    "full": {
        "CartPole-v1": 100_000,
        "Acrobot-v1": 500_000,
        "LunarLander-v3": 1_000_000,
        "Pendulum-v1": 100_000,
        "Hopper-v5": 1_000_000,
        "HalfCheetah-v5": 1_000_000,
    },
}
# variant: (algo, packaged config or None, -params overrides). History variants pin the settings of earlier defaults.
DROP_IN = "ppo_zoo_dropin"  # PPO's rl-zoo3 entry with the algorithm swapped (see :func:`drop_in_config`)
CONSTRUCTOR_DEFAULTS = "constructor_defaults"  # no hyperparameter at all: the algorithm's own defaults, one env
_COLUMNS = "sketch='columns', pcg_steps=0"  # the plain column-sampling Nyström (the solver before the refinement)
_SURROGATE_HESSIAN = ["leader_objective:'surrogate'", f"ihvp_kwargs:dict(curvature='hessian', {_COLUMNS})"]
# Another solver (or none) replaces the entry's solver settings too: tuned entries set Nyström's rank and rho.
_SOLVER_DEFAULTS = "ihvp_kwargs:{}"
VARIANTS: dict[str, tuple[str, str | None, list[str]]] = {
    "blpo": ("blpo", None, []),
    "blpo_nested": ("blpo", None, ["ihvp_solver:None", _SOLVER_DEFAULTS]),
    "blpo_rollout_adv": ("blpo", None, ["actor_advantages:'rollout'"]),
    "blpo_cg": ("blpo", None, ["ihvp_solver:'cg'", _SOLVER_DEFAULTS]),
    "blpo_authors": ("blpo", "blpo_authors", []),
    "ppo": ("ppo", None, []),
    "blpo_dropin": ("blpo", DROP_IN, []),
    "ppo_defaults": ("ppo", CONSTRUCTOR_DEFAULTS, []),
    "blpo_defaults": ("blpo", CONSTRUCTOR_DEFAULTS, []),
    "blpo_defaults_b64": ("blpo", CONSTRUCTOR_DEFAULTS, ["batch_size:64"]),
    "blpo_defaults_lr6e-4": ("blpo", CONSTRUCTOR_DEFAULTS, ["learning_rate:6e-4"]),
    "blpo_defaults_lr1e-3": ("blpo", CONSTRUCTOR_DEFAULTS, ["learning_rate:1e-3"]),
    "blpo_defaults_clr3e-3": ("blpo", CONSTRUCTOR_DEFAULTS, ["critic_learning_rate:3e-3"]),
    "blpo_coupled_follower": ("blpo", None, ["follower_objective:'coupled'"]),
    "blpo_mse_follower": ("blpo", None, ["follower_objective:'mse'"]),
    "blpo_columns": ("blpo", None, [f"ihvp_kwargs:dict({_COLUMNS})", "follower_objective:'coupled'"]),
    "blpo_columns_rollout_adv": (
        "blpo",
        None,
        [f"ihvp_kwargs:dict({_COLUMNS})", "actor_advantages:'rollout'", "follower_objective:'coupled'"],
    ),
    "blpo_distribution": ("blpo", None, [*_SURROGATE_HESSIAN, "coupling:'distribution'"]),
    "blpo_target": ("blpo", None, [*_SURROGATE_HESSIAN, "coupling:'target'"]),
    "blpo_cg_target": ("blpo", None, ["ihvp_solver:'cg'", *_SURROGATE_HESSIAN, "coupling:'target'"]),
}
MAIN_VARIANTS = ("blpo", "blpo_nested", "blpo_cg", "ppo")
LABELS = {
    "blpo": "BLPO (default)",
    "blpo_nested": "BLPO nested-only",
    "blpo_rollout_adv": "BLPO, rollout advantages",
    "blpo_cg": "BLPO (CG)",
    "blpo_authors": "BLPO, authors' recipe",
    "blpo_coupled_follower": "BLPO, coupled follower",
    "blpo_mse_follower": "BLPO, MSE follower",
    "blpo_columns": "BLPO, column Nyström without refinement",
    "blpo_columns_rollout_adv": "BLPO, column Nyström without refinement, rollout advantages",
    "ppo": "PPO (zoo)",
    "blpo_dropin": "BLPO drop-in (PPO's zoo config)",
    "ppo_defaults": 'PPO("MlpPolicy", env)',
    "blpo_defaults": 'BLPO("MlpPolicy", env)',
    "blpo_defaults_b64": 'BLPO("MlpPolicy", env, batch_size=64) (the default before batch 512)',
    "blpo_defaults_lr6e-4": 'BLPO("MlpPolicy", env, learning_rate=6e-4)',
    "blpo_defaults_lr1e-3": 'BLPO("MlpPolicy", env, learning_rate=1e-3)',
    "blpo_defaults_clr3e-3": 'BLPO("MlpPolicy", env, critic_learning_rate=3e-3)',
    "blpo_distribution": "BLPO, surrogate + distribution coupling (previous default)",
    "blpo_target": "BLPO (Nyström), target coupling",
    "blpo_cg_target": "BLPO (CG), target coupling",
}
CSV_FIELDS = ("timesteps", "mean_return", "std_return", "episodes", "seconds", "train_return")
TRAIN_EPISODES = 20
RANDOM_SCORES_FILE = "random_scores.json"
RANDOM_EPISODES = 20


def random_scores(out: Path, envs: list[str]) -> dict[str, float]:
    """Mean return of uniformly random actions per env (the 0 of the report's normalised score); cached."""
    import gymnasium as gym

    path = out / RANDOM_SCORES_FILE
    scores = json.loads(path.read_text()) if path.exists() else {}
    for env_id in envs:
        if env_id in scores:
            continue
        env = gym.make(env_id)
        env.action_space.seed(0)
        returns = []
        for episode in range(RANDOM_EPISODES):
            env.reset(seed=episode)
            total, done = 0.0, False
            while not done:
                _, reward, terminated, truncated, _ = env.step(env.action_space.sample())
                total += float(reward)
                done = terminated or truncated
            returns.append(total)
        scores[env_id] = float(np.mean(returns))
        env.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(scores, indent=2))
    return scores


def ppo_config(out: Path) -> Path:
    """rl-zoo3's ppo.yml plus ``-v5`` keys copied from its ``-v4`` entries (zoo has none; without them the MuJoCo
    envs would fall back to zoo's ``default`` entry: no normalisation, default PPO)."""
    import rl_zoo3

    source = Path(rl_zoo3.__file__).parent / "hyperparams" / "ppo.yml"
    entries = yaml.safe_load(source.read_text())
    for env_id in ENVS:
        if env_id.endswith("-v5") and env_id not in entries:
            entries[env_id] = entries[env_id[:-1] + "4"]
    target = out / "ppo_zoo_v5.yml"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(yaml.safe_dump(entries, sort_keys=True))
    return target


def drop_in_config(out: Path) -> Path:
    """PPO's rl-zoo3 entries for BLPO: what a user who swaps ``PPO`` for ``BLPO`` and keeps the config gets. The only
    change is the removal of ``vf_coef`` (MuJoCo entries), which BLPO refuses by name (its critic has its own loss
    and optimizer); everything else, including ``learning_rate``, batch size, epochs and ``n_envs``, is PPO's."""
    return edited_config(ppo_config(out), out / "ppo_zoo_dropin_v5.yml", lambda entry: entry.pop("vf_coef", None))


def edited_config(source: Path, target: Path, edit: Callable[[dict], object]) -> Path:
    """The entries of the rl-zoo3 config ``source`` with ``edit`` applied to each env's entry, written to ``target``."""
    entries = yaml.safe_load(source.read_text())
    for entry in entries.values():
        if isinstance(entry, dict):
            edit(entry)
    target.write_text(yaml.safe_dump(entries, sort_keys=True))
    return target


def constructor_defaults_config(out: Path) -> Path:
    """A config with no hyperparameter for any env: ``ALGO("MlpPolicy", env)`` on one env copy, no normalisation."""
    target = out / "constructor_defaults.yml"
    target.parent.mkdir(parents=True, exist_ok=True)
    entries = {env_id: {"policy": "MlpPolicy", "n_timesteps": PROFILES["full"][env_id]} for env_id in ENVS}
    target.write_text(yaml.safe_dump(entries, sort_keys=True))
    return target


def csv_path(out: Path, env_id: str, variant: str, seed: int) -> Path:
    return out / "csv" / env_id / variant / f"seed{seed}.csv"


def train_command(env_id: str, variant: str, seed: int, steps: int, args: argparse.Namespace, log_dir: Path) -> list[str]:
    algo, config, overrides = VARIANTS[variant]
    command = [sys.executable, "-m", "sb3_blpo.zoo", "train", "--algo", algo, "--env", env_id, "--seed", str(seed)]
    command += ["-n", str(steps), "--eval-freq", str(max(steps // args.evals, 1)), "--eval-episodes", str(args.eval_episodes)]
    command += ["-f", str(log_dir), "--num-threads", "1", "--verbose", "0", "--log-interval", "-1"]
    if config == CONSTRUCTOR_DEFAULTS:
        command += ["--conf-file", str(constructor_defaults_config(args.out))]
    elif algo == "ppo":
        command += ["--conf-file", str(ppo_config(args.out))]
    elif config == DROP_IN:
        command += ["--conf-file", str(drop_in_config(args.out))]
    elif config is not None:
        command += ["--conf-file", config]
    if getattr(args, "tensorboard", False):  # the per-update statistics (approx_kl, clip_fraction) of sample_reuse.py
        command += ["--tensorboard-log", str(log_dir / "tensorboard")]
    if overrides:
        command += ["-params", *overrides]
    return command


def training_return(log_dir: Path) -> float:
    """Mean return of the last :data:`TRAIN_EPISODES` training episodes (all envs, by end time), from the Monitor
    files rl-zoo3 writes next to the model; NaN if there are none."""
    episodes = []
    for monitor in log_dir.rglob("*.monitor.csv"):
        with open(monitor) as handle:
            handle.readline()  # the Monitor's JSON header
            episodes += [(float(row["t"]), float(row["r"])) for row in csv.DictReader(handle)]
    if not episodes:
        return math.nan
    episodes.sort()
    return round(float(np.mean([r for _, r in episodes[-TRAIN_EPISODES:]])), 2)


def summary(args: argparse.Namespace) -> str:
    """Markdown tables of the finished runs, env × variant: the training return (last 20 episodes) and the final
    evaluation, each as mean ± sd over seeds (number of seeds in brackets)."""
    cells: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for env_id in args.envs:
        for variant in args.variants:
            for seed in args.seeds:
                path = csv_path(args.out, env_id, variant, seed)
                if path.exists():
                    with open(path) as handle:
                        last = list(csv.DictReader(handle))[-1]
                    train = float(last.get("train_return") or math.nan)
                    cells.setdefault((env_id, variant), []).append((train, float(last["mean_return"])))
    tables = []
    for title, column in (("training return, last 20 episodes", 0), ("final evaluation", 1)):
        lines = [f"| env ({title}) | " + " | ".join(LABELS[v] for v in args.variants) + " |"]
        lines.append("|---" * (len(args.variants) + 1) + "|")
        for env_id in args.envs:
            row = []
            for variant in args.variants:
                values = [pair[column] for pair in cells.get((env_id, variant), [])]
                spread = np.std(values, ddof=1) if len(values) > 1 else 0.0
                row.append(f"{np.mean(values):.1f} ± {spread:.1f} ({len(values)})" if values else "–")
            lines.append(f"| {env_id} | " + " | ".join(row) + " |")
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


def run_list(args: argparse.Namespace) -> list[tuple[str, str, int, int]]:
    """Every run of the suite as ``(env, variant, seed, steps)``, finished or not, in a fixed order (seed-major, so
    a partial suite has whole seeds): shards index this list, so they are disjoint whatever has finished."""
    return [
        (env_id, variant, seed, args.steps or PROFILES[args.profile][env_id])
        for seed in args.seeds
        for env_id in args.envs
        for variant in args.variants
    ]


def run(env_id: str, variant: str, seed: int, steps: int, args: argparse.Namespace) -> str:
    target = csv_path(args.out, env_id, variant, seed)
    if target.exists():  # finished by another process since this one listed its runs
        return "skipped (finished elsewhere)"
    log_dir = args.out / "logs" / f"{env_id}_{variant}_seed{seed}"
    shutil.rmtree(log_dir, ignore_errors=True)  # a partial run from an interrupted suite starts over
    started = time.perf_counter()
    result = subprocess.run(
        train_command(env_id, variant, seed, steps, args, log_dir),
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"),
    )
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        return f"FAILED ({seconds:.0f} s)\n{result.stderr[-2000:]}"
    evaluations = sorted(log_dir.rglob("evaluations.npz"))
    if not evaluations:
        return f"FAILED: no evaluations.npz under {log_dir}"
    data = np.load(evaluations[-1])
    train_return = training_return(log_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    rows = [
        (int(t), float(np.mean(r)), float(np.std(r)), len(r), round(seconds, 1), train_return)
        for t, r in zip(data["timesteps"], data["results"], strict=True)
    ]
    with open(target.with_suffix(".tmp"), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_FIELDS)
        writer.writerows(rows)
    target.with_suffix(".tmp").replace(target)  # the CSV appears only once complete: resume skips finished runs only
    if not args.keep_logs:
        shutil.rmtree(log_dir, ignore_errors=True)
    return f"ok ({seconds:.0f} s, last eval {rows[-1][1]:.1f})"


def run_jobs(
    jobs: list[tuple[str, str, int, int]],
    args: argparse.Namespace,
    runner: Callable[[str, str, int, int, argparse.Namespace], str] | None = None,
) -> None:
    """``runner`` (default :func:`run`, looked up at call time) on every ``(env, variant, seed, steps)`` of ``jobs``,
    ``args.jobs`` at a time; one line per run."""
    runner = runner or run

    def launch(job: tuple[str, str, int, int]) -> None:
        env_id, variant, seed, steps = job
        print(f"{env_id} {variant} seed {seed} ({steps} steps): {runner(env_id, variant, seed, steps, args)}", flush=True)

    run_parallel(launch, jobs, args.jobs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--envs", nargs="+", default=list(ENVS), choices=list(ENVS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--steps", type=int, default=None, help="override the profile's steps per run (all envs)")
    parser.add_argument("--evals", type=int, default=10, help="evaluations per run")
    parser.add_argument("--eval-episodes", type=int, default=5)
    parser.add_argument("--keep-logs", action="store_true", help="keep rl-zoo3's log folders (models, configs)")
    add_campaign_arguments(parser, DEFAULT_OUT)
    args = parse_campaign_arguments(parser, summary)
    if args is None:
        return
    jobs = [job for job in select_shard(run_list(args), args.shard) if not csv_path(args.out, *job[:3]).exists()]
    print(f"{len(jobs)} runs to do ({args.profile} profile)", flush=True)
    print("random-action scores:", random_scores(args.out, args.envs), flush=True)
    run_jobs(jobs, args)


if __name__ == "__main__":
    main()
