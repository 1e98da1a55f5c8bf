"""Kernel names for what a host service makes: bridges, taps, veths, nftables tables.

A kernel interface name has at most 15 bytes (IFNAMSIZ - 1), so user names cannot be
used, nor truncated (two long names would collide). Each name is a short prefix, the
service's tag (from its data directory: two services on one machine never collide) and
a hash of the object's identity. The prefix says what it is in ``ip link``.
"""

from __future__ import annotations

import hashlib

IFNAMSIZ = 15


def _digest(*parts: str, length: int) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:length]


def service_tag(data_dir: str) -> str:
    """Five hex digits naming one host service's objects."""
    return _digest("hvstack-service", data_dir, length=5)


def bridge_name(tag: str, switch_id: str) -> str:
    return f"hvb{tag}{_digest('bridge', switch_id, length=6)}"


def tap_name(tag: str, vm_id: str, mac: str) -> str:
    return f"hvt{tag}{_digest('tap', vm_id, mac.lower(), length=7)}"


def veth_names(tag: str, port: str, vid: int) -> tuple[str, str]:
    """The veth pair joining VLAN ``vid``'s bridge to trunk ``port`` (a tap or an
    external switch's adapter): the end in the bridge, then the end outside it."""
    digest = _digest("veth", port, str(vid), length=7)
    return f"hvv{tag}{digest}", f"hvw{tag}{digest}"


def table_name(tag: str) -> str:
    """The nftables table (one per family) holding this service's rules."""
    return f"hvstack_{tag}"


def is_ours(tag: str, ifname: str) -> bool:
    """Whether ``ifname`` is a bridge, tap or veth this service made."""
    return ifname.startswith((f"hvb{tag}", f"hvt{tag}", f"hvv{tag}", f"hvw{tag}"))
