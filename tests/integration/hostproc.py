"""Helpers for integration tests: a real ``hv serve`` process, the ``hv`` CLI, and a
minimal guest-agent client for checking what happens inside a guest."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from hvstack.host.config import load_config

HV = [sys.executable, "-m", "hvstack.cli"]
BOOT_TIMEOUT = 240.0  # generous: TCG on a loaded 2-core machine


class HostProcess:
    """One host service with its own data directory, run as ``hv serve``."""

    def __init__(self, data_dir: Path, extra_args: tuple[str, ...] = ()) -> None:
        self.data_dir = data_dir
        self.socket = data_dir / "hv.sock"
        self.extra_args = extra_args
        self.proc: subprocess.Popen[bytes] | None = None
        self.env = {**os.environ, "HV_HOST": f"unix:{self.socket}"}
        self.env.pop("HV_DATA_DIR", None)
        self.log = data_dir.parent / f"{data_dir.name}-serve.log"

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*HV, "serve", "--data-dir", str(self.data_dir), *self.extra_args],
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

    def qga_socket(self, name: str) -> Path:
        run_dir = load_config(str(self.data_dir)).run_dir
        return run_dir / self.vm(name)["id"] / "qga.sock"

    def guest(self, name: str) -> GuestAgent:
        return GuestAgent(self.qga_socket(name))


class GuestAgent:
    """Just enough of the QEMU guest agent protocol to run commands in a test guest."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def call(self, command: str, arguments: dict[str, Any] | None = None,
             timeout: float = 30) -> Any:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(timeout)
            sock.connect(str(self.path))
            stream = sock.makefile("rwb")
            sync_id = int(time.time() * 1000) % 2**31
            # guest-sync-delimited flushes stale replies from earlier, broken sessions.
            stream.write(b"\xff" + json.dumps({"execute": "guest-sync-delimited",
                                               "arguments": {"id": sync_id}}).encode() + b"\n")
            stream.flush()
            while True:
                line = stream.readline()
                if not line:
                    raise ConnectionError("guest agent closed the connection")
                line = line.lstrip(b"\xff").strip()
                if line and json.loads(line).get("return") == sync_id:
                    break
            message: dict[str, Any] = {"execute": command}
            if arguments:
                message["arguments"] = arguments
            stream.write(json.dumps(message).encode() + b"\n")
            stream.flush()
            reply = json.loads(stream.readline())
        if "error" in reply:
            raise RuntimeError(f"guest agent: {reply['error']}")
        return reply.get("return")

    def wait_ready(self, timeout: float = BOOT_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.call("guest-ping", timeout=5)
                return
            except (OSError, ConnectionError, ValueError, RuntimeError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)

    def sh(self, script: str, timeout: float = 60) -> tuple[int, str]:
        started = self.call("guest-exec", {"path": "/bin/sh", "arg": ["-c", script],
                                           "capture-output": True})
        deadline = time.monotonic() + timeout
        while True:
            status = self.call("guest-exec-status", {"pid": started["pid"]})
            if status.get("exited"):
                out = base64.b64decode(status.get("out-data", "")).decode(errors="replace")
                return int(status.get("exitcode", -1)), out
            if time.monotonic() > deadline:
                raise TimeoutError(f"guest command did not finish: {script}")
            time.sleep(0.2)
