"""The host's view of its disks: which paths may be disks, who uses each, and the
checked backing chains a VM starts with.

:class:`DiskUse` gathers what the pure rule :func:`hvstack.storage.usage.check_use`
needs (every VM's attachments, the child-to-parent links under the storage roots, the
images folder) and applies it; the service, the disk operations and VM deletion all
ask it, so "in use" means one thing everywhere. It also confines a user's path and
refuses the service's own files (:func:`hvstack.storage.paths.check_disk_file`).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Protocol

from hvstack.compute.machine import BackingFile
from hvstack.compute.model import VmRecord, VmState
from hvstack.host.config import HostConfig
from hvstack.storage import chain, formats, usage
from hvstack.storage.paths import check_disk_file, confine
from hvstack.storage.qemu_img import QUICK_TIMEOUT


class _Vm(Protocol):
    @property
    def record(self) -> VmRecord: ...
    @property
    def state(self) -> VmState: ...


INLINE_SCAN = 0.002
"""A parents scan whose last run took at most this many seconds runs on the event
loop: a thread hop costs a VM start about 2 ms under load, more than a small scan
(about 0.1 ms for a few disks). A larger tree goes back to a thread after one scan."""


class DiskUse:
    def __init__(self, config: HostConfig, vms: Callable[[], Iterable[_Vm]]) -> None:
        self._config = config
        self._vms = vms
        self.roots: Sequence[Path] = config.storage_roots
        self._scan_took = math.inf  # the last parents scan, in seconds

    def guard(self, path: Path) -> Path:
        """Refuse the service's own files as disks (PathNotAllowed)."""
        return check_disk_file(path, self._config.data_dir, self._config.run_dir)

    def confine(self, path: str, *, must_exist: bool, what: str = "disk") -> Path:
        """A user's path, resolved inside the roots, that may be a disk."""
        resolved = confine(path, self.roots, must_exist=must_exist, what=what)
        return check_disk_file(resolved, self._config.data_dir, self._config.run_dir, what=what)

    def attachments(self, *, but_vm: str | None = None) -> list[usage.Attached]:
        return [
            usage.Attached(Path(d.path), vm.record.name, vm.record.id, vm.state.value)
            for vm in self._vms() if vm.record.id != but_vm
            for d in vm.record.config.disks
        ]

    def recorded_format(self, path: Path) -> str | None:
        """The format hvstack recorded for ``path`` when a VM got it, if one has it."""
        for vm in self._vms():
            for disk in vm.record.config.disks:
                if Path(disk.path) == path:
                    return disk.format
        return None

    def format_of(self, path: Path, fmt: str | None) -> str:
        """The format to open ``path`` in: the user's (checked against the name), else
        the one recorded for an attached disk, else the name's. Never probed."""
        if fmt is None and (recorded := self.recorded_format(path)) is not None:
            return recorded
        return formats.format_for(path, fmt)

    async def parents(self, *, but_vm: str | None = None) -> dict[Path, Path]:
        """Child-to-parent links: qcow2 files under the roots and attached qcow2 disks
        (a raw disk's bytes are its guest's, so never read as a header)."""
        attached = [Path(d.path) for vm in self._vms() if vm.record.id != but_vm
                    for d in vm.record.config.disks if d.format == "qcow2"]

        def scan() -> dict[Path, Path]:
            began = time.perf_counter()
            links = usage.scan_parents(self.roots, attached, [self._config.run_dir])
            self._scan_took = time.perf_counter() - began
            return links

        if self._scan_took > INLINE_SCAN:
            return await asyncio.to_thread(scan)
        return scan()

    async def check(self, path: Path, operation: usage.Operation, *,
                    vm_id: str | None = None, child: Path | None = None) -> None:
        """Raise ResourceBusy if ``operation`` may not touch ``path`` now."""
        usage.check_use(path, operation, self.attachments(), await self.parents(),
                        images_dir=self._config.images_dir, vm_id=vm_id, child=child)

    async def chains(self, record: VmRecord) -> dict[str, tuple[BackingFile, ...]]:
        """Each disk's parents, checked (roots, the service's files, formats from the
        headers hvstack trusts), read with the format recorded for the disk."""
        result: dict[str, tuple[BackingFile, ...]] = {}
        for disk in record.config.disks:
            # Only the links matter here: qcow2 headers are read in Python, not by one
            # qemu-img process per member (about 6 ms each, on every start).
            members = await chain.read_chain(Path(disk.path), disk.format, roots=self.roots,
                                             guard=self.guard, timeout=QUICK_TIMEOUT,
                                             headers=True)
            result[disk.id] = tuple(BackingFile(str(m.path), m.format) for m in members[1:])
        return result

    def check_start(self, record: VmRecord, parents: dict[Path, Path],
                    chains: dict[str, tuple[BackingFile, ...]]) -> None:
        """The start rule for each disk and the read rule for each parent, against the
        attachments of this moment (no await: the caller changes state right after)."""
        attachments = self.attachments()
        images = self._config.images_dir
        for disk in record.config.disks:
            usage.check_use(Path(disk.path), "start", attachments, parents,
                            images_dir=images, vm_id=record.id)
            for parent in chains.get(disk.id, ()):
                usage.check_use(Path(parent.path), "read", attachments, {},
                                images_dir=images, vm_id=record.id)
