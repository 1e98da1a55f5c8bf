"""QEMU processes: launch daemonized, find them again, wait for them to exit, kill them.

QEMU runs with ``-daemonize`` in its own session, so it is not a child of the host
service and outlives it. A process is only taken to be a VM's when its command line
names the VM's id (a pid in a stale pidfile may belong to anything by now).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Sequence
from pathlib import Path

from hvstack import runner
from hvstack.errors import HvError, HypervisorError, OperationTimeout, ResourceBusy

LAUNCH_TIMEOUT = 60.0


async def launch(argv: list[str], pidfile: Path, *, timeout: float = LAUNCH_TIMEOUT,
                 pass_fds: Sequence[int] = ()) -> int:
    """Run a daemonizing QEMU argv; return the daemon's pid once it is initialised.

    QEMU's parent exits only after the machine is set up, so failures (a locked disk,
    a bad option) come back here as a non-zero exit with the reason on stderr.
    ``pass_fds`` stay open in QEMU under their numbers, for options that name them
    (``fd=N``, ``/dev/fdset/N`` with ``-add-fd fd=N,set=S``); QEMU closes the others.
    """
    with contextlib.suppress(FileNotFoundError):
        pidfile.unlink()
    try:
        await runner.run(argv, timeout=timeout, errors=_launch_error, pass_fds=pass_fds,
                         package="qemu-system-x86", stdout=False)
    except OperationTimeout as exc:
        raise OperationTimeout(
            f"QEMU did not finish starting within {timeout:.0f} s") from exc
    pid = read_pid(pidfile)
    if pid is None:
        raise HypervisorError("QEMU started but wrote no pidfile")
    return pid


def _launch_error(returncode: int, stderr: str) -> HvError:
    message = stderr or f"exit status {returncode}"
    if "Failed to get" in message and "lock" in message:
        return ResourceBusy(f"a disk of this VM is in use by another process: {message}",
                            qemu_stderr=message)
    return HypervisorError(f"QEMU failed to start: {message}", qemu_stderr=message)


def read_pid(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


def is_vm_process(pid: int, vm_id: str) -> bool:
    """True if ``pid`` is alive and is the QEMU process of ``vm_id``."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        status = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if status.rpartition(")")[2].split()[0] == "Z":
        return False
    return f"guest={vm_id},".encode() in cmdline


async def wait_exit(pid: int, vm_id: str, poll: float = 0.5) -> None:
    """Return when the VM's process has exited (it need not be our child).

    A pidfd tells at once; polling /proc stays as the fallback for old kernels.
    """
    try:
        pidfd = os.pidfd_open(pid)
    except (OSError, AttributeError):
        pidfd = -1
    if pidfd >= 0:
        loop = asyncio.get_running_loop()
        exited = loop.create_future()

        def on_exit() -> None:
            if not exited.done():
                exited.set_result(None)

        loop.add_reader(pidfd, on_exit)
        try:
            while is_vm_process(pid, vm_id):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(exited), 5.0)
                if exited.done():
                    break
        finally:
            loop.remove_reader(pidfd)
            os.close(pidfd)
        return
    while is_vm_process(pid, vm_id):
        await asyncio.sleep(poll)


def kill(pid: int, vm_id: str, sig: int = signal.SIGKILL) -> None:
    if is_vm_process(pid, vm_id):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
