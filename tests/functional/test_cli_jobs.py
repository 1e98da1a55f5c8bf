"""``hv job``: ids by unique prefix, local times and durations in tables, ISO 8601 in
JSON, cancelling a finished job is an error."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from hvstack.api.app import create_app
from hvstack.cli.main import app
from hvstack.cli.render import local_time
from hvstack.host.root import HostRoot
from hvstack.host.service import HostService
from tests.functional.fakes import serve_on_unix_socket

runner = CliRunner()


@pytest.fixture
async def served(service: HostService, tmp_path: Path) -> AsyncIterator[str]:
    async with serve_on_unix_socket(create_app(HostRoot(service)), tmp_path / "hv.sock") as host:
        yield host


async def hv(host: str, *args: str, env: dict[str, str] | None = None) -> Result:
    return await asyncio.to_thread(runner.invoke, app, list(args),
                                   env={"HV_HOST": host, **(env or {})})


async def jobs_of(host: str) -> list[dict[str, object]]:
    result = await hv(host, "job", "list", "-o", "json")
    assert result.exit_code == 0, result.output
    jobs: list[dict[str, object]] = json.loads(result.stdout)
    return jobs


async def test_show_and_cancel_by_prefix(served: str) -> None:
    assert (await hv(served, "vm", "create", "web")).exit_code == 0
    assert (await hv(served, "vm", "start", "web")).exit_code == 0
    [job] = await jobs_of(served)
    job_id = str(job["id"])
    result = await hv(served, "job", "show", job_id[:6], "-o", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["id"] == job_id

    result = await hv(served, "job", "cancel", job_id[:6])
    assert result.exit_code == 2
    assert result.stderr.strip() == (f"error: job {job_id} (start of web) has already "
                                     "completed; only a running job can be cancelled")


async def test_an_ambiguous_prefix_is_an_error(served: str) -> None:
    assert (await hv(served, "vm", "create", "web")).exit_code == 0
    for _ in range(9):  # 18 jobs: two of them share a first hex digit
        assert (await hv(served, "vm", "start", "web")).exit_code == 0
        assert (await hv(served, "vm", "stop", "web", "--turn-off")).exit_code == 0
    firsts = Counter(str(j["id"])[0] for j in await jobs_of(served))
    shared, count = firsts.most_common(1)[0]
    assert count >= 2
    result = await hv(served, "job", "show", shared)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: job id prefix '{shared}' matches {count} jobs (")
    assert result.stderr.strip().endswith("; give more of the id")


async def test_tables_show_local_time_and_duration(served: str) -> None:
    assert (await hv(served, "vm", "create", "web")).exit_code == 0
    assert (await hv(served, "vm", "start", "web")).exit_code == 0
    [job] = await jobs_of(served)
    created = datetime.fromisoformat(str(job["created_at"]))
    local = shown_time(created)

    result = await hv(served, "job", "list", env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    header, row = result.stdout.splitlines()
    assert header.split() == ["Id", "Kind", "Target", "State", "%", "Started", "Duration",
                              "Message"]
    assert row.split()[:5] == [str(job["id"])[:8], "start", "web", "completed", "100"]
    assert f" {local} " in row
    assert f"{job['duration_seconds']:.1f} s" in row

    result = await hv(served, "job", "show", str(job["id"]))
    assert result.exit_code == 0, result.output
    assert f"created_at        {local}" in result.stdout
    assert str(job["id"]) in result.stdout


async def test_local_time_follows_tz(served: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The table's times are the local time of the machine running hv (TZ)."""
    assert (await hv(served, "vm", "create", "web")).exit_code == 0
    assert (await hv(served, "vm", "start", "web")).exit_code == 0
    [job] = await jobs_of(served)
    created = datetime.fromisoformat(str(job["created_at"]))
    for tz, offset in (("UTC0", 0), ("XYZ-5", 5)):  # POSIX TZ: XYZ-5 is UTC+5
        monkeypatch.setenv("TZ", tz)
        time.tzset()
        try:
            result = await hv(served, "job", "list", env={"COLUMNS": "200"})
        finally:
            monkeypatch.undo()
            time.tzset()
        local = (created + timedelta(hours=offset)).replace(tzinfo=None)
        today = (datetime.now(UTC) + timedelta(hours=offset)).date()
        form = "%H:%M:%S" if local.date() == today else "%Y-%m-%d %H:%M:%S"
        assert f" {local.strftime(form)} " in result.stdout


def shown_time(moment: datetime) -> str:
    """How a table shows ``moment``: the local time, with the date unless it is today."""
    local = moment.astimezone()
    today = datetime.now().astimezone().date()
    return local.strftime("%H:%M:%S" if local.date() == today else "%Y-%m-%d %H:%M:%S")


def test_an_earlier_day_is_shown_with_its_date() -> None:
    assert local_time("2020-02-03T04:05:06+00:00") == (
        datetime(2020, 2, 3, 4, 5, 6, tzinfo=UTC).astimezone().strftime("%Y-%m-%d %H:%M:%S"))
    assert local_time(None) == "-" and local_time("not a time") == "not a time"
