"""Common mistakes get one clear error naming what to do, not a traceback from deep inside SB3, rl-zoo3 or torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from stable_baselines3 import PPO
from stable_baselines3.common.policies import ActorCriticPolicy

from sb3_blpo import BLPO
from sb3_blpo.callbacks import (
    FeatureRankCallback,
    HessianSpectrumCallback,
    PlasticityMonitor,
    PlasticityRegularizer,
    ReDo,
    ShrinkAndPerturb,
    TrainabilityCallback,
)

SB3_BLPO_ROOT = str(Path(__import__("sb3_blpo").__file__).resolve().parents[1])


def zoo(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": SB3_BLPO_ROOT}
    return subprocess.run(
        [sys.executable, "-m", "sb3_blpo.zoo", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_blpo_refuses_sb3_actor_critic_policy_by_name() -> None:
    with pytest.raises(ValueError, match=r"policy must be one of \['CnnPolicy', 'MlpPolicy', 'MultiInputPolicy'\]"):
        BLPO(ActorCriticPolicy, "CartPole-v1")
    with pytest.raises(TypeError, match="got ActorCriticPolicy"):
        BLPO(ActorCriticPolicy, "CartPole-v1")


@pytest.mark.parametrize(
    "callback_class",
    [
        PlasticityMonitor,
        HessianSpectrumCallback,
        FeatureRankCallback,
        TrainabilityCallback,
        PlasticityRegularizer,
        ShrinkAndPerturb,
        ReDo,
    ],
)
def test_passing_a_callback_class_instead_of_an_instance(callback_class: type) -> None:
    model = PPO("MlpPolicy", "CartPole-v1", n_steps=32, batch_size=32, seed=0)
    with pytest.raises(TypeError, match=rf"pass an instance: callback={callback_class.__name__}\(\)"):
        model.learn(32, callback=callback_class)


@pytest.mark.parametrize(
    "conf_file, fragment",
    [("nosuch_config", "is neither a file, a packaged config"), ("nosuch.yml", "no such file")],
)
def test_zoo_mistyped_conf_file(tmp_path: Path, conf_file: str, fragment: str) -> None:
    result = zoo("train", "--algo", "blpo", "--env", "CartPole-v1", "--conf-file", conf_file, "-n", "64", cwd=tmp_path)
    one_line_error(result, f"--conf-file {conf_file!r}", fragment, "blpo, blpo_authors, ppo_plasticity")


def test_zoo_trial_id_that_does_not_exist(tmp_path: Path) -> None:
    import optuna

    storage = tmp_path / "study.log"
    journal = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(storage)))
    study = optuna.create_study(study_name="s", storage=journal)
    study.enqueue_trial({"x": 1.0})
    study.optimize(lambda trial: trial.suggest_float("x", 0, 2), n_trials=2)
    before = storage.read_bytes()
    common = ["train", "--algo", "blpo", "--env", "CartPole-v1", "--storage", str(storage), "-n", "64"]
    one_line_error(
        zoo(*common, "--study-name", "s", "--trial-id", "5", cwd=tmp_path), "--trial-id 5", "has 2 trials (ids: 0 to 1)"
    )
    one_line_error(zoo(*common, "--study-name", "t", "--trial-id", "1", cwd=tmp_path), "--study-name 't'", "['s']")
    one_line_error(
        zoo(*common, "--study-name", "s", "--trial-id", "0", cwd=tmp_path), "--trial-id 0 would be silently ignored"
    )
    assert storage.read_bytes() == before


def test_zoo_package_env_ids_need_no_gym_packages(tmp_path: Path) -> None:
    result = zoo("train", "--algo", "ppo", "--env", "sb3_blpo/PermutedCartPole-v0", "-n", "64", "-f", "logs", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert list((tmp_path / "logs" / "ppo").glob("sb3_blpo-PermutedCartPole-v0_*"))
