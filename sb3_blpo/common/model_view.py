"""The package's view of an SB3 on-policy actor-critic algorithm: what the callbacks read and differentiate.

Supported: algorithms built on :class:`~stable_baselines3.common.on_policy_algorithm.OnPolicyAlgorithm` whose policy is
an :class:`~stable_baselines3.common.policies.ActorCriticPolicy` (PPO, A2C, sb3-contrib's TRPO, BLPO), sb3-contrib's
``MaskableActorCriticPolicy`` (MaskablePPO: the same modules; the losses apply the rollout's action masks) or its
``RecurrentActorCriticPolicy`` (RecurrentPPO: each sampled transition carries the LSTM states stored with it; see
:mod:`sb3_blpo.common.losses` for what that means for the derivatives).

One object per concern, each usable on its own:

* parameter groups: :func:`sb3_blpo.common.parameters.actor_critic_parameters` (``"actor"``, ``"critic"``, and
  ``"joint"``, every parameter of the policy);
* the rollout: :class:`sb3_blpo.common.rollout.RolloutReader`;
* losses and exact Hessians: :class:`sb3_blpo.common.losses.OnPolicyLosses`;
* hidden layers and hooked features: :class:`sb3_blpo.common.features.HiddenLayers`.

:class:`OnPolicyModelView` checks the algorithm once and holds the four.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch as th
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.type_aliases import PyTorchObs
from torch import nn

from sb3_blpo.common.features import HiddenLayers
from sb3_blpo.common.losses import OnPolicyLosses, progress_remaining
from sb3_blpo.common.parameters import PARAMETER_GROUPS, actor_critic_parameters
from sb3_blpo.common.rollout import RecurrentStates, RolloutBatch, RolloutReader


def _maskable_policy_types() -> tuple[type, ...]:
    try:
        from sb3_contrib.common.maskable.policies import MaskableActorCriticPolicy
    except ImportError:
        return ()
    return (MaskableActorCriticPolicy,)


def check_actor_critic_policy(model: Any) -> ActorCriticPolicy:
    """The policy of an on-policy algorithm with an SB3 ``ActorCriticPolicy`` (sb3-contrib's recurrent one is a
    subclass) or sb3-contrib's maskable one; a clear ``TypeError`` otherwise."""
    if not isinstance(model, OnPolicyAlgorithm):
        raise TypeError(
            f"{type(model).__name__} is not an SB3 on-policy algorithm; the monitors read the rollout buffer of "
            "OnPolicyAlgorithm subclasses (PPO, A2C, TRPO, BLPO)"
        )
    policy = model.policy
    if not isinstance(policy, (ActorCriticPolicy, *_maskable_policy_types())):
        raise TypeError(
            f"the policy {type(policy).__name__} is not an ActorCriticPolicy; the monitors need its "
            "get_distribution/predict_values and actor/critic modules"
        )
    return policy


class OnPolicyModelView:
    """Parameters, rollout, losses and hidden layers of an SB3 on-policy actor-critic algorithm.

    :param model: the algorithm (its policy must be set up).
    :param actor_objective: ``"auto"`` or an explicit actor objective (see :mod:`sb3_blpo.common.losses`).
    :raises TypeError: if the algorithm is not on-policy or its policy lacks the modules this view relies on.
    """

    def __init__(self, model: Any, actor_objective: str = "auto") -> None:
        self.model = model
        self.policy = check_actor_critic_policy(model)
        self.losses = OnPolicyLosses(model, actor_objective)
        self.layers = HiddenLayers(self.policy)
        actor, critic = actor_critic_parameters(self.policy)
        joint = [p for p in self.policy.parameters() if p.requires_grad]
        self._groups: dict[str, list[nn.Parameter]] = {"actor": actor, "critic": critic, "joint": joint}

    @property
    def actor_objective(self) -> str:
        """The actor objective the losses use (resolved from ``"auto"``)."""
        return self.losses.actor_objective

    def parameters(self, group: str) -> list[nn.Parameter]:
        """Trainable parameters of ``group`` (``"actor"``, ``"critic"`` or ``"joint"``)."""
        if group not in self._groups:
            raise ValueError(f"unknown parameter group {group!r}; choose from {PARAMETER_GROUPS}")
        return self._groups[group]

    def rollout(self) -> RolloutReader:
        """The full rollout buffer, read in place (between collection and ``train()``)."""
        return RolloutReader(self.model.rollout_buffer, self.model.action_space, self.policy.device)

    def rollout_size(self) -> tuple[int, int]:
        """``(n_steps, n_envs)`` of the rollout buffer."""
        buffer = self.model.rollout_buffer
        return int(buffer.buffer_size), int(buffer.n_envs)

    def sample_batch(self, n_samples: int | None, generator: th.Generator, first_step: int = 0) -> RolloutBatch:
        """A uniform subsample of the rollout (see :meth:`RolloutReader.sample`)."""
        return self.rollout().sample(n_samples, generator, first_step)

    def progress_remaining(self) -> float:
        """The progress value the coming ``train()`` will use."""
        return progress_remaining(self.model)

    def loss(self, group: str, batch: RolloutBatch) -> th.Tensor:
        """The loss of ``group`` on ``batch`` (see :meth:`OnPolicyLosses.loss`)."""
        return self.losses.loss(group, batch)

    def exact_hessian(self, group: str, batch: RolloutBatch, chunk_size: int | None = None) -> th.Tensor:
        """Dense Hessian of the group's loss w.r.t. its parameters (see :meth:`OnPolicyLosses.exact_hessian`)."""
        return self.losses.exact_hessian(group, self.parameters(group), batch, chunk_size)

    def hidden_layers(self) -> dict[str, nn.Module]:
        """The policy's hidden layers by name (see :meth:`HiddenLayers.modules`)."""
        return self.layers.modules()

    def features(
        self,
        observations: PyTorchObs,
        layer_names: Sequence[str],
        differentiable: bool = False,
        recurrent: RecurrentStates | None = None,
    ) -> dict[str, th.Tensor]:
        """Activations of the named hidden layers (see :meth:`HiddenLayers.features`)."""
        return self.layers.features(observations, layer_names, differentiable, recurrent)
