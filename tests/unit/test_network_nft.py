"""nftables rule text from port and switch plans (golden), its checks, counters parsing,
and what the async functions hand to ``nft``."""

from __future__ import annotations

import ipaddress
import json

import pytest

from hvstack import runner
from hvstack.errors import HypervisorError, InvalidInput
from hvstack.network import nft
from hvstack.network.backend import AclCounter, PortPlan, SwitchPlan
from hvstack.network.model import (
    AclAction,
    AclDirection,
    NatMapping,
    NatProtocol,
    PortAcl,
    PortSettings,
    SwitchType,
)

TAP, TABLE, BRIDGE, MAC = "hvt1234567890ab", "hvstack_12345", "hvb12345abcdef", "52:54:00:12:34:56"
T = f"bridge {TABLE}"
CHAIN = f"add rule {T} port_{TAP}"


def plan(settings: PortSettings = PortSettings(), **changes: object) -> PortPlan:
    fields: dict[str, object] = {"tap": TAP, "mac": MAC, "vm_name": "vm1",
                                 "settings": settings, "table": TABLE, "bridge": BRIDGE}
    fields.update(changes)
    return PortPlan(**fields)  # type: ignore[arg-type]


def nat(mappings: tuple[NatMapping, ...] = (), **changes: object) -> SwitchPlan:
    fields: dict[str, object] = {
        "switch_id": "s1", "name": "Default Switch", "type": SwitchType.NAT,
        "bridge": BRIDGE, "table": TABLE,
        "host_address": ipaddress.IPv4Interface("172.16.0.1/24"),
        "subnet": ipaddress.IPv4Network("172.16.0.0/24"), "mappings": mappings}
    fields.update(changes)
    return SwitchPlan(**fields)  # type: ignore[arg-type]


BASE = f"""add table {T}
add map {T} from_vm {{ type ifname : verdict ; }}
add map {T} to_vm {{ type ifname : verdict ; }}
add chain {T} forward {{ type filter hook forward priority 0 ; policy accept ; }}
flush chain {T} forward
add rule {T} forward iifname vmap @from_vm
add rule {T} forward oifname vmap @to_vm
add chain {T} input {{ type filter hook input priority 0 ; policy accept ; }}
flush chain {T} input
add rule {T} input iifname vmap @from_vm
add rule {T} input oifname vmap @to_vm
add chain {T} output {{ type filter hook output priority 0 ; policy accept ; }}
flush chain {T} output
add rule {T} output iifname vmap @from_vm
add rule {T} output oifname vmap @to_vm
"""


ACL_IN, ACL_OUT = f"acl_in_{TAP}", f"acl_out_{TAP}"
CHAINS = f"""add chain {T} port_{TAP}
add chain {T} {ACL_IN}
add chain {T} {ACL_OUT}
flush chain {T} port_{TAP}
flush chain {T} {ACL_IN}
flush chain {T} {ACL_OUT}
"""


def test_a_default_port_gets_mac_spoofing_protection_only() -> None:
    assert nft.port_script(plan()) == BASE + CHAINS + f"""{CHAIN} iifname "{TAP}" ether saddr != {MAC} drop
{CHAIN} iifname "{TAP}" meta protocol arp arp saddr ether != {MAC} drop
{CHAIN} oifname "{TAP}" ether type {{ 8021q, 8021ad }} counter drop
add element {T} from_vm {{ "{TAP}" : jump port_{TAP} }}
add element {T} to_vm {{ "{TAP}" : jump port_{TAP} }}
"""  # noqa: E501


