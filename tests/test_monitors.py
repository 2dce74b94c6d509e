"""Monitors on stock PPO and A2C (and BLPO when it is available): TensorBoard output, cadence, task switches, errors."""

from __future__ import annotations

import csv
import glob
import os
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from stable_baselines3 import A2C, DQN, PPO
from stable_baselines3.common.logger import configure
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from sb3_blpo import BLPO
from sb3_blpo.callbacks import (
    TASK_SWITCH_INFO_KEY,
    FeatureRankCallback,
    HessianSpectrumCallback,
    PlasticityMonitor,
    TrainabilityCallback,
)
from sb3_blpo.callbacks.monitors import TRAINABILITY_METRIC_NAMES
from sb3_blpo.common.model_view import OnPolicyModelView
from sb3_blpo.curvature import SpectralQuadrature, epsilon_rank

TINY_NET = dict(net_arch=dict(pi=[8, 8], vf=[8, 8]))
FAST_SPECTRUM = dict(lanczos_steps=8, num_probes=2, n_samples=64)


def _make_model(algo: str, env: Any = None, n_steps: int = 64, **kwargs: Any) -> Any:
    if algo == "PPO":
        return PPO(
            "MlpPolicy",
            env or "CartPole-v1",
            n_steps=n_steps,
            batch_size=32,
            n_epochs=2,
            policy_kwargs=TINY_NET,
            seed=0,
            **kwargs,
        )
    if algo == "A2C":
        return A2C("MlpPolicy", env or "Pendulum-v1", n_steps=n_steps, policy_kwargs=TINY_NET, seed=0, **kwargs)
    if algo == "BLPO":
        return BLPO(
            "MlpPolicy",
            env or "CartPole-v1",
            n_steps=n_steps,
            batch_size=32,
            n_epochs=1,
            policy_kwargs=TINY_NET,
            seed=0,
            **kwargs,
        )
    raise ValueError(algo)


def _events(folder: str) -> EventAccumulator:
    files = glob.glob(os.path.join(folder, "**", "events.out.tfevents.*"), recursive=True)
    assert files, f"no TensorBoard event file under {folder}"
    accumulator = EventAccumulator(os.path.dirname(files[0]), size_guidance={"scalars": 0, "histograms": 0, "images": 0})
    accumulator.Reload()
    return accumulator


@pytest.mark.parametrize("algo", ["PPO", "A2C", "BLPO"])
def test_dashboards_are_written_to_tensorboard_and_text_formats_stay_clean(algo, tmp_path):
    model = _make_model(algo)
    model.set_logger(configure(str(tmp_path), ["stdout", "csv", "tensorboard"]))
    monitor = PlasticityMonitor(
        every_n_rollouts=2, hessian_kwargs=dict(FAST_SPECTRUM, log_density_figure=True), feature_kwargs=dict(n_samples=64)
    )
    model.learn(4 * 64, callback=monitor, log_interval=1)

    events = _events(str(tmp_path))
    tags = events.Tags()
    scalars, histograms, images = set(tags["scalars"]), set(tags["histograms"]), set(tags["images"])
    expected_scalars = {
        f"hessian/{group}/{name}"
        for group in ("actor", "critic")
        for name in (
            "lambda_max",
            "lambda_min",
            "neg_mass",
            "trace",
            "trace_ci",
            "eps_rank_0.001",
            "eps_rank_0.01",
            "eps_rank_0.1",
            "eps_rank_lo_0.01",
            "eps_rank_hi_0.01",
        )
    }
    expected_scalars |= {
        f"plasticity/{layer}/{name}"
        for layer in ("pi0", "pi1", "vf0", "vf1")
        for name in ("erank", "srank", "approx_rank", "rank", "dormant", "feat_norm")
    }
    expected_scalars |= {
        f"plasticity/{group}/{name}" for group in ("actor", "critic") for name in ("weight_norm", "dist_init")
    }
    expected_scalars |= {f"trainability/{group}/{name}" for group in ("actor", "critic") for name in TRAINABILITY_METRIC_NAMES}
    expected_scalars |= {"trainability/task", "hessian/seconds"}
    assert expected_scalars <= scalars, sorted(expected_scalars - scalars)
    assert {"hessian/actor/ritz", "hessian/critic/ritz"} <= histograms
    assert {"hessian/actor/density", "hessian/critic/density"} <= images
    ours = [tag for tag in scalars | histograms | images if tag.split("/")[0] in ("hessian", "plasticity", "trainability")]
    assert max(len(tag) for tag in ours) <= 36

    # Hessian: task start (rollout 1) and every 2 rollouts after (rollout 3); features: every rollout.
    assert [event.step for event in events.Scalars("hessian/actor/lambda_max")] == [64, 192]
    assert [event.step for event in events.Scalars("plasticity/pi1/erank")] == [64, 128, 192, 256]
    assert [event.value for event in events.Scalars("trainability/critic/ratio")] == [1.0]
    ritz = events.Histograms("hessian/actor/ritz")[0].histogram_value
    assert ritz.num == 2 * FAST_SPECTRUM["lanczos_steps"]  # probes × steps Ritz values
    lambda_max = events.Scalars("hessian/actor/lambda_max")[0].value
    assert ritz.max == pytest.approx(lambda_max, rel=1e-5)
    for metric in ("erank", "srank", "rank"):
        assert all(1.0 <= event.value <= 8.0 for event in events.Scalars(f"plasticity/vf0/{metric}"))
    for name in ("eps_rank_0.01", "neg_mass"):
        assert all(0.0 <= event.value <= 1.0 for event in events.Scalars(f"hessian/critic/{name}"))
    for low, estimate, high in zip(
        *(events.Scalars(f"hessian/actor/eps_rank{part}0.1") for part in ("_lo_", "_", "_hi_")), strict=True
    ):
        assert low.value <= estimate.value <= high.value

    # Scalars reach the CSV file; arrays and figures are kept out of it.
    with open(tmp_path / "progress.csv") as handle:
        header = next(csv.reader(handle))
    assert "hessian/actor/lambda_max" in header and "plasticity/pi0/erank" in header
    assert not any(column.endswith(("/ritz", "/density")) for column in header)


