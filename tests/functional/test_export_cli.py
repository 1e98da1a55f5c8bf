"""``hv vm export``, ``hv vm import`` and ``hv checkpoint export`` against the API served
in-process on the fake driver (real qemu-img): results, the check's report, exit code 2
with every problem, names printed as text."""

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


def flat(text: str) -> str:
    """Output with Rich's line wrapping undone."""
    return " ".join(text.split())


async def hv(host: str, *args: str) -> Result:
    return await asyncio.to_thread(runner.invoke, app, list(args), env={"HV_HOST": host})


async def test_export_check_and_import(served: str, tmp_path: Path) -> None:
    out = tmp_path / "disks" / "ex"
    assert (await hv(served, "vm", "create", "web [x]", "--new-disk", "16M")).exit_code == 0
    assert (await hv(served, "checkpoint", "create", "web [x]", "--name", "one")).exit_code == 0
    result = await hv(served, "vm", "export", "web [x]", str(out))
    assert result.exit_code == 0, result.output
    assert f"Exported VM 'web [x]' to {out / 'web [x]'}" in flat(result.stdout)
    assert "1 checkpoints, offline" in flat(result.stdout)

    result = await hv(served, "vm", "import", str(out / "web [x]"), "--check")
    assert result.exit_code == 2
    assert "problem: VM 'web [x]' already has the id" in flat(result.stdout)
    assert "problem: a VM named 'web [x]' already exists" in flat(result.stdout)
    result = await hv(served, "vm", "import", str(out / "web [x]"), "--copy", "--register")
    assert result.exit_code == 2 and "not both" in result.stderr

    result = await hv(served, "vm", "import", str(out / "web [x]"), "--new-id", "--name",
                      "copy", "--check", "-o", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["ok"] is True
    result = await hv(served, "vm", "import", str(out / "web [x]"), "--new-id", "--name",
                      "copy")
    assert result.exit_code == 0, result.output
    assert "Imported VM 'copy'" in result.stdout and "1 checkpoints" in flat(result.stdout)

    result = await hv(served, "checkpoint", "export", "web [x]", "one", str(tmp_path / "disks"),
                      "-o", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["checkpoint"] == "one"
