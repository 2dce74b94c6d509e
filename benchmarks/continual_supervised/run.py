"""Supervised continual-learning control for spectral collapse: online SGD on a sequence of 8x8-digit tasks.

The paper ("Spectral Collapse Drives Loss of Plasticity", arXiv:2509.22335) makes its Hessian claim on supervised
continual tasks (Permuted MNIST, Continual ImageNet): under plain backprop the Hessian's ε-rank at task starts
collapses and online accuracy declines with it; L2 plus an effective-rank regulariser (L2-ER) prevents both. This is
that protocol at CPU scale, on scikit-learn's bundled 8x8 digits (1,797 images; nothing is downloaded):

* ``permuted``: task ``t`` is the digits with a fixed random permutation of the 64 pixels (Permuted MNIST's recipe);
  each task is one online pass over all images in minibatches, every example seen once per task.
* ``random_labels``: task ``t`` is a fixed subset of images with new random labels (memorisation, the stream that
  loses plasticity fastest in the literature); several online passes per task.

An MLP (ReLU) is trained by plain SGD. Online accuracy is the accuracy on each minibatch *before* the step on it,
averaged over the task. At every ``--measure-every``-th task start (the first minibatch of the new task not yet
seen), on ``--hessian-samples`` examples of the new task: the cross-entropy Hessian's spectrum by stochastic Lanczos
quadrature (``sb3_blpo.curvature``, products from ``sb3_blpo.hypergrad.HessianVectorProduct``) with λmax, λmin and
the ε-rank at fixed ε and at ε relative to the spectral range of task 0 (``task0``) or of the current task
(``current``), the two scales of ``TrainabilityCallback(epsilon_scale=...)``; and the effective rank and dormant
fraction of each hidden layer (``sb3_blpo.metrics``).

Methods (the penalties are ``sb3_blpo.penalties``' terms, the same code ``PlasticityRegularizer`` runs in RL):
``backprop``, ``l2``, ``er``, ``l2_er``, ``l2_init``, ``snp`` (Shrink & Perturb after every step) and ``reset``
(a fresh network at every task start).

Each (stream, method, seed) is one process (``--jobs`` in parallel, one torch thread each) writing
``<out>/<stream>/<method>/seed<k>/tasks.csv`` and ``done.json``; finished runs are skipped, so an interrupted run
resumes. Then the report (``report.py``) writes tables and plots into ``<out>``.

Usage::

    python benchmarks/continual_supervised/run.py                 # the study of docs/plasticity.md (defaults: 2 jobs)
    python benchmarks/continual_supervised/report.py              # the report alone, from existing results
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch as th
from torch import nn

from sb3_blpo.curvature import epsilon_rank, epsilon_rank_bounds, stochastic_lanczos_quadrature, summarize_spectrum
from sb3_blpo.hypergrad import HessianVectorProduct
from sb3_blpo.metrics import distance_to_initial, feature_metrics, weight_norm
from sb3_blpo.penalties import ParameterPenalty, effective_rank_objective

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results"
DONE_MARKER = "done.json"
STREAMS = ("permuted", "random_labels")
# Fixed ε of the ε-rank (the paper's is 0.01) and ε relative to the spectral range λmax − λmin (0.05 is the default of
# TrainabilityCallback's relative_epsilon).
FIXED_EPSILONS = (1e-3, 1e-2, 1e-1)
RELATIVE_EPSILONS = (0.01, 0.05)
EPSILON_SCALES = ("task0", "current")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from methods import METHODS  # noqa: E402


@dataclass(frozen=True)
class MethodSpec:
    """A plasticity method: penalty coefficients, Shrink & Perturb, or a reset at every task start.

    :param l2_coef: ``(λ/2)‖θ‖²`` (``ParameterPenalty``).
    :param l2_init_coef: ``(λ₀/2)‖θ − θ₀‖²`` toward the initial parameters (``ParameterPenalty``).
    :param erank_coef: ``−c · R`` with ``R`` the mean effective rank of the hidden layers' minibatch features
        (``effective_rank_objective``).
    :param shrink: Shrink & Perturb's ``θ ← (1 − shrink) θ + noise_std · ε`` after every step.
    :param noise_std: Shrink & Perturb's noise.
    :param reset: a fresh network at every task start.
    """

    l2_coef: float = 0.0
    l2_init_coef: float = 0.0
    erank_coef: float = 0.0
    shrink: float = 0.0
    noise_std: float = 0.0
    reset: bool = False


# Coefficients: chosen on seed 100 (not a study seed), random-label stream with 30 passes over 128 images, 50 tasks,
# by the mean online accuracy over tasks 25-49, from L2 {1e-4, 1e-3, 3e-3, 1e-2}, ER {1e-3, 1e-2, 1e-1}, L2-Init
# {1e-3, 1e-2} and S&P (shrink, noise) {(1e-5, 1e-3), (1e-4, 1e-3), (1e-3, 1e-3)}; L2+ER combines the two chosen
# coefficients (docs/plasticity.md).
DEFAULT_L2_COEF = 1e-3
DEFAULT_L2_INIT_COEF = 1e-2
DEFAULT_ERANK_COEF = 1e-2
DEFAULT_SHRINK = 1e-5
DEFAULT_NOISE_STD = 1e-3


def method_specs(args: argparse.Namespace) -> dict[str, MethodSpec]:
    """The methods, with the coefficients of ``args``."""
    return {
        "backprop": MethodSpec(),
        "l2": MethodSpec(l2_coef=args.l2_coef),
        "er": MethodSpec(erank_coef=args.erank_coef),
        "l2_er": MethodSpec(l2_coef=args.l2_coef, erank_coef=args.erank_coef),
        "l2_init": MethodSpec(l2_init_coef=args.l2_init_coef),
        "snp": MethodSpec(shrink=args.shrink, noise_std=args.noise_std),
        "reset": MethodSpec(reset=True),
    }


@dataclass(frozen=True)
class Protocol:
    """Stream and training settings of one run (all runs of a study share them).

    :param stream: ``"permuted"`` or ``"random_labels"``.
    :param tasks: number of tasks.
    :param hidden: hidden-layer widths of the ReLU MLP.
    :param lr: SGD step size.
    :param batch_size: minibatch size of the online updates.
    :param passes: online passes over the task's examples (each pass in a new random order).
    :param examples: examples per task (``None``: all 1,797).
    :param measure_every: Hessian and feature measurements at every ``measure_every``-th task start (and the last).
    :param hessian_samples: examples of the new task the Hessian and the features are measured on.
    :param lanczos_steps: Lanczos steps per SLQ probe.
    :param num_probes: SLQ probes.
    """

    stream: str
    tasks: int
    hidden: tuple[int, ...]
    lr: float
    batch_size: int
    passes: int
    examples: int | None
    measure_every: int
    hessian_samples: int
    lanczos_steps: int
    num_probes: int


# Per-stream defaults, sized so that the default study (2 streams x 7 methods x 3 seeds) finishes in < 30 minutes on
# 2 busy CPU cores. The random-label stream memorises 128 images per task in 15 passes (120 SGD steps), the permuted
# stream sees each of the 1,797 images once per task (113 steps).
STREAM_DEFAULTS: dict[str, dict[str, Any]] = {
    "permuted": dict(tasks=200, passes=1, examples=None, lr=0.1),
    "random_labels": dict(tasks=200, passes=15, examples=128, lr=0.1),
}


# ------------------------------------------------------------------------------------------------------------- data
def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits, pixels scaled to ``[0, 1]``: ``(1797, 64)`` float32 and ``(1797,)`` int64."""
    from sklearn.datasets import load_digits  # shipped with scikit-learn: no download

    digits = load_digits()
    return (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int64)


