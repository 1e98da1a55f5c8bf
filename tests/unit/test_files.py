"""Atomic publishing: a file appears whole under its name or not at all."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from hvstack import files
from hvstack.errors import AlreadyExists


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(files.TEMP_SUFFIX))


def test_temp_names_are_hidden_unique_and_recognisable(tmp_path: Path) -> None:
    a, b = files.temp_path(tmp_path / "x.qcow2"), files.temp_path(tmp_path / "x.qcow2")
    assert a != b and a.parent == tmp_path
    assert a.name.startswith(".x.qcow2.") and a.name.endswith(".hvtmp")


def test_publish_never_replaces_a_file(tmp_path: Path) -> None:
    dst = tmp_path / "image"
    dst.write_bytes(b"old")
    tmp = files.temp_path(dst)
    tmp.write_bytes(b"new")
    with pytest.raises(AlreadyExists, match="appeared meanwhile"):
        files.publish(tmp, dst)
    assert dst.read_bytes() == b"old"
    files.publish(tmp, dst, replace=True)
    assert dst.read_bytes() == b"new"
    assert not tmp.exists()


def test_publish_without_hard_links(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_links(src: object, dst: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    dst = tmp_path / "image"
    tmp = files.temp_path(dst)
    tmp.write_bytes(b"new")
    files.publish(tmp, dst)
    assert dst.read_bytes() == b"new"
    tmp.write_bytes(b"newer")
    with pytest.raises(AlreadyExists):
        files.publish(tmp, dst)
    assert dst.read_bytes() == b"new"


async def test_write_new_leaves_nothing_when_writing_fails(tmp_path: Path) -> None:
    async def fail(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        await files.write_new(tmp_path / "image", fail)
    assert list(tmp_path.iterdir()) == []


async def test_write_new_publishes_a_complete_file(tmp_path: Path) -> None:
    async def write(tmp: Path) -> None:
        tmp.write_bytes(b"whole")

    await files.write_new(tmp_path / "image", write)
    assert (tmp_path / "image").read_bytes() == b"whole"
    assert _leftovers(tmp_path) == []


def test_write_bytes_replaces_atomically(tmp_path: Path) -> None:
    dst = tmp_path / "memo.json"
    files.write_bytes(dst, b"1", mode=0o600)
    files.write_bytes(dst, b"2")
    assert dst.read_bytes() == b"2"
    assert _leftovers(tmp_path) == []
