"""Optuna storages shared by tuning workers: a journal file (``*.log``) on one machine or a database URL for clusters.

rl-zoo3 hands ``--storage`` to Optuna as is, except that a path ending in ``.log`` becomes a
``JournalStorage(JournalFileBackend(path))``. This module makes that storage safe to share and to resume:

* :func:`check_storage` validates the value before any worker starts. It loads an existing journal or SQLite file
  *read-only* and refuses a damaged one (garbage, a record cut off by a crash, a file that is not a database) with one
  line naming the file, without changing a byte of it; it refuses a location that cannot be written; and it creates the
  database schema once, serialised with a file lock and retried, so that workers started together do not race on a
  fresh SQLite file.
* :func:`repair_journal` is the repair path of a journal whose last record was cut off: it backs the file up and
  truncates it to its last complete record.
* :func:`fail_stale_trials` and :func:`fail_worker_trials` mark FAIL the trials left RUNNING by a worker that died, with
  the reason in the user attribute ``fail_reason``, so that ``--max-total-trials`` counts only finished work and a re-run
  completes the study. A trial is taken as dead only when that is certain: its worker (user attribute ``worker``,
  ``host:pid``) ran on this host and that process is gone, or its heartbeat in a database storage stopped (see
  :func:`open_storage`), or the user asks for it (``force``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from sb3_blpo.zoo.errors import ZooDependencyError, ZooInputError

JOURNAL_SUFFIX = ".log"
#: User attribute of a tuning trial: ``host:pid`` of the worker process that runs it.
WORKER_ATTR = "worker"
#: User attribute of a tuning trial: the PID namespace of its worker (two containers can share a host name).
WORKER_PIDNS_ATTR = "worker_pidns"
#: User attribute of a trial marked FAIL because its worker died: why.
FAIL_REASON_ATTR = "fail_reason"
#: Default heartbeat interval of the workers on a database storage, in seconds.
HEARTBEAT_INTERVAL_S = 60
#: A RUNNING trial on a database storage is stale after this many heartbeat intervals without a heartbeat.
HEARTBEAT_GRACE_INTERVALS = 5

_FORMS = (
    "a journal file path ending in .log (one machine or a shared file system, e.g. logs/blpo/study.log), "
    "an SQLite URL (sqlite:///path/to/study.db), or a server URL such as "
    "postgresql+psycopg2://user:password@host:5432/optuna or mysql+pymysql://user:password@host/optuna"
)

_DRIVER_HINTS = {
    "postgresql": "pip install psycopg2-binary (and use postgresql+psycopg2://...) or pip install psycopg",
    "mysql": "pip install pymysql (and use mysql+pymysql://...)",
    "mariadb": "pip install pymysql (and use mariadb+pymysql://...)",
}
_UNCHANGED = "the file was not changed"


def is_journal_file(storage: str) -> bool:
    """Whether rl-zoo3 treats ``storage`` as an Optuna journal file (a path ending in ``.log``)."""
    return storage.endswith(JOURNAL_SUFFIX)


def _redacted(url: Any) -> str:
    return url.render_as_string(hide_password=True)


def _one_line(error: object) -> str:
    return " ".join(str(error).split())


# ------------------------------------------------------------------------------------------------ write permission
def _folder_write_error(folder: Path) -> OSError | None:
    """Try to create (and remove) a file in ``folder``: what fails when the process cannot write there, else None."""
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".sb3-blpo-write-probe-")
    except OSError as error:
        return error
    os.close(fd)
    os.unlink(name)
    return None


def _file_write_error(path: Path) -> OSError | None:
    """Open ``path`` for appending and close it without writing (the file keeps its bytes), or return the error."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    except OSError as error:
        return error
    os.close(fd)
    return None


