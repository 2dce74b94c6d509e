"""Spectrum of any scalar loss's Hessian from Hessian-vector products (pure torch/numpy, no SB3 import).

Pair it with :class:`sb3_blpo.hypergrad.HessianVectorProduct` as the operator::

    hvp = HessianVectorProduct(loss, params)
    quadrature = stochastic_lanczos_quadrature(hvp, hvp.dim, num_steps=30, num_probes=3, seed=0)
    summary = summarize_spectrum(quadrature, epsilons=(1e-3, 1e-2, 1e-1))
"""

from sb3_blpo.curvature.lanczos import (
    LanczosResult,
    PowerIterationResult,
    SpectralQuadrature,
    TraceEstimate,
    hutchinson_trace,
    lanczos,
    power_iteration,
    quadrature_from_lanczos,
    random_probes,
    stochastic_lanczos_quadrature,
    student_t_quantile,
    trace_estimate_from_samples,
)
from sb3_blpo.curvature.spectrum import (
    SpectrumSummary,
    broadened_density,
    check_epsilons,
    epsilon_rank,
    epsilon_rank_bounds,
    negative_mass,
    spectral_mass_beyond,
    summarize_spectrum,
)

__all__ = [
    "LanczosResult",
    "PowerIterationResult",
    "SpectralQuadrature",
    "SpectrumSummary",
    "TraceEstimate",
    "broadened_density",
    "check_epsilons",
    "epsilon_rank",
    "epsilon_rank_bounds",
    "hutchinson_trace",
    "lanczos",
    "negative_mass",
    "power_iteration",
    "quadrature_from_lanczos",
    "random_probes",
    "spectral_mass_beyond",
    "stochastic_lanczos_quadrature",
    "student_t_quantile",
    "summarize_spectrum",
    "trace_estimate_from_samples",
]
