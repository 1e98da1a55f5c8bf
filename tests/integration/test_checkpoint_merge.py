"""Deleting checkpoints for real: ``hv serve`` processes, the tiny guest under TCG,
QEMU's block-commit and qemu-img.

Checkpoints are made with ``hv checkpoint create``, mostly of the Off VM or before a
restart, so the VM then runs with its checkpoint files as parents opened at launch
(one test makes them while it runs: overlay nodes added at run time). The checks:
every remaining checkpoint's chain flattened (``qemu-img convert``) is byte for byte
what it was, the current state's files read the same inside the guest (also after a
fresh boot), and ``qemu-img check`` finds nothing wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.hostproc import HostProcess, running_host

pytestmark = pytest.mark.integration
READY = "hvstack-tiny: ready"
DEADLINE = 300.0


# -- checkpoints of an Off VM ----------------------------------------------------------------


def checkpoint_offline(host: HostProcess, vm: str, name: str) -> None:
    """A checkpoint of the Off VM ``vm``: its files become launch parents at its next start."""
    assert host.vm(vm)["state"] == "Off"
    host.ok("checkpoint", "create", vm, "--name", name)


# -- looking at the files ------------------------------------------------------------------


def checkpoints(host: HostProcess, vm: str) -> dict[str, dict[str, Any]]:
    listing = host.json("checkpoint", "list", vm)
    return {c["name"]: c for c in listing["checkpoints"]}


def flat_digest(path: str, tmp: Path) -> str:
    """What the chain topped by ``path`` holds, flattened (-U: QEMU may hold it open)."""
    out = tmp / f"flat-{secrets.token_hex(4)}.raw"
    subprocess.run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", path, str(out)],
                   check=True)
    digest = hashlib.sha256()
    with open(out, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    out.unlink()
    return digest.hexdigest()


def views(host: HostProcess, vm: str, tmp: Path) -> dict[str, str]:
    return {name: flat_digest(next(iter(c["disks"].values())), tmp)
            for name, c in checkpoints(host, vm).items()}


def chain_files(path: str) -> list[str]:
    info = json.loads(subprocess.run(
        ["qemu-img", "info", "-U", "--backing-chain", "--output=json", "-f", "qcow2", path],
        check=True, capture_output=True, text=True).stdout)
    return [entry["filename"] for entry in info]


def check_clean(path: str) -> None:
    """``qemu-img check`` of every qcow2 file of the chain: no errors, no leaks."""
    for member in chain_files(path):
        if member.endswith(".qcow2"):
            result = subprocess.run(["qemu-img", "check", "-U", "-f", "qcow2", member],
                                    capture_output=True, text=True)
            assert result.returncode == 0, f"{member}: {result.stdout}{result.stderr}"


def qemu_holds(host: HostProcess, vm: str, path: str) -> bool:
    """QEMU of ``vm`` still has ``path`` open (a node of a merged file not removed)."""
    pid = (Path(host.vm(vm)["folder"]) / "qemu.pid").read_text().strip()
    fds = Path(f"/proc/{pid}/fd")
    targets = []
    for fd in fds.iterdir():
        try:
            targets.append(os.readlink(fd))
        except OSError:
            continue
    return any(t in (path, f"{path} (deleted)") for t in targets)


def disk_paths(host: HostProcess, vm: str) -> list[str]:
    return [d["path"] for d in host.vm(vm)["disks"]]


def wait_job(host: HostProcess, kind: str, timeout: float = DEADLINE) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = [j for j in host.json("job", "list") if j["kind"] == kind]
        if jobs and jobs[-1]["state"] != "running":
            job: dict[str, Any] = jobs[-1]
            return job
        time.sleep(0.5)
    raise AssertionError(f"no {kind} job ended")


# -- the guest ------------------------------------------------------------------------------


def boot(host: HostProcess, vm: str) -> None:
    host.ok("vm", "start", vm)
    host.guest(vm).wait_ready()


def write_file(host: HostProcess, vm: str, name: str, mib: int = 2) -> str:
    """A file of random data in the guest's /data; its digest."""
    out = host.guest(vm).ok(
        f"dd if=/dev/urandom of=/data/{name} bs=1M count={mib} 2>/dev/null && sync && "
        f"sha256sum /data/{name}")
    return out.split()[0]


