"""The supervised continual control (benchmarks/continual_supervised): tasks, methods, measurements and report.

The methods must be the package's penalty terms (checked against a step computed by autograd on the full objective),
the task-start measurements the package's curvature and feature metrics (checked against a dense Hessian and a manual
forward pass), and the ``current`` / ``task0`` ε-ranks those of ``TrainabilityCallback``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch as th
from torch import nn

from sb3_blpo.callbacks.monitors import relative_epsilon_of
from sb3_blpo.curvature import epsilon_rank, stochastic_lanczos_quadrature
from sb3_blpo.hypergrad import HessianVectorProduct
from sb3_blpo.metrics import dormant_unit_fraction, effective_rank
from sb3_blpo.penalties import effective_rank_objective

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "continual_supervised"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"continual_supervised_{name}", BENCHMARK / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


run = _load("run")
report = _load("report")


def _protocol(**overrides: Any) -> Any:
    settings: dict[str, Any] = dict(
        stream="random_labels",
        tasks=3,
        hidden=(8, 8),
        lr=0.1,
        batch_size=16,
        passes=2,
        examples=64,
        measure_every=1,
        hessian_samples=64,
        lanczos_steps=10,
        num_probes=2,
    )
    settings.update(overrides)
    return run.Protocol(**settings)


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    return run.load_digits_arrays()


def test_digits_ship_with_scikit_learn_and_tasks_depend_only_on_seed_and_index(digits):
    images, labels = digits
    assert images.shape == (1797, 64) and images.min() >= 0.0 and images.max() == 1.0
    permuted = run.TaskStream("permuted", 3, None, images, labels)
    x0, y0 = permuted.task(0)
    x1, y1 = permuted.task(1)
    again, _ = run.TaskStream("permuted", 3, None, images, labels).task(1)
    assert th.equal(x1, again) and not th.equal(x0, x1)
    assert th.equal(y0, y1)  # a permuted task keeps the labels and permutes the pixels of each image alike
    assert th.equal(th.sort(x0, dim=1).values, th.sort(x1, dim=1).values)
    random = run.TaskStream("random_labels", 3, 100, images, labels)
    (a0, b0), (a1, b1) = random.task(0), random.task(1)
    assert a0.shape == (100, 64) and th.equal(a0, a1) and not th.equal(b0, b1)
    assert int(b0.min()) >= 0 and int(b0.max()) <= 9
    with pytest.raises(ValueError, match="stream must be one of"):
        run.TaskStream("rotated", 0, None, images, labels)


def _objective(learner: Any, images: th.Tensor, labels: th.Tensor) -> th.Tensor:
    """The full objective of a method, written out with autograd: CE + L2 + L2-Init − c·R."""
    spec, params = learner.spec, learner.params
    logits, features = learner.model(images)
    total = nn.functional.cross_entropy(logits, labels)
    total = total + 0.5 * spec.l2_coef * sum(p.square().sum() for p in params)
    total = total + 0.5 * spec.l2_init_coef * sum((p - a).square().sum() for p, a in zip(params, learner.initial, strict=True))
    if spec.erank_coef:
        rank, _ = effective_rank_objective({"mlp": {f"h{i}": f for i, f in enumerate(features)}})
        total = total - spec.erank_coef * rank
    return total


@pytest.mark.parametrize(
    "spec",
    [
        dict(),
        dict(l2_coef=1e-2),
        dict(erank_coef=0.1),
        dict(l2_coef=1e-2, erank_coef=0.1),
        dict(l2_init_coef=0.5),
    ],
)
def test_a_step_is_sgd_on_the_methods_objective(spec, digits):
    protocol = _protocol()
    learner = run.Learner(protocol, run.MethodSpec(**spec), seed=0)
    images, labels = run.TaskStream("random_labels", 0, 64, *digits).task(0)
    batch_x, batch_y = images[:16], labels[:16]
    # Move away from the anchors first, so that L2-Init has a non-zero gradient.
    with th.no_grad():
        for param in learner.params:
            param.add_(0.1)
    gradients = th.autograd.grad(_objective(learner, batch_x, batch_y), learner.params)
    expected = [p.detach() - protocol.lr * g for p, g in zip(learner.params, gradients, strict=True)]
    with th.no_grad():
        logits, _ = learner.model(batch_x)
    loss, accuracy = learner.step(batch_x, batch_y)
    assert loss == pytest.approx(float(nn.functional.cross_entropy(logits, batch_y)), rel=1e-6)
    assert accuracy == pytest.approx(float((logits.argmax(1) == batch_y).float().mean()))  # measured before the step
    for param, target in zip(learner.params, expected, strict=True):
        th.testing.assert_close(param.detach(), target, rtol=1e-5, atol=1e-6)


def test_shrink_and_perturb_and_reset(digits):
    protocol = _protocol(tasks=3, measure_every=10)
    images, labels = run.TaskStream("random_labels", 0, 64, *digits).task(0)
    plain = run.Learner(protocol, run.MethodSpec(), seed=0)
    shrunk = run.Learner(protocol, run.MethodSpec(shrink=0.1), seed=0)
    plain.step(images[:16], labels[:16])
    shrunk.step(images[:16], labels[:16])
    for a, b in zip(plain.params, shrunk.params, strict=True):
        th.testing.assert_close(b.detach(), 0.9 * a.detach())
    noisy = run.Learner(protocol, run.MethodSpec(noise_std=0.01), seed=0)
    noisy.step(images[:16], labels[:16])
    differences = th.cat([(b - a).detach().flatten() for a, b in zip(plain.params, noisy.params, strict=True)])
    assert float(differences.std()) == pytest.approx(0.01, rel=0.1)
    # reset: every task starts from a fresh network, so its task-start measurements match a new one's.
    stream = run.TaskStream("random_labels", 0, 64, *digits)
    rows = run.run_one(stream, _protocol(tasks=3, measure_every=1), run.MethodSpec(reset=True), seed=0)
    fresh = run.new_model(_protocol(), 0 * 100_003 + 2)
    start_x, start_y = stream.task(2)
    order = th.randperm(64, generator=th.Generator().manual_seed(0 * 1_000_003 + 2))[:64]
    with th.no_grad():
        logits, _ = fresh(start_x[order])
    assert rows[2]["batch_loss"] == pytest.approx(float(nn.functional.cross_entropy(logits, start_y[order])), rel=1e-5)
    assert rows[2]["dist_init"] == 0.0


def test_task_start_measurement_matches_dense_hessian_metrics_and_the_callbacks_epsilon(digits):
    protocol = _protocol(hidden=(6, 5), lanczos_steps=40, num_probes=3)
    model = run.new_model(protocol, 1)
    images, labels = run.TaskStream("permuted", 0, None, *digits).task(0)
    x, y = images[:64], labels[:64]
    row = run.measure_task_start(model, x, y, protocol, seed=5, reference_range=2.0)
    logits, features = model(x)
    hvp = HessianVectorProduct(nn.functional.cross_entropy(logits, y), list(model.parameters()))
    eigenvalues = th.linalg.eigvalsh(hvp.dense().double())
    assert row["lambda_max"] == pytest.approx(float(eigenvalues.max()), rel=1e-3)
    assert row["lambda_min"] == pytest.approx(float(eigenvalues.min()), rel=1e-2, abs=1e-5)
    # The relative ε-ranks are TrainabilityCallback's: "current" on this spectrum, "task0" on the given range.
    quadrature = stochastic_lanczos_quadrature(hvp, hvp.dim, num_steps=40, num_probes=3, seed=5)
    current = relative_epsilon_of(quadrature, 0.05)
    assert row["eps_rank_rel_current_0.05"] == pytest.approx(float(epsilon_rank(quadrature, [current])[0]))
    assert row["eps_rank_rel_task0_0.05"] == pytest.approx(float(epsilon_rank(quadrature, [0.05 * 2.0])[0]))
    # The SLQ ε-rank brackets hold the exact fraction of eigenvalues beyond the fixed ε... on average over probes, so
    # only the bracket is checked per ε: it must contain the estimate, which must be near the exact fraction.
    for eps in run.FIXED_EPSILONS:
        exact = float((eigenvalues.abs() > eps).double().mean())
        assert row[f"eps_rank_lo_{eps:g}"] <= row[f"eps_rank_{eps:g}"] <= row[f"eps_rank_hi_{eps:g}"]
        assert abs(row[f"eps_rank_{eps:g}"] - exact) < 0.2
    assert row["erank_h0"] == pytest.approx(effective_rank(features[0].detach()))
    assert row["dormant_h1"] == pytest.approx(dormant_unit_fraction(features[1].detach()))
    assert row["batch_accuracy"] == pytest.approx(float((logits.argmax(1) == y).float().mean()))


def test_r_squared_and_onsets_against_hand_computed_values():
    assert report.r_squared([0, 1, 2, 3], [1, 3, 5, 7])[:2] == (pytest.approx(1.0), 1.0)
    assert report.r_squared([0, 1, 2, 3], [7, 5, 3, 1])[:2] == (pytest.approx(1.0), -1.0)
    value, _, count = report.r_squared([1, 2, 3, 4, math.nan], [1, 3, 2, 4, 9])
    assert count == 4 and value == pytest.approx(0.64)  # Pearson r = 0.8
    tasks = np.arange(0, 50, 5)
    rank = np.array([0.1, 0.2, 0.2, 0.1, 0.06, 0.03, 0.04, 0.02, 0.03, 0.03])
    accuracy = np.concatenate([np.full(30, 0.8), np.full(20, 0.5)])
    collapse, decline = report.onset_tasks(tasks, rank, accuracy)
    assert collapse == 35.0  # the first value below 0.25 x 0.1, the task-0 value
    assert decline == 31.0  # the 10-task average is 0.8 - 0.03 k with k tasks at 0.5: below 0.75 from k = 2
    assert math.isnan(report.onset_tasks(tasks, np.full(10, 0.1), np.full(50, 0.8))[1])


def _check_run_files(results: Path, methods: list[str], seeds: list[int], protocol: Any) -> None:
    for method in methods:
        for seed in seeds:
            directory = results / "random_labels" / method / f"seed{seed}"
            meta = json.loads((directory / "done.json").read_text())
            assert meta["torch_threads"] == 1 and meta["protocol"]["tasks"] == protocol.tasks
            rows = report.read_runs(results)["random_labels"][method][seed]
            assert [int(row["task"]) for row in rows] == list(range(protocol.tasks))
            measured = [int(row["task"]) for row in rows if math.isfinite(row["lambda_max"])]
            assert measured == sorted(run.measured_tasks(protocol))
            assert all(0.0 <= row["accuracy"] <= 1.0 for row in rows)


def test_small_study_in_process_and_its_report(tmp_path):
    results = tmp_path / "results"
    argv = ["--streams", "random_labels", "--tasks", "4", "--examples", "48", "--passes", "2", "--hidden", "8", "8"]
    argv += ["--measure-every", "2", "--hessian-samples", "48", "--lanczos-steps", "8", "--out", str(results)]
    args = run.parse_args(argv)
    for method in ("backprop", "l2_er", "reset"):
        for seed in (0, 1):
            run.execute("random_labels", method, seed, args)
    _check_run_files(results, ["backprop", "l2_er", "reset"], [0, 1], run.protocol_from_args(args, "random_labels"))
    payload = report.main(["--results", str(results), "--no-plots"])
    summary = payload["random_labels"]
    assert summary["methods"] == ["backprop", "l2_er", "reset"]
    assert summary["ranks"]["backprop"]["tasks"] == [0, 2, 3]
    text = (results / "report.md").read_text()
    assert "| L2+ER | 2 |" in text and "### R² of a task's online accuracy" in text
    # The seed-mean accuracy of the table is the mean of the runs' CSVs.
    rows = report.read_runs(results)["random_labels"]["backprop"]
    final = np.mean([rows[seed][-1]["accuracy"] for seed in (0, 1)])
    assert summary["accuracy"]["backprop"]["final"][0] == pytest.approx(final)
    assert (results / "tasks_mean.csv").read_text().count("\n") == 1 + 3 * 4


@pytest.mark.slow  # two runs in subprocesses, each importing torch and scikit-learn, and five figures: ~50 s on 2 busy cores
def test_the_command_line_runs_in_parallel_resumes_and_plots(tmp_path):
    results = tmp_path / "results"
    argv = ["--streams", "random_labels", "--methods", "backprop", "snp", "--seeds", "0", "--tasks", "3"]
    argv += ["--examples", "32", "--passes", "1", "--hidden", "8", "--measure-every", "2", "--hessian-samples", "32"]
    argv += ["--lanczos-steps", "6", "--jobs", "2", "--out", str(results)]
    command = [sys.executable, str(BENCHMARK / "run.py"), *argv]
    first = subprocess.run(command, capture_output=True, text=True, check=True)
    assert "2 runs to do" in first.stdout and "Shrink & Perturb" in first.stdout
    for name in ("accuracy", "epsilon_rank", "lambda_max", "features", "r2_scatter"):
        assert (results / f"{name}.png").stat().st_size > 0
    args = run.parse_args(argv)
    _check_run_files(results, ["backprop", "snp"], [0], run.protocol_from_args(args, "random_labels"))
    second = subprocess.run([*command, "--no-report"], capture_output=True, text=True, check=True)
    assert "0 runs to do" in second.stdout
