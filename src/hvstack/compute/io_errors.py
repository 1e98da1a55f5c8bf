"""Disk errors of a running VM: what QEMU reports (``BLOCK_IO_ERROR``), told in the
user's terms, and whether a failed write means a full file system.

Contract (pure: no I/O, no state; :class:`~hvstack.compute.lifecycle.VmController`
applies the result):

- :func:`report` turns a :class:`~hvstack.hypervisor.events.BlockIoError` into an
  :class:`IoErrorReport`: the disk named by its file (QEMU names block nodes; they are
  mapped back through the machine spec the VM runs, see
  :func:`~hvstack.hypervisor.qemu.argv.block_node_paths`), the sentence for the VM's
  state reason (:func:`io_error_reason`), the fields of the ``vm.io-error`` event, and
  whether QEMU is pausing the VM (the disk's error action "stop"; BLOCK_IO_ERROR comes
  before the STOP it causes, so the controller marks the VM Paused with this reason).
- :func:`no_space`: whether an error from writing a file (the memory state of a save)
  means its file system is full (ENOSPC, or EDQUOT for a quota).
"""

from __future__ import annotations

import errno
from collections.abc import Mapping
from dataclasses import dataclass

from hvstack.hypervisor.events import BlockIoError
from hvstack.hypervisor.qemu.argv import block_node_paths
from hvstack.hypervisor.spec import MachineSpec


@dataclass(frozen=True)
class IoErrorReport:
    disk: str  # the file, or QEMU's node name when no disk of the spec has it
    reason: str
    event: Mapping[str, object]  # the vm.io-error event's fields beyond the VM's own
    pauses: bool


def report(error: BlockIoError, spec: MachineSpec) -> IoErrorReport:
    node = error.node_name or error.device
    disk = block_node_paths(spec).get(node, node)
    event = {"disk": disk, "operation": error.operation, "action": error.action,
             "nospace": error.nospace, "error": error.reason}
    return IoErrorReport(disk, io_error_reason(error, disk), event, error.action == "stop")


def io_error_reason(error: BlockIoError, disk: str) -> str:
    """The state reason for a disk error: which disk, what failed, and why.

    >>> io_error_reason(BlockIoError("disk1", "", "write", "stop", True,
    ...                              "No space left on device"), "/srv/data.qcow2")
    'paused: disk /srv/data.qcow2 is full (write failed: No space left on device)'
    """
    what = f"{error.operation} failed: {error.reason or 'I/O error'}"
    problem = f"is full ({what})" if error.nospace else f"has an I/O error ({what})"
    prefix = "paused: " if error.action == "stop" else ""
    return f"{prefix}disk {disk or '(unknown)'} {problem}"


def no_space(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
