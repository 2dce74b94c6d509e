"""Spectral summaries computed from stochastic Lanczos quadrature (pure torch/numpy).

The ε-rank is computed directly from the quadrature nodes and weights, ``Σ_j w_j · 1[|θ_j| > ε]`` averaged over
probes, not by integrating a smoothed density on a grid: a grid makes every ε smaller than its spacing unresolvable
(see ``docs/monitoring.md``). The Gaussian-broadened density below exists only for plots.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch as th

from sb3_blpo._validation import InvalidParameterError
from sb3_blpo.curvature.lanczos import SpectralQuadrature, TraceEstimate, trace_estimate_from_samples


def check_epsilons(epsilons: Sequence[float]) -> tuple[float, ...]:
    """Validate ε thresholds: a non-empty sequence of positive finite floats. Returns them as a tuple.

    :raises ValueError: on an empty sequence or any ``ε ≤ 0`` (or non-finite ε).
    """
    values = tuple(float(eps) for eps in epsilons)
    if not values:
        raise InvalidParameterError("at least one epsilon is required")
    bad = [eps for eps in values if not (math.isfinite(eps) and eps > 0)]
    if bad:
        raise InvalidParameterError(f"epsilons must be positive and finite, got {bad}")
    return values


def spectral_mass_beyond(quadrature: SpectralQuadrature, epsilons: Sequence[float]) -> th.Tensor:
    """Per-probe spectral mass outside ``(−ε, ε)``: ``Σ_j w_j · 1[|θ_j| > ε]``.

    :param quadrature: SLQ nodes and weights.
    :param epsilons: thresholds ``ε > 0``.
    :return: float64 tensor of shape ``(num_probes, len(epsilons))``.
    """
    eps = th.tensor(check_epsilons(epsilons), dtype=th.float64)
    rows = [
        (w.unsqueeze(1) * (theta.abs().unsqueeze(1) > eps.to(theta.device))).sum(dim=0)
        for theta, w in zip(quadrature.nodes, quadrature.weights, strict=True)
    ]
    return th.stack(rows)


def epsilon_rank(quadrature: SpectralQuadrature, epsilons: Sequence[float]) -> th.Tensor:
    """Normalised ε-rank: the estimated fraction of eigenvalues with ``|λ| > ε``, for each ε.

    It is the probe average of :func:`spectral_mass_beyond`, an estimate of ``#{i: |λ_i| > ε} / P``, in ``[0, 1]``.

    :param quadrature: SLQ nodes and weights.
    :param epsilons: thresholds ``ε > 0``.
    :return: float64 tensor of shape ``(len(epsilons),)``.
    """
    return spectral_mass_beyond(quadrature, epsilons).mean(dim=0)


def _cumulative_weight_bounds(theta: th.Tensor, cumulative: th.Tensor, x: float, strict: bool) -> tuple[th.Tensor, th.Tensor]:
    """Bounds on ``μ((−∞, x])`` (or ``μ((−∞, x))`` if ``strict``) from the Chebyshev–Markov–Stieltjes inequalities.

    For a Gauss rule with ascending nodes ``θ_1 < … < θ_k`` and cumulative weights ``c_i = Σ_{j≤i} w_j``,
    ``c_{i−1} ≤ μ((−∞, θ_i)) ≤ μ((−∞, θ_i]) ≤ c_i``; monotonicity of ``μ`` extends this to any ``x``.
    """
    point = th.tensor([x], dtype=theta.dtype, device=theta.device)
    zero = cumulative.new_zeros(())
    # Lower: the last node at or below x (strictly below for the open half-line) bounds the mass below it by c_{l−1}.
    last = int(th.searchsorted(theta, point, right=not strict)) - 1
    lower = cumulative[last - 1] if last >= 1 else zero
    # Upper: the first node at or above x bounds the mass up to it by c_m.
    first = int(th.searchsorted(theta, point, right=False))
    upper = cumulative[first] if first < theta.numel() else cumulative.new_ones(())
    return lower, upper


def epsilon_rank_bounds(quadrature: SpectralQuadrature, epsilons: Sequence[float]) -> tuple[th.Tensor, th.Tensor]:
    """Guaranteed bounds on each probe's ε-rank, averaged over probes.

    A probe's quadrature estimates the mass of its spectral measure ``μ_v = Σ_i (u_iᵀv)²/‖v‖² δ_{λ_i}`` beyond ``ε``.
    The Chebyshev–Markov–Stieltjes inequalities bracket ``μ_v`` exactly by the quadrature's cumulative weights, so
    ``μ_v(|λ| > ε)`` lies in ``[lower, upper]`` for every probe (no statistics involved). The bracket is narrow where
    Ritz values are dense around ``±ε`` and wide when ``ε`` is below the quadrature's resolution near zero (about the
    spacing of the Ritz values there): then the ε-rank is *not resolved* by ``num_steps`` Lanczos steps.
    The probe average of ``μ_v`` is an unbiased estimate of the fraction of eigenvalues beyond ε.

    :param quadrature: SLQ nodes and weights.
    :param epsilons: thresholds ``ε > 0``.
    :return: ``(lower, upper)``, float64 tensors of shape ``(len(epsilons),)``.
    """
    eps = check_epsilons(epsilons)
    lowers, uppers = [], []
    for theta, w in zip(quadrature.nodes, quadrature.weights, strict=True):
        cumulative = th.cumsum(w, dim=0)
        probe_lower, probe_upper = [], []
        for value in eps:
            below_high, above_high = _cumulative_weight_bounds(theta, cumulative, value, strict=False)
            below_low, above_low = _cumulative_weight_bounds(theta, cumulative, -value, strict=True)
            # Mass in [−ε, ε] = μ((−∞, ε]) − μ((−∞, −ε)); the ε-rank is one minus it.
            inside_min = th.clamp(below_high - above_low, min=0.0)
            inside_max = th.clamp(above_high - below_low, max=1.0)
            probe_lower.append(1.0 - inside_max)
            probe_upper.append(1.0 - inside_min)
        lowers.append(th.stack(probe_lower))
        uppers.append(th.stack(probe_upper))
    return th.stack(lowers).mean(dim=0).clamp(0.0, 1.0), th.stack(uppers).mean(dim=0).clamp(0.0, 1.0)


def negative_mass(quadrature: SpectralQuadrature, threshold: float = 0.0) -> float:
    """Estimated fraction of eigenvalues below ``−threshold`` (probe average of ``Σ_j w_j · 1[θ_j < −threshold]``).

    With ``threshold = 0`` the near-zero bulk of a network Hessian (Ritz values of order ±1e-7) splits at random
    between the two signs; a threshold equal to the smallest ε of interest counts only resolved negative curvature.

    :param quadrature: SLQ nodes and weights.
    :param threshold: non-negative threshold.
    """
    if threshold < 0:
        raise InvalidParameterError(f"threshold must be non-negative, got {threshold}")
    return float(quadrature.expectation(lambda theta: (theta < -threshold).to(theta.dtype)).mean())


@dataclass(frozen=True)
class SpectrumSummary:
    """Scalar description of a Hessian spectrum estimated by SLQ.

    :param lambda_max: largest Ritz value over all probes (a lower bound of ``λmax`` that converges from below).
    :param lambda_min: smallest Ritz value over all probes (an upper bound of ``λmin``).
    :param negative_mass: estimated fraction of eigenvalues below ``−negative_threshold``.
    :param negative_threshold: the threshold used for ``negative_mass``.
    :param epsilons: the ε thresholds.
    :param epsilon_ranks: estimated fraction of eigenvalues with ``|λ| > ε``, one per ε.
    :param epsilon_rank_std_errors: standard error of each ε-rank over probes (``nan`` with one probe).
    :param epsilon_rank_bounds: ``(lower, upper)`` per ε: guaranteed bounds on the probes' ε-rank from the
        Chebyshev–Markov–Stieltjes inequalities (see :func:`epsilon_rank_bounds`); a wide bracket means ε is below
        the resolution of the quadrature.
    :param trace: Hutchinson trace estimate ``P · Σ_j w_j θ_j`` (exact Hutchinson for Rademacher probes) with a CI.
    :param dim: dimension ``P`` of the operator.
    :param num_probes: number of probes.
    :param num_products: matrix-vector products spent.
    """

    lambda_max: float
    lambda_min: float
    negative_mass: float
    negative_threshold: float
    epsilons: tuple[float, ...]
    epsilon_ranks: tuple[float, ...]
    epsilon_rank_std_errors: tuple[float, ...]
    epsilon_rank_bounds: tuple[tuple[float, float], ...]
    trace: TraceEstimate
    dim: int
    num_probes: int
    num_products: int


def summarize_spectrum(
    quadrature: SpectralQuadrature,
    epsilons: Sequence[float],
    negative_threshold: float | None = None,
    confidence: float = 0.95,
) -> SpectrumSummary:
    """Extremal Ritz values, negative mass, ε-ranks and trace from one SLQ run.

    :param quadrature: SLQ nodes and weights.
    :param epsilons: ε thresholds for the ε-rank.
    :param negative_threshold: threshold of the negative mass (default: the smallest ε).
    :param confidence: confidence level of the trace interval.
    """
    eps = check_epsilons(epsilons)
    threshold = min(eps) if negative_threshold is None else float(negative_threshold)
    nodes = quadrature.all_nodes()
    per_probe = spectral_mass_beyond(quadrature, eps)
    lower, upper = epsilon_rank_bounds(quadrature, eps)
    if quadrature.num_probes > 1:
        std_errors = (per_probe.std(dim=0, unbiased=True) / math.sqrt(quadrature.num_probes)).tolist()
    else:
        std_errors = [math.nan] * len(eps)
    # For a probe v, Σ_j w_j θ_j = vᵀHv / vᵀv, so P times it is Hutchinson's sample (exact for Rademacher v).
    trace_samples = quadrature.dim * quadrature.expectation(lambda theta: theta)
    return SpectrumSummary(
        lambda_max=float(nodes.max()),
        lambda_min=float(nodes.min()),
        negative_mass=negative_mass(quadrature, threshold),
        negative_threshold=threshold,
        epsilons=eps,
        epsilon_ranks=tuple(per_probe.mean(dim=0).tolist()),
        epsilon_rank_std_errors=tuple(std_errors),
        epsilon_rank_bounds=tuple(zip(lower.tolist(), upper.tolist(), strict=True)),
        trace=trace_estimate_from_samples(trace_samples, confidence),
        dim=quadrature.dim,
        num_probes=quadrature.num_probes,
        num_products=quadrature.num_products,
    )


def broadened_density(
    quadrature: SpectralQuadrature,
    num_points: int = 1000,
    sigma: float | None = None,
    relative_sigma: float = 0.01,
    margin: float = 0.05,
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian-broadened spectral density on a grid, for plotting only (never used for the ε-rank).

    ``ρ(x) = mean_probes Σ_j w_j N(x; θ_j, σ²)``, on a grid spanning the Ritz values plus a margin.

    :param quadrature: SLQ nodes and weights.
    :param num_points: grid size.
    :param sigma: kernel standard deviation; default ``relative_sigma · (θmax − θmin)`` (at least 1e-12).
    :param relative_sigma: kernel width relative to the spectral range when ``sigma`` is not given.
    :param margin: grid extension beyond the extreme Ritz values, relative to the range.
    :return: ``(grid, density)``; the density integrates to about 1.
    """
    nodes = quadrature.all_nodes()
    low, high = float(nodes.min()), float(nodes.max())
    spread = max(high - low, 1e-12 * max(1.0, abs(high)), 1e-12)
    width = float(sigma) if sigma is not None else max(relative_sigma * spread, 1e-12)
    grid = np.linspace(low - margin * spread - 3 * width, high + margin * spread + 3 * width, num_points)
    density = np.zeros_like(grid)
    for theta, w in zip(quadrature.nodes, quadrature.weights, strict=True):
        t, weight = theta.cpu().numpy()[:, None], w.cpu().numpy()[:, None]
        density += (weight * np.exp(-0.5 * ((grid[None, :] - t) / width) ** 2)).sum(axis=0)
    density /= quadrature.num_probes * width * math.sqrt(2 * math.pi)
    return grid, density
