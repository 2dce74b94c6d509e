"""HeadReset: the output heads re-initialised at task switches (and periodically), nothing else touched."""

from __future__ import annotations

import gymnasium as gym
import pytest
import torch as th
from stable_baselines3 import DQN, PPO
from stable_baselines3.common.callbacks import BaseCallback

from sb3_blpo import BLPO
from sb3_blpo.callbacks import TASK_SWITCH_INFO_KEY, HeadReset

NET = dict(net_arch=dict(pi=[16, 16], vf=[16, 16]))


class SwitchAt(gym.Wrapper):
    """Flags a task switch on the given global step numbers (1-based), nothing else changes."""

    def __init__(self, env: gym.Env, switch_steps: tuple[int, ...]) -> None:
        super().__init__(env)
        self.switch_steps, self.steps = switch_steps, 0

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.steps += 1
        if self.steps in self.switch_steps:
            info[TASK_SWITCH_INFO_KEY] = True
        return obs, reward, terminated, truncated, info


def state_of(model) -> dict[str, th.Tensor]:
    return {name: p.detach().clone() for name, p in model.policy.named_parameters()}


class ResetProbe(BaseCallback):
    """Placed after a HeadReset: the step at which each reset happened, and the head right after it."""

    def __init__(self, reset: HeadReset) -> None:
        super().__init__()
        self.reset, self.seen, self.steps, self.heads = reset, 0, [], []

    def _on_step(self) -> bool:
        if self.reset.n_resets != self.seen:
            self.seen = self.reset.n_resets
            self.steps.append(self.num_timesteps)
            self.heads.append(self.model.policy.action_net.weight.detach().clone())
        return True


def test_a_task_switch_resets_the_policy_head_at_once_and_nothing_else():
    model = PPO("MlpPolicy", SwitchAt(gym.make("CartPole-v1"), (100,)), n_steps=64, batch_size=32, n_epochs=1, seed=0,
                policy_kwargs=NET)  # fmt: skip
    reset = HeadReset(heads="actor", seed=0)
    probe = ResetProbe(reset)
    model.learn(64, callback=[reset, probe])  # one update: the optimizer has state, the head has moved from its init
    assert reset.n_resets == 0
    before = state_of(model)
    model.learn(64, callback=[reset, probe], reset_num_timesteps=False)  # the switch comes at step 100, mid-rollout
    assert reset.n_resets == 1 and probe.steps == [100]
    # Orthogonal rows with SB3's gain 0.01 for the policy head (the update after the switch has moved it since).
    head = probe.heads[0]
    th.testing.assert_close(head @ head.T, 1e-4 * th.eye(head.shape[0]), atol=1e-9, rtol=0)
    assert not th.equal(before["action_net.weight"], head)
    # What a reset changes: the head, nothing else; and the head's Adam moments are zeroed.
    after = state_of(model)
    reset.reset_heads()
    direct = state_of(model)
    assert {name for name in after if not th.equal(after[name], direct[name])} == {"action_net.weight", "action_net.bias"}
    assert (model.policy.action_net.bias == 0).all()
    for param in model.policy.action_net.parameters():
        state = model.policy.optimizer.state[param]
        assert (state["exp_avg"] == 0).all() and (state["exp_avg_sq"] == 0).all()
    assert (model.policy.optimizer.state[model.policy.value_net.weight]["exp_avg"] != 0).any()


def test_gaussian_policy_gets_its_log_std_back_and_critic_reset_leaves_it():
    model = PPO(
        "MlpPolicy", "Pendulum-v1", n_steps=64, batch_size=32, n_epochs=2, seed=0, policy_kwargs=dict(NET, log_std_init=-0.5)
    )
    model.learn(128)
    assert not th.allclose(model.policy.log_std, th.full_like(model.policy.log_std, -0.5))
    critic = HeadReset(heads="critic", seed=1)
    critic.init_callback(model)
    log_std = model.policy.log_std.detach().clone()
    critic.reset_heads()
    assert th.equal(model.policy.log_std, log_std)
    value_head = model.policy.value_net.weight.detach()
    th.testing.assert_close(value_head @ value_head.T, th.eye(1), atol=1e-6, rtol=0)  # gain 1
    actor = HeadReset(heads="actor", seed=1)
    actor.init_callback(model)
    actor.reset_heads()
    assert th.equal(model.policy.log_std.detach(), th.full_like(log_std, -0.5))


def test_without_orthogonal_init_the_head_gets_pytorch_default_init():
    model = PPO("MlpPolicy", "CartPole-v1", n_steps=32, batch_size=32, seed=0, policy_kwargs=dict(NET, ortho_init=False))
    reset = HeadReset(heads="both", seed=0)
    reset.init_callback(model)
    before = model.policy.action_net.weight.detach().clone()
    reset.reset_heads()
    weight = model.policy.action_net.weight
    assert not th.equal(weight, before)
    bound = 1.0 / 16**0.5  # nn.Linear's kaiming-uniform bound for 16 inputs
    assert weight.abs().max() <= bound and model.policy.action_net.bias.abs().max() <= bound


def test_periodic_resets_and_blpo_critic_optimizer():
    model = BLPO("MlpPolicy", "CartPole-v1", n_steps=32, batch_size=32, n_epochs=1, seed=0, policy_kwargs=NET)
    reset = HeadReset(heads="both", every_n_rollouts=2, seed=0)
    model.learn(5 * 32, callback=reset)
    assert reset.n_resets == 2  # at the starts of rollouts 3 and 5
    reset.reset_heads()
    state = model.policy.critic_optimizer.state[model.policy.value_net.weight]
    assert (state["exp_avg"] == 0).all()
    assert all(th.isfinite(p).all() for p in model.policy.parameters())


def test_notify_task_switch_resets_now_and_bad_input_is_refused():
    model = PPO("MlpPolicy", "CartPole-v1", n_steps=32, batch_size=32, seed=0, policy_kwargs=NET)
    reset = HeadReset()
    reset.init_callback(model)
    before = model.policy.action_net.weight.detach().clone()
    reset.notify_task_switch()
    assert reset.n_resets == 1 and not th.equal(model.policy.action_net.weight, before)
    with pytest.raises(ValueError, match="heads must be one of"):
        HeadReset(heads="policy")
    with pytest.raises(ValueError, match="every_n_rollouts"):
        HeadReset(every_n_rollouts=0)
    with pytest.raises(TypeError, match="on-policy"):
        DQN("MlpPolicy", "CartPole-v1", learning_starts=0).learn(8, callback=HeadReset())
