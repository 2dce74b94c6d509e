"""``sb3-blpo-zoo`` / ``python -m sb3_blpo.zoo``: rl-zoo3's ``train`` and ``enjoy`` with BLPO registered.

rl-zoo3 has no plugin mechanism: its scripts read the module-level dicts ``rl_zoo3.ALGOS``,
``HYPERPARAMS_SAMPLER`` and ``HYPERPARAMS_CONVERTER``, so :func:`register` adds ``"blpo"`` to them before the script
runs. On top of rl-zoo3's own options the launcher

* defaults ``--conf-file`` to the packaged ``blpo.yml`` for ``--algo blpo`` and accepts the short names of the packaged
  configs (``--conf-file ppo_plasticity``),
* defaults ``enjoy``'s ``--folder`` to ``logs`` for ``--algo blpo`` (there are no pretrained BLPO agents to download),
* checks the env id, the config entry, the hyperparameters and ``--storage`` first and reports a bad value in one line,
* adds ``--n-workers N`` to ``train --optimize``: N worker processes that share one Optuna storage.

Everything else is forwarded to rl-zoo3 unchanged.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from sb3_blpo.zoo.configs import PACKAGED_CONFIGS, config_path, resolve_conf_file
from sb3_blpo.zoo.errors import INSTALL_HINT, ZooDependencyError, ZooError, ZooInputError

PROG = "sb3-blpo-zoo"
#: The ``--algo`` name under which BLPO is registered in rl-zoo3.
ALGO_NAME = "blpo"
COMMANDS = ("train", "enjoy", "configs")

_USAGE = f"""usage: {PROG} {{train,enjoy,configs}} [options]

  train     rl-zoo3's train (training, --optimize tuning) with BLPO registered as --algo {ALGO_NAME}
  enjoy     rl-zoo3's enjoy (run a trained agent)
  configs   print the paths of the packaged configs ({", ".join(PACKAGED_CONFIGS)})

Run '{PROG} train -h' for rl-zoo3's options. Added by {PROG}:
  train --optimize --n-workers N   run N tuning worker processes sharing one Optuna storage
                                   (default storage: <log-folder>/<algo>/<env>_study.log, a journal file)
  --conf-file NAME                 NAME may be a packaged config: {", ".join(PACKAGED_CONFIGS)}
                                   (default for --algo {ALGO_NAME}: the packaged {PACKAGED_CONFIGS[ALGO_NAME]})
"""


def _import_zoo() -> Any:
    try:
        import optuna  # noqa: F401
        import rl_zoo3
    except ImportError as error:
        raise ZooDependencyError(f"{PROG} needs rl-zoo3 and optuna ({error}); install them with: {INSTALL_HINT}") from error
    return rl_zoo3


def register(name: str = ALGO_NAME) -> None:
    """
    Register BLPO in rl-zoo3: ``rl_zoo3.ALGOS[name]``, its Optuna sampler and its converter. Idempotent.

    Use it in your own scripts before calling ``rl_zoo3.train.train()`` or ``rl_zoo3.enjoy.enjoy()``.

    :param name: the ``--algo`` name
    :raises ZooDependencyError: when rl-zoo3 or optuna is not installed
    """
    rl_zoo3 = _import_zoo()
    from rl_zoo3.hyperparams_opt import HYPERPARAMS_CONVERTER, HYPERPARAMS_SAMPLER

    from sb3_blpo.blpo import BLPO
    from sb3_blpo.zoo.hyperparams_opt import convert_blpo_params, sample_blpo_params

    rl_zoo3.ALGOS[name] = BLPO
    HYPERPARAMS_SAMPLER[name] = sample_blpo_params
    HYPERPARAMS_CONVERTER[name] = convert_blpo_params


@contextlib.contextmanager
def _zoo_argv(command: str, args: Sequence[str]) -> Iterator[None]:
    """rl-zoo3's scripts parse ``sys.argv``: set it for the duration of the call."""
    saved = sys.argv
    sys.argv = [f"{PROG} {command}", *args]
    try:
        yield
    finally:
        sys.argv = saved


@contextlib.contextmanager
def _checked_experiment_manager() -> Iterator[None]:
    """Make ``rl_zoo3.train.train()`` build a :class:`~sb3_blpo.zoo.exp_manager.CheckedExperimentManager`."""
    import rl_zoo3.train as zoo_train

    from sb3_blpo.zoo.exp_manager import CheckedExperimentManager

    original = zoo_train.ExperimentManager
    zoo_train.ExperimentManager = CheckedExperimentManager  # type: ignore[misc]
    try:
        yield
    finally:
        zoo_train.ExperimentManager = original  # type: ignore[misc]


def _split_n_workers(args: Sequence[str]) -> tuple[int | None, list[str]]:
    parser = argparse.ArgumentParser(prog=f"{PROG} train", add_help=False, allow_abbrev=False)
    parser.add_argument("--n-workers", type=int, default=None)
    known, rest = parser.parse_known_args(list(args))
    return known.n_workers, rest


