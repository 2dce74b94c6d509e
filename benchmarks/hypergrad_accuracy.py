"""Accuracy of the IHVP solvers on real critic Hessians: Nyström (rank, ρ) and CG (iterations) vs the dense solve.

A BLPO agent is trained for ``--steps`` on each env (recommended config, default 64-64 networks so that the critic's
Hessian fits in memory as a dense matrix). On one minibatch of its last rollout, after the nested critic steps, the
script builds exactly what BLPO's actor step uses — the actor loss ``f``, the coupled critic objective ``g`` — and
computes, with the dense ``H = ∇²ww g`` (float64),

* the exact damped correction ``u*_ρ = ∇²θw g · (H + ρI)⁻¹ ∇w f`` from the eigendecomposition of ``H``, for every ridge
  ``ρ`` that a solver uses. The undamped ``H⁻¹`` is not a usable reference: ``H`` of a minibatch MSE is rank-deficient
  (thousands of parameters, hundreds of samples; thousands of eigenvalues below 1e-6·max|λ|), and its pseudo-inverse
  solution changed by an order of magnitude between two runs of this script;
* for Nyström at each rank ``k`` and ridge ``ρ`` (``--draws`` random column sets), for the curvature-free ``x = v/ρ``
  (rank 0: what the sampled columns improve on) and for CG at each iteration budget:
  the norm ratio ``‖u‖ / ‖u*_ρ‖``, the relative error ``‖u − u*_ρ‖ / ‖u*_ρ‖``, the cosine to ``u*_ρ`` and the cosine of
  the resulting hypergradient ``∇θf − u`` to the exact ``∇θf − u*_ρ`` (both before BLPO's norm bound). Cost is
  counted in Hessian-vector products (Nyström: ``k``; CG: its iterations).

Writes ``docs/data/hypergrad_accuracy.csv`` and ``docs/img/hypergrad_accuracy.png``; prints the markdown table that
``docs/benchmarks.md`` quotes.

Usage::

    python benchmarks/hypergrad_accuracy.py [--envs CartPole-v1 Hopper-v5] [--steps 20000]
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict
from pathlib import Path

import pandas as pd
import torch as th
import yaml

from sb3_blpo import BLPO
from sb3_blpo.hypergrad import ConjugateGradientSolver, HessianVectorProduct, NystromSolver, flatten

REPO = Path(__file__).resolve().parents[1]
RANKS = (1, 2, 5, 10, 20, 40, 64)
RHOS = (0.01, 0.1, 1.0, 10.0)
CG_ITERATIONS = (1, 2, 5, 10, 20, 40, 64)
# CG's damping: BLPO's default 0.1, Nyström's default ρ, and one above |λmin| of these Hessians (no negative curvature).
CG_DAMPINGS = (0.1, 1.0, 10.0)
DEFAULT_RHO = 1.0
DEFAULT_RANK = 5


def blpo_config(entry: dict) -> dict:
    """A zoo_hyperparams/blpo.yml entry as BLPO keyword arguments, with SB3's default 64-64 networks."""
    config = {k: v for k, v in entry.items() if k not in ("n_timesteps", "policy", "normalize", "policy_kwargs", "n_envs")}
    for key, value in list(config.items()):
        if isinstance(value, str) and value.startswith("lin_"):
            config[key] = float(value[4:])  # constant: only the state after training matters here
    return config


def build_problem(env_id: str, steps: int, seed: int, coupling: str):
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    entry = yaml.safe_load((REPO / "zoo_hyperparams" / "blpo.yml").read_text())[env_id]
    env = make_vec_env(env_id, n_envs=int(entry.get("n_envs", 1)), seed=seed)
    if entry.get("normalize"):
        env = VecNormalize(env)
    model = BLPO("MlpPolicy", env, seed=seed, coupling=coupling, **blpo_config(entry))
    model.learn(steps)
    rollout = model._rollout_tensors()
    batch = next(iter(rollout.minibatches(model.batch_size)))
    model._nested_critic_steps(batch)
    clip_range = model.clip_range(model._current_progress_remaining)
    f, _ = model._actor_objective(rollout, batch, clip_range, defaultdict(list))
    g = model._coupled_critic_objective(rollout, batch)
    return model, f, g


