"""Curvature and plasticity monitors for SB3 on-policy algorithms (PPO, A2C, BLPO, ...).

Every monitor works in ``_on_rollout_end``: the rollout buffer is complete (advantages and returns computed) and
``train()`` has not yet run on it. Monitors only read the model: losses are differentiated with
``torch.autograd.grad`` (never ``.backward()``), so parameters' ``.grad`` stay untouched, and the policy's training
mode is left as SB3 set it (eval mode during collection).

Cadence: a monitor measures

* on a task start (if ``on_task_switch``): the first rollout of training and the first rollout after each task switch
  (see :mod:`sb3_blpo.common.task_switch`), always, because that measurement point cannot be postponed;
* periodically: once ``every_n_rollouts`` rollouts have passed since its last measurement, on the next rollout whose
  logs SB3 dumps (``iteration % log_interval == 0``), so that no expensive result is overwritten before it is written.
  If ``log_interval`` is unknown or ``None``, the cadence alone decides.

Values recorded at a task start that is not a dump rollout are written at the next dump.

Logged keys (scalars are Python floats; histograms and figures go to TensorBoard only):

* ``hessian/<group>/{lambda_max, lambda_min, neg_mass, trace, trace_ci, eps_rank_<ε>, eps_rank_lo_<ε>,
  eps_rank_hi_<ε>}``, ``hessian/<group>/ritz`` (histogram), ``hessian/<group>/density`` (figure, opt-in), ``hessian/seconds``;
  ``<group>`` is ``actor``, ``critic`` or ``joint``;
* ``plasticity/<layer>/{erank, srank, approx_rank, rank, dormant, feat_norm}`` for layers ``pi0, pi1, …, vf0, …``
  and ``plasticity/<actor|critic>/{weight_norm, dist_init}``;
* ``trainability/<group>/{epsilon, eps_rank, eps_rank_lo, eps_rank_hi, ratio, lmax_ratio, collapse}`` and
  ``trainability/task``.
"""

from __future__ import annotations

import math
import time
import warnings
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch as th
from stable_baselines3.common.callbacks import BaseCallback, CallbackList
from stable_baselines3.common.logger import Figure

from sb3_blpo._validation import InvalidParameterError, check_float, check_int, check_one_of
from sb3_blpo.callbacks.guard import InstanceOnlyCallback
from sb3_blpo.callbacks.tensorboard_layout import (
    Layout,
    feature_layout,
    hessian_layout,
    merge_layouts,
    tensorboard_outputs,
    trainability_layout,
    write_layout,
    write_text,
)
from sb3_blpo.common.losses import ACTOR_OBJECTIVES
from sb3_blpo.common.model_view import OnPolicyModelView
from sb3_blpo.common.parameters import PARAMETER_GROUPS
from sb3_blpo.common.rollout import RolloutBatch
from sb3_blpo.common.task_switch import TaskSwitchTracker, infos_signal_task_switch
from sb3_blpo.curvature import (
    SpectralQuadrature,
    SpectrumSummary,
    broadened_density,
    check_epsilons,
    epsilon_rank_bounds,
    stochastic_lanczos_quadrature,
    summarize_spectrum,
)
from sb3_blpo.curvature import epsilon_rank as epsilon_rank_of
from sb3_blpo.hypergrad import HessianVectorProduct
from sb3_blpo.metrics import distance_to_initial, feature_metrics, weight_norm

# SB3's stdout writer truncates keys to 36 characters and raises if two keys collide after truncation.
MAX_KEY_LENGTH = 36
# The writers that cannot store arrays and figures (they would print or fail on them): excluded for those records, and
# by default for every key but a monitor's summary key (text_logs="summary": a quiet console, the full set in TensorBoard).
NON_TENSORBOARD_FORMATS = ("stdout", "log", "json", "csv")
#: Accepted ``text_logs`` values: SB3's text outputs get the summary key of each monitor, or every scalar.
TEXT_LOGS = ("summary", "all")


def epsilon_label(epsilon: float) -> str:
    """Short text form of ε used in metric keys, e.g. ``0.01`` or ``1e-05``."""
    return f"{epsilon:g}"


def _check_keys(keys: Sequence[str]) -> None:
    too_long = [key for key in keys if len(key) > MAX_KEY_LENGTH]
    if too_long:
        raise ValueError(f"metric keys longer than {MAX_KEY_LENGTH} characters (SB3 truncates them): {too_long}")
    if len(set(keys)) != len(keys):
        duplicates = sorted({key for key in keys if keys.count(key) > 1})
        raise ValueError(f"metric keys collide: {duplicates} (two epsilons with the same short form?)")


def _check_groups(parameter_groups: Sequence[str]) -> tuple[str, ...]:
    if isinstance(parameter_groups, str):
        parameter_groups = (parameter_groups,)
    groups = tuple(parameter_groups)
    if not groups:
        raise ValueError("parameter_groups must name at least one group")
    for group in groups:
        check_one_of("parameter group", group, PARAMETER_GROUPS)
    if len(set(groups)) != len(groups):
        raise ValueError(f"parameter_groups has duplicates: {groups}")
    return groups


