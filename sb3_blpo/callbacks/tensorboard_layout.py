"""TensorBoard dashboards of the monitors: a custom-scalars layout written once per run, and text events.

The custom-scalars plugin (TensorBoard's "Custom Scalars" tab) draws several tags in one chart: a *margin* chart for
each ε-rank with its guaranteed bracket (lo / estimate / hi), the trainability ratio against its collapse threshold,
λmax and λmin of each group, and one chart per feature metric with every layer in it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from stable_baselines3.common.logger import TensorBoardOutputFormat

#: ``{category: {chart title: ["Multiline", [tag regexes]] or ["Margin", [value, lower, upper]]}}``
Layout = dict[str, dict[str, list[Any]]]


def _exact(tag: str) -> str:
    return f"^{re.escape(tag)}$"


def _bracket(prefix: str, label: str = "") -> list[str]:
    """``[eps_rank, eps_rank_lo, eps_rank_hi]`` tags under ``prefix`` (with ``_<label>`` appended if given)."""
    suffix = f"_{label}" if label else ""
    return [f"{prefix}eps_rank{suffix}", f"{prefix}eps_rank_lo{suffix}", f"{prefix}eps_rank_hi{suffix}"]


def hessian_layout(groups: Sequence[str], epsilon_labels: Sequence[str]) -> Layout:
    """λmax/λmin per group, and a margin chart per group and ε for ``eps_rank`` within its bracket."""
    charts: dict[str, list[Any]] = {}
    for group in groups:
        tags = [_exact(f"hessian/{group}/lambda_max"), _exact(f"hessian/{group}/lambda_min")]
        charts[f"{group}: λmax and λmin"] = ["Multiline", tags]
        for label in epsilon_labels:
            charts[f"{group}: ε-rank, ε = {label} (bracket)"] = ["Margin", _bracket(f"hessian/{group}/", label)]
    return {"Hessian spectrum": charts}


def feature_layout(metric_names: Iterable[str]) -> Layout:
    """One chart per feature metric with every layer's series, and the weight norms of both groups."""
    charts: dict[str, list[Any]] = {
        f"{name} (every layer)": ["Multiline", [rf"^plasticity/[^/]+/{re.escape(name)}$"]] for name in metric_names
    }
    charts["weight norm and distance to init"] = ["Multiline", [r"^plasticity/(actor|critic)/(weight_norm|dist_init)$"]]
    return {"Plasticity (features)": charts}


def trainability_layout(groups: Sequence[str]) -> Layout:
    """The ratio against the collapse threshold, and the ε-rank within its bracket, per group."""
    charts: dict[str, list[Any]] = {}
    for group in groups:
        charts[f"{group}: ε-rank ratio vs collapse threshold"] = [
            "Multiline",
            [_exact(f"trainability/{group}/ratio"), _exact("trainability/collapse_threshold")],
        ]
        charts[f"{group}: ε-rank at task start (bracket)"] = ["Margin", _bracket(f"trainability/{group}/")]
    return {"Trainability (task starts; smoothing 0)": charts}


def merge_layouts(layouts: Iterable[Layout]) -> Layout:
    """One layout with every category of ``layouts``."""
    merged: Layout = {}
    for layout in layouts:
        for category, charts in layout.items():
            merged.setdefault(category, {}).update(charts)
    return merged


def tensorboard_outputs(logger: Any) -> list[TensorBoardOutputFormat]:
    """The TensorBoard outputs of an SB3 logger (empty if it writes no TensorBoard)."""
    return [output for output in logger.output_formats if isinstance(output, TensorBoardOutputFormat)]


def tensorboard_writers(logger: Any) -> list[Any]:
    """The ``SummaryWriter`` of each TensorBoard output of an SB3 logger."""
    return [output.writer for output in tensorboard_outputs(logger)]


def write_layout(logger: Any, layout: Mapping[str, Mapping[str, list[Any]]], written: set[str]) -> None:
    """Write the custom-scalars layout once per run: to every TensorBoard output whose folder is not in ``written``
    (SB3 opens a new run folder, ``PPO_2``, … at each ``learn()`` with ``reset_num_timesteps=True``), then record it.

    :param logger: the algorithm's SB3 logger.
    :param layout: the charts.
    :param written: the run folders that already have the layout (updated in place).
    """
    if not layout:
        return
    for writer in tensorboard_writers(logger):
        if writer.log_dir in written:
            continue
        writer.add_custom_scalars({category: dict(charts) for category, charts in layout.items()})
        writer.flush()
        written.add(writer.log_dir)


def write_text(logger: Any, tag: str, text: str, step: int) -> None:
    """A text event (TensorBoard's Text tab) at ``step`` in every TensorBoard output."""
    for writer in tensorboard_writers(logger):
        writer.add_text(tag, text, global_step=step)
        writer.flush()
