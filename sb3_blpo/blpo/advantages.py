"""GAE as a differentiable linear map of the critic's values, for arbitrary minibatches.

BLPO's actor loss uses advantages ``Â(w)`` that depend on the critic parameters ``w``, so that ``∇_w f ≠ 0``. GAE is
linear in the values: within one episode segment of one env,

    Â_t = Σ_{j ≥ t} (γλ)^{j-t} δ_j,     δ_j = r_j + γ·(1 − done_{j+1})·V_{j+1} − V_j.

For a minibatch of rollout entries ``(n_b, t_b)`` we build the weight rows ``W[b, j] = (γλ)^{j-t_b}`` for every ``j`` in
the same env and episode segment, ``j ≥ t_b``, and get ``Â_B = Σ_j W[b, j] δ[n_b, j]`` with one broadcasted product:
no Python loop over time, any SB3 minibatch works (unlike the authors' code, which needs minibatch = trajectory).

Everything here is laid out env-major, ``(n_envs, n_steps)``, matching the flat index ``i = n * n_steps + t``.
Pure torch: no Stable-Baselines3 import.
"""

from __future__ import annotations

import torch as th


class EpisodeKernel:
    """Discounted weights between time steps of the same env and the same episode segment.

    One object serves the three linear maps BLPO needs: GAE (decay ``γλ``, future steps), the target part of the
    coupled critic objective (decay ``γ``, future steps) and its state-distribution part (decay 1, past steps).

    :param episode_starts: ``(n_envs, n_steps)``, 1 where the observation is the first of a new episode.
    """

    def __init__(self, episode_starts: th.Tensor) -> None:
        if episode_starts.dim() != 2:
            raise ValueError(f"episode_starts must be (n_envs, n_steps), got shape {tuple(episode_starts.shape)}")
        self.n_envs, self.n_steps = episode_starts.shape
        # Segment id: how many episode starts at or before each step (step 0 starts a segment either way).
        starts = episode_starts.clone().to(th.long)
        starts[:, 0] = 0
        self.segment = th.cumsum(starts, dim=1)
        self.steps = th.arange(self.n_steps, device=episode_starts.device)
        self._powers: dict[tuple[float, th.dtype], th.Tensor] = {}

    def window(self, env_index: th.Tensor, time_index: th.Tensor) -> KernelWindow:
        """The time structure seen from the minibatch entries ``(env_index, time_index)``, shared by all maps."""
        return KernelWindow(self, env_index, time_index)

    def powers(self, decay: float, dtype: th.dtype) -> th.Tensor:
        """``decay ** [0, 1, ..., n_steps - 1]``, computed once per rollout and decay."""
        key = (float(decay), dtype)
        if key not in self._powers:
            self._powers[key] = th.pow(th.as_tensor(decay, dtype=th.float64), self.steps.to(th.float64)).to(dtype)
        return self._powers[key]


class KernelWindow:
    """Rows of :class:`EpisodeKernel` for one minibatch: offsets and episode masks, computed once.

    :param kernel: the rollout's kernel.
    :param env_index: ``(B,)`` env of each minibatch entry.
    :param time_index: ``(B,)`` time step of each minibatch entry.
    """

    def __init__(self, kernel: EpisodeKernel, env_index: th.Tensor, time_index: th.Tensor) -> None:
        self.kernel = kernel
        self.env_index = env_index
        offset = kernel.steps.unsqueeze(0) - time_index.unsqueeze(1)
        self.distance = offset.abs()
        same_segment = kernel.segment[env_index] == kernel.segment[env_index, time_index].unsqueeze(1)
        self.future = same_segment & (offset >= 0)
        self.past = same_segment & (offset < 0)

    def rows(self, decay: float, dtype: th.dtype, *, future: bool) -> th.Tensor:
        """Weights ``(B, n_steps)``: ``decay^{|j − t_b|}`` on ``j ≥ t_b`` (``future``) or ``j < t_b``, same episode."""
        mask = self.future if future else self.past
        return th.where(mask, self.kernel.powers(decay, dtype)[self.distance], th.zeros((), dtype=dtype))

    def apply(self, decay: float, per_step: th.Tensor, *, future: bool) -> th.Tensor:
        """``Σ_j rows[b, j] · per_step[env_b, j]`` for a ``(n_envs, n_steps)`` quantity."""
        return (self.rows(decay, per_step.dtype, future=future) * per_step[self.env_index]).sum(dim=1)


