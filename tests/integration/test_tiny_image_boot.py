"""The tiny guest image boots under TCG on Generation 1 and 2 and keeps /data.

Builds the image once per session (cache: ``$HV_CACHE_DIR`` or ``<repo>/.cache``), then
for each machine configuration boots a copy-on-write overlay of it with plain
``qemu-system-x86_64 -accel tcg``:

1. waits for ``hvstack-tiny: ready`` on the serial log, checks the kernel's boot lines,
   pings the guest agent and writes a file to /data through ``guest-exec``;
2. presses the ACPI power button (QMP ``system_powerdown``): the guest must power
   off by itself, so QEMU exits;
3. boots the same overlay again, reads the file back through the agent and shuts the
   guest down with the agent's ``guest-shutdown`` (the guest's /sbin/shutdown).

No timing is asserted; boot times are printed (``pytest -s``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

from hvstack.images.tiny import READY_LINE, build_tiny

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
QEMU = "qemu-system-x86_64"
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
BOOT_TIMEOUT = 120.0
EXIT_TIMEOUT = 90.0
AGENT_TIMEOUT = 30.0


@dataclass(frozen=True)
class Machine:
    name: str
    generation: int
    disk_args: tuple[str, ...]


MACHINES = (
    Machine("gen1-ide", 1, ("-device", "ide-hd,bus=ide.0,unit=0,drive=disk0")),
    Machine(
        "gen2-virtio-scsi",
        2,
        ("-device", "virtio-scsi-pci,id=scsi0", "-device", "scsi-hd,bus=scsi0.0,drive=disk0"),
    ),
    Machine("gen2-virtio-blk", 2, ("-device", "virtio-blk-pci,drive=disk0")),
)


@pytest.fixture(scope="session")
def tiny_image() -> Path:
    cache_dir = Path(os.environ.get("HV_CACHE_DIR") or REPO / ".cache")
    return asyncio.run(build_tiny(cache_dir))


@pytest.fixture
def overlay(tiny_image: Path, tmp_path: Path) -> Path:
    """A qcow2 overlay on the image, so the cached base stays pristine."""
    path = tmp_path / "overlay.qcow2"
    subprocess.run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            str(tiny_image),
            "-F",
            "qcow2",
            str(path),
        ],
        check=True,
        timeout=60,
    )
    return path


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short folder for unix sockets (their paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="hvt-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Agent:
    """A minimal qemu-ga client over the host end of the virtio-serial channel."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, path: Path, timeout: float = AGENT_TIMEOUT) -> AsyncIterator[Agent]:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), 10)
        agent = cls(reader, writer)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    try:
                        await asyncio.wait_for(agent.sync(), 5)
                        break
                    except TimeoutError:
                        continue
            yield agent
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def sync(self) -> None:
        token = secrets.randbelow(2**31)
        request = {"execute": "guest-sync-delimited", "arguments": {"id": token}}
        self.writer.write(b"\xff" + json.dumps(request).encode() + b"\n")
        await self.writer.drain()
        while True:
            await self.reader.readuntil(b"\xff")
            line = await self.reader.readline()
            with contextlib.suppress(ValueError):
                if json.loads(line).get("return") == token:
                    return

    async def call(self, command: str, timeout: float = AGENT_TIMEOUT, **args: Any) -> Any:
        request: dict[str, Any] = {"execute": command}
        if args:
            request["arguments"] = args
        self.writer.write(json.dumps(request).encode() + b"\n")
        await self.writer.drain()
        line = await asyncio.wait_for(self.reader.readline(), timeout)
        reply = json.loads(line)
        assert "error" not in reply, f"{command} failed: {reply['error']}"
        return reply["return"]

    async def shell(self, script: str, timeout: float = AGENT_TIMEOUT) -> tuple[int, str]:
        started = await self.call(
            "guest-exec", path="/bin/sh", arg=["-c", script], **{"capture-output": True}
        )
        async with asyncio.timeout(timeout):
            while True:
                status = await self.call("guest-exec-status", pid=started["pid"])
                if status["exited"]:
                    out = base64.b64decode(status.get("out-data", "")).decode()
                    return int(status.get("exitcode", -1)), out
                await asyncio.sleep(0.2)


