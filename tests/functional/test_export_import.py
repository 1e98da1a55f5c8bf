"""Export and import through the API (fake driver, real files and qemu-img): an Off VM
with a checkpoint tree round-trips under a new id; the import's check lists every
problem at once and changes nothing; an export never leaves half a folder."""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from hvstack.api.app import create_app
from hvstack.checkpoints.model import Checkpoint, CheckpointKind
from hvstack.errors import NoSpace
from hvstack.host import export_files
from hvstack.host.root import HostRoot
from hvstack.host.service import HostService
from hvstack.hypervisor.capabilities import Backup, BlockNodeSpec
from hvstack.hypervisor.spec import disk_node_id
from hvstack.storage.qcow2_header import read_links
from hvstack.storage.qemu_img import run_qemu_img
from tests.functional.fake_capabilities import FakeBlockJobs
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


@pytest.fixture
async def root(service: HostService) -> HostRoot:
    return HostRoot(service)


@pytest.fixture
async def client(root: HostRoot) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(root))
    async with httpx.AsyncClient(transport=transport, base_url="http://hv") as api:
        yield api


async def checkpoint(root: HostRoot, name: str, cp_name: str) -> Path:
    """A production checkpoint of the Off VM ``name`` made as H1's create makes one:
    the active file frozen, a new overlay on top. Returns the frozen file."""
    vm = root.service.get_vm(name)
    config = vm.record.config
    [disk] = config.disks
    frozen = Path(disk.path)
    stem = frozen.stem.split("_")[0]
    overlay = frozen.with_name(f"{stem}_{secrets.token_hex(4)}.qcow2")
    await run_qemu_img(["create", "-f", "qcow2", "-F", disk.format, "-b", str(frozen), "-u",
                        str(overlay), "8M"])
    async with vm.lock:
        tree = await root.checkpoints.tree_of(vm)
        cp = Checkpoint(f"{len(tree) + 1:016x}", cp_name, None, time.time(),
                        CheckpointKind.PRODUCTION, {disk.id: str(frozen)}, config.to_json())
        new = replace(config, disks=(replace(disk, path=str(overlay), format="qcow2"),))
        await root.checkpoints.store(vm, tree.added(cp, [str(overlay)]), new)
    return frozen


async def export(api: httpx.AsyncClient, name: str, folder: Path) -> dict[str, Any]:
    response = await api.post(f"{API}/vms/{name}/export", json={"path": str(folder)})
    assert response.status_code == 202, response.text
    job = await finish_job(api, response.json())
    assert job["state"] == "completed", job
    result: dict[str, Any] = job["result"]
    return result


