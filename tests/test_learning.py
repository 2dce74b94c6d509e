"""Learning test (slow): BLPO solves CartPole-v1 within 100k steps for 3 seeds.

Run with ``python -m pytest -m slow tests/test_learning.py`` (about 1 minute per seed on one CPU core).
"""

import pytest
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.utils import LinearSchedule

from sb3_blpo import BLPO

CARTPOLE_SETTINGS = dict(
    n_steps=32,
    batch_size=256,
    n_epochs=5,
    gamma=0.98,
    gae_lambda=0.8,
    n_critic_steps=3,
    critic_learning_rate=1e-3,
)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_blpo_solves_cartpole_within_100k_steps(seed):
    env = make_vec_env("CartPole-v1", n_envs=8, seed=seed)
    model = BLPO(
        "MlpPolicy",
        env,
        learning_rate=LinearSchedule(1e-3, 0.0, 1.0),
        clip_range=LinearSchedule(0.2, 0.0, 1.0),
        seed=seed,
        **CARTPOLE_SETTINGS,
    )
    model.learn(100_000)
    eval_env = make_vec_env("CartPole-v1", n_envs=1, seed=1000 + seed)
    mean_return, _ = evaluate_policy(model, eval_env, n_eval_episodes=20, deterministic=True)
    assert mean_return >= 475, f"seed {seed}: mean evaluation return {mean_return:.1f} < 475"
