"""Guest operations for real, in one boot of the tiny guest (TCG): ``hv vm exec``,
``hv vm copy-file`` both ways, KVP both ways with intrinsic data, and the backup
service's freeze and thaw of /data.

All guest access goes through the host service: the agent's socket takes one client at
a time, and the service keeps it (so ``host.guest(...)`` is not used here).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from hvstack.client import Client
from tests.integration.hostproc import BOOT_TIMEOUT, HostProcess

pytestmark = pytest.mark.integration
READY = "hvstack-tiny: ready"
NAME = "guestops"


def run(host: HostProcess, *command: str, options: tuple[str, ...] = ()) -> Any:
    return host.hv("vm", "exec", NAME, *options, "--", *command)


def run_json(host: HostProcess, *command: str) -> dict[str, Any]:
    result = run(host, *command, options=("-o", "json"))
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def wait_for_agent(host: HostProcess) -> None:
    deadline = time.monotonic() + BOOT_TIMEOUT
    while run(host, "true").returncode != 0:
        assert time.monotonic() < deadline, "the guest agent did not answer"
        time.sleep(1)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_exec_copy_kvp_and_freeze_in_one_boot(host: HostProcess, tmp_path: Path) -> None:
    host.ok("vm", "create", NAME, "--generation", "1", "--image", "tiny", "--memory", "256M")
    host.ok("vm", "start", NAME)
    host.wait_console(NAME, READY)
    wait_for_agent(host)

    # -- exec: output, exit codes, stderr, a missing program, a timeout ---------------
    result = run(host, "echo", "hello", "guest")
    assert (result.returncode, result.stdout, result.stderr) == (0, "hello guest\n", "")
    result = run(host, "sh", "-c", "echo out; echo err >&2; exit 3")
    assert (result.returncode, result.stdout, result.stderr) == (3, "out\n", "err\n")
    assert run_json(host, "sh", "-c", "exit 2")["exit_code"] == 2
    missing = run(host, "no-such-program")
    assert missing.returncode == 2 and missing.stdout == ""
    assert missing.stderr.strip().splitlines() == [
        "error: cannot run 'no-such-program' in VM 'guestops': Failed to execute child "
        "process “no-such-program” (No such file or directory)"]
    stdin = tmp_path / "stdin.txt"
    stdin.write_text("through stdin\n")
    assert run(host, "cat", options=("--input", str(stdin))).stdout == "through stdin\n"
    slow = run(host, "sh", "-c", "sleep 3031 & sleep 3032", options=("--timeout", "3"))
    assert slow.returncode == 2 and "did not finish within 3 s" in slow.stderr
    assert "sleep 303" not in run(host, "ps").stdout  # the whole tree was killed

    # -- copy-file: needs guest services; 10 MB both ways with the same checksum ------
    local = tmp_path / "big.bin"
    local.write_bytes(os.urandom(10 * 1000 * 1000))
    refused = host.hv("vm", "copy-file", NAME, str(local), "/data/in/big.bin")
    assert refused.returncode == 2 and "guest services integration service" in refused.stderr
    host.ok("vm", "set", NAME, "--enable", "guest-services")
    host.ok("vm", "copy-file", NAME, str(local), "/data/in/big.bin", "--create-dirs")
    in_guest = run(host, "sha256sum", "/data/in/big.bin").stdout.split()[0]
    assert in_guest == sha256(local)
    assert run(host, "ls", "-a", "/data/in").stdout.split() == [".", "..", "big.bin"]
    back = tmp_path / "back.bin"
    host.ok("vm", "copy-file", NAME, "/data/in/big.bin", str(back), "--from-guest")
    assert sha256(back) == sha256(local)
    again = host.hv("vm", "copy-file", NAME, str(local), "/data/in/big.bin")
    assert again.returncode == 2 and "--overwrite" in again.stderr
    denied = host.hv("vm", "copy-file", NAME, str(local), "/proc/big.bin")
    assert denied.returncode == 2 and "does not allow" in denied.stderr

    # -- KVP: host to guest, guest to host, intrinsic data --------------------------
    assert "written into the guest" in host.ok("vm", "kvp", "set", NAME, "color", "blue")
    assert run(host, "cat", "/var/lib/hvstack/kvp/host").stdout == "color=blue\n"
    run(host, "sh", "-c", "echo mood=happy > /var/lib/hvstack/kvp/guest")
    listing = json.loads(host.ok("vm", "kvp", "list", NAME, "-o", "json"))
    assert (listing["host"], listing["guest"]) == ({"color": "blue"}, {"mood": "happy"})
    items = listing["intrinsic"]["items"]
    assert items["OSName"] == "hvstack tiny guest (busybox)"
    assert items["FullyQualifiedDomainName"] == "tiny"
    assert "127.0.0.1" in items["NetworkAddressIPv4"].split(";")
    assert "lo" in [a["name"] for a in listing["intrinsic"]["adapters"]]
    bad = host.hv("vm", "kvp", "set", NAME, "a=b", "c")
    assert bad.returncode == 2 and "must not contain '='" in bad.stderr
    host.ok("vm", "kvp", "delete", NAME, "color")
    assert run(host, "cat", "/var/lib/hvstack/kvp/host").stdout == ""

    # -- backup: freeze /data (ext4; the initramfs root cannot be frozen), thaw --------
    with Client(f"unix:{host.socket}") as api:
        frozen = api.post(f"/vms/{NAME}/fsfreeze", {"action": "freeze"})
        assert (frozen["status"], frozen["filesystems"]) == ("frozen", 1)
        assert api.post(f"/vms/{NAME}/fsfreeze", {"action": "status"})["status"] == "frozen"
        blocked = run(host, "true")
        assert blocked.returncode == 2 and "frozen" in blocked.stderr
        thawed = api.post(f"/vms/{NAME}/fsfreeze", {"action": "thaw"})
        assert (thawed["status"], thawed["filesystems"]) == ("thawed", 1)
    result = run(host, "sh", "-c", "echo after > /data/after && cat /data/after")
    assert (result.returncode, result.stdout) == (0, "after\n")

    host.ok("vm", "stop", NAME, "--turn-off")
