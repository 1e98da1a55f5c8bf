"""Concurrency: names stay unique, operations on one VM are serialised, disks are not shared
by two running VMs."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Literal

import httpx
import pytest

from hvstack.compute.model import VmState
from hvstack.errors import NotFound
from hvstack.host.jobs import JobState
from hvstack.host.service import HostService
from tests.functional.fakes import (
    API,
    FakeDriver,
    assert_problem,
    create_vm,
    eventually,
    finish_job,
    run_job,
    show_vm,
)


@pytest.mark.parametrize("body", [{}, {"new_disk": "16M"}, {"generation": 1}])
async def test_concurrent_creates_with_the_same_name(api: httpx.AsyncClient,
                                                     service: HostService,
                                                     body: dict[str, str]) -> None:
    request = {"name": "twin", "memory": "64M", **body}
    responses = await asyncio.gather(*(api.post(f"{API}/vms", json=request) for _ in range(2)))
    assert sorted(r.status_code for r in responses) == [201, 409]
    loser = next(r for r in responses if r.status_code == 409)
    problem = assert_problem(loser, 409, "already-exists")
    assert problem["vm"] == "twin"
    assert [vm["name"] for vm in (await api.get(f"{API}/vms")).json()] == ["twin"]
    # the loser left no folder behind
    folders = list(service.config.vms_dir.iterdir())
    assert [f.name for f in folders] == [service.get_vm("twin").record.id]


async def test_many_concurrent_creates_with_distinct_names(api: httpx.AsyncClient) -> None:
    responses = await asyncio.gather(*(
        api.post(f"{API}/vms", json={"name": f"vm{i}", "memory": "64M"}) for i in range(8)))
    assert [r.status_code for r in responses] == [201] * 8
    assert len({r.json()["id"] for r in responses}) == 8


class CountingLock(asyncio.Lock):
    """A VM lock that tells how many are waiting for it, so a test can wait until an
    operation is really queued instead of hoping one loop tick was enough."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = 0

    async def acquire(self) -> Literal[True]:
        self.waiting += 1
        try:
            return await super().acquire()
        finally:
            self.waiting -= 1


def counting_lock(service: HostService, name: str) -> CountingLock:
    lock = CountingLock()
    service.get_vm(name).lock = lock
    return lock


async def test_concurrent_starts_launch_one_machine(service: HostService,
                                                    driver: FakeDriver) -> None:
    """Both starts are accepted while the VM is Off; they run one after the other, and
    the second finds the VM Running."""
    from hvstack.compute.model import VmConfig
    from hvstack.host.service import NewVm

    vm = await service.create_vm(NewVm(VmConfig(name="web", memory_bytes=64 << 20)))
    first, second = service.start_vm("web"), service.start_vm("web")
    await asyncio.wait_for(asyncio.gather(first.done.wait(), second.done.wait()), 5)
    assert first.state is JobState.COMPLETED
    assert second.state is JobState.FAILED
    assert getattr(second.error, "slug", None) == "invalid-state"
    assert len([m for m in driver.machines if m.vm_id == vm.record.id]) == 1
    assert driver.violations == []
    assert vm.state is VmState.RUNNING


async def test_a_start_while_starting_is_refused_at_once(api: httpx.AsyncClient,
                                                         driver: FakeDriver) -> None:
    driver.launch_gate = asyncio.Event()
    await create_vm(api, "web")
    start = (await api.post(f"{API}/vms/web/start")).json()
    await asyncio.wait_for(driver.launching.wait(), 5)
    assert_problem(await api.post(f"{API}/vms/web/start"), 409, "invalid-state")
    driver.launch_gate.set()
    assert (await finish_job(api, start))["state"] == "completed"
    assert len(driver.machines) == 1


async def test_operations_wait_for_a_start_in_progress(api: httpx.AsyncClient,
                                                       driver: FakeDriver,
                                                       service: HostService) -> None:
    """While a start is in progress, a second start is refused; a stop and then a pause
    queue behind it, in order: the pause finds the VM Off."""
    driver.launch_gate = asyncio.Event()
    vm = await create_vm(api, "web")
    lock = counting_lock(service, "web")
    start = (await api.post(f"{API}/vms/web/start")).json()
    await asyncio.wait_for(driver.launching.wait(), 5)
    assert (await show_vm(api, "web"))["state"] == "Starting"

    second = await api.post(f"{API}/vms/web/start")
    assert_problem(second, 409, "invalid-state")
    stop = await api.post(f"{API}/vms/web/stop", json={"mode": "turn-off"})
    assert stop.status_code == 202  # Starting allows turn off: it queues behind the start
    await eventually(lambda: lock.waiting == 1, "the stop waits for the VM")
    pause = asyncio.ensure_future(api.post(f"{API}/vms/web/pause"))
    await eventually(lambda: lock.waiting == 2, "the pause waits behind the stop")
    assert not pause.done()

    driver.launch_gate.set()
    start = await finish_job(api, start)
    stop_job = await finish_job(api, stop.json())
    assert start["state"] == "completed"
    assert stop_job["state"] == "completed"
    problem = assert_problem(await asyncio.wait_for(pause, 5), 409, "invalid-state")
    assert problem["state"] == "Off"
    assert (await show_vm(api, "web"))["state"] == "Off"
    assert driver.violations == []
    assert len([m for m in driver.machines if m.vm_id == vm["id"]]) == 1


