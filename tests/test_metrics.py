"""Feature and weight metrics against numpy SVD formulas on crafted matrices."""

from __future__ import annotations

import numpy as np
import pytest
import torch as th

from sb3_blpo.metrics import (
    approximate_rank,
    distance_to_initial,
    dormant_unit_fraction,
    effective_rank,
    effective_rank_from_singular_values,
    exact_rank,
    feature_metrics,
    feature_norm,
    singular_values,
    srank,
    unit_activity_scores,
    weight_norm,
)


def _numpy_erank(matrix: np.ndarray) -> float:
    sigma = np.linalg.svd(matrix, compute_uv=False)
    p = sigma / sigma.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def _numpy_prefix_rank(values: np.ndarray, fraction: float) -> int:
    ordered = np.sort(values)[::-1]
    cumulative = np.cumsum(ordered) / ordered.sum()
    return int(np.argmax(cumulative >= fraction - 1e-12)) + 1


def _crafted_matrices() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    low_rank = rng.normal(size=(200, 4)) @ rng.normal(size=(4, 32))
    dead = np.maximum(rng.normal(size=(300, 20)), 0.0)
    dead[:, [2, 5, 11]] = 0.0
    spread = rng.normal(size=(100, 16)) * np.logspace(0, -3, 16)
    return {"rank_deficient": low_rank, "dead_columns": dead, "decaying_spectrum": spread, "wide": rng.normal(size=(8, 40))}


@pytest.mark.parametrize("name", sorted(_crafted_matrices()))
def test_rank_metrics_match_numpy_svd_formulas(name):
    matrix = _crafted_matrices()[name]
    features = th.as_tensor(matrix, dtype=th.float64)
    sigma = np.linalg.svd(matrix, compute_uv=False)
    assert effective_rank(features) == pytest.approx(_numpy_erank(matrix), rel=1e-9)
    assert srank(features, delta=0.01) == _numpy_prefix_rank(sigma, 0.99)
    assert approximate_rank(features, threshold=0.99) == _numpy_prefix_rank(sigma**2, 0.99)
    assert exact_rank(features) == np.linalg.matrix_rank(matrix)
    bundled = feature_metrics(features)
    assert bundled["erank"] == pytest.approx(_numpy_erank(matrix), rel=1e-6)
    assert bundled["srank"] == srank(features) and bundled["approx_rank"] == approximate_rank(features)
    assert bundled["rank"] == exact_rank(features)


def test_known_values_on_structured_matrices():
    low_rank = th.as_tensor(_crafted_matrices()["rank_deficient"])
    assert exact_rank(low_rank) == 4
    assert 1.0 < effective_rank(low_rank) <= 4.0
    # k equal singular values: every rank metric equals k.
    identity_block = th.zeros(10, 6, dtype=th.float64)
    identity_block[:3, :3] = th.eye(3, dtype=th.float64) * 2.5
    assert effective_rank(identity_block) == pytest.approx(3.0)
    assert srank(identity_block) == approximate_rank(identity_block) == exact_rank(identity_block) == 3
    # One dominant direction: srank and approximate rank stop at 1, the effective rank stays just above 1.
    dominant = th.diag(th.tensor([1.0, 1e-4, 1e-4], dtype=th.float64))
    assert srank(dominant) == approximate_rank(dominant) == 1
    assert 1.0 < effective_rank(dominant) < 1.01
    # An all-zero matrix has rank 0 and effective rank 1 (exp of zero entropy).
    zeros = th.zeros(5, 4)
    assert exact_rank(zeros) == srank(zeros) == approximate_rank(zeros) == 0
    assert effective_rank(zeros) == pytest.approx(1.0)


def test_centering_removes_the_mean_direction():
    rng = np.random.default_rng(1)
    matrix = rng.normal(size=(500, 3)) @ rng.normal(size=(3, 10)) + 5.0  # rank 3 plus a constant offset
    features = th.as_tensor(matrix)
    assert exact_rank(features) == 4
    assert exact_rank(features, center=True) == 3
    centred = matrix - matrix.mean(axis=0)
    assert effective_rank(features, center=True) == pytest.approx(_numpy_erank(centred), rel=1e-9)
    assert effective_rank(features) < effective_rank(features, center=True)  # the offset dominates uncentred features


def test_dormant_units_follow_redo_normalised_activity():
    features = th.as_tensor(_crafted_matrices()["dead_columns"])
    assert dormant_unit_fraction(features, tau=0.0) == pytest.approx(3 / 20)
    # A weak-but-alive unit: dormant at τ = 0.1, not at τ = 0.
    weak = features.clone()
    weak[:, 0] *= 0.01
    scores = unit_activity_scores(weak)
    mean_abs = weak.abs().mean(dim=0)
    th.testing.assert_close(scores, mean_abs / mean_abs.mean())
    assert dormant_unit_fraction(weak, tau=0.0) == pytest.approx(3 / 20)
    assert dormant_unit_fraction(weak, tau=0.1) == pytest.approx(4 / 20)
    assert dormant_unit_fraction(th.zeros(4, 5), tau=0.1) == 1.0
    with pytest.raises(ValueError):
        dormant_unit_fraction(features, tau=-0.1)


def test_norms_and_distances():
    features = th.tensor([[3.0, 4.0], [0.0, 0.0], [6.0, 8.0]])
    assert feature_norm(features) == pytest.approx((5.0 + 0.0 + 10.0) / 3)
    params = [th.tensor([3.0, 4.0]), th.tensor([[12.0]])]
    assert weight_norm(params) == pytest.approx(13.0)
    initial = [th.tensor([0.0, 4.0]), th.tensor([[8.0]])]
    assert distance_to_initial(params, initial) == pytest.approx(5.0)
    with pytest.raises(ValueError, match="sizes"):
        distance_to_initial(params, [th.zeros(2)])


def test_effective_rank_core_is_differentiable_with_zero_singular_values():
    values = th.tensor([3.0, 1.0, 0.0, 0.0], dtype=th.float64, requires_grad=True)
    erank = effective_rank_from_singular_values(values)
    (gradient,) = th.autograd.grad(erank, values)
    assert th.isfinite(gradient).all()
    assert th.autograd.gradcheck(
        effective_rank_from_singular_values, (th.tensor([2.0, 1.0, 0.5], dtype=th.float64, requires_grad=True),)
    )
    # Through the SVD of a feature matrix: ascent on the erank spreads the spectrum.
    features = th.tensor([[1.0, 0.1], [1.0, -0.1], [1.0, 0.05]], dtype=th.float64, requires_grad=True)
    erank_features = effective_rank_from_singular_values(singular_values(features))
    (feature_gradient,) = th.autograd.grad(erank_features, features)
    stepped = features.detach() + 0.1 * feature_gradient
    assert effective_rank(stepped) > float(erank_features.detach())


def test_invalid_inputs_raise():
    with pytest.raises(ValueError, match="matrix"):
        effective_rank(th.ones(5))
    with pytest.raises(ValueError, match="delta"):
        srank(th.ones(3, 3), delta=1.5)
    with pytest.raises(ValueError, match="threshold"):
        approximate_rank(th.ones(3, 3), threshold=0.0)
    with pytest.raises(ValueError, match="non-empty"):
        effective_rank(th.ones(0, 3))
