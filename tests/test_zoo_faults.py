"""Fault behaviour of ``sb3-blpo-zoo train --optimize`` on a shared storage (docs/zoo.md, "Fault behaviour and resume").

* A worker killed by a signal makes the launcher exit 1, naming it; its running trial is marked FAIL with the reason
  in the user attribute ``fail_reason``, and the surviving workers complete the study.
* Trials left RUNNING by dead workers are marked FAIL at start-up (only those verifiably dead: same host and PID
  namespace, process gone; or a stopped heartbeat on a database; or all of them with ``--fail-stale-trials``), so a
  re-run with ``--max-total-trials`` completes the study.
* Damaged storage (garbage or torn journal, unreadable SQLite file) is refused in one line, exit 2, the file left
  byte-for-byte unchanged; ``--repair-journal`` backs up and truncates a torn journal.
* Unwritable storage locations are refused in one line, exit 2 (as root, the launcher runs without
  ``CAP_DAC_OVERRIDE`` so that file permissions apply).
* Concurrent start-up on a fresh SQLite file does not race.

Signals go to the pids that the launcher prints for its workers; every launcher runs in its own process group, which
is killed if a test fails midway.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import multiprocessing
import os
import pickle
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import optuna
import pytest

import sb3_blpo
from sb3_blpo.zoo import cli, main
from sb3_blpo.zoo import storage as zoo_storage
from sb3_blpo.zoo.storage import (
    FAIL_REASON_ATTR,
    WORKER_ATTR,
    WORKER_PIDNS_ATTR,
    check_storage,
    fail_stale_trials,
    open_storage,
    process_is_gone,
    repair_journal,
    worker_pid_namespace,
    worker_tag,
)

TIMEOUT = 300
RUNNING = optuna.trial.TrialState.RUNNING
FAIL = optuna.trial.TrialState.FAIL
FINISHED_OK = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
# A tiny tuning run of BLPO on CartPole-v1 (each trial a few hundred steps).
TUNE = [
    "train",
    "--algo",
    "blpo",
    "--env",
    "CartPole-v1",
    "--optimize",
    "--no-optim-plots",
    "--num-threads",
    "1",
    "--eval-episodes",
    "2",
]

optuna.logging.set_verbosity(optuna.logging.WARNING)


def subprocess_env() -> dict[str, str]:
    """The environment of a launcher subprocess: one thread, and the same ``sb3_blpo`` as this test process."""
    package_parent = str(Path(sb3_blpo.__file__).resolve().parents[1])
    python_path = [package_parent, *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "PYTHONPATH": os.pathsep.join(python_path)}


class Launcher:
    """``python -m sb3_blpo.zoo ARGS`` in its own process group, output in files."""

    def __init__(self, cwd: Path, args: list[str], name: str = "launcher") -> None:
        self.out_path, self.err_path = cwd / f"{name}.out", cwd / f"{name}.err"
        with self.out_path.open("w") as out, self.err_path.open("w") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "sb3_blpo.zoo", *args],
                cwd=cwd,
                env=subprocess_env(),
                stdout=out,
                stderr=err,
                start_new_session=True,
            )

    @property
    def stdout(self) -> str:
        return self.out_path.read_text()

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    def worker_pid(self, index: int) -> int:
        """The pid that the launcher printed for worker ``index``."""
        pattern = re.compile(rf"^  worker {index}: pid (\d+),", re.MULTILINE)
        wait_until(lambda: pattern.search(self.stdout) or self.process.poll() is not None, f"worker {index}'s pid")
        found = pattern.search(self.stdout)
        assert found, f"no pid for worker {index}:\n{self.stdout}\n{self.stderr}"
        return int(found.group(1))

    def wait(self) -> int:
        return self.process.wait(timeout=TIMEOUT)

    def kill_group(self) -> None:
        """Kill the launcher and its workers (its process group) if the launcher has not been waited for yet."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@pytest.fixture
