"""Virtual disks: create, inspect, resize, convert, merge, compact and delete.

Hyper-V's three kinds of virtual disk map onto QEMU formats as follows:

* fixed: raw, fully allocated (``preallocation=falloc``); an imported fixed VHD/VHDX;
* dynamic: qcow2, dynamic VHDX or VHD, without a backing file;
* differencing: qcow2 with a backing file (its parent); qemu-img writes no VHD/VHDX
  with a parent.

A disk's format is the one its extension names, or the one the caller passes; never
one probed from its bytes (:mod:`hvstack.storage.formats`).

Contract, for every operation here:

* paths are absolute and already confined (:func:`hvstack.storage.paths.confine`).
  Every operation reads a disk's chain member by member
  (:func:`hvstack.storage.chain.read_chain`) and takes ``roots`` and ``guard``: when
  given, every disk of the chain must lie inside the roots and pass the guard (a disk
  whose header names ``/etc/shadow`` as its parent is
  :class:`~hvstack.errors.PathNotAllowed`). The host passes its storage roots and a
  guard that refuses its own files;
* formats are passed to qemu-img explicitly wherever they are known, and backing
  files with ``-b``/``-B`` and ``-F``, never inside an ``-o`` string;
* a new file is written under a hidden temporary name in the destination's folder
  (``.NAME.XXXXXXXX.hvtmp``) and linked into place only when complete, without ever
  replacing a file that appeared meanwhile (:class:`~hvstack.errors.AlreadyExists`).
  A failure, a timeout or a cancellation (qemu-img is killed, ``CancelledError``
  re-raised) removes the temporary file and leaves the destination untouched;
* long operations (convert, merge, compact) take ``progress``, called with 0..100 and
  with 100 on success, and a ``timeout`` in seconds;
* qemu-img's image locks make operations that modify a disk fail with
  :class:`~hvstack.errors.ResourceBusy` while a VM has it open; :func:`inspect_disk`
  uses ``-U`` (force-share) so it works on disks of running VMs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import struct
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, get_args

from hvstack import files
from hvstack.errors import (
    AlreadyExists,
    HypervisorError,
    InsufficientResources,
    InvalidInput,
    NotFound,
    ResourceBusy,
)
from hvstack.storage.chain import Guard, Json, Member, read_chain, text_field
from hvstack.storage.formats import DIFFERENCING_FORMATS, format_for, user_name
from hvstack.storage.paths import confine
from hvstack.storage.qemu_img import LONG_TIMEOUT, QUICK_TIMEOUT, ProgressFn, run_qemu_img
from hvstack.units import MAX_SIZE, format_size

log = logging.getLogger(__name__)

DiskKind = Literal["fixed", "dynamic", "differencing"]
DISK_KINDS: tuple[str, ...] = get_args(DiskKind)
TargetFormat = Literal["qcow2", "raw", "vhdx", "vhd"]
TARGET_FORMATS: tuple[str, ...] = get_args(TargetFormat)
SECTOR = 512

_CREATE_OPTIONS = {
    "qcow2": [],
    "raw": [],
    "vhdx": ["-o", "subformat=dynamic"],
    "vpc": ["-o", "subformat=dynamic,force_size=on"],
}


@dataclass(frozen=True)
class DiskInfo:
    """What ``qemu-img info`` says about a disk, in Hyper-V's terms."""

    path: Path
    format: str
    """QEMU's format name: raw, qcow2, vhdx, vpc (VHD), ..."""
    kind: DiskKind
    virtual_size: int
    actual_size: int
    backing_file: str | None = None
    """The parent's full path, for a differencing disk."""
    backing_format: str | None = None
    chain: tuple[Path, ...] = ()
    """This disk, its parent, ... down to the base."""
    chain_formats: tuple[str, ...] = ()
    """The format of each member of ``chain``."""
    cluster_size: int | None = None
    actual_size_before: int | None = None
    """For :func:`compact_disk`: the bytes the disk took before compaction."""

    @property
    def parent(self) -> Path | None:
        return self.chain[1] if len(self.chain) > 1 else None

    def to_dict(self) -> dict[str, str | int | list[str] | None]:
        """Return the info as JSON-safe values."""
        return {
            "path": str(self.path),
            "format": self.format,
            "kind": self.kind,
            "virtual_size": self.virtual_size,
            "actual_size": self.actual_size,
            "backing_file": self.backing_file,
            "backing_format": self.backing_format,
            "chain": [str(p) for p in self.chain],
            "chain_formats": list(self.chain_formats),
            "cluster_size": self.cluster_size,
            "actual_size_before": self.actual_size_before,
        }


