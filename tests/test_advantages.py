"""The differentiable GAE map: equal to SB3's GAE at the rollout critic, differentiable in the critic, minibatch-exact.

Two levels: through a BLPO model on real rollouts (float32, SB3's buffer as the reference), and on
:class:`DifferentiableGAE` / :class:`EpisodeKernel` directly in float64 against a plain reverse-loop GAE written here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch as th
from stable_baselines3.common.callbacks import CallbackList
from stable_baselines3.common.env_util import make_vec_env

from sb3_blpo import BLPO
from sb3_blpo.blpo.advantages import DifferentiableGAE, EpisodeKernel, KernelWindow

DTYPE = th.float64

# ---------------------------------------------------------------------------------------------------- through BLPO

ROLLOUT_ENVS = {
    "CartPole-terminations": ("CartPole-v1", {}),
    "Pendulum-truncations": ("Pendulum-v1", dict(max_episode_steps=37)),
}


def collect_rollout(env_id: str, env_kwargs: dict, n_envs: int = 3, n_steps: int = 100) -> BLPO:
    env = make_vec_env(env_id, n_envs=n_envs, seed=0, env_kwargs=env_kwargs)
    model = BLPO("MlpPolicy", env, n_steps=n_steps, batch_size=50, policy_kwargs=dict(net_arch=[16]), seed=0)
    model._setup_learn(n_envs * n_steps, None)
    callback = CallbackList([])
    callback.init_callback(model)
    assert model.collect_rollouts(model.env, callback, model.rollout_buffer, model.n_steps)
    return model


def advantages(model: BLPO, rollout, index: th.Tensor, track_critic: bool = False) -> th.Tensor:  # type: ignore[no-untyped-def]
    values, _, _ = model._follower().advantages(rollout, rollout.minibatch(index), track_critic=track_critic)
    return values


@pytest.fixture(scope="module", params=list(ROLLOUT_ENVS), ids=list(ROLLOUT_ENVS))
def rollout_model(request: pytest.FixtureRequest) -> BLPO:
    return collect_rollout(*ROLLOUT_ENVS[request.param])


def test_rollout_has_episode_boundaries(rollout_model: BLPO) -> None:
    # The comparisons below are only meaningful if the rollout crosses episode ends in several envs.
    starts = rollout_model.rollout_buffer.episode_starts[1:]
    assert (starts.sum(axis=0) > 0).sum() >= 2
    if rollout_model.env.envs[0].spec.id == "Pendulum-v1":
        assert len(rollout_model._truncated_steps) >= 6  # 100 steps per env, time limit 37: two per env


def test_equals_sb3_gae_at_rollout_critic(rollout_model: BLPO) -> None:
    rollout = rollout_model._bilevel_rollout()
    computed = advantages(rollout_model, rollout, th.arange(rollout.size))
    reference = th.as_tensor(rollout_model.rollout_buffer.advantages.swapaxes(0, 1).reshape(-1))
    assert reference.abs().max() > 1.0
    th.testing.assert_close(computed, reference, rtol=1e-5, atol=1e-4)


def test_random_minibatches_match_full_rollout(rollout_model: BLPO) -> None:
    rollout = rollout_model._bilevel_rollout()
    full = advantages(rollout_model, rollout, th.arange(rollout.size))
    generator = th.Generator().manual_seed(0)
    for size in (1, 7, 64, rollout.size):
        index = th.randperm(rollout.size, generator=generator)[:size]
        th.testing.assert_close(advantages(rollout_model, rollout, index), full[index], rtol=1e-6, atol=1e-6)


def reference_from_model(model: BLPO) -> th.Tensor:
    """SB3's GAE recursion (float64) on the model's current critic values, env-major ``(n_envs * n_steps,)``.

    Truncated steps get the timeout bootstrap of the current critic, ``γ·V_w(terminal obs)``, in place of the
    rollout critic's (written as a zero-valued shift at the rollout critic, so that its gradient is kept).
    """
    buffer, policy = model.rollout_buffer, model.policy
    n_envs, n_steps = buffer.n_envs, buffer.buffer_size

    def per_env(array) -> th.Tensor:  # type: ignore[no-untyped-def]
        return th.as_tensor(array.swapaxes(0, 1).reshape(n_envs, n_steps), dtype=DTYPE)

    obs = th.as_tensor(buffer.observations.swapaxes(0, 1).reshape(n_envs * n_steps, -1))
    values = policy.predict_values(obs).to(DTYPE).view(n_envs, n_steps)
    last_values = policy.predict_values(policy.obs_to_tensor(model._last_obs)[0]).to(DTYPE).flatten()
    rewards = per_env(buffer.rewards)
    for env_index, step, terminal_obs in model._truncated_steps:
        terminal_value = policy.predict_values(policy.obs_to_tensor(terminal_obs)[0]).to(DTYPE).squeeze()
        rewards[env_index, step] = rewards[env_index, step] + model.gamma * (terminal_value - terminal_value.detach())
    last_dones = th.as_tensor(model._last_episode_starts, dtype=DTYPE)
    gae = reference_gae(
        rewards, values, last_values, per_env(buffer.episode_starts), last_dones, model.gamma, model.gae_lambda
    )
    return gae.flatten()


def test_critic_gradient_matches_reference(rollout_model: BLPO) -> None:
    model = rollout_model
    rollout = model._bilevel_rollout()
    generator = th.Generator().manual_seed(1)
    index = th.randperm(rollout.size, generator=generator)[:64]
    weights = th.randn(len(index), generator=generator)
    critic = model.policy.critic_parameters()
    computed = advantages(model, rollout, index, track_critic=True)
    grads = th.autograd.grad((weights * computed).sum(), critic)
    reference = reference_from_model(model)[index]
    th.testing.assert_close(computed.to(DTYPE), reference.detach(), rtol=1e-5, atol=1e-4)
    reference_grads = th.autograd.grad((weights.to(DTYPE) * reference).sum(), critic)
    for grad, expected in zip(grads, reference_grads, strict=True):
        assert grad.abs().max() > 0, "every critic parameter influences the advantages"
        th.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-5)
    # Without tracking, the advantages carry no graph (the nested-only ablation).
    assert not advantages(model, rollout, index, track_critic=False).requires_grad


def test_critic_gradient_matches_finite_difference(rollout_model: BLPO) -> None:
    # Along the value head, V is linear in the parameters: a large central step is exact up to float32 rounding.
    model = rollout_model
    rollout = model._bilevel_rollout()
    generator = th.Generator().manual_seed(2)
    index = th.randperm(rollout.size, generator=generator)[:64]
    weights = th.randn(len(index), generator=generator)
    head = list(model.policy.value_net.parameters())
    direction = [th.randn(p.shape, generator=generator) for p in head]

    def objective() -> th.Tensor:
        return (weights * advantages(model, rollout, index, track_critic=True)).sum()

    grads = th.autograd.grad(objective(), head)
    analytic = float(sum((g * d).sum() for g, d in zip(grads, direction, strict=True)))
    eps = 0.5
    saved = [p.detach().clone() for p in head]
    with th.no_grad():
        for p, d in zip(head, direction, strict=True):
            p.add_(eps * d)
        plus = objective()
        for p, d in zip(head, direction, strict=True):
            p.sub_(2 * eps * d)
        minus = objective()
        for p, original in zip(head, saved, strict=True):
            p.copy_(original)  # the rollout fixture is shared
    assert abs(analytic) > 0.1
    assert float((plus - minus) / (2 * eps)) == pytest.approx(analytic, rel=1e-3)


# ---------------------------------------------------------------------------------------------------- float64 unit level


def reference_gae(
    rewards: th.Tensor,
    values: th.Tensor,
    last_values: th.Tensor,
    episode_starts: th.Tensor,
    last_dones: th.Tensor,
    gamma: float,
    gae_lambda: float,
) -> th.Tensor:
    """SB3's GAE recursion (RolloutBuffer.compute_returns_and_advantage), per env, over ``(n_envs, n_steps)``."""
    n_envs, n_steps = rewards.shape
    result = th.zeros_like(rewards)
    for n in range(n_envs):
        last_gae = rewards.new_zeros(())
        for t in reversed(range(n_steps)):
            if t == n_steps - 1:
                next_non_terminal, next_value = 1.0 - last_dones[n], last_values[n]
            else:
                next_non_terminal, next_value = 1.0 - episode_starts[n, t + 1], values[n, t + 1]
            delta = rewards[n, t] + gamma * next_value * next_non_terminal - values[n, t]
            last_gae = delta + gamma * gae_lambda * next_non_terminal * last_gae
            result[n, t] = last_gae
    return result