# ---------------------------------------------------------------------------------------------------------------------
# Shared machinery
# ---------------------------------------------------------------------------------------------------------------------
class _RolloutMonitor(InstanceOnlyCallback, BaseCallback):
    """Rollout counting, dump alignment, task-switch tracking and batch sampling shared by the monitors.

    :param every_n_rollouts: periodic cadence in rollouts, or ``None`` for task starts only.
    :param on_task_switch: also measure at each task start.
    :param n_samples: transitions subsampled from the rollout per measurement (``None``: all).
    :param min_task_samples: below this many new-task transitions in the switch rollout, the task-start measurement
        moves to the next rollout.
    :param seed: seed of the subsampling and probe generators (combined with the rollout count).
    :param verbose: verbosity level.
    :param text_logs: ``"summary"``: SB3's text outputs (stdout table, csv, json, log) get one key per monitor, every
        key goes to TensorBoard; ``"all"``: every scalar goes to every output.
    """

    summary_key: str = ""
    #: Write :meth:`layout` to TensorBoard at the first training start (a bundle writes its children's together).
    write_layout: bool = True

    def __init__(
        self,
        every_n_rollouts: int | None,
        on_task_switch: bool,
        n_samples: int | None,
        min_task_samples: int = 64,
        seed: int = 0,
        verbose: int = 0,
        text_logs: str = "summary",
    ) -> None:
        super().__init__(verbose)
        self.text_logs = check_one_of("text_logs", text_logs, TEXT_LOGS)
        if every_n_rollouts is not None:
            check_int("every_n_rollouts", every_n_rollouts, minimum=1)
        if n_samples is not None:
            check_int("n_samples", n_samples, minimum=2)
        check_int("min_task_samples", min_task_samples, minimum=1)
        check_int("seed", seed)
        if every_n_rollouts is None and not on_task_switch:
            raise ValueError("the monitor would never fire: set every_n_rollouts or on_task_switch=True")
        self.every_n_rollouts = every_n_rollouts
        self.on_task_switch = bool(on_task_switch)
        self.n_samples = n_samples
        self.min_task_samples = min_task_samples
        self.seed = seed
        self.n_rollouts = 0
        self.n_measurements = 0
        self.tasks = TaskSwitchTracker()
        self._access: OnPolicyModelView | None = None
        self._log_interval: int | None = None
        self._rollouts_in_learn = 0
        self._rollouts_since_measurement = 0
        self._written_now: dict[str, tuple[Any, tuple[str, ...]]] | None = None
        self._layout_runs: set[str] = set()

    # -- SB3 events ---------------------------------------------------------------------------------------------------
    def _init_callback(self) -> None:
        self._access = self._make_access()

    def _make_access(self) -> OnPolicyModelView:
        return OnPolicyModelView(self.model)

    def _on_training_start(self) -> None:
        log_interval = self.locals.get("log_interval")
        self._log_interval = int(log_interval) if isinstance(log_interval, int | np.integer) and log_interval > 0 else None
        self._rollouts_in_learn = 0
        self.tasks.start_first_task()
        if self.write_layout:
            write_layout(self.logger, self.layout(), self._layout_runs)

    def layout(self) -> Layout:
        """This monitor's charts for TensorBoard's Custom Scalars tab (see :mod:`sb3_blpo.callbacks.tensorboard_layout`)."""
        return {}

    def _on_rollout_start(self) -> None:
        self.tasks.rollout_started()

    def _on_step(self) -> bool:
        if infos_signal_task_switch(self.locals.get("infos")):
            self.notify_task_switch()
        return True

    def _on_rollout_end(self) -> None:
        self.num_timesteps = self.model.num_timesteps
        self.n_rollouts += 1
        self._rollouts_in_learn += 1
        self._rollouts_since_measurement += 1
        task_first_step = self.tasks.rollout_ended()
        if task_first_step is not None and self.on_task_switch:
            if self._too_few_new_task_transitions(task_first_step):
                # The switch came at the end of this rollout: measure on the next one, which is all new-task data
                # (the update in between sees only these few new-task transitions).
                self.tasks.pending_first_step = 0
            else:
                self._run(task_first_step, task_start=True)
        elif self._periodic_due():
            self._run(0, task_start=False)

    def notify_task_switch(self) -> None:
        """Signal that a new task starts now (see :mod:`sb3_blpo.common.task_switch`)."""
        # During on_step the buffer's write position is the index the current transition is about to be stored at.
        position = self.access.model.rollout_buffer.pos if self.tasks.in_rollout else 0
        self.tasks.notify(position)

    # -- helpers -----------------------------------------------------------------------------------------------------
    def _periodic_due(self) -> bool:
        if self.every_n_rollouts is None or self._rollouts_since_measurement < self.every_n_rollouts:
            return False
        return self._log_interval is None or self._rollouts_in_learn % self._log_interval == 0

    def _run(self, first_step: int, task_start: bool) -> None:
        self._rollouts_since_measurement = 0
        self.n_measurements += 1
        # A task-start measurement on a rollout whose logs SB3 does not dump goes to TensorBoard now, at its own step:
        # left in the logger, a later measurement could overwrite it before the next dump.
        self._written_now = {} if task_start and not self._dump_rollout() else None
        try:
            self._measure(first_step, task_start)
            if self._written_now:
                self._write_tensorboard_now(self._written_now)
        finally:
            self._written_now = None

    def _dump_rollout(self) -> bool:
        """Whether SB3 dumps the logs of the current rollout (``iteration % log_interval == 0``)."""
        return self._log_interval is not None and self._rollouts_in_learn % self._log_interval == 0

    def _log(self, key: str, value: Any, exclude: tuple[str, ...] = ()) -> None:
        """Record ``key``: to TensorBoard always; to the text outputs if it is the summary key or ``text_logs="all"``."""
        if self.text_logs == "summary" and key != self.summary_key:
            exclude = tuple(dict.fromkeys((*exclude, *NON_TENSORBOARD_FORMATS)))
        if self._written_now is not None:
            self._written_now[key] = (value, exclude)
            exclude = (*exclude, "tensorboard")
        self.logger.record(key, value, exclude=exclude or None)

    def _write_tensorboard_now(self, records: dict[str, tuple[Any, tuple[str, ...]]]) -> None:
        values = {key: value for key, (value, _) in records.items()}
        excluded = {key: exclude for key, (_, exclude) in records.items()}
        for output in tensorboard_outputs(self.logger):
            output.write(values, excluded, step=int(self.num_timesteps))

    @abstractmethod
    def _measure(self, first_step: int, task_start: bool) -> None:
        """Measure on the current rollout, drawing samples from rollout steps ``≥ first_step``, and record the results."""

    @property
    def access(self) -> OnPolicyModelView:
        """Loss and parameter access to the model (available after ``init_callback``)."""
        if self._access is None:
            raise RuntimeError("the callback is not initialised; pass it to model.learn() or call init_callback(model)")
        return self._access

    def _stream_seed(self, stream: int) -> int:
        """A seed for this rollout and random stream: measurements are reproducible and differ between rollouts."""
        return self.seed * 1_000_003 + self.n_rollouts * 101 + stream

    def _generator(self, stream: int = 0) -> th.Generator:
        return th.Generator().manual_seed(self._stream_seed(stream))

    def _too_few_new_task_transitions(self, first_step: int) -> bool:
        n_steps, n_envs = self.access.rollout_size()
        return first_step > 0 and (n_steps - first_step) * n_envs < self.min_task_samples

    def _sample(self, first_step: int) -> RolloutBatch:
        return self.access.sample_batch(self.n_samples, self._generator(), first_step=first_step)

    def _group_spectrum(
        self, settings: _SpectrumSettings, group: str, batch: RolloutBatch, stream: int
    ) -> tuple[SpectrumSummary, SpectralQuadrature]:
        """Lanczos/SLQ spectrum of ``group``'s loss on ``batch``, with this rollout's seed for ``stream``."""
        with th.enable_grad():
            loss = self.access.loss(group, batch)
            return measure_loss_spectrum(
                loss,
                self.access.parameters(group),
                settings.lanczos_steps,
                settings.num_probes,
                settings.epsilons,
                seed=self._stream_seed(1 + stream),
            )