def test_every_feature_in_order_the_acls_between_the_guards_and_the_policer() -> None:
    acls = (PortAcl(AclAction.ALLOW, AclDirection.OUTBOUND, "10.0.0.0/8"),
            PortAcl(AclAction.DENY, AclDirection.BOTH, "10.1.0.0/16"),
            PortAcl(AclAction.DENY, AclDirection.INBOUND, "52:54:00:aa:bb:cc"),
            PortAcl(AclAction.ALLOW, AclDirection.INBOUND, "fd00::/8"))
    settings = PortSettings(mac_spoofing=True, dhcp_guard=True, router_guard=True,
                            acls=acls, bandwidth_max=8_000_000)
    assert nft.port_rules(plan(settings)) == [
        f'iifname "{TAP}" udp sport 67 drop',
        f'iifname "{TAP}" udp sport 547 drop',
        f'iifname "{TAP}" meta protocol ip6 icmpv6 type {{ nd-router-advert, nd-redirect }} '
        'drop',
        f'iifname "{TAP}" meta protocol ip icmp type redirect drop',
        f'iifname "{TAP}" jump {ACL_OUT}',
        f'iifname "{TAP}" limit rate over 1000000 bytes/second burst 131072 bytes drop',
        f'oifname "{TAP}" ether type {{ 8021q, 8021ad }} counter drop',
        f'oifname "{TAP}" jump {ACL_IN}',
    ]
    assert nft.acl_rules(acls, inbound=False) == [
        'ip daddr 10.1.0.0/16 counter drop comment "acl 1 outbound"',
        'ip daddr 10.0.0.0/8 counter return comment "acl 0 outbound"',
    ]
    assert nft.acl_rules(acls, inbound=True) == [
        'ether saddr 52:54:00:aa:bb:cc counter drop comment "acl 2 inbound"',
        'ip saddr 10.1.0.0/16 counter drop comment "acl 1 inbound"',
        ND,
        'ip6 saddr fd00::/8 counter return comment "acl 3 inbound"',
    ]
    script = nft.port_script(plan(settings))
    assert f'add rule {T} {ACL_OUT} ip daddr 10.1.0.0/16 counter drop comment "acl 1 ' \
           'outbound"\n' in script
    # An allow never ends the base chain: the policer, and the inbound ACLs of the port
    # a frame goes to, still run after it.
    assert "accept" not in script.replace("policy accept", "")


ND = "meta protocol ip6 icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } return"


def _acl(action: str, direction: str, remote: str) -> PortAcl:
    return PortAcl(AclAction(action), AclDirection(direction), remote)


def test_deny_everything_allow_a_subnet_puts_the_allow_first() -> None:
    acls = (_acl("deny", "both", "0.0.0.0/0"), _acl("allow", "both", "10.0.0.0/8"))
    assert nft.acl_rules(acls, inbound=False) == [
        'ip daddr 10.0.0.0/8 counter return comment "acl 1 outbound"',
        'ip daddr 0.0.0.0/0 counter drop comment "acl 0 outbound"']
    assert nft.acl_rules(acls, inbound=True) == [
        'ip saddr 10.0.0.0/8 counter return comment "acl 1 inbound"',
        'ip saddr 0.0.0.0/0 counter drop comment "acl 0 inbound"']


def test_the_longest_prefix_decides_whatever_the_list_order_and_action() -> None:
    acls = (_acl("allow", "outbound", "10.0.0.0/8"), _acl("deny", "outbound", "10.1.2.3/32"),
            _acl("deny", "outbound", "10.1.0.0/16"), _acl("allow", "outbound", "10.1.2.0/24"))
    assert nft.acl_rules(acls, inbound=False) == [
        'ip daddr 10.1.2.3/32 counter drop comment "acl 1 outbound"',
        'ip daddr 10.1.2.0/24 counter return comment "acl 3 outbound"',
        'ip daddr 10.1.0.0/16 counter drop comment "acl 2 outbound"',
        'ip daddr 10.0.0.0/8 counter return comment "acl 0 outbound"']
    assert nft.acl_rules(acls, inbound=True) == []


def test_a_mac_acl_beats_every_ip_prefix() -> None:
    acls = (_acl("deny", "inbound", "10.0.0.5/32"), _acl("deny", "inbound", "::/0"),
            _acl("allow", "inbound", "52:54:00:aa:bb:cc"))
    assert nft.acl_rules(acls, inbound=True) == [
        'ether saddr 52:54:00:aa:bb:cc counter return comment "acl 2 inbound"',
        'ip saddr 10.0.0.5/32 counter drop comment "acl 0 inbound"',
        ND,
        'ip6 saddr ::/0 counter drop comment "acl 1 inbound"']


