"""Pure parts of the tiny image builder: cache key, apt/ldd parsing, layout, guest files."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from hvstack.errors import HypervisorError, NotFound, OperationTimeout
from hvstack.images import __main__ as cli
from hvstack.images import catalog, guest, kernel, layout, tiny, tools, userland


def test_cache_key_is_stable_and_sensitive() -> None:
    inputs = {"kernel": "linux-image-6.1.0-9-amd64=6.1.27-1", "recipe": "abc"}
    key = tiny.cache_key(inputs)
    assert key == tiny.cache_key(dict(reversed(list(inputs.items()))))
    assert len(key) == 16 and int(key, 16) >= 0
    assert tiny.cache_key({**inputs, "kernel": "linux-image-6.1.0-10-amd64=6.1.38-1"}) != key
    assert tiny.cache_key({**inputs, "extra": ""}) != key


def test_image_path_names_format_and_key(tmp_path: Path) -> None:
    path = tiny.image_path(tmp_path, "0123456789abcdef")
    assert path == tmp_path / "images" / "tiny-0123456789abcdef.qcow2"


def test_recipe_digest_covers_guest_scripts(monkeypatch: pytest.MonkeyPatch) -> None:
    before = tiny.recipe_digest()
    assert before == tiny.recipe_digest()
    monkeypatch.setattr(guest, "RC_S", guest.RC_S + "# changed\n")
    assert tiny.recipe_digest() != before


def test_apt_packages_cover_the_tools() -> None:
    essential = {"apt", "dpkg", "libc-bin"}
    for tool in tiny.REQUIRED_TOOLS:
        package = tools.TOOL_PACKAGES[tool]
        assert package in tiny.TINY_APT_PACKAGES or package in essential, tool


APT_DEPENDS = """\
linux-image-amd64
  Depends: linux-image-6.1.0-56-amd64
  Recommends: apparmor
"""

APT_SHOW = """\
Package: linux-image-6.1.0-56-amd64
Source: linux-signed-amd64 (6.1.192+2)
Version: 6.1.192-2
Depends: kmod,
 linux-base (>= 4.3~)
SHA256: A86E2049672F
Filename: pool/main/l/linux-signed-amd64/linux-image-6.1.0-56-amd64_6.1.192-2_amd64.deb

