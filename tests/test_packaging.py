"""The installed package is complete: a wheel built from the checkout carries the zoo configs (kept once, in
``zoo_hyperparams/``), and an installation of it outside the checkout lists them and trains from them."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from sb3_blpo.zoo.configs import PACKAGED_CONFIGS

REPO_ROOT = Path(__file__).resolve().parents[1]


def run(command: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    # PYTHONPATH would let the checkout shadow the installed wheel.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # No build isolation: the machine has no network for a fresh setuptools; the installed one builds the wheel.
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO_ROOT)], out)
    (path,) = out.glob("sb3_blpo-*.whl")
    return path


def test_wheel_carries_the_one_copy_of_the_zoo_configs(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        shipped = {
            Path(name).name: archive.read(name) for name in archive.namelist() if name.startswith("sb3_blpo/zoo/hyperparams/")
        }
    assert set(shipped) == set(PACKAGED_CONFIGS.values())
    for name, content in shipped.items():
        assert content == (REPO_ROOT / "zoo_hyperparams" / name).read_bytes(), name
    assert not (REPO_ROOT / "sb3_blpo" / "zoo" / "hyperparams").exists(), "the configs are committed once, at the top"


def test_wheel_installed_outside_the_checkout_lists_configs_and_trains(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    # The dependencies (torch, SB3, rl-zoo3) come from this environment; sb3_blpo itself only from the wheel.
    run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], tmp_path)
    python = venv / "bin" / "python"
    run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], tmp_path)
    location = run([str(python), "-c", "import sb3_blpo; print(sb3_blpo.__file__)"], tmp_path).stdout.strip()
    assert Path(location).is_relative_to(venv), location
    config = Path(run([str(venv / "bin" / "sb3-blpo-zoo"), "configs", "blpo"], tmp_path).stdout.strip())
    assert config.is_relative_to(venv) and config.read_bytes() == (REPO_ROOT / "zoo_hyperparams" / "blpo.yml").read_bytes()
    train = [str(venv / "bin" / "sb3-blpo-zoo"), "train", "--algo", "blpo", "--env", "CartPole-v1", "-n", "512"]
    run([*train, "--seed", "0", "--num-threads", "1", "--eval-freq", "-1", "-f", str(tmp_path / "logs")], tmp_path)
    assert list((tmp_path / "logs" / "blpo").glob("CartPole-v1_*/CartPole-v1.zip"))
