"""Links, bridges, taps, addresses and routes, over netlink (pyroute2).

Contract: every coroutine here opens its own netlink socket (pyroute2's sync
``IPRoute``, in a worker thread: it runs its own event loop) in the namespace of the
calling process, does one small job and closes it. Deletes are idempotent (a missing
link is not an error). Kernel failures become :class:`~hvstack.errors.HypervisorError`
saying what failed; a missing privilege says CAP_NET_ADMIN is needed.

Bridges are made with STP off and forward delay 0 (ports forward at once) and without
VLAN filtering (:mod:`.vlans` keeps one bridge per VLAN, on every kernel). Taps come
from ``/dev/net/tun`` (tap, no packet info, vnet header, not persistent): the tap
lives while some process holds the descriptor.

Pure helpers (capabilities, which routes and addresses move with an external
adapter, host networks) are unit-tested without a kernel. VLANs are in :mod:`.vlans`.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import ipaddress
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from hvstack.errors import Conflict, HypervisorError

T = TypeVar("T")

CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_BPF = 12, 21, 39
PRIVILEGE_MESSAGE = ("managing virtual switches needs CAP_NET_ADMIN and CAP_BPF (run the "
                     "host service as root or grant it CAP_NET_ADMIN and CAP_BPF: every "
                     "port's VLAN tags are policed by an eBPF program); user-mode NAT "
                     "adapters keep working without them")
TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000
IFF_UP, IFF_LOOPBACK = 0x1, 0x8
AF_INET, AF_INET6 = 2, 10
RT_TABLE_LOCAL = 255
RTPROT_KERNEL, RTPROT_RA = 2, 9
RT_SCOPE_UNIVERSE = 0
IFA_F_PERMANENT = 0x80


# -- privilege ----------------------------------------------------------------------

def effective_caps(status: str) -> int:
    """The CapEff bit set from the text of ``/proc/<pid>/status`` (0 when absent)."""
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            return int(line.split(":", 1)[1].strip(), 16)
    return 0


def missing_privilege(status_path: Path = Path("/proc/self/status")) -> str | None:
    """None when this process has CAP_NET_ADMIN and may load eBPF programs (CAP_BPF,
    or CAP_SYS_ADMIN), else the message for the user."""
    try:
        caps = effective_caps(status_path.read_text())
    except OSError:
        caps = 0
    bpf = caps & (1 << CAP_BPF | 1 << CAP_SYS_ADMIN)
    return None if caps & (1 << CAP_NET_ADMIN) and bpf else PRIVILEGE_MESSAGE


# -- pure helpers -------------------------------------------------------------------

def stable_mac(name: str) -> str:
    """A locally administered unicast MAC derived from ``name``: a bridge keeps one
    address whatever ports come and go (else it takes the lowest port's)."""
    raw = bytearray(hashlib.sha256(b"hvstack-mac\0" + name.encode()).digest()[:6])
    raw[0] = (raw[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in raw)


@dataclass(frozen=True)
class Address:
    family: int
    address: str
    prefixlen: int

    @property
    def interface(self) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
        return ipaddress.ip_interface(f"{self.address}/{self.prefixlen}")


@dataclass(frozen=True)
class Route:
    family: int
    dst: str  # "" for a default route
    dst_len: int
    gateway: str | None
    priority: int | None
    table: int
    proto: int
    scope: int
    prefsrc: str | None

    @property
    def network(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        zero = "0.0.0.0" if self.family == AF_INET else "::"
        return ipaddress.ip_network(f"{self.dst or zero}/{self.dst_len}", strict=False)


def movable_route(route: Route) -> bool:
    """Whether an external adapter's route moves to the bridge: set by the admin or a
    DHCP client (not made by the kernel for an address, not learnt from an RA)."""
    return (route.table != RT_TABLE_LOCAL and route.proto not in (RTPROT_KERNEL, RTPROT_RA)
            and route.family in (AF_INET, AF_INET6))


def movable_address(family: int, scope: int, flags: int) -> bool:
    """Global IPv4 and IPv6 addresses move; IPv6 SLAAC ones are remade by the bridge
    (same MAC, same router advertisements)."""
    if scope != RT_SCOPE_UNIVERSE:
        return False
    return family == AF_INET or (family == AF_INET6 and bool(flags & IFA_F_PERMANENT))


def host_networks(addresses: Iterable[Address], routes: Iterable[Route]
                  ) -> list[ipaddress.IPv4Network]:
    """IPv4 networks the host has an address in or a route to (not the default route)."""
    nets = {ipaddress.IPv4Network(a.interface.network) for a in addresses
            if a.family == AF_INET}
    nets |= {ipaddress.IPv4Network(r.network) for r in routes
             if r.family == AF_INET and r.table != RT_TABLE_LOCAL and r.dst_len > 0}
    return sorted(nets)


# -- netlink plumbing ---------------------------------------------------------------

class LinkMissing(HypervisorError):
    """An interface named in a request does not exist (internal to the backend)."""


def failure(what: str, exc: NetlinkError | OSError) -> HypervisorError:
    code = exc.code if isinstance(exc, NetlinkError) else exc.errno
    if code in (errno.EPERM, errno.EACCES):
        return HypervisorError(f"{what}: not permitted; {PRIVILEGE_MESSAGE}")
    return HypervisorError(f"{what}: {os.strerror(code) if code else exc}")


async def run(job: Callable[[Any], T]) -> T:
    """``job(ipr)`` in a worker thread with a fresh IPRoute; a kernel error the job did
    not map itself becomes a HypervisorError."""
    def work() -> T:
        try:
            with IPRoute() as ipr:
                return job(ipr)
        except (NetlinkError, OSError) as exc:
            raise failure("a network configuration request", exc) from exc
    return await asyncio.to_thread(work)


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    kind: str | None
    master: int | None
    mac: str
    flags: int
    alias: str | None = None

    @property
    def up(self) -> bool:
        return bool(self.flags & IFF_UP)

    @property
    def loopback(self) -> bool:
        return bool(self.flags & IFF_LOOPBACK)


def link_of(msg: Any) -> Link:
    return Link(msg["index"], msg.get("ifname"), msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND"),
                msg.get("master") or None, msg.get("address") or "", msg["flags"],
                msg.get("ifalias") or None)


def find(ipr: Any, name: str) -> Link | None:
    found = ipr.link_lookup(ifname=name)
    if not found:
        return None
    return link_of(ipr.link("get", index=found[0])[0])


def need(ipr: Any, name: str) -> Link:
    link = find(ipr, name)
    if link is None:
        raise LinkMissing(f"interface {name} does not exist", interface=name)
    return link


def name_of(ipr: Any, index: int | None) -> str | None:
    if not index:
        return None
    found = ipr.link("get", index=index)
    return str(found[0].get("ifname")) if found else None


def links(ipr: Any) -> list[Link]:
    return [link_of(m) for m in ipr.link("dump")]


def set_up(ipr: Any, name: str, up: bool = True) -> None:
    ipr.link("set", index=need(ipr, name).index, state="up" if up else "down")


def delete(ipr: Any, name: str) -> None:
    link = find(ipr, name)
    if link is None:
        return
    try:
        ipr.link("del", index=link.index)
    except NetlinkError as exc:
        if exc.code != errno.ENODEV:
            raise failure(f"deleting {name}", exc) from exc


def ensure_bridge(ipr: Any, name: str, mac: str | None = None) -> bool:
    """Make bridge ``name`` (if missing) and set it up; True when it was made."""
    existing = find(ipr, name)
    if existing is not None:
        if existing.kind != "bridge":
            raise Conflict(f"interface {name} exists and is not a bridge", interface=name)
        if not existing.up:
            set_up(ipr, name)
        return False
    spec = {"ifname": name, "kind": "bridge", "br_stp_state": 0, "br_forward_delay": 0,
            "address": mac or stable_mac(name)}
    try:
        ipr.link("add", **spec)
        set_up(ipr, name)
    except NetlinkError as exc:
        delete(ipr, name)
        raise failure(f"creating bridge {name}", exc) from exc
    return True


# -- taps ---------------------------------------------------------------------------

def open_tap(name: str) -> int:
    """A new tap ``name`` (vnet header on); the descriptor is close-on-exec (pass it on
    with ``pass_fds``)."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        ifr = struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
        fcntl.ioctl(fd, TUNSETIFF, ifr)
    except OSError as exc:
        os.close(fd)
        if exc.errno == errno.EBUSY:
            raise Conflict(f"tap {name} exists and is in use", interface=name) from exc
        raise failure(f"creating tap {name}", exc) from exc
    return fd


def attach(ipr: Any, port: str, bridge: str | None) -> None:
    """Enslave ``port`` to ``bridge`` and set it up, or (None) free it and set it down."""
    link = need(ipr, port)
    try:
        if bridge is None:
            ipr.link("set", index=link.index, master=0, state="down")
        else:
            ipr.link("set", index=link.index, master=need(ipr, bridge).index, state="up")
    except NetlinkError as exc:
        raise failure(f"attaching {port} to {bridge or 'nothing'}", exc) from exc


# -- addresses and routes -----------------------------------------------------------

def addresses(ipr: Any, name: str | None = None, *, movable_only: bool = False
              ) -> list[Address]:
    query = {} if name is None else {"index": need(ipr, name).index}
    found = []
    for msg in ipr.addr("dump", **query):
        flags = msg.get("IFA_FLAGS") or msg.get("flags") or 0
        if movable_only and not movable_address(msg["family"], msg["scope"], flags):
            continue
        found.append(Address(msg["family"], msg.get("address"), msg["prefixlen"]))
    return found


def routes(ipr: Any, name: str | None = None) -> list[Route]:
    query = {} if name is None else {"oif": need(ipr, name).index}
    found = []
    for family in (AF_INET, AF_INET6):
        for msg in ipr.route("dump", family=family, **query):
            if msg.get("multipath"):
                continue  # never ours to move: its next hops name several devices
            found.append(Route(msg["family"], msg.get("dst") or "", msg["dst_len"],
                               msg.get("gateway"), msg.get("priority"), msg.get("table"),
                               msg["proto"], msg["scope"], msg.get("prefsrc")))
    return found


def add_address(ipr: Any, name: str, address: Address) -> None:
    try:
        ipr.addr("add", index=need(ipr, name).index, address=address.address,
                 prefixlen=address.prefixlen)
    except NetlinkError as exc:
        if exc.code != errno.EEXIST:
            raise failure(f"adding {address.interface} to {name}", exc) from exc


def del_address(ipr: Any, name: str, address: Address) -> None:
    try:
        ipr.addr("del", index=need(ipr, name).index, address=address.address,
                 prefixlen=address.prefixlen)
    except NetlinkError as exc:
        if exc.code not in (errno.EADDRNOTAVAIL, errno.ENOENT, errno.ENODEV):
            raise failure(f"removing {address.interface} from {name}", exc) from exc


def replace_route(ipr: Any, name: str, route: Route) -> None:
    """Point ``route`` at ``name`` (replacing the same route through another device)."""
    spec: dict[str, Any] = {"dst": str(route.network), "oif": need(ipr, name).index,
                            "table": route.table, "proto": route.proto, "scope": route.scope,
                            "family": route.family}
    for key, value in (("gateway", route.gateway), ("priority", route.priority),
                       ("prefsrc", route.prefsrc)):
        if value is not None:
            spec[key] = value
    try:
        ipr.route("replace", **spec)
    except NetlinkError as exc:
        raise failure(f"moving route {route.network} to {name}", exc) from exc


def write_sysctl(path: Path, value: str, *, missing_ok: bool = False) -> None:
    """A sysctl of this process's network namespace (``path`` under /proc/sys/net);
    ``missing_ok``: a knob the kernel lacks (IPv6 off) is left alone."""
    try:
        if path.read_text().strip() != value:
            path.write_text(value + "\n")
    except FileNotFoundError as exc:
        if not missing_ok:
            raise failure(f"setting {path}", exc) from exc
    except OSError as exc:
        raise failure(f"setting {path}", exc) from exc


def set_single_address(ipr: Any, name: str, wanted: ipaddress.IPv4Interface) -> None:
    """Give ``name`` exactly ``wanted`` among its IPv4 addresses."""
    for old in addresses(ipr, name):
        if old.family == AF_INET and old.interface != wanted:
            del_address(ipr, name, old)
    add_address(ipr, name, Address(AF_INET, str(wanted.ip), wanted.network.prefixlen))
