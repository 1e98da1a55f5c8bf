"""Storage moves through the API on the fake driver (real files, real qemu-img): an off
VM's disk moves and its records follow; bad requests change nothing; cancelling a live
move leaves the VM on its files with QEMU's job and nodes gone; a move a crash cut short
is rolled back or finished at start-up."""

from __future__ import annotations

from pathlib import Path

import httpx

from hvstack.host.checkpoint_ops import CheckpointOperations
from hvstack.host.service import HostService
from hvstack.host.storage_move import PENDING, PendingMove, StorageMoves, mirror_job_id
from hvstack.host.store import MemoryStore
from hvstack.hypervisor.capabilities import BlockJobInfo, BlockNodeSpec
from hvstack.hypervisor.spec import disk_node_id
from hvstack.storage.move_plan import FileMove
from hvstack.storage.qemu_img import run_qemu_img
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


async def test_an_off_vm_moves_and_its_settings_follow(api: httpx.AsyncClient,
                                                       tmp_path: Path) -> None:
    vm = await create_vm(api, "web", new_disk="16M")
    old = Path(vm["disks"][0]["path"])
    target = tmp_path / "disks" / "moved" / "web"
    job = await run_job(api, "web", "move-storage", {"destination": str(target)})
    assert job["result"]["moved"] == [{"from": str(old), "to": str(target / old.name)}]
    assert job["result"]["live"] is False
    assert (await show_vm(api, "web"))["disks"][0]["path"] == str(target / old.name)
    assert (target / old.name).is_file() and not old.exists()
    again = await run_job(api, "web", "move-storage", {"destination": str(target)})
    assert again["result"]["moved"] == []
    assert again["result"]["skipped"] == [{"path": str(target / old.name),
                                           "reason": "already in the destination"}]


async def test_bad_requests_change_nothing(api: httpx.AsyncClient, tmp_path: Path,
                                           service: HostService) -> None:
    vm = await create_vm(api, "web", new_disk="16M")
    url = f"{API}/vms/web/move-storage"
    outside = await api.post(url, json={"destination": str(tmp_path / "elsewhere")})
    assert_problem(outside, 400, "path-not-allowed")
    assert_problem(await api.post(f"{API}/vms/nope/move-storage",
                                  json={"destination": str(tmp_path / "disks")}),
                   404, "not-found")
    assert_problem(await api.post(url, json={"destination": str(tmp_path / "disks"),
                                             "bandwidth": "fast"}), 400, "invalid-input")
    assert_problem(await api.post(url, json={"destination": str(tmp_path / "disks"),
                                             "disks": [str(tmp_path / "disks" / "x.qcow2")]}),
                   400, "invalid-input")
    (tmp_path / "disks" / "file").write_text("")
    assert_problem(await api.post(url, json={"destination": str(tmp_path / "disks" / "file")}),
                   400, "invalid-input")
    with service.block_work.claim(vm["id"], "web", "a checkpoint merge"):
        busy = assert_problem(await api.post(url, json={"destination": str(tmp_path / "disks")}),
                              409, "resource-busy")
    assert "a checkpoint merge" in busy["detail"]
    assert (await show_vm(api, "web"))["disks"][0]["path"] == vm["disks"][0]["path"]
    assert sorted(p.name for p in (tmp_path / "disks").iterdir()) == ["file"]


async def test_cancelling_a_live_move_leaves_the_vm_on_its_files(
        api: httpx.AsyncClient, tmp_path: Path, driver: FakeDriver, store: MemoryStore) -> None:
    vm = await create_vm(api, "web", new_disk="16M")
    await run_job(api, "web", "start")
    disk = vm["disks"][0]
    jobs = driver.machine_of(vm["id"]).block_jobs
    jobs.nodes[disk_node_id(disk["id"])] = BlockNodeSpec(disk_node_id(disk["id"]), "qcow2",
                                                         disk["path"])
    target = tmp_path / "disks" / "moved"
    response = await api.post(f"{API}/vms/web/move-storage",
                              json={"destination": str(target), "bandwidth": "1M"})
    assert response.status_code == 202, response.text
    await eventually(lambda: bool(jobs.running), "the mirror runs")
    [mirror] = jobs.running.values()
    assert (mirror.type, mirror.speed) == ("mirror", 1024 * 1024)
    assert (target / Path(disk["path"]).name).exists()
    job = response.json()
    assert (await api.post(f"{API}/jobs/{job['id']}/cancel")).status_code == 200
    ended = await finish_job(api, job)
    assert ended["state"] == "cancelled", ended
    assert jobs.running == {} and list(jobs.nodes) == [disk_node_id(disk["id"])]
    assert not target.exists()
    assert (await show_vm(api, "web"))["disks"][0]["path"] == disk["path"]
    assert await store.scan(PENDING) == []