def _train_options(args: Sequence[str]) -> argparse.Namespace:
    """The rl-zoo3 ``train`` options the launcher looks at (same names and defaults as rl-zoo3's)."""
    parser = argparse.ArgumentParser(prog=f"{PROG} train", add_help=False)
    parser.add_argument("-h", "--help", action="store_true")
    parser.add_argument("--algo", default="ppo")
    parser.add_argument("--env", default="CartPole-v1")
    parser.add_argument("-conf", "--conf-file", default=None)
    parser.add_argument("-optimize", "--optimize-hyperparameters", "--optimize", action="store_true", dest="optimize")
    parser.add_argument("--storage", default=None)
    parser.add_argument("--study-name", default=None)
    parser.add_argument("--trial-id", type=int, default=None)
    parser.add_argument("--gym-packages", nargs="+", default=[])
    parser.add_argument("-f", "--log-folder", default="logs")
    parser.add_argument("--seed", type=int, default=-1)
    return parser.parse_known_args(list(args))[0]


def _enjoy_options(args: Sequence[str]) -> argparse.Namespace:
    """The rl-zoo3 ``enjoy`` options the launcher looks at (same names and defaults as rl-zoo3's)."""
    parser = argparse.ArgumentParser(prog=f"{PROG} enjoy", add_help=False)
    parser.add_argument("-h", "--help", action="store_true")
    parser.add_argument("--algo", default="ppo")
    parser.add_argument("--env", default="CartPole-v1")
    parser.add_argument("-f", "--folder", default=None)
    parser.add_argument("--exp-id", type=int, default=0)
    parser.add_argument("--load-best", action="store_true")
    parser.add_argument("--load-checkpoint", type=int, default=None)
    parser.add_argument("--load-last-checkpoint", action="store_true")
    parser.add_argument("--gym-packages", nargs="+", default=[])
    return parser.parse_known_args(list(args))[0]


def _check_env(env_id: str, gym_packages: Sequence[str]) -> None:
    import gymnasium as gym
    import rl_zoo3.import_envs  # noqa: F401  (registers rl-zoo3's custom envs, as its scripts do)

    for module in gym_packages:
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise ZooInputError(f"--gym-packages: cannot import {module!r}: {error}") from error
    if env_id not in gym.envs.registry:
        close = difflib.get_close_matches(env_id, list(gym.envs.registry), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ZooInputError(
            f"--env {env_id!r} is not a registered gymnasium environment.{hint} "
            "(Environments from other packages need --gym-packages MODULE.)"
        )


def _check_pandas() -> None:
    try:
        import pandas  # noqa: F401
    except ImportError as error:
        raise ZooDependencyError(
            f"rl-zoo3 writes the tuning report with pandas, which is not installed ({error}); pip install pandas "
            f"(part of {INSTALL_HINT})"
        ) from error


def _env_name(env_id: str) -> str:
    from huggingface_sb3 import EnvironmentName

    return str(EnvironmentName(env_id))


def _train(args: list[str]) -> int:
    n_workers, args = _split_n_workers(args)
    options = _train_options(args)
    if options.help:
        print(f"{PROG}: rl-zoo3's train with BLPO registered as --algo {ALGO_NAME}; see also '{PROG} --help'.\n")
        with _zoo_argv("train", ["--help"]):
            from rl_zoo3.train import train

            train()
        return 0  # pragma: no cover - argparse exits
    _check_env(options.env, options.gym_packages)
    if options.conf_file is not None:
        resolved = resolve_conf_file(options.conf_file)
        if resolved != options.conf_file:
            args = [*args, "--conf-file", resolved]
    elif options.algo == ALGO_NAME:
        args = ["--conf-file", str(config_path(ALGO_NAME)), *args]
    if options.optimize:
        _check_pandas()
    if n_workers is not None:
        return _run_workers(n_workers, args, options)
    if options.storage is not None and (options.optimize or options.trial_id is not None):
        from sb3_blpo.zoo.storage import check_storage

        check_storage(options.storage)
    from rl_zoo3.train import train

    with _zoo_argv("train", args), _checked_experiment_manager():
        train()
    return 0


def _enjoy(args: list[str]) -> int:
    options = _enjoy_options(args)
    if not options.help:
        _check_env(options.env, options.gym_packages)
        if options.folder is None and options.algo == ALGO_NAME:
            # rl-zoo3 defaults to rl-trained-agents/ and downloads from the Hugging Face hub, which has no BLPO agents.
            options.folder = "logs"
            args = ["-f", "logs", *args]
        if options.folder is not None and "rl-trained-agents" not in options.folder:
            _check_model(options)
    from rl_zoo3.enjoy import enjoy

    with _zoo_argv("enjoy", args):
        enjoy()
    return 0


def _check_model(options: argparse.Namespace) -> None:
    from huggingface_sb3 import EnvironmentName
    from rl_zoo3.utils import get_model_path

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            get_model_path(
                options.exp_id,
                options.folder,
                options.algo,
                EnvironmentName(options.env),
                options.load_best,
                options.load_checkpoint,
                options.load_last_checkpoint,
            )
    except (AssertionError, ValueError) as error:
        raise ZooInputError(
            f"no trained {options.algo} agent for {options.env} in {options.folder!r}: {error}. Train one with "
            f"'{PROG} train --algo {options.algo} --env {options.env} -f {options.folder}' or pass the log folder with -f."
        ) from None


def _run_workers(n_workers: int, args: list[str], options: argparse.Namespace) -> int:
    """Run ``n_workers`` copies of this ``train --optimize`` command on one shared storage and summarize the study."""
    from sb3_blpo.zoo.storage import check_storage

    if n_workers < 1:
        raise ZooInputError(f"--n-workers must be >= 1, got {n_workers}")
    if not options.optimize:
        raise ZooInputError("--n-workers runs parallel tuning workers: it needs --optimize")
    env_name = _env_name(options.env)
    storage = options.storage or os.path.join(options.log_folder, options.algo, f"{env_name}_study.log")
    study_name = options.study_name or f"{options.algo}_{env_name}"
    check_storage(storage)
    log_dir = Path(options.log_folder) / options.algo / "workers"
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"{PROG}: {n_workers} tuning workers, study {study_name!r} on storage {storage!r}", flush=True)
    processes = []
    log_files = []
    for index in range(n_workers):
        worker_args = [*args, "--storage", storage, "--study-name", study_name, "-uuid"]
        if options.seed >= 0:
            worker_args += ["--seed", str(options.seed + index)]  # distinct seeds, else the workers sample alike
        log_path = log_dir / f"{study_name}_worker{index}.log"
        log_file = log_path.open("w")
        log_files.append((log_path, log_file))
        command = [sys.executable, "-m", "sb3_blpo.zoo", "train", *worker_args]
        processes.append(subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT))
        print(f"  worker {index}: pid {processes[-1].pid}, log {log_path}", flush=True)
    try:
        with _sigterm_as_keyboard_interrupt():
            codes = [process.wait() for process in processes]
    except KeyboardInterrupt:
        _stop_workers(processes)
        _print_study_summary(storage, study_name)
        raise
    finally:
        for _, log_file in log_files:
            log_file.close()
    for index, code in enumerate(codes):
        if code != 0:
            log_path = log_files[index][0]
            tail = "\n".join(log_path.read_text().splitlines()[-15:])
            print(f"{PROG}: worker {index} exited with status {code}; last lines of {log_path}:\n{tail}", file=sys.stderr)
    _print_study_summary(storage, study_name)
    return max(codes, default=0)


