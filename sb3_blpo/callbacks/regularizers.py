"""Plasticity regularizers for stock PPO, A2C and BLPO, as SB3 callbacks (see ``docs/regularizers.md``).

* :class:`PlasticityRegularizer`: the paper's L2-ER (effective-rank term and L2) plus L2-Init, added to the training
  loss without subclassing the algorithm.
* :class:`ShrinkAndPerturb`: ``θ ← (1 − shrink) θ + noise_std · ε`` after optimizer steps.
* :class:`ReDo`: re-initialise dormant hidden units (Sokar et al. 2023) every few rollouts.

**How a callback reaches the loss.** ``loss`` is a local variable of the algorithm's ``train()``, so nothing can be
added to it from outside; two mechanisms give the *same parameter update* as a loss term would:

* PPO and A2C (one joint loss, one optimizer): ``policy.optimizer.zero_grad`` is wrapped. SB3 calls it once
  per minibatch, after the minibatch's forward pass and right before ``loss.backward()``; the wrapper zeroes the
  gradients and then *accumulates* the regularizer's gradient into ``.grad``. SB3's ``backward()`` adds the loss
  gradient to it and ``clip_grad_norm_`` then clips the sum, exactly as if the terms were part of ``loss``. The
  features of the rank term are the hidden-layer outputs of that same minibatch's forward pass, captured by forward
  hooks. A hook keeps an output only when autograd is on and the policy is in training mode, which SB3 sets only inside
  ``train()``: rollout collection (``no_grad``, eval mode) and monitors (eval mode) are never regularised.
* BLPO: its native hook :meth:`~sb3_blpo.BLPO.add_loss_term`. The ``"actor"`` call adds the actor-side terms (rank
  of the actor's hidden layers, L2/L2-Init of the actor's parameters) to the leader loss ``f`` of each minibatch, so
  they enter ``∇θf``, the bound of the hypergradient correction and the actor's gradient clipping. The ``"critic"``
  call adds the critic-side terms (rank of the critic's layers, L2/L2-Init of the critic's parameters) to each nested
  critic step's loss. Each side's term depends only on that side's parameters, so the actor term does not leak into
  ``∇w f`` (the right-hand side of the implicit system). Features come from one extra forward pass of the actor (or
  critic) branch on the minibatch's observations, which BLPO hands to the term.

Wrappers and hooks are installed in ``_on_training_start`` and removed in ``_on_training_end`` (also by
:meth:`PlasticityRegularizer.remove`), so a model saved at any time holds none of them.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch as th
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.type_aliases import PyTorchObs
from torch import nn
from torch.utils.hooks import RemovableHandle

from sb3_blpo._validation import InvalidParameterError, check_float, check_int, check_one_of
from sb3_blpo.callbacks._loss_access import OnPolicyLossAccess
from sb3_blpo.metrics import effective_rank_from_singular_values, unit_activity_scores

ERANK_MODES = ("loss", "ascent")
PARAMETER_SELECTIONS = ("all", "weights")
#: Model attribute holding the L2-Init anchor θ₀ (parameter name → CPU tensor); saved and loaded with the model.
L2_INIT_ATTRIBUTE = "plasticity_l2_init_params"

LayerSpec = str | int | Sequence[str]


# ---------------------------------------------------------------------------------------------------------------- helpers
def _supported_algorithms() -> tuple[type, ...]:
    # Left out: MaskablePPO (its policy is not an ActorCriticPolicy, which the shared access layer relies on for hidden
    # layers and parameter groups) and RecurrentPPO (its losses need LSTM states).
    from stable_baselines3 import A2C, PPO

    from sb3_blpo.blpo import BLPO

    return (PPO, A2C, BLPO)


def _check_algorithm(model: Any, who: str) -> tuple[bool, OnPolicyLossAccess]:
    """``(is_blpo, access)`` for a supported algorithm; a clear ``TypeError`` otherwise."""
    from sb3_blpo.blpo import BLPO

    supported = _supported_algorithms()
    if not isinstance(model, supported):
        names = ", ".join(t.__name__ for t in supported)
        raise TypeError(
            f"{who} cannot reach the training loss of {type(model).__name__}: it supports {names} (and subclasses). "
            "Off-policy algorithms (SAC, TD3, DQN), TRPO (whose actor step bypasses the optimizer), MaskablePPO and "
            "RecurrentPPO are not supported."
        )
    try:
        access = OnPolicyLossAccess(model)
    except TypeError as error:
        raise TypeError(f"{who}: {error}") from error
    return isinstance(model, BLPO), access


def _select_parameters(params: Sequence[nn.Parameter], selection: str) -> list[nn.Parameter]:
    """All parameters, or the weights only (tensors with ≥ 2 dimensions: no biases, ``log_std`` or norm scales)."""
    if selection == "weights":
        return [p for p in params if p.dim() >= 2]
    return list(params)


def _check_layer_spec(layers: Any) -> LayerSpec:
    if isinstance(layers, str):
        if layers != "all":
            raise InvalidParameterError(f"layers must be 'all', a positive integer or a list of layer names, got {layers!r}")
        return layers
    if isinstance(layers, int) and not isinstance(layers, bool):
        return check_int("layers", layers, minimum=1)
    if isinstance(layers, Sequence) and len(layers) > 0 and all(isinstance(name, str) for name in layers):
        return tuple(layers)
    raise InvalidParameterError(f"layers must be 'all', a positive integer or a non-empty list of names, got {layers!r}")


def _branch_of(name: str) -> str:
    return "actor" if name.startswith("pi") else "critic"


def _resolve_layers(available: Sequence[str], spec: LayerSpec, who: str) -> list[str]:
    """Layer names selected by ``spec``: all, the last ``k`` of each branch, or the named ones (in network order)."""
    if isinstance(spec, str):
        chosen = list(available)
    elif isinstance(spec, int):
        chosen = []
        for branch in ("actor", "critic"):
            chosen += [name for name in available if _branch_of(name) == branch][-spec:]
    else:
        unknown = sorted(set(spec) - set(available))
        if unknown:
            raise ValueError(f"{who}: unknown layer name(s) {unknown}; the policy's hidden layers are {list(available)}")
        chosen = [name for name in available if name in spec]
    if not chosen:
        raise ValueError(
            f"{who}: the policy has no hidden layer to act on (net_arch is empty?); hidden layers found: {list(available)}"
        )
    return chosen


def _logged_task_loss(model: Any, is_blpo: bool) -> float | None:
    """The algorithm's own training loss for the last update, rebuilt from the mean components it logged.

    PPO/A2C: ``pg + ent_coef · entropy + vf_coef · value``; BLPO: actor loss ``pg + ent_coef · entropy``
    plus the critic's MSE. ``None`` if a component is missing (e.g. before the first update).
    """
    values = model.logger.name_to_value
    policy_loss = values.get("train/policy_gradient_loss", values.get("train/policy_loss"))
    entropy_loss, value_loss = values.get("train/entropy_loss"), values.get("train/value_loss")
    if policy_loss is None or entropy_loss is None or value_loss is None:
        return None
    value_weight = 1.0 if is_blpo else float(getattr(model, "vf_coef", 1.0))
    return float(policy_loss) + float(model.ent_coef) * float(entropy_loss) + value_weight * float(value_loss)


# ---------------------------------------------------------------------------------------------------------------- L2-ER
class PlasticityRegularizer(BaseCallback):
    """Effective-rank, L2 and L2-Init regularization of an on-policy algorithm's training loss (the paper's L2-ER).

    Usage::

        model = PPO("MlpPolicy", env)                                  # or A2C, BLPO
        model.learn(1_000_000, callback=PlasticityRegularizer(erank_coef=1e-3, l2_coef=1e-4))

    Terms, on each minibatch ``B`` of the update (``θ`` the selected parameters, ``Φ_l`` the ``(|B|, d_l)`` output of
    hidden layer ``l``):

    * rank: ``−erank_coef · R``, with ``R = Σ_branch mean_{l ∈ branch} erank(Φ_l)``, the branches being the actor's
      and the critic's chosen layers (the paper's RL objective: mean over actor layers + mean over critic layers), and
      ``erank(Φ) = exp(−Σ p_i log(p_i + ε))``, ``p_i = σ_i / (Σσ + ε)``, from ``torch.linalg.svdvals`` (uncentred);
    * L2 toward zero: ``(l2_coef / 2) · ‖θ‖²`` (gradient ``l2_coef · θ``, the paper's ``add_decayed_weights``);
    * L2-Init: ``(l2_init_coef / 2) · ‖θ − θ₀‖²`` with ``θ₀`` the parameters when training with this callback first
      started, stored on the model as ``model.plasticity_l2_init_params`` (saved and loaded with it; delete the
      attribute to re-anchor at the next ``learn()``).

    With ``erank_mode="ascent"`` the rank is not a loss term but the paper's recipe: ``ascent_steps`` raw gradient
    steps ``θ ← θ + ascent_lr · ∇θ R(θ; whole rollout)`` (no optimizer, no clipping, optimizer state untouched) before
    each epoch: the first in ``_on_rollout_end`` (rollout complete, advantages computed, before ``train()``), the others
    right after the optimizer step that ends each epoch (PPO/BLPO: every ``⌈n_steps·n_envs/batch_size⌉``
    minibatch updates; A2C has a single epoch). An epoch cut short by ``target_kl`` gets no later step.

    Logged per update (written with the algorithm's ``train/*`` values of the same update): ``train/reg_<term>``
    (rank: mean over minibatches; L2 terms: value at the end of the update; BLPO: actor side + critic side),
    ``train/reg_<term>_share``
    (``|term| / (|task loss| + Σ|terms|)``, the task loss rebuilt from the algorithm's logged components),
    ``train/reg_feature_erank`` (mean over the chosen layers of their effective rank: of the minibatch features in loss
    mode, of the rollout features in ascent mode) and, in ascent mode, ``train/reg_ascent_grad_norm``.

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
    :param parameters: parameters of the L2 terms: ``"all"`` (the paper: biases and ``log_std`` included) or
        ``"weights"`` (tensors with ≥ 2 dimensions).
    :param center: subtract the per-unit batch mean from the features before the SVD (default: uncentred, as the paper).
    :param verbose: verbosity level.
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
        parameters: str = "all",
        center: bool = False,
        verbose: int = 0,
    ) -> None:
        super().__init__(verbose)
        self.erank_coef = check_float("erank_coef", erank_coef, minimum=0.0)
        self.l2_coef = check_float("l2_coef", l2_coef, minimum=0.0)
        self.l2_init_coef = check_float("l2_init_coef", l2_init_coef, minimum=0.0)
        self.erank_mode = check_one_of("erank_mode", erank_mode, ERANK_MODES)
        if not callable(ascent_lr):
            ascent_lr = check_float("ascent_lr", ascent_lr, minimum=0.0, allow_minimum=erank_mode != "ascent")
        self.ascent_lr = ascent_lr
        self.ascent_steps = check_int("ascent_steps", ascent_steps, minimum=1)
        self.layers = _check_layer_spec(layers)
        self.parameters = check_one_of("parameters", parameters, PARAMETER_SELECTIONS)
        self.center = bool(center)
        if self.erank_mode == "ascent" and self.erank_coef > 0:
            raise InvalidParameterError(
                "erank_coef is the weight of the rank *loss term* and must be 0 with erank_mode='ascent'; the ascent "
                "steps use their own step size ascent_lr"
            )
        if not (self._rank_in_loss or self._ascent or self.l2_coef > 0 or self.l2_init_coef > 0):
            warnings.warn("PlasticityRegularizer: every coefficient is 0, the callback will do nothing")
        self._handles: list[RemovableHandle] = []
        self._undo: list[Callable[[], None]] = []
        self._captured: dict[str, th.Tensor] = {}
        self._term_sums: dict[tuple[str, str], float] = defaultdict(float)
        self._term_counts: dict[tuple[str, str], int] = defaultdict(int)
        self._regularized_levels: set[str] = set()
        self._rank_sums: dict[str, float] = defaultdict(float)
        self._rank_counts: dict[str, int] = defaultdict(int)
        self._ascent_norms: list[float] = []
        self._rollout_observations: PyTorchObs | None = None
        self._layer_names: list[str] = []
        self._params: dict[str, list[nn.Parameter]] = {}
        self._anchors: dict[str, list[th.Tensor]] = {}
        self._minibatches = 0
        self._ascents_done = 0
        self._ascent_points = 1
        self._per_epoch = 1

    # ------------------------------------------------------------------ configuration
    @property
    def _rank_in_loss(self) -> bool:
        return self.erank_mode == "loss" and self.erank_coef > 0

    @property
    def _ascent(self) -> bool:
        return self.erank_mode == "ascent"

    @property
    def _parameter_terms(self) -> bool:
        return self.l2_coef > 0 or self.l2_init_coef > 0

    @property
    def installed(self) -> bool:
        """Whether hooks or wrappers are currently installed on the model."""
        return bool(self._handles or self._undo)

    def _init_callback(self) -> None:
        self._is_blpo, self._access = _check_algorithm(self.model, type(self).__name__)
        if self._rank_in_loss or self._ascent:
            try:
                available = list(self._access.hidden_layers())
            except TypeError as error:
                raise TypeError(f"{type(self).__name__}: the rank term needs hidden layers: {error}") from error
            self._layer_names = _resolve_layers(available, self.layers, type(self).__name__)
        levels = ("actor", "critic") if self._is_blpo else ("joint",)
        self._params = {level: _select_parameters(self._access.parameters(level), self.parameters) for level in levels}
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

    # ------------------------------------------------------------------ install / remove
    def _on_training_start(self) -> None:
        self.remove()  # a learn() interrupted by an exception never called _on_training_end
        policy = self.model.policy
        if self.l2_init_coef > 0:
            if getattr(self.model, L2_INIT_ATTRIBUTE, None) is None:
                # CPU copies: picklable into the saved model's data and loadable on any device.
                setattr(self.model, L2_INIT_ATTRIBUTE, {n: p.detach().cpu().clone() for n, p in policy.named_parameters()})
            anchor, names = getattr(self.model, L2_INIT_ATTRIBUTE), self._parameter_names()
            self._anchors = {
                level: [anchor[names[id(p)]].to(device=p.device, dtype=p.dtype) for p in params]
                for level, params in self._params.items()
            }
        if self._is_blpo:
            model: Any = self.model  # a BLPO (checked by _is_blpo)
            term = self._blpo_term
            model.add_loss_term(term)
            # Bound to this model: the callback may be initialised on another one before an interrupted run is cleaned.
            self._undo.append(lambda: model.remove_loss_term(term) if term in model._loss_terms else None)
        elif self._rank_in_loss or self._parameter_terms:
            self._wrap_zero_grad(policy.optimizer)
            if self._rank_in_loss:
                layers = self._access.hidden_layers()
                for name in self._layer_names:
                    self._handles.append(layers[name].register_forward_hook(self._capture_hook(name)))
        if self._ascent:
            self._handles.append(policy.optimizer.register_step_post_hook(self._after_optimizer_step))
        self._minibatches, self._ascents_done = 0, self._ascent_points  # no ascent before the first rollout is complete

    def _on_training_end(self) -> None:
        self._flush_stats()
        self.remove()

    def remove(self) -> None:
        """Remove every hook and wrapper from the model (done automatically at the end of ``learn()``)."""
        for handle in self._handles:
            handle.remove()
        for undo in reversed(self._undo):
            undo()
        self._handles, self._undo = [], []
        self._captured, self._rollout_observations = {}, None

    def _wrap_zero_grad(self, optimizer: th.optim.Optimizer) -> None:
        if "zero_grad" in vars(optimizer):
            raise RuntimeError(
                "policy.optimizer.zero_grad is already wrapped (two PlasticityRegularizers on one model?); combine the "
                "terms in a single PlasticityRegularizer"
            )
        original = optimizer.zero_grad
        policy = self.model.policy

        def zero_grad(*args: Any, **kwargs: Any) -> None:
            original(*args, **kwargs)
            # SB3 switches the policy to training mode only inside train(); any other zero_grad() is left alone.
            if policy.training and th.is_grad_enabled():
                self._regularize_joint()

        optimizer.zero_grad = zero_grad  # type: ignore[method-assign]
        self._undo.append(lambda: vars(optimizer).pop("zero_grad", None))

    def _capture_hook(self, name: str) -> Callable[[nn.Module, Any, th.Tensor], None]:
        def hook(module: nn.Module, _inputs: Any, output: th.Tensor) -> None:
            # Training forward passes only: rollout collection runs under no_grad and in eval mode.
            if module.training and th.is_grad_enabled():
                self._captured[name] = output.reshape(output.shape[0], -1)

        return hook

    # ------------------------------------------------------------------ the terms
    def _rank_objective(self, features: dict[str, th.Tensor]) -> th.Tensor:
        """``R = Σ_branch mean_{l ∈ branch} erank(Φ_l)`` over the chosen layers present in ``features``."""
        by_shape: dict[tuple[int, ...], list[str]] = defaultdict(list)
        for name in self._layer_names:
            if name in features:
                by_shape[tuple(features[name].shape)].append(name)
        names: list[str] = []
        parts: list[th.Tensor] = []
        for group in by_shape.values():
            # One batched SVD and one batched rank per feature shape (e.g. all 64-unit layers at once): on CPU the
            # per-call overhead of small ops is a large part of the term's cost.
            stacked = th.stack([features[name] for name in group])
            if self.center:
                stacked = stacked - stacked.mean(dim=1, keepdim=True)
            parts.append(effective_rank_from_singular_values(th.linalg.svdvals(stacked)))
            names += group
        ranks = th.cat(parts)
        objective = ranks.new_zeros(())
        for branch in ("actor", "critic"):
            index = [i for i, name in enumerate(names) if _branch_of(name) == branch]
            if index:
                objective = objective + ranks[index].mean()
        for name, value in zip(names, ranks.detach().tolist(), strict=True):
            self._rank_sums[name] += value
            self._rank_counts[name] += 1
        return objective

    def _record_term(self, term: str, level: str, value: float) -> None:
        self._term_sums[(term, level)] += value
        self._term_counts[(term, level)] += 1

    def _regularize_joint(self) -> None:
        """PPO/A2C: accumulate the regularizer's gradient into ``.grad`` (called right after SB3 zeroed it)."""
        if self._rank_in_loss:
            features, self._captured = self._captured, {}
            if all(name in features for name in self._layer_names):
                term = -self.erank_coef * self._rank_objective(features)
                # The graph below the features is shared with SB3's loss, which backpropagates through it next.
                term.backward(retain_graph=True)
                self._record_term("erank", "joint", term.item())
        if self._parameter_terms:
            self._add_parameter_gradients("joint")

    def _add_parameter_gradients(self, level: str) -> None:
        """Add the L2 terms' gradient ``λθ + λ₀(θ − θ₀)`` to ``.grad`` in closed form (no autograd graph).

        Fused ``_foreach`` ops keep this at a few kernel calls per minibatch; the terms' *values* are only needed for
        logging and are computed once per update (:meth:`_parameter_term_values`).
        """
        params = self._params[level]
        with th.no_grad():
            detached = [p.detach() for p in params]
            gradients = th._foreach_mul(detached, self.l2_coef + self.l2_init_coef)
            if self.l2_init_coef > 0:
                th._foreach_add_(gradients, self._anchors[level], alpha=-self.l2_init_coef)
            for param, gradient in zip(params, gradients, strict=True):
                if param.grad is None:
                    param.grad = gradient
                else:
                    param.grad.add_(gradient)
        self._regularized_levels.add(level)

    def _parameter_term_values(self, level: str) -> dict[str, float]:
        """Values of the L2 terms of ``level`` at the current parameters."""
        values = {}
        with th.no_grad():
            detached = [p.detach() for p in self._params[level]]
            if self.l2_coef > 0:
                values["l2"] = 0.5 * self.l2_coef * float(th.stack(th._foreach_norm(detached)).square().sum())
            if self.l2_init_coef > 0:
                differences = th._foreach_sub(detached, self._anchors[level])
                values["l2_init"] = 0.5 * self.l2_init_coef * float(th.stack(th._foreach_norm(differences)).square().sum())
        return values

    def _blpo_term(self, level: str, observations: PyTorchObs) -> th.Tensor | None:
        """BLPO's loss-term hook: the actor-side (``"actor"``) or critic-side (``"critic"``) terms as a tensor."""
        if level == "actor" and self._ascent:
            self._minibatches += 1  # BLPO evaluates the actor term exactly once per minibatch
        total: th.Tensor | None = None
        names = [name for name in self._layer_names if _branch_of(name) == level]
        if self._rank_in_loss and names:
            features = self._access.features(observations, names, differentiable=True)
            total = -self.erank_coef * self._rank_objective(features)
            self._record_term("erank", level, total.item())
        params = self._params.get(level, [])
        if self._parameter_terms and params:
            self._regularized_levels.add(level)
            terms = []
            if self.l2_coef > 0:
                terms.append(0.5 * self.l2_coef * th.stack([p.square().sum() for p in params]).sum())
            if self.l2_init_coef > 0:
                pairs = zip(params, self._anchors[level], strict=True)
                terms.append(0.5 * self.l2_init_coef * th.stack([(p - a).square().sum() for p, a in pairs]).sum())
            for term in terms:
                total = term if total is None else total + term
        return total

    # ------------------------------------------------------------------ ascent mode
    def _on_rollout_end(self) -> None:
        self._flush_stats()
        self._captured = {}  # a minibatch skipped by target_kl early stopping leaves its features behind
        if not self._ascent:
            return
        # The whole rollout, in storage order; reused by the ascent steps of every epoch of the coming update.
        self._rollout_observations = self._access.sample_batch(None, th.Generator()).observations
        self._minibatches, self._ascents_done = 0, 0
        self._ascend()

    def _after_optimizer_step(self, _optimizer: th.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        if not self._is_blpo:
            self._minibatches += 1  # PPO/A2C: one optimizer step per minibatch
        if self._ascents_done < self._ascent_points and self._minibatches >= self._ascents_done * self._per_epoch:
            self._ascend()  # the epoch just finished: the ascent step(s) of the next epoch

    def _ascent_step_size(self) -> float:
        if callable(self.ascent_lr):
            return float(self.ascent_lr(self._access.progress_remaining()))
        return float(self.ascent_lr)

    def _ascend(self) -> None:
        """``ascent_steps`` raw steps ``θ ← θ + lr ∇R`` on the whole rollout's features (no optimizer state)."""
        self._ascents_done += 1
        if self._rollout_observations is None:
            return
        policy, step_size = self.model.policy, self._ascent_step_size()
        params = self._access.parameters("joint")
        was_training = policy.training
        policy.set_training_mode(True)
        try:
            for _ in range(self.ascent_steps):
                with th.enable_grad():
                    features = self._access.features(self._rollout_observations, self._layer_names, differentiable=True)
                    gradients = th.autograd.grad(self._rank_objective(features), params, allow_unused=True)
                used = [(p, g) for p, g in zip(params, gradients, strict=True) if g is not None]
                with th.no_grad():
                    for param, gradient in used:
                        param.add_(gradient, alpha=step_size)
                    self._ascent_norms.append(float(th.linalg.vector_norm(th.stack([g.norm() for _, g in used]))))
        finally:
            policy.set_training_mode(was_training)

    # ------------------------------------------------------------------ logging
    def _flush_stats(self) -> None:
        """Record the last update's values (with its ``train/*`` values, which SB3 dumps after rollout end)."""
        terms: dict[str, float] = defaultdict(float)
        for (term, level), count in self._term_counts.items():
            terms[term] += self._term_sums[(term, level)] / count  # BLPO: actor side + critic side
        for level in self._regularized_levels:
            for term, value in self._parameter_term_values(level).items():
                terms[term] += value
        if terms:
            task_loss = _logged_task_loss(self.model, self._is_blpo)
            denominator = None if task_loss is None else abs(task_loss) + sum(abs(v) for v in terms.values())
            for term, value in terms.items():
                self.logger.record(f"train/reg_{term}", value)
                if denominator:
                    self.logger.record(f"train/reg_{term}_share", abs(value) / denominator)
        if self._rank_counts:
            means = [self._rank_sums[name] / count for name, count in self._rank_counts.items()]
            self.logger.record("train/reg_feature_erank", sum(means) / len(means))
        if self._ascent_norms:
            self.logger.record("train/reg_ascent_grad_norm", sum(self._ascent_norms) / len(self._ascent_norms))
        self._term_sums.clear()
        self._term_counts.clear()
        self._regularized_levels.clear()
        self._rank_sums.clear()
        self._rank_counts.clear()
        self._ascent_norms.clear()

    def _on_step(self) -> bool:
        return True


# ---------------------------------------------------------------------------------------------------------------- S&P
def _policy_optimizers(policy: nn.Module) -> list[th.optim.Optimizer]:
    """The policy's optimizers: ``optimizer`` and, for BLPO, ``critic_optimizer``."""
    optimizers: list[Any] = [policy.optimizer]
    critic_optimizer = getattr(policy, "critic_optimizer", None)
    if isinstance(critic_optimizer, th.optim.Optimizer):
        optimizers.append(critic_optimizer)
    return optimizers  # type: ignore[return-value]


def _seeded_generator(model: Any, device: th.device, seed: int | None) -> th.Generator:
    """A private RNG, so that the noise does not shift the global torch stream that samples the actions."""
    if seed is None:
        seed = model.seed if model.seed is not None else int(th.randint(2**31 - 1, ()).item())
    generator = th.Generator(device=device)
    generator.manual_seed(int(seed))
    return generator


class ShrinkAndPerturb(BaseCallback):
    """Shrink & Perturb after optimizer steps: ``θ ← (1 − shrink) · θ + noise_std · ε``, ``ε ~ N(0, I)``.

    Applied after every ``every_n_steps``-th step of each of the policy's optimizers, to the parameters that optimizer
    updates (PPO/A2C: the whole policy; BLPO: the actor after its step, the critic after each nested critic step).
    This is the placement of Dohare et al.'s and the spectral-collapse paper's code ("noise after each step", their
    ``perturb_scale`` swept in {1e-4, 1e-5, 1e-6}); with ``n`` steps per rollout the noise accumulates to a standard
    deviation of about ``noise_std · √n`` per rollout. Shrinking by ``s`` per step is decoupled weight decay (AdamW style,
    outside Adam's normalisation and after clipping), unlike :class:`PlasticityRegularizer`'s ``l2_coef``.

    :param shrink: fraction of each parameter removed per application, in ``[0, 1)``.
    :param noise_std: standard deviation of the Gaussian noise added per application.
    :param every_n_steps: apply after every ``every_n_steps``-th step of each optimizer.
    :param parameters: ``"all"`` (weights, biases, ``log_std``; the papers' choice) or ``"weights"`` (≥ 2-D tensors).
    :param seed: seed of the noise RNG (default: the model's seed, else random).
    :param verbose: verbosity level.
    """

    def __init__(
        self,
        shrink: float = 0.0,
        noise_std: float = 1e-5,
        every_n_steps: int = 1,
        parameters: str = "all",
        seed: int | None = None,
        verbose: int = 0,
    ) -> None:
        super().__init__(verbose)
        self.shrink = check_float("shrink", shrink, minimum=0.0, maximum=1.0)
        if self.shrink >= 1.0:
            raise InvalidParameterError(f"shrink must be < 1 (1 would zero every parameter), got {shrink}")
        self.noise_std = check_float("noise_std", noise_std, minimum=0.0)
        self.every_n_steps = check_int("every_n_steps", every_n_steps, minimum=1)
        self.parameters = check_one_of("parameters", parameters, PARAMETER_SELECTIONS)
        self.seed = None if seed is None else check_int("seed", seed, minimum=0)
        if self.shrink == 0.0 and self.noise_std == 0.0:
            warnings.warn("ShrinkAndPerturb: shrink and noise_std are both 0, the callback will do nothing")
        self._handles: list[RemovableHandle] = []
        self._generator: th.Generator | None = None
        self._applied = 0

    def _init_callback(self) -> None:
        _check_algorithm(self.model, type(self).__name__)
        if self._generator is None:
            self._generator = _seeded_generator(self.model, self.model.policy.device, self.seed)

    def _on_training_start(self) -> None:
        self.remove()
        for optimizer in _policy_optimizers(self.model.policy):
            params = _select_parameters([p for group in optimizer.param_groups for p in group["params"]], self.parameters)
            self._handles.append(optimizer.register_step_post_hook(self._make_hook(params)))

    def _make_hook(self, params: list[nn.Parameter]) -> Callable[[th.optim.Optimizer, Any, Any], None]:
        steps = 0

        def hook(_optimizer: th.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
            nonlocal steps
            steps += 1
            if steps % self.every_n_steps == 0:
                self.perturb(params)

        return hook

    def perturb(self, params: Sequence[nn.Parameter]) -> None:
        """Shrink and perturb ``params`` in place once.

        :param params: the parameters to change.
        """
        with th.no_grad():
            for param in params:
                if self.shrink > 0:
                    param.mul_(1.0 - self.shrink)
                if self.noise_std > 0:
                    noise = th.randn(param.shape, generator=self._generator, device=param.device, dtype=param.dtype)
                    param.add_(noise, alpha=self.noise_std)
        self._applied += 1

    def _on_rollout_end(self) -> None:
        self.logger.record("train/snp_applications", self._applied)
        self._applied = 0

    def _on_training_end(self) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove the optimizer hooks (done automatically at the end of ``learn()``)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _on_step(self) -> bool:
        return True


# ---------------------------------------------------------------------------------------------------------------- ReDo
class ReDo(BaseCallback):
    """Recycle dormant units (ReDo, Sokar et al. 2023) of the policy's MLP hidden layers every few rollouts.

    In ``_on_rollout_end`` of every ``every_n_rollouts``-th rollout (before ``train()``), each chosen layer's unit
    scores ``s_i = mean_B |φ_i| / mean_k mean_B |φ_k|`` are computed on the whole rollout
    (:func:`sb3_blpo.metrics.unit_activity_scores`); units with ``s_i ≤ threshold`` are reset: their incoming weights
    and bias are drawn again from the policy's initialisation (SB3's orthogonal init with gain √2 and zero bias, or
    PyTorch's default when ``ortho_init=False``), their outgoing weights (the next layer's columns, or the head's) are
    set to zero, and the optimizer's per-parameter state (Adam's moments) of those entries is zeroed. All scores are
    computed before any reset, and a reset unit's outgoing weights are zero, so a reset of units that were exactly
    inactive leaves the policy's outputs unchanged.

    Defaults follow Dohare et al.'s ReDo baseline (threshold 0.1, a reset check every 100 optimizer steps, i.e. about
    once per PPO rollout update with their 10 epochs × 16 minibatches).

    :param threshold: dormancy threshold τ on the normalised score (0: only units silent on the whole rollout).
    :param every_n_rollouts: check every this many rollouts.
    :param layers: MLP hidden layers to check: ``"all"``, the last ``k`` of each branch, or names (``pi0``, ``vf1``…).
    :param seed: seed of the re-initialisation RNG (default: the model's seed, else random).
    :param verbose: verbosity level (1 prints the number of units reset).
    """

    def __init__(
        self,
        threshold: float = 0.1,
        every_n_rollouts: int = 1,
        layers: LayerSpec = "all",
        seed: int | None = None,
        verbose: int = 0,
    ) -> None:
        super().__init__(verbose)
        self.threshold = check_float("threshold", threshold, minimum=0.0)
        self.every_n_rollouts = check_int("every_n_rollouts", every_n_rollouts, minimum=1)
        self.layers = _check_layer_spec(layers)
        self.seed = None if seed is None else check_int("seed", seed, minimum=0)
        self._generator: th.Generator | None = None
        self._rollouts = 0
        self._layer_names: list[str] = []

    def _init_callback(self) -> None:
        _, self._access = _check_algorithm(self.model, type(self).__name__)
        if getattr(self.model, "use_sde", False):
            raise TypeError("ReDo does not support gSDE: the last hidden layer also feeds the exploration noise")
        try:
            layers = self._access.hidden_layers()
        except TypeError as error:
            raise TypeError(f"ReDo needs MLP hidden layers: {error}") from error
        mlp_layers = [name for name in layers if not name.endswith("_features")]
        if isinstance(self.layers, tuple) and any(name.endswith("_features") for name in self.layers):
            raise ValueError("ReDo resets units of the MLP hidden layers only, not of features extractors")
        self._layer_names = _resolve_layers(mlp_layers, self.layers, type(self).__name__)
        for name in self._layer_names:
            self._access.hidden_layer_linears(name)  # fails now, not mid-training, on a layout it cannot reset
        if self._generator is None:
            self._generator = _seeded_generator(self.model, self.model.policy.device, self.seed)

    def _on_rollout_end(self) -> None:
        self._rollouts += 1
        if self._rollouts % self.every_n_rollouts:
            return
        observations = self._access.sample_batch(None, th.Generator()).observations
        reset, total = self.reset_dormant(observations)
        self.logger.record("train/redo_reset_units", reset)
        self.logger.record("train/redo_reset_fraction", reset / total)
        if self.verbose >= 1 and reset:
            print(f"ReDo: reset {reset} of {total} units")

    def reset_dormant(self, observations: PyTorchObs) -> tuple[int, int]:
        """Score the units on ``observations`` and reset the dormant ones.

        :param observations: a batch of observations (tensors on the policy's device).
        :return: ``(units reset, units checked)``.
        """
        features = self._access.features(observations, self._layer_names)
        masks = {name: unit_activity_scores(features[name]) <= self.threshold for name in self._layer_names}
        linears = {name: self._access.hidden_layer_linears(name) for name in self._layer_names}
        optimizers = _policy_optimizers(self.model.policy)
        # Incoming weights of every layer first, outgoing second: a reset unit's outgoing column ends up exactly zero
        # even when the next layer's rows were redrawn too.
        for name, mask in masks.items():
            if mask.any():
                self._reinitialize_rows(linears[name][0], mask.nonzero().flatten(), optimizers)
        for name, mask in masks.items():
            if mask.any():
                outgoing, columns = linears[name][1], mask.nonzero().flatten()
                with th.no_grad():
                    outgoing.weight[:, columns] = 0.0
                _zero_optimizer_state(optimizers, outgoing.weight, (slice(None), columns))
        return int(sum(int(mask.sum()) for mask in masks.values())), int(sum(mask.numel() for mask in masks.values()))

    def _reinitialize_rows(self, linear: nn.Linear, rows: th.Tensor, optimizers: list[th.optim.Optimizer]) -> None:
        fresh_weight = th.empty_like(linear.weight)
        fresh_bias = None if linear.bias is None else th.zeros_like(linear.bias)
        if getattr(self.model.policy, "ortho_init", False):
            nn.init.orthogonal_(fresh_weight, gain=math.sqrt(2), generator=self._generator)
        else:  # nn.Linear.reset_parameters()
            nn.init.kaiming_uniform_(fresh_weight, a=math.sqrt(5), generator=self._generator)
            if fresh_bias is not None:
                bound = 1.0 / math.sqrt(linear.in_features) if linear.in_features > 0 else 0.0
                nn.init.uniform_(fresh_bias, -bound, bound, generator=self._generator)
        with th.no_grad():
            linear.weight[rows] = fresh_weight[rows]
            if linear.bias is not None and fresh_bias is not None:
                linear.bias[rows] = fresh_bias[rows]
        _zero_optimizer_state(optimizers, linear.weight, (rows,))
        if linear.bias is not None:
            _zero_optimizer_state(optimizers, linear.bias, (rows,))

    def _on_step(self) -> bool:
        return True


def _zero_optimizer_state(optimizers: Sequence[th.optim.Optimizer], param: th.Tensor, index: tuple[Any, ...]) -> None:
    """Zero the entries ``index`` of every per-element state tensor (Adam's moments, RMSprop's averages) of ``param``."""
    for optimizer in optimizers:
        state = optimizer.state.get(param)
        if not state:
            continue
        for value in state.values():
            if isinstance(value, th.Tensor) and value.shape == param.shape:
                value[index] = 0.0