def test_lambda_max_matches_dense_hessian_of_the_policy_losses():
    model = PPO("MlpPolicy", "CartPole-v1", n_steps=64, batch_size=32, n_epochs=1, policy_kwargs=dict(net_arch=[4]), seed=1)
    model.learn(64)  # fills the rollout buffer (and trains once, so the losses are not at initialisation)
    callback = HessianSpectrumCallback(n_samples=None, lanczos_steps=20, num_probes=2, log_density_figure=False)
    callback.init_callback(model)
    measured = callback.measure()
    access = OnPolicyModelView(model)
    batch = access.sample_batch(None, th.Generator().manual_seed(0))  # all transitions, as the callback used

    for group in ("actor", "critic"):
        eigenvalues = th.linalg.eigvalsh(access.exact_hessian(group, batch).double())
        summary = measured[group].summary
        assert summary.lambda_max == pytest.approx(float(eigenvalues[-1]), rel=0.01)
        assert summary.lambda_min == pytest.approx(float(eigenvalues[0]), rel=0.01, abs=1e-3 * float(eigenvalues.abs().max()))
        assert summary.trace.ci_low <= float(eigenvalues.sum()) <= summary.trace.ci_high


@pytest.mark.parametrize("algo", ["PPO", "A2C"])
def test_losses_match_the_algorithms_own_formulas(algo):
    # After learn() the policy has moved away from the one that collected the buffer, so PPO's ratio is not 1 and its
    # clipping (at the scheduled clip range of the coming update) matters.
    if algo == "PPO":
        model = _make_model("PPO", ent_coef=0.01, clip_range=lambda progress: 0.05 + 0.1 * progress)
    else:
        model = _make_model("A2C", ent_coef=0.01, normalize_advantage=True)
    model.learn(128)
    access = OnPolicyModelView(model)
    batch = access.sample_batch(None, th.Generator().manual_seed(0))
    values, log_prob, entropy = model.policy.evaluate_actions(batch.observations, batch.actions)
    advantages = (batch.advantages - batch.advantages.mean()) / (batch.advantages.std() + 1e-8)
    if algo == "PPO":
        assert access.actor_objective == "clipped_surrogate" and access.progress_remaining() == 0.0
        ratio = th.exp(log_prob - batch.old_log_prob)
        assert not th.allclose(ratio, th.ones_like(ratio))
        policy_loss = -th.min(advantages * ratio, advantages * th.clamp(ratio, 0.95, 1.05)).mean()
    else:
        assert access.actor_objective == "policy_gradient"
        policy_loss = -(advantages * log_prob).mean()
    expected_actor = policy_loss - 0.01 * entropy.mean()
    th.testing.assert_close(access.losses.actor_loss(batch), expected_actor)
    th.testing.assert_close(access.losses.critic_loss(batch), nn.functional.mse_loss(batch.returns, values.flatten()))
    th.testing.assert_close(access.loss("joint", batch), expected_actor + model.vf_coef * access.losses.critic_loss(batch))


