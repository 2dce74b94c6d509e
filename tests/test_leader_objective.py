"""The improvement-form leader objective, the consistent follower and the authors' recipe (docs/blpo.md).

Oracles: exact values of a tabular MDP (no sampling), central finite differences of ``F(θ) = f(θ, w*(θ))`` with the
exact weighted-least-squares best response of a linear critic, and hand-computed values.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch as th

from sb3_blpo import BLPO
from sb3_blpo.blpo.advantages import DifferentiableGAE
from sb3_blpo.blpo.coupling import coupled_targets_and_weights, prefix_mean_f2, weighted_squared_error
from sb3_blpo.blpo.objectives import leader_loss
from sb3_blpo.hypergrad import DenseSolver, GaussNewtonProduct, implicit_hypergradient

DTYPE = th.float64
NO_CLIP = 1e9  # a clip range that never binds: the population identities are about the unclipped objective


# --- tabular identities ---------------------------------------------------------------------------------------------


class TabularMDP:
    """A random finite MDP with exact policy evaluation (linear solves)."""

    def __init__(self, n_states: int = 6, n_actions: int = 3, gamma: float = 0.9, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.gamma = gamma
        self.transitions = th.as_tensor(rng.dirichlet(np.ones(n_states), size=(n_states, n_actions)), dtype=DTYPE)
        self.rewards = th.as_tensor(rng.normal(size=(n_states, n_actions)), dtype=DTYPE)
        self.start = th.as_tensor(rng.dirichlet(np.ones(n_states)), dtype=DTYPE)
        self.eye = th.eye(n_states, dtype=DTYPE)

    def values(self, policy: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
        """``V^π`` and ``A^π`` for a ``(S, A)`` policy."""
        p_policy = th.einsum("sa,sat->st", policy, self.transitions)
        r_policy = (policy * self.rewards).sum(1)
        value = th.linalg.solve(self.eye - self.gamma * p_policy, r_policy)
        q_value = self.rewards + self.gamma * self.transitions @ value
        return value, q_value - value.unsqueeze(1)

    def performance(self, policy: th.Tensor) -> float:
        return float(self.start @ self.values(policy)[0])

    def occupancy(self, policy: th.Tensor) -> th.Tensor:
        """Normalised discounted state occupancy ``d^π = (1 − γ) μᵀ (I − γ P_π)⁻¹``."""
        p_policy = th.einsum("sa,sat->st", policy, self.transitions)
        return (1 - self.gamma) * th.linalg.solve((self.eye - self.gamma * p_policy).T, self.start)


@pytest.mark.parametrize("scale", [0.01, 0.1, 1.0, 3.0])
def test_tabular_surrogate_is_zero_and_improvement_is_the_performance_difference(scale):
    """With a best-responding critic, ``F(θ) ≡ 0`` and ``F_imp(θ) = (1 − γ)(J(π_old) − J(π_θ))`` exactly."""
    mdp = TabularMDP()
    generator = th.Generator().manual_seed(1)
    logits_old = th.randn(6, 3, generator=generator, dtype=DTYPE)
    logits = logits_old + scale * th.randn(6, 3, generator=generator, dtype=DTYPE)
    policy_old, policy = th.softmax(logits_old, 1), th.softmax(logits, 1)
    _, advantages = mdp.values(policy)  # the follower's best response to π_θ
    # Expectation over (s, a) ~ d_old π_old as a mean over all pairs: the weights go into the advantages (the
    # unclipped objectives are linear in them).
    weights = (mdp.occupancy(policy_old).unsqueeze(1) * policy_old).flatten()
    ratio = (policy / policy_old).flatten()
    weighted = weights.numel() * weights * advantages.flatten()
    surrogate = float(leader_loss(ratio, weighted, NO_CLIP, "surrogate"))
    improvement = float(leader_loss(ratio, weighted, NO_CLIP, "improvement"))
    expected = (1 - mdp.gamma) * (mdp.performance(policy_old) - mdp.performance(policy))
    assert abs(surrogate) < 1e-12
    assert improvement == pytest.approx(expected, abs=1e-10)
    assert abs(expected) > 1e-6  # the perturbation changes the return: the identity is not 0 = 0


def test_improvement_form_has_the_surrogates_actor_gradient_and_no_critic_gradient_at_the_rollout_policy():
    ratio = th.ones(8, dtype=DTYPE, requires_grad=True)
    critic = th.randn(8, dtype=DTYPE, generator=th.Generator().manual_seed(0), requires_grad=True)
    grads = {
        objective: th.autograd.grad(leader_loss(ratio, 2.0 * critic, 0.2, objective), (ratio, critic))
        for objective in ("surrogate", "improvement")
    }
    th.testing.assert_close(grads["improvement"][0], grads["surrogate"][0])
    assert float(grads["improvement"][1].abs().max()) == 0.0
    assert float(grads["surrogate"][1].abs().max()) > 0.0


# --- the hypergradient of f_imp against finite differences ----------------------------------------------------------


class LinearCriticProblem:
    """A small rollout (2 envs × 6 steps, one episode boundary), a softmax-linear actor and a linear critic.

    ``w*(θ)`` minimises the target-coupled follower objective ``g̃(θ, ·)`` exactly (weighted least squares), so
    ``F(θ) = f_imp(θ, w*(θ))`` can be differentiated by finite differences.
    """

    n_envs, n_steps, n_features, n_actions, gamma, gae_lambda = 2, 6, 4, 3, 0.9, 0.8

    def __init__(self, mode: str) -> None:
        generator = th.Generator().manual_seed(3)
        size = self.n_envs * self.n_steps
        self.mode = mode
        self.features = th.randn(size + self.n_envs, self.n_features, generator=generator, dtype=DTYPE)
        self.actions = th.randint(self.n_actions, (size,), generator=generator)
        self.theta_old = 0.5 * th.randn(self.n_features, self.n_actions, generator=generator, dtype=DTYPE)
        self.old_log_prob = self.log_prob(self.theta_old).detach()
        rewards = th.randn(self.n_envs, self.n_steps, generator=generator, dtype=DTYPE)
        starts = th.zeros(self.n_envs, self.n_steps, dtype=DTYPE)
        starts[:, 0] = 1.0
        starts[1, 3] = 1.0
        self.gae = DifferentiableGAE(rewards, starts, th.zeros(self.n_envs, dtype=DTYPE), self.gamma, self.gae_lambda)
        w_old = th.randn(self.n_features, generator=generator, dtype=DTYPE)
        old_advantages = self.advantages_all(w_old)
        self.rollout_advantages = old_advantages.detach()
        self.targets = (self.rollout_advantages.flatten() + self.features[:size] @ w_old).detach()
        self.batch = th.tensor([0, 2, 5, 7, 9, 10])
        self.window = self.gae.kernel.window(self.batch // self.n_steps, self.batch % self.n_steps)

    def log_prob(self, theta: th.Tensor) -> th.Tensor:
        logits = self.features[: self.n_envs * self.n_steps] @ theta
        return th.log_softmax(logits, 1).gather(1, self.actions.unsqueeze(1)).squeeze(1)

    def ratios(self, theta: th.Tensor) -> th.Tensor:
        return th.exp(self.log_prob(theta) - self.old_log_prob)

    def advantages_all(self, w: th.Tensor) -> th.Tensor:
        values = self.features @ w
        size = self.n_envs * self.n_steps
        return self.gae.rollout(self.gae.td_errors(values[:size].view(self.n_envs, self.n_steps), values[size:]))

    def leader(self, theta: th.Tensor, w: th.Tensor) -> th.Tensor:
        advantages = self.advantages_all(w).flatten()[self.batch]
        return leader_loss(self.ratios(theta)[self.batch], advantages, NO_CLIP, "improvement")

    def follower(self, theta: th.Tensor, w: th.Tensor) -> th.Tensor:
        ratios = self.ratios(theta).view(self.n_envs, self.n_steps)
        values = self.features[self.batch] @ w
        return weighted_squared_error(
            values,
            *coupled_targets_and_weights(
                self.targets[self.batch],
                ratios,
                self.rollout_advantages,
                self.window,
                gamma=self.gamma,
                mode=self.mode,
                ratio_clip=NO_CLIP,
            ),
        )

    def best_response(self, theta: th.Tensor) -> th.Tensor:
        """``argmin_w g̃(θ, w)``: g̃ is quadratic in w, so one Newton step from 0 is exact."""
        w = th.zeros(self.n_features, dtype=DTYPE, requires_grad=True)
        gradient = th.autograd.grad(self.follower(theta, w), w, create_graph=True)[0]
        hessian = th.stack([th.autograd.grad(gradient[i], w, retain_graph=True)[0] for i in range(self.n_features)])
        return -th.linalg.solve(hessian, gradient.detach())


@pytest.mark.parametrize("curvature", ["hessian", "gauss_newton"])
@pytest.mark.parametrize("mode", ["target", "distribution", "both"])
def test_dense_hypergradient_of_the_improvement_form_equals_finite_differences(mode, curvature):
    problem = LinearCriticProblem(mode)
    theta = (problem.theta_old + 0.05 * th.randn(4, 3, generator=th.Generator().manual_seed(9), dtype=DTYPE)).requires_grad_()
    w = problem.best_response(theta.detach()).requires_grad_()
    operator = None
    if curvature == "gauss_newton":
        # Linear critic: the Gauss–Newton matrix is the Hessian; this checks the operator's scaling end to end.
        ratios = problem.ratios(theta.detach()).view(problem.n_envs, problem.n_steps)
        from sb3_blpo.blpo.coupling import coupled_targets_and_weights

        _, weights = coupled_targets_and_weights(
            problem.targets[problem.batch],
            ratios,
            problem.rollout_advantages,
            problem.window,
            gamma=problem.gamma,
            mode=mode,
            ratio_clip=NO_CLIP,
        )
        values = problem.features[problem.batch] @ w
        operator = GaussNewtonProduct(values, [w], weights=weights * 2.0 / len(problem.batch))
    hypergradient = implicit_hypergradient(
        problem.leader(theta, w), problem.follower(theta, w), [theta], [w], DenseSolver(), curvature=operator
    )

    def total(theta_value: th.Tensor) -> float:
        return float(problem.leader(theta_value, problem.best_response(theta_value)))

    eps = 1e-6
    numeric = th.zeros(theta.numel(), dtype=DTYPE)
    for i in range(theta.numel()):
        step = th.zeros(theta.numel(), dtype=DTYPE)
        step[i] = eps
        step = step.view_as(theta)
        numeric[i] = (total(theta.detach() + step) - total(theta.detach() - step)) / (2 * eps)
    assert float((hypergradient.total - numeric).norm() / numeric.norm()) < 1e-4
    # The correction is not negligible here: the plain ∇θf is measurably off.
    assert float((hypergradient.direct - numeric).norm() / numeric.norm()) > 1e-3


# --- the authors' f2 --------------------------------------------------------------------------------------------------


def test_authors_f2_equals_a_hand_computed_value():
    """One 5-step trajectory: ℓ = 1..5 has prefix means 1, 1.5, 2, 2.5, 3; y − V = (1, −1, 2, 0, 1)."""
    surrogate = th.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]], dtype=DTYPE)
    targets = th.tensor([1.0, -1.0, 2.0, 0.0, 1.0], dtype=DTYPE)
    values = th.zeros(5, dtype=DTYPE)
    env_index, time_index = th.zeros(5, dtype=th.long), th.arange(5)
    # 2 · mean(−1·1, −1.5·(−1), −2·2, −2.5·0, −3·1) = 2 · (−6.5 / 5)
    assert float(prefix_mean_f2(values, targets, surrogate, env_index, time_index)) == pytest.approx(-2.6)
    subset = th.tensor([1, 3])  # 2 · mean(1.5, 0)
    assert float(prefix_mean_f2(values[subset], targets[subset], surrogate, env_index[subset], subset)) == pytest.approx(1.5)


# --- BLPO ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("objective", ["improvement", "surrogate"])
def test_blpo_correction_at_the_rollout_policy(objective):
    """One minibatch = the whole rollout, one epoch: the actor step is taken at θ_old, where ``∇w f_imp = 0`` and so the
    correction is zero; the plain surrogate's ``∇w f`` is not (its correction is what cancels the policy gradient)."""
    model = BLPO(
        "MlpPolicy",
        "CartPole-v1",
        n_steps=128,
        batch_size=128,
        n_epochs=1,
        leader_objective=objective,
        hypergrad_bound=math.inf,
        policy_kwargs=dict(net_arch=[16]),
        seed=0,
    )
    model.learn(128)
    logged = model.logger.name_to_value
    ratio = logged["train/ihvp_correction_norm"] / logged["train/hypergrad_norm"]
    if objective == "improvement":
        assert ratio < 1e-6
    else:
        assert ratio > 1e-3


