"""Does the lazy rank term (``erank_every=k``) raise the feature rank as the exact one does, at a fraction of the cost?

PPO with SB3's defaults on Hopper-v5, one fresh process per (variant, seed), one torch thread each: no regularizer,
the loss-mode rank term on every minibatch (``erank_coef``), and the same term on every ``k``-th minibatch with ``k``
times the weight. At the end, :class:`~sb3_blpo.callbacks.FeatureRankCallback` measures every hidden layer's
effective rank on 1024 observations of the last rollout; the script reports those, the mean training return of the
last 100 episodes and each run's CPU time (a cost figure whose pairs share nothing but the seed: a rough one).

Usage::

    python benchmarks/rank_term_effect.py --seeds 0 1 --steps 40960 --jobs 2 --out benchmarks/results/rank_term_effect.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

RUNNER = r"""
import json, sys, time
import numpy as np
import torch as th
th.set_num_threads(1)
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env
from sb3_blpo.callbacks import FeatureRankCallback, PlasticityRegularizer
seed, steps, config = int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
model = PPO("MlpPolicy", make_vec_env("Hopper-v5", n_envs=1, seed=seed), seed=seed, device="cpu")
features = FeatureRankCallback(every_n_rollouts=1, n_samples=1024, on_task_switch=False)
callbacks = [features] if config is None else [PlasticityRegularizer(**config), features]
start = time.process_time()
model.learn(steps, callback=callbacks)
episodes = [episode["r"] for episode in model.ep_info_buffer]
print(json.dumps(dict(
    cpu_seconds=time.process_time() - start,
    erank={layer: metrics["erank"] for layer, metrics in features.latest.items()},
    train_return=float(np.mean(episodes)) if episodes else None,
)))
"""


def run(seed: int, steps: int, config: dict | None) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", RUNNER, str(seed), str(steps), json.dumps(config)], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=40960)
    parser.add_argument("--erank-coef", type=float, default=1e-2)
    parser.add_argument("--every", type=int, default=4, help="k of the lazy variant")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    variants = {
        "none": None,
        "exact": dict(erank_coef=args.erank_coef),
        f"lazy{args.every}": dict(erank_coef=args.erank_coef, erank_every=args.every),
    }
    tasks = [(name, seed) for seed in args.seeds for name in variants]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda task: run(task[1], args.steps, variants[task[0]]), tasks))
    runs = [dict(variant=name, seed=seed, **result) for (name, seed), result in zip(tasks, results, strict=True)]
    for name in variants:
        mine = [r for r in runs if r["variant"] == name]
        mean_ranks = [round(statistics.mean(r["erank"].values()), 2) for r in mine]
        print(
            f"{name:>7}: mean feature erank {statistics.mean(mean_ranks):6.2f} (per seed {mean_ranks}), "
            f"CPU {statistics.mean(r['cpu_seconds'] for r in mine):6.1f} s, "
            f"train return {[None if r['train_return'] is None else round(r['train_return'], 1) for r in mine]}"
        )
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(dict(env="Hopper-v5", steps=args.steps, erank_coef=args.erank_coef, runs=runs), handle, indent=2)


if __name__ == "__main__":
    main()
