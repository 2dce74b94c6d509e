"""Plasticity regularizers (``sb3_blpo.callbacks.regularizers``): exactness against terms added by hand, BLPO levels,
ascent schedule, hook lifecycle, save/load, logging, bad input, Shrink & Perturb and ReDo.

Every run is tiny (16-unit networks, at most a few hundred env steps).
"""

from __future__ import annotations

import copy
import gc
import math
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch as th
import torch.nn.functional as F
from gymnasium import spaces
from stable_baselines3 import A2C, DQN, PPO, SAC
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import KVWriter, Logger
from torch import nn

from sb3_blpo import BLPO
from sb3_blpo.callbacks import HessianSpectrumCallback, PlasticityRegularizer, ReDo, ShrinkAndPerturb
from sb3_blpo.callbacks.penalty_delivery import GradientInjection, PenaltyTerms
from sb3_blpo.callbacks.regularizers import L2_INIT_ATTRIBUTE
from sb3_blpo.common.features import hidden_layers_of
from sb3_blpo.penalties import ParameterPenalty, effective_rank_gradients, effective_rank_objective

NET = dict(net_arch=[16, 16])
EPS = 1e-12


# ---------------------------------------------------------------------------------------------------------------- helpers
class Probe(BaseCallback):
    """Runs the given functions at the callback events (with the model as argument)."""

    def __init__(self, **events: Callable[[Any], None]) -> None:
        super().__init__()
        self.events = events

    def _fire(self, name: str) -> None:
        if name in self.events:
            self.events[name](self.model)

    def _on_training_start(self) -> None:
        self._fire("training_start")

    def _on_rollout_end(self) -> None:
        self._fire("rollout_end")

    def _on_step(self) -> bool:
        self._fire("step")
        return True


class Collector(KVWriter):
    """Keeps every dump of the logger."""

    def __init__(self) -> None:
        self.dumps: list[dict[str, Any]] = []

    def write(self, key_values: dict[str, Any], key_excluded: dict[str, Any], step: int = 0) -> None:
        self.dumps.append(dict(key_values))


def hand_erank(features: th.Tensor) -> th.Tensor:
    """Roy–Vetterli effective rank, written out independently of the package (the oracle)."""
    values = th.linalg.svdvals(features)
    p = values / (values.sum() + EPS)
    return th.exp(-(p * th.log(p + EPS)).sum())


def hand_features(policy: Any, observations: th.Tensor) -> dict[str, th.Tensor]:
    """Outputs of each activation of the MLP branches, from a forward pass written out by hand."""
    features = policy.extract_features(observations)
    pi_in, vf_in = features if isinstance(features, tuple) else (features, features)
    out = {}
    for prefix, network, x in (("pi", policy.mlp_extractor.policy_net, pi_in), ("vf", policy.mlp_extractor.value_net, vf_in)):
        index = 0
        for module in network:
            x = module(x)
            if not isinstance(module, nn.Linear):
                out[f"{prefix}{index}"] = x
                index += 1
    return out


def hand_rank_objective(features: dict[str, th.Tensor], branches: tuple[str, ...] = ("pi", "vf")) -> th.Tensor:
    total = th.zeros(())
    for prefix in branches:
        ranks = [hand_erank(value) for name, value in features.items() if name.startswith(prefix)]
        total = total + th.stack(ranks).mean()
    return total


def hand_parameter_terms(params: list[tuple[str, nn.Parameter]], anchor: dict[str, th.Tensor], l2: float, l2_init: float):
    squares = sum((p**2).sum() for _, p in params)
    distances = sum(((p - anchor[name]) ** 2).sum() for name, p in params)
    return 0.5 * l2 * squares + 0.5 * l2_init * distances


def perturbed_anchor(model: Any, scale: float = 0.3) -> dict[str, th.Tensor]:
    """An L2-Init anchor away from the current parameters, so that the term has a non-zero gradient at once."""
    generator = th.Generator().manual_seed(123)
    return {n: p.detach().clone() + scale * th.randn(p.shape, generator=generator) for n, p in model.policy.named_parameters()}


def relative_difference(a: list[th.Tensor], b: list[th.Tensor]) -> float:
    flat_a, flat_b = th.cat([x.flatten() for x in a]), th.cat([x.flatten() for x in b])
    return float((flat_a - flat_b).norm() / flat_b.norm())


def no_hooks_left(model: Any) -> bool:
    policy = model.policy
    modules_clean = all(not m._forward_hooks and not m._forward_pre_hooks for m in policy.modules())
    optimizers = [policy.optimizer, getattr(policy, "critic_optimizer", policy.optimizer)]
    optimizers_clean = all("zero_grad" not in vars(o) and not o._optimizer_step_post_hooks for o in optimizers)
    return modules_clean and optimizers_clean and not getattr(model, "_loss_terms", [])


