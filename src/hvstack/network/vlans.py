"""Attaching a port to its switch: bridge VLANs, and access VLANs on kernels without
bridge VLAN filtering (one bridge per VLAN).

With VLAN filtering (``CONFIG_BRIDGE_VLAN_FILTERING``) a port joins its switch's
bridge and gets its VLAN entries there. Some host kernels lack it (and 802.1Q): there
an access port of VLAN X (X > 1) joins a bridge of its own for (switch, X), so ports
of one VLAN reach each other and ports of other VLANs (and the default VLAN, where
the host's address is) do not, as with filtering. Trunk ports, and access ports of an
external switch (its uplink would need tags), need filtering and are refused with a
message saying so.

A VLAN bridge is named like its switch's (``hvb<tag>`` and 7 hex digits of a hash of
the switch's bridge and the id: never a switch bridge's name, which has 6), carries
``<bridge>.<vid>`` as its alias, has no host address (IPv6 off, no ARP answers) and
is deleted once its last port has left. Sync: runs in a netlink worker thread, under
one lock (a new VLAN bridge is never pruned before its first port has joined).
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from hvstack.errors import HypervisorError
from hvstack.network import netlink
from hvstack.network.backend import PortPlan
from hvstack.network.model import VLAN_MAX, VLAN_MIN, SwitchType, Vlan, VlanMode
from hvstack.network.netlink import Link

BRIDGE_VLAN_PVID, BRIDGE_VLAN_UNTAGGED = 0x2, 0x4
_lock = threading.Lock()
_ALIAS = re.compile(r"^(hvb[0-9a-f]+)\.(\d+)$")
_NEEDS_FILTERING = ("needs bridge VLAN filtering, which this host's kernel lacks "
                    "(CONFIG_BRIDGE_VLAN_FILTERING)")


def vlan_bridge_name(bridge: str, vid: int) -> str:
    digest = hashlib.sha256("\0".join(("vlan", bridge, str(vid))).encode()).hexdigest()
    return f"{bridge[:-6]}{digest[:7]}"


def parent_of(link: Link) -> str | None:
    """The switch bridge of a VLAN bridge, None for any other link."""
    match = _ALIAS.match(link.alias or "") if link.kind == "bridge" else None
    return match.group(1) if match else None


def vlan_entries(vlan: Vlan) -> dict[int, bool]:
    """A port's bridge VLANs as ``{vid: pvid_and_untagged}`` for ``vlan``."""
    if vlan.mode is VlanMode.ACCESS:
        assert vlan.access_id is not None
        return {vlan.access_id: True}
    if vlan.mode is VlanMode.TRUNK:
        entries = dict.fromkeys(vlan.allowed, False)
        if vlan.native is not None:
            entries[vlan.native] = True
        return entries
    return {VLAN_MIN: True}


