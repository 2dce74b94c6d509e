"""What the hypergradient correction does during training: its size relative to ``∇θf`` and how often the bound acts.

Trains BLPO with each env's ``zoo_hyperparams/blpo.yml`` entry (one seed, the returns suite's "cpu" budget) for each
variant and records, after every update, the logged ``train/correction_ratio`` (‖u‖ / ‖∇θf‖ before the bound, mean over
minibatches), ``train/correction_bounded_fraction`` (share of minibatches where ``hypergrad_bound`` rescaled ``u``),
``train/correction_cosine`` and ``train/ihvp_clamped_cores``. Variants: BLPO's default and the previous default (plain
surrogate, distribution coupling, Hessian curvature, column Nyström), whose correction the bound had to cap.

Writes ``benchmarks/results/correction_stats.json`` and prints the markdown table of ``docs/benchmarks.md``.

Usage::

    python benchmarks/correction_stats.py [--envs CartPole-v1 Pendulum-v1] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch as th
import yaml
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.utils import LinearSchedule
from stable_baselines3.common.vec_env import VecNormalize

from sb3_blpo import BLPO

REPO = Path(__file__).resolve().parents[1]
STEPS = {"CartPole-v1": 50_000, "Acrobot-v1": 50_000, "Pendulum-v1": 50_000, "LunarLander-v3": 100_000, "Hopper-v5": 50_000}
KEYS = ("correction_ratio", "correction_bounded_fraction", "correction_cosine", "ihvp_clamped_cores")
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "previous default": dict(
        leader_objective="surrogate",
        coupling="distribution",
        ihvp_kwargs=dict(curvature="hessian", sketch="columns", pcg_steps=0),
    ),
}


def zoo_kwargs(entry: dict) -> dict:
    """A blpo.yml entry as BLPO keyword arguments, converted the way rl-zoo3 converts them."""
    kwargs = {k: v for k, v in entry.items() if k not in ("n_timesteps", "policy", "normalize", "n_envs")}
    for key, value in list(kwargs.items()):
        if isinstance(value, str) and value.startswith("lin_"):
            kwargs[key] = LinearSchedule(float(value[4:]), 0.0, 1.0)
    if isinstance(kwargs.get("policy_kwargs"), str):
        kwargs["policy_kwargs"] = eval(kwargs["policy_kwargs"], {"nn": th.nn})
    return kwargs


class TrainLogs(BaseCallback):
    """Collects the ``train/`` values of :data:`KEYS` recorded by each ``train()`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.history: dict[str, list[float]] = {key: [] for key in KEYS}

    def _on_rollout_start(self) -> None:
        self._collect()

    def _on_training_end(self) -> None:
        self._collect()

    def _collect(self) -> None:
        values = self.model.logger.name_to_value
        if "train/correction_ratio" in values:
            for key in KEYS:
                self.history[key].append(float(values[f"train/{key}"]))
            values.clear()  # one entry per update even when the logger is not dumped in between

    def _on_step(self) -> bool:
        return True


def measure(env_id: str, variant: str, seed: int) -> dict[str, list[float]]:
    entry = yaml.safe_load((REPO / "zoo_hyperparams" / "blpo.yml").read_text())[env_id]
    env = make_vec_env(env_id, n_envs=int(entry.get("n_envs", 1)), seed=seed)
    if entry.get("normalize"):
        env = VecNormalize(env)
    model = BLPO("MlpPolicy", env, seed=seed, **{**zoo_kwargs(entry), **VARIANTS[variant]})
    logs = TrainLogs()
    model.learn(STEPS[env_id], callback=logs)
    return logs.history


def markdown(results: dict[str, dict[str, dict[str, list[float]]]]) -> str:
    lines = [
        "| env | variant | updates | bound active (share of minibatches) | ‖u‖ / ‖∇θf‖ median [10%, 90%] | cos(u, ∇θf) | "
        "clamped cores |",
        "|---|---|---|---|---|---|---|",
    ]
    for env_id, variants in results.items():
        for variant, history in variants.items():
            ratio = np.asarray(history["correction_ratio"])
            lines.append(
                f"| {env_id} | {variant} | {len(ratio)} | {np.mean(history['correction_bounded_fraction']):.1%} | "
                f"{np.median(ratio):.3g} [{np.quantile(ratio, 0.1):.3g}, {np.quantile(ratio, 0.9):.3g}] | "
                f"{np.mean(history['correction_cosine']):.2f} | {int(np.sum(history['ihvp_clamped_cores']))} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", nargs="+", default=list(STEPS), choices=list(STEPS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "correction_stats.json")
    args = parser.parse_args()
    th.set_num_threads(1)
    results = {env_id: {variant: measure(env_id, variant, args.seed) for variant in args.variants} for env_id in args.envs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(seed=args.seed, steps=STEPS, results=results), indent=1))
    print(markdown(results))


if __name__ == "__main__":
    main()
