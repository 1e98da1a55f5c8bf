"""Switches and port settings, as the user gives them and the store keeps them.

Pure: parsing and validation of MACs, VLAN ids, rates, ACL remotes and NAT mappings,
and the JSON form of each model. Nothing here touches the host. Bad input raises
:class:`~hvstack.errors.InvalidInput` with a message that says what would be valid.

Rates are bits per second (``parse_rate("100M")`` is 100,000,000: network rates are
decimal, unlike sizes). A port's ``bandwidth_min`` is its share under contention,
Hyper-V's minimum bandwidth in absolute mode.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import re
from dataclasses import dataclass
from typing import Any

from hvstack.errors import InvalidInput

VLAN_MIN, VLAN_MAX = 1, 4094
MAX_RATE = 400 * 10**9  # bits/s: faster than any adapter a host has today


class SwitchType(enum.StrEnum):
    EXTERNAL = "external"  # bridges a host interface: VMs reach the physical network
    INTERNAL = "internal"  # VMs and the host
    PRIVATE = "private"  # VMs only
    NAT = "nat"  # internal, plus masquerading, DHCP and DNS (Hyper-V's Default Switch)


class NatProtocol(enum.StrEnum):
    TCP = "tcp"
    UDP = "udp"


@dataclass(frozen=True)
class NatMapping:
    """A static port mapping of a NAT switch (Hyper-V's Add-NetNatStaticMapping)."""

    protocol: NatProtocol
    external_port: int
    internal_ip: str
    internal_port: int


@dataclass(frozen=True)
class Switch:
    """A virtual switch. ``subnet`` (CIDR) and ``host_address`` (interface form,
    ``192.168.100.1/24``) are set for internal and NAT switches, ``adapter`` for an
    external one; ``default`` marks the host's Default Switch."""

    id: str
    name: str
    type: SwitchType
    adapter: str | None = None
    subnet: str | None = None
    host_address: str | None = None
    mappings: tuple[NatMapping, ...] = ()
    notes: str = ""
    default: bool = False

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_json(raw: dict[str, Any]) -> Switch:
        return Switch(
            raw["id"], raw["name"], SwitchType(raw["type"]), raw.get("adapter"),
            raw.get("subnet"), raw.get("host_address"),
            tuple(NatMapping(NatProtocol(m["protocol"]), m["external_port"], m["internal_ip"],
                             m["internal_port"]) for m in raw.get("mappings", ())),
            raw.get("notes", ""), raw.get("default", False),
        )


class VlanMode(enum.StrEnum):
    UNTAGGED = "untagged"  # no VLAN set: the switch's default VLAN
    ACCESS = "access"  # the VM's frames are untagged and belong to ``access_id``
    TRUNK = "trunk"  # the VM sends and receives tags for ``allowed``; ``native`` untagged


@dataclass(frozen=True)
class Vlan:
    mode: VlanMode = VlanMode.UNTAGGED
    access_id: int | None = None
    allowed: tuple[int, ...] = ()
    native: int | None = None

    def __post_init__(self) -> None:
        ids = [i for i in (self.access_id, self.native, *self.allowed) if i is not None]
        for vid in ids:
            check_vlan_id(vid)
        if self.mode is VlanMode.ACCESS and self.access_id is None:
            raise InvalidInput("access mode needs a VLAN id")
        if self.mode is VlanMode.TRUNK and not self.allowed:
            raise InvalidInput("trunk mode needs at least one allowed VLAN id")
        if self.mode is not VlanMode.ACCESS and self.access_id is not None:
            raise InvalidInput("a VLAN id is given only in access mode")
        if self.mode is not VlanMode.TRUNK and (self.allowed or self.native is not None):
            raise InvalidInput("allowed and native VLANs are given only in trunk mode")


class AclDirection(enum.StrEnum):
    INBOUND = "inbound"  # to the VM
    OUTBOUND = "outbound"  # from the VM
    BOTH = "both"


class AclAction(enum.StrEnum):
    ALLOW = "allow"
    DENY = "deny"


@dataclass(frozen=True)
class PortAcl:
    """Allow or deny traffic to or from ``remote``: an IP prefix (v4 or v6; a bare
    address is a /32 or /128) or a MAC address.

    As Hyper-V's port ACLs, per direction: of the ACLs that match a frame, the most
    specific decides (a longer prefix beats a shorter one; a MAC ACL beats every IP
    prefix); between an allow and a deny equally specific, the deny wins; what no ACL
    matches passes. So "deny 0.0.0.0/0, allow 10.0.0.0/8" lets only 10/8 through. An
    IPv4 prefix matches IPv4 packets only (``0.0.0.0/0`` is not IPv6; ``::/0`` is all
    of IPv6), and address resolution (ARP, IPv6 neighbour solicitations and
    advertisements) passes IP prefixes, so allowed remotes stay resolvable; a MAC ACL
    applies to every frame."""

    action: AclAction
    direction: AclDirection
    remote: str

    @property
    def is_mac(self) -> bool:
        return ":" in self.remote and _MAC.match(self.remote) is not None


class MirrorMode(enum.StrEnum):
    NONE = "none"
    SOURCE = "source"  # this port's traffic is copied to the switch's destination port
    DESTINATION = "destination"  # receives the copies (one per switch)


@dataclass(frozen=True)
class PortSettings:
    """Hyper-V's per-port settings. ``mac_spoofing`` False is the protection on (the
    default): the VM may send only from its own MAC. Rates in bits per second."""

    vlan: Vlan = Vlan()
    mac_spoofing: bool = False
    dhcp_guard: bool = False
    router_guard: bool = False
    acls: tuple[PortAcl, ...] = ()
    bandwidth_max: int | None = None
    bandwidth_min: int | None = None
    mirror: MirrorMode = MirrorMode.NONE

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_json(raw: dict[str, Any] | None) -> PortSettings:
        if not raw:
            return PortSettings()
        vlan = raw.get("vlan") or {}
        return PortSettings(
            Vlan(VlanMode(vlan.get("mode", "untagged")), vlan.get("access_id"),
                 tuple(vlan.get("allowed", ())), vlan.get("native")),
            raw.get("mac_spoofing", False), raw.get("dhcp_guard", False),
            raw.get("router_guard", False),
            tuple(PortAcl(AclAction(a["action"]), AclDirection(a["direction"]), a["remote"])
                  for a in raw.get("acls", ())),
            raw.get("bandwidth_max"), raw.get("bandwidth_min"),
            MirrorMode(raw.get("mirror", "none")),
        )


# -- parsing and validation -------------------------------------------------------

_MAC = re.compile(r"^([0-9a-f]{2}[:-]){5}[0-9a-f]{2}$", re.IGNORECASE)
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:bit|bps|b)?(?:/s)?\s*$", re.IGNORECASE)
_RATE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_mac(text: str) -> str:
    """The MAC ``text`` names, lower case with colons; refuses multicast and zero MACs
    (a NIC's own address must be unicast)."""
    if not _MAC.match(text.strip()):
        raise InvalidInput(f"MAC address '{text}' is not six hex pairs such as "
                           "52:54:00:12:34:56", value=text)
    mac = text.strip().lower().replace("-", ":")
    if int(mac[:2], 16) & 1:
        raise InvalidInput(f"MAC address '{text}' is a multicast address; a network "
                           "adapter needs a unicast one", value=text)
    if mac == "00:00:00:00:00:00":
        raise InvalidInput("MAC address 00:00:00:00:00:00 is not usable", value=text)
    return mac


