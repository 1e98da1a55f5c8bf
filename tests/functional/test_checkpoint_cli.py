"""``hv checkpoint ...`` and ``hv vm set --checkpoint-*`` against the API served
in-process on the fake driver (real qemu-img)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from hvstack.api.app import create_app
from hvstack.cli.main import app
from hvstack.host.root import HostRoot
from hvstack.host.service import HostService
from tests.functional.fakes import serve_on_unix_socket

runner = CliRunner()


@pytest.fixture
async def served(service: HostService, tmp_path: Path) -> AsyncIterator[str]:
    async with serve_on_unix_socket(create_app(HostRoot(service)), tmp_path / "hv.sock") as host:
        yield host


async def hv(host: str, *args: str, stdin: str | None = None) -> Result:
    return await asyncio.to_thread(runner.invoke, app, list(args), input=stdin,
                                   env={"HV_HOST": host})


async def test_create_list_apply_rename(served: str) -> None:
    assert (await hv(served, "vm", "create", "web", "--new-disk", "16M")).exit_code == 0
    result = await hv(served, "checkpoint", "create", "web", "--name", "one")
    assert result.exit_code == 0, result.output
    assert "Created production checkpoint 'one' of VM 'web'" in result.stdout
    assert (await hv(served, "checkpoint", "create", "web", "--name", "two")).exit_code == 0
    result = await hv(served, "checkpoint", "apply", "web", "one", "--yes")
    assert result.exit_code == 0, result.output
    assert "Applied checkpoint 'one': VM 'web' is Off" in result.stdout
    assert (await hv(served, "checkpoint", "create", "web", "--name", "three")).exit_code == 0
    result = await hv(served, "checkpoint", "list", "web")
    assert result.exit_code == 0, result.output
    lines = [line.split("  (")[0] for line in result.stdout.splitlines()]
    assert lines == ["one", "  two", "  three", "    Now"]
    result = await hv(served, "checkpoint", "rename", "web", "two", "deux")
    assert result.exit_code == 0 and "to 'deux'" in result.stdout
    listing = json.loads((await hv(served, "checkpoint", "list", "web", "-o", "json")).stdout)
    assert [c["name"] for c in listing["checkpoints"]] == ["one", "deux", "three"]


async def test_apply_asks_first(served: str) -> None:
    await hv(served, "vm", "create", "web", "--new-disk", "16M")
    await hv(served, "checkpoint", "create", "web", "--name", "one")
    result = await hv(served, "checkpoint", "apply", "web", "one")
    assert result.exit_code == 2
    assert "--yes" in result.stderr
    result = await hv(served, "checkpoint", "apply", "web", "one", "--save-current")
    assert result.exit_code == 0, result.output
    listing = json.loads((await hv(served, "checkpoint", "list", "web", "-o", "json")).stdout)
    assert len(listing["checkpoints"]) == 2


async def test_errors_are_one_line_exit_2(served: str) -> None:
    await hv(served, "vm", "create", "web", "--new-disk", "16M")
    for args in (["checkpoint", "apply", "web", "nope", "--yes"],
                 ["checkpoint", "create", "nope"],
                 ["checkpoint", "rename", "web", "nope", "x"],
                 ["vm", "set", "web", "--checkpoint-type", "sometimes"],
                 ["vm", "set", "web", "--checkpoint-limit", "0"]):
        result = await hv(served, *args)
        assert result.exit_code == 2, (args, result.output)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert result.stderr.startswith("error: ")


async def test_vm_set_and_show_the_settings(served: str) -> None:
    await hv(served, "vm", "create", "web", "--new-disk", "16M")
    result = await hv(served, "vm", "set", "web", "--checkpoint-type", "standard",
                      "--automatic-checkpoints", "--checkpoint-limit", "7")
    assert result.exit_code == 0, result.output
    shown = json.loads((await hv(served, "vm", "show", "web", "-o", "json")).stdout)
    assert (shown["checkpoint_type"], shown["automatic_checkpoints"],
            shown["checkpoint_limit"]) == ("standard", True, 7)
    result = await hv(served, "vm", "show", "web")
    assert "standard" in result.stdout and "checkpoint" in result.stdout.lower()
    await hv(served, "vm", "set", "web", "--no-automatic-checkpoints")
    shown = json.loads((await hv(served, "vm", "show", "web", "-o", "json")).stdout)
    assert shown["automatic_checkpoints"] is False


async def test_names_print_as_text(served: str) -> None:
    await hv(served, "vm", "create", "web", "--new-disk", "16M")
    name = "[red]x[/red]\x1b]0;t"
    result = await hv(served, "checkpoint", "create", "web", "--name", name)
    assert result.exit_code == 2  # control characters are refused as in VM names
    result = await hv(served, "checkpoint", "create", "web", "--name", "[red]x")
    assert result.exit_code == 0, result.output
    result = await hv(served, "checkpoint", "list", "web")
    assert "[red]x" in result.stdout
