"""Bad hyperparameters fail at construction with a `ValueError` that names the parameter; boundary values pass."""

from __future__ import annotations

import math
import re
from typing import Any

import pytest
from stable_baselines3.common.env_util import make_vec_env

from sb3_blpo import BLPO
from sb3_blpo.hypergrad import NystromSolver

# CartPole with a 4-unit critic: 4·4 + 4 (hidden) + 4 + 1 (head) = 25 critic parameters.
CRITIC_PARAMS = 25
BASE: dict[str, Any] = dict(n_steps=32, batch_size=16, policy_kwargs=dict(net_arch=[4]))


def make(**kwargs: Any) -> BLPO:
    return BLPO("MlpPolicy", "CartPole-v1", **{**BASE, **kwargs})


INVALID = {
    "n_critic_steps negative": (dict(n_critic_steps=-1), "n_critic_steps"),
    "n_critic_steps zero": (dict(n_critic_steps=0), "n_critic_steps"),
    "n_critic_steps non-integer": (dict(n_critic_steps=2.5), "n_critic_steps"),
    "n_critic_steps integral float": (dict(n_critic_steps=2.0), "n_critic_steps"),
    "n_critic_steps bool": (dict(n_critic_steps=True), "n_critic_steps"),
    "unknown solver": (dict(ihvp_solver="newton"), "solver"),
    "rank zero": (dict(ihvp_kwargs=dict(rank=0)), "rank"),
    "rank above critic size": (dict(ihvp_kwargs=dict(rank=CRITIC_PARAMS + 1)), "rank"),
    "solver instance rank above critic size": (dict(ihvp_solver=NystromSolver(rank=CRITIC_PARAMS + 1)), "rank"),
    "rho zero": (dict(ihvp_kwargs=dict(rho=0.0)), "rho"),
    "rho negative": (dict(ihvp_kwargs=dict(rho=-1.0)), "rho"),
    "hypergrad_bound negative": (dict(hypergrad_bound=-0.1), "hypergrad_bound"),
    "hypergrad_bound nan": (dict(hypergrad_bound=math.nan), "hypergrad_bound"),
    "batch_size above rollout": (dict(batch_size=33), "batch_size"),
    "batch_size zero": (dict(batch_size=0), "batch_size"),
    "unknown coupling": (dict(coupling="value"), "coupling"),
    "coupling_clip zero": (dict(coupling_clip=0.0), "coupling_clip"),
    "coupling_clip negative": (dict(coupling_clip=-0.2), "coupling_clip"),
    "n_epochs zero": (dict(n_epochs=0), "n_epochs"),
    "n_steps zero": (dict(n_steps=0), "n_steps"),
    "gamma above one": (dict(gamma=1.01), "gamma"),
    "gae_lambda above one": (dict(gae_lambda=1.5), "gae_lambda"),
    "learning_rate negative": (dict(learning_rate=-3e-4), "learning_rate"),
    "learning_rate zero": (dict(learning_rate=0.0), "learning_rate"),
    "critic_learning_rate negative": (dict(critic_learning_rate=-1e-3), "critic_learning_rate"),
    "clip_range negative": (dict(clip_range=-0.2), "clip_range"),
    "target_kl zero": (dict(target_kl=0.0), "target_kl"),
    "max_grad_norm zero": (dict(max_grad_norm=0.0), "max_grad_norm"),
    "ent_coef nan": (dict(ent_coef=math.nan), "ent_coef"),
    "unknown ihvp_kwargs key": (dict(ihvp_kwargs=dict(rnak=3)), "rnak"),
    "ihvp_kwargs of another solver": (dict(ihvp_solver="cg", ihvp_kwargs=dict(rank=3)), "rank"),
    "ihvp_kwargs without solver": (dict(ihvp_solver=None, ihvp_kwargs=dict(rank=3)), "rank"),
    "ihvp_kwargs with solver instance": (dict(ihvp_solver=NystromSolver(), ihvp_kwargs=dict(rank=3)), "rank"),
    "unknown nystrom sketch": (dict(ihvp_kwargs=dict(sketch="rows")), "sketch"),
    "nystrom pcg_steps negative": (dict(ihvp_kwargs=dict(pcg_steps=-1)), "pcg_steps"),
    "nystrom pcg_steps non-integer": (dict(ihvp_kwargs=dict(pcg_steps=1.5)), "pcg_steps"),
    "cg max_iter zero": (dict(ihvp_solver="cg", ihvp_kwargs=dict(max_iter=0)), "max_iter"),
    "neumann alpha negative": (dict(ihvp_solver="neumann", ihvp_kwargs=dict(alpha=-0.1)), "alpha"),
    "share_features_extractor": (
        dict(policy_kwargs=dict(net_arch=[4], share_features_extractor=True)),
        "share_features_extractor",
    ),
}


@pytest.mark.parametrize(("kwargs", "name"), list(INVALID.values()), ids=list(INVALID))
def test_invalid_hyperparameter(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=re.escape(name)):
        make(**kwargs)


def test_batch_size_checked_against_all_envs() -> None:
    env = make_vec_env("CartPole-v1", n_envs=2)
    BLPO("MlpPolicy", env, n_steps=16, batch_size=32, policy_kwargs=dict(net_arch=[4]))
    with pytest.raises(ValueError, match="batch_size"):
        BLPO("MlpPolicy", env, n_steps=16, batch_size=33, policy_kwargs=dict(net_arch=[4]))


def test_type_errors_are_also_type_errors() -> None:
    # Hyperparameters of the wrong type raise an error catchable as TypeError too (and as ValueError).
    with pytest.raises(TypeError, match="n_critic_steps"):
        make(n_critic_steps=2.5)
    with pytest.raises(TypeError, match="hypergrad_bound"):
        make(hypergrad_bound="1.0")
    with pytest.raises(TypeError, match="ihvp_solver"):
        make(ihvp_solver=3)


def test_errors_come_before_the_networks() -> None:
    # The checks run at construction, before any env step: no rollout was collected.
    with pytest.raises(ValueError, match="n_critic_steps"):
        BLPO("MlpPolicy", "CartPole-v1", n_critic_steps=0, _init_setup_model=False)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(n_critic_steps=1),
        dict(ihvp_kwargs=dict(rank=1)),
        dict(ihvp_kwargs=dict(rank=CRITIC_PARAMS)),
        dict(ihvp_kwargs=dict(rho=1e-6)),
        dict(hypergrad_bound=0.0),
        dict(hypergrad_bound=math.inf),
        dict(batch_size=32),  # the whole rollout in one minibatch
        dict(gamma=1.0),
        dict(gae_lambda=0.0),
        dict(coupling="both", coupling_clip=1.0),
        dict(ihvp_solver="NYSTROM"),
        dict(ihvp_solver=None),
        dict(max_grad_norm=math.inf),
        dict(policy_kwargs=dict(net_arch=[4], share_features_extractor=False)),
    ],
    ids=str,
)
def test_boundary_values_accepted(kwargs: dict[str, Any]) -> None:
    model = make(**kwargs)
    model.learn(32)
    assert model.num_timesteps == 32


def test_critic_parameter_count() -> None:
    # The rank tests above rely on this count.
    assert sum(p.numel() for p in make().policy.critic_parameters()) == CRITIC_PARAMS
