"""The one place that knows how to reach an SB3 on-policy algorithm's parameters, losses and hidden layers.

Supported: algorithms built on :class:`~stable_baselines3.common.on_policy_algorithm.OnPolicyAlgorithm` whose policy is
an :class:`~stable_baselines3.common.policies.ActorCriticPolicy` (PPO, A2C, sb3-contrib's TRPO, BLPO). Other policies are
refused, among them sb3-contrib's recurrent policies (their losses need LSTM states that the rollout buffer does not
hand back per sample) and MaskablePPO's policy (not an ``ActorCriticPolicy``).

**Parameter groups.** If the policy defines ``actor_parameters()`` and ``critic_parameters()`` (BLPO's policies do),
those are used. Otherwise SB3's modules are split: the actor is ``pi_features_extractor``,
``mlp_extractor.policy_net``, ``action_net`` and ``log_std`` (when it is a parameter); the critic is
``vf_features_extractor``, ``mlp_extractor.value_net`` and ``value_net``. With a *shared* features extractor
(``share_features_extractor=True``, PPO/A2C's default) its parameters belong to **both** groups, because both losses
depend on them; the default ``FlattenExtractor`` of MLP policies has no parameters, so the groups are then disjoint.
The ``"joint"`` group is every parameter of the policy, for the algorithm's combined loss.

**Losses on a batch of the rollout**, evaluated at the current parameters (which collected the rollout, so the
probability ratio is 1 and the clipping of PPO is inactive; the Hessian still differs from that of the plain
policy-gradient loss by the ``A ∇log π ∇log πᵀ`` term of the ratio):

* actor, ``"clipped_surrogate"`` (PPO, BLPO, and any algorithm with a ``clip_range``):
  ``−mean(min(A r, A clip(r, 1 ± ε))) − ent_coef · mean(entropy)``, with ``ε`` the clip range at the progress the
  coming ``train()`` will use;
* actor, ``"policy_gradient"`` (A2C): ``−mean(A log π) − ent_coef · mean(entropy)``;
* actor, ``"surrogate"`` (TRPO and other algorithms without a clip range): ``−mean(A r)``;
* critic: ``mean((R − V)²)`` against the rollout's returns ``R`` (PPO's optional value clipping is inactive at the
  current parameters; ``vf_coef`` is not applied);
* joint: ``actor + vf_coef · critic`` (``vf_coef`` of the algorithm, 1 if it has none), the loss PPO and A2C minimise.

Advantages are normalised over the batch when the algorithm has ``normalize_advantage=True``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch as th
import torch.nn.functional as F
from gymnasium import spaces
from stable_baselines3.common.buffers import DictRolloutBuffer, RolloutBuffer
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.type_aliases import PyTorchObs
from torch import nn

from sb3_blpo.hypergrad import unique_parameters

PARAMETER_GROUPS = ("actor", "critic", "joint")
ACTOR_OBJECTIVES = ("auto", "clipped_surrogate", "policy_gradient", "surrogate")


@dataclass(frozen=True)
class RolloutBatch:
    """A subsample of the rollout buffer as tensors on the policy's device.

    :param observations: observations (a tensor, or a dict of tensors for dict observation spaces).
    :param actions: actions as the policy's ``log_prob`` expects them (``long`` indices for ``Discrete``).
    :param old_log_prob: log-probabilities recorded during collection.
    :param advantages: GAE advantages (not normalised).
    :param returns: value targets (advantages + values).
    """

    observations: PyTorchObs
    actions: th.Tensor
    old_log_prob: th.Tensor
    advantages: th.Tensor
    returns: th.Tensor

    @property
    def size(self) -> int:
        """Number of transitions."""
        return int(self.returns.shape[0])


def _recurrent_policy_types() -> tuple[type, ...]:
    try:
        from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy
    except ImportError:
        return ()
    return (RecurrentActorCriticPolicy,)


def hidden_layers_of(network: nn.Module, prefix: str) -> dict[str, nn.Module]:
    """The modules whose outputs are the hidden representations of an MLP branch (``nn.Sequential``).

    Each ``nn.Linear`` opens a hidden layer; the layer's representation is the output of the last module before the next
    ``nn.Linear`` (usually the activation, or a normalisation after it). Named ``f"{prefix}{index}"``.

    :param network: the branch, e.g. ``mlp_extractor.policy_net``.
    :param prefix: name prefix, e.g. ``"pi"``.
    :raises TypeError: if ``network`` is not an ``nn.Sequential``.
    """
    if not isinstance(network, nn.Sequential):
        raise TypeError(f"expected an nn.Sequential MLP branch, got {type(network).__name__}")
    layers: dict[str, nn.Module] = {}
    current: nn.Module | None = None
    for module in network:
        if isinstance(module, nn.Linear) and current is not None:
            layers[f"{prefix}{len(layers)}"] = current
        current = module
    if current is not None:
        layers[f"{prefix}{len(layers)}"] = current
    return layers


class OnPolicyLossAccess:
    """Parameters, losses and hidden layers of an SB3 on-policy actor-critic algorithm (see the module docstring).

    :param model: the algorithm (its policy must be set up).
    :param actor_objective: ``"auto"`` (from the algorithm's type: A2C → ``"policy_gradient"``, an algorithm with a
        ``clip_range`` → ``"clipped_surrogate"``, otherwise ``"surrogate"``) or one of those names.
    :raises TypeError: if the algorithm is not on-policy or its policy lacks the modules this class relies on.
    """

    def __init__(self, model: Any, actor_objective: str = "auto") -> None:
        if actor_objective not in ACTOR_OBJECTIVES:
            raise ValueError(f"actor_objective must be one of {ACTOR_OBJECTIVES}, got {actor_objective!r}")
        if not isinstance(model, OnPolicyAlgorithm):
            raise TypeError(
                f"{type(model).__name__} is not an SB3 on-policy algorithm; the monitors read the rollout buffer of "
                "OnPolicyAlgorithm subclasses (PPO, A2C, TRPO, BLPO)"
            )
        policy = model.policy
        recurrent = _recurrent_policy_types()
        if recurrent and isinstance(policy, recurrent):
            raise TypeError(f"recurrent policies ({type(policy).__name__}) are not supported by the monitors")
        if not isinstance(policy, ActorCriticPolicy):
            raise TypeError(
                f"the policy {type(policy).__name__} is not an ActorCriticPolicy; the monitors need its "
                "get_distribution/predict_values and actor/critic modules"
            )
        self.model = model
        self.policy: ActorCriticPolicy = policy
        self.actor_objective = self._resolve_objective(model) if actor_objective == "auto" else actor_objective
        self._groups = self._split_parameters()

    @staticmethod
    def _resolve_objective(model: Any) -> str:
        from stable_baselines3 import A2C

        if isinstance(model, A2C):
            return "policy_gradient"
        if getattr(model, "clip_range", None) is not None:
            return "clipped_surrogate"
        return "surrogate"

    # ------------------------------------------------------------------ parameters
    def _split_parameters(self) -> dict[str, list[nn.Parameter]]:
        policy = self.policy
        actor_method = getattr(policy, "actor_parameters", None)
        critic_method = getattr(policy, "critic_parameters", None)
        if callable(actor_method) and callable(critic_method):
            actor, critic = list(actor_method()), list(critic_method())
        else:
            extractor = getattr(policy, "mlp_extractor", None)
            required = {
                "pi_features_extractor": getattr(policy, "pi_features_extractor", None),
                "vf_features_extractor": getattr(policy, "vf_features_extractor", None),
                "mlp_extractor.policy_net": getattr(extractor, "policy_net", None),
                "mlp_extractor.value_net": getattr(extractor, "value_net", None),
                "action_net": getattr(policy, "action_net", None),
                "value_net": getattr(policy, "value_net", None),
            }
            missing = [name for name, module in required.items() if not isinstance(module, nn.Module)]
            if missing:
                raise TypeError(
                    f"the policy {type(policy).__name__} has no module(s) {missing}; define actor_parameters() and "
                    "critic_parameters() on the policy, or use SB3's ActorCriticPolicy layout"
                )
            actor_modules = ("pi_features_extractor", "mlp_extractor.policy_net", "action_net")
            critic_modules = ("vf_features_extractor", "mlp_extractor.value_net", "value_net")
            actor = unique_parameters(p for name in actor_modules for p in required[name].parameters())  # type: ignore[union-attr]
            log_std = getattr(policy, "log_std", None)
            if isinstance(log_std, nn.Parameter):
                actor.append(log_std)
            critic = unique_parameters(p for name in critic_modules for p in required[name].parameters())  # type: ignore[union-attr]
        actor = [p for p in actor if p.requires_grad]
        critic = [p for p in critic if p.requires_grad]
        if not actor or not critic:
            raise TypeError(f"the policy {type(policy).__name__} has no trainable actor or critic parameters")
        joint = [p for p in policy.parameters() if p.requires_grad]
        return {"actor": actor, "critic": critic, "joint": joint}

    def parameters(self, group: str) -> list[nn.Parameter]:
        """Trainable parameters of ``group`` (``"actor"``, ``"critic"`` or ``"joint"``)."""
        if group not in self._groups:
            raise ValueError(f"unknown parameter group {group!r}; choose from {PARAMETER_GROUPS}")
        return self._groups[group]

    # ------------------------------------------------------------------ rollout data
    def rollout_size(self) -> tuple[int, int]:
        """``(n_steps, n_envs)`` of the rollout buffer."""
        buffer = self.model.rollout_buffer
        return int(buffer.buffer_size), int(buffer.n_envs)

    def _time_major(self, array: np.ndarray) -> np.ndarray:
        """A buffer field as ``(n_steps, n_envs, ...)``, whether or not ``buffer.get()`` has flattened it already."""
        buffer = self.model.rollout_buffer
        n_steps, n_envs = self.rollout_size()
        if buffer.generator_ready:
            # RolloutBuffer.get() flattens in place with swap_and_flatten: env-major, shape (n_envs * n_steps, ...).
            return array.reshape(n_envs, n_steps, *array.shape[1:]).swapaxes(0, 1)
        return array

    def sample_batch(self, n_samples: int | None, generator: th.Generator, first_step: int = 0) -> RolloutBatch:
        """A uniform subsample (without replacement) of the transitions stored at rollout steps ``≥ first_step``.

        The buffer is read in place (``buffer.get()`` is not called, so its state is untouched).

        :param n_samples: number of transitions; ``None`` or more than available takes all of them.
        :param generator: source of the subsample indices.
        :param first_step: first rollout step (time index) to draw from, e.g. where a new task started.
        """
        buffer = self.model.rollout_buffer
        if not isinstance(buffer, RolloutBuffer | DictRolloutBuffer) or not buffer.full:
            raise RuntimeError("the rollout buffer is not full; sample_batch() is meant for _on_rollout_end")
        n_steps, n_envs = self.rollout_size()
        first_step = min(max(int(first_step), 0), n_steps - 1)
        available = (n_steps - first_step) * n_envs
        count = available if n_samples is None else min(int(n_samples), available)
        flat = th.randperm(available, generator=generator)[:count].sort().values.numpy()
        steps, envs = first_step + flat // n_envs, flat % n_envs

        def take(array: np.ndarray) -> th.Tensor:
            return th.as_tensor(np.ascontiguousarray(self._time_major(array)[steps, envs]), device=self.policy.device)

        observations: PyTorchObs
        if isinstance(buffer.observations, dict):
            observations = {key: take(value) for key, value in buffer.observations.items()}
        else:
            observations = take(buffer.observations)
        actions = take(buffer.actions)
        if isinstance(self.model.action_space, spaces.Discrete):
            actions = actions.long().flatten()
        return RolloutBatch(
            observations=observations,
            actions=actions,
            old_log_prob=take(buffer.log_probs).flatten(),
            advantages=take(buffer.advantages).flatten(),
            returns=take(buffer.returns).flatten(),
        )

    # ------------------------------------------------------------------ losses
    def progress_remaining(self) -> float:
        """The progress value the coming ``train()`` will use (SB3 updates it right after ``on_rollout_end``)."""
        total = getattr(self.model, "_total_timesteps", 0)
        if not total:
            return float(self.model._current_progress_remaining)
        return 1.0 - float(self.model.num_timesteps) / float(total)

    def _clip_range(self) -> float:
        clip_range = getattr(self.model, "clip_range", None)
        if clip_range is None:
            raise ValueError(f"{type(self.model).__name__} has no clip_range; use actor_objective='surrogate'")
        return float(clip_range(self.progress_remaining())) if callable(clip_range) else float(clip_range)

    def actor_loss(self, batch: RolloutBatch) -> th.Tensor:
        """The actor's loss on ``batch`` (objective chosen at construction; see the module docstring)."""
        distribution = self.policy.get_distribution(batch.observations)
        log_prob = distribution.log_prob(batch.actions)
        advantages = batch.advantages
        if getattr(self.model, "normalize_advantage", False) and batch.size > 1:
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        if self.actor_objective == "policy_gradient":
            policy_loss = -(advantages * log_prob).mean()
        elif self.actor_objective == "clipped_surrogate":
            ratio = th.exp(log_prob - batch.old_log_prob)
            clip_range = self._clip_range()
            policy_loss = -th.min(advantages * ratio, advantages * th.clamp(ratio, 1 - clip_range, 1 + clip_range)).mean()
        else:
            policy_loss = -(advantages * th.exp(log_prob - batch.old_log_prob)).mean()
        ent_coef = float(getattr(self.model, "ent_coef", 0.0) or 0.0)
        if ent_coef == 0.0:
            return policy_loss
        entropy = distribution.entropy()
        entropy_loss = th.mean(log_prob) if entropy is None else -th.mean(entropy)
        return policy_loss + ent_coef * entropy_loss

    def critic_loss(self, batch: RolloutBatch) -> th.Tensor:
        """Mean squared error of the value prediction to the rollout's returns."""
        values = self.policy.predict_values(batch.observations).flatten()
        return F.mse_loss(values, batch.returns)

    def loss(self, group: str, batch: RolloutBatch) -> th.Tensor:
        """The loss whose Hessian is measured for ``group`` (the joint loss weights the critic by ``vf_coef``)."""
        if group == "actor":
            return self.actor_loss(batch)
        if group == "critic":
            return self.critic_loss(batch)
        if group == "joint":
            vf_coef = float(getattr(self.model, "vf_coef", 1.0))
            return self.actor_loss(batch) + vf_coef * self.critic_loss(batch)
        raise ValueError(f"unknown parameter group {group!r}; choose from {PARAMETER_GROUPS}")

    def exact_hessian(self, group: str, batch: RolloutBatch, chunk_size: int | None = None) -> th.Tensor:
        """Dense Hessian of :meth:`loss` w.r.t. the group's parameters by ``torch.func`` (vmapped autodiff).

        Independent of the double-backward products the monitors use, so it serves as their oracle. Memory and time grow
        as ``P²``: only for small policies (a few thousand parameters at most).

        :param group: parameter group.
        :param batch: the transitions of the loss.
        :param chunk_size: if given, ``jacrev(jacrev(loss), chunk_size=...)`` computes that many rows at a time (less
            memory); otherwise ``torch.func.hessian`` (forward-over-reverse) computes all rows at once.
        :return: ``(P, P)`` matrix, rows and columns ordered like :meth:`parameters` (flattened).
        """
        params = self.parameters(group)
        names = {id(p): name for name, p in self.policy.named_parameters()}
        sizes, shapes = [p.numel() for p in params], [p.shape for p in params]
        policy, loss = self.policy, self.loss

        class _Loss(nn.Module):
            # functional_call swaps the parameters of a module's forward; this module's forward is the loss.
            def __init__(self) -> None:
                super().__init__()
                self.policy = policy

            def forward(self) -> th.Tensor:
                return loss(group, batch)

        module = _Loss()

        def loss_of_flat(vector: th.Tensor) -> th.Tensor:
            chunks = vector.split(sizes)
            replaced = {f"policy.{names[id(p)]}": c.view(s) for p, c, s in zip(params, chunks, shapes, strict=True)}
            return th.func.functional_call(module, replaced, ())

        flat = th.cat([p.detach().reshape(-1) for p in params])
        if chunk_size is None:
            return th.func.hessian(loss_of_flat)(flat)
        return th.func.jacrev(th.func.jacrev(loss_of_flat), chunk_size=chunk_size)(flat)

    # ------------------------------------------------------------------ hidden layers
    def hidden_layers(self) -> dict[str, nn.Module]:
        """Hidden layers of the actor (``pi0, pi1, …``) and critic (``vf0, vf1, …``) MLP branches.

        A features extractor with parameters (e.g. NatureCNN) adds ``pi_features`` and ``vf_features``; when it is
        shared, only ``pi_features`` is listed (its output feeds both branches).

        :raises TypeError: if the policy has no ``mlp_extractor`` with ``policy_net``/``value_net`` Sequentials.
        """
        extractor = getattr(self.policy, "mlp_extractor", None)
        policy_net, value_net = getattr(extractor, "policy_net", None), getattr(extractor, "value_net", None)
        if not isinstance(policy_net, nn.Sequential) or not isinstance(value_net, nn.Sequential):
            raise TypeError(
                f"the policy {type(self.policy).__name__} has no mlp_extractor with nn.Sequential policy_net and "
                "value_net; feature metrics need SB3's MlpExtractor layout"
            )
        layers: dict[str, nn.Module] = {}
        pi_extractor = self.policy.pi_features_extractor
        vf_extractor = self.policy.vf_features_extractor
        if any(True for _ in pi_extractor.parameters()):
            layers["pi_features"] = pi_extractor
        if vf_extractor is not pi_extractor and any(True for _ in vf_extractor.parameters()):
            layers["vf_features"] = vf_extractor
        layers.update(hidden_layers_of(policy_net, "pi"))
        layers.update(hidden_layers_of(value_net, "vf"))
        return layers

    def features(
        self, observations: PyTorchObs, layer_names: Sequence[str], differentiable: bool = False
    ) -> dict[str, th.Tensor]:
        """Activations of the named hidden layers on ``observations``, ``(B, d)``, detached unless ``differentiable``.

        Forward hooks are registered for the duration of one actor and one critic forward pass and always removed.

        :param differentiable: keep the autograd graph (for regularizers that differentiate the features); by default
            the forward pass runs under ``no_grad`` and the features are detached.
        """
        available = self.hidden_layers()
        unknown = sorted(set(layer_names) - set(available))
        if unknown:
            raise ValueError(f"unknown layer name(s) {unknown}; available: {sorted(available)}")
        captured: dict[str, th.Tensor] = {}
        handles = []

        def make_hook(name: str) -> Any:
            def hook(_module: nn.Module, _inputs: Any, output: th.Tensor) -> None:
                captured[name] = (output if differentiable else output.detach()).reshape(output.shape[0], -1)

            return hook

        try:
            for name in layer_names:
                handles.append(available[name].register_forward_hook(make_hook(name)))
            with th.set_grad_enabled(differentiable and th.is_grad_enabled()):
                pi_features, vf_features = self._branch_features(observations)
                if any(name.startswith("pi") for name in layer_names):
                    self.policy.mlp_extractor.forward_actor(pi_features)
                if any(name.startswith("vf") for name in layer_names):
                    self.policy.mlp_extractor.forward_critic(vf_features)
        finally:
            for handle in handles:
                handle.remove()
        return {name: captured[name] for name in layer_names}

    def _branch_features(self, observations: PyTorchObs) -> tuple[th.Tensor, th.Tensor]:
        features = self.policy.extract_features(observations)
        if isinstance(features, tuple):
            return features
        return features, features

    def hidden_layer_linears(self, name: str) -> tuple[nn.Linear, nn.Linear]:
        """The ``nn.Linear`` that feeds MLP hidden layer ``name`` (``piK``/``vfK``) and the one that reads it.

        Unit ``i`` of the layer is row ``i`` of the incoming weight (entry ``i`` of its bias) and column ``i`` of the
        outgoing weight. The outgoing module is the next ``nn.Linear`` of the branch or, after the branch's last hidden
        layer, the head (``action_net`` for the actor, ``value_net`` for the critic). Used by unit-resetting methods.

        :param name: a name from :meth:`hidden_layers` of an MLP branch.
        :raises ValueError: if ``name`` is not a hidden layer of ``mlp_extractor`` (e.g. ``pi_features``).
        :raises TypeError: if no ``nn.Linear`` feeds the layer, or what reads it is not an ``nn.Linear`` of matching size.
        """
        layers = self.hidden_layers()
        if name not in layers or not (name.startswith("pi") or name.startswith("vf")) or name.endswith("_features"):
            mlp_names = sorted(key for key in layers if not key.endswith("_features"))
            raise ValueError(f"{name!r} is not a hidden layer of the MLP branches; available: {mlp_names}")
        extractor = self.policy.mlp_extractor
        actor = name.startswith("pi")
        modules = list(extractor.policy_net if actor else extractor.value_net)
        position = next(i for i, module in enumerate(modules) if module is layers[name])
        incoming = next((m for m in reversed(modules[: position + 1]) if isinstance(m, nn.Linear)), None)
        head = self.policy.action_net if actor else self.policy.value_net
        outgoing = next((m for m in modules[position + 1 :] if isinstance(m, nn.Linear)), head)
        if not isinstance(incoming, nn.Linear):
            raise TypeError(f"no nn.Linear feeds hidden layer {name!r}")
        if not isinstance(outgoing, nn.Linear) or outgoing.in_features != incoming.out_features:
            raise TypeError(
                f"hidden layer {name!r} is read by {type(outgoing).__name__}, not by an nn.Linear with "
                f"{incoming.out_features} inputs; its units cannot be reset"
            )
        return incoming, outgoing
