"""Requests and views of virtual switches and VM network adapters (pydantic).

Rates are bits per second, as a number or text such as ``100M`` (decimal); 0 removes
a limit. A VLAN list is ids and ranges (``"10,20,100-105"``) or a list of ids.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from hvstack.api.schemas import Request

SwitchKind = Literal["external", "internal", "private", "nat"]
Rate = int | str


class SwitchCreate(Request):
    name: str
    type: SwitchKind
    adapter: str | None = None  # external: the host interface bridged
    subnet: str | None = None  # internal, NAT (NAT: default chosen like the Default Switch's)
    host_address: str | None = None  # default: the subnet's first address
    notes: str = ""


class SwitchUpdate(Request):
    name: str | None = None
    notes: str | None = None
    host_address: str | None = None


class NatMappingBody(Request):
    protocol: Literal["tcp", "udp"]
    external_port: int
    internal_ip: str
    internal_port: int


class NatMappingView(BaseModel):
    protocol: str
    external_port: int
    internal_ip: str
    internal_port: int


class SwitchPortView(BaseModel):
    vm: str
    vm_id: str
    mac: str
    vlan: str
    tap: str


class SwitchView(BaseModel):
    id: str
    name: str
    type: str
    adapter: str | None
    subnet: str | None
    host_address: str | None
    dhcp_range: list[str] | None
    mappings: list[NatMappingView]
    notes: str
    default: bool
    bridge: str
    ports: list[SwitchPortView]


class VlanBody(Request):
    mode: Literal["untagged", "access", "trunk"] = "untagged"
    access_id: int | None = None
    allowed: list[int] | str | None = None
    native: int | None = None


class AclBody(Request):
    """A port ACL (Hyper-V's Add-VMNetworkAdapterAcl). ``remote``: an IP prefix (v4 or
    v6) or a MAC. Per direction the most specific matching ACL decides (the longest
    prefix; a MAC beats any prefix; deny wins between equals); unmatched traffic
    passes. IPv4 prefixes match IPv4 only, IPv6 prefixes IPv6 only; ARP and IPv6
    neighbour solicitations and advertisements pass IP prefixes."""

    action: Literal["allow", "deny"]
    direction: Literal["inbound", "outbound", "both"]
    remote: str


class AdapterBody(Request):
    """A new adapter (every field optional: the Default Switch if there is one, else
    user-mode NAT; a MAC of the pool) or the fields of one to change."""

    switch: str | None = None  # a switch's name or id; "" = not connected
    mode: Literal["user", "switch"] | None = None
    mac: str | None = None  # an address or "dynamic"
    model: Literal["virtio", "e1000"] | None = None
    vlan: VlanBody | None = None
    mac_spoofing: bool | None = None
    dhcp_guard: bool | None = None
    router_guard: bool | None = None
    acls: list[AclBody] | None = None
    bandwidth_max: Rate | None = None
    bandwidth_min: Rate | None = None
    mirror: Literal["none", "source", "destination"] | None = None
