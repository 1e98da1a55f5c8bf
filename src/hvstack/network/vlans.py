"""Attaching a port to its switch, with VLANs: one bridge per (switch, VLAN), and
trunks through tc eBPF programs (:mod:`.trunks`). One code path on every kernel:
bridges never use VLAN filtering (``CONFIG_BRIDGE_VLAN_FILTERING``, 802.1Q and tc's
``vlan`` action are missing from many host kernels, this project's CI among them), so
what the tests exercise is what runs.

* VLAN 1 is the switch's own bridge: untagged ports and access ports of VLAN 1 join it,
  as does the host's address on an internal or NAT switch.
* An access port of VLAN X > 1 joins the VLAN bridge of (switch, X); ports of one VLAN
  reach each other and no other VLAN's.
* Every port's ingress runs :func:`.bpf.trunk_ingress`: a frame the VM tags with a VLAN
  the port does not carry is dropped, a tag of its own (native) VLAN is popped, so no VM
  reaches another VLAN by tagging (as bridge VLAN filtering would enforce).
* A trunk port joins the bridge of its native VLAN (Hyper-V's NativeVlanId: the VLAN of
  the frames the VM sends and receives untagged; unset means VLAN 1, the switch's
  default network) and carries each other allowed VLAN tagged (:mod:`.trunks`). A frame
  tagged with the native id (or a priority tag) is taken as native; a tag not allowed
  is dropped.
* An external switch's adapter is a trunk of every VLAN in use on the switch (a VLAN
  bridge with a port other than the adapter's own veth) with VLAN 1 native, so access
  and trunk ports of an external switch reach the physical network tagged. Tagged
  frames of other VLANs from the physical network pass untouched (they may be the
  host's own, for a VLAN interface on the adapter); every port's nftables chain drops
  a tagged frame the bridge would send it (:data:`.nft.TAGGED`), so none reaches a VM.

A VLAN bridge is named like its switch's (``hvb<tag>`` and 7 hex digits of a hash of
the switch's bridge and the id: never a switch bridge's name, which has 6), carries
``<bridge>.<vid>`` as its alias, has no host address (IPv6 off, no ARP answers) and
is deleted once its last port has left. Sync: runs in a netlink worker thread, under
one lock (a new VLAN bridge is never pruned before its first port has joined).
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from pathlib import Path
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from hvstack.errors import HvError
from hvstack.network import bpf, netlink, trunks
from hvstack.network.backend import PortPlan
from hvstack.network.model import VLAN_MIN, Vlan, VlanMode
from hvstack.network.names import is_ours, veth_names
from hvstack.network.netlink import Link

log = logging.getLogger(__name__)
_lock = threading.Lock()
_ALIAS = re.compile(r"^(hvb[0-9a-f]+)\.(\d+)$")


def vlan_bridge_name(bridge: str, vid: int) -> str:
    digest = hashlib.sha256("\0".join(("vlan", bridge, str(vid))).encode()).hexdigest()
    return f"{bridge[:-6]}{digest[:7]}"


def parent_of(link: Link) -> str | None:
    """The switch bridge of a VLAN bridge, None for any other link."""
    match = _ALIAS.match(link.alias or "") if link.kind == "bridge" else None
    return match.group(1) if match else None


def layout(vlan: Vlan) -> tuple[int, tuple[int, ...]]:
    """A port's native VLAN (its bridge's) and the VLANs it carries tagged."""
    if vlan.mode is VlanMode.ACCESS:
        assert vlan.access_id is not None
        return vlan.access_id, ()
    if vlan.mode is VlanMode.TRUNK:
        native = vlan.native or VLAN_MIN
        return native, tuple(v for v in sorted(vlan.allowed) if v != native)
    return VLAN_MIN, ()


def attach_port(ipr: Any, plan: PortPlan, proc_sys: Path) -> str | None:
    """Attach ``plan.tap`` as planned; the bridge it joined (None: disconnected). On
    failure no VLAN bridge or veth made for it is left (:func:`trunks.sync`)."""
    tag = plan.tap[3:-7]
    with _lock:
        try:
            if plan.bridge is None:
                trunks.clear(ipr, tag, plan.tap)
                netlink.attach(ipr, plan.tap, None)
                return None
            native, carried = layout(plan.settings.vlan)
            target = bridge_of(ipr, plan.bridge, native, proc_sys)
            netlink.attach(ipr, plan.tap, target)
            # Every port polices the tags its VM sends (an access or untagged port is a
            # trunk carrying nothing but its native VLAN): no VLAN hopping.
            trunks.sync(ipr, tag, plan.tap, native,
                        {vid: bridge_of(ipr, plan.bridge, vid, proc_sys) for vid in carried},
                        proc_sys)
            return target
        finally:
            _prune(ipr, tag, None, empty_only=True, proc_sys=proc_sys, strict=plan.bridge)


def bridge_of(ipr: Any, bridge: str, vid: int, proc_sys: Path) -> str:
    """The bridge of VLAN ``vid`` of the switch ``bridge`` (made when missing)."""
    if vid == VLAN_MIN:
        return bridge  # the default VLAN
    name = vlan_bridge_name(bridge, vid)
    if netlink.ensure_bridge(ipr, name):
        ipr.link("set", index=netlink.need(ipr, name).index, ifalias=f"{bridge}.{vid}")
        netlink.write_sysctl(proc_sys / "ipv6/conf" / name / "disable_ipv6", "1",
                             missing_ok=True)
        netlink.write_sysctl(proc_sys / "ipv4/conf" / name / "arp_ignore", "8")
    return name


def prune(ipr: Any, tag: str, parent: str | None = None, *, empty_only: bool = True,
          proc_sys: Path = Path("/proc/sys/net")) -> None:
    """Delete the service ``tag``'s VLAN bridges without ports (of ``parent``, or of any
    switch) and the trunk pairs left without their trunk or bridge; external adapters
    then carry the VLANs still in use. With ``empty_only`` False, every VLAN bridge of
    ``parent`` goes (its switch is going)."""
    with _lock:
        _prune(ipr, tag, parent, empty_only=empty_only, proc_sys=proc_sys)


def _prune(ipr: Any, tag: str, parent: str | None, *, empty_only: bool,
           proc_sys: Path = Path("/proc/sys/net"), strict: str | None = None) -> None:
    if not empty_only:
        for link in _vlan_bridges(netlink.links(ipr), tag, parent):
            netlink.delete(ipr, link.name)
    trunks.stale_veths(ipr, tag)
    _sync_uplinks(ipr, tag, proc_sys, strict)
    links = netlink.links(ipr)
    used = {link.master for link in links if link.master}
    for link in _vlan_bridges(links, tag, parent):
        if link.index not in used:
            netlink.delete(ipr, link.name)
    trunks.stale_veths(ipr, tag)


def _vlan_bridges(links: list[Link], tag: str, parent: str | None) -> list[Link]:
    """This service's VLAN bridges (of ``parent`` only, if given)."""
    return [link for link in links if link.name.startswith(f"hvb{tag}")
            and parent_of(link) is not None and parent in (None, parent_of(link))]


