"""Disk errors reported by QEMU: node names mapped back to disks, reasons as sentences."""

from __future__ import annotations

from hvstack.compute.lifecycle import io_error_reason
from hvstack.compute.model import DiskAttachment, DiskBus, VmConfig
from hvstack.hypervisor.events import BlockIoError, QmpEvent
from hvstack.hypervisor.qemu.argv import QemuSpec, RuntimePaths, block_node_paths, disk_node

PATHS = RuntimePaths("q", "s", "l", "g", "p", "v")


def test_every_block_node_maps_to_its_file() -> None:
    disks = (DiskAttachment("/d/a.qcow2", DiskBus.VIRTIO),
             DiskAttachment("/d/b.raw", DiskBus.SCSI, "raw"))
    config = VmConfig(name="vm", disks=disks, dvd="/iso/x.iso")
    nodes = block_node_paths(QemuSpec("id", config, "tcg", PATHS))
    a, b = (disk_node(d) for d in disks)
    assert nodes == {a: "/d/a.qcow2", f"{a}-file": "/d/a.qcow2",
                     b: "/d/b.raw", f"{b}-file": "/d/b.raw",
                     "dvd0": "/iso/x.iso", "dvd0-file": "/iso/x.iso"}


def test_a_block_io_error_is_read_from_its_event() -> None:
    event = QmpEvent("BLOCK_IO_ERROR", {"device": "", "node-name": "disk1", "operation": "read",
                                        "action": "report", "nospace": False,
                                        "reason": "Input/output error"})
    error = BlockIoError.of(event)
    assert error == BlockIoError("disk1", "", "read", "report", False, "Input/output error")
    assert io_error_reason(error, "/d/b.raw") == (
        "disk /d/b.raw has an I/O error (read failed: Input/output error)")
    assert BlockIoError.of(QmpEvent("BLOCK_IO_ERROR", {"node-name": "disk1"})) is None


def test_a_full_disk_that_stops_the_vm() -> None:
    error = BlockIoError("disk0", "", "write", "stop", True, "No space left on device")
    assert io_error_reason(error, "/d/a.qcow2") == (
        "paused: disk /d/a.qcow2 is full (write failed: No space left on device)")


def test_event_timestamps_come_from_qemu() -> None:
    event = QmpEvent.from_message({"event": "STOP",
                                   "timestamp": {"seconds": 1700000000, "microseconds": 500000}})
    assert (event.name, dict(event.data), event.timestamp) == ("STOP", {}, 1700000000.5)
