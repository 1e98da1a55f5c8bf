"""nftables rules of a host service: per-port guards, ACLs and policing; NAT of a switch.

Two tables per service, both named ``names.table_name(tag)``:

* family ``bridge``: base chains on the ``forward``, ``input`` and ``output`` hooks look
  the frame's ``iifname`` up in the verdict map ``from_vm`` and its ``oifname`` in
  ``to_vm``; each port's tap maps to a jump to its own chain ``port_<tap>`` (so do a
  trunk port's veths: its tagged frames enter their VLAN's bridge through them). A port's
  chain holds, for frames from the VM (``iifname``): MAC spoofing protection (Ethernet
  source and ARP sender MAC must be the VM's), the DHCP guard (UDP source port 67 and
  547: DHCP and DHCPv6 server messages), the router guard (ICMPv6 router advertisements
  and redirects, ICMPv4 redirects), a jump to the outbound ACL chain ``acl_out_<tap>``
  and the maximum bandwidth policer; for frames to the VM (``oifname``): the drop of
  every VLAN-tagged frame (:data:`TAGGED`), then a jump to the inbound ACL chain
  ``acl_in_<tap>``. The policer is nftables' ``limit rate over ...
  drop``, a token bucket like tc's police action, which many host kernels (this
  project's CI among them) lack.

  ACLs follow Hyper-V's port ACLs: per direction, the most specific ACL that matches
  decides (a longer prefix beats a shorter one, a MAC ACL beats every IP prefix) and
  between an allow and a deny of the same remote the deny wins; traffic no ACL matches
  passes. So an ACL chain lists its rules most specific first, denies before allows of
  equal specificity, and the first match is final: a deny drops, an allow goes back to
  the port chain (``return``), never ``accept``: that would end the base chain too, so
  the policer after the outbound ACLs and the inbound ACLs of the port the frame goes to
  (the base chain's ``to_vm`` lookup, after ``from_vm``) would be skipped. Every ACL
  rule has a counter, read back by :func:`acl_counters`. IPv4 prefixes match only IPv4
  packets and IPv6 prefixes only IPv6 packets (``0.0.0.0/0`` is every IPv4 remote, not
  IPv6); MACs match every frame. Address resolution is not IP traffic for the ACLs: ARP
  (never matched by an IP prefix) and IPv6 neighbour solicitations and advertisements
  pass the IP prefixes, so a VM resolves the remotes it may reach under "deny
  everything, allow a subnet"; a MAC ACL still applies to them. Guards and ACLs
  check the protocol with ``meta protocol``, not the Ethernet type field, so they hold
  for VLAN-tagged frames too (a trunk port's; any port's on a bridge without VLAN
  filtering).
* family ``ip``: per NAT switch, base chains ``post_/pre_/out_/fwd_<bridge>`` holding
  the masquerade of its subnet, the dnat of its static mappings (from outside, from
  the host itself and from the switch's own VMs, for addresses of this host only, so
  a VM's connections to that port elsewhere are untouched) and forward accepts. Each
  switch has its own base chains so that replacing or removing one never rewrites
  another's.

Every change is one ``nft -f -`` transaction that adds what it needs and flushes only
the chains it rewrites: applying a plan twice leaves the same rules (the port's own
counters start again from zero), and other ports' counters survive. Rule text is
built by pure functions from the plans; every value put into it is checked first
(interface names of the shapes :mod:`.names` makes, MACs, prefixes, ports), so no
user text reaches nft.
"""

from __future__ import annotations

import ipaddress
import json
import re

from hvstack import runner
from hvstack.errors import HvError, HypervisorError, InvalidInput
from hvstack.network.backend import AclCounter, PortPlan, SwitchPlan
from hvstack.network.model import (
    AclAction,
    AclDirection,
    NatProtocol,
    PortAcl,
    SwitchType,
    VlanMode,
)
from hvstack.network.names import veth_names
from hvstack.network.vlans import layout

