"""GAE as a differentiable linear map of the critic's values, for arbitrary minibatches.

BLPO's actor loss uses advantages ``Â(w)`` that depend on the critic parameters ``w``, so that ``∇_w f ≠ 0``. GAE is
linear in the values: within one episode segment of one env,

    Â_t = Σ_{j ≥ t} (γλ)^{j-t} δ_j,     δ_j = r_j + γ·(1 − done_{j+1})·V_{j+1} − V_j.

For a minibatch of rollout entries ``(n_b, t_b)``, ``Â_B = Σ_j W[b, j] δ[n_b, j]`` with ``W[b, j] = (γλ)^{j-t_b}`` for
every ``j`` in the same env and episode segment, ``j ≥ t_b``: any SB3 minibatch works (unlike the authors' code, which
needs minibatch = trajectory). The sums are computed for the whole rollout at once by a blocked scan
(:meth:`EpisodeKernel.discounted_sums`: blocks of ``L ≈ √n_steps`` steps, a dense ``L × L`` map inside each block and
a dense map between block starts; ``O(n_steps^{3/2})`` per env, no Python loop over time) and gathered at the
minibatch entries. The dense rows ``W`` (:meth:`KernelWindow.rows`, ``O(B · n_steps)``) serve as the tests' oracle.

Everything here is laid out env-major, ``(n_envs, n_steps)``, matching the flat index ``i = n * n_steps + t``.
Pure torch: no Stable-Baselines3 import.
"""

from __future__ import annotations

