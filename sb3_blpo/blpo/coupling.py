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

from typing import Any, Literal

import torch as th

from sb3_blpo.blpo.advantages import KernelWindow

CouplingMode = Literal["target", "distribution", "both", "authors_f2"]
#: Modes of the coupled critic objective ``g̃`` (our derivation).
COUPLING_MODES: tuple[str, ...] = ("target", "distribution", "both")
#: The authors' mixed-term surrogate (:func:`prefix_mean_f2`) instead of ``g̃``.
AUTHORS_F2 = "authors_f2"


def coupled_targets_and_weights(
    targets: th.Tensor,
    ratios: th.Tensor,
    rollout_advantages: th.Tensor,
    window: KernelWindow,
    gamma: float,
    mode: str = "target",
    ratio_clip: float = 0.2,
) -> tuple[th.Tensor, th.Tensor]:
    """The actor-dependent parts of ``g̃(θ, ·)``: shifted targets ``ỹ_t(θ)`` and state weights ``ω_t(θ)``, ``(B,)`` each.

    :param targets: ``(B,)`` fixed critic targets ``y_t`` (GAE returns of the rollout critic).
    :param ratios: ``(n_envs, n_steps)`` probability ratios of the current actor on the whole rollout (graph to ``θ``;
        detached ratios give the follower objective at the current actor as a constant).
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
        shifted_targets = targets + window.apply(gamma, excess * rollout_advantages, future=True)
    if mode in ("distribution", "both"):
        # A negative weight would turn the regression into a maximisation; clamp at zero (first-order expansion only).
        weights = th.clamp(1.0 + window.apply(1.0, excess, future=False), min=0.0)
    return shifted_targets, weights


def weighted_squared_error(values: th.Tensor, targets: th.Tensor, weights: th.Tensor | None = None) -> th.Tensor:
    """``mean_B ω_t (y_t − V_t)²`` (plain MSE without weights): the follower's regression loss, written once."""
    squared = (targets - values) ** 2
    return (squared if weights is None else weights * squared).mean()


def coupled_critic_loss(values: th.Tensor, *coupling_args: Any, **coupling_kwargs: Any) -> th.Tensor:
    """``g̃(θ, w)`` on a minibatch: :func:`weighted_squared_error` of ``values`` ``(B,)`` (graph to ``w``) against the
    shifted targets, with the state weights, of :func:`coupled_targets_and_weights`; the other arguments are its, in
    its order: ``coupled_critic_loss(values, targets, ratios, rollout_advantages, window, gamma, mode, ratio_clip)``."""
    return weighted_squared_error(values, *coupled_targets_and_weights(*coupling_args, **coupling_kwargs))


def prefix_mean_f2(
    values: th.Tensor,
    targets: th.Tensor,
    surrogate: th.Tensor,
    env_index: th.Tensor,
    time_index: th.Tensor,
) -> th.Tensor:
    """The BLPO authors' mixed-term surrogate ``f2`` (their 2025 code), whose ``∂²/∂θ∂w`` stands in for ``∂²g/∂θ∂w``:

        P_t = −(1/(t+1)) Σ_{i ≤ t} ℓ_i        (prefix mean over the env's trajectory in the rollout)
        f2  = 2 · mean_{t ∈ B} [ (y_t − V_t) · P_t ]

    with ``ℓ_i`` the per-step clipped surrogate ``min(r_i Â_i(w), clip(r_i, 1 ± ε_F) Â_i(w))``. Their minibatch is one
    whole trajectory; here the prefix runs over the rollout of the entry's env, so any minibatch works. As in their
    code the prefix does not stop at episode boundaries.

    :param values: ``(B,)`` critic values of the minibatch (graph to ``w``).
    :param targets: ``(B,)`` fixed critic targets.
    :param surrogate: ``(n_envs, n_steps)`` per-step surrogate ``ℓ`` on the whole rollout (graph to ``θ`` and ``w``).
    :param env_index: ``(B,)`` env of each minibatch entry.
    :param time_index: ``(B,)`` step of each minibatch entry.
    """
    steps = th.arange(1, surrogate.shape[1] + 1, dtype=surrogate.dtype, device=surrogate.device)
    prefix_mean = -th.cumsum(surrogate, dim=1) / steps
    return 2.0 * ((targets - values) * prefix_mean[env_index, time_index]).mean()
