"""VLANs for real, on a kernel without bridge VLAN filtering or 802.1Q: trunk ports
and an external switch's tagged uplink through the tc eBPF programs of
:mod:`hvstack.network.trunks`, in network namespaces the test makes.

Taps opened by the backend stand in for VMs: the test writes frames (802.1Q tags in
the data, as a guest's driver hands them to QEMU) to a tap's descriptor and reads
what the VM would receive. The physical network of an external switch is a veth end
in another namespace, read and written with an AF_PACKET socket (the tag arrives as
packet metadata there: read through PACKET_AUXDATA). Negative checks wait for a later
frame along the same path (a sentinel), never for a fixed time.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from hvstack.errors import HvError
from hvstack.network import bpf, netlink, nft, tc, trunks
from hvstack.network.backend import PortPlan, SwitchPlan
from hvstack.network.linux import LinuxNetwork
from hvstack.network.model import MirrorMode, PortSettings, SwitchType, Vlan, VlanMode
from hvstack.network.names import bridge_name, tap_name, veth_names
from tests.integration.test_network_backend import (  # noqa: F401 (fixtures)
    REPO,
    TABLE,
    TAG,
    Recorder,
    expect,
    netns,
    our_links,
    physical,
)

pytestmark = pytest.mark.integration
BROADCAST = b"\xff" * 6
SOL_PACKET, PACKET_AUXDATA, TP_STATUS_VLAN_VALID = 263, 8, 0x10
CLONE_NEWNET = 0x40000000


def run_scenario(ns: str, name: str, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    done = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-m",
         "tests.integration.test_network_vlans", name, *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, f"scenario {name} failed:\n{done.stdout}\n{done.stderr}"


def test_trunk_ports(netns: Callable[[], str]) -> None:  # noqa: F811
    run_scenario(netns(), "trunk_ports")


def test_trunk_with_mirroring(netns: Callable[[], str]) -> None:  # noqa: F811
    run_scenario(netns(), "trunk_mirrored")


def test_trunk_failures_and_cleanup(netns: Callable[[], str]) -> None:  # noqa: F811
    run_scenario(netns(), "trunk_failures")


def test_external_switch_carries_access_vlans_tagged(physical: tuple[str, str]) -> None:  # noqa: F811
    run_scenario(physical[0], "external_vlans", physical[1])


def test_external_switch_keeps_foreign_tags_from_its_ports(physical: tuple[str, str]) -> None:  # noqa: F811
    run_scenario(physical[0], "foreign_tags", physical[1])


# -- scenarios (child side, inside the namespace) ------------------------------------

SCENARIOS: dict[str, Callable[..., Awaitable[None]]] = {}


def scenario(fn: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    SCENARIOS[fn.__name__] = fn
    return fn


def frame(src: bytes, marker: bytes, vid: int | None = None, dst: bytes = BROADCAST,
          size: int = 46) -> bytes:
    """An Ethernet frame (type 0x88b5) carrying ``marker`` in ``size`` bytes of
    payload, 802.1Q-tagged with ``vid``."""
    tag = b"" if vid is None else struct.pack("!HH", 0x8100, vid)
    return dst + src + tag + b"\x88\xb5" + marker.ljust(size, b"\0")


def parse(data: bytes, vid: int | None = None) -> tuple[int | None, bytes] | None:
    """(VLAN id or None, marker) of one of our frames (None for any other frame); the
    id is the outer tag's (802.1Q or 802.1ad) when ``vid`` (from metadata) is None."""
    outer = vid
    while data[12:14] in (b"\x81\x00", b"\x88\xa8"):
        found = struct.unpack("!H", data[14:16])[0] & 0xFFF
        outer, data = found if outer is None else outer, data[:12] + data[16:]
    return (outer, data[14:].rstrip(b"\0")) if data[12:14] == b"\x88\xb5" else None


class Vm:
    """A tap the backend opened, read and written as QEMU would (vnet header)."""

    def __init__(self, plan: PortPlan, fd: int) -> None:
        self.plan, self.fd = plan, fd
        self.mac = bytes.fromhex(plan.mac.replace(":", ""))
        self.got: list[tuple[int | None, bytes]] = []

    def send(self, data: bytes) -> None:
        os.write(self.fd, bytes(10) + data)

    def poll(self) -> None:
        while select.select([self.fd], [], [], 0)[0]:
            found = parse(os.read(self.fd, 65536)[10:])
            if found:
                self.got.append(found)

    def saw(self, marker: bytes) -> set[int | None]:
        self.poll()
        return {vid for vid, m in self.got if m == marker}


