"""Network adapters hot added to and removed from a running tiny guest under TCG,
through compute/nics.py and the real QEMU, and seen by the guest.

One boot per generation (q35/OVMF with virtio, i440fx/SeaBIOS with e1000) of a machine
built by :func:`machine_spec` (the argv the host
service runs), then: a user-mode adapter and a switch port on a real tap (opened with
IFF_VNET_HDR inside a network namespace this test makes, handed to QEMU with
``getfd``, its link down: not connected) are plugged in (Generation 2: into spare
root ports; Generation 1: on the root bus, ACPI hot plug); the guest
agent's ``guest-network-get-interfaces`` lists both MACs and the guest reads the
switch port's carrier off, then on after ``set_link``; both are removed again, the
guest lets go of them, and their MACs leave the guest's list. Then a machine of each
generation saved after adapters were added and one removed is restored from the layout
read off it (Generation 1: root-bus slots), and, end to end
through ``hv``, a VM saved after a hot add starts again from its saved state (before the
layout was kept, QEMU could not load the state into the machine the settings built).
Every wait is on a condition with a generous deadline.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hvstack.compute import nics
from hvstack.compute.lifecycle import VmFiles
from hvstack.compute.machine import BackingFile, MachineHost, machine_spec
from hvstack.compute.model import (
    DiskAttachment,
    DiskBus,
    Generation,
    NetworkAdapter,
    NicModel,
    VmConfig,
)
from hvstack.errors import HvError
from hvstack.hypervisor.qemu import process
from hvstack.hypervisor.qemu.agent import GuestAgent
from hvstack.hypervisor.qemu.argv import build_argv
from hvstack.hypervisor.qemu.driver import QemuMachine
from hvstack.hypervisor.qemu.monitor import Monitor
from hvstack.hypervisor.spec import MachineSpec, PortLayout, nic_device_id
from hvstack.progress import no_progress
from tests.integration.hostproc import HostProcess

pytestmark = pytest.mark.integration

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
VM_ID = "5e0c1d2a-9b8f-4c3e-8d7a-6f5e4d3c2b1a"
BOOT_TIMEOUT = 300.0  # generous: TCG on a loaded 2-core machine
SEEN_TIMEOUT = 120.0
BOOTED_WITH = "52:54:00:00:00:01"
USER_MAC, SWITCH_MAC = "52:54:00:00:00:a1", "52:54:00:00:00:a2"

# Opens a tap (not persistent: it goes with its last descriptor) in the namespace the
# script runs in, and sends the descriptor over the socket it inherited (its argv[1]).
TAP_SCRIPT = """
import fcntl, os, socket, struct, sys
fd = os.open("/dev/net/tun", os.O_RDWR)
flags = 0x0002 | 0x1000 | 0x4000  # IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH", b"hvtnic0", flags))  # TUNSETIFF
socket.socket(fileno=int(sys.argv[1])).sendmsg([b"t"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                          struct.pack("i", fd))])
"""


@pytest.fixture
def folder() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="hvnic-"))  # short: unix socket paths
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def tap() -> Iterator[int]:
    """An open tap in a network namespace of this test's own (never the host's)."""
    namespace = f"hvt-compute-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", namespace], check=True, timeout=30)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        subprocess.run(["ip", "netns", "exec", namespace, sys.executable, "-c", TAP_SCRIPT,
                        str(theirs.fileno())], check=True, timeout=60,
                       pass_fds=(theirs.fileno(),))
        _, fds, _, _ = socket.recv_fds(ours, 1, 1)
        yield fds[0]
        os.close(fds[0])
    finally:
        ours.close()
        theirs.close()
        subprocess.run(["ip", "netns", "delete", namespace], check=False, timeout=30)


@pytest.fixture(params=[Generation.GEN2, Generation.GEN1], ids=["gen2", "gen1"])
def generation(request: pytest.FixtureRequest) -> Generation:
    return Generation(request.param)


def model(generation: Generation) -> NicModel:
    return NicModel.VIRTIO if generation is Generation.GEN2 else NicModel.E1000


def vm_config(disk: Path, generation: Generation, *macs: str) -> VmConfig:
    gen2 = generation is Generation.GEN2
    return VmConfig(name="hotplug", generation=generation, memory_bytes=256 * 2**20,
                    disks=(DiskAttachment(str(disk), DiskBus.SCSI if gen2 else DiskBus.IDE,
                                          id="d15c0a1b2c"),),
                    network_adapters=tuple(NetworkAdapter(m, model(generation)) for m in macs))


async def launch(folder: Path, config: VmConfig, tiny_image: Path, *,
                 incoming: bool = False,
                 layout: PortLayout | None = None) -> tuple[QemuMachine, GuestAgent]:
    spec = machine_spec(VM_ID, config, VmFiles(folder, folder),
                        MachineHost("tcg", str(OVMF_CODE)),
                        chains={"d15c0a1b2c": (BackingFile(str(tiny_image), "qcow2"),)},
                        incoming=incoming, layout=layout)
    return await launch_spec(spec, "hotplug")


async def launch_spec(spec: MachineSpec, name: str) -> tuple[QemuMachine, GuestAgent]:
    """Run ``spec``'s QEMU command line and connect its monitor (no host service)."""
    pid = await process.launch(build_argv(spec), Path(spec.paths.pidfile))
    monitor = Monitor(spec.vm_id)
    try:
        await monitor.connect(spec.paths.qmp_socket)
    except BaseException:
        process.kill(pid, spec.vm_id)
        raise
    return (QemuMachine(spec.vm_id, pid, monitor, lambda event: None),
            GuestAgent(spec.paths.qga_socket, name))


