"""nftables guards and ACLs, NAT, tc shaping and mirroring, and dnsmasq, for real.

Each test builds its own lab of network namespaces: a "host" namespace with a bridge
named as the service names its bridges, and one namespace per VM joined to it by a
veth pair whose bridge end is named like a tap (a veth stands in for a tap: both are
bridge ports whose ingress is what the VM sends). The code under test runs in the
host namespace: the test's thread enters it (setns) around each call. VMs send and
receive raw frames (``netns_frames.py``), iperf3, Python sockets and busybox udhcpc.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ipaddress
import json
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hvstack.network import dhcp, names, nft, tc
from hvstack.network.backend import AclCounter, DhcpPlan, PortPlan, SwitchPlan
from hvstack.network.model import (
    AclAction,
    AclDirection,
    MirrorMode,
    NatMapping,
    NatProtocol,
    PortAcl,
    PortSettings,
    SwitchType,
)
from hvstack.runner import run
from tests.integration import netns_frames as frames

pytestmark = pytest.mark.integration

PY = sys.executable
FRAMES = str(Path(frames.__file__))
TAG = names.service_tag("hvt-filter-lab")
TABLE = names.table_name(TAG)
BRIDGE = names.bridge_name(TAG, "switch-1")
HOST_IP = "10.77.0.254"
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class Vm:
    name: str
    ns: str
    mac: str
    ip: str | None
    tap: str


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, timeout=30)


class Lab:
    def __init__(self, tmp: Path) -> None:
        self.prefix = f"hvt-filter-{os.getpid()}"
        self.host = f"{self.prefix}-host"
        self.tmp = tmp
        self.namespaces: list[str] = []
        self._add_ns(self.host)
        _ip("-n", self.host, "link", "set", "lo", "up")
        _ip("-n", self.host, "link", "add", BRIDGE, "type", "bridge")
        _ip("-n", self.host, "addr", "add", f"{HOST_IP}/24", "dev", BRIDGE)
        _ip("-n", self.host, "link", "set", BRIDGE, "up")

    def _add_ns(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self.namespaces.append(ns)

    def add_vm(self, name: str, mac: str, ip: str | None) -> Vm:
        vm = Vm(name, f"{self.prefix}-{name}", mac, ip, names.tap_name(TAG, name, mac))
        self._add_ns(vm.ns)
        _ip("-n", self.host, "link", "add", vm.tap, "type", "veth", "peer", "name", "eth0",
            "netns", vm.ns)
        _ip("-n", vm.ns, "link", "set", "eth0", "address", mac)
        # No IPv6: its background chatter (router solicitations, MLD) would move
        # counters; the tests send the IPv6 frames they need raw.
        subprocess.run(["ip", "netns", "exec", vm.ns, "sysctl", "-qw",
                        "net.ipv6.conf.all.disable_ipv6=1"], check=True, timeout=30)
        for dev in ("lo", "eth0"):
            _ip("-n", vm.ns, "link", "set", dev, "up")
        if ip:
            _ip("-n", vm.ns, "addr", "add", f"{ip}/24", "dev", "eth0")
        _ip("-n", self.host, "link", "set", vm.tap, "master", BRIDGE, "up")
        return vm

    def close(self) -> None:
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


@pytest.fixture()
def lab(tmp_path: Path) -> Iterator[Lab]:
    made = Lab(tmp_path)
    try:
        yield made
    finally:
        made.close()


@contextlib.contextmanager
def inside(ns: str) -> Iterator[None]:
    """This thread (and the programs it starts) in network namespace ``ns``."""
    with open("/proc/thread-self/ns/net") as here, open(f"/run/netns/{ns}") as there:
        if _libc.setns(there.fileno(), CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
        try:
            yield
        finally:
            if _libc.setns(here.fileno(), CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")


def port(vm: Vm, settings: PortSettings = PortSettings(), mirror_to: str | None = None
         ) -> PortPlan:
    return PortPlan(vm.tap, vm.mac, vm.name, settings, TABLE, BRIDGE, SwitchType.PRIVATE,
                    mirror_to)


async def apply(lab: Lab, plan: PortPlan) -> None:
    with inside(lab.host):
        await nft.apply_port(plan)
        await tc.apply_port(plan)


async def netns(ns: str, *argv: str, timeout: float = 60) -> str:
    return (await run(["ip", "netns", "exec", ns, *argv], timeout=timeout)).decode()


async def send(vm: Vm, *data: bytes) -> None:
    await netns(vm.ns, PY, FRAMES, "send", "eth0", *(d.hex() for d in data))


async def receive(vm: Vm, marks: list[str], action: Callable[[], Awaitable[None]]
                  ) -> list[str]:
    """The tags ``vm`` receives while ``action`` runs, up to all of ``marks``."""
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", vm.ns, PY, FRAMES, "recv", "eth0", ",".join(marks), "60",
        stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    try:
        assert (await asyncio.wait_for(proc.stdout.readline(), 60)).strip() == b"ready"
        await action()
        out = await asyncio.wait_for(proc.stdout.read(), 90)
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        await proc.wait()
    seen: list[str] = json.loads(out.decode().strip().splitlines()[-1])
    assert set(marks) <= set(seen), f"marks missing: {seen}"
    return seen


def udp(src: Vm, dst: Vm, tag: str, sport: int = 4000, dst_ip: str | None = None,
        src_mac: str | None = None, src_ip: str | None = None) -> bytes:
    assert src.ip and dst.ip
    return frames.udp_frame(dst.mac, src_mac or src.mac, src_ip or src.ip, dst_ip or dst.ip,
                            sport, 5000, tag)


# -- guards --------------------------------------------------------------------------

async def test_guards_stop_spoofing_and_server_messages_of_a_guarded_port_only(lab: Lab
                                                                               ) -> None:
    a = lab.add_vm("a", "52:54:00:00:00:0a", "10.77.0.1")
    b = lab.add_vm("b", "52:54:00:00:00:0b", "10.77.0.2")
    c = lab.add_vm("c", "52:54:00:00:00:0c", "10.77.0.3")
    await apply(lab, port(a, PortSettings(dhcp_guard=True, router_guard=True)))
    await apply(lab, port(c, PortSettings(mac_spoofing=True)))

    def bad(vm: Vm) -> list[bytes]:
        assert vm.ip is not None
        n = vm.name
        return [udp(vm, b, f"{n}-dhcp", sport=67), udp(vm, b, f"{n}-dhcp6", sport=547),
                frames.icmp_frame(b.mac, vm.mac, vm.ip, "10.77.0.2", 5, f"{n}-redirect"),
                frames.router_advert_frame(vm.mac, f"{n}-ra"),
                udp(vm, b, f"{n}-spoof", src_mac="52:54:00:99:99:99"),
                frames.arp_frame(vm.mac, "52:54:00:99:99:99", vm.ip, "10.77.0.2",
                                 f"{n}-arpspoof"),
                udp(vm, b, f"{n}-ok", sport=68), udp(vm, b, f"{n}-mark")]

    async def traffic() -> None:
        await send(a, *bad(a))
        await send(c, *bad(c))

    seen = set(await receive(b, ["a-mark", "c-mark"], traffic))
    assert {"a-ok", "c-ok"} <= seen
    assert not {t for t in seen if t.startswith("a-")} - {"a-ok", "a-mark"}
    assert {"c-dhcp", "c-dhcp6", "c-redirect", "c-ra", "c-spoof", "c-arpspoof"} <= seen


def tagged(frame: bytes, vid: int = 10) -> bytes:
    """``frame`` with an 802.1Q tag, as a trunk port's VM sends it."""
    return frame[:12] + (0x8100).to_bytes(2, "big") + vid.to_bytes(2, "big") + frame[12:]


