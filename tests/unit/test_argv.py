"""Golden tests for the QEMU command line, and the escaping of every user string in it.

The goldens live in ``tests/golden/<name>.json`` (a JSON list of argv strings, one per
line). After an intended change to :func:`build_argv`, regenerate them with
``HV_UPDATE_GOLDEN=1 pytest tests/unit/test_argv.py`` and review the diff in git.

The specs here are built by hand from the hypervisor's own types (no VM settings);
``test_machine_spec.py`` checks that the settings of the same VMs give these very specs
and goldens.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from hvstack.errors import InvalidInput
from hvstack.hypervisor.qemu.argv import (
    HYPERV_ENLIGHTENMENTS,
    block_node_paths,
    build_argv,
    escape_option,
)
from hvstack.hypervisor.spec import (
    DVD_DEVICE,
    DVD_NODE,
    HOTPLUG_PORTS,
    BlockBus,
    BlockDevice,
    BlockNode,
    Chipset,
    Enlightenments,
    MachineSpec,
    MediaKind,
    MemorySpec,
    NetDevice,
    NicModel,
    PortLayout,
    RuntimePaths,
    TapNetdev,
    Uefi,
    backing_node_id,
    disk_device_id,
    disk_node_id,
    nic_device_id,
)

GOLDEN_DIR = Path(__file__).resolve().parents[1] / "golden"
VM_ID = "6b1f0c8e-2d4a-4f7e-9c3b-5a6d7e8f9012"
FOLDER = f"/var/lib/hvstack/vms/{VM_ID}"
RUN = f"/run/hvstack-0123456789/{VM_ID}"
MAC = "52:54:00:12:34:56"
GIB = 1024**3
IMAGE = "/var/lib/hvstack/images/tiny.qcow2"
ISO = "/var/lib/hvstack/iso/install.iso"
DISK0 = "0a1b2c3d4e"
WINDOWS = Enlightenments(hyperv=True, rtc_localtime=True, usb_tablet=True)

# Options whose value QEMU parses with its classic ``key=value,...`` syntax.
OPTION_SYNTAX = {"-name", "-machine", "-accel", "-m", "-rtc", "-chardev", "-mon", "-sandbox",
                 "-smp", "-cpu", "-display", "-serial", "-vnc", "-global"}


def paths(run: str = RUN, folder: str = FOLDER) -> RuntimePaths:
    return RuntimePaths(
        qmp_socket=f"{run}/qmp.sock",
        serial_socket=f"{run}/serial.sock",
        serial_log=f"{folder}/console.log",
        qga_socket=f"{run}/qga.sock",
        pidfile=f"{folder}/qemu.pid",
        vnc_socket=f"{run}/vnc.sock",
    )


def disk(disk_id: str, path: str, fmt: str = "qcow2", *parents: tuple[str, str]) -> BlockNode:
    """A disk's node over its parents (path, format), nearest first."""
    below = None
    for parent, parent_format in reversed(parents):
        below = BlockNode(backing_node_id(disk_id, parent), parent, parent_format, True, below)
    return BlockNode(disk_node_id(disk_id), path, fmt, False, below)


def dvd(bus: BlockBus, boot_index: int | None, path: str = ISO) -> BlockDevice:
    return BlockDevice(DVD_DEVICE, bus, BlockNode(DVD_NODE, path, "raw", True),
                       MediaKind.CDROM, boot_index)


def gen1_spec(accelerator: str = "tcg", os_type: str = "linux") -> MachineSpec:
    """A generation 1 VM (boot order disk, DVD, network) as compute.machine builds it."""
    node = disk(DISK0, f"{FOLDER}/disk0.qcow2", "qcow2", (IMAGE, "qcow2"))
    return MachineSpec(
        vm_id=VM_ID, chipset=Chipset.I440FX, accelerator=accelerator, cpus=2,
        memory=MemorySpec(1 * GIB), paths=paths(),
        enlightenments=WINDOWS if os_type == "windows" else Enlightenments(),
        block_devices=(BlockDevice(disk_device_id(DISK0), BlockBus.IDE, node,
                                   MediaKind.DISK, 1),
                       dvd(BlockBus.IDE, 2)),
        net_devices=(NetDevice(MAC, NicModel.E1000, boot_index=3),),
    )


def gen2_spec(accelerator: str = "tcg", os_type: str = "linux") -> MachineSpec:
    """A generation 2 VM (boot order DVD, disk) as compute.machine builds it."""
    node = disk(DISK0, f"{FOLDER}/disk0.qcow2", "qcow2",
                ("/srv/disks/mid.qcow2", "qcow2"), ("/srv/disks/base.raw", "raw"))
    data = disk("5f6a7b8c9d", "/srv/disks/data.raw", "raw")
    return MachineSpec(
        vm_id=VM_ID, chipset=Chipset.Q35, accelerator=accelerator, cpus=2,
        memory=MemorySpec(1 * GIB), paths=paths(),
        firmware=Uefi("/usr/share/OVMF/OVMF_CODE_4M.fd", f"{FOLDER}/efivars.fd"),
        enlightenments=WINDOWS if os_type == "windows" else Enlightenments(),
        block_devices=(BlockDevice(disk_device_id(DISK0), BlockBus.SCSI, node,
                                   MediaKind.DISK, 2),
                       BlockDevice(disk_device_id("5f6a7b8c9d"), BlockBus.VIRTIO, data),
                       dvd(BlockBus.SCSI, 1)),
        net_devices=(NetDevice(MAC, NicModel.VIRTIO),),
    )


