"""Accuracy of the IHVP solvers on real critic curvature: Nyström (rank, ridge) and CG (iterations) vs a dense solve.

A BLPO agent (its default: improvement-form leader objective, target coupling) is trained for ``--steps`` on each env
(recommended config, SB3's default 64-64 networks so that the critic's curvature fits in memory as a dense matrix).
On one minibatch of its last rollout (the actor has moved away from the rollout policy, so ``∇w f ≠ 0``), after the
nested critic steps, the script builds exactly what BLPO's actor step uses — the leader loss ``f``, the follower
objective ``g̃`` — and, for both curvatures BLPO offers (``C`` = the Gauss–Newton matrix of ``g̃``, PSD, the default;
``C`` = its Hessian, indefinite), the dense ``C`` in float64. Then:

* the exact damped correction ``u*_ρ = ∂²g̃/∂θ∂w · (C + ρI)⁻¹ ∇w f`` from the eigendecomposition of ``C``, at the ridge
  each approximation actually used (Nyström with ``relative_rho`` picks its ridge per draw from the sampled diagonal);
* for Nyström (PSD core) at each rank ``k`` and ridge (``--draws`` random column sets), for the curvature-free
  ``x = v/ρ`` (rank 0) and for CG at each iteration budget: the norm ratio ``‖u‖ / ‖u*_ρ‖``, the relative error
  ``‖u − u*_ρ‖ / ‖u*_ρ‖``, the cosine to ``u*_ρ`` and the cosine of the hypergradient ``∇θf − u`` to ``∇θf − u*_ρ``.
  Cost is counted in curvature-vector products (Nyström: ``k``; CG: its iterations) plus the one mixed product.

Writes ``docs/data/hypergrad_accuracy.csv`` and ``docs/img/hypergrad_accuracy.png``; prints the markdown tables that
``docs/benchmarks.md`` quotes.

Usage::

    python benchmarks/hypergrad_accuracy.py [--envs CartPole-v1 Hopper-v5] [--steps 20000]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pandas as pd
import torch as th
import yaml

from sb3_blpo import BLPO
from sb3_blpo.hypergrad import ConjugateGradientSolver, GaussNewtonProduct, HessianVectorProduct, NystromSolver, flatten

REPO = Path(__file__).resolve().parents[1]
RANKS = (1, 2, 5, 10, 20, 40, 64)
# Ridges: absolute values, and multiples of the sampled mean diagonal (``relative_rho=True``).
RIDGES = {"absolute": (0.01, 0.1, 1.0, 10.0), "relative": (0.1, 1.0, 10.0, 100.0)}
CG_ITERATIONS = (1, 2, 5, 10, 20, 40, 64)
# Nyström variants (sketch, preconditioned-CG steps, ridge kind): the column sampling of the paper and the authors, the
# Gaussian sketch, each with and without refinement, and the relative ridge with the default sketch and refinement.
NYSTROM_SETTINGS = (
    ("columns", 0, "absolute"),
    ("columns", 2, "absolute"),
    ("gaussian", 0, "absolute"),
    ("gaussian", 2, "absolute"),
    ("gaussian", 2, "relative"),
)
CG_DAMPINGS = (0.1, 1.0, 10.0)
CURVATURES = ("gauss_newton", "hessian")
#: BLPO's default solver settings (``NystromSolver()`` and ``curvature="gauss_newton"``).
_DEFAULT_SOLVER = NystromSolver()
DEFAULT = dict(
    rank=_DEFAULT_SOLVER.rank,
    ridge="relative" if _DEFAULT_SOLVER.relative_rho else "absolute",
    rho=_DEFAULT_SOLVER.rho,
    sketch=_DEFAULT_SOLVER.sketch,
    pcg_steps=_DEFAULT_SOLVER.pcg_steps,
)


def blpo_config(entry: dict) -> dict:
    """A zoo_hyperparams/blpo.yml entry as BLPO keyword arguments, with SB3's default 64-64 networks."""
    config = {k: v for k, v in entry.items() if k not in ("n_timesteps", "policy", "normalize", "policy_kwargs", "n_envs")}
    for key, value in list(config.items()):
        if isinstance(value, str) and value.startswith("lin_"):
            config[key] = float(value[4:])  # constant: only the state after training matters here
    return config