async def test_guards_and_acls_hold_for_vlan_tagged_frames(lab: Lab) -> None:
    # The kernel keeps a received tag aside and puts it back for link-layer reads, so
    # a guard keyed on the Ethernet type would never see a tagged ARP or ICMP frame.
    a = lab.add_vm("a", "52:54:00:00:00:0a", "10.77.0.1")
    b = lab.add_vm("b", "52:54:00:00:00:0b", "10.77.0.2")
    acls = (PortAcl(AclAction.DENY, AclDirection.OUTBOUND, "10.78.0.0/16"),
            PortAcl(AclAction.DENY, AclDirection.OUTBOUND, "2001:db8::/32"))
    await apply(lab, port(a, PortSettings(dhcp_guard=True, router_guard=True, acls=acls)))
    bad = [udp(a, b, "dhcp", sport=67),
           frames.icmp_frame(b.mac, a.mac, "10.77.0.1", "10.77.0.2", 5, "redirect"),
           frames.router_advert_frame(a.mac, "ra"),
           frames.arp_frame(a.mac, "52:54:00:99:99:99", "10.77.0.1", "10.77.0.2", "arpspoof"),
           udp(a, b, "acl4", dst_ip="10.78.0.2"),
           frames.udp6_frame(b.mac, a.mac, "fd00::1", "2001:db8::2", 4000, 5000, "acl6")]

    async def traffic() -> None:
        await send(a, *(tagged(f) for f in bad), tagged(udp(a, b, "mark")))

    seen = await receive(b, ["mark"], traffic)
    assert not set(seen) & {"dhcp", "redirect", "ra", "arpspoof", "acl4", "acl6"}, seen


# -- ACLs ----------------------------------------------------------------------------

