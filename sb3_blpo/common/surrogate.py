"""The policy-loss pieces every on-policy loss here is built from, written once (pure torch, no SB3 import).

PPO's clipped surrogate, the entropy loss, and per-minibatch advantage normalisation; used by BLPO's leader objective
(:mod:`sb3_blpo.blpo.objectives`) and by the losses the monitors differentiate (:mod:`sb3_blpo.common.losses`).
"""

from __future__ import annotations

import torch as th


def clipped_surrogate(ratio: th.Tensor, advantages: th.Tensor, clip_range: float) -> th.Tensor:
    """Per-sample PPO surrogate ``min(r Â, clip(r, 1 ± ε) Â)`` (to be maximised).

    :param ratio: probability ratios ``π_θ / π_old``.
    :param advantages: advantages, same shape.
    :param clip_range: PPO's ``ε``.
    """
    return th.min(advantages * ratio, advantages * th.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range))


def entropy_loss(entropy: th.Tensor | None, log_prob: th.Tensor) -> th.Tensor:
    """``−mean(entropy)``; for distributions without a closed-form entropy (SB3 returns ``None``, e.g. squashed
    Gaussians) the single-sample estimate ``−mean(−log π) = mean(log π)``, as SB3's PPO does.

    :param entropy: per-sample entropies, or ``None``.
    :param log_prob: per-sample log-probabilities of the taken actions.
    """
    if entropy is None:
        return th.mean(log_prob)
    return -th.mean(entropy)


def normalize_advantages(advantages: th.Tensor) -> th.Tensor:
    """``(Â − mean) / (std + 1e-8)`` over the minibatch, with the statistics as constants.

    Detached statistics only rescale the objective; gradients flow through ``Â`` itself (BLPO's advantages depend on
    the critic). Batches of one sample are returned unchanged (their standard deviation is undefined).

    :param advantages: ``(B,)`` advantages.
    """
    if advantages.numel() < 2:
        return advantages
    mean, std = advantages.detach().mean(), advantages.detach().std()
    return (advantages - mean) / (std + 1e-8)