def test_between_equally_specific_acls_deny_wins_and_each_keeps_its_counter() -> None:
    acls = (_acl("allow", "both", "10.0.0.0/24"), _acl("allow", "outbound", "52:54:00:aa:bb:cc"),
            _acl("deny", "outbound", "10.0.0.0/24"), _acl("deny", "both", "52:54:00:aa:bb:cc"),
            _acl("allow", "outbound", "10.0.0.0/24"))
    assert nft.acl_rules(acls, inbound=False) == [
        'ether daddr 52:54:00:aa:bb:cc counter drop comment "acl 3 outbound"',
        'ether daddr 52:54:00:aa:bb:cc counter return comment "acl 1 outbound"',
        'ip daddr 10.0.0.0/24 counter drop comment "acl 2 outbound"',
        'ip daddr 10.0.0.0/24 counter return comment "acl 0 outbound"',
        'ip daddr 10.0.0.0/24 counter return comment "acl 4 outbound"']
    assert nft.acl_rules(acls, inbound=True) == [
        'ether saddr 52:54:00:aa:bb:cc counter drop comment "acl 3 inbound"',
        'ip saddr 10.0.0.0/24 counter return comment "acl 0 inbound"']


def test_ipv4_and_ipv6_prefixes_each_match_their_own_family_only() -> None:
    # An IPv4 allow cannot open IPv6 through an IPv6 deny (and the other way round):
    # ``ip`` and ``ip6`` matches each carry their protocol; neighbour discovery passes
    # the IPv6 prefixes as ARP passes the IPv4 ones (no IPv4 rule matches ARP).
    acls = (_acl("allow", "outbound", "0.0.0.0/0"), _acl("deny", "outbound", "::/0"),
            _acl("allow", "outbound", "2001:db8::/64"), _acl("deny", "outbound", "10.0.0.0/8"))
    assert nft.acl_rules(acls, inbound=False) == [
        'ip daddr 10.0.0.0/8 counter drop comment "acl 3 outbound"',
        'ip daddr 0.0.0.0/0 counter return comment "acl 0 outbound"',
        ND,
        'ip6 daddr 2001:db8::/64 counter return comment "acl 2 outbound"',
        'ip6 daddr ::/0 counter drop comment "acl 1 outbound"']
    assert ND not in nft.acl_rules(acls[:1], inbound=False)


def test_a_port_without_acls_jumps_to_no_acl_chain() -> None:
    rules = nft.port_rules(plan(PortSettings(bandwidth_max=8_000_000)))
    assert not [r for r in rules if "jump" in r]
    only_in = nft.port_rules(plan(PortSettings(acls=(_acl("deny", "inbound", "::/0"),))))
    assert [r for r in only_in if "jump" in r] == [f'oifname "{TAP}" jump {ACL_IN}']


TAGGED = f'oifname "{TAP}" ether type {{ 8021q, 8021ad }} counter drop'


def test_every_port_drops_every_vlan_tagged_frame_the_bridge_sends_it() -> None:
    """Whatever its settings (a trunk's tagged frames bypass the bridge), first of the
    rules for frames to the VM, before the inbound ACLs; by the outer tag, 802.1Q or
    802.1ad, read with ``ether type`` (``meta protocol`` misses an offloaded tag)."""
    bare = PortSettings(mac_spoofing=True)
    assert nft.port_rules(plan(bare)) == [TAGGED]
    rules = nft.port_rules(plan(PortSettings(acls=(_acl("deny", "inbound", "::/0"),))))
    assert [r for r in rules if r.startswith("oifname")] == [
        TAGGED, f'oifname "{TAP}" jump {ACL_IN}']
    assert f'add rule {T} port_{TAP} {TAGGED}\n' in nft.port_script(plan(bare))


def test_the_policer_bucket_holds_a_gso_frame_and_stays_in_the_kernels_range() -> None:
    assert nft.burst_bytes(1000) == nft.MIN_BURST
    assert nft.burst_bytes(1_000_000_000) == 1_000_000_000 // 8 // 20
    assert nft.burst_bytes(400 * 10**9) == nft.MAX_BURST
    rule = nft.port_rules(plan(PortSettings(mac_spoofing=True, bandwidth_max=400 * 10**9)))
    assert rule == [f'iifname "{TAP}" limit rate over {2**34} bytes/second burst '
                    f'{2**27} bytes drop', TAGGED]


