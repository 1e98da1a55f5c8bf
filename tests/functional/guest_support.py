"""Fixtures for the guest operation tests: the API with a test policy, and running VMs
(fake driver) whose guest agent is a :class:`FakeGuestAgent`.

Import the fixtures into a test module (``from tests.functional.guest_support import
*``-style, by name). The fake guest's "files" are real files under ``tmp_path``, so
guest paths in these tests are absolute paths below it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from hvstack.api.app import create_app
from hvstack.compute.model import IntegrationServices
from hvstack.host.root import HostRoot
from hvstack.host.service import HostService
from hvstack.integration.ops import GuestOperations
from hvstack.integration.rules import GuestPolicy
from tests.functional.fakes import create_vm, run_job, serve_on_unix_socket
from tests.functional.guest_fake import FakeGuestAgent, busybox_bin

TEST_COPY_LIMIT = 4 * 1024 * 1024


def test_policy(tmp_path: Path) -> GuestPolicy:
    return GuestPolicy(
        max_copy_bytes=TEST_COPY_LIMIT,
        deny=("/proc", "/sys", "/dev", str(tmp_path / "secret")),
        write_chunk=64 * 1024,
        read_chunk=48 * 1024,
        agent_timeout=1.0,
        chunk_timeout=5.0,
        stall_timeout=5.0,
        data_wait=5.0,
        verify_timeout=30.0,
        freeze_timeout=1.0,
        thaw_timeout=1.0,
        kvp_dir=str(tmp_path / "guest" / "var/lib/hvstack/kvp"),
    )


test_policy.__test__ = False  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def guest_bin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path | None:
    return busybox_bin(tmp_path_factory.mktemp("busybox"))


@pytest.fixture
def guest_policy(tmp_path: Path) -> GuestPolicy:
    return test_policy(tmp_path)


@pytest.fixture
def guest_root(tmp_path: Path) -> Path:
    root = tmp_path / "guest"
    root.mkdir(exist_ok=True)
    return root


@pytest.fixture
async def guest_app(service: HostService, guest_policy: GuestPolicy) -> AsyncIterator[FastAPI]:
    app = create_app(HostRoot(service, guest_policy))
    try:
        yield app
    finally:
        await ops_of(app).close()


def ops_of(app: FastAPI) -> GuestOperations:
    guest_ops: GuestOperations = app.state.root.guest
    return guest_ops


@pytest.fixture
def guest_ops(guest_app: FastAPI) -> GuestOperations:
    return ops_of(guest_app)


@pytest.fixture
async def guest_api(guest_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=guest_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://hv",
                                 timeout=60) as client:
        yield client


class Guests:
    """Starts VMs with a fake guest agent each; stops the agents at the end."""

    def __init__(self, api: httpx.AsyncClient, service: HostService,
                 bin_dir: Path | None) -> None:
        self.api = api
        self.service = service
        self.bin_dir = bin_dir
        self.agents: list[FakeGuestAgent] = []

    async def boot(self, name: str, *, guest_services: bool = True, kvp: bool = True,
                   backup: bool = True, agent: bool = True) -> FakeGuestAgent:
        await create_vm(self.api, name)
        await self.service.update_vm(name, integration_services=IntegrationServices(
            guest_services=guest_services, kvp=kvp, backup=backup))
        await run_job(self.api, name, "start")
        return await self.attach(name) if agent else FakeGuestAgent("/nonexistent")

    async def attach(self, name: str) -> FakeGuestAgent:
        vm = self.service.get_vm(name)
        fake = await FakeGuestAgent(vm.agent.socket_path, self.bin_dir).start()
        self.agents.append(fake)
        return fake

    async def close(self) -> None:
        for fake in self.agents:
            await fake.stop()


@pytest.fixture
async def guests(guest_api: httpx.AsyncClient, service: HostService,
                 guest_bin_dir: Path | None) -> AsyncIterator[Guests]:
    helper = Guests(guest_api, service, guest_bin_dir)
    try:
        yield helper
    finally:
        await helper.close()


# -- the CLI against the app guest_served on a unix socket -----------------------------------




@pytest.fixture
async def guest_served(guest_app: FastAPI, tmp_path: Path) -> AsyncIterator[str]:
    async with serve_on_unix_socket(guest_app, tmp_path / "hv.sock") as host:
        yield host
