"""An external switch's uplink: a host interface bridged without cutting the host off.

:func:`attach_uplink` checks the adapter (it exists, is not loopback, in no bridge or
bond, not a bridge or tap itself, not one of hvstack's), then: the bridge takes the
adapter's MAC (neighbours see the same host), the adapter's global addresses are
copied to the bridge, the adapter is enslaved (its frames now reach the host through
the bridge), its routes (default route included) are repointed at the bridge and its
addresses removed. If any step fails the adapter gets its addresses and routes back,
leaves the bridge, and the bridge is deleted: the adapter is as it was.

:func:`release_uplink` moves the bridge's addresses and routes back to the adapter,
frees it and deletes the bridge. Both are sync and run in a netlink worker thread.
"""

from __future__ import annotations

import logging
from typing import Any

from hvstack.errors import Conflict, HvError, InvalidInput
from hvstack.network import netlink, vlans
from hvstack.network.netlink import Address, Link, Route

log = logging.getLogger(__name__)

OUR_PREFIXES = ("hvb", "hvt", "hvv", "hvw")  # names.py: every service's bridges, taps, veths


def check_adapter(ipr: Any, adapter: str, bridge: str) -> Link:
    """The adapter as a link, if it can be an external switch's uplink of ``bridge``."""
    link = netlink.find(ipr, adapter)
    if link is None:
        raise InvalidInput(f"host interface '{adapter}' does not exist", value=adapter)
    if link.loopback:
        raise InvalidInput(f"host interface '{adapter}' is the loopback interface",
                           value=adapter)
    if adapter.startswith(OUR_PREFIXES) or link.kind in ("bridge", "tun"):
        raise InvalidInput(f"host interface '{adapter}' is a bridge or a tap, not a "
                           "network adapter", value=adapter)
    master = netlink.name_of(ipr, link.master)
    if master is not None and master != bridge:
        raise Conflict(f"host interface '{adapter}' is already in bridge or bond "
                       f"'{master}'", value=adapter)
    return link


def _move(ipr: Any, source: str, target: str, addrs: list[Address],
          routes: list[Route]) -> None:
    for address in addrs:
        netlink.add_address(ipr, target, address)
    # Routes without a gateway first: a gateway must be reachable through ``target``.
    for route in sorted(routes, key=lambda r: r.gateway is not None):
        netlink.replace_route(ipr, target, route)
    for address in addrs:
        netlink.del_address(ipr, source, address)


def _movable_routes(ipr: Any, name: str) -> list[Route]:
    return [r for r in netlink.routes(ipr, name) if netlink.movable_route(r)]


def attach_uplink(ipr: Any, bridge: str, adapter: str) -> None:
    """Bridge ``adapter`` into the (new or existing) bridge ``bridge``."""
    link = check_adapter(ipr, adapter, bridge)
    addrs = netlink.addresses(ipr, adapter, movable_only=True)
    routes = _movable_routes(ipr, adapter)
    if link.master is not None:
        # Already ours (a service restart), or part-made by a crash: finish the move.
        netlink.set_up(ipr, bridge)
        netlink.set_up(ipr, adapter)
        _move(ipr, adapter, bridge, addrs, routes)
        return
    was_up = link.up
    made = False
    try:
        made = netlink.ensure_bridge(ipr, bridge, mac=link.mac)
        for address in addrs:
            netlink.add_address(ipr, bridge, address)
        netlink.attach(ipr, adapter, bridge)
        _move(ipr, adapter, bridge, addrs, routes)
    except BaseException:
        _restore(ipr, bridge, adapter, addrs, routes, was_up, delete_bridge=made)
        raise


def _restore(ipr: Any, bridge: str, adapter: str, addrs: list[Address],
             routes: list[Route], was_up: bool, *, delete_bridge: bool) -> None:
    """Undo a part-made attach; every step is tried, the host's connectivity first."""
    steps: list[tuple[str, Any]] = [
        ("freeing the adapter", lambda: netlink.attach(ipr, adapter, None)),
        ("setting the adapter up", lambda: netlink.set_up(ipr, adapter, was_up or bool(addrs))),
        ("moving addresses back", lambda: _move(ipr, bridge, adapter, addrs, routes)
         if netlink.find(ipr, bridge) else _readd(ipr, adapter, addrs, routes)),
    ]
    if delete_bridge:
        steps.append(("deleting the bridge", lambda: netlink.delete(ipr, bridge)))
    for what, step in steps:
        try:
            step()
        except (HvError, OSError) as exc:
            log.error("restoring %s after a failed external switch: %s: %s", adapter, what,
                      exc)


def _readd(ipr: Any, adapter: str, addrs: list[Address], routes: list[Route]) -> None:
    for address in addrs:
        netlink.add_address(ipr, adapter, address)
    for route in sorted(routes, key=lambda r: r.gateway is not None):
        netlink.replace_route(ipr, adapter, route)


def release_uplink(ipr: Any, bridge: str, adapter: str) -> None:
    """Give ``adapter`` the bridge's addresses and routes back, free it, delete the
    bridge. A missing bridge or adapter is not an error (nothing to give back)."""
    if netlink.find(ipr, bridge) is None:
        return
    link = netlink.find(ipr, adapter)
    if link is not None and netlink.name_of(ipr, link.master) == bridge:
        vlans.release_uplink(ipr, bridge[3:-6], adapter)
        addrs = netlink.addresses(ipr, bridge, movable_only=True)
        routes = _movable_routes(ipr, bridge)
        netlink.attach(ipr, adapter, None)
        netlink.set_up(ipr, adapter)
        _move(ipr, bridge, adapter, addrs, routes)
    netlink.delete(ipr, bridge)
