"""The file work of exports and imports: which disk files a VM has, copying them, and
pointing a copied qcow2 file at its copied parent.

* :func:`gather` lists every disk file an export needs: each disk's current file, each
  checkpoint's files, and the parents of all of them, each read with
  :func:`hvstack.storage.chain.read_chain` (format from hvstack's record, never probed;
  every parent confined to the storage roots and checked against the service's own
  files), parents before children, each file once.
* :func:`copy_file` copies a file sparsely (:mod:`hvstack.storage.file_copy`),
  reporting bytes; cancelling the awaiting task stops the copy and removes the partial
  file. Headers are repointed and overlays made with :mod:`hvstack.storage.overlay`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from hvstack.checkpoints.model import CheckpointTree
from hvstack.compute.model import VmConfig
from hvstack.storage import chain, file_copy
from hvstack.storage.qemu_img import QUICK_TIMEOUT


@dataclass(frozen=True)
class Source:
    """A disk file to export. ``active``: the current file of a writable disk (the one
    a running guest writes), with that disk's id."""

    path: Path
    format: str
    parent: Path | None = None
    parent_format: str | None = None
    active: bool = False
    disk_id: str = ""


def _checkpoint_formats(tree: CheckpointTree) -> dict[str, str]:
    """The recorded format of each checkpoint file, from the settings each checkpoint
    recorded (their disk paths are the frozen files)."""
    found: dict[str, str] = {}
    for checkpoint in tree.checkpoints:
        if checkpoint.config:
            for disk in VmConfig.from_json(checkpoint.config).disks:
                found.setdefault(disk.path, disk.format)
    return found


async def gather(config: VmConfig, tree: CheckpointTree, roots: Sequence[Path],
                 guard: Callable[[Path], object],
                 format_of: Callable[[Path], str]) -> list[Source]:
    """Every disk file of the VM and its checkpoints, parents first. ``format_of``
    gives the format of a checkpoint file no checkpoint's settings record."""
    tops: list[tuple[Path, str, bool, str]] = [
        (Path(d.path), d.format, not d.read_only, d.id) for d in config.disks]
    recorded = _checkpoint_formats(tree)
    for checkpoint in tree.checkpoints:
        for disk_id, path in checkpoint.disks.items():
            fmt = recorded.get(path) or format_of(Path(path))
            tops.append((Path(path), fmt, False, disk_id))
    found: dict[Path, Source] = {}
    order: list[Path] = []
    for top, fmt, active, disk_id in tops:
        members = await chain.read_chain(top, fmt, roots=roots, guard=guard,
                                         timeout=QUICK_TIMEOUT, headers=True)
        for i, member in reversed(list(enumerate(members))):
            parent = members[i + 1] if i + 1 < len(members) else None
            is_active = active and i == 0
            known = found.get(member.path)
            if known is not None:
                if is_active and not known.active:
                    found[member.path] = Source(known.path, known.format, known.parent,
                                                known.parent_format, True, disk_id)
                continue
            found[member.path] = Source(member.path, member.format,
                                        parent.path if parent else None,
                                        parent.format if parent else None, is_active,
                                        disk_id if is_active else "")
            order.append(member.path)
    return [found[p] for p in order]


async def copy_file(src: Path, dst: Path, on_bytes: Callable[[int], None]) -> None:
    """Copy ``src`` to the new file ``dst`` (holes kept), calling ``on_bytes(n)`` with
    each block's size as blocks go."""
    copied = 0

    def report(done: int) -> None:
        nonlocal copied
        on_bytes(done - copied)
        copied = done

    await file_copy.copy_in_thread(src, dst, progress=report)
    shutil.copymode(src, dst)


def disk_bytes(paths: Sequence[Path]) -> int:
    """The space the files take (their allocated blocks)."""
    total = 0
    for path in paths:
        with contextlib.suppress(OSError):
            total += os.stat(path).st_blocks * 512
    return total
