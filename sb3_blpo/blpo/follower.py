"""The follower (critic) side of BLPO's update, for one update's settings.

Its objective ``g̃(θ, w)`` (the critic MSE, with the actor's influence on the targets / state weights made explicit
by ``coupling``), the nested steps toward its best response, the critic's differentiable GAE advantages, and the two
ingredients of the implicit correction: the loss whose ``∂²/∂θ∂w`` is the mixed term and the curvature the IHVP
inverts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch as th
from stable_baselines3.common.type_aliases import PyTorchObs
from torch import nn

from sb3_blpo.blpo.coupling import AUTHORS_F2, coupled_targets_and_weights, prefix_mean_f2, weighted_squared_error
from sb3_blpo.blpo.rollout import BilevelRollout, Minibatch
from sb3_blpo.common.surrogate import clipped_surrogate
from sb3_blpo.hypergrad import (
    CurvatureOperator,
    GaussNewtonProduct,
    HessianVectorProduct,
    JacobianGaussNewtonProduct,
    LinearLayerRecorder,
    OutputMixedProduct,
)
from sb3_blpo.hypergrad.hvp import Params

#: ``(θ, x) ↦ ∂²g̃/∂θ∂w · x`` (see :class:`~sb3_blpo.hypergrad.jacobian.OutputMixedProduct`).
MixedProduct = Callable[[Params, th.Tensor], th.Tensor]


@dataclass(frozen=True)
class Follower:
    """The critic of one BLPO update (see the module docstring; the settings are :class:`~sb3_blpo.BLPO`'s).

    :param policy: the BLPO policy (:class:`~sb3_blpo.blpo.policies.BLPOPolicy`: ``predict_values``, ``critic_optimizer``).
    :param critic_params: the follower's parameters ``w``.
    :param gamma: discount factor (of the coupled targets).
    :param coupling: which actor dependence of ``g̃`` gives the mixed term.
    :param coupling_clip: ratio clip of the coupled objective (``ε_F`` of the authors' f2).
    :param follower_objective: what the nested steps minimise: ``"mse"`` or ``"coupled"``.
    :param curvature: ``"gauss_newton"`` or ``"hessian"``.
    :param n_critic_steps: nested steps per minibatch.
    :param max_grad_norm: gradient clipping of each nested step.
    :param extra_loss: ``extra_loss("critic", observations)``, terms added to each nested step's loss.
    :param on_nonfinite: called with a description when a nested step's gradient is not finite (the step is skipped).
    :param per_sample_jacobian: when the critic is an MLP, the Gauss–Newton products go through its per-sample
        Jacobian in factored form (:class:`~sb3_blpo.hypergrad.jacobian.JacobianGaussNewtonProduct`: the same numbers
        as the double-backward products, no backward pass per product); ``False``: always by double backward.
    """

    policy: Any
    critic_params: list[nn.Parameter]
    gamma: float
    coupling: str
    coupling_clip: float
    follower_objective: str
    curvature: str
    n_critic_steps: int
    max_grad_norm: float
    extra_loss: Callable[[str, PyTorchObs], th.Tensor | float]
    on_nonfinite: Callable[[str], None]
    per_sample_jacobian: bool = True

    @cached_property
    def _linear_layers(self) -> LinearLayerRecorder:
        """Records the critic's linear layers for its per-sample Jacobian (built once per update)."""
        return LinearLayerRecorder([self.policy], self.critic_params)

    def loss(
        self, rollout: BilevelRollout, batch: Minibatch, ratios: th.Tensor | None, values: th.Tensor | None = None
    ) -> tuple[th.Tensor, th.Tensor, th.Tensor | None]:
        """The follower objective ``g̃(θ, w)`` on the minibatch at the current critic: ``(loss, values, weights)``.

        It is the one whose implicit function theorem the hypergradient applies: the critic MSE with the actor's
        influence on the targets / state weights made explicit (``coupling``). Without ratios (nested-only) or with
        ``"authors_f2"`` (whose follower is the plain MSE) it is the MSE to the fixed targets; at ``θ = θ_old`` all
        forms coincide with it. ``values``: the critic's values of the minibatch when already computed.
        """
        if values is None:
            values = self.policy.predict_values(batch.observations).flatten()
        if ratios is None or self.coupling == AUTHORS_F2:
            return weighted_squared_error(values, batch.targets), values, None
        targets, weights = coupled_targets_and_weights(
            batch.targets,
            ratios,
            rollout.advantages,
            batch.window,
            gamma=self.gamma,
            mode=self.coupling,
            ratio_clip=self.coupling_clip,
        )
        return weighted_squared_error(values, targets, weights), values, weights

    def fitted_ratios(self, ratios: th.Tensor | None) -> th.Tensor | None:
        """The ratios the nested steps fit with: constants at the current actor (``"coupled"``: the critic converges to
        the point where the implicit function theorem is applied), or none (``"mse"``: the follower at θ_old)."""
        if ratios is None or self.follower_objective == "mse":
            return None
        return ratios.detach()

    def nested_steps(self, rollout: BilevelRollout, batch: Minibatch, ratios: th.Tensor | None) -> float:
        """``n_critic_steps`` steps on the follower objective of ``follower_objective`` (see :meth:`fitted_ratios`);
        returns the loss before the first."""
        loss_before = math.nan
        critic_params = self.critic_params
        ratios = self.fitted_ratios(ratios)
        for step in range(self.n_critic_steps):
            follower_loss, _, _ = self.loss(rollout, batch, ratios)
            if step == 0:
                loss_before = follower_loss.item()
            loss = follower_loss + self.extra_loss("critic", batch.observations)
            self.policy.critic_optimizer.zero_grad()
            loss.backward()
            # The total norm is NaN/Inf as soon as one gradient entry is: one check covers every parameter.
            if not th.isfinite(th.nn.utils.clip_grad_norm_(critic_params, self.max_grad_norm)):
                self.on_nonfinite("critic gradient")
                self.policy.critic_optimizer.zero_grad()
                break
            self.policy.critic_optimizer.step()
        return loss_before

    def ratio_reach(self, batch: Minibatch) -> th.Tensor | None:
        """The rollout steps whose ratios ``g̃`` reads for this minibatch, ``(n_envs, n_steps)`` bool (``None``: all):
        the target part sums future ratios within each episode, the state-distribution part past ones, and the
        authors' f2 prefix-averages the whole rollout."""
        if self.coupling == AUTHORS_F2:
            return None
        future = batch.window.reach(future=True)
        if self.coupling == "target":
            return future
        past = batch.window.reach(future=False)
        return past if self.coupling == "distribution" else future | past

    def advantages(
        self, rollout: BilevelRollout, batch: Minibatch, track_critic: bool, whole_rollout: bool = False
    ) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        """GAE advantages of the minibatch from the current critic (with ``track_critic`` they carry ``∂/∂w``), the
        TD errors they come from ``(n_envs, n_steps)``, and the critic's values of the minibatch (detached).

        The critic runs only on the steps the minibatch's GAE windows reach (each episode from its first minibatch
        entry on); the TD errors elsewhere are then meaningless but finite and unread. ``whole_rollout``: every TD error
        is the critic's (for a loss that reads them all)."""
        reach = None if whole_rollout else batch.window.reach(future=True)
        with th.set_grad_enabled(track_critic):
            values, last_values, terminal_values = rollout.split_values(
                rollout.critic_values(self.policy.predict_values, reach)
            )
            td_errors = rollout.gae.td_errors(values, last_values, terminal_values, rollout.old_terminal_values)
            advantages = rollout.gae.minibatch(td_errors, batch.window)
        return advantages, td_errors, values.flatten()[batch.index].detach()

    def implicit_terms(
        self, rollout: BilevelRollout, batch: Minibatch, ratios: th.Tensor
    ) -> tuple[th.Tensor, CurvatureOperator | None, MixedProduct | None]:
        """The loss whose ``∂²/∂θ∂w`` gives the mixed term, the curvature the IHVP inverts (``None``: that loss's own
        Hessian), and the mixed product computed through the critic's outputs (``None``: by double backward of the
        loss). All paths give the same numbers up to float rounding.

        With the Gauss–Newton curvature and ``g̃`` as the mixed loss (not ``"authors_f2"``, whose surrogate depends on
        ``w`` through the advantages too), ``g̃`` depends on ``w`` only through the minibatch values ``V``, so the mixed
        term is ``∂/∂θ ⟨∂g̃/∂V, J x⟩`` (:class:`~sb3_blpo.hypergrad.jacobian.OutputMixedProduct`); and when the
        critic is an MLP, ``J`` is recorded in factored form during the forward pass
        (:class:`~sb3_blpo.hypergrad.jacobian.PerSampleJacobian`), so that the IHVP's products are small matrix
        products per layer instead of two backward passes each.
        """
        gauss_newton = self.curvature == "gauss_newton"
        explicit = gauss_newton and self.per_sample_jacobian
        recorder = self._linear_layers
        if explicit and recorder.supported:
            with recorder.record():
                values = self.policy.predict_values(batch.observations).flatten()
        else:
            values = self.policy.predict_values(batch.observations).flatten()
        follower_loss, values, weights = self.loss(rollout, batch, ratios, values)
        mixed_loss = follower_loss if self.coupling != AUTHORS_F2 else self._authors_f2(rollout, batch, ratios, values)
        if gauss_newton:
            # g̃ = mean ω (ỹ − V)²: Gauss–Newton (2/B) Jᵀ diag(ω) J, positive semi-definite (ω ≥ 0).
            scale = th.full_like(values, 2.0 / len(batch)) if weights is None else weights.detach() * (2.0 / len(batch))
            jacobian = recorder.jacobian(values) if explicit and recorder.supported else None
            operator: JacobianGaussNewtonProduct | GaussNewtonProduct
            if jacobian is not None:
                operator = JacobianGaussNewtonProduct(jacobian, weights=scale)
            else:
                operator = GaussNewtonProduct(values, self.critic_params, weights=scale)
            if self.coupling == AUTHORS_F2:
                return mixed_loss, operator, None
            return mixed_loss, operator, OutputMixedProduct(mixed_loss, values, operator.jacobian_product)
        if self.coupling == AUTHORS_F2:
            return mixed_loss, HessianVectorProduct(follower_loss, self.critic_params), None
        return mixed_loss, None, None

    def _authors_f2(self, rollout: BilevelRollout, batch: Minibatch, ratios: th.Tensor, values: th.Tensor) -> th.Tensor:
        """The authors' f2 on the minibatch: per-step surrogate of the whole rollout from the current critic's
        advantages (unnormalised, clip ``coupling_clip``), prefix-averaged (:func:`prefix_mean_f2`)."""
        _, td_errors, _ = self.advantages(rollout, batch, track_critic=True, whole_rollout=True)
        surrogate = clipped_surrogate(ratios, rollout.gae.rollout(td_errors), self.coupling_clip)
        return prefix_mean_f2(values, batch.targets, surrogate, batch.env_index, batch.time_index)
