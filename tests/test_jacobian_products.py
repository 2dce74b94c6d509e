"""The per-sample-Jacobian Gauss–Newton products and the output-space mixed product give the double-backward numbers."""

from __future__ import annotations

import functools

import pytest
import torch as th
from torch import nn

import sb3_blpo.blpo.blpo as blpo_module
from sb3_blpo.blpo.follower import Follower
from sb3_blpo.hypergrad import (
    GaussNewtonProduct,
    HessianVectorProduct,
    JacobianGaussNewtonProduct,
    LinearLayerRecorder,
    NystromSolver,
    OutputMixedProduct,
    flatten,
    implicit_hypergradient,
)

DTYPE = th.float64


def mlp(activation: type[nn.Module], inputs: int = 3, hidden: int = 5) -> nn.Sequential:
    th.manual_seed(0)
    layers = [nn.Flatten(), nn.Linear(inputs, hidden), activation(), nn.Linear(hidden, hidden), activation()]
    return nn.Sequential(*layers, nn.Linear(hidden, 1)).to(DTYPE)


def row_gradients(outputs: th.Tensor, params: list[nn.Parameter]) -> th.Tensor:
    return th.stack([flatten(th.autograd.grad(out, params, retain_graph=True), like=params) for out in outputs])


@pytest.mark.parametrize("activation", [nn.Tanh, nn.ReLU])
def test_recorded_jacobian_is_the_per_sample_gradient(activation):
    net = mlp(activation)
    params = list(net.parameters())
    recorder = LinearLayerRecorder([net], params)
    assert recorder.supported
    with recorder.record():
        outputs = net(th.randn(7, 3, dtype=DTYPE)).flatten()
    jacobian = recorder.jacobian(outputs)
    assert jacobian is not None and (jacobian.rows, jacobian.dim) == (7, sum(p.numel() for p in params))
    dense = row_gradients(outputs, params)
    th.testing.assert_close(jacobian.dense(), dense)
    # The factored products are the dense matrix's.
    right, left = th.randn(4, jacobian.dim, dtype=DTYPE), th.randn(3, 7, dtype=DTYPE)
    th.testing.assert_close(jacobian.matmul(right), right @ dense.T)
    th.testing.assert_close(jacobian.rmatmul(left), left @ dense)


def test_recorder_refuses_what_it_cannot_decompose():
    net = mlp(nn.Tanh)
    with_norm = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 1)).to(DTYPE)
    assert not LinearLayerRecorder([with_norm], list(with_norm.parameters())).supported  # LayerNorm's parameters
    recorder = LinearLayerRecorder([net], list(net.parameters()))
    with recorder.record():
        twice = net(net[1](th.randn(4, 3, dtype=DTYPE))[:, :3]).flatten()  # the first layer runs twice
    assert recorder.jacobian(twice) is None
    with recorder.record():
        sequences = net[1:](th.randn(4, 2, 3, dtype=DTYPE)).flatten()  # (B, T, features): not one row per output
    assert recorder.jacobian(sequences) is None
    outputs = net(th.randn(4, 3, dtype=DTYPE)).flatten()  # not recorded
    assert recorder.jacobian(outputs) is None


def test_jacobian_gauss_newton_matches_the_double_backward_products():
    net = mlp(nn.Tanh)
    params = list(net.parameters())
    recorder = LinearLayerRecorder([net], params)
    with recorder.record():
        outputs = net(th.randn(9, 3, dtype=DTYPE)).flatten()
    weights = th.rand(9, dtype=DTYPE)
    jacobian = recorder.jacobian(outputs)
    assert jacobian is not None
    explicit = JacobianGaussNewtonProduct(jacobian, weights=weights, damping=0.3)
    autograd = GaussNewtonProduct(outputs, params, weights=weights, damping=0.3)
    th.testing.assert_close(explicit.dense(), autograd.dense())
    from_dense = JacobianGaussNewtonProduct(jacobian.dense(), weights=weights, damping=0.3)
    th.testing.assert_close(from_dense.dense(), autograd.dense())
    vector = th.randn(explicit.dim, dtype=DTYPE)
    th.testing.assert_close(explicit.jacobian_product(vector), autograd.jacobian_product(vector))
    th.testing.assert_close(explicit(vector), autograd(vector))
    # The same Nyström solve (same sketch, same refinement) from either operator.
    x_explicit = NystromSolver(rank=4, seed=3).solve(explicit, vector).x
    x_autograd = NystromSolver(rank=4, seed=3).solve(autograd, vector).x
    th.testing.assert_close(x_explicit, x_autograd)


