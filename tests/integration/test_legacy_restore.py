"""A state saved by the previous release (88d3ce2) is restored by the real QEMU under
TCG, on the hardware that release built.

A tiny guest of each generation runs on the previous release's machine (its argv is
``legacy_nic_layout``'s: the unit goldens in ``tests/golden/legacy`` prove them equal)
and is saved, with no layout file beside its state, as that release left it. QEMU
refuses to load that state into the machine this release builds from the settings (its
adapter sits on a root port of its own: the bug this fixes), and loads it into the one
:func:`~hvstack.compute.nics.with_saved_layout` builds: the guest goes on running, not
booted again. Every wait is on a condition with a generous deadline.
"""

from __future__ import annotations

import asyncio
import base64
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from hvstack.compute import nics
from hvstack.compute.lifecycle import VmFiles
from hvstack.compute.machine import BackingFile, MachineHost, machine_spec
from hvstack.compute.model import Generation, VmConfig
from hvstack.errors import HvError
from hvstack.hypervisor.qemu.agent import GuestAgent
from hvstack.hypervisor.qemu.argv import build_argv
from hvstack.hypervisor.spec import MachineSpec
from hvstack.progress import no_progress
from tests.integration.test_nic_hotplug import (
    BOOT_TIMEOUT,
    BOOTED_WITH,
    OVMF_CODE,
    VM_ID,
    _answers,
    guest_macs,
    launch_spec,
    prepare,
    stop,
    until,
    vm_config,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def folder() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="hvlegacy-"))  # short: unix socket paths
    yield path
    shutil.rmtree(path, ignore_errors=True)


def spec_of(folder: Path, config: VmConfig, tiny_image: Path, *,
            incoming: bool = False) -> MachineSpec:
    return machine_spec(VM_ID, config, VmFiles(folder, folder),
                        MachineHost("tcg", str(OVMF_CODE)),
                        chains={"d15c0a1b2c": (BackingFile(str(tiny_image), "qcow2"),)},
                        incoming=incoming)


async def guest_cat(agent: GuestAgent, path: str) -> str:
    started = await agent.call("guest-exec", {"path": "/bin/cat", "arg": [path],
                                              "capture-output": True}, timeout=30)
    async with asyncio.timeout(60):
        while True:
            status = await agent.call("guest-exec-status", {"pid": started["pid"]}, timeout=30)
            if status["exited"]:
                return base64.b64decode(status.get("out-data", "")).decode().strip()
            await asyncio.sleep(0.2)


@pytest.mark.parametrize("generation", [Generation.GEN2, Generation.GEN1],
                         ids=["gen2", "gen1"])
async def test_a_state_the_previous_release_saved_is_restored_on_its_hardware(
        folder: Path, tiny_image: Path, generation: Generation) -> None:
    disk = await prepare(folder, tiny_image, generation)
    config = vm_config(disk, generation, BOOTED_WITH)
    files = VmFiles(folder, folder)
    state = files.saved_state
    # as the previous release ran it
    old = replace(spec_of(folder, config, tiny_image), legacy_nic_layout=True)
    machine, agent = await launch_spec(old, "legacy")
    try:
        await until(lambda: _answers(agent, "guest-ping"), BOOT_TIMEOUT, "the guest agent")
        await agent.call("guest-exec", {"path": "/bin/sh", "arg": [
            "-c", "echo before-save > /tmp/hv-marker"]}, timeout=30)
        await machine.pause()
        await machine.save_state(state, no_progress)
    finally:
        await stop(machine, agent)
    assert not files.saved_layout.exists()

    # this release's machine from the settings: QEMU cannot load the state into it
    current = spec_of(folder, config, tiny_image, incoming=True)
    assert build_argv(current) != build_argv(replace(old, incoming=True))
    machine, agent = await launch_spec(current, "legacy")
    try:
        # QEMU: Unknown ramblock "0000:00:05.0/virtio-net-pci.rom" (Generation 1:
        # the e1000's), cannot accept migration; load of migration failed (it exits)
        with pytest.raises(HvError):
            await machine.restore_state(state, no_progress)
    finally:
        await stop(machine, agent)

    restored_spec = nics.with_saved_layout(current, files.saved_layout)
    assert restored_spec.legacy_nic_layout and build_argv(restored_spec) == build_argv(
        replace(old, incoming=True))
    restored, agent = await launch_spec(restored_spec, "legacy")
    try:
        await restored.restore_state(state, no_progress)
        await restored.resume()
        await until(lambda: _answers(agent, "guest-ping"), BOOT_TIMEOUT,
                    "the guest agent after the restore")
        assert BOOTED_WITH in await guest_macs(agent)
        # the guest went on from where it was saved: its /tmp kept the file
        assert await guest_cat(agent, "/tmp/hv-marker") == "before-save"
        assert await nics.runs_legacy_layout(restored.devices, generation)
    finally:
        await stop(restored, agent)