def build_problem(env_id: str, steps: int, seed: int):
    """Train BLPO, then build the leader loss, the follower objective and its outputs on one minibatch."""
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    entry = yaml.safe_load((REPO / "zoo_hyperparams" / "blpo.yml").read_text())[env_id]
    env = make_vec_env(env_id, n_envs=int(entry.get("n_envs", 1)), seed=seed)
    if entry.get("normalize"):
        env = VecNormalize(env)
    model = BLPO("MlpPolicy", env, seed=seed, **blpo_config(entry))
    model.learn(steps)
    rollout, follower = model._bilevel_rollout(), model._follower()
    batch = next(iter(rollout.minibatches(model.batch_size)))
    ratios = model._rollout_ratios(rollout)
    follower.nested_steps(rollout, batch, ratios)
    clip_range = model.clip_range(model._current_progress_remaining)
    f, _, _ = model._actor_objective(follower, rollout, batch, clip_range)
    g, values, weights = follower.loss(rollout, batch, ratios)
    return model, f, g, values, weights


def evaluate(env_id: str, steps: int, seed: int, draws: int) -> list[dict]:
    model, f, g, values, weights = build_problem(env_id, steps, seed)
    actor, critic = model._actor_params, model._critic_params
    grads = th.autograd.grad(f, actor + critic, retain_graph=True, allow_unused=True)
    direct = flatten(grads[: len(actor)], like=actor).detach().double()
    v = flatten(grads[len(actor) :], like=critic).detach()
    hessian = HessianVectorProduct(g, critic)
    scale = th.full_like(values, 2.0 / len(values)) if weights is None else weights.detach() * 2.0 / len(values)
    operators = {"gauss_newton": GaussNewtonProduct(values, critic, weights=scale), "hessian": hessian}

    def correction(x: th.Tensor) -> th.Tensor:
        return hessian.mixed_product(actor, x.to(v.dtype)).detach().double()

    rows = []
    for curvature in CURVATURES:
        rows += [
            dict(env=env_id, curvature=curvature, **row)
            for row in solver_rows(operators[curvature], v, direct, correction, draws)
        ]
        print(f"{env_id} ({curvature}): ‖∇θf‖ {direct.norm():.3g}, ‖∇w f‖ {v.norm():.3g}", flush=True)
    return rows