def coupled_problem():
    """A follower loss ``mean ω(θ)(ỹ(θ) − V_w)²`` with both actor dependences, and an actor loss on ``V_w``."""
    net = mlp(nn.Tanh)
    critic = list(net.parameters())
    theta = th.randn(6, dtype=DTYPE, requires_grad=True)
    observations = th.randn(6, 3, dtype=DTYPE)
    values = net(observations).flatten()
    targets = th.randn(6, dtype=DTYPE) + th.tanh(theta) * th.linspace(0.0, 1.0, 6, dtype=DTYPE)
    weights = 1.0 + 0.3 * th.sin(theta.cumsum(0))
    inner = (weights * (targets - values) ** 2).mean()
    outer = -(th.exp(0.1 * theta) * (values - values.mean())).mean()
    return net, critic, theta, values, inner, outer


def test_output_mixed_product_matches_the_double_backward():
    _, critic, theta, values, inner, _ = coupled_problem()
    x = th.randn(sum(p.numel() for p in critic), dtype=DTYPE)
    operator = GaussNewtonProduct(values, critic)
    output_mixed = OutputMixedProduct(inner, values, operator.jacobian_product)([theta], x)
    th.testing.assert_close(output_mixed, HessianVectorProduct(inner, critic).mixed_product([theta], x))


def test_hypergradient_is_the_same_through_either_mixed_product():
    _, critic, theta, values, inner, outer = coupled_problem()
    operator = GaussNewtonProduct(values, critic, weights=th.full_like(values, 2.0 / 6))
    reference = implicit_hypergradient(outer, inner, [theta], critic, NystromSolver(seed=1), curvature=operator)
    mixed = OutputMixedProduct(inner, values, operator.jacobian_product)
    fast = implicit_hypergradient(outer, inner, [theta], critic, NystromSolver(seed=1), curvature=operator, mixed=mixed)
    th.testing.assert_close(fast.correction, reference.correction)
    th.testing.assert_close(fast.direct, reference.direct)


def _train_parameters(monkeypatch, train, fast: bool, **kwargs) -> th.Tensor:
    if not fast:
        # The double-backward path: no per-sample Jacobian and the mixed product of the follower loss's Hessian graph.
        implicit_terms = Follower.implicit_terms

        def without_output_mixed(self, *args):
            loss, curvature, _ = implicit_terms(self, *args)
            return loss, curvature, None

        monkeypatch.setattr(Follower, "implicit_terms", without_output_mixed)
        monkeypatch.setattr(blpo_module, "Follower", functools.partial(Follower, per_sample_jacobian=False))
    parameters = train(n_steps=64, **kwargs)
    monkeypatch.undo()
    return parameters


@pytest.mark.parametrize(
    ("env_id", "kwargs"),
    [("CartPole-v1", {}), ("Pendulum-v1", {"coupling": "both", "follower_objective": "coupled"})],
)
def test_blpo_update_is_the_same_with_the_fast_products(monkeypatch, blpo_parameters_after_two_updates, env_id, kwargs):
    reference = _train_parameters(monkeypatch, blpo_parameters_after_two_updates, fast=False, env_id=env_id, **kwargs)
    fast = _train_parameters(monkeypatch, blpo_parameters_after_two_updates, fast=True, env_id=env_id, **kwargs)
    th.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-5)
