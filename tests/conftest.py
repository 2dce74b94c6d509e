"""Test-wide settings (one torch thread per test process: the suite runs with pytest-xdist on 2 cores) and shared
fixtures."""

import os
from collections.abc import Callable

import pytest
import torch as th

os.environ.setdefault("MPLBACKEND", "Agg")
th.set_num_threads(1)


@pytest.fixture
def blpo_parameters_after_two_updates() -> Callable[..., th.Tensor]:
    """``train(env_id, n_steps, **kwargs)``: every policy parameter, flat, of a seeded BLPO after two rollouts of
    ``n_steps`` (minibatches of 16, 2 epochs): what the tests that compare two computation paths compare."""

    def train(env_id: str, n_steps: int, **kwargs: object) -> th.Tensor:
        from sb3_blpo import BLPO

        model = BLPO("MlpPolicy", env_id, n_steps=n_steps, batch_size=16, n_epochs=2, seed=0, device="cpu", **kwargs)
        model.learn(2 * n_steps)
        return th.cat([p.detach().flatten() for p in model.policy.parameters()])

    return train
