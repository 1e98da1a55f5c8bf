"""The names VMs have in a NAT switch's DNS: a VM's name as a DNS label.

Pure. :func:`dns_label` turns a VM's name into one DNS label (RFC 1123: ASCII letters,
digits and hyphens, at most 63 characters, no hyphen first or last), or None when
nothing usable is left. :func:`switch_hosts` gives the ``(MAC, label)`` pairs of one
switch: each VM's first adapter on it gets the VM's label; when two VMs' names map to
the same label, the VM created first keeps it and the other gets none (so a new VM can
never take the name another VM already answers to).

dnsmasq reads a ``--dhcp-hostsfile`` line's fields by their form, so a label it would
read as something else gets no line: all digits, digits with a time unit (``10m``: a
lease time) and its keywords ``ignore`` and ``infinite``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

MAX_LABEL = 63
_OTHER = re.compile(r"[^a-z0-9]+")
_LEASE_TIME = re.compile(r"^[0-9]+[wdhms]?$")
_KEYWORDS = frozenset({"ignore", "infinite"})
LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def dns_label(name: str) -> str | None:
    """``name`` as a DNS label: lower case, each run of other characters than ASCII
    letters and digits one hyphen, no hyphen first or last, cut at 63 characters; None
    when nothing is left, or when dnsmasq would read it as other than a name."""
    label = _OTHER.sub("-", name.lower()).strip("-")[:MAX_LABEL].rstrip("-")
    if not label or _LEASE_TIME.match(label) or label in _KEYWORDS:
        return None
    return label


def usable_label(label: str) -> bool:
    """Whether ``label`` is one :func:`dns_label` can give (the backend checks again
    what reaches dnsmasq)."""
    return bool(LABEL.match(label)) and dns_label(label) == label


@dataclass(frozen=True)
class VmPorts:
    """One VM as its switch's DNS sees it: its name, when it was made (ties go to the
    older VM), its id (the last tie-break) and the MACs of its adapters on the switch,
    in the VM's order."""

    name: str
    created_at: float
    vm_id: str
    macs: tuple[str, ...]


def switch_hosts(vms: Iterable[VmPorts]) -> tuple[tuple[str, str], ...]:
    """``(MAC, label)`` of each VM with a usable label and an adapter on the switch,
    sorted by MAC; a label two VMs map to stays with the older one."""
    taken: set[str] = set()
    hosts: list[tuple[str, str]] = []
    for vm in sorted(vms, key=lambda v: (v.created_at, v.vm_id)):
        label = dns_label(vm.name)
        if label is None or label in taken or not vm.macs:
            continue
        taken.add(label)
        hosts.append((vm.macs[0], label))
    return tuple(sorted(hosts))
