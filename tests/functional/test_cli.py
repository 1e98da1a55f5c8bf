"""The ``hv`` CLI: without a host service (one-line errors, exit code 2, no traceback), and
against the API served in-process on the fake driver."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
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


def nowhere(tmp_path: Path) -> str:
    return f"unix:{tmp_path / 'no-such.sock'}"


@pytest.mark.parametrize("args", [
    ["vm", "list"],
    ["vm", "show", "web"],
    ["vm", "start", "web"],
    ["vm", "create", "web"],
    ["host", "info"],
    ["job", "list"],
])
def test_unreachable_host_service(tmp_path: Path, args: list[str]) -> None:
    result = runner.invoke(app, args, env={"HV_HOST": nowhere(tmp_path)})
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: cannot reach the host service at unix:")
    assert "is 'hv serve' running?" in lines[0]
    assert "Traceback" not in result.output
    assert result.stdout == ""


def test_host_option_overrides_the_environment(tmp_path: Path) -> None:
    result = runner.invoke(app, ["vm", "list", "--host", nowhere(tmp_path)],
                           env={"HV_HOST": "unix:/elsewhere.sock"})
    assert result.exit_code == 2
    assert str(tmp_path / "no-such.sock") in result.stderr


def test_create_with_generation_3(tmp_path: Path) -> None:
    result = runner.invoke(app, ["vm", "create", "web", "--generation", "3"],
                           env={"HV_HOST": nowhere(tmp_path)})
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: --generation must be 1 or 2"
    assert "Traceback" not in result.output


def test_stop_with_turn_off_and_save(tmp_path: Path) -> None:
    result = runner.invoke(app, ["vm", "stop", "web", "--turn-off", "--save"],
                           env={"HV_HOST": nowhere(tmp_path)})
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: --turn-off and --save exclude each other: give one"


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    result = runner.invoke(app, ["vm", "create"], env={"HV_HOST": nowhere(tmp_path)})
    assert result.exit_code == 2
    assert "Traceback" not in result.output


def test_the_real_entry_point(tmp_path: Path) -> None:
    """``hv`` as installed: a bad host address is one line and exit code 2 too."""
    hv = Path(sys.executable).parent / "hv"
    if not hv.exists():
        pytest.skip("the hv entry point is not installed in this environment")
    env = {**os.environ, "HV_HOST": "tcp:nohost"}
    env.pop("HV_DEBUG", None)
    proc = subprocess.run([str(hv), "vm", "list"], capture_output=True, text=True, env=env,
                          timeout=60)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "tcp:nohost" in lines[0]
    assert "Traceback" not in proc.stderr


# -- the CLI against the API served in-process (uvicorn on a unix socket, fake driver) ------




@pytest.fixture
async def served(service: HostService, tmp_path: Path) -> AsyncIterator[str]:
    async with serve_on_unix_socket(create_app(HostRoot(service)), tmp_path / "hv.sock") as host:
        yield host


async def hv(host: str, *args: str) -> Result:
    return await asyncio.to_thread(runner.invoke, app, list(args), env={"HV_HOST": host})


async def test_cli_drives_a_vm(served: str) -> None:
    result = await hv(served, "vm", "create", "web", "--memory", "64M", "--cpus", "1")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Created VM 'web' (Generation 2, ")

    result = await hv(served, "vm", "show", "web", "-o", "json")
    assert result.exit_code == 0, result.output
    vm = json.loads(result.stdout)
    assert {"id", "name", "state", "generation", "cpus", "memory_bytes", "disks",
            "uptime_seconds"} <= set(vm)
    assert (vm["name"], vm["state"], vm["generation"], vm["cpus"], vm["memory_bytes"],
            vm["disks"], vm["uptime_seconds"]) == ("web", "Off", 2, 1, 64 << 20, [], 0)

    result = await hv(served, "vm", "start", "web")
    assert result.exit_code == 0, result.output
    assert "done, VM is Running" in result.stdout

    result = await hv(served, "vm", "list")
    assert result.exit_code == 0
    assert "web" in result.stdout and "Running" in result.stdout

    result = await hv(served, "vm", "start", "web")
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "error: cannot start VM 'web': it is already Running")

    result = await hv(served, "vm", "stop", "web", "--turn-off", "-o", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["result"] == {"state": "Off", "how": "turned off"}

    result = await hv(served, "job", "list", "-o", "json")
    assert [j["kind"] for j in json.loads(result.stdout)] == ["start", "turn-off"]


async def test_cli_errors_from_the_service(served: str) -> None:
    result = await hv(served, "vm", "show", "ghost")
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: no VM named 'ghost' exists on this host"
    result = await hv(served, "vm", "create", "bad/name")
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: VM name 'bad/name' must not contain '/' or '\\'"
    result = await hv(served, "vm", "create", "web", "--memory", "lots")
    assert result.exit_code == 2
    assert "memory 'lots' is not a size" in result.stderr
    assert "Traceback" not in result.output