@pytest.mark.parametrize("follower_objective", ["coupled", "mse"])
def test_nested_steps_reach_the_point_where_the_ift_is_applied(follower_objective):
    """Linear critic: the nested steps' objective is stationary where the implicit function theorem is applied —
    ``∇w g̃(θ, w) = 0`` at the current actor (``"coupled"``) or ``∇w g̃(θ_old, w) = ∇w MSE = 0`` (``"mse"``) — while the
    other objective's gradient is not."""
    model = BLPO(
        "MlpPolicy",
        "CartPole-v1",
        n_steps=64,
        batch_size=64,
        n_epochs=3,
        learning_rate=3e-3,
        follower_objective=follower_objective,
        policy_kwargs=dict(net_arch=dict(pi=[16], vf=[])),
        seed=1,
    )
    model.learn(64)  # the actor has moved away from the rollout policy of the buffer
    rollout, follower = model._bilevel_rollout(), model._follower()
    batch = rollout.minibatch(th.arange(rollout.size))
    ratios = model._rollout_ratios(rollout)
    assert float((ratios - 1).abs().max()) > 1e-3
    critic = model._critic_params
    model.policy.critic_optimizer = th.optim.LBFGS(
        critic, lr=1.0, max_iter=200, history_size=50, line_search_fn="strong_wolfe"
    )

    def closure() -> th.Tensor:
        model.policy.critic_optimizer.zero_grad()
        loss = follower.loss(rollout, batch, follower.fitted_ratios(ratios))[0]
        loss.backward()
        return loss

    for _ in range(5):
        model.policy.critic_optimizer.step(closure)
    coupled = th.autograd.grad(follower.loss(rollout, batch, ratios.detach())[0], critic)
    plain = th.autograd.grad(follower.loss(rollout, batch, None)[0], critic)
    coupled_norm = float(th.cat([g.flatten() for g in coupled]).norm())
    plain_norm = float(th.cat([g.flatten() for g in plain]).norm())
    fitted, other = (coupled_norm, plain_norm) if follower_objective == "coupled" else (plain_norm, coupled_norm)
    assert fitted < 1e-3 * other


