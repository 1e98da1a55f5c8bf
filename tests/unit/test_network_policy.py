"""The host's network decisions, with worked examples (network/policy.py)."""

from __future__ import annotations

import ipaddress

import pytest

from hvstack.errors import Conflict, InsufficientResources, InvalidInput
from hvstack.network.backend import InterfaceInfo
from hvstack.network.model import NatMapping, NatProtocol
from hvstack.network.policy import (
    MacPool,
    allocate_mac,
    check_external_adapter,
    check_interface_name,
    check_mapping,
    check_overlap,
    choose_subnet,
    dhcp_range,
    host_interface,
)

net = ipaddress.IPv4Network


def test_default_subnet_is_the_first_candidate_on_a_bare_host() -> None:
    assert choose_subnet([net("0.0.0.0/0"), net("10.0.2.0/24")]) == net("172.16.0.0/24")


def test_default_subnet_avoids_host_networks_and_switches() -> None:
    host = [net("172.16.0.0/16"), net("192.168.1.0/24")]
    assert choose_subnet(host) == net("172.17.0.0/24")
    # docker's 172.17.0.0/16 too, and a switch that took 172.18.0.0/24
    assert choose_subnet([*host, net("172.17.0.0/16")], [net("172.18.0.0/24")]) == \
        net("172.18.1.0/24")


def test_default_subnet_when_all_of_172_16_is_taken() -> None:
    with pytest.raises(InsufficientResources):
        choose_subnet([net("172.16.0.0/12")])


def test_overlap_between_switches() -> None:
    check_overlap(net("192.168.10.0/24"), {"a": net("192.168.11.0/24")})
    with pytest.raises(Conflict, match=r"overlaps 192\.168\.0\.0/16 of switch .lab."):
        check_overlap(net("192.168.10.0/24"), {"lab": net("192.168.0.0/16")})


def test_host_address_and_dhcp_range() -> None:
    first = host_interface(net("192.168.100.0/24"))
    assert str(first) == "192.168.100.1/24"
    assert dhcp_range(first) == ("192.168.100.2", "192.168.100.254")
    last = host_interface(net("10.9.0.0/29"), "10.9.0.6")
    assert dhcp_range(last) == ("10.9.0.1", "10.9.0.5")
    middle = host_interface(net("10.9.0.0/29"), "10.9.0.3")
    assert dhcp_range(middle) == ("10.9.0.4", "10.9.0.6")
    for bad in ("10.9.0.0", "10.9.0.7", "10.9.1.1", "nonsense"):
        with pytest.raises(InvalidInput):
            host_interface(net("10.9.0.0/29"), bad)


def test_mappings_point_into_the_subnet_and_ports_are_unique() -> None:
    host = host_interface(net("192.168.100.0/24"))
    web = NatMapping(NatProtocol.TCP, 8080, "192.168.100.10", 80)
    check_mapping(web, host, {})
    check_mapping(web, host, {"other": [NatMapping(NatProtocol.UDP, 8080, "10.0.0.2", 1)]})
    with pytest.raises(Conflict, match="tcp port 8080 is already mapped by switch 'a'"):
        check_mapping(web, host, {"a": [NatMapping(NatProtocol.TCP, 8080, "10.0.0.2", 1)]})
    for ip in ("192.168.100.1", "192.168.100.255", "10.0.0.1", "x"):
        with pytest.raises(InvalidInput):
            check_mapping(NatMapping(NatProtocol.TCP, 1, ip, 1), host, {})


def test_interface_names() -> None:
    assert check_interface_name("eth0") == "eth0"
    for bad in ("", "a" * 16, "eth 0", "a/b", "..", "eth0:1", "e\x1b"):
        with pytest.raises(InvalidInput):
            check_interface_name(bad)


def test_external_adapter_checks() -> None:
    check_external_adapter(InterfaceInfo("eth1", True), ours=False, used_by={})
    with pytest.raises(InvalidInput, match="no network interface named 'eth9'"):
        check_external_adapter(InterfaceInfo("eth9", False), ours=False, used_by={})
    with pytest.raises(Conflict, match="already used by switch 'ext'"):
        check_external_adapter(InterfaceInfo("eth1", True), ours=False,
                               used_by={"eth1": "ext"})
    with pytest.raises(Conflict, match="already in bridge 'br0'"):
        check_external_adapter(InterfaceInfo("eth1", True, master="br0"), ours=False,
                               used_by={})
    with pytest.raises(InvalidInput, match="is a bridge"):
        check_external_adapter(InterfaceInfo("br0", True, is_bridge=True), ours=False,
                               used_by={})


def test_mac_pool_parsing() -> None:
    pool = MacPool.parse("52:54:00:00:00:00-52:54:00:ff:ff:ff")
    assert pool.size == 1 << 24 and "52:54:00:12:34:56" in pool
    assert "52:54:01:00:00:00" not in pool
    assert str(pool) == "52:54:00:00:00:00-52:54:00:ff:ff:ff"
    for bad in ("52:54:00:00:00:00", "52:54:00:00:00:09-52:54:00:00:00:01",
                "01:00:00:00:00:00-01:00:00:00:00:ff",  # multicast
                "52:00:00:00:00:00-54:00:00:00:00:00", "zz-yy"):
        with pytest.raises(InvalidInput):
            MacPool.parse(bad)


def test_mac_allocation_is_random_in_the_pool_and_skips_used_ones() -> None:
    pool = MacPool.parse("02:00:00:00:00:00-02:00:00:00:00:03")
    assert allocate_mac(pool, [], lambda n: 2) == "02:00:00:00:00:02"
    # the random pick is taken: the next free one after it, wrapping around
    used = ["02:00:00:00:00:02", "02:00:00:00:00:03"]
    assert allocate_mac(pool, used, lambda n: 2) == "02:00:00:00:00:00"
    with pytest.raises(InsufficientResources, match="every MAC of the pool"):
        allocate_mac(pool, [*used, "02:00:00:00:00:00", "02:00:00:00:00:01"])


def test_mac_allocation_with_the_default_pool() -> None:
    pool = MacPool.parse("52:54:00:00:00:00-52:54:00:ff:ff:ff")
    macs = {allocate_mac(pool, []) for _ in range(50)}
    assert len(macs) > 40 and all(m in pool for m in macs)
