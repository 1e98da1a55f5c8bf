"""The store: versioned keys that must survive a crash of the host service.

:class:`Store` is the interface, shaped like etcd's so that the cluster can put etcd
behind it without touching the callers: text values under string keys, one revision
counter for the whole store (every committed change gets the next number; a key
remembers the revision of its last change), atomic multi-key commits whose operations
may each name the revision they expect (compare-and-swap: ``0`` means "must not exist";
a mismatch raises :class:`~hvstack.errors.StaleRevision` and changes nothing), and
watches that receive every later change under a prefix, in revision order.

:class:`SqliteStore` keeps it in one SQLite file in WAL mode; :class:`MemoryStore` serves
tests. The typed views callers use are in :mod:`hvstack.host.records`; nothing above
them handles raw keys.

The SQLite calls run on the event loop's thread, not in a worker thread: in WAL mode
with ``synchronous=NORMAL`` a commit appends to the log without an fsync (about 0.1 ms
measured on a loaded 2-core host, a thread hop about half that), so the loop stalls
less than a client could notice, and running in place keeps commits and watch
notifications in revision order without another lock. An etcd store awaits the network
instead; callers see no difference.

SQLite's failures never leave here raw: a full or failing file system ("database or
disk is full", "disk I/O error", ENOSPC) is :class:`~hvstack.errors.NoSpace`, text
SQLite cannot encode is :class:`~hvstack.errors.InvalidInput`, anything else a plain
:class:`~hvstack.errors.HvError` naming what the store was doing.

An older database (schema 1: tables ``vms`` and ``jobs``) is converted when opened:
see :func:`_migrate`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from hvstack.errors import HvError, InvalidInput, NoSpace, StaleRevision

SCHEMA_VERSION = 2


@dataclass(frozen=True)
class Entry:
    """A key's value and the revision of its last change."""

    key: str
    value: str
    revision: int


@dataclass(frozen=True)
class Put:
    """Set ``key``; if ``expected`` is given, only while the key is at that revision
    (``0``: only while it does not exist)."""

    key: str
    value: str
    expected: int | None = None


@dataclass(frozen=True)
class Delete:
    """Remove ``key`` (absent is no error unless ``expected`` names a revision)."""

    key: str
    expected: int | None = None


Op = Put | Delete


@dataclass(frozen=True)
class Change:
    """One committed change as a watcher sees it; ``value`` is None for a delete."""

    key: str
    value: str | None
    revision: int


class Store(Protocol):
    async def get(self, key: str) -> Entry | None: ...
    async def scan(self, prefix: str) -> list[Entry]: ...
    async def commit(self, ops: Sequence[Op]) -> int: ...
    async def put(self, key: str, value: str, expected: int | None = None) -> int: ...
    async def delete(self, key: str, expected: int | None = None) -> int: ...
    def watch(self, prefix: str) -> Watch: ...
    def close(self) -> None: ...


def _stale(op: Op, actual: int) -> StaleRevision:
    found = "does not exist" if actual == 0 else f"is at revision {actual}"
    wanted = "not to exist" if op.expected == 0 else f"to be at revision {op.expected}"
    return StaleRevision(f"{op.key} changed meanwhile: it {found}, expected {wanted}",
                         key=op.key, expected=op.expected, actual=actual)


class _Base:
    """What both stores share: single-op helpers and the watchers."""

    def __init__(self) -> None:
        self._watchers: list[tuple[str, asyncio.Queue[Change]]] = []

    async def commit(self, ops: Sequence[Op]) -> int:
        raise NotImplementedError

    async def put(self, key: str, value: str, expected: int | None = None) -> int:
        return await self.commit([Put(key, value, expected)])

    async def delete(self, key: str, expected: int | None = None) -> int:
        return await self.commit([Delete(key, expected)])

    def _notify(self, changes: Sequence[Change]) -> None:
        for prefix, queue in self._watchers:
            for change in changes:
                if change.key.startswith(prefix):
                    queue.put_nowait(change)

    def watch(self, prefix: str) -> Watch:
        """Every change under ``prefix`` committed after this call, in order (the queue
        is unbounded, so a slow watcher loses nothing). Close it with ``aclose``."""
        return Watch(prefix, self._watchers)


class Watch:
    """An iterator over the changes under a prefix; registered from its creation."""

    def __init__(self, prefix: str,
                 watchers: list[tuple[str, asyncio.Queue[Change]]]) -> None:
        self._queue: asyncio.Queue[Change] = asyncio.Queue()
        self._entry = (prefix, self._queue)
        self._watchers = watchers
        watchers.append(self._entry)

    def __aiter__(self) -> Watch:
        return self

    async def __anext__(self) -> Change:
        if self._entry not in self._watchers:
            raise StopAsyncIteration
        return await self._queue.get()

    async def aclose(self) -> None:
        if self._entry in self._watchers:
            self._watchers.remove(self._entry)