def test_monitors_leave_gradients_and_training_mode_untouched():
    model = _make_model("PPO")
    model.learn(64)
    params = list(model.policy.parameters())
    for index, param in enumerate(params):
        param.grad = th.full_like(param, float(index)) if index % 2 else None
    before = [None if p.grad is None else p.grad.clone() for p in params]
    for training in (False, True):
        model.policy.set_training_mode(training)
        hessian = HessianSpectrumCallback(
            parameter_groups=("actor", "critic", "joint"), log_density_figure=False, **FAST_SPECTRUM
        )
        features = FeatureRankCallback(n_samples=64)
        for callback in (hessian, features):
            callback.init_callback(model)
            callback.measure()
        assert model.policy.training is training
        assert all(module.training is training for module in model.policy.modules())
        for param, grad in zip(params, before, strict=True):
            assert (param.grad is None) if grad is None else th.equal(param.grad, grad)


def test_sample_batch_reads_the_buffer_before_and_after_sb3_flattens_it():
    model = _make_model("PPO", n_steps=32, env="CartPole-v1")
    model.learn(32)  # train() called rollout_buffer.get(), which flattened the buffer in place
    access = OnPolicyModelView(model)
    buffer = model.rollout_buffer
    assert buffer.generator_ready
    flattened = access.sample_batch(None, th.Generator().manual_seed(0), first_step=10)
    # Rebuild the unflattened layout (n_steps, n_envs, ...) from the env-major flat arrays and read it again.
    for name in ("observations", "actions", "values", "log_probs", "advantages", "returns"):  # the fields get() flattens
        array = getattr(buffer, name)
        setattr(buffer, name, array.reshape(buffer.n_envs, buffer.buffer_size, *array.shape[1:]).swapaxes(0, 1).copy())
    buffer.generator_ready = False
    unflattened = access.sample_batch(None, th.Generator().manual_seed(0), first_step=10)
    assert flattened.size == unflattened.size == 22
    for field in ("observations", "actions", "old_log_prob", "advantages", "returns"):
        assert th.equal(getattr(flattened, field), getattr(unflattened, field))
    th.testing.assert_close(unflattened.observations, th.as_tensor(buffer.observations[10:, 0]))


@pytest.mark.parametrize("log_interval, expected_steps", [(1, [32, 64, 96]), (3, [48, 96])])
def test_periodic_cadence_waits_for_rollouts_whose_logs_are_dumped(log_interval, expected_steps):
    model = _make_model("A2C", n_steps=16)
    seen: list[int] = []

    class Recording(HessianSpectrumCallback):
        def _measure(self, first_step: int, task_start: bool) -> None:
            seen.append(self.num_timesteps)
            super()._measure(first_step, task_start)

    callback = Recording(
        every_n_rollouts=2, on_task_switch=False, log_density_figure=False, **dict(FAST_SPECTRUM, n_samples=16)
    )
    model.learn(6 * 16, callback=callback, log_interval=log_interval)
    assert seen == expected_steps
    assert callback.n_rollouts == 6


class SwitchTaskAtStep(gym.Wrapper):
    """Flags a task switch in the info of the ``switch_step``-th environment step (counted across episodes)."""

    def __init__(self, env: gym.Env, switch_step: int) -> None:
        super().__init__(env)
        self.switch_step = switch_step
        self.steps = 0

    def step(self, action: Any) -> Any:
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.steps += 1
        if self.steps == self.switch_step:
            info[TASK_SWITCH_INFO_KEY] = True
        return obs, reward, terminated, truncated, info


