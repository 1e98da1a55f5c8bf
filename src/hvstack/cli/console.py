"""``hv vm console`` and ``hv vm screenshot``: a VM's serial console and its display.

``hv vm console NAME`` works like ``virsh console``. On a terminal it switches the
terminal to raw mode (every key, Ctrl-C included, goes to the guest), copies the guest's
output to the screen, and detaches on the escape character, ``Ctrl-]`` unless
``--escape`` names another; the terminal is restored however the session ends. With
stdin not a terminal (a pipe or a file) it is a tool for scripts: stdin is sent as it
comes, output goes to stdout, and after the end of stdin it exits once the output has
been quiet for ``--linger`` seconds, or at once when ``--until TEXT`` appears in the
output (exit 1 if ``--timeout`` passes first). Input waits until the service's
connection to the serial port is up, so nothing typed early is lost.

Several consoles may be open on one VM; one of them types (see
:mod:`hvstack.host.console_hub`): the first, unless it was opened ``--read-only``;
``--force-write`` takes the input over. Status lines go to stderr.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import typer

from hvstack.cli.connection import current_connection
from hvstack.cli.render import EXIT_ERROR, HostOption, client, console, escape_controls, fail
from hvstack.cli.vm import app
from hvstack.client import ApiError

if TYPE_CHECKING:
    import asyncio

    from websockets.asyncio.client import ClientConnection

# asyncio and websockets are imported by the functions that use them: every other hv
# command would pay for them at start-up (this module registers its commands).

EXIT_NOT_SEEN = 1
DEFAULT_ESCAPE = "^]"


def parse_escape(text: str) -> int:
    """``^]`` (caret notation) or a single character: the byte that detaches."""
    if len(text) == 2 and text[0] == "^" and 0x40 <= ord(text[1].upper()) <= 0x5F:
        return ord(text[1].upper()) - 0x40
    if len(text) == 1 and ord(text) < 0x80:
        return ord(text)
    raise ValueError(f"escape character '{text}' is not ^X caret notation or one ASCII "
                     "character")


@dataclass
class Session:
    """What one console run needs; ``run`` returns the exit code."""

    name: str
    mode: str
    interactive: bool
    escape: int
    until: bytes | None
    timeout: float | None
    linger: float
    write_out: Callable[[bytes], None]
    write_err: Callable[[str], None]

    def _status(self, text: str) -> None:
        # In raw mode a bare "\n" does not return the carriage.
        eol = "\r\n" if self.interactive else "\n"
        self.write_err(f"[hv console: {escape_controls(text)}]{eol}")

    async def run(self, websocket: ClientConnection, keys: asyncio.Queue[bytes | None]) -> int:
        import asyncio

        from websockets.exceptions import ConnectionClosed

        from hvstack.console_client import parse_notice

        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        held: list[bytes] = []  # typed before the serial port was connected
        connected = waited = False
        stdin_open = True
        tail = b""
        receiving: asyncio.Task[str | bytes] = asyncio.create_task(websocket.recv())
        reading: asyncio.Task[bytes | None] = asyncio.create_task(keys.get())
        try:
            while True:
                waits: set[asyncio.Future[Any]] = {receiving}
                if stdin_open:
                    waits.add(reading)
                wait_for = None
                if deadline is not None:
                    wait_for = max(0.0, deadline - time.monotonic())
                if not stdin_open and self.until is None and (
                        wait_for is None or self.linger < wait_for):
                    wait_for = self.linger
                done, _ = await asyncio.wait(waits, timeout=wait_for,
                                             return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    if self.until is not None:
                        self._status(f"'{self.until.decode(errors='replace')}' did not appear "
                                     f"within {self.timeout:g} s")
                        return EXIT_NOT_SEEN
                    return 0
                if receiving in done:
                    try:
                        message = receiving.result()
                    except ConnectionClosed as exc:
                        reason = exc.rcvd.reason if exc.rcvd and exc.rcvd.reason else ""
                        self._status("closed by the host service" + (f": {reason}" * bool(reason)))
                        return EXIT_ERROR if self.until is not None else 0
                    if isinstance(message, bytes):
                        self.write_out(message)
                        if self.until is not None:
                            window = tail + message
                            if self.until in window:
                                return 0
                            tail = window[len(window) - len(self.until) + 1:]
                    else:
                        notice = parse_notice(message)
                        if notice.event == "connected":
                            if waited:  # say so only after saying it was not
                                self._status(notice.detail)
                            connected, waited = True, False
                            for early in held:
                                await websocket.send(early)
                            held.clear()
                        elif notice.event == "attached" and self.interactive:
                            self._status(f"{notice.detail}; escape character is "
                                         f"{_caret(self.escape)}")
                        else:
                            if notice.event in ("waiting", "disconnected"):
                                connected, waited = False, True
                            self._status(notice.detail or notice.event)
                    receiving = asyncio.create_task(websocket.recv())
                if reading in done:
                    typed = reading.result()
                    if typed is None:
                        stdin_open = False
                        continue
                    if self.interactive and self.escape in typed:
                        typed = typed[:typed.index(self.escape)]
                        if typed and connected:
                            await websocket.send(typed)
                        return 0
                    if connected:
                        await websocket.send(typed)
                    else:
                        held.append(typed)
                    reading = asyncio.create_task(keys.get())
        finally:
            for task in (receiving, reading):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                    await task


def _caret(byte: int) -> str:
    return f"^{chr(byte + 0x40)}" if byte < 0x20 else chr(byte)


def _start_stdin_reader(loop: asyncio.AbstractEventLoop) -> asyncio.Queue[bytes | None]:
    """Read fd 0 in a daemon thread (works for terminals, pipes and files alike, and a
    read blocked at exit does not hold the process); None marks the end of input."""
    import asyncio
    import threading

    keys: asyncio.Queue[bytes | None] = asyncio.Queue()

    def pump() -> None:
        while True:
            try:
                data = os.read(0, 4096)
            except OSError:
                data = b""
            with contextlib.suppress(RuntimeError):  # the loop closed: we are exiting
                loop.call_soon_threadsafe(keys.put_nowait, data or None)
            if not data:
                return

    threading.Thread(target=pump, name="console-stdin", daemon=True).start()
    return keys


def _write_stdout(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def _write_stderr(text: str) -> None:
    sys.stderr.write(text)
    sys.stderr.flush()


async def _console(host: str | None, session: Session) -> int:
    import asyncio
    import signal

    from hvstack.console_client import open_websocket, vm_path

    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    for sig in (signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, main.cancel)
    try:
        options = current_connection.get()
        async with open_websocket(host, vm_path(session.name, "console", mode=session.mode),
                                  token=options.token, fingerprint=options.fingerprint,
                                  ca_file=options.ca_file) as websocket:
            keys = _start_stdin_reader(loop)
            return await session.run(websocket, keys)
    except asyncio.CancelledError:
        return 128 + signal.SIGTERM
    finally:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)


@contextlib.contextmanager
def _raw_terminal(enabled: bool) -> Iterator[None]:
    if not enabled:
        yield None
        return
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield None
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@app.command("console")
def console_command(
    name: str,
    read_only: bool = typer.Option(False, "--read-only", help="watch only, never type"),
    force_write: bool = typer.Option(False, "--force-write",
                                     help="take the input over from another console"),
    escape: str = typer.Option(DEFAULT_ESCAPE, "--escape",
                               help="the key that detaches, in caret notation"),
    until: str | None = typer.Option(None, "--until",
                                     help="exit 0 as soon as the output shows this text"),
    timeout: float | None = typer.Option(None, "--timeout",
                                         help="give up after this many seconds (exit 1 "
                                              "with --until)"),
    linger: float = typer.Option(2.0, "--linger",
                                 help="without a terminal: seconds of quiet output to wait "
                                      "for after the end of stdin"),
    host: str | None = HostOption,
) -> None:
    """Connect to a VM's serial console (like virsh console; Ctrl-] detaches).

    Several consoles may watch one VM; one of them types: the first opened without
    --read-only, until it leaves or --force-write takes over. Without a terminal, stdin
    is sent and the output printed; the end of stdin, then --linger seconds of quiet, or
    --until TEXT in the output, ends it.
    """
    if read_only and force_write:
        fail("--read-only and --force-write exclude each other")
    try:
        escape_byte = parse_escape(escape)
    except ValueError as exc:
        fail(str(exc))
    interactive = sys.stdin.isatty()
    session = Session(
        name=name, mode="read-only" if read_only else "force" if force_write else "write",
        interactive=interactive, escape=escape_byte,
        until=until.encode() if until else None, timeout=timeout, linger=linger,
        write_out=_write_stdout, write_err=_write_stderr,
    )
    import asyncio

    try:
        with _raw_terminal(interactive):
            code = asyncio.run(_console(host, session))
    except ApiError as exc:
        fail(str(exc))
    if interactive:
        _write_stderr("\n")
    raise typer.Exit(code)


@app.command("screenshot")
def screenshot_command(
    name: str,
    path: str = typer.Argument(..., help="the PNG file to write ('-' for stdout)"),
    max_width: int | None = typer.Option(None, "--max-width",
                                         help="shrink to at most this many pixels wide"),
    host: str | None = HostOption,
) -> None:
    """Save a PNG of a VM's display (its graphical console)."""
    from hvstack.console_client import vm_path

    params = {"max_width": max_width} if max_width else None
    with client(host) as api, api.stream("GET", vm_path(name, "screenshot"),
                                         params=params) as response:
        png = response.read()
    if path == "-":
        _write_stdout(png)
        return
    with open(path, "wb") as f:
        f.write(png)
    console.print(f"Saved the display of {name} to {path} ({len(png)} bytes)")