def uplink_of(links: list[Link], tag: str, bridge: Link) -> Link | None:
    """An external switch's adapter: the port not ours whose MAC the bridge wears."""
    for link in links:
        if link.master == bridge.index and link.mac == bridge.mac \
                and not is_ours(tag, link.name):
            return link
    return None


def _sync_uplinks(ipr: Any, tag: str, proc_sys: Path, strict: str | None) -> None:
    """Each external adapter of the service carries exactly the VLANs in use. A failure
    is raised for the switch ``strict`` (the one a port is joining), logged for others
    (closing a port elsewhere must not fail for it)."""
    links = netlink.links(ipr)
    for bridge in links:
        if bridge.kind != "bridge" or not bridge.name.startswith(f"hvb{tag}") \
                or parent_of(bridge) is not None:
            continue
        adapter = uplink_of(links, tag, bridge)
        if adapter is None:
            continue
        in_use = {}
        for vlan_bridge in _vlan_bridges(links, tag, bridge.name):
            vid = int((vlan_bridge.alias or "").rsplit(".", 1)[1])
            own = veth_names(tag, adapter.name, vid)[0]
            if any(link.master == vlan_bridge.index and link.name != own for link in links):
                in_use[vid] = vlan_bridge.name
        try:
            if in_use:
                trunks.sync(ipr, tag, adapter.name, VLAN_MIN, in_use, proc_sys,
                            others=bpf.TC_ACT_OK)
            else:
                trunks.clear(ipr, tag, adapter.name)
        except (HvError, NetlinkError, OSError) as exc:
            if bridge.name == strict:
                raise
            log.error("external adapter %s: carrying the VLANs in use: %s", adapter.name, exc)


def release_uplink(ipr: Any, tag: str, adapter: str) -> None:
    """An adapter leaving its external switch carries no VLANs any more."""
    with _lock:
        trunks.clear(ipr, tag, adapter)


def switch_of(ipr: Any, master: int | None) -> str | None:
    """The name of the switch bridge behind a port's master (a VLAN bridge's parent)."""
    if not master:
        return None
    found = ipr.link("get", index=master)
    if not found:
        return None
    link = netlink.link_of(found[0])
    return parent_of(link) or link.name
