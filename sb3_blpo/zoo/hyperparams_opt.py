"""Optuna search space of BLPO for ``rl_zoo3 train --optimize`` (``HYPERPARAMS_SAMPLER`` / ``HYPERPARAMS_CONVERTER``).

The PPO-shared hyperparameters use rl-zoo3's names and conventions (``one_minus_gamma``, ``n_steps_pow``, ``net_arch``
and ``activation_fn`` names) and are converted by rl-zoo3's own :func:`rl_zoo3.hyperparams_opt.convert_onpolicy_params`.
Two ranges differ from rl-zoo3's PPO sampler because a BLPO minibatch costs several backward passes (nested critic
steps, Hessian-vector products, the mixed term): the minibatch size is sampled as the number of minibatches per epoch
(1 to 16, so a minibatch is at least 1/16 of the rollout, instead of 4 to 1024 samples) and ``n_epochs`` is at most 10
(instead of 20). The rollout length is also capped so that a trial makes at least :data:`MIN_UPDATES_PER_TRIAL`
updates within its ``n_timesteps``.

BLPO's own hyperparameters: ``n_critic_steps``, the critic learning rate (as a ratio to the actor's, which the authors
fix at 4), the Nyström rank and ρ (only when the config's ``ihvp_solver`` is Nyström), and ``hypergrad_bound`` (not
when ``ihvp_solver`` is ``None``).

The sampled ``policy_kwargs`` (``net_arch``, ``activation_fn``) are merged into the config entry's instead of replacing
them, as the sampled ``ihvp_kwargs`` are: rl-zoo3 replaces the whole dict, which silently drops an entry's
``log_std_init``, ``ortho_init`` and the like (on the MuJoCo entries, ``log_std_init=-2`` back to 0). ``--trial-id``
merges the same way (:func:`merge_kwargs`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import optuna
from rl_zoo3.hyperparams_opt import convert_onpolicy_params

#: The search leaves at least this many updates (rollouts) in each trial's ``n_timesteps``.
MIN_UPDATES_PER_TRIAL = 4
#: ``n_steps`` is ``2 ** n_steps_pow`` with ``n_steps_pow`` in ``[MIN_N_STEPS_POW, MAX_N_STEPS_POW]`` (32 to 2048).
MIN_N_STEPS_POW, MAX_N_STEPS_POW = 5, 11


def _max_n_steps_pow(n_envs: int, n_timesteps: int | None) -> int:
    if not n_timesteps or n_timesteps <= 0:
        return MAX_N_STEPS_POW
    budget = n_timesteps / (MIN_UPDATES_PER_TRIAL * max(n_envs, 1))
    return min(MAX_N_STEPS_POW, max(MIN_N_STEPS_POW, math.floor(math.log2(max(budget, 1.0)))))


def merge_kwargs(entry: Mapping[str, Any] | None, sampled: Mapping[str, Any]) -> dict[str, Any]:
    """
    A trial's keyword-argument dict (``policy_kwargs``, ``ihvp_kwargs``): the config entry's, with the sampled keys in
    place of theirs.

    :param entry: the entry's dict (``None``: it has none)
    :param sampled: the trial's dict
    :return: the merged keyword arguments
    """
    return {**dict(entry or {}), **sampled}


def convert_blpo_params(sampled_params: dict[str, Any]) -> dict[str, Any]:
    """
    Turn the raw parameters of a BLPO trial into BLPO hyperparameters (what ``--trial-id`` loads from a study).

    :param sampled_params: ``trial.params`` of a trial sampled by :func:`sample_blpo_params`
    :return: hyperparameters for a zoo config entry; ``n_envs`` is included (the trial's, from which the minibatch size
        was derived) and rl-zoo3 applies it like the config's ``n_envs``
    """
    params = dict(sampled_params)
    n_envs = params.pop("n_envs", None)
    n_minibatches_pow = params.pop("n_minibatches_pow", None)
    critic_lr_ratio = params.pop("critic_lr_ratio", None)
    rank = params.pop("nystrom_rank", None)
    rho = params.pop("nystrom_rho", None)
    hyperparams = convert_onpolicy_params(params)
    if critic_lr_ratio is not None:
        hyperparams["critic_learning_rate"] = hyperparams["learning_rate"] * critic_lr_ratio
    if n_minibatches_pow is not None:
        rollout_size = hyperparams["n_steps"] * (n_envs or 1)
        hyperparams["batch_size"] = max(2, rollout_size // 2**n_minibatches_pow)
    if rank is not None or rho is not None:
        hyperparams["ihvp_kwargs"] = {key: value for key, value in (("rank", rank), ("rho", rho)) if value is not None}
    if n_envs is not None:
        hyperparams["n_envs"] = n_envs
    return hyperparams


def sample_blpo_params(
    trial: optuna.Trial,
    n_actions: int,
    n_envs: int,
    additional_args: dict[str, Any],
    *,
    base_hyperparams: Mapping[str, Any] | None = None,
    n_timesteps: int | None = None,
) -> dict[str, Any]:
    """
    Sample BLPO hyperparameters (rl-zoo3's sampler signature, plus two keyword arguments the launcher binds).

    :param trial: the Optuna trial
    :param n_actions: action dimension (unused; part of rl-zoo3's sampler signature)
    :param n_envs: number of training environments of the config entry
    :param additional_args: rl-zoo3's extra arguments (unused)
    :param base_hyperparams: the config entry being tuned, preprocessed (its ``ihvp_solver`` and ``ihvp_kwargs`` decide
        which solver settings are sampled; sampled ``ihvp_kwargs`` and ``policy_kwargs`` are merged into the config's)
    :param n_timesteps: the training budget of one trial (caps the rollout length); ``None``: no cap
    :return: hyperparameters for the BLPO constructor
    """
    base = dict(base_hyperparams or {})
    solver = base.get("ihvp_solver", "nystrom")
    sampled: dict[str, Any] = {
        # PPO-shared (rl-zoo3's names and conversions; narrower minibatch/epoch ranges, see the module docstring)
        "n_steps_pow": trial.suggest_int("n_steps_pow", MIN_N_STEPS_POW, _max_n_steps_pow(n_envs, n_timesteps)),
        "n_minibatches_pow": trial.suggest_int("n_minibatches_pow", 0, 4),
        "n_envs": trial.suggest_categorical("n_envs", [n_envs]),  # recorded so that --trial-id rebuilds batch_size
        "one_minus_gamma": trial.suggest_float("one_minus_gamma", 0.0001, 0.03, log=True),
        "one_minus_gae_lambda": trial.suggest_float("one_minus_gae_lambda", 0.0001, 0.1, log=True),
        "learning_rate": trial.suggest_float("learning_rate", 1e-5, 0.002, log=True),
        "ent_coef": trial.suggest_float("ent_coef", 0.00000001, 0.1, log=True),
        "clip_range": trial.suggest_categorical("clip_range", [0.1, 0.2, 0.3, 0.4]),
        "n_epochs": trial.suggest_categorical("n_epochs", [1, 3, 5, 10]),
        "max_grad_norm": trial.suggest_float("max_grad_norm", 0.3, 2.0),
        "net_arch": trial.suggest_categorical("net_arch", ["tiny", "small", "medium"]),
        "activation_fn": trial.suggest_categorical("activation_fn", ["tanh", "relu"]),
        # BLPO's own (authors' sweep: nested steps in {2, 3, 5, 7, 10}, IHVP bound in [0.8, 2.0], tuned hopper 0.13)
        "n_critic_steps": trial.suggest_categorical("n_critic_steps", [1, 2, 3, 5, 7, 10]),
        "critic_lr_ratio": trial.suggest_float("critic_lr_ratio", 0.5, 20.0, log=True),
    }
    if solver is not None:
        sampled["hypergrad_bound"] = trial.suggest_float("hypergrad_bound", 0.05, 2.0, log=True)
    if solver == "nystrom":
        sampled["nystrom_rank"] = trial.suggest_categorical("nystrom_rank", [2, 5, 10, 20])
        sampled["nystrom_rho"] = trial.suggest_float("nystrom_rho", 0.01, 100.0, log=True)

    hyperparams = convert_blpo_params(sampled)
    del hyperparams["n_envs"]  # the trial runs with the config's n_envs; it is recorded for --trial-id only
    for key in ("ihvp_kwargs", "policy_kwargs"):
        if key in hyperparams:
            hyperparams[key] = merge_kwargs(base.get(key), hyperparams[key])
    # Display the true values in the study, as rl-zoo3's samplers do.
    for key in ("gamma", "gae_lambda", "n_steps", "batch_size", "critic_learning_rate"):
        trial.set_user_attr(key, hyperparams[key])
    return hyperparams