def test_removing_a_port_adds_what_it_deletes_so_absence_is_no_error() -> None:
    assert nft.port_removal_script(TAP, TABLE) == f"""add table {T}
add map {T} from_vm {{ type ifname : verdict ; }}
add map {T} to_vm {{ type ifname : verdict ; }}
add chain {T} port_{TAP}
add chain {T} {ACL_IN}
add chain {T} {ACL_OUT}
add element {T} from_vm {{ "{TAP}" : jump port_{TAP} }}
delete element {T} from_vm {{ "{TAP}" }}
add element {T} to_vm {{ "{TAP}" : jump port_{TAP} }}
delete element {T} to_vm {{ "{TAP}" }}
flush chain {T} port_{TAP}
delete chain {T} port_{TAP}
flush chain {T} {ACL_IN}
delete chain {T} {ACL_IN}
flush chain {T} {ACL_OUT}
delete chain {T} {ACL_OUT}
"""


def test_nat_switch_rules() -> None:
    mappings = (NatMapping(NatProtocol.TCP, 8080, "172.16.0.5", 80),
                NatMapping(NatProtocol.UDP, 53, "172.16.0.6", 5353))
    i, net = f"ip {TABLE}", "172.16.0.0/24"
    assert nft.nat_script(nat(mappings)) == f"""add table {i}
add chain {i} post_{BRIDGE} {{ type nat hook postrouting priority srcnat ; policy accept ; }}
flush chain {i} post_{BRIDGE}
add rule {i} post_{BRIDGE} iifname "{BRIDGE}" oifname != "{BRIDGE}" ip saddr {net} ip daddr != {net} masquerade
add rule {i} post_{BRIDGE} ip saddr {net} ip daddr {net} ct status dnat masquerade
add chain {i} pre_{BRIDGE} {{ type nat hook prerouting priority dstnat ; policy accept ; }}
flush chain {i} pre_{BRIDGE}
add rule {i} pre_{BRIDGE} fib daddr type local tcp dport 8080 dnat to 172.16.0.5:80
add rule {i} pre_{BRIDGE} fib daddr type local udp dport 53 dnat to 172.16.0.6:5353
add chain {i} out_{BRIDGE} {{ type nat hook output priority -100 ; policy accept ; }}
flush chain {i} out_{BRIDGE}
add rule {i} out_{BRIDGE} ip daddr != 127.0.0.0/8 fib daddr type local tcp dport 8080 dnat to 172.16.0.5:80
add rule {i} out_{BRIDGE} ip daddr != 127.0.0.0/8 fib daddr type local udp dport 53 dnat to 172.16.0.6:5353
add chain {i} fwd_{BRIDGE} {{ type filter hook forward priority filter ; policy accept ; }}
flush chain {i} fwd_{BRIDGE}
add rule {i} fwd_{BRIDGE} iifname "{BRIDGE}" ip saddr {net} accept
add rule {i} fwd_{BRIDGE} oifname "{BRIDGE}" ip daddr {net} ct state established,related accept
add rule {i} fwd_{BRIDGE} oifname "{BRIDGE}" ip daddr {net} ct status dnat accept
"""  # noqa: E501


def test_a_switch_that_is_not_nat_gets_its_nat_chains_removed() -> None:
    script = nft.nat_script(nat(type=SwitchType.INTERNAL))
    assert script == nft.nat_removal_script(nat())
    assert script.count("delete chain") == 4 and "masquerade" not in script


def test_removing_the_table_covers_both_families() -> None:
    assert nft.table_removal_script(TABLE) == (
        f"add table bridge {TABLE}\ndelete table bridge {TABLE}\n"
        f"add table ip {TABLE}\ndelete table ip {TABLE}\n")


@pytest.mark.parametrize("changes", [
    {"tap": 'hvt1" drop; x'}, {"tap": "eth0"}, {"tap": "hvt1234567890abc"},
    {"table": "filter"}, {"table": "hvstack_x y"}, {"mac": "52:54:00:12:34"},
    {"mac": "52:54:00:12:34:5G"}, {"mac": '52:54:00:12:34:56" accept'},
])
def test_values_that_are_not_what_they_claim_never_reach_nft(changes: dict[str, str]) -> None:
    with pytest.raises(InvalidInput):
        nft.port_script(plan(**changes))


