"""``hv vm move-storage`` against the in-process service (fake driver, real files): what
moved is printed as text (a file name is never Rich markup), bad input is one line and
exit code 2."""

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


async def hv(host: str, *args: str) -> Result:
    return await asyncio.to_thread(runner.invoke, app, list(args),
                                   env={"HV_HOST": host, "COLUMNS": "300"})


async def test_moved_files_are_printed_as_text(served: str, tmp_path: Path) -> None:
    disk = tmp_path / "disks" / "[bold]d.qcow2"
    assert (await hv(served, "disk", "create", str(disk), "--size", "4M")).exit_code == 0
    assert (await hv(served, "vm", "create", "web", "--disk", str(disk))).exit_code == 0
    target = tmp_path / "disks" / "moved"
    result = await hv(served, "vm", "move-storage", "web", str(target))
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [f"moved   {disk} -> {target / disk.name}"]
    result = await hv(served, "vm", "move-storage", "web", str(target), "-o", "json")
    assert json.loads(result.stdout)["skipped"] == [
        {"path": str(target / disk.name), "reason": "already in the destination"}]


async def test_a_destination_outside_the_roots_is_one_line(served: str, tmp_path: Path) -> None:
    assert (await hv(served, "vm", "create", "web", "--new-disk", "4M")).exit_code == 0
    result = await hv(served, "vm", "move-storage", "web", str(tmp_path / "elsewhere"))
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "outside the storage roots" in result.stderr