# -- checks -------------------------------------------------------------------------------


def _check_size(size: int, *, what: str = "size") -> int:
    if isinstance(size, bool) or not isinstance(size, int):
        raise InvalidInput(f"{what} must be a whole number of bytes, not {size!r}")
    if size <= 0:
        raise InvalidInput(f"{what} must be larger than 0 bytes", size=size)
    if size % SECTOR:
        raise InvalidInput(
            f"{what} {size} bytes is not a multiple of {SECTOR} bytes (one sector)", size=size
        )
    if size > MAX_SIZE:
        raise InvalidInput(f"{what} {size} bytes is too large", size=size)
    return size


def _check_free(folder: Path, needed: int, *, what: str) -> None:
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise InsufficientResources(
            f"{what} needs {format_size(needed)} but only {format_size(free)} is free in "
            f"'{folder}'",
            required=needed,
            available=free,
            path=str(folder),
        )


def _check_existing(path: Path, *, what: str = "disk") -> None:
    if not path.exists():
        raise NotFound(f"{what} '{path}' does not exist", path=str(path))
    if not path.is_file():
        raise InvalidInput(f"{what} '{path}' is not a file", path=str(path))


def _check_new(path: Path) -> None:
    if os.path.lexists(path):
        raise AlreadyExists(f"'{path}' already exists; choose another name", path=str(path))
    if not path.parent.is_dir():
        raise NotFound(f"folder '{path.parent}' does not exist", path=str(path.parent))


# -- temporary files ----------------------------------------------------------------------


# The cleanup at start-up recognises these names (see :mod:`hvstack.host.cleanup`).
_temp_path = files.temp_path


# -- VHD and VHDX headers (qemu-img does not report their subformat) -----------------------

_VHD_TYPES: dict[int, DiskKind] = {2: "fixed", 3: "dynamic", 4: "differencing"}
_VHDX_REGION_TABLE = 192 * 1024
_VHDX_METADATA_REGION = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E").bytes_le
_VHDX_FILE_PARAMETERS = uuid.UUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B").bytes_le


def vhd_kind(path: Path) -> DiskKind | None:
    """Return the disk type in a VHD's footer, or None if it has no valid footer."""
    with open(path, "rb") as f:  # the footer at the end is authoritative for every type
        f.seek(max(0, os.fstat(f.fileno()).st_size - SECTOR))
        footer = f.read(SECTOR)
    if len(footer) < SECTOR or not footer.startswith(b"conectix"):
        return None
    (disk_type,) = struct.unpack_from(">I", footer, 60)
    return _VHD_TYPES.get(disk_type)


