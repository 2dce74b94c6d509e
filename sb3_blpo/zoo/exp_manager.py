"""rl-zoo3's ``ExperimentManager`` with input checks, BLPO schedule keys, and worker tags on tuning trials.

Every override adds checks or context and then calls rl-zoo3's method, so training and tuning behave as in rl-zoo3.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import optuna
import rl_zoo3.exp_manager
from rl_zoo3.exp_manager import ExperimentManager
from rl_zoo3.hyperparams_opt import HYPERPARAMS_SAMPLER
from rl_zoo3.utils import ALGOS, SimpleLinearSchedule
from stable_baselines3.common.callbacks import BaseCallback

from sb3_blpo.blpo import BLPO
from sb3_blpo.zoo.configs import (
    check_algo_hyperparameters,
    check_callbacks,
    parse_linear_schedule,
    read_yaml_config,
    select_entry,
)
from sb3_blpo.zoo.errors import ZooInputError
from sb3_blpo.zoo.hyperparams_opt import merge_kwargs, sample_blpo_params
from sb3_blpo.zoo.storage import (
    HEARTBEAT_INTERVAL_S,
    WORKER_ATTR,
    WORKER_PIDNS_ATTR,
    is_journal_file,
    open_storage,
    worker_pid_namespace,
    worker_tag,
)

__all__ = ["BLPO_SCHEDULE_KEYS", "CheckedExperimentManager", "worker_tag"]

#: Schedule keys of BLPO that rl-zoo3 does not convert itself (it converts learning_rate, clip_range, ...).
BLPO_SCHEDULE_KEYS = ("critic_learning_rate",)


@contextlib.contextmanager
def _study_storage(url: str, storage: Any) -> Iterator[None]:
    """Make ``optuna.create_study(storage=url)`` (rl-zoo3's call) use the storage object ``storage`` instead."""
    original = optuna.create_study

    def create_study(*args: Any, **kwargs: Any) -> optuna.Study:
        if kwargs.get("storage") == url:
            kwargs["storage"] = storage
        return original(*args, **kwargs)

    optuna.create_study = create_study  # type: ignore[assignment]
    try:
        yield
    finally:
        optuna.create_study = original


class CheckedExperimentManager(ExperimentManager):
    """
    rl-zoo3's experiment manager with clear errors for bad configs and BLPO-specific preprocessing.

    * An env with no entry (and no ``default``) in a yaml config, a malformed entry, an unknown hyperparameter, a key
      that the command line sets (``seed``, ``device``...), a callback that does not import or a ``batch_size`` larger
      than BLPO's rollout raise :class:`~sb3_blpo.zoo.errors.ZooInputError` before anything is built.
    * ``critic_learning_rate: lin_<x>`` becomes a linear schedule, as rl-zoo3 does for ``learning_rate``.
    * Tuning uses :func:`~sb3_blpo.zoo.hyperparams_opt.sample_blpo_params` with the config entry and the trial budget
      bound (the trial's ``policy_kwargs`` are merged into the entry's, and ``--trial-id`` merges them the same way),
      and tags each trial with the ``worker`` that ran it (``host:pid``, and its PID namespace as
      ``worker_pidns``), so that a launcher can tell a dead worker's trials from a live one's.
    * On a database storage, a running trial records a heartbeat every :attr:`heartbeat_interval` seconds; a trial
      whose heartbeat stopped is failed as stale (see :func:`sb3_blpo.zoo.storage.open_storage`).

    The constructor is rl-zoo3's (see ``rl_zoo3.exp_manager.ExperimentManager``).
    """

    _config_entry: str | None = None
    #: The yaml entry's ``policy_kwargs`` as written (a string that rl-zoo3 evaluates, or a mapping); None: none.
    _entry_policy_kwargs: Any = None
    #: Seconds between the heartbeats of a running trial on a database storage (None: no heartbeat).
    heartbeat_interval: int | None = HEARTBEAT_INTERVAL_S

    @property
    def _source(self) -> str:
        entry = self._config_entry or self.env_name.gym_id
        return f"{self.config} [{entry}]"

    def read_hyperparameters(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """
        Check that a yaml config has an entry for the env, then read it as rl-zoo3 does.

        :return: the hyperparameters of the entry and the ones saved to ``config.yml``
        """
        if self.config.endswith((".yml", ".yaml")):
            config = read_yaml_config(self.config)
            self._config_entry = select_entry(config, self.env_name.gym_id, self.config, is_atari=self._is_atari)
            self._entry_policy_kwargs = config[self._config_entry].get("policy_kwargs")
        return super().read_hyperparameters()

    def load_trial(self, storage: str, study_name: str, trial_id: int | None = None, convert: bool = True) -> dict[str, Any]:
        """
        rl-zoo3's ``--trial-id`` loader; for BLPO the trial's ``policy_kwargs`` are merged into the entry's, as they were
        when the trial ran (rl-zoo3 would replace the entry's, dropping e.g. its ``log_std_init``).

        :param storage: the study's storage
        :param study_name: the study's name
        :param trial_id: the trial (None: the best)
        :param convert: convert the sampled parameters to hyperparameters
        :return: the trial's hyperparameters
        """
        hyperparams = super().load_trial(storage, study_name, trial_id, convert)
        if convert and issubclass(ALGOS[self.algo], BLPO) and "policy_kwargs" in hyperparams:
            entry = self._entry_policy_kwargs
            if isinstance(entry, str):  # evaluated as rl-zoo3 evaluates it (its module namespace: nn, ...)
                entry = eval(entry, dict(vars(rl_zoo3.exp_manager)))
            hyperparams["policy_kwargs"] = merge_kwargs(entry, hyperparams["policy_kwargs"])
        return hyperparams

    def _preprocess_hyperparams(
        self, hyperparams: dict[str, Any]
    ) -> tuple[dict[str, Any], Callable | None, list[BaseCallback], Callable | None]:
        """
        Check the entry and convert BLPO schedule strings, then preprocess as rl-zoo3 does; check what remains.

        :param hyperparams: the config entry (with the command line's overrides)
        :return: rl-zoo3's preprocessed hyperparameters, env wrapper, callbacks and VecEnv wrapper
        """
        if self.n_timesteps <= 0 and "n_timesteps" not in hyperparams:
            raise ZooInputError(f"{self._source}: n_timesteps is missing (set it in the config or pass -n N)")
        check_callbacks(hyperparams.get("callback"), self._source)
        for key in BLPO_SCHEDULE_KEYS:
            if isinstance(hyperparams.get(key), str):
                hyperparams[key] = SimpleLinearSchedule(parse_linear_schedule(key, hyperparams[key], self._source))
        processed, env_wrapper, callbacks, vec_env_wrapper = super()._preprocess_hyperparams(hyperparams)
        algo_class = ALGOS[self.algo]
        check_algo_hyperparameters(self.algo, algo_class, processed, self._source)
        if issubclass(algo_class, BLPO) and not self.optimize_hyperparameters:
            self._check_blpo_batch_size(processed)
        return processed, env_wrapper, callbacks, vec_env_wrapper

    def _check_blpo_batch_size(self, hyperparams: dict[str, Any]) -> None:
        n_steps = hyperparams.get("n_steps", 2048)
        batch_size = hyperparams.get("batch_size", 64)
        if isinstance(n_steps, int) and isinstance(batch_size, int) and batch_size > n_steps * self.n_envs:
            raise ZooInputError(
                f"{self._source}: batch_size {batch_size} exceeds the rollout size n_steps * n_envs = "
                f"{n_steps} * {self.n_envs} = {n_steps * self.n_envs}; BLPO needs batch_size <= the rollout size "
                "(PPO silently uses the whole rollout instead)"
            )

    def objective(self, trial: optuna.Trial) -> float:
        """
        rl-zoo3's objective; the trial records which worker ran it (user attributes ``worker`` and ``worker_pidns``).

        :param trial: the Optuna trial to run
        :return: the trial's last mean evaluation return
        """
        trial.set_user_attr(WORKER_ATTR, worker_tag())
        pidns = worker_pid_namespace()
        if pidns is not None:
            trial.set_user_attr(WORKER_PIDNS_ATTR, pidns)
        return super().objective(trial)

    def hyperparameters_optimization(self) -> None:
        """rl-zoo3's tuning loop, with BLPO's sampler bound to this config entry and trial budget, and heartbeats."""
        bound_sampler = functools.partial(sample_blpo_params, base_hyperparams=self._hyperparams, n_timesteps=self.n_timesteps)
        sampler = HYPERPARAMS_SAMPLER.get(self.algo)
        if sampler is sample_blpo_params:
            HYPERPARAMS_SAMPLER[self.algo] = bound_sampler
        storage, heartbeat = self.storage, self.heartbeat_interval
        try:
            with contextlib.ExitStack() as stack:
                if storage is not None and not is_journal_file(storage) and heartbeat is not None:
                    stack.enter_context(_study_storage(storage, open_storage(storage, heartbeat_interval=heartbeat)))
                super().hyperparameters_optimization()
        finally:
            if sampler is not None:
                HYPERPARAMS_SAMPLER[self.algo] = sampler
