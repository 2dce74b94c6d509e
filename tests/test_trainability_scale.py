"""TrainabilityCallback(epsilon_scale=...): ε on the task-0 scale or on each spectrum's own, against exact spectra.

The crafted Hessians are diagonal: with Rademacher probes every eigenvector ``e_i`` carries the weight
``(e_iᵀv)²/P = 1/P`` exactly, and Lanczos on ``k`` distinct eigenvalues stops after ``k`` steps with the exact
eigenvalues as Ritz values, so the SLQ ε-rank equals ``#{i: |λ_i| > ε} / P`` with no estimation error. The oracle
counts the eigenvalues from ``torch.linalg.eigvalsh`` of the dense matrix.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch as th
from stable_baselines3 import PPO

from sb3_blpo._validation import InvalidParameterError
from sb3_blpo.callbacks import PlasticityMonitor, TrainabilityCallback
from sb3_blpo.callbacks.monitors import DEFAULT_EPSILON_SCALE, EPSILON_SCALES, relative_epsilon_of
from sb3_blpo.curvature import SpectralQuadrature, epsilon_rank, stochastic_lanczos_quadrature

RELATIVE = 0.05


def crafted_spectrum(groups: list[tuple[float, int]]) -> th.Tensor:
    """Eigenvalues: ``count`` copies of each ``value``."""
    return th.cat([th.full((count,), value, dtype=th.float64) for value, count in groups])


def exact_quadrature(eigenvalues: th.Tensor, num_probes: int = 2, seed: int = 0) -> SpectralQuadrature:
    """SLQ of ``diag(eigenvalues)``; exact (see the module docstring)."""
    return stochastic_lanczos_quadrature(
        lambda v: v * eigenvalues,
        eigenvalues.numel(),
        num_steps=20,
        num_probes=num_probes,
        seed=seed,
        operator_dtype=th.float64,
    )


def oracle_rank(eigenvalues: th.Tensor, epsilon: float) -> float:
    """Fraction of the dense matrix's eigenvalues beyond ε (``torch.linalg.eigvalsh``)."""
    exact = th.linalg.eigvalsh(th.diag(eigenvalues))
    return float((exact.abs() > epsilon).double().mean())


def oracle_epsilon(eigenvalues: th.Tensor) -> float:
    exact = th.linalg.eigvalsh(th.diag(eigenvalues))
    return RELATIVE * float(exact.max() - exact.min())


# Task 0: 2 top eigenvalues at 1, 48 mid at 0.5, a bulk of 150 near zero. Task 1: the top grows 1000x, the rest stays.
# Task 2: task 1's spectrum scaled by 1e-3 (the same loss times 1e-3).
TASK0 = crafted_spectrum([(1.0, 2), (0.5, 48), (1e-3, 150)])
TASK1 = crafted_spectrum([(1000.0, 2), (0.5, 48), (1e-3, 150)])
TASK2 = 1e-3 * TASK1


def test_relative_epsilon_is_a_fraction_of_the_exact_spectral_range() -> None:
    for spectrum in (TASK0, TASK1, crafted_spectrum([(-3.0, 5), (0.0, 10), (2.0, 5)])):
        assert relative_epsilon_of(exact_quadrature(spectrum), RELATIVE) == pytest.approx(oracle_epsilon(spectrum), rel=1e-9)
    zero = exact_quadrature(th.zeros(10, dtype=th.float64))
    assert 0.0 < relative_epsilon_of(zero, RELATIVE) < 1e-300
    assert float(epsilon_rank(zero, [relative_epsilon_of(zero, RELATIVE)])[0]) == 0.0


def _learn_through_tasks(callback: TrainabilityCallback, spectra: list[th.Tensor], monkeypatch: Any) -> None:
    """A tiny PPO run with one task per spectrum; the callback's spectrum is replaced by the crafted one."""
    quadratures: Iterator[SpectralQuadrature] = iter([exact_quadrature(s) for s in spectra])

    def crafted(self: TrainabilityCallback, group: str, *args: Any) -> SpectralQuadrature:
        return next(quadratures)

    monkeypatch.setattr(TrainabilityCallback, "_quadrature", crafted)
    model = PPO("MlpPolicy", "CartPole-v1", n_steps=32, batch_size=32, n_epochs=1, policy_kwargs=dict(net_arch=[4]), seed=0)
    for task in range(len(spectra)):
        if task:
            callback.notify_task_switch()
        model.learn(32, callback=callback, reset_num_timesteps=task == 0)


