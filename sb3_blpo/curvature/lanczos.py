"""Krylov estimators for the spectrum of a symmetric operator given only by its matrix-vector product.

Pure torch. The operator is any callable ``matvec`` mapping a batch of vectors ``(m, P)`` to ``(m, P)``, for example a
:class:`sb3_blpo.hypergrad.HessianVectorProduct` (which accepts batches) or ``lambda v: v @ dense_matrix``.

* :func:`lanczos` runs several independent Lanczos processes in lockstep (one batched product per step) with full
  re-orthogonalisation and returns their tridiagonal matrices.
* :func:`stochastic_lanczos_quadrature` turns those into Gauss quadrature nodes (Ritz values) and weights, one set per
  probe: ``Σ_j w_j f(θ_j)`` estimates ``(1/P) tr f(H)``, the integral of ``f`` against the spectral density.
* :func:`hutchinson_trace` estimates ``tr H`` with Rademacher probes and a Student-t confidence interval.
* :func:`power_iteration` estimates the eigenvalue of largest magnitude.

Everything is deterministic given ``seed``: probes come from a private ``torch.Generator``, never the global RNG.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch as th

MatVec = Callable[[th.Tensor], th.Tensor]

# Lanczos vectors and the tridiagonal entries are kept in float64 whatever the operator's dtype: re-orthogonalising in
# float32 loses orthogonality after a few dozen steps on ill-conditioned Hessians and produces ghost Ritz values.
_BASIS_DTYPE = th.float64


def random_probes(
    dim: int,
    num_probes: int,
    seed: int = 0,
    distribution: str = "rademacher",
    device: th.device | str = "cpu",
    dtype: th.dtype = th.float64,
) -> th.Tensor:
    """Random probe vectors, one per row.

    :param dim: length ``P`` of each vector.
    :param num_probes: number of rows ``m``.
    :param seed: seed of a private generator (the global torch RNG is left alone).
    :param distribution: ``"rademacher"`` (entries ±1, so ``‖v‖² = P`` exactly) or ``"gaussian"`` (standard normal).
    :param device: device of the result.
    :param dtype: dtype of the result.
    :return: tensor of shape ``(num_probes, dim)``.
    """
    if dim < 1 or num_probes < 1:
        raise ValueError(f"need dim >= 1 and num_probes >= 1, got dim={dim}, num_probes={num_probes}")
    generator = th.Generator(device="cpu").manual_seed(int(seed))
    if distribution == "rademacher":
        probes = th.randint(0, 2, (num_probes, dim), generator=generator).to(dtype) * 2 - 1
    elif distribution == "gaussian":
        probes = th.randn(num_probes, dim, generator=generator, dtype=dtype)
    else:
        raise ValueError(f"distribution must be 'rademacher' or 'gaussian', got {distribution!r}")
    return probes.to(device=device, dtype=dtype)


def _apply(matvec: MatVec, vectors: th.Tensor, operator_dtype: th.dtype) -> th.Tensor:
    """Apply ``matvec`` to float64 rows, casting to the operator's dtype and back."""
    products = matvec(vectors.to(operator_dtype))
    if products.shape != vectors.shape:
        raise ValueError(f"matvec returned shape {tuple(products.shape)} for input shape {tuple(vectors.shape)}")
    return products.to(_BASIS_DTYPE)


@dataclass(frozen=True)
class LanczosResult:
    """Tridiagonal matrices of independent Lanczos runs (one per start vector).

    :param alphas: diagonal of each tridiagonal matrix; ``alphas[i]`` has length ``steps[i]``.
    :param betas: off-diagonal of each tridiagonal matrix; ``betas[i]`` has length ``steps[i] - 1``.
    :param steps: number of Lanczos steps actually taken per run (smaller than requested after an exact breakdown,
        i.e. when the Krylov space became invariant).
    :param num_products: number of matrix-vector products spent, over all runs.
    """

    alphas: list[th.Tensor]
    betas: list[th.Tensor]
    steps: list[int]
    num_products: int

    def tridiagonal(self, index: int = 0) -> th.Tensor:
        """The dense ``k x k`` tridiagonal matrix ``T`` of run ``index`` (float64)."""
        alpha, beta = self.alphas[index], self.betas[index]
        return th.diag(alpha) + th.diag(beta, 1) + th.diag(beta, -1)

    def ritz_values(self, index: int = 0) -> th.Tensor:
        """Eigenvalues of ``T`` for run ``index``, ascending: the Ritz values, estimates of extremal eigenvalues."""
        return th.linalg.eigvalsh(self.tridiagonal(index))


