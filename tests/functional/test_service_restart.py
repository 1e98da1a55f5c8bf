"""Restarting the host service: reattaching to running VMs, and the automatic start and stop
actions."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from hvstack.compute.lifecycle import StopMode
from hvstack.compute.model import AutoStartAction, AutoStopAction, VmConfig, VmState
from hvstack.host.config import HostConfig
from hvstack.host.facts import FixedHost
from hvstack.host.records import VmRecords
from hvstack.host.service import HostService, NewVm
from hvstack.host.store import MemoryStore, SqliteStore, Store
from tests.functional.conftest import make_config
from tests.functional.fakes import FakeDriver, eventually

MIB = 1024 * 1024


class Host:
    """One host's data directory and store, on which services are started and stopped."""

    def __init__(self, config: HostConfig, store: Store) -> None:
        self.config = config
        self.store = store
        self.services: list[HostService] = []

    async def boot(self, driver: FakeDriver, *, detach_on_exit: bool = True) -> HostService:
        config = self.config
        if config.detach_on_exit != detach_on_exit:
            config = replace(config, detach_on_exit=detach_on_exit)
        service = HostService(config, self.store, driver, FixedHost())
        await service.startup()
        self.services.append(service)
        return service

    async def stop(self, service: HostService) -> None:
        self.services.remove(service)
        await asyncio.wait_for(service.shutdown(), 10)


@pytest.fixture(params=["memory", "sqlite"])
async def host(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Host]:
    config = make_config(tmp_path)
    store: Store = MemoryStore() if request.param == "memory" else SqliteStore(
        config.data_dir / "hvstack.db")
    h = Host(config, store)
    try:
        yield h
    finally:
        for service in list(h.services):
            await h.stop(service)
        if isinstance(store, SqliteStore):
            store.close()
        shutil.rmtree(config.run_dir, ignore_errors=True)


async def create(service: HostService, name: str, **settings: object) -> str:
    config = VmConfig(name=name, memory_bytes=64 * MIB, **settings)  # type: ignore[arg-type]
    vm = await service.create_vm(NewVm(config))
    return vm.record.id


async def start(service: HostService, name: str) -> None:
    job = service.start_vm(name)
    await asyncio.wait_for(job.done.wait(), 5)
    assert job.error is None, job.error
    assert service.get_vm(name).state is VmState.RUNNING


async def stored(host: Host, vm_id: str) -> VmState:
    for service in host.services:
        await service.flush()
    return next(r for r in await VmRecords(host.store).load() if r.id == vm_id).state


# -- reattaching ----------------------------------------------------------------------------


async def test_running_vm_is_reattached(host: Host) -> None:
    first = await host.boot(FakeDriver())
    vm_id = await create(first, "web")
    await start(first, "web")
    pid = first.get_vm("web").record.pid
    assert pid is not None
    await host.stop(first)  # detach: the VM keeps running
    assert await stored(host, vm_id) is VmState.RUNNING

    driver = FakeDriver(alive_pids={pid})
    second = await host.boot(driver)
    vm = second.get_vm("web")
    assert vm.state is VmState.RUNNING
    assert vm.record.state_reason == "reattached"
    assert vm.record.pid == pid
    assert [m.pid for m in driver.attached] == [pid]
    assert driver.machines == []  # nothing was launched
    # and it is driven as usual
    job = second.stop_vm("web", mode=StopMode.SHUT_DOWN)
    await asyncio.wait_for(job.done.wait(), 5)
    assert vm.state.value == "Off"
    assert await stored(host, vm_id) is VmState.OFF


async def test_paused_vm_is_reattached_paused(host: Host) -> None:
    first = await host.boot(FakeDriver())
    await create(first, "web")
    await start(first, "web")
    await first.pause_vm("web")
    pid = first.get_vm("web").record.pid
    assert pid is not None
    await host.stop(first)

    second = await host.boot(FakeDriver(alive_pids={pid}, attach_status="paused"))
    vm = second.get_vm("web")
    assert vm.state is VmState.PAUSED
    assert vm.record.state_reason == "reattached (QEMU is paused)"
    await second.resume_vm("web")
    assert vm.state.value == "Running"


async def test_vm_whose_process_died_is_off(host: Host) -> None:
    first = await host.boot(FakeDriver())
    vm_id = await create(first, "web")
    await start(first, "web")
    await host.stop(first)

    driver = FakeDriver(alive_pids=set())  # the QEMU process died meanwhile
    second = await host.boot(driver)
    vm = second.get_vm("web")
    assert vm.state is VmState.OFF
    assert "exited while the host service was down" in vm.record.state_reason
    assert vm.record.pid is None
    assert await stored(host, vm_id) is VmState.OFF
    await start(second, "web")


