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
  ε-ranks of the loss Hessian (SLQ), the trainability ε-rank relative to task 0 on the task-0 scale, and the same on
  each spectrum's own scale (``TrainabilityCallback(epsilon_scale="current")``: columns ``current_*``);
* ``features.csv``: per rollout, per hidden layer, effective rank, srank and dormant-unit fraction;
* ``rollouts.csv``: per rollout, the policy's mean entropy on the rollout's observations (before the update).

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
from pathlib import Path
from typing import Any

import torch as th
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback, CallbackList
from stable_baselines3.common.env_util import make_vec_env

from sb3_blpo import BLPO
from sb3_blpo.callbacks import (
    FeatureRankCallback,
    HeadReset,
    HessianSpectrumCallback,
    PlasticityRegularizer,
    TrainabilityCallback,
)
from sb3_blpo.envs import TASK_ID_INFO_KEY, FlippedActions, PermutedObservations

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sharding import add_campaign_arguments, run_parallel, select_shard

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results"

# PPO in the regime where the paper finds plasticity loss: many small minibatches and epochs per rollout (strong
# non-stationarity), ReLU units, a high learning rate. BLPO gets the same rollout, with fewer, larger minibatches
# (its recommended shape, docs/blpo.md), 3 nested critic steps and the correction bounded at half of ‖∇θf‖: with ReLU
# units its correction is large and aligned with ∇θf, and the default bound (1.0) cancels most of the actor step
# (seed 0, plain CartPole, 20k steps: evaluation return 41 with bound 1.0, 237 with 0.5, 213 nested-only).
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
    policy_kwargs=dict(activation_fn=th.nn.ReLU, net_arch=[64, 64]),
)
# coupling="target": the BLPO default when the study ran (docs/plasticity.md); "distribution" is the default now.
BLPO_SETTINGS: dict[str, Any] = dict(
    PPO_SETTINGS, batch_size=256, n_epochs=5, n_critic_steps=3, hypergrad_bound=0.5, coupling="target"
)

# Regularizer strengths (PlasticityRegularizer). L2 acts through Adam (coupled, as the paper's add_decayed_weights);
# the rank term is the paper's recipe: raw ascent steps on the mean effective rank before each epoch.
DEFAULT_L2_COEF = 1e-3
DEFAULT_ASCENT_LR = 1e-3
DEFAULT_L2_INIT_COEF = 1e-2
# The two variants the 10-task study pointed to (the warm-started policy starts new tasks already confident): an
# entropy bonus (0.01, the usual value for discrete actions, e.g. rl-zoo3's LunarLander), and a reset of the policy
# head at every task switch (HeadReset, before the monitors so that the task-start spectrum is the reset network's).
DEFAULT_ENT_COEF = 0.01
# terms: the PlasticityRegularizer terms; scale multiplies their coefficients.
VARIANTS: dict[str, dict[str, Any]] = {
    "ppo": dict(algo="PPO"),
    "ppo_l2": dict(algo="PPO", terms=("l2",)),
    "ppo_er": dict(algo="PPO", terms=("er",)),
    "ppo_l2_er": dict(algo="PPO", terms=("l2", "er")),
    "ppo_l2_er_x10": dict(algo="PPO", terms=("l2", "er"), scale=10.0),
    "ppo_l2_init": dict(algo="PPO", terms=("l2_init",)),
    "blpo_l2_er": dict(algo="BLPO", terms=("l2", "er")),
    "reset": dict(algo="PPO", reset_each_task=True),
    "ppo_entropy": dict(algo="PPO", entropy_bonus=True),
    "ppo_head_reset": dict(algo="PPO", head_reset=True),
}
LABELS = {
    "ppo": "PPO",
    "ppo_l2": "PPO+L2",
    "ppo_er": "PPO+ER",
    "ppo_l2_er": "PPO+L2+ER",
    "ppo_l2_er_x10": "PPO+L2+ER, coefficients ×10",
    "ppo_l2_init": "PPO+L2-Init",
    "blpo_l2_er": "BLPO+L2+ER",
    "reset": "PPO, reset at each task",
    "ppo_entropy": "PPO + entropy bonus",
    "ppo_head_reset": "PPO, policy head reset at each task",
}
DONE_MARKER = "done.json"
ENTROPY_SAMPLES = 512


