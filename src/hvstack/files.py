"""Atomic publishing of files: write under a temporary name, then give it its name.

Contract:

* :func:`temp_path` names a temporary file beside the target, ``.NAME.XXXXXXXX.hvtmp``
  (hidden, unique, and recognisable as hvstack's leftovers after a crash).
* :func:`publish` gives a complete temporary file its final name in one step. By
  default it never replaces a file: it hard-links (which fails if the name is taken)
  and raises :class:`~hvstack.errors.AlreadyExists` when the name appeared meanwhile;
  on a file system without hard links it checks, then renames (a small race). With
  ``replace=True`` it renames over the old file (readers see the old or the new one,
  never a part).
* :func:`write_new` runs ``write(tmp)`` and publishes ``tmp``; the temporary file is
  removed whatever happens, so a failure or a cancellation leaves nothing behind.
* :func:`link_or_copy` gives a file a second name (a hard link), or where links cannot
  be made (another file system) a complete copy, published as above.

Example::

    await write_new(target, lambda tmp: run_qemu_img([..., "--", str(src), str(tmp)]))
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

from hvstack.errors import AlreadyExists

TEMP_SUFFIX = ".hvtmp"
_NO_LINKS = (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK)


def temp_path(dst: Path) -> Path:
    """A fresh temporary name in ``dst``'s folder (same file system: renames are atomic)."""
    return dst.parent / f".{dst.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}"


def remove_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def publish(tmp: Path, dst: Path, *, replace: bool = False) -> None:
    """Give ``tmp`` the name ``dst``; unless ``replace``, never replace a file."""
    if replace:
        os.replace(tmp, dst)
        return
    try:
        os.link(tmp, dst)
    except FileExistsError as exc:
        raise AlreadyExists(f"'{dst}' appeared meanwhile; not replaced", path=str(dst)) from exc
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
        if os.path.lexists(dst):
            raise AlreadyExists(f"'{dst}' appeared meanwhile; not replaced", path=str(dst)) from exc
        os.replace(tmp, dst)
        return
    os.unlink(tmp)


async def write_new(dst: Path, write: Callable[[Path], Awaitable[object]], *,
                    replace: bool = False) -> None:
    """Run ``write(tmp)`` and publish tmp as ``dst``; remove tmp whatever happens."""
    tmp = temp_path(dst)
    try:
        await write(tmp)
        publish(tmp, dst, replace=replace)
    finally:
        remove_quietly(tmp)


def link_or_copy(source: Path, target: Path) -> None:
    """``target`` with the same bytes as ``source``: a hard link, else a copy. A
    ``target`` that exists is replaced."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(target)
    try:
        os.link(source, target)
    except OSError:
        tmp = temp_path(target)
        try:
            shutil.copyfile(source, tmp)
            publish(tmp, target, replace=True)
        finally:
            remove_quietly(tmp)


def write_bytes(dst: Path, data: bytes, *, mode: int = 0o644, replace: bool = True) -> None:
    """Write ``data`` to ``dst`` atomically (a reader never sees a part of it)."""
    tmp = temp_path(dst)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        publish(tmp, dst, replace=replace)
    finally:
        remove_quietly(tmp)
