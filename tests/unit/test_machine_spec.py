"""A VM's settings translated into the machine description (compute.machine)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from hvstack.compute.lifecycle import VmFiles
from hvstack.compute.machine import (
    COMPATIBLE_CPU_MODEL,
    BackingFile,
    MachineHost,
    machine_spec,
)
from hvstack.compute.model import (
    BootDevice,
    DiskAttachment,
    DiskBus,
    Generation,
    NetworkAdapter,
    NicModel,
    VmConfig,
)
from hvstack.compute.nics import with_saved_layout
from hvstack.errors import HypervisorError, InvalidInput
from hvstack.hypervisor.qemu.argv import build_argv
from hvstack.hypervisor.spec import MachineSpec, PortLayout, TapNetdev, UserNetdev
from tests.unit import test_argv
from tests.unit.test_argv import FOLDER, GIB, IMAGE, ISO, MAC, RUN, VM_ID

FILES = VmFiles(Path(FOLDER), Path(RUN))
OVMF = "/usr/share/OVMF/OVMF_CODE_4M.fd"
SWITCHED = "52:54:00:ab:cd:ef"


def gen1_config(os_type: str = "linux") -> VmConfig:
    return VmConfig(
        name="legacy", generation=Generation.GEN1, cpus=2, memory_bytes=1 * GIB,
        disks=(DiskAttachment(f"{FOLDER}/disk0.qcow2", DiskBus.IDE, "qcow2", id="0a1b2c3d4e"),),
        dvd=ISO, network_adapters=(NetworkAdapter(MAC, NicModel.E1000),), os_type=os_type,
    )


def gen2_config(os_type: str = "linux") -> VmConfig:
    return VmConfig(
        name="modern", generation=Generation.GEN2, cpus=2, memory_bytes=1 * GIB,
        disks=(DiskAttachment(f"{FOLDER}/disk0.qcow2", DiskBus.SCSI, "qcow2", id="0a1b2c3d4e"),
               DiskAttachment("/srv/disks/data.raw", DiskBus.VIRTIO, "raw", id="5f6a7b8c9d")),
        dvd=ISO, network_adapters=(NetworkAdapter(MAC, NicModel.VIRTIO),),
        boot_order=(BootDevice.DVD, BootDevice.DISK), os_type=os_type,
    )


CHAINS = {
    1: {"0a1b2c3d4e": (BackingFile(IMAGE, "qcow2"),)},
    2: {"0a1b2c3d4e": (BackingFile("/srv/disks/mid.qcow2", "qcow2"),
                       BackingFile("/srv/disks/base.raw", "raw"))},
}


def spec_of(config: VmConfig, accelerator: str = "tcg", host_memory: int = 0,
            **kwargs: object) -> MachineSpec:
    chains = kwargs.pop("chains", CHAINS[config.generation])
    return machine_spec(VM_ID, config, FILES,
                        MachineHost(accelerator, OVMF, memory_bytes=host_memory),
                        chains=chains, **kwargs)  # type: ignore[arg-type]


def dynamic(config: VmConfig) -> VmConfig:
    return replace(config, memory_bytes=256 * 2**20, dynamic_memory=True,
                   memory_minimum_bytes=128 * 2**20, memory_maximum_bytes=4 * GIB)


HOST_MEMORY = 31 * GIB + 123 * 2**20  # the region reaches it, rounded up to a GiB


@pytest.mark.parametrize("os_type", ["linux", "windows"])
@pytest.mark.parametrize("accelerator", ["kvm", "tcg"])
def test_settings_make_the_machines_of_the_golden_files(accelerator: str, os_type: str) -> None:
    # test_argv pins build_argv() of these specs in tests/golden
    assert spec_of(gen1_config(os_type), accelerator) == test_argv.gen1_spec(accelerator,
                                                                             os_type)
    assert spec_of(gen2_config(os_type), accelerator) == test_argv.gen2_spec(accelerator,
                                                                             os_type)


GOLDEN_SETTINGS = {
    "argv_gen1": (gen1_config(), "tcg"),
    "argv_gen2": (gen2_config(), "tcg"),
    "argv_gen2_kvm": (gen2_config(), "kvm"),
    "argv_gen2_windows": (gen2_config("windows"), "kvm"),
    "argv_gen2_windows_tcg": (gen2_config("windows"), "tcg"),
    "argv_gen1_windows_kvm": (gen1_config("windows"), "kvm"),
    "argv_gen1_windows_tcg": (gen1_config("windows"), "tcg"),
    "argv_gen2_switch": (replace(gen2_config(), network_adapters=(
        NetworkAdapter(SWITCHED, NicModel.VIRTIO, "switch", "sw1"),
        NetworkAdapter(MAC, NicModel.VIRTIO))), "kvm"),
    "argv_gen1_switch": (replace(gen1_config(), disks=(
        *gen1_config().disks,
        DiskAttachment("/srv/disks/data.raw", DiskBus.VIRTIO, "raw", id="5f6a7b8c9d")),
        network_adapters=(NetworkAdapter(SWITCHED, NicModel.E1000, "switch", "sw1"),
                          NetworkAdapter(MAC, NicModel.E1000))), "tcg"),
}
SWITCH_TAPS = {"argv_gen2_switch": {SWITCHED: 3}, "argv_gen1_switch": {SWITCHED: 3}}
GOLDEN_SETTINGS |= {"argv_gen2_windows_compatibility": (
    replace(gen2_config("windows"), processor_compatibility=True), "kvm")}
GOLDEN_SETTINGS |= {"argv_gen1_dynamic_memory": (dynamic(gen1_config()), "tcg"),
                    "argv_gen2_dynamic_memory": (dynamic(gen2_config()), "tcg")}


@pytest.mark.parametrize("name", sorted(GOLDEN_SETTINGS))
def test_golden_through_the_settings(name: str) -> None:
    assert set(GOLDEN_SETTINGS) == set(test_argv.GOLDEN_SPECS)
    config, accelerator = GOLDEN_SETTINGS[name]
    spec = spec_of(config, accelerator, HOST_MEMORY, tap_fds=SWITCH_TAPS.get(name, {}))
    assert spec == test_argv.GOLDEN_SPECS[name]()
    test_argv.check_golden(name, build_argv(spec))


def test_static_memory_does_not_depend_on_the_hosts_memory() -> None:
    assert spec_of(gen1_config(), host_memory=HOST_MEMORY) == spec_of(gen1_config())


def test_the_region_covers_a_maximum_beyond_the_hosts_memory() -> None:
    config = replace(dynamic(gen2_config()), memory_maximum_bytes=40 * GIB)
    assert spec_of(config, host_memory=HOST_MEMORY).memory.max_bytes == 40 * GIB


def test_a_switch_port_gets_its_tap_and_qemu_inherits_it() -> None:
    config = replace(gen2_config(), network_adapters=(
        NetworkAdapter(MAC, NicModel.VIRTIO, "switch"),  # not connected: a tap all the same
        NetworkAdapter(SWITCHED, NicModel.VIRTIO, "switch", "sw1"),
        NetworkAdapter("52:54:00:00:00:01", NicModel.VIRTIO)))
    spec = spec_of(config, tap_fds={SWITCHED.upper(): 12, MAC: 7})
    assert [n.backend for n in spec.net_devices] == [TapNetdev("7"), TapNetdev("12"),
                                                     UserNetdev()]
    assert spec.pass_fds == (7, 12)
    assert spec_of(gen2_config()).pass_fds == ()


def test_a_layout_is_kept_for_either_generation() -> None:
    layout = PortLayout.at_launch([MAC])
    assert spec_of(gen2_config(), layout=layout).layout == layout
    slots = PortLayout(slots=((MAC, 0x13),))
    assert spec_of(gen1_config(), layout=slots).layout == slots


def test_a_switch_port_without_a_tap_is_an_error_naming_it() -> None:
    config = replace(gen2_config(), network_adapters=(
        NetworkAdapter(MAC, NicModel.VIRTIO),
        NetworkAdapter(SWITCHED, NicModel.VIRTIO, "switch", "sw1")))
    with pytest.raises(HypervisorError, match=f"adapter {SWITCHED} is a switch port"):
        spec_of(config, tap_fds={MAC: 4})


def test_names_follow_identities_not_positions() -> None:
    a = DiskAttachment("/srv/a.qcow2", DiskBus.VIRTIO, "qcow2", id="aaaaaaaaaa")
    b = DiskAttachment("/srv/b.qcow2", DiskBus.VIRTIO, "qcow2", id="bbbbbbbbbb")
    nic_a = NetworkAdapter("52:54:00:00:00:0a", NicModel.VIRTIO)
    nic_b = NetworkAdapter("52:54:00:00:00:0b", NicModel.VIRTIO)
    seen = []
    for disks, nics in (((a, b), (nic_a, nic_b)), ((b, a), (nic_b, nic_a))):
        config = replace(gen2_config(), disks=disks, network_adapters=nics)
        spec = spec_of(config, chains={})
        seen.append(({d.id: d.node.id for d in spec.block_devices},
                     {n.id: n.netdev_id for n in spec.net_devices}))
    assert seen[0] == seen[1]
    assert seen[0] == ({"disk-aaaaaaaaaa-dev": "disk-aaaaaaaaaa",
                        "disk-bbbbbbbbbb-dev": "disk-bbbbbbbbbb", "dvd-dev": "dvd"},
                       {"nic-52540000000a": "net-52540000000a",
                        "nic-52540000000b": "net-52540000000b"})


def test_a_disk_recorded_before_ids_keeps_its_names() -> None:
    old = DiskAttachment("/srv/old.qcow2", DiskBus.VIRTIO)  # a record from before ids
    assert old.id and old.id == DiskAttachment("/srv/old.qcow2", DiskBus.IDE).id
    config = VmConfig.from_json(replace(gen2_config(), disks=(old,)).to_json())
    assert config.disks[0].id == old.id and config.disks[0].owned is False
    [disk, _] = spec_of(config, chains={}).block_devices
    assert disk.node.id == f"disk-{old.id}"
    odd = DiskAttachment("/srv/odd.qcow2", DiskBus.VIRTIO, id="not a plain id")
    [disk, _] = spec_of(replace(config, disks=(odd,)), chains={}).block_devices
    assert disk.node.id.startswith("disk-") and len(disk.node.id) == 15


def test_boot_order_becomes_boot_indices() -> None:
    config = replace(gen1_config(), boot_order=(BootDevice.NETWORK, BootDevice.DISK))
    spec = spec_of(config)
    assert [d.boot_index for d in spec.block_devices] == [2, None]
    assert [n.boot_index for n in spec.net_devices] == [1]
    spec = spec_of(replace(config, boot_order=()))
    assert {d.boot_index for d in (*spec.block_devices, *spec.net_devices)} == {None}


def test_generation_picks_chipset_firmware_and_dvd_bus() -> None:
    gen1, gen2 = spec_of(gen1_config()), spec_of(gen2_config(), incoming=True)
    assert (gen1.chipset.value, type(gen1.firmware).__name__) == ("i440fx", "SeaBios")
    assert (gen2.chipset.value, type(gen2.firmware).__name__) == ("q35", "Uefi")
    assert gen2.firmware == test_argv.Uefi(OVMF, f"{FOLDER}/efivars.fd")
    assert (gen1.block_devices[-1].bus.value, gen2.block_devices[-1].bus.value) == (
        "ide", "scsi")
    assert gen2.incoming and not gen1.incoming


def test_two_adapters_with_one_mac_are_refused() -> None:
    config = replace(gen2_config(), network_adapters=(NetworkAdapter(MAC, NicModel.VIRTIO),) * 2)
    with pytest.raises(InvalidInput, match="nic-525400123456"):
        spec_of(config)


@pytest.mark.parametrize("name", test_argv.LEGACY_GOLDENS)
def test_a_state_without_a_layout_file_gets_the_previous_releases_argv(
        name: str, tmp_path: Path) -> None:
    """The settings of each configuration the previous release had, restored from a
    state it saved (no layout file): exactly that release's argv (its goldens)."""
    config, accelerator = GOLDEN_SETTINGS[name]
    spec = with_saved_layout(spec_of(config, accelerator),
                             tmp_path / "saved-state.layout.json")
    assert spec.legacy_nic_layout
    expected = (test_argv.LEGACY_GOLDEN_DIR / f"{name}.json").read_text()
    assert json.loads(expected) == build_argv(spec)


@pytest.mark.parametrize("accelerator", ["kvm", "tcg"])
@pytest.mark.parametrize("make", [gen1_config, gen2_config])
def test_processor_compatibility_names_the_baseline_model(
        make: object, accelerator: str) -> None:
    assert callable(make)
    assert spec_of(make(), accelerator).cpu_model is None  # the host's own processor
    compatible = spec_of(replace(make(), processor_compatibility=True), accelerator)
    assert compatible.cpu_model == COMPATIBLE_CPU_MODEL == "Nehalem-v1"
