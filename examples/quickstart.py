"""BLPO on CartPole-v1 with the README's recommended settings: TensorBoard logs in runs/, then the evaluation return."""

import argparse

from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.utils import LinearSchedule

from sb3_blpo import BLPO

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--timesteps", type=int, default=30_000, help="environment steps to train for")
parser.add_argument("--seed", type=int, default=0, help="seed of the training run (evaluation uses seed + 1)")
args = parser.parse_args()

settings = dict(n_steps=32, batch_size=256, n_epochs=5, gamma=0.98, gae_lambda=0.8)
schedules = dict(learning_rate=LinearSchedule(1e-3, 0.0, 1.0), clip_range=LinearSchedule(0.2, 0.0, 1.0))
env = make_vec_env("CartPole-v1", n_envs=8, seed=args.seed)
model = BLPO("MlpPolicy", env, **settings, **schedules, tensorboard_log="runs/", seed=args.seed)
model.learn(total_timesteps=args.timesteps)
eval_env = make_vec_env("CartPole-v1", n_envs=1, seed=args.seed + 1)
mean_return, std_return = evaluate_policy(model, eval_env, n_eval_episodes=10, deterministic=True)
print(f"mean evaluation return over 10 episodes: {mean_return:.1f} +/- {std_return:.1f}")
