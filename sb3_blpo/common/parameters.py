"""The actor/critic parameter split of an SB3 actor-critic policy, written once.

Used by BLPO's policies (which need the two sets disjoint) and by the model view of the callbacks (which measure and
regularise each set). If the policy defines ``actor_parameters()`` and ``critic_parameters()`` (BLPO's policies do),
:func:`actor_critic_parameters` uses them; otherwise SB3's modules are split: the actor is ``pi_features_extractor``,
``mlp_extractor.policy_net``, ``action_net`` and ``log_std`` (when it is a parameter); the critic is
``vf_features_extractor``, ``mlp_extractor.value_net`` and ``value_net``. With a *shared* features extractor
(``share_features_extractor=True``, PPO/A2C's default) its parameters belong to **both** sets, because both losses
depend on them; the default ``FlattenExtractor`` of MLP policies has no parameters, so the sets are then disjoint.
sb3-contrib's recurrent policies add ``lstm_actor`` to the actor and ``lstm_critic`` (or the linear ``critic`` that
replaces it) to the critic; a shared LSTM stays the actor's (the critic reads its output detached).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from sb3_blpo.hypergrad import unique_parameters

#: The parameter groups the monitors and regularizers know: each side, and every parameter of the policy.
PARAMETER_GROUPS: tuple[str, ...] = ("actor", "critic", "joint")
#: Accepted values of a ``param_selection`` argument (see :func:`select_parameters`).
PARAMETER_SELECTIONS: tuple[str, ...] = ("all", "weights")

_ACTOR_MODULES = ("pi_features_extractor", "mlp_extractor.policy_net", "action_net")
_CRITIC_MODULES = ("vf_features_extractor", "mlp_extractor.value_net", "value_net")
# sb3-contrib's recurrent policies: the actor's LSTM; the critic's own LSTM, or the linear layer it has in place of one.
# With a shared LSTM the critic reads the actor LSTM's output detached, so that LSTM is the actor's alone.
_OPTIONAL_ACTOR_MODULES = ("lstm_actor",)
_OPTIONAL_CRITIC_MODULES = ("lstm_critic", "critic")


def _module(policy: nn.Module, path: str) -> nn.Module | None:
    owner: object | None = policy
    for name in path.split("."):
        owner = getattr(owner, name, None)
    return owner if isinstance(owner, nn.Module) else None


def _parameters_of(policy: nn.Module, paths: Sequence[str], optional: Sequence[str] = ()) -> list[nn.Parameter]:
    modules = {path: _module(policy, path) for path in paths}
    modules.update({path: module for path in optional if (module := _module(policy, path)) is not None})
    missing = [path for path, module in modules.items() if module is None]
    if missing:
        raise TypeError(
            f"the policy {type(policy).__name__} has no module(s) {missing}; define actor_parameters() and "
            "critic_parameters() on the policy, or use SB3's ActorCriticPolicy layout (mlp_extractor with "
            "policy_net and value_net)"
        )
    return unique_parameters(p for module in modules.values() for p in module.parameters())  # type: ignore[union-attr]


def actor_modules_parameters(policy: nn.Module) -> list[nn.Parameter]:
    """Actor parameters from SB3's module layout: features extractor, policy branch, action head and ``log_std``.

    :param policy: an SB3 ``ActorCriticPolicy`` (or one with the same module names).
    :raises TypeError: naming the missing modules.
    """
    params = _parameters_of(policy, _ACTOR_MODULES, _OPTIONAL_ACTOR_MODULES)
    log_std = getattr(policy, "log_std", None)
    if isinstance(log_std, nn.Parameter) and all(p is not log_std for p in params):
        params.append(log_std)
    return params


def critic_modules_parameters(policy: nn.Module) -> list[nn.Parameter]:
    """Critic parameters from SB3's module layout: features extractor, value branch and value head.

    :param policy: an SB3 ``ActorCriticPolicy`` (or one with the same module names).
    :raises TypeError: naming the missing modules.
    """
    return _parameters_of(policy, _CRITIC_MODULES, _OPTIONAL_CRITIC_MODULES)


def actor_critic_parameters(policy: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """The trainable ``(actor, critic)`` parameters of an actor-critic policy (see the module docstring).

    :param policy: the policy.
    :raises TypeError: if the policy has neither the methods nor SB3's modules, or one side has no trainable parameter.
    """
    actor_method = getattr(policy, "actor_parameters", None)
    critic_method = getattr(policy, "critic_parameters", None)
    if callable(actor_method) and callable(critic_method):
        actor, critic = list(actor_method()), list(critic_method())
    else:
        actor, critic = actor_modules_parameters(policy), critic_modules_parameters(policy)
    actor = [p for p in actor if p.requires_grad]
    critic = [p for p in critic if p.requires_grad]
    if not actor or not critic:
        raise TypeError(f"the policy {type(policy).__name__} has no trainable actor or critic parameters")
    return actor, critic


def select_parameters(params: Sequence[nn.Parameter], param_selection: str) -> list[nn.Parameter]:
    """All parameters (``"all"``), or the weights only (``"weights"``: tensors with ≥ 2 dimensions, so no biases,
    ``log_std`` or normalisation scales).

    :param params: the parameters to choose from.
    :param param_selection: one of :data:`PARAMETER_SELECTIONS`.
    """
    if param_selection not in PARAMETER_SELECTIONS:
        raise ValueError(f"param_selection must be one of {PARAMETER_SELECTIONS}, got {param_selection!r}")
    if param_selection == "weights":
        return [p for p in params if p.dim() >= 2]
    return list(params)
