"""The QMP monitor and the QEMU machine against a fake QMP server at the wire (no QEMU).

The worker process is a stand-in: a sleeping Python process whose command line names
the VM (``guest=<id>,``) as QEMU's does, so process discovery and killing are real.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from hvstack.errors import HypervisorError, InsufficientResources, OperationTimeout
from hvstack.hypervisor.events import BlockIoError, QmpEvent
from hvstack.hypervisor.qemu import driver as qemu_driver
from hvstack.hypervisor.qemu.driver import QemuDriver, QemuMachine
from hvstack.hypervisor.qemu.monitor import Monitor
from tests.fake_qmp import FakeQmp, QmpFailure
from tests.functional.fakes import eventually
from tests.functional.qmp_fakes import VM_ID, Worker


@pytest.fixture
async def qmp(tmp_path: Path) -> AsyncIterator[FakeQmp]:
    async with FakeQmp(tmp_path / "qmp.sock") as server:
        yield server


@pytest.fixture
async def worker() -> AsyncIterator[Worker]:
    proc = await Worker.start()
    yield proc
    await proc.stop()


@pytest.fixture
async def machine(qmp: FakeQmp, worker: Worker) -> AsyncIterator[tuple[QemuMachine,
                                                                         list[QmpEvent]]]:
    events: list[QmpEvent] = []
    attached = await QemuDriver().attach(VM_ID, worker.pid, qmp.path, events.append)
    assert attached is not None
    yield attached, events
    await attached.close()


# -- the monitor ------------------------------------------------------------------------


async def test_connect_waits_for_a_socket_that_appears_late(tmp_path: Path) -> None:
    server = FakeQmp(tmp_path / "qmp.sock")
    server.greeting_delay = 0.05
    monitor = Monitor("vm")
    starting = asyncio.create_task(server.start(listen_after=0.2))
    try:
        await monitor.connect(server.path, timeout=20, retry=0.01)
        assert monitor.connected
        assert await monitor.execute("query-status") == {
            "status": "running", "running": True, "singlestep": False}
    finally:
        await starting
        await monitor.close()
        await server.close()


async def test_connect_gives_up_with_a_hypervisor_error(tmp_path: Path) -> None:
    monitor = Monitor("vm")
    with pytest.raises(HypervisorError, match="cannot reach the QMP monitor of vm"):
        await monitor.connect(str(tmp_path / "nothing.sock"), timeout=0.2, retry=0.01)


async def test_errors_carry_qemus_class_and_message(qmp: FakeQmp) -> None:
    monitor = Monitor("vm")
    await monitor.connect(qmp.path)
    try:
        qmp.reply("device_del", QmpFailure("Device 'nic9' not found", "DeviceNotFound"))
        with pytest.raises(HypervisorError) as raised:
            await monitor.execute("device_del", {"id": "nic9"})
        assert raised.value.message == "QEMU refused device_del: Device 'nic9' not found"
        assert raised.value.data["qmp_class"] == "DeviceNotFound"
        qmp.hang("query-migrate")
        with pytest.raises(OperationTimeout, match="did not answer query-migrate"):
            await monitor.execute("query-migrate", timeout=0.2)
    finally:
        await monitor.close()


async def test_a_lost_monitor_is_a_hypervisor_error(qmp: FakeQmp) -> None:
    monitor = Monitor("vm")
    await monitor.connect(qmp.path)
    qmp.hang("stop")
    try:
        pending = asyncio.create_task(monitor.execute("stop", timeout=20))
        await eventually(lambda: bool(qmp.sent("stop")), "the fake got the command")
        qmp.drop_connections()
        with pytest.raises(HypervisorError):
            await pending
    finally:
        await monitor.close()


# -- events -----------------------------------------------------------------------------


async def test_events_keep_their_data_and_timestamp(
    qmp: FakeQmp, machine: tuple[QemuMachine, list[QmpEvent]]
) -> None:
    _, events = machine
    data = {"device": "", "node-name": "disk1", "operation": "write", "action": "stop",
            "nospace": True, "reason": "No space left on device"}
    await qmp.emit("BLOCK_IO_ERROR", data, timestamp=1_800_000_000.25)
    await qmp.emit("STOP")
    await eventually(lambda: len(events) == 2, "both events arrived")
    error, stop = events
    assert (error.name, dict(error.data), error.timestamp) == (
        "BLOCK_IO_ERROR", data, 1_800_000_000.25)
    assert BlockIoError.of(error) == BlockIoError(
        node_name="disk1", device="", operation="write", action="stop", nospace=True,
        reason="No space left on device")
    assert (stop.name, dict(stop.data)) == ("STOP", {})
    assert BlockIoError.of(stop) is None


async def test_a_failing_event_handler_does_not_stop_the_events(
    qmp: FakeQmp, worker: Worker
) -> None:
    seen: list[str] = []

    def handler(event: QmpEvent) -> None:
        seen.append(event.name)
        if event.name == "STOP":
            raise RuntimeError("handler bug")

    attached = await QemuDriver().attach(VM_ID, worker.pid, qmp.path, handler)
    assert attached is not None
    try:
        await qmp.emit("STOP")
        await qmp.emit("RESUME")
        await eventually(lambda: seen == ["STOP", "RESUME"], "both events were handled")
    finally:
        await attached.close()


# -- attach, quit and kill ----------------------------------------------------------------


async def test_attach_ignores_a_pid_that_is_not_the_vms(qmp: FakeQmp, worker: Worker) -> None:
    driver = QemuDriver()
    assert await driver.attach("another-vm", worker.pid, qmp.path, lambda e: None) is None
    assert qmp.connections == 0


async def test_quit_returns_once_qemu_has_exited(
    qmp: FakeQmp, worker: Worker, machine: tuple[QemuMachine, list[QmpEvent]]
) -> None:
    qmp.quit_hook = worker.exit  # QEMU exits on quit
    await machine[0].quit()
    assert not worker.alive
    assert qmp.sent("quit") == [{}]


async def test_quit_kills_a_qemu_that_does_not_exit(
    qmp: FakeQmp, worker: Worker, machine: tuple[QemuMachine, list[QmpEvent]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(qemu_driver, "QUIT_TIMEOUT", 0.3)
    await machine[0].quit()  # QEMU answers, but its process does not end
    assert not worker.alive
    assert await asyncio.wait_for(worker.proc.wait(), 30) == -signal.SIGKILL


# -- save and restore (migration to a file descriptor) ------------------------------------


def _migrating(transferred: int, total: int) -> dict[str, Any]:
    return {"status": "active", "ram": {"transferred": transferred, "total": total,
                                        "remaining": total - transferred}}


async def test_save_polls_migration_and_reports_progress(
    qmp: FakeQmp, machine: tuple[QemuMachine, list[QmpEvent]], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(qemu_driver, "MIGRATION_POLL", 0.01)
    qmp.reply("query-migrate", _migrating(25, 100), _migrating(75, 100), {"status": "completed"})
    progress: list[float] = []
    target = tmp_path / "state.bin"
    await machine[0].save_state(target, lambda p, _m: progress.append(p))
    assert progress == [25.0, 75.0, 100.0]
    assert qmp.sent("getfd") == [{"fdname": "savestate"}]
    assert qmp.sent("migrate") == [{"uri": "fd:savestate"}]
    # QEMU got the file itself, opened for writing, not a path it could reopen.
    os.write(qmp.fds["savestate"], b"state")
    assert target.read_bytes() == b"state"
    assert (target.stat().st_mode & 0o777) == 0o600


async def test_save_without_space_is_insufficient_resources(
    qmp: FakeQmp, machine: tuple[QemuMachine, list[QmpEvent]], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(qemu_driver, "MIGRATION_POLL", 0.01)
    qmp.reply("query-migrate", _migrating(10, 100), {
        "status": "failed", "error-desc": "Unable to write to file: No space left on device"})
    with pytest.raises(InsufficientResources, match="no space left"):
        await machine[0].save_state(tmp_path / "state.bin", lambda p, m: None)
    assert qmp.sent("migrate_cancel") == [{}]


async def test_a_failed_save_says_why(
    qmp: FakeQmp, machine: tuple[QemuMachine, list[QmpEvent]], tmp_path: Path,
) -> None:
    qmp.reply("query-migrate", {"status": "failed", "error-desc": "Channel error"})
    with pytest.raises(HypervisorError, match="saving the VM state failed: Channel error"):
        await machine[0].save_state(tmp_path / "state.bin", lambda p, m: None)


async def test_restore_waits_until_qemu_leaves_inmigrate(
    qmp: FakeQmp, machine: tuple[QemuMachine, list[QmpEvent]], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(qemu_driver, "MIGRATION_POLL", 0.01)
    state = tmp_path / "state.bin"
    state.write_bytes(b"saved")
    qmp.reply("query-status", *[{"status": s, "running": False} for s in
                                ("inmigrate", "inmigrate", "paused")])
    qmp.reply("query-migrate", {"status": "active"})
    progress: list[float] = []
    await machine[0].restore_state(state, lambda p, _m: progress.append(p))
    assert qmp.sent("migrate-incoming") == [{"uri": "fd:loadstate"}]
    assert os.read(qmp.fds["loadstate"], 10) == b"saved"
    assert progress == [100.0]


async def test_a_failed_restore_says_why(
    qmp: FakeQmp, machine: tuple[QemuMachine, list[QmpEvent]], tmp_path: Path,
) -> None:
    state = tmp_path / "state.bin"
    state.write_bytes(b"saved")
    qmp.reply("query-status", {"status": "inmigrate", "running": False})
    qmp.reply("query-migrate", {"status": "failed", "error-desc": "load of migration failed"})
    with pytest.raises(HypervisorError, match="load of migration failed"):
        await machine[0].restore_state(state, lambda p, m: None)
