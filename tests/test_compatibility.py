"""The "Can I use?" table of docs/monitoring.md: every algorithm × callback pair, run for two rollouts.

A supported pair trains with the callback; a refused pair raises a ``TypeError`` at ``learn()`` start whose message says
why. The expected table below is the one the docs show; the test checks both the behaviour and the docs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from stable_baselines3 import A2C, PPO

from sb3_blpo import BLPO
from sb3_blpo.callbacks import (
    FeatureRankCallback,
    HeadReset,
    HessianSpectrumCallback,
    PlasticityMonitor,
    PlasticityRegularizer,
    ReDo,
    ShrinkAndPerturb,
    TrainabilityCallback,
)
from sb3_blpo.common.model_view import OnPolicyModelView

sb3_contrib = pytest.importorskip("sb3_contrib")
from sb3_contrib.common.wrappers import ActionMasker  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs" / "monitoring.md"
NET = dict(net_arch=dict(pi=[8, 8], vf=[8, 8]))
SPECTRUM = dict(n_samples=32, lanczos_steps=6, num_probes=1)
CALLBACKS = {
    "PlasticityMonitor": lambda: PlasticityMonitor(
        every_n_rollouts=1, hessian_kwargs=dict(SPECTRUM, log_density_figure=False)
    ),
    "HessianSpectrumCallback": lambda: HessianSpectrumCallback(every_n_rollouts=1, log_density_figure=False, **SPECTRUM),
    "FeatureRankCallback": lambda: FeatureRankCallback(n_samples=32),
    "TrainabilityCallback": lambda: TrainabilityCallback(**SPECTRUM),
    "PlasticityRegularizer": lambda: PlasticityRegularizer(erank_coef=1e-3, l2_coef=1e-3),
    "ShrinkAndPerturb": lambda: ShrinkAndPerturb(shrink=1e-4, noise_std=1e-4),
    "ReDo": lambda: ReDo(threshold=1.0),  # scores are normalised to mean 1: some unit is always reset
    "HeadReset": lambda: HeadReset(heads="both", every_n_rollouts=1),  # resets at the second rollout's start
}
MONITORS = ("PlasticityMonitor", "HessianSpectrumCallback", "FeatureRankCallback", "TrainabilityCallback")
TRAINING = ("PlasticityRegularizer", "ShrinkAndPerturb", "ReDo")
LINE_SEARCH = "TRPO (its actor step is a line search"
#: algorithm → {callback: None (supported) or a fragment of the refusal message}
EXPECTED: dict[str, dict[str, str | None]] = {
    "PPO": dict.fromkeys(CALLBACKS),
    "A2C": dict.fromkeys(CALLBACKS),
    "BLPO": dict.fromkeys(CALLBACKS),
    "MaskablePPO": dict.fromkeys(CALLBACKS),
    "TRPO": {**dict.fromkeys(MONITORS), **dict.fromkeys(TRAINING, LINE_SEARCH), "HeadReset": None},
    "RecurrentPPO": {
        **dict.fromkeys(MONITORS),
        **dict.fromkeys(TRAINING, "RecurrentPPO (its update runs on padded LSTM sequences"),
        "HeadReset": None,  # it only re-draws the heads' weights: no loss, no optimizer step involved
    },
}


def masked_cartpole() -> gym.Env:
    # Action 1 is invalid on every fourth step: the masks are real, not all-ones.
    env = gym.make("CartPole-v1")
    counter = {"step": 0}

    def masks(_env: gym.Env) -> np.ndarray:
        counter["step"] += 1
        return np.array([True, counter["step"] % 4 != 0])

    return ActionMasker(env, masks)


def make(algorithm: str) -> Any:
    common: dict[str, Any] = dict(n_steps=32, seed=0, policy_kwargs=NET)
    if algorithm in ("PPO", "BLPO", "TRPO", "MaskablePPO"):
        common["batch_size"] = 32
    if algorithm == "MaskablePPO":
        return sb3_contrib.MaskablePPO("MlpPolicy", masked_cartpole(), **common)
    if algorithm == "RecurrentPPO":
        return sb3_contrib.RecurrentPPO("MlpLstmPolicy", "CartPole-v1", n_steps=32, batch_size=32, seed=0)
    classes = {"PPO": PPO, "A2C": A2C, "BLPO": BLPO, "TRPO": sb3_contrib.TRPO}
    return classes[algorithm]("MlpPolicy", "CartPole-v1", **common)


def cell(value: str | None) -> str:
    return "yes" if value is None else "no"


def expected_table() -> str:
    lines = ["| algorithm | " + " | ".join(CALLBACKS) + " |", "|---" * (len(CALLBACKS) + 1) + "|"]
    for algorithm, row in EXPECTED.items():
        lines.append(f"| {algorithm} | " + " | ".join(cell(row[name]) for name in CALLBACKS) + " |")
    return "\n".join(lines)


@pytest.mark.parametrize("callback", list(CALLBACKS))
@pytest.mark.parametrize("algorithm", list(EXPECTED))
def test_can_i_use(algorithm: str, callback: str) -> None:
    model = make(algorithm)
    refusal = EXPECTED[algorithm][callback]
    if refusal is None:
        instance = CALLBACKS[callback]()
        model.learn(64, callback=instance)
        assert model.num_timesteps >= 64
        if callback in MONITORS:
            monitors = (
                [instance.hessian, instance.features, instance.trainability] if callback == "PlasticityMonitor" else [instance]
            )
            assert all(monitor.n_measurements > 0 for monitor in monitors)
        else:  # it changed the training: the same seed without it ends elsewhere
            plain = make(algorithm)
            plain.learn(64)
            after, without = model.policy.parameters_to_vector(), plain.policy.parameters_to_vector()
            assert not np.allclose(after, without)
    else:
        with pytest.raises(TypeError, match=refusal.replace("(", r"\(")):
            model.learn(64, callback=CALLBACKS[callback]())


def test_docs_table_is_the_tested_one() -> None:
    assert expected_table() in DOCS.read_text(), f"docs/monitoring.md should contain:\n{expected_table()}"


def test_maskable_ppo_losses_use_the_rollout_masks() -> None:
    """The view's actor loss on MaskablePPO is the masked one: the same as the policy's own evaluate_actions with the
    buffer's masks, and different without them."""
    model = make("MaskablePPO")
    model.ent_coef = 0.01  # the masked entropy enters the loss too
    model.learn(32)
    view = OnPolicyModelView(model)
    batch = view.sample_batch(None, th.Generator().manual_seed(0))
    assert batch.action_masks is not None and not bool(batch.action_masks.all())
    _, log_prob, entropy = model.policy.evaluate_actions(batch.observations, batch.actions, action_masks=batch.action_masks)
    advantages = (batch.advantages - batch.advantages.mean()) / (batch.advantages.std() + 1e-8)
    ratio = th.exp(log_prob - batch.old_log_prob)
    clip = float(model.clip_range(1.0))
    expected = -th.min(advantages * ratio, advantages * th.clamp(ratio, 1 - clip, 1 + clip)).mean()
    expected = expected - model.ent_coef * entropy.mean()
    th.testing.assert_close(view.losses.actor_loss(batch), expected)
    unmasked = type(batch)(**{**batch.__dict__, "action_masks": None})
    assert not th.allclose(view.losses.actor_loss(unmasked), expected)
