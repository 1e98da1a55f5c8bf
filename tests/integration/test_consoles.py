"""Consoles of a real tiny guest under TCG, through ``hv serve``: the serial console (the
CLI in pipe mode, and two WebSocket clients with one writer), a screenshot, and the VNC
WebSocket. One boot serves every test in this module."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection

from hvstack.console_client import open_websocket
from hvstack.host.config import load_config
from hvstack.pixmap import PNG_SIGNATURE, png_size
from tests.integration.hostproc import HostProcess, running_host

pytestmark = pytest.mark.integration
READY = "hvstack-tiny: ready"
NAME = "con"
WAIT = 120.0  # a bound for failures under a slow TCG, never a timing assertion
DISPLAY_SIZES = {(720, 400), (640, 480), (800, 600), (1024, 768), (1280, 800)}


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory, tiny_image: Path) -> Iterator[HostProcess]:
    with running_host(tmp_path_factory.mktemp("consoles") / "data", tiny_image) as service:
        service.ok("vm", "create", NAME, "--generation", "1", "--image", "tiny",
                   "--memory", "256M", "--auto-stop", "turn-off")
        service.ok("vm", "start", NAME)
        service.wait_console(NAME, READY)
        yield service


def test_cli_console_in_pipe_mode_runs_a_command(host: HostProcess) -> None:
    result = host.hv("vm", "console", NAME, "--until", "hello-42", "--timeout", str(WAIT),
                     input_="\necho hello-$((6*7))\n", timeout=WAIT + 30)
    assert result.returncode == 0, result.stderr
    assert "tiny# " in result.stdout
    assert "hello-42" in result.stdout
    assert "attached to the serial console" in result.stderr


class Client:
    def __init__(self, websocket: ClientConnection) -> None:
        self.ws = websocket
        self.output = b""
        self.notices: list[dict[str, Any]] = []

    async def _next(self) -> None:
        message = await asyncio.wait_for(self.ws.recv(), WAIT)
        if isinstance(message, bytes):
            self.output += message
        else:
            self.notices.append(json.loads(message))

    async def notice(self, event: str) -> dict[str, Any]:
        while not any(n["event"] == event for n in self.notices):
            await self._next()
        return next(n for n in self.notices if n["event"] == event)

    async def text(self, text: bytes) -> None:
        while text not in self.output:
            await self._next()


@contextlib.asynccontextmanager
async def console(host: HostProcess, mode: str = "write") -> AsyncIterator[Client]:
    async with open_websocket(f"unix:{host.socket}", f"/vms/{NAME}/console?mode={mode}") as ws:
        yield Client(ws)


async def test_two_console_clients_share_output_and_one_types(host: HostProcess) -> None:
    async with console(host) as writer, console(host) as watcher:
        assert (await writer.notice("attached"))["role"] == "writer"
        assert (await watcher.notice("attached"))["role"] == "reader"
        await writer.notice("connected")
        await watcher.notice("connected")

        await watcher.ws.send(b"echo ignored-$((7*8))\n")
        await watcher.notice("input-ignored")  # the service dropped it
        await writer.ws.send(b"echo hello-$((6*7))\n")
        await writer.text(b"hello-42")
        await watcher.text(b"hello-42")
        await writer.text(b"tiny# ")
        assert b"ignored" not in writer.output
        assert b"ignored" not in watcher.output
    assert "ignored" not in host.console(NAME)
    assert "hello-42" in host.console(NAME)  # QEMU's console log keeps working


def test_screenshot_is_a_png_of_the_display(host: HostProcess, tmp_path: Path) -> None:
    out = tmp_path / "screen.png"
    host.ok("vm", "screenshot", NAME, str(out))
    data = out.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    width, height = png_size(data)
    assert (width, height) in DISPLAY_SIZES
    thumb = tmp_path / "thumb.png"
    host.ok("vm", "screenshot", NAME, str(thumb), "--max-width", "200")
    assert png_size(thumb.read_bytes()) == (200, round(height * 200 / width))
    run_dir = load_config(str(host.data_dir)).run_dir / host.vm(NAME)["id"]
    assert run_dir.is_dir() and not list(run_dir.glob("screendump-*"))


async def test_vnc_websocket_speaks_rfb(host: HostProcess) -> None:
    async with open_websocket(f"unix:{host.socket}", f"/vms/{NAME}/vnc",
                              subprotocols=["binary"]) as ws:
        assert ws.subprotocol == "binary"
        greeting = b""
        while len(greeting) < 12:
            message = await asyncio.wait_for(ws.recv(), WAIT)
            assert isinstance(message, bytes)
            greeting += message
        assert greeting == b"RFB 003.008\n"
