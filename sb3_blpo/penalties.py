"""Plasticity penalty terms as plain torch functions (no SB3 import): usable on any ``nn.Module``.

* :class:`ParameterPenalty`: L2 toward zero, ``(l2_coef / 2)·‖θ‖²``, and L2-Init toward anchors θ₀,
  ``(l2_init_coef / 2)·‖θ − θ₀‖²``; its value (for a loss or a log) and its closed-form gradient
  ``l2_coef·θ + l2_init_coef·(θ − θ₀)`` (to add to ``.grad`` without a graph) live side by side.
* :func:`effective_rank_objective`: the paper's RL rank objective ``R = Σ_group mean_{l ∈ group} erank(Φ_l)`` over
  groups of feature matrices (actor layers and critic layers in RL; one group for a single network). The penalty is
  ``−erank_coef · R`` (a loss to minimise raises the rank). :func:`effective_rank_gradients` gives the same ``R`` with
  its gradient with respect to each feature matrix in closed form, without an autograd graph (for delivery by
  gradient hooks).
* :func:`gradient_ascent_step`: the paper's separate rank-ascent step ``θ ← θ + lr · ∇θ R`` (no optimizer).

Used by :class:`~sb3_blpo.callbacks.PlasticityRegularizer` for PPO, A2C and BLPO, and by the supervised continual
benchmark on a plain MLP.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence

import torch as th

from sb3_blpo.metrics import effective_rank_from_singular_values


class ParameterPenalty:
    """L2 and L2-Init penalties on a list of parameters.

    :param l2_coef: weight λ of ``(λ/2)·‖θ‖²``.
    :param l2_init_coef: weight λ₀ of ``(λ₀/2)·‖θ − θ₀‖²`` (needs anchors).
    """

    def __init__(self, l2_coef: float = 0.0, l2_init_coef: float = 0.0) -> None:
        if l2_coef < 0 or l2_init_coef < 0:
            raise ValueError(f"l2_coef and l2_init_coef must be >= 0, got {l2_coef} and {l2_init_coef}")
        self.l2_coef = float(l2_coef)
        self.l2_init_coef = float(l2_init_coef)

    @property
    def active(self) -> bool:
        """Whether any coefficient is non-zero."""
        return self.l2_coef > 0 or self.l2_init_coef > 0

    def _check(self, params: Sequence[th.Tensor], anchors: Sequence[th.Tensor] | None) -> None:
        if self.l2_init_coef > 0 and (anchors is None or len(anchors) != len(params)):
            raise ValueError("l2_init_coef > 0 needs one anchor tensor per parameter")

    def terms(self, params: Sequence[th.Tensor], anchors: Sequence[th.Tensor] | None = None) -> dict[str, th.Tensor]:
        """The non-zero terms by name (``"l2"``, ``"l2_init"``), differentiable in ``params``.

        :param params: the parameters θ.
        :param anchors: θ₀, one tensor per parameter (needed when ``l2_init_coef > 0``).
        """
        self._check(params, anchors)
        terms = {}
        if self.l2_coef > 0:
            terms["l2"] = 0.5 * self.l2_coef * th.stack([p.square().sum() for p in params]).sum()
        if self.l2_init_coef > 0:
            assert anchors is not None
            differences = [(p - a).square().sum() for p, a in zip(params, anchors, strict=True)]
            terms["l2_init"] = 0.5 * self.l2_init_coef * th.stack(differences).sum()
        return terms

    def value(self, params: Sequence[th.Tensor], anchors: Sequence[th.Tensor] | None = None) -> th.Tensor | None:
        """The sum of the terms (``None`` when no coefficient is set), differentiable in ``params``."""
        terms = list(self.terms(params, anchors).values())
        return th.stack(terms).sum() if terms else None

    def gradient(self, params: Sequence[th.Tensor], anchors: Sequence[th.Tensor] | None = None) -> list[th.Tensor]:
        """``∇θ`` of :meth:`value` in closed form, ``λθ + λ₀(θ − θ₀)``, without a graph (fused ``_foreach`` ops)."""
        self._check(params, anchors)
        with th.no_grad():
            gradients = th._foreach_mul([p.detach() for p in params], self.l2_coef + self.l2_init_coef)
            if self.l2_init_coef > 0:
                assert anchors is not None
                th._foreach_add_(gradients, list(anchors), alpha=-self.l2_init_coef)
        return list(gradients)


def effective_rank_objective(
    features: Mapping[str, Mapping[str, th.Tensor]], center: bool = False
) -> tuple[th.Tensor, dict[str, float]]:
    """``R = Σ_group mean_{l ∈ group} erank(Φ_l)`` and each layer's effective rank.

    ``erank(Φ) = exp(−Σ p_i log(p_i + ε))``, ``p_i = σ_i / (Σσ + ε)`` from ``torch.linalg.svdvals`` of the ``(B, d)``
    features (:func:`~sb3_blpo.metrics.effective_rank_from_singular_values`); uncentred unless ``center``.
    Layers of equal shape share one batched SVD: on CPU the per-call overhead of small ops is a large part of the cost.

    :param features: ``{group: {layer name: (B, d) features}}``, e.g. ``{"actor": {...}, "critic": {...}}``; layer
        names are unique across groups; empty groups are skipped.
    :param center: subtract the per-unit batch mean first.
    :return: ``R`` (differentiable) and ``{layer name: erank}`` (floats).
    """
    ranks: dict[str, th.Tensor] = {}
    for names, stacked in _stacked_by_shape(features, center):
        ranks.update(zip(names, effective_rank_from_singular_values(th.linalg.svdvals(stacked)), strict=True))
    objective = next(iter(ranks.values())).new_zeros(()) if ranks else th.zeros(())
    for group in features.values():
        if group:
            objective = objective + th.stack([ranks[name] for name in group]).mean()
    return objective, {name: float(rank.detach()) for name, rank in ranks.items()}


def _stacked_by_shape(features: Mapping[str, Mapping[str, th.Tensor]], center: bool) -> list[tuple[list[str], th.Tensor]]:
    """The layers grouped by shape, with their stacked ``(k, B, d)`` (centred) features."""
    flat = {name: layer for group in features.values() for name, layer in group.items()}
    by_shape: dict[tuple[int, ...], list[str]] = defaultdict(list)
    for name, layer in flat.items():
        by_shape[tuple(layer.shape)].append(name)
    stacks = []
    for names in by_shape.values():
        stacked = th.stack([flat[name] for name in names])
        if center:
            stacked = stacked - stacked.mean(dim=1, keepdim=True)
        stacks.append((names, stacked))
    return stacks


def effective_rank_gradients(
    features: Mapping[str, Mapping[str, th.Tensor]], center: bool = False, eps: float = 1e-12
) -> tuple[float, dict[str, float], dict[str, th.Tensor]]:
    """:func:`effective_rank_objective` with the gradient ``∂R/∂Φ_l`` of every layer in closed form (no graph).

    For singular values ``σ`` of ``Φ = U diag(σ) Vᵀ`` (thin SVD), the gradient of a function of the singular values is
    ``U diag(∂R/∂σ) Vᵀ``; that is exactly what autograd computes for ``svdvals`` (its backward runs the same LAPACK SVD
    with vectors and forms the same product). ``∂erank/∂σ`` is written out: with ``S = Σσ + ε``, ``p = σ/S``,
    ``h_i = −log(p_i + ε) − p_i/(p_i + ε)``, ``∂erank/∂σ_i = erank · (h_i − Σ_j h_j p_j) / S``. Centring multiplies the
    gradient by the centring projection (the per-unit batch mean of the gradient is subtracted). Layers of equal shape
    share one batched SVD, run under ``no_grad``: the inputs may carry a graph, the outputs never do.

    Where features are rank-deficient the singular vectors of the null space are not unique; the gradient is then the
    one valid choice that LAPACK returns, as for autograd through ``svdvals``.

    :param features: ``{group: {layer name: (B, d) features}}`` as for :func:`effective_rank_objective`.
    :param center: subtract the per-unit batch mean first.
    :param eps: the ``ε`` of :func:`~sb3_blpo.metrics.effective_rank_from_singular_values`.
    :return: ``R`` (a float), ``{layer name: erank}`` (floats) and ``{layer name: ∂R/∂Φ_l}`` (``(B, d)`` tensors).
    """
    with th.no_grad():
        weights = {name: 1.0 / len(group) for group in features.values() for name in group}
        ranks: dict[str, float] = {}
        gradients: dict[str, th.Tensor] = {}
        for names, stacked in _stacked_by_shape(features, center):
            u, values, vh = th.linalg.svd(stacked, full_matrices=False)
            scale = values.sum(dim=-1, keepdim=True) + eps
            p = values / scale
            log_p = th.log(p + eps)
            erank = th.exp(-(p * log_p).sum(dim=-1, keepdim=True))
            h = -log_p - p / (p + eps)
            d_values = erank * (h - (h * p).sum(dim=-1, keepdim=True)) / scale
            d_values = d_values * d_values.new_tensor([weights[name] for name in names]).unsqueeze(-1)
            # The product in the order autograd's SVD backward forms it (scale the thinner factor).
            tall = u.shape[-2] >= vh.shape[-1]
            gradient = u @ (d_values.unsqueeze(-1) * vh) if tall else (u * d_values.unsqueeze(-2)) @ vh
            if center:
                gradient = gradient - gradient.mean(dim=1, keepdim=True)
            ranks.update(zip(names, erank.squeeze(-1).tolist(), strict=True))
            gradients.update(zip(names, gradient.unbind(0), strict=True))
    objective = sum((sum(ranks[name] for name in group) / len(group) for group in features.values() if group), 0.0)
    return float(objective), ranks, gradients


def gradient_ascent_step(objective: Callable[[], th.Tensor], params: Sequence[th.Tensor], step_size: float) -> float:
    """One raw ascent step ``θ ← θ + step_size · ∇θ objective`` in place (no optimizer, no clipping).

    :param objective: builds the scalar to increase (called once, with autograd on).
    :param params: the parameters to move; those the objective does not reach are left unchanged.
    :param step_size: the step size.
    :return: the norm of the gradient over the parameters it reached.
    """
    with th.enable_grad():
        gradients = th.autograd.grad(objective(), list(params), allow_unused=True)
    used = [(p, g) for p, g in zip(params, gradients, strict=True) if g is not None]
    if not used:
        return 0.0
    with th.no_grad():
        for param, gradient in used:
            param.add_(gradient, alpha=step_size)
    return float(th.linalg.vector_norm(th.stack([g.norm() for _, g in used])))