def ppo_task_loss(model: Any, data: Any) -> th.Tensor:
    """PPO's / A2C's minibatch loss, written out as in their ``train()``."""
    actions = data.actions.long().flatten() if isinstance(model.action_space, spaces.Discrete) else data.actions
    values, log_prob, entropy = model.policy.evaluate_actions(data.observations, actions)
    advantages = data.advantages
    if model.normalize_advantage and len(advantages) > 1:
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    if isinstance(model, PPO):
        clip = model.clip_range(model._current_progress_remaining)
        ratio = th.exp(log_prob - data.old_log_prob)
        policy_loss = -th.min(advantages * ratio, advantages * th.clamp(ratio, 1 - clip, 1 + clip)).mean()
    else:
        policy_loss = -(advantages * log_prob).mean()
    value_loss = F.mse_loss(data.returns, values.flatten())
    return policy_loss - model.ent_coef * th.mean(entropy) + model.vf_coef * value_loss


# ---------------------------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize(
    "algo, env_id, kwargs",
    [
        (PPO, "Pendulum-v1", dict(n_steps=64, batch_size=64, n_epochs=1, ent_coef=0.01)),
        (A2C, "CartPole-v1", dict(n_steps=32)),
    ],
)
def test_loss_mode_update_equals_terms_added_by_hand(algo, env_id, kwargs):
    """One update with the callback == the same minibatch's loss + the terms written by hand, after clipping and step."""
    beta, l2, l2_init, max_norm = 0.5, 0.05, 0.5, 0.05
    model = algo("MlpPolicy", env_id, seed=0, policy_kwargs=NET, max_grad_norm=max_norm, **kwargs)
    anchor = perturbed_anchor(model)
    setattr(model, L2_INIT_ATTRIBUTE, anchor)
    saved: dict[str, Any] = {}
    recorded: list[list[th.Tensor]] = []

    def snapshot(m: Any) -> None:
        # Seeding numpy here fixes the minibatch permutation that train() draws next, so that the hand-written loss
        # below sees the rows in the same order (the erank gradient at near-zero singular values is ill-conditioned
        # in float32, so a mere reordering of the rows would change it by more than the tolerance).
        np.random.seed(1234)
        saved["policy"] = copy.deepcopy(m.policy.state_dict())
        saved["optimizer"] = copy.deepcopy(m.policy.optimizer.state_dict())

    def record_gradients(m: Any) -> None:
        # A pre-step hook sees the gradients exactly as the optimizer does: after SB3's clip_grad_norm_.
        m.policy.optimizer.register_step_pre_hook(
            lambda *_: recorded.append([p.grad.detach().clone() for p in m.policy.parameters()])
        )

    regularizer = PlasticityRegularizer(erank_coef=beta, l2_coef=l2, l2_init_coef=l2_init)
    probe = Probe(rollout_end=snapshot, training_start=record_gradients)
    model.learn(kwargs["n_steps"], callback=[regularizer, probe])
    assert len(recorded) == 1
    after = [p.detach().clone() for p in model.policy.parameters()]

    # By hand, on the same minibatch (the whole rollout), from the parameters before the update.
    policy = model.policy
    policy.load_state_dict(saved["policy"])
    policy.optimizer.load_state_dict(saved["optimizer"])
    policy.set_training_mode(True)
    np.random.seed(1234)
    data = next(model.rollout_buffer.get(batch_size=None))
    named = list(policy.named_parameters())

    def gradients(with_terms: bool) -> tuple[list[th.Tensor], float]:
        policy.optimizer.zero_grad()
        loss = ppo_task_loss(model, data)
        if with_terms:
            loss = loss - beta * hand_rank_objective(hand_features(policy, data.observations))
            loss = loss + hand_parameter_terms(named, anchor, l2, l2_init)
        loss.backward()
        norm = float(th.nn.utils.clip_grad_norm_(policy.parameters(), max_norm))
        return [p.grad.detach().clone() for p in policy.parameters()], norm

    plain, _ = gradients(with_terms=False)
    by_hand, norm_before_clipping = gradients(with_terms=True)
    assert norm_before_clipping > 2 * max_norm  # clipping is active
    assert relative_difference(recorded[0], by_hand) <= 1e-6
    assert relative_difference(plain, by_hand) > 1e-2  # the terms matter: the comparison is not vacuous
    policy.optimizer.step()
    assert relative_difference(after, [p.detach() for p in policy.parameters()]) <= 1e-6


