"""Names reach exactly their own VM: every client escapes them in URLs, the service looks
an id up as an id only, and a name in the form of an id is refused.

Through the CLI and the Python client, against the API served on a unix socket.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from click.testing import Result
from typer.testing import CliRunner

from hvstack.api.app import create_app
from hvstack.cli.main import app, app_for
from hvstack.client import ApiError, Client, segment, url_path
from hvstack.console_client import open_websocket
from hvstack.host.root import HostRoot
from hvstack.host.service import HostService
from tests.functional.fakes import serve_on_unix_socket

if TYPE_CHECKING:
    from tests.functional.guest_support import Guests

pytest_plugins = ("tests.functional.guest_support",)

runner = CliRunner()

# Each one allowed, each one a trap for a client that puts names into URLs as they are.
ODD_NAMES = ["a%41", "a#b", "what?", "two words", "100%", "%2e%2e", "?x=1#y", "ünïcødé 名前",
             "a+b&c=d", "semi;colon", "back`tick'\"", "dot.", ".hidden", "~user", "@at"]


@pytest.fixture
async def served(service: HostService, tmp_path: Path) -> AsyncIterator[str]:
    async with serve_on_unix_socket(create_app(HostRoot(service)), tmp_path / "hv.sock") as host:
        yield host


async def hv(host: str, *args: str) -> Result:
    return await asyncio.to_thread(runner.invoke, app, list(args), env={"HV_HOST": host})


async def names_of(host: str) -> set[str]:
    result = await hv(host, "vm", "list", "-o", "json")
    assert result.exit_code == 0, result.output
    return {vm["name"] for vm in json.loads(result.stdout)}


def test_segment_escapes_everything_that_could_change_the_path() -> None:
    assert segment("a%41") == "a%2541"
    assert segment("a/b?c#d") == "a%2Fb%3Fc%23d"
    assert segment("..") == "%2E%2E" and segment(".") == "%2E"
    assert url_path("vms", "a b", "start") == "/vms/a%20b/start"
    with pytest.raises(ApiError) as caught:
        url_path("vms", "", "start")
    assert caught.value.status == 400


async def test_deleting_a_percent_name_deletes_only_that_vm(served: str,
                                                            service: HostService) -> None:
    for name in ("aA", "a%41"):
        result = await hv(served, "vm", "create", name, "--new-disk", "16M")
        assert result.exit_code == 0, result.output
    disk_of_aa = Path(service.get_vm("aA").record.config.disks[0].path)

    result = await hv(served, "vm", "delete", "a%41", "--delete-disks")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Deleted VM 'a%41'")
    assert await names_of(served) == {"aA"}
    assert disk_of_aa.exists()
    result = await hv(served, "vm", "show", "aA", "-o", "json")
    assert result.exit_code == 0 and json.loads(result.stdout)["name"] == "aA"


@pytest.mark.parametrize("name", ODD_NAMES)
async def test_every_allowed_name_is_reachable_through_the_cli(served: str, name: str) -> None:
    result = await hv(served, "vm", "create", name, "--memory", "64M")
    assert result.exit_code == 0, result.output
    result = await hv(served, "vm", "show", name, "-o", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["name"] == name
    result = await hv(served, "vm", "start", name, "-o", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["target"] == name
    result = await hv(served, "vm", "stop", name, "--turn-off")
    assert result.exit_code == 0, result.output
    result = await hv(served, "vm", "set", name, "--notes", "n", "-o", "json")
    assert result.exit_code == 0, result.output
    renamed = name + " 2"
    result = await hv(served, "vm", "rename", name, renamed)
    assert result.exit_code == 0, result.output
    result = await hv(served, "vm", "delete", renamed)
    assert result.exit_code == 0, result.output
    assert await names_of(served) == set()


def _client_round_trip(host: str, name: str) -> None:
    with Client(host) as api:
        vm = api.post("/vms", {"name": name, "memory": "64M"})
        assert api.get(url_path("vms", name))["id"] == vm["id"]
        job = api.wait_job(api.post(url_path("vms", name, "start")), timeout=30)
        assert job["result"]["state"] == "Running"
        api.wait_job(api.post(url_path("vms", name, "stop"), {"mode": "turn-off"}),
                     timeout=30)
        api.request("DELETE", url_path("vms", name))
        with pytest.raises(ApiError) as caught:
            api.get(url_path("vms", name))
        assert caught.value.status == 404


@pytest.mark.parametrize("name", ODD_NAMES)
async def test_every_allowed_name_is_reachable_through_the_client(served: str,
                                                                  name: str) -> None:
    await asyncio.to_thread(_client_round_trip, served, name)


async def test_an_id_is_looked_up_as_an_id_only(api: httpx.AsyncClient) -> None:
    first = (await api.post("/api/v1/vms", json={"name": "first"})).json()
    upper = first["id"].upper()
    assert (await api.get(f"/api/v1/vms/{upper}")).json()["name"] == "first"
    for id_shaped in (first["id"], "00000000-0000-4000-8000-000000000000"):
        response = await api.post("/api/v1/vms", json={"name": id_shaped})
        assert response.status_code == 400, response.text
        assert "has the form of an id" in response.json()["detail"]
    response = await api.patch(f"/api/v1/vms/{first['id']}",
                               json={"name": "00000000-0000-4000-8000-000000000000"})
    assert response.status_code == 400
    response = await api.get("/api/v1/vms/00000000-0000-4000-8000-000000000000")
    assert response.status_code == 404
    assert response.json()["detail"] == ("no VM with id 00000000-0000-4000-8000-000000000000 "
                                         "exists on this host")


async def test_names_with_a_slash_or_dots_are_refused_not_misrouted(served: str) -> None:
    for name in ("a/b", "..", "."):
        result = await hv(served, "vm", "create", name)
        assert result.exit_code == 2, result.output
    result = await hv(served, "vm", "show", "..")
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: no VM named '..' exists on this host"
    result = await hv(served, "vm", "show", "")
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: a name or id must not be empty"


@pytest.mark.parametrize("job_ref", ["..", ".", "x?y", "#", "%2e", "a b"])
async def test_job_ids_are_escaped(served: str, job_ref: str) -> None:
    result = await hv(served, "job", "show", job_ref)
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == (f"error: no job has an id that is or starts with "
                                     f"'{job_ref}'"), result.stderr


@pytest.mark.parametrize("args", [["job", "show", "a/cancel"], ["vm", "show", "web/console-log"],
                                  ["vm", "start", "web/stop"], ["vm", "show", "web\\x"]])
async def test_an_escaped_slash_reaches_no_other_route(served: str, args: list[str]) -> None:
    """The server decodes %2F before routing: such a path is refused, never rerouted."""
    assert (await hv(served, "vm", "create", "web")).exit_code == 0
    result = await hv(served, *args)
    assert (result.exit_code, result.stderr.strip()) == (
        2, "error: the URL holds an escaped '/' (%2F) in a name or id; no name or id "
           "contains '/' or '\\'")
    assert (await hv(served, "job", "list", "-o", "json")).stdout.strip() == "[]"


async def test_a_copy_s_data_url_holds_the_id_not_the_name(
        guest_served: str, guests: Guests, guest_root: Path, tmp_path: Path) -> None:
    name = "a#b?c%41"
    await guests.boot(name)
    source = tmp_path / "local.txt"
    source.write_bytes(b"hello")
    result = await hv(guest_served, "vm", "copy-file", name, str(source),
                      f"{guest_root}/copied.txt", "-o", "json")
    assert result.exit_code == 0, result.output
    assert (guest_root / "copied.txt").read_bytes() == b"hello"
    with Client(guest_served) as api:
        started = await asyncio.to_thread(api.post, url_path("vms", name, "files"), {
            "direction": "from-guest", "guest_path": f"{guest_root}/copied.txt"})
    vm_id = guests.service.get_vm(name).record.id
    assert started["data_url"] == f"/api/v1/vms/{vm_id}/files/{started['transfer_id']}"


async def test_the_real_entry_point_reaches_the_right_vm(served: str) -> None:
    """``python -m hvstack.cli`` (run() builds only the group it runs) in a process."""
    for name in ("aA", "a%41"):
        assert (await hv(served, "vm", "create", name)).exit_code == 0
    env = {**os.environ, "HV_HOST": served}
    env.pop("HV_DEBUG", None)
    proc = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "hvstack.cli", "vm", "show", "a%41", "-o",
                         "json"], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["name"] == "a%41"
    proc = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "hvstack.cli", "vm", "show", "[/x]"],
        capture_output=True, text=True, env=env, timeout=60)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr.startswith("error: the URL holds an escaped '/'")


def test_run_builds_only_the_group_it_runs() -> None:
    assert app_for([]) is app and app_for(["serve"]) is app and app_for(["--help"]) is app
    only_vm = app_for(["vm", "list"])
    assert [g.name for g in only_vm.registered_groups] == ["vm"]
    assert only_vm.registered_callback is app.registered_callback  # --token and the like
    assert not only_vm.registered_commands
    vm_group = next(g for g in app.registered_groups if g.name == "vm")
    assert vm_group.typer_instance is not None
    (narrowed,) = only_vm.registered_groups
    assert narrowed.typer_instance is not None
    assert [c.callback.__name__ for c in narrowed.typer_instance.registered_commands
            if c.callback] == ["list_vms"]
    assert narrowed.typer_instance.info.help == vm_group.typer_instance.info.help
    assert len(vm_group.typer_instance.registered_commands) > 1  # the app itself is whole
    # A word that names no command (or a subgroup: kvp) keeps the whole group, so its
    # help and "did you mean" list every command.
    for argv in (["vm"], ["vm", "lsit"], ["vm", "kvp", "get"], ["vm", "--help"]):
        assert app_for(argv).registered_groups[0] is vm_group


def test_a_narrowed_command_still_reports_usage_errors() -> None:
    result = runner.invoke(app_for(["vm", "list", "--bogus"]), ["vm", "list", "--bogus"])
    assert result.exit_code == 2
    assert "--bogus" in result.output


async def test_an_escaped_slash_opens_no_websocket(served: str) -> None:
    assert (await hv(served, "vm", "create", "web")).exit_code == 0
    with pytest.raises(ApiError) as caught:
        async with open_websocket(served, "/vms/web%2Fx/console"):
            pass
    assert caught.value.status == 403