@dataclass(frozen=True)
class SpectrumMeasurement:
    """One Hessian spectrum estimate of one parameter group's loss on one rollout.

    :param group: ``"actor"``, ``"critic"`` or ``"joint"``.
    :param summary: scalar summary (λmax, λmin, ε-ranks, trace, …).
    :param quadrature: the SLQ nodes and weights.
    :param num_timesteps: the model's step count when measured (identifies the rollout).
    :param task_start: whether it was measured at a task start.
    :param task_index: the task index at measurement time.
    :param n_samples: transitions used.
    :param seconds: wall time of the measurement.
    """

    group: str
    summary: SpectrumSummary
    quadrature: SpectralQuadrature
    num_timesteps: int
    task_start: bool
    task_index: int
    n_samples: int
    seconds: float


def measure_loss_spectrum(
    loss: th.Tensor, params: Sequence[th.Tensor], lanczos_steps: int, num_probes: int, epsilons: Sequence[float], seed: int
) -> tuple[SpectrumSummary, SpectralQuadrature]:
    """SLQ spectrum of the Hessian of ``loss`` w.r.t. ``params`` (double-backward HVPs, probes batched).

    :param loss: scalar loss with a graph to ``params``.
    :param params: parameters of the Hessian.
    :param lanczos_steps: Lanczos steps per probe.
    :param num_probes: number of SLQ probes.
    :param epsilons: ε thresholds of the ε-ranks.
    :param seed: probe seed.
    """
    hvp = HessianVectorProduct(loss, params)
    quadrature = stochastic_lanczos_quadrature(
        hvp,
        hvp.dim,
        num_steps=lanczos_steps,
        num_probes=num_probes,
        seed=seed,
        operator_dtype=hvp.gradient.dtype,
        device=hvp.gradient.device,
    )
    return summarize_spectrum(quadrature, epsilons), quadrature


class _SpectrumSettings:
    """Validated settings of a spectrum measurement, shared by the Hessian and trainability callbacks."""

    def __init__(
        self,
        parameter_groups: Sequence[str],
        lanczos_steps: int,
        num_probes: int,
        epsilons: Sequence[float],
        actor_objective: str,
    ) -> None:
        self.parameter_groups = _check_groups(parameter_groups)
        self.lanczos_steps = check_int("lanczos_steps", lanczos_steps, minimum=2)
        self.num_probes = check_int("num_probes", num_probes, minimum=1)
        self.epsilons = check_epsilons(epsilons)
        self.actor_objective = check_one_of("actor_objective", actor_objective, ACTOR_OBJECTIVES)


