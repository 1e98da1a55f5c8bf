"""Failures of an operation leave the VM in the state it is really in; a full store is 507.

The store here refuses writes while ``full`` (what SQLite does on a full file system,
mapped to NoSpace by the real store); the fake driver stands in for QEMU.
"""

from __future__ import annotations

import asyncio
import errno
import sqlite3
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import httpx
import pytest

from hvstack.api.app import create_app
from hvstack.compute.model import VmRecord
from hvstack.errors import HypervisorError, InsufficientResources, NoSpace
from hvstack.host.config import HostConfig
from hvstack.host.facts import FixedHost
from hvstack.host.records import VmRecords
from hvstack.host.root import HostRoot
from hvstack.host.service import HostService
from hvstack.host.store import MemoryStore, Op, SqliteStore
from tests.functional.fakes import (
    API,
    FakeDriver,
    assert_problem,
    create_vm,
    run_job,
    show_vm,
)


class FillingStore(MemoryStore):
    """A store on a file system that can fill up."""

    def __init__(self) -> None:
        super().__init__()
        self.full = False

    async def commit(self, ops: Sequence[Op]) -> int:
        if self.full and any(op.key.startswith("vms/") for op in ops):
            raise NoSpace("cannot record the change of VM: the disk is full")
        return await super().commit(ops)


@pytest.fixture
def store() -> FillingStore:
    return FillingStore()


@pytest.fixture
async def running(api: httpx.AsyncClient) -> str:
    await create_vm(api, "web")
    await run_job(api, "web", "start")
    return "web"


async def test_save_with_a_full_store_keeps_the_vm_running(
    api: httpx.AsyncClient, store: FillingStore, driver: FakeDriver, running: str,
) -> None:
    store.full = True
    job = await run_job(api, running, "save", ok=False)
    assert job["state"] == "failed"
    assert job["error"]["status"] == 507
    assert job["error"]["type"] == "/problems/no-space"
    assert "cannot save VM 'web'" in job["error"]["detail"]
    vm = await show_vm(api, running)
    assert vm["state"] == "Running"
    assert driver.machine_of(vm["id"]).status_value == "running"
    assert not (Path(vm["folder"]) / "saved-state.bin").exists()
    # Once there is space again, everything works.
    store.full = False
    await run_job(api, running, "save")
    assert (await show_vm(api, running))["state"] == "Saved"
    await run_job(api, running, "start")
    assert (await show_vm(api, running))["state"] == "Running"


async def test_saved_state_file_on_a_full_disk_is_507_and_the_vm_runs_on(
    api: httpx.AsyncClient, driver: FakeDriver, running: str,
) -> None:
    driver.save_error = InsufficientResources("saving the VM state failed: no space left")
    job = await run_job(api, running, "save", ok=False)
    assert job["error"]["status"] == 507
    vm = await show_vm(api, running)
    assert vm["state"] == "Running"
    assert vm["state_reason"].startswith("save failed")
    driver.save_error = None
    await run_job(api, running, "save")


async def test_save_from_paused_that_fails_stays_paused(
    api: httpx.AsyncClient, driver: FakeDriver, running: str,
) -> None:
    assert (await api.post(f"{API}/vms/{running}/pause")).status_code == 200
    driver.save_error = HypervisorError("migration failed")
    await run_job(api, running, "save", ok=False)
    assert (await show_vm(api, running))["state"] == "Paused"


async def test_save_where_qemu_dies_ends_off(
    api: httpx.AsyncClient, driver: FakeDriver, running: str,
) -> None:
    vm_id = (await show_vm(api, running))["id"]
    machine = driver.machine_of(vm_id)

    async def dying(path: Path, progress: object) -> None:
        machine.exit()
        raise HypervisorError("lost the QMP monitor")

    machine.save_state = dying  # type: ignore[method-assign]
    await run_job(api, running, "save", ok=False)
    vm = await show_vm(api, running)
    assert vm["state"] == "Off"
    assert vm["pid"] is None
    await run_job(api, running, "start")  # and it starts again