def launch(tmp_path) -> Iterator:
    launchers: list[Launcher] = []

    def start(*args: str, cwd: Path = tmp_path, name: str = "launcher") -> Launcher:
        launchers.append(Launcher(cwd, list(args), name))
        return launchers[-1]

    yield start
    for launcher in launchers:
        launcher.kill_group()


def wait_until(condition, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def run_main(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


def assert_one_line_error(err: str, *fragments: str) -> None:
    assert err.startswith("sb3-blpo-zoo: error: "), err
    assert err.count("\n") == 1, f"not one line:\n{err}"
    assert "Traceback" not in err and "[SQL:" not in err, err
    for fragment in fragments:
        assert fragment in err, err


def load_study(storage: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(storage))


def make_journal(path: Path, name: str = "s", n_trials: int = 2) -> bytes:
    """A journal with a study of ``n_trials`` complete trials; its bytes."""
    study = optuna.create_study(study_name=name, storage=open_storage(str(path)), direction="maximize")
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=n_trials)
    return path.read_bytes()


def dead_pid() -> int:
    """The pid of a process of this host that has exited (and been reaped)."""
    result = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(result.stdout)


# ---------------------------------------------------------------------------------------------------- fault 1: signals
def test_killed_worker_fails_the_launcher_and_only_its_trial(tmp_path, launch):
    storage = str(tmp_path / "study.log")
    # fmt: off
    launcher = launch(*TUNE, "-n", "256", "--max-total-trials", "3", "--n-workers", "2", "--storage", storage,
                      "--study-name", "k", "--seed", "0")
    # fmt: on
    pid = launcher.worker_pid(1)
    tag = f'"{WORKER_ATTR}":"{worker_tag(pid)}"'
    wait_until(lambda: tag in Path(storage).read_text() or launcher.process.poll() is not None, "worker 1's trial")
    assert launcher.process.poll() is None, f"the launcher ended first:\n{launcher.stdout}\n{launcher.stderr}"
    os.kill(pid, signal.SIGKILL)  # the pid the launcher printed (its live child), in the middle of its trial
    code = launcher.wait()
    err = launcher.stderr
    assert code == cli.EXIT_WORKER_FAILED == 1, err
    assert f"worker 1 (pid {pid}) was killed by signal 9 (SIGKILL)" in err
    assert (
        err.splitlines()[-1]
        == f"sb3-blpo-zoo: error: 1 of 2 workers failed: worker 1 (pid {pid}) was killed by signal 9 (SIGKILL)"
    )

    trials = load_study(storage, "k").trials
    killed = [trial for trial in trials if trial.state == FAIL]
    assert len(killed) == 1 and killed[0].user_attrs[WORKER_ATTR] == worker_tag(pid)
    assert "killed by signal 9 (SIGKILL) while the trial was running" in killed[0].user_attrs[FAIL_REASON_ATTR]
    assert f"trial #{killed[0].number} marked FAIL" in err
    assert not [trial for trial in trials if trial.state == RUNNING]
    # --max-total-trials counts finished work only: the surviving worker completed the study
    assert len([trial for trial in trials if trial.state in FINISHED_OK]) == 3
    assert "{'FAIL': 1" in launcher.stdout or "'FAIL': 1}" in launcher.stdout


def test_worker_exit_statuses_are_reported(tmp_path, capsys):
    """Any worker that dies by a signal or exits non-zero is a failure, named on stderr (max(0, -9) was 0)."""
    codes = {
        "ok": "pass",
        "status 3": "raise SystemExit(3)",
        "SIGTERM": "import os, signal; os.kill(os.getpid(), signal.SIGTERM)",
    }
    processes = [subprocess.Popen([sys.executable, "-c", code]) for code in codes.values()]
    logs = [tmp_path / f"w{index}.log" for index in range(len(processes))]
    for log in logs:
        log.write_text("last line of the worker\n")
    failures = cli._wait_workers(processes, logs, str(tmp_path / "none.log"), "no-such-study")
    assert failures == [
        f"worker 1 (pid {processes[1].pid}) exited with status 3",
        f"worker 2 (pid {processes[2].pid}) was killed by signal 15 (SIGTERM)",
    ]
    err = capsys.readouterr().err
    assert "last line of the worker" in err  # the log tail of a worker that exited non-zero


# ---------------------------------------------------------------------------------------------------- fault 2: resume
def test_rerun_fails_stale_trials_of_dead_workers_only_then_completes(tmp_path, launch):
    if worker_pid_namespace() is None:
        pytest.skip("no /proc/self/ns/pid: the PID-namespace rule cannot be checked here")
    storage = str(tmp_path / "study.log")
    study = optuna.create_study(study_name="r", storage=open_storage(storage), direction="maximize")
    host, gone = socket.gethostname(), dead_pid()
    running = {
        "dead": {WORKER_ATTR: f"{host}:{gone}"},  # a crashed worker of a previous run: the only one failed
        "live": {WORKER_ATTR: worker_tag()},  # this test process: alive
        "other host": {WORKER_ATTR: "elsewhere.example:123"},  # may be alive: cannot be verified
        "other container": {WORKER_ATTR: f"{host}:{gone}", WORKER_PIDNS_ATTR: "pid:[1]"},  # another PID namespace
        "untagged": {},
    }
    numbers = {}
    for label, attrs in running.items():
        trial = study.ask()
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        numbers[label] = trial.number

    # Before: the 5 RUNNING trials counted toward --max-total-trials 5, and a re-run ran nothing.
    args = [*TUNE, "-n", "256", "--max-total-trials", "5", "--storage", storage, "--study-name", "r", "--seed", "0"]
    launcher = launch(*args)
    assert launcher.wait() == 0, launcher.stderr[-3000:]
    assert f"trial #{numbers['dead']} marked FAIL: stale: its worker {host}:{gone} is no longer running" in launcher.stdout
    trials = load_study(storage, "r").trials
    assert trials[numbers["dead"]].state == FAIL
    assert "no longer running" in trials[numbers["dead"]].user_attrs[FAIL_REASON_ATTR]
    for label in ("live", "other host", "other container", "untagged"):
        assert trials[numbers[label]].state == RUNNING, label
    assert len([trial for trial in trials if trial.state in FINISHED_OK]) == 1  # the study is complete: 4 running + 1

    # --fail-stale-trials: the user says no worker is running; every RUNNING trial is failed and the study resumes.
    args[args.index("--max-total-trials") + 1] = "2"
    launcher = launch(*args, "--fail-stale-trials", name="forced")
    assert launcher.wait() == 0, launcher.stderr[-3000:]
    trials = load_study(storage, "r").trials
    assert not [trial for trial in trials if trial.state == RUNNING]
    for label in ("live", "other host", "other container", "untagged"):
        assert "--fail-stale-trials" in trials[numbers[label]].user_attrs[FAIL_REASON_ATTR]
    assert len([trial for trial in trials if trial.state in FINISHED_OK]) == 2


def test_process_is_gone():
    assert not process_is_gone(os.getpid())
    assert not process_is_gone(os.getpid(), started_before=datetime.now())
    if Path("/proc/self/stat").exists():
        # a process with this pid that started after the trial did is another process: the pid was reused
        assert process_is_gone(os.getpid(), started_before=datetime(2000, 1, 1))
    assert process_is_gone(dead_pid())


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_heartbeat_fails_stale_trials_on_a_database(tmp_path):
    url = f"sqlite:///{tmp_path / 'hb.db'}"
    check_storage(url)
    rdb = open_storage(url, heartbeat_interval=1)
    study = optuna.create_study(study_name="h", storage=rdb)
    stale, fresh = study.ask(), study.ask()
    for trial in (stale, fresh):
        trial.set_user_attr(WORKER_ATTR, "elsewhere.example:1")  # another host: only the heartbeat can tell
        rdb.record_heartbeat(trial._trial_id)
    with sqlite3.connect(tmp_path / "hb.db") as connection:
        connection.execute(
            "UPDATE trial_heartbeats SET heartbeat = datetime('now', '-1 hour') WHERE trial_id = ?", (stale._trial_id,)
        )
    assert fail_stale_trials(url, "h") == []  # without the heartbeat setting: another host's trials are left alone
    messages = fail_stale_trials(url, "h", heartbeat_interval=1)
    assert messages == [
        f"trial #{stale.number} marked FAIL: stale: no heartbeat from its worker elsewhere.example:1 for more than 5 s"
    ]
    trials = optuna.load_study(study_name="h", storage=url).trials
    assert [trial.state for trial in trials] == [FAIL, RUNNING]
    assert "no heartbeat" in trials[0].user_attrs[FAIL_REASON_ATTR]
    assert pickle.loads(pickle.dumps(study)).trials[0].state == FAIL  # rl-zoo3 pickles the study into its report


# ---------------------------------------------------------------------------------------------------- fault 3: damage
def torn(data: bytes) -> bytes:
    """``data`` plus the first half of its last record, as a crash in the middle of a write leaves it."""
    last = data.rstrip(b"\n").rsplit(b"\n", 1)[-1]
    return data + last[: len(last) // 2]


@pytest.mark.parametrize(
    "content, message",
    [
        (b"this is not a journal\n", "line 1 is not a JSON record (Expecting value)"),
        (bytes(range(256)) * 4, "is not a JSON record"),
        (b'{"a": 1}\n', "line 1 is not a journal operation"),
        (b'{"op_code": 99, "worker_id": "w"}\n', "record 1 is not a valid Optuna journal operation"),
        ("torn-then-appended", "is not a JSON record"),  # what the workers' appends made of a torn journal
    ],
)
def test_damaged_journal_is_refused_and_left_unchanged(workdir, capsys, content, message):
    path = workdir / "study.log"
    if content == "torn-then-appended":
        data = make_journal(path)
        content = torn(data) + data.split(b"\n")[0] + b"\n"
    path.write_bytes(content)
    code, err = run_main(capsys, *TUNE, "--storage", str(path), "--study-name", "s")
    assert code == 2
    assert_one_line_error(err, f"--storage {str(path)!r}", "not a valid Optuna journal", message, "the file was not changed")
    assert path.read_bytes() == content
    # a journal damaged before its last record cannot be repaired safely: refused too, still unchanged
    code, err = run_main(capsys, *TUNE, "--storage", str(path), "--study-name", "s", "--repair-journal")
    assert code == 2 and "--repair-journal only repairs an incomplete last record" in err
    assert path.read_bytes() == content
    assert not list(workdir.glob("study.log.bak*"))


def test_torn_journal_is_refused_then_repaired_and_resumed(workdir, capsys, launch):
    path = workdir / "study.log"
    data = torn(make_journal(path))
    path.write_bytes(data)
    assert len(load_study(str(path), "s").trials) == 2  # optuna itself skips the torn record...
    code, err = run_main(capsys, *TUNE, "--storage", str(path), "--study-name", "s", "--max-total-trials", "3")
    assert code == 2  # ...but would append after it: refused
    assert_one_line_error(err, "the journal ends with an incomplete record", "--repair-journal", "the file was not changed")
    assert path.read_bytes() == data

    # fmt: off
    launcher = launch(*TUNE, "-n", "256", "--storage", str(path), "--study-name", "s", "--max-total-trials", "3",
                      "--seed", "0", "--repair-journal")
    # fmt: on
    assert launcher.wait() == 0, launcher.stderr[-3000:]
    assert f"repaired journal {str(path)!r}: dropped an incomplete last record" in launcher.stdout
    (backup,) = workdir.glob("study.log.bak-*")
    assert backup.read_bytes() == data
    assert path.read_bytes().startswith(data[: data.rfind(b"\n") + 1])  # the recorded trials are kept
    trials = load_study(str(path), "s").trials
    assert len(trials) == 3 and all(trial.state in FINISHED_OK for trial in trials)


def test_repair_journal_completes_a_whole_last_record(tmp_path):
    path = tmp_path / "study.log"
    data = make_journal(path)
    path.write_bytes(data[:-1])  # the last record is whole, only its line end is missing
    assert "added the line end" in repair_journal(str(path))
    assert path.read_bytes() == data
    assert "nothing to repair" in repair_journal(str(path))


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_unreadable_sqlite_file_is_refused_and_left_unchanged(workdir, capsys, damage):
    path = workdir / "study.db"
    if damage == "garbage":
        content = b"this is not a database" * 100
    else:
        url = f"sqlite:///{path}"
        optuna.create_study(study_name="s", storage=url).optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
        content = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(content)
    code, err = run_main(capsys, *TUNE, "--storage", f"sqlite:///{path}", "--study-name", "s")
    assert code == 2
    assert_one_line_error(err, str(path), "the file was not changed")
    assert path.read_bytes() == content


# ---------------------------------------------------------------------------------------------------- read-only places
_PR_CAPBSET_DROP = 24
_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH, _CAP_FOWNER = 1, 2, 3

_READ_ONLY_SCRIPT = """
import contextlib, io, json, sys
from pathlib import Path
probe = Path(sys.argv[1]) / "probe"
try:
    probe.write_text("x")
except OSError:
    pass
else:
    probe.unlink()
    print(json.dumps("writable"))
    raise SystemExit(0)
from sb3_blpo.zoo import main
results = {}
for storage in sys.argv[2:]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["train", "--algo", "blpo", "--env", "CartPole-v1", "--optimize", "--storage", storage,
                     "--study-name", "s"])
    results[storage] = [code, err.getvalue()]
print(json.dumps(results))
"""


def _drop_file_capabilities() -> None:
    """In the child, before exec: as root, drop the capabilities that bypass file permissions."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH, _CAP_FOWNER):
        if libc.prctl(_PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_read_only_locations_are_refused_in_one_line(tmp_path):
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    journal, database = read_only / "existing.log", read_only / "existing.db"
    make_journal(journal)
    optuna.create_study(study_name="s", storage=f"sqlite:///{database}")
    read_only_file = tmp_path / "read_only_file.log"
    make_journal(read_only_file)
    before = {path: path.read_bytes() for path in (journal, database, read_only_file)}
    storages = {
        str(journal): "is not writable",
        f"sqlite:///{database}": "is not writable",
        str(read_only / "new.log"): "is not writable",
        f"sqlite:///{read_only / 'new.db'}": "is not writable",
        str(read_only / "sub" / "new.log"): "cannot be created",
        str(read_only_file): "the journal file",
    }
    read_only.chmod(0o555)
    read_only_file.chmod(0o444)
    as_root = os.geteuid() == 0
    try:
        result = subprocess.run(
            [sys.executable, "-c", _READ_ONLY_SCRIPT, str(read_only), *storages],
            env=subprocess_env(),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            preexec_fn=_drop_file_capabilities if as_root else None,  # root bypasses permissions: drop that power
        )
    finally:
        read_only.chmod(0o755)
        read_only_file.chmod(0o644)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout.strip().splitlines()[-1])
    if results == "writable":
        pytest.skip("this process can write to a read-only folder (root with CAP_DAC_OVERRIDE that cannot be dropped)")
    for storage, fragment in storages.items():
        code, err = results[storage]
        assert code == 2, (storage, err)
        assert_one_line_error(err, f"--storage {storage!r}", fragment)
    for path, content in before.items():
        assert path.read_bytes() == content
    assert not (read_only / "new.log").exists() and not (read_only / "new.db").exists()


# ---------------------------------------------------------------------------------------------------- fault 4: SQLite
def _check_at_once(url: str, barrier, queue) -> None:
    barrier.wait()
    try:
        check_storage(url)
        queue.put("ok")
    except BaseException as error:
        queue.put(f"{type(error).__name__}: {error}")


@pytest.mark.parametrize("serialised", [True, False], ids=["flock-and-retries", "retries-only"])
def test_concurrent_start_up_on_a_fresh_sqlite_file(tmp_path, monkeypatch, serialised):
    """Several launchers' start-up checks at once on a fresh SQLite file, repeated (the old code failed ~6 rounds in 10)."""
    if not serialised:  # as between machines, where the flock does not serialise: the retries alone
        monkeypatch.setattr(zoo_storage, "_schema_lock", lambda path: contextlib.nullcontext())
    context = multiprocessing.get_context("fork")
    n_processes, rounds = 4, 5
    for index in range(rounds):
        url = f"sqlite:///{tmp_path / f'round{index}' / 'study.db'}"
        barrier, queue = context.Barrier(n_processes), context.Queue()
        processes = [context.Process(target=_check_at_once, args=(url, barrier, queue)) for _ in range(n_processes)]
        for process in processes:
            process.start()
        try:
            results = [queue.get(timeout=TIMEOUT) for _ in processes]
        finally:
            for process in processes:
                process.join(timeout=TIMEOUT)
                if process.is_alive():
                    process.kill()
        assert results == ["ok"] * n_processes, f"round {index}: {results}"
        assert optuna.storages.RDBStorage(url).get_all_studies() == []


@pytest.mark.slow
def test_concurrent_launchers_on_a_fresh_sqlite_file(tmp_path, launch):
    """The docs' by-hand loop: 3 launchers started together on a fresh SQLite file, 3 times."""
    for index in range(3):
        url = f"sqlite:///{tmp_path / f'round{index}' / 'study.db'}"
        args = [*TUNE, "-n", "256", "--n-trials", "1", "--storage", url, "--study-name", "c", "-uuid"]
        launchers = [launch(*args, "--seed", str(seed), name=f"r{index}l{seed}") for seed in range(3)]
        for launcher in launchers:
            assert launcher.wait() == 0, launcher.stderr[-3000:]
        trials = optuna.load_study(study_name="c", storage=url).trials
        assert len(trials) == 3 and all(trial.state in FINISHED_OK for trial in trials)
        with sqlite3.connect(tmp_path / f"round{index}" / "study.db") as connection:  # the workers' heartbeats
            assert connection.execute("SELECT COUNT(*) FROM trial_heartbeats").fetchone()[0] == 3


# ---------------------------------------------------------------------------------------------------- options
@pytest.mark.parametrize(
    "args, message",
    [
        (["--heartbeat", "-1"], "--heartbeat must be >= 0 seconds"),
        (["--repair-journal"], "--repair-journal repairs the journal of a tuning run"),
        (["--optimize", "--fail-stale-trials"], "--fail-stale-trials needs --optimize, --storage and --study-name"),
        (["--optimize", "--storage", "sqlite:///x.db", "--repair-journal"], "--repair-journal repairs a journal storage"),
    ],
)
def test_launcher_option_errors(workdir, capsys, args, message):
    code, err = run_main(capsys, "train", "--algo", "blpo", *args)
    assert code == 2
    assert_one_line_error(err, message)


def test_cli_constants_match_storage():
    assert cli.HEARTBEAT_INTERVAL_S == zoo_storage.HEARTBEAT_INTERVAL_S
    assert cli.HEARTBEAT_GRACE_INTERVALS == zoo_storage.HEARTBEAT_GRACE_INTERVALS


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path
