"""The tiny guest image: a Debian kernel and a busybox initramfs on a BIOS+UEFI disk.

Contract:

* ``await build_tiny(cache_dir, progress)`` returns the path of a qcow2 disk image
  (``cache_dir/images/tiny-<key>.qcow2``) that boots on Generation 1 (``-machine pc``,
  SeaBIOS, IDE) and Generation 2 (``-machine q35``, OVMF, virtio-scsi or virtio-blk)
  to a guest that prints ``hvstack-tiny: ready`` (:data:`READY_LINE`) on its serial
  console, runs qemu-ga on ``org.qemu.guest_agent.0``, powers off cleanly on the ACPI
  power button and mounts its ext4 ``hvdata`` partition on ``/data``. The userspace
  lives in the initramfs (the root stays in RAM); see :mod:`hvstack.images.guest` for
  the guest's behaviour and :mod:`hvstack.images.layout` for the disk layout.
* ``key`` is a hash of every input: the kernel package and version, the versions of
  the host packages used, the busybox, qemu-ga and radvd binaries and libraries, the guest
  scripts, the module list, the layout and this builder's version. A second call with
  the same inputs returns the cached file at once; the kernel ``.deb`` is cached in
  ``cache_dir/debs``.
* The image is built in a private folder under ``cache_dir/work`` and renamed into
  place, so the cache holds only complete images; concurrent builders serialise on
  a lock file (waiting at most :data:`LOCK_TIMEOUT`), and the lock holder removes
  work folders left by builds that died and kernel ``.deb`` files other than the
  current one. Built images are never removed: overlays may use them as backing
  files. Nothing is mounted and no kernel is installed on the host.
* ``progress(percent, step)`` (:data:`hvstack.progress.Progress`) is called with
  0..100 and a short step name.
* A missing host tool raises :class:`~hvstack.errors.HypervisorError` naming the
  packages to install (:data:`TINY_APT_PACKAGES`); failing tools raise it with their
  message, and a tool that hangs raises :class:`~hvstack.errors.OperationTimeout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path

from hvstack import files
from hvstack.errors import HypervisorError, OperationTimeout
from hvstack.images import disk, guest, kernel, layout, userland
from hvstack.images.cpio import Initramfs
from hvstack.images.tools import require_tools, run
from hvstack.progress import Progress

log = logging.getLogger(__name__)

BUILDER_VERSION = "2"
IMAGE_FORMAT = "qcow2"
LOCK_TIMEOUT = 1800.0
CONVERT_TIMEOUT = 300.0
QUERY_TIMEOUT = 60.0
ESP_MIB = 32
DATA_MIB = 64

TINY_APT_PACKAGES: tuple[str, ...] = (
    "busybox-static",
    "qemu-guest-agent",
    "radvd",
    "mtools",
    "syslinux",
    "syslinux-common",
    "systemd-boot-efi",
    "e2fsprogs",
    "fdisk",
    "qemu-utils",
)
"""Debian packages the builder needs on the host (apt-get, dpkg and ldd are essential)."""

TINY_BOOT_APT_PACKAGES: tuple[str, ...] = ("qemu-system-x86", "ovmf")
"""What booting the image needs besides: QEMU and the UEFI firmware for Generation 2."""

REQUIRED_TOOLS: tuple[str, ...] = (
    "apt-get",
    "apt-cache",
    "dpkg-deb",
    "dpkg-query",
    "ldd",
    "busybox",
    "qemu-ga",
    "radvd",
    "mformat",
    "mmd",
    "mcopy",
    "syslinux",
    "mke2fs",
    "sfdisk",
    "qemu-img",
)

READY_LINE = guest.READY_LINE



def cache_key(inputs: Mapping[str, str]) -> str:
    """Return a short stable hash of ``inputs`` (order of keys does not matter).

    >>> cache_key({"a": "1", "b": "2"}) == cache_key({"b": "2", "a": "1"})
    True
    """
    text = json.dumps(dict(inputs), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def image_path(cache_dir: Path, key: str) -> Path:
    """Return where the image built from inputs with ``key`` lives."""
    return cache_dir / "images" / f"tiny-{key}.{IMAGE_FORMAT}"


def recipe_digest() -> str:
    """Return a hash of everything this module decides about the guest's content."""
    recipe = {
        "builder": BUILDER_VERSION,
        "files": {path: [mode, text] for path, (mode, text) in guest.guest_files().items()},
        "modules": list(kernel.WANTED_MODULES),
        "layout": [ESP_MIB, DATA_MIB, layout.KERNEL_CMDLINE],
        "syslinux": layout.syslinux_cfg(),
        "uefi": [layout.loader_conf(), layout.loader_entry(), str(disk.SYSTEMD_BOOT_EFI)],
        "format": IMAGE_FORMAT,
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


class _Binaries:
    """The host binaries copied into the guest and the libraries they need."""

    def __init__(self, busybox: Path, qemu_ga: Path, radvd: Path) -> None:
        self.busybox = busybox
        self.qemu_ga = qemu_ga
        self.radvd = radvd  # plays a rogue router in the router-guard test
        self.busybox_libs: list[str] = []
        self.qemu_ga_libs: list[str] = []
        self.radvd_libs: list[str] = []

    async def resolve(self, tools: Mapping[str, str]) -> None:
        self.busybox_libs, self.qemu_ga_libs, self.radvd_libs = await asyncio.gather(
            *(userland.binary_closure(b, tools) for b in (self.busybox, self.qemu_ga, self.radvd))
        )

    def digest(self) -> str:
        paths = [self.busybox, self.qemu_ga, self.radvd]
        libs = (*self.busybox_libs, *self.qemu_ga_libs, *self.radvd_libs)
        paths += [Path(p) for p in libs]
        return userland.files_digest(paths)


async def _host_packages(tools: Mapping[str, str]) -> str:
    out = await run(
        [tools["dpkg-query"], "-W", "-f", "${Package}=${Version}\\n", *TINY_APT_PACKAGES],
        timeout=QUERY_TIMEOUT,
        ok_codes=(0, 1),
    )
    return out.decode()


@contextlib.asynccontextmanager
async def _build_lock(path: Path, timeout: float = LOCK_TIMEOUT) -> AsyncIterator[None]:
    """Hold an exclusive ``flock`` on ``path``, polling until ``timeout``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            if time.monotonic() > deadline:
                raise OperationTimeout(
                    f"another build holds {path} for more than {timeout:g} s", timeout=timeout
                )
            await asyncio.sleep(0.5)
        yield
    finally:
        os.close(fd)


async def build_tiny(cache_dir: Path, progress: Progress | None = None) -> Path:
    """Build (or find in the cache) the tiny guest image and return its path."""

    def report(step: str, fraction: float) -> None:
        log.info("tiny image: %s (%.0f%%)", step, fraction * 100)
        if progress is not None:
            progress(fraction * 100, step)

    cache_dir = cache_dir.absolute()
    report("checking tools", 0.0)
    tools = require_tools(REQUIRED_TOOLS)
    disk.boot_files_check()
    binaries = _Binaries(Path(tools["busybox"]), Path(tools["qemu-ga"]), Path(tools["radvd"]))
    package, packages, _ = await asyncio.gather(
        kernel.resolve_kernel_package_cached(tools, cache_dir / "debs" / "kernel.json"),
        _host_packages(tools),
        binaries.resolve(tools),
    )
    inputs = {
        "kernel": f"{package.name}={package.version} sha256:{package.sha256}",
        "packages": packages,
        "binaries": await asyncio.to_thread(binaries.digest),
        "recipe": recipe_digest(),
    }
    key = cache_key(inputs)
    final = image_path(cache_dir, key)
    if final.is_file():
        report("cached", 1.0)
        return final
    async with _build_lock(cache_dir / "images" / ".tiny.lock"):
        if final.is_file():
            report("cached", 1.0)
            return final
        work_root = cache_dir / "work"
        work_root.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(_remove_stale, work_root)
        work = Path(tempfile.mkdtemp(prefix=f"tiny-{key}-", dir=work_root))
        try:
            await _build(work, final, key, package, binaries, tools, report)
        finally:
            await asyncio.to_thread(shutil.rmtree, work, True)
    report("done", 1.0)
    return final


async def _build(
    work: Path,
    final: Path,
    key: str,
    package: kernel.KernelPackage,
    binaries: _Binaries,
    tools: Mapping[str, str],
    report: Callable[[str, float], None],
) -> None:
    report(f"downloading {package.name} {package.version}", 0.05)
    deb = await kernel.ensure_kernel_deb(package, final.parent.parent / "debs", tools)
    for old in deb.parent.glob("linux-image-*.deb"):
        if old != deb:
            old.unlink(missing_ok=True)
    report("unpacking the kernel", 0.25)
    unpacked = await kernel.extract_kernel(deb, work / "kernel", tools)
    report("selecting kernel modules", 0.45)
    modules = await asyncio.to_thread(kernel.module_payload, unpacked, kernel.WANTED_MODULES)
    report("building the initramfs", 0.55)
    applets = await userland.busybox_applets(binaries.busybox)
    root = _initramfs(binaries, applets, modules)
    initrd = work / layout.INITRD_FILE
    initrd.write_bytes(await asyncio.to_thread(root.to_gzip))
    log.info("initramfs: %d bytes of files, %d compressed", root.size(), initrd.stat().st_size)
    report("building the boot loaders", 0.7)
    (work / "syslinux.cfg").write_text(layout.syslinux_cfg())
    (work / "loader.conf").write_text(layout.loader_conf())
    (work / "tiny.conf").write_text(layout.loader_entry())
    data_dir = work / "data"
    data_dir.mkdir()
    (data_dir / "README").write_text("hvstack tiny guest: this partition is mounted on /data\n")
    report("assembling the disk", 0.8)
    raw = work / "disk.raw"
    boot_files = {
        f"/{layout.KERNEL_FILE}": unpacked.vmlinuz,
        f"/{layout.INITRD_FILE}": initrd,
        "/syslinux.cfg": work / "syslinux.cfg",
        f"{disk.EFI_BOOT_DIR}/BOOTX64.EFI": disk.SYSTEMD_BOOT_EFI,
        "/loader/loader.conf": work / "loader.conf",
        "/loader/entries/tiny.conf": work / "tiny.conf",
    }
    await disk.assemble_disk(
        raw, layout.tiny_layout(ESP_MIB, DATA_MIB), key, boot_files, data_dir, tools
    )
    report(f"writing {IMAGE_FORMAT}", 0.9)
    final.parent.mkdir(parents=True, exist_ok=True)

    async def write(partial: Path) -> None:
        await run(
            [tools["qemu-img"], "convert", "-q", "-f", "raw", "-O", IMAGE_FORMAT, raw, partial],
            timeout=CONVERT_TIMEOUT,
        )
        os.chmod(partial, 0o644)

    await files.write_new(final, write, replace=True)


def _remove_stale(work_root: Path) -> None:
    """Remove work folders of builds that died (the caller holds the build lock)."""
    for stale in work_root.glob("tiny-*"):
        log.info("removing %s, left by an interrupted build", stale)
        shutil.rmtree(stale, ignore_errors=True)


def _initramfs(binaries: _Binaries, applets: list[str], modules: kernel.ModulePayload) -> Initramfs:
    root = Initramfs()
    for folder in ("/proc", "/sys", "/dev", "/run", "/data", "/mnt", "/var/log", "/etc/qemu"):
        root.mkdir(folder)
    root.mkdir("/tmp", 0o1777)
    root.mkdir("/root", 0o700)
    root.symlink("/var/run", "/run")
    root.symlink("/var/tmp", "/tmp")
    root.char_device("/dev/console", 5, 1)
    root.char_device("/dev/null", 1, 3, 0o666)
    userland.add_busybox(root, binaries.busybox, applets, binaries.busybox_libs)
    userland.add_binary(root, binaries.qemu_ga, "/usr/sbin/qemu-ga", binaries.qemu_ga_libs)
    userland.add_binary(root, binaries.radvd, "/usr/sbin/radvd", binaries.radvd_libs)
    for path, data in modules.files.items():
        root.add_file(path, data)
    root.add_file(f"/lib/modules/{modules.release}/modules.dep", modules.modules_dep.encode())
    root.add_file(guest.MODULE_LIST, ("\n".join(modules.load_order) + "\n").encode())
    for path, (mode, text) in guest.guest_files().items():
        root.add_file(path, text.encode(), mode)
    if not root.entries.get("/bin/sh"):
        raise HypervisorError("the initramfs has no /bin/sh")
    return root
