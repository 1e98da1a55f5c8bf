"""After a restart: a live checkpoint that a killed service took but did not record.

A checkpoint of a running VM puts new overlays on top of its disks in QEMU, then stores
the tree and the disks' new paths. A service killed between the two leaves QEMU writing
each disk's overlay O (whose header names the recorded file P as its parent) while the
store still names P: the VM's next start would open P and lose what the guest wrote
since. At startup (before pending merges are finished), each running VM is checked:
for each writable disk whose recorded file P has, among the files QEMU's devices read
and write now (the tops of their chains), an overlay O beside it (a checkpoint's name
for it, its header naming P) that nothing records, O becomes the disk's path and a
disks-only checkpoint "Recovered checkpoint - VM - (time)" names P, which holds the disk
as it was at that moment.

:func:`unrecorded_overlays` is the decision, pure; :func:`adopt_unrecorded` reads what
it needs (QEMU's open files, the candidates' qcow2 headers), stores the repair, and
logs it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from pathlib import Path, PurePath
from typing import TYPE_CHECKING

from hvstack.checkpoints.files import overlay_stem
from hvstack.checkpoints.model import (
    Checkpoint,
    CheckpointKind,
    CheckpointTree,
    default_name,
    new_checkpoint_id,
)
from hvstack.compute.lifecycle import VmController
from hvstack.compute.model import DiskAttachment
from hvstack.errors import HvError
from hvstack.storage.qcow2_header import read_links

if TYPE_CHECKING:
    from hvstack.host.checkpoint_ops import CheckpointOperations

log = logging.getLogger(__name__)

RECOVERED = "Recovered checkpoint"


def unrecorded_overlays(disks: Iterable[DiskAttachment], open_files: Iterable[str],
                        parent_of: Callable[[str], str | None],
                        recorded: frozenset[str]) -> dict[str, str]:
    """For each writable disk, the overlay QEMU writes in place of the recorded file:
    a file on top of a device's chain (``open_files``) beside it, named as a checkpoint
    names overlays of it, whose header (``parent_of``) names it, and that ``recorded``
    (every file the store names) lacks. Disk id -> overlay path."""
    files = sorted(set(open_files))
    found: dict[str, str] = {}
    for disk in disks:
        if disk.read_only:
            continue
        recorded_path = PurePath(disk.path)
        for path in files:
            candidate = PurePath(path)
            if (path in recorded or candidate.parent != recorded_path.parent
                    or candidate.suffix != ".qcow2" or candidate.stem == recorded_path.stem
                    or overlay_stem(path) != overlay_stem(disk.path)):
                continue
            if parent_of(path) == disk.path:
                found[disk.id] = path
                break
    return found


def _parent(path: str) -> str | None:
    links = read_links(Path(path))
    return None if links is None else links.backing_file


def repaired(tree: CheckpointTree, vm_name: str, config_json: str,
             overlays: Mapping[str, str], disks: Iterable[DiskAttachment],
             when: float) -> tuple[CheckpointTree, tuple[DiskAttachment, ...]]:
    """The tree with the recovered checkpoint, and the disks on their overlays."""
    disks = tuple(disks)
    frozen = {d.id: d.path for d in disks if d.id in overlays}
    name = f"{RECOVERED} - {default_name(vm_name, when)}"
    while any(c.name == name for c in tree.checkpoints):
        name += " (again)"
    checkpoint = Checkpoint(new_checkpoint_id(), name, None, when, CheckpointKind.PRODUCTION,
                            frozen, config_json)
    moved = tuple(replace(d, path=overlays[d.id], format="qcow2") if d.id in overlays else d
                  for d in disks)
    return tree.added(checkpoint, overlays.values()), moved


async def adopt_unrecorded(ops: CheckpointOperations, vm: VmController) -> bool:
    """Record the overlays QEMU writes that the store lacks (see the module doc);
    whether something was repaired. Errors are logged: the service starts anyway."""
    if not vm.machine_running:
        return False
    try:
        jobs = vm.running_machine().block_jobs
        nodes, tops = await jobs.node_files(), await jobs.top_nodes()
        open_files = [path for node, path in nodes.items() if node in tops]
        async with vm.lock:
            tree = await ops.tree_of(vm)
            config = vm.record.config
            recorded = (tree.made | tree.referenced_files() | tree.bases
                        | {d.path for d in config.disks})
            overlays = unrecorded_overlays(config.disks, open_files, _parent, recorded)
            if not overlays:
                return False
            tree, disks = repaired(tree, vm.record.name, config.to_json(), overlays,
                                   config.disks, time.time())
            await ops.store(vm, tree, replace(config, disks=disks))
    except HvError as exc:
        log.error("VM %s: cannot check its disks for an unrecorded checkpoint: %s",
                  vm.record.name, exc)
        return False
    log.warning("VM %s: a checkpoint taken before the service stopped was not recorded; "
                "its disks now continue on %s, and the checkpoint %r keeps what they held",
                vm.record.name, ", ".join(sorted(overlays.values())),
                tree.checkpoints[-1].name)
    ops.service.events.publish("vm.checkpoint-recovered", vm=vm.record.name,
                               checkpoint=tree.checkpoints[-1].name)
    return True
