"""An in-memory initramfs: a tree of entries written as a ``newc`` cpio archive.

Contract:

* :class:`Initramfs` collects directories, files, symlinks and device nodes by
  absolute guest path. Parent directories are added on demand (mode 0755), adding the
  same path twice replaces the first entry, and every entry is owned by root.
* :meth:`Initramfs.to_cpio` returns the archive in the kernel's ``newc`` format
  (``070701``), entries sorted by path so parents come first, with one fixed mtime:
  the same tree always gives the same bytes. :meth:`Initramfs.to_gzip` compresses it
  with a zeroed gzip header timestamp.
* Nothing here touches the host file system: device nodes are archive entries, so
  building needs no root and no ``mknod``.
"""

from __future__ import annotations

import gzip
import io
import stat
from dataclasses import dataclass

from hvstack.errors import InvalidInput

NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class Entry:
    """One archive member; ``data`` is a file's content or a symlink's target."""

    mode: int
    data: bytes = b""
    rdev_major: int = 0
    rdev_minor: int = 0


def _pad4(length: int) -> bytes:
    return b"\0" * (-length % 4)


def _header(ino: int, entry: Entry, name: bytes, mtime: int) -> bytes:
    fields = (
        ino,
        entry.mode,
        0,  # uid
        0,  # gid
        2 if stat.S_ISDIR(entry.mode) else 1,
        mtime,
        len(entry.data),
        0,  # devmajor
        0,  # devminor
        entry.rdev_major,
        entry.rdev_minor,
        len(name) + 1,
        0,  # check
    )
    return NEWC_MAGIC + b"".join(b"%08X" % value for value in fields)


def _norm(path: str) -> str:
    if not path.startswith("/") or "//" in path or "/../" in f"{path}/" or "\0" in path:
        raise InvalidInput(f"initramfs paths must be absolute and normal: {path!r}")
    return path.rstrip("/") or "/"


class Initramfs:
    """A tree of archive entries keyed by absolute guest path."""

    def __init__(self, mtime: int = 0) -> None:
        self.mtime = mtime
        self.entries: dict[str, Entry] = {}

    def _parents(self, path: str) -> None:
        parts = path.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            parent = "/" + "/".join(parts[:i])
            if parent not in self.entries:
                self.entries[parent] = Entry(stat.S_IFDIR | 0o755)

    def mkdir(self, path: str, mode: int = 0o755) -> None:
        path = _norm(path)
        if path == "/":
            return
        self._parents(path)
        self.entries[path] = Entry(stat.S_IFDIR | mode)

    def add_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        path = _norm(path)
        self._parents(path)
        self.entries[path] = Entry(stat.S_IFREG | mode, data)

    def symlink(self, path: str, target: str) -> None:
        path = _norm(path)
        self._parents(path)
        self.entries[path] = Entry(stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        path = _norm(path)
        self._parents(path)
        self.entries[path] = Entry(stat.S_IFCHR | mode, b"", major, minor)

    def size(self) -> int:
        """Return the total bytes of file content."""
        return sum(len(e.data) for e in self.entries.values() if stat.S_ISREG(e.mode))

    def to_cpio(self) -> bytes:
        out = io.BytesIO()
        for ino, path in enumerate(sorted(self.entries), start=1):
            entry = self.entries[path]
            name = path.lstrip("/").encode() or b"."
            out.write(_header(ino, entry, name, self.mtime))
            out.write(name + b"\0")
            out.write(_pad4(110 + len(name) + 1))
            out.write(entry.data)
            out.write(_pad4(len(entry.data)))
        trailer = TRAILER.encode()
        out.write(_header(0, Entry(0), trailer, 0) + trailer + b"\0")
        out.write(_pad4(110 + len(trailer) + 1))
        return out.getvalue()

    def to_gzip(self, level: int = 9) -> bytes:
        return gzip.compress(self.to_cpio(), compresslevel=level, mtime=0)