async def test_saved_vm_stays_saved_and_resumes(host: Host) -> None:
    first = await host.boot(FakeDriver())
    vm_id = await create(first, "web", auto_start=AutoStartAction.NOTHING)
    await start(first, "web")
    job = first.stop_vm("web", mode=StopMode.SAVE)
    await asyncio.wait_for(job.done.wait(), 5)
    await host.stop(first)

    driver = FakeDriver()
    second = await host.boot(driver)
    assert second.get_vm("web").state is VmState.SAVED
    await start(second, "web")
    assert driver.restored == [vm_id]


async def test_saved_vm_without_its_state_file_is_off(host: Host) -> None:
    first = await host.boot(FakeDriver())
    await create(first, "web")
    await start(first, "web")
    job = first.stop_vm("web", mode=StopMode.SAVE)
    await asyncio.wait_for(job.done.wait(), 5)
    saved = first.get_vm("web").files.saved_state
    await host.stop(first)
    saved.unlink()

    second = await host.boot(FakeDriver())
    vm = second.get_vm("web")
    assert vm.state is VmState.OFF
    assert "saved state file is missing" in vm.record.state_reason


# -- automatic start and stop actions -------------------------------------------------------


async def test_always_start_starts_on_startup(host: Host) -> None:
    first = await host.boot(FakeDriver())
    await create(first, "always", auto_start=AutoStartAction.ALWAYS_START)
    await create(first, "never", auto_start=AutoStartAction.NOTHING)
    await create(first, "if-running", auto_start=AutoStartAction.START_IF_RUNNING)
    await host.stop(first)

    driver = FakeDriver()
    second = await host.boot(driver)
    vm = second.get_vm("always")
    await eventually(lambda: vm.state is VmState.RUNNING, "the VM was started automatically")
    assert [m.spec.vm_id for m in driver.machines] == [vm.record.id]  # type: ignore[union-attr]
    assert second.get_vm("never").state is VmState.OFF
    assert second.get_vm("if-running").state is VmState.OFF  # it was not running


@pytest.mark.parametrize(("action", "state", "restored"), [
    (AutoStopAction.SAVE, VmState.SAVED, True),
    (AutoStopAction.SHUT_DOWN, VmState.OFF, False),
    (AutoStopAction.TURN_OFF, VmState.OFF, False),
])
async def test_automatic_stop_then_start_if_running(host: Host, action: AutoStopAction,
                                                    state: VmState, restored: bool) -> None:
    first = await host.boot(FakeDriver(), detach_on_exit=False)
    vm_id = await create(first, "web", auto_stop=action,
                         auto_start=AutoStartAction.START_IF_RUNNING)
    idle_id = await create(first, "idle", auto_stop=action,
                           auto_start=AutoStartAction.START_IF_RUNNING)
    await start(first, "web")
    await host.stop(first)  # applies the automatic stop action
    records = {r.id: r for r in await VmRecords(host.store).load()}
    assert records[vm_id].state is state
    assert records[vm_id].was_running is True
    assert records[idle_id].was_running is False
    assert (first.get_vm("web").files.saved_state.exists()) is restored

    driver = FakeDriver()
    second = await host.boot(driver)
    vm = second.get_vm("web")
    await eventually(lambda: vm.state is VmState.RUNNING, "the VM was started again")
    assert driver.restored == ([vm_id] if restored else [])
    assert second.get_vm("idle").state is VmState.OFF


async def test_automatic_shut_down_of_a_stubborn_guest_is_bounded(host: Host,
                                                                  monkeypatch: pytest.MonkeyPatch
                                                                  ) -> None:
    from hvstack.host import service as service_module

    monkeypatch.setattr(service_module, "AUTO_STOP_TIMEOUT", 0.05)
    driver = FakeDriver()
    driver.ignore_power_button = True
    first = await host.boot(driver, detach_on_exit=False)
    vm_id = await create(first, "web", auto_stop=AutoStopAction.SHUT_DOWN)
    await start(first, "web")
    await host.stop(first)
    record = next(r for r in await VmRecords(host.store).load() if r.id == vm_id)
    assert record.state is VmState.OFF
    assert "turned off" in record.state_reason
    assert driver.live_machines() == []
