"""Smoke runs of BLPO across action/observation spaces and SB3 features, mirroring sb3-contrib's test_run.

Every run is tiny (16-unit networks, a few hundred env steps): these tests check that training completes, that the
SB3 features PPO users rely on keep working, and that the `train/*` statistics are logged as finite floats.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from stable_baselines3.common.callbacks import CallbackList, CheckpointCallback, EvalCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.envs import (
    FakeImageEnv,
    IdentityEnv,
    IdentityEnvBox,
    IdentityEnvMultiBinary,
    IdentityEnvMultiDiscrete,
    SimpleMultiObsEnv,
)
from stable_baselines3.common.utils import LinearSchedule
from stable_baselines3.common.vec_env import VecNormalize

from sb3_blpo import BLPO
from sb3_blpo.hypergrad import IHVPResult, IHVPSolver, NystromSolver

SMALL = dict(n_steps=64, batch_size=32, n_epochs=2, policy_kwargs=dict(net_arch=[16]), seed=0)

PPO_KEYS = (
    "entropy_loss",
    "policy_gradient_loss",
    "value_loss",
    "approx_kl",
    "clip_fraction",
    "loss",
    "explained_variance",
    "clip_range",
)
BLPO_KEYS = ("value_loss_before_nested", "seconds_update", "seconds_nested_critic")
IHVP_KEYS = (
    "hypergrad_norm",
    "ihvp_correction_norm",
    "correction_ratio",
    "correction_cosine",
    "correction_bounded_fraction",
    "ihvp_fallbacks",
    "ihvp_clamped_cores",
    "seconds_hypergradient",
    "seconds_ihvp",
    "seconds_mixed_term",
)


def logged(model: BLPO) -> dict[str, float]:
    """The `train/*` values of the last `train()` call (SB3 dumps before training, so they are still pending)."""
    return {key[len("train/") :]: value for key, value in model.logger.name_to_value.items() if key.startswith("train/")}


def assert_train_logs(model: BLPO, keys: tuple[str, ...] = PPO_KEYS + BLPO_KEYS + IHVP_KEYS) -> dict[str, float]:
    values = logged(model)
    missing = [key for key in keys if key not in values]
    assert not missing, f"train/ keys not logged: {missing}; logged: {sorted(values)}"
    for key in keys:
        assert isinstance(values[key], float), f"train/{key} is {type(values[key]).__name__}, not float"
        assert math.isfinite(values[key]), f"train/{key} = {values[key]}"
    return values


def assert_finite_parameters(model: BLPO) -> None:
    for name, param in model.policy.named_parameters():
        assert th.isfinite(param).all(), f"parameter {name} has non-finite entries"


def parameter_copy(model: BLPO) -> dict[str, th.Tensor]:
    return {name: param.detach().clone() for name, param in model.policy.named_parameters()}


def changed(before: dict[str, th.Tensor], model: BLPO, names: list[str] | None = None) -> bool:
    after = dict(model.policy.named_parameters())
    return any(not th.equal(before[name], after[name]) for name in names or list(before))


def actor_names(model: BLPO) -> list[str]:
    ids = {id(p) for p in model.policy.actor_parameters()}
    return [name for name, p in model.policy.named_parameters() if id(p) in ids]


def critic_names(model: BLPO) -> list[str]:
    ids = {id(p) for p in model.policy.critic_parameters()}
    return [name for name, p in model.policy.named_parameters() if id(p) in ids]


# ---------------------------------------------------------------------------------------------------- environments


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_classic_control(env_id: str) -> None:
    model = BLPO("MlpPolicy", env_id, **SMALL)
    before = parameter_copy(model)
    model.learn(256)
    assert model.num_timesteps == 256
    assert changed(before, model, actor_names(model)), "the actor was never updated"
    assert changed(before, model, critic_names(model)), "the critic was never updated"
    assert_finite_parameters(model)
    assert_train_logs(model)


@pytest.mark.parametrize(
    "env",
    [
        IdentityEnv(dim=2, ep_length=16),
        IdentityEnvBox(eps=0.5, ep_length=16),
        IdentityEnvMultiDiscrete(dim=2, ep_length=16),
        IdentityEnvMultiBinary(dim=2, ep_length=16),
    ],
    ids=["Discrete", "Box", "MultiDiscrete", "MultiBinary"],
)
def test_identity_action_spaces(env: gym.Env) -> None:
    model = BLPO("MlpPolicy", env, **SMALL)
    before = parameter_copy(model)
    model.learn(192)
    assert changed(before, model, actor_names(model))
    assert_finite_parameters(model)
    values = assert_train_logs(model)
    if isinstance(env.action_space, gym.spaces.Box):
        assert "std" in values
    # Predictions have the action space's shape and lie in it.
    obs = env.observation_space.sample()
    action, _ = model.predict(obs, deterministic=True)
    assert env.action_space.contains(np.asarray(action, dtype=env.action_space.dtype).reshape(env.action_space.shape))


def test_dict_observations() -> None:
    env = SimpleMultiObsEnv(random_start=False)
    policy_kwargs = dict(net_arch=[16], features_extractor_kwargs=dict(cnn_output_dim=16))
    model = BLPO("MultiInputPolicy", env, n_steps=32, batch_size=16, n_epochs=1, policy_kwargs=policy_kwargs, seed=0)
    # The features extractors are separate: the image CNN of the actor is not the critic's.
    assert model.policy.pi_features_extractor is not model.policy.vf_features_extractor
    before = parameter_copy(model)
    model.learn(64)
    assert changed(before, model, actor_names(model))
    assert changed(before, model, critic_names(model))
    assert_finite_parameters(model)
    assert_train_logs(model)


def test_cnn_policy() -> None:
    env = FakeImageEnv(screen_height=36, screen_width=36, n_channels=1, action_dim=2)
    policy_kwargs = dict(net_arch=[16], features_extractor_kwargs=dict(features_dim=16))
    model = BLPO("CnnPolicy", env, n_steps=32, batch_size=16, n_epochs=1, policy_kwargs=policy_kwargs, seed=0)
    assert model.policy.pi_features_extractor is not model.policy.vf_features_extractor
    before = parameter_copy(model)
    model.learn(64)
    assert changed(before, model, actor_names(model))
    assert_finite_parameters(model)
    assert_train_logs(model)


def test_gsde() -> None:
    model = BLPO("MlpPolicy", "Pendulum-v1", use_sde=True, sde_sample_freq=8, **SMALL)
    assert model.policy.use_sde
    before = parameter_copy(model)
    model.learn(192)
    assert changed(before, model, ["log_std"]), "gSDE's log_std is an actor parameter and must be trained"
    assert_finite_parameters(model)
    assert_train_logs(model)


def test_multiple_envs_with_truncations() -> None:
    # Pendulum with a short time limit: truncated steps in several envs exercise the differentiable timeout bootstrap.
    env = make_vec_env("Pendulum-v1", n_envs=2, seed=0, env_kwargs=dict(max_episode_steps=20))
    model = BLPO("MlpPolicy", env, **SMALL)
    model.learn(256)
    assert_finite_parameters(model)
    assert_train_logs(model)


def test_vec_normalize() -> None:
    env = VecNormalize(make_vec_env("Pendulum-v1", n_envs=2, seed=0), gamma=0.99)
    model = BLPO("MlpPolicy", env, **SMALL)
    model.learn(512)  # 256 steps per env: crosses Pendulum's 200-step time limit with normalized terminal observations
    assert env.obs_rms.count > 500
    assert model.get_vec_normalize_env() is env
    assert_finite_parameters(model)
    assert_train_logs(model)


# ---------------------------------------------------------------------------------------------------- SB3 features


def test_callbacks(tmp_path: Path) -> None:
    eval_env = make_vec_env("CartPole-v1", n_envs=1, seed=1)
    eval_callback = EvalCallback(
        eval_env, eval_freq=64, n_eval_episodes=2, log_path=str(tmp_path / "eval"), best_model_save_path=str(tmp_path)
    )
    checkpoint_callback = CheckpointCallback(save_freq=128, save_path=str(tmp_path / "checkpoints"), name_prefix="blpo")
    model = BLPO("MlpPolicy", "CartPole-v1", **SMALL)
    model.learn(256, callback=CallbackList([eval_callback, checkpoint_callback]))
    assert eval_callback.n_calls == 256
    evaluations = np.load(tmp_path / "eval" / "evaluations.npz")
    assert list(evaluations["timesteps"]) == [64, 128, 192, 256]
    assert (tmp_path / "best_model.zip").is_file()
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert checkpoints == ["blpo_128_steps.zip", "blpo_256_steps.zip"]
    reloaded = BLPO.load(tmp_path / "checkpoints" / "blpo_256_steps.zip")
    assert reloaded.num_timesteps == 256


def test_progress_bar() -> None:
    pytest.importorskip("tqdm")
    pytest.importorskip("rich")
    model = BLPO("MlpPolicy", "CartPole-v1", **SMALL)
    model.learn(128, progress_bar=True)
    assert model.num_timesteps == 128


def test_target_kl_stops_early() -> None:
    n_epochs, n_rollouts = 4, 2
    kwargs = {**SMALL, "n_epochs": n_epochs}
    full = BLPO("MlpPolicy", "CartPole-v1", **kwargs)
    full.learn(64 * n_rollouts)
    assert full._n_updates == n_epochs * n_rollouts
    # The first minibatch is at the rollout policy (KL 0); after one actor step any KL exceeds this threshold.
    stopped = BLPO("MlpPolicy", "CartPole-v1", target_kl=1e-9, **kwargs)
    stopped.learn(64 * n_rollouts)
    assert stopped._n_updates == n_rollouts, "each train() should stop in its first epoch"
    # Early stopping still logs its statistics.
    assert_train_logs(stopped, PPO_KEYS + BLPO_KEYS)


def test_schedules() -> None:
    learning_rate = LinearSchedule(1e-3, 1e-4, 1.0)
    critic_learning_rate = LinearSchedule(2e-3, 2e-4, 1.0)
    clip_range = LinearSchedule(0.3, 0.1, 1.0)
    model = BLPO(
        "MlpPolicy",
        "CartPole-v1",
        learning_rate=learning_rate,
        critic_learning_rate=critic_learning_rate,
        clip_range=clip_range,
        **SMALL,
    )
    assert model.policy.critic_optimizer.param_groups[0]["lr"] == pytest.approx(2e-3)
    model.learn(256)
    # The last train() ran at the progress of the last rollout (num_timesteps = 256 of 256).
    progress = model._current_progress_remaining
    assert progress < 0.5
    values = logged(model)
    assert values["clip_range"] == pytest.approx(clip_range(progress))
    assert values["learning_rate"] == pytest.approx(learning_rate(progress))
    assert values["critic_learning_rate"] == pytest.approx(critic_learning_rate(progress))
    assert model.policy.optimizer.param_groups[0]["lr"] == pytest.approx(learning_rate(progress))
    assert model.policy.critic_optimizer.param_groups[0]["lr"] == pytest.approx(critic_learning_rate(progress))
    assert values["clip_range"] < 0.3


# ---------------------------------------------------------------------------------------------------- BLPO options


@pytest.mark.parametrize(
    ("solver", "ihvp_kwargs"),
    [
        ("nystrom", {}),
        # CG's `tol` is absolute on the squared residual, and ∇w f is ~1e-5 here (normalized advantages make it vanish
        # at the rollout policy): with the default tol=1e-10 CG returns x = 0 on most minibatches.
        ("cg", dict(tol=0.0)),
        ("neumann", {}),
        ("dense", {}),
        (None, {}),
    ],
    ids=["nystrom", "cg", "neumann", "dense", "None"],
)
def test_ihvp_solvers(solver: str | None, ihvp_kwargs: dict) -> None:
    # A tiny critic (CartPole: 4·8 + 8 + 8 + 1 = 49 parameters) keeps the dense solver cheap.
    kwargs = {**SMALL, "policy_kwargs": dict(net_arch=[8])}
    model = BLPO("MlpPolicy", "CartPole-v1", ihvp_solver=solver, ihvp_kwargs=ihvp_kwargs, **kwargs)
    assert sum(p.numel() for p in model.policy.critic_parameters()) == 49
    model.learn(128)
    assert_finite_parameters(model)
    if solver is None:
        values = assert_train_logs(model, PPO_KEYS + BLPO_KEYS)
        assert "ihvp_fallbacks" not in values and "seconds_ihvp" not in values
    else:
        assert model._solver is not None and model._solver.name == solver
        values = assert_train_logs(model)
        assert values["ihvp_fallbacks"] == 0.0
        assert values["seconds_update"] > values["seconds_hypergradient"] > values["seconds_ihvp"] > 0.0
        assert values["seconds_hypergradient"] > values["seconds_mixed_term"] > 0.0
        assert values["seconds_update"] > values["seconds_nested_critic"] > 0.0
        assert values["ihvp_correction_norm"] > 0.0, "the mixed term should give a non-zero correction"
        assert 0.0 <= values["correction_bounded_fraction"] <= 1.0
        assert -1.0 <= values["correction_cosine"] <= 1.0


def test_solver_instance() -> None:
    solver = NystromSolver(rank=3, rho=0.5)
    model = BLPO("MlpPolicy", "CartPole-v1", ihvp_solver=solver, **SMALL)
    assert model._solver is solver
    model.learn(128)
    assert_train_logs(model)


@pytest.mark.parametrize("coupling", ["target", "distribution", "both", "authors_f2"])
def test_coupling_modes(coupling: str) -> None:
    model = BLPO("MlpPolicy", "CartPole-v1", coupling=coupling, **SMALL)
    model.learn(128)
    assert_finite_parameters(model)
    values = assert_train_logs(model)
    assert values["ihvp_correction_norm"] > 0.0


def test_hypergrad_bound() -> None:
    unbounded = BLPO("MlpPolicy", "CartPole-v1", hypergrad_bound=math.inf, **SMALL)
    unbounded.learn(128)
    assert assert_train_logs(unbounded)["correction_bounded_fraction"] == 0.0
    # A zero bound removes the correction: the actor follows ∇θf, exactly as with a zero IHVP (same follower).
    zero = BLPO("MlpPolicy", "CartPole-v1", hypergrad_bound=0.0, **SMALL)
    zero.learn(128)
    assert assert_train_logs(zero)["correction_bounded_fraction"] > 0.5
    no_correction = BLPO("MlpPolicy", "CartPole-v1", ihvp_solver=ZeroSolver(), **SMALL)
    no_correction.learn(128)
    for (name, param), ref in zip(zero.policy.named_parameters(), no_correction.policy.parameters(), strict=True):
        th.testing.assert_close(param, ref, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    # ... whereas the unbounded correction moves the actor elsewhere.
    actor = set(actor_names(unbounded))
    assert any(
        not th.equal(param, ref)
        for (name, param), ref in zip(unbounded.policy.named_parameters(), no_correction.policy.parameters(), strict=True)
        if name in actor
    )


def test_tensorboard(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = BLPO("MlpPolicy", "CartPole-v1", tensorboard_log=str(tmp_path), **SMALL)
    model.learn(256)  # 4 iterations: train/* of iterations 1-3 are written at the following dumps
    run_dir = tmp_path / "BLPO_1"
    assert run_dir.is_dir(), f"runs found: {[p.name for p in tmp_path.iterdir()]}"
    accumulator = EventAccumulator(str(run_dir))
    accumulator.Reload()
    scalars = set(accumulator.Tags()["scalars"])
    for tag in ("train/hypergrad_norm", "train/ihvp_fallbacks", "train/value_loss_before_nested", "rollout/ep_rew_mean"):
        assert tag in scalars, f"{tag} missing; scalars: {sorted(scalars)}"
    hypergrad_norms = [event.value for event in accumulator.Scalars("train/hypergrad_norm")]
    assert len(hypergrad_norms) == 3
    assert all(math.isfinite(v) and v > 0 for v in hypergrad_norms)


# ---------------------------------------------------------------------------------------------------- numerical faults


class NaNSolver(IHVPSolver):
    """An IHVP solver gone wrong: it returns NaN."""

    name = "nan"

    def __init__(self) -> None:
        self.calls = 0

    def solve(self, hvp, v: th.Tensor) -> IHVPResult:  # type: ignore[no-untyped-def]
        self.calls += 1
        return IHVPResult(x=th.full_like(v, math.nan), n_products=0, converged=True)


class ZeroSolver(IHVPSolver):
    """x = 0: the hypergradient is ∇θf, with the follower and every other step of BLPO unchanged."""

    name = "zero"

    def solve(self, hvp, v: th.Tensor) -> IHVPResult:  # type: ignore[no-untyped-def]
        return IHVPResult(x=th.zeros_like(v), n_products=0, converged=True)


def blpo_warnings(caught: list[warnings.WarningMessage]) -> list[warnings.WarningMessage]:
    return [w for w in caught if issubclass(w.category, RuntimeWarning) and str(w.message).startswith("BLPO")]


def test_nan_ihvp_falls_back_to_direct_gradient() -> None:
    solver = NaNSolver()
    model = BLPO("MlpPolicy", "CartPole-v1", ihvp_solver=solver, **SMALL)
    before = parameter_copy(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.learn(128)
    assert len(blpo_warnings(caught)) == 1, "one warning per model, not one per minibatch"
    assert solver.calls == 2 * 2 * 2  # rollouts · epochs · minibatches
    values = logged(model)
    assert values["ihvp_fallbacks"] == 2 * 2, "every minibatch of the last train() fell back"
    assert_finite_parameters(model)
    # The fallback is the plain actor gradient: the actor still learns, exactly as with a zero correction.
    assert changed(before, model, actor_names(model))
    reference = BLPO("MlpPolicy", "CartPole-v1", ihvp_solver=ZeroSolver(), **SMALL)
    reference.learn(128)
    for (name, param), ref in zip(model.policy.named_parameters(), reference.policy.parameters(), strict=True):
        th.testing.assert_close(param, ref, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


class NaNRewardOnce(gym.Wrapper):
    """Returns a NaN reward at one step of the wrapped env's life."""

    def __init__(self, env: gym.Env, at_step: int) -> None:
        super().__init__(env)
        self.at_step = at_step
        self.steps = 0

    def step(self, action):  # type: ignore[no-untyped-def]
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.steps += 1
        return obs, (math.nan if self.steps == self.at_step else reward), terminated, truncated, info


