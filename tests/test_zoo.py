"""rl-zoo3 integration: the ``sb3-blpo-zoo`` launcher end to end, the packaged configs, BLPO's Optuna search space,
shared-storage tuning with two worker processes, and clear one-line errors for bad input.

End-to-end runs are subprocesses of ``python -m sb3_blpo.zoo`` (what the console script runs) with a few hundred env
steps each; bad-input cases call :func:`sb3_blpo.zoo.main` in-process (they fail before anything is built).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import rl_zoo3
import yaml
from _zoo_entries import is_tuned_entry

from sb3_blpo import BLPO
from sb3_blpo.zoo import config_path, main, register
from sb3_blpo.zoo.hyperparams_opt import convert_blpo_params, sample_blpo_params
from sb3_blpo.zoo.storage import check_storage, open_storage

REPO_ROOT = Path(__file__).resolve().parents[1]
SUBPROCESS_TIMEOUT = 600
FAST = ["--num-threads", "1", "--eval-freq", "-1"]
MUJOCO_V5 = ("HalfCheetah-v5", "Hopper-v5", "Walker2d-v5", "Ant-v5", "Humanoid-v5")
# The env ids of blpo.yml; "default" is exercised through an env without an entry.
BLPO_ENTRIES = ("CartPole-v1", "Acrobot-v1", "LunarLander-v3", "Pendulum-v1", "MountainCarContinuous-v0", *MUJOCO_V5)


def zoo(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python -m sb3_blpo.zoo ARGS`` in ``cwd``; fail the test with its output when ``check`` and it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    result = subprocess.run(
        [sys.executable, "-m", "sb3_blpo.zoo", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
    )
    if check and result.returncode != 0:
        pytest.fail(
            f"sb3_blpo.zoo {' '.join(args)} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


def load_study(storage: str, study_name: str) -> optuna.Study:
    return optuna.load_study(study_name=study_name, storage=open_storage(storage))


def finished_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [trial for trial in study.trials if trial.state == optuna.trial.TrialState.COMPLETE]


# ---------------------------------------------------------------------------------------------------- end to end
def test_train_and_enjoy_cartpole(tmp_path):
    zoo("train", "--algo", "blpo", "--env", "CartPole-v1", "-n", "512", "--seed", "0", *FAST, cwd=tmp_path)
    run_dir = tmp_path / "logs" / "blpo" / "CartPole-v1_1"
    assert (run_dir / "CartPole-v1.zip").is_file()
    saved = yaml.load((run_dir / "CartPole-v1" / "config.yml").read_text(), Loader=yaml.UnsafeLoader)  # rl-zoo3's format
    assert dict(saved)["n_critic_steps"] == 3  # the packaged blpo.yml was used by default

    model = BLPO.load(run_dir / "CartPole-v1.zip")
    assert (model.n_steps, model.batch_size, model.n_critic_steps, model.n_envs) == (32, 256, 3, 8)

    # enjoy reads logs/ by default for --algo blpo (rl-zoo3 would look in rl-trained-agents/ and the hub)
    result = zoo("enjoy", "--algo", "blpo", "--env", "CartPole-v1", "-n", "200", "--no-render", cwd=tmp_path)
    assert "Episode Reward" in result.stdout


def test_train_mujoco_v5_with_normalization(tmp_path):
    zoo("train", "--algo", "blpo", "--env", "Hopper-v5", "-n", "512", "--seed", "0", *FAST, cwd=tmp_path)
    run_dir = tmp_path / "logs" / "blpo" / "Hopper-v5_1"
    assert (run_dir / "Hopper-v5.zip").is_file()
    assert (run_dir / "Hopper-v5" / "vecnormalize.pkl").is_file()  # normalize: true, as zoo's PPO entry
    model = BLPO.load(run_dir / "Hopper-v5.zip")
    assert (model.batch_size, model.n_critic_steps, model.hypergrad_bound) == (256, 3, 0.8)

    zoo("enjoy", "--algo", "blpo", "--env", "Hopper-v5", "-n", "50", "--no-render", cwd=tmp_path)


def test_optimize_two_trials_then_train_from_a_trial(tmp_path):
    storage = str(tmp_path / "study.log")
    conf = tmp_path / "conf.yml"  # an entry with policy settings the search does not sample
    conf.write_text("CartPole-v1:\n  n_timesteps: 256\n  policy: MlpPolicy\n  policy_kwargs: 'dict(ortho_init=False)'\n")
    # fmt: off
    zoo("train", "--algo", "blpo", "--env", "CartPole-v1", "-n", "256", "--optimize", "--n-trials", "2",
        "--storage", storage, "--study-name", "tune", "--no-optim-plots", "--seed", "0", "--num-threads", "1",
        "--conf-file", str(conf), cwd=tmp_path)
    # fmt: on
    study = load_study(storage, "tune")
    trials = finished_trials(study)
    assert len(trials) == 2
    for trial in trials:
        assert {"n_critic_steps", "critic_lr_ratio", "hypergrad_bound", "nystrom_rank", "nystrom_rho"} <= set(trial.params)
        assert trial.user_attrs["batch_size"] <= trial.user_attrs["n_steps"] * 8
    assert list((tmp_path / "logs" / "blpo").glob("report_CartPole-v1_2-trials-256-*.csv"))

    # Train with trial #1's hyperparameters (rl-zoo3 ignores --trial-id 0): the converter rebuilds them.
    # fmt: off
    zoo("train", "--algo", "blpo", "--env", "CartPole-v1", "-n", "256", "--storage", storage, "--study-name", "tune",
        "--trial-id", "1", "--conf-file", str(conf), *FAST, cwd=tmp_path)
    # fmt: on
    model = BLPO.load(next((tmp_path / "logs" / "blpo").glob("CartPole-v1_*/CartPole-v1.zip")))
    expected = convert_blpo_params(study.trials[1].params)
    assert model.n_critic_steps == expected["n_critic_steps"]
    assert model.batch_size == expected["batch_size"]
    assert model.ihvp_kwargs == expected["ihvp_kwargs"]
    # the trial's network, with the entry's ortho_init kept (rl-zoo3 would have replaced the entry's policy_kwargs)
    assert model.policy_kwargs["net_arch"] == expected["policy_kwargs"]["net_arch"]
    assert model.policy_kwargs["ortho_init"] is False


def test_two_worker_processes_share_one_storage(tmp_path):
    """The docs' N-worker recipe with N = 2: the same command started twice on one journal file."""
    storage = str(tmp_path / "shared" / "study.log")
    # fmt: off
    command = [sys.executable, "-m", "sb3_blpo.zoo", "train", "--algo", "blpo", "--env", "CartPole-v1", "-n", "256",
               "--optimize", "--n-trials", "1", "--storage", storage, "--study-name", "shared", "--no-optim-plots",
               "--num-threads", "1", "-uuid"]
    # fmt: on
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    workers = [
        subprocess.Popen(
            [*command, "--seed", str(seed)], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        for seed in (0, 1)
    ]
    outputs = [worker.communicate(timeout=SUBPROCESS_TIMEOUT)[0].decode() for worker in workers]
    for worker, output in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, output[-3000:]
    trials = finished_trials(load_study(storage, "shared"))
    assert len(trials) == 2
    assert {trial.user_attrs["worker"].rsplit(":", 1)[1] for trial in trials} == {str(worker.pid) for worker in workers}


def test_n_workers_on_sqlite(tmp_path):
    storage = f"sqlite:///{tmp_path / 'db' / 'study.db'}"
    # fmt: off
    result = zoo("train", "--algo", "blpo", "--env", "CartPole-v1", "-n", "256", "--optimize", "--n-trials", "1",
                 "--n-workers", "2", "--storage", storage, "--study-name", "sq", "--no-optim-plots", "--seed", "3",
                 "--num-threads", "1", cwd=tmp_path)
    # fmt: on
    assert "study 'sq': 2 trials" in result.stdout
    trials = finished_trials(load_study(storage, "sq"))
    assert len(trials) == 2
    assert len({trial.user_attrs["worker"] for trial in trials}) == 2
    assert len(list((tmp_path / "logs" / "blpo" / "workers").glob("sq_worker*.log"))) == 2


def test_ppo_with_plasticity_callbacks(tmp_path):
    # the config's callbacks with a cadence that fits 2 rollouts: a monitor, then the paper's L2-ER regularizer
    settings = "every_n_rollouts=1, hessian_kwargs=dict(n_samples=128, lanczos_steps=8)"
    regularizer = "erank_mode='ascent', ascent_lr=1e-6, l2_coef=1e-3"
    monitor = (
        f"[{{'sb3_blpo.callbacks.PlasticityMonitor': dict({settings})}}, "
        f"{{'sb3_blpo.callbacks.PlasticityRegularizer': dict({regularizer})}}]"
    )
    # fmt: off
    result = zoo("train", "--algo", "ppo", "--env", "CartPole-v1", "--conf-file", "ppo_plasticity", "-n", "512",
                 "-params", f"callback:{monitor}", "n_epochs:1", "--seed", "0", *FAST, cwd=tmp_path)
    # fmt: on
    assert "ppo_plasticity.yml" in result.stdout
    for key in ("hessian/", "plasticity/", "trainability/", "reg_l2", "reg_ascent_grad_norm"):
        assert key in result.stdout


def test_import_does_not_need_rl_zoo3(tmp_path):
    code = (
        "import sys, sb3_blpo, sb3_blpo.zoo; "
        "loaded = [m for m in ('rl_zoo3', 'optuna', 'yaml', 'sqlalchemy') if m in sys.modules]; "
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, timeout=SUBPROCESS_TIMEOUT)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_packaged_cartpole_entry_solves_cartpole(tmp_path, seed):
    """The packaged blpo.yml CartPole-v1 entry, through the launcher, solves CartPole-v1 in its 1e5 steps."""
    zoo("train", "--algo", "blpo", "--env", "CartPole-v1", "--seed", str(seed), *FAST, cwd=tmp_path)
    result = zoo(
        "enjoy", "--algo", "blpo", "--env", "CartPole-v1", "-n", "5000", "--no-render", "--deterministic", cwd=tmp_path
    )
    mean_reward = float(result.stdout.split("Mean reward:")[1].split("+/-")[0])
    assert mean_reward >= 475, result.stdout[-2000:]


# ---------------------------------------------------------------------------------------------------- configs
def test_blpo_yml_has_the_required_entries():
    config = yaml.safe_load(config_path("blpo").read_text())
    assert set(BLPO_ENTRIES) | {"default"} == set(config)
    assert config["CartPole-v1"] == {
        "n_envs": 8,
        "n_timesteps": 1e5,
        "policy": "MlpPolicy",
        "n_steps": 32,
        "batch_size": 256,
        "gae_lambda": 0.8,
        "gamma": 0.98,
        "n_epochs": 5,
        "n_critic_steps": 3,
        "critic_learning_rate": 1e-3,
        "learning_rate": "lin_1e-3",
        "clip_range": "lin_0.2",
        "ent_coef": 0.0,
    }


def build_experiment(tmp_path: Path, algo: str, env_id: str, conf: str):
    """Set up an experiment as ``train`` does (config read, preprocessed, envs and model built), without training."""
    register()
    from sb3_blpo.zoo.exp_manager import CheckedExperimentManager

    manager = CheckedExperimentManager(argparse.Namespace(), algo, env_id, str(tmp_path), config=conf, eval_freq=-1, seed=0)
    model, _ = manager.setup_experiment()
    return manager, model


@pytest.mark.parametrize("env_id", [*BLPO_ENTRIES, "InvertedPendulum-v5"])
def test_every_blpo_entry_builds(tmp_path, workdir, env_id):
    manager, model = build_experiment(tmp_path, "blpo", env_id, str(config_path("blpo")))
    try:
        assert isinstance(model, BLPO)
        rollout = model.n_steps * model.n_envs
        assert model.n_epochs <= 10
        if is_tuned_entry(env_id):
            assert model.batch_size >= rollout // 16  # the search space: at most 16 minibatches per epoch
        else:
            assert model.batch_size >= min(256, rollout)  # fewer, larger minibatches than PPO
        assert model.batch_size <= rollout
        # normalization wherever zoo's PPO entry uses it (Acrobot, MountainCarContinuous, MuJoCo)
        expected_normalize = env_id in ("Acrobot-v1", "MountainCarContinuous-v0", *MUJOCO_V5)
        assert bool(manager.normalize) == expected_normalize
    finally:
        model.env.close()


@pytest.mark.parametrize("env_id", BLPO_ENTRIES)
def test_every_blpo_authors_entry_is_the_recipe_on_the_envs_rollout(tmp_path, workdir, env_id):
    """blpo_authors.yml: every env of blpo.yml, BLPO.authors_recipe() on that entry's rollout shape."""
    _, model = build_experiment(tmp_path, "blpo", env_id, str(config_path("blpo_authors")))
    try:
        base = yaml.safe_load(config_path("blpo").read_text())[env_id]
        kind = "discrete" if env_id in ("CartPole-v1", "Acrobot-v1", "LunarLander-v3") else "continuous"
        recipe = BLPO.authors_recipe(kind)
        for key, value in recipe.items():
            if key != "policy_kwargs":
                assert getattr(model, key) == value or getattr(model, key)(1.0) == value, key
        assert model.policy.optimizer.defaults["eps"] == 1e-5
        if is_tuned_entry(env_id):
            # A tuned entry has its own shape; the recipe keeps the one of rl-zoo3's PPO entry it was tuned from.
            zoo_ppo = yaml.safe_load((Path(rl_zoo3.__file__).parent / "hyperparams" / "ppo.yml").read_text())
            base = zoo_ppo[env_id.replace("-v5", "-v4")]  # zoo has -v4 MuJoCo entries only
        assert (model.n_envs, model.n_steps) == (base["n_envs"], base["n_steps"])
        assert model.batch_size == model.n_steps  # one env trajectory per minibatch, as the authors
    finally:
        model.env.close()


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1", "Hopper-v5", "Walker2d-v5", "Acrobot-v1"])
def test_every_ppo_plasticity_entry_builds(tmp_path, workdir, env_id):
    manager, model = build_experiment(tmp_path, "ppo", env_id, str(config_path("ppo_plasticity")))
    try:
        assert manager.callbacks, "the entry's callback: key built no callback"
        assert all(type(callback).__module__.startswith("sb3_blpo.callbacks") for callback in manager.callbacks)
    finally:
        model.env.close()


def test_critic_learning_rate_schedule_string(tmp_path, workdir):
    conf = tmp_path / "conf.yml"
    conf.write_text("CartPole-v1:\n  n_timesteps: 1000\n  policy: MlpPolicy\n  critic_learning_rate: lin_2e-3\n")
    _, model = build_experiment(tmp_path, "blpo", "CartPole-v1", str(conf))
    assert model.critic_learning_rate(1.0) == pytest.approx(2e-3)
    assert model.critic_learning_rate(0.5) == pytest.approx(1e-3)
    model.env.close()


# ---------------------------------------------------------------------------------------------------- search space
@pytest.mark.parametrize(
    "base, expected_keys, absent_keys",
    [
        ({}, {"ihvp_kwargs", "hypergrad_bound"}, set()),
        ({"ihvp_solver": "cg", "ihvp_kwargs": {"max_iter": 5}}, {"hypergrad_bound"}, {"ihvp_kwargs"}),
        ({"ihvp_solver": None}, set(), {"ihvp_kwargs", "hypergrad_bound"}),
    ],
)
def test_sampler_and_converter(base, expected_keys, absent_keys):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), direction="maximize")
    for _ in range(20):
        trial = study.ask()
        hyperparams = sample_blpo_params(trial, 1, 8, {}, base_hyperparams=base, n_timesteps=100_000)
        assert expected_keys <= set(hyperparams) and not absent_keys & set(hyperparams)
        rollout = hyperparams["n_steps"] * 8
        assert 32 <= hyperparams["n_steps"] <= 2048 and rollout * 4 <= 100_000  # at least 4 updates per trial
        assert 2 <= hyperparams["batch_size"] <= rollout and rollout % hyperparams["batch_size"] == 0
        assert hyperparams["n_epochs"] <= 10
        assert hyperparams["critic_learning_rate"] == pytest.approx(
            hyperparams["learning_rate"] * trial.params["critic_lr_ratio"]
        )
        # --trial-id rebuilds the same hyperparameters from the stored params, plus the trial's n_envs
        converted = convert_blpo_params(trial.params)
        assert converted.pop("n_envs") == 8
        if "ihvp_kwargs" in hyperparams:
            assert hyperparams["ihvp_kwargs"] == converted.pop("ihvp_kwargs")
            del hyperparams["ihvp_kwargs"]
        assert converted == hyperparams
        study.tell(trial, 0.0)