def digests(host: HostProcess, vm: str, names: list[str]) -> dict[str, str]:
    out = host.guest(vm).ok("sha256sum " + " ".join(f"/data/{n}" for n in names))
    return {line.split()[1].removeprefix("/data/"): line.split()[0]
            for line in out.splitlines()}


WRITER = ("i=0; while [ ! -e /data/stop ]; do "
          "dd if=/dev/urandom of=/data/w bs=64k count=4 seek=$((i % 32)) conv=notrunc "
          "2>/dev/null; i=$((i + 1)); done; sync; echo stopped")


class Writer:
    """The guest writing /data/w over and over, in the background (through the agent)."""

    def __init__(self, host: HostProcess, vm: str) -> None:
        self.host, self.vm = host, vm
        self.proc = subprocess.Popen(
            [*_hv(), "vm", "exec", vm, "--timeout", "900", "--", "/bin/sh", "-c", WRITER],
            env=host.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def stop(self) -> str:
        self.host.guest(self.vm).ok("touch /data/stop")
        out, err = self.proc.communicate(timeout=120)
        assert "stopped" in out, err
        self.host.guest(self.vm).ok("rm /data/stop && sync")
        return digests(self.host, self.vm, ["w"])["w"]


def _hv() -> list[str]:
    from tests.integration.hostproc import HV

    return list(HV)


def shut_down(host: HostProcess, vm: str) -> None:
    host.ok("vm", "stop", vm)
    assert host.vm(vm)["state"] == "Off"


@pytest.fixture
def host(tmp_path: Path, tiny_image: Path) -> Iterator[HostProcess]:
    with running_host(tmp_path / "data", tiny_image) as service:
        yield service


def make_vm(host: HostProcess, vm: str) -> None:
    host.ok("vm", "create", vm, "--generation", "1", "--image", "tiny", "--memory", "128M")


# -- the tests -----------------------------------------------------------------------------


def test_delete_a_middle_checkpoint_while_the_guest_writes(host: HostProcess,
                                                           tmp_path: Path) -> None:
    make_vm(host, "m")
    written: dict[str, str] = {}
    boot(host, "m")
    for n in (1, 2, 3):  # cp1 -> cp2 -> cp3 -> Now, each after its own file
        written[f"f{n}"] = write_file(host, "m", f"f{n}")
        host.ok("checkpoint", "create", "m", "--name", f"cp{n}")
    shut_down(host, "m")  # the next boot opens the checkpoint files as launch parents
    before = views(host, "m", tmp_path)
    boot(host, "m")
    assert digests(host, "m", list(written)) == written
    writer = Writer(host, "m")

    # cp2 names the file between cp1's and cp3's: committed into it in QEMU (an
    # intermediate node, opened read-only at launch), while the guest writes.
    cp2_file = checkpoints(host, "m")["cp2"]["disks"]
    before_cp3 = checkpoints(host, "m")["cp3"]["disks"]
    out = host.ok("checkpoint", "delete", "m", "cp2", "--yes")
    assert "Deleted checkpoint 'cp2'" in out
    left = checkpoints(host, "m")
    assert set(left) == {"cp1", "cp3"}
    cp3_file = before_cp3
    assert left["cp3"]["disks"] == cp2_file  # cp3 names the file that now holds its data
    assert not any(Path(p).exists() or qemu_holds(host, "m", p) for p in cp3_file.values())
    assert views(host, "m", tmp_path) == {k: v for k, v in before.items() if k != "cp2"}
    assert host.vm("m")["state"] == "Running"

    # cp3, the newest: the current file is committed into it and QEMU pivots to it.
    active = disk_paths(host, "m")[0]
    host.ok("checkpoint", "delete", "m", "cp3", "--yes")
    assert disk_paths(host, "m") == list(cp2_file.values())
    assert not Path(active).exists()
    assert not qemu_holds(host, "m", active)
    assert not any(qemu_holds(host, "m", p) for p in cp3_file.values())
    assert views(host, "m", tmp_path) == {"cp1": before["cp1"]}
    now = writer.stop()
    check_clean(disk_paths(host, "m")[0])
    expected = {**written, "w": now}
    assert digests(host, "m", list(expected)) == expected
    assert host.vm("m")["state"] == "Running"

    shut_down(host, "m")  # the current state, read by a fresh boot
    assert len(chain_files(disk_paths(host, "m")[0])) == 3  # D_x, D, tiny
    boot(host, "m")
    assert digests(host, "m", list(expected)) == expected
    host.ok("vm", "stop", "m", "--turn-off")
    log = host.log.read_text()
    assert "Traceback" not in log


def test_delete_a_subtree_of_a_running_vm_merges_into_its_disk(host: HostProcess,
                                                               tmp_path: Path) -> None:
    make_vm(host, "s")
    disk = disk_paths(host, "s")[0]
    checkpoint_offline(host, "s", "one")
    checkpoint_offline(host, "s", "two")
    made = disk_paths(host, "s")[0]
    boot(host, "s")
    written = {"a": write_file(host, "s", "a", 4)}
    result = host.json("checkpoint", "delete", "s", "one", "--subtree", "--yes")
    assert result["state"] == "completed", result
    assert sorted(result["result"]["deleted"]) == ["one", "two"]
    assert checkpoints(host, "s") == {}
    assert disk_paths(host, "s") == [disk]  # back on the disk it was created with
    assert not Path(made).exists()
    assert [p.name for p in Path(disk).parent.glob("*_*.qcow2")] == []
    assert digests(host, "s", ["a"]) == written
    check_clean(disk)
    shut_down(host, "s")
    boot(host, "s")
    assert digests(host, "s", ["a"]) == written
    host.ok("vm", "stop", "s", "--turn-off")


def test_deleting_what_does_not_exist(host: HostProcess) -> None:
    make_vm(host, "x")
    result = host.hv("checkpoint", "delete", "x", "nope", "--yes")
    assert result.returncode == 2
    assert "nope" in result.stderr and "Traceback" not in result.stderr
    result = host.hv("checkpoint", "delete", "x", "nope")  # no terminal: must say --yes
    assert result.returncode == 2 and "--yes" in result.stderr


# -- faults ----------------------------------------------------------------------------------


def fill_but(folder: Path, spare: int) -> Path:
    """Fill the file system of ``folder`` up to its last block, then give back ``spare``
    bytes (the database's small writes still fit; a merge of megabytes does not)."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f:
        for size in (1 << 20, 4096):
            try:
                while True:
                    f.write(b"\xa5" * size)
            except OSError:
                pass
    os.truncate(filler, filler.stat().st_size - spare)
    return filler


def test_disk_full_during_a_merge_keeps_the_chain_whole(small_data_dir: Path,
                                                        tiny_image: Path) -> None:
    with running_host(small_data_dir, tiny_image) as host:
        make_vm(host, "full")
        disk = disk_paths(host, "full")[0]
        checkpoint_offline(host, "full", "cp1")
        boot(host, "full")
        written = {"small": write_file(host, "full", "small", 1)}
        shut_down(host, "full")
        checkpoint_offline(host, "full", "cp2")
        active = disk_paths(host, "full")[0]
        boot(host, "full")
        written["big"] = write_file(host, "full", "big", 24)
        # Room for the first step (cp1's megabyte merged into the disk), not the second.
        filler = fill_but(small_data_dir, 10 << 20)

        result = host.hv("checkpoint", "delete", "full", "cp1", "--subtree", "--yes")
        assert result.returncode == 2, result.stdout + result.stderr
        assert "needs up to" in result.stderr and "MiB" in result.stderr, result.stderr
        assert "internal error" not in result.stderr
        # Both checkpoints are gone; cp2's file is merged, the current file's data is
        # still in front of the disk, which nothing else needs.
        assert checkpoints(host, "full") == {}
        assert disk_paths(host, "full") == [active]
        assert chain_files(active)[1] == disk
        assert host.vm("full")["state"] == "Running"
        check_clean(active)
        assert digests(host, "full", list(written)) == written

        # With room again, the next start of the service finishes the merge.
        filler.unlink()
        shut_down(host, "full")
        host.stop()
        host.start()
        job = wait_job(host, "checkpoint-merge")
        assert job["state"] == "completed", job
        assert disk_paths(host, "full") == [disk]
        assert not Path(active).exists()
        check_clean(disk)
        boot(host, "full")
        assert digests(host, "full", list(written)) == written
        host.ok("vm", "stop", "full", "--turn-off")


def qemu_job_started(host: HostProcess, vm: str) -> bool:
    """The VM's pending merge names a QEMU job (read from the service's database)."""
    vm_id = host.vm(vm)["id"]
    db = sqlite3.connect(f"file:{host.data_dir / 'hvstack.db'}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT value FROM kv WHERE key=?", (f"checkpoints/{vm_id}",)
                         ).fetchone()
    finally:
        db.close()
    pending = json.loads(row[0]).get("pending") if row else None
    return bool(pending and pending["steps"] and pending["steps"][0].get("qemu_job"))


def big_merge(host: HostProcess, tmp: Path, commit: str
              ) -> tuple[Path, str, str, str, str, dict[str, str]]:
    """VM "k" running with a second disk whose 384 MiB of data are being merged (cp1
    deleted): once QEMU's commit job runs, returns the second disk, the first disk's
    overlay, the second's overlay, its current file, the digest of what that file's
    chain holds and the guest's file written before."""
    make_vm(host, "k")
    second = host.data_dir / "second.qcow2"
    host.ok("disk", "create", str(second), "--size", "1G")
    host.ok("vm", "set", "k", "--attach-disk", str(second), "--bus", "virtio")
    checkpoint_offline(host, "k", "cp1")
    first, overlay = disk_paths(host, "k")
    # 384 MiB of data in front of the second disk: a merge that takes a while
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 384M", overlay],
                   check=True, stdout=subprocess.DEVNULL)
    if commit == "intermediate":
        checkpoint_offline(host, "k", "cp2")
    current = disk_paths(host, "k")[1]
    expected = flat_digest(current, tmp)
    boot(host, "k")
    written = {"f": write_file(host, "k", "f", 8)}
    subprocess.run([*_hv(), "checkpoint", "delete", "k", "cp1", "--yes", "--no-wait"],
                   env=host.env, check=True, capture_output=True)
    deadline = time.monotonic() + DEADLINE
    while not qemu_job_started(host, "k"):
        assert time.monotonic() < deadline, "the merge never started"
        time.sleep(0.05)
    return second, first, overlay, current, expected, written


