"""SB3 callbacks: curvature and plasticity monitors, and the task-switch protocol they share with continual wrappers."""

from sb3_blpo.callbacks.monitors import (
    FeatureRankCallback,
    HessianSpectrumCallback,
    PlasticityMonitor,
    SpectrumMeasurement,
    TrainabilityCallback,
    TrainabilityRecord,
    measure_loss_spectrum,
)
from sb3_blpo.callbacks.regularizers import PlasticityRegularizer
from sb3_blpo.callbacks.resets import HeadReset, ReDo, ShrinkAndPerturb
from sb3_blpo.common.task_switch import TASK_SWITCH_INFO_KEY, TaskSwitchTracker, infos_signal_task_switch

__all__ = [
    "TASK_SWITCH_INFO_KEY",
    "FeatureRankCallback",
    "HeadReset",
    "HessianSpectrumCallback",
    "PlasticityMonitor",
    "PlasticityRegularizer",
    "ReDo",
    "ShrinkAndPerturb",
    "SpectrumMeasurement",
    "TaskSwitchTracker",
    "TrainabilityCallback",
    "TrainabilityRecord",
    "infos_signal_task_switch",
    "measure_loss_spectrum",
]
