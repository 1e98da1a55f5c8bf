"""The pure parts of the netlink backend: privilege, VLAN layouts, what an external
switch moves, host networks, plan defaults."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from hvstack.errors import HypervisorError
from hvstack.network import netlink, vlans
from hvstack.network.backend import SwitchPlan
from hvstack.network.linux import host_address, tag_of, write_sysctl
from hvstack.network.model import Vlan, VlanMode
from hvstack.network.names import table_name
from hvstack.network.netlink import AF_INET, AF_INET6, Address, Route

STATUS = "Name:\tpython\nCapInh:\t0000000000000000\nCapEff:\t{}\nCapBnd:\t000001ffffffffff\n"


@pytest.mark.parametrize(("caps", "missing"), [
    ("000001ffffffffff", False),  # root
    ("0000008000001000", False),  # CAP_NET_ADMIN and CAP_BPF (39)
    ("0000000000201000", False),  # CAP_NET_ADMIN and CAP_SYS_ADMIN (21)
    ("0000000000001000", True),  # CAP_NET_ADMIN only: no eBPF programs (VLAN policing)
    ("0000008000000000", True),  # CAP_BPF only
    ("0000000000000000", True),
    ("0000000000000400", True),  # CAP_NET_BIND_SERVICE (10), not 12
])
def test_privilege_is_cap_net_admin_and_cap_bpf(tmp_path: Path, caps: str, missing: bool) -> None:
    status = tmp_path / "status"
    status.write_text(STATUS.format(caps))
    message = netlink.missing_privilege(status)
    assert (message is not None) == missing
    if message:
        assert "CAP_NET_ADMIN" in message and "user-mode NAT" in message


def test_unreadable_status_means_no_privilege(tmp_path: Path) -> None:
    assert netlink.missing_privilege(tmp_path / "missing") == netlink.PRIVILEGE_MESSAGE
    assert netlink.effective_caps("Name: x\n") == 0


def test_vlan_layout_per_mode() -> None:
    """(native VLAN: the bridge the port joins, VLANs carried tagged)."""
    assert vlans.layout(Vlan()) == (1, ())
    assert vlans.layout(Vlan(VlanMode.ACCESS, access_id=10)) == (10, ())
    # No native VLAN: untagged frames are the switch's default network (VLAN 1).
    assert vlans.layout(Vlan(VlanMode.TRUNK, allowed=(20, 10))) == (1, (10, 20))
    # The native VLAN is untagged, even when it is also listed as allowed.
    assert vlans.layout(Vlan(VlanMode.TRUNK, allowed=(10, 20), native=20)) == (20, (10,))
    assert vlans.layout(Vlan(VlanMode.TRUNK, allowed=(1, 10), native=30)) == (30, (1, 10))


def test_stable_mac_is_unicast_local_and_fixed() -> None:
    mac = netlink.stable_mac("hvb12345abcdef")
    first = int(mac[:2], 16)
    assert first & 1 == 0 and first & 2 == 2
    assert mac == netlink.stable_mac("hvb12345abcdef") != netlink.stable_mac("hvb12345abcdee")


def route(dst: str = "", dst_len: int = 0, *, proto: int = 3, table: int = 254,
          family: int = AF_INET, gateway: str | None = "10.0.0.1") -> Route:
    return Route(family, dst, dst_len, gateway, None, table, proto, 0, None)


def test_which_routes_move_with_an_external_adapter() -> None:
    assert netlink.movable_route(route())  # the default route, static (boot)
    assert netlink.movable_route(route(proto=16))  # from a DHCP client
    assert not netlink.movable_route(route("10.0.0.0", 24, proto=netlink.RTPROT_KERNEL))
    assert not netlink.movable_route(route(proto=netlink.RTPROT_RA, family=AF_INET6))
    assert not netlink.movable_route(route("10.0.0.5", 32, table=netlink.RT_TABLE_LOCAL))


def test_which_addresses_move() -> None:
    assert netlink.movable_address(AF_INET, 0, 0x80)
    assert netlink.movable_address(AF_INET, 0, 0)  # a DHCP lease
    assert netlink.movable_address(AF_INET6, 0, netlink.IFA_F_PERMANENT)
    assert not netlink.movable_address(AF_INET6, 0, 0)  # SLAAC: the bridge remakes it
    assert not netlink.movable_address(AF_INET6, 253, netlink.IFA_F_PERMANENT)  # link


def test_host_networks_from_addresses_and_routes() -> None:
    nets = netlink.host_networks(
        [Address(AF_INET, "192.168.1.20", 24), Address(AF_INET, "127.0.0.1", 8),
         Address(AF_INET6, "2001:db8::1", 64)],
        [route(), route("10.8.0.0", 16), route("192.168.1.0", 24, proto=2, gateway=None),
         route("192.168.1.20", 32, table=255), route("2001:db8::", 48, family=AF_INET6)])
    assert nets == [ipaddress.IPv4Network(n) for n in
                    ("10.8.0.0/16", "127.0.0.0/8", "192.168.1.0/24")]


def test_route_network_of_a_default_route() -> None:
    assert str(route().network) == "0.0.0.0/0"
    assert str(route(family=AF_INET6).network) == "::/0"


def test_host_address_of_a_plan() -> None:
    from hvstack.network.model import SwitchType

    plan = SwitchPlan("s", "S", SwitchType.NAT, "hvb", "t",
                      subnet=ipaddress.IPv4Network("172.20.5.0/24"))
    assert host_address(plan) == ipaddress.IPv4Interface("172.20.5.1/24")
    given = ipaddress.IPv4Interface("172.20.5.254/24")
    plan = SwitchPlan("s", "S", SwitchType.INTERNAL, "hvb", "t", host_address=given)
    assert host_address(plan) == given
    assert host_address(SwitchPlan("s", "S", SwitchType.PRIVATE, "hvb", "t",
                                   subnet=ipaddress.IPv4Network("10.0.0.0/24"))) is None


def test_tag_of_a_table() -> None:
    assert tag_of(table_name("ab12c")) == "ab12c"


def test_write_sysctl_writes_only_a_change(tmp_path: Path) -> None:
    knob = tmp_path / "ip_forward"
    knob.write_text("0\n")
    write_sysctl(knob, "1")
    assert knob.read_text() == "1\n"
    knob.chmod(0o444)  # unchanged value: no write (root would write anyway; check mtime)
    before = knob.stat().st_mtime_ns
    write_sysctl(knob, "1")
    assert knob.stat().st_mtime_ns == before


def test_vlan_bridge_names_are_ours_valid_and_never_a_switch_bridge() -> None:
    from hvstack.network.names import IFNAMSIZ, bridge_name, is_ours
    from hvstack.network.netlink import Link
    from hvstack.network.vlans import parent_of, vlan_bridge_name

    bridge = bridge_name("ab12c", "switch-id")
    names = {vlan_bridge_name(bridge, vid) for vid in range(1, 4095)}
    assert len(names) == 4094
    for name in names:
        assert len(name) <= IFNAMSIZ and is_ours("ab12c", name)
        assert len(name) == len(bridge) + 1  # switch bridges have one digit less
    link = Link(7, vlan_bridge_name(bridge, 10), "bridge", None, "", 0, f"{bridge}.10")
    assert parent_of(link) == bridge
    assert parent_of(Link(8, bridge, "bridge", None, "", 0, "my notes")) is None
    assert parent_of(Link(9, "hvt", "tun", None, "", 0, f"{bridge}.10")) is None


def test_trunk_veth_names_are_ours_valid_and_distinct() -> None:
    from hvstack.network.names import IFNAMSIZ, is_ours, tap_name, veth_names
    from hvstack.network.netlink import Link
    from hvstack.network.trunks import owner_of

    tap = tap_name("ab12c", "vm", "52:54:00:00:00:01")
    pairs = {veth_names("ab12c", port, vid) for port in (tap, "eth0") for vid in range(1, 201)}
    assert len(pairs) == 2 * 200  # (a collision is refused: trunks.sync checks the alias)
    ends = {end for pair in pairs for end in pair}
    assert len(ends) == 2 * len(pairs)
    for inner, outer in pairs:
        assert inner.startswith("hvvab12c") and outer.startswith("hvwab12c")
        assert len(inner) == len(outer) == IFNAMSIZ
        assert is_ours("ab12c", inner) and is_ours("ab12c", outer)
        assert not is_ours("ab12d", inner)
    assert veth_names("ab12c", tap, 10) != veth_names("ab12d", tap, 10)
    veth = Link(3, "hvvab12c0000000", "veth", None, "", 0, f"trunk:{tap}:10")
    assert owner_of(veth) == (tap, 10)
    assert owner_of(Link(3, "x", "veth", None, "", 0, "trunk:a:b:10")) is None
    assert owner_of(Link(3, "x", "bridge", None, "", 0, f"trunk:{tap}:10")) is None


def test_write_sysctl_of_a_missing_knob(tmp_path: Path) -> None:
    write_sysctl(tmp_path / "disable_ipv6", "1", missing_ok=True)  # IPv6 off: nothing to do
    with pytest.raises(HypervisorError, match="ip_forward"):
        write_sysctl(tmp_path / "ip_forward", "1")


def test_kernel_errors_say_what_failed_and_privilege() -> None:
    import errno

    denied = netlink.failure("creating tap hvt1", OSError(errno.EPERM, "denied"))
    assert "creating tap hvt1" in str(denied) and "CAP_NET_ADMIN" in str(denied)
    busy = netlink.failure("creating bridge hvb1", OSError(errno.EEXIST, "exists"))
    assert str(busy) == "creating bridge hvb1: File exists"