def evaluate(env_id: str, steps: int, seed: int, draws: int, coupling: str) -> list[dict]:
    model, f, g = build_problem(env_id, steps, seed, coupling)
    actor, critic = model._actor_params, model._critic_params
    grads = th.autograd.grad(f, actor + critic, retain_graph=True, allow_unused=True)
    direct = flatten(grads[: len(actor)], like=actor).detach().double()
    v = flatten(grads[len(actor) :], like=critic).detach()
    hvp = HessianVectorProduct(g, critic)
    hessian = hvp.dense().double()
    eigenvalues, eigenvectors = th.linalg.eigh((hessian + hessian.T) / 2)
    v_eigen = eigenvectors.T @ v.double()
    near_zero = int((eigenvalues.abs() < 1e-6 * eigenvalues.abs().max()).sum())
    print(
        f"{env_id} ({coupling} coupling): {len(v)} critic parameters, "
        f"eigenvalues of H in [{eigenvalues[0]:.3g}, {eigenvalues[-1]:.3g}], {near_zero} below 1e-6·max|λ|; "
        f"‖∇θf‖ {direct.norm():.3g}",
        flush=True,
    )

    def correction(x: th.Tensor) -> th.Tensor:
        return hvp.mixed_product(actor, x.to(v.dtype)).detach().double()

    def exact(rho: float) -> th.Tensor:
        """``u*_ρ``: the correction with the exact ``(H + ρI)⁻¹ v`` (from the eigendecomposition)."""
        return correction(eigenvectors @ (v_eigen / (eigenvalues + rho)))

    def rel(a: th.Tensor, b: th.Tensor) -> float:
        return float((a - b).norm() / b.norm()) if b.norm() > 0 else math.nan

    def cos(a: th.Tensor, b: th.Tensor) -> float:
        return float(th.nn.functional.cosine_similarity(a, b, dim=0))

    def row(solver: str, setting: dict, products: int, u: th.Tensor, rho: float, reference: th.Tensor) -> dict:
        return dict(
            env=env_id,
            coupling=coupling,
            solver=solver,
            rho=rho,
            **setting,
            hvps=products,
            norm_ratio=float(u.norm() / reference.norm()),
            rel_error=rel(u, reference),
            cosine=cos(u, reference),
            hypergrad_cosine=cos(direct - u, direct - reference),
            exact_correction_to_direct=float(reference.norm() / direct.norm()),
            exact_correction_cosine_to_direct=cos(reference, direct),
        )

    rows = []
    for rho in sorted(set(RHOS) | set(CG_DAMPINGS)):
        reference = exact(rho)
        if rho in RHOS:
            # Rank 0, no curvature at all: x = v / ρ. What the sampled columns add is measured against this.
            rows.append(row("identity", dict(rank=0), 0, correction(v / rho), rho, reference))
            for rank in RANKS:
                for draw in range(draws):
                    solved = NystromSolver(rank=rank, rho=rho, seed=draw).solve(hvp, v)
                    setting = dict(rank=rank, draw=draw)
                    rows.append(row("nystrom", setting, solved.n_products, correction(solved.x), rho, reference))
        if rho in CG_DAMPINGS:
            for iterations in CG_ITERATIONS:
                solved = ConjugateGradientSolver(max_iter=iterations, damping=rho, tol=1e-10).solve(hvp, v)
                setting = dict(iterations=iterations, converged=float(solved.converged))
                rows.append(row("cg", setting, solved.n_products, correction(solved.x), rho, reference))
    return rows


