"""The training losses of an SB3 on-policy actor-critic algorithm, on a batch of its rollout, and their exact Hessians.

Evaluated at the current parameters (which collected the rollout, so the probability ratio is 1 and PPO's clipping is
inactive; the Hessian still differs from that of the plain policy-gradient loss by the ``A ∇log π ∇log πᵀ`` term of
the ratio):

* actor, ``"clipped_surrogate"`` (PPO, BLPO, and any algorithm with a ``clip_range``):
  ``−mean(min(A r, A clip(r, 1 ± ε))) − ent_coef · mean(entropy)``, with ``ε`` the clip range at the progress the
  coming ``train()`` will use;
* actor, ``"policy_gradient"`` (A2C): ``−mean(A log π) − ent_coef · mean(entropy)``;
* actor, ``"surrogate"`` (TRPO and other algorithms without a clip range): ``−mean(A r)``;
* critic: ``mean((R − V)²)`` against the rollout's returns ``R`` (PPO's optional value clipping is inactive at the
  current parameters; ``vf_coef`` is not applied);
* joint: ``actor + c · critic`` with ``c`` from :func:`joint_critic_weight`: PPO and A2C's ``vf_coef`` (the loss they
  minimise), and 1 for algorithms that train the critic on its own loss with its own optimizer (BLPO: its two losses
  summed, the objective whose gradient is the concatenation of the actor's and the critic's).

Recurrent policies (sb3-contrib's RecurrentPPO) evaluate each transition from the LSTM states stored with it in the
rollout buffer: the loss *value* is RecurrentPPO's at the current parameters (those states are the ones the current
LSTM produced), while its derivatives treat the stored states as inputs, i.e. backpropagation through time truncated at
one step (RecurrentPPO's own update backpropagates through whole padded sequences).

Advantages are normalised over the batch when the algorithm has ``normalize_advantage=True``. The pieces (surrogate,
entropy, normalisation) are :mod:`sb3_blpo.common.surrogate`'s, shared with BLPO's own update.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch as th
import torch.nn.functional as F
from stable_baselines3.common.distributions import Distribution
from torch import nn

from sb3_blpo.common.parameters import PARAMETER_GROUPS
from sb3_blpo.common.rollout import RolloutBatch
from sb3_blpo.common.surrogate import clipped_surrogate, entropy_loss, normalize_advantages

ACTOR_OBJECTIVES: tuple[str, ...] = ("auto", "clipped_surrogate", "policy_gradient", "surrogate")


def _without_cudnn() -> contextlib.AbstractContextManager[None]:
    """cuDNN's LSTM has no double backward (the monitors' Hessian-vector products need it); the native kernels do."""
    return th.backends.cudnn.flags(enabled=False)


def resolve_actor_objective(model: Any) -> str:
    """The actor objective of an algorithm: A2C → ``"policy_gradient"``, an algorithm with a ``clip_range`` →
    ``"clipped_surrogate"``, otherwise ``"surrogate"``."""
    from stable_baselines3 import A2C

    if isinstance(model, A2C):
        return "policy_gradient"
    if getattr(model, "clip_range", None) is not None:
        return "clipped_surrogate"
    return "surrogate"


def joint_critic_weight(model: Any) -> float:
    """The critic loss's weight in the joint loss: 1 when the policy has a separate ``critic_optimizer`` (the critic
    is trained on its own loss, e.g. BLPO, whose ``vf_coef`` is 0 by construction), else the algorithm's ``vf_coef``
    (1 if it has none)."""
    if getattr(model.policy, "critic_optimizer", None) is not None:
        return 1.0
    return float(getattr(model, "vf_coef", 1.0))


def progress_remaining(model: Any) -> float:
    """The progress value the coming ``train()`` will use (SB3 updates it right after ``on_rollout_end``)."""
    total = getattr(model, "_total_timesteps", 0)
    if not total:
        return float(model._current_progress_remaining)
    return 1.0 - float(model.num_timesteps) / float(total)


class OnPolicyLosses:
    """The actor, critic and joint losses of an on-policy algorithm (see the module docstring).

    :param model: the algorithm (its policy must be an SB3 ``ActorCriticPolicy``).
    :param actor_objective: ``"auto"`` (:func:`resolve_actor_objective`) or one of :data:`ACTOR_OBJECTIVES`.
    """

    def __init__(self, model: Any, actor_objective: str = "auto") -> None:
        if actor_objective not in ACTOR_OBJECTIVES:
            raise ValueError(f"actor_objective must be one of {ACTOR_OBJECTIVES}, got {actor_objective!r}")
        self.model = model
        self.policy = model.policy
        self.actor_objective = resolve_actor_objective(model) if actor_objective == "auto" else actor_objective

    def _clip_range(self) -> float:
        clip_range = getattr(self.model, "clip_range", None)
        if clip_range is None:
            raise ValueError(f"{type(self.model).__name__} has no clip_range; use actor_objective='surrogate'")
        return float(clip_range(progress_remaining(self.model))) if callable(clip_range) else float(clip_range)

    def distribution(self, batch: RolloutBatch) -> Distribution:
        """The policy's action distribution on ``batch``, as the algorithm's own loss evaluates it."""
        if batch.recurrent is not None:  # RecurrentPPO: each transition from the LSTM states stored with it
            with _without_cudnn():
                distribution, _ = self.policy.get_distribution(
                    batch.observations, batch.recurrent.actor, batch.recurrent.episode_starts
                )
            return distribution
        if batch.action_masks is not None:  # MaskablePPO: the distribution over the valid actions of each state
            return self.policy.get_distribution(batch.observations, action_masks=batch.action_masks.cpu().numpy())
        return self.policy.get_distribution(batch.observations)

    def values(self, batch: RolloutBatch) -> th.Tensor:
        """The critic's value predictions on ``batch``, flat."""
        if batch.recurrent is not None:
            with _without_cudnn():
                values = self.policy.predict_values(batch.observations, batch.recurrent.critic, batch.recurrent.episode_starts)
            return values.flatten()
        return self.policy.predict_values(batch.observations).flatten()

    def actor_loss(self, batch: RolloutBatch) -> th.Tensor:
        """The actor's loss on ``batch`` (objective chosen at construction)."""
        distribution = self.distribution(batch)
        log_prob = distribution.log_prob(batch.actions)
        advantages = batch.advantages
        if getattr(self.model, "normalize_advantage", False):
            advantages = normalize_advantages(advantages)
        if self.actor_objective == "policy_gradient":
            policy_loss = -(advantages * log_prob).mean()
        else:
            ratio = th.exp(log_prob - batch.old_log_prob)
            if self.actor_objective == "clipped_surrogate":
                policy_loss = -clipped_surrogate(ratio, advantages, self._clip_range()).mean()
            else:
                policy_loss = -(advantages * ratio).mean()
        ent_coef = float(getattr(self.model, "ent_coef", 0.0) or 0.0)
        if ent_coef == 0.0:
            return policy_loss
        return policy_loss + ent_coef * entropy_loss(distribution.entropy(), log_prob)

    def critic_loss(self, batch: RolloutBatch) -> th.Tensor:
        """Mean squared error of the value prediction to the rollout's returns."""
        return F.mse_loss(self.values(batch), batch.returns)

    def loss(self, group: str, batch: RolloutBatch) -> th.Tensor:
        """The loss whose Hessian is measured for ``group`` (the joint loss weights the critic by
        :func:`joint_critic_weight`)."""
        if group == "actor":
            return self.actor_loss(batch)
        if group == "critic":
            return self.critic_loss(batch)
        if group == "joint":
            return self.actor_loss(batch) + joint_critic_weight(self.model) * self.critic_loss(batch)
        raise ValueError(f"unknown parameter group {group!r}; choose from {PARAMETER_GROUPS}")

    def exact_hessian(
        self, group: str, params: Sequence[nn.Parameter], batch: RolloutBatch, chunk_size: int | None = None
    ) -> th.Tensor:
        """Dense Hessian of :meth:`loss` w.r.t. ``params`` by ``torch.func`` (vmapped autodiff).

        Independent of the double-backward products the monitors use, so it serves as their oracle. Memory and time grow
        as ``P²``: only for small policies (a few thousand parameters at most).

        :param group: parameter group of the loss.
        :param params: the group's parameters (rows and columns follow their order, flattened).
        :param batch: the transitions of the loss.
        :param chunk_size: if given, ``jacrev(jacrev(loss), chunk_size=...)`` computes that many rows at a time (less
            memory); otherwise ``torch.func.hessian`` (forward-over-reverse) computes all rows at once.
        :return: ``(P, P)`` matrix.
        """
        params = list(params)
        names = {id(p): name for name, p in self.policy.named_parameters()}
        sizes, shapes = [p.numel() for p in params], [p.shape for p in params]
        policy, loss = self.policy, self.loss

        class _Loss(nn.Module):
            # functional_call swaps the parameters of a module's forward; this module's forward is the loss.
            def __init__(self) -> None:
                super().__init__()
                self.policy = policy

            def forward(self) -> th.Tensor:
                return loss(group, batch)

        module = _Loss()

        def loss_of_flat(vector: th.Tensor) -> th.Tensor:
            chunks = vector.split(sizes)
            replaced = {f"policy.{names[id(p)]}": c.view(s) for p, c, s in zip(params, chunks, shapes, strict=True)}
            return th.func.functional_call(module, replaced, ())

        flat = th.cat([p.detach().reshape(-1) for p in params])
        if chunk_size is None:
            return th.func.hessian(loss_of_flat)(flat)
        return th.func.jacrev(th.func.jacrev(loss_of_flat), chunk_size=chunk_size)(flat)
