"""QEMU over a fake QMP server: the real monitor and machine, with no QEMU running.

:class:`Worker` stands in for QEMU's process: a sleeping Python process whose command
line names the VM (``guest=<id>,``) as QEMU's does, so process discovery, waiting and
killing are real. :class:`QmpDriver` implements the driver protocol with a
:class:`~tests.fake_qmp.FakeQmp` per VM on the spec's QMP socket and hands out real
:class:`~hvstack.hypervisor.qemu.driver.QemuMachine` objects, so the host service can be
tested through the wire without QEMU.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from pathlib import Path

from hvstack.hypervisor.driver import Driver, EventSink
from hvstack.hypervisor.qemu import process
from hvstack.hypervisor.qemu.driver import QemuDriver, QemuMachine
from hvstack.hypervisor.spec import MachineSpec
from tests.fake_qmp import FakeQmp

VM_ID = "0d6c3c1e-7b9a-4d2f-8e1a-3f5b6c7d8e9f"


class Worker:
    """A process that looks like the VM's QEMU; it ignores SIGTERM like a stuck QEMU."""

    def __init__(self, proc: asyncio.subprocess.Process, vm_id: str) -> None:
        self.proc = proc
        self.vm_id = vm_id
        self.pid = proc.pid

    @classmethod
    async def start(cls, vm_id: str = VM_ID) -> Worker:
        code = ("import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "sys.stdout.write('ready\\n'); sys.stdout.flush(); time.sleep(300)")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, f"guest={vm_id},debug-threads=on",
            stdout=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None
        await asyncio.wait_for(proc.stdout.readline(), 30)
        return cls(proc, vm_id)

    @property
    def alive(self) -> bool:
        return process.is_vm_process(self.pid, self.vm_id)

    def exit(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):  # reaped a moment ago
                self.proc.send_signal(signal.SIGKILL)

    async def stop(self) -> None:
        self.exit()
        await self.proc.wait()


class QmpDriver:
    """Launches a :class:`Worker` and a :class:`FakeQmp` per VM; QEMU's own machine."""

    def __init__(self) -> None:
        self.servers: dict[str, FakeQmp] = {}
        self.workers: dict[str, Worker] = {}

    async def launch(self, spec: MachineSpec, pidfile: Path, events: EventSink) -> QemuMachine:
        worker = await Worker.start(spec.vm_id)
        server = await FakeQmp(spec.paths.qmp_socket,
                               status="inmigrate" if spec.incoming else "running").start()
        server.quit_hook = worker.exit
        self.workers[spec.vm_id], self.servers[spec.vm_id] = worker, server
        pidfile.parent.mkdir(parents=True, exist_ok=True)
        pidfile.write_text(f"{worker.pid}\n")
        machine = await QemuDriver().attach(spec.vm_id, worker.pid, server.path, events)
        assert machine is not None
        return machine

    async def attach(self, vm_id: str, pid: int, qmp_socket: str,
                     events: EventSink) -> QemuMachine | None:
        return await QemuDriver().attach(vm_id, pid, qmp_socket, events)

    def release(self) -> None:
        """Nothing is held back (the fake driver's launch gate)."""

    async def close(self) -> None:
        for worker in self.workers.values():
            await worker.stop()
        for server in self.servers.values():
            await server.close()


def _conforms(driver: QmpDriver) -> Driver:
    """Never called: lets mypy check that QmpDriver implements the driver protocol."""
    return driver
