"""Virtual switches end to end, with real tiny guests under TCG: private, internal, NAT
and external switches, as a user makes them with ``hv switch`` and ``--switch``.

The host service runs in a namespace of its own (its "host"); a "world" namespace
behind a veth plays a remote network with a TCP echo service (it answers with the
address it saw, so masquerading shows); a "lan" namespace behind another veth plays
the physical network the external switch bridges (dnsmasq hands out addresses there).
Two VMs boot once for the whole module: A on every switch, B on the private and the
NAT switch.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.hostproc import Guest, HostProcess
from tests.integration.netns import Lab, Namespace, TcpService, lab, wait_until
from tests.integration.switching import (
    boot,
    create_vm,
    host_in_namespace,
    ifname,
    mac_on,
    no_ping,
    pings,
    shown_ips,
    static,
    switches,
    wait_dhcp,
    wait_ping,
)

pytestmark = pytest.mark.integration

WORLD_HOST, WORLD = "10.200.0.1", "10.200.0.2"
LAN_HOST, LAN = "10.210.0.1", "10.210.0.2"
INTERNAL_HOST = "192.168.50.1"
NAT_NET, NAT_HOST = "192.168.60", "192.168.60.1"
ECHO_PORT = 7000


@dataclass
class Setup:
    host: HostProcess
    space: Namespace
    world: Namespace
    lan: Namespace
    a: Guest
    b: Guest
    a_if: dict[str, str]  # switch name -> interface name in A
    b_if: dict[str, str]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, tiny_image: Path) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("switches-connect")
    with lab() as made, host_in_namespace(made, tmp, tiny_image) as (host, space):
        world, lan = _networks(made, space, tmp)
        host.ok("switch", "create", "priv", "--type", "private")
        host.ok("switch", "create", "int", "--type", "internal", "--subnet", "192.168.50.0/24")
        host.ok("switch", "create", "nat", "--type", "nat", "--subnet", f"{NAT_NET}.0/24")
        host.ok("switch", "create", "ext", "--type", "external", "--adapter", "phys0")
        create_vm(host, "vma", "priv", "int", "nat", "ext")
        create_vm(host, "vmb", "priv", "nat")
        guests = boot(host, "vma", "vmb")
        a, b = guests["vma"], guests["vmb"]
        a_if = {s: ifname(a, mac_on(host, "vma", s)) for s in ("priv", "int", "nat", "ext")}
        b_if = {s: ifname(b, mac_on(host, "vmb", s)) for s in ("priv", "nat")}
        yield Setup(host, space, world, lan, a, b, a_if, b_if)


def _networks(made: Lab, space: Namespace, tmp: Path) -> tuple[Namespace, Namespace]:
    world = made.namespace("world")
    made.veth(space, "up0", world, "wan0", f"{WORLD_HOST}/24", f"{WORLD}/24")
    TcpService(world, WORLD, ECHO_PORT, "echo", tmp)
    lan = made.namespace("lan")
    made.veth(space, "phys0", lan, "lan0", f"{LAN_HOST}/24", f"{LAN}/24")
    space.ip("route", "add", "default", "via", LAN)
    TcpService(lan, LAN, ECHO_PORT, "echo", tmp)
    # the physical network's DHCP server; no router option, so a guest's default
    # route stays the NAT switch's
    lan.popen("dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--port=0",
              "--user=root", "--interface=lan0", "--bind-interfaces",
              "--dhcp-range=10.210.0.100,10.210.0.150,1h", "--dhcp-option=3",
              f"--dhcp-leasefile={tmp / 'lan.leases'}", "--pid-file=",
              log=tmp / "lan-dnsmasq.log")
    return world, lan


def echo_from(guest: Guest, address: str, text: str) -> str:
    return guest.ok(f"echo {text} | nc -w 10 {address} {ECHO_PORT}").strip()


def test_switches_are_listed(setup: Setup) -> None:
    listed = {s["name"]: s for s in switches(setup.host)}
    assert {n: listed[n]["type"] for n in ("priv", "int", "nat", "ext")} == {
        "priv": "private", "int": "internal", "nat": "nat", "ext": "external"}
    shown = json.loads(setup.host.ok("switch", "show", "int", "-o", "json"))
    assert shown["host_address"].startswith(f"{INTERNAL_HOST}/")
    bridges = setup.space.links()
    assert all(listed[n]["bridge"] in bridges for n in listed)


def test_private_switch_joins_vms_but_not_the_host(setup: Setup) -> None:
    a, b = setup.a, setup.b
    static(a, setup.a_if["priv"], "10.77.0.1/24")
    static(b, setup.b_if["priv"], "10.77.0.2/24")
    wait_ping(a, "10.77.0.2")
    wait_ping(b, "10.77.0.1")
    # the host has 10.200.0.1; a guest on the private switch in that subnet must not
    # reach it (not even by the host answering ARP on the bridge)
    b.ok(f"ip addr add 10.200.0.50/24 dev {setup.b_if['priv']}")
    try:
        assert no_ping(b, WORLD_HOST)
        assert pings(b, "10.77.0.1")  # the switch itself still works
    finally:
        b.ok(f"ip addr del 10.200.0.50/24 dev {setup.b_if['priv']}")
    assert not setup.space.ping("10.77.0.2", count=1, wait=1)


def test_internal_switch_reaches_the_host(setup: Setup) -> None:
    static(setup.a, setup.a_if["int"], "192.168.50.10/24")
    wait_ping(setup.a, INTERNAL_HOST)
    setup.space.wait_ping("192.168.50.10")


def test_nat_switch_gives_addresses_and_masquerades(setup: Setup) -> None:
    host, a, b = setup.host, setup.a, setup.b
    a_ip = wait_dhcp(a, setup.a_if["nat"])
    b_ip = wait_dhcp(b, setup.b_if["nat"])
    assert a_ip.startswith(f"{NAT_NET}.") and b_ip.startswith(f"{NAT_NET}.") and a_ip != b_ip
    assert a_ip != NAT_HOST and b_ip != NAT_HOST
    # the addresses show in hv vm show (from the guest agent)
    wait_until(lambda: a_ip in shown_ips(host, "vma", mac_on(host, "vma", "nat")),
               what=f"hv vm show does not list {a_ip} for vma")
    wait_ping(a, NAT_HOST)
    wait_ping(a, b_ip)
    # a service in another namespace sees the host's address, not the guest's
    answer = wait_until(lambda: echo_from(a, WORLD, "hello"), what="no echo through NAT")
    assert answer == f"{WORLD_HOST} hello"
    # the NAT switch's DNS knows the names the VMs sent with DHCP
    a.ok(f"hostname vma && hvstack-dhcp {setup.a_if['nat']}")
    wait_until(lambda: a_ip in b.sh(f"nslookup vma {NAT_HOST}")[1],
               what="vma does not resolve on the NAT switch's DNS")


def test_nat_static_mapping_reaches_a_vm(setup: Setup) -> None:
    host, a = setup.host, setup.a
    a_ip = wait_dhcp(a, setup.a_if["nat"])
    a.ok("mkdir -p /tmp/www && echo from-vma > /tmp/www/index.html && "
         "httpd -p 80 -h /tmp/www")
    host.ok("switch", "nat", "add-mapping", "nat", "--protocol", "tcp",
            "--external-port", "8080", "--internal-ip", a_ip, "--internal-port", "80")
    answer = wait_until(
        lambda: setup.world.tcp_request(WORLD_HOST, 8080, "GET / HTTP/1.0\r\n\r\n"),
        what="the static mapping does not reach the VM")
    assert "from-vma" in answer


def test_external_switch_bridges_the_physical_network(setup: Setup) -> None:
    host, space, a = setup.host, setup.space, setup.a
    bridge = json.loads(host.ok("switch", "show", "ext", "-o", "json"))["bridge"]
    links = space.links()
    assert links["phys0"].get("master") == bridge
    # the host kept its address and default route (now on the bridge) and its network
    assert f"{LAN_HOST}/24" in space.addresses(bridge)
    assert any(r["dst"] == "default" and r.get("gateway") == LAN for r in space.routes())
    assert space.ping(LAN)
    # the VM gets an address from the physical network's DHCP and talks to it directly
    ext_ip = wait_dhcp(a, setup.a_if["ext"])
    assert ext_ip.startswith("10.210.0.1")
    answer = wait_until(lambda: echo_from(a, LAN, "direct"), what="no echo on the LAN")
    assert answer == f"{ext_ip} direct"


def test_deleting_the_external_switch_gives_the_adapter_back(setup: Setup) -> None:
    host, space = setup.host, setup.space
    in_use = host.hv("switch", "delete", "ext")
    assert in_use.returncode == 2 and "--force" in in_use.stderr
    host.ok("switch", "delete", "ext", "--force")
    assert "ext" not in {s["name"] for s in switches(host)}
    assert f"{LAN_HOST}/24" in space.addresses("phys0")
    assert any(r["dst"] == "default" and r.get("dev") == "phys0" for r in space.routes())
    assert space.ping(LAN)
    # the VM's other switches are untouched
    assert pings(setup.a, "10.77.0.2") and pings(setup.a, INTERNAL_HOST)
