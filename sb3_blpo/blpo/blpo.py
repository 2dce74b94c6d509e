"""BLPO: Bilevel Policy Optimization with Nyström hypergradients (arXiv:2505.11714), as an SB3 on-policy algorithm."""

from __future__ import annotations

import time
import warnings
from typing import Any, ClassVar, TypeVar

import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.type_aliases import GymEnv, MaybeCallback, Schedule
from stable_baselines3.common.utils import FloatSchedule, explained_variance, update_learning_rate

from sb3_blpo._validation import InvalidParameterError, check_float, check_int, check_one_of
from sb3_blpo.blpo.coupling import (
    AUTHORS_F2,
    COUPLING_MODES,
    CouplingMode,
    weighted_squared_error,
)
from sb3_blpo.blpo.follower import Follower
from sb3_blpo.blpo.objectives import LEADER_OBJECTIVES, LeaderObjective, leader_loss
from sb3_blpo.blpo.policies import (
    BilevelSplit,
    BLPOCnnPolicy,
    BLPOMultiInputPolicy,
    BLPOPolicy,
    CnnPolicy,
    MlpPolicy,
    MultiInputPolicy,
)
from sb3_blpo.blpo.recipes import authors_recipe
from sb3_blpo.blpo.rollout import BilevelRollout, Minibatch, TruncatedStep, TruncatedStepRecorder, bilevel_rollout
from sb3_blpo.common.loss_terms import LossTerm, LossTermHost
from sb3_blpo.common.rollout import RolloutReader
from sb3_blpo.common.surrogate import entropy_loss, normalize_advantages
from sb3_blpo.common.update_stats import NonFiniteGuard, PhaseTimer, UpdateStats
from sb3_blpo.hypergrad import (
    IHVPSolver,
    NystromSolver,
    bound_correction,
    flat_grad,
    implicit_hypergradient,
    make_solver,
    unflatten_like,
)
from sb3_blpo.hypergrad.solvers import SOLVERS

SelfBLPO = TypeVar("SelfBLPO", bound="BLPO")

#: Summed over the update's minibatches when logged (counters and seconds); every other statistic is averaged.
SUMMED_STATS: tuple[str, ...] = (
    "ihvp_fallbacks",
    "ihvp_clamped_cores",
    "seconds_update",
    "seconds_nested_critic",
    "seconds_hypergradient",
    "seconds_ihvp",
    "seconds_mixed_term",
)
#: Accepted ``coupling`` values: the coupled critic objective's modes and the authors' f2 surrogate.
BLPO_COUPLINGS: tuple[str, ...] = (*COUPLING_MODES, AUTHORS_F2)
#: Accepted ``ihvp_kwargs["curvature"]`` values: the matrix the IHVP inverts.
CURVATURES: tuple[str, ...] = ("gauss_newton", "hessian")
#: Accepted ``actor_advantages`` values.
ACTOR_ADVANTAGES: tuple[str, ...] = ("recomputed", "rollout")
#: Accepted ``follower_objective`` values: what the nested critic steps minimise.
FOLLOWER_OBJECTIVES: tuple[str, ...] = ("coupled", "mse")
ACCEPTED_VALUES: dict[str, tuple[str, ...]] = {
    "coupling": BLPO_COUPLINGS,
    "leader_objective": LEADER_OBJECTIVES,
    "actor_advantages": ACTOR_ADVANTAGES,
    "follower_objective": FOLLOWER_OBJECTIVES,
}


