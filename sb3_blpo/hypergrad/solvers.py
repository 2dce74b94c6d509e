"""Inverse-Hessian-vector-product (IHVP) solvers behind one interface.

Every solver approximates ``x ≈ (H + ridge)^{-1} v`` given only a Hessian-vector product ``hvp`` and the vector
``v``. ``hvp`` maps a ``(P,)`` vector to ``(P,)`` and an ``(m, P)`` batch to ``(m, P)``, as
:class:`~sb3_blpo.hypergrad.hvp.HessianVectorProduct` does, so a plain matrix works too (``lambda V: V @ H.T``).

Pure torch: nothing here imports Stable-Baselines3. Solvers that need randomness own a seeded CPU
``torch.Generator`` and never touch the global RNG, so adding a solver to a training loop does not change the
rest of the run's random stream.
"""

from __future__ import annotations

import abc
import inspect
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch as th

from sb3_blpo._validation import InvalidParameterError, check_float, check_int, check_one_of

HVP = Callable[[th.Tensor], th.Tensor]


@dataclass
class IHVPResult:
    """Outcome of one IHVP solve.

    :param x: the approximate solution ``(H + ridge)^{-1} v``, flat, same dtype and device as ``v``.
    :param n_products: number of Hessian-vector products spent (a batch of ``m`` vectors counts ``m``).
    :param converged: ``False`` when the solver stopped on a fault (non-positive curvature, singular core,
        divergence, non-finite values); ``x`` is then a finite, safe fallback whenever one exists.
    :param info: solver-specific float diagnostics (iterations, residual norm, fault flags as 1.0/0.0, ...).
    """

    x: th.Tensor
    n_products: int
    converged: bool
    info: dict[str, float] = field(default_factory=dict)


# --- argument validation -------------------------------------------------------------------------------------------