def gen2_switch_spec() -> MachineSpec:
    """A generation 2 VM with a tap port on a switch (descriptor 3) and a user-mode
    adapter, listed against the order of their MACs."""
    return replace(gen2_spec("kvm"), pass_fds=(3,), net_devices=(
        NetDevice("52:54:00:ab:cd:ef", NicModel.VIRTIO, TapNetdev("3")),
        NetDevice(MAC, NicModel.VIRTIO)))


def gen1_switch_spec() -> MachineSpec:
    """A generation 1 VM with a tap port (descriptor 3) and a user-mode adapter, listed
    against the order of their MACs, and a virtio data disk."""
    data = disk("5f6a7b8c9d", "/srv/disks/data.raw", "raw")
    boot_disk, dvd_drive = gen1_spec().block_devices
    return replace(gen1_spec(), pass_fds=(3,), block_devices=(
        boot_disk, BlockDevice(disk_device_id("5f6a7b8c9d"), BlockBus.VIRTIO, data),
        dvd_drive),
        net_devices=(NetDevice("52:54:00:ab:cd:ef", NicModel.E1000, TapNetdev("3"), 3),
                     NetDevice(MAC, NicModel.E1000)))


DYNAMIC = MemorySpec(256 * 1024 * 1024, balloon=True, hotplug_bytes=32 * GIB,
                    free_page_reporting=True)


GOLDEN_SPECS = {
    "argv_gen1_dynamic_memory": lambda: replace(gen1_spec("tcg"), memory=DYNAMIC),
    "argv_gen2_dynamic_memory": lambda: replace(gen2_spec("tcg"), memory=DYNAMIC),
    "argv_gen1": lambda: gen1_spec("tcg"),
    "argv_gen1_switch": gen1_switch_spec,
    "argv_gen2_switch": gen2_switch_spec,
    "argv_gen2": lambda: gen2_spec("tcg"),
    "argv_gen2_kvm": lambda: gen2_spec("kvm"),
    "argv_gen2_windows": lambda: gen2_spec("kvm", os_type="windows"),
    "argv_gen2_windows_tcg": lambda: gen2_spec("tcg", os_type="windows"),
    "argv_gen1_windows_kvm": lambda: gen1_spec("kvm", os_type="windows"),
    "argv_gen1_windows_tcg": lambda: gen1_spec("tcg", os_type="windows"),
    # processor compatibility: the baseline model, with the enlightenments on top
    "argv_gen2_windows_compatibility": lambda: replace(gen2_spec("kvm", os_type="windows"),
                                                       cpu_model="Nehalem-v1"),
}


def check_golden(name: str, argv: list[str]) -> None:
    path = GOLDEN_DIR / f"{name}.json"
    text = json.dumps(argv, indent=2) + "\n"
    if os.environ.get("HV_UPDATE_GOLDEN") == "1":
        GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return
    if not path.exists():
        pytest.fail(f"golden file {path} is missing; create it with HV_UPDATE_GOLDEN=1")
    expected = path.read_text()
    if expected != text:
        diff = "".join(difflib.unified_diff(
            expected.splitlines(keepends=True), text.splitlines(keepends=True),
            fromfile=f"golden/{name}.json", tofile="build_argv()",
        ))
        pytest.fail(
            f"build_argv() differs from the golden file {path.name}; if the change is "
            f"intended, regenerate with HV_UPDATE_GOLDEN=1 and review the diff:\n{diff}",
            pytrace=False,
        )


@pytest.mark.parametrize("name", sorted(GOLDEN_SPECS))
def test_golden(name: str) -> None:
    check_golden(name, build_argv(GOLDEN_SPECS[name]()))


# -- structure ------------------------------------------------------------------------------


def option_values(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == flag]


def json_options(argv: list[str], flag: str) -> list[dict[str, object]]:
    return [json.loads(v) for v in option_values(argv, flag) if v.startswith("{")]


def parse_qemu_opts(text: str) -> list[tuple[str, str]]:
    """Parse QEMU's classic ``key=value,...`` syntax the way QEMU does (',,' is a comma)."""
    parts: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char == ",":
            if text[i + 1:i + 2] == ",":
                current.append(",")
                i += 2
                continue
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
        i += 1
    parts.append("".join(current))
    return [(p.partition("=")[0], p.partition("=")[2]) for p in parts]


def test_gen1_uses_emulated_devices() -> None:
    argv = build_argv(gen1_spec())
    assert option_values(argv, "-machine") == ["pc"]
    devices = {d["driver"]: d for d in json_options(argv, "-device")}
    assert devices["ide-hd"]["bus"] == "ide.0" and devices["ide-hd"]["unit"] == 0
    assert devices["ide-cd"]["bus"] == "ide.0" and devices["ide-cd"]["unit"] == 1
    assert devices["e1000"]["mac"] == MAC
    assert "virtio-scsi-pci" not in devices
    assert option_values(argv, "-smp") == ["2"]
    assert option_values(argv, "-m") == ["size=1024M"]
    assert not any(a.startswith("pflash") for a in argv)


