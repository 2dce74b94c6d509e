"""PPO with the plasticity monitors on a continual CartPole (a new observation permutation every ``--task-length`` steps).

Run::

    python examples/monitor_ppo.py                       # ~100k steps, a few minutes on a laptop CPU
    tensorboard --logdir runs/monitor_ppo                # then open http://localhost:6006

TensorBoard shows the scalars under the ``hessian/``, ``plasticity/`` and ``trainability/`` sections, the Ritz values
under HISTOGRAMS (``hessian/<group>/ritz``) and the spectral density figures under IMAGES (``hessian/<group>/density``).
``--export-png docs/img/monitor_dashboard.png`` also renders the main curves from the run's event file with matplotlib.

The environment is ``sb3_blpo/PermutedCartPole-v0`` (``sb3_blpo.envs``): its wrapper sets
``info["task_switch"] = True`` on the first step of each new task, so the monitors measure the curvature at every
new-task initialisation, before PPO updates on the new task's data.
"""

from __future__ import annotations

import argparse
import glob
import io
import os

import gymnasium as gym
import torch as th
from stable_baselines3 import PPO

import sb3_blpo.envs  # noqa: F401 - registers the sb3_blpo/... env ids
from sb3_blpo.callbacks import PlasticityMonitor


def export_dashboard_png(run_dir: str, path: str) -> None:
    """Render the monitors' main curves and the last density figure from a run's TensorBoard event file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(run_dir, size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])

    def series(tag: str) -> tuple[list[int], list[float]]:
        values = events.Scalars(tag) if tag in scalars else []
        return [v.step for v in values], [v.value for v in values]

    switches = [step for step, task in zip(*series("trainability/task"), strict=True) if task > 0]
    figure, axes = plt.subplots(2, 3, figsize=(15, 8))
    panels = [
        ("Hessian λmax (log)", [f"hessian/{g}/lambda_max" for g in ("actor", "critic")], True, "λmax"),
        (
            "Hessian ε-rank, ε = 0.1 (band: guaranteed bracket)",
            [f"hessian/{g}/eps_rank_0.1" for g in ("actor", "critic")],
            False,
            "fraction of eigenvalues with |λ| > ε",
        ),
        (
            "Feature effective rank",
            [f"plasticity/{layer}/erank" for layer in ("pi0", "pi1", "vf0", "vf1")],
            False,
            "effective rank (units)",
        ),
        (
            "Dormant units (τ = 0.1)",
            [f"plasticity/{layer}/dormant" for layer in ("pi0", "pi1", "vf0", "vf1")],
            False,
            "fraction of units",
        ),
        (
            "Trainability: ε-rank / ε-rank at task 0",
            [f"trainability/{g}/ratio" for g in ("actor", "critic")],
            False,
            "ratio to task 0",
        ),
    ]
    for ax, (title, tags, log_scale, ylabel) in zip(axes.flat, panels, strict=False):
        for tag in tags:
            steps, values = series(tag)
            line = ax.plot(
                steps, values, marker="o" if "trainability" in tag else None, markersize=4, label=tag.split("/", 1)[1]
            )
            if "/eps_rank_" in tag:
                (low_steps, low), (_, high) = (
                    series(tag.replace("eps_rank_", "eps_rank_lo_")),
                    series(tag.replace("eps_rank_", "eps_rank_hi_")),
                )
                ax.fill_between(low_steps, low, high, color=line[0].get_color(), alpha=0.15)
        for step in switches:
            ax.axvline(step, color="grey", linestyle=":", linewidth=1)
        if log_scale:
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("environment steps")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    density_tags = [tag for tag in events.Tags()["images"] if tag.endswith("critic/density")]
    last_ax = axes.flat[-1]
    last_ax.axis("off")
    if density_tags:
        image = events.Images(density_tags[0])[-1]
        last_ax.imshow(plt.imread(io.BytesIO(image.encoded_image_string), format="png"))
        last_ax.set_title(f"{density_tags[0]} (TensorBoard image, step {image.step})", fontsize=9)
    figure.suptitle(
        "PlasticityMonitor on PPO, CartPole-v1 with a new observation permutation per task (dotted: task switches)"
    )
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=80)
    print(f"dashboard exported to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timesteps", type=int, default=100_000)
    parser.add_argument("--task-length", type=int, default=20_480, help="steps per task (a multiple of n_steps aligns tasks)")
    parser.add_argument("--logdir", default="runs/monitor_ppo")
    parser.add_argument("--export-png", default=None, help="also write a PNG of the dashboards to this path")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    th.set_num_threads(1)  # one thread: the same seed gives the same run (and the same figure)

    env = gym.make("sb3_blpo/PermutedCartPole-v0", steps_per_task=args.task_length, schedule_seed=args.seed)
    model = PPO("MlpPolicy", env, n_steps=1024, batch_size=64, seed=args.seed, tensorboard_log=args.logdir, verbose=1)
    # Default cadence: Hessian spectrum every 20 rollouts and at every task start, feature ranks every rollout; the
    # rollouts here are short (1024 steps), so measure the spectrum more often than the default. The density figures
    # (IMAGES tab) are opt-in.
    monitor = PlasticityMonitor(every_n_rollouts=5, hessian_kwargs={"log_density_figure": True})
    model.learn(args.timesteps, callback=monitor, tb_log_name="PPO")

    for record in monitor.trainability.history:
        flag = "  <- spectral collapse" if record.collapsed else ""
        print(f"task {record.task_index} {record.group:6s} ε-rank {record.epsilon_rank:.4f} ratio {record.ratio:.3f}{flag}")
    run_dir = sorted(glob.glob(os.path.join(args.logdir, "PPO_*")), key=os.path.getmtime)[-1]
    print(f"TensorBoard logs in {run_dir}; view them with:  tensorboard --logdir {args.logdir}")
    if args.export_png:
        export_dashboard_png(run_dir, args.export_png)


if __name__ == "__main__":
    main()
