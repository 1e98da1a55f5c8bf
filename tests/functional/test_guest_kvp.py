"""KVP exchange with a fake guest agent: Hyper-V's limits, the host pool persisted and
written into the guest atomically, the guest pool and intrinsic data read back, the
switch, and ``hv vm kvp``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from hvstack.errors import InvalidInput
from hvstack.host.service import HostService
from hvstack.integration.rules import (
    check_kvp_item,
    format_kvp,
    intrinsic_data,
    parse_kvp,
)
from tests.functional.fakes import API, assert_problem, eventually, run_job
from tests.functional.guest_cli import hv

if TYPE_CHECKING:
    from hvstack.integration.ops import GuestOperations
    from hvstack.integration.rules import GuestPolicy
    from tests.functional.guest_support import Guests

pytest_plugins = ("tests.functional.guest_support",)


@pytest.mark.parametrize(("key", "value"), [
    ("k" * 512, "v" * 2048),
    ("ключ", "значение"),
    ("a b", ""),
    ("é" * 256, "€" * 682),  # 512 and 2046 bytes of UTF-8
])
def test_items_within_the_limits(key: str, value: str) -> None:
    check_kvp_item(key, value)


@pytest.mark.parametrize(("key", "value", "why"), [
    ("", "v", "must not be empty"),
    ("k" * 513, "v", "513 bytes"),
    ("é" * 257, "v", "514 bytes"),
    ("k", "v" * 2049, "2049 bytes"),
    ("k", "€" * 683, "2049 bytes"),
    ("a=b", "v", "'='"),
    ("a\nb", "v", "control characters"),
    ("k", "line\nbreak", "control characters"),
    ("k", "tab\there", "control characters"),
    ("k\x00", "v", "control characters"),
    ("k", "sep\u2028", "control characters"),
])
def test_items_beyond_the_limits(key: str, value: str, why: str) -> None:
    with pytest.raises(InvalidInput, match=why):
        check_kvp_item(key, value)


def test_file_format_round_trip() -> None:
    pool = {"b": "2", "a": "x=y", "ключ": "значение", "empty": ""}
    data = format_kvp(pool)
    assert data == "a=x=y\nb=2\nempty=\nключ=значение\n".encode()
    assert parse_kvp(data) == (pool, 0)
    assert parse_kvp(b"ok=1\r\nno separator\n=no key\nok=2\n\n" + b"k" * 600 + b"=v\n") == (
        {"ok": "2"}, 3)


def test_intrinsic_items() -> None:
    data = intrinsic_data({
        "guest-get-osinfo": {"kernel-release": "6.1.0", "machine": "x86_64"},
        "guest-get-host-name": {"host-name": "tiny"},
        "guest-network-get-interfaces": [{"name": "lo", "ip-addresses": [
            {"ip-address-type": "ipv4", "ip-address": "127.0.0.1"},
            {"ip-address-type": "ipv6", "ip-address": "::1"}]}],
    }, {"guest-get-fsinfo": "not supported"})
    assert data.items == {"FullyQualifiedDomainName": "tiny", "OSName": "Linux",
                          "OSKernelRelease": "6.1.0", "ProcessorArchitecture": "x86_64",
                          "NetworkAddressIPv4": "127.0.0.1", "NetworkAddressIPv6": "::1"}
    assert data.errors == {"guest-get-fsinfo": "not supported"}


async def test_set_delete_and_list(guest_api: httpx.AsyncClient, guests: Guests,
                                   service: HostService, guest_policy: GuestPolicy) -> None:
    await guests.boot("g1")
    host_file = Path(guest_policy.kvp_dir) / "host"
    reply = await guest_api.put(f"{API}/vms/g1/kvp", json={"key": "color", "value": "blue"})
    assert reply.status_code == 200, reply.text
    assert reply.json() == {"key": "color", "value": "blue", "pushed": True,
                            "push_error": None, "host": {"color": "blue"}}
    await guest_api.put(f"{API}/vms/g1/kvp", json={"key": "size", "value": "L"})
    assert service.get_vm("g1").record.config.kvp_pool == {"color": "blue", "size": "L"}
    assert host_file.read_text() == "color=blue\nsize=L\n"
    assert sorted(p.name for p in host_file.parent.iterdir()) == ["host"]  # no temp file

    (host_file.parent / "guest").write_text("mood=happy\nbroken line\nuptime=42\n")
    listing = (await guest_api.get(f"{API}/vms/g1/kvp")).json()
    assert listing["host"] == {"color": "blue", "size": "L"}
    assert listing["guest"] == {"mood": "happy", "uptime": "42"}
    assert (listing["guest_available"], listing["ignored_guest_lines"]) == (True, 1)
    items = listing["intrinsic"]["items"]
    assert items["OSName"] == "Fake Linux 1.0"
    assert items["FullyQualifiedDomainName"] == "fake-guest"
    assert items["NetworkAddressIPv4"] == "127.0.0.1;10.0.2.15"
    assert items["NetworkAddressIPv6"] == "::1"
    assert [a["name"] for a in listing["intrinsic"]["adapters"]] == ["lo", "eth0"]
    assert listing["intrinsic"]["filesystems"][0]["mountpoint"] == "/data"

    reply = await guest_api.delete(f"{API}/vms/g1/kvp", params={"key": "color"})
    assert reply.json()["host"] == {"size": "L"}
    assert host_file.read_text() == "size=L\n"
    assert_problem(await guest_api.delete(f"{API}/vms/g1/kvp", params={"key": "color"}), 404,
                   "not-found")


async def test_limits_through_the_api(guest_api: httpx.AsyncClient, guests: Guests) -> None:
    await guests.boot("g1")
    for key, value in (("k" * 513, "v"), ("k", "v" * 2049), ("a=b", "v"), ("k", "a\nb")):
        reply = await guest_api.put(f"{API}/vms/g1/kvp", json={"key": key, "value": value})
        assert_problem(reply, 400, "invalid-input")
    assert (await guest_api.get(f"{API}/vms/g1/kvp")).json()["host"] == {}


async def test_pool_reaches_a_guest_that_starts_later(guest_api: httpx.AsyncClient,
                                                      guests: Guests, guest_ops: GuestOperations,
                                                      guest_policy: GuestPolicy) -> None:
    await guests.boot("g1", agent=False)
    await run_job(guest_api, "g1", "stop", {"mode": "turn-off"})
    reply = (await guest_api.put(f"{API}/vms/g1/kvp", json={"key": "role", "value": "web"})).json()
    assert (reply["pushed"], reply["push_error"]) == (False, "VM 'g1' is Off")
    listing = (await guest_api.get(f"{API}/vms/g1/kvp")).json()
    assert (listing["host"], listing["guest_available"]) == ({"role": "web"}, False)

    await run_job(guest_api, "g1", "start")
    vm = guests.service.get_vm("g1")
    await guests.attach("g1")
    # What the heartbeat does when the agent first answers:
    assert await guest_ops.push_kvp(vm) is True
    assert (Path(guest_policy.kvp_dir) / "host").read_text() == "role=web\n"


async def test_the_guest_gets_the_pool_on_contact(guest_api: httpx.AsyncClient, guests: Guests,
                                                  service: HostService,
                                                  guest_policy: GuestPolicy) -> None:
    await guests.boot("g1", agent=False)
    await guest_api.put(f"{API}/vms/g1/kvp", json={"key": "role", "value": "db"})
    await guests.attach("g1")
    host_file = Path(guest_policy.kvp_dir) / "host"
    await eventually(host_file.exists, "the heartbeat's contact pushed the pool", timeout=20)
    assert host_file.read_text() == "role=db\n"


async def test_kvp_needs_its_service(guest_api: httpx.AsyncClient, guests: Guests) -> None:
    await guests.boot("g1", kvp=False)
    for reply in (await guest_api.get(f"{API}/vms/g1/kvp"),
                  await guest_api.put(f"{API}/vms/g1/kvp", json={"key": "k", "value": "v"}),
                  await guest_api.delete(f"{API}/vms/g1/kvp", params={"key": "k"})):
        problem = assert_problem(reply, 409, "integration-service-disabled")
        assert problem["service"] == "kvp"


async def test_unanswering_guest_is_reported_not_fatal(guest_api: httpx.AsyncClient,
                                                       guests: Guests) -> None:
    fake = await guests.boot("g1")
    fake.hang = True
    reply = (await guest_api.put(f"{API}/vms/g1/kvp", json={"key": "k", "value": "v"})).json()
    assert reply["pushed"] is False and "did not answer" in reply["push_error"]
    listing = (await guest_api.get(f"{API}/vms/g1/kvp")).json()
    assert (listing["host"], listing["guest_available"]) == ({"k": "v"}, False)



async def test_cli_kvp(guest_served: str, guests: Guests, guest_policy: GuestPolicy) -> None:
    await guests.boot("g1")
    result = await hv(guest_served, "vm", "kvp", "set", "g1", "color", "blue")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "Set 'color' on g1 (written into the guest)"
    (Path(guest_policy.kvp_dir) / "guest").write_text("mood=happy\n")
    result = await hv(guest_served, "vm", "kvp", "list", "g1")
    assert result.exit_code == 0, result.output
    for text in ("Host to guest", "color", "blue", "Guest to host", "mood", "happy",
                 "Intrinsic", "OSName", "Fake Linux 1.0", "127.0.0.1"):
        assert text in result.stdout, text
    data = json.loads((await hv(guest_served, "vm", "kvp", "list", "g1", "-o", "json")).stdout)
    assert (data["host"], data["guest"]) == ({"color": "blue"}, {"mood": "happy"})
    result = await hv(guest_served, "vm", "kvp", "set", "g1", "bad=key", "x")
    assert (result.exit_code, result.stderr.strip()) == (
        2, "error: KVP key 'bad=key' must not contain '='")
    result = await hv(guest_served, "vm", "kvp", "delete", "g1", "color")
    assert result.exit_code == 0 and "Deleted 'color'" in result.stdout
