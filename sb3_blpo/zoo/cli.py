"""``sb3-blpo-zoo`` / ``python -m sb3_blpo.zoo``: rl-zoo3's ``train`` and ``enjoy`` with BLPO registered.

rl-zoo3 has no plugin mechanism: its scripts read the module-level dicts ``rl_zoo3.ALGOS``,
``HYPERPARAMS_SAMPLER`` and ``HYPERPARAMS_CONVERTER``, so :func:`register` adds ``"blpo"`` to them before the script
runs. On top of rl-zoo3's own options the launcher

* defaults ``--conf-file`` to the packaged ``blpo.yml`` for ``--algo blpo`` and accepts the short names of the packaged
  configs (``--conf-file ppo_plasticity``),
* defaults ``enjoy``'s ``--folder`` to ``logs`` for ``--algo blpo`` (there are no pretrained BLPO agents to download),
* checks the env id, the config entry, the hyperparameters and ``--storage`` first and reports a bad value in one line,
* adds ``--n-workers N`` to ``train --optimize``: N worker processes that share one Optuna storage; a worker that
  dies is reported (exit status 1) and its running trial is marked FAIL,
* marks FAIL, before tuning, the trials that a dead worker left RUNNING (``--fail-stale-trials``: all of them), and
  repairs a journal whose last record was cut off (``--repair-journal``).

Everything else is forwarded to rl-zoo3 unchanged. See "Fault behaviour and resume" in ``docs/zoo.md``.
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

# The same constants as sb3_blpo.zoo.storage (not imported here: ``import sb3_blpo.zoo`` stays light).
HEARTBEAT_INTERVAL_S = 60
HEARTBEAT_GRACE_INTERVALS = 5

PROG = "sb3-blpo-zoo"
#: The ``--algo`` name under which BLPO is registered in rl-zoo3.
ALGO_NAME = "blpo"
COMMANDS = ("train", "enjoy", "configs")
#: Exit status when a tuning worker failed (died by a signal or exited non-zero).
EXIT_WORKER_FAILED = 1
_POLL_S = 0.25

_USAGE = f"""usage: {PROG} {{train,enjoy,configs}} [options]

  train     rl-zoo3's train (training, --optimize tuning) with BLPO registered as --algo {ALGO_NAME}
  enjoy     rl-zoo3's enjoy (run a trained agent)
  configs   print the paths of the packaged configs ({", ".join(PACKAGED_CONFIGS)})

Run '{PROG} train -h' for rl-zoo3's options. Added by {PROG}:
  train --optimize --n-workers N   run N tuning worker processes sharing one Optuna storage
                                   (default storage: <log-folder>/<algo>/<env>_study.log, a journal file)
  train --optimize --fail-stale-trials
                                   first mark FAIL every RUNNING trial of the study (when no worker is running);
                                   without it, only the trials of dead workers of this host are marked FAIL
  train --optimize --repair-journal
                                   first back up and truncate a journal whose last record was cut off by a crash
  train --optimize --heartbeat S   database storages: heartbeat every S s (default {HEARTBEAT_INTERVAL_S}, 0: none); a
                                   trial without one for {HEARTBEAT_GRACE_INTERVALS} x S s is marked FAIL as stale
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
def _checked_experiment_manager(heartbeat_interval: int | None = HEARTBEAT_INTERVAL_S) -> Iterator[None]:
    """Make ``rl_zoo3.train.train()`` build a :class:`~sb3_blpo.zoo.exp_manager.CheckedExperimentManager`."""
    import rl_zoo3.train as zoo_train

    from sb3_blpo.zoo.exp_manager import CheckedExperimentManager

    original = zoo_train.ExperimentManager
    original_heartbeat = CheckedExperimentManager.heartbeat_interval
    zoo_train.ExperimentManager = CheckedExperimentManager  # type: ignore[misc]
    CheckedExperimentManager.heartbeat_interval = heartbeat_interval
    try:
        yield
    finally:
        zoo_train.ExperimentManager = original  # type: ignore[misc]
        CheckedExperimentManager.heartbeat_interval = original_heartbeat


