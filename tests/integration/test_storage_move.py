"""Live storage migration for real (TCG), in one boot of the tiny guest shared by the
module: a running VM with a checkpoint moved under a guest write load (checksums in the
guest, ``qemu-img check``, the chain and the tree); cancel half-way; kill -9 of the
service mid-move; paused, saved and off VMs; a destination outside the roots; a full
destination.

The service runs in a private mount namespace of its own, where a small tmpfs is the
full destination (the host's mounts stay as they are). Until ``hv checkpoint create``
is there, the checkpoint is made as the design says one is (an overlay on the frozen
file, the tree and the settings in one transaction), with the service stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from hvstack.checkpoints.model import Checkpoint, CheckpointKind, CheckpointTree
from hvstack.client import ApiError, Client, url_path
from hvstack.host.records import CheckpointRecords, VmRecords
from hvstack.host.store import SqliteStore
from hvstack.storage.qemu_img import run_qemu_img
from tests.integration.hostproc import BOOT_TIMEOUT, HV, HostProcess

pytestmark = pytest.mark.integration
NAME = "mover"
READY = "hvstack-tiny: ready"
SMALL_MB = 4
JOB_TIMEOUT = 600.0
EXTRA = ("for d in /sys/block/*; do [ $(cat $d/size) = 65536 ] && echo /dev/${d##*/}; "
         "done | grep .")  # the guest's device of the second disk, or a failure


class NamespacedHost(HostProcess):
    """``hv serve`` in a mount namespace of its own with a small tmpfs on ``small``."""

    def __init__(self, data_dir: Path, small: Path, extra_args: tuple[str, ...]) -> None:
        super().__init__(data_dir, extra_args)
        self.small = small

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        script = (f'mount -t tmpfs -o size={SMALL_MB}m hvt-h4-small "$0" && exec "$@"')
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                ["unshare", "-m", "--propagation", "private", "sh", "-c", script,
                 str(self.small), *HV, "serve", "--data-dir", str(self.data_dir),
                 *self.extra_args],
                stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.hv("host", "info").returncode == 0:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"hv serve did not come up:\n{self.log.read_text()}")

    def in_namespace(self, *argv: str) -> str:
        assert self.proc is not None
        return subprocess.run(["nsenter", "-t", str(self.proc.pid), "-m", *argv],
                              capture_output=True, text=True, check=True).stdout

    def api(self) -> Client:
        return Client(f"unix:{self.socket}")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, tiny_image: Path) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("move")
    data, second, small = base / "data", base / "second", base / "small"
    for folder in (data / "images", second, small):
        folder.mkdir(parents=True)
    try:
        os.link(tiny_image, data / "images" / f"tiny{tiny_image.suffix}")
    except OSError:
        shutil.copyfile(tiny_image, data / "images" / f"tiny{tiny_image.suffix}")
    host = NamespacedHost(data, small, ("--default-switch", "none", "--storage-root",
                                        str(second), "--storage-root", str(small)))
    host.start()
    try:
        host.ok("vm", "create", NAME, "--generation", "1", "--image", "tiny",
                "--memory", "256M")
        host.stop()
        asyncio.run(make_checkpoint(data, NAME))
        host.start()
        # a second disk, raw and attached from elsewhere: two mirrors at once
        host.ok("disk", "create", str(data / "extra.raw"), "--size", "32M")
        with host.api() as api:
            api.post(url_path("vms", NAME, "disks"), {"path": str(data / "extra.raw")})
        host.ok("vm", "start", NAME)
        host.wait_console(NAME, READY)
        host.guest(NAME).wait_ready()
        extra_id = next(d["id"] for d in host.vm(NAME)["disks"]
                        if d["path"] == str(data / "extra.raw"))
        yield {"host": host, "data": data, "second": second, "small": small,
               "extra_id": extra_id}
    finally:
        host.stop()
        for pidfile in data.glob("vms/*/qemu.pid"):
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pidfile.read_text()), 9)


async def make_checkpoint(data: Path, name: str) -> None:
    """A production checkpoint of the off VM, made as H1's create makes one."""
    store = SqliteStore(data / "hvstack.db")
    records = VmRecords(store)
    record = next(r for r in await records.load() if r.name == name)
    disk = record.config.disks[0]
    frozen = Path(disk.path)
    overlay = frozen.with_name(f"{frozen.stem}_{secrets.token_hex(4)}.qcow2")
    info = json.loads(await run_qemu_img(
        ["info", "-f", disk.format, "--output=json", str(frozen)]))
    await run_qemu_img(["create", "-q", "-f", "qcow2", "-F", disk.format, "-b", str(frozen),
                        "-u", str(overlay), str(info["virtual-size"])])
    checkpoint = Checkpoint(secrets.token_hex(8), "before the move", None, time.time(),
                            CheckpointKind.PRODUCTION, {disk.id: str(frozen)},
                            config=record.config.to_json())
    tree = CheckpointTree().added(checkpoint, made=[str(overlay)])
    config = replace(record.config, disks=(replace(disk, path=str(overlay), format="qcow2"),
                                           *record.config.disks[1:]))
    await records.change(record, config, also=[CheckpointRecords.op(record.id, tree)])


