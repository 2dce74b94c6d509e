"""BLPO: Bilevel Policy Optimization with Nyström hypergradients (arXiv:2505.11714), as an SB3 on-policy algorithm."""

from __future__ import annotations

import math
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.type_aliases import GymEnv, MaybeCallback, PyTorchObs, Schedule
from stable_baselines3.common.utils import FloatSchedule, explained_variance, obs_as_tensor, update_learning_rate
from stable_baselines3.common.vec_env import VecEnv

from sb3_blpo._validation import InvalidParameterError, check_float, check_int, check_one_of
from sb3_blpo.blpo.advantages import DifferentiableGAE, KernelWindow
from sb3_blpo.blpo.coupling import COUPLING_MODES, CouplingMode, coupled_critic_loss
from sb3_blpo.blpo.policies import BLPOCnnPolicy, BLPOMultiInputPolicy, BLPOPolicy, CnnPolicy, MlpPolicy, MultiInputPolicy
from sb3_blpo.hypergrad import (
    IHVPSolver,
    NystromSolver,
    bound_correction,
    flatten,
    implicit_hypergradient,
    make_solver,
    unflatten_like,
)
from sb3_blpo.hypergrad.solvers import SOLVERS

SelfBLPO = TypeVar("SelfBLPO", bound="BLPO")

#: An extra training-loss term: ``term(level, observations)`` with ``level`` "actor" or "critic" returns a scalar to add
#: to that level's minibatch loss (or ``None``). Registered with :meth:`BLPO.add_loss_term`.
LossTerm = Callable[[str, PyTorchObs], "th.Tensor | None"]
LOSS_LEVELS: tuple[str, ...] = ("actor", "critic")


def _select(observations: PyTorchObs, index: th.Tensor) -> PyTorchObs:
    if isinstance(observations, dict):
        return {key: value[index] for key, value in observations.items()}
    return observations[index]


def _concatenate(parts: list[PyTorchObs], obs_shape: Any) -> PyTorchObs:
    """Stack observation batches, each reshaped to the buffer's observation shape (Discrete observations come as
    ``(n,)`` from the env but ``(n, 1)`` from the buffer)."""
    if isinstance(parts[0], dict):
        return {
            key: th.cat([part[key].reshape(-1, *obs_shape[key]) for part in parts])  # type: ignore[index]
            for key in parts[0]
        }
    return th.cat([part.reshape(-1, *obs_shape) for part in parts])  # type: ignore[union-attr]


@dataclass
class _Minibatch:
    """Rollout entries ``index`` (env-major flat), with their env/step coordinates and episode window."""

    index: th.Tensor
    observations: PyTorchObs
    actions: th.Tensor
    old_log_prob: th.Tensor
    targets: th.Tensor
    window: KernelWindow

    def __len__(self) -> int:
        return len(self.index)