def _create_folder(storage: str, path: Path, what: str) -> None:
    """Create the folder of a new storage file, or refuse the storage in one line."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ZooInputError(f"--storage {storage!r}: the folder of the {what} cannot be created ({error.strerror})") from error


def _check_writable(storage: str, path: Path, kind: str, why_folder: str) -> None:
    if path.exists():
        error = _file_write_error(path)
        if error is not None:
            raise ZooInputError(f"--storage {storage!r}: the {kind} {str(path)!r} is not writable ({error.strerror})")
    folder = path.parent
    error = _folder_write_error(folder)
    if error is not None:
        raise ZooInputError(
            f"--storage {storage!r}: the folder {str(folder)!r} is not writable ({error.strerror}); {why_folder}"
        )


# ------------------------------------------------------------------------------------------------ journal files
class JournalDamage(ZooInputError):
    """A journal file that Optuna cannot load completely; the file is left as it is."""

    def __init__(self, message: str, *, repairable_at: int | None = None) -> None:
        super().__init__(message)
        #: When the damage is an incomplete last record: the byte length of the complete records before it.
        self.repairable_at = repairable_at


def _replay(records: list[dict[str, Any]]) -> None:
    """Replay ``records`` with Optuna's journal storage in memory; raise :class:`ValueError` naming a bad record."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import BaseJournalBackend

    class ReadOnlyBackend(BaseJournalBackend):
        position = -1

        def read_logs(self, log_number_from: int) -> Iterator[dict[str, Any]]:
            for self.position in range(log_number_from, len(records)):
                yield records[self.position]

        def append_logs(self, logs: list[dict[str, Any]]) -> None:
            raise RuntimeError("the journal is loaded read-only")

    backend = ReadOnlyBackend()
    try:
        storage = JournalStorage(backend)
        for study in storage.get_all_studies():
            storage.get_all_trials(study._study_id, deepcopy=False)
    except Exception as error:
        detail = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        raise ValueError(f"record {backend.position + 1} is not a valid Optuna journal operation ({detail})") from error


def _parse_journal(storage: str, data: bytes) -> tuple[list[dict[str, Any]], int]:
    """
    The records of a journal and the length of its complete part.

    :raises JournalDamage: for a line that is not a record, or an incomplete last record (``repairable_at`` set)
    """
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a complete record
    records: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except ValueError as error:
            reason = error.msg if isinstance(error, json.JSONDecodeError) else _one_line(error)
            raise JournalDamage(
                f"--storage {storage!r} is not a valid Optuna journal: line {number} is not a JSON record ({reason}); "
                f"{_UNCHANGED}"
            ) from None
        if not isinstance(record, dict) or "op_code" not in record:
            raise JournalDamage(
                f"--storage {storage!r} is not a valid Optuna journal: line {number} is not a journal operation; {_UNCHANGED}"
            )
        records.append(record)
    complete = len(data) - len(tail)
    if tail:
        if not tail.lstrip().startswith(b"{"):
            raise JournalDamage(
                f"--storage {storage!r} is not a valid Optuna journal: line {len(lines) + 1} is not a JSON record; "
                f"{_UNCHANGED}"
            )
        raise JournalDamage(
            f"--storage {storage!r}: the journal ends with an incomplete record ({len(tail)} bytes after its last "
            f"complete record, line {len(lines)}), as a crash while writing leaves it; {_UNCHANGED}. Optuna would append "
            "after it and make the journal unreadable: re-run with --repair-journal to back the file up and truncate "
            f"it to its last complete record (byte {complete})",
            repairable_at=complete,
        )
    try:
        _replay(records)
    except ValueError as error:
        raise JournalDamage(f"--storage {storage!r} is not a valid Optuna journal: {error}; {_UNCHANGED}") from None
    return records, complete


def _read_journal(storage: str, path: Path, settle_s: float = 2.0) -> list[dict[str, Any]]:
    """
    Parse the journal at ``path``, read-only.

    A worker of another launcher may be appending a record at that moment: an incomplete last record is read again
    for up to ``settle_s`` seconds before it is reported.
    """
    deadline = time.monotonic() + settle_s
    while True:
        try:
            data = path.read_bytes()
        except OSError as error:
            raise ZooInputError(f"--storage {storage!r}: the journal file cannot be read ({error.strerror})") from error
        try:
            return _parse_journal(storage, data)[0]
        except JournalDamage as damage:
            if damage.repairable_at is None or time.monotonic() > deadline:
                raise
        time.sleep(0.1)