def test_gen2_uses_uefi_and_synthetic_devices() -> None:
    argv = build_argv(gen2_spec())
    machine = option_values(argv, "-machine")[0]
    assert machine == "q35,pflash0=fw-code,pflash1=fw-vars"
    nodes = {n["node-name"]: n for n in json_options(argv, "-blockdev")}
    assert nodes["fw-code-file"]["filename"] == "/usr/share/OVMF/OVMF_CODE_4M.fd"
    assert nodes["fw-code"]["read-only"] is True
    assert nodes["fw-vars-file"]["filename"] == f"{FOLDER}/efivars.fd"
    assert nodes["fw-vars"]["read-only"] is False
    devices = {d["id"]: d for d in json_options(argv, "-device")}
    first, data, nic = "disk-0a1b2c3d4e-dev", "disk-5f6a7b8c9d-dev", "nic-525400123456"
    assert devices[first]["driver"] == "scsi-hd"
    assert devices[data]["driver"] == "virtio-blk-pci"
    assert devices[nic]["driver"] == "virtio-net-pci"
    assert devices[nic]["netdev"] == "net-525400123456"
    assert not any(str(d["driver"]).startswith("ide") for d in devices.values())
    # boot indices as the spec gives them: the DVD first, the first disk second
    assert devices["dvd-dev"]["bootindex"] == 1
    assert devices[first]["bootindex"] == 2
    assert "bootindex" not in devices[data]
    assert "bootindex" not in devices[nic]


def test_kvm_and_tcg_differ_only_in_accelerator_and_cpu_model() -> None:
    kvm, tcg = build_argv(gen2_spec("kvm")), build_argv(gen2_spec("tcg"))
    assert option_values(kvm, "-accel") == ["kvm"]
    assert option_values(tcg, "-accel") == ["tcg"]
    assert option_values(kvm, "-cpu") == ["host"]
    assert option_values(tcg, "-cpu") == ["max"]
    differing = [(k, t) for k, t in zip(kvm, tcg, strict=True) if k != t]
    assert differing == [("kvm", "tcg"), ("host", "max")]


@pytest.mark.parametrize("make", [gen1_spec, gen2_spec])
@pytest.mark.parametrize("accelerator", ["kvm", "tcg"])
def test_a_baseline_model_is_the_same_under_kvm_and_tcg_and_enforced(
        make: object, accelerator: str) -> None:
    assert callable(make)
    spec = replace(make(accelerator), cpu_model="Nehalem-v1")
    assert option_values(build_argv(spec), "-cpu") == ["Nehalem-v1,enforce"]


def test_a_baseline_model_keeps_windows_enlightenments_on_kvm_only() -> None:
    kvm = replace(gen2_spec("kvm", os_type="windows"), cpu_model="Nehalem-v1")
    tcg = replace(gen2_spec("tcg", os_type="windows"), cpu_model="Nehalem-v1")
    assert option_values(build_argv(kvm), "-cpu") == [
        ",".join(("Nehalem-v1", "enforce", *HYPERV_ENLIGHTENMENTS))]
    assert option_values(build_argv(tcg), "-cpu") == ["Nehalem-v1,enforce"]


def test_windows_keeps_the_clock_in_local_time() -> None:
    assert option_values(build_argv(gen2_spec(os_type="windows")), "-rtc") == [
        "base=localtime,driftfix=slew"]
    assert option_values(build_argv(gen2_spec(os_type="linux")), "-rtc") == ["base=utc"]


@pytest.mark.parametrize("make", [gen1_spec, gen2_spec])
def test_windows_on_kvm_gets_hyperv_enlightenments(make: object) -> None:
    assert callable(make)
    argv = build_argv(make("kvm", os_type="windows"))
    cpu = option_values(argv, "-cpu")[0].split(",")
    assert cpu[0] == "host"
    assert cpu[1:] == list(HYPERV_ENLIGHTENMENTS)
    flags = {f.partition("=")[0] for f in cpu[1:]}
    # every dependency named in QEMU's hyperv.rst is there
    assert {"hv-vpindex", "hv-synic", "hv-time", "hv-stimer"} <= flags
    assert not flags & {"hv-passthrough", "hv-reenlightenment", "hv-evmcs", "hv-crash",
                        "hv-syndbg", "hv-enforce-cpuid"}
    assert option_values(argv, "-global") == ["kvm-pit.lost_tick_policy=delay"]
    assert option_values(argv, "-machine")[0].split(",")[:2] in (["pc", "hpet=off"],
                                                                  ["q35", "hpet=off"])
    drivers = [d["driver"] for d in json_options(argv, "-device")]
    assert "qemu-xhci" in drivers and "usb-tablet" in drivers


