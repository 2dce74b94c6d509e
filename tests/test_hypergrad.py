"""Exact-oracle tests of the pure-math hypergradient layer: HVPs, IHVP solvers and implicit hypergradients."""

from __future__ import annotations

import itertools
import math

import pytest
import torch as th
from torch import nn

from sb3_blpo.common.update_stats import PhaseTimer
from sb3_blpo.hypergrad import (
    SOLVERS,
    ConjugateGradientSolver,
    DenseSolver,
    GaussNewtonProduct,
    HessianVectorProduct,
    Hypergradient,
    IHVPResult,
    IHVPSolver,
    NeumannSolver,
    NystromSolver,
    bound_correction,
    flatten,
    implicit_hypergradient,
    make_solver,
    unflatten_like,
)

DTYPE = th.float64


def _gen(seed: int) -> th.Generator:
    return th.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int) -> th.Tensor:
    return th.randn(*shape, generator=_gen(seed), dtype=DTYPE)


def _rotation(dim: int, seed: int) -> th.Tensor:
    q, _ = th.linalg.qr(_randn(dim, dim, seed=seed))
    return q


def _sym_from_eigs(eigs: th.Tensor, seed: int) -> th.Tensor:
    q = _rotation(eigs.numel(), seed)
    return q @ th.diag(eigs.to(DTYPE)) @ q.T


def _matrix_hvp(matrix: th.Tensor):
    return lambda vectors: vectors @ matrix.T


