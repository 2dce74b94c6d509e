"""How :class:`~sb3_blpo.callbacks.PlasticityRegularizer` gets its penalty terms into an algorithm's update.

``loss`` is a local variable of the algorithm's ``train()``, so nothing can be added to it from outside; two adapters
give the *same parameter update* as a loss term would:

* :class:`GradientInjection` (PPO, A2C, MaskablePPO: one joint loss, one optimizer): ``policy.optimizer.zero_grad`` is wrapped.
  SB3 calls it once per minibatch, after the minibatch's forward pass and right before ``loss.backward()``; the wrapper
  zeroes the gradients and then *accumulates* the L2 terms' gradient into ``.grad``. The features of the rank term are
  the hidden-layer outputs of that same minibatch's forward pass, captured by forward hooks; at ``zero_grad`` the
  wrapper computes ``−β ∂R/∂Φ_l`` for every chosen layer in closed form
  (:func:`~sb3_blpo.penalties.effective_rank_gradients`, one batched SVD, no graph), and a gradient hook registered on
  each captured output adds it to the gradient that SB3's own ``loss.backward()`` sends into that output. So the rank
  term rides on the algorithm's single backward pass (no second pass through the network), and SB3's
  ``clip_grad_norm_`` clips the sum, exactly as if the terms were part of ``loss``. A forward hook keeps an output only
  when autograd is on and the policy is in training mode, which SB3 sets only inside ``train()``: rollout collection
  (``no_grad``, eval mode) and monitors (eval mode) are never regularised, and a backward pass through an output whose
  minibatch has not reached ``zero_grad`` yet gets nothing added. The gradient hooks live on the outputs themselves and
  go with them when the graph is freed after the backward pass.
* :class:`LossTermDelivery` (any model with ``add_loss_term``, e.g. BLPO): the ``"actor"`` call adds the actor-side
  terms (rank of the actor's hidden layers, L2/L2-Init of the actor's parameters) to the actor's minibatch loss (BLPO:
  the leader loss ``f``, so they enter ``∇θf``, the bound of the hypergradient correction and the actor's gradient
  clipping); the ``"critic"`` call adds the critic-side terms to each critic step's loss. Each side's term depends
  only on that side's parameters, so the actor term does not leak into ``∇w f``. Features come from one extra forward
  pass of the actor (or critic) branch on the minibatch's observations, which the model hands to the term.

Both install in ``_on_training_start`` and are removed in ``_on_training_end``, so a saved model holds none of them.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch as th
from stable_baselines3.common.type_aliases import PyTorchObs
from torch import nn
from torch.utils.hooks import RemovableHandle

from sb3_blpo.common.features import branch_of
from sb3_blpo.common.model_view import OnPolicyModelView
from sb3_blpo.penalties import ParameterPenalty, effective_rank_gradients, effective_rank_objective


class PenaltyTerms:
    """The configured penalties on one model, and what they amounted to over the current update.

    :param erank_coef: weight β of the rank term ``−β R`` (0: no rank term).
    :param layer_names: hidden layers of the rank term (``pi…`` actor, ``vf…`` critic).
    :param center: centre the features before the SVD.
    :param parameter_penalty: the L2 / L2-Init terms.
    :param params: regularised parameters per level (``"joint"``; or ``"actor"`` and ``"critic"``).
    :param anchors: L2-Init anchors per level (same structure), or ``None``.
    :param rank_every: the rank term is evaluated on every ``rank_every``-th minibatch of a level, with
        ``rank_every`` times its weight (lazy regularisation); 1: every minibatch.
    """

    def __init__(
        self,
        erank_coef: float,
        layer_names: Sequence[str],
        center: bool,
        parameter_penalty: ParameterPenalty,
        params: Mapping[str, list[nn.Parameter]],
        anchors: Mapping[str, list[th.Tensor]] | None,
        rank_every: int = 1,
    ) -> None:
        self.erank_coef = erank_coef
        self.layer_names = list(layer_names)
        self.center = center
        self.parameter_penalty = parameter_penalty
        self.params = dict(params)
        self.anchors = dict(anchors or {})
        self.rank_every = rank_every
        self._rank_calls: dict[str, int] = defaultdict(int)
        self._term_sums: dict[tuple[str, str], float] = defaultdict(float)
        self._term_counts: dict[tuple[str, str], int] = defaultdict(int)
        self._rank_sums: dict[str, float] = defaultdict(float)
        self._rank_counts: dict[str, int] = defaultdict(int)
        self._levels_used: set[str] = set()

    def rank_due(self, level: str) -> bool:
        """Whether the coming minibatch of ``level`` gets the rank term (what its :meth:`rank_weight` call will say)."""
        return self._rank_calls[level] % self.rank_every == 0

    def rank_weight(self, level: str) -> int:
        """Called once per minibatch of ``level``: the multiplier of the rank term on this minibatch, ``rank_every``
        on every ``rank_every``-th call (the first included) and 0 on the others."""
        due = self.rank_due(level)
        self._rank_calls[level] += 1
        return self.rank_every if due else 0

    def _groups(self, features: Mapping[str, th.Tensor]) -> dict[str, dict[str, th.Tensor]]:
        """The chosen layers present in ``features``, actor layers and critic layers as two groups."""
        groups: dict[str, dict[str, th.Tensor]] = {"actor": {}, "critic": {}}
        for name in self.layer_names:
            if name in features:
                groups[branch_of(name)][name] = features[name]
        return groups

    def _record_ranks(self, ranks: Mapping[str, float]) -> None:
        for name, rank in ranks.items():
            self._rank_sums[name] += rank
            self._rank_counts[name] += 1

    def rank_objective(self, features: Mapping[str, th.Tensor]) -> th.Tensor:
        """``R`` over the chosen layers present in ``features`` (actor layers and critic layers as two groups)."""
        objective, ranks = effective_rank_objective(self._groups(features), center=self.center)
        self._record_ranks(ranks)
        return objective

    def rank_term_gradients(self, level: str, features: Mapping[str, th.Tensor], weight: float = 1.0) -> dict[str, th.Tensor]:
        """``weight · ∂(−β R)/∂Φ_l`` for each chosen layer in ``features``, in closed form (no graph); the term's value
        ``−β R`` is recorded under ``level`` as by :meth:`rank_term`."""
        objective, ranks, gradients = effective_rank_gradients(self._groups(features), center=self.center)
        self._record_ranks(ranks)
        self._term_sums[("erank", level)] += -self.erank_coef * objective
        self._term_counts[("erank", level)] += 1
        return {name: gradient.mul_(-self.erank_coef * weight) for name, gradient in gradients.items()}

    def rank_term(self, level: str, features: Mapping[str, th.Tensor], weight: float = 1.0) -> th.Tensor:
        """``weight · (−β R)`` on ``features``; ``−β R`` is recorded under ``level``."""
        term = -self.erank_coef * self.rank_objective(features)
        self._term_sums[("erank", level)] += term.item()
        self._term_counts[("erank", level)] += 1
        return term * weight

    def parameter_loss(self, level: str) -> th.Tensor | None:
        """The L2 terms of ``level``'s parameters as a differentiable tensor (``None`` if there are none)."""
        params = self.params.get(level, [])
        if not (self.parameter_penalty.active and params):
            return None
        self._levels_used.add(level)
        return self.parameter_penalty.value(params, self.anchors.get(level))

    def add_parameter_gradients(self, level: str) -> None:
        """Add the L2 terms' gradient of ``level`` to ``.grad`` in closed form (no autograd graph)."""
        params = self.params[level]
        for param, gradient in zip(params, self.parameter_penalty.gradient(params, self.anchors.get(level)), strict=True):
            if param.grad is None:
                param.grad = gradient
            else:
                param.grad.add_(gradient)
        self._levels_used.add(level)

    def update_values(self) -> tuple[dict[str, float], float | None]:
        """Each term's value over the update (rank: mean over minibatches, L2 terms: at the current parameters,
        summed over the levels), the mean feature rank of the chosen layers; the record is then cleared."""
        terms: dict[str, float] = defaultdict(float)
        for (term, level), count in self._term_counts.items():
            terms[term] += self._term_sums[(term, level)] / count
        with th.no_grad():
            for level in self._levels_used:
                for term, value in self.parameter_penalty.terms(self.params[level], self.anchors.get(level)).items():
                    terms[term] += float(value)
        means = [self._rank_sums[name] / count for name, count in self._rank_counts.items()]
        for record in (self._term_sums, self._term_counts, self._rank_sums, self._rank_counts, self._levels_used):
            record.clear()
        return dict(terms), (sum(means) / len(means) if means else None)


