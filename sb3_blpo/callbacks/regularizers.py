"""Plasticity regularizers for stock PPO, A2C, MaskablePPO and BLPO, as SB3 callbacks (see ``docs/regularizers.md``).

* :class:`PlasticityRegularizer`: the paper's L2-ER (effective-rank term and L2) plus L2-Init, added to the training
  loss without subclassing the algorithm. The terms themselves are plain torch (:mod:`sb3_blpo.penalties`); how they
  reach the update is :mod:`sb3_blpo.callbacks.penalty_delivery` (gradient injection for PPO/A2C, a loss term for
  models with ``add_loss_term`` such as BLPO).
* :class:`~sb3_blpo.callbacks.resets.ShrinkAndPerturb` and :class:`~sb3_blpo.callbacks.resets.ReDo` (re-exported
  here) change the parameters directly: :mod:`sb3_blpo.callbacks.resets`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch as th
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.type_aliases import PyTorchObs
from torch.utils.hooks import RemovableHandle

from sb3_blpo._validation import InvalidParameterError, check_float, check_int, check_one_of
from sb3_blpo.callbacks.guard import InstanceOnlyCallback
from sb3_blpo.callbacks.penalty_delivery import GradientInjection, LossTermDelivery, PenaltyTerms
from sb3_blpo.callbacks.resets import ReDo, ShrinkAndPerturb
from sb3_blpo.callbacks.selection import (
    LayerSpec,
    check_layer_spec,
    check_param_selection,
    check_training_access,
    resolve_layers,
    takes_loss_terms,
)
from sb3_blpo.common.losses import joint_critic_weight
from sb3_blpo.common.parameters import PARAMETER_SELECTIONS, select_parameters
from sb3_blpo.penalties import ParameterPenalty, gradient_ascent_step

__all__ = ["ERANK_MODES", "L2_INIT_ATTRIBUTE", "PARAMETER_SELECTIONS", "PlasticityRegularizer", "ReDo", "ShrinkAndPerturb"]

ERANK_MODES = ("loss", "ascent")
#: Model attribute holding the L2-Init anchor θ₀ (parameter name → CPU tensor); saved and loaded with the model.
L2_INIT_ATTRIBUTE = "plasticity_l2_init_params"


def _logged_task_loss(model: Any, critic_weight: float) -> float | None:
    """The algorithm's own training loss for the last update, rebuilt from the mean components it logged:
    ``pg + ent_coef · entropy + critic_weight · value``; ``None`` if a component is missing (before the first update)."""
    values = model.logger.name_to_value
    policy_loss = values.get("train/policy_gradient_loss", values.get("train/policy_loss"))
    entropy_loss, value_loss = values.get("train/entropy_loss"), values.get("train/value_loss")
    if policy_loss is None or entropy_loss is None or value_loss is None:
        return None
    return float(policy_loss) + float(model.ent_coef) * float(entropy_loss) + critic_weight * float(value_loss)


class PlasticityRegularizer(InstanceOnlyCallback, BaseCallback):
    """Effective-rank, L2 and L2-Init regularization of an on-policy algorithm's training loss (the paper's L2-ER).

    Usage::

        model = PPO("MlpPolicy", env)                                  # or A2C, BLPO
        model.learn(1_000_000, callback=PlasticityRegularizer(erank_coef=1e-3, l2_coef=1e-4))

    Terms, on each minibatch ``B`` of the update (``θ`` the selected parameters, ``Φ_l`` the ``(|B|, d_l)`` output of
    hidden layer ``l``):

    * rank: ``−erank_coef · R``, with ``R = Σ_branch mean_{l ∈ branch} erank(Φ_l)``, the branches being the actor's
      and the critic's chosen layers (the paper's RL objective), and ``erank(Φ) = exp(−Σ p_i log(p_i + ε))``,
      ``p_i = σ_i / (Σσ + ε)``, from ``torch.linalg.svdvals`` (uncentred);
    * L2 toward zero: ``(l2_coef / 2) · ‖θ‖²`` (gradient ``l2_coef · θ``, the paper's ``add_decayed_weights``);
    * L2-Init: ``(l2_init_coef / 2) · ‖θ − θ₀‖²`` with ``θ₀`` the parameters when training with this callback first
      started, stored on the model as ``model.plasticity_l2_init_params`` (saved and loaded with it; delete the
      attribute to re-anchor at the next ``learn()``).

    PPO/A2C: the terms act on every parameter of the policy (one joint loss); models with ``add_loss_term`` (BLPO):
    actor-side terms in the actor's loss, critic-side terms in the critic's (:mod:`~sb3_blpo.callbacks.penalty_delivery`).

    With ``erank_mode="ascent"`` the rank is not a loss term but the paper's recipe: ``ascent_steps`` raw gradient
    steps ``θ ← θ + ascent_lr · ∇θ R(θ; whole rollout)`` (no optimizer, no clipping, optimizer state untouched) before
    each epoch: the first in ``_on_rollout_end`` (rollout complete, advantages computed, before ``train()``), the others
    right after the optimizer step that ends each epoch (PPO/BLPO: every ``⌈n_steps·n_envs/batch_size⌉``
    minibatch updates; A2C has a single epoch). An epoch cut short by ``target_kl`` gets no later step.

    Logged per update (written with the algorithm's ``train/*`` values of the same update): ``train/reg_<term>``
    (rank: mean over minibatches; L2 terms: value at the end of the update; BLPO: actor side + critic side),
    ``train/reg_<term>_share`` (``|term| / (|task loss| + Σ|terms|)``, the task loss rebuilt from the algorithm's
    logged components), ``train/reg_feature_erank`` (mean over the chosen layers of their effective rank: of the
    minibatch features in loss mode, of the rollout features in ascent mode) and, in ascent mode,
    ``train/reg_ascent_grad_norm``.

    :param erank_coef: weight β of the rank term in ``"loss"`` mode (0 disables; must be 0 in ``"ascent"`` mode).
    :param l2_coef: weight λ of the L2 term toward zero.
    :param l2_init_coef: weight of the L2 term toward the initial parameters θ₀.
    :param erank_mode: ``"loss"`` (rank term in every minibatch loss) or ``"ascent"`` (separate ascent steps).
    :param ascent_lr: step size of the ascent steps (the paper's ``er_lr``; 1e-6 in its Slippery-Ant runs), a number or
        a function of the remaining progress (1 → 0), like SB3 schedules.
    :param ascent_steps: ascent steps before each epoch (the paper's ``er_step``).
    :param layers: hidden layers of the rank term: ``"all"``, an integer ``k`` (the last ``k`` of each branch), or
        names such as ``["pi1", "vf1"]`` (``pi0, pi1, …`` actor MLP, ``vf0, …`` critic MLP; ``pi_features``/
        ``vf_features`` for features extractors with parameters).
    :param param_selection: parameters of the L2 terms: ``"all"`` (the paper: biases and ``log_std`` included) or
        ``"weights"`` (tensors with ≥ 2 dimensions).
    :param center: subtract the per-unit batch mean from the features before the SVD (default: uncentred, as the paper).
    :param verbose: verbosity level.
    :param erank_every: loss mode: evaluate the rank term on every ``erank_every``-th minibatch only, with
        ``erank_every`` times its weight (lazy regularisation, as StyleGAN2's R1 term; cuts the SVD cost by that factor).
    :param parameters: deprecated name of ``param_selection``.
    """

    def __init__(
        self,
        erank_coef: float = 0.0,
        l2_coef: float = 0.0,
        l2_init_coef: float = 0.0,
        erank_mode: str = "loss",
        ascent_lr: float | Callable[[float], float] = 1e-6,
        ascent_steps: int = 1,
        layers: LayerSpec = "all",
        param_selection: str = "all",
        center: bool = False,
        verbose: int = 0,
        *,
        erank_every: int = 1,
        parameters: str | None = None,
    ) -> None:
        super().__init__(verbose)
        self.erank_coef = check_float("erank_coef", erank_coef, minimum=0.0)
        self.l2_coef = check_float("l2_coef", l2_coef, minimum=0.0)
        self.l2_init_coef = check_float("l2_init_coef", l2_init_coef, minimum=0.0)
        self.erank_mode = check_one_of("erank_mode", erank_mode, ERANK_MODES)
        self.erank_every = check_int("erank_every", erank_every, minimum=1)
        if not callable(ascent_lr):
            ascent_lr = check_float("ascent_lr", ascent_lr, minimum=0.0, allow_minimum=erank_mode != "ascent")
        self.ascent_lr = ascent_lr
        self.ascent_steps = check_int("ascent_steps", ascent_steps, minimum=1)
        self.layers = check_layer_spec(layers)
        self.param_selection = check_param_selection(param_selection, parameters, type(self).__name__)
        self.center = bool(center)
        if self.erank_mode == "ascent" and (self.erank_coef > 0 or self.erank_every > 1):
            raise InvalidParameterError(
                "erank_coef and erank_every configure the rank *loss term* and must stay at 0 and 1 with "
                "erank_mode='ascent'; the ascent steps use their own step size ascent_lr"
            )
        self._penalty = ParameterPenalty(self.l2_coef, self.l2_init_coef)
        if not (self._rank_needs_layers or self._penalty.active):
            warnings.warn("PlasticityRegularizer: every coefficient is 0, the callback will do nothing")
        self._delivery: GradientInjection | LossTermDelivery | None = None
        self._ascent_hook: RemovableHandle | None = None
        self._ascent_norms: list[float] = []
        self._rollout_observations: PyTorchObs | None = None
        self._minibatches, self._ascents_done, self._ascent_points, self._per_epoch = 0, 1, 1, 1

    @property
    def _ascent(self) -> bool:
        return self.erank_mode == "ascent"

    @property
    def _rank_needs_layers(self) -> bool:
        return self._ascent or self.erank_coef > 0

    @property
    def installed(self) -> bool:
        """Whether hooks or wrappers are currently installed on the model."""
        return self._delivery is not None or self._ascent_hook is not None

    def _init_callback(self) -> None:
        self._access = check_training_access(self.model, type(self).__name__)
        self._loss_terms = takes_loss_terms(self.model)
        self._layer_names: list[str] = []
        if self._rank_needs_layers:
            try:
                available = list(self._access.hidden_layers())
            except TypeError as error:
                raise TypeError(f"{type(self).__name__}: the rank term needs hidden layers: {error}") from error
            self._layer_names = resolve_layers(available, self.layers, type(self).__name__)
        levels = ("actor", "critic") if self._loss_terms else ("joint",)
        self._params = {level: select_parameters(self._access.parameters(level), self.param_selection) for level in levels}
        if self.l2_init_coef > 0:
            self._check_anchor(getattr(self.model, L2_INIT_ATTRIBUTE, None))
        n_samples = self.model.n_steps * self.model.n_envs  # type: ignore[attr-defined]  # on-policy (checked above)
        self._per_epoch = math.ceil(n_samples / getattr(self.model, "batch_size", n_samples))
        self._ascent_points = int(getattr(self.model, "n_epochs", 1))

    def _parameter_names(self) -> dict[int, str]:
        return {id(p): name for name, p in self.model.policy.named_parameters()}

    def _check_anchor(self, anchor: dict[str, th.Tensor] | None) -> None:
        if anchor is None:
            return
        names = self._parameter_names()
        for params in self._params.values():
            for param in params:
                name = names[id(param)]
                if name not in anchor or tuple(anchor[name].shape) != tuple(param.shape):
                    raise ValueError(
                        f"the stored L2-Init anchor model.{L2_INIT_ATTRIBUTE} does not match the policy (parameter "
                        f"{name!r}); delete the attribute to take a new anchor at the next training start"
                    )

    def _anchors(self) -> dict[str, list[th.Tensor]] | None:
        """θ₀ per level, taken now if the model has none yet (CPU copies: saved with the model, loadable anywhere)."""
        if self.l2_init_coef == 0:
            return None
        policy = self.model.policy
        if getattr(self.model, L2_INIT_ATTRIBUTE, None) is None:
            setattr(self.model, L2_INIT_ATTRIBUTE, {n: p.detach().cpu().clone() for n, p in policy.named_parameters()})
        anchor, names = getattr(self.model, L2_INIT_ATTRIBUTE), self._parameter_names()
        return {
            level: [anchor[names[id(p)]].to(device=p.device, dtype=p.dtype) for p in params]
            for level, params in self._params.items()
        }

    # ------------------------------------------------------------------ install / remove
    def _on_training_start(self) -> None:
        self.remove()  # a learn() interrupted by an exception never called _on_training_end
        anchors, rank_coef = self._anchors(), (self.erank_coef if not self._ascent else 0.0)
        self._terms = PenaltyTerms(
            rank_coef, self._layer_names, self.center, self._penalty, self._params, anchors, self.erank_every
        )
        if self._loss_terms:
            # The model evaluates the actor term exactly once per minibatch: that counts minibatches in ascent mode.
            self._delivery = LossTermDelivery(self.model, self._terms, self._access, self._count_minibatch)
        elif self.erank_coef > 0 or self._penalty.active:
            self._delivery = GradientInjection(self.model.policy, self._terms, self._access.hidden_layers())
        if self._delivery is not None:
            self._delivery.install()
        if self._ascent:
            self._ascent_hook = self.model.policy.optimizer.register_step_post_hook(self._after_optimizer_step)
        self._minibatches, self._ascents_done = 0, self._ascent_points  # no ascent before the first rollout is complete

    def _on_training_end(self) -> None:
        self._flush_stats()
        self.remove()

    def remove(self) -> None:
        """Remove every hook and wrapper from the model (done automatically at the end of ``learn()``)."""
        if self._delivery is not None:
            self._delivery.remove()
        if self._ascent_hook is not None:
            self._ascent_hook.remove()
        self._delivery, self._ascent_hook, self._rollout_observations = None, None, None

    # ------------------------------------------------------------------ ascent mode
    def _count_minibatch(self) -> None:
        if self._ascent:
            self._minibatches += 1

    def _on_rollout_end(self) -> None:
        self._flush_stats()
        if self._delivery is not None:
            self._delivery.forget_features()
        if not self._ascent:
            return
        # The whole rollout, in storage order; reused by the ascent steps of every epoch of the coming update.
        self._rollout_observations = self._access.sample_batch(None, th.Generator()).observations
        self._minibatches, self._ascents_done = 0, 0
        self._ascend()

    def _after_optimizer_step(self, _optimizer: th.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        if not self._loss_terms:
            self._minibatches += 1  # PPO/A2C: one optimizer step per minibatch
        if self._ascents_done < self._ascent_points and self._minibatches >= self._ascents_done * self._per_epoch:
            self._ascend()  # the epoch just finished: the ascent step(s) of the next epoch

    def _ascend(self) -> None:
        """``ascent_steps`` raw steps ``θ ← θ + lr ∇R`` on the whole rollout's features (no optimizer state)."""
        self._ascents_done += 1
        if self._rollout_observations is None:
            return
        policy, observations = self.model.policy, self._rollout_observations
        step_size = float(self.ascent_lr(self._access.progress_remaining()) if callable(self.ascent_lr) else self.ascent_lr)
        was_training = policy.training
        policy.set_training_mode(True)
        try:
            for _ in range(self.ascent_steps):

                def objective() -> th.Tensor:
                    return self._terms.rank_objective(self._access.features(observations, self._layer_names, True))

                norm = gradient_ascent_step(objective, self._access.parameters("joint"), step_size)
                self._ascent_norms.append(norm)
        finally:
            policy.set_training_mode(was_training)

    # ------------------------------------------------------------------ logging
    def _flush_stats(self) -> None:
        """Record the last update's values (with its ``train/*`` values, which SB3 dumps after rollout end)."""
        if not hasattr(self, "_terms"):
            return
        terms, feature_erank = self._terms.update_values()
        if terms:
            task_loss = _logged_task_loss(self.model, joint_critic_weight(self.model))
            denominator = None if task_loss is None else abs(task_loss) + sum(abs(v) for v in terms.values())
            for term, value in terms.items():
                self.logger.record(f"train/reg_{term}", value)
                if denominator:
                    self.logger.record(f"train/reg_{term}_share", abs(value) / denominator)
        if feature_erank is not None:
            self.logger.record("train/reg_feature_erank", feature_erank)
        if self._ascent_norms:
            self.logger.record("train/reg_ascent_grad_norm", sum(self._ascent_norms) / len(self._ascent_norms))
        self._ascent_norms.clear()

    def _on_step(self) -> bool:
        return True
