"""Port settings end to end, with three real tiny guests under TCG on one internal
switch: maximum bandwidth, port mirroring, an ACL, the MAC spoofing, DHCP and router
guards, and VLANs (access and trunk). The guests boot once for the module and get
static addresses (192.168.70.11-13; the host is .1); each test changes port settings
with ``hv vm nic set`` and checks what guests (and the host) see.

The only timing asserted is the bandwidth cap (within 20 %, as the issue asks).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.hostproc import Guest, HostProcess
from tests.integration.netns import Namespace, TcpService, lab, wait_until
from tests.integration.switching import (
    boot,
    create_vm,
    host_in_namespace,
    ifname,
    mac_on,
    no_ping,
    pings,
    rx_packets,
    static,
    wait_ping,
)

pytestmark = pytest.mark.integration

NET = "192.168.70"
HOST_IP = f"{NET}.1"
IPS = {"pa": f"{NET}.11", "pb": f"{NET}.12", "pc": f"{NET}.13"}
CAP = 10_000_000  # bits/s
CAP_BYTES = 9_000_000  # about 7 s at the cap


@dataclass
class Setup:
    host: HostProcess
    space: Namespace
    tmp: Path
    guests: dict[str, Guest]
    macs: dict[str, str]
    ifs: dict[str, str]

    def nic(self, vm: str, *flags: str) -> None:
        """Change the port settings of ``vm``'s adapter on the switch."""
        self.host.ok("vm", "nic", "set", vm, self.macs[vm], *flags)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, tiny_image: Path) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("switches-ports")
    with lab() as made, host_in_namespace(made, tmp, tiny_image) as (host, space):
        host.ok("switch", "create", "sw", "--type", "internal", "--subnet", f"{NET}.0/24")
        for name in IPS:
            create_vm(host, name, "sw")
        guests = boot(host, *IPS)
        macs = {name: mac_on(host, name, "sw") for name in IPS}
        ifs = {name: ifname(guests[name], macs[name]) for name in IPS}
        for name, guest in guests.items():
            static(guest, ifs[name], f"{IPS[name]}/24")
        for guest in guests.values():
            wait_ping(guest, HOST_IP)
        yield Setup(host, space, tmp, guests, macs, ifs)


def test_maximum_bandwidth_holds_both_ways(setup: Setup) -> None:
    """A bulk transfer each way, with and without a 10 Mbit/s cap: from the VM, the
    host's sink measures the steady rate (after the first 2 s: the policer's bucket
    lets a start-up burst through); to the VM, the guest times a download (wget)."""
    a, a_if = setup.guests["pa"], setup.ifs["pa"]
    TcpService(setup.space, HOST_IP, 5001, "sink", setup.tmp)
    TcpService(setup.space, HOST_IP, 5002, "http", setup.tmp, nbytes=CAP_BYTES)

    def upload(capped: bool) -> float:
        out = a.ok(f"dd if=/dev/zero bs=60000 count={CAP_BYTES // 60000} 2>/dev/null "
                   f"| nc {HOST_IP} 5001", timeout=300)
        report = json.loads(out.strip().splitlines()[-1])
        assert report["bytes"] == CAP_BYTES, report
        if not capped:  # on a quiet machine it may be over before a steady phase
            return float(report["bytes"] * 8 / report["seconds"])
        assert report["steady_seconds"] > 1, report  # 9 MB at 10 Mbit/s take 7 s
        return float(report["steady_bytes"] * 8 / report["steady_seconds"])

    def download() -> float:
        out = a.ok("set -- $(cat /proc/uptime); t0=$1; "
                   f"got=$(wget -q -O - http://{HOST_IP}:5002/ | wc -c); "
                   "set -- $(cat /proc/uptime); echo $got $t0 $1", timeout=300)
        got, began, ended = out.split()[-3:]
        assert int(got) == CAP_BYTES, out
        return CAP_BYTES * 8 / (float(ended) - float(began))

    free_up, free_down = upload(capped=False), download()
    setup.nic("pa", "--bandwidth-max", "10M")
    capped_up, capped_down = upload(capped=True), download()
    print(f"\nmaximum bandwidth {CAP / 1e6:g} Mbit/s on {a_if}: up {free_up / 1e6:.1f} -> "
          f"{capped_up / 1e6:.2f}, down {free_down / 1e6:.1f} -> {capped_down / 1e6:.2f}")
    assert 0.8 * CAP <= capped_up <= 1.2 * CAP
    assert 0.8 * CAP <= capped_down <= 1.2 * CAP
    setup.nic("pa", "--bandwidth-max", "0")  # 0 removes the limit


