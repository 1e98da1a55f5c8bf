"""Disk errors reported by QEMU: node names mapped back to disks, reasons as sentences."""

from __future__ import annotations

from pathlib import Path

from hvstack.compute.io_errors import io_error_reason
from hvstack.compute.lifecycle import VmFiles
from hvstack.compute.machine import BackingFile, MachineHost, machine_spec
from hvstack.compute.model import DiskAttachment, DiskBus, VmConfig
from hvstack.hypervisor.events import BlockIoError, QmpEvent
from hvstack.hypervisor.qemu.argv import block_node_paths
from hvstack.hypervisor.spec import backing_node_id, disk_node_id

FILES = VmFiles(Path("/vms/id"), Path("/run/id"))


def test_every_block_node_maps_to_its_file() -> None:
    disks = (DiskAttachment("/d/a.qcow2", DiskBus.VIRTIO),
             DiskAttachment("/d/b.raw", DiskBus.SCSI, "raw"))
    config = VmConfig(name="vm", disks=disks, dvd="/iso/x.iso")
    chains = {disks[0].id: (BackingFile("/d/base.qcow2", "qcow2"),)}
    spec = machine_spec("id", config, FILES, MachineHost("tcg", "/fw/code.fd"), chains=chains)
    nodes = block_node_paths(spec)
    a, b = (disk_node_id(d.id) for d in disks)
    base = backing_node_id(disks[0].id, "/d/base.qcow2")
    assert nodes == {a: "/d/a.qcow2", f"{a}-file": "/d/a.qcow2",
                     base: "/d/base.qcow2", f"{base}-file": "/d/base.qcow2",
                     b: "/d/b.raw", f"{b}-file": "/d/b.raw",
                     "dvd": "/iso/x.iso", "dvd-file": "/iso/x.iso"}


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
