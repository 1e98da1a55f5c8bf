"""The qcow2 header reader: the links qemu-img would report, or None (ask qemu-img)."""

from __future__ import annotations

import asyncio
import json
import struct
import subprocess
from pathlib import Path

import pytest

from hvstack.errors import InvalidInput, PathNotAllowed
from hvstack.storage import chain
from hvstack.storage.qcow2_header import (
    EXT_BACKING_FORMAT,
    EXT_DATA_FILE,
    READ_LIMIT,
    Links,
    parse,
    read_links,
)

CLUSTER = 65536


def ext(kind: int, data: bytes) -> bytes:
    return struct.pack(">II", kind, len(data)) + data + b"\0" * (-len(data) % 8)


def header(backing: bytes = b"", fmt: bytes | None = None, *, version: int = 3,
           extensions: bytes | None = None, incompatible: int = 0, cluster_bits: int = 16,
           backing_offset: int | None = None, backing_size: int | None = None,
           header_length: int = 112, size: int = 3 * CLUSTER) -> bytes:
    """A qcow2 file's first bytes laid out as qemu-img writes them."""
    out = bytearray(size)
    length = 72 if version == 2 else header_length
    if extensions is None:
        extensions = (ext(EXT_BACKING_FORMAT, fmt) if fmt is not None else b"") + ext(0, b"")
    out[length:length + len(extensions)] = extensions
    offset = backing_offset if backing_offset is not None else (
        length + len(extensions) if backing else 0)
    if backing and offset + len(backing) <= size:
        out[offset:offset + len(backing)] = backing
    struct.pack_into(">4sIQII", out, 0, b"QFI\xfb", version, offset,
                     len(backing) if backing_size is None else backing_size, cluster_bits)
    if version == 3:
        struct.pack_into(">Q", out, 72, incompatible)
        struct.pack_into(">I", out, 100, header_length)
    return bytes(out)


def test_a_base_and_a_child() -> None:
    assert parse(header(), 3 * CLUSTER) == Links(None, None, None, False)
    links = parse(header(b"base.qcow2", b"qcow2"), 3 * CLUSTER)
    assert links == Links("base.qcow2", "qcow2", None, False)
    assert links is not None and links.as_info() == {
        "backing-filename": "base.qcow2", "backing-filename-format": "qcow2"}


def test_version_2_and_a_parent_without_a_format() -> None:
    assert parse(header(b"/abs/base.raw", version=2), 3 * CLUSTER) == Links(
        "/abs/base.raw", None, None, False)


def test_a_data_file_is_reported() -> None:
    data = header(extensions=ext(EXT_DATA_FILE, b"/etc/shadow") + ext(0, b""), incompatible=4)
    links = parse(data, len(data))
    assert links == Links(None, None, "/etc/shadow", True)
    assert chain.data_file(links.as_info()) == "/etc/shadow"


@pytest.mark.parametrize("data", [
    b"",
    b"QFI\xfb",
    b"\0" * 200,  # not qcow2 (a raw disk's bytes)
    header(version=1),
    header(version=4),
    header(cluster_bits=8),
    header(cluster_bits=40),
    header(b"base.qcow2", b"qcow2", backing_offset=10 * CLUSTER),  # beyond the file
    header(b"base.qcow2", b"qcow2", backing_offset=CLUSTER - 4),  # runs past the cluster
    header(b"base.qcow2", b"qcow2", backing_size=2**32 - 1),  # huge size
    header(b"x" * 1024, b"qcow2"),  # longer than QEMU accepts
    header(b"base\xff\xfe.qcow2", b"qcow2"),  # not UTF-8
    header(b"base\0.qcow2", b"qcow2"),
    header(b"base.qcow2", b"qc\xffow2"),
    header(b"base.qcow2", b"q" * 16),  # longer than QEMU's format buffer
    header(b"base.qcow2", extensions=ext(EXT_BACKING_FORMAT, b"qcow2")),  # no end marker
    header(extensions=struct.pack(">II", 0x1234, 2**32 - 8)),  # extension beyond the file
    header(incompatible=1 << 20),  # a feature this reader does not know
    header(incompatible=4),  # a data file bit without the name
    header(header_length=100),
    header(header_length=2 * CLUSTER),
    header(b"base.qcow2", b"qcow2", backing_offset=16),  # the name inside the header
    header(extensions=ext(EXT_BACKING_FORMAT, b"raw") * 2 + ext(0, b"")),  # said twice
    header(b"base.qcow2", b"qcow2")[:140],  # cut short in the name
], ids=lambda d: f"{len(d)}b")
def test_headers_it_does_not_fully_understand_go_to_qemu_img(data: bytes) -> None:
    assert parse(data, len(data)) is None