class Guest:
    """One QEMU process booting the overlay, with its serial log and sockets."""

    def __init__(self, machine: Machine, overlay: Path, workdir: Path, sockdir: Path, n: int):
        self.machine = machine
        self.serial = workdir / f"serial-{n}.log"
        self.stderr = workdir / f"qemu-{n}.log"
        self.qga = sockdir / f"qga{n}.sock"
        self.qmp = sockdir / f"qmp{n}.sock"
        self.vars = workdir / "OVMF_VARS.fd"
        self.overlay = overlay
        self.proc: asyncio.subprocess.Process | None = None
        self.started = 0.0

    def argv(self) -> list[str]:
        args = [QEMU, "-nodefaults", "-no-user-config", "-accel", "tcg", "-m", "512"]
        args += ["-display", "none", "-serial", f"file:{self.serial}"]
        if self.machine.generation == 1:
            args += ["-machine", "pc"]
        else:
            args += ["-machine", "q35"]
            args += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}"]
            args += ["-drive", f"if=pflash,format=raw,unit=1,file={self.vars}"]
        args += [
            "-blockdev",
            f"driver=qcow2,node-name=disk0,file.driver=file,file.filename={self.overlay}",
            *self.machine.disk_args,
            "-device",
            "virtio-serial-pci",
            "-chardev",
            f"socket,id=qga0,path={self.qga},server=on,wait=off",
            "-device",
            "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
            "-chardev",
            f"socket,id=qmp0,path={self.qmp},server=on,wait=off",
            "-mon",
            "chardev=qmp0,mode=control",
        ]
        return args

    async def start(self) -> None:
        if self.machine.generation == 2 and not self.vars.exists():
            shutil.copyfile(OVMF_VARS, self.vars)
        with self.stderr.open("wb") as err:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv(), stdin=subprocess.DEVNULL, stdout=err, stderr=err
            )
        self.started = time.monotonic()

    def log(self) -> str:
        try:
            return self.serial.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    async def wait_for(self, text: str, timeout: float = BOOT_TIMEOUT) -> float:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if self.proc.returncode is not None:
                code = self.proc.returncode
                pytest.fail(f"QEMU exited ({code}) before {text!r}:\n{self._tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {text!r} within {timeout:g} s:\n{self._tail()}")
            await asyncio.sleep(0.2)
        return time.monotonic() - self.started

    async def wait_exit(self, timeout: float = EXIT_TIMEOUT) -> int:
        assert self.proc is not None
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            pytest.fail(f"the guest did not power off within {timeout:g} s:\n{self._tail()}")

    async def qmp_command(self, command: str) -> None:
        client = QMPClient(f"test-{self.machine.name}")
        await asyncio.wait_for(client.connect(str(self.qmp)), 10)
        try:
            await asyncio.wait_for(client.execute(command), 10)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.disconnect(), 10)

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await asyncio.wait_for(self.proc.wait(), 10)

    def _tail(self) -> str:
        stderr = self.stderr.read_text(errors="replace") if self.stderr.exists() else ""
        return f"--- serial (tail) ---\n{self.log()[-3000:]}\n--- qemu ---\n{stderr[-2000:]}"


@contextlib.asynccontextmanager
async def booted(guest: Guest) -> AsyncIterator[Guest]:
    await guest.start()
    try:
        yield guest
    finally:
        await guest.kill()


@pytest.mark.parametrize("machine", MACHINES, ids=[m.name for m in MACHINES])
async def test_tiny_image_boots_and_keeps_data(
    machine: Machine, overlay: Path, tmp_path: Path, sockdir: Path
) -> None:
    token = f"hvstack-{secrets.token_hex(8)}"

    async with booted(Guest(machine, overlay, tmp_path, sockdir, 1)) as guest:
        took = await guest.wait_for(READY_LINE)
        print(f"\n{machine.name}: first boot ready after {took:.1f} s")
        log = guest.log()
        assert "Linux version" in log
        assert "console=ttyS0,115200" in log
        assert " quiet" not in log.split("Command line:", 1)[1].split("\n", 1)[0]
        await guest.wait_for("tiny# ", timeout=30)
        async with Agent.connect(guest.qga) as agent:
            assert await agent.call("guest-ping") == {}
            assert (await agent.call("guest-get-host-name"))["host-name"] == "tiny"
            code, out = await agent.shell(
                f"echo {token} > /data/hello.txt && sync && grep -c ' /data ext4 rw' /proc/mounts"
            )
            assert (code, out.strip()) == (0, "1")
        await guest.qmp_command("system_powerdown")
        assert await guest.wait_exit() == 0
        assert "hvstack-tiny: poweroff" in guest.log()

    async with booted(Guest(machine, overlay, tmp_path, sockdir, 2)) as guest:
        took = await guest.wait_for(READY_LINE)
        print(f"{machine.name}: second boot ready after {took:.1f} s")
        async with Agent.connect(guest.qga) as agent:
            code, out = await agent.shell("cat /data/hello.txt")
            assert (code, out.strip()) == (0, token)
            agent.writer.write(json.dumps({"execute": "guest-shutdown"}).encode() + b"\n")
            await agent.writer.drain()
        assert await guest.wait_exit() == 0
        assert "hvstack-tiny: poweroff" in guest.log()
