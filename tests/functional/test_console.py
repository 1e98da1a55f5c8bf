"""Consoles through the API served by uvicorn on a unix socket, as ``hv serve`` serves it:
the serial console WebSocket (two clients, one writer, fan-out, detach), the CLI in pipe
mode, the VNC bridge, screenshots. QEMU is faked: a fake serial socket, a fake VNC
server, the fake driver's screendump."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from websockets.asyncio.client import ClientConnection

from hvstack.api.app import create_app
from hvstack.client import ApiError
from hvstack.console_client import open_websocket, parse_notice
from hvstack.host.root import HostRoot
from hvstack.host.service import HostService
from hvstack.pixmap import png_size
from tests.fake_serial import WAIT, FakeSerialPort
from tests.functional.fakes import API, create_vm, run_job

HV = [sys.executable, "-m", "hvstack.cli"]


class QuietServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@pytest.fixture
async def host(service: HostService, tmp_path: Path) -> AsyncIterator[str]:
    """The app on a real uvicorn, listening on a unix socket; yields ``unix:PATH``."""
    sock = tmp_path / "api.sock"
    server = QuietServer(uvicorn.Config(create_app(HostRoot(service)), uds=str(sock),
                                        log_level="warning", lifespan="off"))
    serving = asyncio.create_task(server.serve())
    async with asyncio.timeout(WAIT):
        while not server.started:
            assert not serving.done(), "uvicorn did not start"
            await asyncio.sleep(0.01)
    yield f"unix:{sock}"
    server.should_exit = True
    await asyncio.wait_for(serving, WAIT)


@pytest.fixture
async def port(api: httpx.AsyncClient, service: HostService) -> AsyncIterator[FakeSerialPort]:
    await create_vm(api, "vm1")
    fake = FakeSerialPort(service.get_vm("vm1").files.serial_socket)
    await fake.start()
    yield fake
    await fake.stop()


class Client:
    """One console WebSocket client and everything it has received."""

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
        found = next(n for n in self.notices if n["event"] == event)
        self.notices.remove(found)
        return found

    async def text(self, text: bytes) -> None:
        while text not in self.output:
            await self._next()


@contextlib.asynccontextmanager
async def console(host: str, mode: str = "write") -> AsyncIterator[Client]:
    async with open_websocket(host, f"/vms/vm1/console?mode={mode}") as websocket:
        yield Client(websocket)


async def test_two_clients_one_writer(host: str, port: FakeSerialPort) -> None:
    async with console(host) as first, console(host) as second:
        assert (await first.notice("attached"))["role"] == "writer"
        attached = await second.notice("attached")
        assert attached["role"] == "reader" and "force" in attached["detail"]
        await first.notice("connected")
        await second.notice("connected")

        await second.ws.send(b"echo ignored-$((7*8))\r")
        assert (await second.notice("input-ignored"))["role"] == "reader"
        await first.ws.send("echo hello-$((6*7))\r")  # a text frame is input too
        await first.text(b"hello-42\r\n")
        await second.text(b"hello-42\r\n")
        port.say(b"from the guest\r\n")
        await first.text(b"from the guest")
        await second.text(b"from the guest")
    assert port.received == b"echo hello-$((6*7))\r"
    assert port.connections == 1


async def test_detaching_the_writer_hands_the_input_on(host: str, port: FakeSerialPort,
                                                       service: HostService) -> None:
    async with contextlib.AsyncExitStack() as stack:
        first = await stack.enter_async_context(console(host))
        assert (await first.notice("attached"))["role"] == "writer"
        async with console(host) as second:
            assert (await second.notice("attached"))["role"] == "reader"
            await stack.aclose()  # the writer detaches
            role = await second.notice("role")
            assert role["role"] == "writer" and "left" in role["detail"]
            await second.notice("connected")
            await second.ws.send(b"echo now-$((2*3))\r")
            await second.text(b"now-6\r\n")
    # the last client left: the hub lets go of the serial port
    await asyncio.wait_for(port.disconnected.wait(), WAIT)
    assert service.get_vm("vm1").state.value == "Off"


async def test_read_only_and_force(host: str, port: FakeSerialPort) -> None:
    async with console(host, "read-only") as watcher, console(host) as writer:
        assert (await watcher.notice("attached"))["role"] == "reader"
        assert (await writer.notice("attached"))["role"] == "writer"
        async with console(host, "force") as forcer:
            assert (await forcer.notice("attached"))["role"] == "writer"
            assert (await writer.notice("role"))["role"] == "reader"
            await forcer.notice("connected")
            await forcer.ws.send(b"echo forced-$((3*3))\r")
            await watcher.text(b"forced-9\r\n")
        assert (await writer.notice("role"))["role"] == "writer"


async def test_console_errors_are_problems(host: str, port: FakeSerialPort) -> None:
    with pytest.raises(ApiError) as missing:
        async with open_websocket(host, "/vms/nope/console"):
            pass
    assert missing.value.status == 404
    assert missing.value.problem["type"] == "/problems/not-found"
    with pytest.raises(ApiError) as bad:
        async with open_websocket(host, "/vms/vm1/console?mode=shout"):
            pass
    assert bad.value.status == 400 and "read-only" in str(bad.value)


async def run_cli(host: str, *args: str, stdin: bytes) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *HV, *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "HV_HOST": host},
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


async def test_cli_pipe_mode(host: str, port: FakeSerialPort) -> None:
    code, out, err = await run_cli(host, "vm", "console", "vm1", "--until", "hello-42",
                                   "--timeout", "30", stdin=b"echo hello-$((6*7))\r")
    assert code == 0, err
    assert "hello-42" in out
    assert "attached to the serial console of vm1" in err

    # no --until: the end of stdin, then quiet output for --linger seconds, ends it
    code, out, _ = await run_cli(host, "vm", "console", "vm1", "--linger", "0.5",
                                 stdin=b"echo bye-$((2*2))\r")
    assert code == 0 and "bye-4" in out

    # --until that never shows: exit 1 after --timeout
    code, _, err = await run_cli(host, "vm", "console", "vm1", "--until", "never",
                                 "--timeout", "0.5", stdin=b"")
    assert code == 1 and "did not appear" in err


async def test_cli_read_only_input_is_ignored(host: str, port: FakeSerialPort) -> None:
    async with console(host) as writer:
        await writer.notice("connected")
        code, _, err = await run_cli(host, "vm", "console", "vm1", "--linger", "0.2",
                                     stdin=b"echo sneaky\r")
        assert code == 0
        assert "input ignored" in err
    assert b"sneaky" not in port.received


async def test_cli_errors(host: str, port: FakeSerialPort) -> None:
    code, _, err = await run_cli(host, "vm", "console", "nope", stdin=b"")
    assert code == 2 and "no VM named 'nope'" in err
    code, _, err = await run_cli(host, "vm", "console", "vm1", "--read-only", "--force-write",
                                 stdin=b"")
    assert code == 2 and "exclude" in err


# -- graphical console ------------------------------------------------------------------


async def fake_vnc_server(path: Path) -> asyncio.Server:
    """Speaks first like an RFB server, then echoes."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"RFB 003.008\n")
        while data := await reader.read(1024):
            writer.write(data)
        writer.close()

    return await asyncio.start_unix_server(handle, path=str(path))