class _PendingGradient:
    """The rank gradient still to be added to one captured output (filled at ``zero_grad``, used by its hook)."""

    __slots__ = ("gradient",)

    def __init__(self) -> None:
        self.gradient: th.Tensor | None = None

    def __call__(self, gradient: th.Tensor) -> th.Tensor:
        return gradient if self.gradient is None else gradient + self.gradient


class GradientInjection:
    """Penalties into PPO/A2C's update: the rank gradient added in SB3's own backward pass through gradient hooks on
    the captured features, the L2 gradients accumulated into ``.grad`` at ``zero_grad`` (module docstring).

    :param policy: the algorithm's policy (its ``optimizer`` is wrapped).
    :param terms: the penalties.
    :param hidden_layers: the policy's hidden layers by name (their outputs feed the rank term).
    """

    def __init__(self, policy: Any, terms: PenaltyTerms, hidden_layers: Mapping[str, nn.Module]) -> None:
        self.policy = policy
        self.terms = terms
        self.rank_layers = {name: hidden_layers[name] for name in terms.layer_names} if terms.erank_coef > 0 else {}
        self._captured: dict[str, tuple[th.Tensor, _PendingGradient]] = {}
        self._handles: list[RemovableHandle] = []
        self._wrapped: th.optim.Optimizer | None = None

    def install(self) -> None:
        optimizer = self.policy.optimizer
        if "zero_grad" in vars(optimizer):
            raise RuntimeError(
                "policy.optimizer.zero_grad is already wrapped (two PlasticityRegularizers on one model?); combine the "
                "terms in a single PlasticityRegularizer"
            )
        original, policy = optimizer.zero_grad, self.policy

        def zero_grad(*args: Any, **kwargs: Any) -> None:
            original(*args, **kwargs)
            # SB3 switches the policy to training mode only inside train(); any other zero_grad() is left alone.
            if policy.training and th.is_grad_enabled():
                self._inject()

        optimizer.zero_grad = zero_grad
        self._wrapped = optimizer
        for name, module in self.rank_layers.items():
            self._handles.append(module.register_forward_hook(self._capture_hook(name)))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        if self._wrapped is not None:
            vars(self._wrapped).pop("zero_grad", None)
        self._handles, self._wrapped, self._captured = [], None, {}

    def forget_features(self) -> None:
        """Drop captured features (a minibatch skipped by ``target_kl`` early stopping leaves its features behind)."""
        self._captured = {}

    def _capture_hook(self, name: str) -> Callable[[nn.Module, Any, th.Tensor], None]:
        def hook(module: nn.Module, _inputs: Any, output: th.Tensor) -> None:
            # Training forward passes only: rollout collection runs under no_grad and in eval mode. A minibatch that
            # skips the rank term (erank_every > 1) gets no gradient hook at all.
            if module.training and th.is_grad_enabled() and output.requires_grad and self.terms.rank_due("joint"):
                pending = _PendingGradient()
                output.register_hook(pending)
                self._captured[name] = (output, pending)

        return hook

    def _inject(self) -> None:
        if self.rank_layers:
            captured, self._captured = self._captured, {}
            weight = self.terms.rank_weight("joint")  # one call per minibatch, whatever was captured
            if weight and all(name in captured for name in self.rank_layers):
                features = {name: output.detach().reshape(output.shape[0], -1) for name, (output, _) in captured.items()}
                gradients = self.terms.rank_term_gradients("joint", features, weight)
                for name, (output, pending) in captured.items():
                    pending.gradient = gradients[name].reshape(output.shape)
        if self.terms.parameter_penalty.active:
            self.terms.add_parameter_gradients("joint")