class Wire:
    """An AF_PACKET socket on an interface of namespace ``ns`` (the physical network)."""

    def __init__(self, ns: str, ifname: str) -> None:
        made: list[socket.socket] = []

        def enter() -> None:  # a thread of its own: setns changes only that thread
            libc = ctypes.CDLL(None, use_errno=True)
            with open(f"/run/netns/{ns}", "rb") as handle:
                if libc.setns(handle.fileno(), CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
            sock.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
            sock.bind((ifname, 0))
            made.append(sock)

        thread = threading.Thread(target=enter)
        thread.start()
        thread.join()
        self.sock, self.got = made[0], []
        self.mac = bytes.fromhex("020000770001")

    def send(self, data: bytes) -> None:
        self.sock.send(data)

    def poll(self) -> None:
        while select.select([self.sock], [], [], 0)[0]:
            data, ancillary, _, address = self.sock.recvmsg(65536, 256)
            if address[2] == socket.PACKET_OUTGOING:
                continue
            vid = None
            for level, kind, raw in ancillary:
                if (level, kind) == (SOL_PACKET, PACKET_AUXDATA):
                    status, _, _, _, _, tci, _ = struct.unpack("IIIHHHH", raw[:20])
                    vid = tci & 0xFFF if status & TP_STATUS_VLAN_VALID else None
            found = parse(data, vid) if vid is not None else parse(data)
            if found:
                self.got.append(found)

    def saw(self, marker: bytes) -> set[int | None]:
        self.poll()
        return {vid for vid, m in self.got if m == marker}


Endpoint = Vm | Wire


def deliver(sender: Endpoint, data: bytes, marker: bytes,
            expected: dict[Endpoint, int | None], deadline: float = 15.0) -> None:
    """Send ``data`` until each of ``expected`` has received ``marker`` with the VLAN
    id given (None: untagged)."""
    end = time.monotonic() + deadline
    while True:
        sender.send(data)
        time.sleep(0.05)  # between resends only: the check below is the condition
        missing = {p: v for p, v in expected.items() if v not in p.saw(marker)}
        if not missing:
            for port, vid in expected.items():
                assert port.saw(marker) == {vid}, (marker, port.saw(marker))
            return
        assert time.monotonic() < end, f"{marker!r} never reached {missing}"


def switch(name: str, kind: SwitchType = SwitchType.PRIVATE) -> SwitchPlan:
    return SwitchPlan(f"sw-{name}", name, kind, bridge_name(TAG, f"sw-{name}"), TABLE)


def port(plan: SwitchPlan, n: int, vlan: Vlan, **settings: Any) -> PortPlan:
    mac = f"52:54:00:aa:00:{n:02x}"
    return PortPlan(tap_name(TAG, f"vm{n}", mac), mac, f"vm{n}",
                    PortSettings(vlan=vlan, **settings), TABLE, plan.bridge, plan.type)


def backend(shaping: Any = None, rules: Any = None) -> LinuxNetwork:
    rec = Recorder()
    return LinuxNetwork(rules or rec.module("nft"), shaping or rec.module("tc"),
                        rec.module("dhcp"))


def nft_table() -> str:
    return subprocess.run(["nft", "list", "table", "bridge", TABLE], capture_output=True,
                          text=True, check=False).stdout


async def open_vm(net: LinuxNetwork, plan: PortPlan) -> Vm:
    return Vm(plan, await net.open_port(plan))


async def links_named(prefix: str) -> list[str]:
    return [n for n in await our_links_all() if n.startswith(prefix)]


async def our_links_all() -> list[str]:
    return await netlink.run(lambda ipr: sorted(
        link.name for link in netlink.links(ipr) if TAG in link.name))


def ingress_filters(dev: str) -> str:
    return subprocess.run(["tc", "filter", "show", "dev", dev, "ingress"], capture_output=True,
                          text=True, check=False).stdout


ACCESS10, ACCESS20 = Vlan(VlanMode.ACCESS, access_id=10), Vlan(VlanMode.ACCESS, access_id=20)
TRUNK = Vlan(VlanMode.TRUNK, allowed=(10, 20))


@scenario
async def trunk_ports() -> None:
    net = backend()
    sw = switch("trunks")
    await net.ensure_switch(sw)
    vms = [await open_vm(net, p) for p in (
        port(sw, 1, TRUNK), port(sw, 2, ACCESS10), port(sw, 3, ACCESS20), port(sw, 4, Vlan()),
        port(sw, 5, Vlan(VlanMode.TRUNK, allowed=(10,), native=30)),
        port(sw, 6, Vlan(VlanMode.ACCESS, access_id=30)))]
    trunk, a10, a20, untagged, trunk30, a30 = vms
    try:
        assert (await net.interface(trunk.plan.tap)).master == sw.bridge  # native: VLAN 1
        assert len(await links_named(f"hvv{TAG}")) == 3  # trunk: 10, 20; trunk30: 10
        # A tagged frame of VLAN 10 from the trunk: untagged at VLAN 10's access port,
        # tagged at the other trunk carrying 10; nowhere else.
        deliver(trunk, frame(trunk.mac, b"t10", 10), b"t10", {a10: None, trunk30: 10})
        # The access port's reply (unicast, to the MAC its bridge learnt) comes back
        # tagged 10.
        deliver(a10, frame(a10.mac, b"r10", dst=trunk.mac), b"r10", {trunk: 10})
        deliver(a20, frame(a20.mac, b"b20"), b"b20", {trunk: 20})
        # Full-sized frames (1500 bytes of payload) both ways: the tag fits.
        deliver(a10, frame(a10.mac, b"big", dst=trunk.mac, size=1500), b"big", {trunk: 10})
        deliver(trunk, frame(trunk.mac, b"big2", 10, size=1500), b"big2", {a10: None})
        # Untagged from the trunk: its native VLAN (the switch's default) only.
        deliver(trunk, frame(trunk.mac, b"native"), b"native", {untagged: None})
        # A priority tag (id 0) and a tag of the native id are the native VLAN too.
        deliver(trunk, frame(trunk.mac, b"prio", 0), b"prio", {untagged: None})
        deliver(trunk, frame(trunk.mac, b"one", 1), b"one", {untagged: None})
        # No VLAN hopping: a tag from an untagged or access port is dropped (the port
        # carries no VLAN tagged); a tag of the access port's own VLAN is its VLAN.
        untagged.send(frame(untagged.mac, b"hop10", 10))
        a20.send(frame(a20.mac, b"hop10b", 10))
        deliver(a10, frame(a10.mac, b"own10", 10), b"own10", {trunk: 10})
        # A disallowed tag is dropped; a QinQ outer tag too.
        trunk.send(frame(trunk.mac, b"bad30", 30))
        trunk.send(frame(trunk.mac, b"qinq", 10)[:12] + b"\x88\xa8\x00\x0a"
                   + frame(trunk.mac, b"qinq", 10)[12:])
        # A native VLAN 30 trunk: untagged frames are VLAN 30's, both ways.
        deliver(trunk30, frame(trunk30.mac, b"n30"), b"n30", {a30: None})
        deliver(a30, frame(a30.mac, b"a30"), b"a30", {trunk30: None})
        # Sentinels along every path the dropped frames could have taken.
        deliver(trunk, frame(trunk.mac, b"s10", 10), b"s10", {a10: None, trunk30: 10})
        deliver(trunk, frame(trunk.mac, b"s20", 20), b"s20", {a20: None})
        deliver(trunk, frame(trunk.mac, b"s1"), b"s1", {untagged: None})
        for vm in vms:
            for marker in (b"bad30", b"qinq", b"hop10", b"hop10b"):
                assert not vm.saw(marker), (vm.plan.vm_name, marker)
        for vm, markers in ((a20, (b"t10", b"native", b"r10", b"n30")),
                            (untagged, (b"t10", b"b20", b"n30", b"a30")),
                            (a10, (b"native", b"b20", b"prio", b"n30")),
                            (a30, (b"t10", b"native", b"s10", b"s1")),
                            (trunk30, (b"native", b"b20", b"s20"))):
            for marker in markers:
                assert not vm.saw(marker), (vm.plan.vm_name, marker)
        # A trunk made untagged: its pairs and its program go; the VLAN 20 bridge, with
        # an access port still, stays.
        await net.update_port(dataclasses.replace(trunk.plan, settings=PortSettings()))
        assert len(await links_named(f"hvv{TAG}")) == 1
        assert trunks.PROGRAM in ingress_filters(trunk.plan.tap)  # it polices tags
        await net.update_port(dataclasses.replace(trunk.plan, bridge=None))
        assert trunks.PROGRAM not in ingress_filters(trunk.plan.tap)
        await net.update_port(trunk.plan)  # and a trunk again
        assert len(await links_named(f"hvv{TAG}")) == 3
        deliver(trunk, frame(trunk.mac, b"again", 20), b"again", {a20: None})
        # Closing the ports removes every pair and VLAN bridge.
        for vm in vms:
            await net.close_port(vm.plan.tap, TABLE)
    finally:
        for vm in vms:
            os.close(vm.fd)
    assert await our_links() == [sw.bridge]
    assert await links_named(f"hvw{TAG}") == []
    await net.remove_switch(sw)
    assert await our_links_all() == []


@scenario
async def trunk_mirrored() -> None:
    """A mirrored trunk with the real nftables and tc: the mirror sees frames as the VM
    sent and received them (tagged), and the VLAN programs still run (tc's mirror
    filters come first and continue); the port's guards hold for its tagged frames."""
    net = backend(shaping=tc, rules=nft)
    sw = switch("mirror")
    await net.ensure_switch(sw)
    dest = await open_vm(net, port(sw, 9, Vlan(), mirror=MirrorMode.DESTINATION))
    trunk = await open_vm(net, dataclasses.replace(
        port(sw, 1, TRUNK, mirror=MirrorMode.SOURCE), mirror_to=dest.plan.tap))
    a10 = await open_vm(net, port(sw, 2, ACCESS10))
    try:
        shown = ingress_filters(trunk.plan.tap)
        assert "mirred" in shown and trunks.PROGRAM in shown, shown
        # MAC spoofing protection on the VM's tagged frames too (they reach VLAN 10's
        # bridge through the trunk's veth, which jumps to the port's chain).
        trunk.send(frame(bytes.fromhex("525400bad001"), b"spoofed", 10))
        deliver(trunk, frame(trunk.mac, b"out", 10), b"out", {a10: None, dest: 10})
        assert not a10.saw(b"spoofed")
        deliver(a10, frame(a10.mac, b"in", dst=trunk.mac), b"in", {trunk: 10, dest: 10})
        # Applying the port again (tc first deletes its own filters) keeps the program.
        await net.update_port(trunk.plan)
        deliver(trunk, frame(trunk.mac, b"out2", 10), b"out2", {a10: None, dest: 10})
        # Mirroring off: the VLAN program stays, the copies stop.
        await net.update_port(dataclasses.replace(trunk.plan, settings=dataclasses.replace(
            trunk.plan.settings, mirror=MirrorMode.NONE)))
        assert "mirred" not in ingress_filters(trunk.plan.tap)
        deliver(trunk, frame(trunk.mac, b"plain", 10), b"plain", {a10: None})
        deliver(trunk, frame(trunk.mac, b"plain1"), b"plain1", {dest: None})
        assert not dest.saw(b"plain")
        v10, v20 = (veth_names(TAG, trunk.plan.tap, vid)[0] for vid in (10, 20))
        assert v10 in nft_table() and v20 in nft_table()
        await net.update_port(dataclasses.replace(trunk.plan, settings=PortSettings(
            vlan=Vlan(VlanMode.TRUNK, allowed=(10,)))))
        assert v10 in nft_table() and v20 not in nft_table()
    finally:
        for vm in (dest, trunk, a10):
            await net.close_port(vm.plan.tap, TABLE)
            os.close(vm.fd)
    assert "hvv" not in nft_table() and "hvt" not in nft_table()
    await net.remove_switch(sw)
    await net.cleanup(TABLE, keep=set())
    assert await our_links_all() == []


@scenario
async def trunk_failures() -> None:
    # The verifier's word reaches the error.
    exc = await expect(HvError, asyncio.to_thread(bpf.load, bpf.insn(bpf.EXIT), "bad"))
    assert "verifier" in str(exc) and "R0" in str(exc), exc
    net = backend()
    sw = switch("fail")
    await net.ensure_switch(sw)
    a10 = await open_vm(net, port(sw, 2, ACCESS10))
    real, calls = bpf.load, []

    def failing(code: bytes, name: str) -> int:
        calls.append(name)
        if len(calls) == 2:
            raise HvError("injected failure loading a program")
        return real(code, name)

    trunk = port(sw, 1, TRUNK)
    bpf.load = failing  # type: ignore[assignment]
    try:
        await expect(HvError, net.open_port(trunk))
    finally:
        bpf.load = real  # type: ignore[assignment]
    # Nothing of the trunk is left: no tap, no pair, no VLAN 20 bridge.
    assert await links_named(f"hvv{TAG}") == [] and await links_named(f"hvw{TAG}") == []
    assert len(await our_links()) == 3  # switch, VLAN 10 bridge, the access port
    assert not await net.port_exists(trunk.tap)
    # A VM gone without its port closed (a crash): cleanup removes its pairs.
    fd = await net.open_port(trunk)
    assert len(await links_named(f"hvw{TAG}")) == 2
    os.close(fd)
    await net.cleanup(TABLE, keep={sw.bridge, a10.plan.tap})
    assert await links_named(f"hvv{TAG}") == [] and await links_named(f"hvw{TAG}") == []
    assert len(await our_links()) == 3
    await net.close_port(a10.plan.tap, TABLE)
    os.close(a10.fd)
    await net.cleanup(TABLE, keep=set())
    assert await our_links_all() == []


@scenario
async def external_vlans(physical_ns: str) -> None:
    net = backend()
    sw = dataclasses.replace(switch("ext", SwitchType.EXTERNAL), adapter="hx0")
    await net.ensure_switch(sw)
    assert trunks.PROGRAM not in ingress_filters("hx0")  # no VLAN in use yet
    wire = Wire(physical_ns, "px0")
    vms = [await open_vm(net, p) for p in (
        port(sw, 2, ACCESS10), port(sw, 3, ACCESS20), port(sw, 4, Vlan()),
        port(sw, 1, Vlan(VlanMode.TRUNK, allowed=(10, 30))))]
    a10, a20, untagged, trunk = vms
    try:
        assert trunks.PROGRAM in ingress_filters("hx0")
        # The adapter carries VLANs 10, 20 (access ports) and 30 (the trunk's).
        assert len(await links_named(f"hvv{TAG}")) == 3 + 2
        deliver(a10, frame(a10.mac, b"up10"), b"up10", {wire: 10, trunk: 10})
        deliver(wire, frame(wire.mac, b"down10", 10), b"down10", {a10: None, trunk: 10})
        deliver(wire, frame(wire.mac, b"down20", 20), b"down20", {a20: None})
        deliver(trunk, frame(trunk.mac, b"up30", 30), b"up30", {wire: 30})
        deliver(a10, frame(a10.mac, b"bigup", size=1500), b"bigup", {wire: 10})
        # An untagged port's VM tagging its frames reaches no VLAN of the physical network.
        untagged.send(frame(untagged.mac, b"hop", 10))
        deliver(untagged, frame(untagged.mac, b"after"), b"after", {wire: None})
        deliver(a10, frame(a10.mac, b"after10"), b"after10", {wire: 10})
        assert not wire.saw(b"hop") and not a10.saw(b"hop")
        deliver(wire, frame(wire.mac, b"bigdown", 10, size=1500), b"bigdown", {a10: None})
        deliver(wire, frame(wire.mac, b"plain"), b"plain", {untagged: None, trunk: None})
        deliver(untagged, frame(untagged.mac, b"plainup"), b"plainup", {wire: None})
        # The adapter failing to carry a new VLAN fails that port's opening and leaves
        # nothing of it; the VLANs in use are carried again.
        real = bpf.load
        bpf.load = lambda code, name: (_ for _ in ()).throw(  # type: ignore[assignment]
            HvError("injected failure loading a program"))
        try:
            await expect(HvError, net.open_port(port(sw, 7, Vlan(VlanMode.ACCESS,
                                                                 access_id=40))))
        finally:
            bpf.load = real  # type: ignore[assignment]
        assert len(await links_named(f"hvv{TAG}")) == 3 + 2
        assert not await net.port_exists(port(sw, 7, Vlan()).tap)
        deliver(a10, frame(a10.mac, b"still10"), b"still10", {wire: 10})
        for vm, markers in ((a20, (b"up10", b"down10", b"plain")),
                            (untagged, (b"down10", b"down20", b"up30")),
                            (a10, (b"down20", b"plain", b"up30"))):
            for marker in markers:
                assert not vm.saw(marker), (vm.plan.vm_name, marker)
        # The last port of VLAN 20 leaves: the adapter stops carrying it.
        await net.close_port(a20.plan.tap, TABLE)
        assert len(await links_named(f"hvv{TAG}")) == 2 + 2
        for vm in vms:
            await net.close_port(vm.plan.tap, TABLE)
        assert await links_named(f"hvv{TAG}") == []
        assert trunks.PROGRAM not in ingress_filters("hx0")
    finally:
        for vm in vms:
            os.close(vm.fd)
    # A VLAN in use again, then the switch goes: the adapter keeps nothing of ours.
    vm = await open_vm(net, port(sw, 2, ACCESS10))
    await net.close_port(vm.plan.tap, TABLE)
    os.close(vm.fd)
    await net.remove_switch(sw)
    assert trunks.PROGRAM not in ingress_filters("hx0")
    assert await our_links_all() == []


def _tagged_drops(tap: str) -> int:
    """Packets the port's chain dropped as VLAN-tagged (its counter)."""
    for line in nft_table().splitlines():
        if f'"{tap}"' in line and "8021ad" in line and "counter packets" in line:
            return int(line.split("counter packets ")[1].split()[0])
    raise AssertionError(f"no tagged-frame rule for {tap}:\n{nft_table()}")


@scenario
async def foreign_tags(physical_ns: str) -> None:
    """The adapter passes on tags of VLANs not in use (they may be the host's own): no
    VM gets them through the switch bridge, offloaded (from the wire) or in the data
    (sent by the host on the bridge), 802.1Q or 802.1ad; VLANs in use and untagged
    frames still pass, with the real nftables rules."""
    net = backend(rules=nft)
    sw = dataclasses.replace(switch("foreign", SwitchType.EXTERNAL), adapter="hx0")
    await net.ensure_switch(sw)
    wire = Wire(physical_ns, "px0")
    vms = [await open_vm(net, p) for p in (
        port(sw, 2, ACCESS10), port(sw, 4, Vlan()),
        port(sw, 1, Vlan(VlanMode.TRUNK, allowed=(10, 30))))]
    a10, untagged, trunk = vms
    host = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    host.bind((sw.bridge, 0))
    try:
        inner = frame(wire.mac, b"qinq99", 10)
        wire.send(frame(wire.mac, b"foreign99", 99))
        wire.send(inner[:12] + b"\x88\xa8\x00\x63" + inner[12:])
        host.send(frame(bytes.fromhex("020000770002"), b"host99", 99))
        # Sentinels after them along the same paths: VLANs in use, then untagged.
        deliver(wire, frame(wire.mac, b"down10", 10), b"down10", {a10: None, trunk: 10})
        deliver(wire, frame(wire.mac, b"down30", 30), b"down30", {trunk: 30})
        deliver(wire, frame(wire.mac, b"plain"), b"plain", {untagged: None, trunk: None})
        host.send(frame(bytes.fromhex("020000770002"), b"hostplain"))
        deliver(wire, frame(wire.mac, b"plain2"), b"plain2", {untagged: None, trunk: None})
        assert untagged.saw(b"hostplain") == {None}
        leaks = [(vm.plan.vm_name, marker, vm.saw(marker)) for vm in vms
                 for marker in (b"foreign99", b"qinq99", b"host99") if vm.saw(marker)]
        assert not leaks, leaks
        assert _tagged_drops(untagged.plan.tap) >= 3 and _tagged_drops(trunk.plan.tap) >= 3
        assert _tagged_drops(a10.plan.tap) == 0
    finally:
        host.close()
        for vm in vms:
            await net.close_port(vm.plan.tap, TABLE)
            os.close(vm.fd)
    await net.remove_switch(sw)
    await net.cleanup(TABLE, keep=set())
    assert await our_links_all() == []


def main() -> None:
    name = sys.argv[1]
    asyncio.run(SCENARIOS[name](*sys.argv[2:]))
    print(f"scenario {name}: ok")


if __name__ == "__main__":
    main()