def _check_journal_file(storage: str) -> None:
    path = Path(storage).expanduser()
    if path.is_dir():
        raise ZooInputError(f"--storage {storage!r} is a folder; a journal storage is a file path ending in .log")
    if path.exists():
        if not path.is_file():
            raise ZooInputError(f"--storage {storage!r} is not a regular file; a journal storage is a file")
        _read_journal(storage, path)
    else:
        _create_folder(storage, path, "journal file")
    _check_writable(storage, path, "journal file", "Optuna's journal creates its lock file next to the journal")
    if not path.exists():
        try:
            path.touch()
        except OSError as error:
            raise ZooInputError(f"--storage {storage!r}: the journal file cannot be created ({error.strerror})") from error


def repair_journal(storage: str) -> str:
    """
    Repair a journal whose last record was cut off (a crash while writing): back it up, then truncate it to its last
    complete record, or add the missing line end when the last record is whole.

    It holds Optuna's journal lock meanwhile, so no worker appends to the file while it is repaired.

    :param storage: the journal file path (ending in ``.log``)
    :return: one line saying what was done (or that the journal needed no repair)
    :raises ZooInputError: when ``storage`` is not a journal file, does not exist, or is damaged elsewhere than in its
        last record (then the file is left unchanged: records after a damaged one cannot be replayed safely)
    """
    from optuna.storages.journal import JournalFileSymlinkLock

    if not is_journal_file(storage):
        raise ZooInputError(f"--repair-journal repairs a journal storage (a path ending in .log), not {storage!r}")
    path = Path(storage).expanduser()
    if not path.is_file():
        raise ZooInputError(f"--repair-journal: there is no journal file {storage!r}")
    lock = JournalFileSymlinkLock(str(path))
    try:
        lock.acquire()
    except OSError as error:
        raise ZooInputError(f"--repair-journal {storage!r}: cannot take the journal's lock ({error.strerror})") from error
    try:
        data = path.read_bytes()
        try:
            _parse_journal(storage, data)
            return f"journal {storage!r} is complete; nothing to repair"
        except JournalDamage as damage:
            if damage.repairable_at is None:
                raise ZooInputError(f"{damage} (--repair-journal only repairs an incomplete last record)") from None
            complete = damage.repairable_at
        tail = data[complete:]
        whole = _whole_record(tail)
        _parse_journal(storage, data[:complete] + (tail + b"\n" if whole else b""))  # the repaired file will load
        backup = _backup_path(path)
        shutil.copy2(path, backup)
        with path.open("r+b") as file:
            if whole:
                file.seek(0, os.SEEK_END)
                file.write(b"\n")
            else:
                file.truncate(complete)
            file.flush()
            os.fsync(file.fileno())
    finally:
        lock.release()
    if whole:
        return f"repaired journal {storage!r}: added the line end of its last record (backup: {backup})"
    return f"repaired journal {storage!r}: dropped an incomplete last record of {len(tail)} bytes (backup: {backup})"


def _whole_record(tail: bytes) -> bool:
    try:
        record = json.loads(tail)
    except ValueError:
        return False
    return isinstance(record, dict) and "op_code" in record


def _backup_path(path: Path) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    backup = path.with_name(f"{path.name}.bak-{stamp}")
    index = 1
    while backup.exists():
        backup = path.with_name(f"{path.name}.bak-{stamp}-{index}")
        index += 1
    return backup


# ------------------------------------------------------------------------------------------------ databases
def _check_sqlite_file(storage: str, database: str) -> Path:
    """Refuse an existing SQLite file that SQLite cannot read, read-only; check that the file and its folder are writable."""
    import sqlite3
    from urllib.parse import quote

    path = Path(database).expanduser()
    if path.is_dir():
        raise ZooInputError(f"--storage {storage!r}: {str(path)!r} is a folder, not an SQLite database file")
    if path.exists() and path.stat().st_size > 0:
        try:
            connection = sqlite3.connect(f"file:{quote(str(path.resolve()))}?mode=ro", uri=True, timeout=30)
            try:
                result = connection.execute("PRAGMA quick_check").fetchone()
            finally:
                connection.close()
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) and "readonly" not in str(error):
                raise ZooInputError(f"--storage {storage!r}: {str(path)!r} cannot be read ({error})") from None
            result = ("ok",)  # busy, or a hot journal only a writer can roll back: SQLite recovers it when opened
        except sqlite3.DatabaseError as error:
            raise ZooInputError(
                f"--storage {storage!r}: {str(path)!r} is not a readable SQLite database ({error}); {_UNCHANGED}"
            ) from None
        if result is None or result[0] != "ok":
            detail = result[0] if result else "no result"
            raise ZooInputError(
                f"--storage {storage!r}: the SQLite database {str(path)!r} is damaged ({detail}); {_UNCHANGED}"
            )
    elif not path.exists():
        _create_folder(storage, path, "database file")
    _check_writable(storage, path, "SQLite database", "SQLite writes its journal files next to the database")
    return path


