"""tc commands from port plans (golden), and what apply/clear run."""

from __future__ import annotations

import pytest

from hvstack import runner
from hvstack.errors import InvalidInput
from hvstack.network import tc
from hvstack.network.backend import PortPlan
from hvstack.network.model import MirrorMode, PortSettings

TAP, DEST, MAC = "hvt1234567890ab", "hvt12345fedcba9", "52:54:00:12:34:56"
BRIDGE, OTHER = "hvb12345abcdef", "hvb12345000000"
MIRROR = ["protocol", "all", "u32", "match", "u32", "0", "0", "action", "mirred", "egress",
          "mirror", "dev", DEST, "continue"]
KEEP_CLSACT = [["filter", "del", "dev", TAP, "ingress", "pref", "1"],
               ["filter", "del", "dev", TAP, "egress", "pref", "1"]]


def plan(settings: PortSettings = PortSettings(), mirror_to: str | None = None,
         bridge: str | None = BRIDGE) -> PortPlan:
    return PortPlan(TAP, MAC, "vm1", settings, "hvstack_12345", bridge, None, mirror_to)


def test_a_plain_port_has_no_shaping_and_no_mirror() -> None:
    # Only the mirror filters go: a trunk's VLAN program stays on the clsact qdisc.
    assert tc.tap_commands(plan()) == [*KEEP_CLSACT, ["qdisc", "del", "dev", TAP, "root"]]


def test_maximum_to_the_vm_is_a_tbf_and_mirroring_copies_both_ways() -> None:
    settings = PortSettings(bandwidth_max=8_000_000, mirror=MirrorMode.SOURCE)
    assert tc.tap_commands(plan(settings, DEST)) == [
        *KEEP_CLSACT,
        ["qdisc", "replace", "dev", TAP, "root", "tbf", "rate", "8000000bit", "burst",
         "131072", "latency", "50ms"],
        ["qdisc", "replace", "dev", TAP, "clsact"],
        ["filter", "add", "dev", TAP, "ingress", "pref", "1", *MIRROR],
        ["filter", "add", "dev", TAP, "egress", "pref", "1", *MIRROR],
    ]
    # Without a destination (its VM is off), or not a source: no mirror.
    assert len(tc.tap_commands(plan(settings, DEST), mirror=False)) == 3
    assert len(tc.tap_commands(plan(settings))) == 3
    assert len(tc.tap_commands(plan(PortSettings(mirror=MirrorMode.DESTINATION), DEST))) == 3


def test_minimum_is_a_class_on_the_bridge_chosen_by_the_vms_mac() -> None:
    minor = tc.class_minor(TAP)
    assert 2 <= minor <= 0xFFF1 and minor == tc.class_minor(TAP)
    link = "10000000000bit"
    assert tc.htb_root_command(BRIDGE) == ["qdisc", "replace", "dev", BRIDGE, "root",
                                           "handle", "1:", "htb", "default", "fffe"]
    assert tc.min_commands(plan(PortSettings(bandwidth_min=50_000_000))) == [
        ["class", "replace", "dev", BRIDGE, "parent", "1:", "classid", "1:ffff", "htb",
         "rate", link, "ceil", link, "quantum", "60000"],
        ["class", "replace", "dev", BRIDGE, "parent", "1:ffff", "classid", "1:fffe", "htb",
         "rate", "1mbit", "ceil", link, "quantum", "60000"],
        ["class", "replace", "dev", BRIDGE, "parent", "1:ffff", "classid", f"1:{minor:x}",
         "htb", "rate", "50000000bit", "ceil", link, "quantum", "60000"],
        ["filter", "del", "dev", BRIDGE, "parent", "1:", "pref", str(minor)],
        ["filter", "add", "dev", BRIDGE, "parent", "1:", "pref", str(minor), "protocol",
         "all", "u32", "match", "ether", "dst", MAC, "flowid", f"1:{minor:x}"],
    ]


