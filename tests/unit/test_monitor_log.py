"""The QMP monitor's connect retries log nothing above DEBUG; real failures still do."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest

from hvstack.errors import HypervisorError
from hvstack.hypervisor.qemu.monitor import _QUIET, Monitor

GREETING = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7},
                                "package": ""}, "capabilities": []}}


async def _qmp_server(path: Path) -> asyncio.Server:
    """Just enough QMP to connect: the greeting and qmp_capabilities."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(json.dumps(GREETING).encode() + b"\r\n")
        await writer.drain()
        while chunk := await reader.read(65536):  # qemu.qmp sends no newline
            request = json.loads(chunk)
            reply: dict[str, object] = {"return": {}}
            if "id" in request:
                reply["id"] = request["id"]
            writer.write(json.dumps(reply).encode() + b"\r\n")
            await writer.drain()
        writer.close()

    return await asyncio.start_unix_server(handle, str(path))


def _loud(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [f"{r.name}: {r.getMessage()}" for r in caplog.records
            if r.levelno >= logging.WARNING]


async def test_retries_while_qemu_creates_its_socket_are_quiet(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    path = tmp_path / "qmp.sock"
    monitor = Monitor("vm-quiet")
    connecting = asyncio.create_task(monitor.connect(str(path), timeout=10, retry=0.01))
    # Let several attempts fail, as they do while QEMU starts.
    for _ in range(5):
        await asyncio.sleep(0.02)
    assert not connecting.done()
    server = await _qmp_server(path)
    try:
        await asyncio.wait_for(connecting, 10)
        assert monitor.connected
        await monitor.close()
    finally:
        server.close()
    assert _loud(caplog) == []


async def test_a_socket_that_never_comes_is_one_error_for_the_caller(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    with pytest.raises(HypervisorError, match="cannot reach the QMP monitor"):
        await Monitor("vm-never").connect(str(tmp_path / "none.sock"), timeout=0.2,
                                          retry=0.01)
    assert _loud(caplog) == []


def test_the_same_lines_outside_connect_are_kept() -> None:
    record = logging.LogRecord("qemu.qmp.protocol.x", logging.ERROR, __file__, 1, "%s: %s",
                               ("Failed to establish session", "EOFError"), None)
    assert _QUIET.filter(record)
    assert record.levelno == logging.ERROR


async def test_debug_logging_still_shows_the_attempts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(HypervisorError):
        await Monitor("vm-debug").connect(str(tmp_path / "none.sock"), timeout=0.1,
                                          retry=0.01)
    attempts = [r for r in caplog.records if "Failed to establish" in r.getMessage()]
    assert attempts and all(r.levelno == logging.DEBUG for r in attempts)
