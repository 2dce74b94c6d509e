"""Parameter resets against loss of plasticity, as SB3 callbacks for PPO, A2C, MaskablePPO and BLPO
(see ``docs/regularizers.md``).

* :class:`ShrinkAndPerturb`: ``θ ← (1 − shrink) θ + noise_std · ε`` after optimizer steps.
* :class:`ReDo`: re-initialise dormant hidden units (Sokar et al. 2023) every few rollouts.
* :class:`HeadReset`: re-initialise the output heads (policy and/or value) at task switches or every few rollouts.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch as th
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.type_aliases import PyTorchObs
from torch import nn
from torch.utils.hooks import RemovableHandle

from sb3_blpo._validation import InvalidParameterError, check_float, check_int
from sb3_blpo.callbacks.guard import InstanceOnlyCallback
from sb3_blpo.callbacks.selection import (
    LayerSpec,
    check_layer_spec,
    check_param_selection,
    check_training_access,
    resolve_layers,
)
from sb3_blpo.common.parameters import select_parameters
from sb3_blpo.common.task_switch import infos_signal_task_switch
from sb3_blpo.metrics import unit_activity_scores


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


class ShrinkAndPerturb(InstanceOnlyCallback, BaseCallback):
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
    :param param_selection: ``"all"`` (weights, biases, ``log_std``; the papers' choice) or ``"weights"`` (≥ 2-D
        tensors).
    :param seed: seed of the noise RNG (default: the model's seed, else random).
    :param verbose: verbosity level.
    :param parameters: deprecated name of ``param_selection``.
    """

    def __init__(
        self,
        shrink: float = 0.0,
        noise_std: float = 1e-5,
        every_n_steps: int = 1,
        param_selection: str = "all",
        seed: int | None = None,
        verbose: int = 0,
        *,
        parameters: str | None = None,
    ) -> None:
        super().__init__(verbose)
        self.shrink = check_float("shrink", shrink, minimum=0.0, maximum=1.0)
        if self.shrink >= 1.0:
            raise InvalidParameterError(f"shrink must be < 1 (1 would zero every parameter), got {shrink}")
        self.noise_std = check_float("noise_std", noise_std, minimum=0.0)
        self.every_n_steps = check_int("every_n_steps", every_n_steps, minimum=1)
        self.param_selection = check_param_selection(param_selection, parameters, type(self).__name__)
        self.seed = None if seed is None else check_int("seed", seed, minimum=0)
        if self.shrink == 0.0 and self.noise_std == 0.0:
            warnings.warn("ShrinkAndPerturb: shrink and noise_std are both 0, the callback will do nothing")
        self._handles: list[RemovableHandle] = []
        self._generator: th.Generator | None = None
        self._applied = 0

    def _init_callback(self) -> None:
        check_training_access(self.model, type(self).__name__)
        if self._generator is None:
            self._generator = _seeded_generator(self.model, self.model.policy.device, self.seed)

    def _on_training_start(self) -> None:
        self.remove()
        for optimizer in _policy_optimizers(self.model.policy):
            params = select_parameters([p for group in optimizer.param_groups for p in group["params"]], self.param_selection)
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
class ReDo(InstanceOnlyCallback, BaseCallback):
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
        self.layers = check_layer_spec(layers)
        self.seed = None if seed is None else check_int("seed", seed, minimum=0)
        self._generator: th.Generator | None = None
        self._rollouts = 0
        self._layer_names: list[str] = []

    def _init_callback(self) -> None:
        self._access = check_training_access(self.model, type(self).__name__)
        if getattr(self.model, "use_sde", False):
            raise TypeError("ReDo does not support gSDE: the last hidden layer also feeds the exploration noise")
        try:
            layers = self._access.hidden_layers()
        except TypeError as error:
            raise TypeError(f"ReDo needs MLP hidden layers: {error}") from error
        mlp_layers = [name for name in layers if not name.endswith("_features")]
        if isinstance(self.layers, tuple) and any(name.endswith("_features") for name in self.layers):
            raise ValueError("ReDo resets units of the MLP hidden layers only, not of features extractors")
        self._layer_names = resolve_layers(mlp_layers, self.layers, type(self).__name__)
        for name in self._layer_names:
            self._access.layers.linears(name)  # fails now, not mid-training, on a layout it cannot reset
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
        linears = {name: self._access.layers.linears(name) for name in self._layer_names}
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


# ---------------------------------------------------------------------------------------------------------- HeadReset
#: heads → the policy's modules re-initialised, with SB3's orthogonal-init gains (ActorCriticPolicy.module_gains).
HEAD_MODULES = {"actor": ("action_net",), "critic": ("value_net",), "both": ("action_net", "value_net")}
HEAD_GAINS = {"action_net": 0.01, "value_net": 1.0}