def solver_rows(operator, v: th.Tensor, direct: th.Tensor, correction, draws: int) -> list[dict]:
    """Every solver setting on one curvature operator, against the exact damped correction at its ridge."""
    matrix = operator.dense().double()
    eigenvalues, eigenvectors = th.linalg.eigh((matrix + matrix.T) / 2)
    v_eigen = eigenvectors.T @ v.double()
    near_zero = int((eigenvalues.abs() < 1e-6 * eigenvalues.abs().max()).sum())
    print(
        f"  {len(v)} critic parameters, eigenvalues in [{eigenvalues[0]:.3g}, {eigenvalues[-1]:.3g}], "
        f"mean diagonal {matrix.diagonal().mean():.3g}, {near_zero} below 1e-6·max|λ|",
        flush=True,
    )
    exact_cache: dict[float, th.Tensor] = {}

    def exact(rho: float) -> th.Tensor:
        """``u*_ρ``: the correction with the exact ``(C + ρI)⁻¹ v`` (from the eigendecomposition)."""
        if rho not in exact_cache:
            exact_cache[rho] = correction(eigenvectors @ (v_eigen / (eigenvalues + rho)))
        return exact_cache[rho]

    def rel(a: th.Tensor, b: th.Tensor) -> float:
        return float((a - b).norm() / b.norm()) if b.norm() > 0 else math.nan

    def cos(a: th.Tensor, b: th.Tensor) -> float:
        return float(th.nn.functional.cosine_similarity(a, b, dim=0))

    def row(solver: str, ridge: str, rho: float, effective_rho: float, products: int, u: th.Tensor, **setting) -> dict:
        reference = exact(effective_rho)
        return dict(
            solver=solver,
            ridge=ridge,
            rho=rho,
            effective_rho=effective_rho,
            **setting,
            products=products,
            norm_ratio=float(u.norm() / reference.norm()),
            rel_error=rel(u, reference),
            cosine=cos(u, reference),
            hypergrad_cosine=cos(direct - u, direct - reference),
            exact_correction_to_direct=float(reference.norm() / direct.norm()),
            exact_correction_cosine_to_direct=cos(reference, direct),
        )

    rows = []
    for rho in RIDGES["absolute"]:
        # Rank 0, no curvature at all: x = v / ρ. What the sketch adds is measured against this.
        rows.append(row("identity", "absolute", rho, rho, 0, correction(v / rho), rank=0))
    for sketch, pcg_steps, ridge in NYSTROM_SETTINGS:
        for rho in RIDGES[ridge]:
            for rank in RANKS:
                for draw in range(draws):
                    solver = NystromSolver(
                        rank=rank, rho=rho, seed=draw, relative_rho=ridge == "relative", sketch=sketch, pcg_steps=pcg_steps
                    )
                    solved = solver.solve(operator, v)
                    u = correction(solved.x)
                    setting = dict(rank=rank, draw=draw, sketch=sketch, pcg_steps=pcg_steps)
                    rows.append(row("nystrom", ridge, rho, solved.info["rho"], solved.n_products, u, **setting))
    for damping in CG_DAMPINGS:
        for iterations in CG_ITERATIONS:
            solved = ConjugateGradientSolver(max_iter=iterations, damping=damping, tol=1e-10).solve(operator, v)
            rows.append(
                row("cg", "absolute", damping, damping, solved.n_products, correction(solved.x), iterations=iterations)
            )
    return rows


def _label(ridge: str, rho: float) -> str:
    return f"ρ {rho:g}" if ridge == "absolute" else f"ρ {rho:g}×mean diag"


