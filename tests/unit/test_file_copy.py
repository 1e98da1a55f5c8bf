"""The disk file copy: bytes and holes kept, a stop leaves nothing, never over a file."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from hvstack.errors import Cancelled
from hvstack.storage.file_copy import BLOCK, CHUNK, copy_file


def test_bytes_and_holes_are_kept(tmp_path: Path) -> None:
    src, dst = tmp_path / "a.raw", tmp_path / "b.raw"
    with open(src, "wb") as out:
        out.write(b"head")
        out.truncate(3 * CHUNK)  # a hole, then the end
        out.seek(2 * CHUNK)
        out.write(b"middle")
    seen: list[int] = []
    assert copy_file(src, dst, progress=seen.append) == 3 * CHUNK
    assert dst.read_bytes() == src.read_bytes()
    assert seen[-1] == 3 * CHUNK
    assert os.stat(dst).st_blocks * 512 <= 2 * BLOCK  # the zero blocks stayed holes


def test_a_stop_removes_the_partial_copy(tmp_path: Path) -> None:
    src, dst = tmp_path / "a.raw", tmp_path / "b.raw"
    src.write_bytes(b"x" * (2 * CHUNK))
    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled):
        copy_file(src, dst, stop=stop)
    assert not dst.exists()


def test_an_existing_file_or_link_is_never_written(tmp_path: Path) -> None:
    src, dst, victim = tmp_path / "a.raw", tmp_path / "b.raw", tmp_path / "victim"
    src.write_bytes(b"new")
    victim.write_bytes(b"keep")
    dst.symlink_to(victim)
    with pytest.raises(FileExistsError):
        copy_file(src, dst)
    assert victim.read_bytes() == b"keep"
