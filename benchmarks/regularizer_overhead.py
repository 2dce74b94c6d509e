"""Wall-time overhead of :class:`~sb3_blpo.callbacks.PlasticityRegularizer` on stock PPO (Hopper-v5), side by side.

Every run is a fresh subprocess with ``torch.set_num_threads(1)`` that times ``model.learn()`` only (environment
creation and imports excluded). Each configuration is compared with plain PPO in *pairs* of back-to-back runs with the
same seed, the order alternating from pair to pair (plain first, then regularized first, ...), so that slow drifts of
the machine's load affect both members of a pair alike; the reported ratio is the median over the pairs of
``time(config) / time(plain)``, with the min and max, for the wall-clock time and for the process's CPU time (less
sensitive to other processes on a shared machine, since every run uses one thread).

Configurations: plain PPO (SB3 defaults: 2048-step rollouts, 10 epochs of 32 minibatches of 64, two 64-unit tanh
layers per branch); L2 (``l2_coef=1e-4``); L2-Init (``l2_init_coef=1e-4``); the rank term in loss mode on all four
hidden layers (``erank_coef=1e-3``), on the last layer of each branch (``layers=1``) and lazily, on every 2nd or 4th
minibatch with 2 or 4 times the weight (``erank_every=2``, ``4``); the paper's ascent mode
(``ascent_lr=1e-6``, one step per epoch on the whole rollout); and the paper's L2-ER (ascent mode + L2).

``--in-process-rounds N`` instead times ``model.train()`` alone, in one process, on one collected 2048-step rollout:
plain PPO and each configuration in rotation, ``N`` rounds, CPU time per update (320 minibatches). Load that drifts
during the run affects every configuration alike, so this isolates the per-minibatch cost of the terms on a busy
machine, where whole-run ratios scatter by tens of percent.

Usage::

    python benchmarks/regularizer_overhead.py --steps 20000 --pairs 3 --out benchmarks/results/regularizer_overhead.json
    python benchmarks/regularizer_overhead.py --in-process-rounds 8 --configs rank_loss rank_loss_last
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CONFIGS: dict[str, dict[str, float | int | str] | None] = {
    "plain": None,
    "l2": dict(l2_coef=1e-4),
    "l2_init": dict(l2_init_coef=1e-4),
    "rank_loss": dict(erank_coef=1e-3),
    "rank_loss_last": dict(erank_coef=1e-3, layers=1),
    "rank_loss_lazy2": dict(erank_coef=1e-3, erank_every=2),
    "rank_loss_lazy4": dict(erank_coef=1e-3, erank_every=4),
    "rank_ascent": dict(erank_mode="ascent", ascent_lr=1e-6),
    "l2_rank_ascent": dict(erank_mode="ascent", ascent_lr=1e-6, l2_coef=1e-4),
}

RUNNER = r"""
import json, sys, time
import torch as th
th.set_num_threads(1)
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env
from sb3_blpo.callbacks import PlasticityRegularizer
env_id, steps, seed, config = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
model = PPO("MlpPolicy", make_vec_env(env_id, n_envs=1, seed=seed), seed=seed, device="cpu")
callback = None if config is None else PlasticityRegularizer(**config)
start, cpu_start = time.perf_counter(), time.process_time()
model.learn(steps, callback=callback)
print(json.dumps({"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu_start}))
"""


def timed_run(env_id: str, steps: int, seed: int, config: dict | None) -> dict[str, float]:
    """Wall-clock and CPU seconds spent in ``learn()`` by one fresh process."""
    out = subprocess.run(
        [sys.executable, "-c", RUNNER, env_id, str(steps), str(seed), json.dumps(config)],
        check=True,
        capture_output=True,
        text=True,
    )
    return {key: float(value) for key, value in json.loads(out.stdout.strip().splitlines()[-1]).items()}


def in_process_train_times(env_id: str, rounds: int, names: list[str]) -> dict[str, dict[str, float | list[float]]]:
    """CPU seconds of ``model.train()`` (one update on one fixed rollout) for plain PPO and each configuration, in
    rotation within one process; the median and the extra milliseconds per minibatch over plain PPO."""
    import time

    import torch as th
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env

    from sb3_blpo.callbacks import PlasticityRegularizer

    th.set_num_threads(1)
    model = PPO("MlpPolicy", make_vec_env(env_id, n_envs=1, seed=0), seed=0, device="cpu")
    _, callback = model._setup_learn(model.n_steps, None)
    callback.on_training_start(locals(), globals())
    model.collect_rollouts(model.env, callback, model.rollout_buffer, n_rollout_steps=model.n_steps)
    minibatches = model.n_epochs * (model.n_steps // model.batch_size)
    members = ["plain", *names]
    times: dict[str, list[float]] = {name: [] for name in members}
    for index in range(rounds):
        shift = index % len(members)
        for name in members[shift:] + members[:shift]:
            config = CONFIGS[name]
            regularizer = None if config is None else PlasticityRegularizer(**config)
            if regularizer is not None:
                regularizer.init_callback(model)
                regularizer.on_training_start(locals(), globals())
            start = time.process_time()
            model.train()
            times[name].append(time.process_time() - start)
            if regularizer is not None:
                regularizer.on_training_end()
    plain = statistics.median(times["plain"])
    summary: dict[str, dict[str, float | list[float]]] = {}
    for name in members:
        median = statistics.median(times[name])
        extra = 1000 * (median - plain) / minibatches
        summary[name] = dict(median=median, ratio=median / plain, extra_ms_per_minibatch=extra, times=times[name])
        print(f"{name:>15}: train() {median:.3f} s CPU, {median / plain:.2f}x, {extra:.2f} ms/minibatch")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", default="Hopper-v5")
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--pairs", type=int, default=3, help="(plain, regularized) pairs per configuration")
    parser.add_argument(
        "--configs",
        nargs="+",
        default=[name for name in CONFIGS if name != "plain"],
        choices=[name for name in CONFIGS if name != "plain"],
    )
    parser.add_argument("--out", default=None, help="write the raw times and ratios to this JSON file")
    parser.add_argument("--in-process-rounds", type=int, default=0, help="time train() alone, in one process (see above)")
    args = parser.parse_args()
    names = [name for name in args.configs if name != "plain"]
    if args.in_process_rounds:
        summary = in_process_train_times(args.env, args.in_process_rounds, names)
        if args.out:
            with open(args.out, "w") as handle:
                json.dump(dict(env=args.env, rounds=args.in_process_rounds, train_cpu_seconds=summary), handle, indent=2)
        return
    times: dict[str, dict[str, list[dict[str, float]]]] = {name: {"plain": [], name: []} for name in names}
    for pair_index in range(args.pairs):
        for config_index, name in enumerate(names):
            order = ["plain", name] if (pair_index + config_index) % 2 == 0 else [name, "plain"]
            for member in order:
                result = timed_run(args.env, args.steps, seed=pair_index, config=CONFIGS[member])
                times[name][member].append(result)
                print(
                    f"pair {pair_index} {name:>15} {member:>15}: {result['seconds']:7.2f} s wall, "
                    f"{result['cpu_seconds']:7.2f} s CPU",
                    flush=True,
                )
    summary: dict[str, dict[str, dict[str, float | list[float]]]] = {}
    for name in names:
        summary[name] = {}
        for clock in ("seconds", "cpu_seconds"):
            ratios = [run[clock] / base[clock] for run, base in zip(times[name][name], times[name]["plain"], strict=True)]
            summary[name][clock] = dict(median=statistics.median(ratios), min=min(ratios), max=max(ratios), ratios=ratios)
        wall, cpu = summary[name]["seconds"], summary[name]["cpu_seconds"]
        print(
            f"{name:>15}: wall median {wall['median']:.3f}x ({wall['min']:.3f}-{wall['max']:.3f}), "
            f"CPU median {cpu['median']:.3f}x ({cpu['min']:.3f}-{cpu['max']:.3f})"
        )
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(dict(env=args.env, steps=args.steps, pairs=args.pairs, seconds=times, ratios=summary), handle, indent=2)


if __name__ == "__main__":
    main()
