"""The VM lifecycle through the REST API, on the fake driver."""

from __future__ import annotations

from pathlib import Path

import httpx

from hvstack.errors import HypervisorError
from hvstack.host.service import HostService
from hvstack.hypervisor.spec import Uefi
from tests.functional.fakes import (
    API,
    STATE_MAGIC,
    FakeDriver,
    create_vm,
    eventually,
    finish_job,
    run_job,
    show_vm,
)


async def test_create_list_show_delete(api: httpx.AsyncClient, service: HostService) -> None:
    assert (await api.get(f"{API}/vms")).json() == []
    created = await create_vm(api, "web", cpus=1, memory="128M", notes="hello")
    assert created["name"] == "web"
    assert created["state"] == "Off"
    assert Path(created["folder"]).is_dir()

    listed = (await api.get(f"{API}/vms")).json()
    assert [vm["name"] for vm in listed] == ["web"]
    assert await show_vm(api, "web") == created
    assert await show_vm(api, created["id"]) == created  # by id as well as by name

    response = await api.delete(f"{API}/vms/web")
    assert response.status_code == 200
    assert response.json() == {"deleted": "web", "kept_disks": [], "deleted_disks": []}
    assert (await api.get(f"{API}/vms")).json() == []
    assert (await api.get(f"{API}/vms/web")).status_code == 404
    assert not Path(created["folder"]).exists()


async def test_show_fields(api: httpx.AsyncClient) -> None:
    vm = await create_vm(api, "db", generation=1, cpus=1, memory="256M")
    for key in ("id", "name", "state", "generation", "cpus", "memory_bytes", "disks",
                "uptime_seconds", "state_reason", "network_adapters", "boot_order",
                "auto_start", "auto_stop", "accelerator", "pid", "created_at", "folder"):
        assert key in vm, key
    assert vm["generation"] == 1
    assert vm["cpus"] == 1
    assert vm["memory_bytes"] == 256 * 1024 * 1024
    assert vm["disks"] == []
    assert vm["uptime_seconds"] == 0
    assert vm["pid"] is None
    assert vm["accelerator"] == "tcg"
    assert vm["auto_start"] == "start-if-running"
    assert vm["auto_stop"] == "save"
    # a Generation 1 VM gets an emulated NIC by default, Generation 2 a synthetic one
    assert [n["model"] for n in vm["network_adapters"]] == ["e1000"]
    gen2 = await create_vm(api, "db2")
    assert gen2["generation"] == 2
    assert [n["model"] for n in gen2["network_adapters"]] == ["virtio"]
    assert (Path(gen2["folder"]) / "efivars.fd").read_bytes().startswith(b"fake-ovmf-vars")


async def test_create_with_a_new_disk(api: httpx.AsyncClient) -> None:
    vm = await create_vm(api, "with-disk", new_disk="16M")
    [disk] = vm["disks"]
    assert disk["bus"] == "scsi"
    assert disk["format"] == "qcow2"
    assert Path(disk["path"]).parent == Path(vm["folder"])
    assert Path(disk["path"]).is_file()
    # deleting the VM keeps its disk unless asked
    result = (await api.delete(f"{API}/vms/with-disk")).json()
    assert result["kept_disks"] == [
        {"path": disk["path"], "reason": "disks are kept unless --delete-disks is given"}]
    assert Path(disk["path"]).is_file()


async def test_delete_with_disks(api: httpx.AsyncClient) -> None:
    vm = await create_vm(api, "gone", generation=1, new_disk="16M")
    [disk] = vm["disks"]
    assert disk["bus"] == "ide"
    response = await api.delete(f"{API}/vms/gone", params={"delete_disks": "true"})
    assert response.json()["deleted_disks"] == [disk["path"]]
    assert not Path(vm["folder"]).exists()


