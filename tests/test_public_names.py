"""Names that moved to ``sb3_blpo.common`` still import from their former modules, and the former methods work."""

from __future__ import annotations

import torch as th
from stable_baselines3 import PPO

from sb3_blpo.common import features, losses, model_view, parameters, rollout, task_switch


def test_former_task_switch_module_re_exports_the_protocol():
    from sb3_blpo.callbacks import task_switch as former

    assert former.TASK_SWITCH_INFO_KEY == task_switch.TASK_SWITCH_INFO_KEY
    assert former.TaskSwitchTracker is task_switch.TaskSwitchTracker
    assert former.infos_signal_task_switch is task_switch.infos_signal_task_switch


def test_former_loss_access_module_re_exports_and_keeps_its_methods():
    from sb3_blpo.callbacks import _loss_access as former

    assert former.ACTOR_OBJECTIVES == losses.ACTOR_OBJECTIVES
    assert former.PARAMETER_GROUPS == parameters.PARAMETER_GROUPS
    assert former.RolloutBatch is rollout.RolloutBatch
    assert former.hidden_layers_of is features.hidden_layers_of
    assert issubclass(former.OnPolicyLossAccess, model_view.OnPolicyModelView)

    model = PPO("MlpPolicy", "CartPole-v1", n_steps=32, batch_size=32, n_epochs=1, seed=0)
    model.learn(32)
    access = former.OnPolicyLossAccess(model)
    batch = access.sample_batch(None, th.Generator().manual_seed(0))
    th.testing.assert_close(access.actor_loss(batch), access.losses.actor_loss(batch))
    th.testing.assert_close(access.critic_loss(batch), access.losses.critic_loss(batch))
    incoming, outgoing = access.hidden_layer_linears("pi0")
    assert (incoming.out_features, outgoing.in_features) == (64, 64)