NFT = "nft"
TIMEOUT = 30.0
MIN_BURST = 128 * 1024  # bytes: above a 64 KiB GSO frame, which would never conform
MAX_BURST = 2**27  # bytes: with POLICER_MAX, still a bucket the kernel takes
POLICER_MAX = 2**34  # bytes/s (137 Gbit/s): the kernel refuses a limit much above it

_TAP = re.compile(r"^hvt[0-9a-f]{1,12}$")
_VETH = re.compile(r"^hvv[0-9a-f]{1,12}$")
_BRIDGE = re.compile(r"^hvb[0-9a-f]{1,12}$")
_TABLE = re.compile(r"^hvstack_[0-9a-z_]{1,40}$")
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_ACL_COMMENT = re.compile(r"^acl (\d+) (inbound|outbound)$")
# No legitimately tagged frame crosses our bridges to a port: access and untagged ports
# get untagged frames, a trunk's tagged ones bypass the bridge (the eBPF program tags
# them and redirects them to the tap). What does is foreign: a tag from the physical
# network an external adapter passes on (it may be the host's own), or the host's. So
# the port's chain drops it, for every hook that jumps there (tagged by the host too).
# ``ether type``, not ``meta protocol`` or ``vlan id``: the kernel keeps an outer tag
# aside (``meta protocol`` is then the inner type, and ``vlan id`` reads 802.1Q only),
# nft puts it back for link-layer reads, so this matches the outer tag wherever it is.
TAGGED = "ether type { 8021q, 8021ad } counter drop"


# -- checks: everything interpolated into rule text passes one of these ------------

def _check(name: str, shape: re.Pattern[str], what: str) -> str:
    if not isinstance(name, str) or not shape.match(name):
        raise InvalidInput(f"'{name}' is not {what} this service makes", value=str(name))
    return name


def check_tap(name: str) -> str:
    if not isinstance(name, str) or not _TAP.match(name):
        raise InvalidInput(f"'{name}' is not a tap name this service makes", value=str(name))
    return name


def check_bridge(name: str) -> str:
    if not isinstance(name, str) or not _BRIDGE.match(name):
        raise InvalidInput(f"'{name}' is not a bridge name this service makes",
                           value=str(name))
    return name


def check_table(name: str) -> str:
    if not isinstance(name, str) or not _TABLE.match(name):
        raise InvalidInput(f"'{name}' is not an nftables table of this service",
                           value=str(name))
    return name


def check_mac(mac: str) -> str:
    if not isinstance(mac, str) or not _MAC.match(mac):
        raise InvalidInput(f"'{mac}' is not a MAC address in lower case with colons",
                           value=str(mac))
    return mac