async def test_disk_shared_by_two_vms(api: httpx.AsyncClient, tmp_path: Path,
                                      driver: FakeDriver) -> None:
    disk = str(tmp_path / "disks" / "shared.qcow2")
    response = await api.post(f"{API}/disks", json={"path": disk, "size": "16M"})
    assert response.status_code == 201, response.text
    await create_vm(api, "a", disk=disk)
    await create_vm(api, "b", disk=disk)  # allowed while the other VM is Off
    await run_job(api, "a", "start")
    job = await run_job(api, "b", "start", ok=False)
    assert job["state"] == "failed"
    assert job["error"]["status"] == 409
    assert job["error"]["type"] == "/problems/resource-busy"
    assert job["error"]["vm"] == "a"
    assert job["error"]["disk"] == disk
    assert (await show_vm(api, "b"))["state"] == "Off"
    # creating a third VM on the disk of a running VM is refused at once
    response = await api.post(f"{API}/vms", json={"name": "c", "disk": disk})
    assert_problem(response, 409, "resource-busy")
    # once a is off, b may start
    await run_job(api, "a", "stop", {"mode": "turn-off"})
    await run_job(api, "b", "start")
    assert driver.violations == []


async def test_disk_of_a_saved_vm_stays_reserved(api: httpx.AsyncClient,
                                                 tmp_path: Path) -> None:
    disk = str(tmp_path / "disks" / "shared.qcow2")
    await api.post(f"{API}/disks", json={"path": disk, "size": "16M"})
    await create_vm(api, "a", disk=disk)
    await create_vm(api, "b", disk=disk)
    await run_job(api, "a", "start")
    await run_job(api, "a", "save")
    job = await run_job(api, "b", "start", ok=False)
    assert job["error"]["type"] == "/problems/resource-busy"


async def test_concurrent_starts_of_two_vms_sharing_a_disk(api: httpx.AsyncClient,
                                                           tmp_path: Path,
                                                           driver: FakeDriver) -> None:
    disk = str(tmp_path / "disks" / "shared.qcow2")
    await api.post(f"{API}/disks", json={"path": disk, "size": "16M"})
    await create_vm(api, "a", disk=disk)
    await create_vm(api, "b", disk=disk)
    responses = await asyncio.gather(api.post(f"{API}/vms/a/start"),
                                     api.post(f"{API}/vms/b/start"))
    jobs = [await finish_job(api, r.json()) for r in responses]
    assert sorted(j["state"] for j in jobs) == ["completed", "failed"]
    assert len(driver.live_machines()) == 1


async def test_deleting_a_disk_in_use_is_refused(api: httpx.AsyncClient, tmp_path: Path) -> None:
    disk = str(tmp_path / "disks" / "d.qcow2")
    await api.post(f"{API}/disks", json={"path": disk, "size": "16M"})
    await create_vm(api, "a", disk=disk)
    await run_job(api, "a", "start")
    response = await api.post(f"{API}/disks/resize", json={"path": disk, "size": "32M"})
    assert_problem(response, 409, "resource-busy")


async def test_start_queued_behind_a_delete_does_not_launch(service: HostService,
                                                            driver: FakeDriver) -> None:
    from hvstack.compute.model import VmConfig
    from hvstack.host.service import NewVm

    await service.create_vm(NewVm(VmConfig(name="doomed", memory_bytes=64 << 20)))
    job = service.start_vm("doomed")  # queued: its task has not run yet
    await service.delete_vm("doomed")  # takes the VM's lock first
    # The start then finds its VM gone and must not leave an orphan QEMU process behind.
    await asyncio.wait_for(job.done.wait(), 5)
    assert driver.machines == []
    assert job.state is JobState.FAILED
    assert isinstance(job.error, NotFound)


async def test_delete_waits_for_a_running_operation(service: HostService,
                                                    driver: FakeDriver) -> None:
    from hvstack.compute.model import VmConfig
    from hvstack.host.service import NewVm

    driver.launch_gate = asyncio.Event()
    await service.create_vm(NewVm(VmConfig(name="busy", memory_bytes=64 << 20)))
    lock = counting_lock(service, "busy")
    job = service.start_vm("busy")
    await asyncio.wait_for(driver.launching.wait(), 5)
    deleting = asyncio.ensure_future(service.delete_vm("busy"))
    await eventually(lambda: lock.waiting == 1, "the delete waits for the start")
    assert not deleting.done()
    driver.launch_gate.set()
    await asyncio.wait_for(job.done.wait(), 5)
    with pytest.raises(Exception) as info:
        await asyncio.wait_for(deleting, 5)
    assert getattr(info.value, "slug", None) == "invalid-state"
    assert service.get_vm("busy").state is VmState.RUNNING
