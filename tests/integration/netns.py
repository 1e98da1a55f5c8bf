"""Network namespaces for integration tests: a host service's own network, a namespace
that plays the physical network or a remote service, veth pairs between them, and
small TCP services (echo, sink, http) on addresses there.

Everything is made inside namespaces this module creates (``hvt-guest-<pid>-<n>``);
nothing touches the namespace the tests run in. :class:`Lab` owns what it made and
removes it on close, also when a test fails: processes in its namespaces (the host
service's QEMU and dnsmasq included) are killed by pid, then the namespaces deleted
(their veths, bridges and nftables tables go with them).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PREFIX = f"hvt-guest-{os.getpid()}"
_numbers = itertools.count(1)
WAIT = 120.0  # a bound for failures on a slow machine, never a timing assertion
SERVER = Path(__file__).with_name("netserve.py")


def _run(argv: list[str], *, check: bool = True, timeout: float = 60,
         input_: str | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                            input=input_)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({result.returncode}): "
                             f"{result.stderr.strip()}")
    return result


class Namespace:
    """One network namespace with ``lo`` up."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.procs: list[subprocess.Popen[bytes]] = []

    def exec_argv(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, *argv: str, check: bool = True,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return _run(self.exec_argv(*argv), check=check, timeout=timeout)

    def ip(self, *args: str, check: bool = True) -> str:
        return _run(["ip", "-n", self.name, *args], check=check).stdout

    def ip_json(self, *args: str) -> Any:
        return json.loads(_run(["ip", "-j", "-n", self.name, *args]).stdout or "[]")

    def popen(self, *argv: str, log: Path | None = None) -> subprocess.Popen[bytes]:
        """Start ``argv`` in the namespace; it is killed when the namespace goes."""
        out = open(log, "ab") if log is not None else subprocess.DEVNULL  # noqa: SIM115
        try:
            proc = subprocess.Popen(self.exec_argv(*argv), stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            if log is not None:
                out.close()  # type: ignore[union-attr]
        self.procs.append(proc)
        return proc

    def ping(self, address: str, count: int = 1, wait: int = 2) -> bool:
        # busybox: hosts without iputils-ping have it (the tiny image needs it anyway)
        result = self.run("busybox", "ping", "-c", str(count), "-W", str(wait), address,
                          check=False, timeout=count * wait + 30)
        return result.returncode == 0

    def wait_ping(self, address: str, timeout: float = WAIT) -> None:
        wait_until(lambda: self.ping(address), timeout, f"{self.name} cannot ping {address}")

    def tcp_request(self, address: str, port: int, text: str) -> str | None:
        """Send ``text`` to ``address:port`` from here; the answer, None if no
        connection could be made."""
        result = self.run(sys.executable, str(SERVER), "client", address, str(port), text,
                          check=False, timeout=90)
        return result.stdout if result.returncode == 0 else None

    def links(self) -> dict[str, dict[str, Any]]:
        return {link["ifname"]: link for link in self.ip_json("-d", "link", "show")}

    def addresses(self, ifname: str) -> list[str]:
        found = self.ip_json("-4", "addr", "show", "dev", ifname)
        return [f"{a['local']}/{a['prefixlen']}" for link in found
                for a in link.get("addr_info", ())]

    def routes(self) -> list[dict[str, Any]]:
        routes: list[dict[str, Any]] = self.ip_json("-4", "route", "show")
        return routes

    def pids(self) -> list[int]:
        out = _run(["ip", "netns", "pids", self.name], check=False).stdout
        return [int(pid) for pid in out.split()]

    def close(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        # whatever else runs in here was started by a test's host service (QEMU,
        # dnsmasq): kill those processes by pid so the namespace can really go
        for _ in range(50):
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        _run(["ip", "netns", "delete", self.name], check=False)


class Lab:
    """Namespaces and veth pairs made for one test (or module); ``close`` removes all."""

    def __init__(self) -> None:
        self.namespaces: list[Namespace] = []

    def namespace(self, role: str) -> Namespace:
        """A new namespace; ``role`` (letters) only makes ``ip netns`` readable."""
        name = f"{PREFIX}-{next(_numbers)}-{role}"
        _run(["ip", "netns", "add", name])
        space = Namespace(name)
        self.namespaces.append(space)
        space.ip("link", "set", "lo", "up")
        return space

    def veth(self, a: Namespace, a_name: str, b: Namespace, b_name: str,
             a_address: str | None = None, b_address: str | None = None) -> None:
        """A veth pair ``a_name`` in ``a`` and ``b_name`` in ``b``, both up, with the
        given addresses (``10.0.0.1/24``). Made inside ``a``: never in our own
        namespace."""
        a.ip("link", "add", a_name, "type", "veth", "peer", "name", b_name, "netns", b.name)
        for space, name, address in ((a, a_name, a_address), (b, b_name, b_address)):
            if address:
                space.ip("addr", "add", address, "dev", name)
            space.ip("link", "set", name, "up")

    def close(self) -> None:
        for space in reversed(self.namespaces):
            space.close()
        self.namespaces.clear()


@contextlib.contextmanager
def lab() -> Iterator[Lab]:
    made = Lab()
    try:
        yield made
    finally:
        made.close()


def wait_until(check: Any, timeout: float = WAIT, what: str = "condition") -> Any:
    """Poll ``check()`` until it returns something true; return it."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} (waited {timeout:g} s)")
        time.sleep(0.5)


class TcpService:
    """A small TCP service in a namespace (see ``netserve.py`` for the modes): ``echo``
    answers each connection with ``PEER_IP DATA`` once the client is done sending;
    ``sink`` reads until EOF and answers with a JSON report of bytes and seconds;
    ``http`` answers any request with ``nbytes`` bytes. Every finished connection's report
    (JSON) is appended to :attr:`reports`."""

    def __init__(self, space: Namespace, address: str, port: int, mode: str,
                 workdir: Path, nbytes: int = 0) -> None:
        self.address, self.port, self.mode = address, port, mode
        tag = f"{mode}-{address}-{port}"
        self.reports = workdir / f"{tag}.jsonl"
        ready = workdir / f"{tag}.ready"
        ready.unlink(missing_ok=True)
        space.popen(sys.executable, str(SERVER), mode, address, str(port), str(self.reports),
                    str(ready), str(nbytes), log=workdir / f"{tag}.log")
        wait_until(ready.exists, 60, f"the {mode} service on {address}:{port} did not start")

    def finished(self) -> list[dict[str, Any]]:
        if not self.reports.exists():
            return []
        return [json.loads(line) for line in self.reports.read_text().splitlines() if line]