@contextlib.contextmanager
def _schema_lock(path: Path | None) -> Iterator[None]:
    """Serialise schema creation on an SQLite file between processes of this machine (an ``flock`` on the file)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: the retries alone
        fcntl = None  # type: ignore[assignment]
    if path is None or fcntl is None:
        yield
        return
    with path.open("ab") as file:  # an empty file is an empty SQLite database
        fcntl.flock(file.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(file.fileno(), fcntl.LOCK_UN)


def _check_database_url(storage: str, retries: int) -> None:
    try:
        import optuna
        from sqlalchemy import exc
        from sqlalchemy.engine import make_url
    except ImportError as error:
        raise ZooDependencyError(f"optuna is needed for --storage: {error}") from error
    try:
        url = make_url(storage)
    except exc.ArgumentError:
        raise ZooInputError(f"--storage {storage!r} is not a valid storage. Use {_FORMS}.") from None
    try:
        dialect = url.get_dialect()
    except exc.NoSuchModuleError:
        raise ZooInputError(
            f"--storage {_redacted(url)!r}: unknown database backend {url.drivername!r}. Use {_FORMS}."
        ) from None
    try:
        dialect.import_dbapi()
    except ImportError as error:
        hint = _DRIVER_HINTS.get(url.get_backend_name(), "install the database driver")
        raise ZooDependencyError(
            f"--storage {_redacted(url)!r}: the database driver is not installed ({error}); {hint}"
        ) from error
    sqlite_path = None
    if url.get_backend_name() == "sqlite":
        if url.database in (None, "", ":memory:"):
            raise ZooInputError(
                f"--storage {storage!r} is an in-memory SQLite database, which tuning workers cannot share; "
                "use a file: sqlite:///path/to/study.db"
            )
        sqlite_path = _check_sqlite_file(storage, url.database)
    # Create the schema now (RDBStorage does it on first use): one process at a time on this machine, and retried while
    # a process elsewhere creates it (the loser of that race sees "table exists" or a duplicate alembic_version row).
    for attempt in range(retries):
        try:
            with _schema_lock(sqlite_path):
                optuna.storages.RDBStorage(storage)
            return
        except (exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as error:
            cause = error.__cause__ if isinstance(error, optuna.exceptions.StorageInternalError) else error
            detail = cause.orig if isinstance(cause, exc.DBAPIError) else cause
            if isinstance(cause, (exc.OperationalError, exc.IntegrityError)) and attempt < retries - 1:
                time.sleep(0.2 * (attempt + 1))
                continue
            raise ZooInputError(f"--storage {_redacted(url)!r} cannot be opened: {_one_line(detail)}") from error
        except RuntimeError as error:  # e.g. a schema written by another Optuna version
            raise ZooInputError(f"--storage {_redacted(url)!r} cannot be used: {_one_line(error)}") from error


def check_storage(storage: str, retries: int = 8) -> str:
    """
    Validate an rl-zoo3 ``--storage`` value and prepare it for several workers.

    An existing journal or SQLite file is loaded read-only first: a damaged one is refused and left byte-for-byte
    unchanged. A storage location that this process cannot write is refused too.

    :param storage: a journal file path ending in ``.log``, or an SQLAlchemy database URL
    :param retries: attempts to open a database that another worker is initializing
    :return: ``storage`` unchanged (rl-zoo3 receives the same string)
    :raises ZooInputError: for a malformed value, an unknown backend, a damaged or unwritable storage, or one that
        cannot be opened (:class:`JournalDamage` for a damaged journal)
    :raises ZooDependencyError: when the database driver is not installed
    """
    if not storage or not storage.strip():
        raise ZooInputError(f"--storage is empty. Use {_FORMS}.")
    if is_journal_file(storage):
        _check_journal_file(storage)
    else:
        _check_database_url(storage, retries)
    return storage


_HEARTBEAT_STORAGE = "HeartbeatRDBStorage"


def _heartbeat_storage_class() -> type:
    """The ``RDBStorage`` subclass of :func:`open_storage`, built on first use (importing this module skips optuna)."""
    cached = globals().get(_HEARTBEAT_STORAGE)
    if cached is not None:
        return cached
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.storages import RDBStorage

    class HeartbeatRDBStorage(RDBStorage):
        """An ``RDBStorage`` that records why a trial became stale (user attribute ``fail_reason``) before Optuna fails it."""

        def _get_stale_trial_ids(self, study_id: int) -> list[int]:
            stale = super()._get_stale_trial_ids(study_id)
            for trial_id in stale:
                worker = self.get_trial(trial_id).user_attrs.get(WORKER_ATTR, "unknown")
                reason = f"stale: no heartbeat from its worker {worker} for more than {self.grace_period} s"
                with contextlib.suppress(UpdateFinishedTrialError):
                    self.set_trial_user_attr(trial_id, FAIL_REASON_ATTR, reason)
            return stale

    # A module attribute (see __getattr__), so that rl-zoo3 can pickle a study that uses it.
    HeartbeatRDBStorage.__module__ = __name__
    HeartbeatRDBStorage.__qualname__ = _HEARTBEAT_STORAGE
    globals()[_HEARTBEAT_STORAGE] = HeartbeatRDBStorage
    return HeartbeatRDBStorage


def __getattr__(name: str) -> Any:
    if name == _HEARTBEAT_STORAGE:
        return _heartbeat_storage_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def open_storage(storage: str, heartbeat_interval: int | None = None) -> Any:
    """
    The Optuna storage object for ``storage``, as rl-zoo3 builds it (to load a study after tuning).

    :param storage: a journal file path ending in ``.log``, or a database URL
    :param heartbeat_interval: for a database URL, the seconds between heartbeats of a running trial: the storage
        then takes a RUNNING trial as stale (and Optuna fails it) after ``HEARTBEAT_GRACE_INTERVALS`` intervals without
        one. Journal files have no heartbeat.
    :return: an ``optuna.storages.JournalStorage``, the URL itself, or an ``RDBStorage`` with heartbeats
    """
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if is_journal_file(storage):
        return JournalStorage(JournalFileBackend(storage))
    if heartbeat_interval is None:
        return storage
    from optuna.exceptions import ExperimentalWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return _heartbeat_storage_class()(
            storage, heartbeat_interval=heartbeat_interval, grace_period=HEARTBEAT_GRACE_INTERVALS * heartbeat_interval
        )


# ------------------------------------------------------------------------------------------------ dead workers' trials
def worker_pid_namespace() -> str | None:
    """The PID namespace of this process (``pid:[inode]`` on Linux), or None where there is none to read."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def worker_tag(pid: int | None = None) -> str:
    """
    ``host:pid`` of a process of this machine: what a tuning trial records as its user attribute ``worker``.

    :param pid: the process id (default: this process)
    """
    return f"{socket.gethostname()}:{os.getpid() if pid is None else pid}"