# ---------------------------------------------------------------------------------------------------------------------
# Hessian spectrum
# ---------------------------------------------------------------------------------------------------------------------
class HessianSpectrumCallback(_RolloutMonitor):
    """Hessian spectrum of the algorithm's actor and/or critic loss on the just-collected rollout.

    For each parameter group, stochastic Lanczos quadrature (``num_probes`` Rademacher probes, ``lanczos_steps`` steps,
    full re-orthogonalisation) on ``n_samples`` transitions subsampled from the rollout gives: ``lambda_max`` and
    ``lambda_min`` (extreme Ritz values), ``neg_mass`` (fraction of eigenvalues below ``−min(epsilons)``),
    ``trace`` (Hutchinson, from the same probes) with ``trace_ci`` (half-width of its 95% Student-t interval), and
    ``eps_rank_<ε>`` (fraction of eigenvalues with ``|λ| > ε``, from the quadrature nodes and weights). The Ritz values
    are logged as a histogram and, with ``log_density_figure=True``, the Gaussian-broadened density as a matplotlib
    figure (TensorBoard only).

    The losses and parameter groups are those of :class:`~sb3_blpo.common.model_view.OnPolicyModelView`.

    :param parameter_groups: any of ``"actor"``, ``"critic"``, ``"joint"`` (each measured separately).
    :param every_n_rollouts: periodic cadence in rollouts (``None``: only at task starts).
    :param on_task_switch: also measure at the start of each task (the paper's measurement point: new-task
        initialisation, before any update on the new task's data).
    :param n_samples: transitions per measurement, drawn uniformly from the rollout (``None``: all).
    :param lanczos_steps: Lanczos steps per probe (≥ 2); each costs one batched Hessian-vector product.
    :param num_probes: SLQ probes (≥ 1); more probes lower the variance of the ε-ranks and the trace.
    :param epsilons: thresholds ``ε > 0`` of the ε-ranks.
    :param log_density_figure: also log the broadened density as a matplotlib figure (TensorBoard *Images*; needs
        matplotlib). Off by default: the figures and the matplotlib import were about 60% of the default monitor's cost
        (``docs/monitoring.md``); the Ritz values are still logged as a histogram.
    :param log_ritz_histogram: log the Ritz values as a histogram.
    :param overlay_task_starts: draw the densities of every earlier task start (thin lines) under each density figure,
        to see the spectrum move from task to task (turns the density figure on).
    :param actor_objective: ``"auto"`` or an explicit actor objective (see ``OnPolicyModelView``).
    :param min_task_samples: minimum number of new-task transitions in a switch rollout (else: the next rollout).
    :param seed: seed of the subsampling and the probes.
    :param verbose: verbosity level.
    :param text_logs: ``"summary"`` (default): only ``hessian/<first group>/lambda_max`` reaches SB3's text outputs
        (stdout, csv, json, log), every key TensorBoard; ``"all"``: every scalar reaches every output.
    """

    def __init__(
        self,
        parameter_groups: Sequence[str] = ("actor", "critic"),
        every_n_rollouts: int | None = 20,
        on_task_switch: bool = True,
        n_samples: int | None = 512,
        lanczos_steps: int = 30,
        num_probes: int = 2,
        epsilons: Sequence[float] = (1e-3, 1e-2, 1e-1),
        log_density_figure: bool = False,
        log_ritz_histogram: bool = True,
        overlay_task_starts: bool = False,
        actor_objective: str = "auto",
        min_task_samples: int = 64,
        seed: int = 0,
        verbose: int = 0,
        text_logs: str = "summary",
    ) -> None:
        super().__init__(every_n_rollouts, on_task_switch, n_samples, min_task_samples, seed, verbose, text_logs)
        self.settings = _SpectrumSettings(parameter_groups, lanczos_steps, num_probes, epsilons, actor_objective)
        self.summary_key = f"hessian/{self.settings.parameter_groups[0]}/lambda_max"
        self.log_density_figure = bool(log_density_figure) or bool(overlay_task_starts)
        self.log_ritz_histogram = bool(log_ritz_histogram)
        self.overlay_task_starts = bool(overlay_task_starts)
        self._task_start_densities: dict[str, list[tuple[str, Any, Any]]] = {}
        _check_keys([key for group in self.settings.parameter_groups for key in self._scalar_keys(group).values()])
        self.latest: dict[str, SpectrumMeasurement] = {}
        self._warned_no_matplotlib = False

    def _scalar_keys(self, group: str) -> dict[str, str]:
        keys = {name: f"hessian/{group}/{name}" for name in ("lambda_max", "lambda_min", "neg_mass", "trace", "trace_ci")}
        for eps in self.settings.epsilons:
            keys[f"eps_{eps!r}"] = f"hessian/{group}/eps_rank_{epsilon_label(eps)}"
            keys[f"eps_lo_{eps!r}"] = f"hessian/{group}/eps_rank_lo_{epsilon_label(eps)}"
            keys[f"eps_hi_{eps!r}"] = f"hessian/{group}/eps_rank_hi_{epsilon_label(eps)}"
        keys["ritz"], keys["density"] = f"hessian/{group}/ritz", f"hessian/{group}/density"
        return keys

    def _make_access(self) -> OnPolicyModelView:
        return OnPolicyModelView(self.model, self.settings.actor_objective)

    def layout(self) -> Layout:
        return hessian_layout(self.settings.parameter_groups, [epsilon_label(eps) for eps in self.settings.epsilons])

    def measure(self, first_step: int = 0, task_start: bool = False) -> dict[str, SpectrumMeasurement]:
        """Measure every configured group on the current rollout buffer now (also usable outside the cadence).

        :param first_step: first rollout step to sample from.
        :param task_start: whether this measurement is at a task start.
        :return: the measurements by group (also stored in :attr:`latest`).
        """
        batch = self._sample(first_step)
        results = {}
        for stream, group in enumerate(self.settings.parameter_groups):
            start = time.perf_counter()
            summary, quadrature = self._group_spectrum(self.settings, group, batch, stream)
            results[group] = SpectrumMeasurement(
                group=group,
                summary=summary,
                quadrature=quadrature,
                num_timesteps=int(self.num_timesteps),
                task_start=task_start,
                task_index=self.tasks.task_index,
                n_samples=batch.size,
                seconds=time.perf_counter() - start,
            )
        self.latest.update(results)
        return results

    def _measure(self, first_step: int, task_start: bool) -> None:
        results = self.measure(first_step, task_start)
        for group, measurement in results.items():
            self._record(group, measurement)
        self._log("hessian/seconds", float(sum(m.seconds for m in results.values())))

    def _record(self, group: str, measurement: SpectrumMeasurement) -> None:
        keys, summary = self._scalar_keys(group), measurement.summary
        self._log(keys["lambda_max"], summary.lambda_max)
        self._log(keys["lambda_min"], summary.lambda_min)
        self._log(keys["neg_mass"], summary.negative_mass)
        self._log(keys["trace"], summary.trace.estimate)
        self._log(keys["trace_ci"], float((summary.trace.ci_high - summary.trace.ci_low) / 2))
        for eps, value, (lower, upper) in zip(
            summary.epsilons, summary.epsilon_ranks, summary.epsilon_rank_bounds, strict=True
        ):
            self._log(keys[f"eps_{eps!r}"], float(value))
            self._log(keys[f"eps_lo_{eps!r}"], float(lower))
            self._log(keys[f"eps_hi_{eps!r}"], float(upper))
        if not tensorboard_outputs(self.logger):
            return  # histograms and figures go to TensorBoard only: do not build what no writer will render
        if self.log_ritz_histogram:
            self._log(keys["ritz"], measurement.quadrature.all_nodes().cpu().numpy(), NON_TENSORBOARD_FORMATS)
        if self.log_density_figure:
            figure = self._density_figure(group, measurement)
            if figure is not None:
                self._log(keys["density"], Figure(figure, close=True), NON_TENSORBOARD_FORMATS)

    def _density_figure(self, group: str, measurement: SpectrumMeasurement) -> Any:
        try:
            from matplotlib.figure import Figure as MatplotlibFigure
        except ImportError:
            if not self._warned_no_matplotlib:
                warnings.warn("matplotlib is not installed: the Hessian density figure is not logged", stacklevel=2)
                self._warned_no_matplotlib = True
            return None
        grid, density = broadened_density(measurement.quadrature, num_points=256)
        # An object-oriented Figure (no pyplot) keeps no global state and needs no GUI backend. log10 on a linear axis
        # renders about three times faster than a log-scale axis, and TensorBoard renders every logged figure.
        figure = MatplotlibFigure(figsize=(6.4, 4.0), dpi=100)
        axes = figure.add_subplot()
        floor = max(float(density.max()) * 1e-6, 1e-30)
        log_density = np.log10(np.maximum(density, floor))
        when = f"task {measurement.task_index}{' start' if measurement.task_start else ''}, step {measurement.num_timesteps}"
        if self.overlay_task_starts:
            for index, (label, old_grid, old_density) in enumerate(self._task_start_densities.get(group, [])):
                axes.plot(old_grid, old_density, color=f"C{1 + index % 9}", linewidth=0.8, alpha=0.6, label=label)
        axes.plot(grid, log_density, color="C0", linewidth=1.4, label=when)
        if self.overlay_task_starts and measurement.task_start:
            self._task_start_densities.setdefault(group, []).append((when, grid, log_density))
        if self.overlay_task_starts and len(axes.lines) > 1:
            axes.legend(fontsize=7, loc="upper right")
        axes.set_xlabel("eigenvalue λ")
        axes.set_ylabel("log10 density")
        summary = measurement.summary
        span = f"λ ∈ [{summary.lambda_min:.3g}, {summary.lambda_max:.3g}]"
        axes.set_title(f"{group} Hessian: {when}\n{measurement.n_samples} samples, {span}", fontsize=10)
        # Fixed margins: tight_layout() costs about as much as rendering the figure.
        figure.subplots_adjust(left=0.12, right=0.97, bottom=0.13, top=0.87)
        return figure


