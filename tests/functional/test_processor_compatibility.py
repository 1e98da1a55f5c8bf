"""Processor compatibility (Set-VMProcessor -CompatibilityForMigrationEnabled) through
the service, its API, the Python client and the CLI, on the fake driver: off by default,
shown, changed only while the VM is Off (409, CLI exit code 2), and a VM started with it
on runs the baseline processor model."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from hvstack.api.app import create_app
from hvstack.cli.main import app as cli_app
from hvstack.client import ApiError, Client
from hvstack.compute.machine import COMPATIBLE_CPU_MODEL
from hvstack.host.root import HostRoot
from hvstack.host.service import HostService
from tests.functional.fakes import (
    API,
    FakeDriver,
    assert_problem,
    create_vm,
    finish_job,
    serve_on_unix_socket,
    show_vm,
)

runner = CliRunner()


async def start(api: httpx.AsyncClient, name: str) -> None:
    response = await api.post(f"{API}/vms/{name}/start")
    assert response.status_code == 202, response.text
    assert (await finish_job(api, response.json()))["state"] == "completed"


def cpu_option(driver: FakeDriver, vm_id: str) -> str:
    argv = driver.machine_of(vm_id).argv
    return argv[argv.index("-cpu") + 1]


async def test_off_by_default_set_while_off_and_the_machine_runs_the_baseline(
        api: httpx.AsyncClient, driver: FakeDriver) -> None:
    vm = await create_vm(api, "mover")
    assert vm["processor_compatibility"] is False
    response = await api.patch(f"{API}/vms/mover", json={"processor_compatibility": True})
    assert response.status_code == 200, response.text
    assert response.json()["processor_compatibility"] is True
    assert (await show_vm(api, "mover"))["processor_compatibility"] is True
    await start(api, "mover")
    assert cpu_option(driver, vm["id"]) == f"{COMPATIBLE_CPU_MODEL},enforce"


async def test_a_vm_without_it_keeps_the_hosts_processor(
        api: httpx.AsyncClient, driver: FakeDriver) -> None:
    vm = await create_vm(api, "native")
    await start(api, "native")
    assert cpu_option(driver, vm["id"]) in ("host", "max")


async def test_refused_while_running_and_left_as_it_was(api: httpx.AsyncClient) -> None:
    await create_vm(api, "busy")
    await start(api, "busy")
    response = await api.patch(f"{API}/vms/busy", json={"processor_compatibility": True})
    problem = assert_problem(response, 409, "invalid-state")
    assert "cannot change the processor compatibility of VM 'busy'" in problem["detail"]
    assert (await show_vm(api, "busy"))["processor_compatibility"] is False


async def test_not_a_boolean_is_refused(api: httpx.AsyncClient) -> None:
    await create_vm(api, "typo")
    response = await api.patch(f"{API}/vms/typo", json={"processor_compatibility": "maybe"})
    assert 400 <= response.status_code < 500
    assert (await show_vm(api, "typo"))["processor_compatibility"] is False


async def test_cli_and_client_set_and_show_it(service: HostService, tmp_path: Path) -> None:
    app = create_app(HostRoot(service))
    async with serve_on_unix_socket(app, tmp_path / "cli.sock") as host:
        def hv(*args: str) -> Any:
            return runner.invoke(cli_app, list(args), env={"HV_HOST": host})

        async def run(*args: str) -> Any:
            return await asyncio.to_thread(hv, *args)

        assert (await run("vm", "create", "cpu", "--memory", "64M")).exit_code == 0
        result = await run("vm", "set", "cpu", "--processor-compatibility", "on")
        assert result.exit_code == 0, result.output
        result = await run("vm", "show", "cpu")
        assert result.exit_code == 0, result.output
        line = next(row for row in result.stdout.splitlines()
                    if "processor_compatibility" in row)
        assert line.split() == ["processor_compatibility", "on"]
        shown = json.loads((await run("vm", "show", "cpu", "-o", "json")).stdout)
        assert shown["processor_compatibility"] is True

        result = await run("vm", "set", "cpu", "--processor-compatibility", "yes")
        assert result.exit_code == 2
        assert result.stderr.strip() == ("error: --processor-compatibility 'yes' is not one "
                                         "of on, off")

        assert (await run("vm", "start", "cpu")).exit_code == 0
        result = await run("vm", "set", "cpu", "--processor-compatibility", "off")
        assert result.exit_code == 2
        assert "cannot change the processor compatibility of VM 'cpu'" in result.stderr
        assert json.loads((await run("vm", "show", "cpu", "-o", "json")).stdout)[
            "processor_compatibility"] is True

        def running_change() -> None:
            with Client(host) as client:
                client.set_processor("cpu", compatibility=False)

        with pytest.raises(ApiError) as caught:
            await asyncio.to_thread(running_change)
        assert caught.value.status == 409

        assert (await run("vm", "stop", "cpu", "--turn-off")).exit_code == 0

        def off_change() -> dict[str, Any]:
            with Client(host) as client:
                return client.set_processor("cpu", compatibility=False)

        view = await asyncio.to_thread(off_change)
        assert view["processor_compatibility"] is False
