"""Save/load of BLPO: predictions, both optimizer states, hyperparameters, resumed training, `set_parameters`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch as th
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.utils import LinearSchedule

from sb3_blpo import BLPO
from sb3_blpo.hypergrad import ConjugateGradientSolver, NystromSolver

SMALL = dict(n_steps=64, batch_size=32, n_epochs=2, policy_kwargs=dict(net_arch=[16]))


def trained(env_id: str = "Pendulum-v1", seed: int = 0, **kwargs) -> BLPO:  # type: ignore[no-untyped-def]
    model = BLPO("MlpPolicy", env_id, seed=seed, **{**SMALL, **kwargs})
    model.learn(128)
    return model


def observations(model: BLPO, n: int = 16, seed: int = 3) -> np.ndarray:
    space = model.observation_space
    space.seed(seed)
    return np.stack([space.sample() for _ in range(n)])


def assert_same_state_dict(expected: dict, actual: dict, what: str) -> None:
    """Recursive equality of (optimizer) state dicts, tensors compared exactly."""
    assert type(expected) is type(actual), what
    if isinstance(expected, dict):
        assert expected.keys() == actual.keys(), what
        for key in expected:
            assert_same_state_dict(expected[key], actual[key], f"{what}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(expected) == len(actual), what
        for i, (a, b) in enumerate(zip(expected, actual, strict=True)):
            assert_same_state_dict(a, b, f"{what}[{i}]")
    elif isinstance(expected, th.Tensor):
        assert th.equal(expected, actual), what
    else:
        assert expected == actual, what


def assert_same_predictions(model: BLPO, other: BLPO, obs: np.ndarray) -> None:
    actions, _ = model.predict(obs, deterministic=True)
    other_actions, _ = other.predict(obs, deterministic=True)
    np.testing.assert_array_equal(actions, other_actions)
    obs_tensor = model.policy.obs_to_tensor(obs)[0]
    with th.no_grad():
        values = model.policy.predict_values(obs_tensor)
        other_values = other.policy.predict_values(obs_tensor)
    assert th.equal(values, other_values)


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_save_load_predictions_and_optimizers(tmp_path: Path, env_id: str) -> None:
    model = trained(env_id)
    obs = observations(model)
    model.save(tmp_path / "model.zip")
    loaded = BLPO.load(tmp_path / "model.zip")
    assert_same_predictions(model, loaded, obs)
    for name in ("optimizer", "critic_optimizer"):
        state = getattr(model.policy, name).state_dict()
        # A trained Adam has moments for every parameter: the comparison below is not vacuous.
        assert len(state["state"]) == len(getattr(model.policy, name).param_groups[0]["params"]) > 0
        assert all("exp_avg" in s and s["exp_avg"].abs().sum() > 0 for s in state["state"].values())
        assert_same_state_dict(state, getattr(loaded.policy, name).state_dict(), f"policy.{name}")
    # The loaded optimizers drive the loaded parameters (not stale copies).
    assert {id(p) for p in loaded.policy.optimizer.param_groups[0]["params"]} == {
        id(p) for p in loaded.policy.actor_parameters()
    }
    assert {id(p) for p in loaded.policy.critic_optimizer.param_groups[0]["params"]} == {
        id(p) for p in loaded.policy.critic_parameters()
    }


def test_hyperparameters_restored(tmp_path: Path) -> None:
    critic_learning_rate = LinearSchedule(2e-3, 2e-4, 1.0)
    model = trained(
        ihvp_solver="cg",
        ihvp_kwargs=dict(max_iter=7, damping=0.5, curvature="hessian"),
        n_critic_steps=2,
        critic_learning_rate=critic_learning_rate,
        hypergrad_bound=0.7,
        coupling="both",
        coupling_clip=0.3,
        leader_objective="surrogate",
        actor_advantages="rollout",
        follower_objective="mse",
    )
    model.save(tmp_path / "model.zip")
    loaded = BLPO.load(tmp_path / "model.zip")
    assert loaded.ihvp_solver == "cg"
    assert loaded.ihvp_kwargs == dict(max_iter=7, damping=0.5, curvature="hessian")
    assert loaded._curvature == "hessian"
    assert isinstance(loaded._solver, ConjugateGradientSolver)
    assert (loaded._solver.max_iter, loaded._solver.damping) == (7, 0.5)
    assert loaded.n_critic_steps == 2
    assert loaded.hypergrad_bound == 0.7
    assert (loaded.coupling, loaded.coupling_clip) == ("both", 0.3)
    assert (loaded.leader_objective, loaded.actor_advantages) == ("surrogate", "rollout")
    assert loaded.follower_objective == "mse"
    for progress in (1.0, 0.5, 0.0):
        assert loaded.critic_learning_rate(progress) == pytest.approx(critic_learning_rate(progress))
    assert loaded.policy.critic_optimizer.param_groups[0]["lr"] == model.policy.critic_optimizer.param_groups[0]["lr"]


def test_solver_instance_round_trip(tmp_path: Path) -> None:
    model = trained(ihvp_solver=NystromSolver(rank=3, rho=0.5))
    model.save(tmp_path / "model.zip")
    loaded = BLPO.load(tmp_path / "model.zip", env=model.get_env())
    assert isinstance(loaded._solver, NystromSolver)
    assert (loaded._solver.rank, loaded._solver.rho) == (3, 0.5)
    loaded.learn(64, reset_num_timesteps=False)


def test_resume_training(tmp_path: Path) -> None:
    model = trained()
    model.save(tmp_path / "model.zip")
    loaded = BLPO.load(tmp_path / "model.zip", env=make_vec_env("Pendulum-v1", n_envs=1, seed=5))
    assert (loaded.num_timesteps, loaded._n_updates) == (128, model._n_updates)
    before = {name: p.detach().clone() for name, p in loaded.policy.named_parameters()}
    loaded.learn(128, reset_num_timesteps=False)
    assert loaded.num_timesteps == 256
    assert loaded._n_updates == 2 * model._n_updates
    assert all(not th.equal(before[name], p) for name, p in loaded.policy.named_parameters() if name != "log_std")
    assert all(th.isfinite(p).all() for p in loaded.policy.parameters())
    # Adam continues from the saved moments: its step counters keep counting.
    steps = [float(s["step"]) for s in loaded.policy.critic_optimizer.state_dict()["state"].values()]
    saved_steps = [float(s["step"]) for s in model.policy.critic_optimizer.state_dict()["state"].values()]
    assert steps == [2 * s for s in saved_steps]


def test_load_with_different_env(tmp_path: Path) -> None:
    model = trained("CartPole-v1")
    model.save(tmp_path / "model.zip")
    # Same spaces, different number of envs: a new rollout buffer, same networks.
    loaded = BLPO.load(tmp_path / "model.zip", env=make_vec_env("CartPole-v1", n_envs=2, seed=1))
    assert loaded.n_envs == 2
    obs = observations(model)
    assert_same_predictions(model, loaded, obs)
    loaded.learn(256, reset_num_timesteps=False)
    assert loaded.num_timesteps == 128 + 256
    # Incompatible spaces are refused.
    with pytest.raises(ValueError, match="space"):
        BLPO.load(tmp_path / "model.zip", env=make_vec_env("Pendulum-v1", n_envs=1))


def test_set_parameters_round_trip(tmp_path: Path) -> None:
    model = trained()
    other = BLPO("MlpPolicy", "Pendulum-v1", seed=1, **SMALL)
    obs = observations(model)
    actions, _ = model.predict(obs, deterministic=True)
    assert not np.array_equal(actions, other.predict(obs, deterministic=True)[0])
    parameters = model.get_parameters()
    assert set(parameters) == {"policy", "policy.optimizer", "policy.critic_optimizer"}
    other.set_parameters(parameters, exact_match=True)
    assert_same_predictions(model, other, obs)
    assert_same_state_dict(model.policy.critic_optimizer.state_dict(), other.policy.critic_optimizer.state_dict(), "critic")
    assert_same_state_dict(model.policy.optimizer.state_dict(), other.policy.optimizer.state_dict(), "actor")
    # From a file too.
    fresh = BLPO("MlpPolicy", "Pendulum-v1", seed=2, **SMALL)
    model.save(tmp_path / "model.zip")
    fresh.set_parameters(str(tmp_path / "model.zip"))
    assert_same_predictions(model, fresh, obs)
    fresh.learn(64)
