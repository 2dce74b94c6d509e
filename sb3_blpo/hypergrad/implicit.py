"""Hypergradient of a bilevel problem by the implicit function theorem.

Pure torch: nothing here imports Stable-Baselines3.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch as th

from sb3_blpo.hypergrad.hvp import CurvatureOperator, HessianVectorProduct, Params, flatten
from sb3_blpo.hypergrad.solvers import IHVPResult, IHVPSolver


@dataclass
class Hypergradient:
    """The parts of an implicit hypergradient, all flat and detached.

    :param direct: ``∇θ f``, the partial gradient w.r.t. the outer (leader) parameters.
    :param outer_grad_inner: ``v = ∇w f``, the outer loss's gradient w.r.t. the inner (follower) parameters.
    :param correction: ``u = ∂²g/∂θ∂w · x`` with ``x ≈ (∇²ww g)⁻¹ v``, before any norm bound.
    :param ihvp: the IHVP solve that produced ``x``.
    """

    direct: th.Tensor
    outer_grad_inner: th.Tensor
    correction: th.Tensor
    ihvp: IHVPResult

    @property
    def total(self) -> th.Tensor:
        """The total derivative ``dF/dθ = direct − correction`` (unbounded)."""
        return self.direct - self.correction


def implicit_hypergradient(
    outer_loss: th.Tensor,
    inner_loss: th.Tensor,
    outer_params: Params,
    inner_params: Params,
    solver: IHVPSolver,
    damping: float = 0.0,
    curvature: CurvatureOperator | None = None,
    on_phase: Callable[[str], None] | None = None,
    mixed: Callable[[Params, th.Tensor], th.Tensor] | None = None,
) -> Hypergradient:
    """Hypergradient of ``min_θ F(θ) = f(θ, w*(θ))`` with ``w*(θ) = argmin_w g(θ, w)``.

    Differentiating the optimality condition ``∇w g(θ, w*(θ)) = 0`` gives ``dw*/dθ = −(∇²ww g)⁻¹ ∇²wθ g``, hence

        dF/dθ = ∇θ f − ∇²θw g · (∇²ww g)⁻¹ ∇w f

    evaluated at the current ``(θ, w)``, which should be (close to) a minimiser of ``g`` in ``w``. Cost: one
    first-order backward of ``f``, one ``create_graph`` backward of ``g`` (reused by every product), the solver's
    products, and one mixed product.

    :param outer_loss: scalar ``f(θ, w)``.
    :param inner_loss: scalar ``g(θ, w)``; its graph must reach both parameter sets for a non-zero correction.
    :param outer_params: ``θ``, the leader's parameters.
    :param inner_params: ``w``, the follower's parameters (disjoint from ``θ``).
    :param solver: the IHVP solver for ``x ≈ (∇²ww g + damping·I)⁻¹ ∇w f``.
    :param damping: ``λ >= 0`` added to ``∇²ww g`` inside the Hessian-vector product, on top of any ridge or
        damping the solver itself adds (only when ``curvature`` is ``None``; an operator carries its own damping).
    :param curvature: the matrix the solver inverts in place of ``∇²ww g``, e.g. its positive semi-definite
        Gauss–Newton part (:class:`~sb3_blpo.hypergrad.hvp.GaussNewtonProduct`) or the Hessian of another follower
        loss; ``None``: the Hessian of ``inner_loss``. The mixed term always differentiates ``inner_loss``.
    :param on_phase: called with ``"gradients"`` (``∇θ f`` and ``∇w f``), ``"ihvp"`` (the solve, including the
        ``create_graph`` backward of ``g``) and ``"mixed"`` (the mixed product) as each phase ends, e.g. to time them
        (:class:`sb3_blpo.common.update_stats.PhaseTimer`); on CUDA, synchronise in the callback for device times.
    :param mixed: ``(θ, x) ↦ ∂²inner_loss/∂θ∂w · x`` computed another way, e.g.
        :class:`~sb3_blpo.hypergrad.jacobian.OutputMixedProduct` (the same numbers without a ``create_graph`` backward
        of ``g``); with ``curvature`` also given, ``inner_loss`` is not differentiated here at all.
    :return: the direct term, ``∇w f``, the correction and the IHVP result; ``.total`` is the hypergradient.
    """
    outer_params, inner_params = list(outer_params), list(inner_params)
    if outer_loss.dim() != 0:
        raise ValueError(f"outer_loss must be a scalar, got shape {tuple(outer_loss.shape)}")
    if not callable(getattr(solver, "solve", None)):
        raise TypeError(f"solver must be an IHVPSolver (see make_solver), got {type(solver).__name__}")
    damping = float(damping)
    if not math.isfinite(damping) or damping < 0.0:
        raise ValueError(f"damping must be a finite float >= 0, got {damping}")
    inner_ids = {id(p) for p in inner_params}
    if any(id(p) in inner_ids for p in outer_params):
        raise ValueError("outer_params and inner_params must be disjoint; a tensor appears in both")

    mark = on_phase or (lambda _phase: None)
    # retain_graph: f and g usually share part of the forward graph (e.g. the critic's values), and the
    # create_graph backward of g below still needs it.
    grads = th.autograd.grad(outer_loss, outer_params + inner_params, retain_graph=True, allow_unused=True)
    n_outer = len(outer_params)
    direct = flatten(grads[:n_outer], like=outer_params).detach()
    v = flatten(grads[n_outer:], like=inner_params).detach()

    mark("gradients")
    # The Hessian of g (and its create_graph backward) only where it is used: as curvature, or for the mixed term.
    hvp = HessianVectorProduct(inner_loss, inner_params, damping=damping) if mixed is None or curvature is None else None
    operator = curvature if curvature is not None else hvp
    assert operator is not None
    ihvp = solver.solve(operator, v)
    mark("ihvp")
    if mixed is None:
        assert hvp is not None
        mixed = hvp.mixed_product
    correction = mixed(outer_params, ihvp.x).detach()
    mark("mixed")
    return Hypergradient(direct=direct, outer_grad_inner=v, correction=correction, ihvp=ihvp)


def bound_correction(direct: th.Tensor, correction: th.Tensor, bound: float) -> tuple[th.Tensor, bool]:
    """Scale the correction so that ``‖u‖ <= bound·‖direct‖`` (BLPO's ``IHVP_BOUND`` stabiliser).

    The direction of ``u`` is kept; only its norm is capped (global L2 norms).

    :param direct: ``∇θ f``, flat.
    :param correction: ``u``, flat.
    :param bound: ``β >= 0``; ``math.inf`` disables the bound, ``0`` removes the correction.
    :return: the (possibly scaled) correction and whether scaling was applied.
    """
    bound = float(bound)
    if math.isnan(bound) or bound < 0.0:
        raise ValueError(f"bound must be a float >= 0 (inf for no bound), got {bound}")
    if math.isinf(bound):
        return correction, False
    limit = bound * float(direct.norm())
    norm = float(correction.norm())
    if norm <= limit:
        return correction, False
    return correction * (limit / norm), True