@pytest.mark.parametrize(
    "min_task_samples, expected_step, expected_samples",
    [(16, 128, 64 - 35), (64, 192, 64)],  # enough new-task transitions in rollout 2 / too few: measure on rollout 3
)
def test_task_switch_info_key_measures_on_the_new_task_data(min_task_samples, expected_step, expected_samples):
    env = SwitchTaskAtStep(gym.make("CartPole-v1"), switch_step=100)  # rollout 2 holds steps 65..128: index 35
    model = _make_model("PPO", env=env)
    hessian = HessianSpectrumCallback(
        every_n_rollouts=None,
        log_density_figure=False,
        min_task_samples=min_task_samples,
        **dict(FAST_SPECTRUM, n_samples=None),
    )
    trainability = TrainabilityCallback(
        spectrum_source=hessian, min_task_samples=min_task_samples, **dict(FAST_SPECTRUM, n_samples=None)
    )
    model.learn(4 * 64, callback=[hessian, trainability])
    assert hessian.n_measurements == 2  # task 0 at rollout 1, task 1 once
    latest = hessian.latest["actor"]
    assert (latest.task_start, latest.task_index, latest.num_timesteps) == (True, 1, expected_step)
    assert latest.n_samples == expected_samples
    steps = [(record.task_index, record.num_timesteps) for record in trainability.history]
    assert steps == [(0, 64), (0, 64), (1, expected_step), (1, expected_step)]
    # The trainability callback reused the Hessian callback's spectrum of the same rollout.
    task1 = {record.group: record for record in trainability.history if record.task_index == 1}
    assert task1["actor"].epsilon_rank == pytest.approx(float(epsilon_rank(latest.quadrature, [task1["actor"].epsilon])[0]))
    # ε was fixed at task 0 to 5% of each group's spectral range and kept for task 1.
    task0 = {record.group: record for record in trainability.history if record.task_index == 0}
    assert task1["critic"].epsilon == task0["critic"].epsilon > 0


def test_notify_task_switch_between_learn_calls_and_collapse_flag(monkeypatch):
    model = _make_model("PPO")
    monitor = PlasticityMonitor(
        hessian_kwargs=FAST_SPECTRUM, feature_kwargs=dict(n_samples=64), collapse_threshold=0.25, trainability_epsilon=0.1
    )
    ranks = iter([0.4, 0.4, 0.08, 0.3])  # actor and critic ε-ranks at task 0, then at task 1

    def crafted_quadrature(self: TrainabilityCallback, group: str, *args: Any) -> SpectralQuadrature:
        # Two nodes: mass 1 − r at 0 and r at 2r, so that the ε-rank (ε = 0.1) is r and λmax is 2r.
        rank = next(ranks)
        nodes, weights = th.tensor([0.0, 2 * rank], dtype=th.float64), th.tensor([1 - rank, rank], dtype=th.float64)
        return SpectralQuadrature(nodes=[nodes], weights=[weights], dim=10, num_products=0)

    monkeypatch.setattr(TrainabilityCallback, "_quadrature", crafted_quadrature)
    model.learn(64, callback=monitor)
    monitor.notify_task_switch()
    model.learn(64, callback=monitor, reset_num_timesteps=False)
    records = monitor.trainability.history
    assert [(r.task_index, r.group) for r in records] == [(0, "actor"), (0, "critic"), (1, "actor"), (1, "critic")]
    assert records[2].ratio == pytest.approx(0.2) and records[2].collapsed
    assert records[2].lambda_max_ratio == pytest.approx(0.2)
    assert records[3].ratio == pytest.approx(0.75) and not records[3].collapsed
    assert monitor.hessian.latest["actor"].task_start and monitor.hessian.latest["actor"].num_timesteps == 128
    assert monitor.features.tasks.task_index == 1


def test_shared_features_extractor_parameters_belong_to_both_groups():
    class LinearExtractor(BaseFeaturesExtractor):
        def __init__(self, observation_space: gym.Space) -> None:
            super().__init__(observation_space, features_dim=6)
            self.linear = nn.Sequential(nn.Linear(int(np.prod(observation_space.shape)), 6), nn.ReLU())

        def forward(self, observations: th.Tensor) -> th.Tensor:
            return self.linear(observations)

    for shared in (True, False):
        policy_kwargs = dict(TINY_NET, features_extractor_class=LinearExtractor, share_features_extractor=shared)
        model = PPO("MlpPolicy", "CartPole-v1", n_steps=32, batch_size=32, policy_kwargs=policy_kwargs, seed=0)
        access = OnPolicyModelView(model)
        actor, critic = {id(p) for p in access.parameters("actor")}, {id(p) for p in access.parameters("critic")}
        extractor = {id(p) for p in model.policy.pi_features_extractor.parameters()}
        assert extractor <= actor
        assert (extractor <= critic) is shared
        assert actor | critic == {id(p) for p in model.policy.parameters()}
        layers = set(access.hidden_layers())
        assert layers == ({"pi_features"} if shared else {"pi_features", "vf_features"}) | {"pi0", "pi1", "vf0", "vf1"}
        model.learn(32)
        features = access.features(access.sample_batch(16, th.Generator().manual_seed(0)).observations, sorted(layers))
        assert {name: tuple(value.shape) for name, value in features.items()}["pi_features"] == (16, 6)
        assert all(value.shape == (16, 8) for name, value in features.items() if name[-1].isdigit())