async def test_acls_drop_and_count_and_other_ports_counters_survive(lab: Lab) -> None:
    a = lab.add_vm("a", "52:54:00:00:00:0a", "10.77.0.1")
    b = lab.add_vm("b", "52:54:00:00:00:0b", "10.77.0.2")
    c = lab.add_vm("c", "52:54:00:00:00:0c", "10.77.0.3")
    acls = (PortAcl(AclAction.ALLOW, AclDirection.OUTBOUND, "10.77.0.0/24"),
            PortAcl(AclAction.DENY, AclDirection.OUTBOUND, "10.77.0.2/32"),
            PortAcl(AclAction.DENY, AclDirection.INBOUND, c.mac))
    await apply(lab, port(a, PortSettings(acls=acls)))

    async def from_a() -> None:
        await send(a, udp(a, b, "a-to-b"), udp(a, b, "a-mark", dst_ip="10.77.0.9"))

    seen = await receive(b, ["a-mark"], from_a)
    assert "a-to-b" not in seen

    async def to_a() -> None:
        await send(c, udp(c, a, "c-to-a"))
        await send(b, udp(b, a, "b-to-a"))

    seen = await receive(a, ["b-to-a"], to_a)
    assert "c-to-a" not in seen
    with inside(lab.host):
        counters = {(x.index, x.direction): x for x in await nft.acl_counters(a.tap, TABLE)}
        assert set(counters) == {(0, "outbound"), (1, "outbound"), (2, "inbound")}
        assert all(x.packets >= 1 and x.bytes > 0 for x in counters.values())
        await apply(lab, port(b, PortSettings(dhcp_guard=True)))
        await nft.remove_port(c.tap, TABLE)  # never applied: removing is still fine
        after = {(x.index, x.direction): x for x in await nft.acl_counters(a.tap, TABLE)}
        assert after == counters
        await nft.remove_port(a.tap, TABLE)
        assert await nft.acl_counters(a.tap, TABLE) == ()
        await nft.remove_table(TABLE)
        await nft.remove_table(TABLE)
    seen = await receive(b, ["a-to-b"], from_a)


def _counts(counters: tuple[AclCounter, ...]) -> dict[tuple[int, str], int]:
    return {(x.index, x.direction): x.packets for x in counters}


async def _counters(lab: Lab, vm: Vm) -> dict[tuple[int, str], int]:
    with inside(lab.host):
        return _counts(await nft.acl_counters(vm.tap, TABLE))


async def ping(vm: Vm, address: str) -> None:
    """One echo answered, waiting as long as it takes (ARP first) up to 30 s."""
    await netns(vm.ns, "busybox", "ping", "-c", "1", "-w", "30", address)


@pytest.mark.parametrize("direction", list(AclDirection))
async def test_deny_everything_allow_a_subnet_lets_only_that_subnet_through(
        lab: Lab, direction: AclDirection) -> None:
    # Hyper-V's most common port ACLs: the allow is more specific than the deny, so it
    # wins, whatever the order they were given in.
    a = lab.add_vm("a", "52:54:00:00:00:0a", "10.77.0.1")
    b = lab.add_vm("b", "52:54:00:00:00:0b", "10.77.0.2")
    acls = (PortAcl(AclAction.DENY, direction, "0.0.0.0/0"),
            PortAcl(AclAction.ALLOW, direction, "10.77.0.0/24"))
    await apply(lab, port(a, PortSettings(acls=acls)))
    out = direction is not AclDirection.INBOUND
    into = direction is not AclDirection.OUTBOUND

    async def from_a() -> None:
        await send(a, udp(a, b, "out-far", dst_ip="10.78.0.2"), udp(a, b, "out-near"),
                   udp(a, b, "out-mark"))

    seen = await receive(b, ["out-mark"], from_a)
    assert "out-near" in seen and ("out-far" in seen) is not out

    async def to_a() -> None:
        await send(b, udp(b, a, "in-far", src_ip="10.78.0.2"), udp(b, a, "in-near"),
                   udp(b, a, "in-mark"))

    seen = await receive(a, ["in-mark"], to_a)
    assert "in-near" in seen and ("in-far" in seen) is not into
    counts = await _counters(lab, a)
    wanted = {d for d, on in (("outbound", out), ("inbound", into)) if on}
    assert {d for _, d in counts} == wanted
    assert all(counts[0, d] >= 1 and counts[1, d] >= 2 for d in wanted), counts
    # ARP is no IPv4 traffic for the ACLs: the allowed subnet, and the host on the
    # switch, are reached by real ping (address resolution first) both ways.
    await ping(a, "10.77.0.2")
    await ping(b, "10.77.0.1")
    await ping(a, HOST_IP)
    after = await _counters(lab, a)
    assert all(after[1, d] > counts[1, d] and after[0, d] == counts[0, d] for d in wanted)


