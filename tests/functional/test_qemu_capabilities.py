"""QEMU's machine capabilities against a fake QMP server at the wire: the commands sent,
the replies parsed, the events waited for, the descriptors passed."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from hvstack.errors import HypervisorError, OperationTimeout
from hvstack.hypervisor.capabilities import (
    BalloonStats,
    BlockIoStats,
    BlockJobInfo,
    DeviceSpec,
    DirtyBitmap,
    FdSetMember,
    MemoryDeviceSize,
    MigrationParameters,
    MigrationStats,
    NetdevSpec,
    Snapshot,
)
from hvstack.hypervisor.qemu.driver import QemuDriver, QemuMachine
from tests.fake_qmp import FakeQmp, QmpFailure
from tests.functional.qmp_fakes import VM_ID, Worker


@pytest.fixture
async def qmp(tmp_path: Path) -> AsyncIterator[FakeQmp]:
    async with FakeQmp(tmp_path / "qmp.sock") as server:
        yield server


@pytest.fixture
async def machine(qmp: FakeQmp) -> AsyncIterator[QemuMachine]:
    worker = await Worker.start()
    attached = await QemuDriver().attach(VM_ID, worker.pid, qmp.path, lambda event: None)
    assert attached is not None
    yield attached
    await attached.close()
    await worker.stop()


# -- devices ------------------------------------------------------------------------------


def _unplug(qmp: FakeQmp, *, answer: bool = True) -> None:
    """device_del: the guest releases the device a moment later (QEMU's order of events)."""

    def device_del(args: dict[str, Any]) -> None:
        device = args["id"]
        if answer:
            # The virtio back end goes first, without an id; then the device itself.
            qmp.later(qmp.emit("DEVICE_DELETED", {
                "path": f"/machine/peripheral/{device}/virtio-backend"}))
            qmp.later(qmp.emit("DEVICE_DELETED", {"device": "other", "path": "/x"}))
            qmp.later(qmp.emit("DEVICE_DELETED", {
                "device": device, "path": f"/machine/peripheral/{device}"}))

    qmp.on("device_del", device_del)


async def test_a_nic_is_plugged_on_a_passed_tap_descriptor(
    qmp: FakeQmp, machine: QemuMachine
) -> None:
    read_end, write_end = os.pipe()
    try:
        await machine.devices.pass_fd(write_end, "tap-nic1")
        await machine.devices.add_netdev(NetdevSpec("net1", "tap", {"fd": "tap-nic1"}))
        await machine.devices.add_device(DeviceSpec(
            "virtio-net-pci", "nic1", {"netdev": "net1", "mac": "52:54:00:12:34:57"}))
        os.write(qmp.fds["tap-nic1"], b"frame")  # QEMU holds the very same file
        assert os.read(read_end, 10) == b"frame"
    finally:
        os.close(read_end)
        os.close(write_end)
    assert qmp.sent("netdev_add") == [{"fd": "tap-nic1", "type": "tap", "id": "net1"}]
    assert qmp.sent("device_add") == [{"netdev": "net1", "mac": "52:54:00:12:34:57",
                                       "driver": "virtio-net-pci", "id": "nic1"}]
    await machine.devices.close_fd("tap-nic1")
    assert "tap-nic1" not in qmp.fds


async def test_link_state_goes_to_set_link(qmp: FakeQmp, machine: QemuMachine) -> None:
    qmp.reply("set_link", {})
    await machine.devices.set_link("nic-525400123457", False)
    await machine.devices.set_link("nic-525400123457", True)
    assert qmp.sent("set_link") == [{"name": "nic-525400123457", "up": False},
                                    {"name": "nic-525400123457", "up": True}]


async def test_the_devices_on_a_port_are_its_bus_children(qmp: FakeQmp,
                                                          machine: QemuMachine) -> None:
    # qom-list of a root port's bus, as QEMU 7.2 answers it
    qmp.reply("qom-list", [
        {"name": "type", "type": "string"}, {"name": "realized", "type": "bool"},
        {"name": "acpi-pcihp-bsel", "type": "uint32"},
        {"name": "child[3]", "type": "link<virtio-net-pci>"},
        {"name": "hotplug-handler", "type": "link<hotplug-handler>"}])
    qmp.reply("qom-get", "/machine/peripheral/nic-525400123457")
    assert await machine.devices.devices_on("hotplug-port-1") == ("nic-525400123457",)
    assert qmp.sent("qom-list") == [{"path": "/machine/peripheral/hotplug-port-1/"
                                             "hotplug-port-1"}]
    assert qmp.sent("qom-get") == [{"path": "/machine/peripheral/hotplug-port-1/"
                                            "hotplug-port-1", "property": "child[3]"}]
    qmp.reply("qom-list", [{"name": "type", "type": "string"},
                           {"name": "hotplug-handler", "type": "link<hotplug-handler>"}])
    assert await machine.devices.devices_on("hotplug-port-0") == ()


async def test_the_root_bus_slots_come_from_query_pci(qmp: FakeQmp,
                                                     machine: QemuMachine) -> None:
    # query-pci of an i440fx machine, shortened, as QEMU 7.2 answers it
    def device(slot: int, function: int, qdev_id: str) -> dict[str, Any]:
        return {"bus": 0, "slot": slot, "function": function, "qdev_id": qdev_id,
                "class_info": {"class": 512}, "id": {"device": 4110, "vendor": 32902},
                "regions": []}

    qmp.reply("query-pci", [{"bus": 0, "devices": [
        device(0, 0, ""), device(1, 0, ""), device(1, 1, ""), device(1, 3, ""),
        device(2, 0, "video0"), device(16, 0, "nic-525400123457"),
        device(17, 0, "nic-525400123458")]}])
    assert await machine.devices.root_bus_slots() == {
        0: "", 1: "", 2: "video0", 16: "nic-525400123457", 17: "nic-525400123458"}


async def test_device_ids_are_the_peripherals(qmp: FakeQmp, machine: QemuMachine) -> None:
    qmp.reply("qom-list", [{"name": "type", "type": "string"},
                           {"name": "port-525400123457", "type": "child<pcie-root-port>"},
                           {"name": "nic-525400123457", "type": "child<virtio-net-pci>"}])
    assert await machine.devices.device_ids() == ("port-525400123457", "nic-525400123457")
    assert qmp.sent("qom-list") == [{"path": "/machine/peripheral"}]


async def test_descriptors_join_fd_sets(qmp: FakeQmp, machine: QemuMachine,
                                        tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"x")
    fd = os.open(disk, os.O_RDONLY)
    try:
        first = await machine.devices.add_fd(fd, opaque="disk0")
        second = await machine.devices.add_fd(fd, fdset=first.fdset)
    finally:
        os.close(fd)
    assert first == FdSetMember(0, first.fd) and first.path == "/dev/fdset/0"
    assert second.fdset == 0
    assert qmp.sent("add-fd") == [{"opaque": "disk0"}, {"fdset-id": 0}]
    await machine.devices.remove_fdset(0)
    assert qmp.fdsets == {}


async def test_a_fd_command_without_a_descriptor_is_refused(qmp: FakeQmp) -> None:
    # The fake checks what QEMU checks: getfd needs a descriptor sent with it.
    from hvstack.hypervisor.qemu.monitor import Monitor

    monitor = Monitor("vm")
    await monitor.connect(qmp.path)
    try:
        with pytest.raises(HypervisorError, match="No file descriptor supplied"):
            await monitor.execute("getfd", {"fdname": "x"})
    finally:
        await monitor.close()


async def test_removing_a_device_waits_until_the_guest_released_it(
    qmp: FakeQmp, machine: QemuMachine
) -> None:
    _unplug(qmp)
    await machine.devices.remove_device("nic1", timeout=20)
    assert qmp.sent("device_del") == [{"id": "nic1"}]


async def test_a_device_the_guest_keeps_times_out(qmp: FakeQmp, machine: QemuMachine) -> None:
    _unplug(qmp, answer=False)
    with pytest.raises(OperationTimeout, match=r"did not release device nic1 within 0\.2 s"):
        await machine.devices.remove_device("nic1", timeout=0.2)


async def test_a_device_the_guest_refuses_to_release(qmp: FakeQmp,
                                                     machine: QemuMachine) -> None:
    qmp.on("device_del", lambda args: qmp.later(qmp.emit(
        "DEVICE_UNPLUG_GUEST_ERROR", {"device": args["id"], "path": "/p"})))
    with pytest.raises(HypervisorError, match="refused to release device nic1"):
        await machine.devices.remove_device("nic1", timeout=20)


async def test_removing_an_unknown_device_is_refused(qmp: FakeQmp,
                                                     machine: QemuMachine) -> None:
    qmp.reply("device_del", QmpFailure("Device 'nic9' not found", "DeviceNotFound"))
    with pytest.raises(HypervisorError) as raised:
        await machine.devices.remove_device("nic9", timeout=20)
    assert raised.value.data["qmp_class"] == "DeviceNotFound"


# -- memory -------------------------------------------------------------------------------


async def test_balloon_target_size_and_statistics(qmp: FakeQmp, machine: QemuMachine) -> None:
    qmp.reply("query-balloon", {"actual": 512 * 2**20})
    qmp.reply("qom-get", {"stats": {
        "stat-total-memory": 1_000_000_000, "stat-free-memory": 600_000_000,
        "stat-available-memory": 700_000_000, "stat-disk-caches": 50_000_000,
        "stat-swap-in": 0, "stat-swap-out": 0, "stat-major-faults": 12,
        "stat-minor-faults": 3400, "stat-htlb-pgalloc": 2**64 - 1}, "last-update": 1_800_000_000})
    await machine.memory.set_balloon_target(512 * 2**20)
    assert await machine.memory.balloon_size() == 512 * 2**20
    await machine.memory.set_stats_interval(2)
    assert await machine.memory.balloon_stats() == BalloonStats(
        last_update=1_800_000_000, total=1_000_000_000, free=600_000_000,
        available=700_000_000, disk_caches=50_000_000, swap_in=0, swap_out=0,
        major_faults=12, minor_faults=3400)
    await machine.memory.set_memory_device_size("vmem0", 2 * 2**30)
    assert qmp.sent("balloon") == [{"value": 512 * 2**20}]
    assert qmp.sent("qom-set") == [
        {"path": "/machine/peripheral/balloon0", "property": "guest-stats-polling-interval",
         "value": 2},
        {"path": "/machine/peripheral/vmem0", "property": "requested-size",
         "value": 2 * 2**30},
    ]


async def test_memory_devices_report_plugged_and_requested_sizes(
        qmp: FakeQmp, machine: QemuMachine) -> None:
    qmp.reply("query-memory-devices", [
        {"type": "dimm", "data": {"id": "dimm0", "size": 2**30}},
        {"type": "virtio-mem", "data": {"id": "dynmem0", "memdev": "/objects/dynmem-ram",
                                        "size": 64 * 2**20, "requested-size": 128 * 2**20,
                                        "max-size": 2**30, "block-size": 2 * 2**20}}])
    assert await machine.memory.memory_devices() == {
        "dynmem0": MemoryDeviceSize(plugged=64 * 2**20, requested=128 * 2**20,
                                    maximum=2**30)}


async def test_statistics_not_reported_yet_are_none(qmp: FakeQmp,
                                                    machine: QemuMachine) -> None:
    # QEMU sends -1 as an unsigned 64-bit number.
    qmp.reply("qom-get", {"stats": {"stat-free-memory": 2**64 - 1, "stat-swap-in": -1},
                          "last-update": 0})
    assert await machine.memory.balloon_stats() == BalloonStats(last_update=0)


# -- migration ----------------------------------------------------------------------------


async def test_migration_settings_start_statistics_and_cancel(
    qmp: FakeQmp, machine: QemuMachine
) -> None:
    qmp.reply("query-migrate", {
        "status": "active", "total-time": 1200, "expected-downtime": 30, "setup-time": 4,
        "ram": {"transferred": 300, "remaining": 700, "total": 1000, "duplicate": 5,
                "normal": 70, "normal-bytes": 286720, "dirty-pages-rate": 42,
                "mbps": 812.5, "dirty-sync-count": 2}})
    migration = machine.migration
    await migration.set_capabilities({"xbzrle": False, "events": True})
    await migration.set_parameters(MigrationParameters(downtime_limit_ms=300))
    await migration.set_parameters(MigrationParameters())  # nothing to change: no command
    await migration.start("unix:/run/x/migrate.sock")
    stats = await migration.stats()
    assert stats == MigrationStats(
        status="active", total_time_ms=1200, expected_downtime_ms=30, ram_transferred=300,
        ram_remaining=700, ram_total=1000, dirty_pages_rate=42, mbps=812.5)
    assert stats.percent == 30.0 and not stats.finished
    await migration.cancel()
    assert qmp.sent("migrate-set-capabilities") == [{"capabilities": [
        {"capability": "xbzrle", "state": False}, {"capability": "events", "state": True}]}]
    assert qmp.sent("migrate-set-parameters") == [{"downtime-limit": 300}]
    assert qmp.sent("migrate") == [{"uri": "unix:/run/x/migrate.sock"}]
    assert qmp.sent("migrate_cancel") == [{}]


async def test_migration_statistics_of_a_failure(qmp: FakeQmp, machine: QemuMachine) -> None:
    qmp.reply("query-migrate", {"status": "failed", "error-desc": "Connection reset"})
    stats = await machine.migration.stats()
    assert (stats.status, stats.error, stats.finished, stats.percent) == (
        "failed", "Connection reset", True, None)


# -- block jobs -----------------------------------------------------------------------------


async def test_block_jobs_are_listed_and_cancelled(qmp: FakeQmp, machine: QemuMachine) -> None:
    qmp.reply("query-block-jobs", [{
        "device": "mirror-disk0", "type": "mirror", "len": 4096, "offset": 1024,
        "busy": True, "paused": False, "speed": 0, "io-status": "ok", "ready": False,
        "status": "running", "auto-finalize": True, "auto-dismiss": True}])
    jobs = await machine.block_jobs.jobs()
    assert jobs == [BlockJobInfo("mirror-disk0", "mirror", "running", 1024, 4096)]
    assert jobs[0].percent == 25.0
    await machine.block_jobs.cancel("mirror-disk0")
    assert qmp.sent("block-job-cancel") == [{"device": "mirror-disk0", "force": False}]


async def test_block_device_counters_come_from_query_blockstats(
    qmp: FakeQmp, machine: QemuMachine
) -> None:
    # As QEMU 7.2 answers for -device over -blockdev: a virtio device's qdev is its
    # backend's QOM path, an IDE or SCSI device's its id.
    qmp.reply("query-blockstats", [
        {"device": "", "node-name": "disk-a", "qdev":
         "/machine/peripheral/disk-a-dev/virtio-backend",
         "stats": {"rd_bytes": 512, "wr_bytes": 33554432, "rd_operations": 1}},
        {"device": "", "node-name": "disk-b", "qdev": "disk-b-dev",
         "stats": {"rd_bytes": 4096, "wr_bytes": 0}},
        {"device": "", "qdev": "dvd-dev", "stats": {}},
    ])
    assert await machine.block_jobs.io_stats() == (
        BlockIoStats("disk-a-dev", 512, 33554432), BlockIoStats("disk-b-dev", 4096, 0),
        BlockIoStats("dvd-dev", 0, 0))


async def test_a_snapshot_and_its_bitmap_are_one_transaction(
    qmp: FakeQmp, machine: QemuMachine
) -> None:
    await machine.block_jobs.snapshot([Snapshot("disk0", "disk0-snap1")],
                                      [DirtyBitmap("disk0-snap1", "replica")])
    assert qmp.sent("transaction") == [{"actions": [
        {"type": "blockdev-snapshot", "data": {"node": "disk0", "overlay": "disk0-snap1"}},
        {"type": "block-dirty-bitmap-add",
         "data": {"node": "disk0-snap1", "name": "replica", "persistent": True}},
    ]}]


async def test_an_intermediate_commit_names_the_base_by_its_path(
    qmp: FakeQmp, machine: QemuMachine
) -> None:
    await machine.block_jobs.commit("m1", "disk-a", top="disk-a-11", base="disk-a-22",
                                    backing_file="/s/base.qcow2")
    assert qmp.sent("block-commit") == [{
        "job-id": "m1", "device": "disk-a", "auto-dismiss": False, "top-node": "disk-a-11",
        "backing-file": "/s/base.qcow2", "base-node": "disk-a-22"}]


async def test_a_read_only_launch_node_is_made_writable_through_its_protocol_node(
    qmp: FakeQmp, machine: QemuMachine
) -> None:
    qmp.reply("query-named-block-nodes", [
        {"node-name": "disk-a-11", "file": "/s/a.qcow2", "ro": True, "drv": "qcow2"},
        {"node-name": "disk-a-11-file", "file": "/s/a.qcow2", "ro": True, "drv": "file"},
        {"node-name": "disk-a-22-file", "file": "/s/b.qcow2", "ro": False, "drv": "file"}])
    qmp.reply("blockdev-reopen", {})
    await machine.block_jobs.writable("disk-a-11")
    await machine.block_jobs.writable("disk-a-22")  # writable already: nothing sent
    await machine.block_jobs.writable("disk-a-33")  # no protocol node of its own
    assert qmp.sent("blockdev-reopen") == [{"options": [{
        "driver": "file", "node-name": "disk-a-11-file", "filename": "/s/a.qcow2",
        "read-only": False, "auto-read-only": True, "discard": "unmap"}]}]


async def test_a_raw_node_is_added_without_a_backing_key(qmp: FakeQmp,
                                                         machine: QemuMachine) -> None:
    from hvstack.hypervisor.capabilities import BlockNodeSpec

    qmp.reply("blockdev-add", {})
    qmp.reply("blockdev-mirror", {})
    await machine.block_jobs.add_node(BlockNodeSpec("n1", "raw", "/d/a.raw", read_only=True))
    await machine.block_jobs.add_node(BlockNodeSpec("n2", "qcow2", "/d/b.qcow2"))
    await machine.block_jobs.mirror("m", "disk0", "n2", sync="top", write_blocking=True,
                                    speed=1024)
    raw, qcow2 = qmp.sent("blockdev-add")
    assert "backing" not in raw and raw["driver"] == "raw"
    assert qcow2["backing"] is None  # null: QEMU opens no parent the header names
    assert qmp.sent("blockdev-mirror") == [{
        "job-id": "m", "device": "disk0", "target": "n2", "sync": "top",
        "auto-dismiss": False, "speed": 1024, "copy-mode": "write-blocking"}]


async def test_the_top_nodes_are_what_the_devices_have_inserted(
        qmp: FakeQmp, machine: QemuMachine) -> None:
    qmp.reply("query-block", [
        {"device": "", "qdev": "/machine/peripheral/disk-a-dev/virtio-backend",
         "inserted": {"node-name": "disk-a-1f2e3d4c", "file": "/s/a_1.qcow2"}},
        {"device": "", "qdev": "dvd-dev", "removable": True},
        {"device": "", "qdev": "disk-b-dev", "inserted": {"node-name": "disk-b"}}])
    assert await machine.block_jobs.top_nodes() == {"disk-a-1f2e3d4c", "disk-b"}