def test_feature_metrics_of_the_callback_match_a_manual_forward_pass():
    model = _make_model("PPO", n_steps=32)
    model.learn(32)
    callback = FeatureRankCallback(layers=["pi1", "vf0"], n_samples=None)
    callback.init_callback(model)
    measured = callback.measure()
    batch = callback.access.sample_batch(None, th.Generator().manual_seed(0))
    with th.no_grad():
        features = model.policy.extract_features(batch.observations)
        # A shared features extractor returns one tensor, separate ones a (policy, value) pair.
        pi_features, vf_features = features if isinstance(features, tuple) else (features, features)
        latent_pi = model.policy.mlp_extractor.forward_actor(pi_features)
        latent_vf0 = model.policy.mlp_extractor.value_net[:2](vf_features)
    from sb3_blpo.metrics import feature_metrics

    assert measured["pi1"] == pytest.approx(feature_metrics(latent_pi))
    assert measured["vf0"] == pytest.approx(feature_metrics(latent_vf0))
    assert all(not module._forward_hooks for module in model.policy.modules())  # hooks removed


def test_bad_input_raises_clear_errors():
    for kwargs, match in (
        (dict(lanczos_steps=1), "lanczos_steps"),
        (dict(epsilons=(1e-2, 0.0)), "positive"),
        (dict(epsilons=(-1e-3,)), "positive"),
        (dict(parameter_groups=("policy",)), "parameter group"),
        (dict(every_n_rollouts=0), "every_n_rollouts"),
        (dict(num_probes=0), "num_probes"),
        (dict(every_n_rollouts=None, on_task_switch=False), "never fire"),
    ):
        with pytest.raises(ValueError, match=match):
            HessianSpectrumCallback(**kwargs)
    with pytest.raises(ValueError, match="collide"):
        HessianSpectrumCallback(epsilons=(0.1234561, 0.1234562))
    with pytest.raises(ValueError):
        TrainabilityCallback(epsilon=0.0)
    with pytest.raises(ValueError):
        TrainabilityCallback(collapse_threshold=0.0)
    with pytest.raises(ValueError):
        FeatureRankCallback(dormant_tau=-1.0)

    model = _make_model("PPO", n_steps=32)
    with pytest.raises(ValueError, match=r"unknown layer.*pi7"):
        FeatureRankCallback(layers=["pi0", "pi7"]).init_callback(model)
    with pytest.raises(ValueError, match="unknown layer"):
        model.learn(32, callback=PlasticityMonitor(feature_kwargs=dict(layers=["actor"])))

    broken = _make_model("PPO", n_steps=32)
    del broken.policy.value_net
    with pytest.raises(TypeError, match="value_net"):
        HessianSpectrumCallback().init_callback(broken)
    odd = _make_model("PPO", n_steps=32)
    odd.policy.mlp_extractor.policy_net = nn.Identity()
    with pytest.raises(TypeError, match="Sequential"):
        FeatureRankCallback().init_callback(odd)
    off_policy = DQN("MlpPolicy", "CartPole-v1", buffer_size=100, learning_starts=0)
    with pytest.raises(TypeError, match="on-policy"):
        HessianSpectrumCallback().init_callback(off_policy)


def test_plasticity_monitor_forwards_info_key_switches_to_its_monitors():
    env = SwitchTaskAtStep(gym.make("CartPole-v1"), switch_step=70)  # rollout 2, index 5: 59 new-task transitions
    model = _make_model("PPO", env=env)
    monitor = PlasticityMonitor(hessian_kwargs=dict(FAST_SPECTRUM, n_samples=32), feature_kwargs=dict(n_samples=32))
    model.learn(3 * 64, callback=monitor)
    assert monitor.hessian.tasks.task_index == monitor.features.tasks.task_index == monitor.trainability.tasks.task_index == 1
    # 59 < min_task_samples = 64: the task-1 measurement moved to rollout 3, all of it new-task data.
    assert [(record.task_index, record.num_timesteps) for record in monitor.trainability.history] == [
        (0, 64),
        (0, 64),
        (1, 192),
        (1, 192),
    ]


