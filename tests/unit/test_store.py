"""The store: SQLite and in-memory, same contract."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from hvstack.compute.model import (
    DiskAttachment,
    DiskBus,
    Generation,
    VmConfig,
    VmRecord,
    VmState,
)
from hvstack.errors import AlreadyExists, NotFound
from hvstack.host.store import MemoryStore, SqliteStore, Store


def record(vm_id: str, name: str, **changes: object) -> VmRecord:
    return VmRecord(id=vm_id, config=VmConfig(name=name), created_at=float(int(vm_id)),
                    ).evolve(**changes)


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "memory":
        yield MemoryStore()
    else:
        sqlite = SqliteStore(tmp_path / "sub" / "hv.db")
        yield sqlite
        sqlite.close()


def test_insert_and_all(store: Store) -> None:
    assert store.all() == []
    a, b = record("1", "a"), record("2", "b")
    store.insert(a)
    store.insert(b)
    assert sorted(store.all(), key=lambda r: r.id) == [a, b]


def test_update(store: Store) -> None:
    store.insert(record("1", "a"))
    changed = record("1", "a", state=VmState.RUNNING, state_reason="started", pid=1234,
                     started_at=99.5, was_running=True)
    store.update(changed)
    assert store.all() == [changed]


def test_update_of_a_missing_record_is_not_found(store: Store) -> None:
    with pytest.raises(NotFound):
        store.update(record("1", "a"))


def test_delete(store: Store) -> None:
    store.insert(record("1", "a"))
    store.insert(record("2", "b"))
    store.delete("1")
    assert [r.id for r in store.all()] == ["2"]
    store.delete("1")  # deleting twice is harmless
    store.insert(record("3", "a"))  # the name is free again
    assert sorted(r.name for r in store.all()) == ["a", "b"]


def test_duplicate_name_is_already_exists(store: Store) -> None:
    store.insert(record("1", "a"))
    with pytest.raises(AlreadyExists) as info:
        store.insert(record("2", "a"))
    assert info.value.data["vm"] == "a"
    assert [r.id for r in store.all()] == ["1"]


def test_rename_to_an_existing_name_is_already_exists(store: Store) -> None:
    store.insert(record("1", "a"))
    store.insert(record("2", "b"))
    with pytest.raises(AlreadyExists):
        store.update(record("2", "a"))
    assert sorted(r.name for r in store.all()) == ["a", "b"]


def test_rename_to_a_free_name(store: Store) -> None:
    store.insert(record("1", "a"))
    store.update(record("1", "c"))
    assert [r.name for r in store.all()] == ["c"]


def test_sqlite_records_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "hv.db"
    config = VmConfig(name="keep", generation=Generation.GEN1, cpus=2,
                      disks=(DiskAttachment("/d/a.qcow2", DiskBus.IDE),), notes="ü,'\"")
    first = VmRecord(id="1", config=config, state=VmState.SAVED, state_reason="saved",
                     pid=None, started_at=12.25, created_at=1.0, was_running=True)
    second = record("2", "other", state=VmState.RUNNING, pid=77)
    store = SqliteStore(path)
    store.insert(first)
    store.insert(second)
    store.close()

    reopened = SqliteStore(path)
    try:
        assert reopened.all() == [first, second]  # ordered by creation time
        with pytest.raises(AlreadyExists):
            reopened.insert(record("3", "keep"))
    finally:
        reopened.close()