@pytest.mark.parametrize("env_kind,env_id", [("discrete", "CartPole-v1"), ("continuous", "Pendulum-v1")])
def test_authors_recipe_runs(env_kind, env_id):
    recipe = BLPO.authors_recipe(env_kind)
    assert recipe is not BLPO.authors_recipe(env_kind)  # a fresh dict each call
    model = BLPO("MlpPolicy", env_id, n_steps=64, batch_size=64, seed=0, **recipe)
    model.learn(128)
    logged = model.logger.name_to_value
    assert model.coupling == "authors_f2" and model.leader_objective == "surrogate"
    assert math.isfinite(logged["train/hypergrad_norm"]) and logged["train/ihvp_correction_norm"] > 0.0


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(leader_objective="improved"), "leader_objective"),
        (dict(actor_advantages="fixed"), "actor_advantages"),
        (dict(follower_objective="critic"), "follower_objective"),
        (dict(coupling="authors"), "coupling"),
        (dict(ihvp_kwargs=dict(curvature="fisher")), "curvature"),
        (dict(ihvp_kwargs=dict(relative_rho="yes")), "relative_rho"),
        (dict(ihvp_kwargs=["rank", 5]), "ihvp_kwargs"),
    ],
)
def test_bad_new_parameters_are_refused_at_construction(kwargs, name):
    with pytest.raises(ValueError, match=name):
        BLPO("MlpPolicy", "CartPole-v1", n_steps=64, batch_size=64, **kwargs)


def test_bad_recipe_kind_is_refused():
    with pytest.raises(ValueError, match="env_kind"):
        BLPO.authors_recipe("atari")


def test_docs_recipe_snippet_runs():
    """The python snippet of docs/blpo.md's "The authors' recipe" section builds the model it describes."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "blpo.md").read_text()
    section = text[text.index("## The authors' recipe") :]
    snippet = section[section.index("```python\n") + len("```python\n") :]
    snippet = snippet[: snippet.index("```")]
    namespace: dict = {}
    exec(compile(snippet, "docs/blpo.md", "exec"), namespace)
    model = namespace["model"]
    assert isinstance(model, BLPO) and model.coupling == "authors_f2" and model.ihvp_kwargs["rho"] == 50.0