@dataclass
class _Rollout:
    """One rollout, flattened env-major (index ``n * n_steps + t``), as torch tensors on the policy's device.

    ``value_inputs`` stacks every observation the advantages need a value for (the rollout's, the one after its
    last step per env, and the terminal observations of truncated steps) so that one critic pass serves them all.
    """

    observations: PyTorchObs
    actions: th.Tensor
    old_log_prob: th.Tensor
    targets: th.Tensor
    advantages: th.Tensor  # (n_envs, n_steps), fixed GAE of the rollout critic
    value_inputs: PyTorchObs
    old_terminal_values: th.Tensor | None
    gae: DifferentiableGAE
    n_envs: int
    n_steps: int

    @property
    def size(self) -> int:
        return self.n_envs * self.n_steps

    def minibatch(self, index: th.Tensor) -> _Minibatch:
        return _Minibatch(
            index=index,
            observations=_select(self.observations, index),
            actions=self.actions[index],
            old_log_prob=self.old_log_prob[index],
            targets=self.targets[index],
            window=self.gae.kernel.window(index // self.n_steps, index % self.n_steps),
        )

    def minibatches(self, batch_size: int) -> Iterator[_Minibatch]:
        # numpy's global RNG, as SB3's RolloutBuffer.get(), so seeding behaves the same as for PPO.
        order = th.as_tensor(np.random.permutation(self.size), device=self.actions.device)
        for start in range(0, self.size, batch_size):
            yield self.minibatch(order[start : start + batch_size])

    def split_values(self, values: th.Tensor) -> tuple[th.Tensor, th.Tensor, th.Tensor | None]:
        """Critic outputs on ``value_inputs`` → rollout values ``(n_envs, n_steps)``, last values, terminal values."""
        values = values.flatten()
        rollout_values = values[: self.size].view(self.n_envs, self.n_steps)
        last_values = values[self.size : self.size + self.n_envs]
        terminal_values = values[self.size + self.n_envs :] if self.old_terminal_values is not None else None
        return rollout_values, last_values, terminal_values


class BLPO(OnPolicyAlgorithm):
    """
    Bilevel Policy Optimization (BLPO) with Nyström hypergradients.

    Actor-critic as a Stackelberg game: the actor (leader, θ) minimises the PPO clipped surrogate ``f(θ, w)`` whose
    advantages are a differentiable function of the critic; the critic (follower, w) best-responds by minimising its
    regression loss ``g``. Per minibatch, BLPO runs ``n_critic_steps`` critic steps toward the best response, then one
    actor step along the hypergradient

        ∇θf − ∂²g̃/∂θ∂w · (∇²ww g̃)⁻¹ ∇w f,

    where the inverse-Hessian-vector product is computed by ``ihvp_solver`` (Nyström by default) and the correction is
    bounded by ``hypergrad_bound · ‖∇θf‖``. ``g̃`` is the critic objective written as an explicit function of the actor
    (see :mod:`sb3_blpo.blpo.coupling` and ``docs/blpo.md``).

    Paper: https://arxiv.org/abs/2505.11714 (Prakash, He, Goktas, Greenwald, 2025).

    :param policy: The policy model to use (MlpPolicy, CnnPolicy, MultiInputPolicy, or a BLPO policy class)
    :param env: The environment to learn from (if registered in Gym, can be str)
    :param learning_rate: The actor's learning rate, a constant or a function of the remaining progress (from 1 to 0)
    :param critic_learning_rate: The critic's learning rate, a constant or a schedule
    :param n_steps: The number of steps to run for each environment per update
    :param batch_size: Minibatch size
    :param n_epochs: Number of epochs over the rollout per update
    :param n_critic_steps: Nested critic (follower) steps before each actor step, on the minibatch
    :param gamma: Discount factor
    :param gae_lambda: Factor for trade-off of bias vs variance for Generalized Advantage Estimator
    :param clip_range: PPO clipping parameter of the actor loss, a constant or a schedule
    :param normalize_advantage: Whether to normalize the advantages within each minibatch (differentiably)
    :param ent_coef: Entropy coefficient of the actor loss
    :param max_grad_norm: Maximum gradient norm, applied to the actor direction and to each critic step separately
    :param use_sde: Whether to use generalized State Dependent Exploration (gSDE)
    :param sde_sample_freq: Sample a new noise matrix every n steps when using gSDE (-1: only at rollout start)
    :param rollout_buffer_class: Rollout buffer class to use. If ``None``, it will be automatically selected.
    :param rollout_buffer_kwargs: Keyword arguments to pass to the rollout buffer on creation
    :param target_kl: Stop the epochs early when the approximate KL of a minibatch exceeds ``1.5 * target_kl``
    :param ihvp_solver: Inverse-HVP solver: ``"nystrom"`` (default), ``"cg"``, ``"neumann"``, ``"dense"``, or ``None`` for
        the nested-only ablation (plain ∇θf after the nested critic steps)
    :param ihvp_kwargs: Solver settings, e.g. ``dict(rank=5, rho=1.0)`` for Nyström (see :mod:`sb3_blpo.hypergrad`)
    :param hypergrad_bound: The correction is rescaled so that ``‖u‖ ≤ hypergrad_bound · ‖∇θf‖`` (``math.inf``: none)
    :param coupling: Which actor dependence of the critic objective gives the mixed term: ``"distribution"`` (how the
        visited states move with the policy; default), ``"target"`` (how the critic's targets move with it) or ``"both"``.
        With ``"target"`` the correction nearly cancels ∇θf and the agent fails to learn on most benchmarks
        (docs/benchmarks.md)
    :param coupling_clip: Ratios in the coupled critic objective are clamped to ``[1 − c, 1 + c]``
    :param stats_window_size: Window size for the rollout logging (number of episodes to average)
    :param tensorboard_log: The log location for tensorboard (if None, no logging)
    :param policy_kwargs: Additional arguments to be passed to the policy on creation
    :param verbose: Verbosity level: 0 for no output, 1 for info messages, 2 for debug messages
    :param seed: Seed for the pseudo random generators (also seeds the Nyström column sampling)
    :param device: Device (cpu, cuda, ...) on which the code should be run
    :param _init_setup_model: Whether or not to build the network at the creation of the instance
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {
        "MlpPolicy": MlpPolicy,
        "CnnPolicy": CnnPolicy,
        "MultiInputPolicy": MultiInputPolicy,
    }
    policy: BLPOPolicy | BLPOCnnPolicy | BLPOMultiInputPolicy

    def __init__(
        self,
        policy: str | type[BLPOPolicy],
        env: GymEnv | str,
        learning_rate: float | Schedule = 3e-4,
        critic_learning_rate: float | Schedule = 1e-3,
        n_steps: int = 2048,
        batch_size: int = 64,
        n_epochs: int = 10,
        n_critic_steps: int = 3,
        gamma: float = 0.99,
        gae_lambda: float = 0.95,
        clip_range: float | Schedule = 0.2,
        normalize_advantage: bool = True,
        ent_coef: float = 0.0,
        max_grad_norm: float = 0.5,
        use_sde: bool = False,
        sde_sample_freq: int = -1,
        rollout_buffer_class: type[RolloutBuffer] | None = None,
        rollout_buffer_kwargs: dict[str, Any] | None = None,
        target_kl: float | None = None,
        ihvp_solver: str | IHVPSolver | None = "nystrom",
        ihvp_kwargs: dict[str, Any] | None = None,
        hypergrad_bound: float = 1.0,
        coupling: CouplingMode = "distribution",
        coupling_clip: float = 0.2,
        stats_window_size: int = 100,
        tensorboard_log: str | None = None,
        policy_kwargs: dict[str, Any] | None = None,
        verbose: int = 0,
        seed: int | None = None,
        device: th.device | str = "auto",
        _init_setup_model: bool = True,
    ):
        super().__init__(
            policy,
            env,
            learning_rate=learning_rate,
            n_steps=n_steps,
            gamma=gamma,
            gae_lambda=gae_lambda,
            ent_coef=ent_coef,
            vf_coef=0.0,  # the critic has its own loss and optimizer
            max_grad_norm=max_grad_norm,
            use_sde=use_sde,
            sde_sample_freq=sde_sample_freq,
            rollout_buffer_class=rollout_buffer_class,
            rollout_buffer_kwargs=rollout_buffer_kwargs,
            stats_window_size=stats_window_size,
            tensorboard_log=tensorboard_log,
            policy_kwargs=policy_kwargs,
            verbose=verbose,
            device=device,
            seed=seed,
            _init_setup_model=False,
            supported_action_spaces=(spaces.Box, spaces.Discrete, spaces.MultiDiscrete, spaces.MultiBinary),
        )
        self.critic_learning_rate = critic_learning_rate
        self.batch_size = batch_size
        self.n_epochs = n_epochs
        self.n_critic_steps = n_critic_steps
        self.clip_range = clip_range
        self.normalize_advantage = normalize_advantage
        self.target_kl = target_kl
        self.ihvp_solver = ihvp_solver
        self.ihvp_kwargs = dict(ihvp_kwargs or {})
        self.hypergrad_bound = hypergrad_bound
        self.coupling = coupling
        self.coupling_clip = coupling_clip
        self._check_hyperparameters()
        if _init_setup_model:
            self._setup_model()

    def _check_hyperparameters(self) -> None:
        check_int("n_steps", self.n_steps, minimum=1)
        check_int("batch_size", self.batch_size, minimum=2 if self.normalize_advantage else 1)
        check_int("n_epochs", self.n_epochs, minimum=1)
        check_int("n_critic_steps", self.n_critic_steps, minimum=1)
        check_float("gamma", self.gamma, minimum=0.0, maximum=1.0, allow_minimum=False)
        check_float("gae_lambda", self.gae_lambda, minimum=0.0, maximum=1.0)
        check_float("ent_coef", self.ent_coef)
        check_float("max_grad_norm", self.max_grad_norm, minimum=0.0, allow_minimum=False, allow_inf=True)
        check_float("hypergrad_bound", self.hypergrad_bound, minimum=0.0, allow_inf=True)
        check_float("coupling_clip", self.coupling_clip, minimum=0.0, allow_minimum=False)
        check_one_of("coupling", self.coupling, COUPLING_MODES)
        for name in ("learning_rate", "critic_learning_rate", "clip_range"):
            value = getattr(self, name)
            if not callable(value):
                check_float(name, value, minimum=0.0, allow_minimum=False)
        if self.target_kl is not None:
            check_float("target_kl", self.target_kl, minimum=0.0, allow_minimum=False)
        if self.ihvp_solver is not None and not isinstance(self.ihvp_solver, (str, IHVPSolver)):
            raise InvalidParameterError(
                f"ihvp_solver must be one of {sorted(SOLVERS)}, None, or an IHVPSolver instance, got {self.ihvp_solver!r}"
            )
        # Build once now so that an unknown solver name or setting fails at construction.
        try:
            make_solver(self.ihvp_solver, **self.ihvp_kwargs)
        except (ValueError, TypeError) as error:
            raise InvalidParameterError(
                f"ihvp_solver={self.ihvp_solver!r}, ihvp_kwargs={self.ihvp_kwargs}: {error}"
            ) from error
        if self.env is not None:
            buffer_size = self.env.num_envs * self.n_steps
            if self.batch_size > buffer_size:
                raise ValueError(
                    f"batch_size ({self.batch_size}) must not exceed the rollout size n_steps * n_envs "
                    f"({self.n_steps} * {self.env.num_envs} = {buffer_size})"
                )
            if buffer_size % self.batch_size > 0:
                warnings.warn(
                    f"The rollout size n_steps * n_envs = {buffer_size} is not a multiple of batch_size = "
                    f"{self.batch_size}: every epoch ends with a truncated minibatch of {buffer_size % self.batch_size}."
                )

    def _setup_model(self) -> None:
        self.policy_kwargs.setdefault("share_features_extractor", False)
        super()._setup_model()
        self.clip_range = FloatSchedule(self.clip_range)
        self.critic_learning_rate = FloatSchedule(self.critic_learning_rate)
        update_learning_rate(self.policy.critic_optimizer, self.critic_learning_rate(1.0))
        # The partition is fixed once the policy exists (loading copies values into the same tensors).
        self._actor_params = self.policy.actor_parameters()
        self._critic_params = self.policy.critic_parameters()
        self._solver = make_solver(self.ihvp_solver, **self.ihvp_kwargs)
        if isinstance(self._solver, NystromSolver):
            self._solver.validate_dim(sum(p.numel() for p in self._critic_params))
            if self._solver.seed is None and self.seed is not None:
                # Column sampling follows the model's seed unless the solver was given its own.
                self._solver.reseed(self.seed)
        self._truncated_steps: list[tuple[int, int, Any]] = []
        self._warned_nonfinite = False
        self._nonfinite_skips = 0
        self._loss_terms: list[LossTerm] = []

    def _excluded_save_params(self) -> list[str]:
        return [
            *super()._excluded_save_params(),
            "_solver",
            "_truncated_steps",
            "_loss_terms",
            "_actor_params",
            "_critic_params",
        ]

    def add_loss_term(self, term: LossTerm) -> None:
        """Add ``term(level, observations)`` to the training losses: the actor's ``f`` (level ``"actor"``) and each nested
        critic step's loss (level ``"critic"``), on every minibatch. This is how plasticity regularizers reach BLPO's
        losses; terms are not saved with the model."""
        if not callable(term):
            raise TypeError(f"term must be callable as term(level, observations), got {term!r}")
        self._loss_terms.append(term)

    def remove_loss_term(self, term: LossTerm) -> None:
        """Remove a term added with :meth:`add_loss_term`."""
        self._loss_terms.remove(term)

    def _extra_loss(self, level: str, observations: PyTorchObs) -> th.Tensor | float:
        total: th.Tensor | float = 0.0
        for term in self._loss_terms:
            value = term(level, observations)
            if value is not None:
                total = total + value
        return total

    def _get_torch_save_params(self) -> tuple[list[str], list[str]]:
        return ["policy", "policy.optimizer", "policy.critic_optimizer"], []

    # ------------------------------------------------------------------ rollout collection
    def collect_rollouts(
        self, env: VecEnv, callback: BaseCallback, rollout_buffer: RolloutBuffer, n_rollout_steps: int
    ) -> bool:
        self._truncated_steps = []
        return super().collect_rollouts(env, callback, rollout_buffer, n_rollout_steps)

    def _update_info_buffer(self, infos: list[dict[str, Any]], dones: np.ndarray | None = None) -> None:
        # Called by collect_rollouts right before a step is added to the buffer: remember truncated steps so that
        # their timeout bootstrap (added to the reward by SB3) can be made differentiable in the critic.
        super()._update_info_buffer(infos, dones)
        if dones is None:
            return
        for env_index, done in enumerate(dones):
            info = infos[env_index]
            if done and info.get("terminal_observation") is not None and info.get("TimeLimit.truncated", False):
                self._truncated_steps.append((env_index, self.rollout_buffer.pos, info["terminal_observation"]))

    # ------------------------------------------------------------------ training
    def train(self) -> None:
        """Update the critic (nested best response) and the actor (hypergradient) on the collected rollout."""
        update_started = time.perf_counter()
        self.policy.set_training_mode(True)
        self._nonfinite_skips = 0
        clip_range = self._update_schedules()
        rollout = self._rollout_tensors()
        stats: dict[str, list[float]] = defaultdict(list)
        continue_training = True
        for epoch in range(self.n_epochs):
            for batch in rollout.minibatches(self.batch_size):
                if self.use_sde:
                    self.policy.reset_noise(len(batch))
                nested_started = time.perf_counter()
                stats["value_loss_before_nested"].append(self._nested_critic_steps(batch))
                stats["seconds_nested_critic"].append(time.perf_counter() - nested_started)
                actor_loss, approx_kl = self._actor_objective(rollout, batch, clip_range, stats)
                if self.target_kl is not None and approx_kl > 1.5 * self.target_kl:
                    continue_training = False
                    if self.verbose >= 1:
                        print(f"Early stopping at step {epoch} due to reaching max kl: {approx_kl:.2f}")
                    break
                direction = self._actor_direction(rollout, batch, actor_loss, stats)
                self._actor_step(direction)
            self._n_updates += 1
            if not continue_training:
                break
        stats["seconds_update"].append(time.perf_counter() - update_started)
        self._record_train_stats(stats, clip_range)

    def _update_schedules(self) -> float:
        self._update_learning_rate(self.policy.optimizer)
        critic_lr = self.critic_learning_rate(self._current_progress_remaining)  # type: ignore[operator]
        update_learning_rate(self.policy.critic_optimizer, critic_lr)
        self.logger.record("train/critic_learning_rate", critic_lr)
        return self.clip_range(self._current_progress_remaining)  # type: ignore[operator]

    def _rollout_tensors(self) -> _Rollout:
        """The finished rollout, env-major, with the GAE map and the truncated steps' terminal observations."""
        buffer = self.rollout_buffer
        n_steps, n_envs = buffer.buffer_size, buffer.n_envs

        def env_major(array: np.ndarray) -> th.Tensor:
            return th.as_tensor(array.swapaxes(0, 1).reshape(n_steps * n_envs, *array.shape[2:]), device=self.device)

        def per_env(array: np.ndarray) -> th.Tensor:
            return th.as_tensor(array.swapaxes(0, 1).reshape(n_envs, n_steps), dtype=th.float32, device=self.device)

        if isinstance(buffer.observations, dict):
            observations: PyTorchObs = {key: env_major(value) for key, value in buffer.observations.items()}
        else:
            observations = env_major(buffer.observations)
        # SB3 stores actions in the action space's dtype (int8 for MultiBinary) and casts to float32 when sampling.
        actions = env_major(buffer.actions.astype(np.float32, copy=False))
        if isinstance(self.action_space, spaces.Discrete):
            actions = actions.long().flatten()
        terminal_observations, old_terminal_values, truncation_index = None, None, None
        if self._truncated_steps:
            truncation_index = th.as_tensor([(env, step) for env, step, _ in self._truncated_steps], device=self.device)
            terminal_observations = self._stack_observations([obs for _, _, obs in self._truncated_steps])
            with th.no_grad():
                old_terminal_values = self.policy.predict_values(terminal_observations).flatten()
        last_dones = th.as_tensor(np.asarray(self._last_episode_starts, dtype=np.float32), device=self.device)
        gae = DifferentiableGAE(
            per_env(buffer.rewards), per_env(buffer.episode_starts), last_dones, self.gamma, self.gae_lambda, truncation_index
        )
        value_inputs = [observations, obs_as_tensor(self._last_obs, self.device)]  # type: ignore[arg-type]
        if terminal_observations is not None:
            value_inputs.append(terminal_observations)
        return _Rollout(
            observations=observations,
            actions=actions,
            old_log_prob=env_major(buffer.log_probs).flatten(),
            targets=env_major(buffer.returns).flatten(),
            advantages=per_env(buffer.advantages),
            value_inputs=_concatenate(value_inputs, buffer.obs_shape),
            old_terminal_values=old_terminal_values,
            gae=gae,
            n_envs=n_envs,
            n_steps=n_steps,
        )

    def _stack_observations(self, observations: list[Any]) -> PyTorchObs:
        if isinstance(observations[0], dict):
            stacked: Any = {key: np.stack([obs[key] for obs in observations]) for key in observations[0]}
        else:
            stacked = np.stack(observations)
        return self.policy.obs_to_tensor(stacked)[0]

    def _critic_loss(self, batch: _Minibatch) -> th.Tensor:
        values = self.policy.predict_values(batch.observations).flatten()
        return th.mean((batch.targets - values) ** 2)

    def _nested_critic_steps(self, batch: _Minibatch) -> float:
        """``n_critic_steps`` follower steps on the MSE to the fixed targets; returns the loss before the first."""
        loss_before = math.nan
        critic_params = self._critic_params
        for step in range(self.n_critic_steps):
            value_loss = self._critic_loss(batch)
            if step == 0:
                loss_before = value_loss.item()
            loss = value_loss + self._extra_loss("critic", batch.observations)
            self.policy.critic_optimizer.zero_grad()
            loss.backward()
            # The total norm is NaN/Inf as soon as one gradient entry is: one check covers every parameter.
            if not th.isfinite(th.nn.utils.clip_grad_norm_(critic_params, self.max_grad_norm)):
                self._note_nonfinite("critic gradient")
                self.policy.critic_optimizer.zero_grad()
                break
            self.policy.critic_optimizer.step()
        return loss_before

    def _differentiable_advantages(
        self, rollout: _Rollout, batch: _Minibatch, track_critic: bool
    ) -> tuple[th.Tensor, th.Tensor]:
        """GAE advantages of the minibatch from the current critic (with ``track_critic`` they carry ``∂/∂w``), and
        the critic's values of the minibatch (detached)."""
        with th.set_grad_enabled(track_critic):
            values, last_values, terminal_values = rollout.split_values(self.policy.predict_values(rollout.value_inputs))
            td_errors = rollout.gae.td_errors(values, last_values, terminal_values, rollout.old_terminal_values)
            advantages = rollout.gae.minibatch(td_errors, batch.window)
        return advantages, values.flatten()[batch.index].detach()

    def _actor_objective(
        self, rollout: _Rollout, batch: _Minibatch, clip_range: float, stats: dict[str, list[float]]
    ) -> tuple[th.Tensor, float]:
        """Leader loss ``f(θ, w)`` on the minibatch (PPO clipped surrogate + entropy) and the approximate KL."""
        advantages, critic_values = self._differentiable_advantages(rollout, batch, track_critic=self._solver is not None)
        stats["value_loss"].append(float(th.mean((critic_values - batch.targets) ** 2)))
        if self.normalize_advantage and len(batch) > 1:
            # Statistics as constants: normalisation then rescales f without cancelling its dependence on the critic
            # (through the mean, ∇w f would vanish identically at θ = θ_old, where f = −mean(Â_norm) = 0).
            mean, std = advantages.detach().mean(), advantages.detach().std()
            advantages = (advantages - mean) / (std + 1e-8)
        log_prob, entropy = self.policy.actor_log_prob_entropy(batch.observations, batch.actions)
        log_ratio = log_prob - batch.old_log_prob
        ratio = th.exp(log_ratio)
        policy_loss = -th.min(advantages * ratio, advantages * th.clamp(ratio, 1 - clip_range, 1 + clip_range)).mean()
        entropy_loss = -th.mean(-log_prob) if entropy is None else -th.mean(entropy)
        loss = policy_loss + self.ent_coef * entropy_loss + self._extra_loss("actor", batch.observations)
        with th.no_grad():
            approx_kl = float(th.mean((ratio - 1) - log_ratio))
            stats["clip_fraction"].append(float(th.mean((th.abs(ratio - 1) > clip_range).float())))
        stats["policy_gradient_loss"].append(policy_loss.item())
        stats["entropy_loss"].append(entropy_loss.item())
        stats["loss"].append(loss.item())
        stats["approx_kl"].append(approx_kl)
        return loss, approx_kl

    def _coupled_critic_objective(self, rollout: _Rollout, batch: _Minibatch) -> th.Tensor:
        """``g̃(θ, w)``: the critic MSE with the actor's influence on targets/state weights made explicit."""
        all_log_prob, _ = self.policy.actor_log_prob_entropy(rollout.observations, rollout.actions)
        ratios = th.exp(all_log_prob - rollout.old_log_prob).view(rollout.n_envs, rollout.n_steps)
        values = self.policy.predict_values(batch.observations).flatten()
        return coupled_critic_loss(
            values,
            batch.targets,
            ratios,
            rollout.advantages,
            batch.window,
            gamma=self.gamma,
            mode=self.coupling,
            ratio_clip=self.coupling_clip,
        )

    def _actor_direction(
        self, rollout: _Rollout, batch: _Minibatch, actor_loss: th.Tensor, stats: dict[str, list[float]]
    ) -> th.Tensor | None:
        """The leader's descent direction: the bounded hypergradient, or ``∇θf`` (nested-only / numerical fallback).
        ``None`` when even ``∇θf`` is not finite (the actor step is then skipped)."""
        actor_params = self._actor_params
        if self._solver is None:
            direct = flatten(th.autograd.grad(actor_loss, actor_params, allow_unused=True), like=actor_params)
            if not self._finite(direct, "actor gradient"):
                return None
            stats["hypergrad_norm"].append(float(direct.norm()))
            return direct
        started = time.perf_counter()
        hypergradient = implicit_hypergradient(
            actor_loss,
            self._coupled_critic_objective(rollout, batch),
            actor_params,
            self._critic_params,
            self._solver,
        )
        direct, correction = hypergradient.direct, hypergradient.correction
        stats["seconds_hypergradient"].append(time.perf_counter() - started)
        stats["seconds_ihvp"].append(hypergradient.seconds["ihvp"])
        stats["seconds_mixed_term"].append(hypergradient.seconds["mixed"])
        if not self._finite(direct, "actor gradient"):
            return None
        if not (th.isfinite(correction).all() and th.isfinite(hypergradient.ihvp.x).all()):
            self._note_nonfinite("hypergradient correction")
            stats["ihvp_fallbacks"].append(1.0)
            return direct
        bounded, was_bounded = bound_correction(direct, correction, self.hypergrad_bound)
        stats["ihvp_fallbacks"].append(0.0)
        stats["ihvp_unconverged"].append(0.0 if hypergradient.ihvp.converged else 1.0)
        stats["ihvp_correction_norm"].append(float(correction.norm()))
        stats["correction_cosine"].append(float(th.nn.functional.cosine_similarity(correction, direct, dim=0, eps=1e-12)))
        stats["correction_bounded_fraction"].append(float(was_bounded))
        stats["hypergrad_norm"].append(float((direct - bounded).norm()))
        return direct - bounded

    def _actor_step(self, direction: th.Tensor | None) -> None:
        if direction is None:
            return
        actor_params = self._actor_params
        self.policy.optimizer.zero_grad()
        for param, grad in zip(actor_params, unflatten_like(direction, actor_params), strict=True):
            param.grad = grad.detach().clone()
        th.nn.utils.clip_grad_norm_(actor_params, self.max_grad_norm)
        self.policy.optimizer.step()

    def _finite(self, vector: th.Tensor, what: str) -> bool:
        if th.isfinite(vector).all():
            return True
        self._note_nonfinite(what)
        return False

    def _note_nonfinite(self, what: str) -> None:
        self._nonfinite_skips += 1
        if not self._warned_nonfinite:
            self._warned_nonfinite = True
            warnings.warn(
                f"BLPO: non-finite {what}; the affected step was skipped or fell back to the plain actor gradient "
                "(parameters are unchanged by it). Counts are logged as train/ihvp_fallbacks and train/nonfinite_skips.",
                RuntimeWarning,
            )

    def _record_train_stats(self, stats: dict[str, list[float]], clip_range: float) -> None:
        explained_var = explained_variance(self.rollout_buffer.values.flatten(), self.rollout_buffer.returns.flatten())
        for key in (
            "entropy_loss",
            "policy_gradient_loss",
            "value_loss",
            "value_loss_before_nested",
            "approx_kl",
            "clip_fraction",
            "hypergrad_norm",
            "ihvp_correction_norm",
            "correction_cosine",
            "correction_bounded_fraction",
            "ihvp_unconverged",
        ):
            if stats[key]:
                self.logger.record(f"train/{key}", float(np.mean(stats[key])))
        if self._solver is not None:
            self.logger.record("train/ihvp_fallbacks", float(np.sum(stats["ihvp_fallbacks"])))
            for key in ("seconds_hypergradient", "seconds_ihvp", "seconds_mixed_term"):
                self.logger.record(f"train/{key}", float(np.sum(stats[key])))
        for key in ("seconds_update", "seconds_nested_critic"):
            self.logger.record(f"train/{key}", float(np.sum(stats[key])))
        self.logger.record("train/nonfinite_skips", float(self._nonfinite_skips))
        self.logger.record("train/loss", stats["loss"][-1] if stats["loss"] else math.nan)
        self.logger.record("train/explained_variance", float(explained_var))
        if hasattr(self.policy, "log_std"):
            self.logger.record("train/std", th.exp(self.policy.log_std).mean().item())
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        self.logger.record("train/clip_range", clip_range)

    def learn(
        self: SelfBLPO,
        total_timesteps: int,
        callback: MaybeCallback = None,
        log_interval: int = 1,
        tb_log_name: str = "BLPO",
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> SelfBLPO:
        return super().learn(
            total_timesteps=total_timesteps,
            callback=callback,
            log_interval=log_interval,
            tb_log_name=tb_log_name,
            reset_num_timesteps=reset_num_timesteps,
            progress_bar=progress_bar,
        )
