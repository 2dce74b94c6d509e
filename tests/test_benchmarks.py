"""The benchmark scripts run end to end at tiny budgets: the files they promise appear, and finished runs are skipped."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _zoo_entries import tuned_blpo_entries

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"


def run_script(*args: str, cwd: Path = REPO) -> str:
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_returns_suite_writes_one_row_per_evaluation_and_resumes(tmp_path: Path) -> None:
    suite = str(BENCHMARKS / "returns" / "suite.py")
    args = ["--envs", "CartPole-v1", "--variants", "blpo", "ppo", "--seeds", "0", "--steps", "1024", "--evals", "2"]
    args += ["--eval-episodes", "1", "--jobs", "2", "--out", str(tmp_path)]
    output = run_script(suite, *args)
    assert "2 runs to do" in output
    for variant in ("blpo", "ppo"):
        rows = read_csv(tmp_path / "csv" / "CartPole-v1" / variant / "seed0.csv")
        assert [int(row["timesteps"]) for row in rows] == [512, 1024]
        assert all(9.0 <= float(row["mean_return"]) <= 500.0 for row in rows)
        assert 9.0 <= float(rows[-1]["train_return"]) <= 500.0  # from the run's Monitor files
    assert json.loads((tmp_path / "random_scores.json").read_text())["CartPole-v1"] < 50.0
    assert not (tmp_path / "logs").exists() or not any((tmp_path / "logs").iterdir())
    assert "0 runs to do" in run_script(suite, *args)
    summary = run_script(suite, *args, "--summary")
    assert "| env (training return, last 20 episodes) | BLPO (default) | PPO (zoo) |" in summary
    assert summary.count("| CartPole-v1 | ") == 2 and "(1) |" in summary


def test_returns_report_aggregates_with_rliable(tmp_path: Path) -> None:
    pytest.importorskip("rliable.library")
    results = tmp_path / "results"
    for variant in ("blpo", "ppo"):
        for seed in range(3):
            path = results / "csv" / "CartPole-v1" / variant / f"seed{seed}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            final = 400.0 + 30 * seed + (50 if variant == "blpo" else 0)
            path.write_text(f"timesteps,mean_return,std_return,episodes,seconds\n500,100,0,5,1\n1000,{final},0,5,1\n")
    (results / "random_scores.json").write_text(json.dumps({"CartPole-v1": 20.0}))
    docs = tmp_path / "docs"
    output = run_script(str(BENCHMARKS / "returns" / "report.py"), "--results", str(results), "--docs", str(docs))
    # IQM of three seeds is their middle value: 430 for PPO, 480 for BLPO (columns in --variants order, PPO first).
    assert "| CartPole-v1 | 430.0 [" in output and "| 480.0 [" in output
    assert (docs / "img" / "returns_curves.png").stat().st_size > 0
    assert (docs / "img" / "returns_profiles.png").stat().st_size > 0
    assert len(read_csv(docs / "data" / "returns_evals.csv")) == 12

    # Runs of a re-tuned entry replace the suite's blpo runs of that env in an extra "current entries" variant.
    retuned = tmp_path / "retuned"
    for seed in range(3):
        path = retuned / "csv" / "CartPole-v1" / "blpo" / f"seed{seed}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"timesteps,mean_return,std_return,episodes,seconds\n1000,{300 + 10 * seed},0,5,1\n")
    args = ["--results", str(results), "--docs", str(docs), "--current-entries", str(retuned)]
    output = run_script(str(BENCHMARKS / "returns" / "report.py"), *args)
    assert "| env | PPO (zoo) | BLPO (default) | BLPO (default), current entries |" in output
    assert "| CartPole-v1 | 430.0 [" in output and "| 480.0 [" in output and "| 310.0 [" in output
    assert len(read_csv(docs / "data" / "returns_evals.csv")) == 12  # the CSV and figures stay the suite's


def test_sample_reuse_study_reads_update_statistics_and_reports(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    script = str(BENCHMARKS / "returns" / "sample_reuse.py")
    args = ["--envs", "Pendulum-v1", "--epochs", "1", "--seeds", "0", "--steps", "8192", "--evals", "1"]
    args += ["--eval-episodes", "1", "--jobs", "2", "--out", str(tmp_path / "out")]
    assert "1 runs to do" in run_script(script, *args, "--methods", "ppo")  # one method alone
    assert "2 runs to do" in run_script(script, *args)  # the others; PPO's finished run is skipped
    for method in ("ppo", "blpo_nested", "blpo"):
        stats = json.loads((tmp_path / "out" / "stats" / "Pendulum-v1" / f"reuse_{method}_e1_c0.2" / "seed0.json").read_text())
        assert 0.0 < stats["approx_kl"] < 1.0 and 0.0 <= stats["clip_fraction"] <= 1.0  # read back from TensorBoard
    assert not any((tmp_path / "out" / "logs").iterdir())  # the logs are deleted once read
    # BLPO runs PPO's minibatches (64; BLPO's own default would be 512): the config written out says so.
    assert "batch_size: 64" in (tmp_path / "out" / "ppo_zoo_shared_v5.yml").read_text().split("Pendulum-v1:")[1][:400]
    assert "0 runs to do" in run_script(script, *args)
    output = run_script(script, *args, "--report", "--docs", str(tmp_path / "docs"))
    assert output.count("| Pendulum-v1 | 0.2 | ") == 3 and "| BLPO (same config) | 1 | 1 |" in output
    assert len(read_csv(tmp_path / "docs" / "data" / "sample_reuse.csv")) == 3
    assert (tmp_path / "docs" / "img" / "sample_reuse.png").stat().st_size > 0


def test_continual_study_and_report(tmp_path: Path) -> None:
    study = str(BENCHMARKS / "continual" / "study.py")
    results = tmp_path / "results"
    args = ["--variants", "ppo_l2_er", "reset", "ppo_head_reset", "--seeds", "0", "--tasks", "2", "--task-steps", "256"]
    run_script(study, *args, "--jobs", "2", "--out", str(results))
    for variant in ("ppo_l2_er", "reset", "ppo_head_reset"):
        run_dir = results / variant / "seed0"
        meta = json.loads((run_dir / "done.json").read_text())
        assert meta["total_timesteps"] == 2 * 256 * meta["n_envs"]
        starts = read_csv(run_dir / "task_starts.csv")
        assert sorted({(row["task"], row["group"]) for row in starts}) == [
            ("0", "actor"),
            ("0", "critic"),
            ("1", "actor"),
            ("1", "critic"),
        ]
        assert all(float(row["current_epsilon"]) > 0 for row in starts)  # the own-scale indicator is recorded too
        task0 = [row for row in starts if row["task"] == "0"]
        assert all(row["current_epsilon"] == row["trainability_epsilon"] for row in task0)  # the scales agree at task 0
        assert [row["task"] for row in read_csv(run_dir / "rollouts.csv")] == ["0", "1"]
        assert {row["task"] for row in read_csv(run_dir / "episodes.csv")} == {"0", "1"}
    assert json.loads((results / "ppo_l2_er" / "seed0" / "done.json").read_text())["regularizer"]["erank_mode"] == "ascent"
    assert json.loads((results / "ppo_head_reset" / "seed0" / "done.json").read_text())["head_reset"] is True
    assert "0 runs to do" in run_script(study, *args, "--out", str(results))
    docs = tmp_path / "docs"
    report = ["report.py", "--results", str(results), "--docs", str(docs), "--prefix", "small"]
    output = run_script(*report, cwd=BENCHMARKS / "continual")
    assert "| PPO+L2+ER | 1 |" in output and "| PPO, reset at each task | 1 |" in output
    assert "| PPO, policy head reset at each task | 1 |" in output
    # One task-1 point per variant: three with the reset variant, two without it (too few: a dash).
    assert re.search(r"\| ε-rank, ε = 0\.01 \| actor \| \d\.\d\d \([+−]\) \| – \| 3 \|", output)
    assert "| trainability ratio, own scale (÷ task-0 ε-rank) | critic |" in output
    assert re.search(
        r"\| PPO\+L2\+ER \| actor \| [\d.]+ ± [\d.]+ \| [\d.]+ ± [\d.]+ \| [\d.]+ ± [\d.]+ \| \d+% \| \d+% \|", output
    )
    for name in ("small_returns", "small_curvature", "small_features"):
        assert (docs / "img" / f"{name}.png").stat().st_size > 0
    assert len(read_csv(docs / "data" / "small_returns.csv")) == 6


def test_continual_report_leaves_out_runs_recorded_before_the_own_scale_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    import pandas as pd

    monkeypatch.syspath_prepend(str(BENCHMARKS))  # report.py imports analysis.py from the benchmarks folder
    monkeypatch.syspath_prepend(str(BENCHMARKS / "continual"))  # and study.py from its own
    report = _load(BENCHMARKS / "continual" / "report.py")
    rows = []
    for variant, current in (("ppo", 0.1), ("reset", None)):  # reset: an older run without the own-scale columns
        for seed in (1, 2):
            for task in (0, 1, 2):
                for group in ("actor", "critic"):
                    ratio = 1.0 if task == 0 else current
                    rows.append(
                        dict(variant=variant, seed=seed, task=task, group=group, trainability_ratio=1.0, current_ratio=ratio)
                    )
    table = report.current_scale_table(pd.DataFrame(rows), ["ppo", "reset"])
    assert "| PPO | actor | 1.00 ± 0.00 | 0.10 ± 0.00 | 0.10 ± 0.00 | 100% | 0% |" in table
    assert "reset at each task" not in table


def test_tensorboard_screenshot_from_a_headless_browser(tmp_path: Path) -> None:
    script = str(BENCHMARKS / "screenshots" / "tensorboard_layout.py")
    missing = subprocess.run(
        [sys.executable, script, "--logdir", str(tmp_path), "--out", str(tmp_path / "x.png"), "--browser", "/no/browser"],
        capture_output=True,
        text=True,
    )
    assert missing.returncode != 0 and "no browser at --browser '/no/browser'" in missing.stderr
    if shutil.which("chromium") is None and shutil.which("google-chrome") is None:
        pytest.skip("no Chromium on this machine: only the refusal is checked")
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path / "run")) as writer:
        for step in range(5):
            writer.add_scalar("rollout/ep_rew_mean", float(step), step)
    run_script(script, "--logdir", str(tmp_path), "--out", str(tmp_path / "shot.png"), "--tab", "scalars",
               "--height", "600", "--render-ms", "5000")  # fmt: skip
    assert (tmp_path / "shot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_walltime_reports_ratios_and_update_shares(tmp_path: Path) -> None:
    out = tmp_path / "walltime.json"
    args = ["--envs", "CartPole-v1", "--variants", "blpo", "--comparisons", "identical", "--steps", "512"]
    run_script(str(BENCHMARKS / "cost" / "walltime.py"), *args, "--rounds", "1", "--out", str(out))
    result = json.loads(out.read_text())["results"]["CartPole-v1"]["identical"]
    assert result["overrides"]["blpo"]["n_epochs"] == 20  # PPO's zoo entry, applied to BLPO
    assert result["overrides"]["blpo"]["policy_kwargs"] == "dict()"  # zoo's entry has none: SB3's default networks
    blpo = result["variants"]["blpo"]
    assert blpo["median_ratio"] > 0 and result["variants"]["ppo"]["median_ratio"] == 1.0
    assert blpo["median_cpu_ratio"] > 0 and result["variants"]["ppo"]["median_cpu_ratio"] == 1.0
    shares = blpo["share_of_update"]
    assert 0 < shares["seconds_ihvp"] < shares["seconds_hypergradient"] < 1
    assert 0 < shares["seconds_nested_critic"] + shares["seconds_hypergradient"] < 1


def _load(script: Path):  # type: ignore[no-untyped-def]
    import importlib.util

    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(script.stem + "_under_test", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "script, options",
    [
        (
            "returns/suite.py",
            dict(
                envs=["CartPole-v1", "Pendulum-v1"],
                variants=["blpo", "ppo", "blpo_dropin"],
                seeds=[0, 1, 2],
                steps=None,
                profile="cpu",
            ),
        ),
        ("continual/study.py", dict(variants=["ppo", "ppo_l2", "reset"], seeds=[1, 2, 3, 4, 5])),
        ("tuning/tune.py", dict(envs=["Acrobot-v1", "LunarLander-v3", "Pendulum-v1"], workers=3)),
    ],
)
@pytest.mark.parametrize("n_shards", [2, 3, 7])
def test_shards_cover_each_campaign_exactly_once(script: str, options: dict, n_shards: int) -> None:
    """``--shard I/N`` over I = 0..N−1 runs every run of the campaign once: disjoint slices of one fixed list."""
    import argparse

    module = _load(BENCHMARKS / script)
    from sharding import parse_shard, select_shard

    full = module.run_list(argparse.Namespace(**options))
    assert len(full) == len(set(full)) > n_shards
    shards = [select_shard(full, parse_shard(f"{index}/{n_shards}")) for index in range(n_shards)]
    assert sorted(run for shard in shards for run in shard) == sorted(full)
    assert all(shard for shard in shards)


@pytest.mark.parametrize("spec", ["2/2", "-1/3", "1", "a/b", "1/0"])
def test_bad_shard_is_refused_by_name(spec: str) -> None:
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "tuning" / "tune.py"), f"--shard={spec}"], capture_output=True, text=True
    )
    assert result.returncode == 2 and "--shard must be I/N with integers 0 <= I < N" in result.stderr


def test_suite_main_runs_exactly_its_shard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``suite.py --shard I/N`` (through main(), with the training replaced by a recorder) runs its slice only, and the
    slices of all shards are the whole suite once."""
    suite = _load(BENCHMARKS / "returns" / "suite.py")
    ran: list[list[tuple[str, str, int]]] = []
    monkeypatch.setattr(suite, "random_scores", lambda out, envs: {})
    monkeypatch.setattr(
        suite, "run", lambda env_id, variant, seed, steps, args: ran[-1].append((env_id, variant, seed)) or "ok"
    )
    common = ["suite.py", "--envs", "CartPole-v1", "Pendulum-v1", "--variants", "blpo", "ppo", "--seeds", "0", "1", "2"]
    for index in range(3):
        ran.append([])
        monkeypatch.setattr(sys, "argv", [*common, "--out", str(tmp_path), "--shard", f"{index}/3"])
        suite.main()
    full = [
        (env, variant, seed) for seed in (0, 1, 2) for env in ("CartPole-v1", "Pendulum-v1") for variant in ("blpo", "ppo")
    ]
    assert all(len(shard) == 4 for shard in ran)
    assert sorted(run for shard in ran for run in shard) == sorted(full)


