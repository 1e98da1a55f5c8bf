"""A VM that QEMU pauses on a disk I/O error shows Paused with a reason naming the disk.

QEMU sends ``BLOCK_IO_ERROR`` (node name, operation, action, nospace, reason) and then
``STOP``. These tests drive the whole path through a fake QMP server at the wire: the
real monitor, machine, controller, service and API.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from hvstack.host.service import HostService
from hvstack.hypervisor.spec import disk_node_id
from tests.functional.fakes import API, create_vm, eventually, run_job, show_vm
from tests.functional.qmp_fakes import QmpDriver

FULL = {"device": "", "operation": "write", "action": "stop",
        "nospace": True, "reason": "No space left on device"}


@pytest.fixture
async def qmp_driver() -> AsyncIterator[QmpDriver]:
    driver = QmpDriver()
    yield driver
    await driver.close()


@pytest.fixture
def driver(qmp_driver: QmpDriver) -> QmpDriver:  # the service fixture runs on it
    return qmp_driver


async def _vm_with_disk(api: httpx.AsyncClient, tmp_path: Path) -> dict[str, Any]:
    disk = str(tmp_path / "disks" / "data.qcow2")
    response = await api.post(f"{API}/disks", json={"path": disk, "size": "16M"})
    assert response.status_code == 201, response.text
    vm = await create_vm(api, "web", disk=disk)
    await run_job(api, "web", "start")
    return vm


async def _state(api: httpx.AsyncClient) -> tuple[str, str]:
    shown = await show_vm(api, "web")
    return shown["state"], shown["state_reason"]


async def test_a_full_disk_pauses_the_vm_with_a_reason(
    api: httpx.AsyncClient, qmp_driver: QmpDriver, service: HostService, tmp_path: Path
) -> None:
    vm = await _vm_with_disk(api, tmp_path)
    qmp = qmp_driver.servers[vm["id"]]
    subscription = service.events.subscribe()
    node = disk_node_id(service.get_vm("web").record.config.disks[0].id)
    await qmp.emit("BLOCK_IO_ERROR", {**FULL, "node-name": node})
    qmp.status = "io-error"
    await qmp.emit("STOP")
    controller = service.get_vm("web")
    await eventually(lambda: controller.state.value == "Paused", "the VM is Paused")
    disk = str(tmp_path / "disks" / "data.qcow2")
    assert await _state(api) == (
        "Paused", f"paused: disk {disk} is full (write failed: No space left on device)")
    event = await anext(subscription)
    while event.type != "vm.io-error":
        event = await anext(subscription)
    await subscription.aclose()
    assert {k: event.data.get(k) for k in ("vm", "disk", "operation", "nospace", "error")} == {
        "vm": "web", "disk": disk, "operation": "write", "nospace": True,
        "error": "No space left on device"}
    # Once space is freed the admin resumes it; the reason goes.
    response = await api.post(f"{API}/vms/web/resume")
    assert response.status_code == 200, response.text
    await eventually(lambda: controller.state.value == "Running", "the VM runs again")
    assert await _state(api) == ("Running", "")
    await run_job(api, "web", "stop", {"mode": "turn-off"})


async def test_an_error_reported_to_the_guest_keeps_it_running(
    api: httpx.AsyncClient, qmp_driver: QmpDriver, service: HostService, tmp_path: Path
) -> None:
    vm = await _vm_with_disk(api, tmp_path)
    await qmp_driver.servers[vm["id"]].emit(
        "BLOCK_IO_ERROR", {**FULL, "node-name": disk_node_id(
            service.get_vm("web").record.config.disks[0].id), "action": "report", "nospace": False,
                           "operation": "read", "reason": "Input/output error"})
    await qmp_driver.servers[vm["id"]].emit("RESET", {"guest": True, "reason": "guest-reset"})
    assert await _state(api) == ("Running", "")
    await run_job(api, "web", "stop", {"mode": "turn-off"})