# ---------------------------------------------------------------------------------------------------------------------
# Feature ranks
# ---------------------------------------------------------------------------------------------------------------------
FEATURE_METRIC_NAMES = ("erank", "srank", "approx_rank", "rank", "dormant", "feat_norm")


class FeatureRankCallback(_RolloutMonitor):
    """Rank, dormancy and norm of every hidden layer's activations on the rollout's observations, plus weight norms.

    For each selected layer (default: every hidden layer of the actor ``pi0, pi1, …`` and critic ``vf0, …`` MLP
    branches, and the features extractors if they have parameters) the activations ``Φ`` (``n_samples × width``,
    post-activation, observations drawn uniformly from the rollout) give the metrics of
    :func:`sb3_blpo.metrics.feature_metrics`: ``erank`` (Roy–Vetterli on singular values), ``srank`` (δ),
    ``approx_rank`` (99% of Σσ²), ``rank``, ``dormant`` (τ-dormant fraction, ReDo) and ``feat_norm``. Features are
    uncentred unless ``center=True``. ``plasticity/<actor|critic>/weight_norm`` is ``‖θ‖₂`` and ``dist_init`` is
    ``‖θ − θ₀‖₂`` to the parameters at ``init_callback`` time.

    :param layers: layer names to monitor (``None``: all); unknown names raise ``ValueError`` at ``init_callback``.
    :param every_n_rollouts: periodic cadence in rollouts (``None``: only at task starts).
    :param on_task_switch: also measure at each task start.
    :param n_samples: observations per measurement (``None``: the whole rollout). Use at least the layer width.
    :param center: centre the features before the rank metrics.
    :param srank_delta: δ of the srank.
    :param approximate_rank_threshold: energy fraction of the approximate rank.
    :param dormant_tau: τ of the dormant-unit fraction.
    :param log_weights: also log weight norms and distances to the initial weights.
    :param min_task_samples: minimum number of new-task transitions in a switch rollout (else: the next rollout).
    :param seed: seed of the subsampling.
    :param verbose: verbosity level.
    :param text_logs: ``"summary"`` (default): only ``plasticity/<first layer>/erank`` reaches SB3's text outputs,
        every key TensorBoard; ``"all"``: every scalar reaches every output.
    """

    def __init__(
        self,
        layers: Sequence[str] | None = None,
        every_n_rollouts: int | None = 1,
        on_task_switch: bool = True,
        n_samples: int | None = 1024,
        center: bool = False,
        srank_delta: float = 0.01,
        approximate_rank_threshold: float = 0.99,
        dormant_tau: float = 0.1,
        log_weights: bool = True,
        min_task_samples: int = 64,
        seed: int = 0,
        verbose: int = 0,
        text_logs: str = "summary",
    ) -> None:
        super().__init__(every_n_rollouts, on_task_switch, n_samples, min_task_samples, seed, verbose, text_logs=text_logs)
        if isinstance(layers, str):
            layers = (layers,)
        self.requested_layers = None if layers is None else tuple(layers)
        self.center = bool(center)
        self.srank_delta = check_float("srank_delta", srank_delta, minimum=0.0, maximum=1.0, allow_minimum=False)
        if self.srank_delta >= 1.0:
            raise ValueError(f"srank_delta must be < 1, got {srank_delta}")
        self.approximate_rank_threshold = check_float(
            "approximate_rank_threshold", approximate_rank_threshold, minimum=0.0, maximum=1.0, allow_minimum=False
        )
        self.dormant_tau = check_float("dormant_tau", dormant_tau, minimum=0.0)
        self.log_weights = bool(log_weights)
        self.layers: tuple[str, ...] = ()
        self.latest: dict[str, dict[str, float]] = {}
        self._initial_weights: dict[str, list[th.Tensor]] = {}

    def _init_callback(self) -> None:
        super()._init_callback()
        available = self.access.hidden_layers()
        if self.requested_layers is None:
            self.layers = tuple(available)
        else:
            unknown = sorted(set(self.requested_layers) - set(available))
            if unknown:
                raise ValueError(f"unknown layer name(s) {unknown}; this policy has {sorted(available)}")
            self.layers = self.requested_layers
        if not self.layers:
            raise ValueError("the policy has no hidden layers to monitor (empty net_arch?)")
        self.summary_key = f"plasticity/{self.layers[0]}/erank"
        _check_keys([f"plasticity/{layer}/{name}" for layer in self.layers for name in FEATURE_METRIC_NAMES])
        if self.log_weights and not self._initial_weights:
            self._initial_weights = {
                group: [p.detach().clone() for p in self.access.parameters(group)] for group in ("actor", "critic")
            }

    def layout(self) -> Layout:
        return feature_layout(FEATURE_METRIC_NAMES)

    def measure(self, first_step: int = 0) -> dict[str, dict[str, float]]:
        """Feature metrics of every selected layer on the current rollout buffer (also usable outside the cadence)."""
        batch = self._sample(first_step)
        features = self.access.features(batch.observations, self.layers, recurrent=batch.recurrent)
        self.latest = {
            layer: feature_metrics(
                activations,
                center=self.center,
                srank_delta=self.srank_delta,
                approximate_rank_threshold=self.approximate_rank_threshold,
                dormant_tau=self.dormant_tau,
            )
            for layer, activations in features.items()
        }
        return self.latest

    def _measure(self, first_step: int, task_start: bool) -> None:
        for layer, metrics in self.measure(first_step).items():
            for name, value in metrics.items():
                self._log(f"plasticity/{layer}/{name}", float(value))
        if self.log_weights:
            for group, initial in self._initial_weights.items():
                params = self.access.parameters(group)
                self._log(f"plasticity/{group}/weight_norm", weight_norm(params))
                self._log(f"plasticity/{group}/dist_init", distance_to_initial(params, initial))