def test_lazy_rank_term_is_every_kth_minibatch_with_k_times_the_weight(monkeypatch):
    """erank_every=k: the rank gradient on minibatches 0, k, 2k, … only, k times as large (no clipping here)."""
    weights: list[float] = []
    original = PenaltyTerms.rank_term_gradients

    def spy(self: PenaltyTerms, level: str, features: Any, weight: float = 1.0) -> Any:
        weights.append(weight)
        return original(self, level, features, weight)

    monkeypatch.setattr(PenaltyTerms, "rank_term_gradients", spy)
    settings = dict(seed=0, policy_kwargs=NET, n_steps=64, batch_size=16, n_epochs=2, max_grad_norm=1e6)

    def first_gradient(callback: BaseCallback | None) -> th.Tensor:
        model = PPO("MlpPolicy", "Pendulum-v1", **settings)
        recorded: list[th.Tensor] = []

        def record(m: Any) -> None:
            m.policy.optimizer.register_step_pre_hook(
                lambda *_: recorded.append(th.cat([p.grad.flatten() for p in m.policy.parameters()]))
            )

        probe = Probe(rollout_end=lambda _m: np.random.seed(1234), training_start=record)  # the same minibatches
        model.learn(64, callback=[probe] if callback is None else [callback, probe])
        assert len(recorded) == 8
        return recorded[0]

    plain = first_gradient(None)
    exact = first_gradient(PlasticityRegularizer(erank_coef=0.5))
    assert weights == [1.0] * 8
    weights.clear()
    lazy = first_gradient(PlasticityRegularizer(erank_coef=0.5, erank_every=3))
    assert weights == [3, 3, 3]  # minibatches 0, 3 and 6 of the 8
    assert float((exact - plain).norm()) > 1e-3 * float(plain.norm())  # the term is not negligible
    assert relative_difference([lazy - plain], [3 * (exact - plain)]) <= 1e-4


def test_lazy_rank_term_in_blpo_losses(monkeypatch):
    """The loss-term delivery (BLPO) skips the rank term the same way, per level."""
    calls: list[tuple[str, float]] = []
    original = PenaltyTerms.rank_term

    def spy(self: PenaltyTerms, level: str, features: Any, weight: float = 1.0) -> th.Tensor:
        calls.append((level, weight))
        return original(self, level, features, weight)

    monkeypatch.setattr(PenaltyTerms, "rank_term", spy)
    model = BLPO("MlpPolicy", "Pendulum-v1", seed=0, policy_kwargs=NET, n_steps=64, batch_size=16, n_epochs=1)
    model.learn(64, callback=PlasticityRegularizer(erank_coef=1e-3, erank_every=2))
    actor = [weight for level, weight in calls if level == "actor"]
    critic = [weight for level, weight in calls if level == "critic"]
    assert actor == [2, 2]  # 4 minibatches: the 1st and the 3rd
    assert critic and set(critic) == {2} and len(critic) == model.n_critic_steps * 4 // 2


def _test_features(generator: th.Generator) -> dict[str, dict[str, th.Tensor]]:
    """Feature matrices of every kind the rank term meets: full rank, rank-deficient, dead units, wide and tall."""

    def low_rank(rows: int, columns: int, rank: int) -> th.Tensor:
        return th.randn(rows, rank, generator=generator) @ th.randn(rank, columns, generator=generator)

    dead = th.randn(64, 64, generator=generator).tanh()
    dead[:, :20] = 0.0  # dead units: zero columns
    return {
        "actor": {
            "pi0": th.randn(64, 64, generator=generator).tanh(),  # square, full rank
            "pi1": low_rank(64, 64, 5),  # square, rank 5
            "pi2": dead,
        },
        "critic": {
            "vf0": low_rank(64, 64, 2).tanh(),  # nearly rank-deficient after the activation
            "vf1": th.randn(64, 16, generator=generator),  # tall
            "vf2": low_rank(16, 48, 3),  # wide and rank-deficient
        },
    }


@pytest.mark.parametrize("center", [False, True])
def test_closed_form_rank_gradients_equal_autograd_through_svdvals(center):
    """``effective_rank_gradients`` (no graph) == autograd through ``effective_rank_objective``, value and gradient."""
    features = _test_features(th.Generator().manual_seed(7))
    leaves = {
        group: {name: x.clone().requires_grad_(True) for name, x in layers.items()} for group, layers in features.items()
    }
    objective, ranks = effective_rank_objective(leaves, center=center)
    names = [name for layers in leaves.values() for name in layers]
    expected = th.autograd.grad(objective, [leaves[g][n] for g in leaves for n in leaves[g]])
    value, closed_ranks, gradients = effective_rank_gradients(features, center=center)
    assert value == pytest.approx(float(objective.detach()), rel=1e-6)
    assert closed_ranks == pytest.approx(ranks, rel=1e-6)
    for name, gradient in zip(names, expected, strict=True):
        assert not gradients[name].requires_grad
        assert relative_difference([gradients[name]], [gradient]) <= 1e-5, name