@pytest.mark.parametrize("commit", ["active", "intermediate"])
def test_kill_9_during_a_merge_is_finished_on_restart(host: HostProcess, tmp_path: Path,
                                                      commit: str) -> None:
    """The service is killed once QEMU's commit job runs: an active commit (the current
    file into cp1's) or an intermediate one (cp2's file, below the current one)."""
    second, first, overlay, current, expected, written = big_merge(host, tmp_path, commit)
    host.kill9()

    host.start()
    job = wait_job(host, "checkpoint-merge")
    assert job["state"] == "completed", job
    [cut] = [j for j in host.json("job", "list") if j["kind"] == "checkpoint-delete"]
    assert cut["state"] == "failed"
    assert host.vm("k")["state"] == "Running"  # QEMU outlived the service
    paths = disk_paths(host, "k")
    assert not Path(overlay).exists() and not Path(first).exists()
    assert not qemu_holds(host, "k", overlay) and not qemu_holds(host, "k", first)
    if commit == "active":
        assert paths[1] == str(second)
        assert checkpoints(host, "k") == {}
    else:
        assert paths[1] == current and chain_files(current)[1] == str(second)
        assert str(second) in checkpoints(host, "k")["cp2"]["disks"].values()
    for path in paths:
        check_clean(path)
    assert flat_digest(paths[1], tmp_path) == expected
    assert "the merge's QEMU job" in host.log.read_text()
    assert digests(host, "k", ["f"]) == written
    shut_down(host, "k")
    boot(host, "k")
    assert digests(host, "k", ["f"]) == written
    host.ok("vm", "stop", "k", "--turn-off")