@pytest.mark.parametrize("make", [gen1_spec, gen2_spec])
def test_windows_on_tcg_has_no_kvm_only_options(make: object) -> None:
    assert callable(make)
    argv = build_argv(make("tcg", os_type="windows"))
    assert option_values(argv, "-cpu") == ["max"]
    assert "-global" not in argv
    assert "hpet" not in option_values(argv, "-machine")[0]
    drivers = [d["driver"] for d in json_options(argv, "-device")]
    assert "usb-tablet" in drivers


def test_gen1_windows_uses_ide_and_e1000() -> None:
    devices = {d["driver"] for d in json_options(build_argv(gen1_spec("kvm", "windows")),
                                                 "-device")}
    assert {"ide-hd", "ide-cd", "e1000"} <= devices
    assert not {"virtio-scsi-pci", "virtio-net-pci"} & devices


def test_linux_has_no_windows_devices() -> None:
    argv = build_argv(gen2_spec("kvm"))
    drivers = [d["driver"] for d in json_options(argv, "-device")]
    assert "usb-tablet" not in drivers
    assert "-global" not in argv


def test_vnc_listens_on_a_unix_socket_only() -> None:
    argv = build_argv(gen1_spec())
    assert option_values(argv, "-vnc") == [f"vnc=unix:{RUN}/vnc.sock"]
    assert option_values(argv, "-display") == ["none"]


def test_incoming_waits_for_saved_state() -> None:
    spec = replace(gen2_spec(), incoming=True)
    assert build_argv(spec)[-2:] == ["-incoming", "defer"]
    assert "-incoming" not in build_argv(gen2_spec())


def test_daemonized_with_pidfile_and_sandbox() -> None:
    argv = build_argv(gen1_spec())
    assert argv[0] == "qemu-system-x86_64"
    assert option_values(argv, "-pidfile") == [f"{FOLDER}/qemu.pid"]
    assert "-daemonize" in argv
    assert "-nodefaults" in argv
    assert option_values(argv, "-sandbox")[0].startswith("on,")


def test_no_boot_index_means_no_bootindex() -> None:
    spec = gen2_spec()
    spec = replace(spec, block_devices=tuple(replace(d, boot_index=None)
                                             for d in spec.block_devices))
    for device in json_options(build_argv(spec), "-device"):
        assert "bootindex" not in device


def test_ids_come_from_identities_not_positions() -> None:
    spec = gen2_spec()
    other = NetDevice("52:54:00:ab:cd:ef", NicModel.VIRTIO)
    for devices in (spec.block_devices, spec.block_devices[::-1]):
        for nics in ((spec.net_devices[0], other), (other, spec.net_devices[0])):
            argv = build_argv(replace(spec, block_devices=devices, net_devices=nics))
            ids = {d["id"] for d in json_options(argv, "-device")}
            assert {"disk-0a1b2c3d4e-dev", "disk-5f6a7b8c9d-dev", "dvd-dev",
                    "nic-525400123456", "nic-525400abcdef"} <= ids
            netdevs = {n["id"] for n in json_options(argv, "-netdev")}
            assert netdevs == {"net-525400123456", "net-525400abcdef"}
            names = {n["node-name"] for n in json_options(argv, "-blockdev")}
            assert {"disk-0a1b2c3d4e", "disk-5f6a7b8c9d", "dvd"} <= names


def test_colliding_ids_are_refused() -> None:
    spec = gen2_spec()
    with pytest.raises(InvalidInput, match="nic-525400123456"):
        replace(spec, net_devices=spec.net_devices * 2)
    with pytest.raises(InvalidInput, match="disk-0a1b2c3d4e-dev"):
        replace(spec, block_devices=(*spec.block_devices, spec.block_devices[0]))
    with pytest.raises(InvalidInput, match="cannot name"):
        replace(spec, block_devices=(BlockDevice("0bad", BlockBus.VIRTIO,
                                                 disk("x", "/x.raw", "raw")),))


def test_a_tap_netdev_names_its_descriptor() -> None:
    nic = NetDevice(MAC, NicModel.VIRTIO, TapNetdev("tap-nic"))
    argv = build_argv(replace(gen2_spec(), net_devices=(nic,), pass_fds=(9,)))
    assert json_options(argv, "-netdev") == [{"type": "tap", "id": "net-525400123456",
                                              "fd": "tap-nic"}]


def test_a_tap_netdev_has_no_vnet_hdr_option() -> None:
    # QEMU 7.2 refuses vnet_hdr= beside fd= and probes the tap's flags instead.
    netdevs = json_options(build_argv(gen2_switch_spec()), "-netdev")
    assert netdevs[0] == {"type": "tap", "id": "net-525400abcdef", "fd": "3"}
    assert all("vnet_hdr" not in n for n in netdevs)


def root_ports(argv: list[str]) -> dict[str, dict[str, object]]:
    return {str(d["id"]): d for d in json_options(argv, "-device")
            if d["driver"] == "pcie-root-port"}