def test_mirrored_traffic_appears_on_the_destination_port(setup: Setup) -> None:
    a, c, c_if = setup.guests["pa"], setup.guests["pc"], setup.ifs["pc"]
    c.ok(f"ip link set {c_if} promisc on")
    count = 50

    def seen_by_c() -> int:
        before = rx_packets(c, c_if)
        a.ok(f"ping -c {count} -i 0.2 -W 2 {IPS['pb']}", timeout=300)
        return rx_packets(c, c_if) - before

    unmirrored = seen_by_c()
    setup.nic("pc", "--mirror", "destination")
    setup.nic("pa", "--mirror", "source")
    mirrored = seen_by_c()
    print(f"\nframes on the mirror port during {count} pings: {unmirrored} -> {mirrored}")
    # each echo request leaves A and each reply enters it: both are copied
    assert unmirrored < count // 2
    assert mirrored >= 2 * count
    setup.nic("pa", "--mirror", "none")
    setup.nic("pc", "--mirror", "none")
    c.ok(f"ip link set {c_if} promisc off")


def acl_packets(space: Namespace, prefix: str) -> int:
    """Packets matched by this service's nftables rules that name ``prefix``."""
    ruleset = space.run("nft", "list", "ruleset").stdout
    return sum(int(m) for line in ruleset.splitlines() if prefix in line
               for m in re.findall(r"counter packets (\d+)", line))


def test_acl_blocks_a_prefix_and_counts(setup: Setup) -> None:
    a, b = setup.guests["pa"], setup.guests["pb"]
    a.ok(f"ip addr add {NET[:-1]}1.11/24 dev {setup.ifs['pa']}")  # 192.168.71.11
    b.ok(f"ip addr add {NET[:-1]}1.12/24 dev {setup.ifs['pb']}")
    blocked = f"{NET[:-1]}1.0/24"
    wait_ping(a, f"{NET[:-1]}1.12")
    setup.nic("pa", "--acl", f"deny:both:{blocked}")
    assert no_ping(a, f"{NET[:-1]}1.12")
    assert pings(a, IPS["pb"]) and pings(b, IPS["pa"])
    assert acl_packets(setup.space, blocked) >= 3
    setup.nic("pa", "--no-acls")
    wait_ping(a, f"{NET[:-1]}1.12")


def flush_neighbours(*guests: tuple[Guest, str]) -> None:
    for guest, iface in guests:
        guest.ok(f"ip neigh flush dev {iface}")


def test_mac_spoofing_is_stopped_unless_allowed(setup: Setup) -> None:
    a, b, c = (setup.guests[n] for n in ("pa", "pb", "pc"))
    a_if, own = setup.ifs["pa"], setup.macs["pa"]
    spoof = "52:54:00:5e:00:42"

    def use_mac(mac: str) -> None:
        a.ok(f"ip link set {a_if} down && ip link set {a_if} address {mac} && "
             f"ip link set {a_if} up")
        flush_neighbours((a, a_if), (b, setup.ifs["pb"]))

    use_mac(spoof)
    try:
        assert no_ping(a, IPS["pb"])  # protection is on by default
        assert pings(c, IPS["pb"])  # another VM is unaffected
        setup.nic("pa", "--mac-spoofing")
        wait_ping(a, IPS["pb"])
        setup.nic("pa", "--no-mac-spoofing")
        flush_neighbours((a, a_if), (b, setup.ifs["pb"]))
        assert no_ping(a, IPS["pb"])
    finally:
        use_mac(own)
    wait_ping(a, IPS["pb"])


UDHCPD = """\
interface {iface}
start {net}.{first}
end {net}.{last}
option subnet 255.255.255.0
lease_file /var/lib/misc/udhcpd.leases
"""

LEASE_SCRIPT = "#!/bin/sh\n[ \"$1\" = bound ] && echo \"$ip\" >>/tmp/leases\nexit 0\n"


def serve_dhcp(guest: Guest, iface: str, first: int, last: int) -> None:
    config = UDHCPD.format(iface=iface, net=NET, first=first, last=last)
    guest.ok(f"killall udhcpd 2>/dev/null; rm -f /var/lib/misc/udhcpd.leases; "
             f"touch /var/lib/misc/udhcpd.leases; cat >/etc/udhcpd.conf <<'EOF'\n"
             f"{config}EOF\nudhcpd -a 100 /etc/udhcpd.conf")


