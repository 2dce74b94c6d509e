"""The task-switch protocol shared by the monitors and the continual-learning environment wrappers.

A monitor needs to know when a new task starts, to measure the curvature at *new-task initialisation*: on the new
task's data, before any update on it. Two ways to signal a switch, use either:

1. **From an environment wrapper** (the continual-RL wrappers do this): put ``info[TASK_SWITCH_INFO_KEY] = True`` (or
   any truthy value, e.g. the new task's id) in the ``info`` dict returned by the **first** ``step()`` executed under
   the new task. The key travels through SB3's ``VecEnv`` unchanged; if several sub-environments flag the same step it
   counts as one switch. Example::

       class SwitchEvery(gym.Wrapper):
           def step(self, action):
               obs, reward, terminated, truncated, info = self.env.step(action)
               ...
               if self.steps % self.task_length == 0:   # the change takes effect from this step on
                   self.change_task()
                   info[TASK_SWITCH_INFO_KEY] = True
               return obs, reward, terminated, truncated, info

   (Flagging the step right *after* the change, as above, or the step that first runs under the new dynamics, differ
   by one transition; both are fine.)

2. **Explicitly**: call ``callback.notify_task_switch()`` on the monitor (or on :class:`PlasticityMonitor`, which
   forwards it), e.g. between two ``learn()`` calls after replacing the environment, or from another callback.

Semantics of a switch for the monitors (SB3 collects a rollout, calls ``on_rollout_end``, and only then ``train()``):
the measurement fires in the first ``_on_rollout_end`` after the signal, before ``train()`` has used any of the new
task's transitions, and it draws its samples only from the transitions stored at or after the step of the signal
(per rollout step, across all sub-environments). If fewer than ``min_task_samples`` such transitions exist (the switch
came at the very end of a rollout) the measurement moves to the next rollout, which is all new-task data (the one
update in between has seen only those few new-task transitions). A switch signalled between rollouts (e.g. by
``notify_task_switch()`` between ``learn()`` calls) makes the whole next rollout new-task data. The first rollout of
the first ``learn()`` call counts as the start of the first task (task 0).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

TASK_SWITCH_INFO_KEY = "task_switch"
"""The ``info`` key that continual environment wrappers set (to a truthy value) on the first step of a new task."""


def infos_signal_task_switch(infos: Iterable[dict[str, Any]] | None) -> bool:
    """Whether any sub-environment's ``info`` dict flags a task switch (see :data:`TASK_SWITCH_INFO_KEY`)."""
    # Runs on every environment step: a plain loop is cheaper than any() over a generator.
    if infos is not None:
        for info in infos:
            if isinstance(info, dict) and info.get(TASK_SWITCH_INFO_KEY):
                return True
    return False


class TaskSwitchTracker:
    """Bookkeeping of task switches within rollouts, for a callback that sees every ``on_step``.

    It counts tasks, remembers the rollout step at which the current task's data starts, and reports at rollout end
    whether a switch is pending (i.e. the rollout just collected contains the start of a new task). The caller passes
    the rollout step (the rollout buffer's write position during ``on_step``), so nothing is counted per step.
    """

    def __init__(self) -> None:
        self.task_index = -1
        self.pending_first_step: int | None = None
        self.in_rollout = False

    def start_first_task(self) -> None:
        """Mark the start of task 0 (called once, at the first training start)."""
        if self.task_index < 0:
            self.task_index = 0
            self.pending_first_step = 0

    def rollout_started(self) -> None:
        """A new rollout begins."""
        self.in_rollout = True

    def notify(self, step_in_rollout: int) -> None:
        """Register a switch at ``step_in_rollout`` of the current rollout (ignored between rollouts: next rollout)."""
        self.task_index = max(self.task_index, 0) + 1
        self.pending_first_step = int(step_in_rollout) if self.in_rollout else 0

    def rollout_ended(self) -> int | None:
        """End of a rollout: the rollout step where the new task's data starts, or ``None`` if no switch is pending."""
        self.in_rollout = False
        first_step, self.pending_first_step = self.pending_first_step, None
        return first_step
