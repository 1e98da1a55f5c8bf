"""Traffic control of a port: maximum and minimum bandwidth, port mirroring.

What goes where, and why:

* Maximum bandwidth, to the VM: the tap's egress is what the VM receives, so a ``tbf``
  root qdisc on the tap shapes it (queueing up to 50 ms, not dropping at once, which
  TCP takes better than a policer). From the VM: the tap's ingress needs a policer;
  tc's ``police`` action (CONFIG_NET_ACT_POLICE) is missing from many host kernels,
  this project's CI among them, so the same token bucket is an nftables
  ``limit rate over ... drop`` in the port's chain (:mod:`.nft`, from the same plan).
* Minimum bandwidth is a weight under contention (Hyper-V's absolute minimum). VMs of
  one switch contend where their traffic shares one queue; the one such queue this
  service owns is the bridge device's egress: everything the host sends into the
  switch (the host's own traffic to VMs and, on NAT and internal switches, everything
  routed to them). There an ``htb`` tree gets one class per VM (``rate`` = its
  minimum, ``ceil`` = the link), classified by the VM's MAC as destination, so under
  load each VM keeps at least its minimum and shares the rest by weight. The bridge
  has no speed of its own, so the link is taken as :data:`LINK_RATE`. Frames VMs send
  out of an external switch leave by the host adapter, whose queue is the host's:
  minimum bandwidth does not reach them (said in the user documentation).
* Mirroring: a ``clsact`` qdisc on the source tap with a match-all ``u32`` filter and
  ``mirred egress mirror`` to the destination tap on both ingress (sent by the VM)
  and egress (received by it). ``u32 match u32 0 0`` rather than ``matchall``: the
  latter is another module many kernels do not build. While the destination tap is
  not there (its VM is off) the source port is applied without mirroring; applying
  it again once the destination exists adds it. The mirror action ends in ``continue``
  and its filters have preference 1: a trunk's VLAN program (:mod:`.trunks`, later on
  the same qdisc) still runs, and the mirror sees frames as the VM sent them.

:func:`apply_port` makes a tap match its plan whatever was there (idempotent);
:func:`clear_port` removes it all, including the VM's class on any bridge of the
service. A VM's class and filter on a bridge are numbered by a hash of its tap name
(``clear_port`` knows only that), in 2..0xfff1; the tree goes when the last class
has gone. Of tc's output only a bridge's root qdisc and its class ids are read.
"""

from __future__ import annotations

import hashlib
import logging
import re
import socket

from hvstack import runner
from hvstack.errors import InvalidInput
from hvstack.network.backend import PortPlan
from hvstack.network.model import MirrorMode
from hvstack.network.nft import burst_bytes, check_bridge, check_int, check_mac, check_tap

log = logging.getLogger(__name__)

TC = "tc"
TIMEOUT = 30.0
LINK_RATE = 10 * 10**9  # bits/s assumed for a bridge's egress
_ROOT, _DEFAULT = 0xFFFF, 0xFFFE  # htb classes on a bridge: the link, traffic of no VM
_MISSING = (0, 1, 2)  # tc's exit codes when what is deleted (or its device) is gone


def class_minor(tap: str) -> int:
    """The VM's htb class (1:minor) and filter preference on a bridge."""
    digest = hashlib.sha256(check_tap(tap).encode()).digest()
    return int.from_bytes(digest[:2], "big") % 0xFFF0 + 2


def _rate(value: int, what: str) -> int:
    return check_int(value, 1000, 400 * 10**9, what)


def tap_commands(plan: PortPlan, mirror: bool = True) -> list[list[str]]:
    """What makes the tap itself match ``plan`` (the mirror filters are removed with
    their qdisc and added again: a brief gap in the copies, never in the shaping)."""
    tap, s = check_tap(plan.tap), plan.settings
    # Only the mirror filters: a trunk's VLAN program shares the clsact qdisc.
    cmds = [["filter", "del", "dev", tap, way, "pref", "1"] for way in ("ingress", "egress")]
    if s.bandwidth_max is not None:
        rate = _rate(s.bandwidth_max, "maximum bandwidth")
        cmds.append(["qdisc", "replace", "dev", tap, "root", "tbf", "rate", f"{rate}bit",
                     "burst", str(burst_bytes(rate)), "latency", "50ms"])
    else:
        cmds.append(["qdisc", "del", "dev", tap, "root"])
    if s.mirror is MirrorMode.SOURCE and plan.mirror_to is not None and mirror:
        dest = check_tap(plan.mirror_to)
        if dest == tap:
            raise InvalidInput(f"port {tap} cannot mirror to itself", value=tap)
        cmds.append(["qdisc", "replace", "dev", tap, "clsact"])
        cmds += [["filter", "add", "dev", tap, way, "pref", "1", "protocol", "all", "u32",
                  "match", "u32", "0", "0", "action", "mirred", "egress", "mirror",
                  "dev", dest, "continue"] for way in ("ingress", "egress")]
    return cmds