def _rel_err(a: th.Tensor, b: th.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# --- Hessian-vector products ---------------------------------------------------------------------------------------


def _small_mlp_loss(seed: int = 0):
    th.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(DTYPE)
    inputs, targets = _randn(7, 3, seed=seed + 1), _randn(7, 2, seed=seed + 2)
    params = list(net.parameters())
    names = [name for name, _ in net.named_parameters()]

    def loss_of_flat(flat: th.Tensor) -> th.Tensor:
        tensors = dict(zip(names, unflatten_like(flat, params), strict=True))
        out = th.func.functional_call(net, tensors, (inputs,))
        return ((out - targets) ** 2).mean() + 0.1 * (out**3).mean()

    loss = ((net(inputs) - targets) ** 2).mean() + 0.1 * (net(inputs) ** 3).mean()
    return net, params, loss, loss_of_flat


def test_hvp_matches_functorch_hessian():
    _, params, loss, loss_of_flat = _small_mlp_loss()
    flat = flatten([p.detach() for p in params])
    # Reverse-over-reverse functorch (not jacfwd, whose forward-mode decompositions warn on import in torch 2.13).
    expected = th.func.jacrev(th.func.jacrev(loss_of_flat))(flat)
    hvp = HessianVectorProduct(loss, params)
    assert th.allclose(hvp.dense(), expected, atol=1e-10, rtol=1e-8)
    vector = _randn(hvp.dim, seed=5)
    assert th.allclose(hvp(vector), expected @ vector, atol=1e-10, rtol=1e-8)
    damped = HessianVectorProduct(loss, params, damping=0.3)
    assert th.allclose(damped(vector), expected @ vector + 0.3 * vector, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("vectorize", [True, False])
def test_batched_and_looped_products_agree(vectorize):
    _, params, loss, _ = _small_mlp_loss(seed=3)
    hvp = HessianVectorProduct(loss, params, vectorize=vectorize)
    batch = _randn(4, hvp.dim, seed=7)
    batched = hvp(batch)
    looped = th.stack([hvp(row) for row in batch])
    assert batched.shape == (4, hvp.dim)
    assert th.allclose(batched, looped, atol=1e-12, rtol=1e-10)
    assert hvp.n_products == 8


def test_mixed_product_matches_finite_differences():
    th.manual_seed(1)
    inputs = _randn(6, 3, seed=11)
    theta = _randn(4, 3, seed=12).requires_grad_(True)  # first layer: the "outer" parameters
    w = _randn(2, 4, seed=13).requires_grad_(True)  # second layer: the "inner" parameters

    def inner(theta_: th.Tensor, w_: th.Tensor) -> th.Tensor:
        return (th.tanh(inputs @ theta_.T) @ w_.T).pow(2).mean() + (w_**4).sum() * theta_.sum().sin()

    direction = _randn(w.numel(), seed=14)
    hvp = HessianVectorProduct(inner(theta, w), [w])
    mixed = hvp.mixed_product([theta], direction)

    def grad_theta(w_: th.Tensor) -> th.Tensor:
        theta_ = theta.detach().clone().requires_grad_(True)
        return th.autograd.grad(inner(theta_, w_), theta_)[0].reshape(-1)

    eps = 1e-6
    step = direction.view_as(w)
    fd = (grad_theta(w.detach() + eps * step) - grad_theta(w.detach() - eps * step)) / (2 * eps)
    assert mixed.shape == (theta.numel(),)
    assert _rel_err(mixed, fd) < 1e-7


# --- Nyström -------------------------------------------------------------------------------------------------------

#: The plain column-sampling Nyström of Hataya & Yamada (and the BLPO authors): one-hot sketch, no refinement.
COLUMNS = dict(sketch="columns", pcg_steps=0)


def test_nystrom_full_rank_tiny_rho_matches_dense():
    dim = 12
    hessian = _sym_from_eigs(th.linspace(0.5, 3.0, dim), seed=0)
    v = _randn(dim, seed=1)
    rho = 1e-8
    dense = DenseSolver(damping=rho).solve(_matrix_hvp(hessian), v)
    result = NystromSolver(rank=dim, rho=rho, seed=0, **COLUMNS).solve(_matrix_hvp(hessian), v)
    assert result.converged and dense.converged
    assert result.n_products == dim
    assert result.info["rank"] == dim
    assert _rel_err(result.x, dense.x) < 1e-5


def test_nystrom_error_falls_with_rank():
    dim, rho, seeds = 16, 1e-2, range(8)
    eigs = 2.0 ** -th.arange(dim, dtype=DTYPE)

    def mean_error(rank: int) -> float:
        errors = []
        for seed in seeds:
            hessian = _sym_from_eigs(eigs, seed=seed)
            v = _randn(dim, seed=100 + seed)
            exact = th.linalg.solve(hessian + rho * th.eye(dim, dtype=DTYPE), v)
            x = NystromSolver(rank=rank, rho=rho, seed=seed, **COLUMNS).solve(_matrix_hvp(hessian), v).x
            errors.append(_rel_err(x, exact))
        return sum(errors) / len(errors)

    err_2, err_half, err_full = mean_error(2), mean_error(dim // 2), mean_error(dim)
    assert err_half < err_2
    assert err_full < 1e-6


class _RecordingHVP:
    """A matrix-backed hvp that remembers every input, to observe the sampled coordinates."""

    def __init__(self, matrix: th.Tensor) -> None:
        self.matrix = matrix
        self.calls: list[th.Tensor] = []

    def __call__(self, vectors: th.Tensor) -> th.Tensor:
        self.calls.append(vectors.clone())
        return vectors @ self.matrix.T

    def indices(self, call: int) -> th.Tensor:
        return self.calls[call].argmax(dim=1)


def test_nystrom_samples_fresh_distinct_indices_in_one_batched_call():
    dim, rank = 20, 4
    hvp = _RecordingHVP(_sym_from_eigs(th.linspace(0.1, 2.0, dim), seed=3))
    v = _randn(dim, seed=4)
    solver = NystromSolver(rank=rank, rho=0.5, seed=7, **COLUMNS)
    first, second = solver.solve(hvp, v), solver.solve(hvp, v)
    assert len(hvp.calls) == 2  # one batched product per solve
    for call in range(2):
        basis = hvp.calls[call]
        assert basis.shape == (rank, dim)
        assert th.equal(basis.sum(dim=1), th.ones(rank, dtype=DTYPE))  # one-hot rows
        assert hvp.indices(call).unique().numel() == rank  # without replacement
    assert not th.equal(hvp.indices(0), hvp.indices(1))
    assert not th.allclose(first.x, second.x)

    # Same seed, same sequence; reseed restarts it.
    twin = _RecordingHVP(hvp.matrix)
    other = NystromSolver(rank=rank, rho=0.5, seed=7, **COLUMNS)
    assert th.equal(other.solve(twin, v).x, first.x)
    assert th.equal(other.solve(twin, v).x, second.x)
    other.reseed(7)
    assert th.equal(other.solve(twin, v).x, first.x)


def test_solvers_leave_global_rng_untouched():
    dim = 10
    hessian = _sym_from_eigs(th.linspace(0.5, 2.0, dim), seed=5)
    v = _randn(dim, seed=6)
    state = th.random.get_rng_state()
    for solver in (NystromSolver(rank=3), NystromSolver(rank=3, seed=1), ConjugateGradientSolver(), NeumannSolver()):
        solver.solve(_matrix_hvp(hessian), v)
    assert th.equal(th.random.get_rng_state(), state)


def test_nystrom_jitter_equals_shifted_core_nystrom():
    dim, rank, rho, jitter = 15, 5, 0.3, 1.0
    hessian = _sym_from_eigs(th.linspace(0.05, 2.0, dim), seed=8)  # PSD: the clamping of the core plays no part
    v = _randn(dim, seed=9)
    hvp = _RecordingHVP(hessian)
    result = NystromSolver(rank=rank, rho=rho, jitter=jitter, seed=2, **COLUMNS).solve(hvp, v)
    idx = hvp.indices(0)
    rows = hessian[idx, :]
    core = hessian[idx][:, idx] + jitter * th.eye(rank, dtype=DTYPE)
    approx = rows.T @ th.linalg.solve(core, rows)
    expected = th.linalg.solve(approx + rho * th.eye(dim, dtype=DTYPE), v)
    assert result.converged
    assert _rel_err(result.x, expected) < 1e-10

    # Without jitter the same indices give the plain Nyström inverse, which differs.
    plain = NystromSolver(rank=rank, rho=rho, seed=2, **COLUMNS).solve(_matrix_hvp(hessian), v)
    plain_expected = th.linalg.solve(rows.T @ th.linalg.solve(hessian[idx][:, idx], rows) + rho * th.eye(dim, dtype=DTYPE), v)
    assert _rel_err(plain.x, plain_expected) < 1e-8
    assert _rel_err(plain.x, result.x) > 1e-3


@pytest.mark.parametrize("hessian", [th.zeros(6, 6, dtype=DTYPE), th.diag(th.tensor([1.0, 0.0, 2.0, 0.0], dtype=DTYPE))])
def test_nystrom_singular_core_uses_the_pseudo_inverse(hessian: th.Tensor):
    """A singular core is no fault: its pseudo-inverse gives the Nyström matrix exactly (rank = P: H itself)."""
    dim = hessian.shape[0]
    v = _randn(dim, seed=10)
    result = NystromSolver(rank=dim, rho=2.0, seed=0, **COLUMNS).solve(_matrix_hvp(hessian), v)
    assert result.converged and result.info["singular_core"] == 0.0 and result.info["clamped_core"] == 0.0
    expected = th.linalg.solve(hessian + 2.0 * th.eye(dim, dtype=DTYPE), v)
    assert _rel_err(result.x, expected) < 1e-10


def test_nystrom_psd_core_on_indefinite_hessian_is_the_psd_part():
    """At rank = P the PSD core gives (H₊ + ρI)⁻¹ v, H₊ the positive part of an indefinite H, and says it clamped."""
    dim, rho = 7, 0.5
    hessian = _sym_from_eigs(th.linspace(-1.5, 2.0, dim), seed=3)
    eigenvalues, eigenvectors = th.linalg.eigh(hessian)
    assert eigenvalues.min() < 0 < eigenvalues.max()
    positive_part = eigenvectors @ th.diag(eigenvalues.clamp(min=0.0)) @ eigenvectors.T
    v = _randn(dim, seed=4)
    result = NystromSolver(rank=dim, rho=rho, seed=0, **COLUMNS).solve(_matrix_hvp(hessian), v)
    assert result.info["clamped_core"] == 1.0
    assert _rel_err(result.x, th.linalg.solve(positive_part + rho * th.eye(dim, dtype=DTYPE), v)) < 1e-9


def test_nystrom_relative_rho_scales_with_the_sampled_diagonal():
    hessian = 100.0 * _sym_from_eigs(th.linspace(0.2, 3.0, 6), seed=5)
    v = _randn(6, seed=6)
    result = NystromSolver(rank=6, rho=0.1, relative_rho=True, seed=0, **COLUMNS).solve(_matrix_hvp(hessian), v)
    expected_rho = 0.1 * float(hessian.diagonal().mean())
    assert result.info["rho"] == pytest.approx(expected_rho)
    assert _rel_err(result.x, th.linalg.solve(hessian + expected_rho * th.eye(6, dtype=DTYPE), v)) < 1e-9


def test_nystrom_jitter_rescues_singular_core():
    hessian = th.diag(th.tensor([1.0, 0.0, 2.0, 0.0], dtype=DTYPE))
    result = NystromSolver(rank=4, rho=2.0, jitter=1.0, seed=0, **COLUMNS).solve(_matrix_hvp(hessian), _randn(4, seed=10))
    assert result.converged and result.info["singular_core"] == 0.0


def test_nystrom_rank_capped_and_validate_dim():
    solver = NystromSolver(rank=8, rho=1.0, seed=0, **COLUMNS)
    hessian = _sym_from_eigs(th.linspace(1.0, 2.0, 5), seed=11)
    result = solver.solve(_matrix_hvp(hessian), _randn(5, seed=12))
    assert result.info["rank"] == 5 and result.n_products == 5
    assert solver.rank == 8
    solver.validate_dim(8)
    with pytest.raises(ValueError, match=r"rank \(8\) must not exceed the number of parameters \(5\)"):
        solver.validate_dim(5)


def test_gaussian_sketch_at_full_rank_is_exact_and_fresh_per_call():
    dim, rho = 10, 0.3
    hessian = _sym_from_eigs(th.linspace(0.05, 4.0, dim), seed=20)
    v = _randn(dim, seed=21)
    hvp = _RecordingHVP(hessian)
    solver = NystromSolver(rank=dim, rho=rho, sketch="gaussian", pcg_steps=0, seed=3)
    result = solver.solve(hvp, v)
    assert _rel_err(result.x, th.linalg.solve(hessian + rho * th.eye(dim, dtype=DTYPE), v)) < 1e-9
    basis = hvp.calls[0]
    th.testing.assert_close(basis @ basis.T, th.eye(dim, dtype=DTYPE))  # orthonormal test vectors
    solver.solve(hvp, v)
    assert not th.allclose(hvp.calls[0], hvp.calls[1])


@pytest.mark.parametrize("sketch", ["gaussian", "columns"])
def test_pcg_refinement_converges_to_the_damped_solve(sketch: str):
    """Preconditioned CG from zero: each step lowers the (H + ρI)-norm error, and enough steps reach the exact solve;
    it costs one product per step on top of the sketch."""
    dim, rank, rho = 14, 3, 0.05
    hessian = _sym_from_eigs(2.0 ** -th.arange(dim, dtype=DTYPE) * 10, seed=22)
    system = hessian + rho * th.eye(dim, dtype=DTYPE)
    v = _randn(dim, seed=23)
    exact = th.linalg.solve(system, v)

    def energy_error(steps: int) -> float:
        result = NystromSolver(rank=rank, rho=rho, sketch=sketch, pcg_steps=steps, seed=5).solve(_matrix_hvp(hessian), v)
        assert result.n_products == rank + steps and result.info["pcg_steps"] == steps
        error = result.x - exact
        return float(error @ system @ error)

    errors = [energy_error(steps) for steps in range(5)]
    assert all(later <= earlier * (1 + 1e-9) for earlier, later in itertools.pairwise(errors))
    assert errors[4] < 0.05 * errors[0]
    assert energy_error(dim) < 1e-12 * errors[0]


def test_pcg_stops_on_negative_curvature_with_the_nystrom_solution():
    dim, rho = 6, 0.1
    hessian = th.diag(th.tensor([-5.0, 1.0, 1.0, 2.0, 2.0, 3.0], dtype=DTYPE))
    v = th.zeros(dim, dtype=DTYPE)
    v[0] = 1.0
    plain = NystromSolver(rank=3, rho=rho, pcg_steps=0, seed=1).solve(_matrix_hvp(hessian), v)
    refined = NystromSolver(rank=3, rho=rho, pcg_steps=2, seed=1).solve(_matrix_hvp(hessian), v)
    assert refined.info["negative_curvature"] == 1.0
    th.testing.assert_close(refined.x, plain.x)


def test_nystrom_keeps_float32_dtype():
    hessian = _sym_from_eigs(th.linspace(0.5, 2.0, 8), seed=13).float()
    v = _randn(8, seed=14).float()
    result = NystromSolver(rank=3, rho=1.0, seed=0, **COLUMNS).solve(_matrix_hvp(hessian), v)
    assert result.x.dtype == th.float32


# --- conjugate gradient --------------------------------------------------------------------------------------------


def test_cg_matches_dense_on_spd():
    dim = 12
    hessian = _sym_from_eigs(th.linspace(0.2, 4.0, dim), seed=15)
    v = _randn(dim, seed=16)
    result = ConjugateGradientSolver(max_iter=50, damping=0.1, tol=1e-12).solve(_matrix_hvp(hessian), v)
    expected = DenseSolver(damping=0.1).solve(_matrix_hvp(hessian), v).x
    assert result.converged
    assert result.info["negative_curvature"] == 0.0 and result.info["tol_reached"] == 1.0
    assert result.info["iterations"] <= dim + 2
    assert result.n_products == result.info["iterations"]
    assert _rel_err(result.x, expected) < 1e-9


def test_cg_starts_from_zero():
    hessian = _sym_from_eigs(th.linspace(0.5, 3.0, 6), seed=17)
    v = _randn(6, seed=18)
    x = ConjugateGradientSolver(max_iter=1, damping=0.0).solve(_matrix_hvp(hessian), v).x
    # The first CG step from x0 = 0 is the exact line search along v.
    assert th.allclose(x, (v @ v) / (v @ hessian @ v) * v)
    zero = ConjugateGradientSolver().solve(_matrix_hvp(hessian), th.zeros(6, dtype=DTYPE))
    assert zero.converged and zero.n_products == 0 and th.equal(zero.x, th.zeros(6, dtype=DTYPE))


def test_cg_flags_indefinite_matrix():
    # Step 1 has positive curvature, step 2 meets negative curvature: the first iterate (2, 2) is returned.
    hessian = th.diag(th.tensor([2.0, -1.0], dtype=DTYPE))
    result = ConjugateGradientSolver(max_iter=10, damping=0.0).solve(_matrix_hvp(hessian), th.ones(2, dtype=DTYPE))
    assert not result.converged
    assert result.info["negative_curvature"] == 1.0
    assert result.info["iterations"] == 1.0
    assert th.allclose(result.x, th.tensor([2.0, 2.0], dtype=DTYPE))

    # Negative definite: the fault is on the first step and the iterate is still zero.
    negative = -_sym_from_eigs(th.linspace(0.5, 2.0, 5), seed=19)
    result = ConjugateGradientSolver(damping=0.1).solve(_matrix_hvp(negative), _randn(5, seed=20))
    assert not result.converged and result.info["negative_curvature"] == 1.0
    assert th.equal(result.x, th.zeros(5, dtype=DTYPE))

    # A generic indefinite matrix: whatever happens, the output is finite.
    indefinite = _sym_from_eigs(th.linspace(-2.0, 2.0, 9), seed=21)
    result = ConjugateGradientSolver(max_iter=30, damping=0.0).solve(_matrix_hvp(indefinite), _randn(9, seed=22))
    assert th.isfinite(result.x).all()


# --- Neumann -------------------------------------------------------------------------------------------------------


def test_neumann_converges_for_small_step_and_error_falls():
    dim, damping = 10, 0.1
    hessian = _sym_from_eigs(th.linspace(0.4, 2.0, dim), seed=23)
    v = _randn(dim, seed=24)
    expected = DenseSolver(damping=damping).solve(_matrix_hvp(hessian), v).x
    alpha = 1.0 / 2.1  # < 2 / λmax(H + λI) = 2 / 2.1
    errors = []
    for iters in (2, 10, 40, 200):
        result = NeumannSolver(iters=iters, alpha=alpha, damping=damping).solve(_matrix_hvp(hessian), v)
        assert result.converged and result.info["diverged"] == 0.0
        assert result.n_products == iters + 1
        residual = hessian @ result.x + damping * result.x - v
        assert math.isclose(result.info["residual_norm"], float(residual.norm()), rel_tol=1e-6, abs_tol=1e-12)
        errors.append(_rel_err(result.x, expected))
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 1e-8


def test_neumann_flags_divergence_for_large_step():
    dim = 10
    hessian = _sym_from_eigs(th.linspace(0.4, 2.0, dim), seed=25)
    v = _randn(dim, seed=26)
    result = NeumannSolver(iters=30, alpha=1.5).solve(_matrix_hvp(hessian), v)  # 1.5 > 2 / 2.0
    assert not result.converged and result.info["diverged"] == 1.0
    assert result.info["residual_norm"] > float(v.norm())

    # Overflow: the output is the last finite partial sum.
    huge = NeumannSolver(iters=2000, alpha=1.5).solve(_matrix_hvp(hessian), v)
    assert not huge.converged and th.isfinite(huge.x).all()


# --- dense ---------------------------------------------------------------------------------------------------------


def test_dense_solver_exact_and_singular_fallback():
    hessian = _sym_from_eigs(th.linspace(0.5, 2.0, 6), seed=27)
    v = _randn(6, seed=28)
    result = DenseSolver(damping=0.2).solve(_matrix_hvp(hessian), v)
    assert result.converged and result.n_products == 6
    assert th.allclose((hessian + 0.2 * th.eye(6, dtype=DTYPE)) @ result.x, v, atol=1e-12)

    singular = th.diag(th.tensor([1.0, 0.0, 3.0], dtype=DTYPE))
    result = DenseSolver().solve(_matrix_hvp(singular), th.tensor([1.0, 1.0, 1.0], dtype=DTYPE))
    assert not result.converged and result.info["singular"] == 1.0
    assert th.allclose(result.x, th.tensor([1.0, 0.0, 1.0 / 3.0], dtype=DTYPE))  # minimum-norm solution


# --- make_solver and validation ------------------------------------------------------------------------------------


def test_make_solver_names_and_passthrough():
    assert set(SOLVERS) == {"nystrom", "cg", "neumann", "dense"}
    for name, cls in SOLVERS.items():
        solver = make_solver(name)
        assert isinstance(solver, cls) and isinstance(solver, IHVPSolver) and solver.name == name
    nystrom = make_solver("Nystrom", rank=3, rho=50.0, jitter=1.0, seed=0)
    assert isinstance(nystrom, NystromSolver) and nystrom.rank == 3 and nystrom.rho == 50.0
    assert make_solver(None) is None
    assert make_solver(nystrom) is nystrom
    assert "rank=3" in repr(nystrom)


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        (("newton",), {}, ValueError, "accepted values: cg, dense, neumann, nystrom"),
        (("cg",), {"rank": 3}, ValueError, "'rank'.*accepted: max_iter, damping, tol"),
        ((NystromSolver(),), {"rank": 3}, ValueError, "existing solver instance"),
        ((3,), {}, TypeError, "solver must be a name"),
        (("nystrom",), {"rank": 0}, ValueError, "rank must be an integer >= 1, got 0"),
        (("nystrom",), {"rank": 2.5}, TypeError, "rank must be an integer"),
        (("nystrom",), {"rho": 0.0}, ValueError, "rho must be > 0"),
        (("nystrom",), {"jitter": -1.0}, ValueError, "jitter must be >= 0"),
        (("nystrom",), {"seed": -1}, ValueError, "seed must be None or an integer"),
        (("cg",), {"max_iter": 0}, ValueError, "max_iter must be an integer >= 1"),
        (("cg",), {"damping": float("nan")}, ValueError, "damping must be a finite number"),
        (("cg",), {"tol": -1.0}, ValueError, "tol must be"),
        (("neumann",), {"iters": -1}, ValueError, "iters must be an integer >= 0"),
        (("neumann",), {"alpha": 0.0}, ValueError, "alpha must be > 0"),
        (("dense",), {"damping": math.inf}, ValueError, "damping must be"),
    ],
)
def test_make_solver_rejects_bad_input(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        make_solver(*args, **kwargs)


def test_solver_rejects_bad_vector_and_operator():
    with pytest.raises(ValueError, match="v must be a flat"):
        DenseSolver().solve(lambda m: m, th.zeros(2, 2))
    with pytest.raises(ValueError, match="hvp must return the shape"):
        ConjugateGradientSolver().solve(lambda m: m[:-1], th.ones(3))


# --- implicit hypergradients ---------------------------------------------------------------------------------------


class _QuadraticBilevel:
    """g(θ, w) = ½ wᵀAw − wᵀ(Bθ + c), so w*(θ) = A⁻¹(Bθ + c);
    f(θ, w) = ½‖w − w_t‖² + ½ θᵀDθ + sum(sin θ)·sum(w³)/3 (genuinely coupled in θ and w)."""

    def __init__(self, n_theta: int = 3, n_w: int = 5) -> None:
        self.a = _sym_from_eigs(th.linspace(0.5, 3.0, n_w), seed=30)
        self.b = _randn(n_w, n_theta, seed=31)
        self.c = _randn(n_w, seed=32)
        self.d = _sym_from_eigs(th.linspace(0.2, 1.0, n_theta), seed=33)
        self.w_target = _randn(n_w, seed=34)
        self.theta0 = _randn(n_theta, seed=35)

    def inner(self, theta: th.Tensor, w: th.Tensor) -> th.Tensor:
        return 0.5 * w @ self.a @ w - w @ (self.b @ theta + self.c)

    def outer(self, theta: th.Tensor, w: th.Tensor) -> th.Tensor:
        return 0.5 * (w - self.w_target).pow(2).sum() + 0.5 * theta @ self.d @ theta + theta.sin().sum() * w.pow(3).sum() / 3

    def w_star(self, theta: th.Tensor) -> th.Tensor:
        return th.linalg.solve(self.a, self.b @ theta + self.c)


class _SoftplusBilevel:
    """Non-quadratic inner problem, strictly convex in w:
    g(θ, w) = ½ wᵀAw + s(θ)·Σ softplus(w) − wᵀ tanh(Bθ + c), with s(θ) = 1 + sigmoid(Σθ) > 0;
    f(θ, w) = ½‖w − w_t‖² + ½‖θ‖² + Σ cos(θ)·Σ w."""

    def __init__(self, n_theta: int = 4, n_w: int = 6) -> None:
        self.a = _sym_from_eigs(th.linspace(0.3, 2.0, n_w), seed=40)
        self.b = _randn(n_w, n_theta, seed=41)
        self.c = _randn(n_w, seed=42)
        self.w_target = _randn(n_w, seed=43)
        self.theta0 = 0.5 * _randn(n_theta, seed=44)

    def _scale(self, theta: th.Tensor) -> th.Tensor:
        return 1.0 + th.sigmoid(theta.sum())

    def inner(self, theta: th.Tensor, w: th.Tensor) -> th.Tensor:
        return (
            0.5 * w @ self.a @ w + self._scale(theta) * nn.functional.softplus(w).sum() - w @ th.tanh(self.b @ theta + self.c)
        )

    def outer(self, theta: th.Tensor, w: th.Tensor) -> th.Tensor:
        return 0.5 * (w - self.w_target).pow(2).sum() + 0.5 * theta.pow(2).sum() + theta.cos().sum() * w.sum()

    def w_star(self, theta: th.Tensor) -> th.Tensor:
        # Newton on the analytic gradient and Hessian; quadratic convergence reaches machine precision quickly.
        scale, shift = self._scale(theta), th.tanh(self.b @ theta + self.c)
        w = th.zeros_like(self.c)
        for _ in range(50):
            sig = th.sigmoid(w)
            grad = self.a @ w + scale * sig - shift
            hess = self.a + th.diag(scale * sig * (1 - sig))
            step = th.linalg.solve(hess, grad)
            w = w - step
            if float(step.norm()) < 1e-15:
                break
        return w


def _finite_difference_total(problem, eps: float = 1e-5) -> th.Tensor:
    def total_objective(theta: th.Tensor) -> float:
        return float(problem.outer(theta, problem.w_star(theta)))

    theta0 = problem.theta0
    grad = th.zeros_like(theta0)
    for i in range(theta0.numel()):
        e = th.zeros_like(theta0)
        e[i] = eps
        grad[i] = (total_objective(theta0 + e) - total_objective(theta0 - e)) / (2 * eps)
    return grad


def _hypergradient_at_optimum(problem, solver: IHVPSolver, damping: float = 0.0) -> Hypergradient:
    theta = problem.theta0.clone().requires_grad_(True)
    w = problem.w_star(problem.theta0).clone().requires_grad_(True)
    return implicit_hypergradient(problem.outer(theta, w), problem.inner(theta, w), [theta], [w], solver, damping=damping)


@pytest.mark.parametrize("problem_cls", [_QuadraticBilevel, _SoftplusBilevel])
def test_implicit_hypergradient_matches_finite_differences(problem_cls):
    problem = problem_cls()
    hyper = _hypergradient_at_optimum(problem, DenseSolver())
    expected = _finite_difference_total(problem)
    assert hyper.ihvp.converged
    assert _rel_err(hyper.total, expected) <= 1e-4
    # The check is sensitive to the correction: a wrong sign or a dropped term is far off.
    assert _rel_err(hyper.direct + hyper.correction, expected) > 1e-2
    assert _rel_err(hyper.direct, expected) > 1e-2
    assert th.allclose(hyper.total, hyper.direct - hyper.correction)
    # Phase markers (BLPO times them as train/seconds_*): each phase reported once, in order, with a timer attached.
    timer = PhaseTimer()
    theta = problem.theta0.clone().requires_grad_(True)
    w = problem.w_star(problem.theta0).clone().requires_grad_(True)
    implicit_hypergradient(problem.outer(theta, w), problem.inner(theta, w), [theta], [w], DenseSolver(), on_phase=timer.lap)
    assert list(timer.laps) == ["gradients", "ihvp", "mixed"]
    assert all(seconds >= 0.0 for seconds in timer.laps.values()) and sum(timer.laps.values()) <= timer.total()


@pytest.mark.parametrize(
    "solver",
    [
        NystromSolver(rank=5, rho=1e-9, seed=0),
        ConjugateGradientSolver(max_iter=50, damping=0.0, tol=1e-28),
        NeumannSolver(iters=400, alpha=0.6),
    ],
    ids=["nystrom", "cg", "neumann"],
)
def test_iterative_solvers_reach_the_exact_hypergradient(solver: IHVPSolver):
    problem = _QuadraticBilevel()  # inner Hessian A has eigenvalues in [0.5, 3]: α = 0.6 < 2/3
    exact = _hypergradient_at_optimum(problem, DenseSolver())
    hyper = _hypergradient_at_optimum(problem, solver)
    assert hyper.ihvp.converged
    assert _rel_err(hyper.total, exact.total) < 1e-6


def test_implicit_damping_goes_into_the_hessian():
    problem = _SoftplusBilevel()
    in_hvp = _hypergradient_at_optimum(problem, DenseSolver(), damping=0.5)
    in_solver = _hypergradient_at_optimum(problem, DenseSolver(damping=0.5))
    assert th.allclose(in_hvp.correction, in_solver.correction, atol=1e-12)
    assert th.allclose(in_hvp.outer_grad_inner, in_solver.outer_grad_inner)


def test_implicit_hypergradient_shared_graph_and_unused_params():
    # f and g share the critic's forward pass; θ does not enter f (direct = 0) and an extra θ tensor is unused.
    th.manual_seed(0)
    critic = nn.Linear(3, 1).to(DTYPE)
    theta = _randn(3, seed=50).requires_grad_(True)
    unused = _randn(2, seed=51).requires_grad_(True)
    states = _randn(8, 3, seed=52)
    values = critic(states).squeeze(-1)
    targets = states @ th.tanh(theta)
    inner = (values - targets).pow(2).mean()
    outer = values.mean()
    inner_params = list(critic.parameters())
    hyper = implicit_hypergradient(outer, inner, [theta, unused], inner_params, DenseSolver(damping=1e-6))
    assert th.equal(hyper.direct, th.zeros(5, dtype=DTYPE))
    assert th.equal(hyper.correction[3:], th.zeros(2, dtype=DTYPE))
    assert hyper.correction[:3].abs().sum() > 0
    assert hyper.outer_grad_inner.shape == (4,)


def test_implicit_hypergradient_rejects_overlapping_params():
    w = th.ones(2, dtype=DTYPE, requires_grad=True)
    loss = (w**2).sum()
    with pytest.raises(ValueError, match="disjoint"):
        implicit_hypergradient(loss, loss, [w], [w], DenseSolver())


# --- bound_correction ----------------------------------------------------------------------------------------------


def test_bound_correction():
    direct = th.tensor([3.0, 4.0], dtype=DTYPE)  # norm 5
    small = th.tensor([1.0, 0.0], dtype=DTYPE)
    big = th.tensor([0.0, 20.0], dtype=DTYPE)
    out, active = bound_correction(direct, small, 0.5)
    assert not active and th.equal(out, small)
    out, active = bound_correction(direct, big, 0.5)
    assert active and th.allclose(out, th.tensor([0.0, 2.5], dtype=DTYPE))
    out, active = bound_correction(direct, big, math.inf)
    assert not active and th.equal(out, big)
    out, active = bound_correction(th.zeros(2, dtype=DTYPE), big, 1.0)
    assert active and th.equal(out, th.zeros(2, dtype=DTYPE))
    with pytest.raises(ValueError, match="bound must be"):
        bound_correction(direct, big, -1.0)


def test_ihvp_result_fields():
    result = IHVPResult(x=th.zeros(2), n_products=3, converged=True)
    assert result.info == {} and result.n_products == 3


# --- Gauss–Newton curvature ------------------------------------------------------------------------------------------


def _regression_outputs(seed: int = 0):
    """A small tanh MLP's outputs ``(B,)`` on random inputs, its parameters and its dense Jacobian ``(B, P)``."""
    generator = _gen(seed)
    net = th.nn.Sequential(th.nn.Linear(3, 5), th.nn.Tanh(), th.nn.Linear(5, 1)).to(DTYPE)
    with th.no_grad():
        for param in net.parameters():
            param.copy_(th.randn(param.shape, generator=generator, dtype=DTYPE))
    inputs = th.randn(9, 3, generator=generator, dtype=DTYPE)
    params = list(net.parameters())
    outputs = net(inputs).flatten()
    rows = [flatten(th.autograd.grad(outputs[b], params, retain_graph=True)) for b in range(len(outputs))]
    return outputs, params, th.stack(rows)


def test_gauss_newton_product_equals_the_explicit_matrix_and_the_hessian_at_a_perfect_fit():
    outputs, params, jacobian = _regression_outputs()
    weights = th.rand(len(outputs), generator=_gen(1), dtype=DTYPE)
    operator = GaussNewtonProduct(outputs, params, weights=weights, damping=0.3)
    expected = jacobian.T @ th.diag(weights) @ jacobian + 0.3 * th.eye(jacobian.shape[1], dtype=DTYPE)
    vectors = _randn(4, jacobian.shape[1], seed=2)
    th.testing.assert_close(operator(vectors), vectors @ expected.T)
    th.testing.assert_close(operator(vectors[0]), expected @ vectors[0])
    assert operator.n_products == 5
    # Where the residuals vanish the Gauss–Newton matrix is the Hessian of the weighted MSE (targets = outputs).
    loss = (weights / 2 * (outputs.detach() - outputs) ** 2).sum()
    th.testing.assert_close(
        GaussNewtonProduct(outputs, params, weights=weights).dense(), HessianVectorProduct(loss, params).dense()
    )


def test_psd_nystrom_at_full_rank_equals_the_dense_damped_gauss_newton_solve():
    outputs, params, jacobian = _regression_outputs(seed=4)
    operator = GaussNewtonProduct(outputs, params)
    dim, rho = jacobian.shape[1], 0.7
    v = _randn(dim, seed=5)
    result = NystromSolver(rank=dim, rho=rho, seed=0).solve(operator, v)
    dense = DenseSolver(damping=rho).solve(operator, v)
    expected = th.linalg.solve(jacobian.T @ jacobian + rho * th.eye(dim, dtype=DTYPE), v)
    assert result.converged and result.info["clamped_core"] == 0.0
    assert _rel_err(result.x, expected) < 1e-8
    assert _rel_err(dense.x, expected) < 1e-8


def test_gauss_newton_rejects_bad_shapes():
    outputs, params, _ = _regression_outputs()
    with pytest.raises(ValueError, match="outputs"):
        GaussNewtonProduct(outputs.unsqueeze(1), params)
    with pytest.raises(ValueError, match="weights"):
        GaussNewtonProduct(outputs, params, weights=th.ones(3, dtype=DTYPE))