# ---------------------------------------------------------------------------------------------------------------------
# Trainability
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainabilityRecord:
    """The trainability indicator of one parameter group at one task start.

    :param task_index: task index (0 is the first task).
    :param group: parameter group.
    :param epsilon: the ε of the ε-rank (fixed after task 0 with ``epsilon_scale="task0"`` or an absolute ε; this
        spectrum's own ``relative_epsilon · (λmax − λmin)`` with ``epsilon_scale="current"``).
    :param epsilon_rank: ε-rank of the loss Hessian at the task start.
    :param epsilon_rank_bounds: guaranteed bounds on the probes' ε-rank (a wide bracket: ε is not resolved).
    :param ratio: ``epsilon_rank / epsilon_rank at task 0`` (``nan`` if the reference is 0).
    :param lambda_max_ratio: ``λmax / λmax at task 0`` (``nan`` if the reference is not positive).
    :param collapsed: ``ratio < collapse_threshold``.
    :param num_timesteps: the model's step count at measurement.
    """

    task_index: int
    group: str
    epsilon: float
    epsilon_rank: float
    epsilon_rank_bounds: tuple[float, float]
    ratio: float
    lambda_max_ratio: float
    collapsed: bool
    num_timesteps: int


TRAINABILITY_METRIC_NAMES = ("epsilon", "eps_rank", "eps_rank_lo", "eps_rank_hi", "ratio", "lmax_ratio", "collapse")
# How a relative ε follows the spectrum: "task0" fixes it at the first measurement, "current" re-scales it at each one.
EPSILON_SCALES = ("task0", "current")
DEFAULT_EPSILON_SCALE = "task0"


def relative_epsilon_of(quadrature: SpectralQuadrature, relative_epsilon: float) -> float:
    """``relative_epsilon · (λmax − λmin)`` of the quadrature's Ritz values (its spectral range).

    A zero spectrum (a loss constant in these parameters) has no scale: the smallest positive float is returned, so
    that any ε-rank of it is 0.

    :param quadrature: SLQ nodes and weights.
    :param relative_epsilon: the fraction of the spectral range.
    """
    nodes = quadrature.all_nodes()
    spread = float(nodes.max() - nodes.min())
    return relative_epsilon * spread if spread > 0 else th.finfo(th.float64).tiny


