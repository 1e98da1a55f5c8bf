"""The host's facts are injected: a test's host, never the machine that runs the test."""

from __future__ import annotations

import asyncio
from pathlib import Path

from hvstack.compute.model import VmConfig, VmState
from hvstack.errors import InsufficientResources
from hvstack.host.facts import FixedHost
from hvstack.host.service import HostService, NewVm
from hvstack.host.store import MemoryStore
from tests.functional.conftest import make_config
from tests.functional.fakes import FakeDriver

MIB = 1 << 20


async def test_start_is_admitted_by_the_memory_the_host_has_available(
    tmp_path: Path,
) -> None:
    host = FixedHost(cpus=3, available=100 * MIB)
    driver = FakeDriver()
    service = HostService(make_config(tmp_path), MemoryStore(), driver, host)
    await service.startup()
    try:
        assert (service.facts.cpus, service.facts.accelerator.name) == (3, "tcg")
        await service.create_vm(NewVm(VmConfig(name="big", memory_bytes=256 * MIB)))
        job = service.start_vm("big")
        await asyncio.wait_for(job.done.wait(), 5)
        assert isinstance(job.error, InsufficientResources)
        assert "needs 256 MiB of memory and the host has 100 MiB available" in str(job.error)
        assert service.get_vm("big").state is VmState.OFF
        host.available = 512 * MIB  # memory freed meanwhile
        job = service.start_vm("big")
        await asyncio.wait_for(job.done.wait(), 5)
        assert job.error is None
        assert service.get_vm("big").state is VmState.RUNNING
    finally:
        driver.release()
        await asyncio.wait_for(service.shutdown(), 10)
