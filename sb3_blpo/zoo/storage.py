"""Optuna storages shared by tuning workers: a journal file (``*.log``) on one machine or a database URL for clusters.

rl-zoo3 hands ``--storage`` to Optuna as is, except that a path ending in ``.log`` becomes a
``JournalStorage(JournalFileBackend(path))``. :func:`check_storage` validates the value first so that a typo gives one
clear message instead of an SQLAlchemy traceback, creates the parent folder of a file-based storage, and creates the
database schema once (with retries, so that workers started together do not race on a fresh SQLite file).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sb3_blpo.zoo.errors import ZooDependencyError, ZooInputError

JOURNAL_SUFFIX = ".log"

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


def is_journal_file(storage: str) -> bool:
    """Whether rl-zoo3 treats ``storage`` as an Optuna journal file (a path ending in ``.log``)."""
    return storage.endswith(JOURNAL_SUFFIX)


def _redacted(url: Any) -> str:
    return url.render_as_string(hide_password=True)


def _check_journal_file(storage: str) -> None:
    path = Path(storage).expanduser()
    if path.is_dir():
        raise ZooInputError(f"--storage {storage!r} is a folder; a journal storage is a file path ending in .log")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a"):
            pass
    except OSError as error:
        raise ZooInputError(f"--storage {storage!r}: the journal file cannot be created: {error}") from error


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
    if url.get_backend_name() == "sqlite":
        if url.database in (None, "", ":memory:"):
            raise ZooInputError(
                f"--storage {storage!r} is an in-memory SQLite database, which tuning workers cannot share; "
                "use a file: sqlite:///path/to/study.db"
            )
        try:
            Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ZooInputError(f"--storage {storage!r}: cannot create the folder of the database file: {error}") from error
    # Create the schema now (RDBStorage does it on first use), retrying while another worker holds the database lock.
    for attempt in range(retries):
        try:
            optuna.storages.RDBStorage(storage)
            return
        except exc.OperationalError as error:
            if attempt == retries - 1:
                raise ZooInputError(f"--storage {_redacted(url)!r} cannot be opened: {error.orig}") from error
            time.sleep(0.5 * (attempt + 1))
        except exc.SQLAlchemyError as error:
            raise ZooInputError(f"--storage {_redacted(url)!r} cannot be opened: {error}") from error


def check_storage(storage: str, retries: int = 5) -> str:
    """
    Validate an rl-zoo3 ``--storage`` value and prepare it for several workers.

    :param storage: a journal file path ending in ``.log``, or an SQLAlchemy database URL
    :param retries: attempts to open a database that another worker is initializing
    :return: ``storage`` unchanged (rl-zoo3 receives the same string)
    :raises ZooInputError: for a malformed value, an unknown backend, or a storage that cannot be opened
    :raises ZooDependencyError: when the database driver is not installed
    """
    if not storage or not storage.strip():
        raise ZooInputError(f"--storage is empty. Use {_FORMS}.")
    if is_journal_file(storage):
        _check_journal_file(storage)
    else:
        _check_database_url(storage, retries)
    return storage


def open_storage(storage: str) -> Any:
    """
    The Optuna storage object for ``storage``, as rl-zoo3 builds it (to load a study after tuning).

    :param storage: a journal file path ending in ``.log``, or a database URL
    :return: an ``optuna.storages.JournalStorage`` or the URL itself
    """
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if is_journal_file(storage):
        return JournalStorage(JournalFileBackend(storage))
    return storage
