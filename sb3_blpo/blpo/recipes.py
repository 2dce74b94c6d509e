"""Settings that reproduce published BLPO code rather than this package's defaults."""

from __future__ import annotations

import math
from typing import Any

from sb3_blpo._validation import check_one_of
from sb3_blpo.blpo.coupling import AUTHORS_F2


def authors_recipe(env_kind: str = "discrete") -> dict[str, Any]:
    """Keyword arguments that reproduce the BLPO authors' public code (arXiv:2505.11714), not our default.

    The plain PPO surrogate as leader objective (no advantage normalisation, no entropy bonus), their prefix-mean
    surrogate f2 for the mixed term (``CLIP_F`` 0.5), the Hessian of the critic MSE inverted by column-sampling
    Nyström with rank 5 (no refinement), the ``+I`` core (jitter 1) and ρ = 50, their learning rates, nested steps
    and bound (their later configs: bound 1.0 everywhere; 5 nested steps for discrete, 3 for continuous control),
    4 epochs, γ 0.99, λ 0.95, clip 0.2, no gradient clipping and Adam's ε = 1e-5. Rollout shape (``n_envs``,
    ``n_steps``, ``batch_size``) is the env's: they used one trajectory per minibatch. Usage:
    ``BLPO("MlpPolicy", env, **BLPO.authors_recipe("discrete"))``.

    :param env_kind: ``"discrete"`` (their gymnax settings: CartPole, Acrobot) or ``"continuous"`` (Brax settings)
    :return: a fresh dict of keyword arguments
    """
    check_one_of("env_kind", env_kind, ("discrete", "continuous"))
    discrete = env_kind == "discrete"
    return dict(
        learning_rate=2.5e-4 if discrete else 3e-4,
        critic_learning_rate=1e-3 if discrete else 1.2e-3,
        n_critic_steps=5 if discrete else 3,
        n_epochs=4,
        gamma=0.99,
        gae_lambda=0.95,
        clip_range=0.2,
        normalize_advantage=False,
        ent_coef=0.0,
        max_grad_norm=math.inf,
        leader_objective="surrogate",
        actor_advantages="recomputed",
        coupling=AUTHORS_F2,
        coupling_clip=0.5,
        ihvp_solver="nystrom",
        ihvp_kwargs=dict(rank=5, rho=50.0, jitter=1.0, sketch="columns", pcg_steps=0, curvature="hessian"),
        hypergrad_bound=1.0,
        policy_kwargs=dict(optimizer_kwargs=dict(eps=1e-5)),
    )