class BLPO(LossTermHost, TruncatedStepRecorder, OnPolicyAlgorithm):
    """
    Bilevel Policy Optimization (BLPO) with Nyström hypergradients.

    Actor-critic as a Stackelberg game: the actor (leader, θ) minimises a PPO-style objective ``f(θ, w)`` whose
    advantages are a differentiable function of the critic; the critic (follower, w) best-responds by minimising its
    regression loss ``g̃(θ, ·)``, written as an explicit function of the actor (:mod:`sb3_blpo.blpo.coupling`). Per
    minibatch, BLPO runs ``n_critic_steps`` critic steps toward the best response (``follower_objective``), then one
    actor step along the hypergradient

        ∇θf − ∂²g̃/∂θ∂w · C⁻¹ ∇w f,

    where ``C`` is the follower's curvature (its positive semi-definite Gauss–Newton matrix by default), the inverse
    product is computed by ``ihvp_solver`` (Nyström by default) and the correction is bounded by
    ``hypergrad_bound · ‖∇θf‖``. The default leader objective is the improvement form ``f + mean Â(w)``, whose bilevel
    objective is ``(1 − γ)(J(π_old) − J(π_θ))`` (see :mod:`sb3_blpo.blpo.objectives` and ``docs/blpo.md``).
    :meth:`authors_recipe` gives the settings of the authors' code instead.

    Paper: https://arxiv.org/abs/2505.11714 (Prakash, He, Goktas, Greenwald, 2025).

    :param policy: The policy model to use (MlpPolicy, CnnPolicy, MultiInputPolicy, or a BLPO policy class)
    :param env: The environment to learn from (if registered in Gym, can be str)
    :param learning_rate: The actor's learning rate, a constant or a function of the remaining progress (from 1 to 0)
    :param critic_learning_rate: The critic's learning rate, a constant or a schedule
    :param n_steps: The number of steps to run for each environment per update
    :param batch_size: Minibatch size (512, not PPO's 64: a BLPO minibatch costs several backward passes, so BLPO
        is run with fewer, larger minibatches; a provisional default, see ``docs/blpo.md``)
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
    :param ihvp_kwargs: Solver settings, e.g. ``dict(rank=5, rho=1.0)`` for Nyström (see :mod:`sb3_blpo.hypergrad`),
        plus ``curvature``: the matrix the solver inverts, ``"gauss_newton"`` (default; the positive semi-definite
        Gauss–Newton part of the follower's Hessian, about one Hessian-vector product each) or ``"hessian"``
    :param hypergrad_bound: The correction is rescaled so that ``‖u‖ ≤ hypergrad_bound · ‖∇θf‖`` (``math.inf``: none)
    :param leader_objective: ``"improvement"`` (default): ``f + mean Â(w)``, whose bilevel objective is the exact
        policy improvement; ``"surrogate"``: the plain PPO surrogate of the paper and the authors' code, whose bilevel
        objective is identically zero with a best-responding critic (its hypergradient reverses the policy gradient)
    :param actor_advantages: Advantages in the direct term ``∇θf``: ``"recomputed"`` (GAE from the critic after its
        nested steps) or ``"rollout"`` (PPO's fixed rollout advantages; ``Â(w)`` is kept only where ``∇w f`` needs it)
    :param follower_objective: What the nested critic steps minimise, i.e. where the implicit function theorem is
        applied: ``"mse"`` (default; the plain MSE ``g̃(θ_old, ·)``: the theorem at the rollout policy, to first order in
        ``θ − θ_old``) or ``"coupled"`` (``g̃(θ, ·)`` at the current actor, the objective whose derivatives the
        hypergradient uses; better on short horizons, fails on long ones: docs/blpo.md). Ignored by the nested-only
        ablation, whose follower is the MSE
    :param coupling: Which actor dependence of the follower objective gives the mixed term: ``"target"`` (how the
        critic's targets move with the policy; default), ``"distribution"`` (how the visited states move with it),
        ``"both"``, or ``"authors_f2"`` (the authors' prefix-mean surrogate f2 for the mixed term, with the plain MSE as
        the follower; see :func:`~sb3_blpo.blpo.coupling.prefix_mean_f2`)
    :param coupling_clip: Ratios in the coupled critic objective are clamped to ``[1 − c, 1 + c]``; with
        ``"authors_f2"`` it is the clip range ``ε_F`` of the surrogate inside f2 (the authors' ``CLIP_F``)
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
        batch_size: int = 512,
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
        leader_objective: LeaderObjective = "improvement",
        actor_advantages: str = "recomputed",
        follower_objective: str = "mse",
        coupling: CouplingMode = "target",
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
            supported_action_spaces=(spaces.Box, spaces.Discrete, spaces.MultiDiscrete, spaces.MultiBinary),
            stats_window_size=stats_window_size,
            tensorboard_log=tensorboard_log,
            verbose=verbose,
            device=device,
            seed=seed,
            # _setup_model makes share_features_extractor default to False: the bilevel split needs disjoint parameters.
            policy_kwargs=policy_kwargs,
            _init_setup_model=False,
        )
        if not issubclass(self.policy_class, BilevelSplit):
            raise InvalidParameterError(
                f"policy must be one of {sorted(self.policy_aliases)} or a BLPO policy class (BLPOPolicy, BLPOCnnPolicy, "
                f"BLPOMultiInputPolicy or a subclass), got {self.policy_class.__name__}: BLPO needs separate actor and "
                "critic parameters and optimizers, which SB3's ActorCriticPolicy does not have"
            )
        self.critic_learning_rate = critic_learning_rate
        self.batch_size = batch_size
        self.n_epochs = n_epochs
        self.n_critic_steps = n_critic_steps
        self.clip_range = clip_range
        if ihvp_kwargs is not None and not isinstance(ihvp_kwargs, dict):
            raise InvalidParameterError(f"ihvp_kwargs must be a dict or None, got {ihvp_kwargs!r}")
        self.ihvp_kwargs = dict(ihvp_kwargs or {})
        self.normalize_advantage = normalize_advantage
        self.target_kl = target_kl
        self.ihvp_solver = ihvp_solver
        self.hypergrad_bound = hypergrad_bound
        # What the leader and the follower optimise (see the class docstring and docs/blpo.md).
        self.leader_objective = leader_objective
        self.actor_advantages = actor_advantages
        self.follower_objective = follower_objective
        self.coupling = coupling
        self.coupling_clip = coupling_clip
        self._check_hyperparameters()
        if _init_setup_model:
            self._setup_model()
        else:
            self._make_solver()  # an unknown solver name or setting fails at construction, not at the first update

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
        for name, accepted in ACCEPTED_VALUES.items():
            check_one_of(name, getattr(self, name), accepted)
        check_one_of("ihvp_kwargs['curvature']", self._split_ihvp_kwargs()[0], CURVATURES)
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
        self._curvature = self._split_ihvp_kwargs()[0]
        self._solver = self._make_solver()
        if isinstance(self._solver, NystromSolver):
            self._solver.validate_dim(sum(p.numel() for p in self._critic_params))
            if self._solver.seed is None and self.seed is not None:
                # Column sampling follows the model's seed unless the solver was given its own.
                self._solver.reseed(self.seed)
        self._truncated_steps: list[TruncatedStep] = []
        self._nonfinite = NonFiniteGuard("BLPO")
        self._loss_terms: list[LossTerm] = []

    def _make_solver(self) -> IHVPSolver | None:
        """The IHVP solver of ``ihvp_solver``/``ihvp_kwargs`` (``None``: nested-only); bad settings name themselves."""
        try:
            return make_solver(self.ihvp_solver, **self._split_ihvp_kwargs()[1])
        except (ValueError, TypeError) as error:
            raise InvalidParameterError(
                f"ihvp_solver={self.ihvp_solver!r}, ihvp_kwargs={self.ihvp_kwargs}: {error}"
            ) from error

    def _split_ihvp_kwargs(self) -> tuple[str, dict[str, Any]]:
        """``ihvp_kwargs`` → the curvature (default ``"gauss_newton"``) and the solver's own keyword arguments."""
        solver_kwargs = dict(self.ihvp_kwargs)
        return solver_kwargs.pop("curvature", "gauss_newton"), solver_kwargs

    @staticmethod
    def authors_recipe(env_kind: str = "discrete") -> dict[str, Any]:
        """Keyword arguments that reproduce the BLPO authors' public code (arXiv:2505.11714), not our default; see
        :func:`sb3_blpo.blpo.recipes.authors_recipe`. Usage: ``BLPO("MlpPolicy", env, **BLPO.authors_recipe())``.

        :param env_kind: ``"discrete"`` (their gymnax settings: CartPole, Acrobot) or ``"continuous"`` (Brax settings)
        :return: a fresh dict of keyword arguments
        """
        return authors_recipe(env_kind)

    def _excluded_save_params(self) -> list[str]:
        # Rebuilt by _setup_model (solver, parameter lists) or per run (truncated steps, loss terms).
        runtime = ["_solver", "_truncated_steps", "_loss_terms", "_actor_params", "_critic_params", "_nonfinite"]
        return [*super()._excluded_save_params(), *runtime]

    def _get_torch_save_params(self) -> tuple[list[str], list[str]]:
        return ["policy", "policy.optimizer", "policy.critic_optimizer"], []

    # ------------------------------------------------------------------ training
    def train(self) -> None:
        """Update the critic (nested best response) and the actor (hypergradient) on the collected rollout."""
        update_started = time.perf_counter()
        self.policy.set_training_mode(True)
        self._nonfinite.skips = 0
        clip_range = self._update_schedules()
        rollout, follower = self._bilevel_rollout(), self._follower()
        stats = UpdateStats()
        continue_training = True
        for epoch in range(self.n_epochs):
            for batch in rollout.minibatches(self.batch_size):
                if self.use_sde:
                    self.policy.reset_noise(len(batch))
                # The actor's ratios on the rollout steps g̃ reads: differentiated in θ by the mixed term, and constants
                # for the nested steps of the coupled follower. θ does not move during those steps: one pass serves both.
                ratios = self._rollout_ratios(rollout, follower.ratio_reach(batch)) if self._solver is not None else None
                nested_started = time.perf_counter()
                stats.add(value_loss_before_nested=follower.nested_steps(rollout, batch, ratios))
                stats.add(seconds_nested_critic=time.perf_counter() - nested_started)
                actor_loss, approx_kl, objective_stats = self._actor_objective(follower, rollout, batch, clip_range)
                stats.add(**objective_stats)
                if self.target_kl is not None and approx_kl > 1.5 * self.target_kl:
                    continue_training = False
                    if self.verbose >= 1:
                        print(f"Early stopping at step {epoch} due to reaching max kl: {approx_kl:.2f}")
                    break
                direction, direction_stats = self._actor_direction(follower, rollout, batch, actor_loss, ratios)
                stats.add(**direction_stats)
                self._actor_step(direction)
            self._n_updates += 1
            if not continue_training:
                break
        stats.add(seconds_update=time.perf_counter() - update_started)
        self._record_train_stats(stats, clip_range)

    def _update_schedules(self) -> float:
        self._update_learning_rate(self.policy.optimizer)
        critic_lr = self.critic_learning_rate(self._current_progress_remaining)  # type: ignore[operator]
        update_learning_rate(self.policy.critic_optimizer, critic_lr)
        self.logger.record("train/critic_learning_rate", critic_lr)
        return self.clip_range(self._current_progress_remaining)  # type: ignore[operator]

    def _bilevel_rollout(self) -> BilevelRollout:
        """The finished rollout as BLPO's tensors (env-major, with the differentiable GAE map)."""
        reader = RolloutReader(self.rollout_buffer, self.action_space, self.device)
        return bilevel_rollout(
            reader,
            self.policy,
            self._last_obs,
            self._last_episode_starts,
            self._truncated_steps,
            self.gamma,
            self.gae_lambda,
        )

    def _follower(self) -> Follower:
        """The critic side of this update, with the current settings."""
        return Follower(
            policy=self.policy,
            critic_params=self._critic_params,
            gamma=self.gamma,
            coupling=self.coupling,
            coupling_clip=self.coupling_clip,
            follower_objective=self.follower_objective,
            curvature=self._curvature,
            n_critic_steps=self.n_critic_steps,
            max_grad_norm=self.max_grad_norm,
            extra_loss=self._extra_loss,
            on_nonfinite=self._nonfinite.note,
        )

    def _rollout_ratios(self, rollout: BilevelRollout, reach: th.Tensor | None = None) -> th.Tensor:
        """``π_θ / π_old`` on the rollout steps of ``reach`` (``None``: all; 1 elsewhere), ``(n_envs, n_steps)``, with
        the graph to θ."""
        return rollout.ratios(lambda obs, actions: self.policy.actor_log_prob_entropy(obs, actions)[0], reach)

    def _actor_objective(
        self, follower: Follower, rollout: BilevelRollout, batch: Minibatch, clip_range: float
    ) -> tuple[th.Tensor, float, dict[str, float]]:
        """Leader loss on the minibatch (``leader_objective`` + entropy), the approximate KL, and their statistics."""
        critic_advantages, _, critic_values = follower.advantages(rollout, batch, track_critic=self._solver is not None)
        if self.actor_advantages == "rollout":
            # The rollout's values in the direct term, the critic's derivative where ∇w f needs it.
            advantages = batch.rollout_advantages + (critic_advantages - critic_advantages.detach())
        else:
            advantages = critic_advantages
        if self.normalize_advantage:
            # Statistics as constants: normalisation only rescales the objective (the improvement form's ∇w already
            # vanishes at θ_old without differentiating through the mean).
            advantages = normalize_advantages(advantages)
        log_prob, entropy = self.policy.actor_log_prob_entropy(batch.observations, batch.actions)
        log_ratio = log_prob - batch.old_log_prob
        ratio = th.exp(log_ratio)
        policy_loss = leader_loss(ratio, advantages, clip_range, self.leader_objective)
        entropy_term = entropy_loss(entropy, log_prob)
        loss = policy_loss + self.ent_coef * entropy_term + self._extra_loss("actor", batch.observations)
        with th.no_grad():
            approx_kl = float(th.mean((ratio - 1) - log_ratio))
            clip_fraction = float(th.mean((th.abs(ratio - 1) > clip_range).float()))
        stats = dict(
            value_loss=float(weighted_squared_error(critic_values, batch.targets)),
            clip_fraction=clip_fraction,
            policy_gradient_loss=policy_loss.item(),
            entropy_loss=entropy_term.item(),
            loss=loss.item(),
            approx_kl=approx_kl,
        )
        return loss, approx_kl, stats

    def _actor_direction(
        self, follower: Follower, rollout: BilevelRollout, batch: Minibatch, actor_loss: th.Tensor, ratios: th.Tensor | None
    ) -> tuple[th.Tensor | None, dict[str, float]]:
        """The leader's descent direction: the bounded hypergradient, or ``∇θf`` (nested-only / numerical fallback),
        with its statistics. ``None`` when even ``∇θf`` is not finite (the actor step is then skipped)."""
        actor_params = self._actor_params
        if self._solver is None:
            direct = flat_grad(actor_loss, actor_params)
            if not self._nonfinite.finite(direct, "actor gradient"):
                return None, {}
            return direct, dict(hypergrad_norm=float(direct.norm()))
        assert ratios is not None, "the ratios are computed whenever a solver is set"
        timer = PhaseTimer()
        mixed_loss, curvature, mixed = follower.implicit_terms(rollout, batch, ratios)
        hypergradient = implicit_hypergradient(
            actor_loss,
            mixed_loss,
            actor_params,
            self._critic_params,
            self._solver,
            curvature=curvature,
            on_phase=timer.lap,
            mixed=mixed,
        )
        direct, correction = hypergradient.direct, hypergradient.correction
        stats = dict(
            seconds_hypergradient=timer.total(),
            seconds_ihvp=timer.laps["ihvp"],
            seconds_mixed_term=timer.laps["mixed"],
        )
        if not self._nonfinite.finite(direct, "actor gradient"):
            return None, stats
        if not (th.isfinite(correction).all() and th.isfinite(hypergradient.ihvp.x).all()):
            self._nonfinite.note("hypergradient correction")
            return direct, dict(stats, ihvp_fallbacks=1.0)
        bounded, was_bounded = bound_correction(direct, correction, self.hypergrad_bound)
        stats.update(
            ihvp_fallbacks=0.0,
            ihvp_unconverged=0.0 if hypergradient.ihvp.converged else 1.0,
            ihvp_clamped_cores=float(hypergradient.ihvp.info.get("clamped_core", 0.0)),
            ihvp_correction_norm=float(correction.norm()),
            correction_ratio=float(correction.norm() / direct.norm().clamp_min(1e-12)),
            correction_cosine=float(th.nn.functional.cosine_similarity(correction, direct, dim=0, eps=1e-12)),
            correction_bounded_fraction=float(was_bounded),
            hypergrad_norm=float((direct - bounded).norm()),
        )
        return direct - bounded, stats

    def _actor_step(self, direction: th.Tensor | None) -> None:
        if direction is None:
            return
        actor_params = self._actor_params
        self.policy.optimizer.zero_grad()
        for param, grad in zip(actor_params, unflatten_like(direction, actor_params), strict=True):
            param.grad = grad.detach().clone()
        th.nn.utils.clip_grad_norm_(actor_params, self.max_grad_norm)
        self.policy.optimizer.step()

    def _record_train_stats(self, stats: UpdateStats, clip_range: float) -> None:
        stats.record(self.logger, summed=SUMMED_STATS, last=("loss",))
        explained_var = explained_variance(self.rollout_buffer.values.flatten(), self.rollout_buffer.returns.flatten())
        self.logger.record("train/nonfinite_skips", float(self._nonfinite.skips))
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
        return super().learn(total_timesteps, callback, log_interval, tb_log_name, reset_num_timesteps, progress_bar)
