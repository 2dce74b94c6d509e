"""Wall time of BLPO vs PPO for the same env steps, measured side by side (A B A B ...) on one machine.

Each run is a fresh subprocess with ``torch.set_num_threads(1)``; only ``learn()`` is timed. Two comparisons:

- ``recommended``: each algorithm with its recommended settings (PPO: rl-zoo3's entry, BLPO: zoo_hyperparams/blpo.yml);
- ``identical``: BLPO with PPO's rollout / epoch / batch / network settings.

Usage::

    python benchmarks/cost/walltime.py --env CartPole-v1 --steps 50000 --pairs 3 --out benchmarks/cost/results.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

# rl-zoo3's CartPole-v1 PPO entry (installed rl_zoo3 2.9.2, hyperparams/ppo.yml) and our BLPO entry.
PPO_CARTPOLE = dict(
    n_envs=8,
    n_steps=32,
    batch_size=256,
    gae_lambda=0.8,
    gamma=0.98,
    n_epochs=20,
    ent_coef=0.0,
    learning_rate="lin_0.001",
    clip_range="lin_0.2",
)
BLPO_CARTPOLE = dict(
    n_envs=8,
    n_steps=32,
    batch_size=256,
    gae_lambda=0.8,
    gamma=0.98,
    n_epochs=5,
    n_critic_steps=3,
    learning_rate="lin_0.001",
    clip_range="lin_0.2",
)
SETTINGS = {
    "CartPole-v1": {
        "recommended": {"PPO": PPO_CARTPOLE, "BLPO": BLPO_CARTPOLE},
        "identical": {"PPO": PPO_CARTPOLE, "BLPO": {**PPO_CARTPOLE}},
    }
}

RUNNER = r"""
import json, sys, time
import torch as th
th.set_num_threads(1)
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.utils import LinearSchedule
from sb3_blpo import BLPO
algo, env_id, steps, seed, cfg = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), json.loads(sys.argv[5])
for key, value in list(cfg.items()):
    if isinstance(value, str) and value.startswith("lin_"):
        cfg[key] = LinearSchedule(float(value[4:]), 0.0, 1.0)
env = make_vec_env(env_id, n_envs=cfg.pop("n_envs"), seed=seed)
model = {"PPO": PPO, "BLPO": BLPO}[algo]("MlpPolicy", env, seed=seed, **cfg)
start = time.perf_counter()
model.learn(steps)
print(json.dumps({"seconds": time.perf_counter() - start}))
"""


def timed_run(algo: str, env_id: str, steps: int, seed: int, config: dict) -> float:
    out = subprocess.run(
        [sys.executable, "-c", RUNNER, algo, env_id, str(steps), str(seed), json.dumps(config)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="CartPole-v1", choices=sorted(SETTINGS))
    parser.add_argument("--steps", type=int, default=50_000)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    results = {}
    for comparison, configs in SETTINGS[args.env].items():
        ratios, times = [], {"PPO": [], "BLPO": []}
        for pair in range(args.pairs):
            ppo = timed_run("PPO", args.env, args.steps, pair, configs["PPO"])
            blpo = timed_run("BLPO", args.env, args.steps, pair, configs["BLPO"])
            times["PPO"].append(ppo)
            times["BLPO"].append(blpo)
            ratios.append(blpo / ppo)
            print(f"{comparison} pair {pair}: PPO {ppo:.1f}s  BLPO {blpo:.1f}s  ratio {blpo / ppo:.2f}", flush=True)
        results[comparison] = {
            "settings": configs,
            "ppo_seconds": times["PPO"],
            "blpo_seconds": times["BLPO"],
            "ratios": ratios,
            "median_ratio": statistics.median(ratios),
        }
        print(f"{comparison}: median BLPO/PPO wall-time ratio {statistics.median(ratios):.2f}", flush=True)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"env": args.env, "steps": args.steps, "pairs": args.pairs, "results": results}, handle, indent=2)


if __name__ == "__main__":
    main()