async def test_a_mac_acl_beats_every_ip_prefix(lab: Lab) -> None:
    a = lab.add_vm("a", "52:54:00:00:00:0a", "10.77.0.1")
    b = lab.add_vm("b", "52:54:00:00:00:0b", "10.77.0.2")
    c = lab.add_vm("c", "52:54:00:00:00:0c", "10.77.0.3")
    d = lab.add_vm("d", "52:54:00:00:00:0d", "10.77.0.4")
    acls = (PortAcl(AclAction.DENY, AclDirection.BOTH, "0.0.0.0/0"),
            PortAcl(AclAction.ALLOW, AclDirection.BOTH, "10.77.0.0/24"),
            PortAcl(AclAction.ALLOW, AclDirection.BOTH, b.mac),
            PortAcl(AclAction.DENY, AclDirection.BOTH, c.mac))
    await apply(lab, port(a, PortSettings(acls=acls)))

    async def to_c() -> None:
        await send(a, udp(a, c, "to-c-near"))
        await send(d, udp(d, c, "mark-c"))

    assert "to-c-near" not in await receive(c, ["mark-c"], to_c)

    async def to_b_and_d() -> None:
        await send(a, udp(a, b, "to-b-far", dst_ip="10.78.0.2"), udp(a, d, "to-d-near"))

    await receive(b, ["to-b-far"], to_b_and_d)

    async def to_a() -> None:
        await send(c, udp(c, a, "from-c-near"))
        await send(b, udp(b, a, "from-b-far", src_ip="10.78.0.2"))
        await send(d, udp(d, a, "from-d-near"))

    seen = await receive(a, ["from-b-far", "from-d-near"], to_a)
    assert "from-c-near" not in seen
    counts = await _counters(lab, a)
    for direction in ("outbound", "inbound"):
        assert counts[2, direction] >= 1 and counts[3, direction] >= 1, counts
    # d's frames are decided by the subnet's allow; nothing reached the deny-all.
    assert counts[1, "outbound"] >= 1 and counts[1, "inbound"] >= 1
    assert counts[0, "outbound"] == 0 and counts[0, "inbound"] == 0, counts


async def test_between_an_allow_and_a_deny_of_the_same_remote_the_deny_wins(lab: Lab
                                                                              ) -> None:
    a = lab.add_vm("a", "52:54:00:00:00:0a", "10.77.0.1")
    b = lab.add_vm("b", "52:54:00:00:00:0b", "10.77.0.2")
    c = lab.add_vm("c", "52:54:00:00:00:0c", "10.77.0.3")
    acls = (PortAcl(AclAction.ALLOW, AclDirection.OUTBOUND, "10.77.0.2/32"),
            PortAcl(AclAction.DENY, AclDirection.OUTBOUND, "10.77.0.2/32"),
            PortAcl(AclAction.ALLOW, AclDirection.INBOUND, c.mac),
            PortAcl(AclAction.DENY, AclDirection.INBOUND, c.mac))
    await apply(lab, port(a, PortSettings(acls=acls)))

    async def to_b() -> None:
        await send(a, udp(a, b, "a-to-b"))
        await send(c, udp(c, b, "c-to-b"))

    assert "a-to-b" not in await receive(b, ["c-to-b"], to_b)

    async def to_a() -> None:
        await send(c, udp(c, a, "c-to-a"))
        await send(b, udp(b, a, "b-to-a"))

    assert "c-to-a" not in await receive(a, ["b-to-a"], to_a)
    counts = await _counters(lab, a)
    assert counts[0, "outbound"] == 0 and counts[2, "inbound"] == 0, counts
    assert counts[1, "outbound"] >= 1 and counts[3, "inbound"] >= 1, counts


async def test_ipv4_and_ipv6_acls_each_hold_for_their_own_family_only(lab: Lab) -> None:
    a = lab.add_vm("a", "52:54:00:00:00:0a", "10.77.0.1")
    b = lab.add_vm("b", "52:54:00:00:00:0b", "10.77.0.2")
    acls = (PortAcl(AclAction.DENY, AclDirection.OUTBOUND, "0.0.0.0/0"),
            PortAcl(AclAction.ALLOW, AclDirection.OUTBOUND, "fd00:77::/64"),
            PortAcl(AclAction.DENY, AclDirection.OUTBOUND, "::/0"),
            PortAcl(AclAction.ALLOW, AclDirection.OUTBOUND, "10.77.0.0/24"))
    await apply(lab, port(a, PortSettings(acls=acls)))

    def v6(tag: str, dst: str) -> bytes:
        return frames.udp6_frame(b.mac, a.mac, "fd00:77::1", dst, 4000, 5000, tag)

    sent = [udp(a, b, "v4-allowed"), udp(a, b, "v4-denied", dst_ip="10.78.0.2"),
            v6("v6-allowed", "fd00:77::2"), v6("v6-denied", "2001:db8::2"),
            # Address resolution passes the IP prefixes: ARP for a remote the IPv4
            # deny covers, a neighbour solicitation to a group ::/0 covers.
            frames.arp_frame(a.mac, a.mac, "10.77.0.1", "10.78.0.2", "arp"),
            frames.neighbor_solicit_frame(a.mac, "fd00:77::1", "2001:db8::2", "nd"),
            frames.arp_frame(a.mac, a.mac, "10.77.0.1", "10.77.0.2", "mark")]

    async def traffic() -> None:
        await send(a, *sent)

    seen = await receive(b, ["mark"], traffic)
    assert {"v4-allowed", "v6-allowed", "arp", "nd"} <= set(seen)
    assert not {"v4-denied", "v6-denied"} & set(seen)
    counts = await _counters(lab, a)
    assert all(counts[i, "outbound"] >= 1 for i in range(4)), counts
    # 0.0.0.0/0 is every IPv4 remote, and no IPv6 one (and the other way round).
    await apply(lab, port(a, PortSettings(acls=(acls[0],))))
    seen = await receive(b, ["mark"], traffic)
    assert {"v6-allowed", "v6-denied", "arp", "nd"} <= set(seen)
    assert not {"v4-allowed", "v4-denied"} & set(seen)
    await apply(lab, port(a, PortSettings(acls=(acls[2],))))
    seen = await receive(b, ["mark", "v4-denied"], traffic)
    assert not {"v6-allowed", "v6-denied"} & set(seen)


