"""The coupled critic objective g̃(θ, w) and BLPO's hypergradient on a linear-critic bilevel problem.

Checks from the design note (shared/design/blpo-coupling.md):
- at θ = θ_old, g̃ is exactly the critic MSE (value and gradient in w);
- ∇θ⟨∇w g̃, x⟩ by one backward pass equals central finite differences in θ;
- with a linear critic (the paper's theory setting) w*(θ) = argmin_w g̃(θ, w) is a weighted least-squares solution,
  and the hypergradient built from BLPO's pieces with the dense solver equals finite differences of
  F(θ) = f(θ, w*(θ)).
"""

from __future__ import annotations

import pytest
import torch as th

from sb3_blpo.blpo.advantages import DifferentiableGAE
from sb3_blpo.blpo.coupling import COUPLING_MODES, coupled_critic_loss
from sb3_blpo.hypergrad import DenseSolver, HessianVectorProduct, implicit_hypergradient

DTYPE = th.float64
N_ENVS, N_STEPS, OBS_DIM, N_ACTIONS = 2, 24, 5, 3
GAMMA, LAMBDA, CLIP = 0.9, 0.8, 0.2


class ToyRollout:
    """A fixed rollout with a linear-softmax actor and a linear critic V_w(s) = φ(s)ᵀw."""

    def __init__(self, seed: int = 0) -> None:
        gen = th.Generator().manual_seed(seed)
        self.features = th.randn(N_ENVS, N_STEPS, OBS_DIM, generator=gen, dtype=DTYPE)
        self.last_features = th.randn(N_ENVS, OBS_DIM, generator=gen, dtype=DTYPE)
        self.actions = th.randint(N_ACTIONS, (N_ENVS, N_STEPS), generator=gen)
        self.rewards = th.randn(N_ENVS, N_STEPS, generator=gen, dtype=DTYPE)
        episode_starts = th.zeros(N_ENVS, N_STEPS, dtype=DTYPE)
        episode_starts[0, 9] = episode_starts[1, 15] = episode_starts[1, 4] = 1.0
        self.gae = DifferentiableGAE(self.rewards, episode_starts, th.tensor([0.0, 1.0], dtype=DTYPE), GAMMA, LAMBDA)
        self.theta_old = 0.3 * th.randn(OBS_DIM, N_ACTIONS, generator=gen, dtype=DTYPE)
        self.w_old = th.randn(OBS_DIM, generator=gen, dtype=DTYPE)
        self.old_log_prob = self.log_prob(self.theta_old).detach()
        old_values = self.values(self.w_old)
        self.old_advantages = self.advantages(self.w_old, self.window_all()).detach().view(N_ENVS, N_STEPS)
        self.targets = (self.old_advantages + old_values[0]).detach()
        self.index = th.arange(N_ENVS * N_STEPS)

    def window_all(self):
        index = th.arange(N_ENVS * N_STEPS)
        return self.gae.kernel.window(index // N_STEPS, index % N_STEPS)

    def log_prob(self, theta: th.Tensor) -> th.Tensor:
        logits = self.features @ theta
        return th.log_softmax(logits, dim=-1).gather(-1, self.actions.unsqueeze(-1)).squeeze(-1)

    def ratios(self, theta: th.Tensor) -> th.Tensor:
        return th.exp(self.log_prob(theta) - self.old_log_prob)

    def values(self, w: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
        return self.features @ w, self.last_features @ w

    def advantages(self, w: th.Tensor, window) -> th.Tensor:
        values, last_values = self.values(w)
        return self.gae.minibatch(self.gae.td_errors(values, last_values), window)

    def actor_loss(self, theta: th.Tensor, w: th.Tensor, index: th.Tensor) -> th.Tensor:
        """f(θ, w): the PPO clipped surrogate with advantages from the critic w (BLPO's leader loss)."""
        window = self.gae.kernel.window(index // N_STEPS, index % N_STEPS)
        advantages = self.advantages(w, window)
        ratio = self.ratios(theta).flatten()[index]
        return -th.min(ratio * advantages, th.clamp(ratio, 1 - CLIP, 1 + CLIP) * advantages).mean()

    def critic_objective(self, theta: th.Tensor, w: th.Tensor, index: th.Tensor, mode: str) -> th.Tensor:
        window = self.gae.kernel.window(index // N_STEPS, index % N_STEPS)
        values = self.values(w)[0].flatten()[index]
        return coupled_critic_loss(
            values,
            self.targets.flatten()[index],
            self.ratios(theta),
            self.old_advantages,
            window,
            gamma=GAMMA,
            mode=mode,
            ratio_clip=CLIP,
        )

    def best_response(self, theta: th.Tensor, index: th.Tensor, mode: str) -> th.Tensor:
        """w*(θ) in closed form: g̃ is a weighted least-squares problem in w for a linear critic."""
        w = th.zeros(OBS_DIM, dtype=DTYPE, requires_grad=True)
        # g̃ is exactly quadratic in w, so one Newton step from anywhere lands on the minimiser.
        loss = self.critic_objective(theta, w, index, mode)
        gradient = th.autograd.grad(loss, w, create_graph=True)[0]
        hessian = th.stack([th.autograd.grad(gradient[i], w, retain_graph=True)[0] for i in range(OBS_DIM)])
        return (w - th.linalg.solve(hessian, gradient)).detach()


def central_differences(function, point: th.Tensor, eps: float = 1e-6) -> th.Tensor:
    """Flat gradient of a scalar function of ``point`` by central differences."""
    numeric = th.zeros(point.numel(), dtype=DTYPE)
    for i in range(point.numel()):
        step = th.zeros(point.numel(), dtype=DTYPE)
        step[i] = eps
        step = step.view_as(point)
        numeric[i] = (function(point + step) - function(point - step)) / (2 * eps)
    return numeric


@pytest.fixture(scope="module")
def toy() -> ToyRollout:
    return ToyRollout()


@pytest.mark.parametrize("mode", COUPLING_MODES)
def test_coupled_objective_is_the_critic_mse_at_the_rollout_policy(toy, mode):
    w = th.randn(OBS_DIM, dtype=DTYPE, requires_grad=True)
    index = toy.index[::3]
    coupled = toy.critic_objective(toy.theta_old, w, index, mode)
    mse = ((toy.targets.flatten()[index] - toy.values(w)[0].flatten()[index]) ** 2).mean()
    assert th.allclose(coupled, mse, rtol=1e-12)
    grad_coupled, grad_mse = (th.autograd.grad(loss, w)[0] for loss in (coupled, mse))
    assert th.allclose(grad_coupled, grad_mse, rtol=1e-12)


@pytest.mark.parametrize("mode", COUPLING_MODES)
def test_mixed_product_matches_finite_differences(toy, mode):
    gen = th.Generator().manual_seed(1)
    # Away from θ_old (as in later epochs), but inside the ratio clip so that g̃ is smooth.
    theta = (toy.theta_old + 0.02 * th.randn(OBS_DIM, N_ACTIONS, generator=gen, dtype=DTYPE)).requires_grad_(True)
    w = th.randn(OBS_DIM, dtype=DTYPE, generator=gen, requires_grad=True)
    x = th.randn(OBS_DIM, dtype=DTYPE, generator=gen)
    index = toy.index[1::2]
    assert (toy.ratios(theta) - 1).abs().max() < CLIP
    mixed = HessianVectorProduct(toy.critic_objective(theta, w, index, mode), [w]).mixed_product([theta], x)
    assert mixed.norm() > 0

    def pairing(theta_value: th.Tensor) -> th.Tensor:
        gradient_w = th.autograd.grad(toy.critic_objective(theta_value, w, index, mode), w)[0]
        return gradient_w @ x

    numeric = central_differences(pairing, theta.detach())
    assert th.allclose(mixed, numeric, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("mode", COUPLING_MODES)
def test_hypergradient_matches_finite_differences_of_the_bilevel_objective(toy, mode):
    gen = th.Generator().manual_seed(2)
    theta = (toy.theta_old + 0.02 * th.randn(OBS_DIM, N_ACTIONS, generator=gen, dtype=DTYPE)).requires_grad_(True)
    index = toy.index[::2]
    assert (toy.ratios(theta) - 1).abs().max() < CLIP

    def bilevel_objective(theta_value: th.Tensor) -> th.Tensor:
        return toy.actor_loss(theta_value, toy.best_response(theta_value, index, mode), index)

    w_star = toy.best_response(theta, index, mode).requires_grad_(True)
    hypergradient = implicit_hypergradient(
        toy.actor_loss(theta, w_star, index),
        toy.critic_objective(theta, w_star, index, mode),
        [theta],
        [w_star],
        DenseSolver(),
    )
    numeric = central_differences(bilevel_objective, theta.detach())
    relative_error = (hypergradient.total - numeric).norm() / numeric.norm()
    assert relative_error < 1e-4
    # The correction matters: the plain actor gradient is measurably off.
    assert (hypergradient.direct - numeric).norm() / numeric.norm() > 10 * relative_error
