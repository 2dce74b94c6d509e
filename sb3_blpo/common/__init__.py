"""Pieces shared by BLPO and the callbacks (as sb3-contrib's ``common``): the view of an SB3 on-policy model.

* :mod:`~sb3_blpo.common.parameters`: the actor/critic parameter split and parameter selections;
* :mod:`~sb3_blpo.common.rollout`: the one reader of SB3's rollout buffer;
* :mod:`~sb3_blpo.common.surrogate`: the clipped surrogate, entropy loss and advantage normalisation (pure torch);
* :mod:`~sb3_blpo.common.losses`: an algorithm's actor/critic/joint losses on a rollout batch, and exact Hessians;
* :mod:`~sb3_blpo.common.features`: hidden layers, hooked features, the linears around a hidden unit;
* :mod:`~sb3_blpo.common.model_view`: :class:`~sb3_blpo.common.model_view.OnPolicyModelView`, the four together;
* :mod:`~sb3_blpo.common.task_switch`: the task-switch protocol of continual wrappers and monitors (no SB3 import).

Submodules are imported explicitly (nothing here is imported eagerly). ``task_switch`` itself imports nothing from
Stable-Baselines3, so the environment wrappers depend on the protocol only (importing any ``sb3_blpo`` submodule still
runs ``sb3_blpo/__init__``, which imports BLPO).
"""