async def test_start(api: httpx.AsyncClient, driver: FakeDriver) -> None:
    vm = await create_vm(api, "web")
    response = await api.post(f"{API}/vms/web/start")
    assert response.status_code == 202
    job = response.json()
    assert (job["kind"], job["target"]) == ("start", "web")
    job = await finish_job(api, job)
    assert job["state"] == "completed"
    assert job["result"] == {"state": "Running"}
    assert job["progress"] == 100.0
    shown = await show_vm(api, "web")
    assert shown["state"] == "Running"
    machine = driver.machine_of(vm["id"])
    assert shown["pid"] == machine.pid
    # the spec handed to the driver is this VM's, and it is a valid command line
    assert machine.spec is not None and machine.spec.vm_id == vm["id"]
    assert isinstance(machine.spec.firmware, Uefi)
    assert "-daemonize" in machine.argv


async def test_pause_and_resume(api: httpx.AsyncClient, driver: FakeDriver) -> None:
    vm = await create_vm(api, "web")
    await run_job(api, "web", "start")
    response = await api.post(f"{API}/vms/web/pause")
    assert response.status_code == 200
    assert response.json()["state"] == "Paused"
    assert driver.machine_of(vm["id"]).status_value == "paused"
    response = await api.post(f"{API}/vms/web/resume")
    assert response.status_code == 200
    assert response.json()["state"] == "Running"
    assert driver.machine_of(vm["id"]).status_value == "running"


async def test_save_then_start_restores(api: httpx.AsyncClient, driver: FakeDriver,
                                        service: HostService) -> None:
    vm = await create_vm(api, "web")
    await run_job(api, "web", "start")
    first = driver.machine_of(vm["id"])
    job = await run_job(api, "web", "save")
    assert job["result"] == {"state": "Saved", "how": "saved"}
    shown = await show_vm(api, "web")
    assert shown["state"] == "Saved"
    assert shown["uptime_seconds"] == 0
    assert not first.alive
    saved = service.get_vm("web").files.saved_state
    assert saved.read_bytes() == STATE_MAGIC + vm["id"].encode()

    await run_job(api, "web", "start")
    shown = await show_vm(api, "web")
    assert shown["state"] == "Running"
    second = driver.machine_of(vm["id"])
    assert second.spec is not None and second.spec.incoming
    assert "-incoming" in second.argv
    assert second.status_value == "running"  # resumed after the restore
    assert driver.restored == [vm["id"]]
    assert not saved.exists()


async def test_save_from_paused(api: httpx.AsyncClient) -> None:
    await create_vm(api, "web")
    await run_job(api, "web", "start")
    await api.post(f"{API}/vms/web/pause")
    await run_job(api, "web", "stop", {"mode": "save"})
    assert (await show_vm(api, "web"))["state"] == "Saved"


async def test_stop_guest_obeys_power_button(api: httpx.AsyncClient,
                                             driver: FakeDriver) -> None:
    vm = await create_vm(api, "web")
    await run_job(api, "web", "start")
    machine = driver.machine_of(vm["id"])
    job = await run_job(api, "web", "stop")
    assert job["result"]["state"] == "Off"
    assert "guest shut down" in job["result"]["how"]
    assert machine.power_presses == 1
    shown = await show_vm(api, "web")
    assert shown["state"] == "Off"
    assert shown["pid"] is None
    assert driver.live_machines() == []


async def test_stop_guest_ignores_power_button(api: httpx.AsyncClient,
                                               driver: FakeDriver) -> None:
    driver.ignore_power_button = True
    vm = await create_vm(api, "stubborn")
    await run_job(api, "stubborn", "start")
    machine = driver.machine_of(vm["id"])
    job = await run_job(api, "stubborn", "stop", {"timeout_seconds": 0.1})
    assert job["result"]["state"] == "Off"
    assert "turned off" in job["result"]["how"]
    assert machine.power_presses == 1
    assert not machine.alive
    shown = await show_vm(api, "stubborn")
    assert shown["state"] == "Off"
    assert "turned off" in shown["state_reason"]