@pytest.mark.parametrize("remote", ["10.1.2.3/8", "any", "10.0.0.0/8 accept", "52-54-00-aa-bb"])
def test_bad_acl_remotes_are_refused(remote: str) -> None:
    acl = PortAcl(AclAction.DENY, AclDirection.OUTBOUND, remote)
    with pytest.raises(InvalidInput):
        nft.port_rules(plan(PortSettings(acls=(acl,))))


@pytest.mark.parametrize("changes", [
    {"bridge": "br0"}, {"subnet": None},
    {"mappings": (NatMapping(NatProtocol.TCP, 0, "172.16.0.5", 80),)},
    {"mappings": (NatMapping(NatProtocol.TCP, 80, "172.16.0.5", 70000),)},
    {"mappings": (NatMapping(NatProtocol.TCP, 80, "172.16.0.5:81", 80),)},
    {"mappings": (NatMapping(NatProtocol.TCP, 80, "fd00::1", 80),)},
])
def test_bad_nat_plans_are_refused(changes: dict[str, object]) -> None:
    with pytest.raises(InvalidInput):
        nft.nat_script(nat(**changes))


def _rule(comment: str | None, packets: int, size: int, chain: str = ACL_IN
          ) -> dict[str, object]:
    rule: dict[str, object] = {"family": "bridge", "table": TABLE, "chain": chain,
                               "expr": [{"match": {}}, {"counter": {"packets": packets,
                                                                    "bytes": size}}]}
    if comment is not None:
        rule["comment"] = comment
    return {"rule": rule}


def test_counters_are_read_back_by_acl_index_and_direction() -> None:
    other = "acl_in_hvt1234567890ac"
    text = json.dumps({"nftables": [
        {"metainfo": {"version": "1.0.6"}}, {"chain": {"name": ACL_IN}},
        _rule("acl 3 inbound", 1, 60), _rule("acl 1 outbound", 7, 700, ACL_OUT),
        _rule(None, 9, 900), _rule("acl 1 inbound", 0, 0), _rule("something else", 2, 2),
        _rule("acl 0 inbound", 5, 5, other), _rule("acl 0 inbound", 6, 6, f"port_{TAP}")]})
    assert nft.parse_acl_counters(text, TAP) == (
        AclCounter(1, "inbound", 0, 0), AclCounter(1, "outbound", 7, 700),
        AclCounter(3, "inbound", 1, 60))


async def test_apply_and_remove_feed_one_transaction_to_nft(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[list[str], bytes | None]] = []

    async def fake_run(argv: list[str], **kw: object) -> bytes:
        calls.append((list(argv), kw.get("input")))  # type: ignore[arg-type]
        return b""

    monkeypatch.setattr(runner, "run", fake_run)
    await nft.apply_port(plan())
    await nft.remove_port(TAP, TABLE)
    await nft.apply_switch(nat())
    await nft.remove_switch(nat())
    await nft.remove_table(TABLE)
    listing = ["nft", "-j", "list", "map", "bridge", TABLE, "from_vm"]
    assert [c[0] for c in calls] == [listing, ["nft", "-f", "-"]] * 2 + [["nft", "-f", "-"]] * 3
    assert [c[1] for c in calls if c[1] is not None] == [s.encode() for s in (
        nft.port_script(plan()), nft.port_removal_script(TAP, TABLE), nft.nat_script(nat()),
        nft.nat_removal_script(nat()), nft.table_removal_script(TABLE))]


OLD_VETH = "hvv12345abcdef0"


def map_listing(*elements: tuple[str, str]) -> str:
    return json.dumps({"nftables": [{"metainfo": {}}, {"map": {
        "family": "bridge", "name": "from_vm", "table": TABLE, "type": "ifname",
        "map": "verdict", "elem": [[k, {"jump": {"target": t}}] for k, t in elements]}}]})