async def test_an_allow_ends_neither_the_port_chain_nor_the_receiving_ports_acls(
        lab: Lab) -> None:
    # An allow that accepted would end the bridge's forward chain before the receiving
    # port's inbound ACLs (looked up after the sending port's) and its own chain's
    # guards after the ACLs: here b's inbound deny still holds against a's allow.
    a = lab.add_vm("a", "52:54:00:00:00:0a", "10.77.0.1")
    b = lab.add_vm("b", "52:54:00:00:00:0b", "10.77.0.2")
    c = lab.add_vm("c", "52:54:00:00:00:0c", "10.77.0.3")
    await apply(lab, port(a, PortSettings(acls=(
        PortAcl(AclAction.ALLOW, AclDirection.OUTBOUND, "10.77.0.0/24"),))))
    await apply(lab, port(b, PortSettings(acls=(
        PortAcl(AclAction.DENY, AclDirection.INBOUND, "10.77.0.1/32"),))))

    async def to_b() -> None:
        await send(a, udp(a, b, "a-to-b"))
        await send(c, udp(c, b, "c-to-b"))

    assert "a-to-b" not in await receive(b, ["c-to-b"], to_b)
    assert (await _counters(lab, a))[0, "outbound"] >= 1
    assert (await _counters(lab, b))[0, "inbound"] >= 1


# -- bandwidth -----------------------------------------------------------------------

CAP = 8_000_000  # bits/s: far below what two namespaces move unshaped


async def _iperf(sender: Vm | str, receiver: Vm, seconds: int) -> float:
    """Bits per second the receiver got, from its per-second counts after the first
    second (which holds the bucket's burst)."""
    assert receiver.ip is not None
    sender_ns = sender if isinstance(sender, str) else sender.ns
    server = asyncio.create_task(netns(receiver.ns, "iperf3", "-s", "-1", "-J", "-B",
                                       receiver.ip, timeout=120))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while True:  # until the server listens (a client that cannot connect says so in
        # its JSON, with exit status 0)
        client = json.loads(await netns(sender_ns, "iperf3", "-c", receiver.ip, "-t",
                                        str(seconds), "-J", timeout=120))
        if "error" not in client:
            break
        assert loop.time() < deadline and not server.done(), client["error"]
        await asyncio.sleep(0.2)
    result = json.loads(await server)
    intervals = [i["sum"] for i in result["intervals"]][1:]
    return sum(i["bytes"] for i in intervals) * 8 / sum(i["seconds"] for i in intervals)


@pytest.mark.parametrize("where", ["from the VM", "to the VM"])
async def test_a_bandwidth_cap_holds_within_20_percent(lab: Lab, where: str) -> None:
    a = lab.add_vm("a", "52:54:00:00:00:0a", "10.77.0.1")
    b = lab.add_vm("b", "52:54:00:00:00:0b", "10.77.0.2")
    unshaped = await _iperf(a, b, 2)
    assert unshaped > 2 * CAP
    await apply(lab, port(a if where == "from the VM" else b,
                          PortSettings(bandwidth_max=CAP)))
    rate = await _iperf(a, b, 5)
    assert 0.8 * CAP <= rate <= 1.2 * CAP, f"{rate / 1e6:.2f} Mbit/s"


