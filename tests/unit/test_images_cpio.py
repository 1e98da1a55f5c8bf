"""The initramfs writer produces newc archives the kernel (and cpio) can read."""

from __future__ import annotations

import gzip
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from hvstack.errors import InvalidInput
from hvstack.images.cpio import Initramfs


def read_newc(data: bytes) -> list[tuple[str, int, bytes, int, int]]:
    """Parse a newc archive into (name, mode, data, rdev major, rdev minor) tuples."""
    out: list[tuple[str, int, bytes, int, int]] = []
    pos = 0
    while True:
        header = data[pos : pos + 110]
        assert header[:6] == b"070701"
        fields = [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, rmajor, rminor, namesize = (
            fields[1],
            fields[6],
            fields[9],
            fields[10],
            fields[11],
        )
        name_start = pos + 110
        name = data[name_start : name_start + namesize - 1].decode()
        assert data[name_start + namesize - 1] == 0
        data_start = name_start + namesize + (-(110 + namesize) % 4)
        assert data_start % 4 == 0
        body = data[data_start : data_start + filesize]
        pos = data_start + filesize + (-filesize % 4)
        if name == "TRAILER!!!":
            assert pos == len(data)
            return out
        out.append((name, mode, body, rmajor, rminor))


def sample() -> Initramfs:
    root = Initramfs()
    root.add_file("/etc/init.d/rcS", b"#!/bin/sh\necho hi\n", 0o755)
    root.symlink("/init", "/bin/busybox")
    root.add_file("/bin/busybox", b"\x7fELF" + b"x" * 13)
    root.char_device("/dev/console", 5, 1)
    root.mkdir("/tmp", 0o1777)
    return root


def test_entries_round_trip_with_parents_first() -> None:
    entries = read_newc(sample().to_cpio())
    names = [e[0] for e in entries]
    assert names == sorted(names)
    for name in names:
        parent = name.rsplit("/", 1)[0]
        if "/" in name:
            assert names.index(parent) < names.index(name)
    by_name = {e[0]: e for e in entries}
    assert set(by_name) == {
        "bin",
        "bin/busybox",
        "dev",
        "dev/console",
        "etc",
        "etc/init.d",
        "etc/init.d/rcS",
        "init",
        "tmp",
    }
    assert by_name["etc/init.d/rcS"][2] == b"#!/bin/sh\necho hi\n"
    assert stat.S_IMODE(by_name["etc/init.d/rcS"][1]) == 0o755
    assert stat.S_ISLNK(by_name["init"][1]) and by_name["init"][2] == b"/bin/busybox"
    console = by_name["dev/console"]
    assert stat.S_ISCHR(console[1]) and console[3:] == (5, 1)
    assert stat.S_IMODE(by_name["tmp"][1]) == 0o1777
    assert stat.S_ISDIR(by_name["etc"][1])


def test_output_is_deterministic() -> None:
    assert sample().to_cpio() == sample().to_cpio()
    assert sample().to_gzip() == sample().to_gzip()
    assert gzip.decompress(sample().to_gzip()) == sample().to_cpio()


def test_later_entry_replaces_earlier() -> None:
    root = Initramfs()
    root.add_file("/a", b"one")
    root.add_file("/a", b"two")
    assert [e[2] for e in read_newc(root.to_cpio())] == [b"two"]
    assert root.size() == 3


@pytest.mark.parametrize("bad", ["relative", "/a/../b", "/a//b", "/nul\0"])
def test_rejects_odd_paths(bad: str) -> None:
    with pytest.raises(InvalidInput):
        Initramfs().add_file(bad, b"")


@pytest.mark.skipif(shutil.which("cpio") is None, reason="GNU cpio not installed")
def test_gnu_cpio_lists_the_archive(tmp_path: Path) -> None:
    listing = (
        subprocess.run(
            ["cpio", "-it", "--quiet"],
            input=sample().to_cpio(),
            capture_output=True,
            check=True,
            timeout=30,
        )
        .stdout.decode()
        .split()
    )
    assert "dev/console" in listing and "etc/init.d/rcS" in listing
