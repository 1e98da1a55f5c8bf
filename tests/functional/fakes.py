"""A fake hypervisor driver for the functional tests: no QEMU, same contract.

:class:`FakeDriver` implements :class:`hvstack.hypervisor.driver.Driver` and hands out
:class:`FakeMachine` objects implementing :class:`~hvstack.hypervisor.driver.Machine`.
A machine "runs" until it exits (an :class:`asyncio.Event`): on ``quit``, on the power
button (unless ``ignore_power_button``), or when a test calls :meth:`FakeMachine.exit`.
The driver keeps every machine it launched, checks that no VM ever has two live
machines, and builds the real QEMU argv for each launch so the spec is exercised too.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from hvstack.client import url_path
from hvstack.errors import HvError, HypervisorError
from hvstack.hypervisor.driver import Driver, EventSink, Machine, QmpEvent
from hvstack.hypervisor.qemu.argv import build_argv
from hvstack.hypervisor.spec import MachineSpec
from hvstack.progress import Progress
from hvstack.server import QuietServer
from tests.functional.fake_capabilities import (
    FakeBlockJobs,
    FakeDevices,
    FakeMemory,
    FakeMigration,
)

STATE_MAGIC = b"hvstack-fake-saved-state\n"


@dataclass
class FakeMachine:
    pid: int
    vm_id: str
    driver: FakeDriver
    events: EventSink
    status_value: str = "running"
    ignore_power_button: bool = False
    spec: MachineSpec | None = None
    argv: list[str] = field(default_factory=list)
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    closed: bool = False
    resets: int = 0
    power_presses: int = 0
    screen: tuple[int, int] = (64, 40)  # what screendump shows: width, height
    devices: FakeDevices = field(default_factory=FakeDevices)
    memory: FakeMemory = field(default_factory=FakeMemory)
    migration: FakeMigration = field(default_factory=FakeMigration)
    block_jobs: FakeBlockJobs = field(default_factory=FakeBlockJobs)

    def __post_init__(self) -> None:
        self.devices.on_deleted = lambda device: self.emit(
            "DEVICE_DELETED", device=device, path=f"/machine/peripheral/{device}")

    # -- the Machine protocol --------------------------------------------------------

    async def status(self) -> str:
        self._check_alive()
        return self.status_value

    async def pause(self) -> None:
        self._check_alive()
        self.status_value = "paused"
        self.emit("STOP")

    async def resume(self) -> None:
        self._check_alive()
        self.status_value = "running"
        self.emit("RESUME")

    async def power_button(self) -> None:
        self._check_alive()
        self.power_presses += 1
        if not self.ignore_power_button:
            self.emit("SHUTDOWN")
            self.exit()

    async def reset(self) -> None:
        self._check_alive()
        self.resets += 1
        self.emit("RESET")

    async def save_state(self, path: Path, progress: Progress) -> None:
        self._check_alive()
        if self.driver.save_error is not None:
            raise self.driver.save_error
        progress(50, "")
        path.write_bytes(STATE_MAGIC + self.vm_id.encode())
        progress(100, "")

    async def restore_state(self, path: Path, progress: Progress) -> None:
        self._check_alive()
        data = path.read_bytes()
        if data != STATE_MAGIC + self.vm_id.encode():
            raise HypervisorError(f"saved state {path} is not this VM's")
        progress(100, "")
        self.status_value = "paused"
        self.driver.restored.append(self.vm_id)

    async def screendump(self, path: Path) -> None:
        """A PPM of ``screen`` size: a red-to-blue gradient, one colour per column."""
        self._check_alive()
        width, height = self.screen
        span = max(1, width - 1)
        row = b"".join(bytes((255 * x // span, 0, 255 - 255 * x // span)) for x in range(width))
        path.write_bytes(f"P6\n{width} {height}\n255\n".encode() + row * height)

    async def quit(self) -> None:
        self.exit()

    async def wait_exit(self) -> None:
        await self.exited.wait()

    async def close(self) -> None:
        self.closed = True
        self.devices.close()

    # -- test controls -----------------------------------------------------------

    def emit(self, name: str, **data: object) -> None:
        """QEMU sends the event ``name`` with ``data`` (keys as QMP spells them)."""
        self.events(QmpEvent(name, data))

    @property
    def alive(self) -> bool:
        return not self.exited.is_set()

    def exit(self) -> None:
        """The process ends (a guest shutdown, a crash, or after quit)."""
        if not self.exited.is_set():
            self.status_value = "shutdown"
            self.exited.set()
            self.driver.alive_pids.discard(self.pid)

    def _check_alive(self) -> None:
        if not self.alive:
            raise HypervisorError(f"QEMU process {self.pid} has exited")


class FakeDriver:
    """Launches :class:`FakeMachine` objects; pids in ``alive_pids`` can be attached to."""

    def __init__(self, alive_pids: set[int] | None = None,
                 attach_status: str = "running") -> None:
        self.alive_pids: set[int] = set(alive_pids or ())
        self.attach_status = attach_status
        self.machines: list[FakeMachine] = []
        self.attached: list[FakeMachine] = []
        self.restored: list[str] = []
        self.violations: list[str] = []
        self.ignore_power_button = False
        self.launch_error: HvError | None = None
        self.save_error: HvError | None = None
        # When set, launch waits for it: a start that is still in progress.
        self.launch_gate: asyncio.Event | None = None
        self.launching = asyncio.Event()  # set once a launch has begun
        self._pids = itertools.count(40000)

    async def launch(self, spec: MachineSpec, pidfile: Path, events: EventSink) -> FakeMachine:
        self.launching.set()
        if self.launch_gate is not None:
            await self.launch_gate.wait()
        if self.launch_error is not None:
            raise self.launch_error
        live = [m for m in self.live_machines() if m.vm_id == spec.vm_id]
        if live:
            self.violations.append(f"VM {spec.vm_id} launched while pid {live[0].pid} runs")
        pid = next(self._pids)
        machine = FakeMachine(
            pid=pid, vm_id=spec.vm_id, driver=self, events=events,
            status_value="inmigrate" if spec.incoming else "running",
            ignore_power_button=self.ignore_power_button, spec=spec, argv=build_argv(spec),
            devices=FakeDevices.of_spec(spec),
            memory=FakeMemory.of_spec(spec),
            block_jobs=FakeBlockJobs.of_spec(spec),
        )
        pidfile.parent.mkdir(parents=True, exist_ok=True)
        pidfile.write_text(f"{pid}\n")
        self.alive_pids.add(pid)
        self.machines.append(machine)
        return machine

    async def attach(self, vm_id: str, pid: int, qmp_socket: str,
                     events: EventSink) -> FakeMachine | None:
        if pid not in self.alive_pids:
            return None
        machine = FakeMachine(pid=pid, vm_id=vm_id, driver=self, events=events,
                              status_value=self.attach_status,
                              ignore_power_button=self.ignore_power_button)
        self.attached.append(machine)
        return machine

    # -- for assertions -------------------------------------------------------------

    def live_machines(self) -> list[FakeMachine]:
        return [m for m in [*self.machines, *self.attached] if m.alive]

    def machine_of(self, vm_id: str) -> FakeMachine:
        live = [m for m in self.live_machines() if m.vm_id == vm_id]
        assert len(live) == 1, f"VM {vm_id} has {len(live)} live machines"
        return live[0]

    def release(self) -> None:
        if self.launch_gate is not None:
            self.launch_gate.set()


def _conforms(driver: FakeDriver, machine: FakeMachine) -> tuple[Driver, Machine]:
    """Never called: lets mypy check that the fakes implement the driver protocols."""
    return driver, machine


# -- helpers for driving the API --------------------------------------------------------------

API = "/api/v1"
PROBLEM = "application/problem+json"


async def create_vm(api: httpx.AsyncClient, name: str, **body: object) -> dict[str, Any]:
    response = await api.post(f"{API}/vms", json={"name": name, "memory": "64M", **body})
    assert response.status_code == 201, response.text
    vm: dict[str, Any] = response.json()
    return vm


async def show_vm(api: httpx.AsyncClient, name: str) -> dict[str, Any]:
    response = await api.get(API + url_path("vms", name))
    assert response.status_code == 200, response.text
    vm: dict[str, Any] = response.json()
    return vm


async def finish_job(api: httpx.AsyncClient, job: dict[str, Any]) -> dict[str, Any]:
    """Follow a job until it ends (bounded: the server waits up to 5 s per call)."""
    for _ in range(6):
        if job["state"] != "running":
            return job
        response = await api.get(f"{API}/jobs/{job['id']}", params={"wait": 5})
        assert response.status_code == 200, response.text
        job = response.json()
    raise AssertionError(f"job {job['id']} ({job['kind']}) did not end: {job}")


async def run_job(api: httpx.AsyncClient, name: str, operation: str,
                  body: dict[str, Any] | None = None, *, ok: bool = True) -> dict[str, Any]:
    """POST an operation that runs as a job, and return the job once it has ended."""
    response = await api.post(API + url_path("vms", name, operation), json=body)
    assert response.status_code == 202, response.text
    job = await finish_job(api, response.json())
    if ok:
        assert job["state"] == "completed", job
    return job


async def eventually(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Wait (bounded) until ``predicate()`` holds; the bound is a safety net, not a timing."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(0.005)


def assert_problem(response: httpx.Response, status: int, slug: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["type"] == f"/problems/{slug}", body
    assert body["title"] and body["detail"]
    return body


@contextlib.asynccontextmanager
async def serve_on_unix_socket(app: Any, socket_path: Path) -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn on ``socket_path`` in this loop; yield its HV_HOST."""
    config = uvicorn.Config(app, uds=str(socket_path), log_level="warning", lifespan="off")
    server = QuietServer(config)
    task = asyncio.create_task(server.serve())
    try:
        for _ in range(500):
            if server.started or task.done():
                break
            await asyncio.sleep(0.01)
        assert server.started, "uvicorn did not start"
        yield f"unix:{socket_path}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
