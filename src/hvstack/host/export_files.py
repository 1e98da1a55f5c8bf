"""The file work of exports and imports: which disk files a VM has, copying them, and
pointing a copied qcow2 file at its copied parent.

* :func:`gather` lists every disk file an export needs: each disk's current file, each
  checkpoint's files, and the parents of all of them, each read with
  :func:`hvstack.storage.chain.read_chain` (format from hvstack's record, never probed;
  every parent confined to the storage roots and checked against the service's own
  files), parents before children, each file once.
* :func:`copy_file` copies a file sparsely (all-zero blocks become holes) in a thread,
  reporting bytes; cancelling the awaiting task stops the copy (the partial file is
  the caller's to delete).
* :func:`repoint` sets the parent name in a qcow2 header (``qemu-img rebase -u``, with
  the formats given: nothing is opened but the file itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from hvstack.checkpoints.model import CheckpointTree
from hvstack.compute.model import VmConfig
from hvstack.errors import Cancelled
from hvstack.storage import chain
from hvstack.storage.qemu_img import QUICK_TIMEOUT, run_qemu_img

CHUNK = 4 * 1024 * 1024


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


def _copy(src: Path, dst: Path, stop: threading.Event, report: Callable[[int], None]) -> None:
    with open(src, "rb") as reader, open(dst, "xb") as writer:
        total = 0
        while chunk := reader.read(CHUNK):
            if stop.is_set():
                raise Cancelled(f"the copy of {src} was cancelled")
            if chunk.count(0) == len(chunk):
                writer.seek(len(chunk), os.SEEK_CUR)
            else:
                writer.write(chunk)
            total += len(chunk)
            report(len(chunk))
        writer.truncate(total)
        writer.flush()
        os.fsync(writer.fileno())
    shutil.copymode(src, dst)


async def copy_file(src: Path, dst: Path, on_bytes: Callable[[int], None]) -> None:
    """Copy ``src`` to the new file ``dst`` (holes kept), calling ``on_bytes(n)`` on the
    loop as blocks go."""
    stop = threading.Event()
    loop = asyncio.get_running_loop()

    def report(count: int) -> None:
        loop.call_soon_threadsafe(on_bytes, count)

    task = asyncio.ensure_future(asyncio.to_thread(_copy, src, dst, stop, report))
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        stop.set()
        with contextlib.suppress(BaseException):
            await task
        raise


def link_or_copy(src: Path, dst: Path) -> None:
    """A hard link of ``src`` at ``dst``, a copy where the file system refuses links."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


async def repoint(path: Path, parent_name: str, parent_format: str) -> None:
    """Make the qcow2 file ``path`` name ``parent_name`` (in ``parent_format``) as its
    parent, without reading or checking the parent."""
    await run_qemu_img(["rebase", "-u", "-f", "qcow2", "-F", parent_format, "-b", parent_name,
                        "--", str(path)])


async def virtual_size(path: Path, fmt: str) -> int:
    """The virtual size of ``path`` opened as ``fmt`` (``-U``: a running VM holds it)."""
    info = await chain.info_one(path, fmt, QUICK_TIMEOUT)
    size = info.get("virtual-size")
    if not isinstance(size, int):
        raise ValueError(f"qemu-img info gives no virtual size for {path}")
    return size


async def create_overlay(path: Path, size: int, parent_name: str | None,
                         parent_format: str | None, fmt: str = "qcow2") -> None:
    """A new empty ``fmt`` file of ``size`` bytes; with a parent, a qcow2 file naming
    ``parent_name`` (``-u``: the parent is not opened)."""
    args = ["create", "-f", fmt]
    if parent_name is not None and parent_format is not None:
        args += ["-F", parent_format, "-b", parent_name, "-u"]
    await run_qemu_img([*args, "--", str(path), str(size)])


def disk_bytes(paths: Sequence[Path]) -> int:
    """The space the files take (their allocated blocks)."""
    total = 0
    for path in paths:
        with contextlib.suppress(OSError):
            total += os.stat(path).st_blocks * 512
    return total