def _injection_setup() -> tuple[Any, GradientInjection, float, th.Tensor, th.Tensor]:
    model = PPO("MlpPolicy", "Pendulum-v1", seed=0, policy_kwargs=NET, n_steps=64)
    policy = model.policy
    layers = {
        **hidden_layers_of(policy.mlp_extractor.policy_net, "pi"),
        **hidden_layers_of(policy.mlp_extractor.value_net, "vf"),
    }
    beta = 0.5
    terms = PenaltyTerms(beta, list(layers), False, ParameterPenalty(), {"joint": list(policy.parameters())}, None)
    generator = th.Generator().manual_seed(3)
    observations, actions = th.randn(32, 3, generator=generator), th.randn(32, 1, generator=generator)
    return policy, GradientInjection(policy, terms, layers), beta, observations, actions


def test_injected_rank_gradient_rides_on_the_one_backward_and_only_after_zero_grad():
    policy, injection, beta, observations, actions = _injection_setup()
    policy.set_training_mode(True)

    def task_loss() -> th.Tensor:
        values, log_prob, entropy = policy.evaluate_actions(observations, actions)
        return values.square().mean() - log_prob.mean() - 0.01 * entropy.mean()

    def gradients_of(loss: th.Tensor) -> list[th.Tensor]:
        policy.zero_grad(set_to_none=True)  # the module's zero_grad, not the (wrapped) optimizer's
        loss.backward()
        return [p.grad.detach().clone() for p in policy.parameters()]

    plain = gradients_of(task_loss())
    by_hand = gradients_of(task_loss() - beta * hand_rank_objective(hand_features(policy, observations)))
    injection.install()
    try:
        # A backward pass through captured features that never reached optimizer.zero_grad gets nothing added.
        assert relative_difference(gradients_of(task_loss()), plain) == 0.0
        # SB3's order: forward, optimizer.zero_grad(), loss.backward() -> the rank gradient arrives in that backward.
        kept: list[weakref.ref] = []
        probe = policy.mlp_extractor.policy_net[-1].register_forward_hook(lambda *args: kept.append(weakref.ref(args[2])))
        loss = task_loss()
        probe.remove()
        policy.optimizer.zero_grad()
        assert not injection._captured  # handed over to the gradient hooks at zero_grad
        loss.backward()
        injected = [p.grad.detach().clone() for p in policy.parameters()]
        assert relative_difference(injected, by_hand) <= 1e-6
        assert relative_difference(injected, plain) > 1e-2  # not vacuous
        # The gradient hooks live on the captured outputs: once the graph is gone, so are they.
        del loss
        gc.collect()
        assert kept and kept[0]() is None
        # Collection (no_grad) and eval-mode passes with autograd (monitors) are not captured.
        with th.no_grad():
            policy.evaluate_actions(observations, actions)
        policy.set_training_mode(False)
        task_loss()
        assert not injection._captured
    finally:
        injection.remove()
    policy.set_training_mode(True)
    assert all(not m._forward_hooks for m in policy.modules()) and "zero_grad" not in vars(policy.optimizer)
    task_loss()
    assert not injection._captured


def test_monitor_hessian_is_unaffected_by_a_regularizer():
    """The rank term's hooks change nothing a monitor measures, even in a training-mode pass (no pending gradient)."""
    model = PPO("MlpPolicy", "Pendulum-v1", seed=0, policy_kwargs=NET, n_steps=64, batch_size=32, n_epochs=2)
    regularizer = PlasticityRegularizer(erank_coef=0.5, l2_coef=0.1)
    hessian = HessianSpectrumCallback(
        every_n_rollouts=1, log_density_figure=False, lanczos_steps=8, num_probes=2, n_samples=64
    )
    results: dict[str, Any] = {}

    def summaries() -> dict[str, tuple[float, ...]]:
        return {
            group: (m.summary.lambda_max, m.summary.lambda_min, m.summary.trace.estimate, *m.summary.epsilon_ranks)
            for group, m in hessian.measure().items()
        }

    def check(m: Any) -> None:
        if m.num_timesteps < 128:
            return  # the second rollout: one train() with the rank term has run
        hessian.init_callback(m)
        assert regularizer.installed
        results["with hooks"] = summaries()
        m.policy.set_training_mode(True)
        results["training mode, with hooks"] = summaries()
        m.policy.set_training_mode(False)
        regularizer.remove()
        results["without hooks"] = summaries()

    model.learn(128, callback=[regularizer, Probe(rollout_end=check)])
    assert results["with hooks"] == results["without hooks"]
    assert results["training mode, with hooks"] == results["without hooks"]