class TrainabilityCallback(_RolloutMonitor):
    """Spectral-collapse indicator: the Hessian ε-rank at each task start, relative to its value at the first task.

    At the start of task ``t`` (first rollout of training for ``t = 0``, first rollout after each switch otherwise;
    before any update on the new task's data) the callback estimates ``r_t``, the ε-rank of the loss Hessian of each
    parameter group (fraction of eigenvalues with ``|λ| > ε``, by SLQ), and logs

    * ``trainability/<group>/eps_rank`` = ``r_t`` and its guaranteed bracket ``eps_rank_lo``/``eps_rank_hi``,
    * ``trainability/<group>/ratio`` = ``r_t / r_0``,
    * ``trainability/<group>/lmax_ratio`` = ``λmax_t / λmax_0`` (the collapse of the spectral range),
    * ``trainability/<group>/collapse`` = 1.0 if ``r_t / r_0 < collapse_threshold`` else 0.0 ("spectral collapse"),
    * ``trainability/<group>/epsilon`` = the ε used, and ``trainability/task`` = ``t``.

    ε is ``relative_epsilon · (λmax − λmin)``, a fraction of a spectral range (a scale the quadrature resolves: actor
    and critic Hessians differ by orders of magnitude, and with them the smallest resolvable ε), of

    * ``epsilon_scale="task0"`` (default): the group's task-0 spectrum, fixed for the rest of the run, so that a
      spectrum that shrinks as a whole loses ε-rank (the collapse of λmax the paper reports), while one that grows
      gains ε-rank and its bulk may fall below the quadrature's resolution (check ``eps_rank_lo``/``_hi``).
    * ``epsilon_scale="current"``: the spectrum being measured, at every measurement. The indicator is then scale-free
      (multiplying the loss by ``c > 0`` leaves it unchanged) and reads the *shape* of the spectrum: a spectrum whose
      top grows 10³× while its bulk stays put loses ε-rank (a collapse of relative curvature), and ε stays at the
      resolution of ``lanczos_steps`` however far the spectrum grows. A uniform shrinkage of the whole spectrum is not
      a collapse on this scale (``lmax_ratio`` shows it). At task 0 both scales give the same ε.

    The default was chosen on the supervised continual control of ``docs/plasticity.md`` (random-label digits, 200
    tasks, 7 methods, 3 seeds): the ε-rank on the task-0 scale explained online accuracy across tasks × methods with
    R² = 0.22 (more ε-rank, more accuracy), on the current scale with R² = 0.07 and the opposite sign. Training a fresh
    network sharpens the top of its spectrum, so the current scale flagged a collapse within 20 tasks for every
    warm-started method but L2-Init, 40–115 tasks before their accuracy declined, and for every warm-started method
    of the permuted-digits stream, where only backprop's accuracy dipped (by 5 points); the task-0 scale flagged only
    the methods whose accuracy fell toward chance, and none on permuted digits. Pass ``epsilon`` for an absolute ε,
    fixed for the run.

    This is our operational definition, not the paper's τ-trainability, whose formal statement was not available (see
    ``docs/monitoring.md``). The default threshold 0.25 flags the loss of three quarters of the curvature directions
    beyond ε.

    :param epsilon: absolute ε for every group, fixed for the run, or ``None`` for ``relative_epsilon`` of a spectral
        range.
    :param relative_epsilon: ε as a fraction of the spectral range ``λmax − λmin``, in ``(0, 1)``.
    :param epsilon_scale: the spectral range that ``relative_epsilon`` multiplies: ``"task0"`` (the first
        measurement's, held) or ``"current"`` (each measurement's own); ``None``: ``"task0"`` (an absolute ``epsilon``
        is held the same way; ``"current"`` with an absolute ``epsilon`` is refused).
    :param collapse_threshold: ratio below which a collapse is flagged, in ``(0, 1]``.
    :param parameter_groups: groups to track.
    :param spectrum_source: a :class:`HessianSpectrumCallback` placed *before* this callback; when it measured the same
        task-start rollout, its quadrature is reused instead of computing the spectrum twice.
    :param n_samples: transitions per measurement when computing its own spectrum.
    :param lanczos_steps: Lanczos steps when computing its own spectrum.
    :param num_probes: SLQ probes when computing its own spectrum.
    :param actor_objective: ``"auto"`` or an explicit actor objective.
    :param min_task_samples: minimum number of new-task transitions in a switch rollout (else: the next rollout).
    :param seed: seed of the subsampling and the probes.
    :param verbose: verbosity level.
    :param text_logs: ``"summary"`` (default): only ``trainability/<first group>/ratio`` reaches SB3's text outputs,
        every key TensorBoard; ``"all"``: every scalar reaches every output.
    """

    def __init__(
        self,
        epsilon: float | None = None,
        relative_epsilon: float = 0.05,
        collapse_threshold: float = 0.25,
        parameter_groups: Sequence[str] = ("actor", "critic"),
        spectrum_source: HessianSpectrumCallback | None = None,
        n_samples: int | None = 512,
        lanczos_steps: int = 30,
        num_probes: int = 2,
        actor_objective: str = "auto",
        min_task_samples: int = 64,
        seed: int = 0,
        verbose: int = 0,
        epsilon_scale: str | None = None,
        text_logs: str = "summary",
    ) -> None:
        # No periodic cadence (None), task starts only (True): the measurement point of the trainability indicator.
        super().__init__(None, True, n_samples, min_task_samples, seed, verbose, text_logs)
        self.epsilon = None if epsilon is None else check_epsilons((epsilon,))[0]
        if epsilon_scale is not None:
            check_one_of("epsilon_scale", epsilon_scale, EPSILON_SCALES)
        if self.epsilon is not None and epsilon_scale == "current":
            raise InvalidParameterError(
                "epsilon_scale='current' re-scales relative_epsilon at every measurement, but an absolute epsilon "
                f"({self.epsilon:g}) is fixed for the run: pass epsilon=None or epsilon_scale='task0'"
            )
        # An absolute ε is held from the first measurement on, as on the task-0 scale.
        self.epsilon_scale: str = "task0" if self.epsilon is not None else (epsilon_scale or DEFAULT_EPSILON_SCALE)
        self.relative_epsilon = check_float(
            "relative_epsilon", relative_epsilon, minimum=0.0, maximum=1.0, allow_minimum=False
        )
        self.collapse_threshold = check_float(
            "collapse_threshold", collapse_threshold, minimum=0.0, maximum=1.0, allow_minimum=False
        )
        if spectrum_source is not None and not isinstance(spectrum_source, HessianSpectrumCallback):
            raise TypeError(f"spectrum_source must be a HessianSpectrumCallback, got {type(spectrum_source).__name__}")
        self.spectrum_source = spectrum_source
        # The ε-rank is computed from the quadrature at this callback's own ε, so the settings' epsilons are unused.
        self.settings = _SpectrumSettings(parameter_groups, lanczos_steps, num_probes, (1.0,), actor_objective)
        self.summary_key = f"trainability/{self.settings.parameter_groups[0]}/ratio"
        _check_keys(
            ["trainability/task"]
            + [
                f"trainability/{group}/{name}"
                for group in self.settings.parameter_groups
                for name in TRAINABILITY_METRIC_NAMES
            ]
        )
        self.group_epsilons: dict[str, float] = {}
        self.reference: dict[str, tuple[float, float]] = {}
        self.history: list[TrainabilityRecord] = []

    def _make_access(self) -> OnPolicyModelView:
        return OnPolicyModelView(self.model, self.settings.actor_objective)

    def _quadrature(
        self, group: str, batch_cache: dict[str, RolloutBatch], first_step: int, stream: int
    ) -> SpectralQuadrature:
        source = self.spectrum_source
        if source is not None:
            shared = source.latest.get(group)
            if shared is not None and shared.task_start and shared.num_timesteps == self.num_timesteps:
                return shared.quadrature
        if "batch" not in batch_cache:
            batch_cache["batch"] = self._sample(first_step)
        return self._group_spectrum(self.settings, group, batch_cache["batch"], stream)[1]

    def _group_epsilon(self, group: str, quadrature: SpectralQuadrature) -> float:
        if self.epsilon is not None:
            self.group_epsilons[group] = self.epsilon
        elif self.epsilon_scale == "current" or group not in self.group_epsilons:
            self.group_epsilons[group] = relative_epsilon_of(quadrature, self.relative_epsilon)
        return self.group_epsilons[group]

    def layout(self) -> Layout:
        return trainability_layout(self.settings.parameter_groups)

    def _measure(self, first_step: int, task_start: bool) -> None:
        batch_cache: dict[str, RolloutBatch] = {}
        task = self.tasks.task_index
        for stream, group in enumerate(self.settings.parameter_groups):
            quadrature = self._quadrature(group, batch_cache, first_step, stream)
            epsilon = self._group_epsilon(group, quadrature)
            epsilon_rank = float(epsilon_rank_of(quadrature, (epsilon,))[0])
            lower, upper = (float(bound[0]) for bound in epsilon_rank_bounds(quadrature, (epsilon,)))
            lambda_max = float(quadrature.all_nodes().max())
            if group not in self.reference:
                self.reference[group] = (epsilon_rank, lambda_max)
            reference_rank, reference_lmax = self.reference[group]
            ratio = epsilon_rank / reference_rank if reference_rank > 0 else math.nan
            lmax_ratio = lambda_max / reference_lmax if reference_lmax > 0 else math.nan
            record = TrainabilityRecord(
                task_index=task,
                group=group,
                epsilon=epsilon,
                epsilon_rank=epsilon_rank,
                epsilon_rank_bounds=(lower, upper),
                ratio=ratio,
                lambda_max_ratio=lmax_ratio,
                collapsed=bool(ratio < self.collapse_threshold),
                num_timesteps=int(self.num_timesteps),
            )
            self.history.append(record)
            values = {
                "epsilon": epsilon,
                "eps_rank": epsilon_rank,
                "eps_rank_lo": lower,
                "eps_rank_hi": upper,
                "ratio": ratio,
                "lmax_ratio": lmax_ratio,
                "collapse": float(record.collapsed),
            }
            for name, value in values.items():
                self._log(f"trainability/{group}/{name}", float(value))
            if record.collapsed and self.verbose >= 1:
                print(f"TrainabilityCallback: spectral collapse of the {group} Hessian at task {task} (ratio {ratio:.3g})")
        self._log("trainability/task", float(task))
        self._log("trainability/collapse_threshold", self.collapse_threshold)
        verdicts = [
            f"{record.group}: ε-rank {record.epsilon_rank:.3g} (ratio {record.ratio:.3g}, "
            f"{'SPECTRAL COLLAPSE' if record.collapsed else 'no collapse'})"
            for record in self.history
            if record.task_index == task and record.num_timesteps == int(self.num_timesteps)
        ]
        write_text(
            self.logger,
            "trainability/verdict",
            f"task {task} at step {self.num_timesteps}: " + "; ".join(verdicts),
            int(self.num_timesteps),
        )