def check_vlan_id(vid: int) -> int:
    if isinstance(vid, bool) or not isinstance(vid, int) or not VLAN_MIN <= vid <= VLAN_MAX:
        raise InvalidInput(f"VLAN id {vid} is outside {VLAN_MIN}-{VLAN_MAX}", value=str(vid))
    return vid


def parse_vlan_list(text: str) -> tuple[int, ...]:
    """``"10,20,100-105"`` as sorted VLAN ids."""
    ids: set[int] = set()
    for part in text.split(","):
        low, dash, high = part.strip().partition("-")
        try:
            first, last = int(low), int(high) if dash else int(low)
        except ValueError:
            raise InvalidInput(f"VLAN list '{text}' is not ids and ranges such as "
                               "10,20,100-105", value=text) from None
        if first > last:
            raise InvalidInput(f"VLAN range {part.strip()} runs backwards", value=text)
        ids |= {check_vlan_id(v) for v in (first, last)} | set(range(first, last + 1))
    return tuple(sorted(ids))


def parse_rate(text: str | int, *, what: str = "rate") -> int:
    """Bits per second from ``"100M"``, ``"1.5Gbit"``, ``"500kbps"`` or a plain number
    (decimal multiples, as network rates are given)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = _RATE.match(str(text))
        if not match:
            raise InvalidInput(f"{what} '{text}' is not a rate such as 100M, 1G or "
                               "500kbit (bits per second)", value=str(text))
        number, unit = match.groups()
        value = int(float(number) * _RATE_UNITS[unit.lower()])
    if not 1000 <= value <= MAX_RATE:
        raise InvalidInput(f"{what} '{text}' is outside 1kbit-400Gbit", value=str(text))
    return value


def parse_acl_remote(text: str) -> str:
    """An ACL's remote: a MAC or an IP prefix, normalised (``10.1.2.3/8`` is refused:
    host bits set)."""
    if _MAC.match(text.strip()):
        return text.strip().lower().replace("-", ":")
    try:
        return str(ipaddress.ip_network(text.strip(), strict=True))
    except ValueError as exc:
        raise InvalidInput(f"ACL remote '{text}' is neither a MAC address nor an IP "
                           f"prefix: {exc}", value=text) from None


def parse_subnet(text: str) -> ipaddress.IPv4Network:
    """An IPv4 subnet for an internal or NAT switch, /8 to /29."""
    try:
        net = ipaddress.IPv4Network(text.strip(), strict=True)
    except ValueError as exc:
        raise InvalidInput(f"subnet '{text}' is not an IPv4 prefix such as "
                           f"192.168.100.0/24: {exc}", value=text) from None
    if not 8 <= net.prefixlen <= 29:
        raise InvalidInput(f"subnet '{text}' must be between /8 and /29", value=text)
    return net


def check_port(port: int, *, what: str = "port") -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise InvalidInput(f"{what} {port} is outside 1-65535", value=str(port))
    return port
