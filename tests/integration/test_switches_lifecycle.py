"""Adapters and switches over a VM's and the host service's life, with real tiny
Generation 2 guests under TCG: hot add and remove of an adapter, connect and
disconnect while running, the host service killed and started again (it rebuilds
rules and DHCP; the VMs keep talking), and every bad input of the issue through the
CLI (exit 2, one line, nothing half-made).

Two VMs boot once for the module: ``ha`` on the private and the NAT switch, ``hb``
on the private switch. A "world" namespace behind a veth plays a remote service.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.integration.hostproc import Guest, HostProcess
from tests.integration.netns import WAIT, Lab, Namespace, TcpService, lab, wait_until
from tests.integration.switching import (
    adapters,
    boot,
    create_vm,
    fails_cleanly,
    host_in_namespace,
    ifname,
    mac_on,
    no_ping,
    shown_ips,
    static,
    switches,
    wait_dhcp,
    wait_ping,
)

pytestmark = pytest.mark.integration

NAT_NET = "192.168.80"
WORLD_HOST, WORLD = "10.201.0.1", "10.201.0.2"


@dataclass
class Setup:
    lab: Lab
    host: HostProcess
    space: Namespace
    tmp: Path
    ha: Guest
    hb: Guest


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, tiny_image: Path) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("switches-lifecycle")
    with lab() as made, host_in_namespace(made, tmp, tiny_image) as (host, space):
        world = made.namespace("world")
        made.veth(space, "up0", world, "wan0", f"{WORLD_HOST}/24", f"{WORLD}/24")
        TcpService(world, WORLD, 7000, "echo", tmp)
        host.ok("switch", "create", "priv", "--type", "private")
        host.ok("switch", "create", "nat", "--type", "nat", "--subnet", f"{NAT_NET}.0/24")
        create_vm(host, "ha", "priv", "nat", generation=2)
        create_vm(host, "hb", "priv", generation=2)
        guests = boot(host, "ha", "hb")
        ha, hb = guests["ha"], guests["hb"]
        static(ha, ifname(ha, mac_on(host, "ha", "priv")), "10.78.0.1/24")
        static(hb, ifname(hb, mac_on(host, "hb", "priv")), "10.78.0.2/24")
        wait_ping(ha, "10.78.0.2")
        yield Setup(made, host, space, tmp, ha, hb)


def macs(host: HostProcess, vm: str) -> set[str]:
    return {str(nic["mac"]) for nic in adapters(host, vm)}


def ports(host: HostProcess, switch: str) -> list[dict[str, Any]]:
    shown: list[dict[str, Any]] = json.loads(
        host.ok("switch", "show", switch, "-o", "json"))["ports"]
    return shown


def test_hot_add_and_remove_an_adapter(setup: Setup) -> None:
    host, ha, space = setup.host, setup.ha, setup.space
    before = macs(host, "ha")
    host.ok("vm", "nic", "add", "ha", "--switch", "nat")
    (mac,) = macs(host, "ha") - before
    iface = wait_until(lambda: ha.sh(f"hvstack-ifname {mac}")[1].strip(), WAIT,
                       "the hot-added adapter never appeared in the guest")
    address = wait_dhcp(ha, iface)  # the guest's watcher started DHCP on it
    assert address.startswith(f"{NAT_NET}.")
    wait_until(lambda: address in shown_ips(host, "ha", mac),
               what="hv vm show does not list the hot-added adapter's address")
    tap = next(p["tap"] for p in ports(host, "nat") if p["mac"] == mac)
    assert tap in space.links()
    host.ok("vm", "nic", "remove", "ha", mac)
    wait_until(lambda: ha.sh(f"hvstack-ifname {mac}")[0] != 0, WAIT,
               "the removed adapter is still in the guest")
    assert macs(host, "ha") == before
    wait_until(lambda: tap not in space.links(), 30, f"tap {tap} is still there")
    assert mac not in {p["mac"] for p in ports(host, "nat")}


def test_disconnect_and_connect_while_running(setup: Setup) -> None:
    host, ha = setup.host, setup.ha
    mac = mac_on(host, "ha", "priv")
    iface = ifname(ha, mac)
    host.ok("vm", "nic", "set", "ha", mac, "--disconnect")
    wait_until(lambda: ha.ok(f"cat /sys/class/net/{iface}/carrier").strip() == "0",
               what="the guest still sees a link after the disconnect")
    assert no_ping(ha, "10.78.0.2")
    host.ok("vm", "nic", "set", "ha", mac, "--switch", "priv")
    wait_ping(ha, "10.78.0.2")


def test_host_service_restart_rebuilds_everything(setup: Setup) -> None:
    host, space, ha, hb = setup.host, setup.space, setup.ha, setup.hb
    nat_if = ifname(ha, mac_on(host, "ha", "nat"))
    wait_dhcp(ha, nat_if)
    wait_until(lambda: ha.sh(f"echo x | nc -w 10 {WORLD} 7000")[0] == 0,
               what="no echo through NAT before the restart")
    bridges = {s["name"]: s["bridge"] for s in switches(host)}
    host.kill9()
    # as after a crash that lost state: the rules are gone (QEMU keeps the taps, the
    # bridges stay; dnsmasq keeps running and must be adopted)
    space.run("nft", "flush", "ruleset")
    host.start()
    assert {s["name"]: s["bridge"] for s in switches(host)} == bridges
    assert set(bridges.values()) <= set(space.links())
    assert space.run("nft", "list", "tables").stdout.strip()
    dnsmasq = [pid for pid in space.pids()
               if Path(f"/proc/{pid}/comm").read_text().strip() == "dnsmasq"]
    assert len(dnsmasq) == 1, dnsmasq  # adopted, not a second one
    wait_ping(ha, "10.78.0.2")
    wait_ping(hb, "10.78.0.1")
    ha.ok(f"hvstack-dhcp {nat_if}")  # DHCP answers again
    wait_dhcp(ha, nat_if)
    wait_until(lambda: ha.sh(f"echo y | nc -w 10 {WORLD} 7000")[1].strip()
               == f"{WORLD_HOST} y", what="masquerading is not back after the restart")


def host_state(setup: Setup) -> tuple[Any, ...]:
    """What a refused command must leave unchanged."""
    host, space = setup.host, setup.space
    return (sorted(space.links()), space.run("nft", "list", "ruleset").stdout,
            json.dumps(switches(host), sort_keys=True),
            json.dumps([adapters(host, vm) for vm in ("ha", "hb")], sort_keys=True))


def test_bad_inputs_are_refused_and_leave_nothing(setup: Setup) -> None:
    host, space = setup.host, setup.space
    space.ip("link", "add", "brx", "type", "bridge")
    # veths stand in for host adapters (some CI kernels have no dummy driver)
    space.ip("link", "add", "dum0", "type", "veth", "peer", "name", "dum0p")
    space.ip("link", "set", "dum0", "master", "brx")
    space.ip("link", "add", "dum1", "type", "veth", "peer", "name", "dum1p")
    host.ok("switch", "create", "ext1", "--type", "external", "--adapter", "dum1")
    ha_mac = mac_on(host, "ha", "priv")
    hb_mac = mac_on(host, "hb", "priv")
    before = host_state(setup)
    bad = [
        ("switch", "create", "x1", "--type", "external", "--adapter", "nosuch0"),
        ("switch", "create", "x2", "--type", "external", "--adapter", "dum0"),  # in a bridge
        ("switch", "create", "x3", "--type", "external", "--adapter", "dum1"),  # ext1 has it
        ("switch", "create", "x4", "--type", "nat", "--subnet", f"{NAT_NET}.128/25"),
        ("switch", "create", "x5", "--type", "nat", "--subnet", "10.0.0.0/33"),
        ("switch", "create", "x6", "--type", "wormhole"),
        ("switch", "create", "priv", "--type", "private"),  # the name is taken
        ("vm", "nic", "set", "ha", ha_mac, "--vlan", "4095"),
        ("vm", "nic", "set", "ha", ha_mac, "--vlan", "0"),
        ("vm", "nic", "set", "ha", ha_mac, "--trunk", "10,5000"),
        ("vm", "nic", "set", "ha", ha_mac, "--bandwidth-max", "fast"),
        ("vm", "nic", "set", "ha", ha_mac, "--acl", "deny:both:10.0.0.1/8"),
        ("vm", "nic", "set", "ha", "52:54:00:00:00:99", "--vlan", "5"),  # no such adapter
        ("vm", "nic", "set", "ha", ha_mac, "--mac", hb_mac),  # hb has it (and ha runs)
        ("vm", "nic", "add", "ha", "--switch", "priv", "--mac", "52:54:00:zz:00:01"),
        ("vm", "nic", "add", "ha", "--switch", "priv", "--mac", "01:00:5e:00:00:01"),
        ("vm", "nic", "add", "ha", "--switch", "priv", "--mac", hb_mac),  # hb has it
        ("vm", "nic", "add", "ha", "--switch", "no-such-switch"),
        ("vm", "create", "hc", "--image", "tiny", "--switch", "no-such-switch"),
    ]
    for args in bad:
        fails_cleanly(host, *args)
        assert host_state(setup) == before, f"hv {' '.join(args)} left something behind"
    assert "hc" not in host.ok("vm", "list")
    # long names map to distinct, valid kernel names (never truncated into one)
    long = "a-switch-with-a-name-much-longer-than-any-kernel-interface-name"
    host.ok("switch", "create", f"{long}-1", "--type", "private")
    host.ok("switch", "create", f"{long}-2", "--type", "private")
    made = {s["name"]: s["bridge"] for s in switches(host) if s["name"].startswith(long)}
    assert len(set(made.values())) == 2 and all(len(b) <= 15 for b in made.values())
    assert set(made.values()) <= set(space.links())
    for name in made:
        host.ok("switch", "delete", name)
    assert not set(made.values()) & set(space.links())
