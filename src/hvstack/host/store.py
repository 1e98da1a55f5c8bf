"""The embedded store: VM records that must survive a crash of the host service.

:class:`Store` is the interface (the cluster puts etcd behind it later);
:class:`SqliteStore` keeps it in one SQLite file in WAL mode, and :class:`MemoryStore`
serves tests. A VM's name is unique: two creates with the same name at the same moment
see one succeed and one fail with AlreadyExists.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Protocol

from hvstack.compute.model import VmConfig, VmRecord, VmState
from hvstack.errors import AlreadyExists, NotFound


class Store(Protocol):
    def insert(self, record: VmRecord) -> None: ...
    def update(self, record: VmRecord) -> None: ...
    def delete(self, vm_id: str) -> None: ...
    def all(self) -> list[VmRecord]: ...


class MemoryStore:
    def __init__(self) -> None:
        self._records: dict[str, VmRecord] = {}
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
"""


class SqliteStore:
    def __init__(self, path: Path) -> None:
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
        with self._lock:
            try:
                self._db.execute("INSERT INTO vms VALUES (?,?,?,?,?,?,?,?,?)", self._row(record))
            except sqlite3.IntegrityError as exc:
                raise AlreadyExists(
                    f"a VM named '{record.name}' already exists", vm=record.name
                ) from exc

    def update(self, record: VmRecord) -> None:
        with self._lock:
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
        with self._lock:
            self._db.execute("DELETE FROM vms WHERE id=?", (vm_id,))

    def all(self) -> list[VmRecord]:
        with self._lock:
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

    def close(self) -> None:
        with self._lock:
            self._db.close()