def test_blpo_joint_loss_is_the_sum_of_its_two_losses():
    """BLPO passes vf_coef=0 to SB3 (its critic has its own loss and optimizer): the joint group must still include
    the critic's loss, with weight 1, and so its spectrum must see the critic's curvature."""
    model = BLPO("MlpPolicy", "Pendulum-v1", n_steps=64, batch_size=32, seed=0, policy_kwargs=TINY_NET)
    model.learn(64)
    assert model.vf_coef == 0.0
    access = OnPolicyModelView(model)
    batch = access.sample_batch(None, th.Generator().manual_seed(0))
    th.testing.assert_close(access.loss("joint", batch), access.losses.actor_loss(batch) + access.losses.critic_loss(batch))
    joint = th.linalg.eigvalsh(access.exact_hessian("joint", batch).double())
    critic = th.linalg.eigvalsh(access.exact_hessian("critic", batch).double())
    # The groups are disjoint and the two losses separate, so the joint Hessian is block diagonal: its top eigenvalue
    # is the larger of the two blocks' (the critic's on Pendulum), not the actor's alone.
    actor = th.linalg.eigvalsh(access.exact_hessian("actor", batch).double())
    assert float(joint.max()) == pytest.approx(max(float(actor.max()), float(critic.max())), rel=1e-6)
    assert float(critic.max()) > float(actor.max())


def _csv_monitor_columns(folder: Path) -> list[str]:
    with open(folder / "progress.csv") as handle:
        header = next(csv.reader(handle))
    return [column for column in header if column.split("/")[0] in ("hessian", "plasticity", "trainability")]


@pytest.mark.parametrize("text_logs, at_most", [("summary", 3), ("all", None)])
def test_console_gets_three_monitor_keys_by_default(text_logs, at_most, tmp_path):
    model = _make_model("PPO")
    model.set_logger(configure(str(tmp_path), ["csv", "tensorboard"]))
    monitor = PlasticityMonitor(
        every_n_rollouts=1, hessian_kwargs=FAST_SPECTRUM, feature_kwargs=dict(n_samples=64), text_logs=text_logs
    )
    model.learn(2 * 64, callback=monitor, log_interval=1)
    columns = _csv_monitor_columns(tmp_path)
    if at_most is not None:
        assert sorted(columns) == ["hessian/actor/lambda_max", "plasticity/pi0/erank", "trainability/actor/ratio"]
    else:
        assert len(columns) > 40 and "hessian/critic/trace" in columns
    # TensorBoard gets the full set either way.
    assert "hessian/critic/trace" in _events(str(tmp_path)).Tags()["scalars"]


def test_density_figure_is_opt_in(tmp_path):
    """By default the monitor logs the Ritz values (a cheap histogram) and no matplotlib figure."""
    model = _make_model("PPO")
    model.set_logger(configure(str(tmp_path), ["tensorboard"]))
    assert HessianSpectrumCallback().log_density_figure is False
    model.learn(2 * 64, callback=PlasticityMonitor(every_n_rollouts=1, hessian_kwargs=FAST_SPECTRUM), log_interval=1)
    tags = _events(str(tmp_path)).Tags()
    assert {"hessian/actor/ritz", "hessian/critic/ritz"} <= set(tags["histograms"])
    assert not [tag for tag in tags["images"] if tag.startswith("hessian/")]


def test_task_start_spectrum_reaches_tensorboard_at_its_own_step(tmp_path):
    """every_n_rollouts < log_interval: the periodic measurement at the first dump must not overwrite the task-0
    values before they are written; they go to TensorBoard at the task-0 step."""
    model = _make_model("PPO")
    model.set_logger(configure(str(tmp_path), ["csv", "tensorboard"]))
    hessian = HessianSpectrumCallback(every_n_rollouts=3, log_density_figure=False, **FAST_SPECTRUM)
    measured: dict[int, float] = {}
    measure = hessian.measure

    def remembered(first_step: int = 0, task_start: bool = False) -> dict:
        results = measure(first_step, task_start)
        measured[int(hessian.num_timesteps)] = results["critic"].summary.lambda_max
        return results

    hessian.measure = remembered  # type: ignore[method-assign]
    model.learn(5 * 64, callback=hessian, log_interval=5)
    assert sorted(measured) == [64, 320]  # task 0 at rollout 1; periodic at rollout 5, the first dump
    events = {event.step: event.value for event in _events(str(tmp_path)).Scalars("hessian/critic/lambda_max")}
    assert events == pytest.approx(measured)