class HandBLPO(BLPO):
    """BLPO whose losses get the terms written by hand (actor side to the leader, critic side to the critic steps)."""

    terms: dict[str, Any] = {}

    def _extra_loss(self, level: str, observations: Any) -> th.Tensor | float:
        if not self.terms:
            return 0.0
        prefix = "pi" if level == "actor" else "vf"
        names = {id(p): n for n, p in self.policy.named_parameters()}
        side = self.policy.actor_parameters() if level == "actor" else self.policy.critic_parameters()
        rank = hand_rank_objective(hand_features(self.policy, observations), branches=(prefix,))
        params = [(names[id(p)], p) for p in side]
        return -self.terms["beta"] * rank + hand_parameter_terms(
            params, self.terms["anchor"], self.terms["l2"], self.terms["l2_init"]
        )


def test_blpo_update_equals_terms_added_by_hand():
    """Through nested critic steps, the Nyström hypergradient and both clippings: callback == terms in BLPO's losses."""
    beta, l2, l2_init = 0.5, 0.05, 0.5
    settings = dict(seed=0, policy_kwargs=NET, n_steps=64, batch_size=32, n_epochs=2, n_critic_steps=2, max_grad_norm=0.05)

    def run(cls: type, callback: BaseCallback | None, terms: dict[str, Any]) -> list[th.Tensor]:
        cls.terms = terms
        model = cls("MlpPolicy", "Pendulum-v1", **settings)
        anchor = perturbed_anchor(model)
        setattr(model, L2_INIT_ATTRIBUTE, anchor)
        if terms:
            terms["anchor"] = anchor
        model.learn(64, callback=callback)
        return [p.detach().clone() for p in model.policy.parameters()]

    initial = [p.detach().clone() for p in BLPO("MlpPolicy", "Pendulum-v1", **settings).policy.parameters()]
    with_callback = run(BLPO, PlasticityRegularizer(erank_coef=beta, l2_coef=l2, l2_init_coef=l2_init), {})
    by_hand = run(HandBLPO, None, dict(beta=beta, l2=l2, l2_init=l2_init))
    plain = run(HandBLPO, None, {})
    update = [a - b for a, b in zip(by_hand, initial, strict=True)]
    assert relative_difference([a - b for a, b in zip(with_callback, initial, strict=True)], update) <= 1e-6
    assert relative_difference([a - b for a, b in zip(plain, initial, strict=True)], update) > 1e-2


def test_blpo_levels_actor_terms_touch_only_actor_parameters():
    """BLPO: the "actor" call carries the actor's rank and L2 terms only, the "critic" call the critic's only."""
    model = BLPO("MlpPolicy", "Pendulum-v1", seed=0, policy_kwargs=NET, n_steps=64, batch_size=32)
    regularizer = PlasticityRegularizer(erank_coef=0.5, l2_coef=0.1, l2_init_coef=0.1)
    regularizer.init_callback(model)
    regularizer.on_training_start(locals(), globals())
    try:
        assert model._loss_terms == [regularizer._delivery.term]
        observations = th.randn(32, 3)
        actor, critic = model.policy.actor_parameters(), model.policy.critic_parameters()
        for level, own, other in (("actor", actor, critic), ("critic", critic, actor)):
            term = regularizer._delivery.term(level, observations)
            grads = th.autograd.grad(term, own + other, allow_unused=True)
            own_grads, other_grads = grads[: len(own)], grads[len(own) :]
            assert all(g is not None and th.isfinite(g).all() for g in own_grads)
            assert all(g is None for g in other_grads)
            # The rank part uses that level's layers: check against the hand-written value.
            rank = hand_rank_objective(
                hand_features(model.policy, observations), branches=("pi" if level == "actor" else "vf",)
            )
            params = [(n, p) for n, p in model.policy.named_parameters() if any(p is q for q in own)]
            anchor = getattr(model, L2_INIT_ATTRIBUTE)
            expected = -0.5 * rank + hand_parameter_terms(params, anchor, 0.1, 0.1)
            assert term.item() == pytest.approx(expected.item(), rel=1e-6)
    finally:
        regularizer.remove()
    assert no_hooks_left(model)


# ---------------------------------------------------------------------------------------------------------------- ascent mode
@pytest.mark.parametrize("algo", [PPO, BLPO])
def test_ascent_steps_interleave_with_epochs(algo):
    """One ascent step before each epoch: at rollout end, then after the optimizer step that ends each epoch."""
    model = algo("MlpPolicy", "Pendulum-v1", seed=0, policy_kwargs=NET, n_steps=64, batch_size=32, n_epochs=3)
    regularizer = PlasticityRegularizer(erank_mode="ascent", ascent_lr=1e-3)
    events: list[str] = []
    ascend = regularizer._ascend

    def logged_ascend() -> None:
        events.append("A")
        ascend()

    regularizer._ascend = logged_ascend  # type: ignore[method-assign]
    handles = []
    probe = Probe(
        training_start=lambda m: handles.append(m.policy.optimizer.register_step_post_hook(lambda *_: events.append("s")))
    )
    model.learn(128, callback=[probe, regularizer])
    handles[0].remove()
    assert "".join(events) == "AssAssAss" * 2
    assert no_hooks_left(model)


