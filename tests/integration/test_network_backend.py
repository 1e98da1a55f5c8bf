"""The Linux network backend for real: bridges, taps, uplinks and addresses in network
namespaces the test makes (no VMs: veth pairs and namespaces stand in for them).

Each test makes its namespaces (``hvtest-<pid>-<n>``) and runs one scenario of this
module in a child process inside the namespace playing the host (``ip netns exec NS
python -m tests.integration.test_network_backend SCENARIO``): the backend works in
its process's namespace, as the host service does. The namespaces are deleted (and
whatever runs in them killed) afterwards, pass or fail. Rules, shaping and DHCP are
recording stand-ins here (their own tests cover them): this is the netlink part and
its composition.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import itertools
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hvstack.errors import Conflict, HvError, InvalidInput
from hvstack.network import netlink, vlans
from hvstack.network.backend import DhcpPlan, PortPlan, SwitchPlan
from hvstack.network.linux import LinuxNetwork
from hvstack.network.model import PortSettings, SwitchType, Vlan, VlanMode
from hvstack.network.names import bridge_name, table_name, tap_name

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
TAG = "7e57a"
TABLE = table_name(TAG)
_counter = itertools.count()


# -- namespaces (test side) -----------------------------------------------------------

def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=60)


def in_ns(ns: str, *argv: str) -> None:
    sh("ip", "-n", ns, *argv)


@pytest.fixture
def netns() -> Iterator[Callable[[], str]]:
    made: list[str] = []

    def make() -> str:
        name = f"hvtest-{os.getpid()}-{next(_counter)}"
        sh("ip", "netns", "add", name)
        made.append(name)
        in_ns(name, "link", "set", "lo", "up")
        return name

    try:
        yield make
    finally:
        for name in made:
            pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True,
                                  text=True, check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", name], check=False)


def run_scenario(ns: str, name: str, *args: str, wrapper: tuple[str, ...] = ()) -> None:
    """Run ``name`` in a child process inside ``ns`` (through ``wrapper``, a command
    that runs the rest); its failure fails the test."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    done = subprocess.run(
        ["ip", "netns", "exec", ns, *wrapper, sys.executable, "-m",
         "tests.integration.test_network_backend", name, *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, f"scenario {name} failed:\n{done.stdout}\n{done.stderr}"


@pytest.fixture
def physical(netns: Callable[[], str]) -> tuple[str, str]:
    """A host namespace whose adapter ``hx0`` (10.77.0.2/24, 2001:db8:77::2/64, default
    route and a static route via 10.77.0.1, an IPv6 route via 2001:db8:77::1) is a veth
    to a namespace playing the physical network (10.77.0.1 and 2001:db8:77::1; beyond
    them 192.0.2.1 and 2001:db8:99::1)."""
    host, phys = netns(), netns()
    in_ns(host, "link", "add", "hx0", "type", "veth", "peer", "name", "px0", "netns", phys)
    in_ns(phys, "addr", "add", "10.77.0.1/24", "dev", "px0")
    in_ns(phys, "addr", "add", "192.0.2.1/32", "dev", "lo")
    in_ns(phys, "-6", "addr", "add", "2001:db8:77::1/64", "dev", "px0", "nodad")
    in_ns(phys, "-6", "addr", "add", "2001:db8:99::1/128", "dev", "lo")
    in_ns(phys, "link", "set", "px0", "up")
    in_ns(host, "addr", "add", "10.77.0.2/24", "dev", "hx0")
    in_ns(host, "-6", "addr", "add", "2001:db8:77::2/64", "dev", "hx0", "nodad")
    in_ns(host, "link", "set", "hx0", "up")
    in_ns(host, "route", "add", "default", "via", "10.77.0.1", "dev", "hx0")
    in_ns(host, "route", "add", "198.51.100.0/24", "via", "10.77.0.1", "dev", "hx0",
          "metric", "50")
    in_ns(host, "-6", "route", "add", "2001:db8:99::/48", "via", "2001:db8:77::1", "dev",
          "hx0")
    return host, phys


def test_external_switch_keeps_the_host_connected(physical: tuple[str, str]) -> None:
    run_scenario(physical[0], "external_switch")


def test_external_switch_failing_midway_leaves_the_adapter_as_it_was(
        physical: tuple[str, str]) -> None:
    run_scenario(physical[0], "external_switch_fails")


def test_external_switch_refuses_bad_adapters(physical: tuple[str, str]) -> None:
    run_scenario(physical[0], "external_refusals")


def test_external_switch_part_made_by_a_crash_is_finished(physical: tuple[str, str]) -> None:
    run_scenario(physical[0], "external_repair")


def test_stale_external_bridge_is_given_back_by_cleanup(physical: tuple[str, str]) -> None:
    run_scenario(physical[0], "external_cleanup")


def test_tap_port_carries_frames_both_ways(netns: Callable[[], str]) -> None:
    run_scenario(netns(), "tap_port")


def test_switches_nat_internal_private(netns: Callable[[], str]) -> None:
    run_scenario(netns(), "internal_and_nat")


def test_failures_leave_nothing_behind(netns: Callable[[], str]) -> None:
    run_scenario(netns(), "failures")


def test_vlan_ports(netns: Callable[[], str]) -> None:
    run_scenario(netns(), "vlan_ports")


def test_composed_with_nftables_tc_and_dnsmasq(netns: Callable[[], str],
                                               tmp_path: Path) -> None:
    run_scenario(netns(), "composed", str(tmp_path / "dhcp"))


def test_without_cap_net_admin_the_user_is_told(netns: Callable[[], str]) -> None:
    # Root without CAP_NET_ADMIN (dropped from the bounding set before exec).
    run_scenario(netns(), "unprivileged",
                 wrapper=("setpriv", "--bounding-set=-net_admin", "--inh-caps=-net_admin"))


def test_cleanup_and_host_facts(physical: tuple[str, str]) -> None:
    run_scenario(physical[0], "cleanup_and_facts")


# -- scenarios (child side, inside the namespace) ------------------------------------

SCENARIOS: dict[str, Callable[..., Awaitable[None]]] = {}


def scenario(fn: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    SCENARIOS[fn.__name__] = fn
    return fn


class Recorder:
    """Stands in for nft, tc and dhcp: records calls as ``("nft.apply_port", tap)``,
    fails the ones named in ``fail``."""

    def __init__(self, *fail: str) -> None:
        self.calls: list[tuple[str, str]] = []
        self.fail = set(fail)

    def module(self, role: str) -> Any:
        recorder = self

        class Module:
            def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
                async def call(*args: Any) -> Any:
                    first = args[0]
                    key = getattr(first, "tap", None) or getattr(first, "bridge", None)
                    recorder.calls.append((f"{role}.{name}", key or str(first)))
                    if f"{role}.{name}" in recorder.fail:
                        raise HvError(f"injected failure in {role}.{name}")
                    return ()
                return call
        return Module()


def backend(*fail: str) -> tuple[LinuxNetwork, Recorder]:
    rec = Recorder(*fail)
    return LinuxNetwork(rec.module("nft"), rec.module("tc"), rec.module("dhcp")), rec


def checksum(data: bytes) -> int:
    total = sum(struct.unpack(f"!{len(data) // 2}H", data[: len(data) // 2 * 2]))
    if len(data) % 2:
        total += data[-1] << 8
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def reachable(address: str, deadline: float = 15.0) -> bool:
    """Whether an ICMP (or ICMPv6) echo to ``address`` is answered in ``deadline`` s."""
    v6 = ipaddress.ip_address(address).version == 6
    family, proto = ((socket.AF_INET6, socket.IPPROTO_ICMPV6) if v6
                     else (socket.AF_INET, socket.IPPROTO_ICMP))
    request, reply = (128, 129) if v6 else (8, 0)
    with socket.socket(family, socket.SOCK_RAW, proto) as sock:
        ident, end = os.getpid() & 0xFFFF, time.monotonic() + deadline
        for seq in itertools.count():
            if time.monotonic() > end:
                return False
            payload = b"hvstack"
            header = struct.pack("!BBHHH", request, 0, 0, ident, seq)
            # the kernel fills in an ICMPv6 checksum itself
            total = 0 if v6 else checksum(header + payload)
            packet = struct.pack("!BBHHH", request, 0, total, ident, seq)
            with contextlib.suppress(OSError):  # no route yet
                sock.sendto(packet + payload, (address, 0))
            ready, _, _ = select.select([sock], [], [], 0.3)
            while ready:
                data, source = sock.recvfrom(2048)
                icmp = data if v6 else data[(data[0] & 0xF) * 4:]
                echo_id = struct.unpack("!H", icmp[4:6])[0]
                if source[0] == address and icmp[0] == reply and echo_id == ident:
                    return True
                ready, _, _ = select.select([sock], [], [], 0)
    return False


async def state_of(name: str) -> tuple[Any, ...]:
    """An interface's master, up flag, addresses and routes (comparable snapshots)."""
    def look(ipr: Any) -> tuple[Any, ...]:
        link = netlink.need(ipr, name)
        return (link.master, link.up, sorted(map(str, (a.interface for a in netlink.addresses(
            ipr, name, movable_only=True)))),
                sorted((str(r.network), r.gateway or "", r.priority or 0)
                       for r in netlink.routes(ipr, name) if netlink.movable_route(r)))
    return await netlink.run(look)


EXTERNAL = SwitchPlan("sw-ext", "External", SwitchType.EXTERNAL,
                      bridge_name(TAG, "sw-ext"), TABLE, adapter="hx0")


async def assert_host_connected() -> None:
    for address in ("10.77.0.1", "192.0.2.1", "2001:db8:77::1", "2001:db8:99::1"):
        assert await asyncio.to_thread(reachable, address), f"{address} unreachable"


@scenario
async def external_switch() -> None:
    net, _ = backend()
    await assert_host_connected()
    before = await state_of("hx0")
    mac = (await netlink.run(lambda ipr: netlink.need(ipr, "hx0"))).mac
    await net.ensure_switch(EXTERNAL)
    bridge = await netlink.run(lambda ipr: netlink.need(ipr, EXTERNAL.bridge))
    assert bridge.mac == mac and bridge.up
    info = await net.interface("hx0")
    assert info.master == EXTERNAL.bridge and not info.is_bridge
    assert (await net.interface(EXTERNAL.bridge)).is_bridge
    moved = await state_of(EXTERNAL.bridge)
    assert moved[2] == before[2] and moved[3] == before[3], (moved, before)
    assert (await state_of("hx0"))[2:] == ([], [])
    await assert_host_connected()
    await net.ensure_switch(EXTERNAL)  # idempotent: a service restart
    assert await state_of(EXTERNAL.bridge) == moved
    await net.remove_switch(EXTERNAL)
    assert await state_of("hx0") == before
    assert not (await net.interface(EXTERNAL.bridge)).exists
    await assert_host_connected()
    await net.remove_switch(EXTERNAL)  # gone already: nothing to do


@scenario
async def external_switch_fails() -> None:
    net, _ = backend()
    before = await state_of("hx0")
    real, calls = netlink.replace_route, []

    def failing(ipr: Any, name: str, route: netlink.Route) -> None:
        calls.append(route)
        if len(calls) == 2 and name != "hx0":
            raise HvError("injected failure while moving routes")
        real(ipr, name, route)

    netlink.replace_route = failing  # type: ignore[assignment]
    try:
        await net.ensure_switch(EXTERNAL)
    except HvError as exc:
        assert "injected" in str(exc)
    else:
        raise AssertionError("ensure_switch did not fail")
    finally:
        netlink.replace_route = real  # type: ignore[assignment]
    assert len(calls) >= 2
    assert await state_of("hx0") == before
    assert not (await net.interface(EXTERNAL.bridge)).exists
    await assert_host_connected()


@scenario
async def external_refusals() -> None:
    net, _ = backend()
    before = await state_of("hx0")
    tap = tap_name(TAG, "vm", "52:54:00:00:00:01")
    other = await netlink.run(lambda ipr: netlink.ensure_bridge(ipr, "br-other"))
    assert other
    fd = await netlink.run(lambda ipr: netlink.open_tap(tap))
    try:
        for adapter, error in (("nosuch0", InvalidInput), ("lo", InvalidInput),
                               (tap, InvalidInput), ("br-other", InvalidInput)):
            plan = dataclasses.replace(EXTERNAL, adapter=adapter)
            await expect(error, net.ensure_switch(plan))
        await netlink.run(lambda ipr: netlink.attach(ipr, "hx0", "br-other"))
        await expect(Conflict, net.ensure_switch(EXTERNAL))
        assert not (await net.interface(EXTERNAL.bridge)).exists
        assert (await net.interface("hx0")).master == "br-other"
        await netlink.run(lambda ipr: ipr.link("set", index=netlink.need(ipr, "hx0").index,
                                               master=0))
    finally:
        os.close(fd)
    assert await state_of("hx0") == before
    await assert_host_connected()


async def expect(error: type[HvError], call: Awaitable[Any]) -> HvError:
    try:
        await call
    except error as exc:
        return exc
    raise AssertionError(f"expected {error.__name__}")


@scenario
async def external_repair() -> None:
    net, _ = backend()
    before = await state_of("hx0")
    mac = (await netlink.run(lambda ipr: netlink.need(ipr, "hx0"))).mac

    def crash(ipr: Any) -> None:  # the service died right after enslaving the adapter
        netlink.ensure_bridge(ipr, EXTERNAL.bridge, mac=mac)
        netlink.attach(ipr, "hx0", EXTERNAL.bridge)

    await netlink.run(crash)
    await net.ensure_switch(EXTERNAL)
    moved = await state_of(EXTERNAL.bridge)
    assert moved[2:] == before[2:]
    assert (await state_of("hx0"))[2:] == ([], [])
    await assert_host_connected()
    await net.remove_switch(EXTERNAL)
    assert await state_of("hx0") == before


@scenario
async def external_cleanup() -> None:
    net, _ = backend()
    before = await state_of("hx0")
    await net.ensure_switch(EXTERNAL)
    # The service crashed and the switch was deleted meanwhile: cleanup gives back.
    await net.cleanup(TABLE, keep={"something-else"})
    assert not (await net.interface(EXTERNAL.bridge)).exists
    assert await state_of("hx0") == before
    await assert_host_connected()


def vnet_frame(dst: bytes, src: bytes, payload: bytes) -> bytes:
    """An Ethernet frame (type 0x88b5, local experimental) and its 10-byte virtio-net
    header (no offloads) as QEMU reads and writes them on a vnet_hdr tap."""
    return bytes(10) + dst + src + b"\x88\xb5" + payload.ljust(46, b"\0")


def read_frame(fd: int, marker: bytes, deadline: float = 10.0) -> bytes:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            data = os.read(fd, 65536)
            if marker in data:
                return data
    raise AssertionError(f"frame {marker!r} never arrived")


@scenario
async def tap_port() -> None:
    net, rec = backend()
    plan = SwitchPlan("sw-p", "Private", SwitchType.PRIVATE, bridge_name(TAG, "sw-p"), TABLE)
    await net.ensure_switch(plan)
    await net.ensure_switch(plan)
    disable = Path(f"/proc/sys/net/ipv6/conf/{plan.bridge}/disable_ipv6").read_text()
    assert disable.strip() == "1"
    arp = Path(f"/proc/sys/net/ipv4/conf/{plan.bridge}/arp_ignore").read_text()
    assert arp.strip() == "8"
    # A veth stands in for a second VM: one end in the bridge, the other read raw.
    sh("ip", "link", "add", "vm2", "type", "veth", "peer", "name", "vm2p")
    await netlink.run(lambda ipr: netlink.attach(ipr, "vm2p", plan.bridge))
    await netlink.run(lambda ipr: netlink.set_up(ipr, "vm2"))
    port = PortPlan(tap_name(TAG, "vm1", "52:54:00:aa:00:01"), "52:54:00:aa:00:01", "vm1",
                    PortSettings(), TABLE, plan.bridge, SwitchType.PRIVATE)
    fd = await net.open_port(port)
    try:
        assert ("nft.apply_port", port.tap) in rec.calls
        info = await net.interface(port.tap)
        assert info.master == plan.bridge and await net.port_exists(port.tap)
        raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88B5))
        raw.bind(("vm2", 0))
        vm1, vm2 = bytes.fromhex("525400aa0001"), bytes.fromhex("525400aa0002")
        deadline = time.monotonic() + 10
        while True:  # the bridge forwards once the ports are up
            os.write(fd, vnet_frame(b"\xff" * 6, vm1, b"from-vm1"))
            if select.select([raw], [], [], 0.3)[0] and b"from-vm1" in raw.recv(2048):
                break
            assert time.monotonic() < deadline, "tap frame never reached the other port"
        raw.send(vm1 + vm2 + b"\x88\xb5" + b"from-vm2".ljust(46, b"\0"))
        got = read_frame(fd, b"from-vm2")
        assert got[10:16] == vm1  # behind the 10-byte vnet header
        raw.close()
        await net.update_port(dataclasses.replace(port, bridge=None))
        info = await net.interface(port.tap)
        assert info.master is None
        assert not (await netlink.run(lambda ipr: netlink.need(ipr, port.tap))).up
        await net.update_port(port)
        assert (await net.interface(port.tap)).master == plan.bridge
        await net.close_port(port.tap, TABLE)
        assert not await net.port_exists(port.tap)
        assert ("nft.remove_port", port.tap) in rec.calls
    finally:
        os.close(fd)
    await net.close_port(port.tap, TABLE)  # gone already
    await net.remove_switch(plan)
    assert not (await net.interface(plan.bridge)).exists


@scenario
async def internal_and_nat() -> None:
    net, rec = backend()
    internal = SwitchPlan("sw-i", "Internal", SwitchType.INTERNAL, bridge_name(TAG, "sw-i"),
                          TABLE, host_address=ipaddress.IPv4Interface("10.88.0.1/24"))
    await net.ensure_switch(internal)
    assert await bridge_addresses(internal.bridge) == ["10.88.0.1/24"]
    # A reboot: the bridge is gone, the plan is not. A changed address is repaired.
    await netlink.run(lambda ipr: netlink.delete(ipr, internal.bridge))
    await net.ensure_switch(internal)
    await net.ensure_switch(dataclasses.replace(
        internal, host_address=ipaddress.IPv4Interface("10.88.0.254/24")))
    assert await bridge_addresses(internal.bridge) == ["10.88.0.254/24"]
    subnet = ipaddress.IPv4Network("10.99.0.0/24")
    nat = SwitchPlan("sw-n", "NAT", SwitchType.NAT, bridge_name(TAG, "sw-n"), TABLE,
                     subnet=subnet, dhcp=DhcpPlan("10.99.0.10", "10.99.0.200", "hv",
                                                  Path("/nonexistent")))
    Path("/proc/sys/net/ipv4/ip_forward").write_text("0\n")
    await net.ensure_switch(nat)
    assert await bridge_addresses(nat.bridge) == ["10.99.0.1/24"]
    assert Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() == "1"
    assert [c for c in rec.calls if c[1] == nat.bridge] == [("nft.apply_switch", nat.bridge),
                                                             ("dhcp.start", nat.bridge)]
    assert subnet in await net.host_networks()
    await net.remove_switch(nat)
    assert ("dhcp.stop", nat.bridge) in rec.calls
    assert ("nft.remove_switch", nat.bridge) in rec.calls
    await net.remove_switch(internal)
    for plan in (nat, internal):
        assert not (await net.interface(plan.bridge)).exists


async def bridge_addresses(bridge: str) -> list[str]:
    return await netlink.run(lambda ipr: [str(a.interface) for a in netlink.addresses(
        ipr, bridge) if a.family == netlink.AF_INET])


async def our_links() -> list[str]:
    """Bridges and taps of the service tagged TAG."""
    return await netlink.run(lambda ipr: sorted(
        link.name for link in netlink.links(ipr)
        if link.name.startswith((f"hvb{TAG}", f"hvt{TAG}"))))


@scenario
async def failures() -> None:
    nat = SwitchPlan("sw-n", "NAT", SwitchType.NAT, bridge_name(TAG, "sw-n"), TABLE,
                     subnet=ipaddress.IPv4Network("10.99.0.0/24"),
                     dhcp=DhcpPlan("10.99.0.10", "10.99.0.200", "hv", Path("/nonexistent")))
    for step in ("nft.apply_switch", "dhcp.start"):
        net, rec = backend(step)
        await expect(HvError, net.ensure_switch(nat))
        assert await our_links() == [], step
        assert ("dhcp.stop", nat.bridge) in rec.calls
        assert ("nft.remove_switch", nat.bridge) in rec.calls
    # A failed repair of an existing switch leaves it (it has ports).
    net, _ = backend()
    await net.ensure_switch(nat)
    await expect(HvError, backend("dhcp.start")[0].ensure_switch(nat))
    assert await our_links() == [nat.bridge]
    port = PortPlan(tap_name(TAG, "vm1", "52:54:00:aa:00:01"), "52:54:00:aa:00:01", "vm1",
                    PortSettings(), TABLE, nat.bridge, SwitchType.NAT)
    for step in ("nft.apply_port", "tc.apply_port"):
        failing, rec = backend(step)
        await expect(HvError, failing.open_port(port))
        assert await our_links() == [nat.bridge], step
        assert ("nft.remove_port", port.tap) in rec.calls
    await expect(HvError, net.open_port(dataclasses.replace(port, bridge="hvbnosuch")))
    assert await our_links() == [nat.bridge]
    await net.remove_switch(nat)


def drained(fd: int) -> bytes:
    """Every frame already queued on a tap descriptor (no waiting)."""
    data = b""
    while select.select([fd], [], [], 0)[0]:
        data += os.read(fd, 65536)
    return data


@scenario
async def vlan_ports() -> None:
    """Access ports of one VLAN reach each other and no other port (a bridge per VLAN;
    trunks are in test_network_vlans.py)."""
    net, rec = backend()
    plan = SwitchPlan("sw-v", "VLANs", SwitchType.PRIVATE, bridge_name(TAG, "sw-v"), TABLE)
    await net.ensure_switch(plan)

    def port(n: int, vlan: Vlan) -> PortPlan:
        mac = f"52:54:00:aa:00:0{n}"
        return PortPlan(tap_name(TAG, f"vm{n}", mac), mac, f"vm{n}", PortSettings(vlan=vlan),
                        TABLE, plan.bridge, SwitchType.PRIVATE)

    ten, twenty = Vlan(VlanMode.ACCESS, access_id=10), Vlan(VlanMode.ACCESS, access_id=20)
    ports = [port(1, ten), port(2, ten), port(3, twenty), port(4, Vlan())]
    fds = [await net.open_port(p) for p in ports]
    try:
        for p in ports:  # a VLAN bridge's port belongs to its switch
            assert (await net.interface(p.tap)).master == plan.bridge
        source = bytes.fromhex("525400aa0001")
        deadline = time.monotonic() + 10
        while True:  # a broadcast from VLAN 10 reaches the other VLAN 10 port ...
            for fd in fds:
                drained(fd)
            os.write(fds[0], vnet_frame(b"\xff" * 6, source, b"vlan-ten"))
            if select.select([fds[1]], [], [], 0.3)[0] and b"vlan-ten" in drained(fds[1]):
                break
            assert time.monotonic() < deadline, "VLAN 10 frame never reached VLAN 10"
        # ... and (flooded at once to every port it may reach) no other port.
        assert not any(b"vlan-ten" in drained(fd) for fd in fds[2:])
        assert len(await our_links()) == 1 + 4 + 2  # switch, taps, VLAN 10 and 20
        # Another service's empty VLAN bridge is not this one's to prune.
        other = bridge_name("f0e1d", "x")
        foreign = vlans.vlan_bridge_name(other, 10)
        await netlink.run(lambda ipr: (netlink.ensure_bridge(ipr, foreign), ipr.link(
            "set", index=netlink.need(ipr, foreign).index, ifalias=f"{other}.10")))
        # The last port of VLAN 20 leaves: its bridge goes; VLAN 10 keeps one port.
        await net.update_port(dataclasses.replace(ports[2], settings=PortSettings()))
        await net.update_port(dataclasses.replace(ports[0], settings=PortSettings()))
        assert len(await our_links()) == 1 + 4 + 1
        await net.cleanup(TABLE, keep={plan.bridge, *(p.tap for p in ports)})
        assert len(await our_links()) == 1 + 4 + 1
        assert ("nft.apply_port", ports[1].tap) in rec.calls
        assert (await net.interface(foreign)).exists
    finally:
        for fd in fds:
            os.close(fd)
    await net.remove_switch(plan)
    assert await our_links() == []


@scenario
async def cleanup_and_facts() -> None:
    net, rec = backend()
    assert net.missing_privilege() is None  # the tests run as root
    networks = await net.host_networks()
    for expected in ("10.77.0.0/24", "198.51.100.0/24", "127.0.0.0/8"):
        assert ipaddress.IPv4Network(expected) in networks, networks
    assert ipaddress.IPv4Network("0.0.0.0/0") not in networks
    assert not (await net.interface("nosuch0")).exists
    kept = SwitchPlan("k", "Kept", SwitchType.PRIVATE, bridge_name(TAG, "k"), TABLE)
    stale = SwitchPlan("s", "Stale", SwitchType.PRIVATE, bridge_name(TAG, "s"), TABLE)
    foreign = bridge_name("f0e1d", "x")  # another service's bridge
    for plan in (kept, stale):
        await net.ensure_switch(plan)
    await netlink.run(lambda ipr: netlink.ensure_bridge(ipr, foreign))
    ports = [PortPlan(tap_name(TAG, f"vm{i}", "52:54:00:aa:00:01"), "52:54:00:aa:00:01",
                      f"vm{i}", PortSettings(), TABLE, kept.bridge) for i in range(2)]
    fds = [await net.open_port(p) for p in ports]
    try:
        await net.cleanup(TABLE, keep={kept.bridge, ports[0].tap})
        names = await netlink.run(lambda ipr: {link.name for link in netlink.links(ipr)})
        assert {kept.bridge, ports[0].tap, foreign} <= names
        assert not {stale.bridge, ports[1].tap} & names
        assert ("nft.remove_port", ports[1].tap) in rec.calls
        assert ("nft.remove_table", TABLE) not in rec.calls
        await net.cleanup(TABLE, keep=set())
        assert await our_links() == []
        assert (await net.interface(foreign)).exists
        assert ("nft.remove_table", TABLE) in rec.calls
    finally:
        for fd in fds:
            os.close(fd)




@scenario
async def composed(state_dir: str) -> None:
    """The real rules, shaping and dnsmasq behind LinuxNetwork."""
    net = LinuxNetwork()
    Path(state_dir).mkdir()
    nat = SwitchPlan("sw-n", "NAT", SwitchType.NAT, bridge_name(TAG, "sw-n"), TABLE,
                     subnet=ipaddress.IPv4Network("10.99.0.0/24"),
                     dhcp=DhcpPlan("10.99.0.10", "10.99.0.200", "hv", Path(state_dir)))
    await net.ensure_switch(nat)
    pid = Path(state_dir, "dnsmasq.pid").read_text().strip()
    assert Path(f"/proc/{pid}").exists()
    await net.ensure_switch(nat)  # a service restart: dnsmasq is adopted, not restarted
    assert Path(state_dir, "dnsmasq.pid").read_text().strip() == pid
    assert nat.bridge in nft("list", "table", "ip", TABLE)
    sh("ip", "link", "add", "vm2", "type", "veth", "peer", "name", "vm2p")
    await netlink.run(lambda ipr: netlink.attach(ipr, "vm2p", nat.bridge))
    await netlink.run(lambda ipr: netlink.set_up(ipr, "vm2"))
    mac = "52:54:00:aa:00:01"
    port = PortPlan(tap_name(TAG, "vm1", mac), mac, "vm1",
                    PortSettings(bandwidth_max=100_000_000), TABLE, nat.bridge, SwitchType.NAT)
    fd = await net.open_port(port)
    try:
        assert f"port_{port.tap}" in nft("list", "table", "bridge", TABLE)
        assert await net.acl_counters(port.tap, TABLE) == ()
        raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88B5))
        raw.bind(("vm2", 0))
        deadline = time.monotonic() + 10
        while True:  # the VM's own MAC passes the spoofing guard ...
            os.write(fd, vnet_frame(b"\xff" * 6, bytes.fromhex("bad0000000ff"), b"spoofed"))
            os.write(fd, vnet_frame(b"\xff" * 6, bytes.fromhex(mac.replace(":", "")), b"own"))
            if select.select([raw], [], [], 0.3)[0] and b"own" in raw.recv(2048):
                break
            assert time.monotonic() < deadline, "the VM's frame never crossed the switch"
        # ... a spoofed one, written first, never does.
        while select.select([raw], [], [], 0)[0]:
            assert b"spoofed" not in raw.recv(2048)
        raw.close()
        await net.close_port(port.tap, TABLE)
        assert f"port_{port.tap}" not in nft("list", "table", "bridge", TABLE)
    finally:
        os.close(fd)
    await net.remove_switch(nat)
    assert not Path(f"/proc/{pid}").exists() or "dnsmasq" not in Path(
        f"/proc/{pid}/cmdline").read_text()
    assert nat.bridge not in nft("list", "table", "ip", TABLE)
    await net.cleanup(TABLE, keep=set())
    assert TABLE not in nft("list", "tables")
    assert await our_links() == []


def nft(*argv: str) -> str:
    return subprocess.run(["nft", *argv], capture_output=True, text=True, check=False,
                          timeout=60).stdout


@scenario
async def unprivileged() -> None:
    net, _ = backend()
    message = net.missing_privilege()
    assert message is not None and "CAP_NET_ADMIN" in message and "user-mode NAT" in message
    plan = SwitchPlan("sw-p", "Private", SwitchType.PRIVATE, bridge_name(TAG, "sw-p"), TABLE)
    for call in (net.ensure_switch(plan), net.open_port(PortPlan(
            tap_name(TAG, "vm1", "52:54:00:aa:00:01"), "52:54:00:aa:00:01", "vm1",
            PortSettings(), TABLE))):
        exc = await expect(HvError, call)
        assert "CAP_NET_ADMIN" in str(exc), exc
    assert await our_links() == []


def main() -> None:
    name = sys.argv[1]
    asyncio.run(SCENARIOS[name](*sys.argv[2:]))
    print(f"scenario {name}: ok")


if __name__ == "__main__":
    main()
