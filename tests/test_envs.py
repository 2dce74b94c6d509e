"""Continual task wrappers (sb3_blpo.envs): schedule, explicit switches, signal to the monitors, determinism, MuJoCo."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import warnings
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

from sb3_blpo.callbacks import TASK_SWITCH_INFO_KEY, HessianSpectrumCallback, TrainabilityCallback
from sb3_blpo.envs import (
    REGISTERED_IDS,
    TASK_ID_INFO_KEY,
    FlippedActions,
    FlippedRewards,
    PermutedObservations,
    SlipperyFriction,
)

FAST_SPECTRUM = dict(lanczos_steps=8, num_probes=2, n_samples=None)
needs_mujoco = pytest.mark.skipif(importlib.util.find_spec("mujoco") is None, reason="needs gymnasium[mujoco]")


def _rollout(env: gym.Env, n_steps: int, seed: int = 0) -> tuple[list[int], list[int], list[Any], list[float]]:
    """Step ``env`` with seeded random actions, resetting at episode ends: flagged steps, task ids, obs, rewards."""
    env.action_space.seed(seed)
    obs, _ = env.reset(seed=seed)
    flagged, tasks, observations, rewards = [], [], [np.asarray(obs).copy()], []
    for step in range(1, n_steps + 1):
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        if info.get(TASK_SWITCH_INFO_KEY):
            flagged.append(step)
        tasks.append(info[TASK_ID_INFO_KEY])
        rewards.append(float(reward))
        observations.append(np.asarray(obs).copy())
        if terminated or truncated:
            obs, _ = env.reset()
            observations.append(np.asarray(obs).copy())
    return flagged, tasks, observations, rewards


@pytest.mark.parametrize(
    "make",
    [
        lambda: PermutedObservations(gym.make("CartPole-v1"), steps_per_task=7),
        lambda: FlippedRewards(gym.make("CartPole-v1"), steps_per_task=7),
        lambda: FlippedActions(gym.make("Pendulum-v1"), steps_per_task=7),
        lambda: gym.make("sb3_blpo/PermutedCartPole-v0", steps_per_task=7),
    ],
)
def test_switches_exactly_on_schedule_across_episodes(make):
    env = make()
    flagged, tasks, _, _ = _rollout(env, 40)  # CartPole episodes end early: the count runs across episodes
    assert flagged == [8, 15, 22, 29, 36]  # the first step of task k is step 7k + 1
    assert tasks == [(step - 1) // 7 for step in range(1, 41)]
    assert env.get_wrapper_attr("env_steps") == 40 and env.get_wrapper_attr("n_switches") == 5


def test_explicit_set_task_via_env_method_and_no_schedule():
    vec_env = DummyVecEnv([lambda: PermutedObservations(gym.make("CartPole-v1")) for _ in range(2)])
    vec_env.seed(0)
    vec_env.reset()
    for _ in range(30):  # steps_per_task=None: never switches by itself
        _, _, _, infos = vec_env.step(np.zeros(2, dtype=np.int64))
        assert not any(TASK_SWITCH_INFO_KEY in info for info in infos)
    vec_env.env_method("set_task", 3)
    _, _, _, infos = vec_env.step(np.zeros(2, dtype=np.int64))
    assert [info.get(TASK_SWITCH_INFO_KEY) for info in infos] == [True, True]
    assert [info[TASK_ID_INFO_KEY] for info in infos] == [3, 3]
    _, _, _, infos = vec_env.step(np.zeros(2, dtype=np.int64))
    assert not any(TASK_SWITCH_INFO_KEY in info for info in infos)
    # Task 3's permutation does not depend on the path taken to it.
    fresh = PermutedObservations(gym.make("CartPole-v1"))
    fresh.set_task(3)
    for permutation in vec_env.get_attr("permutation"):
        np.testing.assert_array_equal(permutation, fresh.permutation)
    vec_env.close()


@pytest.mark.parametrize("vec_env_cls", [DummyVecEnv, SubprocVecEnv])
def test_all_vector_envs_switch_at_the_same_vector_step(vec_env_cls):
    vec_kwargs = dict(start_method="fork") if vec_env_cls is SubprocVecEnv else {}
    vec_env = make_vec_env(
        "sb3_blpo/PermutedCartPole-v0",
        n_envs=3,
        seed=0,  # different env seeds: episodes end at different steps in each copy
        env_kwargs=dict(steps_per_task=10),
        vec_env_cls=vec_env_cls,
        vec_env_kwargs=vec_kwargs,
    )
    vec_env.reset()
    flags: dict[int, list[bool]] = {}
    dones_seen = np.zeros(3, dtype=bool)
    for step in range(1, 36):
        actions = np.array([step % 2, (step // 2) % 2, 1], dtype=np.int64)
        _, _, dones, infos = vec_env.step(actions)
        dones_seen |= dones
        flagged = [bool(info.get(TASK_SWITCH_INFO_KEY)) for info in infos]
        if any(flagged):
            flags[step] = flagged
        assert [info[TASK_ID_INFO_KEY] for info in infos] == [(step - 1) // 10] * 3
    assert dones_seen.any()  # episodes ended in between, and the count went on
    assert flags == {11: [True] * 3, 21: [True] * 3, 31: [True] * 3}
    permutations = vec_env.get_attr("permutation")
    assert all(np.array_equal(permutations[0], other) for other in permutations[1:])  # same schedule in every copy
    vec_env.close()


@pytest.mark.parametrize(
    "steps_per_task, expected_timesteps, expected_samples",
    # 2 envs x 32 steps per rollout; the switch comes within rollout 2 (vector step 49: index 16) / at rollout 3's start
    [(48, 128, 32), (64, 192, 64)],
)
def test_the_switch_signal_reaches_the_monitors_at_the_right_timestep(steps_per_task, expected_timesteps, expected_samples):
    env = make_vec_env("sb3_blpo/PermutedCartPole-v0", n_envs=2, seed=0, env_kwargs=dict(steps_per_task=steps_per_task))
    model = PPO("MlpPolicy", env, n_steps=32, batch_size=32, n_epochs=1, policy_kwargs=dict(net_arch=[8]), seed=0)
    hessian = HessianSpectrumCallback(every_n_rollouts=None, log_density_figure=False, min_task_samples=16, **FAST_SPECTRUM)
    trainability = TrainabilityCallback(spectrum_source=hessian, min_task_samples=16, **FAST_SPECTRUM)
    model.learn(3 * 64, callback=[hessian, trainability])
    assert hessian.n_measurements == 2  # task 0 at the first rollout, task 1 once
    latest = hessian.latest["actor"]
    assert (latest.task_start, latest.task_index, latest.num_timesteps) == (True, 1, expected_timesteps)
    assert latest.n_samples == expected_samples  # drawn only from the new task's transitions, both envs
    assert [(r.task_index, r.num_timesteps) for r in trainability.history] == [
        (0, 64),
        (0, 64),
        (1, expected_timesteps),
        (1, expected_timesteps),
    ]
    env.close()


@pytest.mark.parametrize(
    "make",
    [
        lambda seed: PermutedObservations(gym.make("CartPole-v1"), steps_per_task=15, schedule_seed=seed, sign_flip=True),
        lambda seed: FlippedActions(gym.make("Pendulum-v1"), steps_per_task=15, schedule_seed=seed, scale_range=(0.5, 2)),
        lambda seed: FlippedActions(gym.make("CartPole-v1"), steps_per_task=15, schedule_seed=seed),
        lambda seed: FlippedRewards(gym.make("Pendulum-v1"), steps_per_task=15, schedule_seed=seed, scale_range=(0.5, 2)),
    ],
)
def test_deterministic_under_a_seed(make):
    first, second, other = _rollout(make(0), 60), _rollout(make(0), 60), _rollout(make(1), 60)
    assert first[0] == second[0] == other[0] == [16, 31, 46]
    np.testing.assert_array_equal(np.concatenate(first[2]), np.concatenate(second[2]))
    assert first[3] == second[3]
    # Another schedule seed gives other tasks (same env seed and actions).
    differs = not np.array_equal(np.concatenate(first[2]), np.concatenate(other[2])) or first[3] != other[3]
    assert differs


def test_permuted_observations_permute_and_flip_the_raw_observation():
    base = gym.make("CartPole-v1")
    env = PermutedObservations(gym.make("CartPole-v1"), steps_per_task=5, sign_flip=True)
    raw, _ = base.reset(seed=3)
    obs, _ = env.reset(seed=3)
    np.testing.assert_array_equal(obs, raw[env.permutation] * env.signs)
    old_permutation = env.permutation.copy()
    old_signs = env.signs.copy()
    for _ in range(5):
        raw = base.step(1)[0]
        obs = env.step(1)[0]
    assert env.task == 1 and not np.array_equal(env.permutation, old_permutation)
    np.testing.assert_array_equal(obs, raw[old_permutation] * old_signs)  # the 5th step is task 0's last one
    raw, obs = base.step(1)[0], env.step(1)[0]
    np.testing.assert_array_equal(obs, raw[env.permutation] * env.signs)  # the 6th step, task 1's first one
    assert env.observation_space.shape == (4,) and env.observation_space.contains(obs)


def test_flipped_rewards_alternate_sign_and_flipped_actions_map_actions():
    env = FlippedRewards(gym.make("CartPole-v1"), steps_per_task=3)
    _, _, _, rewards = _rollout(env, 9)
    assert rewards == [1.0] * 3 + [-1.0] * 3 + [1.0] * 3
    discrete = FlippedActions(gym.make("CartPole-v1"))
    assert sorted(discrete.action_permutation.tolist()) == [0, 1]
    box = FlippedActions(gym.make("Pendulum-v1"), scale_range=(3.0, 3.0))
    factor = box.action_factor
    assert np.all(np.abs(factor) == pytest.approx(3.0))
    mapped = box._transform_action(np.array([0.5], dtype=np.float32))
    np.testing.assert_allclose(mapped, np.clip(factor * 0.5, -2.0, 2.0))  # Pendulum's bounds are symmetric: centre 0


@needs_mujoco
def test_slippery_friction_changes_the_mujoco_model_and_the_contacts():
    env = gym.make("sb3_blpo/SlipperyHopper-v0", steps_per_task=20)
    wrapper = env.get_wrapper_attr("task_friction").__self__
    model, data = env.unwrapped.model, env.unwrapped.data
    floor = wrapper.floor_geom_id
    assert floor == 0 and model.geom(floor).name == "floor"
    assert model.geom_priority[floor] > np.max(np.delete(model.geom_priority, floor))
    expected = [wrapper.task_friction(k) for k in range(3)]
    assert all(0.02 <= value <= 2.0 for value in expected) and len(set(expected)) == 3
    torsional = model.geom_friction[floor, 1:].copy()
    env.reset(seed=0)
    seen, contact_frictions = [], []
    for _ in range(45):
        seen.append(float(model.geom_friction[floor, 0]))
        task = wrapper.task
        env.step(np.zeros(env.action_space.shape))
        contact_frictions += [
            (task, float(data.contact.friction[i][0]))
            for i in range(data.ncon)
            if floor in (data.contact.geom1[i], data.contact.geom2[i])
        ]
    assert seen == [expected[0]] * 20 + [expected[1]] * 20 + [expected[2]] * 5
    np.testing.assert_array_equal(model.geom_friction[floor, 1:], torsional)  # only the sliding component changes
    assert {task for task, _ in contact_frictions} == {0, 1, 2}  # the hopper touched the floor under every task,
    assert all(friction == pytest.approx(expected[task]) for task, friction in contact_frictions)  # at its friction
    # The same schedule seed gives the same friction sequence in every copy; another seed another sequence.
    assert SlipperyFriction(gym.make("Hopper-v5")).task_friction(1) == expected[1]
    assert SlipperyFriction(gym.make("Hopper-v5"), schedule_seed=1).task_friction(1) != expected[1]
    env.close()


@needs_mujoco
def test_registered_ids_make_and_step():
    assert set(REGISTERED_IDS) >= {
        "sb3_blpo/SlipperyAnt-v0",
        "sb3_blpo/SlipperyHalfCheetah-v0",
        "sb3_blpo/SlipperyHopper-v0",
        "sb3_blpo/PermutedCartPole-v0",
        "sb3_blpo/PermutedPendulum-v0",
    }
    for env_id in REGISTERED_IDS:
        env = gym.make(env_id, schedule_seed=2)
        env.reset(seed=0)
        _, _, _, _, info = env.step(env.action_space.sample())
        assert info[TASK_ID_INFO_KEY] == 0 and env.get_wrapper_attr("schedule_seed") == 2
        env.close()
    assert gym.make("sb3_blpo/SlipperyAnt-v0").get_wrapper_attr("steps_per_task") == 2_000_000


def test_wrappers_pass_the_gymnasium_env_checker():
    from gymnasium.utils.env_checker import check_env

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_env(PermutedObservations(gym.make("CartPole-v1").unwrapped, sign_flip=True), skip_render_check=True)
        check_env(FlippedActions(gym.make("Pendulum-v1").unwrapped), skip_render_check=True)
        check_env(FlippedRewards(gym.make("CartPole-v1").unwrapped), skip_render_check=True)


def test_importing_the_package_does_not_import_mujoco():
    code = "import sys, sb3_blpo, sb3_blpo.envs; assert 'mujoco' not in sys.modules, 'mujoco imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def _slippery(**kwargs: Any) -> SlipperyFriction:
    return SlipperyFriction(gym.make("Hopper-v5"), **kwargs)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: PermutedObservations(gym.make("CartPole-v1"), steps_per_task=0), "steps_per_task"),
        (lambda: PermutedObservations(gym.make("CartPole-v1"), steps_per_task=2.5), "steps_per_task"),
        (lambda: FlippedRewards(gym.make("CartPole-v1"), schedule_seed=-1), "schedule_seed"),
        (lambda: FlippedRewards(gym.make("CartPole-v1"), scale_range=(0.0, 1.0)), "scale_range"),
        (lambda: FlippedActions(gym.make("CartPole-v1"), scale_range=(2.0, 1.0)), "scale_range"),
        (lambda: PermutedObservations(gym.make("FrozenLake-v1")), "observation space"),
        (lambda: SlipperyFriction(gym.make("CartPole-v1")), "MuJoCo"),
        pytest.param(lambda: _slippery(friction_range=(0.0, 2.0)), "friction_range", marks=needs_mujoco),
        pytest.param(lambda: _slippery(friction_range=(2.0, 0.02)), "friction_range", marks=needs_mujoco),
        pytest.param(lambda: _slippery(friction_range=(0.02, float("inf"))), "friction_range", marks=needs_mujoco),
        pytest.param(lambda: _slippery(friction_range=0.5), "friction_range", marks=needs_mujoco),
        pytest.param(lambda: _slippery(floor_geom="ground"), "floor_geom", marks=needs_mujoco),
        pytest.param(lambda: _slippery(floor_geom=99), "floor_geom", marks=needs_mujoco),
        (lambda: gym.make("sb3_blpo/PermutedCartPole-v0", steps_per_task=-3), "steps_per_task"),
        (lambda: PermutedObservations(gym.make("CartPole-v1")).set_task(-1), "task"),
    ],
)
def test_bad_input_raises_value_error_naming_the_parameter(make, match):
    with pytest.raises(ValueError, match=match):
        make()
