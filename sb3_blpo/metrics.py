"""Feature and weight metrics used to track plasticity (pure torch, no SB3 import).

Every feature metric takes a batch of activations ``Φ`` of shape ``(B, d)``: ``B`` samples (rows) of a ``d``-unit
layer (columns). All ``B`` rows are used; nothing is subsampled here. Features are **not centred** unless
``center=True`` is passed (the plasticity literature, e.g. Dohare et al. 2024 and the spectral-collapse paper, uses
uncentred post-activations; uncentred features of a layer with a large mean activation have one dominant singular
direction, which lowers every rank metric).

Rank metrics of ``Φ`` with singular values ``σ_1 ≥ … ≥ σ_n`` (``n = min(B, d)``):

* :func:`effective_rank` (Roy & Vetterli 2007, on singular values): ``exp(−Σ p_i log p_i)`` with ``p_i = σ_i / Σσ``.
* :func:`srank` (Kumar et al. 2021): smallest ``k`` with ``Σ_{i≤k} σ_i ≥ (1 − δ) Σ σ``, default ``δ = 0.01``.
* :func:`approximate_rank` (Yang et al. 2019, as in Dohare et al.): smallest ``k`` with
  ``Σ_{i≤k} σ_i² ≥ 0.99 Σ σ²``.
* :func:`exact_rank`: number of ``σ_i`` above a numerical tolerance (numpy's ``matrix_rank`` default).

Ranks are bounded by ``min(B, d)``: use at least as many samples as units, or the metric measures the batch size.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch as th


def _as_feature_matrix(features: th.Tensor, center: bool) -> th.Tensor:
    if features.dim() != 2:
        raise ValueError(f"features must be a (batch, units) matrix, got shape {tuple(features.shape)}")
    if features.shape[0] < 1 or features.shape[1] < 1:
        raise ValueError(f"features must be non-empty, got shape {tuple(features.shape)}")
    matrix = features.detach() if not features.requires_grad else features
    if not matrix.is_floating_point():
        matrix = matrix.float()
    return matrix - matrix.mean(dim=0, keepdim=True) if center else matrix


def singular_values(features: th.Tensor, center: bool = False) -> th.Tensor:
    """Singular values of the ``(B, d)`` feature matrix, descending (``torch.linalg.svdvals``, differentiable).

    :param features: activations, one sample per row.
    :param center: subtract the per-unit mean over the batch first.
    """
    return th.linalg.svdvals(_as_feature_matrix(features, center))


def effective_rank_from_singular_values(values: th.Tensor, eps: float = 1e-12) -> th.Tensor:
    """Roy–Vetterli effective rank ``exp(H(p))``, ``p_i = σ_i / Σσ``, as a differentiable tensor.

    ``eps`` sits inside the normaliser and the log so that the gradient stays finite when singular values are zero
    (``0 · log 0`` contributes 0 and the derivative of ``p log(p + eps)`` at ``p = 0`` is finite), which makes this
    function usable as the core of a rank regulariser under autograd. For all-zero input it returns 1 (by the
    ``exp(0)`` convention); for ``k`` equal non-zero singular values it returns ``k``.

    :param values: non-negative singular values (any order), shape ``(n,)``; or ``(..., n)`` for a batch of spectra
        (one rank per leading index, e.g. several layers' spectra from one batched ``svdvals``, in one set of ops).
    :param eps: small positive constant.
    """
    if values.dim() < 1:
        raise ValueError(f"expected a vector (or a batch of vectors) of singular values, got shape {tuple(values.shape)}")
    total = values.sum(dim=-1, keepdim=True)
    probabilities = values / (total + eps)
    entropy = -(probabilities * th.log(probabilities + eps)).sum(dim=-1)
    return th.exp(entropy)


def effective_rank(features: th.Tensor, center: bool = False) -> float:
    """Roy–Vetterli effective rank of the feature matrix, computed on singular values (not their squares).

    :param features: ``(B, d)`` activations; all rows are used.
    :param center: subtract the per-unit batch mean first (default: uncentred).
    :return: a value in ``[1, min(B, d)]``.
    """
    return float(effective_rank_from_singular_values(singular_values(features, center).detach()))


def _smallest_prefix_reaching(values: th.Tensor, fraction: float) -> int:
    """Smallest ``k`` such that the ``k`` largest entries of the non-negative ``values`` hold ``fraction`` of the sum."""
    ordered = th.sort(values.detach().to(th.float64), descending=True).values
    total = float(ordered.sum())
    if total <= 0.0:
        return 0
    cumulative = th.cumsum(ordered, dim=0) / total
    # A relative slack of 1e-12 keeps exact ties (e.g. 99 equal values out of 100 and fraction 0.99) on the right side.
    index = int(th.searchsorted(cumulative, th.tensor([fraction - 1e-12], dtype=th.float64)).item())
    return min(index + 1, ordered.numel())


def srank(features: th.Tensor, delta: float = 0.01, center: bool = False) -> int:
    """Kumar et al.'s srank: smallest ``k`` with ``Σ_{i≤k} σ_i ≥ (1 − δ) Σ_i σ_i``; 0 for an all-zero matrix.

    Plasticine calls this quantity "stable rank" and Dohare et al.'s RL script stores it as ``stable_rank``; it is
    *not* the stable rank ``‖Φ‖_F² / ‖Φ‖_2²``.

    :param features: ``(B, d)`` activations; all rows are used.
    :param delta: tolerated fraction of the singular-value sum, in ``(0, 1)``.
    :param center: subtract the per-unit batch mean first (default: uncentred).
    """
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    return _smallest_prefix_reaching(singular_values(features, center), 1.0 - delta)


def approximate_rank(features: th.Tensor, threshold: float = 0.99, center: bool = False) -> int:
    """Smallest ``k`` whose top-``k`` squared singular values hold ``threshold`` of ``Σ σ²``; 0 for an all-zero matrix.

    :param features: ``(B, d)`` activations; all rows are used.
    :param threshold: fraction of the energy ``Σ σ²`` to retain, in ``(0, 1]``.
    :param center: subtract the per-unit batch mean first (default: uncentred).
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    return _smallest_prefix_reaching(singular_values(features, center) ** 2, threshold)


def exact_rank(features: th.Tensor, tol: float | None = None, center: bool = False) -> int:
    """Numerical rank: the number of singular values above ``tol``.

    :param features: ``(B, d)`` activations; all rows are used.
    :param tol: absolute tolerance; default ``σ_max · max(B, d) · machine epsilon`` of the dtype (numpy's rule).
    :param center: subtract the per-unit batch mean first (default: uncentred).
    """
    matrix = _as_feature_matrix(features, center)
    values = th.linalg.svdvals(matrix.detach())
    if tol is None:
        tol = float(values.max()) * max(matrix.shape) * th.finfo(values.dtype).eps if values.numel() else 0.0
    return int((values > tol).sum())


def unit_activity_scores(features: th.Tensor) -> th.Tensor:
    """ReDo's normalised unit activity ``s_i = E|φ_i| / ((1/d) Σ_k E|φ_k|)`` over the batch; zeros if all are zero.

    :param features: ``(B, d)`` activations (uncentred; centring would make every unit look active).
    """
    mean_abs = _as_feature_matrix(features, center=False).detach().abs().mean(dim=0)
    layer_mean = mean_abs.mean()
    if float(layer_mean) == 0.0:
        return th.zeros_like(mean_abs)
    return mean_abs / layer_mean


def dormant_unit_fraction(features: th.Tensor, tau: float = 0.1) -> float:
    """Fraction of τ-dormant units (Sokar et al. 2023, ReDo): units whose normalised activity ``s_i ≤ τ``.

    ``τ = 0`` counts only units that are exactly zero on every sample (dead ReLUs); ``τ = 0.1`` is the threshold of
    the ReDo baseline in Dohare et al.'s code. For saturating activations (tanh) a unit stuck at ±1 is *not* dormant
    by this definition, since its ``|φ|`` is large.

    :param features: ``(B, d)`` activations, uncentred; all rows are used.
    :param tau: dormancy threshold, ``≥ 0``.
    """
    if tau < 0:
        raise ValueError(f"tau must be non-negative, got {tau}")
    return float((unit_activity_scores(features) <= tau).to(th.float64).mean())


def feature_norm(features: th.Tensor) -> float:
    """Mean Euclidean norm of a sample's feature vector, ``(1/B) Σ_b ‖φ_b‖₂`` (uncentred; all rows used)."""
    return float(th.linalg.vector_norm(_as_feature_matrix(features, center=False).detach(), dim=1).mean())


def _flat_detached(params: Iterable[th.Tensor]) -> th.Tensor:
    tensors = [p.detach().reshape(-1) for p in params]
    if not tensors:
        raise ValueError("no parameters given")
    return th.cat(tensors)


def weight_norm(params: Iterable[th.Tensor]) -> float:
    """Euclidean norm of all parameters concatenated, ``‖θ‖₂`` (biases and log-std included if passed)."""
    return float(th.linalg.vector_norm(_flat_detached(params)))


def distance_to_initial(params: Iterable[th.Tensor], initial: Sequence[th.Tensor]) -> float:
    """Euclidean distance ``‖θ − θ₀‖₂`` between the parameters and a snapshot of them (same order and shapes)."""
    current, reference = _flat_detached(params), _flat_detached(initial)
    if current.shape != reference.shape:
        raise ValueError(f"parameter sizes differ: {current.numel()} vs {reference.numel()}")
    return float(th.linalg.vector_norm(current - reference.to(current)))


def feature_metrics(
    features: th.Tensor,
    center: bool = False,
    srank_delta: float = 0.01,
    approximate_rank_threshold: float = 0.99,
    dormant_tau: float = 0.1,
) -> dict[str, float]:
    """All feature metrics of one layer from a single SVD.

    :param features: ``(B, d)`` activations; all rows are used.
    :param center: centre the features for the rank metrics (dormancy and feature norm always use raw features).
    :param srank_delta: δ of :func:`srank`.
    :param approximate_rank_threshold: energy fraction of :func:`approximate_rank`.
    :param dormant_tau: τ of :func:`dormant_unit_fraction`.
    :return: ``{"erank", "srank", "approx_rank", "rank", "dormant", "feat_norm"}`` as floats.
    """
    if not 0.0 < srank_delta < 1.0:
        raise ValueError(f"srank_delta must be in (0, 1), got {srank_delta}")
    if not 0.0 < approximate_rank_threshold <= 1.0:
        raise ValueError(f"approximate_rank_threshold must be in (0, 1], got {approximate_rank_threshold}")
    matrix = _as_feature_matrix(features, center).detach()
    values = th.linalg.svdvals(matrix)
    tol = float(values.max()) * max(matrix.shape) * th.finfo(values.dtype).eps
    return {
        "erank": float(effective_rank_from_singular_values(values)),
        "srank": float(_smallest_prefix_reaching(values, 1.0 - srank_delta)),
        "approx_rank": float(_smallest_prefix_reaching(values**2, approximate_rank_threshold)),
        "rank": float((values > tol).sum()),
        "dormant": dormant_unit_fraction(features, dormant_tau),
        "feat_norm": feature_norm(features),
    }