def min_removal_commands(tap: str, bridge: str) -> list[list[str]]:
    minor = class_minor(tap)
    return [["filter", "del", "dev", check_bridge(bridge), "parent", "1:", "pref", str(minor)],
            ["class", "del", "dev", bridge, "classid", f"1:{minor:x}"]]


def min_commands(plan: PortPlan) -> list[list[str]]:
    """The VM's class in the htb tree on its bridge (under :func:`htb_root_command`;
    ``plan`` must have a bridge and a minimum bandwidth)."""
    assert plan.bridge is not None and plan.settings.bandwidth_min is not None
    bridge, mac = check_bridge(plan.bridge), check_mac(plan.mac)
    rate = _rate(plan.settings.bandwidth_min, "minimum bandwidth")
    minor, link = class_minor(plan.tap), f"{LINK_RATE}bit"

    def htb_class(parent: str, classid: int, class_rate: str) -> list[str]:
        return ["class", "replace", "dev", bridge, "parent", parent, "classid",
                f"1:{classid:x}", "htb", "rate", class_rate, "ceil", link, "quantum", "60000"]

    return [htb_class("1:", _ROOT, link),
            htb_class(f"1:{_ROOT:x}", _DEFAULT, "1mbit"),
            htb_class(f"1:{_ROOT:x}", minor, f"{rate}bit"),
            *min_removal_commands(plan.tap, bridge)[:1],
            ["filter", "add", "dev", bridge, "parent", "1:", "pref", str(minor), "protocol",
             "all", "u32", "match", "ether", "dst", mac, "flowid", f"1:{minor:x}"]]


def htb_root_command(bridge: str) -> list[str]:
    return ["qdisc", "replace", "dev", check_bridge(bridge), "root", "handle", "1:", "htb",
            "default", f"{_DEFAULT:x}"]


def _our_bridges(tap: str) -> list[str]:
    """This service's bridges in the current network namespace (the tag is the tap
    name without its ``hvt`` prefix and 7-digit suffix, as :mod:`.names` makes it)."""
    tag = check_tap(tap)[3:-7]
    prefix = f"hvb{tag}"
    return sorted(name for name in _interfaces() if tag and name.startswith(prefix))


def _interfaces() -> set[str]:
    """Interface names of the current network namespace (of this thread)."""
    return {name for _, name in socket.if_nameindex()}


async def _tc(args: list[str]) -> None:
    ok = _MISSING if args[1] == "del" else (0,)
    await runner.run([TC, *args], timeout=TIMEOUT, ok_codes=ok, package="iproute2")


async def _ensure_htb(bridge: str) -> None:
    """Our htb root on the bridge; replaced only when it is not there (htb cannot be
    changed in place, and replacing it would drop every VM's class)."""
    shown = await runner.run([TC, "qdisc", "show", "dev", check_bridge(bridge), "root"],
                             timeout=TIMEOUT, package="iproute2")
    if not shown.startswith(b"qdisc htb 1: root"):
        await _tc(htb_root_command(bridge))


async def apply_port(plan: PortPlan) -> None:
    """Bandwidth (maximum to the VM, minimum) and mirroring as ``plan`` asks."""
    mirror = plan.mirror_to is None or plan.mirror_to in _interfaces()
    if not mirror:
        log.info("port %s: mirror destination %s is not there (its VM is off); not "
                 "mirroring until the port is applied again", plan.tap, plan.mirror_to)
    for args in tap_commands(plan, mirror):
        await _tc(args)
    wants_min = plan.bridge is not None and plan.settings.bandwidth_min is not None
    for bridge in _our_bridges(plan.tap):
        if not (wants_min and bridge == plan.bridge):
            await _remove_min(plan.tap, bridge)
    if wants_min:
        assert plan.bridge is not None
        await _ensure_htb(plan.bridge)
        for args in min_commands(plan):
            await _tc(args)


async def clear_port(tap: str) -> None:
    """Remove the tap's shaping and mirroring and its class on any bridge."""
    tap = check_tap(tap)
    for args in (["qdisc", "del", "dev", tap, "root"], ["qdisc", "del", "dev", tap, "clsact"]):
        await _tc(args)
    for bridge in _our_bridges(tap):
        await _remove_min(tap, bridge)


async def _remove_min(tap: str, bridge: str) -> None:
    """The VM's class on ``bridge``; the htb tree too once no VM has a class there (a
    bridge without minimums keeps no ceiling)."""
    for args in min_removal_commands(tap, bridge):
        await _tc(args)
    shown = await runner.run([TC, "class", "show", "dev", bridge], timeout=TIMEOUT,
                             ok_codes=_MISSING, package="iproute2")
    if shown and not vm_classes(shown.decode(errors="replace")):
        await _tc(["qdisc", "del", "dev", bridge, "root"])


def vm_classes(shown: str) -> set[str]:
    """The VMs' htb classes in ``tc class show`` output."""
    ids = {m[1] for m in re.finditer(r"^class htb (1:[0-9a-f]+) ", shown, re.MULTILINE)}
    return ids - {f"1:{_ROOT:x}", f"1:{_DEFAULT:x}"}
