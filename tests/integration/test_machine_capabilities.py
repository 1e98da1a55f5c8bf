"""The machine capabilities against real QEMU under TCG (``-S``: no guest code runs).

Descriptors passed at launch and over QMP, a NIC hot-plugged on a passed socket, the
balloon, and the empty migration and block job states, as QEMU 7.2 reports them.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hvstack.compute.model import Generation
from hvstack.errors import OperationTimeout
from hvstack.hypervisor.capabilities import DeviceSpec, NetdevSpec
from hvstack.hypervisor.events import QmpEvent
from hvstack.hypervisor.qemu import process
from hvstack.hypervisor.qemu.argv import build_argv
from hvstack.hypervisor.qemu.driver import QemuMachine
from hvstack.hypervisor.qemu.monitor import Monitor
from tests.integration.test_argv_launch import VM_ID, small_spec

pytestmark = pytest.mark.integration
MiB = 1024 * 1024


@pytest.fixture
def run_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="hvcaps-"))  # short: unix socket paths
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def test_capabilities_on_real_qemu(run_dir: Path) -> None:
    spec = small_spec(run_dir, Generation.GEN1, "linux")
    launch_file = run_dir / "passed-at-launch"
    launch_file.write_bytes(b"x")
    launch_fd = os.open(launch_file, os.O_RDONLY)  # not inheritable: pass_fds makes it so
    try:
        argv = [*build_argv(spec), "-S", "-add-fd", f"fd={launch_fd},set=7,opaque=at-launch"]
        pid = await process.launch(argv, Path(spec.paths.pidfile), pass_fds=[launch_fd])
    finally:
        os.close(launch_fd)
    monitor = Monitor(VM_ID)
    events: list[QmpEvent] = []
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await monitor.connect(spec.paths.qmp_socket)
        machine = QemuMachine(VM_ID, pid, monitor, events.append)
        try:
            fdsets: list[dict[str, Any]] = await monitor.execute("query-fdsets")
            assert [(s["fdset-id"], [f.get("opaque") for f in s["fds"]]) for s in fdsets] == [
                (7, ["at-launch"])]

            member = await machine.devices.add_fd(ours.fileno(), fdset=8, opaque="later")
            assert member.fdset == 8 and member.path == "/dev/fdset/8"
            await machine.devices.remove_fdset(8)

            await machine.devices.pass_fd(theirs.fileno(), "net1-socket")
            await machine.devices.add_netdev(NetdevSpec("net1", "socket", {"fd": "net1-socket"}))
            await machine.devices.add_device(DeviceSpec(
                "virtio-net-pci", "nic1", {"netdev": "net1", "mac": "52:54:00:00:00:01"}))
            pci = await monitor.execute("query-pci")
            ids = [d.get("qdev_id") for bus in pci for d in bus["devices"]]
            assert "nic1" in ids
            # No guest runs to acknowledge the unplug: QEMU keeps the device.
            with pytest.raises(OperationTimeout, match="did not release device nic1"):
                await machine.devices.remove_device("nic1", timeout=1)

            await machine.devices.add_device(DeviceSpec("virtio-balloon-pci", "balloon0"))
            assert await machine.memory.balloon_size() == 128 * MiB
            await machine.memory.set_stats_interval(2)
            stats = await machine.memory.balloon_stats()
            assert stats.free is None  # the guest has not reported anything

            assert (await machine.migration.stats()).status == "none"
            assert await machine.block_jobs.jobs() == []
        finally:
            await machine.quit()
            await machine.close()
    finally:
        ours.close()
        theirs.close()
        process.kill(pid, VM_ID)
        await asyncio.sleep(0)
