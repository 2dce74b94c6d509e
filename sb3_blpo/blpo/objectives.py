"""BLPO's leader (actor) objective, written once: the clipped surrogate in its plain or improvement form.

With ratios ``r_t = π_θ(a_t|s_t)/π_old(a_t|s_t)`` and advantages ``Â_t`` (a function of the critic ``w``),

    surrogate    f(θ, w)     = −mean_B min(r_t Â_t, clip(r_t, 1 ± ε) Â_t)
    improvement  f_imp(θ, w) = f(θ, w) + mean_B Â_t  = −mean_B [ min(r_t Â_t, clip(r_t) Â_t) − Â_t ]

Both have the same ``∇θ``. They differ in ``∇w``: ``∇w f_imp = −mean_B (r_t − 1) ∂Â_t/∂w`` (``clip(r_t) − 1`` where the
clip is active) vanishes at ``θ = θ_old``. With a critic that best-responds to ``π_θ`` the population value of ``f`` is
identically zero (a policy's advantages under its own value function average to zero), so the bilevel objective
built on ``f`` has no useful total derivative, while that of ``f_imp`` is ``(1 − γ)(J(π_old) − J(π_θ))`` exactly (the
reverse performance-difference lemma). Derivation and tests: ``docs/blpo.md``, ``tests/test_leader_objective.py``.

Pure torch: no Stable-Baselines3 import (the clipped surrogate is :mod:`sb3_blpo.common.surrogate`'s).
"""

from __future__ import annotations

from typing import Literal

import torch as th

from sb3_blpo.common.surrogate import clipped_surrogate

LeaderObjective = Literal["improvement", "surrogate"]
LEADER_OBJECTIVES: tuple[str, ...] = ("improvement", "surrogate")

__all__ = ["LEADER_OBJECTIVES", "LeaderObjective", "clipped_surrogate", "leader_loss"]


def leader_loss(
    ratio: th.Tensor, advantages: th.Tensor, clip_range: float, objective: LeaderObjective = "improvement"
) -> th.Tensor:
    """The leader's loss on a minibatch (to be minimised): ``f`` (``"surrogate"``) or ``f_imp`` (``"improvement"``).

    :param ratio: ``(B,)`` probability ratios (graph to θ).
    :param advantages: ``(B,)`` advantages (graph to the critic where ``∇w`` is wanted).
    :param clip_range: PPO's ``ε``.
    :param objective: ``"improvement"`` or ``"surrogate"``.
    """
    if objective not in LEADER_OBJECTIVES:
        raise ValueError(f"objective must be one of {LEADER_OBJECTIVES}, got {objective!r}")
    surrogate = clipped_surrogate(ratio, advantages, clip_range)
    if objective == "improvement":
        surrogate = surrogate - advantages
    return -surrogate.mean()