async def stop(machine: QemuMachine, agent: GuestAgent) -> None:
    await agent.close()
    with contextlib.suppress(HvError):
        await machine.quit()
    await machine.close()
    process.kill(machine.pid, VM_ID)


async def prepare(folder: Path, tiny_image: Path, generation: Generation) -> Path:
    disk = folder / "disk0.qcow2"
    await asyncio.to_thread(subprocess.run, [
        "qemu-img", "create", "-q", "-f", "qcow2", "-b", str(tiny_image), "-F", "qcow2",
        str(disk)], check=True, timeout=60)
    if generation is Generation.GEN2:
        shutil.copyfile(OVMF_VARS, folder / "efivars.fd")
    return disk


@pytest.fixture
async def guest(folder: Path, tiny_image: Path,
                generation: Generation) -> AsyncIterator[tuple[QemuMachine, GuestAgent]]:
    disk = await prepare(folder, tiny_image, generation)
    machine, agent = await launch(folder, vm_config(disk, generation, BOOTED_WITH),
                                  tiny_image)
    try:
        await until(lambda: _answers(agent, "guest-ping"), BOOT_TIMEOUT, "the guest agent")
        yield machine, agent
    finally:
        await stop(machine, agent)


async def _answers(agent: GuestAgent, command: str) -> bool:
    try:
        await agent.call(command, timeout=10)
    except HvError:
        return False
    return True


async def until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.5)
    assert await check(), what


async def guest_macs(agent: GuestAgent) -> set[str]:
    interfaces: list[dict[str, Any]] = await agent.call("guest-network-get-interfaces",
                                                        timeout=30)
    return {str(i.get("hardware-address", "")).lower() for i in interfaces}


async def carrier(agent: GuestAgent, mac: str) -> str:
    """The guest's carrier of the adapter with ``mac`` ("0" or "1"), brought up first."""
    script = (f"for d in /sys/class/net/*; do [ \"$(cat $d/address)\" = {mac} ] && "
              "ip link set dev ${d##*/} up && cat $d/carrier; done")
    started = await agent.call("guest-exec", {"path": "/bin/sh", "arg": ["-c", script],
                                              "capture-output": True}, timeout=30)
    async with asyncio.timeout(60):
        while True:
            status = await agent.call("guest-exec-status", {"pid": started["pid"]}, timeout=30)
            if status["exited"]:
                return base64.b64decode(status.get("out-data", "")).decode().strip()
            await asyncio.sleep(0.2)


async def test_adapters_come_and_go_while_the_guest_runs(
        guest: tuple[QemuMachine, GuestAgent], tap: int, generation: Generation) -> None:
    machine, agent = guest
    devices = machine.devices
    gen2 = generation is Generation.GEN2
    user_nic = NetworkAdapter(USER_MAC, model(generation))
    switch_nic = NetworkAdapter(SWITCH_MAC, model(generation), "switch", "")
    assert BOOTED_WITH in await guest_macs(agent)

    # Generation 2 on the spare root ports, Generation 1 on the adapters' root-bus slots
    # (the booted adapter has the first)
    assert await nics.hot_add(devices, user_nic, generation) == (
        "hotplug-port-0" if gen2 else "0x11")
    port = await nics.hot_add(devices, switch_nic, generation, tap_fd=tap)
    assert port == ("hotplug-port-1" if gen2 else "0x12")
    if not gen2:
        slots = await devices.root_bus_slots()
        assert {s: slots[s] for s in (0x10, 0x11, 0x12)} == {
            0x10: nic_device_id(BOOTED_WITH), 0x11: nic_device_id(USER_MAC),
            0x12: nic_device_id(SWITCH_MAC)}

    async def both_seen() -> bool:
        return {user_nic.mac, switch_nic.mac} <= await guest_macs(agent)

    await until(both_seen, SEEN_TIMEOUT, "the guest sees both added adapters")
    # not connected to a switch: its cable is out until the host connects it
    assert await carrier(agent, switch_nic.mac) == "0"
    await nics.set_link(devices, switch_nic.mac, True)

    async def cable_in() -> bool:
        return await carrier(agent, switch_nic.mac) == "1"

    await until(cable_in, SEEN_TIMEOUT, "the carrier comes up after set_link")

    for nic in (user_nic, switch_nic):
        await nics.hot_remove(devices, nic, generation, timeout=SEEN_TIMEOUT)

    async def both_gone() -> bool:
        return not {user_nic.mac, switch_nic.mac} & await guest_macs(agent)

    await until(both_gone, SEEN_TIMEOUT, "the guest no longer lists the adapters")
    assert BOOTED_WITH in await guest_macs(agent)
    if gen2:
        assert await devices.devices_on("hotplug-port-0") == ()
        assert await nics.free_port(devices) == "hotplug-port-0"