@contextlib.contextmanager
def _sigterm_as_keyboard_interrupt() -> Iterator[None]:
    """While waiting for the workers, a SIGTERM to the launcher stops them like Ctrl-C does."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stop_workers(processes: Sequence[subprocess.Popen], grace_s: float = 5.0, report_s: float = 60.0) -> None:
    """
    Stop the workers the way Ctrl-C stops rl-zoo3: it ends the running trial and writes its report.

    Ctrl-C in a terminal already reaches the workers (same process group); a worker still running after ``grace_s``
    gets a SIGINT, and one still running ``report_s`` later is terminated.
    """

    def wait_all(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        for process in processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.0, deadline - time.monotonic()))

    try:
        wait_all(grace_s)
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
        wait_all(report_s)
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
                process.wait()


def _print_study_summary(storage: str, study_name: str) -> None:
    import optuna

    from sb3_blpo.zoo.storage import open_storage

    study = optuna.load_study(study_name=study_name, storage=open_storage(storage))
    states = Counter(trial.state.name for trial in study.trials)
    workers = Counter(trial.user_attrs.get("worker", "?") for trial in study.trials if trial.state.is_finished())
    print(f"{PROG}: study {study_name!r}: {len(study.trials)} trials ({dict(states)}); finished per worker: {dict(workers)}")
    completed = [trial for trial in study.trials if trial.state == optuna.trial.TrialState.COMPLETE]
    if completed:
        best = study.best_trial
        print(f"  best trial #{best.number}: value {best.value}, params {best.params}")


def main(argv: Sequence[str] | None = None) -> int:
    """
    Entry point of ``sb3-blpo-zoo`` and ``python -m sb3_blpo.zoo``.

    :param argv: the arguments after the program name (default: ``sys.argv[1:]``)
    :return: the exit status: 0 on success, 2 for bad input or a missing dependency (message on stderr)
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_USAGE, end="")
        return 0 if args else 2
    command, rest = args[0], args[1:]
    try:
        if command not in COMMANDS:
            close = difflib.get_close_matches(command, COMMANDS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ZooInputError(f"unknown command {command!r}{hint}; commands: {', '.join(COMMANDS)}")
        if command == "configs":
            return _configs(rest)
        register()
        return _train(rest) if command == "train" else _enjoy(rest)
    except ZooError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def _configs(args: Sequence[str]) -> int:
    names = list(args) or list(PACKAGED_CONFIGS)
    for name in names:
        path = config_path(name)
        print(path if args else f"{name}: {path}")
    return 0