@dataclass
class TaskStream:
    """The task sequence of one seed: task ``t`` depends only on ``(seed, t)``, the same for every method.

    :param stream: ``"permuted"`` or ``"random_labels"``.
    :param seed: the run's seed.
    :param examples: examples per task (``None``: all).
    :param images: the digits, ``(N, 64)``.
    :param labels: the true labels, ``(N,)``.
    """

    stream: str
    seed: int
    examples: int | None
    images: np.ndarray = field(repr=False)
    labels: np.ndarray = field(repr=False)

    def __post_init__(self) -> None:
        if self.stream not in STREAMS:
            raise ValueError(f"stream must be one of {STREAMS}, got {self.stream!r}")
        count = len(self.images) if self.examples is None else min(self.examples, len(self.images))
        # The subset (random_labels) is fixed for the whole stream; the permuted stream uses the first `count` of a
        # seeded order.
        self.subset = np.random.default_rng([self.seed, 7919]).permutation(len(self.images))[:count]

    def task(self, index: int) -> tuple[th.Tensor, th.Tensor]:
        """Inputs and targets of task ``index`` (unshuffled)."""
        rng = np.random.default_rng([self.seed, index])
        images, labels = self.images[self.subset], self.labels[self.subset]
        if self.stream == "permuted":
            images = images[:, rng.permutation(images.shape[1])]
        else:
            labels = rng.integers(0, 10, size=len(labels))
        return th.from_numpy(np.ascontiguousarray(images)), th.from_numpy(labels.astype(np.int64))