@pytest.mark.parametrize("solver", ["nystrom", None])
def test_nan_reward_keeps_parameters_finite(solver: str | None) -> None:
    env = NaNRewardOnce(gym.make("CartPole-v1"), at_step=40)
    model = BLPO("MlpPolicy", env, ihvp_solver=solver, **SMALL)
    before = parameter_copy(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.learn(64)  # one rollout, with the NaN reward in it
        assert logged(model)["nonfinite_skips"] > 0
        model.learn(128, reset_num_timesteps=False)  # two clean rollouts
    assert len(blpo_warnings(caught)) == 1
    assert np.isnan(model.rollout_buffer.rewards).sum() == 0, "the last rollout is clean"
    assert_finite_parameters(model)
    assert changed(before, model, actor_names(model)), "training goes on after the faulty rollout"
    assert changed(before, model, critic_names(model))
    values = logged(model)
    assert values["nonfinite_skips"] == 0, "the counter is per update"
    for key in ("value_loss", "policy_gradient_loss", "loss"):
        assert math.isfinite(values[key])


@pytest.mark.parametrize("leader_objective", ["improvement", "surrogate"])
@pytest.mark.parametrize("actor_advantages", ["recomputed", "rollout"])
@pytest.mark.parametrize("curvature", ["gauss_newton", "hessian"])
def test_leader_objective_advantages_and_curvature(leader_objective: str, actor_advantages: str, curvature: str) -> None:
    model = BLPO(
        "MlpPolicy",
        "CartPole-v1",
        leader_objective=leader_objective,
        actor_advantages=actor_advantages,
        follower_objective="mse" if actor_advantages == "rollout" else "coupled",
        ihvp_kwargs=dict(curvature=curvature),
        **SMALL,
    )
    model.learn(128)
    assert_finite_parameters(model)
    values = assert_train_logs(model)
    assert values["ihvp_clamped_cores"] >= 0.0
    if curvature == "gauss_newton":
        assert values["ihvp_clamped_cores"] == 0.0  # a Gauss–Newton core is positive semi-definite
