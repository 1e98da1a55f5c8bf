"""``hv switch ...``, ``hv vm nic ...`` and ``hv vm create --switch/--no-network``
against the API served in-process on the fake network backend; bad input is one line
and exit code 2."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hvstack.api.app import create_app
from hvstack.client import Client
from hvstack.host.root import HostRoot
from tests.functional.fakes import serve_on_unix_socket
from tests.functional.test_cli import hv
from tests.functional.test_network_switches import Net
from tests.functional.test_network_switches import net as net  # the fixture


@pytest.fixture
async def served(net: Net, tmp_path: Path) -> AsyncIterator[str]:
    app = create_app(HostRoot(net.service, network=net.ops))
    async with serve_on_unix_socket(app, tmp_path / "hv.sock") as host:
        yield host


def one_error(result: object, words: str) -> None:
    assert result.exit_code == 2, result.output  # type: ignore[attr-defined]
    lines = result.stderr.strip().splitlines()  # type: ignore[attr-defined]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert words in lines[0], lines[0]


async def test_switch_commands(served: str, net: Net) -> None:
    result = await hv(served, "switch", "create", "lab", "--type", "internal",
                      "--subnet", "192.168.50.0/24")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "Created switch 'lab' (internal, 192.168.50.0/24)"
    result = await hv(served, "switch", "list", "-o", "json")
    assert [s["name"] for s in json.loads(result.stdout)] == ["Default Switch", "lab"]
    result = await hv(served, "switch", "set", "lab", "--name", "lab [red]x[red]",
                      "--notes", "a\x1bb")
    assert result.exit_code == 0, result.output
    assert "lab [red]x[red]" in result.stdout and "a\\x1bb" in result.stdout
    result = await hv(served, "switch", "show", "lab [red]x[red]", "-o", "json")
    assert json.loads(result.stdout)["host_address"] == "192.168.50.1/24"
    result = await hv(served, "switch", "nat", "add-mapping", "Default Switch",
                      "--external-port", "8080", "--internal-ip", "172.16.1.9",
                      "--internal-port", "80")
    assert result.exit_code == 0, result.output
    result = await hv(served, "switch", "nat", "list", "Default Switch")
    assert "8080" in result.stdout and "172.16.1.9" in result.stdout
    result = await hv(served, "switch", "nat", "remove-mapping", "Default Switch",
                      "--external-port", "8080")
    assert result.exit_code == 0, result.output
    result = await hv(served, "vm", "create", "web", "--memory", "64M", "--switch",
                      "lab [red]x[red]", "--switch", "Default Switch")
    assert result.exit_code == 0, result.output
    one_error(await hv(served, "switch", "delete", "lab [red]x[red]"), "--force")
    result = await hv(served, "switch", "delete", "lab [red]x[red]", "--force")
    assert result.exit_code == 0, result.output
    assert "disconnected" in result.stdout


@pytest.mark.parametrize(("args", "words"), [
    (["switch", "create", "x", "--type", "external", "--adapter", "eth9"],
     "no network interface named 'eth9'"),
    (["switch", "create", "x", "--type", "nat", "--subnet", "172.16.1.0/25"], "overlaps"),
    (["switch", "create", "x", "--type", "private", "--subnet", "10.0.0.0/24"], "VMs only"),
    (["switch", "show", "nowhere"], "no switch named 'nowhere'"),
    (["switch", "set", "Default Switch"], "nothing to change"),
    (["vm", "create", "x", "--switch", "nowhere"], "no switch named 'nowhere'"),
    (["vm", "create", "x", "--switch", "lab", "--no-network"], "exclude each other"),
    (["vm", "nic", "add", "web", "--mac", "01:00:5e:00:00:01"], "multicast"),
    (["vm", "nic", "add", "web", "--vlan", "4095"], "outside 1-4094"),
    (["vm", "nic", "add", "web", "--vlan", "ten"], "not a VLAN id"),
    (["vm", "nic", "add", "web", "--trunk", "10,9000"], "outside 1-4094"),
    (["vm", "nic", "add", "web", "--bandwidth-max", "fast"], "not a rate"),
    (["vm", "nic", "add", "web", "--acl", "deny:sideways:10.0.0.0/8"], "--acl"),
    (["vm", "nic", "add", "web", "--acl", "deny:inbound:10.0.0.1/8"], "IP prefix"),
    (["vm", "nic", "add", "web", "--switch", "nowhere"], "no switch named 'nowhere'"),
    (["vm", "nic", "set", "web", "52:54:00:01:02:03", "--vlan", "5"], "no network adapter"),
    (["vm", "nic", "remove", "web", "52:54:00:01:02:03"], "no network adapter"),
])
async def test_bad_input_is_one_line_and_exit_code_2(served: str, args: list[str],
                                                     words: str) -> None:
    assert (await hv(served, "vm", "create", "web", "--memory", "64M")).exit_code == 0
    one_error(await hv(served, *args), words)


async def test_nic_commands_and_vm_show(served: str, net: Net) -> None:
    result = await hv(served, "vm", "create", "web", "--memory", "64M", "--no-network")
    assert result.exit_code == 0, result.output
    result = await hv(served, "vm", "nic", "add", "web", "--mac", "52:54:00:00:00:05",
                      "--vlan", "10", "--bandwidth-max", "100M", "--dhcp-guard",
                      "--acl", "deny:outbound:10.0.0.0/8")
    assert result.exit_code == 0, result.output
    assert "52:54:00:00:00:05 (virtio, switch 'Default Switch', VLAN 10)" in result.stdout
    result = await hv(served, "vm", "nic", "set", "web", "52:54:00:00:00:05", "--disconnect",
                      "--trunk", "10,20", "--native-vlan", "10", "--no-acls")
    assert result.exit_code == 0, result.output
    assert "not connected, VLAN trunk 10,20 native 10" in result.stdout
    result = await hv(served, "vm", "show", "web")
    assert "52:54:00:00:00:05 (virtio, not connected" in result.stdout
    result = await hv(served, "vm", "nic", "list", "web")
    assert result.exit_code == 0 and "not connected" in result.stdout
    nics = json.loads((await hv(served, "vm", "nic", "list", "web", "-o", "json")).stdout)
    assert nics[0]["port"]["acls"] == [] and nics[0]["port"]["dhcp_guard"] is True
    # a new MAC while the VM is off (the client's mac parameter is positional-only)
    result = await hv(served, "vm", "nic", "set", "web", "52:54:00:00:00:05", "--mac",
                      "52:54:00:00:00:06")
    assert result.exit_code == 0, result.output
    assert "52:54:00:00:00:06 (virtio" in result.stdout
    result = await hv(served, "vm", "nic", "remove", "web", "52:54:00:00:00:06")
    assert result.exit_code == 0, result.output


async def test_the_python_client(served: str, net: Net) -> None:
    import asyncio

    def use() -> None:
        with Client(served) as api:
            lab = api.create_switch("lab #1?", "private", notes="slash in the name")
            assert api.get_switch("lab #1?")["id"] == lab["id"]
            assert api.update_switch(lab["id"], name="lab 2")["name"] == "lab 2"
            vm = api.post("/vms", {"name": "web", "memory": "64M", "no_network": True})
            vm = api.add_adapter("web", switch="lab 2", mac="52:54:00:00:00:0a")
            assert [n["switch_name"] for n in vm["network_adapters"]] == ["lab 2"]
            vm = api.update_adapter("web", "52:54:00:00:00:0a", switch="")
            assert vm["network_adapters"][0]["switch"] == ""
            assert len(api.list_adapters("web")) == 1
            api.remove_adapter("web", "52:54:00:00:00:0a")
            api.add_nat_mapping("Default Switch", "udp", 5353, "172.16.1.7", 53)
            api.remove_nat_mapping("Default Switch", "udp", 5353)
            assert api.delete_switch("lab 2")["deleted"] == "lab 2"
            assert {s["name"] for s in api.list_switches()} == {"Default Switch"}

    await asyncio.to_thread(use)
