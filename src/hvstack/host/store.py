"""The embedded store: VM records that must survive a crash of the host service.

:class:`Store` is the interface (the cluster puts etcd behind it later);
:class:`SqliteStore` keeps it in one SQLite file in WAL mode, and :class:`MemoryStore`
serves tests. A VM's name is unique: two creates with the same name at the same moment
see one succeed and one fail with AlreadyExists.

The store also keeps a minimal record of each job (:class:`JobRecord`), so a job that a
crash or restart of the service interrupted can be shown as failed afterwards.

SQLite's failures never leave here raw: a full or failing file system ("database or
disk is full", "disk I/O error", ENOSPC) is :class:`~hvstack.errors.NoSpace`, text
SQLite cannot encode is :class:`~hvstack.errors.InvalidInput`, anything else a plain
:class:`~hvstack.errors.HvError` naming what the store was doing.
"""

from __future__ import annotations

import contextlib
import errno
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from hvstack.compute.model import VmConfig, VmRecord, VmState
from hvstack.errors import AlreadyExists, HvError, InvalidInput, NoSpace, NotFound


@dataclass(frozen=True)
class JobRecord:
    """What survives of a job: enough to show it, not to resume it.

    ``result`` is the job's result as JSON text; ``error_type`` the slug of its error.
    """

    id: str
    kind: str
    target: str
    state: str
    created_at: float
    finished_at: float | None = None
    result: str | None = None
    error: str | None = None
    error_type: str | None = None


class Store(Protocol):
    def insert(self, record: VmRecord) -> None: ...
    def update(self, record: VmRecord) -> None: ...
    def delete(self, vm_id: str) -> None: ...
    def all(self) -> list[VmRecord]: ...
    def save_job(self, job: JobRecord) -> None: ...
    def delete_job(self, job_id: str) -> None: ...
    def jobs(self) -> list[JobRecord]: ...


