"""Fixtures for the functional tests: the host service in-process on a fake driver.

``service`` is a started :class:`HostService` on a :class:`MemoryStore` and a
:class:`FakeDriver`, with every directory under ``tmp_path``; ``api`` is an httpx client
talking to its FastAPI app in-process. Both are torn down after each test.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from hvstack.api.app import create_app
from hvstack.host.config import HostConfig, ListenAddress
from hvstack.host.facts import FixedHost
from hvstack.host.root import HostRoot
from hvstack.host.service import HostService
from hvstack.host.store import MemoryStore
from tests.functional.fakes import FakeDriver


def make_config(tmp_path: Path, **changes: object) -> HostConfig:
    data = tmp_path / "data"
    disks = tmp_path / "disks"
    disks.mkdir(exist_ok=True)
    code, varstore = tmp_path / "OVMF_CODE.fd", tmp_path / "OVMF_VARS.fd"
    code.write_bytes(b"\0" * 4096)
    varstore.write_bytes(b"fake-ovmf-vars" + b"\0" * 4082)
    config = HostConfig(
        data_dir=data,
        storage_roots=(data, disks),
        listen=ListenAddress("unix", path=str(tmp_path / "hv.sock")),
        cache_dir=tmp_path / "cache",
        accelerator="tcg",
        stop_timeout=5.0,
        ovmf_code=code,
        ovmf_vars=varstore,
    )
    return replace(config, **changes)  # type: ignore[arg-type]


@pytest.fixture
def host_config(tmp_path: Path) -> HostConfig:
    return make_config(tmp_path)


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def driver() -> FakeDriver:
    return FakeDriver()


@pytest.fixture
async def service(host_config: HostConfig, store: MemoryStore,
                  driver: FakeDriver) -> AsyncIterator[HostService]:
    svc = HostService(host_config, store, driver, FixedHost())
    await svc.startup()
    try:
        yield svc
    finally:
        driver.release()
        await asyncio.wait_for(svc.shutdown(), 10)
        shutil.rmtree(host_config.run_dir, ignore_errors=True)


@pytest.fixture
async def api(service: HostService) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(HostRoot(service)))
    async with httpx.AsyncClient(transport=transport, base_url="http://hv") as client:
        yield client
