"""Wall time of BLPO (Nyström, nested-only, CG) vs PPO for the same env steps, measured side by side on one machine.

Every run is a fresh subprocess (``torch.set_num_threads(1)``) that builds the model exactly as rl-zoo3 does
(``sb3_blpo.zoo``'s experiment manager, no evaluation, no saving) and times ``learn()`` only. Rounds run the variants
in turn (PPO, BLPO, nested-only, CG, PPO, BLPO, …), and each ratio divides a variant's time by PPO's time of the same
round, so slow drifts of the machine cancel. Three comparisons per env:

- ``recommended``: each with its own config (PPO: rl-zoo3's ppo.yml, ``-v4`` entry for ``-v5``; BLPO:
  zoo_hyperparams/blpo.yml);
- ``identical``: the BLPO variants with PPO's ``n_envs``, ``n_steps``, ``batch_size``, ``n_epochs`` and
  ``policy_kwargs`` (SB3's default networks where PPO's entry sets none; BLPO keeps its critic learning rate,
  nested steps and IHVP settings);
- ``defaults``: no config at all, each constructor's defaults on one env copy (``PPO("MlpPolicy", env)`` against
  ``BLPO("MlpPolicy", env)``).

For BLPO the update time is split with its ``train/seconds_*`` logs: nested critic steps, IHVP solve, mixed term, the
rest of the hypergradient (coupled critic objective, first-order gradients) and the remainder (actor objective, actor
step, rollout tensors).

Usage::

    python benchmarks/cost/walltime.py --envs CartPole-v1 Hopper-v5 --steps 10000 --rounds 3 \\
        --out benchmarks/results/walltime.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks" / "returns"))
from suite import MAIN_VARIANTS, VARIANTS, constructor_defaults_config, ppo_config  # noqa: E402

COMPARISONS = ("recommended", "identical", "defaults")
IDENTICAL_KEYS = ("n_envs", "n_steps", "batch_size", "n_epochs", "policy_kwargs")
SHARE_KEYS = ("seconds_nested_critic", "seconds_ihvp", "seconds_mixed_term", "seconds_hypergradient")

RUNNER = r"""
import argparse, json, sys, time
import torch as th
th.set_num_threads(1)
from sb3_blpo.zoo.cli import register
from sb3_blpo.zoo.exp_manager import CheckedExperimentManager
algo, env_id, steps, seed, config, overrides, log_folder = sys.argv[1:8]
register()
manager = CheckedExperimentManager(
    argparse.Namespace(), algo, env_id, log_folder, n_timesteps=int(steps), eval_freq=-1, seed=int(seed),
    hyperparams=json.loads(overrides), config=config, verbose=0, log_interval=-1,
)
model, _ = manager.setup_experiment()
totals = {"update": 0.0}
train = model.train
def timed_train():
    started = time.perf_counter()
    train()
    totals["update"] += time.perf_counter() - started
    for key, value in model.logger.name_to_value.items():
        if key.startswith("train/seconds_"):
            totals[key[len("train/"):]] = totals.get(key[len("train/"):], 0.0) + value