async def test_a_saved_machine_comes_back_with_the_adapters_it_had(
        folder: Path, tiny_image: Path, generation: Generation) -> None:
    """Saved after two adapters were added and the first of them removed: restored from
    the layout the running machine had (the settings alone build other hardware: on
    Generation 2 other ports, on Generation 1 the second adapter on the first one's
    slot; QEMU fails to load the state into it)."""
    disk = await prepare(folder, tiny_image, generation)
    machine, agent = await launch(folder, vm_config(disk, generation, BOOTED_WITH),
                                  tiny_image)
    state = folder / "saved-state.bin"
    first, second = (NetworkAdapter(m, model(generation)) for m in (USER_MAC, SWITCH_MAC))
    try:
        await until(lambda: _answers(agent, "guest-ping"), BOOT_TIMEOUT, "the guest agent")
        await nics.hot_add(machine.devices, first, generation)
        where = await nics.hot_add(machine.devices, second, generation)
        assert where is not None

        async def both_seen() -> bool:
            return {USER_MAC, SWITCH_MAC} <= await guest_macs(agent)

        await until(both_seen, SEEN_TIMEOUT, "the guest sees both adapters")
        await nics.hot_remove(machine.devices, first, generation, timeout=SEEN_TIMEOUT)

        async def first_gone() -> bool:
            return USER_MAC not in await guest_macs(agent)

        await until(first_gone, SEEN_TIMEOUT, "the guest lets go of the first")
        layout = await nics.read_layout(machine.devices, generation=generation)
        if generation is Generation.GEN2:
            assert layout == PortLayout.at_launch([BOOTED_WITH]).plugged(SWITCH_MAC, where)
        else:
            assert layout == PortLayout(slots=((BOOTED_WITH, 0x10), (SWITCH_MAC, 0x12)))
            assert where == "0x12"
        await machine.pause()
        await machine.save_state(state, no_progress)
    finally:
        await stop(machine, agent)

    restored, agent = await launch(folder, vm_config(disk, generation, BOOTED_WITH,
                                                     SWITCH_MAC),
                                   tiny_image, incoming=True, layout=layout)
    try:
        await restored.restore_state(state, no_progress)
        await restored.resume()
        macs = await guest_macs(agent)
        assert {BOOTED_WITH, SWITCH_MAC} <= macs and USER_MAC not in macs
        assert await nics.read_layout(restored.devices, generation=generation) == layout
    finally:
        await stop(restored, agent)


def test_the_service_saves_and_restores_a_vm_after_a_hot_add(host: HostProcess) -> None:
    """End to end through ``hv``: an adapter hot added to a running Generation 2 VM,
    then ``hv vm save`` and ``hv vm start`` bring the guest back with it."""
    host.ok("vm", "create", "hot", "--generation", "2", "--image", "tiny",
            "--memory", "256M")
    host.ok("vm", "start", "hot")
    guest = host.guest("hot")
    guest.wait_ready()
    host.ok("vm", "nic", "add", "hot", "--user-mode", "--mac", USER_MAC)

    def guest_has_it() -> bool:
        code, out = guest.sh("cat /sys/class/net/*/address")
        return code == 0 and USER_MAC in out.split()

    deadline = time.monotonic() + SEEN_TIMEOUT
    while not guest_has_it():
        assert time.monotonic() < deadline, "the guest never saw the added adapter"
        time.sleep(0.5)
    host.ok("vm", "save", "hot")
    folder = Path(host.vm("hot")["folder"])
    assert "hotplugged" in (folder / "saved-state.layout.json").read_text()
    host.ok("vm", "start", "hot")
    assert host.vm("hot")["state"] == "Running"
    guest.wait_ready()
    assert guest_has_it()
    # the guest resumed rather than booted again
    assert host.console("hot").count("Linux version") == 1
