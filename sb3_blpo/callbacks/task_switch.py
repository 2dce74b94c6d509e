"""Moved to :mod:`sb3_blpo.common.task_switch` (the protocol is shared by callbacks and environment wrappers); these
names are re-exported for code that imports them from here."""

from sb3_blpo.common.task_switch import TASK_SWITCH_INFO_KEY, TaskSwitchTracker, infos_signal_task_switch

__all__ = ["TASK_SWITCH_INFO_KEY", "TaskSwitchTracker", "infos_signal_task_switch"]
