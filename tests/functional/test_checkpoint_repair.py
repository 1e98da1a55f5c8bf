"""A live checkpoint taken by a service killed before it stored it is recorded at the
next start: the disk goes on with the overlay QEMU writes, and a recovered checkpoint
keeps the file it froze. A node that merely stays open (not on top) changes nothing."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx

from hvstack.compute.model import DiskAttachment, DiskBus
from hvstack.host.checkpoint_ops import CheckpointOperations
from hvstack.host.checkpoint_repair import RECOVERED, unrecorded_overlays
from hvstack.host.service import HostService
from hvstack.hypervisor.capabilities import BlockNodeSpec, Snapshot
from hvstack.hypervisor.spec import backing_node_id, disk_node_id
from tests.functional.fakes import API, FakeDriver, create_vm, run_job, show_vm


def overlay_on(parent: str, path: str) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", parent,
                    "-u", path, "16M"], check=True)


async def test_an_unrecorded_live_snapshot_becomes_a_recovered_checkpoint(
        api: httpx.AsyncClient, driver: FakeDriver, service: HostService) -> None:
    vm = await create_vm(api, "web", new_disk="16M")
    disk = vm["disks"][0]
    await run_job(api, "web", "start")
    jobs = driver.live_machines()[0].block_jobs
    overlay = str(Path(disk["path"]).with_name(Path(disk["path"]).stem + "_0badcafe.qcow2"))
    overlay_on(disk["path"], overlay)
    node = backing_node_id(disk["id"], overlay)
    await jobs.add_node(BlockNodeSpec(node, "qcow2", overlay))
    await jobs.snapshot([Snapshot(disk_node_id(disk["id"]), node)])  # ... then killed

    ops = CheckpointOperations(service)
    await ops.startup()
    now = await show_vm(api, "web")
    assert now["disks"][0]["path"] == overlay and now["state"] == "Running"
    tree = await ops.tree_of(service.get_vm("web"))
    assert len(tree.checkpoints) == 1
    assert tree.checkpoints[0].name.startswith(RECOVERED)
    assert tree.checkpoints[0].disks == {disk["id"]: disk["path"]}
    assert overlay in tree.made and tree.current == tree.checkpoints[0].id
    listed = (await api.get(API + "/vms/web/checkpoints")).json()
    assert listed["checkpoints"][0]["name"].startswith(RECOVERED)

    await CheckpointOperations(service).startup()  # once recorded, nothing more happens
    assert len(await CheckpointOperations(service).tree_of(service.get_vm("web"))) == 1


async def test_a_stale_open_node_under_the_top_changes_nothing(
        api: httpx.AsyncClient, driver: FakeDriver, service: HostService) -> None:
    vm = await create_vm(api, "web", new_disk="16M")
    disk = vm["disks"][0]
    await run_job(api, "web", "start")
    jobs = driver.live_machines()[0].block_jobs
    # A merged file whose node was not removed yet: open, naming the disk, not on top.
    stale = str(Path(disk["path"]).with_name(Path(disk["path"]).stem + "_deadbeef.qcow2"))
    overlay_on(disk["path"], stale)
    await jobs.add_node(BlockNodeSpec(backing_node_id(disk["id"], stale), "qcow2", stale))
    await CheckpointOperations(service).startup()
    assert (await show_vm(api, "web"))["disks"][0]["path"] == disk["path"]
    assert len(await CheckpointOperations(service).tree_of(service.get_vm("web"))) == 0


def test_only_an_unrecorded_overlay_of_the_disk_beside_it_counts() -> None:
    disk = DiskAttachment("/s/vm/disk.qcow2", DiskBus.SCSI, id="d1")
    parents = {"/s/vm/disk_11111111.qcow2": "/s/vm/disk.qcow2",
               "/s/other/disk_22222222.qcow2": "/s/vm/disk.qcow2",
               "/s/vm/data_33333333.qcow2": "/s/vm/disk.qcow2",
               "/s/vm/disk_44444444.qcow2": "/s/vm/elsewhere.qcow2"}
    found = unrecorded_overlays([disk], parents, parents.get, frozenset())
    assert found == {"d1": "/s/vm/disk_11111111.qcow2"}
    assert unrecorded_overlays([disk], parents, parents.get,
                               frozenset({"/s/vm/disk_11111111.qcow2"})) == {}
    read_only = DiskAttachment("/s/vm/disk.qcow2", DiskBus.SCSI, read_only=True, id="d1")
    assert unrecorded_overlays([read_only], parents, parents.get, frozenset()) == {}