def test_a_trunks_veths_jump_to_its_chain_and_former_ones_are_dropped() -> None:
    """A trunk's tagged frames cross their VLAN's bridge through its veths: the port's
    guards and ACLs match there too."""
    from hvstack.network.model import Vlan, VlanMode
    from hvstack.network.names import veth_names

    trunk = plan(PortSettings(vlan=Vlan(VlanMode.TRUNK, allowed=(10, 20), native=20)))
    v10 = veth_names("12345", TAP, 10)[0]
    assert nft.port_interfaces(trunk) == [TAP, v10]
    assert nft.port_interfaces(plan(trunk.settings, bridge=None)) == [TAP]
    ifs = f'{{ "{TAP}", "{v10}" }}'
    assert nft.port_script(trunk, (OLD_VETH, v10)) == BASE + CHAINS + f"""\
{CHAIN} iifname {ifs} ether saddr != {MAC} drop
{CHAIN} iifname {ifs} meta protocol arp arp saddr ether != {MAC} drop
{CHAIN} oifname {ifs} ether type {{ 8021q, 8021ad }} counter drop
add element {T} from_vm {{ "{OLD_VETH}" : jump port_{TAP} }}
delete element {T} from_vm {{ "{OLD_VETH}" }}
add element {T} to_vm {{ "{OLD_VETH}" : jump port_{TAP} }}
delete element {T} to_vm {{ "{OLD_VETH}" }}
add element {T} from_vm {{ "{TAP}" : jump port_{TAP} }}
add element {T} from_vm {{ "{v10}" : jump port_{TAP} }}
add element {T} to_vm {{ "{TAP}" : jump port_{TAP} }}
add element {T} to_vm {{ "{v10}" : jump port_{TAP} }}
"""
    removal = nft.port_removal_script(TAP, TABLE, (v10,))
    assert f'delete element {T} to_vm {{ "{v10}" }}' in removal
    assert removal.endswith(f"delete chain {T} acl_out_{TAP}\n")
    assert nft.veth_entries(map_listing((TAP, f"port_{TAP}"), (v10, f"port_{TAP}"),
                                        (OLD_VETH, "port_hvt12345aaaaaaa")), TAP) == (v10,)
    with pytest.raises(InvalidInput):
        nft.port_script(trunk, ("eth0; flush ruleset",))


async def test_applying_a_trunk_drops_its_former_veths(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    scripts: list[bytes] = []

    async def fake_run(argv: list[str], **kw: object) -> bytes:
        if "-j" in argv:
            return map_listing((OLD_VETH, f"port_{TAP}")).encode()
        scripts.append(kw["input"])  # type: ignore[arg-type]
        return b""

    monkeypatch.setattr(runner, "run", fake_run)
    await nft.apply_port(plan())
    await nft.remove_port(TAP, TABLE)
    assert scripts == [nft.port_script(plan(), (OLD_VETH,)).encode(),
                       nft.port_removal_script(TAP, TABLE, (OLD_VETH,)).encode()]
    assert f'delete element {T} from_vm {{ "{OLD_VETH}" }}'.encode() in scripts[0]


async def test_counters_of_a_port_without_a_chain_are_none(
        monkeypatch: pytest.MonkeyPatch) -> None:
    async def fake_run(argv: list[str], **kw: object) -> bytes:
        assert argv == ["nft", "-j", "list", "table", "bridge", TABLE]
        raise kw["errors"](1, "Error: No such file or directory")  # type: ignore[operator]

    monkeypatch.setattr(runner, "run", fake_run)
    assert await nft.acl_counters(TAP, TABLE) == ()


async def test_a_missing_privilege_says_what_is_needed(monkeypatch: pytest.MonkeyPatch) -> None:
    async def fake_run(argv: list[str], **kw: object) -> bytes:
        raise kw["errors"](1, "Error: Operation not permitted")  # type: ignore[operator]

    monkeypatch.setattr(runner, "run", fake_run)
    with pytest.raises(HypervisorError, match=r"CAP_NET_ADMIN.*user-mode NAT"):
        await nft.apply_port(plan())
    with pytest.raises(HypervisorError, match="CAP_NET_ADMIN"):
        await nft.acl_counters(TAP, TABLE)