# ---------------------------------------------------------------------------------------------------------------------
# Bundle
# ---------------------------------------------------------------------------------------------------------------------
class PlasticityMonitor(InstanceOnlyCallback, CallbackList):
    """Hessian spectrum, feature ranks and trainability with defaults sized for a few percent of overhead.

    Runs, in this order, a :class:`HessianSpectrumCallback` (every ``every_n_rollouts`` rollouts and at task starts), a
    :class:`FeatureRankCallback` (every ``feature_every_n_rollouts`` rollouts) and a :class:`TrainabilityCallback`
    that reuses the Hessian callback's task-start spectra (same samples, Lanczos steps and probes).
    ``notify_task_switch()`` is forwarded to all three.

    :param every_n_rollouts: cadence of the Hessian spectrum.
    :param feature_every_n_rollouts: cadence of the feature metrics.
    :param parameter_groups: parameter groups of the Hessian and trainability callbacks.
    :param epsilons: ε thresholds of the Hessian ε-ranks.
    :param trainability_epsilon: absolute ε of the trainability indicator, or ``None`` for 5% of each group's spectral
        range (on the scale of :class:`TrainabilityCallback`'s ``epsilon_scale``).
    :param collapse_threshold: ratio below which a spectral collapse is flagged.
    :param hessian_kwargs: extra keyword arguments of :class:`HessianSpectrumCallback`.
    :param feature_kwargs: extra keyword arguments of :class:`FeatureRankCallback`.
    :param trainability_kwargs: extra keyword arguments of :class:`TrainabilityCallback`.
    :param seed: seed of every subsample and probe.
    :param verbose: verbosity level.
    :param text_logs: ``"summary"`` (default): SB3's text outputs (the console table, csv, json) get three keys,
        ``hessian/<first group>/lambda_max``, ``plasticity/<first layer>/erank`` and ``trainability/<first
        group>/ratio``, and TensorBoard every key; ``"all"``: every scalar reaches every output.
    """

    def __init__(
        self,
        every_n_rollouts: int = 20,
        feature_every_n_rollouts: int = 1,
        parameter_groups: Sequence[str] = ("actor", "critic"),
        epsilons: Sequence[float] = (1e-3, 1e-2, 1e-1),
        trainability_epsilon: float | None = None,
        collapse_threshold: float = 0.25,
        hessian_kwargs: dict[str, Any] | None = None,
        feature_kwargs: dict[str, Any] | None = None,
        trainability_kwargs: dict[str, Any] | None = None,
        seed: int = 0,
        verbose: int = 0,
        text_logs: str = "summary",
    ) -> None:
        common = {"seed": seed, "verbose": verbose, "text_logs": text_logs}
        hessian_options: dict[str, Any] = {
            "parameter_groups": parameter_groups,
            "every_n_rollouts": every_n_rollouts,
            "epsilons": epsilons,
            **common,
            **(hessian_kwargs or {}),
        }
        self.hessian = HessianSpectrumCallback(**hessian_options)
        feature_options: dict[str, Any] = {"every_n_rollouts": feature_every_n_rollouts, **common, **(feature_kwargs or {})}
        self.features = FeatureRankCallback(**feature_options)
        # The trainability callback reuses the Hessian callback's task-start spectra, so it gets the same settings.
        shared = ("n_samples", "lanczos_steps", "num_probes", "actor_objective", "min_task_samples")
        trainability_options: dict[str, Any] = {
            "epsilon": trainability_epsilon,
            "collapse_threshold": collapse_threshold,
            "parameter_groups": parameter_groups,
            "spectrum_source": self.hessian,
            **common,
            **{key: value for key, value in (hessian_kwargs or {}).items() if key in shared},
            **(trainability_kwargs or {}),
        }
        self.trainability = TrainabilityCallback(**trainability_options)
        super().__init__([self.hessian, self.features, self.trainability])
        for monitor in (self.hessian, self.features, self.trainability):
            monitor.write_layout = False  # one layout with the three monitors' charts (see _on_training_start)
        self._layout_runs: set[str] = set()

    def _on_training_start(self) -> None:
        super()._on_training_start()
        layout = merge_layouts(monitor.layout() for monitor in (self.hessian, self.features, self.trainability))
        write_layout(self.logger, layout, self._layout_runs)

    def update_child_locals(self, locals_: dict[str, Any]) -> None:
        # The children read the step's locals only for task-switch flags, which this callback checks for them; skip
        # copying the rollout's locals into three more dicts on every environment step.
        pass

    def _on_step(self) -> bool:
        # The children only look at each step for task-switch flags: check once here instead of three times (this runs
        # on every environment step).
        if infos_signal_task_switch(self.locals.get("infos")):
            self.notify_task_switch()
        return True

    def notify_task_switch(self) -> None:
        """Signal a task switch to the three monitors (see :mod:`sb3_blpo.common.task_switch`)."""
        for callback in (self.hessian, self.features, self.trainability):
            callback.notify_task_switch()