async def test_off_vm_with_checkpoints_round_trips_under_a_new_id(
        root: HostRoot, client: httpx.AsyncClient, tmp_path: Path) -> None:
    vm = await create_vm(client, "web", new_disk="8M", generation=1)
    await checkpoint(root, "web", "one")
    await checkpoint(root, "web", "two")
    out = tmp_path / "disks" / "exports"
    result = await export(client, "web", out)
    folder = out / "web"
    assert result["path"] == str(folder) and result["checkpoints"] == 2
    assert result["files"] == 3 and result["consistency"] == "offline"
    manifest = json.loads((folder / "vm.json").read_text())
    assert manifest["id"] == vm["id"] and manifest["state"] == "Off"
    for entry in manifest["files"]:  # relative names, and headers that agree
        assert not entry["path"].startswith("/")
        links = read_links(folder / entry["path"])
        assert links is not None
        assert links.backing_file == (Path(entry["parent"]).name if entry["parent"] else None)

    # The same id is taken: the check says so, and nothing is made.
    check = await client.post(f"{API}/imports/check", json={"path": str(folder),
                                                             "name": "copy"})
    assert check.status_code == 200 and not check.json()["ok"]
    assert any("already has the id" in p for p in check.json()["problems"])
    refused = assert_problem(await client.post(f"{API}/imports", json={
        "path": str(folder), "name": "copy"}), 400, "invalid-input")
    assert any("--new-id" in p for p in refused["problems"])

    response = await client.post(f"{API}/imports", json={
        "path": str(out), "name": "copy", "new_id": True})  # the parent folder works too
    assert response.status_code == 202, response.text
    job = await finish_job(client, response.json())
    assert job["state"] == "completed", job
    imported = root.service.get_vm("copy")
    assert any("dynamic MAC" in note for note in job["result"]["notes"])  # web has it
    assert imported.record.id != vm["id"]
    tree = await root.checkpoints.tree_of(imported)
    assert [c.name for c in tree.checkpoints] == ["one", "two"]
    assert tree.current == tree.checkpoints[1].id
    [disk] = imported.record.config.disks
    assert Path(disk.path).is_relative_to(imported.files.folder) and disk.owned
    assert set(tree.made) <= {str(p) for p in imported.files.folder.rglob("*.qcow2")}
    # Each checkpoint's file is a copy in the new folder, chained as before.
    for cp in tree.checkpoints:
        [path] = cp.disks.values()
        assert Path(path).is_file() and Path(path).is_relative_to(imported.files.folder)
        assert json.loads(cp.config)["disks"][0]["path"] == path
    info = json.loads(await run_qemu_img(["info", "--output=json", "--backing-chain", "-f",
                                          "qcow2", disk.path]))
    assert len(info) == 3 and all(Path(i["filename"]).parent == imported.files.folder
                                  for i in info)
    # Deleted without --delete-disks, the VM leaves its disks (all at its folder's top).
    response = await client.delete(f"{API}/vms/copy")
    assert response.status_code == 200, response.text
    assert all(Path(i["filename"]).is_file() for i in info)


async def test_the_check_lists_every_problem_and_changes_nothing(
        root: HostRoot, client: httpx.AsyncClient, tmp_path: Path) -> None:
    await create_vm(client, "web", new_disk="8M", generation=1)
    await checkpoint(root, "web", "one")
    out = tmp_path / "disks" / "exports"
    await export(client, "web", out)
    folder = out / "web"
    manifest = json.loads((folder / "vm.json").read_text())
    base = next(f for f in manifest["files"] if f["parent"] is None)
    top = next(f for f in manifest["files"] if f["parent"] is not None)
    (folder / base["path"]).unlink()  # a missing disk
    for nic in manifest["config"]["network_adapters"]:
        nic["dynamic_mac"] = False  # a static MAC: the import may not change it
    (folder / "vm.json").write_text(json.dumps(manifest))
    outside = tmp_path / "disks" / "elsewhere.qcow2"  # a chain member outside
    await run_qemu_img(["create", "-f", "qcow2", str(outside), "8M"])
    await run_qemu_img(["rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", str(outside),
                        str(folder / top["path"])])
    before = sorted(p.name for p in root.service.config.vms_dir.iterdir())
    check = (await client.post(f"{API}/imports/check", json={"path": str(folder)})).json()
    problems = check["problems"]
    assert any("missing from the export" in p for p in problems)
    assert any("outside the export" in p for p in problems)
    assert any("already has the id" in p for p in problems)
    assert any("already exists" in p and "web" in p for p in problems)  # the name
    assert any("static MAC" in p for p in problems)
    assert_problem(await client.post(f"{API}/imports", json={"path": str(folder)}), 400,
                   "invalid-input")
    assert sorted(p.name for p in root.service.config.vms_dir.iterdir()) == before
    assert [vm.record.name for vm in root.service.list_vms()] == ["web"]


async def test_a_format_the_name_contradicts_and_a_path_that_leaves(
        root: HostRoot, client: httpx.AsyncClient, tmp_path: Path) -> None:
    await create_vm(client, "web", new_disk="8M", generation=1)
    out = tmp_path / "disks" / "exports"
    await export(client, "web", out)
    folder = out / "web"
    manifest = json.loads((folder / "vm.json").read_text())
    manifest["files"][0]["format"] = "raw"  # a .qcow2 named file recorded as raw
    manifest["config"]["disks"][0]["format"] = "raw"
    (folder / "vm.json").write_text(json.dumps(manifest))
    check = (await client.post(f"{API}/imports/check", json={
        "path": str(folder), "new_id": True, "name": "b"})).json()
    assert any("its name says otherwise" in p for p in check["problems"]), check
    manifest["files"][0]["path"] = "../../elsewhere.qcow2"
    (folder / "vm.json").write_text(json.dumps(manifest))
    check = (await client.post(f"{API}/imports/check", json={
        "path": str(folder), "new_id": True, "name": "b"})).json()
    assert any("leads outside" in p for p in check["problems"]), check


