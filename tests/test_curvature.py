"""Lanczos, SLQ, Hutchinson and power iteration against exact dense Hessians (torch.func.hessian) of small networks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch as th
from torch import nn
from torch.func import functional_call, hessian

from sb3_blpo.curvature import (
    broadened_density,
    epsilon_rank,
    epsilon_rank_bounds,
    hutchinson_trace,
    lanczos,
    negative_mass,
    power_iteration,
    quadrature_from_lanczos,
    random_probes,
    stochastic_lanczos_quadrature,
    student_t_quantile,
    summarize_spectrum,
)
from sb3_blpo.hypergrad import HessianVectorProduct


def _small_network_problem(dtype: th.dtype, seed: int = 0, hidden: int = 6) -> tuple[nn.Module, th.Tensor, th.Tensor]:
    """A tanh MLP with a cross-entropy loss: its Hessian is indefinite away from a minimum."""
    generator = th.Generator().manual_seed(seed)
    th.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 3)).to(dtype)
    inputs = th.randn(64, 3, generator=generator, dtype=dtype)
    labels = th.randint(0, 3, (64,), generator=generator)
    return net, inputs, labels


def _loss(net: nn.Module, inputs: th.Tensor, labels: th.Tensor) -> th.Tensor:
    return nn.functional.cross_entropy(net(inputs), labels)


def _exact_hessian(net: nn.Module, inputs: th.Tensor, labels: th.Tensor) -> th.Tensor:
    """The dense Hessian of the loss w.r.t. all parameters (flattened in ``net.parameters()`` order), by torch.func."""
    names = [name for name, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]
    sizes = [p.numel() for p in net.parameters()]
    flat = th.cat([p.detach().reshape(-1) for p in net.parameters()])

    def loss_of_flat(vector: th.Tensor) -> th.Tensor:
        params = {name: chunk.view(shape) for name, chunk, shape in zip(names, vector.split(sizes), shapes, strict=True)}
        return nn.functional.cross_entropy(functional_call(net, params, (inputs,)), labels)

    return hessian(loss_of_flat)(flat)


@pytest.fixture(scope="module", params=[th.float64, th.float32], ids=["float64", "float32"])
def network_hessian(request: pytest.FixtureRequest) -> tuple[HessianVectorProduct, th.Tensor, th.dtype]:
    dtype = request.param
    net, inputs, labels = _small_network_problem(dtype)
    hvp = HessianVectorProduct(_loss(net, inputs, labels), list(net.parameters()))
    dense = _exact_hessian(net, inputs, labels).to(th.float64)
    return hvp, dense, dtype


def test_hvp_operator_matches_dense_hessian(network_hessian):
    hvp, dense, dtype = network_hessian
    vectors = random_probes(hvp.dim, 3, seed=1, distribution="gaussian", dtype=dtype)
    tolerance = 1e-10 if dtype == th.float64 else 1e-4
    th.testing.assert_close(hvp(vectors).to(th.float64), vectors.to(th.float64) @ dense, rtol=tolerance, atol=tolerance)


def test_lanczos_extremal_ritz_values_match_eigvalsh(network_hessian):
    hvp, dense, dtype = network_hessian
    eigenvalues = th.linalg.eigvalsh(dense)
    assert eigenvalues[0] < 0 < eigenvalues[-1], "the test problem should have an indefinite Hessian"
    num_steps = 30
    assert num_steps < hvp.dim / 2, "Lanczos must converge at the extremes without spanning the whole space"
    result = lanczos(hvp, random_probes(hvp.dim, 1, seed=0, dtype=dtype), num_steps)
    ritz = result.ritz_values(0)
    assert result.steps == [num_steps]
    assert abs(ritz[-1] - eigenvalues[-1]) <= 0.01 * abs(eigenvalues[-1])
    assert abs(ritz[0] - eigenvalues[0]) <= 0.01 * abs(eigenvalues[0])
    # Ritz values interlace: they never leave the spectrum (up to round-off of the operator).
    slack = 1e-8 if dtype == th.float64 else 1e-4
    assert eigenvalues[0] - slack <= ritz[0] and ritz[-1] <= eigenvalues[-1] + slack


def test_slq_epsilon_rank_matches_exact_fraction_within_sampling_error(network_hessian):
    hvp, dense, dtype = network_hessian
    eigenvalues = th.linalg.eigvalsh(dense)
    dim, num_probes = hvp.dim, 24
    quadrature = stochastic_lanczos_quadrature(hvp, dim, num_steps=dim, num_probes=num_probes, seed=3, operator_dtype=dtype)
    # Thresholds in the bulk, where the exact fraction is neither 0 nor 1 (so the test can fail either way).
    epsilons = [float(q) for q in th.quantile(eigenvalues.abs(), th.tensor([0.3, 0.6, 0.9], dtype=th.float64))]
    estimate = epsilon_rank(quadrature, epsilons)
    for eps, value in zip(epsilons, estimate.tolist(), strict=True):
        exact = float((eigenvalues.abs() > eps).double().mean())
        # With a full-length Lanczos run the quadrature is exact per probe: the probe estimate is Σ_{i∈S} (u_iᵀv)²/‖v‖²,
        # whose standard deviation is about sqrt(2 f (1 − f) / (P + 2)) for a random sign probe.
        sampling_std = math.sqrt(2 * exact * (1 - exact) / (dim + 2)) / math.sqrt(num_probes)
        assert abs(value - exact) <= 4 * sampling_std + 1e-9, (eps, value, exact, sampling_std)


def test_slq_epsilon_rank_with_short_lanczos_when_epsilon_lies_in_a_spectral_gap():
    # Gauss quadrature with k nodes integrates a step function well when no eigenvalue sits near the step.
    generator = th.Generator().manual_seed(0)
    dim = 400
    eigenvalues = th.cat(
        [
            th.rand(300, generator=generator, dtype=th.float64) * 1e-3,
            1.0 + th.rand(100, generator=generator, dtype=th.float64) * 9,
        ]
    )
    eigenvalues[::7] *= -1
    basis, _ = th.linalg.qr(th.randn(dim, dim, generator=generator, dtype=th.float64))
    dense = basis @ th.diag(eigenvalues) @ basis.T
    quadrature = stochastic_lanczos_quadrature(
        lambda v: v @ dense, dim, num_steps=40, num_probes=10, seed=0, operator_dtype=th.float64
    )
    exact = float((eigenvalues.abs() > 0.1).double().mean())
    sampling_std = math.sqrt(2 * exact * (1 - exact) / (dim + 2)) / math.sqrt(10)
    assert abs(float(epsilon_rank(quadrature, [0.1])[0]) - exact) <= 4 * sampling_std
    exact_negative = float((eigenvalues < -0.1).double().mean())
    negative_std = math.sqrt(2 * exact_negative * (1 - exact_negative) / (dim + 2)) / math.sqrt(10)
    assert abs(negative_mass(quadrature, 0.1) - exact_negative) <= 4 * negative_std


def test_epsilon_rank_bounds_contain_each_probes_exact_spectral_mass(network_hessian):
    hvp, dense, dtype = network_hessian
    eigenvalues, eigenvectors = th.linalg.eigh(dense)
    num_steps, num_probes = 12, 4  # a short quadrature, so that the brackets are not trivially tight
    probes = random_probes(hvp.dim, num_probes, seed=2)
    quadrature = quadrature_from_lanczos(lanczos(hvp, probes.to(dtype), num_steps), hvp.dim)
    # Each probe's spectral measure μ_v = Σ_i (u_iᵀv)²/‖v‖² δ_{λ_i}; its mass beyond ε is what the quadrature estimates.
    probe_weights = (probes @ eigenvectors) ** 2 / hvp.dim
    epsilons = sorted({float(q) for q in th.quantile(eigenvalues.abs(), th.linspace(0.05, 0.95, 10, dtype=th.float64))})
    lower, upper = epsilon_rank_bounds(quadrature, epsilons)
    estimate = epsilon_rank(quadrature, epsilons)
    exact = th.stack([(probe_weights * (eigenvalues.abs() > eps)).sum(dim=1) for eps in epsilons], dim=1).mean(dim=0)
    slack = 1e-9 if dtype == th.float64 else 1e-4
    assert bool((lower - slack <= exact).all() and (exact <= upper + slack).all()), (lower, exact, upper)
    assert bool((lower - slack <= estimate).all() and (estimate <= upper + slack).all())
    assert float((upper - lower).min()) < 0.5  # some thresholds are resolved: the bounds carry information


def test_hutchinson_contains_exact_trace_and_interval_has_nominal_coverage(network_hessian):
    hvp, dense, dtype = network_hessian
    exact = float(th.trace(dense))
    # One draw at 99% confidence (fails with probability 1% for an unlucky seed); the coverage check below tests the
    # interval's calibration itself.
    estimate = hutchinson_trace(hvp, hvp.dim, num_probes=40, seed=0, confidence=0.99, operator_dtype=dtype)
    assert estimate.ci_low <= exact <= estimate.ci_high
    assert estimate.ci_high - estimate.ci_low < 10 * abs(exact) + 1.0  # informative, not arbitrarily wide

    # Coverage of the 90% interval over many seeds on the same dense matrix: close to nominal.
    hits = [
        (lambda e: e.ci_low <= exact <= e.ci_high)(
            hutchinson_trace(
                lambda v: v @ dense, dense.shape[0], num_probes=10, seed=seed, confidence=0.9, operator_dtype=th.float64
            )
        )
        for seed in range(300)
    ]
    coverage = float(np.mean(hits))
    assert 0.84 <= coverage <= 0.96, coverage


def test_summary_trace_from_slq_probes_is_hutchinson(network_hessian):
    hvp, dense, dtype = network_hessian
    quadrature = stochastic_lanczos_quadrature(hvp, hvp.dim, num_steps=8, num_probes=30, seed=5, operator_dtype=dtype)
    summary = summarize_spectrum(quadrature, epsilons=(1e-3,))
    probes = random_probes(hvp.dim, 30, seed=5)
    samples = ((probes @ dense) * probes).sum(dim=1)
    tolerance = 1e-8 if dtype == th.float64 else 1e-3
    assert summary.trace.estimate == pytest.approx(float(samples.mean()), rel=tolerance, abs=tolerance)
    assert summary.trace.ci_low <= float(th.trace(dense)) <= summary.trace.ci_high
    eigenvalues = th.linalg.eigvalsh(dense)
    assert summary.lambda_max <= float(eigenvalues[-1]) + 1e-4 and summary.lambda_min >= float(eigenvalues[0]) - 1e-4


def test_power_iteration_finds_dominant_eigenvalue(network_hessian):
    hvp, dense, dtype = network_hessian
    eigenvalues = th.linalg.eigvalsh(dense)
    dominant = eigenvalues[th.argmax(eigenvalues.abs())]
    result = power_iteration(hvp, hvp.dim, max_iterations=500, tol=1e-7, seed=0, operator_dtype=dtype)
    assert result.converged
    assert abs(result.eigenvalue - float(dominant)) <= 0.01 * abs(float(dominant))


def test_lanczos_stops_at_exact_breakdown_on_rank_deficient_operator():
    generator = th.Generator().manual_seed(1)
    factor = th.randn(50, 5, generator=generator, dtype=th.float64)
    dense = factor @ factor.T  # rank 5: the Krylov space of any start vector has dimension at most 6 (with 0)
    result = lanczos(lambda v: v @ dense, random_probes(50, 2, seed=0), num_steps=20)
    assert all(steps <= 6 for steps in result.steps)
    nonzero = th.linalg.eigvalsh(dense)[-5:]
    th.testing.assert_close(result.ritz_values(0)[-5:], nonzero, rtol=1e-8, atol=1e-8)
    assert result.num_products == sum(result.steps)


def test_probes_are_seeded_and_independent_of_global_rng():
    th.manual_seed(123)
    first = random_probes(100, 3, seed=7)
    th.manual_seed(999)
    assert th.equal(first, random_probes(100, 3, seed=7))
    assert not th.equal(first, random_probes(100, 3, seed=8))
    assert set(first.unique().tolist()) == {-1.0, 1.0}


def test_invalid_arguments_raise():
    dense = th.eye(4, dtype=th.float64)
    with pytest.raises(ValueError, match="num_steps"):
        lanczos(lambda v: v @ dense, th.ones(4, dtype=th.float64), num_steps=1)
    with pytest.raises(ValueError, match="zero"):
        lanczos(lambda v: v @ dense, th.zeros(4, dtype=th.float64), num_steps=3)
    quadrature = stochastic_lanczos_quadrature(lambda v: v @ dense, 4, num_steps=3, num_probes=1, operator_dtype=th.float64)
    for bad in ([0.0], [-1e-3], [], [float("nan")]):
        with pytest.raises(ValueError):
            epsilon_rank(quadrature, bad)
    with pytest.raises(ValueError, match="distribution"):
        random_probes(4, 1, distribution="uniform")


def test_broadened_density_integrates_to_one_and_peaks_at_eigenvalues():
    dense = th.diag(th.tensor([-2.0, 1.0, 1.0, 5.0], dtype=th.float64))
    quadrature = stochastic_lanczos_quadrature(lambda v: v @ dense, 4, num_steps=4, num_probes=4, operator_dtype=th.float64)
    grid, density = broadened_density(quadrature, num_points=4000, relative_sigma=0.01)
    assert np.trapezoid(density, grid) == pytest.approx(1.0, abs=1e-3)
    peak = grid[np.argmax(density)]
    assert min(abs(peak - value) for value in (-2.0, 1.0, 5.0)) < 0.1


def test_student_t_quantile_matches_tables():
    assert student_t_quantile(0.975, 1) == pytest.approx(12.706, abs=2e-3)
    assert student_t_quantile(0.975, 2) == pytest.approx(4.303, abs=1e-3)
    assert student_t_quantile(0.95, 10) == pytest.approx(1.812, abs=1e-3)
    assert student_t_quantile(0.975, 10_000) == pytest.approx(1.960, abs=1e-3)