def vid_ranges(vids: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted ids as inclusive ``(first, last)`` runs."""
    runs: list[tuple[int, int]] = []
    for vid in sorted(set(vids)):
        if runs and runs[-1][1] == vid - 1:
            runs[-1] = (runs[-1][0], vid)
        else:
            runs.append((vid, vid))
    return runs


def unwanted_ranges(keep: Iterable[int]) -> list[tuple[int, int]]:
    """Runs of every VLAN id not in ``keep`` (deleting a vid a port lacks is a no-op)."""
    return vid_ranges(set(range(VLAN_MIN, VLAN_MAX + 1)) - set(keep))


def set_port_vlans(ipr: Any, port: str, bridge: str, entries: dict[int, bool],
                   *, others_tagged: bool = False) -> None:
    """Make ``port``'s bridge VLANs exactly ``entries`` (plus, with ``others_tagged``,
    every other id tagged: an external uplink carries every VLAN)."""
    if not netlink.bridge_vlan_filtering(ipr, bridge):
        if entries == {VLAN_MIN: True}:
            return  # the default: nothing to do, VLAN filtering or not
        raise HypervisorError(
            f"bridge {bridge} has no VLAN filtering (the kernel lacks "
            "CONFIG_BRIDGE_VLAN_FILTERING): access and trunk VLAN ports are not available "
            "on this host", interface=port)
    index = netlink.need(ipr, port).index
    try:
        if not others_tagged:
            for first, last in unwanted_ranges(entries):
                ipr.vlan_filter("del", index=index, vlan_info={"vid": _vid(first, last)})
        else:
            for first, last in vid_ranges(set(range(VLAN_MIN, VLAN_MAX + 1)) - set(entries)):
                ipr.vlan_filter("add", index=index, vlan_info={"vid": _vid(first, last)})
        for vid, native in sorted(entries.items()):
            flags = BRIDGE_VLAN_PVID | BRIDGE_VLAN_UNTAGGED if native else 0
            ipr.vlan_filter("add", index=index, vlan_info={"vid": vid, "flags": flags})
    except NetlinkError as exc:
        raise netlink.failure(f"setting the VLANs of {port}", exc) from exc


def _vid(first: int, last: int) -> int | str:
    return first if first == last else f"{first}-{last}"


def attach_port(ipr: Any, plan: PortPlan, proc_sys: Path) -> str | None:
    """Attach ``plan.tap`` as planned; the bridge it joined (None: disconnected)."""
    with _lock:
        target = None if plan.bridge is None else _target(ipr, plan, proc_sys)
        netlink.attach(ipr, plan.tap, target)
        if plan.bridge is not None and target == plan.bridge:
            set_port_vlans(ipr, plan.tap, plan.bridge, vlan_entries(plan.settings.vlan))
        _prune(ipr, plan.tap[3:-7], None, empty_only=True)
    return target


def _target(ipr: Any, plan: PortPlan, proc_sys: Path) -> str:
    assert plan.bridge is not None
    vlan = plan.settings.vlan
    if vlan.mode is VlanMode.UNTAGGED or netlink.bridge_vlan_filtering(ipr, plan.bridge):
        return plan.bridge
    if vlan.mode is VlanMode.TRUNK:
        raise HypervisorError(f"trunk mode (port of '{plan.vm_name}') {_NEEDS_FILTERING}",
                              interface=plan.tap)
    assert vlan.access_id is not None
    if vlan.access_id == VLAN_MIN:
        return plan.bridge  # the default VLAN
    if plan.switch_type is SwitchType.EXTERNAL:
        raise HypervisorError(f"an access VLAN on an external switch (port of "
                              f"'{plan.vm_name}') {_NEEDS_FILTERING}", interface=plan.tap)
    name = vlan_bridge_name(plan.bridge, vlan.access_id)
    if netlink.ensure_bridge(ipr, name):
        ipr.link("set", index=netlink.need(ipr, name).index,
                 ifalias=f"{plan.bridge}.{vlan.access_id}")
        netlink.write_sysctl(proc_sys / "ipv6/conf" / name / "disable_ipv6", "1",
                             missing_ok=True)
        netlink.write_sysctl(proc_sys / "ipv4/conf" / name / "arp_ignore", "8")
    return name


def prune(ipr: Any, tag: str, parent: str | None = None, *, empty_only: bool = True
          ) -> None:
    """Delete the service ``tag``'s VLAN bridges without ports (of ``parent``, or of any
    switch); with ``empty_only`` False, every VLAN bridge of ``parent`` (its switch is
    going)."""
    with _lock:
        _prune(ipr, tag, parent, empty_only=empty_only)


def _prune(ipr: Any, tag: str, parent: str | None, *, empty_only: bool) -> None:
    links = netlink.links(ipr)
    used = {link.master for link in links if link.master}
    for link in links:
        owner = parent_of(link)
        if owner is None or not link.name.startswith(f"hvb{tag}"):
            continue  # not a VLAN bridge, or another service's
        if parent is not None and owner != parent:
            continue
        if not empty_only or link.index not in used:
            netlink.delete(ipr, link.name)


def switch_of(ipr: Any, master: int | None) -> str | None:
    """The name of the switch bridge behind a port's master (a VLAN bridge's parent)."""
    if not master:
        return None
    found = ipr.link("get", index=master)
    if not found:
        return None
    link = netlink.link_of(found[0])
    return parent_of(link) or link.name
