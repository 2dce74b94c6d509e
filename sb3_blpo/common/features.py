"""The hidden layers of an SB3 actor-critic policy: their names, their outputs (by forward hooks), their units.

Names: ``pi0, pi1, …`` are the hidden layers of the actor's MLP branch (``mlp_extractor.policy_net``), ``vf0, …``
those of the critic's (``value_net``); a features extractor with parameters (e.g. NatureCNN) adds ``pi_features`` and
``vf_features`` (only ``pi_features`` when it is shared, its output feeds both branches).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch as th
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.type_aliases import PyTorchObs
from torch import nn


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
        available = self.modules()
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
                features = self.policy.extract_features(observations)
                pi_features, vf_features = features if isinstance(features, tuple) else (features, features)
                if any(branch_of(name) == "actor" for name in layer_names):
                    self.policy.mlp_extractor.forward_actor(pi_features)
                if any(branch_of(name) == "critic" for name in layer_names):
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
