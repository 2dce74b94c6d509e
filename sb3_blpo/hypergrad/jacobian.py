"""Gauss–Newton products and mixed products through an explicit per-sample Jacobian (exact, cheaper on small batches).

:class:`~sb3_blpo.hypergrad.hvp.GaussNewtonProduct` multiplies by ``G = Jᵀ diag(ω) J`` with two backward passes per
vector. When the follower is an MLP and ``batch × parameters`` is small, the Jacobian ``J = ∂o/∂w`` ``(B, P)`` itself is
cheap: for a linear layer ``z = W a + b`` of a network that maps each row independently, row ``i`` of ``∂o_i/∂W`` is
``δ_i a_iᵀ`` with ``δ_i = ∂o_i/∂z_i``, and one backward pass of ``Σ_i o_i`` gives every ``δ_i``. Every product is then
two matrix products, and the ``k`` products of a Nyström sketch are one (:class:`JacobianGaussNewtonProduct`).

:class:`OutputMixedProduct` gives the mixed term ``∂²g/∂θ∂w · x`` of a loss that depends on ``w`` only through the
outputs ``o(w)`` as ``∂/∂θ ⟨∂g/∂o, J x⟩`` (``J`` does not depend on ``θ``): no ``create_graph`` backward through the
follower's network, only a backward to ``θ`` through what the loss's output gradient depends on.

Both are the same numbers as the double-backward products up to float rounding (``tests/test_jacobian_products.py``).
Pure torch: nothing here imports Stable-Baselines3.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch as th
from torch import nn

from sb3_blpo.hypergrad.hvp import CurvatureOperator, Params, flatten

#: Default cap on ``batch × parameters`` for an explicit Jacobian (float32: 16 MiB); above it the double-backward
#: products are used.
MAX_JACOBIAN_ENTRIES = 2**22


class LinearLayerRecorder:
    """Records the inputs and outputs of the ``nn.Linear`` layers that hold ``params`` during one forward pass, and
    turns them into the per-sample Jacobian of the network's outputs (:meth:`jacobian`).

    Usable when every parameter in ``params`` is the weight or bias of one of those layers, each layer runs once per
    forward pass on a ``(B, features)`` input, and the network maps each row independently (as SB3's MLP critics
    do: element-wise activations, no batch statistics); :meth:`jacobian` returns ``None`` otherwise.

    :param modules: modules to search for the linear layers (e.g. the policy).
    :param params: the parameters ``w`` of the Jacobian, in the order of its columns.
    """

    def __init__(self, modules: Sequence[nn.Module], params: Params) -> None:
        self.params = list(params)
        owners: dict[int, tuple[nn.Linear, str]] = {}
        for module in modules:
            for layer in module.modules():
                if isinstance(layer, nn.Linear):
                    owners.setdefault(id(layer.weight), (layer, "weight"))
                    if layer.bias is not None:
                        owners.setdefault(id(layer.bias), (layer, "bias"))
        self._columns = [owners.get(id(param)) for param in self.params]
        self.supported = all(column is not None for column in self._columns)
        self._layers: list[nn.Linear] = []
        if self.supported:
            for layer, _ in self._columns:  # type: ignore[misc]
                if all(layer is not seen for seen in self._layers):
                    self._layers.append(layer)
        self._records: dict[int, tuple[th.Tensor, th.Tensor]] = {}
        self._valid = False

    @contextmanager
    def record(self) -> Iterator[LinearLayerRecorder]:
        """Record the layers during the forward pass run inside the ``with`` block (nothing if not supported)."""
        self._records, self._valid = {}, self.supported
        if not self.supported:
            yield self
            return

        def hook(layer: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            if id(layer) in self._records or not isinstance(output, th.Tensor) or output.dim() != 2:
                self._valid = False  # called twice, or not on a (B, features) batch
            else:
                self._records[id(layer)] = (inputs[0], output)

        handles = [layer.register_forward_hook(hook) for layer in self._layers]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def jacobian(self, outputs: th.Tensor) -> th.Tensor | None:
        """``J = ∂outputs/∂params`` ``(B, P)``, detached, from the recorded pass that computed ``outputs`` ``(B,)``;
        ``None`` if the network or the pass is not supported (see the class docstring)."""
        if not self._valid or outputs.dim() != 1 or len(self._records) != len(self._layers):
            return None
        records = [self._records[id(layer)] for layer in self._layers]
        n_rows = outputs.shape[0]
        if any(inputs.dim() != 2 or inputs.shape[0] != n_rows for inputs, _ in records):
            return None
        try:
            # Rows are independent: the gradient of Σ_i o_i w.r.t. a layer's output row i is ∂o_i/∂z_i.
            deltas = th.autograd.grad(outputs.sum(), [out for _, out in records], retain_graph=True, allow_unused=True)
        except RuntimeError:
            return None
        by_layer = {id(layer): (records[i][0].detach(), deltas[i]) for i, layer in enumerate(self._layers)}
        blocks = []
        for layer, kind in self._columns:  # type: ignore[misc]
            inputs, delta = by_layer[id(layer)]
            if delta is None:
                delta = th.zeros(n_rows, layer.out_features, dtype=outputs.dtype, device=outputs.device)
            delta = delta.detach()
            blocks.append((delta.unsqueeze(2) * inputs.unsqueeze(1)).reshape(n_rows, -1) if kind == "weight" else delta)
        return th.cat(blocks, dim=1)


class JacobianGaussNewtonProduct(CurvatureOperator):
    """Products with ``G = Jᵀ diag(ω) J`` from an explicit Jacobian ``J`` ``(B, P)``: two matrix products for any
    number of vectors (the same matrix as :class:`~sb3_blpo.hypergrad.hvp.GaussNewtonProduct`).

    :param jacobian: ``(B, P)``, detached.
    :param weights: ``(B,)`` non-negative weights, or ``None`` for all ones.
    :param damping: ``λ`` added as ``(G + λI)v``.
    """

    def __init__(self, jacobian: th.Tensor, weights: th.Tensor | None = None, damping: float = 0.0) -> None:
        if jacobian.dim() != 2:
            raise ValueError(f"jacobian must be (B, P), got shape {tuple(jacobian.shape)}")
        self.jacobian = jacobian.detach()
        rows = jacobian.shape[0]
        self.weights = jacobian.new_ones(rows) if weights is None else weights.detach()
        if self.weights.shape != (rows,):
            raise ValueError(f"weights must have shape ({rows},), got {tuple(self.weights.shape)}")
        super().__init__(self.jacobian[0], damping)

    def _products(self, matrix: th.Tensor) -> th.Tensor:
        return ((matrix @ self.jacobian.T) * self.weights) @ self.jacobian

    def jacobian_product(self, vector: th.Tensor) -> th.Tensor:
        """``J x`` ``(B,)`` for a flat ``x`` ``(P,)``."""
        return self.jacobian @ vector.detach().to(self.jacobian.dtype)


class OutputMixedProduct:
    """The mixed term ``∂²g/∂θ∂w · x`` of a loss ``g`` that depends on ``w`` only through outputs ``o(w)`` (which do not
    depend on ``θ``): ``∇w g = Jᵀ ∂g/∂o``, hence ``∂/∂θ ⟨∇w g, x⟩ = ∂/∂θ ⟨∂g/∂o, J x⟩``.

    :param loss: scalar ``g``, with a graph to ``outputs`` and to ``θ``.
    :param outputs: ``(B,)`` the follower's outputs in ``loss``.
    :param jacobian_product: ``x ↦ J x`` ``(B,)`` (e.g. :meth:`JacobianGaussNewtonProduct.jacobian_product`).
    """

    def __init__(self, loss: th.Tensor, outputs: th.Tensor, jacobian_product: Callable[[th.Tensor], th.Tensor]) -> None:
        self.loss = loss
        self.outputs = outputs
        self.jacobian_product = jacobian_product

    def __call__(self, outer_params: Params, vector: th.Tensor) -> th.Tensor:
        """``∂²g/∂θ∂w · x`` flat, the size of ``outer_params`` (zeros where ``g`` does not reach them)."""
        outer_params = list(outer_params)
        (output_grad,) = th.autograd.grad(self.loss, self.outputs, create_graph=True, retain_graph=True)
        if not output_grad.requires_grad:
            return vector.new_zeros(sum(p.numel() for p in outer_params))
        grads = th.autograd.grad(
            output_grad,
            outer_params,
            grad_outputs=self.jacobian_product(vector).detach(),
            retain_graph=True,
            allow_unused=True,
        )
        return flatten(grads, like=outer_params)