def test_cancel_during_a_merge_then_finished_on_a_saved_vm(host: HostProcess,
                                                           tmp_path: Path) -> None:
    """hv job cancel while QEMU merges: everything stays readable as before; the
    merge stays pending and the next start of the service finishes it, here with the VM
    saved (qemu-img on its files); the VM resumes from that state."""
    second, _, overlay, _, expected, written = big_merge(host, tmp_path, "active")
    [job] = [j for j in host.json("job", "list") if j["kind"] == "checkpoint-delete"]
    host.hv("job", "cancel", job["id"])
    job = wait_job(host, "checkpoint-delete")
    assert job["state"] in ("cancelled", "completed"), job  # it may have just ended
    assert host.vm("k")["state"] == "Running"
    paths = disk_paths(host, "k")
    for path in paths:
        check_clean(path)
    assert flat_digest(paths[1], tmp_path) == expected
    assert digests(host, "k", ["f"]) == written
    assert checkpoints(host, "k") == {}

    host.ok("vm", "save", "k")
    host.stop()
    host.start()
    if job["state"] == "cancelled":
        finished = wait_job(host, "checkpoint-merge")
        assert finished["state"] == "completed", finished
    assert host.vm("k")["state"] == "Saved"
    assert disk_paths(host, "k")[1] == str(second) and not Path(overlay).exists()
    check_clean(str(second))
    assert flat_digest(str(second), tmp_path) == expected
    host.ok("vm", "start", "k")
    assert digests(host, "k", ["f"]) == written
    host.ok("vm", "stop", "k", "--turn-off")