import math

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
        self._maps: dict[tuple[float, th.dtype, bool, str], tuple[th.Tensor, th.Tensor, th.Tensor, int]] = {}

    def window(self, env_index: th.Tensor, time_index: th.Tensor) -> KernelWindow:
        """The time structure seen from the minibatch entries ``(env_index, time_index)``, shared by all maps."""
        return KernelWindow(self, env_index, time_index)

    def powers(self, decay: float, dtype: th.dtype) -> th.Tensor:
        """``decay ** [0, 1, ..., n_steps - 1]``, computed once per rollout and decay."""
        key = (float(decay), dtype)
        if key not in self._powers:
            self._powers[key] = th.pow(th.as_tensor(decay, dtype=th.float64), self.steps.to(th.float64)).to(dtype)
        return self._powers[key]

    def discounted_sums(self, decay: float, per_step: th.Tensor, *, future: bool) -> th.Tensor:
        """``S[n, t] = Σ_j decay^{|j − t|} x[n, j]`` over ``j ≥ t`` (``future``) or ``j < t`` in the same env and
        episode segment, for every rollout entry: ``(n_envs, n_steps)``, differentiable in ``per_step``.

        Past sums are the inclusive future sums of the time-reversed rollout, reversed back, minus ``x`` itself.
        """
        if future:
            return self._scan(decay, per_step, reverse=False)
        return self._scan(decay, per_step.flip(1), reverse=True).flip(1) - per_step

    def _scan(self, decay: float, values: th.Tensor, reverse: bool) -> th.Tensor:
        """Inclusive future sums ``Σ_{j ≥ t, same segment} decay^{j − t} x_j`` (of the time-reversed rollout if
        ``reverse``): local sums inside blocks, plus the sum from the next block start carried back."""
        inner, between, carry, block = self._scan_maps(decay, values.dtype, reverse)
        n_envs, n_steps = values.shape
        n_blocks = inner.shape[1]
        padded = th.nn.functional.pad(values, (0, n_blocks * block - n_steps)).view(n_envs, n_blocks, block)
        local = th.einsum("nbtj,nbj->nbt", inner, padded)
        starts = th.einsum("nbc,nc->nb", between, local[:, :, 0])
        next_starts = th.nn.functional.pad(starts[:, 1:], (0, 1))
        return (local + carry * next_starts.unsqueeze(2)).reshape(n_envs, -1)[:, :n_steps]

    def _scan_maps(self, decay: float, dtype: th.dtype, reverse: bool) -> tuple[th.Tensor, th.Tensor, th.Tensor, int]:
        """The scan's three weight tensors for ``decay``, built once per rollout: inside blocks ``(n_envs, n_blocks,
        L, L)``, between block starts ``(n_envs, n_blocks, n_blocks)``, and from each step to the next block start
        ``(n_envs, n_blocks, L)``; every weight is ``decay^distance`` within one episode segment and 0 across."""
        key = (float(decay), dtype, reverse, "scan")
        if key in self._maps:
            return self._maps[key]
        block = max(1, math.isqrt(self.n_steps - 1) + 1)
        n_blocks = -(-self.n_steps // block)
        segment = self.segment.flip(1) if reverse else self.segment
        # Padding continues the last segment (its values are zero, so it adds nothing).
        segment = th.cat([segment, segment[:, -1:].expand(-1, n_blocks * block - self.n_steps)], dim=1)
        segment = segment.view(self.n_envs, n_blocks, block)
        powers = th.pow(th.as_tensor(decay, dtype=th.float64), th.arange(n_blocks * block + 1, dtype=th.float64))
        powers = powers.to(device=self.segment.device, dtype=dtype)
        offsets = th.arange(block, device=self.segment.device)
        ahead = offsets.unsqueeze(0) - offsets.unsqueeze(1)  # [t, j] = j − t
        same = segment.unsqueeze(3) == segment.unsqueeze(2)
        inner = th.where(same & (ahead >= 0), powers[ahead.clamp(min=0)], th.zeros((), dtype=dtype))
        blocks = th.arange(n_blocks, device=self.segment.device)
        block_ahead = blocks.unsqueeze(0) - blocks.unsqueeze(1)
        first = segment[:, :, 0]
        same_start = first.unsqueeze(2) == first.unsqueeze(1)
        between = th.where(
            same_start & (block_ahead >= 0), powers[(block * block_ahead).clamp(min=0)], th.zeros((), dtype=dtype)
        )
        next_first = th.cat([first[:, 1:], th.full_like(first[:, :1], -1)], dim=1)  # no block after the last
        carry = th.where(segment == next_first.unsqueeze(2), powers[block - offsets], th.zeros((), dtype=dtype))
        self._maps[key] = (inner, between, carry, block)
        return self._maps[key]


class KernelWindow:
    """The minibatch entries ``(env_index, time_index)`` seen through :class:`EpisodeKernel`: their sums by the rollout's
    scan (:meth:`apply`) and, for tests and inspection, their dense weight rows (:meth:`rows`).

    :param kernel: the rollout's kernel.
    :param env_index: ``(B,)`` env of each minibatch entry.
    :param time_index: ``(B,)`` time step of each minibatch entry.
    """

    def __init__(self, kernel: EpisodeKernel, env_index: th.Tensor, time_index: th.Tensor) -> None:
        self.kernel = kernel
        self.env_index = env_index
        self.time_index = time_index
        self._reach: dict[bool, th.Tensor] = {}

    def rows(self, decay: float, dtype: th.dtype, *, future: bool) -> th.Tensor:
        """Dense weights ``(B, n_steps)``: ``decay^{|j − t_b|}`` on ``j ≥ t_b`` (``future``) or ``j < t_b``, same
        episode (what :meth:`apply` sums with; ``O(B · n_steps)``, for tests and inspection)."""
        kernel, env_index = self.kernel, self.env_index
        offset = kernel.steps.unsqueeze(0) - self.time_index.unsqueeze(1)
        same_segment = kernel.segment[env_index] == kernel.segment[env_index, self.time_index].unsqueeze(1)
        mask = same_segment & ((offset >= 0) if future else (offset < 0))
        return th.where(mask, kernel.powers(decay, dtype)[offset.abs()], th.zeros((), dtype=dtype))

    def reach(self, *, future: bool) -> th.Tensor:
        """The rollout steps these entries' sums read, ``(n_envs, n_steps)`` bool: every step of an episode segment at or
        after its first entry (``future``), or before its last entry. Quantities outside it do not affect
        :meth:`apply`, so they need not be computed (the nonzero pattern of :meth:`rows`, gathered per env). Computed
        once per direction: the ratios and the advantages of a minibatch both need it."""
        if future not in self._reach:
            self._reach[future] = self._compute_reach(future)
        return self._reach[future]

    def _compute_reach(self, future: bool) -> th.Tensor:
        kernel = self.kernel
        segment_key = self.env_index * kernel.n_steps + kernel.segment[self.env_index, self.time_index]
        fill = kernel.n_steps if future else -1
        bound = th.full((kernel.n_envs * kernel.n_steps,), fill, dtype=th.long, device=self.time_index.device)
        bound.scatter_reduce_(0, segment_key, self.time_index, reduce="amin" if future else "amax")
        bound = bound.view(kernel.n_envs, kernel.n_steps).gather(1, kernel.segment)
        return kernel.steps >= bound if future else kernel.steps < bound

    def apply(self, decay: float, per_step: th.Tensor, *, future: bool) -> th.Tensor:
        """``Σ_j rows[b, j] · per_step[env_b, j]`` for a ``(n_envs, n_steps)`` quantity (by the rollout's scan)."""
        return self.kernel.discounted_sums(decay, per_step, future=future)[self.env_index, self.time_index]


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
        """Advantages ``(n_envs, n_steps)`` of every rollout entry given :meth:`td_errors`, differentiable."""
        return self.kernel.discounted_sums(self.gamma * self.gae_lambda, td_errors, future=True)