def test_on_q35_each_adapter_has_its_own_root_port_and_spares_wait() -> None:
    argv = build_argv(gen2_switch_spec())
    ports = root_ports(argv)
    assert list(ports) == ["port-525400123456", "port-525400abcdef", *(
        f"hotplug-port-{i}" for i in range(HOTPLUG_PORTS))]
    devices = {d["id"]: d for d in json_options(argv, "-device")}
    assert devices["nic-525400123456"]["bus"] == "port-525400123456"
    assert devices["nic-525400abcdef"]["bus"] == "port-525400abcdef"
    pairs = [(p["chassis"], p["slot"]) for p in ports.values()]
    assert len(set(pairs)) == len(pairs)
    assert all(p["io-reserve"] == 0 for p in ports.values())
    # a port is defined before the adapter that sits on it
    position = {json.loads(a).get("id"): i for i, a in enumerate(argv) if a.startswith("{")}
    assert position["port-525400abcdef"] < position["nic-525400abcdef"]


def test_root_ports_depend_on_the_set_of_adapters_not_their_order() -> None:
    spec = gen2_switch_spec()
    flipped = replace(spec, net_devices=spec.net_devices[::-1])
    assert root_ports(build_argv(spec)) == root_ports(build_argv(flipped))
    assert spec.root_ports() == flipped.root_ports()


def test_the_number_of_spare_ports_is_the_specs() -> None:
    spec = replace(gen2_spec(), hotplug_ports=1)
    assert [p.id for p in spec.root_ports()] == ["port-525400123456", "hotplug-port-0"]


A, B, C = "52:54:00:00:00:0a", "52:54:00:00:00:0b", "52:54:00:00:00:0c"


def test_a_restored_machine_is_laid_out_as_the_running_one_was() -> None:
    started = replace(gen2_spec(), net_devices=(NetDevice(A, NicModel.VIRTIO),
                                                NetDevice(B, NicModel.VIRTIO)))
    # while it ran: A was removed, C added on the first spare port
    layout = PortLayout.at_launch([B, A]).unplugged(A).plugged(C, "hotplug-port-0")
    restored = replace(started, layout=layout, net_devices=(
        NetDevice(C, NicModel.VIRTIO), NetDevice(B, NicModel.VIRTIO)))
    assert root_ports(build_argv(restored)) == root_ports(build_argv(started))
    devices = {d["id"]: d for d in json_options(build_argv(restored), "-device")}
    assert devices["nic-52540000000c"]["bus"] == "hotplug-port-0"
    assert devices["nic-52540000000b"]["bus"] == "port-52540000000b"
    assert PortLayout.from_json(json.loads(json.dumps(layout.to_json()))) == layout
    assert layout.unplugged(C) == PortLayout.at_launch([A, B])


@pytest.mark.parametrize("layout", [
    PortLayout.at_launch([A]),  # B has no port
    PortLayout.at_launch([A]).plugged(B, "hotplug-port-9"),  # not a port of the machine
    PortLayout.at_launch([]).plugged(A, "hotplug-port-0").plugged(B, "hotplug-port-0"),
])
def test_a_layout_without_a_port_for_each_adapter_is_refused(layout: PortLayout) -> None:
    with pytest.raises(InvalidInput, match="has no port of its own"):
        replace(gen2_spec(), layout=layout, net_devices=(NetDevice(A, NicModel.VIRTIO),
                                                         NetDevice(B, NicModel.VIRTIO)))


def test_i440fx_has_no_root_ports_and_hot_plugs_on_its_root_bus() -> None:
    argv = build_argv(gen1_spec())
    assert root_ports(argv) == {}
    assert gen1_spec().root_ports() == ()
    devices = {d["id"]: d for d in json_options(argv, "-device")}
    assert "bus" not in devices["nic-525400123456"]


def nic_slots(argv: list[str]) -> dict[str, object]:
    return {str(d["id"]): d.get("addr") for d in json_options(argv, "-device")
            if d["driver"] in ("e1000", "virtio-net-pci")}


def test_on_i440fx_adapters_sit_on_slots_set_by_the_set_of_their_macs() -> None:
    spec = gen1_switch_spec()
    flipped = replace(spec, net_devices=spec.net_devices[::-1])
    assert nic_slots(build_argv(spec)) == nic_slots(build_argv(flipped)) == {
        "nic-525400123456": "0x10", "nic-525400abcdef": "0x11"}
    # before the disks: QEMU gives a virtio disk the first free slot, never theirs
    argv = build_argv(spec)
    position = {json.loads(a).get("id"): i for i, a in enumerate(argv) if a.startswith("{")}
    assert position["nic-525400abcdef"] < position[disk_device_id("5f6a7b8c9d")]


def test_a_restored_i440fx_machine_has_its_adapters_where_they_were() -> None:
    started = replace(gen1_spec(), net_devices=(NetDevice(A, NicModel.E1000),
                                                NetDevice(B, NicModel.E1000)))
    # while it ran: C added on the first free slot, then A removed
    layout = PortLayout.slotted([B, A]).at_slot(C, 0x12).unplugged(A)
    assert layout.slots == ((B, 0x11), (C, 0x12))
    restored = replace(started, layout=layout, net_devices=(
        NetDevice(C, NicModel.E1000), NetDevice(B, NicModel.E1000)))
    assert nic_slots(build_argv(restored)) == {"nic-52540000000c": "0x12",
                                               "nic-52540000000b": "0x11"}
    # the settings alone would have moved them: B to 0x10, C to 0x11
    assert nic_slots(build_argv(replace(restored, layout=None))) == {
        "nic-52540000000c": "0x11", "nic-52540000000b": "0x10"}
    assert PortLayout.from_json(json.loads(json.dumps(layout.to_json()))) == layout
    assert PortLayout.from_json({"own": [], "hotplugged": []}).slots == ()  # older files