def regularizer_kwargs(spec: dict[str, Any], args: argparse.Namespace) -> dict[str, Any] | None:
    """The variant's PlasticityRegularizer arguments (``None``: no regularizer)."""
    scale, terms = spec.get("scale", 1.0), spec.get("terms", ())
    kwargs: dict[str, Any] = {}
    if "l2" in terms:
        kwargs["l2_coef"] = scale * args.l2_coef
    if "l2_init" in terms:
        kwargs["l2_init_coef"] = scale * args.l2_init_coef
    if "er" in terms:
        kwargs.update(erank_mode="ascent", ascent_lr=scale * args.ascent_lr)
    return kwargs or None


class StudyRecorder(BaseCallback):
    """Placed after the monitors: keeps every finished episode and copies the monitors' newest measurements into rows
    (the monitors keep only their latest). ``offset`` is added to the model's step count (the reset variant restarts
    it with each new model)."""

    def __init__(
        self,
        hessian: HessianSpectrumCallback,
        trainability: TrainabilityCallback,
        features: FeatureRankCallback,
        current_scale: TrainabilityCallback,
    ) -> None:
        super().__init__()
        self.hessian, self.trainability, self.features = hessian, trainability, features
        self.current_scale = current_scale
        self.offset = 0
        self.episodes: list[tuple[int, int, float]] = []
        self.feature_rows: list[dict[str, Any]] = []
        self.task_rows: list[dict[str, Any]] = []
        self.rollout_rows: list[dict[str, Any]] = []
        self.seen_features = 0
        self.seen_trainability = 0
        self.task = 0

    def _on_step(self) -> bool:
        # The task of the step just taken (the env's `task` attribute may already be the next one after a task's
        # last step); with task lengths a multiple of n_steps it is also the task of the whole rollout.
        self.task = int(self.locals["infos"][0][TASK_ID_INFO_KEY])
        for info in self.locals["infos"]:
            if "episode" in info:
                self.episodes.append((self.offset + self.num_timesteps, info[TASK_ID_INFO_KEY], info["episode"]["r"]))
        return True

    def _on_rollout_end(self) -> None:
        timesteps = self.offset + self.num_timesteps
        self.rollout_rows.append(dict(timesteps=timesteps, task=self.task, policy_entropy=self._policy_entropy()))
        if self.features.n_measurements != self.seen_features:
            self.seen_features = self.features.n_measurements
            for layer, metrics in self.features.latest.items():
                self.feature_rows.append(dict(timesteps=timesteps, task=self.task, layer=layer, **metrics))
        current = {(r.task_index, r.group): r for r in self.current_scale.history[self.seen_trainability :]}
        for record in self.trainability.history[self.seen_trainability :]:
            summary = self.hessian.latest[record.group].summary
            on_current_scale = current[(record.task_index, record.group)]
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
                current_epsilon=on_current_scale.epsilon,
                current_eps_rank=on_current_scale.epsilon_rank,
                current_ratio=on_current_scale.ratio,
            )
            for eps, value in zip(summary.epsilons, summary.epsilon_ranks, strict=True):
                row[f"eps_rank_{eps:g}"] = float(value)
            self.task_rows.append(row)
        self.seen_trainability = len(self.trainability.history)

    def _policy_entropy(self) -> float:
        """Mean entropy of the current policy on (up to ``ENTROPY_SAMPLES``) observations of the rollout just collected."""
        buffer = self.model.rollout_buffer
        observations = buffer.observations.reshape(-1, *buffer.obs_shape)[
            :: max(1, buffer.buffer_size * buffer.n_envs // ENTROPY_SAMPLES)
        ]
        with th.no_grad():
            obs_tensor = self.model.policy.obs_to_tensor(observations)[0]
            return float(self.model.policy.get_distribution(obs_tensor).entropy().mean())

    def write(self, run_dir: Path) -> None:
        tables = {
            "episodes.csv": [dict(timesteps=t, task=k, **{"return": r}) for t, k, r in self.episodes],
            "task_starts.csv": self.task_rows,
            "features.csv": self.feature_rows,
            "rollouts.csv": self.rollout_rows,
        }
        for name, rows in tables.items():
            with open(run_dir / name, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)


def run_one(variant: str, seed: int, args: argparse.Namespace) -> None:
    """Train one (variant, seed) over ``tasks`` tasks of ``task_steps`` steps per env copy; write its CSVs."""
    th.set_num_threads(1)
    spec = VARIANTS[variant]
    regularizer = regularizer_kwargs(spec, args)
    settings = dict(BLPO_SETTINGS if spec["algo"] == "BLPO" else PPO_SETTINGS)
    if spec.get("entropy_bonus"):
        settings["ent_coef"] = args.ent_coef

    def wrap(env: Any) -> Any:
        permuted = PermutedObservations(env, steps_per_task=args.task_steps, schedule_seed=seed, sign_flip=True)
        return FlippedActions(permuted, steps_per_task=args.task_steps, schedule_seed=seed)

    env = make_vec_env(args.env, n_envs=N_ENVS, seed=seed, wrapper_class=wrap)
    algo = BLPO if spec["algo"] == "BLPO" else PPO
    hessian = HessianSpectrumCallback(every_n_rollouts=None, epsilons=(1e-3, 1e-2, 1e-1), seed=seed)
    trainability = TrainabilityCallback(spectrum_source=hessian, seed=seed)
    # The same task-start spectra on each one's own scale (reused from `hessian`, no extra Hessian products).
    current_scale = TrainabilityCallback(spectrum_source=hessian, seed=seed, epsilon_scale="current")
    features = FeatureRankCallback(every_n_rollouts=1, seed=seed)
    recorder = StudyRecorder(hessian, trainability, features, current_scale)
    callbacks: list[BaseCallback] = [hessian, trainability, current_scale, features, recorder]
    if spec.get("head_reset"):
        callbacks.insert(0, HeadReset(heads="actor", seed=seed))
    if regularizer is not None:
        callbacks.append(PlasticityRegularizer(**regularizer))

    started = time.perf_counter()
    phases = args.tasks if spec.get("reset_each_task") else 1
    steps_per_phase = args.tasks * args.task_steps * N_ENVS // phases
    for phase in range(phases):
        # The reset variant: a fresh network and optimizer for each task (the monitors carry over).
        model = algo("MlpPolicy", env, seed=seed, **settings)
        recorder.offset = phase * steps_per_phase
        model.learn(steps_per_phase, callback=CallbackList(callbacks))
    run_dir = args.out / variant / f"seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    recorder.write(run_dir)
    meta = dict(
        variant=variant,
        seed=seed,
        env=args.env,
        tasks=args.tasks,
        task_steps_per_env=args.task_steps,
        n_envs=N_ENVS,
        total_timesteps=phases * steps_per_phase,
        seconds=time.perf_counter() - started,
        settings={k: str(v) for k, v in settings.items()},
        regularizer=regularizer,
        head_reset=bool(spec.get("head_reset")),
    )
    (run_dir / DONE_MARKER).write_text(json.dumps(meta, indent=2))


def run_list(args: argparse.Namespace) -> list[tuple[str, int]]:
    """Every run of the study as ``(variant, seed)``, finished or not, in a fixed order (shards index this list)."""
    return [(variant, seed) for seed in args.seeds for variant in args.variants]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5], help="seed 0 chose the coefficients")
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--task-steps", type=int, default=N_STEPS * 10, help="steps per task and env copy")
    parser.add_argument("--env", default="CartPole-v1")
    parser.add_argument("--l2-coef", type=float, default=DEFAULT_L2_COEF, help="PlasticityRegularizer l2_coef")
    parser.add_argument("--ascent-lr", type=float, default=DEFAULT_ASCENT_LR, help="PlasticityRegularizer ascent_lr")
    parser.add_argument("--l2-init-coef", type=float, default=DEFAULT_L2_INIT_COEF, help="... l2_init_coef")
    parser.add_argument("--ent-coef", type=float, default=DEFAULT_ENT_COEF, help="ent_coef of ppo_entropy")
    parser.add_argument("--run", nargs=2, metavar=("VARIANT", "SEED"), help=argparse.SUPPRESS)
    add_campaign_arguments(parser, DEFAULT_OUT, summary=False)
    args = parser.parse_args()
    if args.run:
        run_one(args.run[0], int(args.run[1]), args)
        return
    pending = [
        (variant, seed)
        for variant, seed in select_shard(run_list(args), args.shard)
        if not (args.out / variant / f"seed{seed}" / DONE_MARKER).exists()
    ]
    print(f"{len(pending)} runs to do", flush=True)

    def launch(job: tuple[str, int]) -> None:
        variant, seed = job
        command = [sys.executable, __file__, "--run", variant, str(seed), "--tasks", str(args.tasks)]
        command += ["--task-steps", str(args.task_steps), "--env", args.env, "--out", str(args.out)]
        command += [
            "--l2-coef",
            str(args.l2_coef),
            "--ascent-lr",
            str(args.ascent_lr),
            "--l2-init-coef",
            str(args.l2_init_coef),
            "--ent-coef",
            str(args.ent_coef),
        ]
        started = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        status = "ok" if result.returncode == 0 else f"FAILED\n{result.stderr[-3000:]}"
        print(f"{variant} seed {seed}: {status} ({time.perf_counter() - started:.0f} s)", flush=True)

    run_parallel(launch, pending, args.jobs)


if __name__ == "__main__":
    main()