def test_sampled_policy_kwargs_are_merged_into_the_entrys():
    """rl-zoo3 would replace the entry's policy_kwargs; the sampler keeps what it does not sample (log_std_init...)."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    base = {"policy_kwargs": {"log_std_init": -2, "ortho_init": False, "net_arch": [7]}}
    for _ in range(5):
        trial = study.ask()
        policy_kwargs = sample_blpo_params(trial, 1, 1, {}, base_hyperparams=base, n_timesteps=10_000)["policy_kwargs"]
        assert policy_kwargs["log_std_init"] == -2 and policy_kwargs["ortho_init"] is False
        assert policy_kwargs["net_arch"] == convert_blpo_params(trial.params)["policy_kwargs"]["net_arch"]  # sampled
    assert base["policy_kwargs"]["net_arch"] == [7]  # the entry itself is untouched


def test_sampled_hyperparameters_build_blpo():
    from stable_baselines3.common.env_util import make_vec_env

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    env = make_vec_env("CartPole-v1", n_envs=2)
    for _ in range(5):
        hyperparams = sample_blpo_params(study.ask(), 1, 2, {}, n_timesteps=2048)
        BLPO("MlpPolicy", env, **hyperparams)
    env.close()


def test_register():
    import rl_zoo3
    from rl_zoo3.hyperparams_opt import HYPERPARAMS_CONVERTER, HYPERPARAMS_SAMPLER

    register()
    register()  # idempotent
    assert rl_zoo3.ALGOS["blpo"] is BLPO
    assert HYPERPARAMS_SAMPLER["blpo"] is sample_blpo_params
    assert HYPERPARAMS_CONVERTER["blpo"] is convert_blpo_params


@pytest.mark.parametrize("storage", ["study.log", "sub/dir/study.log", "sqlite:///sub/study.db"])
def test_check_storage_accepts_and_prepares(tmp_path, monkeypatch, storage):
    monkeypatch.chdir(tmp_path)
    assert check_storage(storage) == storage  # creates the parent folder of the file
    optuna.create_study(storage=open_storage(storage), study_name="s")
    assert optuna.load_study(storage=open_storage(storage), study_name="s").study_name == "s"


# ---------------------------------------------------------------------------------------------------- bad input
def run_main(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.err


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Run in ``tmp_path``: rl-zoo3 writes logs/ and MuJoCo writes MUJOCO_LOG.TXT to the working directory."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_config(path: Path, entries: dict) -> str:
    path.write_text(yaml.safe_dump(entries))
    return str(path)


def test_unknown_env_key_without_default(workdir, capsys):
    conf = write_config(workdir / "conf.yml", {"CartPole-v1": {"n_timesteps": 1000, "policy": "MlpPolicy"}})
    code, err = run_main(capsys, "train", "--algo", "blpo", "--env", "Acrobot-v1", "--conf-file", conf)
    assert code == 2
    assert "no hyperparameters for 'Acrobot-v1'" in err and "no 'default' entry" in err and "CartPole-v1" in err
    assert "Traceback" not in err
    assert not (workdir / "logs").exists()


@pytest.mark.parametrize(
    "entry, override, message",
    [
        (
            {"n_critic_step": 3},
            [],
            "unknown hyperparameter(s) for blpo (BLPO): 'n_critic_step' (did you mean 'n_critic_steps'?)",
        ),
        ({"vf_coef": 0.5}, [], "unknown hyperparameter(s) for blpo (BLPO): 'vf_coef'"),
        ({}, ["-params", "critic_lr:0.001"], "'critic_lr' (did you mean 'critic_learning_rate'?)"),
        ({"seed": 3}, [], "'seed' (--seed) cannot be set in a config"),
        ({"batch_size": 512}, [], "batch_size 512 exceeds the rollout size n_steps * n_envs = 32 * 8 = 256"),
        ({"critic_learning_rate": "exp_1e-3"}, [], "critic_learning_rate must be a number or a linear schedule"),
        (
            {"callback": "sb3_blpo.callbacks.NoSuchMonitor"},
            [],
            "callback 'sb3_blpo.callbacks.NoSuchMonitor' cannot be imported",
        ),
        ({"callback": [{"sb3_blpo.callbacks.FeatureRankCallback": {"every_n_rollout": 2}}]}, [], "bad arguments for callback"),
    ],
)
def test_bad_hyperparameters(workdir, capsys, entry, override, message):
    base = {"n_envs": 8, "n_timesteps": 1000, "policy": "MlpPolicy", "n_steps": 32, "batch_size": 256}
    conf = write_config(workdir / "conf.yml", {"CartPole-v1": {**base, **entry}})
    code, err = run_main(capsys, "train", "--algo", "blpo", "--env", "CartPole-v1", "--conf-file", conf, *override)
    assert code == 2, err
    assert message in err
    assert err.startswith("sb3-blpo-zoo: error: ") and "Traceback" not in err


def test_missing_policy(workdir, capsys):
    conf = write_config(workdir / "conf.yml", {"default": {"n_timesteps": 1000}})
    code, err = run_main(capsys, "train", "--algo", "blpo", "--env", "CartPole-v1", "--conf-file", conf)
    assert code == 2 and "missing required hyperparameter(s) for blpo: policy" in err


@pytest.mark.parametrize(
    "storage, message",
    [
        ("study.db", "is not a valid storage"),
        ("postgresql//user@host/optuna", "is not a valid storage"),
        ("postgress://user@host/optuna", "unknown database backend 'postgress'"),
        ("sqlite://", "in-memory SQLite database"),
        ("sqlite:///:memory:", "in-memory SQLite database"),
        ("   ", "--storage is empty"),
    ],
)
def test_malformed_storage(workdir, capsys, storage, message):
    # fmt: off
    code, err = run_main(capsys, "train", "--algo", "blpo", "--env", "CartPole-v1", "--optimize", "--n-trials", "1",
                         "--storage", storage, "--study-name", "s")
    # fmt: on
    assert code == 2, err
    assert message in err and "Traceback" not in err
    assert "journal file path ending in .log" in err or message in ("in-memory SQLite database", "--storage is empty")


def test_storage_password_is_not_printed(workdir, capsys):
    code, err = run_main(capsys, "train", "--algo", "blpo", "--optimize", "--storage", "postgress://user:secret@host/db")
    assert code == 2 and "secret" not in err


def test_unknown_env_id(workdir, capsys):
    code, err = run_main(capsys, "train", "--algo", "blpo", "--env", "Hoper-v5")
    assert code == 2 and "'Hoper-v5' is not a registered gymnasium environment. Did you mean 'Hopper-v5'?" in err


def test_enjoy_without_a_trained_model(workdir, capsys):
    code, err = run_main(capsys, "enjoy", "--algo", "blpo", "--env", "CartPole-v1", "--no-render")
    assert code == 2 and "no trained blpo agent for CartPole-v1 in 'logs'" in err


def test_n_workers_needs_optimize(workdir, capsys):
    code, err = run_main(capsys, "train", "--algo", "blpo", "--n-workers", "2")
    assert code == 2 and "--n-workers runs parallel tuning workers: it needs --optimize" in err


def test_unknown_command(capsys):
    code, err = run_main(capsys, "tune")
    assert code == 2 and "unknown command 'tune'" in err


def test_missing_rl_zoo3(workdir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "rl_zoo3", None)  # import rl_zoo3 now raises ImportError
    code, err = run_main(capsys, "train", "--algo", "blpo")
    assert code == 2
    assert 'pip install "sb3_blpo[zoo]"' in err


def test_configs_command(capsys):
    assert main(["configs", "blpo"]) == 0
    assert capsys.readouterr().out.strip() == str(config_path("blpo"))
