"""The backing-file attack, end to end in a real guest (TCG): a guest writes qcow2
headers onto its raw disks, naming a host file as backing file (one inside the storage
roots, and /etc/shadow) or as external data file; the disks are detached and attached
again and the VM started. hvstack must open them as the raw disks they are: the guest
reads back the bytes it wrote, and QEMU has no node for, and no open file of, any of
the host files. A qcow2 made on the host with such a header is refused at attach.
"""

from __future__ import annotations

import hashlib
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.hostproc import BOOT_TIMEOUT, HostProcess

pytestmark = pytest.mark.integration
READY = "hvstack-tiny: ready"
NAME = "victim"
MiB = 1024 * 1024


def exec_ok(host: HostProcess, *command: str, input_file: Path | None = None) -> str:
    options = ("--input", str(input_file)) if input_file else ()
    result = host.hv("vm", "exec", NAME, *options, "--", *command)
    assert result.returncode == 0, result.stderr
    return result.stdout


def boot(host: HostProcess) -> None:
    before = len(host.console(NAME))
    host.ok("vm", "start", NAME)
    host.wait_console(NAME, READY, after=before)
    deadline = time.monotonic() + BOOT_TIMEOUT
    while host.hv("vm", "exec", NAME, "--", "true").returncode != 0:
        assert time.monotonic() < deadline, "the guest agent did not answer"
        time.sleep(1)


def qcow2_header(path: Path, *options: str) -> bytes:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", *options, str(path),
                    "16M"], check=True)
    return path.read_bytes()


def qemu_files(pid: int) -> tuple[str, set[str]]:
    """QEMU's command line and the files it has open."""
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    fds = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            fds.add(str(fd.readlink()))
        except OSError:
            continue
    return cmdline, fds


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_guest_written_headers_never_reach_host_files(host: HostProcess,
                                                      tmp_path: Path) -> None:
    d = host.data_dir
    secret = d / "secret.raw"  # a host file inside the storage roots
    secret.write_bytes(b"HOST-SECRET\n".ljust(MiB, b"S"))
    victim = d / "victim.raw"  # a host file a data_file= header would write into
    headers = {
        "vda": qcow2_header(tmp_path / "h1.qcow2", "-b", str(secret), "-F", "raw"),
        "vdb": qcow2_header(tmp_path / "h2.qcow2", "-b", "/etc/shadow", "-F", "raw"),
        "vdc": qcow2_header(tmp_path / "h3.qcow2", "-o", f"data_file={victim}"),
    }
    victim.write_bytes(b"HOST-VICTIM\n".ljust(16 * MiB, b"V"))
    victim_sum = sha(victim.read_bytes())
    disks = {dev: d / f"data-{dev}.raw" for dev in headers}

    host.ok("vm", "create", NAME, "--generation", "1", "--image", "tiny", "--memory", "256M")
    for path in disks.values():
        host.json("disk", "create", str(path), "--size", "16M", "--type", "fixed")
        host.ok("vm", "set", NAME, "--attach-disk", str(path), "--bus", "virtio")
    boot(host)
    for dev, header in headers.items():
        source = tmp_path / f"{dev}.bin"
        source.write_bytes(header)
        exec_ok(host, "dd", f"of=/dev/{dev}", "bs=65536", "conv=fsync", input_file=source)
    exec_ok(host, "sync")
    host.ok("vm", "stop", NAME, "--turn-off")
    for dev, path in disks.items():  # the disk now holds the guest's qcow2 header
        assert path.read_bytes()[:len(headers[dev])] == headers[dev]

    for path in disks.values():
        host.ok("vm", "set", NAME, "--detach-disk", str(path))
        host.ok("vm", "set", NAME, "--attach-disk", str(path), "--bus", "virtio")
    assert {disk["format"] for disk in host.vm(NAME)["disks"][1:]} == {"raw"}
    boot(host)

    # the guest sees the raw bytes it wrote, not the secret behind a backing file
    for dev, header in headers.items():
        seen = exec_ok(host, "sh", "-c",
                       f"head -c {len(header)} /dev/{dev} | sha256sum").split()[0]
        assert seen == sha(header), f"/dev/{dev} does not show the bytes the guest wrote"
    exec_ok(host, "sh", "-c", "printf GUEST-DATA | dd of=/dev/vdc bs=512 seek=2048 "
            "conv=fsync 2>/dev/null")
    pid = int(host.vm(NAME)["pid"])
    cmdline, open_files = qemu_files(pid)
    for host_file in (str(secret), "/etc/shadow", str(victim)):
        assert host_file not in cmdline
        assert host_file not in open_files
    for path in disks.values():
        assert str(path) in open_files
    host.ok("vm", "stop", NAME, "--turn-off")
    assert sha(victim.read_bytes()) == victim_sum
    assert b"GUEST-DATA" in disks["vdc"].read_bytes()[MiB:MiB + 512]

    # a qcow2 made on the host with such headers is refused at attach
    evil = d / "evil.qcow2"
    evil.write_bytes(headers["vdb"])
    refused = host.hv("vm", "set", NAME, "--attach-disk", str(evil))
    assert refused.returncode == 2 and "outside the storage roots" in refused.stderr
    evil.write_bytes(headers["vdc"])
    refused = host.hv("vm", "set", NAME, "--attach-disk", str(evil))
    assert refused.returncode == 2 and "external file" in refused.stderr
    # and a raw disk is not attached as qcow2 on request
    refused = host.hv("vm", "set", NAME, "--attach-disk", str(disks["vda"]),
                      "--disk-format", "qcow2")
    assert refused.returncode == 2 and "named as a raw disk" in refused.stderr
