"""The monitors on sb3-contrib's RecurrentPPO: every sampled transition carries the LSTM states stored with it.

Checked against the rollout itself (the log-probabilities and values recorded during collection are reproduced), the
parameter split against the policy's modules, the Hessian against a dense double-backward oracle of the same loss, and
the LSTM features against a direct pass through the LSTM.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch as th
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env

from sb3_blpo.callbacks import FeatureRankCallback, HessianSpectrumCallback
from sb3_blpo.common.model_view import OnPolicyModelView
from sb3_blpo.common.rollout import RecurrentStates

sb3_contrib = pytest.importorskip("sb3_contrib")


def make(n_lstm_layers: int = 2, lstm_hidden_size: int = 6, **policy_kwargs: Any) -> Any:
    kwargs = dict(
        lstm_hidden_size=lstm_hidden_size, n_lstm_layers=n_lstm_layers, net_arch=dict(pi=[5], vf=[5]), **policy_kwargs
    )
    env = make_vec_env("CartPole-v1", n_envs=2, seed=0)
    return sb3_contrib.RecurrentPPO("MlpLstmPolicy", env, n_steps=48, batch_size=32, seed=0, policy_kwargs=kwargs)


class AtRolloutEnd(BaseCallback):
    """Runs ``check(model)`` once, where the monitors measure: the rollout is complete and no update has used it."""

    def __init__(self, check: Any) -> None:
        super().__init__()
        self.check, self.done = check, False

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        if not self.done:
            self.check(self.model)
            self.done = True


def run_at_rollout_end(model: Any, check: Any) -> None:
    callback = AtRolloutEnd(check)
    model.learn(model.n_steps * model.n_envs, callback=callback)
    assert callback.done


@pytest.mark.parametrize("policy_kwargs", [{}, {"shared_lstm": True, "enable_critic_lstm": False}])
def test_batches_reproduce_the_rollout_from_the_stored_lstm_states(policy_kwargs):
    def check(model: Any) -> None:
        view = OnPolicyModelView(model)
        batch = view.sample_batch(None, th.Generator().manual_seed(0))
        assert isinstance(batch.recurrent, RecurrentStates)
        assert batch.recurrent.actor[0].shape == (2, batch.size, 6)
        assert bool(batch.recurrent.episode_starts.any()), "the rollout should contain episode starts"
        with th.no_grad():
            log_prob = view.losses.distribution(batch).log_prob(batch.actions)
        # The policy that collected the rollout, from the states it had then: the recorded numbers come back.
        th.testing.assert_close(log_prob, batch.old_log_prob, atol=1e-5, rtol=1e-5)
        reader = view.rollout()
        with th.no_grad():  # the whole rollout in the reader's env-major order, as the recorded values are read
            values = view.losses.values(reader.batch())
        th.testing.assert_close(values, reader.flat(model.rollout_buffer.values), atol=1e-5, rtol=1e-5)
        # The states matter: from zero states (a new episode everywhere) the log-probabilities differ.
        zero = RecurrentStates(
            actor=tuple(th.zeros_like(s) for s in batch.recurrent.actor),  # type: ignore[arg-type]
            critic=tuple(th.zeros_like(s) for s in batch.recurrent.critic),  # type: ignore[arg-type]
            episode_starts=th.zeros_like(batch.recurrent.episode_starts),
        )
        with th.no_grad():
            other = view.losses.distribution(type(batch)(**{**batch.__dict__, "recurrent": zero})).log_prob(batch.actions)
        assert not th.allclose(other, batch.old_log_prob, atol=1e-4)

    run_at_rollout_end(make(**policy_kwargs), check)


def test_lstm_states_are_read_the_same_after_the_buffer_is_flattened():
    def check(model: Any) -> None:
        view = OnPolicyModelView(model)
        before = view.rollout().batch()
        list(model.rollout_buffer.get(batch_size=None))  # sb3-contrib swaps and flattens the fields in place
        after = view.rollout().batch()
        assert before.recurrent is not None and after.recurrent is not None
        old_states = before.recurrent.actor + before.recurrent.critic
        for first, second in zip(old_states, after.recurrent.actor + after.recurrent.critic, strict=True):
            th.testing.assert_close(first, second)
        th.testing.assert_close(before.recurrent.episode_starts, after.recurrent.episode_starts)

    run_at_rollout_end(make(), check)


@pytest.mark.parametrize(
    ("policy_kwargs", "critic_module"),
    [
        ({}, "lstm_critic"),
        ({"shared_lstm": True, "enable_critic_lstm": False}, None),
        ({"enable_critic_lstm": False}, "critic"),
    ],
)
def test_parameter_groups_split_the_lstms(policy_kwargs, critic_module):
    model = make(**policy_kwargs)
    view = OnPolicyModelView(model)
    actor, critic = {id(p) for p in view.parameters("actor")}, {id(p) for p in view.parameters("critic")}
    policy = model.policy
    assert {id(p) for p in policy.lstm_actor.parameters()} <= actor
    assert not {id(p) for p in policy.lstm_actor.parameters()} & critic  # a shared LSTM feeds the critic detached
    if critic_module is not None:
        assert {id(p) for p in getattr(policy, critic_module).parameters()} <= critic
    assert actor | critic == {id(p) for p in policy.parameters()}, "every parameter belongs to a side"


def dense_hessian(loss: th.Tensor, params: list[th.Tensor]) -> th.Tensor:
    """Row by row, by double backward (the oracle; torch.func has no rule for the fused LSTM)."""
    gradient = th.cat([g.reshape(-1) for g in th.autograd.grad(loss, params, create_graph=True)])
    rows = [th.cat([h.reshape(-1) for h in th.autograd.grad(g, params, retain_graph=True)]) for g in gradient]
    return th.stack(rows)


@pytest.mark.parametrize("group", ["actor", "critic"])
def test_hessian_extremes_match_the_dense_hessian_of_the_same_loss(group):
    measured: dict[str, Any] = {}

    def check(model: Any) -> None:
        hessian = HessianSpectrumCallback(parameter_groups=(group,), n_samples=None, lanczos_steps=60, num_probes=1)
        hessian.init_callback(model)
        measurement = hessian.measure()[group]
        view = hessian.access
        batch = view.sample_batch(None, th.Generator().manual_seed(0))
        params = view.parameters(group)
        with th.enable_grad():
            matrix = dense_hessian(view.loss(group, batch), params).double()
        eigenvalues = th.linalg.eigvalsh((matrix + matrix.T) / 2)
        measured.update(
            summary=measurement.summary, exact=(float(eigenvalues.max()), float(eigenvalues.min())), size=matrix.shape[0]
        )

    run_at_rollout_end(make(n_lstm_layers=1, lstm_hidden_size=4), check)
    lambda_max, lambda_min = measured["exact"]
    assert measured["size"] > 60  # Lanczos cannot just span the whole space
    scale = max(abs(lambda_max), abs(lambda_min))
    assert measured["summary"].lambda_max == pytest.approx(lambda_max, abs=1e-3 * scale)
    assert measured["summary"].lambda_min == pytest.approx(lambda_min, abs=1e-3 * scale)


def test_feature_ranks_include_the_lstm_outputs_read_from_the_stored_states():
    features = FeatureRankCallback(n_samples=None)
    outputs: dict[str, th.Tensor] = {}

    def check(model: Any) -> None:
        features.init_callback(model)
        view = features.access
        batch = view.sample_batch(None, th.Generator().manual_seed(0))
        assert batch.recurrent is not None
        outputs.update(view.features(batch.observations, ["pi_lstm", "vf_lstm", "pi0"], recurrent=batch.recurrent))
        policy = model.policy
        starts = batch.recurrent.episode_starts.view(1, -1, 1)
        state = tuple((1.0 - starts) * s for s in batch.recurrent.actor)
        with th.no_grad():
            direct, _ = policy.lstm_actor(policy.extract_features(batch.observations)[None], state)
        outputs["direct"] = direct[0]
        with pytest.raises(ValueError, match=r"recurrent=batch\.recurrent"):
            view.features(batch.observations, ["pi0"])

    model = make()
    run_at_rollout_end(model, check)
    assert set(features.layers) == {"pi_lstm", "vf_lstm", "pi0", "vf0"}
    th.testing.assert_close(outputs["pi_lstm"], outputs["direct"])
    assert outputs["pi0"].shape == (model.n_steps * model.n_envs, 5)
    model.learn(2 * model.n_steps * model.n_envs, callback=features)
    assert features.n_measurements > 0 and np.isfinite(features.latest["pi_lstm"]["erank"])