async def test_minimum_bandwidth_is_kept_under_contention(
        lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    # A link this slow is contended by two bulk transfers from the host; the VM with
    # the larger minimum keeps it, the other gets its own and a share of the rest.
    monkeypatch.setattr(tc, "LINK_RATE", 20_000_000)
    a = lab.add_vm("a", "52:54:00:00:00:0a", "10.77.0.1")
    b = lab.add_vm("b", "52:54:00:00:00:0b", "10.77.0.2")
    await apply(lab, port(a, PortSettings(bandwidth_min=15_000_000)))
    await apply(lab, port(b, PortSettings(bandwidth_min=1_000_000)))
    to_a, to_b = await asyncio.gather(_iperf(lab.host, a, 5), _iperf(lab.host, b, 5))
    assert to_a >= 0.8 * 15_000_000, f"{to_a / 1e6:.2f} Mbit/s"
    assert to_b >= 0.8 * 1_000_000 and to_a + to_b <= 1.2 * 20_000_000


async def test_minimum_bandwidth_classes_come_and_go_on_the_bridge(lab: Lab) -> None:
    a = lab.add_vm("a", "52:54:00:00:00:0a", "10.77.0.1")
    b = lab.add_vm("b", "52:54:00:00:00:0b", "10.77.0.2")
    for vm in (a, b):
        await apply(lab, port(vm, PortSettings(bandwidth_min=50_000_000)))
    await apply(lab, port(a, PortSettings(bandwidth_min=50_000_000)))  # idempotent
    classes = await netns(lab.host, "tc", "class", "show", "dev", BRIDGE)
    minors = [f"1:{tc.class_minor(vm.tap):x} " for vm in (a, b)]
    assert all(m in classes for m in minors) and "rate 50Mbit" in classes
    with inside(lab.host):
        await tc.clear_port(a.tap)
        await tc.clear_port(a.tap)
    classes = await netns(lab.host, "tc", "class", "show", "dev", BRIDGE)
    assert minors[0] not in classes and minors[1] in classes
    await apply(lab, port(b))  # no minimum any more: no tree on the bridge
    assert "htb" not in await netns(lab.host, "tc", "qdisc", "show", "dev", BRIDGE)


# -- mirroring -----------------------------------------------------------------------

async def test_mirroring_copies_both_directions_to_the_destination_port(lab: Lab) -> None:
    a = lab.add_vm("a", "52:54:00:00:00:0a", "10.77.0.1")
    b = lab.add_vm("b", "52:54:00:00:00:0b", "10.77.0.2")
    c = lab.add_vm("c", "52:54:00:00:00:0c", "10.77.0.3")
    await apply(lab, port(c, PortSettings(mirror=MirrorMode.DESTINATION)))
    # The bridge learns where a and b are, so their frames to each other reach c
    # only as copies.
    await send(a, udp(a, c, "learn-a"))
    await send(b, udp(b, c, "learn-b"))

    async def traffic() -> None:
        await send(a, udp(a, b, "a-out"))
        await send(b, udp(b, a, "b-in"))
        await send(b, udp(b, c, "mark-b"))
        await send(a, udp(a, c, "mark-a"))

    seen = await receive(c, ["mark-a", "mark-b"], traffic)
    assert "a-out" not in seen and "b-in" not in seen
    await apply(lab, port(a, PortSettings(mirror=MirrorMode.SOURCE), mirror_to=c.tap))
    await apply(lab, port(a, PortSettings(mirror=MirrorMode.SOURCE), mirror_to=c.tap))
    seen = await receive(c, ["mark-a", "mark-b"], traffic)
    assert "a-out" in seen and "b-in" in seen
    await apply(lab, port(a))
    seen = await receive(c, ["mark-a", "mark-b"], traffic)
    assert "a-out" not in seen and "b-in" not in seen


# -- NAT -----------------------------------------------------------------------------

SERVE = ("import socket, sys\n"
         "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
         "s.bind(('0.0.0.0', int(sys.argv[1]))); s.listen(); print('ready', flush=True)\n"
         "while True:\n"
         "    c, peer = s.accept(); c.sendall(('hello ' + peer[0]).encode()); c.close()\n")
FETCH = ("import socket, sys\n"
         "s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)\n"
         "print(s.recv(100).decode())\n")


async def _serve(ns: str, port_number: int) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", ns, PY, "-c", SERVE, str(port_number),
        stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    assert (await asyncio.wait_for(proc.stdout.readline(), 60)).strip() == b"ready"
    return proc


def nat_plan(mappings: tuple[NatMapping, ...] = (), dhcp_plan: DhcpPlan | None = None
             ) -> SwitchPlan:
    return SwitchPlan("switch-1", "Default Switch", SwitchType.NAT, BRIDGE, TABLE,
                      host_address=ipaddress.IPv4Interface(f"{HOST_IP}/24"),
                      subnet=ipaddress.IPv4Network("10.77.0.0/24"), mappings=mappings,
                      dhcp=dhcp_plan)


async def test_nat_masquerades_the_subnet_and_maps_ports_in(lab: Lab) -> None:
    a = lab.add_vm("a", "52:54:00:00:00:0a", "10.77.0.1")
    b = lab.add_vm("b", "52:54:00:00:00:0b", "10.77.0.2")
    outside = f"{lab.prefix}-out"
    lab._add_ns(outside)
    _ip("-n", lab.host, "link", "add", "uplink0", "type", "veth", "peer", "name", "eth0",
        "netns", outside)
    _ip("-n", lab.host, "addr", "add", "192.0.2.1/24", "dev", "uplink0")
    _ip("-n", lab.host, "link", "set", "uplink0", "up")
    _ip("-n", outside, "addr", "add", "192.0.2.2/24", "dev", "eth0")
    _ip("-n", outside, "link", "set", "eth0", "up")
    for vm in (a, b):
        _ip("-n", vm.ns, "route", "add", "default", "via", HOST_IP)
    await netns(lab.host, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    plan = nat_plan((NatMapping(NatProtocol.TCP, 8080, "10.77.0.2", 80),))
    with inside(lab.host):
        await nft.apply_switch(plan)
        await nft.apply_switch(plan)
    servers = [await _serve(outside, 7000), await _serve(b.ns, 80)]
    try:
        # Out: the outside sees the host's address, not the VM's.
        assert (await netns(a.ns, PY, "-c", FETCH, "192.0.2.2", "7000")).strip() \
            == "hello 192.0.2.1"
        # In: from outside, from the host itself, from another VM of the switch
        # (hairpin, answered through the host).
        assert (await netns(outside, PY, "-c", FETCH, "192.0.2.1", "8080")).strip() \
            == "hello 192.0.2.2"
        assert (await netns(lab.host, PY, "-c", FETCH, "192.0.2.1", "8080")).startswith(
            "hello ")
        assert (await netns(a.ns, PY, "-c", FETCH, HOST_IP, "8080")).strip() \
            == f"hello {HOST_IP}"
        # A VM's own connection to that port elsewhere is not redirected.
        with pytest.raises(Exception, match="refused"):
            await netns(a.ns, PY, "-c", FETCH, "192.0.2.2", "8080")
        with inside(lab.host):
            await nft.remove_switch(plan)
            await nft.remove_switch(plan)
        with pytest.raises(Exception, match="exit"):
            await netns(outside, PY, "-c", FETCH, "192.0.2.1", "8080")
    finally:
        for proc in servers:
            proc.kill()
            await proc.wait()


# -- DHCP and DNS --------------------------------------------------------------------

UDHCPC_SCRIPT = """#!/bin/sh
if [ "$1" = bound ]; then
    ip addr add "$ip/$mask" dev "$interface"
    echo "$ip" > "{out}"
fi
exit 0
"""


async def test_dnsmasq_leases_an_address_and_answers_the_vms_name(lab: Lab) -> None:
    d = lab.add_vm("d", "52:54:00:00:00:0d", None)
    plan = nat_plan(dhcp_plan=DhcpPlan("10.77.0.100", "10.77.0.150", "hv.test",
                                       lab.tmp / "dhcp"))
    script, got = lab.tmp / "udhcpc.sh", lab.tmp / "address"
    script.write_text(UDHCPC_SCRIPT.format(out=got))
    script.chmod(0o755)
    try:
        with inside(lab.host):
            await dhcp.start(plan)
        pid = int((lab.tmp / "dhcp" / "dnsmasq.pid").read_text())
        await netns(d.ns, "busybox", "udhcpc", "-i", "eth0", "-n", "-q", "-s", str(script),
                    "-x", "hostname:vmdee")
        address = got.read_text().strip()
        assert ipaddress.IPv4Address("10.77.0.100") <= ipaddress.IPv4Address(address) \
            <= ipaddress.IPv4Address("10.77.0.150")
        assert [(x.mac, x.ip, x.hostname) for x in dhcp.leases(plan)] \
            == [(d.mac, address, "vmdee")]
        for name in ("vmdee", "vmdee.hv.test"):
            answer = await netns(d.ns, "busybox", "nslookup", name, HOST_IP)
            assert f"Address: {address}" in answer, answer
        with inside(lab.host):
            await dhcp.start(plan)  # adopted, not restarted
            assert int((lab.tmp / "dhcp" / "dnsmasq.pid").read_text()) == pid
            changed = nat_plan(dhcp_plan=DhcpPlan("10.77.0.100", "10.77.0.120", "hv.test",
                                                  lab.tmp / "dhcp"))
            await dhcp.start(changed)  # another plan: replaced
            new_pid = int((lab.tmp / "dhcp" / "dnsmasq.pid").read_text())
            assert new_pid != pid and not _alive(pid)
            await dhcp.stop(changed)
            await dhcp.stop(changed)
            assert not _alive(new_pid)
    finally:
        pid_file = lab.tmp / "dhcp" / "dnsmasq.pid"
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pid_file.read_text()), 9)


