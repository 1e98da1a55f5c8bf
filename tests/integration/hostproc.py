"""Helpers for integration tests: a real ``hv serve`` process, the ``hv`` CLI, and
commands in a guest through the service's exec API.

A service runs in the test's own network namespace with ``--default-switch none``
(new VMs get QEMU's user-mode NAT, as before switches existed), or, when given a
namespace (``netns.Lab.namespace``), inside that namespace through ``ip netns exec``
with its own data directory: its bridges, taps, nftables tables and dnsmasq stay
there, and the CLI still reaches it over its unix socket."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hvstack.client import Client

HV = [sys.executable, "-m", "hvstack.cli"]
BOOT_TIMEOUT = 240.0  # generous: TCG on a loaded 2-core machine


class HostProcess:
    """One host service with its own data directory, run as ``hv serve``."""

    def __init__(self, data_dir: Path, extra_args: tuple[str, ...] = (),
                 netns: str | None = None) -> None:
        self.data_dir = data_dir
        self.socket = data_dir / "hv.sock"
        self.netns = netns
        if netns is None and not any(a.startswith("--default-switch") for a in extra_args):
            extra_args = ("--default-switch", "none", *extra_args)
        self.extra_args = extra_args
        self.proc: subprocess.Popen[bytes] | None = None
        self.env = {**os.environ, "HV_HOST": f"unix:{self.socket}"}
        self.env.pop("HV_DATA_DIR", None)
        self.log = data_dir.parent / f"{data_dir.name}-serve.log"

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        with open(self.log, "ab") as log:
            # ip netns exec execs the command: the pid is the service's own
            self.proc = subprocess.Popen(
                [*prefix, *HV, "serve", "--data-dir", str(self.data_dir), *self.extra_args],
                stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.hv("host", "info").returncode == 0:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"hv serve did not come up:\n{self.log.read_text()}")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def hv(self, *args: str, input_: str | None = None,
           timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*HV, *args], capture_output=True, text=True, env=self.env,
                              timeout=timeout, input=input_)

    def ok(self, *args: str) -> str:
        result = self.hv(*args)
        assert result.returncode == 0, f"hv {' '.join(args)} failed: {result.stderr}"
        return result.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "-o", "json"))

    def vm(self, name: str) -> dict[str, Any]:
        view: dict[str, Any] = self.json("vm", "show", name)
        return view

    def console(self, name: str) -> str:
        return self.ok("vm", "log", name, "--bytes", "1000000")

    def wait_console(self, name: str, text: str, timeout: float = BOOT_TIMEOUT,
                     after: int = 0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.console(name)
            if text in log[after:]:
                return log
            time.sleep(0.5)
        raise AssertionError(f"'{text}' did not appear on the console of {name}:\n"
                             f"{self.console(name)[-3000:]}")

    def guest(self, name: str) -> Guest:
        return Guest(self, name)


@contextlib.contextmanager
def running_host(data: Path, tiny_image: Path, *, netns: str | None = None,
                 extra_args: tuple[str, ...] = ()) -> Iterator[HostProcess]:
    """A host service on ``data`` with the tiny image in its catalog (in network
    namespace ``netns`` when given); on the way out it is stopped and whatever a
    failed test left running is turned off."""
    (data / "images").mkdir(parents=True)
    target = data / "images" / f"tiny{tiny_image.suffix}"
    try:
        os.link(tiny_image, target)
    except OSError:
        shutil.copyfile(tiny_image, target)
    service = HostProcess(data, extra_args, netns=netns)
    service.start()
    try:
        yield service
    finally:
        service.stop()
        for pidfile in data.glob("vms/*/qemu.pid"):
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pidfile.read_text()), 9)


class Guest:
    """Commands in a test guest through the host service's exec API: the service owns
    the guest agent's channel (QEMU serves it to one client at a time)."""

    def __init__(self, host: HostProcess, name: str) -> None:
        self.host = host
        self.name = name

    def wait_ready(self, timeout: float = BOOT_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while self.host.vm(self.name).get("heartbeat") != "OK":
            if time.monotonic() > deadline:
                raise AssertionError(f"the guest agent of {self.name} never answered")
            time.sleep(0.5)

    def sh(self, script: str, timeout: float = 60) -> tuple[int, str]:
        with Client(f"unix:{self.host.socket}") as api:
            result = api.post(f"/vms/{self.name}/exec",
                              {"command": ["/bin/sh", "-c", script],
                               "timeout_seconds": timeout})
        out = result["stdout"]
        if result["encoding"] == "base64":
            out = base64.b64decode(out).decode(errors="replace")
        return int(result["exit_code"] if result["exit_code"] is not None else -1), out

    def ok(self, script: str, timeout: float = 60) -> str:
        """Run ``script`` and return its output; fail the test unless it exits 0."""
        code, out = self.sh(script, timeout)
        assert code == 0, f"in {self.name}, `{script}` exited {code}:\n{out}"
        return out