def lanczos(
    matvec: MatVec,
    start_vectors: th.Tensor,
    num_steps: int,
    operator_dtype: th.dtype | None = None,
    breakdown_tol: float = 1e-10,
) -> LanczosResult:
    """Lanczos tridiagonalisation with full re-orthogonalisation, for one or several start vectors at once.

    Each step applies ``matvec`` once to the batch of current Lanczos vectors, then orthogonalises the result against
    every previous vector of the same run (classical Gram-Schmidt applied twice, which keeps the basis orthonormal to
    working precision), so no spurious copies of converged Ritz values appear.

    :param matvec: symmetric operator on batches ``(m, P) -> (m, P)``.
    :param start_vectors: ``(P,)`` or ``(m, P)``; rows are normalised internally (they need not be unit vectors).
    :param num_steps: Krylov dimension ``k`` (at least 2); capped at ``P``.
    :param operator_dtype: dtype passed to ``matvec`` (default: the dtype of ``start_vectors``).
    :param breakdown_tol: a run stops when ``β_i ≤ breakdown_tol · max(|α|, β)`` seen so far: its Krylov space is
        invariant and its Ritz values are exact eigenvalues of the operator.
    :return: the tridiagonal entries of every run.
    """
    if num_steps < 2:
        raise ValueError(f"num_steps must be at least 2, got {num_steps}")
    starts = start_vectors if start_vectors.dim() == 2 else start_vectors.unsqueeze(0)
    num_runs, dim = starts.shape
    steps_target = min(int(num_steps), dim)
    op_dtype = operator_dtype if operator_dtype is not None else starts.dtype
    norms = th.linalg.vector_norm(starts.to(_BASIS_DTYPE), dim=1, keepdim=True)
    if bool((norms == 0).any()):
        raise ValueError("a start vector is zero")

    basis = starts.new_zeros((num_runs, steps_target, dim), dtype=_BASIS_DTYPE)
    basis[:, 0] = starts.to(_BASIS_DTYPE) / norms
    alphas = starts.new_zeros((num_runs, steps_target), dtype=_BASIS_DTYPE)
    betas = starts.new_zeros((num_runs, max(steps_target - 1, 0)), dtype=_BASIS_DTYPE)
    active = th.ones(num_runs, dtype=th.bool, device=starts.device)
    steps = [steps_target] * num_runs
    scale = th.zeros(num_runs, dtype=_BASIS_DTYPE, device=starts.device)
    num_products = 0

    for i in range(steps_target):
        current = basis[:, i]
        rows = th.nonzero(active).flatten()
        w = th.zeros_like(current)
        w[rows] = _apply(matvec, current[rows], op_dtype)
        num_products += len(rows)
        alpha = (w * current).sum(dim=1)
        alphas[:, i] = th.where(active, alpha, th.zeros_like(alpha))
        scale = th.maximum(scale, alpha.abs())
        if i + 1 == steps_target:
            break
        previous = basis[:, : i + 1]
        for _ in range(2):
            w = w - th.einsum("rk,rkp->rp", th.einsum("rkp,rp->rk", previous, w), previous)
        beta = th.linalg.vector_norm(w, dim=1)
        scale = th.maximum(scale, beta)
        broke_down = active & (beta <= breakdown_tol * th.clamp(scale, min=th.finfo(_BASIS_DTYPE).tiny))
        for run in th.nonzero(broke_down).flatten().tolist():
            steps[run] = i + 1
        active = active & ~broke_down
        if not bool(active.any()):
            break
        betas[:, i] = th.where(active, beta, th.zeros_like(beta))
        safe_beta = th.where(active, beta, th.ones_like(beta)).unsqueeze(1)
        basis[:, i + 1] = th.where(active.unsqueeze(1), w / safe_beta, th.zeros_like(w))

    return LanczosResult(
        alphas=[alphas[r, : steps[r]].clone() for r in range(num_runs)],
        betas=[betas[r, : steps[r] - 1].clone() for r in range(num_runs)],
        steps=steps,
        num_products=num_products,
    )


@dataclass(frozen=True)
class SpectralQuadrature:
    """Gauss quadrature of the spectral density from stochastic Lanczos quadrature, one node set per probe.

    For probe ``v`` with Lanczos matrix ``T = U diag(θ) Uᵀ``, the nodes are the Ritz values ``θ_j`` and the weights
    ``w_j = U[0, j]²`` (they sum to 1). ``Σ_j w_j f(θ_j)`` approximates ``vᵀ f(H) v / vᵀv``, whose expectation over
    the probe distribution is ``(1/P) Σ_i f(λ_i)``; averaging over probes reduces the variance.

    :param nodes: Ritz values per probe, ascending (float64).
    :param weights: quadrature weights per probe, matching ``nodes`` (float64, each set sums to 1).
    :param dim: dimension ``P`` of the operator.
    :param num_products: matrix-vector products spent.
    """

    nodes: list[th.Tensor]
    weights: list[th.Tensor]
    dim: int
    num_products: int

    @property
    def num_probes(self) -> int:
        """Number of probes (independent Lanczos runs)."""
        return len(self.nodes)

    def all_nodes(self) -> th.Tensor:
        """The Ritz values of every probe, concatenated."""
        return th.cat(self.nodes)

    def expectation(self, function: Callable[[th.Tensor], th.Tensor]) -> th.Tensor:
        """Per-probe quadrature ``Σ_j w_j f(θ_j)`` of an elementwise function ``f``; shape ``(num_probes,)``."""
        return th.stack([(w * function(theta)).sum() for theta, w in zip(self.nodes, self.weights, strict=True)])


