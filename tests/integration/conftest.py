"""Fixtures for integration tests: the tiny image (built once) and real host services."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.hostproc import HostProcess, running_host

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_image() -> Path:
    from hvstack.images.tiny import build_tiny

    cache = Path(os.environ.get("HV_CACHE_DIR") or REPO / ".cache")
    return asyncio.run(build_tiny(cache))


@pytest.fixture()
def host(tmp_path: Path, tiny_image: Path) -> Iterator[HostProcess]:
    with running_host(tmp_path / "data", tiny_image) as service:
        yield service


@pytest.fixture
def small_data_dir(tmp_path: Path) -> Iterator[Path]:
    """A data directory (database, VM folders and their disks, images) on a 256 MiB
    tmpfs, for tests that fill it."""
    data = tmp_path / "data"
    data.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256M,mode=0700", "tmpfs", str(data)],
                   check=True)
    try:
        yield data
    finally:
        subprocess.run(["umount", "-l", str(data)], check=False)
