"""The hidden layers of an SB3 actor-critic policy: their names, their outputs (by forward hooks), their units.

Names: ``pi0, pi1, …`` are the hidden layers of the actor's MLP branch (``mlp_extractor.policy_net``), ``vf0, …``
those of the critic's (``value_net``); a features extractor with parameters (e.g. NatureCNN) adds ``pi_features`` and
``vf_features`` (only ``pi_features`` when it is shared, its output feeds both branches); a recurrent policy
(sb3-contrib's RecurrentPPO) adds its LSTMs' outputs, ``pi_lstm`` and (with a critic LSTM of its own) ``vf_lstm``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch as th
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.type_aliases import PyTorchObs
from torch import nn

from sb3_blpo.common.rollout import RecurrentStates


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


def is_recurrent_policy(policy: nn.Module) -> bool:
    """Whether the policy is one of sb3-contrib's recurrent actor-critics (an ``nn.LSTM`` in ``lstm_actor``)."""
    return isinstance(getattr(policy, "lstm_actor", None), nn.LSTM)


def _flat_output(output: Any) -> th.Tensor:
    """A hidden layer's output as ``(B, d)``; an ``nn.LSTM`` returns ``(sequence, (h, c))`` with the sequence
    ``(length, n_sequences, hidden)``, listed here sequence by sequence as the policy lists its batch."""
    if isinstance(output, tuple):
        sequence = output[0]
        return sequence.transpose(0, 1).reshape(-1, sequence.shape[-1])
    return output.reshape(output.shape[0], -1)


def branch_of(layer_name: str) -> str:
    """``"actor"`` for ``pi…`` layers, ``"critic"`` for ``vf…`` layers."""
    return "actor" if layer_name.startswith("pi") else "critic"


class HiddenLayers:
    """Hidden layers of an SB3 ``ActorCriticPolicy`` (see the module docstring).

    :param policy: the policy.
    """

    def __init__(self, policy: ActorCriticPolicy) -> None:
        self.policy = policy

    def modules(self) -> dict[str, nn.Module]:
        """The hidden layers by name, in network order.

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
        if is_recurrent_policy(self.policy):
            recurrent_policy: Any = self.policy  # sb3-contrib's RecurrentActorCriticPolicy
            layers["pi_lstm"] = recurrent_policy.lstm_actor
            if isinstance(recurrent_policy.lstm_critic, nn.LSTM):
                layers["vf_lstm"] = recurrent_policy.lstm_critic
        layers.update(hidden_layers_of(policy_net, "pi"))
        layers.update(hidden_layers_of(value_net, "vf"))
        return layers

    def features(
        self,
        observations: PyTorchObs,
        layer_names: Sequence[str],
        differentiable: bool = False,
        recurrent: RecurrentStates | None = None,
    ) -> dict[str, th.Tensor]:
        """Activations of the named hidden layers on ``observations``, ``(B, d)``, detached unless ``differentiable``.

        Forward hooks are registered for the duration of one actor and one critic forward pass and always removed.

        :param differentiable: keep the autograd graph (for regularizers that differentiate the features); by default
            the forward pass runs under ``no_grad`` and the features are detached.
        :param recurrent: the LSTM states and episode starts of the observations (required for recurrent policies,
            e.g. ``batch.recurrent`` of a :class:`~sb3_blpo.common.rollout.RolloutBatch`).
        :raises ValueError: for unknown layer names, or a recurrent policy without ``recurrent``.
        """
        available = self.modules()
        unknown = sorted(set(layer_names) - set(available))
        if unknown:
            raise ValueError(f"unknown layer name(s) {unknown}; available: {sorted(available)}")
        if is_recurrent_policy(self.policy) and recurrent is None:
            raise ValueError(
                f"{type(self.policy).__name__} is recurrent: its features need the LSTM states of the observations "
                "(pass recurrent=batch.recurrent)"
            )
        captured: dict[str, th.Tensor] = {}
        handles = []

        def make_hook(name: str) -> Any:
            def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
                flat = _flat_output(output)
                captured[name] = flat if differentiable else flat.detach()

            return hook

        actor = any(branch_of(name) == "actor" for name in layer_names)
        critic = any(branch_of(name) == "critic" for name in layer_names)
        try:
            for name in layer_names:
                handles.append(available[name].register_forward_hook(make_hook(name)))
            with th.set_grad_enabled(differentiable and th.is_grad_enabled()):
                if recurrent is not None:  # the recurrent policy's own passes, from the stored LSTM states
                    policy: Any = self.policy
                    if actor:
                        policy.get_distribution(observations, recurrent.actor, recurrent.episode_starts)
                    if critic:
                        policy.predict_values(observations, recurrent.critic, recurrent.episode_starts)
                else:
                    features = self.policy.extract_features(observations)
                    pi_features, vf_features = features if isinstance(features, tuple) else (features, features)
                    if actor:
                        self.policy.mlp_extractor.forward_actor(pi_features)
                    if critic:
                        self.policy.mlp_extractor.forward_critic(vf_features)
        finally:
            for handle in handles:
                handle.remove()
        return {name: captured[name] for name in layer_names}

    def linears(self, name: str) -> tuple[nn.Linear, nn.Linear]:
        """The ``nn.Linear`` that feeds MLP hidden layer ``name`` (``piK``/``vfK``) and the one that reads it.

        Unit ``i`` of the layer is row ``i`` of the incoming weight (entry ``i`` of its bias) and column ``i`` of the
        outgoing weight. The outgoing module is the next ``nn.Linear`` of the branch or, after the branch's last hidden
        layer, the head (``action_net`` for the actor, ``value_net`` for the critic). Used by unit-resetting methods.

        :param name: a name from :meth:`modules` of an MLP branch.
        :raises ValueError: if ``name`` is not a hidden layer of ``mlp_extractor`` (e.g. ``pi_features``).
        :raises TypeError: if no ``nn.Linear`` feeds the layer, or what reads it is not an ``nn.Linear`` of matching size.
        """
        layers = self.modules()
        if name not in layers or name.endswith("_features"):
            mlp_names = sorted(key for key in layers if not key.endswith("_features"))
            raise ValueError(f"{name!r} is not a hidden layer of the MLP branches; available: {mlp_names}")
        extractor = self.policy.mlp_extractor
        actor = branch_of(name) == "actor"
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