def test_tensorboard_gets_one_custom_scalars_layout_and_task_start_verdicts(tmp_path):
    import re

    from tensorboard.plugins.custom_scalar import layout_pb2

    model = _make_model("PPO")
    model.tensorboard_log = str(tmp_path)
    monitor = PlasticityMonitor(every_n_rollouts=1, hessian_kwargs=FAST_SPECTRUM, feature_kwargs=dict(n_samples=64))
    model.learn(2 * 64, callback=monitor, tb_log_name="run")
    model.learn(64, callback=monitor, tb_log_name="run", reset_num_timesteps=False)  # same run: no second layout
    model.learn(64, callback=monitor, tb_log_name="run")  # a new run folder (run_2) gets its own layout

    def accumulator(run: str) -> EventAccumulator:
        events = EventAccumulator(str(tmp_path / run), size_guidance={"tensors": 0, "scalars": 0})
        events.Reload()
        return events

    assert len(accumulator("run_2").Tensors("custom_scalars__config__")) == 1
    events = accumulator("run_1")
    configs = events.Tensors("custom_scalars__config__")
    assert len(configs) == 1
    layout = layout_pb2.Layout.FromString(configs[0].tensor_proto.string_val[0])
    charts = {chart.title: chart for category in layout.category for chart in category.chart}
    scalars = set(events.Tags()["scalars"])
    bracket = charts["critic: ε-rank, ε = 0.01 (bracket)"].margin.series[0]
    assert (bracket.value, bracket.lower, bracket.upper) == (
        "hessian/critic/eps_rank_0.01",
        "hessian/critic/eps_rank_lo_0.01",
        "hessian/critic/eps_rank_hi_0.01",
    )
    # Every chart draws series that exist: each regex of a multiline chart matches a logged tag.
    for title, chart in charts.items():
        if chart.HasField("multiline"):
            for pattern in chart.multiline.tag:
                assert any(re.search(pattern, tag) for tag in scalars), (title, pattern)
        else:
            for series in chart.margin.series:
                assert {series.value, series.lower, series.upper} <= scalars, title
    assert len([tag for tag in scalars if re.search(charts["erank (every layer)"].multiline.tag[0], tag)]) == 4
    verdicts = events.Tensors("trainability/verdict/text_summary")
    assert [event.step for event in verdicts] == [64]
    assert verdicts[0].tensor_proto.string_val[0].decode().startswith("task 0 at step 64: actor: ε-rank")


def test_density_figure_is_titled_with_task_and_step_and_can_overlay_task_starts(tmp_path):
    model = _make_model("PPO")
    hessian = HessianSpectrumCallback(every_n_rollouts=1, overlay_task_starts=True, **FAST_SPECTRUM)
    figures = []
    original = hessian._density_figure

    def keep(group, measurement):  # type: ignore[no-untyped-def]
        figure = original(group, measurement)
        figures.append((group, measurement, figure))
        return figure

    hessian._density_figure = keep  # type: ignore[method-assign]
    model.set_logger(configure(str(tmp_path), ["tensorboard"]))
    model.learn(64, callback=hessian)
    hessian.notify_task_switch()
    model.learn(128, callback=hessian, reset_num_timesteps=False)
    critic = [(m, f) for g, m, f in figures if g == "critic"]
    assert critic, "no density figure was made (is a TensorBoard writer configured?)"
    for measurement, figure in critic:
        title = figure.axes[0].get_title()
        assert f"task {measurement.task_index}" in title and f"step {measurement.num_timesteps}" in title
        assert tuple(figure.get_size_inches()) == (6.4, 4.0)
    # The last figure draws the earlier task starts under its own curve.
    assert len(critic[-1][1].axes[0].lines) == 1 + sum(1 for m, _ in critic[:-1] if m.task_start)
