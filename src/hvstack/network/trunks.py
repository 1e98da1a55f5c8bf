"""Trunks without bridge VLAN filtering: a veth per carried VLAN and two tc programs.

A trunk (a VM's trunk port, or an external switch's adapter carrying the VLANs in
use) is a port of its native VLAN's bridge. For each other VLAN X it carries there is
a veth pair (:func:`hvstack.network.names.veth_names`): the ``hvv`` end is a port of
X's bridge, the ``hvw`` end is up and in no bridge. :func:`hvstack.network.bpf.trunk_ingress`
on the trunk's ingress pops tag X and redirects the frame out of the ``hvw`` end, so it
enters X's bridge untagged; :func:`~hvstack.network.bpf.tag_and_redirect` on the ``hvw``
end's ingress tags what X's bridge sends and redirects it out of the trunk.

Both ends have IPv6 off (no chatter of their own in the VLAN) and carry the alias
``trunk:<port>:<vid>``, by which :func:`stale_veths` finds the pairs whose trunk or
bridge is gone. The programs are ``cls_bpf`` direct-action filters at preference
:data:`PREF` of a ``clsact`` qdisc, after :mod:`.tc`'s mirroring filters (preference 1,
``continue``), so a mirror still sees the frames as the VM sent them. Sync: runs in a
netlink worker thread under :mod:`.vlans`'s lock.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from hvstack.errors import Conflict
from hvstack.network import bpf, netlink
from hvstack.network.names import veth_names
from hvstack.network.netlink import Link

PREF = 0xC000  # after tc.py's mirror filters (preference 1)
INGRESS = 0xFFFFFFF2  # clsact's ingress parent (ffff:fff2)
HANDLE = 1
PROGRAM = "hvstack_vlan"
_ALIAS = re.compile(r"^trunk:([^:]+):(\d+)$")


def owner_of(link: Link) -> tuple[str, int] | None:
    """The trunk and VLAN id a veth end of ours serves (None for any other link)."""
    match = _ALIAS.match(link.alias or "") if link.kind == "veth" else None
    return (match.group(1), int(match.group(2))) if match else None


def _veths(ipr: Any, tag: str) -> list[Link]:
    return [link for link in netlink.links(ipr)
            if link.name.startswith((f"hvv{tag}", f"hvw{tag}")) and owner_of(link)]


def set_program(ipr: Any, index: int, code: bytes) -> None:
    """Put ``code`` on the ingress of link ``index`` (replacing our previous one)."""
    try:
        ipr.tc("add", "clsact", index)
    except NetlinkError as exc:
        if exc.code != errno.EEXIST:
            raise netlink.failure("adding a clsact qdisc for a VLAN trunk", exc) from exc
    fd = bpf.load(code, PROGRAM)
    try:
        ipr.tc("replace-filter", "bpf", index, HANDLE, parent=INGRESS, prio=PREF, fd=fd,
               name=PROGRAM, direct_action=True)
    except NetlinkError as exc:
        raise netlink.failure("attaching a VLAN trunk's tc program", exc) from exc
    finally:
        os.close(fd)


def clear_program(ipr: Any, index: int) -> None:
    """Remove our program from the ingress of link ``index`` (others' filters stay)."""
    try:
        ipr.tc("del-filter", "bpf", index, HANDLE, parent=INGRESS, prio=PREF)
    except NetlinkError as exc:
        if exc.code not in (errno.ENOENT, errno.EINVAL, errno.ENODEV):
            raise netlink.failure("removing a VLAN trunk's tc program", exc) from exc


def _make_pair(ipr: Any, port: str, vid: int, inner: str, outer: str, bridge: str,
               proc_sys: Path) -> None:
    try:
        ipr.link("add", ifname=inner, kind="veth", peer=outer)
        for name in (inner, outer):
            ipr.link("set", index=netlink.need(ipr, name).index, ifalias=f"trunk:{port}:{vid}")
            netlink.write_sysctl(proc_sys / "ipv6/conf" / name / "disable_ipv6", "1",
                                 missing_ok=True)
        netlink.attach(ipr, inner, bridge)
        netlink.set_up(ipr, outer)
    except BaseException:
        netlink.delete(ipr, inner)
        raise


def sync(ipr: Any, tag: str, port: str, native: int, carried: Mapping[int, str],
         proc_sys: Path, *, others: int = bpf.TC_ACT_SHOT) -> None:
    """Make ``port`` carry VLAN ``vid`` into bridge ``carried[vid]`` for each, tagged
    (and nothing else tagged but ``native``'s, popped); :func:`clear` undoes it. On
    failure the pairs made here are removed and the port's program is the one it had
    (a new port's are removed with it: :func:`stale_veths`)."""
    port_link = netlink.need(ipr, port)
    made: list[str] = []
    try:
        ends: dict[int, int] = {}
        for link in _veths(ipr, tag):
            owner = owner_of(link)
            if owner and owner[0] == port and owner[1] not in carried:
                netlink.delete(ipr, link.name)
        for vid, bridge in sorted(carried.items()):
            inner, outer = veth_names(tag, port, vid)
            found = netlink.find(ipr, inner)
            if found is not None and owner_of(found) != (port, vid):
                raise Conflict(f"interface {inner} exists and is not the VLAN {vid} pair of "
                               f"{port} (a name collision)", interface=inner)
            if found is None or netlink.find(ipr, outer) is None:
                netlink.delete(ipr, inner)
                made.append(inner)
                _make_pair(ipr, port, vid, inner, outer, bridge, proc_sys)
            elif netlink.name_of(ipr, found.master) != bridge:
                netlink.attach(ipr, inner, bridge)
            end = netlink.need(ipr, outer)
            set_program(ipr, end.index, bpf.tag_and_redirect(vid, port_link.index))
            ends[vid] = end.index
        set_program(ipr, port_link.index, bpf.trunk_ingress(native, ends, others))
    except BaseException:
        for name in made:
            netlink.delete(ipr, name)
        raise


def clear(ipr: Any, tag: str, port: str) -> None:
    """``port`` carries no VLANs: its pairs and its program go (a missing port too)."""
    for link in _veths(ipr, tag):
        owner = owner_of(link)
        if owner and owner[0] == port:
            netlink.delete(ipr, link.name)
    found = netlink.find(ipr, port)
    if found is not None:
        clear_program(ipr, found.index)


def stale_veths(ipr: Any, tag: str) -> None:
    """Delete the pairs whose trunk is gone or whose bridge end left its bridge."""
    links = netlink.links(ipr)
    names = {link.name for link in links}
    for link in links:
        owner = owner_of(link)
        if owner is None or not link.name.startswith(f"hvv{tag}"):
            continue
        if owner[0] not in names or not link.master:
            netlink.delete(ipr, link.name)