def _check_seed(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidParameterError(
            f"{name} must be None or an integer in [0, 2**64), got {value!r} of type {type(value).__name__}"
        )
    if not 0 <= int(value) < 2**64:
        raise ValueError(f"{name} must be None or an integer in [0, 2**64), got {value}")
    return int(value)


def _check_vector(v: th.Tensor) -> None:
    if not isinstance(v, th.Tensor) or v.dim() != 1:
        shape = tuple(v.shape) if isinstance(v, th.Tensor) else type(v).__name__
        raise ValueError(f"v must be a flat (P,) tensor, got {shape}")
    if not v.is_floating_point():
        raise TypeError(f"v must be a floating-point tensor, got dtype {v.dtype}")


def _product(hvp: HVP, vectors: th.Tensor) -> th.Tensor:
    """Apply ``hvp`` and check the shape, so a wrong operator fails here rather than deep inside a solver."""
    out = hvp(vectors)
    if not isinstance(out, th.Tensor) or out.shape != vectors.shape:
        got = tuple(out.shape) if isinstance(out, th.Tensor) else type(out).__name__
        raise ValueError(f"hvp must return the shape of its input {tuple(vectors.shape)}, got {got}")
    return out.detach()


# --- interface -----------------------------------------------------------------------------------------------------


class IHVPSolver(abc.ABC):
    """Approximates ``(H + ridge)^{-1} v`` from Hessian-vector products only."""

    name: ClassVar[str]

    @abc.abstractmethod
    def solve(self, hvp: HVP, v: th.Tensor) -> IHVPResult:
        """Approximate ``(H + ridge)^{-1} v``.

        :param hvp: maps a ``(P,)`` vector to ``H v`` and an ``(m, P)`` batch to the ``(m, P)`` batch of products.
        :param v: the right-hand side, shape ``(P,)``.
        :return: the solution with its cost and diagnostics.
        """

    def __repr__(self) -> str:
        # Constructor arguments are stored under their own names (or exposed as properties), so the repr can be
        # rebuilt from the signature and stays in sync with it.
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        args = ", ".join(f"{n}={getattr(self, n)!r}" for n in names)
        return f"{type(self).__name__}({args})"


class NystromSolver(IHVPSolver):
    """Nyström IHVP (Hataya & Yamada 2023): a rank-``k`` sketch of the curvature inverted by Woodbury, with a positive
    semi-definite core, optionally refined by a few steps of Nyström-preconditioned conjugate gradient.

    **Sketch.** Each call draws a fresh ``P x k`` test matrix ``Ω`` (``k = min(rank, P)``) from the solver's own seeded
    generator: ``sketch="columns"`` takes ``k`` distinct coordinates uniformly without replacement (one-hot columns:
    the column-sampling Nyström of Hataya & Yamada and the BLPO authors), ``sketch="gaussian"`` an orthonormalised
    Gaussian matrix (randomized Nyström, Tropp et al.), which captures the dominant eigenspace of a curvature whose
    mass is spread over many coordinates far better at the same cost. One batched product gives ``Y = HΩ``; the core
    is ``M = ΩᵀHΩ + jitter·I`` (symmetrised) and the Nyström matrix ``Ĥ = Y M⁺ Yᵀ``.

    **PSD core.** A neural critic's Hessian is indefinite, and so is ``M``; a Woodbury solve with an indefinite core can
    return a vector many times too long with no warning (measured on real critic Hessians: 40–110× the accurate
    solution). So ``M = QΛQᵀ`` is eigendecomposed in float64, negative eigenvalues are clamped to zero and the
    pseudo-inverse keeps the eigenvalues above ``τ = max(1e-10, 100·ε)·max|λ|`` (``ε``: machine epsilon of ``v``'s
    dtype); with ``B = Λ₊^{-1/2} Q₊ᵀ Yᵀ`` (so ``Ĥ = BᵀB ⪰ 0``)

        (Ĥ + ρI)⁻¹ v = v/ρ − Bᵀ (ρI + BBᵀ)⁻¹ B v / ρ,

    a positive-definite ``r x r`` solve. ``info["clamped_core"]`` is 1.0 when an eigenvalue below ``−τ`` was clamped.
    With a PSD ``H`` (e.g. :class:`~sb3_blpo.hypergrad.hvp.GaussNewtonProduct`), ``jitter = 0`` and ``rank = P`` the
    result is exactly ``(H + ρI)⁻¹ v``; with an indefinite ``H`` it is ``(H₊ + ρI)⁻¹ v``, ``H₊`` the PSD part of ``H``.

    **Refinement.** With ``pcg_steps = m > 0`` the solver runs ``m`` iterations of conjugate gradient on
    ``(H + ρI)x = v`` from ``x = 0``, preconditioned by ``(Ĥ + ρI)⁻¹``: one product each, so ``rank + m`` products in
    all. The first iterate is the Nyström solution optimally rescaled; each further one minimises the error in the
    ``(H + ρI)``-norm over a larger space that contains it. A non-positive curvature ``pᵀ(H + ρI)p`` (an indefinite
    ``H``) stops the refinement at the last iterate (the Nyström solution if it happens at the first step) with
    ``info["negative_curvature"] = 1.0``.

    ``jitter > 0`` shifts the core to ``M + jitter·I``, which shrinks the low-rank curvature so that the Nyström solution
    moves towards ``v/ρ``. The BLPO authors' code used column sampling with ``jitter = 1`` and ``ρ = 50``.

    **Ridge.** ``ρ`` is added to ``H``, not a small damping: with ``ρ`` large against the curvature the result is close
    to ``v/ρ``. With ``relative_rho=True`` the ridge is ``rho · s`` with ``s`` the mean diagonal ``|ΩᵀHΩ|``/k (an
    estimate of ``tr(H)/P``), so one setting serves critics whose curvature differs by orders of magnitude; ``s = 1``
    when it is zero. The ridge used is ``info["rho"]``.

    If the solve produces non-finite values the solver returns ``x = v/ρ`` (the ridge-only inverse) with
    ``converged=False`` and ``info["singular_core"] = 1.0``.

    :param rank: sketch size ``k`` (capped at ``P`` per call; see :meth:`validate_dim`).
    :param rho: ridge ``ρ > 0`` (a multiple of the sampled curvature scale with ``relative_rho``).
    :param jitter: ``>= 0`` added to the core's diagonal.
    :param seed: seed of the solver's own CPU generator; ``None`` seeds it non-deterministically.
    :param relative_rho: scale ``rho`` by the mean sketched diagonal of ``H``.
    :param sketch: ``"gaussian"`` (default) or ``"columns"``.
    :param pcg_steps: preconditioned-CG refinement steps ``>= 0`` (one product each).
    """

    name: ClassVar[str] = "nystrom"
    SKETCHES: ClassVar[tuple[str, ...]] = ("gaussian", "columns")

    def __init__(
        self,
        rank: int = 5,
        rho: float = 1.0,
        jitter: float = 0.0,
        seed: int | None = None,
        relative_rho: bool = False,
        sketch: str = "gaussian",
        pcg_steps: int = 2,
    ) -> None:
        self._rank = check_int("rank", rank, minimum=1)
        self.rho = check_float("rho", rho, minimum=0.0, allow_minimum=False)
        self.jitter = check_float("jitter", jitter, minimum=0.0)
        self.seed = None if seed is None else _check_seed("seed", seed)
        if not isinstance(relative_rho, bool):
            raise InvalidParameterError(f"relative_rho must be True or False, got {relative_rho!r}")
        self.relative_rho = relative_rho
        self.sketch = check_one_of("sketch", sketch, self.SKETCHES)
        self.pcg_steps = check_int("pcg_steps", pcg_steps, minimum=0)
        self._generator = th.Generator()
        if self.seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(self.seed)

    @property
    def rank(self) -> int:
        """The requested sketch size."""
        return self._rank

    def reseed(self, seed: int) -> None:
        """Restart the sketching from ``seed`` (the same seed gives the same sequence of test matrices)."""
        self.seed = _check_seed("seed", seed)
        self._generator.manual_seed(self.seed)

    def validate_dim(self, dim: int) -> None:
        """Raise ``ValueError`` if ``rank`` exceeds the parameter count ``dim`` (callers check this up front)."""
        dim = check_int("dim", dim, minimum=1)
        if self._rank > dim:
            raise ValueError(f"rank ({self._rank}) must not exceed the number of parameters ({dim})")

    def _test_matrix(self, dim: int, k: int, like: th.Tensor) -> th.Tensor:
        """``Ωᵀ`` as ``(k, P)`` rows, drawn on the CPU generator (a CUDA ``v`` must not need a CUDA generator)."""
        if self.sketch == "columns":
            indices = th.randperm(dim, generator=self._generator)[:k]
            basis = th.zeros(k, dim, dtype=like.dtype)
            basis[th.arange(k), indices] = 1.0
        else:
            # Drawn in float32: CPU float64 normals cost ~6x more, which for a 70k-parameter critic was a fifth of an
            # update; the sketch's range, not its last bits, is what matters, and the QR still runs in float64.
            gaussian = th.randn(dim, k, generator=self._generator, dtype=th.float32).to(th.float64)
            basis = th.linalg.qr(gaussian).Q.T.to(like.dtype)
        return basis.to(like.device)

    def solve(self, hvp: HVP, v: th.Tensor) -> IHVPResult:
        _check_vector(v)
        k = min(self._rank, v.numel())
        basis = self._test_matrix(v.numel(), k, v)
        rows = _product(hvp, basis).to(th.float64)  # (HΩ)ᵀ
        v64 = v.detach().to(th.float64)

        core = rows @ basis.to(th.float64).T
        core = 0.5 * (core + core.T)
        rho = self.rho
        if self.relative_rho:
            scale = float(core.diagonal().abs().mean())
            rho = self.rho * (scale if scale > 0.0 and math.isfinite(scale) else 1.0)
        info = {"rank": float(k), "singular_core": 0.0, "clamped_core": 0.0, "negative_curvature": 0.0, "rho": rho}
        eigenvalues, eigenvectors = th.linalg.eigh(core + self.jitter * th.eye(k, dtype=th.float64, device=v.device))
        # Eigenvalues within rounding of zero (a rank-deficient PSD core, or float32 products) are dropped, not counted
        # as clamped: the products carry the input's precision even though the core is decomposed in float64.
        tolerance = max(1e-10, 100 * th.finfo(v.dtype).eps) * float(eigenvalues.abs().max())
        info["clamped_core"] = float(bool((eigenvalues < -tolerance).any()))
        keep = eigenvalues > tolerance
        # B = Λ₊^{-1/2} Q₊ᵀ Yᵀ: the Nyström matrix is BᵀB, positive semi-definite by construction.
        sketch = (eigenvectors[:, keep] / eigenvalues[keep].sqrt()).T @ rows
        gram = sketch @ sketch.T + rho * th.eye(sketch.shape[0], dtype=th.float64, device=v.device)
        factor, status = th.linalg.cholesky_ex(gram)

        def nystrom_inverse(vector: th.Tensor) -> th.Tensor:
            """``(Ĥ + ρI)⁻¹ vector`` by Woodbury."""
            inner = th.cholesky_solve((sketch @ vector).unsqueeze(-1), factor).squeeze(-1)
            return (vector - sketch.T @ inner) / rho

        x = nystrom_inverse(v64)
        n_products = k
        if int(status.item()) == 0 and bool(th.isfinite(x).all()) and self.pcg_steps:
            x, steps, negative = self._refine(hvp, v64, rho, nystrom_inverse, x, v.dtype)
            n_products += steps
            info["negative_curvature"] = float(negative)
        info["pcg_steps"] = float(n_products - k)
        if int(status.item()) != 0 or not bool(th.isfinite(x).all()):
            info["singular_core"] = 1.0
            return IHVPResult(x=(v64 / rho).to(v.dtype), n_products=n_products, converged=False, info=info)
        return IHVPResult(x=x.to(v.dtype), n_products=n_products, converged=True, info=info)

    def _refine(
        self,
        hvp: HVP,
        v64: th.Tensor,
        rho: float,
        precondition: Callable[[th.Tensor], th.Tensor],
        nystrom_solution: th.Tensor,
        dtype: th.dtype,
    ) -> tuple[th.Tensor, int, bool]:
        """Preconditioned CG on ``(H + ρI)x = v`` from zero: ``(x, products spent, stopped on non-positive curvature)``."""
        x = th.zeros_like(v64)
        residual = v64.clone()
        direction = nystrom_solution.clone()  # = precondition(v)
        residual_dot = float(residual @ direction)
        for step in range(self.pcg_steps):
            product = _product(hvp, direction.to(dtype)).to(th.float64) + rho * direction
            curvature = float(direction @ product)
            if not math.isfinite(curvature) or curvature <= 0.0:
                return (nystrom_solution if step == 0 else x), step + 1, True
            alpha = residual_dot / curvature
            x = x + alpha * direction
            residual = residual - alpha * product
            if step + 1 < self.pcg_steps:
                preconditioned = precondition(residual)
                new_residual_dot = float(residual @ preconditioned)
                direction = preconditioned + (new_residual_dot / residual_dot) * direction
                residual_dot = new_residual_dot
        return x, self.pcg_steps, False


class ConjugateGradientSolver(IHVPSolver):
    """Conjugate gradient on ``(H + damping·I) x = v`` from ``x0 = 0`` (deterministic, no RNG).

    CG assumes a positive-definite operator. When a search direction has ``pᵀ(H + λI)p <= 0`` (or a non-finite
    value) it stops and returns the current iterate (zero if this happens on the first step) with
    ``converged=False`` and ``info["negative_curvature"] = 1.0``. Reaching ``max_iter`` is not a fault: the
    result then has ``converged=True`` and ``info["tol_reached"] = 0.0``.

    :param max_iter: maximum number of CG iterations (one product each).
    :param damping: ``λ >= 0`` added to ``H``.
    :param tol: stop once the relative residual ``‖v − (H + λI)x‖ / ‖v‖`` is below ``tol`` (relative, so that the
        test does not depend on the scale of ``v``: critic gradients of the actor loss can be ~1e-5).
    """

    name: ClassVar[str] = "cg"

    def __init__(self, max_iter: int = 20, damping: float = 0.1, tol: float = 1e-6) -> None:
        self.max_iter = check_int("max_iter", max_iter, minimum=1)
        self.damping = check_float("damping", damping, minimum=0.0)
        self.tol = check_float("tol", tol, minimum=0.0)

    def solve(self, hvp: HVP, v: th.Tensor) -> IHVPResult:
        _check_vector(v)
        v = v.detach()
        x = th.zeros_like(v)
        residual = v.clone()
        direction = residual.clone()
        res_sq = float(residual @ residual)
        threshold = self.tol**2 * res_sq
        n_products, iterations = 0, 0
        negative_curvature = tol_reached = False
        if res_sq <= threshold:
            tol_reached = True
        while not tol_reached and iterations < self.max_iter:
            product = _product(hvp, direction) + self.damping * direction
            n_products += 1
            curvature = float(direction @ product)
            if not math.isfinite(curvature) or curvature <= 0.0:
                negative_curvature = True
                break
            step = res_sq / curvature
            x = x + step * direction
            residual = residual - step * product
            new_res_sq = float(residual @ residual)
            iterations += 1
            if not math.isfinite(new_res_sq):
                # Treated as a curvature fault: the iterate before this step is the last trustworthy one.
                x = x - step * direction
                negative_curvature = True
                break
            if new_res_sq <= threshold:
                res_sq = new_res_sq
                tol_reached = True
                break
            direction = residual + (new_res_sq / res_sq) * direction
            res_sq = new_res_sq
        info = {
            "iterations": float(iterations),
            "residual_norm": math.sqrt(res_sq),
            "negative_curvature": float(negative_curvature),
            "tol_reached": float(tol_reached),
        }
        return IHVPResult(x=x, n_products=n_products, converged=not negative_curvature, info=info)


class NeumannSolver(IHVPSolver):
    """Truncated Neumann series ``x = α Σ_{j=0}^{J} (I − α(H + λI))^j v`` with ``J = iters`` (Lorraine et al. 2020).

    It converges to ``(H + λI)^{-1} v`` only when ``‖I − α(H + λI)‖ < 1``, i.e. ``0 < α < 2/λmax`` on a PD
    operator, and is biased for small ``J``. One extra product gives the residual for free:
    ``(H + λI)x − v = −(I − α(H + λI))^{J+1} v``, reported as ``info["residual_norm"]``. A residual larger than
    ``‖v‖`` (the residual of ``x = 0``) means the series is diverging for this ``α``; that, or non-finite values,
    gives ``converged=False`` and ``info["diverged"] = 1.0``. On non-finite values ``x`` is the last finite partial
    sum.

    :param iters: number of series terms after the first, ``J >= 0`` (``J + 1`` products in total).
    :param alpha: step ``α > 0``.
    :param damping: ``λ >= 0`` added to ``H``.
    """

    name: ClassVar[str] = "neumann"

    def __init__(self, iters: int = 20, alpha: float = 0.01, damping: float = 0.0) -> None:
        self.iters = check_int("iters", iters, minimum=0)
        self.alpha = check_float("alpha", alpha, minimum=0.0, allow_minimum=False)
        self.damping = check_float("damping", damping, minimum=0.0)

    def solve(self, hvp: HVP, v: th.Tensor) -> IHVPResult:
        _check_vector(v)
        v = v.detach()
        term = v.clone()
        total = v.clone()
        n_products, finite = 0, True
        for _ in range(self.iters + 1):
            term = term - self.alpha * (_product(hvp, term) + self.damping * term)
            n_products += 1
            if not bool(th.isfinite(term).all()):
                finite = False
                break
            if n_products <= self.iters:
                total = total + term
        x = self.alpha * total
        residual_norm = float(term.norm()) if finite else math.inf
        diverged = not finite or not bool(th.isfinite(x).all()) or residual_norm > float(v.norm())
        # Every product but the last added one series term (the last gave the residual or the first non-finite term).
        info = {"iterations": float(n_products - 1), "residual_norm": residual_norm, "diverged": float(diverged)}
        return IHVPResult(x=x, n_products=n_products, converged=not diverged, info=info)


class DenseSolver(IHVPSolver):
    """Exact solve on the full matrix: ``P`` products (one batched call on the identity) and an O(P³) solve.

    Meant for small networks and as a test oracle. The ``P x P`` solve runs in float64; if the matrix is singular
    it falls back to the minimum-norm least-squares solution (pseudo-inverse) with ``converged=False`` and
    ``info["singular"] = 1.0``.

    :param damping: ``λ >= 0`` added to ``H``.
    """

    name: ClassVar[str] = "dense"

    def __init__(self, damping: float = 0.0) -> None:
        self.damping = check_float("damping", damping, minimum=0.0)

    def solve(self, hvp: HVP, v: th.Tensor) -> IHVPResult:
        _check_vector(v)
        dim = v.numel()
        eye = th.eye(dim, dtype=v.dtype, device=v.device)
        # Row i of hvp(I) is H e_i, i.e. column i of H: transpose to get H itself.
        matrix = _product(hvp, eye).to(th.float64).T
        matrix = matrix + self.damping * th.eye(dim, dtype=th.float64, device=v.device)
        v64 = v.detach().to(th.float64)
        x, status = th.linalg.solve_ex(matrix, v64.unsqueeze(-1))
        x = x.squeeze(-1)
        singular = int(status.item()) != 0 or not bool(th.isfinite(x).all())
        if singular:
            x = th.linalg.pinv(matrix) @ v64
        info = {"singular": float(singular), "residual_norm": float((matrix @ x - v64).norm())}
        return IHVPResult(x=x.to(v.dtype), n_products=dim, converged=not singular, info=info)


SOLVERS: dict[str, type[IHVPSolver]] = {
    cls.name: cls for cls in (NystromSolver, ConjugateGradientSolver, NeumannSolver, DenseSolver)
}


def make_solver(name: str | IHVPSolver | None, **kwargs: Any) -> IHVPSolver | None:
    """Build a solver from its name, pass an instance through, or return ``None`` for "no IHVP".

    :param name: one of ``"nystrom"``, ``"cg"``, ``"neumann"``, ``"dense"`` (case-insensitive), an
        :class:`IHVPSolver` instance (then ``kwargs`` must be empty), or ``None``.
    :param kwargs: constructor arguments of the named solver.
    :raises ValueError: on an unknown name, an unknown keyword, or an out-of-range value.
    :raises TypeError: on a ``name`` of the wrong type or a value of the wrong type.
    """
    if name is None:
        if kwargs:
            raise ValueError(
                f"make_solver(None) (no IHVP: nested-only) takes no solver arguments, got {sorted(kwargs)}; "
                "drop them, e.g. ihvp_kwargs={} with ihvp_solver=None"
            )
        return None
    if isinstance(name, IHVPSolver):
        if kwargs:
            raise ValueError(f"solver arguments {sorted(kwargs)} cannot be applied to an existing solver instance {name!r}")
        return name
    if not isinstance(name, str):
        raise TypeError(
            f"solver must be a name in {sorted(SOLVERS)}, an IHVPSolver instance or None, got {type(name).__name__}"
        )
    key = name.strip().lower()
    if key not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; accepted values: {', '.join(sorted(SOLVERS))}")
    cls = SOLVERS[key]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(
            f"unknown argument(s) {', '.join(map(repr, unknown))} for solver {key!r}; accepted: {', '.join(accepted)}"
        )
    return cls(**kwargs)
