"""Extra training-loss terms an algorithm accepts from outside (how the plasticity regularizers reach BLPO's losses).

An algorithm that mixes in :class:`LossTermHost` and adds :meth:`LossTermHost._extra_loss` to its losses takes loss
terms; :class:`~sb3_blpo.callbacks.PlasticityRegularizer` delivers its penalties to any model with ``add_loss_term``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch as th
from stable_baselines3.common.type_aliases import PyTorchObs

#: An extra training-loss term: ``term(level, observations)`` with ``level`` "actor" or "critic" returns a scalar to add
#: to that level's minibatch loss (or ``None``). Registered with :meth:`LossTermHost.add_loss_term`.
LossTerm = Callable[[str, PyTorchObs], "th.Tensor | None"]


class LossTermHost:
    """Mixin: a list of :data:`LossTerm` callables, added to the host's actor and critic losses. Terms are not saved
    with the model (list ``"_loss_terms"`` among the excluded save parameters)."""

    _loss_terms: list[LossTerm]

    def add_loss_term(self, term: LossTerm) -> None:
        """Add ``term(level, observations)`` to the training losses: the actor's (level ``"actor"``) and each critic
        step's (level ``"critic"``), on every minibatch; terms are not saved with the model."""
        if not callable(term):
            raise TypeError(f"term must be callable as term(level, observations), got {term!r}")
        self._loss_terms.append(term)

    def remove_loss_term(self, term: LossTerm) -> None:
        """Remove a term added with :meth:`add_loss_term` (``ValueError`` if it is not there)."""
        self._loss_terms.remove(term)

    def _extra_loss(self, level: str, observations: PyTorchObs) -> th.Tensor | float:
        """The sum of the terms for ``level`` on a minibatch's observations (0 without terms)."""
        total: th.Tensor | float = 0.0
        for term in self._loss_terms:
            value = term(level, observations)
            if value is not None:
                total = total + value
        return total
