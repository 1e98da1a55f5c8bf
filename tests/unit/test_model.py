"""The VM model: names, settings validation, and the JSON form stored for each VM."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from hvstack.compute.model import (
    MAX_NAME_LENGTH,
    AutoStartAction,
    AutoStopAction,
    BootDevice,
    DiskAttachment,
    DiskBus,
    Generation,
    NetworkAdapter,
    NicModel,
    VmConfig,
    VmRecord,
    VmState,
    disk_id_of,
    validate_config,
    validate_name,
)
from hvstack.errors import InsufficientResources, InvalidInput
from hvstack.network.model import (
    AclAction,
    AclDirection,
    MirrorMode,
    PortAcl,
    PortSettings,
    Vlan,
    VlanMode,
)

GIB = 1024**3
HOST = {"host_cpus": 4, "host_memory": 8 * GIB}
MAC = "52:54:00:ab:cd:ef"


# -- names ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [
    "web", "web-01", "Web Server 2", "a" * MAX_NAME_LENGTH, "ünïcødé", "db.prod", "x_y", "a.b.c",
])
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(("name", "why"), [
    ("", "must not be empty"),
    ("   ", "must not be empty"),
    ("\t", "must not be empty"),
    ("a" * (MAX_NAME_LENGTH + 1), "101 characters long; at most 100"),
    ("a/b", "must not contain '/'"),
    ("/", "must not contain '/'"),
    ("a\\b", "must not contain '/' or '\\'"),
    ("..", "must not contain '..'"),
    ("a..b", "must not contain '..'"),
    (".", "must not contain '..'"),
    ("a\nb", "control characters"),
    ("a\x00b", "control characters"),
    ("a\x1bb", "control characters"),
    ("a\x7fb", "control characters"),
    ("a\u200bb", "control characters"),  # zero-width space: a format character
    (" web", "must not start or end with blanks"),
    ("web ", "must not start or end with blanks"),
    ("web\n", "must not start or end with blanks"),
])
def test_invalid_names(name: str, why: str) -> None:
    with pytest.raises(InvalidInput) as info:
        validate_name(name)
    assert why in info.value.message
    assert info.value.message.startswith("VM name")


def test_name_error_says_what_was_named() -> None:
    with pytest.raises(InvalidInput, match=r"^image name must not be empty"):
        validate_name("", what="image name")


def test_too_long_name_is_not_echoed_in_full() -> None:
    with pytest.raises(InvalidInput) as info:
        validate_name("x" * 5000)
    assert "x" * 200 not in info.value.message
    assert len(str(info.value.data["value"])) <= MAX_NAME_LENGTH


# -- settings ------------------------------------------------------------------------------


def config(**changes: object) -> VmConfig:
    return replace(VmConfig(name="vm"), **changes)  # type: ignore[arg-type]


def gen1(**changes: object) -> VmConfig:
    return config(generation=Generation.GEN1, **changes)


def ide(n: int) -> tuple[DiskAttachment, ...]:
    return tuple(DiskAttachment(f"/d/{i}.qcow2", DiskBus.IDE) for i in range(n))


def test_defaults_are_valid() -> None:
    assert validate_config(config(), **HOST) == config()
    assert validate_config(gen1(), **HOST) == gen1()


@pytest.mark.parametrize("cfg", [
    config(cpus=4),
    config(memory_bytes=8 * GIB),
    config(memory_bytes=32 * 1024 * 1024),
    gen1(disks=ide(4)),
    gen1(disks=ide(3), dvd="/iso/x.iso"),
    gen1(disks=(*ide(1), DiskAttachment("/d/v.raw", DiskBus.VIRTIO, "raw"),
                DiskAttachment("/d/s.qcow2", DiskBus.SCSI))),
    gen1(network_adapters=(NetworkAdapter(MAC, NicModel.VIRTIO),)),
    config(disks=(DiskAttachment("/d/a", DiskBus.SCSI), DiskAttachment("/d/b", DiskBus.VIRTIO))),
    config(boot_order=()),
    config(boot_order=(BootDevice.NETWORK,)),
    config(os_type="windows", accelerator="kvm", auto_start_delay_seconds=86400),
])
def test_valid_configs(cfg: VmConfig) -> None:
    validate_config(cfg, **HOST)


@pytest.mark.parametrize(("cfg", "why"), [
    (config(name=""), "must not be empty"),
    (config(name="a/b"), "'/'"),
    (config(cpus=0), "processor count 0 is out of range; this host allows 1 to 4"),
    (config(cpus=-1), "processor count -1"),
    (config(cpus=241), "processor count 241"),
    (config(memory_bytes=16 * 1024 * 1024), "16777216 bytes is below the minimum of 32 MiB"),
    (config(memory_bytes=512), "memory 512 bytes is below the minimum of 32 MiB; did you "
                               "mean 512M?"),
    (config(memory_bytes=GIB + 1), "whole number of MiB"),
    (config(notes="n" * 4001), "notes are longer than 4000"),
    (config(auto_start_delay_seconds=-1), "automatic start delay"),
    (config(auto_start_delay_seconds=86401), "automatic start delay"),
    (config(os_type="beos"), "os type 'beos'"),
    (config(accelerator="xen"), "accelerator 'xen'"),
    (config(boot_order=(BootDevice.DISK, BootDevice.DISK)), "names a device twice"),
    (config(network_adapters=(NetworkAdapter("52:54:00:ab:cd", NicModel.VIRTIO),)),
     "MAC address"),
    (config(disks=ide(1)), "Generation 2 VM has no IDE controller"),
    (config(disks=(DiskAttachment("/d/a", DiskBus.SCSI), *ide(1))), "no IDE controller"),
    (config(network_adapters=(NetworkAdapter(MAC, NicModel.E1000),)), "synthetic (virtio)"),
    (config(network_adapters=(NetworkAdapter(MAC, NicModel.VIRTIO),
                              NetworkAdapter(MAC.upper(), NicModel.VIRTIO))),
     "is given to two network adapters"),
    (config(network_adapters=(NetworkAdapter(MAC, NicModel.VIRTIO, "switch", "s1"),
                              NetworkAdapter(MAC.replace(":", "-"), NicModel.VIRTIO))),
     "is given to two network adapters"),
    (config(network_adapters=(NetworkAdapter("01:00:5e:00:00:01", NicModel.VIRTIO),)),
     "multicast"),
    (config(network_adapters=(NetworkAdapter("00:00:00:00:00:00", NicModel.VIRTIO),)),
     "not usable"),
    (config(network_adapters=(NetworkAdapter("52:54:00:ab:cd:zz", NicModel.VIRTIO),)),
     "six hex pairs"),
    (gen1(disks=ide(5)), "5 IDE devices were asked for"),
    (gen1(disks=ide(4), dvd="/iso/x.iso"), "5 IDE devices were asked for"),
    (gen1(disks=(DiskAttachment("/d/a", DiskBus.SCSI),)), "its first disk must be on IDE"),
])
def test_invalid_configs(cfg: VmConfig, why: str) -> None:
    with pytest.raises(InvalidInput) as info:
        validate_config(cfg, **HOST)
    assert why in info.value.message
    assert not isinstance(info.value, InsufficientResources)


def test_memory_over_host_is_insufficient_resources() -> None:
    with pytest.raises(InsufficientResources) as info:
        validate_config(config(memory_bytes=9 * GIB), **HOST)
    assert info.value.http_status == 422
    assert "9 GiB is more than this host has (8 GiB)" in info.value.message


def test_cpus_over_host_is_insufficient_resources() -> None:
    with pytest.raises(InsufficientResources):
        validate_config(config(cpus=5), **HOST)


def test_cpus_over_host_is_refused() -> None:
    with pytest.raises((InvalidInput, InsufficientResources), match="processor count 5"):
        validate_config(config(cpus=5), **HOST)


# -- JSON ------------------------------------------------------------------------------------


def full_config() -> VmConfig:
    """A config with every field away from its default."""
    return VmConfig(
        name="everything",
        generation=Generation.GEN1,
        cpus=3,
        memory_bytes=3 * GIB,
        notes="notes with 'quotes', \"double\", ünïcødé and\nnewlines",
        disks=(DiskAttachment("/d/a.qcow2", DiskBus.IDE, "qcow2", False),
               DiskAttachment("/d/b.raw", DiskBus.VIRTIO, "raw", True)),
        dvd="/iso/install.iso",
        network_adapters=(
            NetworkAdapter(MAC, NicModel.E1000, "user"),
            NetworkAdapter("52:54:00:00:00:01", NicModel.VIRTIO, "switch", "sw-1",
                           PortSettings(Vlan(VlanMode.TRUNK, allowed=(10, 20), native=5),
                                        mac_spoofing=True, dhcp_guard=True,
                                        router_guard=True,
                                        acls=(PortAcl(AclAction.DENY, AclDirection.INBOUND,
                                                      "10.0.0.0/8"),),
                                        bandwidth_max=10**8, bandwidth_min=10**7,
                                        mirror=MirrorMode.SOURCE),
                           dynamic_mac=True),
            NetworkAdapter("52:54:00:00:00:02", NicModel.VIRTIO, "switch")),
        boot_order=(BootDevice.NETWORK, BootDevice.DVD),
        auto_start=AutoStartAction.ALWAYS_START,
        auto_start_delay_seconds=30,
        auto_stop=AutoStopAction.SHUT_DOWN,
        os_type="windows",
        accelerator="tcg",
        image="tiny",
        extra={"k": "v"},
    )


@pytest.mark.parametrize("cfg", [VmConfig(name="minimal"), full_config()])
def test_config_json_round_trip(cfg: VmConfig) -> None:
    text = cfg.to_json()
    back = VmConfig.from_json(text)
    assert back == cfg
    assert isinstance(back.disks, tuple)
    assert isinstance(back.network_adapters, tuple)
    assert isinstance(back.boot_order, tuple)
    assert back.generation is cfg.generation
    assert all(isinstance(b, BootDevice) for b in back.boot_order)
    assert back.to_json() == text


def test_config_json_is_plain_json_with_stable_keys() -> None:
    raw = json.loads(full_config().to_json())
    assert raw["generation"] == 1
    assert raw["disks"][1] == {"path": "/d/b.raw", "bus": "virtio", "format": "raw",
                               "read_only": True, "owned": False, "id": disk_id_of("/d/b.raw")}
    assert raw["boot_order"] == ["network", "dvd"]
    assert raw["auto_start"] == "always-start"
    assert list(raw) == sorted(raw)


def test_from_json_ignores_unknown_fields_and_fills_defaults() -> None:
    raw = json.loads(VmConfig(name="old").to_json())
    raw["from_a_newer_version"] = 1
    raw["disks"] = [{"path": "/d/a", "bus": "scsi"}]
    raw["network_adapters"] = [{"mac": MAC, "model": "virtio"}]
    back = VmConfig.from_json(json.dumps(raw))
    assert back.disks == (DiskAttachment("/d/a", DiskBus.SCSI, "qcow2", False),)
    assert back.network_adapters == (NetworkAdapter(MAC, NicModel.VIRTIO, "user"),)


def test_adapter_records_from_before_switches_load_as_user_mode_adapters() -> None:
    raw = {"mac": MAC, "model": "e1000", "mode": "user"}
    nic = NetworkAdapter.from_json(raw)
    assert nic == NetworkAdapter(MAC, NicModel.E1000)
    assert (nic.switch, nic.port, nic.dynamic_mac) == ("", PortSettings(), False)
    assert NetworkAdapter.from_json(nic.to_json()) == nic


def test_adapter_json_round_trip_keeps_port_settings() -> None:
    nic = full_config().network_adapters[1]
    text = json.dumps(nic.to_json())
    back = NetworkAdapter.from_json(json.loads(text))
    assert back == nic
    assert back.port.acls[0].action is AclAction.DENY
    assert isinstance(back.port.vlan.allowed, tuple)


def test_adapter_mac_is_kept_lower_case_with_colons() -> None:
    assert NetworkAdapter(" 52-54-00-AB-CD-EF", NicModel.VIRTIO).mac == MAC


@pytest.mark.parametrize(("kwargs", "why"), [
    ({"mode": "bridge"}, "mode 'bridge' is not one of user, switch"),
    ({"mode": "user", "switch": "s1"}, "user-mode NAT adapter has no switch"),
    ({"mode": "user", "port": PortSettings(dhcp_guard=True)}, "no port settings"),
])
def test_adapter_shape_is_checked(kwargs: dict[str, Any], why: str) -> None:
    with pytest.raises(InvalidInput, match=why):
        NetworkAdapter(MAC, NicModel.VIRTIO, **kwargs)


def test_an_adapter_in_switch_mode_may_be_not_connected() -> None:
    nic = NetworkAdapter(MAC, NicModel.VIRTIO, "switch")
    validate_config(config(network_adapters=(nic,)), **HOST)
    assert nic.switch == ""


def test_record_evolve_and_name() -> None:
    record = VmRecord(id="1", config=VmConfig(name="a"))
    assert record.name == "a"
    assert record.state is VmState.OFF
    moved = record.evolve(state=VmState.RUNNING, pid=42)
    assert (moved.state, moved.pid, record.pid) == (VmState.RUNNING, 42, None)


def test_a_generation_1_vm_has_room_for_sixteen_adapters() -> None:
    nics = tuple(NetworkAdapter(f"52:54:00:00:02:{i:02x}", NicModel.E1000) for i in range(17))
    config = VmConfig(name="old", generation=Generation.GEN1, network_adapters=nics[:16])
    validate_config(config, host_cpus=4, host_memory=2**34)
    with pytest.raises(InvalidInput, match="room for 16 network adapters; 17"):
        validate_config(replace(config, network_adapters=nics), host_cpus=4, host_memory=2**34)