Package: linux-image-6.1.0-56-amd64
Version: 6.1.190-1
"""


def test_parse_apt_output() -> None:
    assert kernel.parse_depends(APT_DEPENDS) == "linux-image-6.1.0-56-amd64"
    assert kernel.parse_depends("linux-image-amd64\n  Depends: <linux-image-x>\n") is None
    fields = kernel.parse_stanza(APT_SHOW)
    assert fields["Version"] == "6.1.192-2"
    assert fields["SHA256"] == "A86E2049672F"
    assert fields["Depends"] == "kmod,"


def test_deb_name_escapes_epoch() -> None:
    package = kernel.KernelPackage("linux-image-x", "1:2.0-1", "00")
    assert package.deb_name == "linux-image-x_1%3a2.0-1_amd64.deb"


def test_kernel_resolution_is_remembered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "Packages").write_text("one")
    monkeypatch.setattr(kernel, "APT_STATE_PATHS", (lists,))
    calls: list[str] = []

    async def fake_resolve(_tools: object) -> kernel.KernelPackage:
        calls.append("apt")
        return kernel.KernelPackage("linux-image-x", f"{len(calls)}", "ab")

    monkeypatch.setattr(kernel, "resolve_kernel_package", fake_resolve)
    memo = tmp_path / "debs" / "kernel.json"
    first = asyncio.run(kernel.resolve_kernel_package_cached({}, memo))
    again = asyncio.run(kernel.resolve_kernel_package_cached({}, memo))
    assert first == again and calls == ["apt"]
    assert json.loads(memo.read_text())["name"] == "linux-image-x"
    (lists / "Packages").write_text("changed lists")
    third = asyncio.run(kernel.resolve_kernel_package_cached({}, memo))
    assert third.version == "2" and len(calls) == 2


LDD_QEMU_GA = """\
\tlinux-vdso.so.1 (0x00007fff)
\tlibglib-2.0.so.0 => /lib/x86_64-linux-gnu/libglib-2.0.so.0 (0x00007fa4)
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007fa3)
\t/lib64/ld-linux-x86-64.so.2 (0x00007fa5)
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007fa3)
"""


def test_parse_ldd() -> None:
    assert userland.parse_ldd(LDD_QEMU_GA) == [
        "/lib/x86_64-linux-gnu/libglib-2.0.so.0",
        "/lib/x86_64-linux-gnu/libc.so.6",
        "/lib64/ld-linux-x86-64.so.2",
    ]
    assert userland.parse_ldd("\tnot a dynamic executable\n") == []
    with pytest.raises(HypervisorError, match="libfoo"):
        userland.parse_ldd("\tlibfoo.so.1 => not found\n")


def test_layout_geometry() -> None:
    disk = layout.tiny_layout(32, 64)
    assert disk.esp_offset == layout.MIB
    assert disk.data_start == disk.esp_start + disk.esp_sectors
    assert disk.data_offset % layout.MIB == 0
    # the backup GPT (33 sectors) fits after the data partition
    assert disk.total_sectors - (disk.data_start + disk.data_sectors) >= 33
    assert disk.total_bytes == 98 * layout.MIB


def test_sfdisk_script() -> None:
    disk = layout.tiny_layout()
    script = layout.sfdisk_script(disk, "seed")
    assert script.startswith("label: gpt\n")
    assert f"start={disk.esp_start}, size={disk.esp_sectors}, type={layout.ESP_TYPE}" in script
    assert 'attrs="LegacyBIOSBootable"' in script
    assert f"start={disk.data_start}, size={disk.data_sectors}, type={layout.LINUX_TYPE}" in script
    assert script == layout.sfdisk_script(disk, "seed")
    assert script != layout.sfdisk_script(disk, "other seed")


def test_boot_configs_boot_at_once_on_the_serial_console() -> None:
    cmdline = layout.KERNEL_CMDLINE
    consoles = [arg for arg in cmdline.split() if arg.startswith("console=")]
    assert consoles[-1] == "console=ttyS0,115200" and "console=tty0" in consoles
    assert "quiet" not in cmdline.split()
    # hot-plugged memory (dynamic memory) comes online movable: it can be unplugged
    assert "memhp_default_state=online_movable" in cmdline.split()
    syslinux = layout.syslinux_cfg()
    assert "TIMEOUT 0" in syslinux and "PROMPT 0" in syslinux
    assert f"APPEND {cmdline}\n" in syslinux
    assert "timeout 0" in layout.loader_conf()
    entry = layout.loader_entry()
    assert f"linux /{layout.KERNEL_FILE}\n" in entry
    assert f"initrd /{layout.INITRD_FILE}\n" in entry
    assert f"options {cmdline}\n" in entry


def test_guest_files_are_consistent() -> None:
    files = guest.guest_files()
    for path, (mode, text) in files.items():
        assert path.startswith("/")
        if mode & 0o111:
            assert text.startswith("#!/bin/sh\n"), path
    inittab = files["/etc/inittab"][1]
    for line in inittab.splitlines():
        if line and not line.startswith("#"):
            command = line.split(":", 3)[3].split()[0]
            assert command in files, f"inittab runs {command}, which the image lacks"
    rcs = files["/etc/init.d/rcS"][1]
    assert rcs.rstrip().endswith(f'echo "{guest.READY_LINE}"')
    assert guest.MODULE_LIST in rcs
    assert "LABEL=hvdata" in rcs and "/dev/virtio-ports/org.qemu.guest_agent.0" in rcs
    assert "PS1='tiny# '" in files["/etc/profile"][1]


@pytest.mark.skipif(shutil.which("busybox") is None, reason="busybox not installed")
@pytest.mark.parametrize(
    "path", [p for p, (mode, _) in guest.guest_files().items() if mode & 0o111]
)
def test_guest_scripts_parse(path: str) -> None:
    script = guest.guest_files()[path][1]
    subprocess.run(["busybox", "sh", "-n"], input=script.encode(), check=True, timeout=10)


@pytest.mark.skipif(shutil.which("busybox") is None, reason="busybox not installed")
@pytest.mark.parametrize(
    ("args", "mode"),
    [
        (["-h", "-P", "+0", "hypervisor initiated shutdown"], "poweroff"),
        (["-h", "-H", "+0", "msg"], "halt"),
        (["-h", "-r", "+0", "msg"], "reboot"),
        (["-r", "now"], "reboot"),
        ([], "poweroff"),
    ],
)
def test_shutdown_maps_qemu_ga_flags(args: list[str], mode: str, tmp_path: Path) -> None:
    record = tmp_path / "called"
    helper = tmp_path / "helper"
    helper.write_text(f'#!/bin/sh\necho "$@" > {record}\n')
    helper.chmod(0o755)
    script = guest.SHUTDOWN.replace("/sbin/hvstack-poweroff", str(helper))
    script = script.replace("sleep 0.2", "true")
    script = script.replace(") </dev/null >/dev/null 2>&1 &", ")")
    subprocess.run(["busybox", "sh", "-c", script, "shutdown", *args], check=True, timeout=10)
    assert record.read_text().strip() == mode


def test_require_tools_names_missing_packages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert tools.require_tools(["sh"])["sh"].endswith("/sh")
    (tmp_path / "sh").symlink_to(shutil.which("sh") or "/bin/sh")
    monkeypatch.setattr(tools, "search_path", lambda: str(tmp_path))
    with pytest.raises(HypervisorError, match="apt-get install mtools syslinux") as caught:
        tools.require_tools(["sh", "mformat", "mcopy", "syslinux"])
    assert caught.value.data["missing"] == ["mformat", "mcopy", "syslinux"]


def test_run_returns_stdout_and_raises_with_stderr() -> None:
    assert asyncio.run(tools.run(["sh", "-c", "echo out"])) == b"out\n"
    assert asyncio.run(tools.run(["cat"], input=b"in")) == b"in"
    with pytest.raises(HypervisorError, match=r"exit 3.*boom") as caught:
        asyncio.run(tools.run(["sh", "-c", "echo boom >&2; exit 3"]))
    assert caught.value.data["exit_code"] == 3
    assert asyncio.run(tools.run(["sh", "-c", "exit 1"], ok_codes=(0, 1))) == b""


def test_run_times_out_and_kills() -> None:
    with pytest.raises(OperationTimeout):
        asyncio.run(tools.run(["sleep", "30"], timeout=0.2))


def test_run_missing_binary() -> None:
    with pytest.raises(HypervisorError, match="not installed"):
        asyncio.run(tools.run(["/nonexistent/hvstack-tool"]))


def test_catalog() -> None:
    spec = catalog.get_image("tiny")
    assert spec.image_format == "qcow2"
    assert spec.apt_packages == tiny.TINY_APT_PACKAGES
    with pytest.raises(NotFound, match="known images: tiny"):
        catalog.get_image("huge")


def test_cli_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["list"]) == 0
    assert capsys.readouterr().out.startswith("tiny\tqcow2\t")


@pytest.mark.skipif(shutil.which("busybox") is None, reason="busybox not installed")
def test_netwatch_starts_dhcp_on_each_new_adapter_and_stops_removed_ones(
    tmp_path: Path,
) -> None:
    """One pass of the guest's network watcher on a fake /sys/class/net: adapters (a
    device behind them) get DHCP once, again when their name comes back with another
    ifindex (hot remove + add), and a removed adapter's udhcpc is stopped."""
    net, state, calls = tmp_path / "net", tmp_path / "state", tmp_path / "calls"
    state.mkdir()
    common = tmp_path / "common.sh"
    common.write_text(guest.NET_COMMON.replace(guest.NET_STATE, str(state)))
    dhcp = tmp_path / "dhcp"
    dhcp.write_text(f'#!/bin/sh\necho "$1" >>{calls}\n'
                    f'echo "$(cat {net}/$1/ifindex) dhcp" >{state}/$1\n')
    dhcp.chmod(0o755)
    script = (guest.NETWATCH.replace("/sys/class/net", str(net))
              .replace("/etc/hvstack-net.sh", str(common))
              .replace("/sbin/hvstack-dhcp", str(dhcp))
              .replace("    sleep 1\n", "    break\n"))

    def adapter(name: str, index: int, device: bool = True) -> None:
        (net / name).mkdir(parents=True, exist_ok=True)
        (net / name / "ifindex").write_text(f"{index}\n")
        if device:
            (net / name / "device").mkdir(exist_ok=True)

    def one_pass() -> list[str]:
        calls.unlink(missing_ok=True)
        subprocess.run(["busybox", "sh", "-c", script], check=True, timeout=30)
        return calls.read_text().split() if calls.exists() else []

    adapter("lo", 1, device=False)
    adapter("eth0", 2)
    adapter("eth0.10", 5, device=False)  # a VLAN made in the guest: not an adapter
    assert one_pass() == ["eth0"]
    assert one_pass() == []
    adapter("eth1", 3)  # hot-added
    assert one_pass() == ["eth1"]
    (net / "eth1" / "ifindex").write_text("4\n")  # removed and added again between polls
    assert one_pass() == ["eth1"]
    # a stand-in udhcpc that init adopts (as in the guest), so it is reaped when killed
    started = subprocess.run(["sh", "-c", "sleep 300 >/dev/null 2>&1 & echo $!"],
                             capture_output=True, text=True, check=True, timeout=10)
    pid = int(started.stdout)
    try:
        (state / "eth1.pid").write_text(f"{pid}\n")
        shutil.rmtree(net / "eth1")  # hot-removed
        assert one_pass() == []
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()
        assert not (state / "eth1").exists() and (state / "eth0").exists()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