def plot(table: pd.DataFrame, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    envs = list(dict.fromkeys(table["env"]))
    fig, axes = plt.subplots(2, len(envs), figsize=(5.5 * len(envs), 7), squeeze=False)
    for column, env in enumerate(envs):
        rows = table[table["env"] == env]
        for metric, ax in (("rel_error", axes[0, column]), ("hypergrad_cosine", axes[1, column])):
            for sketch, pcg_steps, ridge in NYSTROM_SETTINGS:
                for rho in (0.1, 1.0) if ridge == "absolute" else ():
                    sel = rows[
                        (rows["solver"] == "nystrom")
                        & (rows["sketch"] == sketch)
                        & (rows["pcg_steps"] == pcg_steps)
                        & (rows["ridge"] == ridge)
                        & (rows["rho"] == rho)
                    ]
                    median = sel.groupby("products")[metric].median()
                    label = f"Nyström {sketch}, {pcg_steps} PCG, {_label(ridge, rho)}"
                    ax.plot(median.index, median.values, "-" if rho == 1.0 else ":", marker="o", ms=3, label=label)
            for damping in CG_DAMPINGS:
                cg = rows[(rows["solver"] == "cg") & (rows["rho"] == damping)].groupby("products")[metric].median()
                ax.plot(cg.index, cg.values, marker="s", ms=3, ls="--", label=f"CG damping {damping:g}")
            ax.set(xscale="log", xlabel="curvature-vector products", title=f"{env} (Gauss–Newton)")
        axes[0, column].set(yscale="log", ylabel="‖u − u*_ρ‖ / ‖u*_ρ‖ (median over draws)")
        axes[1, column].set(ylabel="cos(∇θf − u, ∇θf − u*_ρ)")
    axes[0, 0].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def markdown(table: pd.DataFrame) -> str:
    lines = [
        "| env | curvature | solver | setting | products | ‖u‖ / ‖u*_ρ‖ | ‖u − u*_ρ‖ / ‖u*_ρ‖ | cos(u, u*_ρ) | "
        "cos(∇θf − u, ∇θf − u*_ρ) | ‖u*_ρ‖ / ‖∇θf‖ |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    picks: list[tuple[str, dict]] = [("identity", dict(ridge="absolute", rho=1.0, rank=0))]
    for sketch, pcg_steps, ridge in NYSTROM_SETTINGS:
        for rho in (0.1, 1.0, 10.0) if ridge == "absolute" else (10.0,):
            for rank in (5, 20):
                picks.append(("nystrom", dict(sketch=sketch, pcg_steps=pcg_steps, ridge=ridge, rho=rho, rank=rank)))
    picks += [("cg", dict(rho=damping, iterations=iterations)) for damping in CG_DAMPINGS for iterations in (5, 7, 20)]
    for (env, curvature), rows in table.groupby(["env", "curvature"], sort=False):
        for solver, setting in picks:
            sel = rows[rows["solver"] == solver]
            for key, value in setting.items():
                sel = sel[sel[key] == value]
            if sel.empty:
                continue
            med = sel.median(numeric_only=True)
            if solver == "cg":
                label = f"{setting['iterations']} iterations, damping {setting['rho']:g}"
            elif solver == "identity":
                label = "x = v/ρ, ρ 1"
            else:
                label = (
                    f"{setting['sketch']}, {setting['pcg_steps']} PCG, rank {setting['rank']}, "
                    f"{_label(setting['ridge'], setting['rho'])}"
                )
            lines.append(
                f"| {env} | {curvature} | {solver} | {label} | {med['products']:.0f} | {med['norm_ratio']:.3g} | "
                f"{med['rel_error']:.3g} | {med['cosine']:.3f} | {med['hypergrad_cosine']:.3f} | "
                f"{med['exact_correction_to_direct']:.3g} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", nargs="+", default=["CartPole-v1", "Hopper-v5"])
    parser.add_argument("--steps", type=int, default=20_000, help="BLPO training steps before the measurement")
    parser.add_argument("--draws", type=int, default=5, help="Nyström column draws per (rank, ridge)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--docs", type=Path, default=REPO / "docs")
    args = parser.parse_args()
    th.set_num_threads(1)
    table = pd.DataFrame([row for env_id in args.envs for row in evaluate(env_id, args.steps, args.seed, args.draws)])
    (args.docs / "data").mkdir(parents=True, exist_ok=True)
    (args.docs / "img").mkdir(parents=True, exist_ok=True)
    table.to_csv(args.docs / "data" / "hypergrad_accuracy.csv", index=False)
    plot(table[table["curvature"] == "gauss_newton"], args.docs / "img" / "hypergrad_accuracy.png")
    print(markdown(table))
    default = table[
        (table["solver"] == "nystrom")
        & (table["curvature"] == "gauss_newton")
        & (table["rank"] == DEFAULT["rank"])
        & (table["ridge"] == DEFAULT["ridge"])
        & (table["rho"] == DEFAULT["rho"])
        & (table["sketch"] == DEFAULT["sketch"])
        & (table["pcg_steps"] == DEFAULT["pcg_steps"])
    ]
    columns = ["products", "norm_ratio", "cosine", "rel_error", "hypergrad_cosine", "exact_correction_to_direct"]
    print(f"\nNyström at BLPO's default ({DEFAULT}, Gauss–Newton), medians over draws:")
    print(default.groupby("env")[columns].median().round(4).to_string())


if __name__ == "__main__":
    main()