N_ENVS, N_STEPS, OBS_DIM = 3, 20, 4
GAMMA, LAMBDA = 0.9, 0.8


class SyntheticRollout:
    """Random rewards and observations with episode ends, timeouts, and a small float64 MLP critic."""

    def __init__(self, seed: int = 0) -> None:
        gen = th.Generator().manual_seed(seed)
        self.obs = th.randn(N_ENVS, N_STEPS, OBS_DIM, generator=gen, dtype=DTYPE)
        self.last_obs = th.randn(N_ENVS, OBS_DIM, generator=gen, dtype=DTYPE)
        self.raw_rewards = th.randn(N_ENVS, N_STEPS, generator=gen, dtype=DTYPE)
        self.episode_starts = th.zeros(N_ENVS, N_STEPS, dtype=DTYPE)
        self.episode_starts[:, 0] = 1.0  # as after a reset: must not split anything
        self.episode_starts[0, [5, 6, 13]] = 1.0  # a one-step episode in env 0
        self.episode_starts[2, 19] = 1.0  # the last step starts an episode
        self.last_dones = th.tensor([0.0, 1.0, 0.0], dtype=DTYPE)
        # Truncated steps (a time limit, not a termination): the step before an episode start, and env 1's last step.
        self.truncation_index = th.tensor([[0, 12], [1, 19]])
        self.terminal_obs = th.randn(2, OBS_DIM, generator=gen, dtype=DTYPE)
        self.w1 = th.randn(OBS_DIM, 8, generator=gen, dtype=DTYPE, requires_grad=True)
        self.w2 = th.randn(8, generator=gen, dtype=DTYPE, requires_grad=True)
        with th.no_grad():
            self.old_terminal_values = self.value(self.terminal_obs)
        # SB3 adds γ·V_old(terminal obs) to the stored reward of a truncated step.
        self.rewards = self.raw_rewards.clone()
        self.rewards[self.truncation_index[:, 0], self.truncation_index[:, 1]] += GAMMA * self.old_terminal_values
        self.gae = DifferentiableGAE(self.rewards, self.episode_starts, self.last_dones, GAMMA, LAMBDA, self.truncation_index)

    @property
    def params(self) -> list[th.Tensor]:
        return [self.w1, self.w2]

    def value(self, obs: th.Tensor) -> th.Tensor:
        return th.tanh(obs @ self.w1) @ self.w2

    def advantages(self, env_index: th.Tensor, time_index: th.Tensor) -> th.Tensor:
        td = self.gae.td_errors(
            self.value(self.obs), self.value(self.last_obs), self.value(self.terminal_obs), self.old_terminal_values
        )
        return self.gae.minibatch(td, self.gae.kernel.window(env_index, time_index))

    def all_advantages(self) -> th.Tensor:
        index = th.arange(N_ENVS * N_STEPS)
        return self.advantages(index // N_STEPS, index % N_STEPS).view(N_ENVS, N_STEPS)

    def reference(self) -> th.Tensor:
        # The timeout bootstrap at the current critic: raw reward + γ·V_w(terminal obs).
        rewards = self.raw_rewards.clone()
        rewards[self.truncation_index[:, 0], self.truncation_index[:, 1]] += GAMMA * self.value(self.terminal_obs)
        return reference_gae(
            rewards,
            self.value(self.obs),
            self.value(self.last_obs),
            self.episode_starts,
            self.last_dones,
            GAMMA,
            LAMBDA,
        )


def test_gae_matches_reverse_loop_at_rollout_critic() -> None:
    rollout = SyntheticRollout()
    with th.no_grad():
        th.testing.assert_close(rollout.all_advantages(), rollout.reference(), rtol=1e-12, atol=1e-12)


def test_gae_matches_reverse_loop_at_another_critic() -> None:
    # After the critic moves, the truncated steps' bootstrap follows it (differentiable timeout handling).
    rollout = SyntheticRollout()
    with th.no_grad():
        rollout.w2.add_(0.5)
        th.testing.assert_close(rollout.all_advantages(), rollout.reference(), rtol=1e-12, atol=1e-12)


def test_gae_jacobian_matches_reference_and_finite_differences() -> None:
    rollout = SyntheticRollout(seed=1)
    computed = rollout.all_advantages().flatten()
    reference = rollout.reference().flatten()
    gen = th.Generator().manual_seed(2)
    weights = th.randn(computed.shape, generator=gen, dtype=DTYPE)
    grads = th.autograd.grad((weights * computed).sum(), rollout.params)
    reference_grads = th.autograd.grad((weights * reference).sum(), rollout.params)
    for g, r in zip(grads, reference_grads, strict=True):
        assert g.abs().max() > 1e-3
        th.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    direction = [th.randn(p.shape, generator=gen, dtype=DTYPE) for p in rollout.params]
    analytic = sum((g * d).sum() for g, d in zip(grads, direction, strict=True))
    eps = 1e-6
    with th.no_grad():
        for p, d in zip(rollout.params, direction, strict=True):
            p.add_(eps * d)
        plus = (weights * rollout.all_advantages().flatten()).sum()
        for p, d in zip(rollout.params, direction, strict=True):
            p.sub_(2 * eps * d)
        minus = (weights * rollout.all_advantages().flatten()).sum()
    assert float((plus - minus) / (2 * eps)) == pytest.approx(float(analytic), rel=1e-7)


def test_gae_minibatches_are_exact() -> None:
    rollout = SyntheticRollout(seed=3)
    with th.no_grad():
        full = rollout.all_advantages().flatten()
        gen = th.Generator().manual_seed(4)
        for size in (1, 5, 33, N_ENVS * N_STEPS):
            index = th.randperm(N_ENVS * N_STEPS, generator=gen)[:size]
            th.testing.assert_close(rollout.advantages(index // N_STEPS, index % N_STEPS), full[index], rtol=0, atol=1e-14)


def test_gae_gradient_stays_in_episode() -> None:
    # The advantage of a step depends on the values of its own episode segment (and its bootstrap) only.
    rollout = SyntheticRollout()
    values = rollout.value(rollout.obs).detach().requires_grad_(True)
    td = rollout.gae.td_errors(values, rollout.value(rollout.last_obs).detach())
    advantage = rollout.gae.minibatch(td, rollout.gae.kernel.window(th.tensor([0]), th.tensor([7])))
    (grad,) = th.autograd.grad(advantage.sum(), values)
    nonzero = {(int(n), int(t)) for n, t in grad.nonzero()}
    # Env 0, step 7 lies in the segment [6, 12] (episode starts at 6 and 13): steps 7..12; step 13 is the next episode.
    assert nonzero == {(0, t) for t in range(7, 13)}


# ---------------------------------------------------------------------------------------------------- EpisodeKernel


def reference_rows(
    episode_starts: th.Tensor, env_index: th.Tensor, time_index: th.Tensor, decay: float, future: bool
) -> th.Tensor:
    n_steps = episode_starts.shape[1]
    rows = th.zeros(len(env_index), n_steps, dtype=DTYPE)
    for b, (n, t) in enumerate(zip(env_index.tolist(), time_index.tolist(), strict=True)):
        # The episode segment of (n, t): from the last start at or before t (excluding step 0's flag) to the next.
        start = max([s for s in range(1, t + 1) if episode_starts[n, s] > 0], default=0)
        end = min([s for s in range(t + 1, n_steps) if episode_starts[n, s] > 0], default=n_steps)
        for j in range(start, end):
            if (j >= t) if future else (j < t):
                rows[b, j] = decay ** abs(j - t)
    return rows


@pytest.mark.parametrize("future", [True, False], ids=["future", "past"])
@pytest.mark.parametrize("decay", [1.0, 0.9, 0.72])
def test_episode_kernel_rows(decay: float, future: bool) -> None:
    episode_starts = th.zeros(2, 12, dtype=DTYPE)
    episode_starts[0, [0, 3, 4, 9]] = 1.0
    episode_starts[1, [11]] = 1.0
    kernel = EpisodeKernel(episode_starts)
    env_index = th.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
    time_index = th.tensor([0, 2, 3, 4, 8, 11, 0, 5, 10, 11])
    rows = kernel.window(env_index, time_index).rows(decay, DTYPE, future=future)
    expected = reference_rows(episode_starts, env_index, time_index, decay, future)
    th.testing.assert_close(rows, expected, rtol=1e-12, atol=0.0)
    # Spot checks of the structure: a one-step episode (env 0, step 3) has no past and only itself as future.
    assert rows[2].nonzero().flatten().tolist() == ([3] if future else [])
    # The first step of env 1's long segment sees the whole segment ahead (steps 0..10), nothing behind.
    assert rows[6].nonzero().flatten().tolist() == (list(range(11)) if future else [])


def test_episode_kernel_apply() -> None:
    episode_starts = th.zeros(2, 6, dtype=DTYPE)
    episode_starts[1, 3] = 1.0
    per_step = th.arange(12, dtype=DTYPE).view(2, 6)
    window = EpisodeKernel(episode_starts).window(th.tensor([0, 1, 1]), th.tensor([4, 1, 3]))
    # Future, decay 0.5. Env 0, t=4: 4 + 0.5·5. Env 1 (episodes [0, 2] and [3, 5], values 6..11), t=1: 7 + 0.5·8;
    # t=3: 9 + 0.5·10 + 0.25·11.
    th.testing.assert_close(window.apply(0.5, per_step, future=True), th.tensor([6.5, 11.0, 16.75], dtype=DTYPE))
    # Past, decay 1. Env 0, t=4: 0 + 1 + 2 + 3. Env 1, t=1: 6; t=3: nothing before it in its episode.
    th.testing.assert_close(window.apply(1.0, per_step, future=False), th.tensor([6.0, 6.0, 0.0], dtype=DTYPE))


def test_episode_kernel_rejects_bad_shape() -> None:
    with pytest.raises(ValueError, match="episode_starts"):
        EpisodeKernel(th.zeros(5))


@pytest.mark.parametrize("n_steps", [1, 2, 7, 16, 37, 100])
@pytest.mark.parametrize("decay", [0.0, 0.5, 0.95, 1.0])
@pytest.mark.parametrize("future", [True, False])
def test_blocked_scan_equals_dense_rows(n_steps: int, decay: float, future: bool) -> None:
    """The rollout-wide blocked scan behind KernelWindow.apply equals the dense weight rows, for every entry."""
    generator = th.Generator().manual_seed(n_steps)
    episode_starts = (th.rand(3, n_steps, generator=generator) < 0.15).to(DTYPE)
    kernel = EpisodeKernel(episode_starts)
    per_step = th.randn(3, n_steps, generator=generator, dtype=DTYPE, requires_grad=True)
    env_index, time_index = th.arange(3).repeat_interleave(n_steps), th.arange(n_steps).repeat(3)
    window = kernel.window(env_index, time_index)
    expected = (window.rows(decay, DTYPE, future=future) * per_step.detach()[env_index]).sum(dim=1)
    computed = window.apply(decay, per_step, future=future)
    th.testing.assert_close(computed, expected, rtol=1e-12, atol=1e-12)
    # Differentiable, with the transpose of the same weights.
    weights = th.randn(len(env_index), generator=generator, dtype=DTYPE)
    (gradient,) = th.autograd.grad((weights * computed).sum(), per_step)
    expected_gradient = th.zeros(3, n_steps, dtype=DTYPE).index_put(
        (env_index,), weights.unsqueeze(1) * window.rows(decay, DTYPE, future=future), accumulate=True
    )
    th.testing.assert_close(gradient, expected_gradient, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("starts", ["none", "sparse"])
@pytest.mark.parametrize("future", [True, False])
def test_blocked_scan_float32_long_rollout(starts: str, future: bool) -> None:
    """2048 steps in float32 (46 blocks): one episode over every block, or a few long ones crossing many blocks."""
    generator = th.Generator().manual_seed(7)
    episode_starts = th.zeros(2, 2048)
    if starts == "sparse":
        episode_starts[0, [300, 1500]] = 1.0
        episode_starts[1, 1000] = 1.0
    kernel = EpisodeKernel(episode_starts)
    per_step = th.randn(2, 2048, generator=generator)
    env_index, time_index = th.arange(2).repeat_interleave(2048), th.arange(2048).repeat(2)
    window = kernel.window(env_index, time_index)
    for decay in (0.94, 0.99, 1.0):
        expected = (window.rows(decay, th.float64, future=future) * per_step.double()[env_index]).sum(dim=1)
        computed = window.apply(decay, per_step, future=future).double()
        assert float((computed - expected).abs().max() / expected.abs().max()) < 1e-5


# ------------------------------------------------------------- the steps a minibatch reaches (BLPO evaluates only those)


@pytest.mark.parametrize("future", [True, False], ids=["future", "past"])
def test_reach_is_the_nonzero_pattern_of_the_rows(future: bool) -> None:
    episode_starts = th.zeros(3, 12, dtype=DTYPE)
    episode_starts[0, [0, 3, 4, 9]] = 1.0
    episode_starts[1, [11]] = 1.0
    kernel = EpisodeKernel(episode_starts)
    env_index = th.tensor([0, 0, 0, 0, 1, 1])  # env 2 has no entry: nothing of it is reached
    time_index = th.tensor([2, 3, 7, 5, 4, 11])
    reach = kernel.window(env_index, time_index).reach(future=future)
    rows = reference_rows(episode_starts, env_index, time_index, 0.9, future) != 0
    expected = th.zeros(3, 12, dtype=th.bool)
    for b, env in enumerate(env_index.tolist()):
        expected[env] |= rows[b]
    assert th.equal(reach, expected)
    # Env 0, segment [4, 8] holds entries 5 and 7: the future reach starts at 5, the past one ends before 7.
    assert reach[0, 4:9].tolist() == ([False, True, True, True, True] if future else [True, True, True, False, False])
    assert not reach[2].any()


def test_reached_values_give_the_whole_rollout_advantages_and_gradients(rollout_model: BLPO) -> None:
    rollout, follower = rollout_model._bilevel_rollout(), rollout_model._follower()
    critic = rollout_model._critic_params
    generator = th.Generator().manual_seed(1)
    for size in (1, 9, 40):
        batch = rollout.minibatch(th.randperm(rollout.size, generator=generator)[:size])
        assert not batch.window.reach(future=True).all()  # the test would not compare anything otherwise
        results = []
        for whole_rollout in (True, False):
            advantages, _, values = follower.advantages(rollout, batch, track_critic=True, whole_rollout=whole_rollout)
            weights = th.linspace(-1.0, 1.0, size)  # an arbitrary loss on the advantages
            gradient = th.autograd.grad((weights * advantages).sum(), critic)
            results.append((advantages.detach(), values, th.cat([g.flatten() for g in gradient])))
        for whole, reached in zip(*results, strict=True):
            th.testing.assert_close(reached, whole, rtol=1e-5, atol=1e-6)


def test_reached_ratios_give_the_same_coupled_loss_and_mixed_gradient(rollout_model: BLPO) -> None:
    rollout, actor = rollout_model._bilevel_rollout(), rollout_model._actor_params
    batch = rollout.minibatch(th.randperm(rollout.size, generator=th.Generator().manual_seed(2))[:5])
    saved = [param.detach().clone() for param in actor]
    coupling = rollout_model.coupling
    try:
        with th.no_grad():  # move the actor away from the rollout policy so that the ratios are not all 1
            for param in actor:
                param.add_(0.05 * th.randn_like(param))
        for rollout_model.coupling in ("target", "distribution", "both"):
            follower = rollout_model._follower()
            reach = follower.ratio_reach(batch)
            assert reach is not None and not reach.all()
            results = []
            for ratios in (rollout_model._rollout_ratios(rollout), rollout_model._rollout_ratios(rollout, reach)):
                loss = follower.loss(rollout, batch, ratios)[0]
                gradient = th.autograd.grad(loss, actor, allow_unused=True)
                flat = th.cat([(th.zeros_like(p) if g is None else g).flatten() for g, p in zip(gradient, actor, strict=True)])
                results.append((loss.detach(), flat))
            assert results[0][1].abs().max() > 0
            for whole, reached in zip(*results, strict=True):
                th.testing.assert_close(reached, whole, rtol=1e-5, atol=1e-7)
    finally:
        rollout_model.coupling = coupling
        with th.no_grad():
            for param, value in zip(actor, saved, strict=True):
                param.copy_(value)


def _trained_parameters(
    monkeypatch: pytest.MonkeyPatch, train: Callable[..., th.Tensor], reach: bool, **kwargs: Any
) -> th.Tensor:
    if not reach:
        monkeypatch.setattr(KernelWindow, "reach", lambda self, future: th.ones_like(self.kernel.segment, dtype=th.bool))
    parameters = train(n_steps=128, **kwargs)
    monkeypatch.undo()
    return parameters


@pytest.mark.parametrize(
    ("env_id", "kwargs"),
    [("CartPole-v1", {}), ("Pendulum-v1", {"coupling": "both", "follower_objective": "coupled"})],
)
def test_blpo_update_is_the_same_on_the_reached_steps(
    monkeypatch: pytest.MonkeyPatch, blpo_parameters_after_two_updates: Callable[..., th.Tensor], env_id: str, kwargs: dict
) -> None:
    whole = _trained_parameters(monkeypatch, blpo_parameters_after_two_updates, reach=False, env_id=env_id, **kwargs)
    reached = _trained_parameters(monkeypatch, blpo_parameters_after_two_updates, reach=True, env_id=env_id, **kwargs)
    th.testing.assert_close(reached, whole, rtol=1e-4, atol=1e-5)
