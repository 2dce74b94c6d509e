"""BLPO policies: SB3 actor-critic policies with disjoint actor and critic parameters and one optimizer each.

The bilevel split needs the leader (actor, θ) and follower (critic, w) to share no parameter, so the features
extractor is never shared (``share_features_extractor=True`` is refused) and the parameters are partitioned into
:meth:`actor_parameters` and :meth:`critic_parameters`. ``policy.optimizer`` steps the actor, ``policy.critic_optimizer``
the critic; both are saved with the model.
"""

from __future__ import annotations

from typing import Any

import torch as th
from stable_baselines3.common.policies import ActorCriticCnnPolicy, ActorCriticPolicy, MultiInputActorCriticPolicy
from stable_baselines3.common.type_aliases import PyTorchObs, Schedule
from torch import nn

from sb3_blpo.common.parameters import actor_modules_parameters, critic_modules_parameters


class BilevelSplit:
    """Mixin for :class:`ActorCriticPolicy` subclasses: actor/critic parameter split and two optimizers."""

    def __init__(self, *args: Any, share_features_extractor: bool = False, **kwargs: Any) -> None:
        if share_features_extractor:
            raise ValueError(
                "share_features_extractor=True is not supported by BLPO: the bilevel split needs disjoint actor and "
                "critic parameters. Use share_features_extractor=False (the default)."
            )
        super().__init__(*args, share_features_extractor=False, **kwargs)  # type: ignore[call-arg]

    def _build(self: Any, lr_schedule: Schedule) -> None:
        ActorCriticPolicy._build(self, lr_schedule)
        actor, critic = self.actor_parameters(), self.critic_parameters()
        self._check_partition(actor, critic)
        # Replace the joint optimizer built by SB3: the leader and the follower take separate steps.
        self.optimizer = self.optimizer_class(actor, lr=lr_schedule(1), **self.optimizer_kwargs)
        self.critic_optimizer = self.optimizer_class(critic, lr=lr_schedule(1), **self.optimizer_kwargs)

    def actor_parameters(self: Any) -> list[nn.Parameter]:
        """Leader parameters θ: actor features extractor, policy branch, action head and ``log_std``."""
        return actor_modules_parameters(self)

    def critic_parameters(self: Any) -> list[nn.Parameter]:
        """Follower parameters w: critic features extractor, value branch and value head."""
        return critic_modules_parameters(self)

    def _check_partition(self: Any, actor: list[nn.Parameter], critic: list[nn.Parameter]) -> None:
        actor_ids, critic_ids = {id(p) for p in actor}, {id(p) for p in critic}
        if actor_ids & critic_ids:
            raise ValueError("actor and critic share parameters; BLPO needs them disjoint (check the features extractor)")
        missing = [name for name, p in self.named_parameters() if id(p) not in actor_ids | critic_ids]
        if missing:
            raise TypeError(f"parameters {missing} belong to neither the actor nor the critic; BLPO cannot assign them")
        if not critic:
            raise ValueError("the critic has no parameters; BLPO needs a learned value function")

    def actor_log_prob_entropy(self: Any, obs: PyTorchObs, actions: th.Tensor) -> tuple[th.Tensor, th.Tensor | None]:
        """Log-probability and entropy of ``actions`` from the actor alone (no critic forward pass)."""
        distribution = self.get_distribution(obs)
        return distribution.log_prob(actions), distribution.entropy()


class BLPOPolicy(BilevelSplit, ActorCriticPolicy):
    """MLP actor-critic policy for BLPO (separate actor and critic networks, one optimizer each)."""


class BLPOCnnPolicy(BilevelSplit, ActorCriticCnnPolicy):
    """CNN actor-critic policy for BLPO (separate NatureCNN extractors for actor and critic)."""


class BLPOMultiInputPolicy(BilevelSplit, MultiInputActorCriticPolicy):
    """Dict-observation actor-critic policy for BLPO (separate combined extractors)."""


MlpPolicy = BLPOPolicy
CnnPolicy = BLPOCnnPolicy
MultiInputPolicy = BLPOMultiInputPolicy