def _boot_time() -> float | None:
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                return float(line.split()[1])
    except OSError:
        pass
    return None


def process_is_gone(pid: int, started_before: datetime | None = None) -> bool:
    """
    Whether process ``pid`` of this machine is verifiably not running (anything uncertain counts as running).

    :param pid: the process id
    :param started_before: when known, a time at which the process was already running (a trial's start): a process
        with this pid that started later is another one (the pid was reused), so the original is gone
    """
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # e.g. PermissionError: it exists, under another user
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False  # no /proc (macOS): it exists
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):  # a zombie has exited
        return True
    boot = _boot_time()
    if started_before is None or boot is None:
        return False
    started = boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    return started > started_before.timestamp() + 2.0  # the boot time has 1 s resolution


def _stale_reason(trial: Any, host: str, pidns: str | None) -> str | None:
    """Why ``trial`` (RUNNING) is certainly dead by the host+pid rule, or None."""
    tag = trial.user_attrs.get(WORKER_ATTR)
    if not isinstance(tag, str) or ":" not in tag:
        return None
    tag_host, _, pid = tag.rpartition(":")
    trial_pidns = trial.user_attrs.get(WORKER_PIDNS_ATTR)
    if tag_host != host or not pid.isdigit() or (trial_pidns is not None and pidns is not None and trial_pidns != pidns):
        return None
    if not process_is_gone(int(pid), trial.datetime_start):
        return None
    return f"stale: its worker {tag} is no longer running (it was killed or crashed)"