# ------------------------------------------------------------------------------------------------------------ model
class MLP(nn.Module):
    """ReLU MLP that also returns its hidden post-activations (the features of the rank metrics and of ER).

    :param in_dim: input size.
    :param hidden: hidden widths.
    :param out_dim: number of classes.
    """

    def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int) -> None:
        super().__init__()
        sizes = [in_dim, *hidden]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(sizes))
        self.head = nn.Linear(sizes[-1], out_dim)

    def forward(self, x: th.Tensor) -> tuple[th.Tensor, list[th.Tensor]]:
        features = []
        for layer in self.hidden:
            x = th.relu(layer(x))
            features.append(x)
        return self.head(x), features


def new_model(protocol: Protocol, seed: int) -> MLP:
    """A freshly initialised MLP (PyTorch's default ``nn.Linear`` initialisation), seeded."""
    with th.random.fork_rng(devices=[]):
        th.manual_seed(seed)
        return MLP(64, protocol.hidden, 10)


# ------------------------------------------------------------------------------------------------------ measurement
def measure_task_start(
    model: MLP, images: th.Tensor, labels: th.Tensor, protocol: Protocol, seed: int, reference_range: float | None
) -> dict[str, float]:
    """Hessian spectrum of the cross-entropy and hidden-feature metrics on a batch of the new task.

    :param model: the network at the task start (before any step on the task).
    :param images: the batch's inputs.
    :param labels: the batch's targets.
    :param protocol: Lanczos settings.
    :param seed: probe seed.
    :param reference_range: the spectral range ``λmax − λmin`` at task 0 (``None``: this is task 0).
    :return: a flat row of measurements.
    """
    started = time.perf_counter()
    params = list(model.parameters())
    with th.enable_grad():
        logits, features = model(images)
        loss = nn.functional.cross_entropy(logits, labels)
        hvp = HessianVectorProduct(loss, params)
        quadrature = stochastic_lanczos_quadrature(
            hvp, hvp.dim, num_steps=protocol.lanczos_steps, num_probes=protocol.num_probes, seed=seed
        )
    summary = summarize_spectrum(quadrature, FIXED_EPSILONS)
    spectral_range = summary.lambda_max - summary.lambda_min
    row: dict[str, float] = {
        "lambda_max": summary.lambda_max,
        "lambda_min": summary.lambda_min,
        "spectral_range": spectral_range,
        "trace": summary.trace.estimate,
        "neg_mass": summary.negative_mass,
    }
    for eps, rank, (low, high) in zip(summary.epsilons, summary.epsilon_ranks, summary.epsilon_rank_bounds, strict=True):
        row[f"eps_rank_{eps:g}"] = rank
        row[f"eps_rank_lo_{eps:g}"] = low
        row[f"eps_rank_hi_{eps:g}"] = high
    scales = {"task0": spectral_range if reference_range is None else reference_range, "current": spectral_range}
    for scale, value in scales.items():
        for fraction in RELATIVE_EPSILONS:
            eps = fraction * value if value > 0 else th.finfo(th.float64).tiny
            key = f"rel_{scale}_{fraction:g}"
            row[f"eps_rank_{key}"] = float(epsilon_rank(quadrature, (eps,))[0])
            low_t, high_t = epsilon_rank_bounds(quadrature, (eps,))
            row[f"eps_rank_lo_{key}"], row[f"eps_rank_hi_{key}"] = float(low_t[0]), float(high_t[0])
    with th.no_grad():
        row["batch_loss"] = float(loss)
        row["batch_accuracy"] = float((logits.argmax(dim=1) == labels).float().mean())
    layer_metrics = [feature_metrics(layer.detach()) for layer in features]
    for index, metrics in enumerate(layer_metrics):
        row[f"erank_h{index}"] = metrics["erank"]
        row[f"dormant_h{index}"] = metrics["dormant"]
    row["erank"] = float(np.mean([m["erank"] for m in layer_metrics]))
    row["dormant"] = float(np.mean([m["dormant"] for m in layer_metrics]))
    row["dead"] = float(np.mean([float((layer.detach().amax(dim=0) <= 0).float().mean()) for layer in features]))
    row["weight_norm"] = weight_norm(params)
    row["measure_seconds"] = time.perf_counter() - started
    return row