async def _lookup(ns: str, name: str) -> list[str]:
    """The addresses dnsmasq (at the host's address) answers for ``name`` from
    namespace ``ns``; none when it knows no such name."""
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", ns, "busybox", "nslookup", "-type=a", name, HOST_IP,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    answers = out.decode().partition(f"Name:\t{name}")[2]
    return [line.split()[-1] for line in answers.splitlines()
            if line.startswith("Address:") and HOST_IP not in line]


async def _until(what: str, check: Callable[[], Awaitable[bool]]) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while not await check():
        assert loop.time() < deadline, f"still not: {what}"
        await asyncio.sleep(0.2)


async def test_dnsmasq_names_each_vm_after_its_vm_and_reloads_the_names(lab: Lab) -> None:
    # Both guests send the same host name ("tiny", as the tiny image does): the plan's
    # names win, in their leases and in DNS, from another VM and from the host.
    d = lab.add_vm("d", "52:54:00:00:00:0d", None)
    e = lab.add_vm("e", "52:54:00:00:00:0e", None)
    state = lab.tmp / "dhcp"  # private, as a service's data directory is

    def named(*hosts: tuple[str, str]) -> SwitchPlan:
        return nat_plan(dhcp_plan=DhcpPlan("10.77.0.100", "10.77.0.150", "hv.test", state,
                                           hosts))

    plan = named((d.mac, "v1"), (e.mac, "v-two"))
    addresses: dict[str, str] = {}
    try:
        with inside(lab.host):
            await dhcp.start(plan)
        pid = int((state / "dnsmasq.pid").read_text())
        hosts = dhcp._hosts_file(plan)  # where dnsmasq's own user may read it
        assert hosts.read_text() == f"{d.mac},v1\n{e.mac},v-two\n"
        for vm in (d, e):
            script, got = lab.tmp / f"udhcpc-{vm.name}.sh", lab.tmp / f"address-{vm.name}"
            script.write_text(UDHCPC_SCRIPT.format(out=got))
            script.chmod(0o755)
            await netns(vm.ns, "busybox", "udhcpc", "-i", "eth0", "-n", "-q", "-s",
                        str(script), "-x", "hostname:tiny")
            addresses[vm.name] = got.read_text().strip()
        assert sorted((x.mac, x.ip, x.hostname) for x in dhcp.leases(plan)) == [
            (d.mac, addresses["d"], "v1"), (e.mac, addresses["e"], "v-two")]
        for ns in (e.ns, lab.host):
            assert await _lookup(ns, "v1") == [addresses["d"]]
            assert await _lookup(ns, "v1.hv.test") == [addresses["d"]]
        assert await _lookup(d.ns, "v-two.hv.test") == [addresses["e"]]
        assert await _lookup(d.ns, "tiny") == []

        # d's VM is renamed: the same dnsmasq re-reads its names (SIGHUP) and renames
        # the lease at once, without the guest asking again.
        renamed = named((d.mac, "v3"), (e.mac, "v-two"))
        with inside(lab.host):
            await dhcp.reload(renamed)
        await _until("v3 answers", lambda: _has(e.ns, "v3", addresses["d"]))
        assert await _lookup(e.ns, "v1") == []
        assert await _lookup(e.ns, "v1.hv.test") == []
        assert await _lookup(d.ns, "v-two") == [addresses["e"]]
        assert int((state / "dnsmasq.pid").read_text()) == pid
        reads = _reads(state, hosts)
        with inside(lab.host):
            await dhcp.reload(renamed)  # nothing changed: not told again
        assert hosts.read_text() == f"{d.mac},v3\n{e.mac},v-two\n"

        # The service restarts: the running dnsmasq (its command line names the hosts
        # file) is adopted, and a change made meanwhile is read.
        again = named((d.mac, "v4"), (e.mac, "v-two"))
        with inside(lab.host):
            await dhcp.start(again)
        assert int((state / "dnsmasq.pid").read_text()) == pid
        await _until("v4 answers", lambda: _has(lab.host, "v4", addresses["d"]))
        assert await _lookup(lab.host, "v3") == []
        assert _reads(state, hosts) == reads + 1
        with inside(lab.host):
            await dhcp.stop(again)
        assert not hosts.exists()
    finally:
        with contextlib.suppress(OSError, ValueError):
            os.kill(int((state / "dnsmasq.pid").read_text()), 9)