async def test_vnc_websocket_bridge(host: str, api: httpx.AsyncClient,
                                    service: HostService) -> None:
    await create_vm(api, "vm1")
    with pytest.raises(ApiError) as off:
        async with open_websocket(host, "/vms/vm1/vnc"):
            pass
    assert off.value.status == 409 and off.value.problem["state"] == "Off"

    await run_job(api, "vm1", "start")
    server = await fake_vnc_server(service.get_vm("vm1").files.run_dir / "vnc.sock")
    try:
        async with open_websocket(host, "/vms/vm1/vnc", subprotocols=["binary"]) as ws:
            assert ws.subprotocol == "binary"
            assert await asyncio.wait_for(ws.recv(), WAIT) == b"RFB 003.008\n"
            await ws.send(b"RFB 003.008\n")
            assert await asyncio.wait_for(ws.recv(), WAIT) == b"RFB 003.008\n"
        async with open_websocket(host, "/vms/vm1/vnc") as ws:  # no subprotocol offered
            assert ws.subprotocol is None
            assert await asyncio.wait_for(ws.recv(), WAIT) == b"RFB 003.008\n"
    finally:
        server.close()


async def test_screenshot(api: httpx.AsyncClient, service: HostService) -> None:
    await create_vm(api, "vm1")
    off = await api.get(f"{API}/vms/vm1/screenshot")
    assert off.status_code == 409 and off.json()["required"] == ["Running", "Paused"]
    assert off.json()["detail"] == ("cannot take a screenshot of VM 'vm1' while it is Off: "
                                    "start it first")

    await run_job(api, "vm1", "start")
    response = await api.get(f"{API}/vms/vm1/screenshot")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert png_size(response.content) == (64, 40)
    thumb = await api.get(f"{API}/vms/vm1/screenshot", params={"max_width": 32})
    assert png_size(thumb.content) == (32, 20)
    bad = await api.get(f"{API}/vms/vm1/screenshot", params={"max_width": 0})
    assert bad.status_code == 400
    # the dump went to the run directory and was removed
    assert not list(service.get_vm("vm1").files.run_dir.glob("screendump-*"))


async def test_cli_screenshot(host: str, api: httpx.AsyncClient, tmp_path: Path) -> None:
    await create_vm(api, "vm1")
    await run_job(api, "vm1", "start")
    out = tmp_path / "shot.png"
    code, stdout, err = await run_cli(host, "vm", "screenshot", "vm1", str(out),
                                      "--max-width", "16", stdin=b"")
    assert code == 0, err
    assert png_size(out.read_bytes()) == (16, 10)
    assert "Saved the display of vm1" in stdout


async def test_console_over_tcp(service: HostService, port: FakeSerialPort) -> None:
    server = QuietServer(uvicorn.Config(create_app(HostRoot(service)), host="127.0.0.1", port=0,
                                        log_level="warning", lifespan="off"))
    serving = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(WAIT):
            while not server.started:
                assert not serving.done(), "uvicorn did not start"
                await asyncio.sleep(0.01)
        tcp_port = server.servers[0].sockets[0].getsockname()[1]
        async with console(f"http+tcp:127.0.0.1:{tcp_port}") as client:
            assert (await client.notice("attached"))["role"] == "writer"
            await client.notice("connected")
            await client.ws.send(b"echo tcp-$((4*4))\r")
            await client.text(b"tcp-16\r\n")
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, WAIT)


def test_parse_notice_tolerates_junk() -> None:
    assert parse_notice('{"event": "role", "detail": "x", "role": "writer"}').role == "writer"
    assert parse_notice("not json").event == "unknown"