def quadrature_from_lanczos(result: LanczosResult, dim: int) -> SpectralQuadrature:
    """Nodes and weights (Ritz values and squared first eigenvector components) of every run in ``result``."""
    nodes, weights = [], []
    for index in range(len(result.steps)):
        theta, eigenvectors = th.linalg.eigh(result.tridiagonal(index))
        nodes.append(theta)
        weights.append(eigenvectors[0] ** 2)
    return SpectralQuadrature(nodes=nodes, weights=weights, dim=dim, num_products=result.num_products)


def stochastic_lanczos_quadrature(
    matvec: MatVec,
    dim: int,
    num_steps: int,
    num_probes: int = 3,
    seed: int = 0,
    operator_dtype: th.dtype = th.float32,
    device: th.device | str = "cpu",
    distribution: str = "rademacher",
) -> SpectralQuadrature:
    """Stochastic Lanczos quadrature (SLQ): ``num_probes`` Lanczos runs from seeded random start vectors.

    With Rademacher probes (the default), ``P · Σ_j w_j θ_j`` equals ``vᵀHv`` exactly, so the quadrature also yields
    Hutchinson's trace estimator at no extra cost (see :func:`sb3_blpo.curvature.spectrum.summarize_spectrum`).

    :param matvec: symmetric operator on batches ``(m, P) -> (m, P)``.
    :param dim: dimension ``P``.
    :param num_steps: Lanczos steps per probe (at least 2; capped at ``P``).
    :param num_probes: number of independent start vectors.
    :param seed: seed of the probe generator.
    :param operator_dtype: dtype the operator expects.
    :param device: device the operator expects.
    :param distribution: ``"rademacher"`` or ``"gaussian"`` start vectors.
    :return: nodes and weights per probe.
    """
    probes = random_probes(dim, num_probes, seed=seed, distribution=distribution, device=device, dtype=_BASIS_DTYPE)
    result = lanczos(matvec, probes, num_steps, operator_dtype=operator_dtype)
    return quadrature_from_lanczos(result, dim)


@functools.lru_cache(maxsize=64)
def student_t_quantile(probability: float, dof: int) -> float:
    """Quantile of Student's t distribution (two-sided intervals use ``probability = (1 + confidence) / 2``).

    Computed by bisection on the CDF, which is integrated numerically; accurate to about 1e-6, enough for confidence
    intervals, and avoids a scipy dependency. Cached: a monitor asks for the same few quantiles at every measurement.

    :param probability: in ``(0.5, 1)``.
    :param dof: degrees of freedom, at least 1.
    """
    if not 0.5 < probability < 1.0 or dof < 1:
        raise ValueError(f"need 0.5 < probability < 1 and dof >= 1, got {probability}, {dof}")
    log_norm = math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2) - 0.5 * math.log(dof * math.pi)

    def upper_tail_above(x: float) -> float:
        # P(T > x) = 0.5 - ∫_0^x pdf; the pdf is smooth, so Simpson's rule on a fine grid is plenty.
        grid = np.linspace(0.0, x, 4001)
        pdf = np.exp(log_norm - (dof + 1) / 2 * np.log1p(grid**2 / dof))
        step = grid[1] - grid[0]
        integral = step / 3 * (pdf[0] + pdf[-1] + 4 * pdf[1:-1:2].sum() + 2 * pdf[2:-1:2].sum())
        return 0.5 - integral

    target = 1.0 - probability
    low, high = 0.0, 1.0
    while upper_tail_above(high) > target:
        high *= 2.0
    for _ in range(60):
        middle = 0.5 * (low + high)
        if upper_tail_above(middle) > target:
            low = middle
        else:
            high = middle
    return 0.5 * (low + high)