def vhdx_kind(path: Path) -> DiskKind | None:
    """Return the kind a VHDX's file parameters declare, or None if unreadable."""
    with open(path, "rb") as f:
        if f.read(8) != b"vhdxfile":
            return None
        f.seek(_VHDX_REGION_TABLE)
        table = f.read(64 * 1024)
        if len(table) < 16 or table[:4] != b"regi":
            return None
        (count,) = struct.unpack_from("<I", table, 8)
        region: tuple[int, int] | None = None
        for index in range(min(count, (len(table) - 16) // 32)):
            guid, offset, length = struct.unpack_from("<16sQI", table, 16 + 32 * index)
            if guid == _VHDX_METADATA_REGION:
                region = (offset, length)
        if region is None:
            return None
        f.seek(region[0])
        metadata = f.read(min(region[1], 64 * 1024))
        if len(metadata) < 32 or metadata[:8] != b"metadata":
            return None
        (entries,) = struct.unpack_from("<H", metadata, 10)
        for index in range(min(entries, (len(metadata) - 32) // 32)):
            guid, offset, _length = struct.unpack_from("<16sII", metadata, 32 + 32 * index)
            if guid == _VHDX_FILE_PARAMETERS:
                f.seek(region[0] + offset)
                params = f.read(8)
                if len(params) < 8:
                    return None
                (bits,) = struct.unpack_from("<I", params, 4)
                if bits & 2:
                    return "differencing"
                return "fixed" if bits & 1 else "dynamic"
    return None


def _kind(path: Path, fmt: str, backing: str | None) -> DiskKind:
    if backing:
        return "differencing"
    if fmt == "raw":
        return "fixed"
    if fmt in ("vpc", "vhdx"):
        try:
            found = vhd_kind(path) if fmt == "vpc" else vhdx_kind(path)
        except OSError as exc:
            log.warning("cannot read the %s header of %s: %s", fmt, path, exc)
            found = None
        return found or "dynamic"
    return "dynamic"


# -- inspect ------------------------------------------------------------------------------


def _int(entry: Json, key: str) -> int | None:
    value = entry.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _info_from_chain(path: Path, members: list[Member]) -> DiskInfo:
    top = members[0].info
    fmt = members[0].format
    backing = str(members[1].path) if len(members) > 1 else None
    actual = _int(top, "actual-size")
    if actual is None:
        actual = os.stat(path).st_blocks * 512
    return DiskInfo(
        path=path,
        format=fmt,
        kind=_kind(path, fmt, backing),
        virtual_size=_int(top, "virtual-size") or 0,
        actual_size=actual,
        backing_file=backing,
        backing_format=members[1].format if backing else None,
        chain=tuple(m.path for m in members),
        chain_formats=tuple(m.format for m in members),
        cluster_size=_int(top, "cluster-size"),
    )


async def inspect_disk(
    path: Path,
    *,
    format: str | None = None,
    roots: Sequence[Path] | None = None,
    guard: Guard | None = None,
    timeout: float = QUICK_TIMEOUT,
) -> DiskInfo:
    """Return what ``path`` is, opened as ``format`` (default: as its extension says;
    never probed). Its chain is read member by member and checked
    (:func:`hvstack.storage.chain.read_chain`) against ``roots`` and ``guard``.
    """
    fmt = format or format_for(path)
    return _info_from_chain(path, await read_chain(path, fmt, roots=roots, guard=guard,
                                                   timeout=timeout))


# -- create, resize -----------------------------------------------------------------------


def _create_args(path: Path, fmt: str, kind: DiskKind) -> list[str]:
    """qemu-img create options for a fixed or dynamic disk of ``fmt``."""
    options = {
        ("raw", "fixed"): ["-o", "preallocation=falloc"],
        ("qcow2", "dynamic"): [],
        ("vhdx", "fixed"): ["-o", "subformat=fixed"],
        ("vhdx", "dynamic"): ["-o", "subformat=dynamic"],
        ("vpc", "fixed"): ["-o", "subformat=fixed,force_size=on"],
        ("vpc", "dynamic"): ["-o", "subformat=dynamic,force_size=on"],
    }.get((fmt, kind))
    if options is None:
        hint = "a raw disk is always fixed" if fmt == "raw" else "a qcow2 disk is dynamic"
        raise InvalidInput(
            f"cannot create a {kind} disk in {user_name(fmt)} format ('{path.name}'): {hint}; "
            "fixed disks are raw, vhdx or vhd",
            path=str(path),
            format=user_name(fmt),
        )
    return ["create", "-q", "-f", fmt, *options]


async def create_disk(
    path: Path,
    size_bytes: int | None,
    kind: DiskKind,
    parent: Path | None = None,
    *,
    fmt: str | None = None,
    parent_format: str | None = None,
    roots: Sequence[Path] | None = None,
    guard: Guard | None = None,
    timeout: float = QUICK_TIMEOUT,
) -> DiskInfo:
    """Create a new disk of ``kind`` at ``path``; a differencing disk needs ``parent``.

    The format is ``path``'s extension's unless ``fmt`` says it (see
    :func:`hvstack.storage.formats.format_for`); the parent's is its extension's unless
    ``parent_format`` says it. A differencing disk's size defaults to its parent's and
    may not be smaller.
    """
    if kind not in DISK_KINDS:
        raise InvalidInput(f"disk kind {kind!r} is not one of {', '.join(DISK_KINDS)}")
    target = format_for(path, fmt)
    _check_new(path)
    args: list[str]
    if kind == "differencing":
        if target not in DIFFERENCING_FORMATS:
            raise InvalidInput(
                f"a differencing disk is a qcow2 file (qemu-img cannot write a "
                f"{user_name(target)} with a parent); name it {path.stem}.qcow2",
                path=str(path),
            )
        if parent is None:
            raise InvalidInput("a differencing disk needs a parent disk", path=str(path))
        if roots is not None:
            confine(parent, roots, what="parent disk")
        _check_existing(parent, what="parent disk")
        base = await inspect_disk(parent, format=parent_format, roots=roots, guard=guard,
                                  timeout=timeout)
        size = base.virtual_size if size_bytes is None else _check_size(size_bytes)
        if size < base.virtual_size:
            raise InvalidInput(
                f"a differencing disk cannot be smaller than its parent "
                f"({format_size(base.virtual_size)})",
                size=size,
                parent_size=base.virtual_size,
            )
        args = ["create", "-q", "-f", "qcow2", "-b", str(parent), "-F", base.format]
    else:
        if parent is not None:
            raise InvalidInput(f"a {kind} disk has no parent; create a differencing disk")
        if size_bytes is None:
            raise InvalidInput(f"a {kind} disk needs a size", path=str(path))
        size = _check_size(size_bytes)
        args = _create_args(path, target, kind)
        if kind == "fixed":
            _check_free(path.parent, size, what=f"a fixed disk of {format_size(size)}")

    async def write(tmp: Path) -> None:
        await run_qemu_img([*args, "--", str(tmp), str(size)], timeout=timeout)

    await files.write_new(path, write)
    log.info("created %s %s disk %s (%s)", kind, target, path, format_size(size))
    return await inspect_disk(path, format=target, roots=roots, guard=guard)


async def resize_disk(
    path: Path,
    size_bytes: int,
    *,
    allow_shrink: bool = False,
    format: str | None = None,
    roots: Sequence[Path] | None = None,
    guard: Guard | None = None,
    timeout: float = QUICK_TIMEOUT,
) -> DiskInfo:
    """Set the virtual size of ``path``; shrinking needs ``allow_shrink`` (it loses data)."""
    info = await inspect_disk(path, format=format, roots=roots, guard=guard, timeout=timeout)
    size = _check_size(size_bytes)
    if size == info.virtual_size:
        return info
    if info.format not in ("raw", "qcow2"):
        raise InvalidInput(
            f"qemu-img cannot resize a {info.format} disk; convert it to qcow2 first",
            path=str(path),
            format=info.format,
        )
    args = ["resize", "-q", "-f", info.format]
    if size < info.virtual_size:
        if not allow_shrink:
            raise InvalidInput(
                f"cannot shrink '{path}' from {format_size(info.virtual_size)} to "
                f"{format_size(size)} without --allow-shrink: shrinking loses the data "
                "beyond the new end; shrink the partitions in the guest first",
                path=str(path),
                size=size,
                virtual_size=info.virtual_size,
            )
        args.append("--shrink")
    elif info.kind == "fixed":
        _check_free(path.parent, size - info.virtual_size, what="growing a fixed disk")
        args.append("--preallocation=falloc")
    await run_qemu_img([*args, "--", str(path), str(size)], timeout=timeout)
    log.info("resized %s from %d to %d bytes", path, info.virtual_size, size)
    return await inspect_disk(path, format=info.format, timeout=timeout)


# -- convert, merge, compact --------------------------------------------------------------


async def convert_disk(
    src: Path,
    dst: Path,
    fmt: str | None = None,
    progress: ProgressFn | None = None,
    *,
    src_format: str | None = None,
    roots: Sequence[Path] | None = None,
    guard: Guard | None = None,
    timeout: float = LONG_TIMEOUT,
) -> DiskInfo:
    """Copy ``src`` (its whole chain, flattened) into a new ``dst``.

    The target format is ``dst``'s extension's unless ``fmt`` says it: qcow2, raw
    (sparse), vhdx (dynamic) or vhd (dynamic, exact size). ``src`` is read as its
    extension says unless ``src_format`` says it (never probed).
    """
    target = format_for(dst, fmt, what="destination")
    _check_existing(src)
    _check_new(dst)
    info = await inspect_disk(src, format=src_format, roots=roots, guard=guard,
                              timeout=min(timeout, QUICK_TIMEOUT))
    args = ["convert", "-f", info.format, "-O", target, *_CREATE_OPTIONS[target]]
    if progress is not None:
        args.append("-p")

    async def write(tmp: Path) -> None:
        await run_qemu_img([*args, "--", str(src), str(tmp)], timeout=timeout, progress=progress)

    await files.write_new(dst, write)
    log.info("converted %s to %s (%s)", src, dst, target)
    return await inspect_disk(dst, format=target)


async def merge_disk(
    path: Path,
    progress: ProgressFn | None = None,
    *,
    format: str | None = None,
    roots: Sequence[Path] | None = None,
    guard: Guard | None = None,
    timeout: float = LONG_TIMEOUT,
) -> DiskInfo:
    """Merge the differencing disk ``path`` into its parent, delete it, return the parent.

    Other differencing disks of the same parent see its new content: the host merges
    only into a parent that nothing else uses. If interrupted, ``path`` stays valid.
    """
    info = await inspect_disk(path, format=format, roots=roots, guard=guard,
                              timeout=min(timeout, QUICK_TIMEOUT))
    if info.kind != "differencing" or info.parent is None:
        raise InvalidInput(
            f"'{path}' is a {info.kind} disk, not a differencing disk; only a differencing "
            "disk can be merged into its parent",
            path=str(path),
            kind=info.kind,
        )
    parent = info.parent
    args = ["commit", "-f", info.format, "-d"]  # -d: keep the child intact until deleted
    if progress is not None:
        args.append("-p")
    await run_qemu_img([*args, "--", str(path)], timeout=timeout, progress=progress)
    os.unlink(path)
    log.info("merged %s into %s and removed it", path, parent)
    return await inspect_disk(parent, format=info.backing_format, roots=roots, guard=guard)


def _copy_owner(src: Path, dst: Path) -> None:
    st = os.stat(src)
    os.chmod(dst, st.st_mode & 0o7777)
    with contextlib.suppress(PermissionError):
        os.chown(dst, st.st_uid, st.st_gid)


async def compact_disk(
    path: Path,
    progress: ProgressFn | None = None,
    *,
    format: str | None = None,
    roots: Sequence[Path] | None = None,
    guard: Guard | None = None,
    timeout: float = LONG_TIMEOUT,
) -> DiskInfo:
    """Rewrite a dynamic or differencing disk without its unused space.

    The copy keeps the backing file; it replaces ``path`` atomically only when complete.
    The result's ``actual_size_before`` holds the size before compaction.
    """
    fmt = format or format_for(path)
    members = await read_chain(path, fmt, roots=roots, guard=guard,
                               timeout=min(timeout, QUICK_TIMEOUT))
    info = _info_from_chain(path, members)
    if info.kind == "fixed":
        raise InvalidInput(
            f"'{path}' is a fixed disk; a fixed disk cannot be compacted (convert it to a "
            "dynamic disk instead)",
            path=str(path),
        )
    if info.format not in _CREATE_OPTIONS or info.format == "raw":
        raise InvalidInput(f"a {info.format} disk cannot be compacted", path=str(path))
    args = ["convert", "-f", info.format, "-O", info.format, *_CREATE_OPTIONS[info.format]]
    if info.format == "qcow2" and info.cluster_size:
        args += ["-o", f"cluster_size={info.cluster_size}"]
    stored_backing = text_field(members[0].info, "backing-filename")  # as written, maybe relative
    if stored_backing and info.backing_format:
        args += ["-B", stored_backing, "-F", info.backing_format]
    if progress is not None:
        args.append("-p")
    tmp = _temp_path(path)
    try:
        await run_qemu_img([*args, "--", str(path), str(tmp)], timeout=timeout, progress=progress)
        _copy_owner(path, tmp)
        os.replace(tmp, path)
    finally:
        files.remove_quietly(tmp)
    after = await inspect_disk(path, format=info.format)
    log.info("compacted %s from %d to %d bytes", path, info.actual_size, after.actual_size)
    return replace(after, actual_size_before=info.actual_size)


# -- delete -------------------------------------------------------------------------------


async def delete_disk(
    path: Path, *, format: str | None = None, timeout: float = QUICK_TIMEOUT
) -> None:
    """Delete the disk file ``path``; refuse while a process (a VM) holds it open.

    It does not look for differencing disks that name ``path`` as their parent (the
    host does that before calling it).
    """
    _check_existing(path)
    fmt = format or format_for(path)
    try:  # without -U, qemu-img fails on an image another process holds a lock on
        await run_qemu_img(["info", "--output=json", "-f", fmt, "--", str(path)],
                           timeout=timeout)
    except ResourceBusy as exc:
        raise ResourceBusy(
            f"'{path}' is in use (a running VM has it open); stop the VM first",
            path=str(path),
        ) from exc
    except (InvalidInput, HypervisorError) as exc:
        log.debug("lock probe of %s failed (%s); deleting anyway", path, exc)
    os.unlink(path)
    log.info("deleted disk %s", path)