class MemoryStore(_Base):
    def __init__(self) -> None:
        super().__init__()
        self._data: dict[str, Entry] = {}
        self._revision = 0

    async def get(self, key: str) -> Entry | None:
        return self._data.get(key)

    async def scan(self, prefix: str) -> list[Entry]:
        return [e for k, e in sorted(self._data.items()) if k.startswith(prefix)]

    async def commit(self, ops: Sequence[Op]) -> int:
        for op in ops:
            actual = self._data[op.key].revision if op.key in self._data else 0
            if op.expected is not None and op.expected != actual:
                raise _stale(op, actual)
        revision = self._revision + 1
        changes = []
        for op in ops:
            if isinstance(op, Put):
                self._data[op.key] = Entry(op.key, op.value, revision)
                changes.append(Change(op.key, op.value, revision))
            elif self._data.pop(op.key, None) is not None:
                changes.append(Change(op.key, None, revision))
        if changes:  # as etcd: a commit that changes nothing takes no revision
            self._revision = revision
        self._notify(changes)
        return self._revision

    def close(self) -> None:
        return None


_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    revision INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
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


class SqliteStore(_Base):
    def __init__(self, path: Path) -> None:
        super().__init__()
        self._path = path
        with _guard("open the database", path):
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for statement in _SCHEMA.split(";"):
                    self._db.execute(statement)  # executescript would commit first
                _migrate(self._db)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _revision(self) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE name='revision'").fetchone()
        return int(row[0]) if row else 0

    async def get(self, key: str) -> Entry | None:
        with _guard(f"read {key}", self._path):
            row = self._db.execute("SELECT key, value, revision FROM kv WHERE key=?",
                                   (key,)).fetchone()
        return Entry(*row) if row else None

    async def scan(self, prefix: str) -> list[Entry]:
        with _guard(f"read {prefix}*", self._path):
            rows = self._db.execute(
                "SELECT key, value, revision FROM kv WHERE substr(key, 1, ?) = ? "
                "ORDER BY key", (len(prefix), prefix)).fetchall()
        return [Entry(*row) for row in rows]

    async def commit(self, ops: Sequence[Op]) -> int:
        doing = "record " + ", ".join(op.key for op in ops)
        with _guard(doing, self._path):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for op in ops:
                    if op.expected is None:
                        continue
                    row = self._db.execute("SELECT revision FROM kv WHERE key=?",
                                           (op.key,)).fetchone()
                    actual = int(row[0]) if row else 0
                    if actual != op.expected:
                        raise _stale(op, actual)
                revision = self._revision() + 1
                changes = []
                for op in ops:
                    if isinstance(op, Put):
                        self._db.execute("INSERT OR REPLACE INTO kv VALUES (?,?,?)",
                                         (op.key, op.value, revision))
                        changes.append(Change(op.key, op.value, revision))
                    elif self._db.execute("DELETE FROM kv WHERE key=?",
                                          (op.key,)).rowcount:
                        changes.append(Change(op.key, None, revision))
                if changes:  # as etcd: a commit that changes nothing takes no revision
                    self._db.execute("INSERT OR REPLACE INTO meta VALUES ('revision', ?)",
                                     (revision,))
                else:
                    revision -= 1
                self._db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                raise
        self._notify(changes)
        return revision

    def close(self) -> None:
        self._db.close()


def _migrate(db: sqlite3.Connection) -> None:
    """Bring the database to :data:`SCHEMA_VERSION` (inside the caller's transaction).

    Schema 1 kept each VM as one row of ``vms`` (settings and this host's observations
    together) and each job as a row of ``jobs``; they become the keys of
    :mod:`hvstack.host.records`, with revision 1, and the old tables go.
    """
    row = db.execute("SELECT value FROM meta WHERE name='schema'").fetchone()
    if row is not None and int(row[0]) >= SCHEMA_VERSION:
        return
    from hvstack.host import records  # the key layout is the records' business

    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    puts: list[tuple[str, str]] = []
    if "vms" in tables:
        for vm_id, name, config, state, reason, pid, started, created, was in db.execute(
                "SELECT id, name, config, state, state_reason, pid, started_at, "
                "created_at, was_running FROM vms"):
            puts += records.v1_vm(vm_id, name, json.loads(config), created,
                                  {"state": state, "reason": reason, "pid": pid,
                                   "started_at": started, "was_running": bool(was)})
        db.execute("DROP TABLE vms")
    if "jobs" in tables:
        for job in db.execute("SELECT id, kind, target, state, created_at, finished_at, "
                              "result, error, error_type FROM jobs"):
            puts.append(records.v1_job(*job))
        db.execute("DROP TABLE jobs")
    if puts:
        db.executemany("INSERT OR REPLACE INTO kv VALUES (?, ?, 1)", puts)
        db.execute("INSERT OR REPLACE INTO meta VALUES ('revision', 1)")
    db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
