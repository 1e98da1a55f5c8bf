"""The store (SQLite and in-memory, same contract) and the VM records on top of it."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from hvstack.compute.model import (
    DiskAttachment,
    DiskBus,
    Generation,
    VmConfig,
    VmObserved,
    VmRecord,
    VmState,
)
from hvstack.errors import AlreadyExists, StaleRevision
from hvstack.host.records import JobRecord, JobRecords, VmRecords
from hvstack.host.store import Change, Delete, MemoryStore, Put, SqliteStore, Store


def record(vm_id: str, name: str, **changes: object) -> VmRecord:
    return VmRecord(id=vm_id, config=VmConfig(name=name), created_at=float(int(vm_id)),
                    ).evolve(**changes)


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    backend: Store = (MemoryStore() if request.param == "memory"
                      else SqliteStore(tmp_path / "sub" / "hv.db"))
    yield backend
    backend.close()


# -- the key-value contract ---------------------------------------------------------------


async def test_revisions_count_every_commit_of_the_whole_store(store: Store) -> None:
    assert await store.get("a") is None
    first = await store.put("a", "1")
    second = await store.put("b", "2")
    third = await store.commit([Put("a", "3"), Delete("b")])
    assert (first, second, third) == (1, 2, 3)
    entry = await store.get("a")
    assert entry is not None and (entry.value, entry.revision) == ("3", 3)
    assert await store.get("b") is None
    await store.put("ab", "x")
    assert [e.key for e in await store.scan("a")] == ["a", "ab"]
    assert await store.delete("missing") == 4  # nothing changed: no new revision
    assert await store.put("c", "") == 5


async def test_compare_and_swap(store: Store) -> None:
    revision = await store.put("k", "v1", expected=0)  # create only
    with pytest.raises(StaleRevision) as info:
        await store.put("k", "again", expected=0)
    assert "k changed meanwhile: it is at revision 1" in info.value.message
    assert await store.put("k", "v2", expected=revision) == 2
    with pytest.raises(StaleRevision):
        await store.delete("k", expected=revision)  # a stale delete changes nothing
    entry = await store.get("k")
    assert entry is not None and entry.value == "v2"


async def test_a_failed_compare_commits_none_of_the_operations(store: Store) -> None:
    await store.put("taken", "x")
    with pytest.raises(StaleRevision):
        await store.commit([Put("new", "y", expected=0), Put("taken", "z", expected=0)])
    assert await store.get("new") is None
    assert await store.put("other", "o") == 2  # the failed commit used no revision


async def test_watchers_get_every_change_in_order(store: Store) -> None:
    seen: list[Change] = []
    watch = store.watch("vms/")

    async def follow() -> None:
        async for change in watch:
            seen.append(change)
            if len(seen) == 3:
                return

    follower = asyncio.create_task(follow())
    await store.put("vms/a", "1")
    await store.put("jobs/x", "not watched")
    await store.commit([Put("vms/b", "2"), Delete("vms/a")])
    await asyncio.wait_for(follower, 5)
    assert seen == [Change("vms/a", "1", 1), Change("vms/b", "2", 3),
                    Change("vms/a", None, 3)]
    await watch.aclose()
    await store.put("vms/c", "after close")
    assert [c async for c in watch] == []  # a closed watch ends


# -- VMs ----------------------------------------------------------------------------------


async def test_vm_settings_and_observations_round_trip(store: Store) -> None:
    vms = VmRecords(store)
    assert await vms.load() == []
    a = await vms.create(record("1", "a"))
    b = await vms.create(record("2", "b"))
    await vms.observe("1", VmObserved(VmState.RUNNING, "started", 1234, 99.5, True))
    loaded = await vms.load()
    assert loaded == [a.evolve(state=VmState.RUNNING, state_reason="started", pid=1234,
                               started_at=99.5, was_running=True), b]
    assert a.revision > 0 and b.revision > a.revision


async def test_observations_are_per_host(store: Store) -> None:
    here, there = VmRecords(store, host="h1"), VmRecords(store, host="h2")
    await here.create(record("1", "a"))
    await here.observe("1", VmObserved(VmState.RUNNING))
    [seen_there] = await there.load()
    assert seen_there.state is VmState.OFF  # h2 runs nothing: it observed nothing


async def test_duplicate_name_is_already_exists(store: Store) -> None:
    vms = VmRecords(store)
    await vms.create(record("1", "a"))
    with pytest.raises(AlreadyExists) as info:
        await vms.create(record("2", "a"))
    assert info.value.data["vm"] == "a"
    assert [r.id for r in await vms.load()] == ["1"]


async def test_rename_frees_the_old_name_and_takes_the_new(store: Store) -> None:
    vms = VmRecords(store)
    a = await vms.create(record("1", "a"))
    b = await vms.create(record("2", "b"))
    with pytest.raises(AlreadyExists):
        await vms.change(b, VmConfig(name="a"))
    renamed = await vms.change(a, VmConfig(name="c"))
    await vms.create(record("3", "a"))  # the old name is free again
    assert sorted(r.name for r in await vms.load()) == ["a", "b", "c"]
    await vms.delete(renamed)
    await vms.create(record("4", "c"))


async def test_concurrent_changes_of_one_vm_one_wins(store: Store) -> None:
    """Two clients (two hosts sharing the store) read the same settings and change them:
    the second is refused, not lost."""
    await VmRecords(store, host="h1").create(record("1", "web"))
    [mine] = await VmRecords(store, host="h1").load()
    [theirs] = await VmRecords(store, host="h2").load()
    results = await asyncio.gather(
        VmRecords(store, host="h1").change(mine, VmConfig(name="web", cpus=2)),
        VmRecords(store, host="h2").change(theirs, VmConfig(name="web", notes="theirs")),
        return_exceptions=True)
    assert isinstance(results[0], VmRecord)
    assert isinstance(results[1], StaleRevision)
    assert "VM 'web' were changed meanwhile" in results[1].message
    [now] = await VmRecords(store).load()
    assert (now.config.cpus, now.config.notes) == (2, "")
    # Read again, the change goes through.
    await VmRecords(store, host="h2").change(now, VmConfig(name="web", cpus=2, notes="x"))


async def test_jobs(store: Store) -> None:
    jobs = JobRecords(store)
    await jobs.save(JobRecord("j2", "convert", "/d/b", "running", 2.0))
    await jobs.save(JobRecord("j1", "start", "web", "completed", 1.0, 1.5, '{"a": 1}'))
    assert [j.id for j in await jobs.load()] == ["j1", "j2"]
    await jobs.forget("j1")
    assert [j.id for j in await jobs.load()] == ["j2"]


# -- SQLite: reopening and the older schema ---------------------------------------------------


async def test_sqlite_records_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "hv.db"
    config = VmConfig(name="keep", generation=Generation.GEN1, cpus=2,
                      disks=(DiskAttachment("/d/a.qcow2", DiskBus.IDE),), notes="ü,'\"")
    store = SqliteStore(path)
    first = await VmRecords(store).create(VmRecord(id="1", config=config, created_at=1.0))
    second = await VmRecords(store).create(record("2", "other"))
    await VmRecords(store).observe("1", VmObserved(VmState.SAVED, "saved", None, 12.25, True))
    store.close()

    reopened = SqliteStore(path)
    try:
        assert await VmRecords(reopened).load() == [  # ordered by creation time
            first.evolve(state=VmState.SAVED, state_reason="saved", started_at=12.25,
                         was_running=True), second]
        with pytest.raises(AlreadyExists):
            await VmRecords(reopened).create(record("3", "keep"))
        assert await reopened.put("x", "y") == 4  # the revision counter went on
    finally:
        reopened.close()


_V1 = """
CREATE TABLE vms (id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, config TEXT NOT NULL,
    state TEXT NOT NULL, state_reason TEXT NOT NULL DEFAULT '', pid INTEGER,
    started_at REAL, created_at REAL NOT NULL, was_running INTEGER NOT NULL DEFAULT 0);