class LossTermDelivery:
    """Penalties into the losses of a model with ``add_loss_term`` (module docstring).

    :param model: the model (e.g. BLPO).
    :param terms: the penalties (levels ``"actor"`` and ``"critic"``).
    :param view: the model's view (hidden-layer features of a minibatch).
    :param on_actor_term: called each time the actor term is evaluated (once per minibatch), e.g. to count minibatches.
    """

    def __init__(
        self, model: Any, terms: PenaltyTerms, view: OnPolicyModelView, on_actor_term: Callable[[], None] | None = None
    ) -> None:
        self.model = model
        self.terms = terms
        self.view = view
        self.on_actor_term = on_actor_term
        self._installed = False

    def install(self) -> None:
        self.model.add_loss_term(self.term)
        self._installed = True

    def remove(self) -> None:
        if self._installed:
            with contextlib.suppress(ValueError):  # already gone (e.g. the model's terms were reset by a reload)
                self.model.remove_loss_term(self.term)
        self._installed = False

    def forget_features(self) -> None:
        """Nothing is captured between calls."""

    def term(self, level: str, observations: PyTorchObs) -> th.Tensor | None:
        """The model's loss-term hook: the ``"actor"``-side or ``"critic"``-side terms as a tensor."""
        if level == "actor" and self.on_actor_term is not None:
            self.on_actor_term()
        total: th.Tensor | None = None
        names = [name for name in self.terms.layer_names if branch_of(name) == level]
        if self.terms.erank_coef > 0 and names and (weight := self.terms.rank_weight(level)):
            total = self.terms.rank_term(level, self.view.features(observations, names, differentiable=True), weight)
        parameter_loss = self.terms.parameter_loss(level)
        if parameter_loss is not None:
            total = parameter_loss if total is None else total + parameter_loss
        return total