def test_ascent_step_is_a_raw_gradient_step_on_the_rollout_rank():
    """The step at rollout end is exactly θ + lr ∇θ R(θ; whole rollout), on every parameter R depends on."""
    lr = 1e-2
    model = PPO("MlpPolicy", "Pendulum-v1", seed=0, policy_kwargs=NET, n_steps=64, batch_size=64, n_epochs=1)
    before: dict[str, Any] = {}

    def expected_step(m: Any) -> None:
        params = list(m.policy.parameters())
        before["params"] = [p.detach().clone() for p in params]
        before["optimizer"] = copy.deepcopy(m.policy.optimizer.state_dict())
        observations = th.as_tensor(m.rollout_buffer.observations.reshape(64, -1))
        objective = hand_rank_objective(hand_features(m.policy, observations))
        grads = th.autograd.grad(objective, params, allow_unused=True)
        before["expected"] = [p.detach() + lr * (0 if g is None else g) for p, g in zip(params, grads, strict=True)]

    def check(m: Any) -> None:
        after = [p.detach() for p in m.policy.parameters()]
        assert relative_difference(after, before["expected"]) <= 1e-6
        assert relative_difference(after, before["params"]) > 1e-5  # it did move
        assert m.policy.optimizer.state_dict()["state"].keys() == before["optimizer"]["state"].keys()

    model.learn(
        128,
        callback=[
            Probe(rollout_end=expected_step),
            PlasticityRegularizer(erank_mode="ascent", ascent_lr=lr),
            Probe(rollout_end=check),
        ],
    )


# ---------------------------------------------------------------------------------------------------------------- lifecycle
def test_only_training_forward_passes_are_regularised_and_second_learn_works(monkeypatch):
    model = PPO("MlpPolicy", "CartPole-v1", seed=0, policy_kwargs=NET, n_steps=64, batch_size=32, n_epochs=2)
    regularizer = PlasticityRegularizer(erank_coef=0.1)
    calls = []
    gradients = PenaltyTerms.rank_term_gradients

    def counted(terms: PenaltyTerms, level: str, features: dict[str, th.Tensor], weight: float = 1.0) -> dict[str, th.Tensor]:
        calls.append(next(iter(features.values())).shape[0])
        return gradients(terms, level, features, weight)

    monkeypatch.setattr(PenaltyTerms, "rank_term_gradients", counted)

    def during_rollout(m: Any) -> None:
        assert regularizer.installed
        assert not regularizer._delivery._captured  # collection forward passes (no_grad, eval mode) are not captured
        with th.enable_grad():  # a grad-enabled pass in eval mode (e.g. a monitor) is not captured either
            m.policy.evaluate_actions(th.zeros(4, 4), th.zeros(4))
        assert not regularizer._delivery._captured

    probe = Probe(step=during_rollout)
    model.learn(128, callback=[regularizer, probe])
    # 2 rollouts × 2 epochs × 2 minibatches, each on its own 32 training samples.
    assert calls == [32] * 8
    assert no_hooks_left(model) and not regularizer.installed
    model.learn(64, callback=[regularizer, probe], reset_num_timesteps=False)
    assert calls == [32] * 12
    assert no_hooks_left(model)


def test_save_during_training_holds_no_hook_and_loaded_model_trains_again(tmp_path):
    path = tmp_path / "model.zip"
    model = PPO("MlpPolicy", "CartPole-v1", seed=0, policy_kwargs=NET, n_steps=32, batch_size=32, n_epochs=1)
    initial = {n: p.detach().clone() for n, p in model.policy.named_parameters()}
    regularizer = PlasticityRegularizer(erank_coef=0.1, l2_init_coef=0.1)

    def save_now(m: Any) -> None:
        assert regularizer.installed
        m.save(path)

    model.learn(64, callback=[regularizer, Probe(rollout_end=save_now)])
    loaded = PPO.load(path, env=model.get_env())
    assert no_hooks_left(loaded)
    anchor = getattr(loaded, L2_INIT_ATTRIBUTE)
    assert anchor.keys() == initial.keys() and all(th.equal(anchor[n], initial[n]) for n in initial)
    moved = [p.detach().clone() for p in loaded.policy.parameters()]
    second = PlasticityRegularizer(erank_coef=0.1, l2_init_coef=0.1)
    loaded.learn(64, callback=second)
    assert relative_difference([p.detach() for p in loaded.policy.parameters()], moved) > 0
    # The anchor is the parameters when training first started, not those of the second learn().
    assert all(th.equal(getattr(loaded, L2_INIT_ATTRIBUTE)[n], initial[n]) for n in initial)
    assert no_hooks_left(loaded)