async def test_stop_from_paused(api: httpx.AsyncClient, driver: FakeDriver) -> None:
    await create_vm(api, "web")
    await run_job(api, "web", "start")
    await api.post(f"{API}/vms/web/pause")
    job = await run_job(api, "web", "stop")
    assert job["result"]["state"] == "Off"


async def test_turn_off(api: httpx.AsyncClient, driver: FakeDriver) -> None:
    driver.ignore_power_button = True
    vm = await create_vm(api, "web")
    await run_job(api, "web", "start")
    machine = driver.machine_of(vm["id"])
    job = await run_job(api, "web", "stop", {"mode": "turn-off"})
    assert job["kind"] == "turn-off"
    assert job["result"] == {"state": "Off", "how": "turned off"}
    assert machine.power_presses == 0
    assert not machine.alive
    assert (await show_vm(api, "web"))["state"] == "Off"


async def test_force_stop_of_a_paused_vm_turns_it_off(api: httpx.AsyncClient,
                                                      driver: FakeDriver) -> None:
    vm = await create_vm(api, "web")
    await run_job(api, "web", "start")
    await api.post(f"{API}/vms/web/pause")
    job = await run_job(api, "web", "stop", {"force": True})
    assert job["result"] == {"state": "Off", "how": "turned off"}
    assert driver.machines[0].power_presses == 0
    assert vm["id"] not in [m.vm_id for m in driver.live_machines()]


async def test_restart(api: httpx.AsyncClient, driver: FakeDriver) -> None:
    vm = await create_vm(api, "web")
    await run_job(api, "web", "start")
    before = driver.machine_of(vm["id"])
    job = await run_job(api, "web", "restart")
    assert job["result"]["state"] == "Running"
    assert "guest shut down" in job["result"]["how"]
    after = driver.machine_of(vm["id"])
    assert after is not before and not before.alive
    assert (await show_vm(api, "web"))["pid"] == after.pid


async def test_restart_of_a_stubborn_guest_turns_it_off_first(
        api: httpx.AsyncClient, driver: FakeDriver) -> None:
    driver.ignore_power_button = True
    vm = await create_vm(api, "web")
    await run_job(api, "web", "start")
    job = await run_job(api, "web", "restart", {"timeout_seconds": 0.05})
    assert job["result"]["state"] == "Running"
    assert "turned off" in job["result"]["how"]
    assert len([m for m in driver.machines if m.vm_id == vm["id"]]) == 2


async def test_guest_shuts_down_by_itself(api: httpx.AsyncClient, driver: FakeDriver,
                                          service: HostService) -> None:
    vm = await create_vm(api, "web")
    await run_job(api, "web", "start")
    machine = driver.machine_of(vm["id"])
    machine.emit("SHUTDOWN")
    machine.exit()
    controller = service.get_vm("web")
    await eventually(lambda: controller.state.value == "Off", "the VM is Off")
    shown = await show_vm(api, "web")
    assert shown["state_reason"] == "the guest shut down"
    assert shown["pid"] is None
    # and it can be started again
    await run_job(api, "web", "start")
    assert (await show_vm(api, "web"))["state"] == "Running"


async def test_qemu_crash_is_noticed(api: httpx.AsyncClient, driver: FakeDriver,
                                     service: HostService) -> None:
    vm = await create_vm(api, "web")
    await run_job(api, "web", "start")
    driver.machine_of(vm["id"]).exit()
    controller = service.get_vm("web")
    await eventually(lambda: controller.state.value == "Off", "the VM is Off")
    assert controller.record.state_reason == "the QEMU process exited"


async def test_pause_inside_the_guest_is_noticed(api: httpx.AsyncClient, driver: FakeDriver,
                                                 service: HostService) -> None:
    vm = await create_vm(api, "web")
    await run_job(api, "web", "start")
    machine = driver.machine_of(vm["id"])
    machine.emit("STOP")  # e.g. a QMP 'stop' from elsewhere, or an I/O error pause
    assert (await show_vm(api, "web"))["state"] == "Paused"
    machine.emit("RESUME")
    assert (await show_vm(api, "web"))["state"] == "Running"