def test_checkpoints_made_while_running_deleted_while_the_guest_writes(
        host: HostProcess, tmp_path: Path) -> None:
    """Checkpoints taken live (overlay nodes added at run time), then deleted one by one
    under a write load until the VM is back on the disk it was created with."""
    make_vm(host, "live")
    disk = disk_paths(host, "live")[0]
    boot(host, "live")
    written: dict[str, str] = {}
    for name in ("a", "b", "c"):
        written[name] = write_file(host, "live", name)
        host.ok("checkpoint", "create", "live", "--name", name)
    assert len(chain_files(disk_paths(host, "live")[0])) == 5  # 3 overlays, disk, tiny
    before = views(host, "live", tmp_path)
    writer = Writer(host, "live")
    for name in ("b", "c", "a"):  # the middle one, the newest, then the first
        host.ok("checkpoint", "delete", "live", name, "--yes")
        gone = {"b": {"b"}, "c": {"b", "c"}, "a": {"a", "b", "c"}}[name]
        assert views(host, "live", tmp_path) == {k: v for k, v in before.items()
                                                 if k not in gone}
        assert host.vm("live")["state"] == "Running"
    assert disk_paths(host, "live") == [disk]
    assert [p.name for p in Path(disk).parent.glob("*_*.qcow2")] == []
    expected = {**written, "w": writer.stop()}
    assert digests(host, "live", list(expected)) == expected
    check_clean(disk)
    shut_down(host, "live")
    boot(host, "live")
    assert digests(host, "live", list(expected)) == expected
    host.ok("vm", "stop", "live", "--turn-off")
    assert "Traceback" not in host.log.read_text()
