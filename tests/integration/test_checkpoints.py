"""Checkpoints for real (QEMU under TCG, the tiny guest), one booted guest shared by the
module; the tests run in order and each leaves the VM Running with its agent answering.

Data is checked inside the guest: files on /data (ext4 on the VM's disk) written,
checkpointed, changed, the checkpoint applied, the old contents read back; a standard
checkpoint resumes a counting process (in RAM) from its value at checkpoint time;
branches stay whole; a production checkpoint freezes the guest, production-only fails
without the backup service; paused, saved and off VMs; every disk file is clean under
``qemu-img check`` at the end.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.hostproc import BOOT_TIMEOUT, Guest, HostProcess, running_host

pytestmark = pytest.mark.integration
NAME = "cpvm"
COUNTER = ("setsid sh -c 'i=0; while :; do i=$((i+1)); echo $i > /tmp/count; sleep 1; done' "
           "</dev/null >/dev/null 2>&1 &")


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory, tiny_image: Path) -> Iterator[HostProcess]:
    data = tmp_path_factory.mktemp("checkpoints") / "data"
    with running_host(data, tiny_image) as service:
        service.ok("vm", "create", NAME, "--generation", "1", "--image", "tiny",
                   "--memory", "256M")
        service.ok("vm", "start", NAME)
        Guest(service, NAME).wait_ready()
        yield service


@pytest.fixture()
def guest(host: HostProcess) -> Guest:
    return Guest(host, NAME)


def create(host: HostProcess, name: str) -> dict[str, Any]:
    job: dict[str, Any] = host.json("checkpoint", "create", NAME, "--name", name)
    return job["result"]  # type: ignore[no-any-return]


def apply(host: HostProcess, name: str) -> dict[str, Any]:
    job: dict[str, Any] = host.json("checkpoint", "apply", NAME, name, "--yes")
    return job["result"]  # type: ignore[no-any-return]


def boot(host: HostProcess, guest: Guest) -> None:
    host.ok("vm", "start", NAME)
    guest.wait_ready()


def write(guest: Guest, path: str, text: str) -> None:
    guest.ok(f"echo {text} > {path} && sync")


def read(guest: Guest, path: str) -> str:
    return guest.ok(f"cat {path}").strip()


def count(guest: Guest) -> int:
    return int(read(guest, "/tmp/count"))


def wait_count(guest: Guest, at_least: int) -> int:
    deadline = time.monotonic() + BOOT_TIMEOUT
    while (value := count(guest)) < at_least:
        assert time.monotonic() < deadline, f"the counter stays at {value}"
        time.sleep(0.5)
    return value


def test_production_checkpoint_freezes_and_apply_brings_files_back(
        host: HostProcess, guest: Guest) -> None:
    write(guest, "/data/a", "one")
    made = create(host, "one")
    assert (made["kind"], made["note"], made["state"]) == ("production", "", "Running")
    assert host.vm(NAME)["state"] == "Running"
    write(guest, "/data/a", "two")
    assert read(guest, "/data/a") == "two"
    result = apply(host, "one")
    assert result["state"] == "Off"
    boot(host, guest)
    assert read(guest, "/data/a") == "one"
    lines = host.ok("checkpoint", "list", NAME).splitlines()
    assert [line.split("  (")[0] for line in lines] == ["one", "  Now"]


def test_standard_checkpoint_resumes_a_counting_process(
        host: HostProcess, guest: Guest) -> None:
    host.ok("vm", "set", NAME, "--checkpoint-type", "standard")
    guest.ok(COUNTER)
    start = wait_count(guest, 3)
    made = create(host, "std")
    assert (made["kind"], made["state"]) == ("standard", "Running")
    at_checkpoint = count(guest)  # the counter ran on: the guest was only held still
    assert at_checkpoint >= start
    later = wait_count(guest, at_checkpoint + 15)
    result = apply(host, "std")
    assert result["state"] == "Saved"
    boot(host, guest)
    resumed = count(guest)
    assert resumed < later  # from where it was at the checkpoint, not from later
    assert resumed >= start  # not from zero: the same process went on
    wait_count(guest, resumed + 2)  # and it is still counting
    host.ok("vm", "set", NAME, "--checkpoint-type", "production")


def test_branches_stay_whole(host: HostProcess, guest: Guest) -> None:
    write(guest, "/data/b", "1")
    create(host, "b1")
    write(guest, "/data/b", "2")
    create(host, "b2")
    apply(host, "b1")
    boot(host, guest)
    assert read(guest, "/data/b") == "1"
    write(guest, "/data/b", "3")
    create(host, "b3")
    apply(host, "b2")
    boot(host, guest)
    assert read(guest, "/data/b") == "2"
    apply(host, "b3")
    boot(host, guest)
    assert read(guest, "/data/b") == "3"
    listing = host.json("checkpoint", "list", NAME)
    by_name = {c["name"]: c for c in listing["checkpoints"]}
    assert by_name["b2"]["parent"] == by_name["b1"]["id"]
    assert by_name["b3"]["parent"] == by_name["b1"]["id"]
    assert listing["current"] == by_name["b3"]["id"]


def test_production_only_needs_the_backup_service(host: HostProcess, guest: Guest) -> None:
    disks_before = host.vm(NAME)["disks"]
    folder = Path(disks_before[0]["path"]).parent
    files_before = sorted(folder.glob("*.qcow2"))
    host.ok("vm", "set", NAME, "--disable", "backup", "--checkpoint-type", "production-only")
    result = host.hv("checkpoint", "create", NAME, "--name", "never")
    assert result.returncode == 2
    assert "production-only" in result.stderr and "backup" in result.stderr
    assert host.vm(NAME)["disks"] == disks_before
    assert sorted(folder.glob("*.qcow2")) == files_before
    assert host.vm(NAME)["state"] == "Running"
    host.ok("vm", "set", NAME, "--checkpoint-type", "production")
    made = create(host, "fallback")
    assert made["kind"] == "standard" and "backup integration service" in made["note"]
    host.ok("vm", "set", NAME, "--enable", "backup")
    guest.ok("true")


def test_paused_saved_and_off_vms(host: HostProcess, guest: Guest) -> None:
    host.ok("vm", "pause", NAME)
    made = create(host, "paused")
    assert (made["kind"], made["state"]) == ("standard", "Paused")
    assert host.vm(NAME)["state"] == "Paused"
    host.ok("vm", "resume", NAME)
    write(guest, "/data/c", "saved")
    host.ok("vm", "save", NAME)
    made = create(host, "saved")
    assert (made["kind"], made["state"]) == ("standard", "Saved")
    boot(host, guest)  # from the saved state
    assert read(guest, "/data/c") == "saved"
    write(guest, "/data/c", "later")
    host.ok("vm", "stop", NAME, "--turn-off")
    made = create(host, "off")
    assert (made["kind"], made["state"]) == ("production", "Off")
    apply(host, "saved")
    assert host.vm(NAME)["state"] == "Saved"
    boot(host, guest)
    assert read(guest, "/data/c") == "saved"


def test_every_disk_file_is_clean(host: HostProcess) -> None:
    listing = host.json("checkpoint", "list", NAME)
    files = {p for c in listing["checkpoints"] for p in c["disks"].values()}
    files |= {d["path"] for d in host.vm(NAME)["disks"]}
    for path in sorted(files):
        check = subprocess.run(["qemu-img", "check", "-U", "-f", "qcow2", "--output=json",
                                path], capture_output=True, text=True, timeout=120)
        assert check.returncode == 0, check.stderr
        assert json.loads(check.stdout).get("corruptions", 0) == 0
