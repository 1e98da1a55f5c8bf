"""The narrow driver interface the compute layer uses to run VMs.

:class:`Driver` launches or re-finds a VM's worker process and hands back a
:class:`Machine`, a handle on that one process. :mod:`hvstack.hypervisor.qemu.driver`
implements it with QEMU; tests implement it with fakes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from hvstack.hypervisor.capabilities import BlockJobs, Devices, Memory, Migration
from hvstack.hypervisor.events import EventSink, QmpEvent
from hvstack.hypervisor.spec import MachineSpec
from hvstack.progress import Progress

__all__ = ["Driver", "EventSink", "Machine", "QmpEvent"]


class Machine(Protocol):
    """One running VM worker process.

    Beyond power and state, its capabilities are small interfaces of their own
    (:mod:`hvstack.hypervisor.capabilities`): ``devices``, ``memory``, ``migration``
    and ``block_jobs``.
    """

    pid: int

    @property
    def devices(self) -> Devices: ...
    @property
    def memory(self) -> Memory: ...
    @property
    def migration(self) -> Migration: ...
    @property
    def block_jobs(self) -> BlockJobs: ...

    async def status(self) -> str:
        """QEMU's run state: "running", "paused", "inmigrate", "postmigrate", ..."""
        ...

    async def pause(self) -> None: ...
    async def resume(self) -> None: ...
    async def power_button(self) -> None: ...
    async def reset(self) -> None: ...

    async def save_state(self, path: Path, progress: Progress) -> None:
        """Write the paused machine's memory and device state to ``path``."""
        ...

    async def restore_state(self, path: Path, progress: Progress) -> None:
        """Load state saved by :meth:`save_state` into a machine started to receive it."""
        ...

    async def screendump(self, path: Path) -> None:
        """Write the display as a binary PPM (P6) image to ``path``."""
        ...

    async def quit(self) -> None:
        """Ask QEMU to exit now (turn off), and return once it has."""
        ...

    async def wait_exit(self) -> None: ...
    async def close(self) -> None:
        """Drop the monitor connection; the process keeps running."""
        ...


class Driver(Protocol):
    async def launch(self, spec: MachineSpec, pidfile: Path, events: EventSink) -> Machine: ...

    async def attach(
        self, vm_id: str, pid: int, qmp_socket: str, events: EventSink
    ) -> Machine | None:
        """Reconnect to a VM's process if it is still alive, else return None."""
        ...