@dataclass(frozen=True)
class TraceEstimate:
    """A Monte Carlo trace estimate with a confidence interval.

    :param estimate: sample mean of the per-probe estimates.
    :param ci_low: lower end of the two-sided confidence interval.
    :param ci_high: upper end of the interval.
    :param std_error: standard error of the mean (sample std / √n; ``nan`` with one probe).
    :param num_probes: number of probes ``n``.
    :param confidence: confidence level of the interval.
    """

    estimate: float
    ci_low: float
    ci_high: float
    std_error: float
    num_probes: int
    confidence: float


def trace_estimate_from_samples(samples: th.Tensor, confidence: float = 0.95) -> TraceEstimate:
    """Mean and Student-t confidence interval of independent unbiased per-probe trace estimates.

    :param samples: per-probe estimates ``vᵀHv``.
    :param confidence: two-sided confidence level in ``(0, 1)``.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    values = samples.detach().to(_BASIS_DTYPE).flatten()
    count = values.numel()
    mean = float(values.mean())
    if count < 2:
        return TraceEstimate(mean, -math.inf, math.inf, math.nan, count, confidence)
    std_error = float(values.std(unbiased=True)) / math.sqrt(count)
    half_width = student_t_quantile((1.0 + confidence) / 2.0, count - 1) * std_error
    return TraceEstimate(mean, mean - half_width, mean + half_width, std_error, count, confidence)


def hutchinson_trace(
    matvec: MatVec,
    dim: int,
    num_probes: int = 30,
    seed: int = 0,
    confidence: float = 0.95,
    batch_size: int = 10,
    operator_dtype: th.dtype = th.float32,
    device: th.device | str = "cpu",
) -> TraceEstimate:
    """Hutchinson's estimator ``tr H ≈ mean_i v_iᵀ H v_i`` with Rademacher probes and a Student-t interval.

    :param matvec: operator on batches ``(m, P) -> (m, P)``.
    :param dim: dimension ``P``.
    :param num_probes: number of probes (at least 2 for a finite interval).
    :param seed: seed of the probe generator.
    :param confidence: two-sided confidence level.
    :param batch_size: probes per call to ``matvec``.
    :param operator_dtype: dtype the operator expects.
    :param device: device the operator expects.
    """
    probes = random_probes(dim, num_probes, seed=seed, device=device, dtype=_BASIS_DTYPE)
    samples = []
    for start in range(0, num_probes, batch_size):
        chunk = probes[start : start + batch_size]
        samples.append((_apply(matvec, chunk, operator_dtype) * chunk).sum(dim=1))
    return trace_estimate_from_samples(th.cat(samples), confidence)


@dataclass(frozen=True)
class PowerIterationResult:
    """Result of :func:`power_iteration`.

    :param eigenvalue: Rayleigh quotient of the final vector: the eigenvalue of largest magnitude (with its sign).
    :param eigenvector: the final unit vector (float64).
    :param num_iterations: matrix-vector products spent.
    :param converged: whether the relative change of the eigenvalue fell below ``tol``.
    """

    eigenvalue: float
    eigenvector: th.Tensor
    num_iterations: int
    converged: bool


def power_iteration(
    matvec: MatVec,
    dim: int,
    max_iterations: int = 100,
    tol: float = 1e-4,
    seed: int = 0,
    operator_dtype: th.dtype = th.float32,
    device: th.device | str = "cpu",
) -> PowerIterationResult:
    """Power iteration for the dominant eigenvalue (largest ``|λ|``, returned with its sign).

    For an indefinite Hessian this is ``λmax`` only when ``λmax ≥ |λmin|``; Lanczos gives both ends for a similar
    cost and converges faster, so prefer it. Power iteration is kept as a cheap, simple cross-check.

    :param matvec: operator on batches ``(m, P) -> (m, P)``.
    :param dim: dimension ``P``.
    :param max_iterations: maximum number of products.
    :param tol: stop when ``|λ_t − λ_{t−1}| ≤ tol · |λ_t|``.
    :param seed: seed of the start vector.
    :param operator_dtype: dtype the operator expects.
    :param device: device the operator expects.
    """
    vector = random_probes(dim, 1, seed=seed, distribution="gaussian", device=device, dtype=_BASIS_DTYPE)
    vector = vector / th.linalg.vector_norm(vector)
    eigenvalue, converged, iteration = 0.0, False, 0
    for iteration in range(1, max_iterations + 1):
        product = _apply(matvec, vector, operator_dtype)
        new_eigenvalue = float((product * vector).sum())
        norm = th.linalg.vector_norm(product)
        if float(norm) == 0.0:
            eigenvalue, converged = 0.0, True
            break
        vector = product / norm
        if iteration > 1 and abs(new_eigenvalue - eigenvalue) <= tol * abs(new_eigenvalue):
            eigenvalue, converged = new_eigenvalue, True
            break
        eigenvalue = new_eigenvalue
    return PowerIterationResult(eigenvalue, vector[0], iteration, converged)
