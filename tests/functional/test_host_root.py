"""The composition root builds and closes everything; two hosts sharing one store."""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from hvstack.api.app import create_app
from hvstack.compute.model import AutoStopAction, VmConfig, VmState
from hvstack.errors import StaleRevision
from hvstack.host.facts import FixedHost
from hvstack.host.records import VmRecords
from hvstack.host.root import HostRoot
from hvstack.host.service import HostService, NewVm
from hvstack.host.store import MemoryStore
from tests.functional.conftest import make_config
from tests.functional.fakes import API, FakeDriver, create_vm, run_job

MIB = 1 << 20


async def test_the_root_serves_the_api_and_closes_in_order(tmp_path: Path) -> None:
    config = replace(make_config(tmp_path), detach_on_exit=False)
    store, driver = MemoryStore(), FakeDriver()
    root = await HostRoot.start(config, store, driver, FixedHost())
    closed = False
    try:
        transport = httpx.ASGITransport(app=create_app(root))
        async with httpx.AsyncClient(transport=transport, base_url="http://hv") as api:
            await create_vm(api, "web")
            await root.service.update_vm("web", auto_stop=AutoStopAction.TURN_OFF)
            await run_job(api, "web", "start")
            assert (await api.get(f"{API}/host")).status_code == 200
        await root.close()
        closed = True
        # The service stopped: the automatic stop action ran and the store has it.
        [record] = await VmRecords(store).load()
        assert (record.state, record.was_running) == (VmState.OFF, True)
        assert driver.live_machines() == []
    finally:
        if not closed:
            await root.close()
        shutil.rmtree(config.run_dir, ignore_errors=True)


async def test_two_hosts_changing_one_vm_one_is_refused(tmp_path: Path) -> None:
    """Hosts that share a store (the cluster's case) both change a VM's settings: the one
    that read an older revision is refused with 409, nothing is lost."""
    store = MemoryStore()
    for host in ("a", "b"):
        (tmp_path / host).mkdir()
    first = HostService(make_config(tmp_path / "a"), store, FakeDriver(), FixedHost())
    await first.startup()
    await first.create_vm(NewVm(VmConfig(name="web", memory_bytes=64 * MIB)))
    second = HostService(make_config(tmp_path / "b"), store, FakeDriver(), FixedHost())
    await second.startup()
    watch = store.watch("vms/settings/")
    try:
        await first.update_vm("web", notes="from the first host")
        with pytest.raises(StaleRevision) as info:
            await second.update_vm("web", notes="from the second host")
        assert info.value.http_status == 409
        assert second.get_vm("web").record.config.notes == ""  # unchanged
        [stored] = await VmRecords(store).load()
        assert stored.config.notes == "from the first host"
        change = await asyncio.wait_for(anext(watch), 5)  # the one change made
        assert (change.key, change.revision) == (f"vms/settings/{stored.id}", stored.revision)
    finally:
        await watch.aclose()
        for service in (first, second):
            await service.shutdown()
