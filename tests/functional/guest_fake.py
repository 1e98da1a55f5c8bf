"""A fake QEMU guest agent for the functional tests: qemu-ga's JSON protocol on a unix
socket, with the guest played by this machine.

:class:`FakeGuestAgent` answers ``guest-sync-delimited`` (0xFF before the reply) and
the commands hvstack uses. ``guest-exec`` runs real processes here (with busybox's
applets first on PATH when busybox is installed, so the guest-side shell scripts run
under the same shell as in the tiny guest), ``guest-file-*`` work on real files, and
qemu-ga's rules are kept: output only once the process exited and its pipes closed, at
most 16 MiB per stream, a pid forgotten once its exit was reported, most commands
refused while frozen. A reply goes out as it is encoded, in parts, yielding to the event
loop between them: the guest is another machine, and its work on a large reply (up to
2 x 16 MiB of output as base64) must not hold the host service's loop, which this fake
shares, for seconds. Tests steer it with ``hang`` (read, never answer), ``garbage``
(junk lines before every reply), ``errors`` (command -> error text) and ``frozen_count``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

MAX_OUTPUT = 16 * 1024 * 1024
FROZEN_ALLOWED = {"guest-ping", "guest-info", "guest-sync", "guest-sync-delimited",
                  "guest-fsfreeze-status", "guest-fsfreeze-thaw"}
OSINFO = {"name": "Fake Linux", "pretty-name": "Fake Linux 1.0", "id": "fake",
          "version": "1.0", "version-id": "1.0", "kernel-release": "6.1.0-fake",
          "kernel-version": "#1 SMP", "machine": "x86_64"}
INTERFACES = [
    {"name": "lo", "hardware-address": "00:00:00:00:00:00", "ip-addresses": [
        {"ip-address-type": "ipv4", "ip-address": "127.0.0.1", "prefix": 8},
        {"ip-address-type": "ipv6", "ip-address": "::1", "prefix": 128}]},
    {"name": "eth0", "hardware-address": "52:54:00:12:34:56", "ip-addresses": [
        {"ip-address-type": "ipv4", "ip-address": "10.0.2.15", "prefix": 24}]},
]
FSINFO = [{"name": "sda1", "mountpoint": "/data", "type": "ext4", "total-bytes": 1 << 30,
           "used-bytes": 1 << 20, "disk": [{"dev": "/dev/sda1", "bus-type": "scsi"}]}]


_PIECE = 3 * 64 * 1024  # bytes encoded to base64 at a time (a multiple of 3)


@dataclass(frozen=True)
class _Base64:
    """Bytes a reply carries as a base64 string, encoded while it is written."""

    data: bytes


def _parts(value: Any) -> Iterator[bytes]:
    """``value`` as JSON, in parts."""
    if isinstance(value, _Base64):
        yield b'"'
        for start in range(0, len(value.data), _PIECE):
            yield base64.b64encode(value.data[start:start + _PIECE])
        yield b'"'
    elif isinstance(value, dict):
        yield b"{"
        for index, (key, item) in enumerate(value.items()):
            yield (b", " if index else b"") + json.dumps(key).encode() + b": "
            yield from _parts(item)
        yield b"}"
    else:
        yield json.dumps(value).encode()


def busybox_bin(where: Path) -> Path | None:
    """A folder of busybox applet links (None without busybox)."""
    busybox = shutil.which("busybox")
    if busybox is None:
        return None
    where.mkdir(parents=True, exist_ok=True)
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True,
                             check=True, timeout=10).stdout.split()
    for applet in applets:
        link = where / applet
        if not link.exists():
            link.symlink_to(busybox)
    return where


class GuestError(Exception):
    def __init__(self, desc: str, cls: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc, self.cls = desc, cls


@dataclass
class _Process:
    proc: asyncio.subprocess.Process
    task: asyncio.Task[None]
    out: bytearray = field(default_factory=bytearray)
    err: bytearray = field(default_factory=bytearray)
    out_truncated: bool = False
    err_truncated: bool = False


class FakeGuestAgent:
    def __init__(self, socket_path: Path | str, bin_dir: Path | None = None) -> None:
        self.socket_path = str(socket_path)
        self.bin_dir = bin_dir
        self.hang = False
        self.garbage = False
        self.errors: dict[str, str] = {}
        self.frozen = False
        self.frozen_count = 1
        self.calls: list[str] = []
        self.osinfo: dict[str, Any] = dict(OSINFO)
        self.hostname = "fake-guest"
        self.on_call: Callable[[str], None] | None = None
        self._server: asyncio.Server | None = None
        self._processes: dict[int, _Process] = {}
        self._files: dict[int, IO[bytes]] = {}
        self._next_handle = 1000
        self._clients: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._stopping = False

    async def start(self) -> FakeGuestAgent:
        Path(self.socket_path).parent.mkdir(parents=True, exist_ok=True)
        self._server = await asyncio.start_unix_server(self._serve, path=self.socket_path,
                                                       limit=64 * 1024 * 1024)
        return self

    async def stop(self) -> None:
        self._stopping = True  # a connection accepted from now on is closed at once
        if self._server is not None:
            self._server.close()
            self._server = None
        # Hang up rather than cancel: a command in hand ends normally (a process it
        # starts is registered, so it is killed below); then the reader sees the end.
        for writer in list(self._writers):
            writer.close()
        clients = list(self._clients)
        if clients:
            _, stuck = await asyncio.wait(clients, timeout=5)
            for task in stuck:
                task.cancel()
        for process in self._processes.values():
            # The whole group: a shell's children would keep the pipes open.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.proc.pid, signal.SIGKILL)
        for process in self._processes.values():
            # Reading to the end and reaping closes the pipes' transports.
            try:
                await asyncio.wait_for(asyncio.shield(process.task), 5)
            except (TimeoutError, OSError):
                process.task.cancel()
        for f in self._files.values():
            f.close()
        with contextlib.suppress(OSError):
            os.unlink(self.socket_path)

    def commands(self) -> list[str]:
        """Calls made, without the heartbeat's pings and syncs."""
        return [c for c in self.calls if c not in ("guest-ping", "guest-sync-delimited",
                                                   "guest-set-time")]

    # -- the protocol ------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if self._stopping:
            writer.close()
            return
        self._clients.add(task)
        self._writers.add(writer)
        try:
            while line := await reader.readline():
                text = line.lstrip(b"\xff").strip()
                if not text:
                    continue
                try:
                    request = json.loads(text)
                except ValueError:
                    continue
                command = request.get("execute", "")
                self.calls.append(command)
                if self.on_call is not None:
                    self.on_call(command)
                if self.garbage:
                    writer.write(b"\x00garbage \xfe not json\n{\"half\": \n[1, 2]\n")
                if self.hang:
                    await writer.drain()
                    continue
                reply = await self._reply(command, request.get("arguments") or {})
                if command == "guest-sync-delimited":
                    writer.write(b"\xff")
                for part in _parts(reply):
                    writer.write(part)
                    if len(part) >= _PIECE:
                        await writer.drain()
                        await asyncio.sleep(0)
                writer.write(b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._clients.discard(task)
            self._writers.discard(writer)
            writer.close()

    async def _reply(self, command: str, args: dict[str, Any]) -> dict[str, Any]:
        try:
            if command in self.errors:
                raise GuestError(self.errors[command])
            if self.frozen and command not in FROZEN_ALLOWED:
                raise GuestError(f"Command {command} has been disabled", "CommandNotFound")
            handler = getattr(self, "_" + command.replace("-", "_"), None)
            if handler is None:
                raise GuestError(f"The command {command} has not been found",
                                 "CommandNotFound")
            return {"return": await handler(args)}
        except GuestError as exc:
            return {"error": {"class": exc.cls, "desc": exc.desc}}

    # -- commands ------------------------------------------------------------------------

    async def _guest_sync_delimited(self, args: dict[str, Any]) -> Any:
        return args["id"]

    async def _guest_sync(self, args: dict[str, Any]) -> Any:
        return args["id"]

    async def _guest_ping(self, args: dict[str, Any]) -> Any:
        return {}

    async def _guest_set_time(self, args: dict[str, Any]) -> Any:
        return {}

    async def _guest_get_osinfo(self, args: dict[str, Any]) -> Any:
        return self.osinfo

    async def _guest_get_host_name(self, args: dict[str, Any]) -> Any:
        return {"host-name": self.hostname}

    async def _guest_network_get_interfaces(self, args: dict[str, Any]) -> Any:
        return INTERFACES

    async def _guest_get_fsinfo(self, args: dict[str, Any]) -> Any:
        return FSINFO

    async def _guest_fsfreeze_status(self, args: dict[str, Any]) -> Any:
        return "frozen" if self.frozen else "thawed"

    async def _guest_fsfreeze_freeze(self, args: dict[str, Any]) -> Any:
        self.frozen = True
        return self.frozen_count

    async def _guest_fsfreeze_thaw(self, args: dict[str, Any]) -> Any:
        count = self.frozen_count if self.frozen else 0
        self.frozen = False
        return count

    def _resolve(self, path: str) -> str | None:
        name = os.path.basename(path)
        if self.bin_dir is not None and (self.bin_dir / name).exists() and (
                "/" not in path or path.startswith(("/bin/", "/usr/bin/", "/sbin/"))):
            return str(self.bin_dir / name)
        if "/" in path:
            return path if os.access(path, os.X_OK) else None
        return shutil.which(path, path=self._path())

    def _path(self) -> str:
        host = os.environ.get("PATH", "/usr/bin:/bin")
        return f"{self.bin_dir}:{host}" if self.bin_dir else host

    async def _guest_exec(self, args: dict[str, Any]) -> Any:
        path = args["path"]
        program = self._resolve(path)
        if program is None:
            raise GuestError("Guest agent command failed, error was 'Failed to execute "
                             f"child process “{path}” (No such file or directory)'")
        data = base64.b64decode(args["input-data"]) if "input-data" in args else None
        proc = await asyncio.create_subprocess_exec(
            program, *args.get("arg", []), stdin=asyncio.subprocess.PIPE if data is not None
            else asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env={"PATH": self._path(), "HOME": "/"},
            start_new_session=True,
        )
        process = _Process(proc, asyncio.create_task(asyncio.sleep(0)))
        process.task = asyncio.create_task(self._collect(process, data))
        self._processes[proc.pid] = process
        return {"pid": proc.pid}

    async def _collect(self, process: _Process, data: bytes | None) -> None:
        proc = process.proc

        async def feed() -> None:
            if data is not None and proc.stdin is not None:
                with contextlib.suppress(ConnectionError):
                    proc.stdin.write(data)
                    await proc.stdin.drain()
                proc.stdin.close()

        async def drain(stream: asyncio.StreamReader | None, sink: bytearray, which: str
                        ) -> None:
            assert stream is not None
            while chunk := await stream.read(65536):
                room = MAX_OUTPUT - len(sink)
                sink += chunk[:max(room, 0)]
                if len(chunk) > room:
                    setattr(process, f"{which}_truncated", True)

        await asyncio.gather(feed(), drain(proc.stdout, process.out, "out"),
                             drain(proc.stderr, process.err, "err"))
        await proc.wait()

    async def _guest_exec_status(self, args: dict[str, Any]) -> Any:
        process = self._processes.get(args["pid"])
        if process is None:
            raise GuestError("Invalid parameter 'pid'")
        if not process.task.done():
            return {"exited": False}
        del self._processes[args["pid"]]
        status: dict[str, Any] = {"exited": True}
        code = process.proc.returncode
        assert code is not None
        if code < 0:
            status["signal"] = -code
        else:
            status["exitcode"] = code
        for which, data in (("out", process.out), ("err", process.err)):
            if data:
                status[f"{which}-data"] = _Base64(bytes(data))
                status[f"{which}-truncated"] = getattr(process, f"{which}_truncated")
        return status

    async def _guest_file_open(self, args: dict[str, Any]) -> Any:
        path, mode = args["path"], args.get("mode", "r")
        try:
            f = open(path, mode if "b" in mode else mode + "b")  # noqa: SIM115
        except OSError as exc:
            raise GuestError(f"failed to open file '{path}' (mode: '{mode}'): "
                             f"{exc.strerror}") from None
        self._next_handle += 1
        self._files[self._next_handle] = f
        return self._next_handle

    def _file(self, args: dict[str, Any]) -> IO[bytes]:
        f = self._files.get(args["handle"])
        if f is None:
            raise GuestError(f"handle '{args['handle']}' has not been found")
        return f

    async def _guest_file_read(self, args: dict[str, Any]) -> Any:
        data = self._file(args).read(args.get("count", 4096))
        return {"count": len(data), "buf-b64": base64.b64encode(data).decode(),
                "eof": len(data) < args.get("count", 4096)}

    async def _guest_file_write(self, args: dict[str, Any]) -> Any:
        data = base64.b64decode(args["buf-b64"])
        count = self._file(args).write(data)
        return {"count": count, "eof": False}

    async def _guest_file_flush(self, args: dict[str, Any]) -> Any:
        self._file(args).flush()
        return {}

    async def _guest_file_close(self, args: dict[str, Any]) -> Any:
        self._file(args).close()
        del self._files[args["handle"]]
        return {}