def _split_launcher_options(args: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """The ``train`` options of the launcher itself (not rl-zoo3's): they are not forwarded to rl-zoo3."""
    parser = argparse.ArgumentParser(prog=f"{PROG} train", add_help=False, allow_abbrev=False)
    parser.add_argument("--n-workers", type=int, default=None)
    parser.add_argument("--fail-stale-trials", action="store_true")
    parser.add_argument("--repair-journal", action="store_true")
    parser.add_argument("--heartbeat", type=int, default=HEARTBEAT_INTERVAL_S)
    known, rest = parser.parse_known_args(list(args))
    if known.heartbeat < 0:
        raise ZooInputError(f"--heartbeat must be >= 0 seconds (0: no heartbeat), got {known.heartbeat}")
    known.heartbeat_interval = known.heartbeat or None
    return known, rest


def _shared_options(command: str) -> argparse.ArgumentParser:
    """A parser of the options rl-zoo3's ``train`` and ``enjoy`` share (same names and defaults as rl-zoo3's)."""
    parser = argparse.ArgumentParser(prog=f"{PROG} {command}", add_help=False)
    parser.add_argument("-h", "--help", action="store_true")
    parser.add_argument("--algo", default="ppo")
    parser.add_argument("--env", default="CartPole-v1")
    parser.add_argument("--gym-packages", nargs="+", default=[])
    return parser


def _train_options(args: Sequence[str]) -> argparse.Namespace:
    """The rl-zoo3 ``train`` options the launcher looks at (same names and defaults as rl-zoo3's)."""
    parser = _shared_options("train")
    parser.add_argument("-conf", "--conf-file", default=None)
    parser.add_argument("-optimize", "--optimize-hyperparameters", "--optimize", action="store_true", dest="optimize")
    parser.add_argument("--storage", default=None)
    parser.add_argument("--study-name", default=None)
    parser.add_argument("--trial-id", type=int, default=None)
    parser.add_argument("-f", "--log-folder", default="logs")
    parser.add_argument("--seed", type=int, default=-1)
    return parser.parse_known_args(list(args))[0]


def _enjoy_options(args: Sequence[str]) -> argparse.Namespace:
    """The rl-zoo3 ``enjoy`` options the launcher looks at (same names and defaults as rl-zoo3's)."""
    parser = _shared_options("enjoy")
    parser.add_argument("-f", "--folder", default=None)
    parser.add_argument("--exp-id", type=int, default=0)
    parser.add_argument("--load-best", action="store_true")
    parser.add_argument("--load-checkpoint", type=int, default=None)
    parser.add_argument("--load-last-checkpoint", action="store_true")
    return parser.parse_known_args(list(args))[0]


def _check_env(env_id: str, gym_packages: Sequence[str]) -> None:
    import gymnasium as gym
    import rl_zoo3.import_envs  # noqa: F401  (registers rl-zoo3's custom envs, as its scripts do)

    if env_id.startswith("sb3_blpo/"):
        # The package's own continual envs, registered in this process (rl-zoo3's train runs in it) without
        # --gym-packages sb3_blpo.envs.
        import sb3_blpo.envs  # noqa: F401
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


def _check_trial(options: argparse.Namespace) -> None:
    """``--trial-id N`` names a trial of an existing study (rl-zoo3 indexes ``study.trials`` without a check)."""
    if options.storage is None or options.study_name is None:
        raise ZooInputError("--trial-id N loads trial N of a tuning study: it needs --storage and --study-name too")
    import optuna

    from sb3_blpo.zoo.storage import open_storage

    storage = open_storage(options.storage)
    names = [summary.study_name for summary in optuna.get_all_study_summaries(storage)]
    if options.study_name not in names:
        raise ZooInputError(
            f"--study-name {options.study_name!r} is not a study of --storage {options.storage!r}; its studies: {names}"
        )
    if options.trial_id == 0:
        # rl-zoo3 (2.9) loads a trial only `if self.trial_id`: trial 0 would be ignored without a word.
        raise ZooInputError(
            "--trial-id 0 would be silently ignored by rl-zoo3 (it loads a trial only for a non-zero id); copy trial "
            "0's hyperparameters into a config (sb3-blpo-zoo ... --optimize prints them) or pass them with -params"
        )
    count = len(optuna.load_study(study_name=options.study_name, storage=storage).trials)
    if not 0 <= options.trial_id < count:
        span = f"0 to {count - 1}" if count else "none"
        raise ZooInputError(f"--trial-id {options.trial_id}: study {options.study_name!r} has {count} trials (ids: {span})")


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
    launcher, args = _split_launcher_options(args)
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
    if launcher.n_workers is not None:
        return _run_workers(launcher, args, options)
    if launcher.repair_journal and not (options.optimize and options.storage):
        raise ZooInputError("--repair-journal repairs the journal of a tuning run: it needs --optimize and --storage PATH.log")
    if launcher.fail_stale_trials and not (options.optimize and options.storage and options.study_name):
        raise ZooInputError("--fail-stale-trials needs --optimize, --storage and --study-name (the study to resume)")
    if options.storage is not None and (options.optimize or options.trial_id is not None):
        _prepare_storage(options.storage, options.study_name if options.optimize else None, launcher)
    if options.trial_id is not None:
        _check_trial(options)
    from rl_zoo3.train import train

    with _zoo_argv("train", args), _checked_experiment_manager(launcher.heartbeat_interval):
        train()
    return 0


def _prepare_storage(storage: str, study_name: str | None, launcher: argparse.Namespace) -> None:
    """
    Repair (``--repair-journal``) and check the storage, then mark FAIL the trials of ``study_name`` left RUNNING by
    dead workers (all RUNNING trials with ``--fail-stale-trials``), so that ``--max-total-trials`` counts finished work.
    """
    from sb3_blpo.zoo.storage import check_storage, fail_stale_trials, repair_journal

    if launcher.repair_journal:
        print(f"{PROG}: {repair_journal(storage)}", flush=True)
    check_storage(storage)
    if study_name is not None:
        failed = fail_stale_trials(
            storage, study_name, force=launcher.fail_stale_trials, heartbeat_interval=launcher.heartbeat_interval
        )
        for line in failed:
            print(f"{PROG}: study {study_name!r}: {line}", flush=True)


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


def _run_workers(launcher: argparse.Namespace, args: list[str], options: argparse.Namespace) -> int:
    """
    Run ``launcher.n_workers`` copies of this ``train --optimize`` command on one shared storage and summarize the study.

    :return: 0, or :data:`EXIT_WORKER_FAILED` when a worker died by a signal or exited non-zero (each is named on
        stderr, and the trials it left RUNNING are marked FAIL as soon as it is seen dead)
    """
    n_workers = launcher.n_workers
    if n_workers < 1:
        raise ZooInputError(f"--n-workers must be >= 1, got {n_workers}")
    if not options.optimize:
        raise ZooInputError("--n-workers runs parallel tuning workers: it needs --optimize")
    env_name = _env_name(options.env)
    storage = options.storage or os.path.join(options.log_folder, options.algo, f"{env_name}_study.log")
    study_name = options.study_name or f"{options.algo}_{env_name}"
    _prepare_storage(storage, study_name, launcher)
    log_dir = Path(options.log_folder) / options.algo / "workers"
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"{PROG}: {n_workers} tuning workers, study {study_name!r} on storage {storage!r}", flush=True)
    processes: list[subprocess.Popen] = []
    log_paths: list[Path] = []
    heartbeat = ["--heartbeat", str(launcher.heartbeat)]
    with contextlib.ExitStack() as logs:
        for index in range(n_workers):
            worker_args = [*args, "--storage", storage, "--study-name", study_name, "-uuid", *heartbeat]
            if options.seed >= 0:
                worker_args += ["--seed", str(options.seed + index)]  # distinct seeds, else the workers sample alike
            log_path = log_dir / f"{study_name}_worker{index}.log"
            log_file = logs.enter_context(log_path.open("w"))
            log_paths.append(log_path)
            command = [sys.executable, "-m", "sb3_blpo.zoo", "train", *worker_args]
            processes.append(subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT))
            print(f"  worker {index}: pid {processes[-1].pid}, log {log_path}", flush=True)
        failures = _wait_workers(processes, log_paths, storage, study_name)
    _print_study_summary(storage, study_name)
    if failures:
        print(
            f"{PROG}: error: {len(failures)} of {n_workers} workers failed: {'; '.join(failures)}",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_WORKER_FAILED
    return 0


def _exit_description(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "unknown signal"
        return f"was killed by signal {-code} ({name})"
    return f"exited with status {code}"


def _wait_workers(
    processes: Sequence[subprocess.Popen], log_paths: Sequence[Path], storage: str, study_name: str
) -> list[str]:
    """
    Wait for the workers; as soon as one ends, mark FAIL the trials it left RUNNING and report a failure.

    :return: one description per failed worker (empty when all exited with status 0)
    """
    failures: list[str] = []
    done: set[int] = set()
    try:
        with _sigterm_as_keyboard_interrupt():
            while len(done) < len(processes):
                for index, process in enumerate(processes):
                    if index not in done and process.poll() is not None:
                        done.add(index)
                        failure = _worker_ended(index, process, log_paths[index], storage, study_name)
                        if failure is not None:
                            failures.append(failure)
                if len(done) < len(processes):
                    time.sleep(_POLL_S)
    except KeyboardInterrupt:
        _stop_workers(processes)
        for index, process in enumerate(processes):
            if index not in done:
                _fail_trials_of(index, process, "was stopped (the launcher was interrupted)", storage, study_name)
        _print_study_summary(storage, study_name)
        raise
    return failures


def _worker_ended(index: int, process: subprocess.Popen, log_path: Path, storage: str, study_name: str) -> str | None:
    """Report a worker that ended and mark FAIL its RUNNING trials; return a description of the failure, if any."""
    code = process.returncode
    what = _exit_description(code)
    if code != 0:
        print(f"{PROG}: worker {index} (pid {process.pid}) {what}; log: {log_path}", file=sys.stderr, flush=True)
        if code > 0:
            with contextlib.suppress(OSError):
                tail = log_path.read_text(errors="replace").splitlines()[-15:]
                print("\n".join(f"    {line}" for line in tail), file=sys.stderr, flush=True)
    _fail_trials_of(index, process, what, storage, study_name)
    return None if code == 0 else f"worker {index} (pid {process.pid}) {what}"


def _fail_trials_of(index: int, process: subprocess.Popen, what: str, storage: str, study_name: str) -> None:
    from sb3_blpo.zoo.storage import fail_worker_trials, worker_tag

    reason = f"worker {index} ({worker_tag(process.pid)}) {what} while the trial was running"
    try:
        lines = fail_worker_trials(storage, study_name, process.pid, reason)
    except Exception as error:  # the storage is unreachable: report it, keep waiting for the other workers
        print(f"{PROG}: cannot mark the trials of worker {index} FAIL: {error!r}", file=sys.stderr, flush=True)
        return
    for line in lines:
        print(f"{PROG}: study {study_name!r}: {line}", file=sys.stderr, flush=True)


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

    try:
        study = optuna.load_study(study_name=study_name, storage=open_storage(storage))
        trials = study.trials
    except KeyError:
        print(f"{PROG}: study {study_name!r} was not created (no worker got that far)")
        return
    except Exception as error:
        print(f"{PROG}: cannot read study {study_name!r} from {storage!r}: {error!r}", file=sys.stderr)
        return
    states = Counter(trial.state.name for trial in trials)
    workers = Counter(trial.user_attrs.get("worker", "?") for trial in trials if trial.state.is_finished())
    print(f"{PROG}: study {study_name!r}: {len(trials)} trials ({dict(states)}); finished per worker: {dict(workers)}")
    completed = [trial for trial in trials if trial.state == optuna.trial.TrialState.COMPLETE]
    if completed:
        best = study.best_trial
        print(f"  best trial #{best.number}: value {best.value}, params {best.params}")
    if states.get("RUNNING"):
        print(
            f"  {states['RUNNING']} trial(s) still RUNNING: workers of another launcher or host, or dead ones this "
            "launcher cannot verify; when no worker is running, resume with --fail-stale-trials"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """
    Entry point of ``sb3-blpo-zoo`` and ``python -m sb3_blpo.zoo``.

    :param argv: the arguments after the program name (default: ``sys.argv[1:]``)
    :return: the exit status: 0 on success, 1 when a tuning worker failed, 2 for bad input, a damaged or unwritable
        storage or a missing dependency (message on stderr), 130 when interrupted
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