async def test_register_in_place_uses_the_export_files(
        root: HostRoot, client: httpx.AsyncClient, tmp_path: Path) -> None:
    await create_vm(client, "web", new_disk="8M", generation=2)
    await checkpoint(root, "web", "one")
    out = tmp_path / "disks" / "exports"
    await export(client, "web", out)
    folder = out / "web"
    response = await client.delete(f"{API}/vms/web", params={"delete_disks": "true"})
    assert response.status_code == 200, response.text
    response = await client.post(f"{API}/imports", json={"path": str(folder),
                                                          "mode": "register"})
    assert response.status_code == 202, response.text
    job = await finish_job(client, response.json())
    assert job["state"] == "completed", job
    vm = root.service.get_vm("web")
    [disk] = vm.record.config.disks
    assert Path(disk.path).parent == (folder / "Virtual Hard Disks").resolve()
    [cp] = (await root.checkpoints.tree_of(vm)).checkpoints
    assert all(Path(p).parent == Path(disk.path).parent for p in cp.disks.values()), (cp, disk)
    assert vm.files.efi_vars.is_file()
    # Registered twice: the id, the name and the files are taken.
    check = (await client.post(f"{API}/imports/check", json={
        "path": str(folder), "mode": "register"})).json()
    assert any("already has the id" in p for p in check["problems"])
    assert any("VM 'web'" in p for p in check["problems"]), check


async def test_export_into_a_taken_folder_or_outside_the_roots(
        root: HostRoot, client: httpx.AsyncClient, tmp_path: Path) -> None:
    await create_vm(client, "web", new_disk="8M", generation=1)
    out = tmp_path / "disks" / "exports"
    (out / "web").mkdir(parents=True)
    assert_problem(await client.post(f"{API}/vms/web/export", json={"path": str(out)}),
                   409, "already-exists")
    assert_problem(await client.post(f"{API}/vms/web/export",
                                     json={"path": str(tmp_path / "nowhere")}),
                   400, "path-not-allowed")
    vms_dir = root.service.config.vms_dir
    assert_problem(await client.post(f"{API}/vms/web/export", json={"path": str(vms_dir)}),
                   400, "path-not-allowed")
    assert list((out / "web").iterdir()) == []
    shutil.rmtree(out)


async def running_export(root: HostRoot, client: httpx.AsyncClient, driver: FakeDriver,
                         folder: Path) -> tuple[dict[str, Any], FakeBlockJobs, str]:
    """Start exporting the running VM 'web'; return the job once QEMU's (fake) backup
    job runs, the fake's block jobs, and that job's id."""
    vm = await create_vm(client, "web", new_disk="8M", generation=1)
    await run_job(client, "web", "start")
    jobs = driver.machine_of(vm["id"]).block_jobs
    [disk] = root.service.get_vm("web").record.config.disks
    jobs.nodes[disk_node_id(disk.id)] = BlockNodeSpec(disk_node_id(disk.id), "qcow2", disk.path)
    response = await client.post(f"{API}/vms/web/export", json={"path": str(folder)})
    assert response.status_code == 202, response.text
    await eventually(lambda: bool(jobs.running), "the backup job runs")
    [job_id] = jobs.running
    return response.json(), jobs, job_id