def _load_study(storage: str, study_name: str, heartbeat_interval: int | None = None) -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=study_name, storage=open_storage(storage, heartbeat_interval))
    except KeyError:  # no such study (yet)
        return None


def _fail_trials(study: Any, reason_of: Callable[[Any], str | None]) -> list[str]:
    """Mark FAIL every RUNNING trial of ``study`` that ``reason_of`` gives a reason for; one line per trial failed."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        reason = reason_of(trial)
        if reason is None:
            continue
        try:
            study._storage.set_trial_user_attr(trial._trial_id, FAIL_REASON_ATTR, reason)
            study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        except UpdateFinishedTrialError:
            continue  # it finished meanwhile, or another process failed it first
        failed.append(f"trial #{trial.number} marked FAIL: {reason}")
    return failed


def fail_stale_trials(
    storage: str, study_name: str, *, force: bool = False, heartbeat_interval: int | None = None
) -> list[str]:
    """
    Mark FAIL the trials of a study that are RUNNING although their worker is dead, as found before tuning (resume).

    A trial is dead when its worker (user attribute ``worker``, ``host:pid``) ran on this host, in this PID namespace,
    and that process is gone; on a database storage with ``heartbeat_interval``, also when its heartbeat stopped.
    RUNNING trials of other hosts may belong to live workers and are left alone, unless ``force``.

    :param storage: the ``--storage`` value (already checked with :func:`check_storage`)
    :param study_name: the study; nothing happens when it does not exist
    :param force: mark FAIL every RUNNING trial (``--fail-stale-trials``: the user says that no worker is running)
    :param heartbeat_interval: the workers' heartbeat interval on a database storage (None: no heartbeat check)
    :return: one line per trial marked FAIL; the reason is in its user attribute ``fail_reason``
    """
    import optuna

    study = _load_study(storage, study_name, None if is_journal_file(storage) else heartbeat_interval)
    if study is None:
        return []
    messages = []
    if not force and heartbeat_interval is not None and not is_journal_file(storage):
        running = {trial.number for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,)):
            if trial.number in running:
                messages.append(f"trial #{trial.number} marked FAIL: {trial.user_attrs.get(FAIL_REASON_ATTR, 'stale')}")
    host, pidns = socket.gethostname(), worker_pid_namespace()

    def reason_of(trial: Any) -> str | None:
        if force:
            worker = trial.user_attrs.get(WORKER_ATTR, "unknown")
            return f"stale: marked FAIL by --fail-stale-trials (worker {worker})"
        return _stale_reason(trial, host, pidns)

    return messages + _fail_trials(study, reason_of)


def fail_worker_trials(storage: str, study_name: str, pid: int, reason: str) -> list[str]:
    """
    Mark FAIL the RUNNING trials of process ``pid`` of this host: a worker that the caller saw die.

    :param storage: the ``--storage`` value
    :param study_name: the study
    :param pid: the dead worker's process id
    :param reason: why, recorded in each trial's user attribute ``fail_reason``
    :return: one line per trial marked FAIL
    """
    study = _load_study(storage, study_name)
    if study is None:
        return []
    tag = worker_tag(pid)
    return _fail_trials(study, lambda trial: reason if trial.user_attrs.get(WORKER_ATTR) == tag else None)