CREATE TABLE jobs (id TEXT PRIMARY KEY, kind TEXT NOT NULL, target TEXT NOT NULL,
    state TEXT NOT NULL, created_at REAL NOT NULL, finished_at REAL, result TEXT,
    error TEXT, error_type TEXT);
CREATE TABLE api_tokens (name TEXT PRIMARY KEY);
"""


async def test_a_database_of_the_first_schema_opens(tmp_path: Path) -> None:
    """A database written before the store was versioned (one ``vms`` row per VM)."""
    path = tmp_path / "hv.db"
    old = sqlite3.connect(path)
    old.executescript(_V1)
    config = VmConfig(name="web", cpus=2, disks=(DiskAttachment("/d/w.qcow2", DiskBus.SCSI),))
    raw = json.loads(config.to_json())
    raw.pop("kvp_pool")  # an older config lacks newer settings
    old.execute("INSERT INTO vms VALUES (?,?,?,?,?,?,?,?,?)",
                ("id-1", "web", json.dumps(raw), "Saved", "saved", None, 5.0, 1.0, 1))
    old.execute("INSERT INTO vms VALUES (?,?,?,?,?,?,?,?,?)",
                ("id-2", "db", VmConfig(name="db").to_json(), "Off", "", None, None, 2.0, 0))
    old.execute("INSERT INTO jobs VALUES (?,?,?,?,?,?,?,?,?)",
                ("j1", "start", "web", "running", 3.0, None, None, None, None))
    old.execute("INSERT INTO api_tokens VALUES ('kept')")
    old.commit()
    old.close()

    store = SqliteStore(path)
    try:
        web, db = await VmRecords(store).load()
        assert (web.id, web.config, web.state, web.state_reason, web.started_at,
                web.was_running) == ("id-1", config, VmState.SAVED, "saved", 5.0, True)
        assert (db.id, db.name, db.state) == ("id-2", "db", VmState.OFF)
        with pytest.raises(AlreadyExists):
            await VmRecords(store).create(record("3", "web"))
        [job] = await JobRecords(store).load()
        assert (job.id, job.state) == ("j1", "running")
        await VmRecords(store).change(web, VmConfig(name="web2"))  # revisions work
    finally:
        store.close()
    again = sqlite3.connect(path)
    tables = {r[0] for r in again.execute("SELECT name FROM sqlite_master")}
    assert "vms" not in tables and "api_tokens" in tables  # auth's table is not ours
    again.close()
    reopened = SqliteStore(path)  # opening a converted database changes nothing
    try:
        assert [r.name for r in await VmRecords(reopened).load()] == ["web2", "db"]
    finally:
        reopened.close()


# -- the writer: synchronous code recording through the asynchronous store ---------------


async def test_writer_keeps_order_writes_the_newest_and_reports_failures() -> None:
    from hvstack.errors import NoSpace
    from hvstack.host.records import Writer

    written: list[tuple[str, int]] = []
    full = False

    async def put(key: str, value: int) -> None:
        if full:
            raise NoSpace("disk full")
        written.append((key, value))

    writer = Writer()
    writer.write("a", lambda: put("a", 1))
    writer.write("b", lambda: put("b", 1))
    writer.write("a", lambda: put("a", 2))  # replaces the unwritten first value of a
    await writer.flush("a")
    assert written == [("b", 1), ("a", 2)]
    full = True
    writer.write("a", lambda: put("a", 3))
    with pytest.raises(NoSpace):
        await writer.flush("a")
    await writer.flush("a")  # reported once
    full = False
    writer.write("a", lambda: put("a", 4))  # the next change writes the whole value again
    await writer.flush("a")
    assert written[-1] == ("a", 4)