@pytest.mark.parametrize("layout", [
    PortLayout.slotted([A]),  # B has no slot
    PortLayout(slots=((A, 0x10), (B, 0x05))),  # not an adapters' slot
    PortLayout(slots=((A, 0x10), (B, 0x10))),
])
def test_an_i440fx_layout_without_a_slot_for_each_adapter_is_refused(
        layout: PortLayout) -> None:
    with pytest.raises(InvalidInput, match="has no slot of its own"):
        replace(gen1_spec(), layout=layout, net_devices=(NetDevice(A, NicModel.E1000),
                                                         NetDevice(B, NicModel.E1000)))


def test_i440fx_has_room_for_sixteen_adapters() -> None:
    nics = tuple(NetDevice(f"52:54:00:00:01:{i:02x}", NicModel.E1000) for i in range(17))
    replace(gen1_spec(), net_devices=nics[:16])
    with pytest.raises(InvalidInput, match="room for 16 network adapters; 17"):
        replace(gen1_spec(), net_devices=nics)


def test_a_balloon_is_there_when_asked_for() -> None:
    assert "virtio-balloon-pci" not in str(build_argv(gen2_spec()))
    spec = replace(gen2_spec(), memory=MemorySpec(1 * GIB, balloon=True))
    devices = {d["id"]: d for d in json_options(build_argv(spec), "-device")}
    assert devices["balloon0"]["driver"] == "virtio-balloon-pci"


def test_dynamic_memory_boots_with_startup_and_plugs_above_it() -> None:
    for spec in (replace(gen1_spec(), memory=DYNAMIC), replace(gen2_spec(), memory=DYNAMIC)):
        argv = build_argv(spec)
        assert option_values(argv, "-m") == [f"size=256M,slots=1,maxmem={256 + 32 * 1024}M"]
        backend, = json_options(argv, "-object")
        assert backend == {"qom-type": "memory-backend-ram", "id": "dynmem-ram",
                           "size": 32 * GIB, "reserve": False}
        devices = {d["id"]: d for d in json_options(argv, "-device")}
        mem = devices["dynmem0"]
        assert (mem["driver"], mem["memdev"], mem["requested-size"], mem["block-size"]) == (
            "virtio-mem-pci", "dynmem-ram", 0, 2 * 1024 * 1024)
        assert devices["balloon0"]["free-page-reporting"] is True
        # i440fx: a fixed slot of its own, away from the adapters'; q35: QEMU places it.
        assert mem.get("addr") == ("0x0f" if spec.chipset is Chipset.I440FX else None)


def test_static_memory_has_no_memory_devices() -> None:
    for spec in (gen1_spec(), gen2_spec()):
        argv = build_argv(spec)
        assert option_values(argv, "-m") == ["size=1024M"]
        assert "-object" not in argv and "virtio-mem" not in str(argv)


def test_hot_pluggable_memory_is_whole_blocks() -> None:
    with pytest.raises(InvalidInput, match="2 MiB blocks"):
        MemorySpec(GIB, hotplug_bytes=GIB + 4096)


# -- escaping -------------------------------------------------------------------------------


def test_escape_option_doubles_commas() -> None:
    assert escape_option("/a,b") == "/a,,b"
    assert escape_option("/a,,b,") == "/a,,,,b,,"
    assert escape_option("/plain/path") == "/plain/path"


def test_comma_in_chardev_path_is_doubled() -> None:
    spec = replace(gen1_spec(), paths=paths(run="/run/a,b", folder="/vms/x,y"))
    argv = build_argv(spec)
    chardevs = option_values(argv, "-chardev")
    qmp = next(c for c in chardevs if c.startswith("socket,id=qmp,"))
    assert "path=/run/a,,b/qmp.sock" in qmp
    assert dict(parse_qemu_opts(qmp))["path"] == "/run/a,b/qmp.sock"
    serial = dict(parse_qemu_opts(next(c for c in chardevs if "id=serial0" in c)))
    assert serial["path"] == "/run/a,b/serial.sock"
    assert serial["logfile"] == "/vms/x,y/console.log"
    assert serial["logappend"] == "on"
    vnc = dict(parse_qemu_opts(option_values(argv, "-vnc")[0]))
    assert vnc == {"vnc": "unix:/run/a,b/vnc.sock"}


def test_equals_sign_in_vnc_path_cannot_rename_the_option() -> None:
    # QEMU reads "a=b" before the first comma as key=value unless the key is explicit.
    spec = replace(gen1_spec(), paths=paths(run="/run/x=y"))
    assert dict(parse_qemu_opts(option_values(build_argv(spec), "-vnc")[0])) == {
        "vnc": "unix:/run/x=y/vnc.sock"}


