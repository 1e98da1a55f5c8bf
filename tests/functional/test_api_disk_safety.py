"""Disk safety through the API (fake driver, real qemu-img): formats from the request or
the name, the service's own files, the chain QEMU gets, and what delete keeps."""

from __future__ import annotations

from pathlib import Path

import httpx

from hvstack.hypervisor.spec import backing_node_id
from hvstack.storage.qemu_img import run_qemu_img
from tests.functional.fakes import API, FakeDriver, assert_problem, create_vm, run_job


async def test_formats_are_the_request_or_the_name(api: httpx.AsyncClient,
                                                   tmp_path: Path) -> None:
    disks = tmp_path / "disks"
    made = await api.post(f"{API}/disks", json={"path": str(disks / "w.vhdx"), "size": "4M"})
    assert made.status_code == 201 and made.json()["format"] == "vhdx"
    assert_problem(await api.post(f"{API}/disks", json={
        "path": str(disks / "x.vhdx"), "size": "4M", "format": "qcow2"}), 400, "invalid-input")
    assert_problem(await api.post(f"{API}/disks", json={
        "path": str(disks / "x.bin"), "size": "4M"}), 400, "invalid-input")
    made = await api.post(f"{API}/disks", json={
        "path": str(disks / "x.bin"), "size": "4M", "format": "vhd"})
    assert made.status_code == 201 and made.json()["format"] == "vpc"
    await create_vm(api, "web")
    attach = await api.post(f"{API}/vms/web/disks", json={"path": str(disks / "x.bin")})
    assert_problem(attach, 400, "invalid-input")  # no name, no format: never probed
    attach = await api.post(f"{API}/vms/web/disks",
                            json={"path": str(disks / "x.bin"), "format": "vhd"})
    assert attach.status_code == 200 and attach.json()["disks"][0]["format"] == "vpc"
    assert [p.name for p in disks.iterdir() if p.name.startswith("x")] == ["x.bin"]


async def test_service_files_cannot_be_disks(api: httpx.AsyncClient, tmp_path: Path) -> None:
    vm = await create_vm(api, "web", generation=2)
    folder = Path(vm["folder"])
    for target, fmt in ((folder / "efivars.fd", "raw"), (folder / "vm.json", "raw")):
        response = await api.post(f"{API}/vms/web/disks",
                                  json={"path": str(target), "format": fmt})
        assert_problem(response, 400, "path-not-allowed")
    response = await api.post(f"{API}/disks", json={
        "path": str(tmp_path / "disks" / "c.qcow2"), "parent": str(folder / "efivars.fd"),
        "parent_format": "raw"})
    assert_problem(response, 400, "path-not-allowed")


async def test_qemu_gets_the_whole_chain(api: httpx.AsyncClient, tmp_path: Path,
                                         driver: FakeDriver) -> None:
    disks = tmp_path / "disks"
    base, child = disks / "base.raw", disks / "child.qcow2"
    await api.post(f"{API}/disks", json={"path": str(base), "size": "4M"})
    made = await api.post(f"{API}/disks", json={"path": str(child), "parent": str(base)})
    assert made.json()["chain_formats"] == ["qcow2", "raw"]
    vm = await create_vm(api, "web", disk=str(child))
    await run_job(api, "web", "start")
    spec = driver.machine_of(vm["id"]).spec
    assert spec is not None
    [device] = spec.block_devices
    [disk_id] = [d["id"] for d in vm["disks"]]
    assert [(n.id, n.path, n.format, n.read_only, n.backing)
            for n in device.node.chain()[1:]] == [
        (backing_node_id(disk_id, str(base)), str(base), "raw", True, None)]
    # the parent is in use now: it is not attached or resized, and the child not merged
    await run_job(api, "web", "stop")
    assert_problem(await api.post(f"{API}/disks/resize", json={"path": str(base),
                                                               "size": "8M"}), 409,
                   "resource-busy")
    assert_problem(await api.post(f"{API}/disks/merge", json={"path": str(child)}), 409,
                   "resource-busy")


async def test_a_parent_leaving_the_roots_stops_the_start(api: httpx.AsyncClient,
                                                          tmp_path: Path) -> None:
    disk = tmp_path / "disks" / "d.qcow2"
    await api.post(f"{API}/disks", json={"path": str(disk), "size": "4M"})
    await create_vm(api, "web", disk=str(disk))
    # rewritten behind hvstack's back to name a file outside the roots
    await run_qemu_img(["rebase", "-u", "-f", "qcow2", "-b", "/etc/hostname", "-F", "raw",
                        str(disk)])
    job = await run_job(api, "web", "start", ok=False)
    assert job["state"] == "failed" and "outside the storage roots" in job["error"]["detail"]


async def test_delete_reports_each_kept_disk(api: httpx.AsyncClient, tmp_path: Path) -> None:
    outside = tmp_path / "disks" / "o.qcow2"
    await api.post(f"{API}/disks", json={"path": str(outside), "size": "4M"})
    vm = await create_vm(api, "web", disk=str(outside))
    assert vm["disks"][0]["owned"] is False
    result = (await api.delete(f"{API}/vms/web", params={"delete_disks": "true"})).json()
    assert result["deleted_disks"] == []
    assert result["kept_disks"] == [{"path": str(outside), "reason": "it was not created "
                                     "for this VM (it was attached)"}]
    assert outside.exists()
