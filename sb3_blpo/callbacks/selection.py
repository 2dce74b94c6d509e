"""What the regularizer and reset callbacks act on: which algorithms, which hidden layers, which parameters."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from sb3_blpo._validation import InvalidParameterError, check_int, check_one_of
from sb3_blpo.common.features import branch_of
from sb3_blpo.common.model_view import OnPolicyModelView
from sb3_blpo.common.parameters import PARAMETER_SELECTIONS

#: Hidden layers to act on: ``"all"``, the last ``k`` of each branch, or layer names (``pi0``, ``vf1``, …).
LayerSpec = str | int | Sequence[str]


def takes_loss_terms(model: Any) -> bool:
    """Whether the model adds extra terms to its own losses (:meth:`sb3_blpo.BLPO.add_loss_term`)."""
    return callable(getattr(model, "add_loss_term", None)) and callable(getattr(model, "remove_loss_term", None))


def joint_loss_algorithms() -> tuple[type, ...]:
    """Algorithms with one joint loss and one ``policy.optimizer`` step per minibatch after one ``zero_grad``."""
    from stable_baselines3 import A2C, PPO

    try:
        from sb3_contrib import MaskablePPO
    except ImportError:
        return (PPO, A2C)
    return (PPO, A2C, MaskablePPO)


def check_training_access(model: Any, who: str) -> OnPolicyModelView:
    """The model view of an algorithm whose training a callback can reach; a clear ``TypeError`` otherwise.

    Reachable: models with :meth:`~sb3_blpo.BLPO.add_loss_term` (terms go into their losses), and PPO, A2C and
    MaskablePPO (one ``policy.optimizer`` step per minibatch, preceded by one ``zero_grad``: gradients are injected
    there).
    """
    if not (isinstance(model, joint_loss_algorithms()) or takes_loss_terms(model)):
        raise TypeError(
            f"{who} cannot reach the training loss of {type(model).__name__}: it supports PPO, A2C, MaskablePPO (and "
            "subclasses) and algorithms with add_loss_term/remove_loss_term such as BLPO. Not supported: off-policy "
            "algorithms (SAC, TD3, DQN; no rollout), TRPO (its actor step is a line search that bypasses the optimizer) "
            "and RecurrentPPO (its update runs on padded LSTM sequences, which the injected terms and the resets' feature "
            "reads do not handle; its monitors are supported)."
        )
    try:
        return OnPolicyModelView(model)
    except TypeError as error:
        raise TypeError(f"{who}: {error}") from error


def check_layer_spec(layers: Any) -> LayerSpec:
    """Validate a :data:`LayerSpec` at construction."""
    if isinstance(layers, str):
        if layers != "all":
            raise InvalidParameterError(f"layers must be 'all', a positive integer or a list of layer names, got {layers!r}")
        return layers
    if isinstance(layers, int) and not isinstance(layers, bool):
        return check_int("layers", layers, minimum=1)
    if isinstance(layers, Sequence) and len(layers) > 0 and all(isinstance(name, str) for name in layers):
        return tuple(layers)
    raise InvalidParameterError(f"layers must be 'all', a positive integer or a non-empty list of names, got {layers!r}")


def resolve_layers(available: Sequence[str], spec: LayerSpec, who: str) -> list[str]:
    """Layer names selected by ``spec``: all, the last ``k`` of each branch, or the named ones (in network order)."""
    if isinstance(spec, str):
        chosen = list(available)
    elif isinstance(spec, int):
        chosen = []
        for branch in ("actor", "critic"):
            chosen += [name for name in available if branch_of(name) == branch][-spec:]
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


def check_param_selection(param_selection: str, parameters: str | None, who: str) -> str:
    """Validate ``param_selection``, accepting the former keyword ``parameters`` (deprecated) in its place."""
    if parameters is not None:
        warnings.warn(f"{who}(parameters=...) is deprecated; use param_selection=...", DeprecationWarning, stacklevel=3)
        param_selection = parameters
    return check_one_of("param_selection", param_selection, PARAMETER_SELECTIONS)
