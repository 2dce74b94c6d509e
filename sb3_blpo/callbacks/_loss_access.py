"""Moved to :mod:`sb3_blpo.common` (split by concern); these names are re-exported for code that imports them from
here. :class:`OnPolicyLossAccess` is :class:`~sb3_blpo.common.model_view.OnPolicyModelView` with its former methods
(``actor_loss``, ``critic_loss``, ``hidden_layer_linears``), which now live on ``view.losses`` and ``view.layers``."""

from torch import Tensor, nn

from sb3_blpo.common.features import hidden_layers_of
from sb3_blpo.common.losses import ACTOR_OBJECTIVES
from sb3_blpo.common.model_view import OnPolicyModelView
from sb3_blpo.common.parameters import PARAMETER_GROUPS
from sb3_blpo.common.rollout import RolloutBatch


class OnPolicyLossAccess(OnPolicyModelView):
    """The former name of :class:`~sb3_blpo.common.model_view.OnPolicyModelView`, with its former methods."""

    def actor_loss(self, batch: RolloutBatch) -> Tensor:
        """See :meth:`sb3_blpo.common.losses.OnPolicyLosses.actor_loss`."""
        return self.losses.actor_loss(batch)

    def critic_loss(self, batch: RolloutBatch) -> Tensor:
        """See :meth:`sb3_blpo.common.losses.OnPolicyLosses.critic_loss`."""
        return self.losses.critic_loss(batch)

    def hidden_layer_linears(self, name: str) -> tuple[nn.Linear, nn.Linear]:
        """See :meth:`sb3_blpo.common.features.HiddenLayers.linears`."""
        return self.layers.linears(name)


__all__ = ["ACTOR_OBJECTIVES", "PARAMETER_GROUPS", "OnPolicyLossAccess", "RolloutBatch", "hidden_layers_of"]