def check_int(value: int, low: int, high: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidInput(f"{what} {value} is outside {low}-{high}", value=str(value))
    return value


def burst_bytes(rate: int) -> int:
    """A bucket of 50 ms at ``rate`` bits/s, between :data:`MIN_BURST` and
    :data:`MAX_BURST`."""
    return min(max(rate // 8 // 20, MIN_BURST), MAX_BURST)


# -- the bridge table: ports ----------------------------------------------------------

def _bridge_base(table: str) -> list[str]:
    t = f"bridge {table}"
    lines = [f"add table {t}",
             f"add map {t} from_vm {{ type ifname : verdict ; }}",
             f"add map {t} to_vm {{ type ifname : verdict ; }}"]
    for hook in ("forward", "input", "output"):
        lines += [f"add chain {t} {hook} {{ type filter hook {hook} priority 0 ; "
                  "policy accept ; }",
                  f"flush chain {t} {hook}",
                  f"add rule {t} {hook} iifname vmap @from_vm",
                  f"add rule {t} {hook} oifname vmap @to_vm"]
    return lines


# An ACL's remote, by kind: MACs first (more specific than any prefix), then IPv4,
# then IPv6; kinds never match the same packet as IP prefixes, so only MAC-against-IP
# order matters, and grouping keeps the neighbour discovery rule in one place.
_MAC_KIND, _IPV4_KIND, _IPV6_KIND = 0, 1, 2
# Neighbour solicitations and advertisements: IPv6's ARP, let through the IP prefixes.
# ``meta protocol`` (what ``ip6 saddr`` depends on in this family too) rather than
# the Ethernet type nft checks before ``icmpv6``, ``icmp`` and ``arp`` matches: that
# reads 802.1Q on a VLAN-tagged frame (the kernel keeps the tag aside and puts it back
# for link-layer reads), so the match would never hold for one.
_ND = "meta protocol ip6 icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } return"


def _remote(acl: PortAcl, inbound: bool) -> tuple[int, int, str]:
    """(kind, prefix length, the nft match) of the remote end: the source of what
    comes in, the destination of what goes out."""
    end = "saddr" if inbound else "daddr"
    if acl.is_mac:
        return _MAC_KIND, 48, f"ether {end} {check_mac(acl.remote.lower().replace('-', ':'))}"
    try:
        net = ipaddress.ip_network(acl.remote, strict=True)
    except ValueError:
        raise InvalidInput(f"ACL remote '{acl.remote}' is neither a MAC address nor an IP "
                           "prefix", value=acl.remote) from None
    if net.version == 4:
        return _IPV4_KIND, net.prefixlen, f"ip {end} {net}"
    return _IPV6_KIND, net.prefixlen, f"ip6 {end} {net}"


def acl_rules(acls: tuple[PortAcl, ...], inbound: bool) -> list[str]:
    """The rules of the port's inbound or outbound ACL chain, first match final: most
    specific first, deny before allow at equal specificity, list order last."""
    wanted = AclDirection.INBOUND if inbound else AclDirection.OUTBOUND
    entries: list[tuple[int, int, bool, int, str, AclAction]] = []
    for index, acl in enumerate(acls):
        if acl.direction in (wanted, AclDirection.BOTH):
            kind, length, match = _remote(acl, inbound)
            entries.append((kind, -length, acl.action is AclAction.ALLOW, index, match,
                            acl.action))
    rules: list[str] = []
    for kind, _, _, index, match, action in sorted(entries):
        if kind == _IPV6_KIND and _ND not in rules:
            rules.append(_ND)
        verdict = "drop" if action is AclAction.DENY else "return"
        rules.append(f'{match} counter {verdict} comment "acl {index} {wanted.value}"')
    return rules


def acl_chains(tap: str) -> tuple[str, str]:
    """The names of the port's (inbound, outbound) ACL chains."""
    return f"acl_in_{check_tap(tap)}", f"acl_out_{tap}"


def port_interfaces(plan: PortPlan) -> list[str]:
    """The tap, then the bridge ends of a trunk's veths (:mod:`.trunks`): the VM's
    tagged frames cross their VLAN's bridge through those, so the port's rules match
    them there too."""
    tap = check_tap(plan.tap)
    if plan.bridge is None or plan.settings.vlan.mode is not VlanMode.TRUNK:
        return [tap]
    carried = layout(plan.settings.vlan)[1]
    return [tap, *(_check(veth_names(tap[3:-7], tap, vid)[0], _VETH, "a trunk's veth")
                   for vid in carried)]


def _ifnames(names: list[str]) -> str:
    quoted = [f'"{name}"' for name in names]
    return quoted[0] if len(quoted) == 1 else "{ " + ", ".join(quoted) + " }"


def port_rules(plan: PortPlan) -> list[str]:
    """The port chain's rules, in order (without ``add rule ...`` in front)."""
    tap, mac, s = _ifnames(port_interfaces(plan)), check_mac(plan.mac), plan.settings
    acl_in, acl_out = acl_chains(plan.tap)
    out: list[str] = []
    # ``meta protocol``: see :data:`_ND` (a guard must hold for tagged frames too).
    if not s.mac_spoofing:
        out += [f"ether saddr != {mac} drop", f"meta protocol arp arp saddr ether != {mac} drop"]
    if s.dhcp_guard:
        out += ["udp sport 67 drop", "udp sport 547 drop"]
    if s.router_guard:
        out += ["meta protocol ip6 icmpv6 type { nd-router-advert, nd-redirect } drop",
                "meta protocol ip icmp type redirect drop"]
    if acl_rules(s.acls, inbound=False):
        out.append(f"jump {acl_out}")
    if s.bandwidth_max is not None:
        rate = check_int(s.bandwidth_max, 1000, 400 * 10**9, "maximum bandwidth")
        out.append(f"limit rate over {min(rate // 8, POLICER_MAX)} bytes/second burst "
                   f"{burst_bytes(rate)} bytes drop")
    inbound = [TAGGED, *([f"jump {acl_in}"] if acl_rules(s.acls, inbound=True) else [])]
    return ([f'iifname {tap} {rule}' for rule in out]
            + [f'oifname {tap} {rule}' for rule in inbound])


def _drop_elements(t: str, chain: str, names: list[str]) -> list[str]:
    """Map entries of ``names`` removed (added first: removing an absent one is not an
    error; nft 1.0.6 has no ``destroy``)."""
    lines = []
    for m in ("from_vm", "to_vm"):
        for name in names:
            lines += [f'add element {t} {m} {{ "{name}" : jump {chain} }}',
                      f'delete element {t} {m} {{ "{name}" }}']
    return lines


def port_script(plan: PortPlan, stale: tuple[str, ...] = ()) -> str:
    """The transaction that makes the port's chains exactly what ``plan`` asks (the ACL
    chains exist, empty, even without ACLs: removal and counters need no branches);
    ``stale``: map entries of the port no longer wanted (a trunk's former veths)."""
    t, tap = f"bridge {check_table(plan.table)}", check_tap(plan.tap)
    chain, (acl_in, acl_out) = f"port_{tap}", acl_chains(tap)
    names = port_interfaces(plan)
    lines = list(_bridge_base(plan.table))
    lines += [f"add chain {t} {c}" for c in (chain, acl_in, acl_out)]
    lines += [f"flush chain {t} {c}" for c in (chain, acl_in, acl_out)]
    lines += [f"add rule {t} {acl_in} {rule}" for rule in acl_rules(plan.settings.acls, True)]
    lines += [f"add rule {t} {acl_out} {rule}"
              for rule in acl_rules(plan.settings.acls, False)]
    lines += [f"add rule {t} {chain} {rule}" for rule in port_rules(plan)]
    lines += _drop_elements(t, chain, [_check(n, _VETH, "a trunk's veth") for n in stale
                                       if n not in names])
    lines += [f'add element {t} {m} {{ "{name}" : jump {chain} }}'
              for m in ("from_vm", "to_vm") for name in names]
    return "\n".join(lines) + "\n"


def port_removal_script(tap: str, table: str, extra: tuple[str, ...] = ()) -> str:
    """Removes the port's chains and map entries (``extra``: those of a trunk's veths);
    adds them first so that removing an absent port is not an error (nft 1.0.6 has no
    ``destroy``). The port chain goes before the ACL chains it jumps to."""
    t, tap = f"bridge {check_table(table)}", check_tap(tap)
    chains = (f"port_{tap}", *acl_chains(tap))
    lines = [f"add table {t}",
             f"add map {t} from_vm {{ type ifname : verdict ; }}",
             f"add map {t} to_vm {{ type ifname : verdict ; }}"]
    lines += [f"add chain {t} {c}" for c in chains]
    lines += _drop_elements(t, chains[0], [tap, *(_check(n, _VETH, "a trunk's veth")
                                                  for n in extra)])
    for c in chains:
        lines += [f"flush chain {t} {c}", f"delete chain {t} {c}"]
    return "\n".join(lines) + "\n"


def veth_entries(text: str, tap: str) -> tuple[str, ...]:
    """The veths jumping to ``tap``'s chain in ``nft -j list map`` output."""
    found: list[str] = []
    for item in (json.loads(text) if text.strip() else {}).get("nftables", []):
        for key, verdict in item.get("map", {}).get("elem", ()):
            target = verdict.get("jump", {}).get("target") if isinstance(verdict, dict) else None
            if target == f"port_{tap}" and isinstance(key, str) and _VETH.match(key):
                found.append(key)
    return tuple(found)


def parse_acl_counters(text: str, tap: str) -> tuple[AclCounter, ...]:
    """The counters of the port's ACL rules in ``nft -j list table`` output, by ACL
    index (other ports' rules are in the same listing)."""
    chains = set(acl_chains(tap))
    found: list[AclCounter] = []
    for item in json.loads(text).get("nftables", []):
        rule = item.get("rule") if isinstance(item, dict) else None
        if not isinstance(rule, dict) or rule.get("chain") not in chains:
            continue
        match = _ACL_COMMENT.match(str(rule.get("comment", "")))
        counter = next((e["counter"] for e in rule.get("expr", ())
                        if isinstance(e, dict) and isinstance(e.get("counter"), dict)), None)
        if match and counter is not None:
            found.append(AclCounter(int(match[1]), match[2], int(counter.get("packets", 0)),
                                    int(counter.get("bytes", 0))))
    return tuple(sorted(found, key=lambda c: (c.index, c.direction)))


# -- the ip table: NAT ------------------------------------------------------------------

_NAT_HOOKS = (("post", "nat hook postrouting priority srcnat"),
              ("pre", "nat hook prerouting priority dstnat"),
              ("out", "nat hook output priority -100"),
              ("fwd", "filter hook forward priority filter"))


def nat_rules(plan: SwitchPlan) -> dict[str, list[str]]:
    """The rules of each of the switch's NAT chains, keyed by chain prefix."""
    bridge = check_bridge(plan.bridge)
    if plan.subnet is None:
        raise InvalidInput(f"NAT switch '{plan.name}' has no subnet")
    net = ipaddress.IPv4Network(plan.subnet)
    rules: dict[str, list[str]] = {
        # First: only what the host routes out of the switch (bridged frames pass these
        # hooks too when br_netfilter is on). Second: a VM reaching a mapping of its
        # own switch (hairpin) must get the answer back through the host.
        "post": [f'iifname "{bridge}" oifname != "{bridge}" ip saddr {net} '
                 f"ip daddr != {net} masquerade",
                 f"ip saddr {net} ip daddr {net} ct status dnat masquerade"],
        "pre": [], "out": [],
        "fwd": [f'iifname "{bridge}" ip saddr {net} accept',
                f'oifname "{bridge}" ip daddr {net} ct state established,related accept',
                f'oifname "{bridge}" ip daddr {net} ct status dnat accept'],
    }
    for m in plan.mappings:
        proto = NatProtocol(m.protocol).value
        external = check_int(m.external_port, 1, 65535, "external port")
        internal = check_int(m.internal_port, 1, 65535, "internal port")
        try:
            ip = ipaddress.IPv4Address(m.internal_ip)
        except ValueError:
            raise InvalidInput(f"internal IP '{m.internal_ip}' is not an IPv4 address",
                               value=str(m.internal_ip)) from None
        dnat = f"{proto} dport {external} dnat to {ip}:{internal}"
        rules["pre"].append(f"fib daddr type local {dnat}")
        # 127/8 is left alone: a dnat'd packet from a loopback source cannot leave.
        rules["out"].append(f"ip daddr != 127.0.0.0/8 fib daddr type local {dnat}")
    return rules


def nat_script(plan: SwitchPlan) -> str:
    """The transaction that makes the switch's NAT chains what ``plan`` asks; for a
    switch that is not NAT, the removal of any."""
    if plan.type is not SwitchType.NAT:
        return nat_removal_script(plan)
    t, bridge = f"ip {check_table(plan.table)}", check_bridge(plan.bridge)
    lines = [f"add table {t}"]
    for prefix, rules in nat_rules(plan).items():
        chain = f"{prefix}_{bridge}"
        hook = dict(_NAT_HOOKS)[prefix]
        lines += [f"add chain {t} {chain} {{ type {hook} ; policy accept ; }}",
                  f"flush chain {t} {chain}"]
        lines += [f"add rule {t} {chain} {rule}" for rule in rules]
    return "\n".join(lines) + "\n"


def nat_removal_script(plan: SwitchPlan) -> str:
    t, bridge = f"ip {check_table(plan.table)}", check_bridge(plan.bridge)
    lines = [f"add table {t}"]
    for prefix, hook in _NAT_HOOKS:
        chain = f"{prefix}_{bridge}"
        lines += [f"add chain {t} {chain} {{ type {hook} ; policy accept ; }}",
                  f"flush chain {t} {chain}", f"delete chain {t} {chain}"]
    return "\n".join(lines) + "\n"


def table_removal_script(table: str) -> str:
    table = check_table(table)
    return "".join(f"add table {f} {table}\ndelete table {f} {table}\n"
                   for f in ("bridge", "ip"))


# -- applying ---------------------------------------------------------------------------

def _errors(returncode: int, stderr: str) -> HvError:
    if "Operation not permitted" in stderr:
        return HypervisorError("changing nftables rules needs CAP_NET_ADMIN (run the host "
                               "service as root); user-mode NAT adapters still work",
                               tool=NFT, exit_code=returncode, stderr=stderr)
    return HypervisorError(f"nft failed (exit {returncode}): {stderr or 'no message'}",
                           tool=NFT, exit_code=returncode, stderr=stderr)


async def _nft(script: str) -> None:
    await runner.run([NFT, "-f", "-"], input=script.encode(), timeout=TIMEOUT,
                     errors=_errors, package="nftables")


async def apply_switch(plan: SwitchPlan) -> None:
    """NAT rules for a NAT switch (idempotent); for another type, none."""
    await _nft(nat_script(plan))


async def remove_switch(plan: SwitchPlan) -> None:
    await _nft(nat_removal_script(plan))


async def apply_port(plan: PortPlan) -> None:
    """Replaces the port's chain (one transaction; other ports are untouched)."""
    await _nft(port_script(plan, await _veth_entries(plan.tap, plan.table)))


async def remove_port(tap: str, table: str) -> None:
    await _nft(port_removal_script(tap, table, await _veth_entries(tap, table)))


async def _veth_entries(tap: str, table: str) -> tuple[str, ...]:
    argv = [NFT, "-j", "list", "map", "bridge", check_table(table), "from_vm"]
    try:
        out = await runner.run(argv, timeout=TIMEOUT, errors=_errors, package="nftables")
    except HypervisorError as exc:
        if "No such file or directory" in str(exc.data.get("stderr")):
            return ()  # no table or map yet
        raise
    return veth_entries(out.decode(), check_tap(tap))


async def acl_counters(tap: str, table: str) -> tuple[AclCounter, ...]:
    """The port's ACL counters; none when the port (or the table) has no rules."""
    argv = [NFT, "-j", "list", "table", "bridge", check_table(table)]
    check_tap(tap)
    try:
        out = await runner.run(argv, timeout=TIMEOUT, errors=_errors, package="nftables")
    except HypervisorError as exc:
        if "No such file or directory" in str(exc.data.get("stderr")):
            return ()
        raise
    return parse_acl_counters(out.decode(), tap)


async def remove_table(table: str) -> None:
    """Everything of this service, in both families."""
    await _nft(table_removal_script(table))