def stored_tree(data: Path, vm_id: str) -> CheckpointTree:
    with contextlib.closing(sqlite3.connect(f"file:{data / 'hvstack.db'}?mode=ro",
                                            uri=True)) as db:
        row = db.execute("SELECT value FROM kv WHERE key=?", (f"checkpoints/{vm_id}",)
                         ).fetchone()
    return CheckpointTree.from_json(row[0])


def disk_path(host: HostProcess, disk_id: str | None = None) -> str:
    """The path of the disk ``disk_id`` (default: the boot disk, made from the image)."""
    disks = host.vm(NAME)["disks"]
    path: str = next(d["path"] for d in disks if d["id"] == disk_id) if disk_id else next(
        d["path"] for d in disks if "extra" not in Path(d["path"]).name)
    return path


def backing(path: str) -> str | None:
    info = json.loads(subprocess.run(
        ["qemu-img", "info", "-U", "-f", "qcow2", "--output=json", path],
        capture_output=True, text=True, check=True).stdout)
    found: str | None = info.get("full-backing-filename") or info.get("backing-filename")
    return found


def qemu_img_check(path: str) -> None:
    result = subprocess.run(["qemu-img", "check", "-U", "-f", "qcow2", path],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def sha(host: HostProcess, path: str) -> str:
    return host.guest(NAME).ok(f"sha256sum {path}").split()[0]


def raw_sha(host: HostProcess) -> str:
    """The first 8 MiB of the second disk (the guest's only 32 MiB disk: its name may
    change from boot to boot), read past the page cache."""
    return host.guest(NAME).ok(
        f"sync; echo 3 > /proc/sys/vm/drop_caches; dd if=$({EXTRA}) bs=1M count=8 "
        "2>/dev/null | sha256sum").split()[0]


def wait_job(host: HostProcess, job_id: str, condition: Any,
             timeout: float = JOB_TIMEOUT) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = host.json("job", "show", job_id)
        if condition(job):
            return job
        assert time.monotonic() < deadline, f"job {job_id} never got there: {job}"
        time.sleep(0.3)


def start_move(host: NamespacedHost, destination: Path, **options: Any) -> dict[str, Any]:
    with host.api() as api:
        return api.move_storage(NAME, str(destination), wait=False, **options)


def test_bad_destinations_change_nothing(env: dict[str, Any], tmp_path: Path) -> None:
    host: NamespacedHost = env["host"]
    before = disk_path(host)
    outside = host.hv("vm", "move-storage", NAME, str(tmp_path / "elsewhere"))
    assert outside.returncode == 2 and "outside the storage roots" in outside.stderr
    with host.api() as api, pytest.raises(ApiError) as refused:
        api.move_storage(NAME, str(tmp_path / "elsewhere"))
    assert refused.value.status == 400
    with host.api() as api, pytest.raises(ApiError) as missing:
        api.move_storage("no-such-vm", str(env["second"]))
    assert missing.value.status == 404
    not_its = host.hv("vm", "move-storage", NAME, str(env["second"]), "--disk",
                      str(env["second"] / "other.qcow2"))
    assert not_its.returncode == 2 and "has no disk" in not_its.stderr

    full = host.hv("vm", "move-storage", NAME, str(env["small"] / "vm"))
    assert full.returncode == 2, full.stdout
    assert "MiB is free there; nothing was changed" in full.stderr
    assert host.in_namespace("ls", "-A", str(env["small"])).split() == []
    assert disk_path(host) == before and host.vm(NAME)["state"] == "Running"
    assert not (env["small"] / "vm").exists()


def test_running_vm_with_checkpoint_moves_under_write_load(env: dict[str, Any]) -> None:
    host: NamespacedHost = env["host"]
    data, second = env["data"], env["second"]
    guest = host.guest(NAME)
    vm_id = host.vm(NAME)["id"]
    guest.ok("dd if=/dev/urandom of=/data/before.bin bs=64k count=64 2>/dev/null && sync")
    before = sha(host, "/data/before.bin")
    guest.ok(f"dd if=/dev/urandom of=$({EXTRA}) bs=1M count=8 conv=fsync 2>/dev/null")
    raw = raw_sha(host)
    # a checkpoint of the running VM: its overlay is a node added at run time
    host.ok("checkpoint", "create", NAME, "--name", "live")
    old_active = disk_path(host)
    extra_active = disk_path(host, env["extra_id"])
    live_file = backing(old_active)
    assert live_file is not None
    seeded_file = backing(live_file)
    assert seeded_file is not None and backing(seeded_file) == str(
        data / "images" / "tiny.qcow2")
    guest.ok("rm -f /data/stop; setsid sh -c 'i=0; while [ ! -e /data/stop ]; do "
             "dd if=/dev/urandom of=/data/load.bin bs=64k count=4 seek=$((i % 128)) "
             "conv=notrunc 2>/dev/null; i=$((i + 1)); echo $i > /data/rounds; done; "
             "sync; echo done > /data/stopped' </dev/null >/dev/null 2>&1 &")

    target = second / "moved"
    job = start_move(host, target)
    done = wait_job(host, job["id"], lambda j: j["state"] != "running")
    rounds = int(guest.ok("cat /data/rounds"))
    guest.ok("touch /data/stop")
    deadline = time.monotonic() + 120
    while guest.sh("cat /data/stopped")[0] != 0:
        assert time.monotonic() < deadline, "the guest's writer did not stop"
        time.sleep(0.5)
    assert done["state"] == "completed", done
    assert rounds > 0 and int(guest.ok("cat /data/rounds")) > rounds  # it wrote meanwhile
    result = done["result"]
    moved = {m["from"]: m["to"] for m in result["moved"]}
    assert set(moved) == {old_active, live_file, seeded_file, extra_active,
                          str(data / "extra.raw")}
    assert any("managed image" in s["reason"] for s in result["skipped"])

    new_active = disk_path(host)
    assert new_active == moved[old_active]
    assert all(Path(p).parent == target for p in moved.values())
    assert backing(new_active) == moved[live_file]
    assert backing(moved[live_file]) == moved[seeded_file]
    assert backing(moved[seeded_file]) == str(data / "images" / "tiny.qcow2")
    assert not any(Path(p).exists() for p in moved)
    for path in moved.values():
        if path.endswith(".qcow2"):
            qemu_img_check(path)
    tree = stored_tree(data, vm_id)
    disk_id = next(d["id"] for d in host.vm(NAME)["disks"] if d["id"] != env["extra_id"])
    assert sorted(c.disks[disk_id] for c in tree.checkpoints) == sorted(
        [moved[live_file], moved[seeded_file]])
    assert moved[old_active] in tree.made and old_active not in tree.made
    assert all(disk["path"] in moved.values() for c in tree.checkpoints
               for disk in json.loads(c.config)["disks"])

    load = sha(host, "/data/load.bin")
    guest.ok("sync; echo 3 > /proc/sys/vm/drop_caches")  # read back from the new files
    assert sha(host, "/data/before.bin") == before
    assert sha(host, "/data/load.bin") == load
    assert raw_sha(host) == raw
    env["checksums"] = {"/data/before.bin": before, "/data/load.bin": load}
    env["raw"] = raw


def test_cancel_half_way_leaves_the_old_storage(env: dict[str, Any]) -> None:
    host: NamespacedHost = env["host"]
    guest = host.guest(NAME)
    guest.ok("dd if=/dev/urandom of=/data/big.bin bs=1M count=16 2>/dev/null && sync")
    big = sha(host, "/data/big.bin")
    active = disk_path(host)
    target = env["data"] / "cancelled"
    job = start_move(host, target, bandwidth="1M")
    wait_job(host, job["id"], lambda j: j["message"].startswith("mirroring")
             or j["state"] != "running")
    host.ok("job", "cancel", job["id"])
    ended = wait_job(host, job["id"], lambda j: j["state"] != "running")
    assert ended["state"] == "cancelled", ended
    assert disk_path(host) == active and host.vm(NAME)["state"] == "Running"
    assert not target.exists()
    assert Path(active).exists() and Path(backing(active) or "").exists()
    qemu_img_check(active)
    guest.ok("sync; echo 3 > /proc/sys/vm/drop_caches")
    assert sha(host, "/data/big.bin") == big
    env["checksums"]["/data/big.bin"] = big


def test_a_destination_that_fills_up_mid_move_changes_nothing(env: dict[str, Any]) -> None:
    """The free space suffices when the move starts; the guest's writes during the
    mirror then fill the destination: the move fails, the VM stays on its files."""
    host: NamespacedHost = env["host"]
    guest = host.guest(NAME)
    refused = host.hv("vm", "move-storage", NAME, str(env["small"] / "vm"))
    match = re.search(r"needs about (\d+) MiB", refused.stderr)
    assert match is not None, refused.stderr
    needed = int(match.group(1))
    fill = env["small"] / "fill"
    host.in_namespace("mkdir", str(fill))
    host.in_namespace("mount", "-t", "tmpfs", "-o", f"size={needed + 2}m", "hvt-h4-fill",
                      str(fill))
    try:
        paths = {d["id"]: d["path"] for d in host.vm(NAME)["disks"]}
        job = start_move(host, fill / "vm", bandwidth="2M")
        wait_job(host, job["id"], lambda j: j["message"].startswith("mirroring")
                 or j["state"] != "running")
        guest.ok("dd if=/dev/urandom of=/data/fill.bin bs=1M count=24 2>/dev/null; sync",
                 timeout=300)
        written = sha(host, "/data/fill.bin")
        ended = wait_job(host, job["id"], lambda j: j["state"] != "running")
        assert ended["state"] == "failed", ended
        assert ended["error"]["type"] == "/problems/no-space", ended
        assert {d["id"]: d["path"] for d in host.vm(NAME)["disks"]} == paths
        assert host.vm(NAME)["state"] == "Running"
        assert host.in_namespace("ls", "-A", str(fill)).split() == []
        for path in paths.values():
            if path.endswith(".qcow2"):
                qemu_img_check(path)
        guest.ok("sync; echo 3 > /proc/sys/vm/drop_caches")
        assert sha(host, "/data/fill.bin") == written
        env["checksums"]["/data/fill.bin"] = written
    finally:
        host.in_namespace("umount", str(fill))


def test_kill9_mid_move_is_rolled_back_on_restart(env: dict[str, Any]) -> None:
    host: NamespacedHost = env["host"]
    active = disk_path(host)
    target = env["data"] / "killed"
    job = start_move(host, target, bandwidth="1M")
    wait_job(host, job["id"], lambda j: j["message"].startswith("mirroring")
             or j["state"] != "running")
    host.kill9()
    host.start()
    assert host.vm(NAME)["state"] == "Running"
    assert disk_path(host) == active
    assert not target.exists()
    qemu_img_check(active)
    assert host.json("job", "show", job["id"])["state"] == "failed"
    guest = host.guest(NAME)
    guest.ok("sync; echo 3 > /proc/sys/vm/drop_caches")
    for path, digest in env["checksums"].items():
        assert sha(host, path) == digest
    assert raw_sha(host) == env["raw"]
    # QEMU's job and nodes are gone: the same move runs again, to its end
    again = start_move(host, env["data"] / "after-kill")
    assert wait_job(host, again["id"], lambda j: j["state"] != "running")["state"] == \
        "completed"
    assert Path(disk_path(host)).parent == env["data"] / "after-kill"
    assert not Path(active).exists()


def test_a_vm_turned_off_mid_move_stays_on_its_files(env: dict[str, Any]) -> None:
    host: NamespacedHost = env["host"]
    paths = {d["id"]: d["path"] for d in host.vm(NAME)["disks"]}
    target = env["second"] / "turned-off"
    job = start_move(host, target, bandwidth="1M")
    wait_job(host, job["id"], lambda j: j["message"].startswith("mirroring")
             or j["state"] != "running")
    host.ok("vm", "stop", NAME, "--turn-off")
    ended = wait_job(host, job["id"], lambda j: j["state"] != "running")
    assert ended["state"] == "failed", ended
    assert host.vm(NAME)["state"] == "Off"
    assert {d["id"]: d["path"] for d in host.vm(NAME)["disks"]} == paths
    assert not target.exists()
    for path in paths.values():
        if path.endswith(".qcow2"):
            subprocess.run(["qemu-img", "check", "-f", "qcow2", path], check=True,
                           capture_output=True)
    host.ok("vm", "start", NAME)
    host.guest(NAME).wait_ready()
    for path, digest in env["checksums"].items():
        assert sha(host, path) == digest
    assert raw_sha(host) == env["raw"]


def test_paused_saved_and_off_vms_move(env: dict[str, Any]) -> None:
    host: NamespacedHost = env["host"]
    host.ok("vm", "pause", NAME)
    with host.api() as api:
        api.move_storage(NAME, str(env["second"] / "paused"))
    assert Path(disk_path(host)).parent == env["second"] / "paused"
    host.ok("vm", "resume", NAME)
    host.ok("vm", "save", NAME)
    with host.api() as api:
        done = api.move_storage(NAME, str(env["data"] / "saved"))
    assert done["result"]["live"] is False
    assert Path(disk_path(host)).parent == env["data"] / "saved"
    host.ok("vm", "start", NAME)
    host.guest(NAME).wait_ready()
    assert sha(host, "/data/before.bin") == env["checksums"]["/data/before.bin"]
    host.ok("vm", "stop", NAME, "--turn-off")
    with host.api() as api:
        api.move_storage(NAME, str(env["second"] / "off"))
    active = disk_path(host)
    assert Path(active).parent == env["second"] / "off"
    subprocess.run(["qemu-img", "check", "-f", "qcow2", active], check=True,
                   capture_output=True)
    log_size = len(host.console(NAME))
    host.ok("vm", "start", NAME)  # a fresh boot: every byte from the new files
    host.wait_console(NAME, READY, after=log_size, timeout=BOOT_TIMEOUT)
    host.guest(NAME).wait_ready()
    for path, digest in env["checksums"].items():
        assert sha(host, path) == digest
    assert raw_sha(host) == env["raw"]


def test_the_moved_checkpoint_applies(env: dict[str, Any]) -> None:
    """The checkpoint taken before the moves, on files moved four times, still holds
    /data as it was: before.bin, and none of the files written after it."""
    host: NamespacedHost = env["host"]
    host.ok("checkpoint", "apply", NAME, "live", "--yes")
    host.ok("vm", "start", NAME)  # boots afresh (production) or resumes (standard)
    host.guest(NAME).wait_ready()
    assert sha(host, "/data/before.bin") == env["checksums"]["/data/before.bin"]
    assert host.guest(NAME).sh("test -e /data/load.bin")[0] != 0
