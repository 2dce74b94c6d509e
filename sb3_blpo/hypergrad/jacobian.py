"""Gauss–Newton products and mixed products through the critic's per-sample Jacobian, kept in factored form (exact).

:class:`~sb3_blpo.hypergrad.hvp.GaussNewtonProduct` multiplies by ``G = Jᵀ diag(ω) J`` with two backward passes per
vector. When the follower is an MLP the Jacobian ``J = ∂o/∂w`` ``(B, P)`` has a known structure: for a linear layer
``z = W a + b`` of a network that maps each row independently, row ``i`` of ``∂o_i/∂W`` is ``δ_i a_iᵀ`` with
``δ_i = ∂o_i/∂z_i``, and one backward pass of ``Σ_i o_i`` gives every ``δ_i``. :class:`PerSampleJacobian` keeps the
factors ``(a, δ)`` of each layer instead of the ``B × P`` matrix: ``J X`` and ``Jᵀ Y`` are then small matrix products
per layer (the same arithmetic as with the dense matrix, without building or streaming it, and with memory
``B × Σ(layer widths)`` instead of ``B × P``), and the ``k`` products of a Nyström sketch are one call
(:class:`JacobianGaussNewtonProduct`).

:class:`OutputMixedProduct` gives the mixed term ``∂²g/∂θ∂w · x`` of a loss that depends on ``w`` only through the
outputs ``o(w)`` as ``∂/∂θ ⟨∂g/∂o, J x⟩`` (``J`` does not depend on ``θ``): no ``create_graph`` backward through the
follower's network, only a backward to ``θ`` through what the loss's output gradient depends on.

Both are the same numbers as the double-backward products up to float rounding (``tests/test_jacobian_products.py``).
Pure torch: nothing here imports Stable-Baselines3.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch as th
from torch import nn

from sb3_blpo.hypergrad.hvp import CurvatureOperator, Params, flatten


@dataclass(frozen=True)
class JacobianBlock:
    """The columns of ``J`` that belong to one parameter: a weight ``(out, in)`` (``inputs`` set, row ``i`` is
    ``δ_i ⊗ a_i`` flattened row-major like the weight) or a bias ``(out,)`` (``inputs`` is ``None``, row ``i`` is ``δ_i``).

    :param deltas: ``(B, out)`` sensitivities ``∂o_i/∂z_i`` of the layer's outputs.
    :param inputs: ``(B, in)`` the layer's inputs ``a_i``, or ``None`` for a bias.
    """

    deltas: th.Tensor
    inputs: th.Tensor | None

    @property
    def size(self) -> int:
        out = self.deltas.shape[1]
        return out if self.inputs is None else out * self.inputs.shape[1]

    def matmul(self, matrix: th.Tensor) -> th.Tensor:
        """``J_block X`` ``(m, B)`` for ``X`` ``(m, size)``."""
        out = self.deltas.shape[1]
        if self.inputs is None:
            return matrix @ self.deltas.T
        m = matrix.shape[0]
        # Σ_{o,i} δ[b,o] a[b,i] X[m,o,i] = Σ_o δ[b,o] (a Xᵀ)[b,m,o]
        projected = (self.inputs @ matrix.reshape(m * out, -1).T).view(-1, m, out)
        return (projected * self.deltas.unsqueeze(1)).sum(2).T

    def rmatmul(self, matrix: th.Tensor) -> th.Tensor:
        """``Yᵀ J_block`` as rows ``(m, size)`` for ``Y`` ``(m, B)``."""
        if self.inputs is None:
            return matrix @ self.deltas
        # Σ_b Y[m,b] δ[b,o] a[b,i]: (m, out, B) @ (B, in)
        scaled = (matrix.unsqueeze(2) * self.deltas.unsqueeze(0)).transpose(1, 2)
        return (scaled @ self.inputs).reshape(matrix.shape[0], -1)

    def dense(self) -> th.Tensor:
        """The block ``(B, size)`` itself (tests and inspection)."""
        if self.inputs is None:
            return self.deltas
        return (self.deltas.unsqueeze(2) * self.inputs.unsqueeze(1)).reshape(self.deltas.shape[0], -1)


class PerSampleJacobian:
    """``J = ∂o/∂w`` ``(B, P)`` of an MLP in factored form: one :class:`JacobianBlock` per parameter, in the order of
    the flat parameter vector. Products cost what they would with the dense matrix, without building it.

    :param blocks: the blocks, in parameter order (all with the same ``B``), detached.
    """

    def __init__(self, blocks: Sequence[JacobianBlock]) -> None:
        if not blocks:
            raise ValueError("a Jacobian needs at least one parameter block")
        self.blocks = list(blocks)
        self.rows = self.blocks[0].deltas.shape[0]
        self.dim = sum(block.size for block in self.blocks)
        self.dtype = self.blocks[0].deltas.dtype
        self.device = self.blocks[0].deltas.device

    def matmul(self, matrix: th.Tensor) -> th.Tensor:
        """``J Xᵀ`` as rows: ``(m, B)`` for ``X`` ``(m, P)``."""
        parts = th.split(matrix, [block.size for block in self.blocks], dim=1)
        total = self.blocks[0].matmul(parts[0])
        for block, part in zip(self.blocks[1:], parts[1:], strict=True):
            total = total + block.matmul(part)
        return total

    def rmatmul(self, matrix: th.Tensor) -> th.Tensor:
        """``Y J`` ``(m, P)`` for ``Y`` ``(m, B)``."""
        return th.cat([block.rmatmul(matrix) for block in self.blocks], dim=1)

    def dense(self) -> th.Tensor:
        """``J`` ``(B, P)`` as a dense matrix (tests and inspection; ``B × P`` memory)."""
        return th.cat([block.dense() for block in self.blocks], dim=1)


class LinearLayerRecorder:
    """Records the inputs and outputs of the ``nn.Linear`` layers that hold ``params`` during one forward pass, and
    turns them into the per-sample Jacobian of the network's outputs (:meth:`jacobian`, factored).

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

    def jacobian(self, outputs: th.Tensor) -> PerSampleJacobian | None:
        """``J = ∂outputs/∂params`` ``(B, P)`` in factored form, detached, from the recorded pass that computed
        ``outputs`` ``(B,)``; ``None`` if the network or the pass is not supported (see the class docstring)."""
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
            if delta is None:  # the layer does not reach the outputs
                delta = th.zeros(n_rows, layer.out_features, dtype=outputs.dtype, device=outputs.device)
            blocks.append(JacobianBlock(delta.detach(), inputs if kind == "weight" else None))
        return PerSampleJacobian(blocks)


