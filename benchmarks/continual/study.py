"""Continual-RL plasticity study: PPO, PPO+L2, PPO+ER, PPO+L2+ER and BLPO+L2+ER on a sequence of tasks.

The task sequence is CartPole-v1 with, per task, a fixed random permutation and sign flip of the observation and a
random permutation of the two actions (``sb3_blpo.envs`` wrappers; task ``k`` depends only on ``(schedule_seed, k)``).
Every task is the same control problem seen through a different input/output relabelling, and the policy's
initialisation is invariant in distribution to such relabellings, so a freshly initialised network finds every task
as hard as task 0: **task 0's return is the reset-all yardstick** and a decline over later tasks is plasticity loss,
not task difficulty. The ``reset`` variant measures that yardstick directly (a new network at each task start).

Each run is one process (``--jobs`` in parallel); finished runs are skipped, so an interrupted study resumes. Per run,
``<out>/<variant>/seed<k>/`` receives

* ``episodes.csv``: ``timesteps, task, return`` of every finished training episode;
* ``task_starts.csv``: at each task start (before any update on the new task), per parameter group, λmax, λmin and the
  ε-ranks of the loss Hessian (SLQ) and the trainability ε-rank relative to task 0;
* ``features.csv``: per rollout, per hidden layer, effective rank, srank and dormant-unit fraction.

Usage::

    python benchmarks/continual/study.py --jobs 2                       # the study of docs/plasticity.md
    python benchmarks/continual/report.py                               # CSV tables and PNG plots into docs/

Options change the protocol (``--tasks``, ``--task-steps``, ``--seeds``, ``--variants``); the report states what ran.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results"

# PPO in the regime where the paper finds plasticity loss: many small minibatches and epochs per rollout (strong
# non-stationarity), ReLU units, a high learning rate. BLPO gets the same rollout, with fewer, larger minibatches
# (its recommended shape, docs/blpo.md) and 3 nested critic steps.
N_ENVS = 4
N_STEPS = 256
PPO_SETTINGS: dict[str, Any] = dict(
    n_steps=N_STEPS,
    batch_size=64,
    n_epochs=10,
    learning_rate=1e-3,
    gamma=0.98,
    gae_lambda=0.8,
    ent_coef=0.0,
    policy_kwargs=dict(activation_fn="relu", net_arch=[64, 64]),
)
BLPO_SETTINGS: dict[str, Any] = dict(PPO_SETTINGS, batch_size=256, n_epochs=5, n_critic_steps=3)

# Regularizer strengths (PlasticityRegularizer). L2 acts through Adam (coupled, as the paper's add_decayed_weights);
# the rank term is the paper's recipe: raw ascent steps on the mean effective rank before each epoch.
DEFAULT_L2_COEF = 1e-3
DEFAULT_ASCENT_LR = 1e-3
VARIANTS: dict[str, dict[str, Any]] = {
    "ppo": dict(algo="PPO", l2=False, er=False),
    "ppo_l2": dict(algo="PPO", l2=True, er=False),
    "ppo_er": dict(algo="PPO", l2=False, er=True),
    "ppo_l2_er": dict(algo="PPO", l2=True, er=True),
    "blpo_l2_er": dict(algo="BLPO", l2=True, er=True),
    "reset": dict(algo="PPO", l2=False, er=False, reset_each_task=True),
}
LABELS = {
    "ppo": "PPO",
    "ppo_l2": "PPO+L2",
    "ppo_er": "PPO+ER",
    "ppo_l2_er": "PPO+L2+ER",
    "blpo_l2_er": "BLPO+L2+ER",
    "reset": "PPO, reset at each task",
}
DONE_MARKER = "done.json"


def regularizer_kwargs(spec: dict[str, Any], l2_coef: float, ascent_lr: float) -> dict[str, Any] | None:
    kwargs: dict[str, Any] = {}
    if spec["l2"]:
        kwargs["l2_coef"] = l2_coef
    if spec["er"]:
        kwargs.update(erank_mode="ascent", ascent_lr=ascent_lr)
    return kwargs or None


def run_one(variant: str, seed: int, args: argparse.Namespace) -> None:
    """Train one (variant, seed) over ``tasks`` tasks of ``task_steps`` steps per env copy; write its CSVs."""
    import numpy as np
    import torch as th
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback, CallbackList
    from stable_baselines3.common.env_util import make_vec_env

    from sb3_blpo import BLPO
    from sb3_blpo.callbacks import FeatureRankCallback, HessianSpectrumCallback, PlasticityRegularizer, TrainabilityCallback
    from sb3_blpo.envs import TASK_ID_INFO_KEY, FlippedActions, PermutedObservations

    th.set_num_threads(1)
    tasks, task_steps, out_dir, env_id = args.tasks, args.task_steps, args.out, args.env
    spec = VARIANTS[variant]
    regularizer = regularizer_kwargs(spec, args.l2_coef, args.ascent_lr)
    settings = dict(BLPO_SETTINGS if spec["algo"] == "BLPO" else PPO_SETTINGS)
    settings["policy_kwargs"] = dict(settings["policy_kwargs"], activation_fn=th.nn.ReLU)

    def wrap(env: Any) -> Any:
        permuted = PermutedObservations(env, steps_per_task=task_steps, schedule_seed=seed, sign_flip=True)
        return FlippedActions(permuted, steps_per_task=task_steps, schedule_seed=seed)

    env = make_vec_env(env_id, n_envs=N_ENVS, seed=seed, wrapper_class=wrap)
    algo = BLPO if spec["algo"] == "BLPO" else PPO

    def new_model() -> Any:
        return algo("MlpPolicy", env, seed=seed, **settings)

    run_dir = out_dir / variant / f"seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    episodes = open(run_dir / "episodes.csv", "w", newline="")
    episode_writer = csv.writer(episodes)
    episode_writer.writerow(["timesteps", "task", "return"])

    class EpisodeRecorder(BaseCallback):
        def __init__(self, offset: int) -> None:
            super().__init__()
            self.offset = offset

        def _on_step(self) -> bool:
            for info in self.locals["infos"]:
                if "episode" in info:
                    episode_writer.writerow([self.offset + self.num_timesteps, info[TASK_ID_INFO_KEY], info["episode"]["r"]])
            return True

    hessian = HessianSpectrumCallback(
        every_n_rollouts=None, parameter_groups=("actor", "critic"), epsilons=(1e-3, 1e-2, 1e-1), seed=seed
    )
    trainability = TrainabilityCallback(spectrum_source=hessian, seed=seed)
    features = FeatureRankCallback(every_n_rollouts=1, seed=seed)
    feature_rows: list[dict[str, Any]] = []
    task_rows: list[dict[str, Any]] = []

    class MeasurementRecorder(BaseCallback):
        """Placed after the monitors: copies their newest measurements into rows (they keep only the latest)."""

        def __init__(self, offset: int) -> None:
            super().__init__()
            self.offset = offset
            self.seen_features = features.n_measurements
            self.seen_trainability = len(trainability.history)

        def _on_step(self) -> bool:
            return True

        def _on_rollout_end(self) -> None:
            timesteps = self.offset + self.num_timesteps
            if features.n_measurements != self.seen_features:
                self.seen_features = features.n_measurements
                task = int(self.training_env.get_attr("task")[0])
                for layer, metrics in features.latest.items():
                    feature_rows.append(dict(timesteps=timesteps, task=task, layer=layer, **metrics))
            for record in trainability.history[self.seen_trainability :]:
                summary = hessian.latest[record.group].summary
                row = dict(
                    task=record.task_index,
                    group=record.group,
                    timesteps=timesteps,
                    lambda_max=summary.lambda_max,
                    lambda_min=summary.lambda_min,
                    trainability_epsilon=record.epsilon,
                    trainability_eps_rank=record.epsilon_rank,
                    trainability_ratio=record.ratio,
                    lambda_max_ratio=record.lambda_max_ratio,
                )
                for eps, value in zip(summary.epsilons, summary.epsilon_ranks, strict=True):
                    row[f"eps_rank_{eps:g}"] = float(value)
                task_rows.append(row)
            self.seen_trainability = len(trainability.history)

    offset = 0
    started = time.perf_counter()
    model = new_model()
    phases = tasks if spec.get("reset_each_task") else 1
    steps_per_phase = tasks * task_steps * N_ENVS // phases
    for phase in range(phases):
        if phase > 0:
            model = new_model()  # a fresh network (and optimizer) for the new task: the reset-all yardstick
        callbacks: list[BaseCallback] = [EpisodeRecorder(offset), hessian, trainability, features, MeasurementRecorder(offset)]
        if regularizer is not None:
            callbacks.append(PlasticityRegularizer(**regularizer))
        model.learn(steps_per_phase, callback=CallbackList(callbacks))
        offset += steps_per_phase
    episodes.close()
    for name, rows in (("task_starts.csv", task_rows), ("features.csv", feature_rows)):
        with open(run_dir / name, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    meta = dict(
        variant=variant,
        seed=seed,
        env=env_id,
        tasks=tasks,
        task_steps_per_env=task_steps,
        n_envs=N_ENVS,
        total_timesteps=offset,
        seconds=time.perf_counter() - started,
        settings={k: str(v) for k, v in settings.items()},
        regularizer=regularizer,
    )
    (run_dir / DONE_MARKER).write_text(json.dumps(meta, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5], help="seed 0 chose the coefficients")
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--task-steps", type=int, default=N_STEPS * 10, help="steps per task and env copy")
    parser.add_argument("--env", default="CartPole-v1")
    parser.add_argument("--l2-coef", type=float, default=DEFAULT_L2_COEF, help="PlasticityRegularizer l2_coef")
    parser.add_argument("--ascent-lr", type=float, default=DEFAULT_ASCENT_LR, help="PlasticityRegularizer ascent_lr")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (one process each)")
    parser.add_argument("--run", nargs=2, metavar=("VARIANT", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        run_one(args.run[0], int(args.run[1]), args)
        return
    pending = [
        (variant, seed)
        for seed in args.seeds
        for variant in args.variants
        if not (args.out / variant / f"seed{seed}" / DONE_MARKER).exists()
    ]
    print(f"{len(pending)} runs to do", flush=True)

    def launch(job: tuple[str, int]) -> None:
        variant, seed = job
        command = [sys.executable, __file__, "--run", variant, str(seed), "--tasks", str(args.tasks)]
        command += ["--task-steps", str(args.task_steps), "--env", args.env, "--out", str(args.out)]
        command += ["--l2-coef", str(args.l2_coef), "--ascent-lr", str(args.ascent_lr)]
        started = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        status = "ok" if result.returncode == 0 else f"FAILED\n{result.stderr[-3000:]}"
        print(f"{variant} seed {seed}: {status} ({time.perf_counter() - started:.0f} s)", flush=True)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(launch, pending))


if __name__ == "__main__":
    main()