def test_read_links_of_files(tmp_path: Path) -> None:
    assert read_links(tmp_path / "missing.qcow2") is None
    assert read_links(tmp_path) is None
    (tmp_path / "short.qcow2").write_bytes(b"QFI\xfb\0\0\0\3")
    assert read_links(tmp_path / "short.qcow2") is None
    (tmp_path / "c.qcow2").write_bytes(header(b"b.qcow2", b"qcow2"))
    assert read_links(tmp_path / "c.qcow2") == Links("b.qcow2", "qcow2", None, False)


def _qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def test_the_same_links_as_qemu_img(tmp_path: Path) -> None:
    _qemu_img("create", "-q", "-f", "raw", str(tmp_path / "r.raw"), "1M")
    _qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "a.qcow2"), "1M")
    _qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", "-b", "a.qcow2", "-F",
              "qcow2", str(tmp_path / "b.qcow2"))
    _qemu_img("create", "-q", "-f", "qcow2", "-b", str(tmp_path / "r.raw"), "-F", "raw",
              str(tmp_path / "c.qcow2"))
    _qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "c.qcow2",
              "-F", "qcow2", str(tmp_path / "d.qcow2"))
    _qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "a2.qcow2"), "1M")
    _qemu_img("rebase", "-u", "-b", "a.qcow2", "-F", "qcow2", str(tmp_path / "a2.qcow2"))
    for name in ("a", "b", "c", "d", "a2"):
        path = tmp_path / f"{name}.qcow2"
        out = subprocess.run(["qemu-img", "info", "-U", "--output=json", "-f", "qcow2",
                              str(path)], check=True, capture_output=True, text=True).stdout
        info = json.loads(out)
        links = read_links(path)
        assert links is not None, name
        assert links.backing_file == info.get("backing-filename"), name
        assert links.backing_format == info.get("backing-filename-format"), name
        assert links.data_file is None


def test_read_chain_with_headers_checks_as_before(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "base.qcow2").write_bytes(header())
    (root / "mid.qcow2").write_bytes(header(b"base.qcow2", b"qcow2"))
    (root / "top.qcow2").write_bytes(header(b"mid.qcow2", b"qcow2"))

    def read(name: str) -> list[chain.Member]:
        return asyncio.run(chain.read_chain(root / name, "qcow2", roots=[root], timeout=10,
                                            headers=True))

    assert [(m.path.name, m.format) for m in read("top.qcow2")] == [
        ("top.qcow2", "qcow2"), ("mid.qcow2", "qcow2"), ("base.qcow2", "qcow2")]
    (root / "loop.qcow2").write_bytes(header(b"loop.qcow2", b"qcow2"))
    with pytest.raises(InvalidInput, match="loops"):
        read("loop.qcow2")
    (root / "out.qcow2").write_bytes(header(b"/etc/passwd", b"raw"))
    with pytest.raises(PathNotAllowed):
        read("out.qcow2")
    (root / "probe.qcow2").write_bytes(header(b"base.qcow2"))
    with pytest.raises(InvalidInput, match="without a known format"):
        read("probe.qcow2")
    (root / "proto.qcow2").write_bytes(header(b"nbd:localhost:10809", b"raw"))
    with pytest.raises(InvalidInput, match="not a file path"):
        read("proto.qcow2")
    data = header(extensions=ext(EXT_DATA_FILE, b"data.raw") + ext(0, b""), incompatible=4)
    (root / "data.qcow2").write_bytes(data)
    with pytest.raises(InvalidInput, match="external file"):
        read("data.qcow2")


def test_no_more_than_read_limit_bytes_are_read(tmp_path: Path) -> None:
    far = header(b"b.qcow2", b"qcow2", cluster_bits=21, backing_offset=READ_LIMIT + 8,
                 size=READ_LIMIT + 4096)
    assert parse(far, len(far)) == Links("b.qcow2", "qcow2", None, False)
    (tmp_path / "far.qcow2").write_bytes(far)
    assert read_links(tmp_path / "far.qcow2") is None  # left to qemu-img
