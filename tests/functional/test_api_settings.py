"""Changing a VM's settings through the REST API: rename, hardware, disks, DVD."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from hvstack.host.service import HostService
from hvstack.hypervisor.spec import DVD_DEVICE
from tests.functional.fakes import (
    API,
    FakeDriver,
    assert_problem,
    create_vm,
    run_job,
    show_vm,
)


async def test_rename(api: httpx.AsyncClient, service: HostService) -> None:
    vm = await create_vm(api, "old")
    response = await api.patch(f"{API}/vms/old", json={"name": "new"})
    assert response.status_code == 200
    assert response.json()["name"] == "new"
    assert response.json()["id"] == vm["id"]
    assert_problem(await api.get(f"{API}/vms/old"), 404, "not-found")
    assert (await show_vm(api, "new"))["id"] == vm["id"]
    assert [r.name for r in await service.records.load()] == ["new"]
    # the old name is free again
    await create_vm(api, "old")


async def test_rename_while_running(api: httpx.AsyncClient) -> None:
    await create_vm(api, "old")
    await run_job(api, "old", "start")
    response = await api.patch(f"{API}/vms/old", json={"name": "new"})
    assert response.status_code == 200
    await run_job(api, "new", "stop")
    assert (await show_vm(api, "new"))["state"] == "Off"


async def test_rename_to_a_taken_name(api: httpx.AsyncClient) -> None:
    await create_vm(api, "a")
    await create_vm(api, "b")
    problem = assert_problem(await api.patch(f"{API}/vms/b", json={"name": "a"}), 409,
                             "already-exists")
    assert problem["vm"] == "a"
    assert sorted(v["name"] for v in (await api.get(f"{API}/vms")).json()) == ["a", "b"]


async def test_rename_to_its_own_name(api: httpx.AsyncClient) -> None:
    await create_vm(api, "same")
    response = await api.patch(f"{API}/vms/same", json={"name": "same"})
    assert response.status_code == 200


async def test_set_cpus_while_running_and_while_off(api: httpx.AsyncClient,
                                                    service: HostService) -> None:
    await create_vm(api, "web", cpus=1)
    cpus = min(2, service.facts.cpus)
    await run_job(api, "web", "start")
    problem = assert_problem(await api.patch(f"{API}/vms/web", json={"cpus": cpus}), 409,
                             "invalid-state")
    assert problem["state"] == "Running"
    assert problem["required"] == ["Off"]
    assert (await show_vm(api, "web"))["cpus"] == 1
    await run_job(api, "web", "stop")
    response = await api.patch(f"{API}/vms/web", json={"cpus": cpus, "memory": "96M"})
    assert response.status_code == 200
    assert response.json()["cpus"] == cpus
    assert response.json()["memory_bytes"] == 96 * 1024 * 1024
    assert [r.config.cpus for r in await service.records.load()] == [cpus]


async def test_online_settings_change_while_running(api: httpx.AsyncClient,
                                                    service: HostService) -> None:
    await create_vm(api, "web")
    await run_job(api, "web", "start")
    response = await api.patch(f"{API}/vms/web", json={
        "notes": "production", "auto_start": "always-start", "auto_stop": "shut-down",
        "auto_start_delay_seconds": 5})
    assert response.status_code == 200, response.text
    vm = response.json()
    assert (vm["notes"], vm["auto_start"], vm["auto_stop"], vm["auto_start_delay_seconds"]) \
        == ("production", "always-start", "shut-down", 5)
    assert vm["state"] == "Running"
    config_copy = Path(vm["folder"]) / "vm.json"
    assert '"notes": "production"' in config_copy.read_text()


async def test_set_boot_order_and_accelerator(api: httpx.AsyncClient) -> None:
    await create_vm(api, "web")
    vm = (await api.patch(f"{API}/vms/web", json={"boot_order": ["network", "disk"],
                                                  "accelerator": "tcg"})).json()
    assert vm["boot_order"] == ["network", "disk"]
    assert vm["accelerator"] == "tcg"
    vm = (await api.patch(f"{API}/vms/web", json={"accelerator": "auto"})).json()
    assert vm["accelerator"] == "tcg"  # the host's choice (the test host config says tcg)


async def test_set_more_memory_than_the_host_has(api: httpx.AsyncClient) -> None:
    await create_vm(api, "web")
    assert_problem(await api.patch(f"{API}/vms/web", json={"memory": "64T"}), 422,
                   "insufficient-resources")


async def test_attach_and_detach_a_disk(api: httpx.AsyncClient, tmp_path: Path,
                                        driver: FakeDriver) -> None:
    disk = str(tmp_path / "disks" / "data.qcow2")
    await api.post(f"{API}/disks", json={"path": disk, "size": "16M"})
    vm = await create_vm(api, "web")
    response = await api.post(f"{API}/vms/web/disks", json={"path": disk, "bus": "virtio"})
    assert response.status_code == 200, response.text
    [attached] = response.json()["disks"]
    assert attached["path"] == disk and (attached["bus"], attached["format"]) == (
        "virtio", "qcow2")
    assert attached["owned"] is False and len(attached["id"]) == 10
    # attaching it twice is refused
    assert_problem(await api.post(f"{API}/vms/web/disks", json={"path": disk}), 400,
                   "invalid-input")
    await run_job(api, "web", "start")
    machine = driver.machine_of(vm["id"])
    assert machine.spec is not None
    assert [d.node.path for d in machine.spec.block_devices] == [disk]
    # while running, the disk cannot be detached (hardware changes need Off)
    assert_problem(await api.delete(f"{API}/vms/web/disks", params={"path": disk}), 409,
                   "invalid-state")
    await run_job(api, "web", "stop")
    response = await api.delete(f"{API}/vms/web/disks", params={"path": disk})
    assert response.status_code == 200
    assert response.json()["disks"] == []
    assert Path(disk).exists()
    assert_problem(await api.delete(f"{API}/vms/web/disks", params={"path": disk}), 404,
                   "not-found")


async def test_gen1_vm_gets_ide_disks_and_refuses_a_fifth(api: httpx.AsyncClient,
                                                          tmp_path: Path) -> None:
    await create_vm(api, "old", generation=1)
    for i in range(5):
        path = str(tmp_path / "disks" / f"d{i}.qcow2")
        await api.post(f"{API}/disks", json={"path": path, "size": "1M"})
        response = await api.post(f"{API}/vms/old/disks", json={"path": path})
        if i < 4:
            assert response.status_code == 200, response.text
            assert response.json()["disks"][-1]["bus"] == "ide"
        else:
            problem = assert_problem(response, 400, "invalid-input")
            assert "IDE" in problem["detail"]


async def test_attach_a_disk_outside_the_roots(api: httpx.AsyncClient, tmp_path: Path) -> None:
    await create_vm(api, "web")
    path = tmp_path / "elsewhere.qcow2"
    path.write_bytes(b"")
    assert_problem(await api.post(f"{API}/vms/web/disks", json={"path": str(path)}), 400,
                   "path-not-allowed")


async def test_insert_and_eject_a_dvd(api: httpx.AsyncClient, tmp_path: Path,
                                      driver: FakeDriver) -> None:
    iso = tmp_path / "disks" / "install.iso"
    iso.write_bytes(b"\0" * 2048)
    vm = await create_vm(api, "web", boot_order=["dvd", "disk"])
    response = await api.put(f"{API}/vms/web/dvd", json={"iso": str(iso)})
    assert response.status_code == 200
    assert response.json()["dvd"] == str(iso)
    await run_job(api, "web", "start")
    spec = driver.machine_of(vm["id"]).spec
    assert spec is not None
    assert {d.id: d.node.path for d in spec.block_devices}[DVD_DEVICE] == str(iso)
    await run_job(api, "web", "stop")
    response = await api.put(f"{API}/vms/web/dvd", json={"iso": None})
    assert response.json()["dvd"] is None


async def test_dvd_with_a_comma_is_refused(api: httpx.AsyncClient, tmp_path: Path) -> None:
    iso = tmp_path / "disks" / "a,b.iso"
    iso.write_bytes(b"")
    await create_vm(api, "web")
    problem = assert_problem(await api.put(f"{API}/vms/web/dvd", json={"iso": str(iso)}), 400,
                             "invalid-input")
    assert "comma" in problem["detail"]


async def test_a_refused_patch_changes_nothing(api: httpx.AsyncClient) -> None:
    await create_vm(api, "web")
    await run_job(api, "web", "start")
    response = await api.patch(f"{API}/vms/web", json={"name": "renamed", "cpus": 1})
    assert_problem(response, 409, "invalid-state")
    assert (await api.get(f"{API}/vms/web")).status_code == 200


async def test_a_vm_set_to_kvm_does_not_break_listing(api: httpx.AsyncClient,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from hvstack.hypervisor import accel

    monkeypatch.setattr(accel, "probe", lambda *a: accel.HostFacts(frozenset(), False))
    await api.post(f"{API}/vms", json={"name": "fast", "memory": "64M", "accelerator": "kvm"})
    await create_vm(api, "plain")
    response = await api.get(f"{API}/vms")
    assert response.status_code == 200, response.text
