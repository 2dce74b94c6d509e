"""Moved to :mod:`sb3_blpo.common` (split by concern); these names are re-exported for code that imports them from
here. ``OnPolicyLossAccess`` is :class:`~sb3_blpo.common.model_view.OnPolicyModelView`."""

from sb3_blpo.common.features import hidden_layers_of
from sb3_blpo.common.losses import ACTOR_OBJECTIVES
from sb3_blpo.common.model_view import OnPolicyModelView
from sb3_blpo.common.parameters import PARAMETER_GROUPS
from sb3_blpo.common.rollout import RolloutBatch

OnPolicyLossAccess = OnPolicyModelView

__all__ = ["ACTOR_OBJECTIVES", "PARAMETER_GROUPS", "OnPolicyLossAccess", "RolloutBatch", "hidden_layers_of"]
