"""VMs for real: the tiny image booted by QEMU (TCG here) through the host service."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hvstack.hypervisor.qemu.process import is_vm_process
from tests.integration.hostproc import HostProcess

pytestmark = pytest.mark.integration
READY = "hvstack-tiny: ready"


def boot(host: HostProcess, name: str, generation: int, memory: str = "256M") -> None:
    host.ok("vm", "create", name, "--generation", str(generation), "--image", "tiny",
            "--memory", memory)
    host.ok("vm", "start", name)
    assert host.vm(name)["state"] == "Running"
    host.wait_console(name, READY)


@pytest.mark.parametrize("generation", [1, 2])
def test_boot_shows_kernel_lines_and_data_survives_restart(host: HostProcess,
                                                           generation: int) -> None:
    name = f"gen{generation}"
    boot(host, name, generation)
    log = host.console(name)
    assert "Linux version" in log
    view = host.vm(name)
    assert view["generation"] == generation
    assert view["disks"][0]["bus"] == ("ide" if generation == 1 else "scsi")

    agent = host.guest(name)
    agent.wait_ready()
    code, _ = agent.sh("echo persisted-$((6*7)) > /data/marker && sync")
    assert code == 0

    before = len(host.console(name))
    result = host.ok("vm", "restart", name, "--timeout", "120")
    assert "guest shut down" in result
    assert host.vm(name)["state"] == "Running"
    host.wait_console(name, READY, after=before)
    agent.wait_ready()
    code, out = agent.sh("cat /data/marker")
    assert (code, out.strip()) == (0, "persisted-42")

    stopped = host.ok("vm", "stop", name, "--timeout", "120")
    assert "guest shut down" in stopped
    assert host.vm(name)["state"] == "Off"


def test_save_and_start_keeps_guest_processes(host: HostProcess) -> None:
    boot(host, "saver", 1)
    agent = host.guest("saver")
    agent.wait_ready()
    code, out = agent.sh(
        "(i=0; while true; do i=$((i+1)); echo $i > /run/counter; sleep 0.2; done) "
        ">/dev/null 2>&1 & echo $!"
    )
    assert code == 0
    counter_pid = out.strip()
    time.sleep(1)

    host.ok("vm", "save", "saver")
    view = host.vm("saver")
    assert view["state"] == "Saved"
    assert Path(view["folder"], "saved-state.bin").stat().st_size > 0

    host.ok("vm", "start", "saver")
    assert host.vm("saver")["state"] == "Running"
    assert not Path(view["folder"], "saved-state.bin").exists()
    agent.wait_ready()
    code, out = agent.sh(f"kill -0 {counter_pid} && cat /run/counter")
    assert code == 0, "the guest's background process did not survive save and start"
    first = int(out.strip())
    time.sleep(1)
    _, out = agent.sh("cat /run/counter")
    assert int(out.strip()) > first
    # The boot banner is not printed again: the guest resumed, it did not reboot.
    assert host.console("saver").count("Linux version") == 1


def test_pause_and_resume(host: HostProcess) -> None:
    boot(host, "pauser", 1)
    assert host.json("vm", "pause", "pauser")["state"] == "Paused"
    assert host.vm("pauser")["state"] == "Paused"
    again = host.hv("vm", "pause", "pauser")
    assert again.returncode == 2
    assert again.stderr.strip() == "error: cannot pause VM 'pauser': it is already Paused"
    assert host.json("vm", "resume", "pauser")["state"] == "Running"
    agent = host.guest("pauser")
    agent.wait_ready()
    assert agent.sh("echo alive")[1].strip() == "alive"
    host.ok("vm", "stop", "pauser", "--turn-off")
    assert host.vm("pauser")["state"] == "Off"


def test_kill_9_host_service_then_reattach(host: HostProcess) -> None:
    boot(host, "survivor", 1)
    vm_id, pid = host.vm("survivor")["id"], host.vm("survivor")["pid"]
    host.kill9()
    assert is_vm_process(pid, vm_id), "the VM died with the host service"
    host.start()
    view = host.vm("survivor")
    assert view["state"] == "Running"
    assert view["pid"] == pid
    assert "reattached" in view["state_reason"]
    assert host.json("vm", "pause", "survivor")["state"] == "Paused"
    assert host.json("vm", "resume", "survivor")["state"] == "Running"
    host.ok("vm", "stop", "survivor", "--timeout", "120")
    assert host.vm("survivor")["state"] == "Off"
    assert not is_vm_process(pid, vm_id)


def test_qemu_dead_while_service_down_is_reported_off(host: HostProcess) -> None:
    host.ok("vm", "create", "victim", "--generation", "1", "--new-disk", "64M")
    host.ok("vm", "start", "victim")
    pid = host.vm("victim")["pid"]
    host.kill9()
    os.kill(pid, 9)
    host.start()
    view = host.vm("victim")
    assert view["state"] == "Off"
    assert "exited while the host service was down" in view["state_reason"]
    host.ok("vm", "start", "victim")
    host.ok("vm", "stop", "victim", "--turn-off")


def test_state_errors_and_shared_disk(host: HostProcess) -> None:
    host.ok("vm", "create", "one", "--generation", "1", "--new-disk", "64M")
    disk = host.vm("one")["disks"][0]["path"]
    host.ok("vm", "create", "two", "--generation", "1", "--disk", disk)
    host.ok("vm", "start", "one")

    started_again = host.hv("vm", "start", "one")
    assert started_again.returncode == 2
    assert "Running" in started_again.stderr and "Traceback" not in started_again.stderr
    deleted = host.hv("vm", "delete", "one")
    assert deleted.returncode == 2 and "Running" in deleted.stderr
    second = host.hv("vm", "start", "two")
    assert second.returncode == 2 and "in use by VM 'one'" in second.stderr
    assert host.vm("two")["state"] == "Off"
    attach = host.hv("vm", "create", "three", "--disk", disk)
    assert attach.returncode == 2 and "one" in attach.stderr

    host.ok("vm", "stop", "one", "--turn-off")
    host.ok("vm", "delete", "two")
    assert os.path.exists(disk), "deleting a VM without --delete-disks removed a disk"
    host.ok("vm", "delete", "one", "--delete-disks")
    assert not os.path.exists(disk)


def test_bad_input_gets_one_line_and_exit_2(host: HostProcess, tmp_path: Path) -> None:
    outside = tmp_path / "outside.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(outside), "64M"], check=True)
    link = host.data_dir / "link.qcow2"
    link.symlink_to(outside)
    cases = [
        ("vm", "create", ""),
        ("vm", "create", "a" * 101),
        ("vm", "create", "x/y"),
        ("vm", "create", "x..y"),
        ("vm", "create", "bell\x07"),
        ("vm", "create", "m", "--memory", "lots"),
        ("vm", "create", "m", "--memory", "-1G"),
        ("vm", "create", "m", "--memory", "64T"),
        ("vm", "create", "m", "--new-disk", "lots"),
        ("vm", "create", "m", "--disk", str(outside)),
        ("vm", "create", "m", "--disk", str(link)),
        ("vm", "create", "m", "--disk", str(host.data_dir / "a,b.qcow2")),
        ("vm", "create", "m", "--disk", str(host.data_dir / "a=b.qcow2")),
        ("vm", "create", "m", "--dvd", str(host.data_dir / "missing.iso")),
        ("vm", "create", "m", "--generation", "3"),
        ("vm", "start", "nosuchvm"),
        ("disk", "create", str(host.data_dir / "d.qcow2"), "--size", "-1G"),
        ("disk", "create", str(tmp_path / "d.qcow2"), "--size", "1G"),
    ]
    for args in cases:
        result = host.hv(*args)
        assert result.returncode == 2, f"hv {args} exited {result.returncode}"
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, f"hv {args} printed {result.stderr!r}"
        assert "Traceback" not in result.stderr
    assert host.json("vm", "list") == []
    assert sorted(p.name for p in (host.data_dir / "vms").iterdir()) == []


def test_concurrent_creates_with_one_name(host: HostProcess) -> None:
    procs = [
        subprocess.Popen([sys.executable, "-m", "hvstack.cli", "vm", "create", "twin", "--new-disk",
                          "64M"], env=host.env, stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    for p in procs:
        p.communicate(timeout=60)  # reads and closes its stderr pipe
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 2, 2, 2]
    assert [vm["name"] for vm in host.json("vm", "list")] == ["twin"]
    assert len(list((host.data_dir / "vms").iterdir())) == 1


def test_disk_full_while_saving_keeps_the_vm_running(host: HostProcess, tmp_path: Path) -> None:
    host.ok("vm", "create", "full", "--generation", "1", "--image", "tiny", "--memory", "256M")
    folder = Path(host.vm("full")["folder"])
    keep = tmp_path / "keep"
    keep.mkdir()
    for entry in folder.iterdir():
        entry.rename(keep / entry.name)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24M", "tmpfs", str(folder)], check=True)
    try:
        for entry in keep.iterdir():
            subprocess.run(["cp", "-a", str(entry), str(folder)], check=True)
        host.ok("vm", "start", "full")
        host.wait_console("full", READY)
        agent = host.guest("full")
        agent.wait_ready()
        code, _ = agent.sh("head -c 100000000 /dev/urandom > /run/fill", timeout=240)
        assert code == 0
        result = host.hv("vm", "save", "full")
        assert result.returncode == 2
        assert "no space" in result.stderr.lower()
        view = host.vm("full")
        assert view["state"] == "Running"
        assert not (folder / "saved-state.bin").exists()
        assert agent.sh("echo still-here")[1].strip() == "still-here"
        host.ok("vm", "stop", "full", "--turn-off")
    finally:
        host.hv("vm", "stop", "full", "--turn-off")
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_automatic_stop_and_start_actions(host: HostProcess) -> None:
    host.ok("vm", "create", "auto", "--generation", "1", "--new-disk", "64M",
            "--memory", "128M")
    host.ok("vm", "create", "always", "--generation", "1", "--new-disk", "64M",
            "--memory", "128M", "--auto-start", "always-start", "--auto-stop", "turn-off")
    host.ok("vm", "create", "never", "--generation", "1", "--new-disk", "64M",
            "--memory", "128M", "--auto-start", "nothing")
    host.ok("vm", "start", "auto")
    host.ok("vm", "start", "never")
    host.stop()  # SIGTERM: automatic stop actions (save by default, turn off for 'always')
    host.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        states = {vm["name"]: vm["state"] for vm in host.json("vm", "list")}
        if states["auto"] == "Running" and states["always"] == "Running":
            break
        time.sleep(0.5)
    assert states == {"auto": "Running", "always": "Running", "never": "Saved"}
    for name in ("auto", "always"):
        host.ok("vm", "stop", name, "--turn-off")