async def test_a_running_vm_is_exported_through_one_backup_transaction(
        root: HostRoot, client: httpx.AsyncClient, driver: FakeDriver, tmp_path: Path) -> None:
    out = tmp_path / "disks" / "exports"
    job, jobs, job_id = await running_export(root, client, driver, out)
    assert [n for n in jobs.nodes if n.startswith("export-")]
    # Another disk job on the VM meanwhile is refused at once.
    assert_problem(await client.post(f"{API}/vms/web/export",
                                     json={"path": str(tmp_path / "disks")}),
                   409, "resource-busy")
    info = jobs.running[job_id]
    jobs.running[job_id] = replace(info, status="concluded", offset=100)
    job = await finish_job(client, job)
    assert job["state"] == "completed", job
    assert job["result"]["state"] == "Off"
    assert not [n for n in jobs.nodes if n.startswith("export-")]  # removed again
    record = json.loads((out / "web" / "vm.json").read_text())
    assert record["state"] == "Off" and len(record["files"]) == 1
    assert (await show_vm(client, "web"))["state"] == "Running"


async def test_cancelling_a_running_export_leaves_nothing(
        root: HostRoot, client: httpx.AsyncClient, driver: FakeDriver, tmp_path: Path) -> None:
    out = tmp_path / "disks" / "exports"
    job, jobs, _ = await running_export(root, client, driver, out)
    response = await client.post(f"{API}/jobs/{job['id']}/cancel")
    assert response.status_code == 200, response.text
    job = await finish_job(client, job)
    assert job["state"] == "cancelled"
    assert not jobs.running and not [n for n in jobs.nodes if n.startswith("export-")]
    assert not (out / "web").exists()
    assert (await show_vm(client, "web"))["state"] == "Running"


async def test_an_export_reached_through_a_link_out_of_the_roots_is_refused(
        root: HostRoot, client: httpx.AsyncClient, tmp_path: Path) -> None:
    await create_vm(client, "web", new_disk="8M", generation=1)
    outside = tmp_path / "outside"
    await export(client, "web", tmp_path / "disks" / "exports")
    shutil.copytree(tmp_path / "disks" / "exports" / "web", outside / "web")
    holder = tmp_path / "disks" / "holder"
    holder.mkdir()
    (holder / "web").symlink_to(outside / "web")
    assert_problem(await client.post(f"{API}/imports/check", json={"path": str(holder)}),
                   400, "path-not-allowed")


async def test_generation_2_needs_firmware_and_a_host_that_fits(
        root: HostRoot, client: httpx.AsyncClient, tmp_path: Path) -> None:
    await create_vm(client, "web", new_disk="8M", generation=2)
    out = tmp_path / "disks" / "exports"
    await export(client, "web", out)
    folder = out / "web"
    record = json.loads((folder / "vm.json").read_text())
    record["config"]["cpus"] = 100  # more than this host has
    (folder / "vm.json").write_text(json.dumps(record))
    root.service.config.ovmf_code.unlink()
    check = (await client.post(f"{API}/imports/check", json={
        "path": str(folder), "new_id": True, "name": "b"})).json()
    assert any("UEFI firmware" in p for p in check["problems"]), check
    assert any("cannot run the VM" in p and "processor" in p for p in check["problems"])


