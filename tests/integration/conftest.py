"""Fixtures for integration tests: the tiny image (built once) and real host services."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.hostproc import HostProcess

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_image() -> Path:
    from hvstack.images.tiny import build_tiny

    cache = Path(os.environ.get("HV_CACHE_DIR") or REPO / ".cache")
    return asyncio.run(build_tiny(cache))


@pytest.fixture()
def host(tmp_path: Path, tiny_image: Path) -> Iterator[HostProcess]:
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    target = data / "images" / f"tiny{tiny_image.suffix}"
    try:
        os.link(tiny_image, target)
    except OSError:
        shutil.copyfile(tiny_image, target)
    service = HostProcess(data)
    service.start()
    yield service
    service.stop()
    # Whatever a failed test left running is turned off, so runs stay independent.
    for pidfile in data.glob("vms/*/qemu.pid"):
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pidfile.read_text()), 9)