async def test_failed_launch_leaves_the_vm_off(api: httpx.AsyncClient,
                                               driver: FakeDriver) -> None:
    driver.launch_error = HypervisorError("qemu-system-x86_64 exited with status 1")
    await create_vm(api, "web")
    job = await run_job(api, "web", "start", ok=False)
    assert job["state"] == "failed"
    assert job["error"]["type"] == "/problems/hypervisor-error"
    assert "exited with status 1" in job["error"]["detail"]
    shown = await show_vm(api, "web")
    assert shown["state"] == "Off"
    assert shown["state_reason"].startswith("start failed:")
    driver.launch_error = None
    await run_job(api, "web", "start")


async def test_failed_save_keeps_the_vm_running(api: httpx.AsyncClient,
                                                driver: FakeDriver) -> None:
    vm = await create_vm(api, "web")
    await run_job(api, "web", "start")
    driver.save_error = HypervisorError("migration failed")
    job = await run_job(api, "web", "save", ok=False)
    assert job["state"] == "failed"
    shown = await show_vm(api, "web")
    assert shown["state"] == "Running"
    assert "save failed" in shown["state_reason"]
    assert driver.machine_of(vm["id"]).status_value == "running"


async def test_missing_disk_file_fails_the_start(api: httpx.AsyncClient, tmp_path: Path) -> None:
    vm = await create_vm(api, "web", new_disk="16M")
    Path(vm["disks"][0]["path"]).unlink()
    job = await run_job(api, "web", "start", ok=False)
    assert job["error"]["status"] == 404
    assert (await show_vm(api, "web"))["state"] == "Off"


async def test_console_log(api: httpx.AsyncClient, service: HostService) -> None:
    await create_vm(api, "web")
    response = await api.get(f"{API}/vms/web/console-log")
    assert response.status_code == 200 and response.text == ""
    service.get_vm("web").files.console_log.write_bytes(b"boot\nlogin: " + b"x" * 100)
    response = await api.get(f"{API}/vms/web/console-log", params={"max_bytes": 10})
    assert response.text == "x" * 10
    assert (await api.get(f"{API}/vms/web/console-log")).text.startswith("boot\nlogin: ")


async def test_host_info(api: httpx.AsyncClient, service: HostService) -> None:
    await create_vm(api, "a")
    await create_vm(api, "b")
    await run_job(api, "a", "start")
    info = (await api.get(f"{API}/host")).json()
    assert info["vm_count"] == 2
    assert info["running_vm_count"] == 1
    assert info["accelerator"] == "tcg"
    assert info["cpus"] == service.facts.cpus
    assert info["storage_roots"] == [str(r) for r in service.config.storage_roots]


async def test_openapi_lists_the_paths(api: httpx.AsyncClient) -> None:
    response = await api.get(f"{API}/openapi.json")
    assert response.status_code == 200
    paths = response.json()["paths"]
    for path in ("/api/v1/vms", "/api/v1/vms/{ref}", "/api/v1/vms/{ref}/start",
                 "/api/v1/vms/{ref}/stop", "/api/v1/vms/{ref}/save",
                 "/api/v1/vms/{ref}/restart", "/api/v1/vms/{ref}/pause",
                 "/api/v1/vms/{ref}/resume", "/api/v1/jobs", "/api/v1/jobs/{job_id}",
                 "/api/v1/jobs/{job_id}/cancel", "/api/v1/events", "/api/v1/host",
                 "/api/v1/disks"):
        assert path in paths, path
    assert set(paths["/api/v1/vms"]) == {"get", "post"}
    assert set(paths["/api/v1/vms/{ref}"]) == {"get", "patch", "delete"}


async def test_saved_vm_has_no_pid(api: httpx.AsyncClient) -> None:
    await create_vm(api, "web")
    await run_job(api, "web", "start")
    await run_job(api, "web", "save")
    assert (await show_vm(api, "web"))["pid"] is None