async def test_a_failing_export_and_a_cancelled_import_leave_nothing(
        root: HostRoot, client: httpx.AsyncClient, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    await create_vm(client, "web", new_disk="8M", generation=1)
    await checkpoint(root, "web", "one")
    out = tmp_path / "disks" / "exports"
    await export(client, "web", out)
    real_copy = export_files.copy_file
    copying = asyncio.Event()

    async def full(src: Path, dst: Path, on_bytes: Any) -> None:
        await real_copy(src, dst, on_bytes)
        raise NoSpace("no space left on the device")

    monkeypatch.setattr(export_files, "copy_file", full)
    response = await client.post(f"{API}/vms/web/export",
                                 json={"path": str(tmp_path / "disks" / "new" / "deeper")})
    job = await finish_job(client, response.json())
    assert job["state"] == "failed" and job["error"]["type"] == "/problems/no-space"
    assert not (tmp_path / "disks" / "new").exists()  # nor the folders it made

    async def stuck(src: Path, dst: Path, on_bytes: Any) -> None:
        await real_copy(src, dst, on_bytes)
        copying.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(export_files, "copy_file", stuck)
    folders = sorted(root.service.config.vms_dir.iterdir())
    response = await client.post(f"{API}/imports", json={
        "path": str(out / "web"), "new_id": True, "name": "copy"})
    assert response.status_code == 202, response.text
    await asyncio.wait_for(copying.wait(), 30)
    assert len(list(root.service.config.vms_dir.iterdir())) == len(folders) + 1
    await client.post(f"{API}/jobs/{response.json()['id']}/cancel")
    job = await finish_job(client, response.json())
    assert job["state"] == "cancelled"
    assert sorted(root.service.config.vms_dir.iterdir()) == folders
    assert [vm.record.name for vm in root.service.list_vms()] == ["web"]


async def test_an_imported_copy_keeps_the_parents_of_its_disks(
        root: HostRoot, client: httpx.AsyncClient, tmp_path: Path) -> None:
    disks = tmp_path / "disks"
    await client.post(f"{API}/disks", json={"path": str(disks / "base.raw"), "size": "8M"})
    await client.post(f"{API}/disks", json={"path": str(disks / "child.qcow2"),
                                            "parent": str(disks / "base.raw")})
    await create_vm(client, "web", disk=str(disks / "child.qcow2"), generation=1)
    await export(client, "web", disks / "exports")
    response = await client.post(f"{API}/imports", json={
        "path": str(disks / "exports" / "web"), "new_id": True, "name": "copy"})
    job = await finish_job(client, response.json())
    assert job["state"] == "completed", job
    folder = root.service.get_vm("copy").files.folder
    assert sorted(p.name for p in folder.iterdir() if p.suffix in (".raw", ".qcow2")) == [
        "base.raw", "child.qcow2"]
    response = await client.delete(f"{API}/vms/copy")
    assert response.status_code == 200, response.text
    assert (folder / "base.raw").is_file() and (folder / "child.qcow2").is_file()


async def test_leftovers_of_a_cut_short_export_are_cleared(
        root: HostRoot, client: httpx.AsyncClient, driver: FakeDriver, tmp_path: Path) -> None:
    """QEMU outlives a killed service: its export job and node are still there."""
    vm = await create_vm(client, "web", new_disk="8M", generation=1)
    await run_job(client, "web", "start")
    jobs = driver.machine_of(vm["id"]).block_jobs
    [disk] = root.service.get_vm("web").record.config.disks
    jobs.nodes[disk_node_id(disk.id)] = BlockNodeSpec(disk_node_id(disk.id), "qcow2", disk.path)
    jobs.nodes[f"export-{disk.id}"] = BlockNodeSpec(f"export-{disk.id}", "qcow2", "/gone")
    await jobs.backup([Backup(f"export-{disk.id}", disk_node_id(disk.id), f"export-{disk.id}")])
    response = await client.post(f"{API}/vms/web/export",
                                 json={"path": str(tmp_path / "disks")})
    assert response.status_code == 202, response.text
    await eventually(lambda: jobs.nodes.get(f"export-{disk.id}") is not None
                     and jobs.nodes[f"export-{disk.id}"].filename != "/gone", "a new node")
    info = jobs.running[f"export-{disk.id}"]
    jobs.running[info.job_id] = replace(info, status="concluded")
    job = await finish_job(client, response.json())
    assert job["state"] == "completed", job


async def test_a_folder_made_meanwhile_by_someone_else_is_left_alone(
        root: HostRoot, client: httpx.AsyncClient, tmp_path: Path) -> None:
    await create_vm(client, "web", new_disk="8M", generation=1)
    vm = root.service.get_vm("web")
    out = tmp_path / "disks" / "exports"
    async with vm.lock:  # the export's job waits for the VM
        response = await client.post(f"{API}/vms/web/export", json={"path": str(out)})
        assert response.status_code == 202, response.text
        (out / "web").mkdir(parents=True)
        (out / "web" / "theirs.txt").write_text("not the export's")
    job = await finish_job(client, response.json())
    assert job["state"] == "failed" and job["error"]["type"] == "/problems/already-exists"
    assert (out / "web" / "theirs.txt").read_text() == "not the export's"