model.train = timed_train
started, cpu_started = time.perf_counter(), time.process_time()
model.learn(int(steps))
totals["learn"] = time.perf_counter() - started
totals["learn_cpu"] = time.process_time() - cpu_started
print(json.dumps(totals))
"""


def config_for(variant: str, out: Path, comparison: str) -> str:
    algo, config, _ = VARIANTS[variant]
    if comparison == "defaults":
        return str(constructor_defaults_config(out))
    return str(ppo_config(out)) if algo == "ppo" else str(REPO / "zoo_hyperparams" / f"{config or 'blpo'}.yml")


def ppo_entry(env_id: str, out: Path) -> dict:
    import yaml

    return yaml.safe_load(Path(ppo_config(out)).read_text())[env_id]


def overrides_for(variant: str, comparison: str, env_id: str, out: Path) -> dict:
    overrides = {}
    for item in VARIANTS[variant][2]:  # "key:python literal", as on rl-zoo3's command line
        key, value = item.split(":", 1)
        overrides[key] = eval(value)
    if comparison == "identical" and variant != "ppo":
        entry = ppo_entry(env_id, out)
        overrides.update({key: entry[key] for key in IDENTICAL_KEYS if key in entry})
        overrides.setdefault("n_envs", 1)
        overrides.setdefault("batch_size", 64)  # SB3's PPO default where zoo's entry has none
        # PPO's networks: SB3's default where zoo's entry has none (a tuned BLPO entry may set its own).
        overrides.setdefault("policy_kwargs", "dict()")
    return overrides


def timed_run(variant: str, env_id: str, steps: int, seed: int, comparison: str, work: Path) -> dict:
    algo = VARIANTS[variant][0]
    overrides = overrides_for(variant, comparison, env_id, work)
    command = [sys.executable, "-c", RUNNER, algo, env_id, str(steps), str(seed), config_for(variant, work, comparison)]
    command += [json.dumps(overrides), str(work / "logs")]
    out = subprocess.run(command, check=True, capture_output=True, text=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", nargs="+", default=["CartPole-v1", "Hopper-v5"])
    parser.add_argument("--variants", nargs="+", default=list(MAIN_VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--comparisons", nargs="+", default=["recommended", "identical"], choices=COMPARISONS)
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    variants = ["ppo"] + [v for v in args.variants if v != "ppo"]
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for env_id in args.envs:
            for comparison in args.comparisons:
                runs: dict[str, list[dict]] = {v: [] for v in variants}
                for round_index in range(args.rounds):
                    for variant in variants:
                        runs[variant].append(timed_run(variant, env_id, args.steps, round_index, comparison, work))
                    line = "  ".join(
                        f"{v} {runs[v][-1]['learn']:.1f}s ({runs[v][-1]['learn'] / runs['ppo'][-1]['learn']:.2f}x, "
                        f"CPU {runs[v][-1]['learn_cpu'] / runs['ppo'][-1]['learn_cpu']:.2f}x)"
                        for v in variants
                    )
                    print(f"{env_id} {comparison} round {round_index}: {line}", flush=True)
                summary = {}
                for variant in variants:
                    ratios = [run["learn"] / ppo["learn"] for run, ppo in zip(runs[variant], runs["ppo"], strict=True)]
                    pairs = zip(runs[variant], runs["ppo"], strict=True)
                    cpu_ratios = [run["learn_cpu"] / ppo["learn_cpu"] for run, ppo in pairs]
                    entry = {
                        "learn_seconds": [run["learn"] for run in runs[variant]],
                        "seconds_per_10k_steps": statistics.median(run["learn"] for run in runs[variant]) * 1e4 / args.steps,
                        "ratio_to_ppo": ratios,
                        "median_ratio": statistics.median(ratios),
                        # CPU time of the one-thread process: what other processes on a loaded machine disturb least.
                        "cpu_ratio_to_ppo": cpu_ratios,
                        "median_cpu_ratio": statistics.median(cpu_ratios),
                        "update_share_of_learn": statistics.median(run["update"] / run["learn"] for run in runs[variant]),
                    }
                    if variant != "ppo":
                        entry["share_of_update"] = {
                            key: statistics.median(run.get(key, 0.0) / run["update"] for run in runs[variant])
                            for key in SHARE_KEYS
                        }
                    summary[variant] = entry
                results.setdefault(env_id, {})[comparison] = {
                    "overrides": {v: overrides_for(v, comparison, env_id, work) for v in variants},
                    "variants": summary,
                }
                print(
                    f"{env_id} {comparison}: median ratio to PPO "
                    + ", ".join(
                        f"{v} {summary[v]['median_ratio']:.2f} (CPU {summary[v]['median_cpu_ratio']:.2f})" for v in variants
                    ),
                    flush=True,
                )
    if args.out:
        payload = {"steps": args.steps, "rounds": args.rounds, "torch_threads": 1, "results": results}
        args.out.write_text(json.dumps(payload, indent=2, default=str))


if __name__ == "__main__":
    main()