@pytest.mark.parametrize("bad", [
    plan(PortSettings(mirror=MirrorMode.SOURCE), "eth0"),
    plan(PortSettings(mirror=MirrorMode.SOURCE), TAP),
    PortPlan("hvt1; reboot", MAC, "vm1", PortSettings(), "hvstack_12345"),
    plan(PortSettings(bandwidth_max=10)),
])
def test_bad_plans_are_refused(bad: PortPlan) -> None:
    with pytest.raises(InvalidInput):
        tc.tap_commands(bad)


async def _record(monkeypatch: pytest.MonkeyPatch, interfaces: set[str],
                  root: bytes = b"qdisc noqueue 0: root refcnt 2\n") -> list[list[str]]:
    calls: list[list[str]] = []

    async def fake_run(argv: list[str], **kw: object) -> bytes:
        calls.append(list(argv))
        return root if argv[1:3] == ["qdisc", "show"] else b""

    monkeypatch.setattr(runner, "run", fake_run)
    monkeypatch.setattr(tc, "_interfaces", lambda: interfaces)
    return calls


async def test_apply_moves_the_minimum_class_to_the_ports_bridge(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls = await _record(monkeypatch, {TAP, BRIDGE, OTHER, "hvbfffffaaaaaa", "eth0"})
    p = plan(PortSettings(bandwidth_min=50_000_000))
    await tc.apply_port(p)
    assert calls == [["tc", *c] for c in [
        *tc.tap_commands(p), *tc.min_removal_commands(TAP, OTHER),
        ["class", "show", "dev", OTHER],
        ["qdisc", "show", "dev", BRIDGE, "root"], tc.htb_root_command(BRIDGE),
        *tc.min_commands(p)]]


async def test_an_existing_htb_tree_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = await _record(monkeypatch, {BRIDGE}, b"qdisc htb 1: root refcnt 2 r2q 10\n")
    await tc.apply_port(plan(PortSettings(bandwidth_min=50_000_000)))
    assert ["tc", *tc.htb_root_command(BRIDGE)] not in calls


async def test_clear_removes_shaping_mirror_and_classes_everywhere(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls = await _record(monkeypatch, {BRIDGE, OTHER})
    await tc.clear_port(TAP)
    assert calls == [["tc", *c] for c in [
        ["qdisc", "del", "dev", TAP, "root"], ["qdisc", "del", "dev", TAP, "clsact"],
        *tc.min_removal_commands(TAP, OTHER), ["class", "show", "dev", OTHER],
        *tc.min_removal_commands(TAP, BRIDGE), ["class", "show", "dev", BRIDGE]]]


async def test_the_htb_tree_goes_with_the_last_vms_class(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls = await _record(monkeypatch, {BRIDGE})
    shown = (b"class htb 1:ffff root rate 10Gbit ceil 10Gbit burst 0b cburst 0b \n"
             b"class htb 1:fffe parent 1:ffff prio 0 rate 1Mbit ceil 10Gbit \n")

    async def fake_run(argv: list[str], **kw: object) -> bytes:
        calls.append(list(argv))
        return shown if argv[1:3] == ["class", "show"] else b""

    monkeypatch.setattr(runner, "run", fake_run)
    await tc.clear_port(TAP)
    assert calls[-1] == ["tc", "qdisc", "del", "dev", BRIDGE, "root"]
    assert tc.vm_classes(shown.decode()) == set()
    assert tc.vm_classes(shown.decode() + "class htb 1:70dc parent 1:ffff prio 0 ") == {"1:70dc"}


async def test_a_tap_name_without_a_tag_touches_no_bridge(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls = await _record(monkeypatch, {BRIDGE, OTHER})
    await tc.clear_port("hvt1234567")
    assert calls == [["tc", "qdisc", "del", "dev", "hvt1234567", "root"],
                     ["tc", "qdisc", "del", "dev", "hvt1234567", "clsact"]]
