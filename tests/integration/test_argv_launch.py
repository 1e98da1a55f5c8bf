"""The argv builder's output starts real QEMU under TCG, for every generation and OS type.

Each case builds the argv of a small VM (a blank disk, a DVD, a NIC), adds ``-S`` so no
guest code runs, launches it daemonized as the host service does, and over QMP checks
what the argv promised: the VNC server on its unix socket (which speaks RFB), the USB
tablet for Windows, block nodes and devices under the names of their identities, a
screendump through :class:`QemuMachine`; with processor compatibility, the baseline CPU
model and its features. The spec comes from the VM's settings through
:func:`machine_spec`, as the host service makes it. KVM argvs are covered by
the golden files only: this machine has no usable KVM.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from hvstack.compute.lifecycle import VmFiles
from hvstack.compute.machine import COMPATIBLE_CPU_MODEL, MachineHost, machine_spec
from hvstack.compute.model import (
    DiskAttachment,
    DiskBus,
    Generation,
    NetworkAdapter,
    NicModel,
    VmConfig,
)
from hvstack.hypervisor.qemu import process
from hvstack.hypervisor.qemu.argv import build_argv
from hvstack.hypervisor.qemu.driver import QemuMachine
from hvstack.hypervisor.qemu.monitor import Monitor
from hvstack.hypervisor.spec import MachineSpec
from hvstack.pixmap import parse_ppm


@contextlib.asynccontextmanager
async def paused_machine(spec: MachineSpec) -> AsyncIterator[tuple[QemuMachine, Monitor]]:
    """QEMU launched from ``spec``'s argv with ``-S`` (no guest code runs), its QMP
    connected; quit and killed afterwards."""
    pid = await process.launch([*build_argv(spec), "-S"], Path(spec.paths.pidfile))
    monitor = Monitor(VM_ID)
    try:
        await monitor.connect(spec.paths.qmp_socket)
        machine = QemuMachine(VM_ID, pid, monitor, lambda event: None)
        try:
            yield machine, monitor
        finally:
            await machine.quit()
            await machine.close()
    finally:
        process.kill(pid, VM_ID)

pytestmark = pytest.mark.integration

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
VM_ID = "0d3c5a1e-7f52-4b8e-a0c1-2e9f8d7c6b5a"


@pytest.fixture
def run_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="hvargv-"))  # short: unix socket paths
    yield path
    shutil.rmtree(path, ignore_errors=True)


def small_spec(folder: Path, generation: Generation, os_type: str,
               dynamic: bool = False, compatibility: bool = False) -> MachineSpec:
    disk = folder / "disk0.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    dvd = folder / "install.iso"
    dvd.write_bytes(b"\0" * 2048 * 16)
    gen1 = generation is Generation.GEN1
    config = VmConfig(
        name=f"launch-{generation.value}-{os_type}",
        generation=generation,
        memory_bytes=128 * 1024 * 1024,
        disks=(DiskAttachment(str(disk), DiskBus.IDE if gen1 else DiskBus.SCSI,
                              id="d15c0a1b2c"),),
        dvd=str(dvd),
        network_adapters=(NetworkAdapter("52:54:00:aa:bb:cc",
                                         NicModel.E1000 if gen1 else NicModel.VIRTIO),),
        os_type=os_type,
        dynamic_memory=dynamic, memory_minimum_bytes=64 * 1024 * 1024,
        memory_maximum_bytes=1024**3, processor_compatibility=compatibility,
    )
    if not gen1:
        shutil.copyfile(OVMF_VARS, folder / "efivars.fd")
    return machine_spec(VM_ID, config, VmFiles(folder, folder),
                        MachineHost("tcg", str(OVMF_CODE), memory_bytes=8 * 1024**3))


@pytest.mark.parametrize("os_type", ["linux", "windows"])
@pytest.mark.parametrize("generation", list(Generation))
async def test_argv_starts_qemu_under_tcg(run_dir: Path, generation: Generation,
                                          os_type: str) -> None:
    spec = small_spec(run_dir, generation, os_type)
    async with paused_machine(spec) as (machine, monitor):
        assert await machine.status() == "prelaunch"
        vnc: dict[str, Any] = await monitor.execute("query-vnc")
        assert vnc["enabled"] and vnc["family"] == "unix"
        assert vnc["auth"] == "none"
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(spec.paths.vnc_socket), 10)
        assert await asyncio.wait_for(reader.readexactly(12), 10) == b"RFB 003.008\n"
        writer.close()
        mice: list[dict[str, Any]] = await monitor.execute("query-mice")
        tablets = [m for m in mice if m["absolute"]]
        assert bool(tablets) == (os_type == "windows"), mice
        nodes: list[dict[str, Any]] = await monitor.execute("query-named-block-nodes")
        assert {"disk-d15c0a1b2c", "dvd"} <= {n["node-name"] for n in nodes}
        devices: list[dict[str, Any]] = await monitor.execute(
            "qom-list", {"path": "/machine/peripheral"})
        assert {"disk-d15c0a1b2c-dev", "dvd-dev", "nic-525400aabbcc"} <= {
            d["name"] for d in devices}
        if generation is Generation.GEN2:  # the adapter on its own root port
            assert await machine.devices.devices_on("port-525400aabbcc") == (
                "nic-525400aabbcc",)
            assert await machine.devices.devices_on("hotplug-port-3") == ()
        else:  # the adapter on the first of the adapters' slots of the root bus
            slots = await machine.devices.root_bus_slots()
            assert slots[0x10] == "nic-525400aabbcc"
            assert slots[0] == slots[1] == "" and slots[2] == "video0"
        dump = run_dir / "screen.ppm"
        await machine.screendump(dump)
        image = parse_ppm(dump.read_bytes())
        assert image.width >= 320 and image.height >= 200


@pytest.mark.parametrize("generation", list(Generation))
async def test_dynamic_memory_devices_start_under_tcg(run_dir: Path,
                                                      generation: Generation) -> None:
    spec = small_spec(run_dir, generation, "linux", dynamic=True)
    async with paused_machine(spec) as (machine, _monitor):
        devices = await machine.memory.memory_devices()
        region = 8 * 1024**3  # the host's memory
        assert devices["dynmem0"].requested == devices["dynmem0"].plugged == 0
        assert devices["dynmem0"].maximum == region
        await machine.memory.set_memory_device_size("dynmem0", 64 * 1024 * 1024)
        assert (await machine.memory.memory_devices())["dynmem0"].requested == (
            64 * 1024 * 1024)
        assert await machine.memory.balloon_size() == 128 * 1024 * 1024
        if generation is Generation.GEN1:
            slots = await machine.devices.root_bus_slots()
            assert slots[0x0F] == "dynmem0"


@pytest.mark.parametrize("generation", list(Generation))
async def test_processor_compatibility_starts_the_baseline_model_under_tcg(
        run_dir: Path, generation: Generation) -> None:
    # "enforce": QEMU would refuse to start if TCG lacked a feature of the baseline.
    spec = small_spec(run_dir, generation, "linux", compatibility=True)
    assert spec.cpu_model == COMPATIBLE_CPU_MODEL
    async with paused_machine(spec) as (machine, monitor):
        assert await machine.status() == "prelaunch"
        cpus: list[dict[str, Any]] = await monitor.execute("query-cpus-fast")
        path = cpus[0]["qom-path"]

        async def prop(name: str) -> Any:
            return await monitor.execute("qom-get", {"path": path, "property": name})

        assert "Nehalem" in await prop("model-id")
        assert await prop("sse4.2") and await prop("popcnt")
        assert not await prop("avx")  # beyond the baseline (TCG's "max" has it)
