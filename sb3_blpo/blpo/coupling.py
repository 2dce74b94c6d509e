"""The follower (critic) objective as an explicit function of the leader (actor), for BLPO's mixed term.

Written as plain MSE to fixed targets, the critic loss has no actor parameters in it and its mixed derivative
``∂²g/∂θ∂w`` is zero. The authors' code replaces it by ad-hoc surrogates ("f2", several inconsistent variants). We use
instead a first-order importance-sampling expansion of the critic objective around the rollout policy (our
derivation, see ``docs/blpo.md``): with clipped ratios ``r_i(θ) = π_θ(a_i|s_i)/π_old(a_i|s_i)``,

    g̃(θ, w) = mean_{t ∈ B} ω_t(θ) · (ỹ_t(θ) − V_w(s_t))²
    ỹ_t(θ)  = y_t + Σ_{l ≥ 0} γ^l (r_{t+l}(θ) − 1) Â_{t+l}      (target part; stops at the episode end)
    ω_t(θ)  = 1 + Σ_{i < t} (r_i(θ) − 1)                          (state-distribution part; from the episode start)

At ``θ = θ_old`` every ratio is 1 and ``g̃`` is exactly the critic MSE, so the nested critic steps are unchanged there.
The sums run over the whole rollout of the entry's env (through :class:`EpisodeKernel`), not only the minibatch.

Pure torch: no Stable-Baselines3 import.
"""

from __future__ import annotations

from typing import Literal

import torch as th

from sb3_blpo.blpo.advantages import KernelWindow

CouplingMode = Literal["target", "distribution", "both"]
COUPLING_MODES: tuple[str, ...] = ("target", "distribution", "both")


def coupled_critic_loss(
    values: th.Tensor,
    targets: th.Tensor,
    ratios: th.Tensor,
    rollout_advantages: th.Tensor,
    window: KernelWindow,
    gamma: float,
    mode: CouplingMode = "target",
    ratio_clip: float = 0.2,
) -> th.Tensor:
    """``g̃(θ, w)`` on a minibatch.

    :param values: ``(B,)`` critic values ``V_w(s_t)`` of the minibatch (graph to ``w``).
    :param targets: ``(B,)`` fixed critic targets ``y_t`` (GAE returns of the rollout critic).
    :param ratios: ``(n_envs, n_steps)`` probability ratios of the current actor on the whole rollout (graph to ``θ``).
    :param rollout_advantages: ``(n_envs, n_steps)`` fixed GAE advantages of the rollout.
    :param window: episode structure of the rollout seen from the minibatch entries.
    :param gamma: discount factor of the target correction.
    :param mode: which θ-dependence to keep: ``"target"`` (how the critic's targets move with the policy),
        ``"distribution"`` (how the visited states move with it) or ``"both"``.
    :param ratio_clip: ratios are clamped to ``[1 − ratio_clip, 1 + ratio_clip]`` (zero gradient outside, as in PPO's
        trust region), which keeps the first-order expansion in the region where it is accurate.
    """
    if mode not in COUPLING_MODES:
        raise ValueError(f"coupling mode must be one of {COUPLING_MODES}, got {mode!r}")
    excess = th.clamp(ratios, 1.0 - ratio_clip, 1.0 + ratio_clip) - 1.0
    shifted_targets = targets
    weights = th.ones_like(targets)
    if mode in ("target", "both"):
        shifted_targets = targets + window.apply(gamma, True, excess * rollout_advantages)
    if mode in ("distribution", "both"):
        # A negative weight would turn the regression into a maximisation; clamp at zero (first-order expansion only).
        weights = th.clamp(1.0 + window.apply(1.0, False, excess), min=0.0)
    return (weights * (shifted_targets - values) ** 2).mean()
