"""QemuDriver.launch against a fake QEMU executable that daemonizes and serves QMP.

The real launch path runs: the argv from the spec, the runner, the daemon's pidfile,
the monitor connecting while QEMU starts (the connect race), errors from QEMU's stderr,
and quit.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from hvstack.errors import ResourceBusy
from hvstack.hypervisor.events import QmpEvent
from hvstack.hypervisor.qemu import process
from hvstack.hypervisor.qemu.driver import QemuDriver
from hvstack.hypervisor.spec import Chipset, MachineSpec, MemorySpec, RuntimePaths
from tests import fake_qemu

VM_ID = "5e0b3f9a-1c2d-4e5f-8a9b-0c1d2e3f4a5b"


@pytest.fixture
def folder() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="hvdrv-"))  # short: unix socket paths
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _spec(folder: Path) -> MachineSpec:
    paths = RuntimePaths(
        qmp_socket=str(folder / "qmp.sock"), serial_socket=str(folder / "serial.sock"),
        serial_log=str(folder / "console.log"), qga_socket=str(folder / "qga.sock"),
        pidfile=str(folder / "qemu.pid"), vnc_socket=str(folder / "vnc.sock"),
    )
    return MachineSpec(vm_id=VM_ID, chipset=Chipset.Q35, accelerator="tcg", cpus=1,
                       memory=MemorySpec(512 * 1024 * 1024), paths=paths,
                       binary=str(fake_qemu.install(folder)))


@pytest.mark.parametrize("mode", ["ok", "late-socket"])
async def test_launch_connects_while_qemu_starts_and_quit_ends_it(
    folder: Path, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HV_FAKE_QEMU", mode)
    spec = _spec(folder)
    events: list[QmpEvent] = []
    machine = await QemuDriver().launch(spec, Path(spec.paths.pidfile), events.append)
    try:
        assert process.read_pid(Path(spec.paths.pidfile)) == machine.pid
        assert process.is_vm_process(machine.pid, VM_ID)
        assert await machine.status() == "running"
        await machine.pause()
        for _ in range(500):
            if events:
                break
            await asyncio.sleep(0.01)
        assert [e.name for e in events] == ["STOP"]
        await asyncio.wait_for(machine.quit(), 30)
        assert not process.is_vm_process(machine.pid, VM_ID)
    finally:
        process.kill(machine.pid, VM_ID)
        await machine.close()


async def test_a_locked_disk_is_resource_busy_and_leaves_no_connection_behind(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HV_FAKE_QEMU", "locked")
    spec = _spec(folder)
    before = {t for t in asyncio.all_tasks() if not t.done()}
    with pytest.raises(ResourceBusy, match="in use by another process") as raised:
        await QemuDriver().launch(spec, Path(spec.paths.pidfile), lambda event: None)
    assert "Failed to get \"write\" lock" in str(raised.value.data["qemu_stderr"])
    await asyncio.sleep(0)
    assert {t for t in asyncio.all_tasks() if not t.done()} <= before