@pytest.mark.parametrize("scale", EPSILON_SCALES)
def test_each_scale_reads_crafted_spectra_exactly(scale: str, monkeypatch: Any) -> None:
    callback = TrainabilityCallback(epsilon_scale=scale, relative_epsilon=RELATIVE, parameter_groups=("actor",))
    _learn_through_tasks(callback, [TASK0, TASK1, TASK2], monkeypatch)
    records = callback.history
    assert [r.task_index for r in records] == [0, 1, 2]
    # ε: task 0's range on both scales at task 0; then held ("task0") or each spectrum's own range ("current").
    expected_eps = [oracle_epsilon(TASK0)] * 3 if scale == "task0" else [oracle_epsilon(s) for s in (TASK0, TASK1, TASK2)]
    for record, spectrum, eps in zip(records, (TASK0, TASK1, TASK2), expected_eps, strict=True):
        assert record.epsilon == pytest.approx(eps, rel=1e-9)
        assert record.epsilon_rank == pytest.approx(oracle_rank(spectrum, eps), abs=1e-12)
        assert record.epsilon_rank_bounds[0] <= record.epsilon_rank <= record.epsilon_rank_bounds[1]
    ranks = [r.epsilon_rank for r in records]
    assert ranks[0] == pytest.approx(0.25)  # 50 of 200 eigenvalues beyond 5% of the range 0.999
    if scale == "current":
        # The top grew 1000x while the rest stayed: only the 2 top eigenvalues clear 5% of the new range, a collapse.
        assert ranks[1] == pytest.approx(0.01) and records[1].collapsed and records[1].ratio == pytest.approx(0.04)
        # Scaling the whole loss by 1e-3 changes nothing on this scale.
        assert ranks[2] == pytest.approx(ranks[1]) and records[2].collapsed
    else:
        # On the task-0 scale the same growth reads as no change, and the uniform shrinkage as a collapse.
        assert ranks[1] == pytest.approx(0.25) and not records[1].collapsed
        assert ranks[2] == pytest.approx(0.01) and records[2].collapsed
    assert records[1].lambda_max_ratio == pytest.approx(1000.0) and records[2].lambda_max_ratio == pytest.approx(1.0)


def test_current_scale_is_invariant_to_the_scale_of_the_loss(monkeypatch: Any) -> None:
    spectrum = crafted_spectrum([(-2.0, 3), (4.0, 7), (0.5, 20), (1e-4, 70)])
    readings = []
    for factor in (1e-4, 1.0, 1e4):
        callback = TrainabilityCallback(epsilon_scale="current", relative_epsilon=RELATIVE, parameter_groups=("critic",))
        _learn_through_tasks(callback, [spectrum, factor * spectrum], monkeypatch)
        readings.append(callback.history[1].epsilon_rank)
        assert callback.history[1].ratio == pytest.approx(1.0)
    assert readings == pytest.approx([oracle_rank(spectrum, oracle_epsilon(spectrum))] * 3, abs=1e-12)
    assert readings[0] == pytest.approx(0.3)  # |λ| > 5% of the range 6: the 3 at −2, 7 at 4 and 20 at 0.5, of 100


def test_default_scale_and_absolute_epsilon() -> None:
    assert DEFAULT_EPSILON_SCALE in EPSILON_SCALES
    assert TrainabilityCallback().epsilon_scale == DEFAULT_EPSILON_SCALE
    assert TrainabilityCallback(epsilon_scale="task0").epsilon_scale == "task0"
    # An absolute ε is held for the run, with or without epsilon_scale="task0".
    assert TrainabilityCallback(epsilon=0.1).epsilon_scale == "task0"
    assert TrainabilityCallback(epsilon=0.1, epsilon_scale="task0").epsilon == 0.1
    monitor = PlasticityMonitor(trainability_kwargs=dict(epsilon_scale="task0"))
    assert monitor.trainability.epsilon_scale == "task0"


@pytest.mark.parametrize("value", ["range", "Current", "", 1, 0.5])
def test_bad_epsilon_scale_is_refused_at_construction(value: Any) -> None:
    with pytest.raises(InvalidParameterError, match=r"epsilon_scale must be one of \['current', 'task0'\]") as error:
        TrainabilityCallback(epsilon_scale=value)
    assert isinstance(error.value, ValueError)


def test_current_scale_with_an_absolute_epsilon_is_refused() -> None:
    with pytest.raises(ValueError, match=r"epsilon_scale=.current.*absolute epsilon"):
        TrainabilityCallback(epsilon=0.01, epsilon_scale="current")