class MemoryStore:
    def __init__(self) -> None:
        self._records: dict[str, VmRecord] = {}
        self._jobs: dict[str, JobRecord] = {}
        self._lock = threading.Lock()

    def insert(self, record: VmRecord) -> None:
        with self._lock:
            if any(r.name == record.name for r in self._records.values()):
                raise AlreadyExists(f"a VM named '{record.name}' already exists", vm=record.name)
            self._records[record.id] = record

    def update(self, record: VmRecord) -> None:
        with self._lock:
            if record.id not in self._records:
                raise NotFound(f"VM {record.id} does not exist")
            if any(r.name == record.name and r.id != record.id for r in self._records.values()):
                raise AlreadyExists(f"a VM named '{record.name}' already exists", vm=record.name)
            self._records[record.id] = record

    def delete(self, vm_id: str) -> None:
        with self._lock:
            self._records.pop(vm_id, None)

    def all(self) -> list[VmRecord]:
        with self._lock:
            return list(self._records.values())

    def save_job(self, job: JobRecord) -> None:
        with self._lock:
            self._jobs[job.id] = job

    def delete_job(self, job_id: str) -> None:
        with self._lock:
            self._jobs.pop(job_id, None)

    def jobs(self) -> list[JobRecord]:
        with self._lock:
            return sorted(self._jobs.values(), key=lambda j: j.created_at)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS vms (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    config TEXT NOT NULL,
    state TEXT NOT NULL,
    state_reason TEXT NOT NULL DEFAULT '',
    pid INTEGER,
    started_at REAL,
    created_at REAL NOT NULL,
    was_running INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    target TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    finished_at REAL,
    result TEXT,
    error TEXT,
    error_type TEXT
);
"""

# SQLite's primary result codes (the low byte of an extended code).
_SQLITE_IOERR = 10
_SQLITE_FULL = 13


def _no_space(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int) and code & 0xFF in (_SQLITE_IOERR, _SQLITE_FULL):
        return True
    text = str(exc).lower()
    return "database or disk is full" in text or "disk i/o error" in text


@contextlib.contextmanager
def _guard(doing: str, where: Path) -> Iterator[None]:
    """Turn SQLite's (and the file system's) failures into hvstack errors."""
    try:
        yield
    except (sqlite3.Error, OSError) as exc:
        if isinstance(exc, sqlite3.IntegrityError):
            raise
        if _no_space(exc):
            raise NoSpace(
                f"cannot {doing}: the file system of the host's database ({where.parent}) "
                f"is full or failing ({exc}); free some space and try again",
                path=str(where.parent),
            ) from exc
        raise HvError(f"the host's database failed to {doing}: {exc}") from exc
    except UnicodeEncodeError as exc:
        # Lone surrogates: the API refuses them, this keeps any other way in honest.
        raise InvalidInput(f"cannot {doing}: some text is not valid Unicode") from exc


class SqliteStore:
    def __init__(self, path: Path) -> None:
        self._path = path
        with _guard("open the database", path):
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    @staticmethod
    def _row(record: VmRecord) -> tuple[object, ...]:
        return (
            record.id, record.name, record.config.to_json(), record.state.value,
            record.state_reason, record.pid, record.started_at, record.created_at,
            int(record.was_running),
        )

    def insert(self, record: VmRecord) -> None:
        with self._lock, _guard(f"record VM '{record.name}'", self._path):
            try:
                self._db.execute("INSERT INTO vms VALUES (?,?,?,?,?,?,?,?,?)", self._row(record))
            except sqlite3.IntegrityError as exc:
                raise AlreadyExists(
                    f"a VM named '{record.name}' already exists", vm=record.name
                ) from exc

    def update(self, record: VmRecord) -> None:
        with self._lock, _guard(f"record the change of VM '{record.name}'", self._path):
            try:
                cur = self._db.execute(
                    "UPDATE vms SET name=?, config=?, state=?, state_reason=?, pid=?, "
                    "started_at=?, created_at=?, was_running=? WHERE id=?",
                    (*self._row(record)[1:], record.id),
                )
            except sqlite3.IntegrityError as exc:
                raise AlreadyExists(
                    f"a VM named '{record.name}' already exists", vm=record.name
                ) from exc
            if cur.rowcount == 0:
                raise NotFound(f"VM {record.id} does not exist")

    def delete(self, vm_id: str) -> None:
        with self._lock, _guard("delete a VM's record", self._path):
            self._db.execute("DELETE FROM vms WHERE id=?", (vm_id,))

    def all(self) -> list[VmRecord]:
        with self._lock, _guard("read the VM records", self._path):
            rows = self._db.execute(
                "SELECT id, config, state, state_reason, pid, started_at, created_at, "
                "was_running FROM vms ORDER BY created_at"
            ).fetchall()
        return [
            VmRecord(
                id=row[0], config=VmConfig.from_json(row[1]), state=VmState(row[2]),
                state_reason=row[3], pid=row[4], started_at=row[5], created_at=row[6],
                was_running=bool(row[7]),
            )
            for row in rows
        ]

    def save_job(self, job: JobRecord) -> None:
        with self._lock, _guard(f"record job {job.id}", self._path):
            self._db.execute(
                "INSERT OR REPLACE INTO jobs VALUES (?,?,?,?,?,?,?,?,?)",
                (job.id, job.kind, job.target, job.state, job.created_at, job.finished_at,
                 job.result, job.error, job.error_type),
            )

    def delete_job(self, job_id: str) -> None:
        with self._lock, _guard(f"forget job {job_id}", self._path):
            self._db.execute("DELETE FROM jobs WHERE id=?", (job_id,))

    def jobs(self) -> list[JobRecord]:
        with self._lock, _guard("read the job records", self._path):
            rows = self._db.execute(
                "SELECT id, kind, target, state, created_at, finished_at, result, error, "
                "error_type FROM jobs ORDER BY created_at"
            ).fetchall()
        return [JobRecord(*row) for row in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()