# --------------------------------------------------------------------------------------------------------- training
class Learner:
    """Online SGD with a method's penalties, Shrink & Perturb or resets.

    :param protocol: the run's settings.
    :param spec: the method.
    :param seed: seed of the initialisation and of the perturbation noise.
    """

    def __init__(self, protocol: Protocol, spec: MethodSpec, seed: int) -> None:
        self.protocol = protocol
        self.spec = spec
        self.seed = seed
        self.penalty = ParameterPenalty(l2_coef=spec.l2_coef, l2_init_coef=spec.l2_init_coef)
        self.noise = th.Generator().manual_seed(seed + 1_000_003)
        self.new_network(seed)

    def new_network(self, init_seed: int) -> None:
        """A fresh network, its optimizer, and its initial parameters (the anchors of L2-Init)."""
        self.model = new_model(self.protocol, init_seed)
        self.params = list(self.model.parameters())
        self.initial = [p.detach().clone() for p in self.params]
        self.optimizer = th.optim.SGD(self.params, lr=self.protocol.lr)

    def step(self, images: th.Tensor, labels: th.Tensor) -> tuple[float, float]:
        """One online step; returns the minibatch's loss and accuracy *before* the step."""
        logits, features = self.model(images)
        loss = nn.functional.cross_entropy(logits, labels)
        total = loss
        if self.spec.erank_coef > 0:
            rank, _ = effective_rank_objective({"mlp": {f"h{i}": f for i, f in enumerate(features)}})
            total = total - self.spec.erank_coef * rank
        self.optimizer.zero_grad(set_to_none=False)
        total.backward()
        if self.penalty.active:
            # The closed-form gradient of the L2 / L2-Init terms, added without a graph.
            grads = [p.grad for p in self.params]
            th._foreach_add_(grads, self.penalty.gradient(self.params, self.initial))  # type: ignore[arg-type]
        self.optimizer.step()
        if self.spec.shrink > 0 or self.spec.noise_std > 0:
            self.shrink_and_perturb()
        with th.no_grad():
            accuracy = float((logits.argmax(dim=1) == labels).float().mean())
        return float(loss.detach()), accuracy

    @th.no_grad()
    def shrink_and_perturb(self) -> None:
        """``θ ← (1 − shrink) θ + noise_std · ε``, ``ε ~ N(0, I)`` from the run's private generator."""
        for param in self.params:
            if self.spec.shrink > 0:
                param.mul_(1.0 - self.spec.shrink)
            if self.spec.noise_std > 0:
                param.add_(th.randn(param.shape, generator=self.noise), alpha=self.spec.noise_std)


