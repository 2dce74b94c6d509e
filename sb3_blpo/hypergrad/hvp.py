"""Flat-parameter helpers, Hessian-vector products and mixed second-derivative products.

Pure torch: nothing here imports Stable-Baselines3. All products reuse one first-order graph built with
``create_graph=True`` (the double-backward pattern of sb3-contrib's TRPO), so ``k`` products cost ``k`` backward
passes through that graph and no extra forward pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TypeVar

import torch as th

Params = Sequence[th.Tensor]
TensorT = TypeVar("TensorT", bound=th.Tensor)


def unique_parameters(params: Iterable[TensorT]) -> list[TensorT]:
    """``params`` without repeats (by identity), in first-seen order: modules that share a submodule list it twice."""
    seen: set[int] = set()
    unique = []
    for param in params:
        if id(param) not in seen:
            seen.add(id(param))
            unique.append(param)
    return unique


def parameter_count(params: Params) -> int:
    """Total number of scalars in ``params``."""
    return sum(p.numel() for p in params)


def flatten(tensors: Sequence[th.Tensor | None], like: Params | None = None) -> th.Tensor:
    """Concatenate tensors into one flat vector.

    :param tensors: the tensors; ``None`` entries (unused parameters) become zeros shaped like ``like``.
    :param like: the parameters the tensors belong to; required when ``tensors`` may hold ``None``.
    """
    parts = []
    for i, tensor in enumerate(tensors):
        if tensor is None:
            if like is None:
                raise ValueError("flatten() got a None entry; pass `like=params` so it can be replaced by zeros")
            tensor = th.zeros_like(like[i])
        parts.append(tensor.reshape(-1))
    return th.cat(parts)


def unflatten_like(flat: th.Tensor, params: Params) -> list[th.Tensor]:
    """Split a flat vector into tensors shaped like ``params`` (the inverse of :func:`flatten`)."""
    expected = parameter_count(params)
    if flat.numel() != expected:
        raise ValueError(f"flat vector has {flat.numel()} entries but the parameters have {expected}")
    out, start = [], 0
    for p in params:
        out.append(flat[start : start + p.numel()].view_as(p))
        start += p.numel()
    return out


def flat_grad(
    output: th.Tensor,
    params: Params,
    create_graph: bool = False,
    retain_graph: bool | None = None,
) -> th.Tensor:
    """Flat gradient of a scalar ``output`` w.r.t. ``params``; parameters ``output`` does not depend on get zeros."""
    grads = th.autograd.grad(output, list(params), create_graph=create_graph, retain_graph=retain_graph, allow_unused=True)
    return flatten(grads, like=params)


class HessianVectorProduct:
    """Products with the Hessian of a scalar loss w.r.t. ``params``, by double backward.

    The first-order gradient graph is built once at construction and reused for every product, and also by
    :meth:`mixed_product` (the cross derivative w.r.t. other parameters), so an IHVP solve followed by the mixed
    product of a hypergradient costs no extra forward pass.

    Products accept one vector of shape ``(P,)`` or a batch of shape ``(m, P)``. A batch goes either through a loop
    of backward passes or through ``torch.autograd.grad(..., is_grads_batched=True)`` (vmap over the backward pass);
    the results are identical. On CPU the loop is about twice as fast for small MLPs (measured: 5 products on a
    64-64 critic, 3.6 ms looped vs 7.5 ms vmapped), so vmap is only the default on accelerators.

    :param loss: scalar loss whose graph reaches ``params``.
    :param params: parameters the Hessian is taken with respect to.
    :param damping: ``λ`` added as ``(H + λI)v``.
    :param vectorize: use vmap for batches; ``None`` picks it on accelerators and the loop on CPU.
    """

    def __init__(self, loss: th.Tensor, params: Params, damping: float = 0.0, vectorize: bool | None = None) -> None:
        if loss.dim() != 0:
            raise ValueError(f"loss must be a scalar, got shape {tuple(loss.shape)}")
        self.params = list(params)
        self.damping = float(damping)
        grads = th.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        self.gradient = flatten(grads, like=self.params)
        self.dim = self.gradient.numel()
        self.n_products = 0
        self._batched_backward_ok = self.gradient.device.type != "cpu" if vectorize is None else vectorize

    def __call__(self, vectors: th.Tensor) -> th.Tensor:
        batched = vectors.dim() == 2
        matrix = vectors if batched else vectors.unsqueeze(0)
        if matrix.shape[-1] != self.dim:
            raise ValueError(f"vector has {matrix.shape[-1]} entries, the Hessian is {self.dim}x{self.dim}")
        products = self._backward_products(self.params, matrix.detach())
        if self.damping:
            products = products + self.damping * matrix
        return products if batched else products[0]

    def mixed_product(self, other_params: Params, vectors: th.Tensor) -> th.Tensor:
        """Cross derivative ``∂/∂φ ⟨∇_w loss, x⟩`` for the other parameters ``φ`` (the ``∂²loss/∂φ∂w · x`` term).

        Accepts ``(P,)`` or ``(m, P)`` like ``__call__``; the result has the size of ``other_params`` (zeros where the
        gradient graph does not reach them).
        """
        batched = vectors.dim() == 2
        matrix = vectors if batched else vectors.unsqueeze(0)
        products = self._backward_products(list(other_params), matrix.detach())
        return products if batched else products[0]

    def dense(self) -> th.Tensor:
        """The full ``P x P`` matrix (plus damping), one product per column. Only for small parameter counts."""
        eye = th.eye(self.dim, dtype=self.gradient.dtype, device=self.gradient.device)
        return self(eye)

    def _backward_products(self, wrt: list[th.Tensor], matrix: th.Tensor) -> th.Tensor:
        self.n_products += matrix.shape[0]
        if not self.gradient.requires_grad:
            # The loss is linear in params: every second derivative is zero.
            return matrix.new_zeros(matrix.shape[0], parameter_count(wrt))
        if matrix.shape[0] > 1 and self._batched_backward_ok:
            try:
                grads = th.autograd.grad(
                    self.gradient, wrt, grad_outputs=matrix, retain_graph=True, allow_unused=True, is_grads_batched=True
                )
                return th.cat(
                    [
                        (g if g is not None else th.zeros(matrix.shape[0], *p.shape, dtype=p.dtype, device=p.device)).reshape(
                            matrix.shape[0], -1
                        )
                        for g, p in zip(grads, wrt, strict=True)
                    ],
                    dim=1,
                )
            except RuntimeError:
                # Some operators have no batching rule for their backward; fall back to the loop from now on.
                self._batched_backward_ok = False
        rows = [
            flatten(th.autograd.grad(self.gradient, wrt, grad_outputs=row, retain_graph=True, allow_unused=True), like=wrt)
            for row in matrix
        ]
        return th.stack(rows)


def hessian_vector_product(loss: th.Tensor, params: Params, vector: th.Tensor) -> th.Tensor:
    """One-off ``∇²loss · v``; build a :class:`HessianVectorProduct` instead when several products are needed."""
    return HessianVectorProduct(loss, params)(vector)


def mixed_vector_product(loss: th.Tensor, inner_params: Params, outer_params: Params, vector: th.Tensor) -> th.Tensor:
    """One-off ``∂²loss/∂θ∂w · x``: the gradient w.r.t. ``outer_params`` (θ) of ``⟨∇_w loss, x⟩``."""
    return HessianVectorProduct(loss, inner_params).mixed_product(outer_params, vector)