def leases_offered(guest: Guest, iface: str, tries: int = 3) -> list[str]:
    """Ask for a lease ``tries`` times (udhcpc gives up after 6 unanswered
    discovers); the addresses offered, without applying them."""
    guest.ok(f"cat >/tmp/lease.sh <<'EOF'\n{LEASE_SCRIPT}EOF\nchmod +x /tmp/lease.sh; "
             "rm -f /tmp/leases")
    for _ in range(tries):
        guest.sh(f"udhcpc -n -q -f -t 6 -T 1 -i {iface} -s /tmp/lease.sh", timeout=120)
    code, out = guest.sh("cat /tmp/leases")
    return out.split() if code == 0 else []


def test_dhcp_guard_drops_a_vm_dhcp_server(setup: Setup) -> None:
    a, b, c = (setup.guests[n] for n in ("pa", "pb", "pc"))
    serve_dhcp(a, setup.ifs["pa"], 100, 109)
    try:
        got = leases_offered(b, setup.ifs["pb"], tries=1)
        assert got and all(ip.startswith(f"{NET}.10") for ip in got)  # unguarded: A serves
        setup.nic("pa", "--dhcp-guard")
        serve_dhcp(c, setup.ifs["pc"], 120, 129)  # an unguarded server in the same window
        got = leases_offered(b, setup.ifs["pb"])
        assert got and all(ip.startswith(f"{NET}.12") for ip in got), got
    finally:
        for guest in (a, c):
            guest.sh("killall udhcpd")
    setup.nic("pa", "--no-dhcp-guard")


RADVD = """\
interface {iface} {{
    AdvSendAdvert on;
    MinRtrAdvInterval 3;
    MaxRtrAdvInterval 4;
    prefix 2001:db8:{n}::/64 {{ AdvOnLink on; AdvAutonomous on; }};
}};
"""


def advertise(guest: Guest, iface: str, n: int) -> None:
    guest.ok(f"cat >/etc/radvd.conf <<'EOF'\n{RADVD.format(iface=iface, n=n)}EOF\n"
             "radvd -C /etc/radvd.conf -p /run/radvd.pid -m logfile -l /run/radvd.log")


def global_v6(guest: Guest, iface: str) -> str:
    return guest.ok(f"ip -6 addr show dev {iface} scope global")


def test_router_guard_drops_router_advertisements(setup: Setup) -> None:
    a, b, c = (setup.guests[n] for n in ("pa", "pb", "pc"))
    b_if = setup.ifs["pb"]
    advertise(a, setup.ifs["pa"], 70)
    try:
        wait_until(lambda: "2001:db8:70:" in global_v6(b, b_if),
                   what="an unguarded router advertisement never reached pb")
        a.ok("kill $(cat /run/radvd.pid)")
        b.ok(f"ip -6 addr flush dev {b_if} scope global")
        setup.nic("pa", "--router-guard")
        advertise(a, setup.ifs["pa"], 71)
        advertise(c, setup.ifs["pc"], 72)  # unguarded, started after A's: a time bound
        wait_until(lambda: "2001:db8:72:" in global_v6(b, b_if),
                   what="pc's router advertisement never reached pb")
        assert "2001:db8:71:" not in global_v6(b, b_if)
    finally:
        for guest in (a, c):
            guest.sh("kill $(cat /run/radvd.pid)")
    setup.nic("pa", "--no-router-guard")


def test_vlans_isolate_and_a_trunk_carries_both(setup: Setup) -> None:
    a, b, c = (setup.guests[n] for n in ("pa", "pb", "pc"))
    setup.nic("pa", "--vlan", "10")
    setup.nic("pb", "--vlan", "20")
    setup.nic("pc", "--vlan", "10")
    wait_ping(a, IPS["pc"])  # same VLAN
    assert no_ping(a, IPS["pb"])  # different VLANs
    assert no_ping(a, HOST_IP)  # the host's port is in the default VLAN
    # B becomes a trunk for 10 and 20 and talks to both through VLAN interfaces
    setup.nic("pb", "--trunk", "10,20")
    setup.nic("pc", "--vlan", "20")
    b_if = setup.ifs["pb"]
    static(b, b_if, "10.99.99.12/24")  # off the guests' subnet: only the VLANs carry it
    b.ok(f"ip link add link {b_if} name {b_if}.10 type vlan id 10 && "
         f"ip link add link {b_if} name {b_if}.20 type vlan id 20 && "
         f"ip addr add {NET}.112/24 dev {b_if}.10 && ip addr add 10.20.0.12/24 dev {b_if}.20 "
         f"&& ip link set {b_if}.10 up && ip link set {b_if}.20 up")
    c.ok(f"ip addr add 10.20.0.13/24 dev {setup.ifs['pc']}")
    wait_ping(b, IPS["pa"])  # VLAN 10
    wait_ping(b, "10.20.0.13")  # VLAN 20
    assert no_ping(a, IPS["pc"])  # A (10) and C (20) stay apart