def measured_tasks(protocol: Protocol) -> set[int]:
    """Task starts with a Hessian measurement: every ``measure_every``-th and the last."""
    return set(range(0, protocol.tasks, protocol.measure_every)) | {protocol.tasks - 1}


def run_one(stream_data: TaskStream, protocol: Protocol, spec: MethodSpec, seed: int) -> list[dict[str, float]]:
    """Train on the whole stream; one row per task (measurements on measured task starts only).

    :param stream_data: the task sequence.
    :param protocol: settings.
    :param spec: the method.
    :param seed: the run's seed.
    """
    learner = Learner(protocol, spec, seed)
    measured = measured_tasks(protocol)
    reference_range: float | None = None
    rows: list[dict[str, float]] = []
    for task in range(protocol.tasks):
        images, labels = stream_data.task(task)
        if spec.reset and task > 0:
            learner.new_network(seed * 100_003 + task)
        order_rng = th.Generator().manual_seed(seed * 1_000_003 + task)
        orders = [th.randperm(len(labels), generator=order_rng) for _ in range(protocol.passes)]
        row: dict[str, float] = {"task": task}
        if task in measured:
            probe = orders[0][: protocol.hessian_samples]
            row.update(measure_task_start(learner.model, images[probe], labels[probe], protocol, seed + task, reference_range))
            if reference_range is None:
                reference_range = row["spectral_range"]
            row["dist_init"] = distance_to_initial(learner.params, learner.initial)
        started = time.perf_counter()
        losses, accuracies, last_pass = [], [], []
        for pass_index, order in enumerate(orders):
            for start in range(0, len(order), protocol.batch_size):
                batch = order[start : start + protocol.batch_size]
                loss, accuracy = learner.step(images[batch], labels[batch])
                losses.append(loss)
                accuracies.append(accuracy * len(batch))
                if pass_index == len(orders) - 1:
                    last_pass.append(accuracy * len(batch))
        seen = protocol.passes * len(labels)
        row["accuracy"] = float(np.sum(accuracies) / seen)
        row["last_pass_accuracy"] = float(np.sum(last_pass) / len(labels))
        row["loss"] = float(np.mean(losses))
        row["train_seconds"] = time.perf_counter() - started
        if not all(math.isfinite(value) for value in (row["loss"], row["accuracy"])):
            raise FloatingPointError(f"non-finite loss at task {task}")
        rows.append(row)
    return rows


def write_rows(path: Path, rows: list[dict[str, float]]) -> None:
    """CSV with the union of the rows' keys (empty cells where a row has no value)."""
    keys: list[str] = []
    for row in rows:
        keys += [key for key in row if key not in keys]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def protocol_from_args(args: argparse.Namespace, stream: str) -> Protocol:
    """The protocol of ``stream``: per-stream defaults, overridden by explicit options."""
    defaults = STREAM_DEFAULTS[stream]

    def pick(name: str) -> Any:
        value = getattr(args, name)
        return defaults[name] if value is None else value

    return Protocol(
        stream=stream,
        tasks=int(pick("tasks")),
        hidden=tuple(args.hidden),
        lr=float(pick("lr")),
        batch_size=args.batch_size,
        passes=int(pick("passes")),
        examples=pick("examples"),
        measure_every=args.measure_every,
        hessian_samples=args.hessian_samples,
        lanczos_steps=args.lanczos_steps,
        num_probes=args.num_probes,
    )


def run_dir(out: Path, stream: str, method: str, seed: int) -> Path:
    """Where one run's files go."""
    return out / stream / method / f"seed{seed}"