class _DenseJacobian:
    """A dense ``(B, P)`` matrix behind :class:`PerSampleJacobian`'s product interface."""

    def __init__(self, matrix: th.Tensor) -> None:
        if matrix.dim() != 2:
            raise ValueError(f"jacobian must be (B, P), got shape {tuple(matrix.shape)}")
        self.matrix = matrix.detach()
        self.rows, self.dim = self.matrix.shape
        self.dtype, self.device = self.matrix.dtype, self.matrix.device

    def matmul(self, matrix: th.Tensor) -> th.Tensor:
        return matrix @ self.matrix.T

    def rmatmul(self, matrix: th.Tensor) -> th.Tensor:
        return matrix @ self.matrix

    def dense(self) -> th.Tensor:
        return self.matrix


class JacobianGaussNewtonProduct(CurvatureOperator):
    """Products with ``G = Jᵀ diag(ω) J`` through the Jacobian ``J`` ``(B, P)``: ``Jᵀ(ω ⊙ J X)`` for any number of
    vectors at once (the same matrix as :class:`~sb3_blpo.hypergrad.hvp.GaussNewtonProduct`, no backward pass).

    :param jacobian: a :class:`PerSampleJacobian` (from :meth:`LinearLayerRecorder.jacobian`) or a dense ``(B, P)``
        tensor.
    :param weights: ``(B,)`` non-negative weights, or ``None`` for all ones.
    :param damping: ``λ`` added as ``(G + λI)v``.
    """

    def __init__(
        self, jacobian: PerSampleJacobian | th.Tensor, weights: th.Tensor | None = None, damping: float = 0.0
    ) -> None:
        self.jacobian = _DenseJacobian(jacobian) if isinstance(jacobian, th.Tensor) else jacobian
        rows = self.jacobian.rows
        self.weights = th.ones(rows, dtype=self.jacobian.dtype, device=self.jacobian.device)
        if weights is not None:
            self.weights = weights.detach()
        if self.weights.shape != (rows,):
            raise ValueError(f"weights must have shape ({rows},), got {tuple(self.weights.shape)}")
        like = th.empty(self.jacobian.dim, dtype=self.jacobian.dtype, device=self.jacobian.device)
        super().__init__(like, damping)

    def _products(self, matrix: th.Tensor) -> th.Tensor:
        return self.jacobian.rmatmul(self.jacobian.matmul(matrix) * self.weights)

    def jacobian_product(self, vector: th.Tensor) -> th.Tensor:
        """``J x`` ``(B,)`` for a flat ``x`` ``(P,)``."""
        return self.jacobian.matmul(vector.detach().to(self.jacobian.dtype).unsqueeze(0))[0]


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