async def test_startup_rolls_back_a_copy_and_finishes_a_stored_move(
        api: httpx.AsyncClient, tmp_path: Path, service: HostService) -> None:
    one = await create_vm(api, "one", new_disk="16M")
    two = await create_vm(api, "two", new_disk="16M")
    moves = StorageMoves(service, CheckpointOperations(service))
    dest = tmp_path / "disks"
    # "one" was copying: the copy goes, the VM stays on its disk
    old_one = one["disks"][0]["path"]
    copy = dest / "one.qcow2"
    copy.write_bytes(Path(old_one).read_bytes())
    await moves.records.save(PendingMove(one["id"], "job", False, "copying", (
        FileMove(one["disks"][0]["id"], old_one, str(copy), "qcow2", None, None, None,
                 True),)))
    # "two" was stored already: only its old file is left to delete
    old_two = Path(two["disks"][0]["path"])
    new_two = dest / "two.qcow2"
    new_two.write_bytes(old_two.read_bytes())
    vm_two = service.get_vm("two")
    async with vm_two.lock:
        await moves._store(vm_two, {str(old_two): str(new_two)})
    await moves.records.save(PendingMove(two["id"], "job", False, "copying", (
        FileMove(two["disks"][0]["id"], str(old_two), str(new_two), "qcow2", None, None,
                 None, True),)))

    await moves.startup()
    assert not copy.exists() and Path(old_one).exists()
    assert (await show_vm(api, "one"))["disks"][0]["path"] == old_one
    assert not old_two.exists() and new_two.exists()
    assert (await show_vm(api, "two"))["disks"][0]["path"] == str(new_two)
    assert await moves.records.load_all() == []


async def test_startup_finishes_a_move_whose_mirror_completed(
        api: httpx.AsyncClient, tmp_path: Path, service: HostService,
        driver: FakeDriver) -> None:
    vm = await create_vm(api, "web", new_disk="16M")
    await run_job(api, "web", "start")
    disk = vm["disks"][0]
    old = Path(disk["path"])
    new = tmp_path / "disks" / old.name
    new.write_bytes(old.read_bytes())
    jobs = driver.machine_of(vm["id"]).block_jobs
    job_id = mirror_job_id(disk["id"])
    jobs.running[job_id] = BlockJobInfo(job_id, "mirror", "concluded", 100, 100)
    jobs.nodes["old"] = BlockNodeSpec("old", "qcow2", str(old))
    moves = StorageMoves(service, CheckpointOperations(service))
    await moves.records.save(PendingMove(vm["id"], "job", True, "switching", (
        FileMove(disk["id"], str(old), str(new), "qcow2", None, None, None, True),)))

    await moves.startup()
    assert (await show_vm(api, "web"))["disks"][0]["path"] == str(new)
    assert not old.exists() and new.exists()
    assert job_id not in jobs.running and "old" not in jobs.nodes
    assert await moves.records.load_all() == []


async def test_an_old_file_that_got_a_child_during_the_move_stays(
        api: httpx.AsyncClient, tmp_path: Path, service: HostService) -> None:
    await create_vm(api, "web", new_disk="16M")
    disks = tmp_path / "disks"
    gone, kept = disks / "gone.qcow2", disks / "kept.qcow2"
    for path in (gone, kept):
        await run_qemu_img(["create", "-q", "-f", "qcow2", str(path), "16M"])
    await run_qemu_img(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(kept),
                        str(disks / "someones.qcow2")])
    moves = StorageMoves(service, CheckpointOperations(service))
    await moves._delete_old(service.get_vm("web"), [
        FileMove("d", str(path), str(disks / f"new-{path.name}"), "qcow2", None, None, None,
                 False) for path in (gone, kept)])
    assert not gone.exists() and kept.exists()


async def test_cancelling_an_offline_copy_leaves_nothing(
        api: httpx.AsyncClient, tmp_path: Path, store: MemoryStore) -> None:
    vm = await create_vm(api, "web", new_disk="16M")
    old = Path(vm["disks"][0]["path"])
    target = tmp_path / "disks" / "slow"
    response = await api.post(f"{API}/vms/web/move-storage",
                              json={"destination": str(target), "bandwidth": "16K"})
    assert response.status_code == 202, response.text
    await eventually(lambda: (target / old.name).exists(), "the copy begins")
    job = response.json()
    assert (await api.post(f"{API}/jobs/{job['id']}/cancel")).status_code == 200
    ended = await finish_job(api, job)
    assert ended["state"] == "cancelled", ended
    assert not target.exists() and old.exists()
    assert (await show_vm(api, "web"))["disks"][0]["path"] == str(old)
    assert await store.scan(PENDING) == []