def execute(stream: str, method: str, seed: int, args: argparse.Namespace) -> None:
    """Run one (stream, method, seed) in this process and write its files."""
    th.set_num_threads(1)
    protocol = protocol_from_args(args, stream)
    spec = method_specs(args)[method]
    images, labels = load_digits_arrays()
    data = TaskStream(stream, seed, protocol.examples, images, labels)
    started = time.perf_counter()
    rows = run_one(data, protocol, spec, seed)
    directory = run_dir(args.out, stream, method, seed)
    directory.mkdir(parents=True, exist_ok=True)
    write_rows(directory / "tasks.csv", rows)
    meta = dict(
        stream=stream,
        method=method,
        seed=seed,
        protocol=asdict(protocol),
        method_spec=asdict(spec),
        seconds=time.perf_counter() - started,
        torch_threads=th.get_num_threads(),
    )
    (directory / DONE_MARKER).write_text(json.dumps(meta, indent=2))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (``None`` on a protocol option: the stream's default)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", nargs="+", default=list(STREAMS), choices=STREAMS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--tasks", type=int, default=None, help="tasks per stream (default: 200)")
    parser.add_argument("--passes", type=int, default=None, help="online passes per task (permuted 1, random_labels 15)")
    parser.add_argument("--examples", type=int, default=None, help="examples per task (permuted all, random_labels 128)")
    parser.add_argument("--lr", type=float, default=None, help="SGD step size (default 0.1)")
    parser.add_argument("--hidden", nargs="+", type=int, default=[128, 128])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--measure-every", type=int, default=5, help="Hessian at every k-th task start")
    parser.add_argument("--hessian-samples", type=int, default=512)
    parser.add_argument("--lanczos-steps", type=int, default=30)
    parser.add_argument("--num-probes", type=int, default=2)
    parser.add_argument("--l2-coef", type=float, default=DEFAULT_L2_COEF)
    parser.add_argument("--l2-init-coef", type=float, default=DEFAULT_L2_INIT_COEF)
    parser.add_argument("--erank-coef", type=float, default=DEFAULT_ERANK_COEF)
    parser.add_argument("--shrink", type=float, default=DEFAULT_SHRINK)
    parser.add_argument("--noise-std", type=float, default=DEFAULT_NOISE_STD)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--jobs",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="runs in parallel (one process and one torch thread each; default: 2, or 1 on a one-core machine)",
    )
    parser.add_argument("--no-report", action="store_true", help="skip the report after the runs")
    parser.add_argument("--run", nargs=3, metavar=("STREAM", "METHOD", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure_every < 1 or args.jobs < 1 or args.batch_size < 2:
        parser.error("--measure-every and --jobs must be >= 1 and --batch-size >= 2 (the rank of one sample is 1)")
    return args


def forwarded_options(argv: Sequence[str]) -> list[str]:
    """The options a child run needs: every option except the scheduling ones."""
    skip_with_values = {"--streams", "--methods", "--seeds", "--jobs"}
    forwarded, skipping = [], False
    for token in argv:
        if token.startswith("--"):
            name = token.split("=", 1)[0]
            skipping = name in skip_with_values
            if skipping or name == "--no-report":
                continue
        elif skipping:
            continue
        forwarded.append(token)
    return forwarded


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.run:
        stream, method, seed = args.run
        execute(stream, method, int(seed), args)
        return
    pending = [
        (stream, method, seed)
        for seed in args.seeds
        for stream in args.streams
        for method in args.methods
        if not (run_dir(args.out, stream, method, seed) / DONE_MARKER).exists()
    ]
    print(f"{len(pending)} runs to do", flush=True)
    options = forwarded_options(argv)
    failures = []
    started_all = time.perf_counter()

    def launch(job: tuple[str, str, int]) -> None:
        stream, method, seed = job
        command = [sys.executable, __file__, "--run", stream, method, str(seed), *options]
        started = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        status = "ok" if result.returncode == 0 else f"FAILED\n{result.stderr[-3000:]}"
        if result.returncode != 0:
            failures.append(job)
        print(f"{stream} {method} seed {seed}: {status} ({time.perf_counter() - started:.0f} s)", flush=True)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(launch, pending))
    print(f"runs: {time.perf_counter() - started_all:.0f} s", flush=True)
    if failures:
        raise SystemExit(f"{len(failures)} runs failed: {failures}")
    if not args.no_report:
        sys.path.insert(0, str(HERE))
        import report

        report.main(["--results", str(args.out)])


if __name__ == "__main__":
    main()