def test_logged_values():
    collector = Collector()
    model = PPO("MlpPolicy", "CartPole-v1", seed=0, policy_kwargs=NET, n_steps=32, batch_size=16, n_epochs=2)
    model.set_logger(Logger(folder=None, output_formats=[collector]))
    model.learn(128, callback=PlasticityRegularizer(erank_coef=0.1, l2_coef=1e-3, l2_init_coef=1e-3))
    dumps = [d for d in collector.dumps if "train/reg_l2" in d]
    assert len(dumps) >= 2
    for dump in dumps:
        assert dump["train/reg_erank"] < 0 < dump["train/reg_l2"]
        assert 1.0 <= dump["train/reg_feature_erank"] <= 16.0
        shares = [dump[f"train/reg_{t}_share"] for t in ("erank", "l2", "l2_init")]
        assert all(0.0 <= s <= 1.0 for s in shares) and sum(shares) < 1.0
        assert "train/policy_gradient_loss" in dump  # written with the update's own train/* values
    # Ascent mode logs the rollout rank and the ascent gradient norm.
    collector.dumps.clear()
    model.learn(128, callback=PlasticityRegularizer(erank_mode="ascent", ascent_lr=lambda progress: 1e-4 * progress))
    dumps = [d for d in collector.dumps if "train/reg_ascent_grad_norm" in d]
    assert dumps and all(math.isfinite(d["train/reg_ascent_grad_norm"]) for d in dumps)


