"""Where the CPU time of ``PlasticityMonitor()`` goes, component by component, in one PPO run on Hopper-v5.

One process, ``torch.set_num_threads(1)``, TensorBoard logging on (so the density figures are rendered), default
``PlasticityMonitor()``. Each component is timed with ``time.process_time`` around the method that does it:

* ``hessian_spectra``: ``HessianSpectrumCallback.measure`` (Lanczos/SLQ of every group, no figures);
* ``density_figures_build``: ``HessianSpectrumCallback._density_figure`` (the matplotlib import on first use, the
  broadened density and the figure's artists);
* ``tensorboard_add_figure``: SB3's dump rendering the figures (``SummaryWriter.add_figure``: Agg draw, PNG);
* ``feature_metrics``: ``FeatureRankCallback._measure``; ``trainability``: ``TrainabilityCallback._measure``;
* ``per_step_check``: ``PlasticityMonitor._on_step`` (the task-switch check on every environment step);
* ``full_gc_collections``: Python's generation-2 garbage collections during ``learn()`` (count and CPU time): they
  traverse every live object, including matplotlib's once it is imported.

Usage::

    python benchmarks/monitor_breakdown.py --timesteps 49152 --out breakdown.json
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from collections import defaultdict
from typing import Any


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", default="Hopper-v5")
    parser.add_argument("--timesteps", type=int, default=49_152)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the breakdown to this JSON file")
    args = parser.parse_args()

    import torch as th
    from stable_baselines3 import PPO
    from torch.utils.tensorboard import SummaryWriter

    from sb3_blpo.callbacks import monitors

    th.set_num_threads(1)
    seconds: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)

    def timed(owner: Any, method: str, key: str) -> None:
        original = getattr(owner, method)

        def wrapper(*call_args: Any, **kwargs: Any) -> Any:
            start = time.process_time()
            try:
                return original(*call_args, **kwargs)
            finally:
                seconds[key] += time.process_time() - start
                calls[key] += 1

        setattr(owner, method, wrapper)

    timed(monitors.HessianSpectrumCallback, "measure", "hessian_spectra")
    timed(monitors.HessianSpectrumCallback, "_density_figure", "density_figures_build")
    timed(SummaryWriter, "add_figure", "tensorboard_add_figure")
    timed(monitors.FeatureRankCallback, "_measure", "feature_metrics")
    timed(monitors.TrainabilityCallback, "_measure", "trainability")
    timed(monitors.PlasticityMonitor, "_on_step", "per_step_check")

    collection_start = [0.0]

    def on_collection(phase: str, info: dict[str, Any]) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            collection_start[0] = time.process_time()
        else:
            seconds["full_gc_collections"] += time.process_time() - collection_start[0]
            calls["full_gc_collections"] += 1

    model = PPO("MlpPolicy", args.env, n_steps=2048, seed=args.seed, verbose=0, tensorboard_log=tempfile.mkdtemp())
    gc.callbacks.append(on_collection)
    start = time.process_time()
    model.learn(args.timesteps, callback=monitors.PlasticityMonitor())
    learn_cpu = time.process_time() - start
    gc.callbacks.remove(on_collection)
    result = dict(
        env=args.env,
        timesteps=args.timesteps,
        learn_cpu_seconds=learn_cpu,
        live_objects_at_end=len(gc.get_objects()),
        components={key: dict(cpu_seconds=seconds[key], calls=calls[key], share=seconds[key] / learn_cpu) for key in seconds},
    )
    print(f"learn(): {learn_cpu:.2f} s CPU")
    for key, value in result["components"].items():
        print(f"{key:>24}: {value['cpu_seconds']:.3f} s in {value['calls']} calls ({100 * value['share']:.2f} %)")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