async def test_start_with_a_full_store_is_507_and_nothing_runs(
    api: httpx.AsyncClient, store: FillingStore, driver: FakeDriver,
) -> None:
    await create_vm(api, "web")
    store.full = True
    job = await run_job(api, "web", "start", ok=False)
    assert job["error"]["status"] == 507
    assert job["error"]["detail"].startswith("cannot start VM 'web': ")
    assert (await show_vm(api, "web"))["state"] == "Off"
    assert driver.live_machines() == []
    store.full = False
    await run_job(api, "web", "start")


async def test_turn_off_with_a_full_store_turns_off(
    api: httpx.AsyncClient, store: FillingStore, driver: FakeDriver, running: str,
    service: HostService,
) -> None:
    """The VM really is off, so it shows Off (and says so on the event stream); the
    store catches up with the next change it can record."""
    store.full = True
    await run_job(api, running, "stop", {"mode": "turn-off"})
    assert (await show_vm(api, running))["state"] == "Off"
    assert driver.live_machines() == []
    store.full = False
    await run_job(api, running, "start")
    await service.flush()
    [record] = await VmRecords(store).load()
    assert record.state.value == "Running"


async def test_pause_of_a_dead_worker_shows_off(
    api: httpx.AsyncClient, driver: FakeDriver, running: str,
) -> None:
    vm_id = (await show_vm(api, running))["id"]
    machine = driver.machine_of(vm_id)

    async def broken() -> None:
        machine.exit()
        raise HypervisorError("lost the QMP monitor")

    machine.pause = broken  # type: ignore[method-assign]
    response = await api.post(f"{API}/vms/{running}/pause")
    assert response.status_code == 500
    vm = await show_vm(api, running)
    assert vm["state"] == "Off"
    assert vm["state_reason"] == "pause failed: lost the QMP monitor"


# -- the SQLite store's own mapping ---------------------------------------------------------


def _record(name: str) -> VmRecord:
    from hvstack.compute.model import VmConfig

    return VmRecord(id=f"id-{name}", config=VmConfig(name=name, notes="x" * 4000),
                    created_at=1.0)


async def test_sqlite_full_is_no_space(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "hv.db")
    try:
        # max_page_count makes SQLite answer exactly as on a full file system.
        store._db.execute("PRAGMA max_page_count=8")
        with pytest.raises(NoSpace) as info:
            for i in range(100):
                await VmRecords(store).create(_record(f"vm{i}"))
        assert info.value.http_status == 507
        assert "full" in info.value.message
        assert str(tmp_path) in info.value.message
    finally:
        store.close()


def test_enospc_and_io_errors_are_no_space(tmp_path: Path) -> None:
    from hvstack.host.store import _no_space

    assert _no_space(OSError(errno.ENOSPC, "No space left on device"))
    assert _no_space(sqlite3.OperationalError("disk I/O error"))
    assert not _no_space(sqlite3.OperationalError("no such table: vms"))


async def test_text_sqlite_cannot_encode_is_invalid_input(tmp_path: Path) -> None:
    from hvstack.errors import InvalidInput

    store = SqliteStore(tmp_path / "hv.db")
    try:
        with pytest.raises(InvalidInput):
            await VmRecords(store).create(_record("bad\ud800"))
        assert await VmRecords(store).load() == []
    finally:
        store.close()


@pytest.fixture
async def sqlite_api(host_config: HostConfig, tmp_path: Path,
                     driver: FakeDriver) -> AsyncIterator[tuple[httpx.AsyncClient, SqliteStore]]:
    store = SqliteStore(tmp_path / "db" / "hv.db")
    service = HostService(host_config, store, driver, FixedHost())
    await service.startup()
    transport = httpx.ASGITransport(app=create_app(HostRoot(service)))
    async with httpx.AsyncClient(transport=transport, base_url="http://hv") as client:
        yield client, store
    await asyncio.wait_for(service.shutdown(), 10)
    store.close()


async def test_create_on_a_full_database_is_507(
    sqlite_api: tuple[httpx.AsyncClient, SqliteStore],
) -> None:
    api, store = sqlite_api
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count={pages}")
    response = await api.post(f"{API}/vms", json={"name": "web", "memory": "64M",
                                                  "notes": "n" * 3900})
    body = assert_problem(response, 507, "no-space")
    assert "database or disk is full" in body["detail"]
    assert (await api.get(f"{API}/vms")).json() == []