@pytest.mark.parametrize("path", [
    "/srv/disks/a,b.qcow2",
    "/srv/disks/a,file.driver=ssh,b.qcow2",
    "/srv/disks/x=y.qcow2",
    '/srv/disks/quote"and\\backslash.qcow2',
    "/srv/disks/trailing-comma,",
])
def test_disk_path_stays_inside_one_json_value(path: str) -> None:
    node = disk("a", path)
    spec = replace(gen2_spec(), block_devices=(
        BlockDevice(disk_device_id("a"), BlockBus.SCSI, node),
        dvd(BlockBus.SCSI, None, path.replace("disks", "iso"))))
    argv = build_argv(spec)
    nodes = {n["node-name"]: n for n in json_options(argv, "-blockdev")}
    file_node = nodes[f"{node.id}-file"]
    assert file_node["filename"] == path
    assert file_node["driver"] == "file"
    assert set(file_node) == {"driver", "filename", "node-name", "read-only", "discard"}
    assert nodes["dvd-file"]["filename"] == path.replace("disks", "iso")
    # every -blockdev value is one JSON object, never classic option syntax
    assert all(v.startswith("{") for v in option_values(argv, "-blockdev"))


HOSTILE = "/evil,inject=1,"


def hostile_spec(chipset: Chipset) -> tuple[MachineSpec, set[str]]:
    """A spec where every string a user or an administrator controls is hostile."""
    run, folder = f"{HOSTILE}run", f"{HOSTILE}vm"
    pc = chipset is Chipset.I440FX
    bus = BlockBus.IDE if pc else BlockBus.SCSI
    spec = MachineSpec(
        vm_id=VM_ID, chipset=chipset, accelerator="tcg", cpus=1,
        memory=MemorySpec(GIB), paths=paths(run=run, folder=folder),
        firmware=(base := gen1_spec() if pc else gen2_spec()).firmware,
        block_devices=(
            BlockDevice(disk_device_id("a"), bus, disk("a", f"{HOSTILE}disk.qcow2",
                                                       "qcow2", (f"{HOSTILE}base.raw", "raw"))),
            BlockDevice(disk_device_id("b"), BlockBus.VIRTIO,
                        disk("b", f"{HOSTILE}data.raw", "raw")),
            dvd(bus, 1, f"{HOSTILE}cd.iso")),
        net_devices=base.net_devices,
    )
    if not pc:
        spec = replace(spec, firmware=Uefi(f"{HOSTILE}code.fd", f"{HOSTILE}vars.fd"))
    p = spec.paths
    user = {f"{HOSTILE}disk.qcow2", f"{HOSTILE}base.raw", f"{HOSTILE}data.raw",
            f"{HOSTILE}cd.iso", p.qmp_socket, p.serial_socket, p.serial_log, p.qga_socket,
            p.pidfile, p.vnc_socket}
    if isinstance(spec.firmware, Uefi):
        user |= {spec.firmware.code, spec.firmware.vars}
    return spec, user


def json_strings(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in json_strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in json_strings(v)]
    return []


@pytest.mark.parametrize("chipset", list(Chipset))
def test_no_user_string_outside_json_unless_escaped(chipset: Chipset) -> None:
    spec, user_strings = hostile_spec(chipset)
    argv = build_argv(spec)
    seen: set[str] = set()
    for i, arg in enumerate(argv):
        flag = argv[i - 1] if i else ""
        if arg.startswith("{"):
            for value in json_strings(json.loads(arg)):
                if "inject" in value:
                    assert value in user_strings, f"{value!r} mangled in {arg}"
                    seen.add(value)
        elif flag in OPTION_SYNTAX:
            options = parse_qemu_opts(arg)
            keys = [k for k, _ in options]
            assert "inject" not in keys, f"{flag} {arg!r} lets a user string add options"
            assert len(keys) == len(set(keys)), f"{flag} {arg!r} repeats an option"
            for key, value in options:
                if flag == "-vnc" and key == "vnc":
                    value = value.removeprefix("unix:")
                if "inject" in value:
                    assert value in user_strings, f"{flag} {arg!r}: {value!r} was split"
                    seen.add(value)
        elif "inject" in arg:
            # only plain file-name arguments (not option syntax) may hold them verbatim
            assert flag == "-pidfile" and arg == spec.paths.pidfile, (flag, arg)
            seen.add(arg)
    # every user string reached the command line, and none was dropped on the way
    assert seen == user_strings


# -- backing chains ---------------------------------------------------------------------


def test_every_chain_member_is_explicit_and_the_base_has_no_backing() -> None:
    spec = gen1_spec()
    top_node = spec.block_devices[0].node
    nodes = {n["node-name"]: n for n in json_options(build_argv(spec), "-blockdev")}
    top, image = nodes[top_node.id], nodes[backing_node_id(DISK0, IMAGE)]
    assert top["backing"] == image["node-name"]
    assert image["backing"] is None  # QEMU opens no parent the image's header might name
    assert image["read-only"] is True and top["read-only"] is False
    assert nodes[f"{image['node-name']}-file"]["filename"] == IMAGE
    order = [n["node-name"] for n in json_options(build_argv(spec), "-blockdev")]
    for node in nodes.values():  # QEMU resolves a reference to a node defined before
        for ref in (node.get("backing"), node.get("file")):
            if ref is not None:
                assert order.index(ref) < order.index(node["node-name"])
    devices = {d["id"]: d for d in json_options(build_argv(spec), "-device")}
    assert devices[disk_device_id(DISK0)]["drive"] == top_node.id


