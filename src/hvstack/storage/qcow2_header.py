"""What a qcow2 header says about its backing file and data file, read in Python.

:func:`read_links` replaces one ``qemu-img info -f qcow2`` run (a subprocess, several
milliseconds) where only the links matter: the chain checked before a VM starts. It is
called only for a file whose format is already known to be qcow2 (recorded by hvstack
or named by a child's header), so nothing is probed. It reads the fields QEMU reads
(``docs/interop/qcow2.txt``): the backing file name (offset and size at bytes 8-19),
the header extensions after the header (backing format ``0xE2792ACA``, external data
file ``0x44415441``, end ``0``) and the incompatible feature bits.

It answers ``None`` whenever the header is not one it fully understands (not qcow2, a
version other than 2 or 3, an offset or size beyond the file, the first cluster or the
first :data:`READ_LIMIT` bytes, a
name that is not UTF-8, an unknown incompatible feature, ...): the caller then asks
``qemu-img`` as before, whose answer or refusal stands. What it returns is a claim
from guest-writable bytes, checked by the caller like qemu-img's answer.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"QFI\xfb"
EXT_END = 0
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_DATA_FILE = 0x44415441
_V2_HEADER = 72
_V3_MIN_HEADER = 104
_MAX_BACKING_NAME = 1023  # QEMU refuses longer names
_MAX_FORMAT_NAME = 15  # QEMU's backing_format buffer is 16 bytes
_DATA_FILE_BIT = 1 << 2
_KNOWN_INCOMPATIBLE = 0b11111  # dirty, corrupt, data file, compression type, extended L2
_MIN_CLUSTER_BITS, _MAX_CLUSTER_BITS = 9, 21
READ_LIMIT = 65536
"""Bytes read at most; qemu-img writes the header, its extensions and the backing name
in the first few hundred bytes."""


@dataclass(frozen=True)
class Links:
    """The names a qcow2 header gives, as stored (unchecked claims)."""

    backing_file: str | None
    backing_format: str | None
    data_file: str | None
    data_file_bit: bool
    """The external data file feature bit (set with or without the name extension)."""

    def as_info(self) -> dict[str, object]:
        """The same keys ``qemu-img info --output=json`` would give for these links."""
        info: dict[str, object] = {}
        if self.backing_file is not None:
            info["backing-filename"] = self.backing_file
        if self.backing_format is not None:
            info["backing-filename-format"] = self.backing_format
        if self.data_file is not None:
            info["format-specific"] = {"type": "qcow2", "data": {"data-file": self.data_file}}
        return info


def _text(raw: bytes) -> str | None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return None if "\0" in text else text


def parse(header: bytes, file_size: int) -> Links | None:
    """The links in ``header`` (the file's first bytes, up to one cluster) of a file of
    ``file_size`` bytes; None if it is not a header this module fully understands."""
    if len(header) < _V2_HEADER or header[:4] != MAGIC:
        return None
    version, backing_offset, backing_size, cluster_bits = struct.unpack_from(">IQII", header, 4)
    if version not in (2, 3) or not _MIN_CLUSTER_BITS <= cluster_bits <= _MAX_CLUSTER_BITS:
        return None
    cluster_size = 1 << cluster_bits
    limit = min(cluster_size, file_size, len(header))
    if version == 2:
        header_length, incompatible = _V2_HEADER, 0
    else:
        if len(header) < _V3_MIN_HEADER:
            return None
        (incompatible,) = struct.unpack_from(">Q", header, 72)
        (header_length,) = struct.unpack_from(">I", header, 100)
        if header_length < _V3_MIN_HEADER or header_length % 8 or header_length > limit:
            return None
    if incompatible & ~_KNOWN_INCOMPATIBLE:
        return None
    backing: str | None = None
    if backing_offset:
        if (backing_offset > cluster_size or backing_size == 0
                or backing_size > min(_MAX_BACKING_NAME, cluster_size - backing_offset)
                or backing_offset + backing_size > limit or backing_offset < header_length):
            return None
        backing = _text(header[backing_offset:backing_offset + backing_size])
        if backing is None:
            return None
    end = backing_offset if backing_offset else cluster_size
    fmt: str | None = None
    data_file: str | None = None
    offset = header_length
    while True:
        if offset + 8 > min(end, limit):
            return None  # the extensions must end with an end marker inside the header
        kind, length = struct.unpack_from(">II", header, offset)
        offset += 8
        if kind == EXT_END:
            break
        padded = (length + 7) & ~7
        if offset + padded > min(end, limit):
            return None
        data = header[offset:offset + length]
        offset += padded
        # A name given twice, too long or not text: left to qemu-img.
        if kind == EXT_BACKING_FORMAT and (
                length > _MAX_FORMAT_NAME or fmt is not None or (fmt := _text(data)) is None):
            return None
        if kind == EXT_DATA_FILE and (
                data_file is not None or (data_file := _text(data)) is None):
            return None
    bit = bool(incompatible & _DATA_FILE_BIT)
    if bit and data_file is None:
        return None  # qemu-img's answer decides this odd case
    return Links(backing, fmt, data_file, bit)


def read_links(path: Path) -> Links | None:
    """:func:`parse` of ``path``'s first cluster; None if unreadable or not understood."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(0)
            start = f.read(_V3_MIN_HEADER)
            if len(start) < 24 or start[:4] != MAGIC:
                return None
            (cluster_bits,) = struct.unpack_from(">I", start, 20)
            if not _MIN_CLUSTER_BITS <= cluster_bits <= _MAX_CLUSTER_BITS:
                return None
            header = start + f.read(min(1 << cluster_bits, size, READ_LIMIT) - len(start))
    except (OSError, ValueError):
        return None
    return parse(header, size)