def plot(table: pd.DataFrame, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    envs = list(dict.fromkeys(table["env"]))
    fig, axes = plt.subplots(2, len(envs), figsize=(5.5 * len(envs), 7), squeeze=False)
    for column, env in enumerate(envs):
        rows = table[table["env"] == env]
        for metric, ax in (("rel_error", axes[0, column]), ("hypergrad_cosine", axes[1, column])):
            for rho in RHOS:
                nystrom = rows[(rows["solver"] == "nystrom") & (rows["rho"] == rho)].groupby("hvps")[metric].median()
                ax.plot(nystrom.index, nystrom.values, marker="o", ms=3, label=f"Nyström ρ={rho:g}")
            for damping in CG_DAMPINGS:
                cg = rows[(rows["solver"] == "cg") & (rows["rho"] == damping)].groupby("hvps")[metric].median()
                ax.plot(cg.index, cg.values, marker="s", ms=3, ls="--", label=f"CG damping {damping:g}")
            ax.set(xscale="log", xlabel="Hessian-vector products", title=env)
        axes[0, column].set(yscale="log", ylabel="‖u − u*_ρ‖ / ‖u*_ρ‖ (median over draws)")
        axes[1, column].set(ylabel="cos(∇θf − u, ∇θf − u*_ρ)")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def markdown(table: pd.DataFrame) -> str:
    lines = [
        "| env | solver | setting | HVPs | ‖u‖ / ‖u*_ρ‖ | ‖u − u*_ρ‖ / ‖u*_ρ‖ | cos(u, u*_ρ) | cos(∇θf − u, ∇θf − u*_ρ) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for env in dict.fromkeys(table["env"]):
        rows = table[table["env"] == env]
        picks = [
            (solver, rank, rho)
            for rho in (0.1, 1.0, 10.0)
            for solver, rank in (("identity", 0), *(("nystrom", k) for k in (1, 5, 20, 64)))
        ]
        picks += [("cg", iterations, rho) for rho in CG_DAMPINGS for iterations in (5, 20, 64)]
        for solver, size, rho in picks:
            key = "iterations" if solver == "cg" else "rank"
            sel = rows[(rows["solver"] == solver) & (rows[key] == size) & (rows["rho"] == rho)]
            if sel.empty:
                continue
            med = sel.median(numeric_only=True)
            setting = f"{size} iterations, damping {rho:g}" if solver == "cg" else f"rank {size}, ρ {rho:g}"
            lines.append(
                f"| {env} | {solver} | {setting} | {med['hvps']:.0f} | {med['norm_ratio']:.3g} | {med['rel_error']:.3g} | "
                f"{med['cosine']:.3f} | {med['hypergrad_cosine']:.3f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", nargs="+", default=["CartPole-v1", "Hopper-v5"])
    parser.add_argument("--steps", type=int, default=20_000, help="BLPO training steps before the measurement")
    parser.add_argument("--draws", type=int, default=5, help="Nyström column draws per (rank, ρ)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--couplings", nargs="+", default=["distribution", "target"], help="BLPO couplings; the plot shows the first"
    )
    parser.add_argument("--docs", type=Path, default=REPO / "docs")
    args = parser.parse_args()
    th.set_num_threads(1)
    rows = [
        row
        for coupling in args.couplings
        for env_id in args.envs
        for row in evaluate(env_id, args.steps, args.seed, args.draws, coupling)
    ]
    table = pd.DataFrame(rows)
    (args.docs / "data").mkdir(parents=True, exist_ok=True)
    (args.docs / "img").mkdir(parents=True, exist_ok=True)
    table.to_csv(args.docs / "data" / "hypergrad_accuracy.csv", index=False)
    plot(table[table["coupling"] == args.couplings[0]], args.docs / "img" / "hypergrad_accuracy.png")
    for coupling in args.couplings:
        print(f"\n{coupling} coupling\n")
        print(markdown(table[table["coupling"] == coupling]))
    default = table[(table["solver"] == "nystrom") & (table["rank"] == DEFAULT_RANK) & (table["rho"] == DEFAULT_RHO)]
    columns = ["norm_ratio", "cosine", "rel_error", "hypergrad_cosine", "exact_correction_to_direct"]
    columns.append("exact_correction_cosine_to_direct")
    summary = default.groupby(["coupling", "env"])[columns].median().round(4)
    print("\nNyström at the default (rank 5, ρ 1):\n", summary.to_string())


if __name__ == "__main__":
    main()
