"""Overhead of PlasticityMonitor on a PPO run of Hopper-v5, and accuracy of the monitored λmax against the exact Hessian.

Overhead: the same PPO run (default hyperparameters, n_steps=2048, same seed) with and without
``PlasticityMonitor()`` at its default settings, each in a fresh subprocess with ``torch.set_num_threads`` fixed. By
default the two runs of a pair execute side by side at the same time (one core each), so that other jobs on the machine
slow both alike; ``--schedule alternating`` runs them one after the other instead, alternating the order between pairs
(A/B, B/A, ...), which is the better design on an otherwise idle machine. It reports, per pair, the ratio of
``model.learn()`` wall times and of its process CPU times (the CPU-time ratio is robust to other jobs competing for
the cores; the wall-time ratio is what a user waits for on an idle machine), the CPU time spent inside the monitor's
callbacks, and whether both runs end with identical parameters (the monitor must not perturb training).

Accuracy: after a few PPO updates on Hopper-v5, the default HessianSpectrumCallback settings (512 samples, 30 Lanczos
steps, 2 probes) are compared, for three probe seeds, with the exact spectrum of the same losses on the same samples,
from the dense Hessian computed by ``torch.func`` (reverse-over-reverse, independent of the double-backward products
the monitor uses): λmax and λmin errors, ε-ranks with their guaranteed brackets over a grid of ε, and the trace.

Usage::

    python benchmarks/monitor_overhead.py --pairs 3 --timesteps 49152 --threads 1
    python benchmarks/monitor_overhead.py --skip-overhead          # accuracy only

Results are written as JSON (``--output``) and summarised on stdout; ``docs/monitoring.md`` records them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch as th


def _parameter_digest(model: Any) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.policy.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def run_single(
    monitored: bool, env_id: str, timesteps: int, seed: int, threads: int, tensorboard_dir: str, monitor_kwargs: str = "{}"
) -> dict[str, Any]:
    """One training run (called in a subprocess); returns timings and a digest of the final parameters."""
    th.set_num_threads(threads)
    from stable_baselines3 import PPO

    from sb3_blpo.callbacks import PlasticityMonitor

    callback = None
    inside = {"seconds": 0.0}
    if monitored:

        class TimedMonitor(PlasticityMonitor):
            # CPU time spent in the monitor's own event handlers (measurements, logging, task-switch checks).
            def on_step(self) -> bool:
                start = time.process_time()
                result = super().on_step()
                inside["seconds"] += time.process_time() - start
                return result

            def on_rollout_end(self) -> None:
                start = time.process_time()
                super().on_rollout_end()
                inside["seconds"] += time.process_time() - start

        callback = TimedMonitor(**json.loads(monitor_kwargs))
        monitor = callback
        # The monitor's histograms and figures are rendered when SB3 dumps the logs, outside the callback: count them.
        from torch.utils.tensorboard import SummaryWriter

        for method_name in ("add_figure", "add_histogram"):
            original = getattr(SummaryWriter, method_name)

            def timed(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
                start = time.process_time()
                result = _original(*args, **kwargs)
                inside["seconds"] += time.process_time() - start
                return result

            setattr(SummaryWriter, method_name, timed)
    # Both runs write TensorBoard logs: without a writer the monitor's figures would never be rendered.
    model = PPO("MlpPolicy", env_id, n_steps=2048, seed=seed, verbose=0, tensorboard_log=tensorboard_dir)
    start, cpu_start = time.perf_counter(), time.process_time()
    model.learn(timesteps, callback=callback, tb_log_name="monitored" if monitored else "plain")
    learn_seconds, learn_cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    result: dict[str, Any] = {
        "monitored": monitored,
        "learn_seconds": learn_seconds,
        "learn_cpu_seconds": learn_cpu_seconds,
        "monitor_seconds": inside["seconds"],
        "parameters": _parameter_digest(model),
        "num_timesteps": int(model.num_timesteps),
    }
    if monitored:
        result["hessian_measurements"] = monitor.hessian.n_measurements
        result["feature_measurements"] = monitor.features.n_measurements
    return result


def _child_command(monitored: bool, args: argparse.Namespace) -> list[str]:
    return [
        sys.executable,
        __file__,
        "--child",
        "monitored" if monitored else "plain",
        "--env",
        args.env,
        "--timesteps",
        str(args.timesteps),
        "--seed",
        str(args.seed),
        "--threads",
        str(args.threads),
        "--tensorboard-dir",
        args.tensorboard_dir,
        "--monitor-kwargs",
        args.monitor_kwargs,
    ]


def _run_children(monitored_flags: tuple[bool, ...], args: argparse.Namespace) -> dict[bool, dict[str, Any]]:
    """Start one child per flag at the same time and wait for all (a single flag: one run on its own)."""
    processes = {
        flag: subprocess.Popen(_child_command(flag, args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for flag in monitored_flags
    }
    results = {}
    for flag, process in processes.items():
        stdout, stderr = process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"benchmark child failed:\n{stderr}")
        results[flag] = json.loads(stdout.strip().splitlines()[-1])
    return results


def measure_overhead(args: argparse.Namespace) -> dict[str, Any]:
    pairs = []
    for index in range(args.pairs):
        if args.schedule == "concurrent":
            # Both runs at once, one thread each: whatever else loads the machine slows both alike.
            order: tuple[bool, ...] = (False, True)
            runs = _run_children(order, args)
        else:
            order = (False, True) if index % 2 == 0 else (True, False)
            runs = {flag: _run_children((flag,), args)[flag] for flag in order}
        plain, monitored = runs[False], runs[True]
        pair = {
            "schedule": args.schedule,
            "order": ["monitored" if m else "plain" for m in order],
            "plain_seconds": plain["learn_seconds"],
            "monitored_seconds": monitored["learn_seconds"],
            "ratio": monitored["learn_seconds"] / plain["learn_seconds"],
            "plain_cpu_seconds": plain["learn_cpu_seconds"],
            "monitored_cpu_seconds": monitored["learn_cpu_seconds"],
            "cpu_ratio": monitored["learn_cpu_seconds"] / plain["learn_cpu_seconds"],
            "monitor_cpu_seconds": monitored["monitor_seconds"],
            "monitor_cpu_fraction": monitored["monitor_seconds"] / monitored["learn_cpu_seconds"],
            "load_average": os.getloadavg(),
            "same_final_parameters": plain["parameters"] == monitored["parameters"],
            "hessian_measurements": monitored["hessian_measurements"],
            "feature_measurements": monitored["feature_measurements"],
        }
        pairs.append(pair)
        print(json.dumps(pair), flush=True)
    return {
        "pairs": pairs,
        "median_ratio": statistics.median(pair["ratio"] for pair in pairs),
        "median_cpu_ratio": statistics.median(pair["cpu_ratio"] for pair in pairs),
        "median_monitor_cpu_fraction": statistics.median(pair["monitor_cpu_fraction"] for pair in pairs),
    }


def measure_accuracy(args: argparse.Namespace) -> dict[str, Any]:
    """Default-settings spectrum vs the exact dense Hessian, for the default PPO policy on Hopper-v5.

    For each group: λmax/λmin errors, and for a grid of ε (the defaults, a few larger ones, and the trainability ε of 5%
    of the spectral range) the SLQ ε-rank, its guaranteed bracket and the exact value, for several probe seeds.
    """
    th.set_num_threads(args.threads)
    from stable_baselines3 import PPO

    from sb3_blpo.callbacks import HessianSpectrumCallback, measure_loss_spectrum
    from sb3_blpo.curvature import epsilon_rank, epsilon_rank_bounds

    model = PPO("MlpPolicy", args.env, n_steps=2048, seed=args.seed, verbose=0)
    model.learn(args.accuracy_timesteps)  # a few updates, so the policy is not at its initialisation
    callback = HessianSpectrumCallback()  # the defaults: n_samples, lanczos_steps, num_probes, epsilons
    callback.init_callback(model)
    batch = callback._sample(0)
    settings = callback.settings
    results: dict[str, Any] = {
        "n_samples": batch.size,
        "lanczos_steps": settings.lanczos_steps,
        "num_probes": settings.num_probes,
    }
    for group in settings.parameter_groups:
        params = callback.access.parameters(group)
        with th.enable_grad():
            start = time.perf_counter()
            dense = callback.access.exact_hessian(group, batch, chunk_size=128).double()
            exact_seconds = time.perf_counter() - start
        eigenvalues = th.linalg.eigvalsh((dense + dense.T) / 2)
        exact_max, exact_min = float(eigenvalues[-1]), float(eigenvalues[0])
        relative_eps = 0.05 * (exact_max - exact_min)
        grid = sorted({*settings.epsilons, 0.03, 0.3, 1.0, 3.0, relative_eps})
        seeds = []
        for probe_seed in range(3):
            with th.enable_grad():
                start = time.perf_counter()
                summary, quadrature = measure_loss_spectrum(
                    callback.access.loss(group, batch),
                    params,
                    settings.lanczos_steps,
                    settings.num_probes,
                    grid,
                    seed=probe_seed,
                )
                slq_seconds = time.perf_counter() - start
            lower, upper = epsilon_rank_bounds(quadrature, grid)
            seeds.append(
                {
                    "probe_seed": probe_seed,
                    "lambda_max_rel_error": abs(summary.lambda_max - exact_max) / abs(exact_max),
                    "lambda_min_rel_error": abs(summary.lambda_min - exact_min) / abs(exact_min),
                    "eps_rank": [float(v) for v in epsilon_rank(quadrature, grid)],
                    "eps_rank_bounds": [[float(lo), float(hi)] for lo, hi in zip(lower, upper, strict=True)],
                    "trace": summary.trace.estimate,
                    "trace_ci95": [summary.trace.ci_low, summary.trace.ci_high],
                    "slq_seconds": slq_seconds,
                }
            )
        results[group] = {
            "parameters": sum(p.numel() for p in params),
            "exact": {
                "lambda_max": exact_max,
                "lambda_min": exact_min,
                "trace": float(eigenvalues.sum()),
                "eps_rank": [float((eigenvalues.abs() > eps).double().mean()) for eps in grid],
            },
            "epsilons": grid,
            "relative_epsilon_0.05": relative_eps,
            "slq": seeds,
            "exact_seconds": exact_seconds,
        }
        print(json.dumps({group: results[group]}), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="Hopper-v5")
    parser.add_argument("--timesteps", type=int, default=49152, help="per run (24 rollouts of 2048 steps)")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads in every run")
    parser.add_argument(
        "--schedule",
        choices=("concurrent", "alternating"),
        default="concurrent",
        help="run each pair at the same time (robust to other load; needs 2 cores) or one after the other, alternating",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--accuracy-timesteps", type=int, default=4 * 2048)
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results", "monitor_overhead.json"))
    parser.add_argument("--monitor-kwargs", default="{}", help="JSON keyword arguments of PlasticityMonitor (default: none)")
    parser.add_argument("--tensorboard-dir", default=None, help="where runs write TensorBoard logs (default: a temp dir)")
    parser.add_argument("--child", choices=("plain", "monitored"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(
            json.dumps(
                run_single(
                    args.child == "monitored",
                    args.env,
                    args.timesteps,
                    args.seed,
                    args.threads,
                    args.tensorboard_dir,
                    args.monitor_kwargs,
                )
            )
        )
        return
    if args.tensorboard_dir is None:
        args.tensorboard_dir = tempfile.mkdtemp(prefix="monitor_overhead_")

    report: dict[str, Any] = {
        "env": args.env,
        "timesteps": args.timesteps,
        "threads": args.threads,
        "schedule": args.schedule,
        "monitor_kwargs": json.loads(args.monitor_kwargs),
        "seed": args.seed,
        "tensorboard_dir": args.tensorboard_dir,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": th.__version__},
        "load_average_at_start": os.getloadavg(),
    }
    if not args.skip_overhead:
        report["overhead"] = measure_overhead(args)
        overhead = report["overhead"]
        print(f"median ratio monitored/plain: wall {overhead['median_ratio']:.4f}, CPU {overhead['median_cpu_ratio']:.4f}")
    if not args.skip_accuracy:
        report["accuracy"] = measure_accuracy(args)
    report["load_average_at_end"] = os.getloadavg()
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as handle:
        json.dump(
            report, handle, indent=2, default=lambda value: value.tolist() if isinstance(value, np.ndarray) else str(value)
        )
    print(f"written {args.output}")


if __name__ == "__main__":
    main()