def test_suite_skips_a_run_finished_by_another_process(tmp_path: Path) -> None:
    """Two processes over overlapping run lists: a run whose CSV appeared after the list was made is not redone."""
    suite = _load(BENCHMARKS / "returns" / "suite.py")
    target = suite.csv_path(tmp_path, "CartPole-v1", "blpo", 0)
    target.parent.mkdir(parents=True)
    target.write_text("timesteps\n")
    args = suite.argparse.Namespace(out=tmp_path)
    assert suite.run("CartPole-v1", "blpo", 0, 1024, args) == "skipped (finished elsewhere)"
    assert target.read_text() == "timesteps\n" and not (tmp_path / "logs").exists()


def test_every_suite_variant_has_its_own_colour(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS / "returns"))  # report.py imports suite.py from its own folder
    report = _load(BENCHMARKS / "returns" / "report.py")
    assert set(report.COLORS) == set(report.LABELS)
    assert len(set(report.COLORS.values())) == len(report.COLORS)


@pytest.mark.parametrize("env_id", tuned_blpo_entries())
def test_solver_ablations_build_on_every_tuned_entry(env_id: str, tmp_path: Path) -> None:
    """Nested-only and CG replace a tuned entry's Nyström settings (rank, rho) rather than fail on them."""
    import argparse

    from sb3_blpo.zoo.cli import register
    from sb3_blpo.zoo.exp_manager import CheckedExperimentManager

    walltime = _load(BENCHMARKS / "cost" / "walltime.py")
    register()
    for variant, solver in (("blpo", "nystrom"), ("blpo_nested", None), ("blpo_cg", "cg")):
        manager = CheckedExperimentManager(
            argparse.Namespace(),
            "blpo",
            env_id,
            str(tmp_path / "logs"),
            n_timesteps=64,
            eval_freq=-1,
            seed=0,
            hyperparams=walltime.overrides_for(variant, "recommended", env_id, tmp_path),
            config=walltime.config_for(variant, tmp_path, "recommended"),
            verbose=0,
            log_interval=-1,
        )
        model, _ = manager.setup_experiment()
        assert model.ihvp_solver == solver
        assert (model.ihvp_kwargs == {}) == (variant != "blpo"), model.ihvp_kwargs
        model.env.close()