# ---------------------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(erank_coef=-1.0), "erank_coef"),
        (dict(l2_coef=-1e-4), "l2_coef"),
        (dict(l2_init_coef=-1e-4), "l2_init_coef"),
        (dict(erank_mode="descent"), "erank_mode"),
        (dict(erank_mode="ascent", ascent_lr=0.0), "ascent_lr"),
        (dict(erank_mode="ascent", erank_coef=1e-3), "erank_coef"),
        (dict(erank_mode="ascent", erank_every=2), "erank_every"),
        (dict(erank_coef=1e-3, erank_every=0), "erank_every"),
        (dict(erank_coef=1e-3, erank_every=1.5), "erank_every"),
        (dict(erank_coef=1e-3, layers="last"), "layers"),
        (dict(erank_coef=1e-3, layers=0), "layers"),
        (dict(erank_coef=1e-3, param_selection="biases"), "param_selection"),
        (dict(l2_coef=1e-4, ascent_steps=0), "ascent_steps"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PlasticityRegularizer(**kwargs)


@pytest.mark.parametrize(
    "make_model, kwargs, error, message",
    [
        (
            lambda: PPO("MlpPolicy", "CartPole-v1", n_steps=32, batch_size=32, policy_kwargs=NET),
            dict(erank_coef=1e-3, layers=["pi7"]),
            ValueError,
            "pi7",
        ),
        (
            lambda: PPO("MlpPolicy", "CartPole-v1", n_steps=32, batch_size=32, policy_kwargs=dict(net_arch=[])),
            dict(erank_coef=1e-3),
            ValueError,
            "no hidden layer",
        ),
        (
            lambda: A2C("MlpPolicy", "CartPole-v1", policy_kwargs=dict(net_arch=[])),
            dict(erank_mode="ascent"),
            ValueError,
            "no hidden layer",
        ),
        (
            lambda: SAC("MlpPolicy", "Pendulum-v1", learning_starts=0),
            dict(l2_coef=1e-4),
            TypeError,
            "cannot reach the training loss of SAC",
        ),
        (
            lambda: DQN("MlpPolicy", "CartPole-v1", learning_starts=0),
            dict(erank_coef=1e-3),
            TypeError,
            "cannot reach the training loss of DQN",
        ),
    ],
)
def test_bad_model_fails_at_init_callback(make_model, kwargs, error, message):
    with pytest.raises(error, match=message):
        PlasticityRegularizer(**kwargs).init_callback(make_model())


def test_trpo_and_recurrent_ppo_are_refused():
    sb3_contrib = pytest.importorskip("sb3_contrib")
    for model in (
        sb3_contrib.TRPO("MlpPolicy", "CartPole-v1", n_steps=64, batch_size=32, policy_kwargs=NET),
        sb3_contrib.RecurrentPPO("MlpLstmPolicy", "CartPole-v1", n_steps=32, batch_size=32),
    ):
        with pytest.raises(TypeError, match="cannot reach the training loss"):
            PlasticityRegularizer(l2_coef=1e-4).init_callback(model)


def test_l2_without_hidden_layers_and_all_zero_coefficients():
    model = PPO("MlpPolicy", "CartPole-v1", seed=0, n_steps=32, batch_size=32, n_epochs=1, policy_kwargs=dict(net_arch=[]))
    model.learn(32, callback=PlasticityRegularizer(l2_coef=1e-3, param_selection="weights"))
    with pytest.warns(UserWarning, match="do nothing"):
        PlasticityRegularizer()


# ---------------------------------------------------------------------------------------------------------------- S&P and ReDo
def test_shrink_and_perturb_runs_after_every_step():
    model = BLPO(
        "MlpPolicy", "Pendulum-v1", seed=0, policy_kwargs=NET, n_steps=64, batch_size=32, n_epochs=1, n_critic_steps=2
    )
    collector = Collector()
    model.set_logger(Logger(folder=None, output_formats=[collector]))
    model.learn(128, callback=ShrinkAndPerturb(shrink=1e-3, noise_std=1e-4))
    # Second rollout end: the first update's 2 actor steps + 2 × 2 nested critic steps.
    assert collector.dumps[1]["train/snp_applications"] == 6
    assert no_hooks_left(model)
    snp = ShrinkAndPerturb(shrink=0.5, noise_std=0.0)
    snp.init_callback(model)
    params = list(model.policy.parameters())
    before = [p.detach().clone() for p in params]
    snp.perturb(params)
    assert all(th.allclose(p, 0.5 * b) for p, b in zip(params, before, strict=True))
    with pytest.raises(ValueError, match="shrink"):
        ShrinkAndPerturb(shrink=1.0)
    with pytest.raises(ValueError, match="noise_std"):
        ShrinkAndPerturb(noise_std=-1.0)


def test_redo_resets_dead_units_without_changing_the_outputs():
    model = PPO(
        "MlpPolicy",
        "Pendulum-v1",
        seed=0,
        n_steps=64,
        batch_size=32,
        n_epochs=1,
        policy_kwargs=dict(net_arch=[16, 16], activation_fn=nn.ReLU),
    )
    model.learn(64)  # gives the optimizer state to reset
    dead = th.tensor([1, 4, 7])
    first = model.policy.mlp_extractor.policy_net[0]
    with th.no_grad():
        first.bias[dead] = -1e3  # these units are 0 on every input
    redo = ReDo(threshold=0.0)
    redo.init_callback(model)
    observations = th.as_tensor(model.rollout_buffer.observations.reshape(64, -1))
    model.policy.set_training_mode(False)
    with th.no_grad():
        actions_before = model.policy.get_distribution(observations).distribution.mean
        values_before = model.policy.predict_values(observations)
    reset, total = redo.reset_dormant(observations)
    assert reset >= 3 and total == 64
    with th.no_grad():
        assert th.allclose(model.policy.get_distribution(observations).distribution.mean, actions_before, atol=1e-6)
        assert th.allclose(model.policy.predict_values(observations), values_before, atol=1e-6)
    features = redo._access.features(observations, ["pi0"])["pi0"]
    assert (features[:, dead].abs().sum(dim=0) > 0).all()  # revived
    outgoing = model.policy.mlp_extractor.policy_net[2]
    assert (outgoing.weight[:, dead] == 0).all()
    state = model.policy.optimizer.state[first.weight]
    assert (state["exp_avg"][dead] == 0).all() and (state["exp_avg_sq"][dead] == 0).all()
    with pytest.raises(ValueError, match="MLP hidden layers only"):
        ReDo(layers=["pi_features"]).init_callback(model)


def test_redo_in_training_with_blpo():
    model = BLPO("MlpPolicy", "Pendulum-v1", seed=0, policy_kwargs=NET, n_steps=64, batch_size=32, n_epochs=1)
    collector = Collector()
    model.set_logger(Logger(folder=None, output_formats=[collector]))
    model.learn(128, callback=[ReDo(threshold=0.5, every_n_rollouts=1), PlasticityRegularizer(l2_coef=1e-3)])
    fractions = [d["train/redo_reset_fraction"] for d in collector.dumps if "train/redo_reset_fraction" in d]
    assert fractions and all(0.0 <= f <= 1.0 for f in fractions)
    assert all(th.isfinite(p).all() for p in model.policy.parameters())
    assert no_hooks_left(model)


def test_former_parameters_keyword_still_works_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match="param_selection"):
        regularizer = PlasticityRegularizer(l2_coef=1e-3, parameters="weights")
    assert regularizer.param_selection == "weights"
    with pytest.warns(DeprecationWarning, match="param_selection"):
        assert ShrinkAndPerturb(parameters="weights").param_selection == "weights"