async def _has(ns: str, name: str, address: str) -> bool:
    return await _lookup(ns, name) == [address]


def _reads(state: Path, hosts: Path) -> int:
    """How many times dnsmasq logged reading its hosts file."""
    log = (state / "dnsmasq.log").read_text(errors="replace")
    assert "cannot read" not in log, log
    return log.count(f"read {hosts}")


# -- every rule shape ----------------------------------------------------------------

async def test_nft_and_tc_accept_every_rule_shape(lab: Lab) -> None:
    a = lab.add_vm("a", "52:54:00:00:00:0a", "10.77.0.1")
    c = lab.add_vm("c", "52:54:00:00:00:0c", "10.77.0.3")
    acls = tuple(PortAcl(action, direction, remote)
                 for action in AclAction for direction in AclDirection
                 for remote in ("10.0.0.0/8", "fd00::/8", "2001:db8::1/128",
                                "52:54:00:aa:bb:cc"))
    settings = PortSettings(mac_spoofing=False, dhcp_guard=True, router_guard=True,
                            acls=acls, bandwidth_max=400 * 10**9, bandwidth_min=1000,
                            mirror=MirrorMode.SOURCE)
    await apply(lab, port(a, settings, mirror_to=c.tap))
    mappings = tuple(NatMapping(p, 1 + n, "10.77.0.7", 65535 - n)
                     for n, p in enumerate(NatProtocol))
    with inside(lab.host):
        await nft.apply_switch(nat_plan(mappings))
        counters = await nft.acl_counters(a.tap, TABLE)
        both = [x for x in acls if x.direction is AclDirection.BOTH]
        assert len(counters) == len(acls) + len(both)  # "both": one rule each way
        await nft.remove_table(TABLE)
        await tc.clear_port(a.tap)
    assert "tbf" not in await netns(lab.host, "tc", "qdisc", "show", "dev", a.tap)