class DifferentiableGAE:
    """GAE(γ, λ) of one rollout as a function of the critic's values.

    The structure (rewards, episode boundaries, timeouts) is fixed per rollout; :meth:`minibatch` evaluates the
    advantages of some entries for any values, with gradients flowing to every value they depend on.

    Timeouts: SB3 adds ``γ·V_old(terminal_obs)`` to the reward of a truncated step, with the critic of the rollout.
    To keep that bootstrap differentiable, pass the values of the terminal observations at the current critic as
    ``truncation_values`` and their rollout-time values as ``old_truncation_values``; the reward is shifted by
    ``γ·(V_w − V_old)`` at those steps, which is exact at ``w = w_old`` and differentiable elsewhere.

    :param rewards: ``(n_envs, n_steps)`` rewards as stored by SB3 (timeout bootstrap included).
    :param episode_starts: ``(n_envs, n_steps)``.
    :param last_dones: ``(n_envs,)``, whether the observation after the last step starts a new episode.
    :param gamma: discount factor.
    :param gae_lambda: GAE λ.
    :param truncation_index: ``(M, 2)`` long tensor of ``(env, step)`` of truncated steps (may be empty).
    """

    def __init__(
        self,
        rewards: th.Tensor,
        episode_starts: th.Tensor,
        last_dones: th.Tensor,
        gamma: float,
        gae_lambda: float,
        truncation_index: th.Tensor | None = None,
    ) -> None:
        self.rewards = rewards
        self.gamma = gamma
        self.gae_lambda = gae_lambda
        self.kernel = EpisodeKernel(episode_starts)
        # next_non_terminal[n, t] = 0 when step t + 1 (or the observation after the rollout) starts a new episode.
        self.next_non_terminal = th.cat([1.0 - episode_starts[:, 1:], 1.0 - last_dones.unsqueeze(1)], dim=1).to(rewards.dtype)
        if truncation_index is None:
            truncation_index = th.zeros((0, 2), dtype=th.long, device=rewards.device)
        self.truncation_index = truncation_index
        self._rollout_weights: th.Tensor | None = None

    def td_errors(
        self,
        values: th.Tensor,
        last_values: th.Tensor,
        truncation_values: th.Tensor | None = None,
        old_truncation_values: th.Tensor | None = None,
    ) -> th.Tensor:
        """δ ``(n_envs, n_steps)`` for values ``(n_envs, n_steps)`` and bootstrap values ``(n_envs,)``."""
        next_values = th.cat([values[:, 1:], last_values.unsqueeze(1)], dim=1)
        rewards = self.rewards
        if len(self.truncation_index) > 0 and truncation_values is not None:
            assert old_truncation_values is not None, "old_truncation_values are needed with truncation_values"
            shift = th.zeros_like(rewards).index_put(
                (self.truncation_index[:, 0], self.truncation_index[:, 1]),
                self.gamma * (truncation_values - old_truncation_values),
                accumulate=True,
            )
            rewards = rewards + shift
        return rewards + self.gamma * self.next_non_terminal * next_values - values

    def minibatch(self, td_errors: th.Tensor, window: KernelWindow) -> th.Tensor:
        """Advantages ``(B,)`` of the minibatch entries of ``window`` given :meth:`td_errors`."""
        return window.apply(self.gamma * self.gae_lambda, td_errors, future=True)

    def rollout(self, td_errors: th.Tensor) -> th.Tensor:
        """Advantages ``(n_envs, n_steps)`` of every rollout entry given :meth:`td_errors`, differentiable.

        One batched product with the per-env ``(n_steps, n_steps)`` weight matrices, built once per rollout (memory
        ``n_envs · n_steps²`` floats: 64 MiB for 16 envs of 1024 steps).
        """
        if self._rollout_weights is None or self._rollout_weights.dtype != td_errors.dtype:
            kernel = self.kernel
            offset = kernel.steps.unsqueeze(0) - kernel.steps.unsqueeze(1)  # [t, j] = j − t
            same_segment = kernel.segment.unsqueeze(2) == kernel.segment.unsqueeze(1)
            powers = kernel.powers(self.gamma * self.gae_lambda, td_errors.dtype)[offset.clamp(min=0)]
            self._rollout_weights = th.where(same_segment & (offset >= 0), powers, th.zeros((), dtype=td_errors.dtype))
        return th.einsum("ntj,nj->nt", self._rollout_weights, td_errors)