class HeadReset(InstanceOnlyCallback, BaseCallback):
    """Re-initialise the policy's output heads at every task switch, and optionally every few rollouts.

    The "reset the last layer" baseline of continual and primacy-bias work (Nikishin et al. 2022 reset the last layers
    periodically; in continual RL a head reset at each task switch gives the new task a policy that is not already
    confident). The heads are SB3's ``action_net`` (the policy's output layer) and ``value_net`` (the critic's):
    their weights are drawn again from the policy's initialisation (orthogonal with SB3's gains, 0.01 and 1, and zero
    bias; PyTorch's default when ``ortho_init=False``), a Gaussian policy's ``log_std`` is set back to
    ``log_std_init``, and the optimizers' per-element state of those parameters (Adam's moments) is zeroed.

    When: at once when a task switch is signalled (an ``info[TASK_SWITCH_INFO_KEY]`` flag from a continual wrapper, or
    :meth:`notify_task_switch`), so the rest of the rollout is collected, and its log-probabilities stored, by the
    reset heads; and with ``every_n_rollouts=k`` also at the start of every ``k``-th rollout after the first. Put it
    before monitors in the callback list to measure the reset network at task starts.

    :param heads: ``"actor"`` (the default: the policy head and ``log_std``), ``"critic"`` or ``"both"``.
    :param every_n_rollouts: also reset periodically, every this many rollouts (``None``: only at task switches).
    :param seed: seed of the re-initialisation RNG (default: the model's seed, else random).
    :param verbose: verbosity level (1 prints each reset).
    """

    def __init__(
        self, heads: str = "actor", every_n_rollouts: int | None = None, seed: int | None = None, verbose: int = 0
    ) -> None:
        super().__init__(verbose)
        if heads not in HEAD_MODULES:
            raise InvalidParameterError(f"heads must be one of {sorted(HEAD_MODULES)}, got {heads!r}")
        self.heads = heads
        if every_n_rollouts is not None:
            every_n_rollouts = check_int("every_n_rollouts", every_n_rollouts, minimum=1)
        self.every_n_rollouts = every_n_rollouts
        self.seed = None if seed is None else check_int("seed", seed, minimum=0)
        self.n_resets = 0
        self._rollouts = 0
        self._generator: th.Generator | None = None

    def _init_callback(self) -> None:
        if not hasattr(self.model, "rollout_buffer"):
            raise TypeError(f"HeadReset needs an on-policy algorithm, got {type(self.model).__name__} (no rollout)")
        for name in HEAD_MODULES[self.heads]:
            if not isinstance(getattr(self.model.policy, name, None), nn.Linear):
                raise TypeError(
                    f"HeadReset(heads={self.heads!r}) needs a policy whose {name} is an nn.Linear (SB3's "
                    f"ActorCriticPolicy and its subclasses), got {type(self.model.policy).__name__}"
                )
        if self._generator is None:
            self._generator = _seeded_generator(self.model, self.model.policy.device, self.seed)

    def _on_rollout_start(self) -> None:
        self._rollouts += 1
        if self.every_n_rollouts is not None and self._rollouts > 1 and (self._rollouts - 1) % self.every_n_rollouts == 0:
            self.reset_heads()

    def _on_step(self) -> bool:
        if infos_signal_task_switch(self.locals.get("infos")):
            self.reset_heads()
        return True

    def _on_rollout_end(self) -> None:
        self.logger.record("train/head_resets", self.n_resets)

    def notify_task_switch(self) -> None:
        """Signal that a new task starts now: the heads are reset at once."""
        self.reset_heads()

    def reset_heads(self) -> None:
        """Re-initialise the chosen heads (and ``log_std`` with the actor's) and zero their optimizer state."""
        policy, optimizers = self.model.policy, _policy_optimizers(self.model.policy)
        reset: list[th.Tensor] = []
        for name in HEAD_MODULES[self.heads]:
            linear = getattr(policy, name)
            fresh = th.empty_like(linear.weight)
            with th.no_grad():
                if getattr(policy, "ortho_init", False):
                    nn.init.orthogonal_(fresh, gain=HEAD_GAINS[name], generator=self._generator)
                    linear.weight.copy_(fresh)
                    if linear.bias is not None:
                        linear.bias.zero_()
                else:
                    linear.reset_parameters()
            reset += [p for p in linear.parameters()]
        log_std = getattr(policy, "log_std", None)
        if self.heads != "critic" and isinstance(log_std, nn.Parameter):
            with th.no_grad():
                log_std.fill_(float(getattr(policy, "log_std_init", 0.0)))
            reset.append(log_std)
        for param in reset:
            _zero_optimizer_state(optimizers, param, (...,))
        self.n_resets += 1
        if self.verbose >= 1:
            print(f"HeadReset: reset {', '.join(HEAD_MODULES[self.heads])} (reset {self.n_resets})")


def _zero_optimizer_state(optimizers: Sequence[th.optim.Optimizer], param: th.Tensor, index: tuple[Any, ...]) -> None:
    """Zero the entries ``index`` of every per-element state tensor (Adam's moments, RMSprop's averages) of ``param``."""
    for optimizer in optimizers:
        state = optimizer.state.get(param)
        if not state:
            continue
        for value in state.values():
            if isinstance(value, th.Tensor) and value.shape == param.shape:
                value[index] = 0.0
