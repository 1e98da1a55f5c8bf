"""``hv checkpoint delete`` against the API served in-process on the fake driver (real
qemu-img): branches made with ``hv checkpoint create``/``apply`` deleted one by one
until the VM is back on its own disk; names printed as text; refusals exit 2."""

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
MARKUP = "[bold]three[red]"


@pytest.fixture
async def served(service: HostService, tmp_path: Path) -> AsyncIterator[str]:
    async with serve_on_unix_socket(create_app(HostRoot(service)), tmp_path / "hv.sock") as host:
        yield host


async def hv(host: str, *args: str) -> Result:
    return await asyncio.to_thread(runner.invoke, app, list(args), env={"HV_HOST": host})


async def ok(host: str, *args: str) -> str:
    result = await hv(host, *args)
    assert result.exit_code == 0, (args, result.output)
    return result.stdout


async def disk_of(host: str) -> str:
    path: str = json.loads(await ok(host, "vm", "show", "web", "-o", "json"))["disks"][0]["path"]
    return path


async def names(host: str) -> list[str]:
    listing = json.loads(await ok(host, "checkpoint", "list", "web", "-o", "json"))
    return [c["name"] for c in listing["checkpoints"]]


async def test_branches_deleted_one_by_one(served: str) -> None:
    await ok(served, "vm", "create", "web", "--new-disk", "16M")
    disk = await disk_of(served)
    await ok(served, "checkpoint", "create", "web", "--name", "one")
    await ok(served, "checkpoint", "create", "web", "--name", "two")
    two = await disk_of(served)
    await ok(served, "checkpoint", "apply", "web", "one", "--yes")
    await ok(served, "checkpoint", "create", "web", "--name", MARKUP)
    folder = Path(disk).parent

    # one's file is the base of both branches: it stays, nothing is copied
    out = await ok(served, "checkpoint", "delete", "web", "one", "--yes")
    assert out.strip() == "Deleted checkpoint 'one' of VM 'web'"
    assert await names(served) == ["two", MARKUP]
    assert len(list(folder.glob("*_*.qcow2"))) == 3

    # two's branch goes: its file is deleted, and the disk, left one child, takes the
    # other branch's data
    await ok(served, "checkpoint", "delete", "web", "two", "--yes")
    assert not Path(two).exists()
    listing = json.loads(await ok(served, "checkpoint", "list", "web", "-o", "json"))
    assert list(listing["checkpoints"][0]["disks"].values()) == [disk]

    out = await ok(served, "checkpoint", "delete", "web", MARKUP, "--yes")
    assert f"Deleted checkpoint '{MARKUP}' of VM 'web'" in out
    assert await names(served) == []
    assert await disk_of(served) == disk
    assert list(folder.glob("*_*.qcow2")) == []


async def test_refusals_are_one_line_exit_2(served: str) -> None:
    await ok(served, "vm", "create", "web", "--new-disk", "16M")
    await ok(served, "checkpoint", "create", "web", "--name", "one")
    for args, needle in ((["checkpoint", "delete", "web", "one"], "--yes"),
                         (["checkpoint", "delete", "web", "nope", "--yes"], "nope"),
                         (["checkpoint", "delete", "nobody", "one", "--yes"], "nobody")):
        result = await hv(served, *args)
        assert result.exit_code == 2, (args, result.output)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert result.stderr.startswith("error: ") and needle in result.stderr
    assert await names(served) == ["one"]
    job = json.loads(await ok(served, "checkpoint", "delete", "web", "one", "--subtree",
                              "--yes", "-o", "json"))
    assert job["state"] == "completed" and job["result"]["deleted"] == ["one"]