def test_a_disk_without_a_parent_opens_none() -> None:
    spec = gen1_spec()
    device = replace(spec.block_devices[0], node=replace(spec.block_devices[0].node,
                                                         backing=None))
    spec = replace(spec, block_devices=(device,))
    nodes = {n["node-name"]: n for n in json_options(build_argv(spec), "-blockdev")}
    assert nodes[device.node.id]["backing"] is None
    assert all(n["driver"] != "raw" or "backing" not in n for n in nodes.values())


def test_shared_parents_get_a_node_per_child_within_qemus_limit() -> None:
    base = ("/srv/base.qcow2", "qcow2")
    a, b = disk("aaaaaaaaaa", "/srv/a.qcow2", "qcow2", base), disk("bbbbbbbbbb",
                                                                   "/srv/b.qcow2", "qcow2", base)
    spec = replace(gen2_spec(), block_devices=(
        BlockDevice(disk_device_id("aaaaaaaaaa"), BlockBus.VIRTIO, a),
        BlockDevice(disk_device_id("bbbbbbbbbb"), BlockBus.VIRTIO, b)))
    names = [n["node-name"] for n in json_options(build_argv(spec), "-blockdev")]
    assert len(names) == len(set(names))
    assert {"disk-aaaaaaaaaa", "disk-bbbbbbbbbb", backing_node_id("aaaaaaaaaa", base[0]),
            backing_node_id("bbbbbbbbbb", base[0])} <= set(names)
    assert all(len(name) <= 31 for name in names)  # QEMU's limit


def test_every_block_node_maps_to_its_file() -> None:
    nodes = block_node_paths(gen2_spec())
    top, mid, base = (disk_node_id(DISK0), backing_node_id(DISK0, "/srv/disks/mid.qcow2"),
                      backing_node_id(DISK0, "/srv/disks/base.raw"))
    assert nodes == {
        top: f"{FOLDER}/disk0.qcow2", f"{top}-file": f"{FOLDER}/disk0.qcow2",
        mid: "/srv/disks/mid.qcow2", f"{mid}-file": "/srv/disks/mid.qcow2",
        base: "/srv/disks/base.raw", f"{base}-file": "/srv/disks/base.raw",
        "disk-5f6a7b8c9d": "/srv/disks/data.raw", "disk-5f6a7b8c9d-file": "/srv/disks/data.raw",
        "dvd": ISO, "dvd-file": ISO}


def test_nic_ids_from_the_mac() -> None:
    assert nic_device_id("52:54:00:AA:bb:cc") == "nic-525400aabbcc"


# -- the previous release's layout (restoring a state it saved) ---------------------------

LEGACY_GOLDEN_DIR = GOLDEN_DIR / "legacy"
LEGACY_GOLDENS = sorted(p.stem for p in LEGACY_GOLDEN_DIR.glob("*.json"))


def test_every_golden_of_the_previous_release_is_kept() -> None:
    """``tests/golden/legacy`` holds release 88d3ce2's goldens unchanged: one for each
    of its configurations (they all still exist here)."""
    assert LEGACY_GOLDENS == ["argv_gen1", "argv_gen1_windows_kvm", "argv_gen1_windows_tcg",
                              "argv_gen2", "argv_gen2_kvm", "argv_gen2_windows",
                              "argv_gen2_windows_tcg"]
    assert set(LEGACY_GOLDENS) <= set(GOLDEN_SPECS)


@pytest.mark.parametrize("name", LEGACY_GOLDENS)
def test_the_legacy_layout_is_the_previous_releases_argv_exactly(name: str) -> None:
    spec = replace(GOLDEN_SPECS[name](), legacy_nic_layout=True)
    expected = json.loads((LEGACY_GOLDEN_DIR / f"{name}.json").read_text())
    assert build_argv(spec) == expected
    assert build_argv(GOLDEN_SPECS[name]()) != expected  # this release's layout differs


@pytest.mark.parametrize("make", [gen1_spec, gen2_spec, gen1_switch_spec, gen2_switch_spec])
def test_the_legacy_layout_has_no_ports_and_no_slots(make: object) -> None:
    assert callable(make)
    spec = replace(make(), legacy_nic_layout=True)
    assert spec.root_ports() == ()
    assert all(spec.nic_bus(n) is None and spec.nic_slot(n) is None
               for n in spec.net_devices)
    argv = build_argv(spec)
    devices = json_options(argv, "-device")
    assert not [d for d in devices if d["driver"] == "pcie-root-port"]
    nic_devices = [d for d in devices if str(d["id"]).startswith("nic-")]
    assert nic_devices and all("bus" not in d and "addr" not in d for d in nic_devices)
    last_disk = max(i for i, a in enumerate(argv) if '"drive":' in a)
    assert all(argv.index(option) > last_disk for option in option_values(argv, "-netdev"))


def test_a_legacy_layout_takes_no_port_layout() -> None:
    with pytest.raises(InvalidInput):
        replace(gen2_spec(), legacy_nic_layout=True, layout=PortLayout.at_launch([MAC]))
