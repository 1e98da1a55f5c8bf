"""The Debian kernel for guest images: find it, download it, unpack it, pick modules.

Contract:

* :func:`resolve_kernel_package` asks the local apt cache (``apt-cache``, no network)
  which ``linux-image-*-amd64`` package the ``linux-image-amd64`` meta package depends
  on now, and returns its name, version and SHA256. Nothing is installed on the host.
* :func:`resolve_kernel_package_cached` does the same but remembers the answer in a
  small JSON file next to the debs, keyed by a stamp of apt's package lists and
  configuration (:func:`apt_state_stamp`), so a rerun need not ask apt again.
* :func:`ensure_kernel_deb` returns the path of that ``.deb`` under ``debs_dir``,
  downloading it with ``apt-get download`` into a private temporary folder first and
  renaming it into place, so the cache only ever holds complete, checksum-verified
  files; a cached file with the right checksum is used as is.
* :func:`extract_kernel` unpacks the package with ``dpkg-deb -x`` into a folder the
  caller owns and returns where the kernel, its config and its modules are. The
  package ships no ``modules.dep`` (its postinst runs depmod); then one is generated
  with ``busybox depmod -b`` on the unpacked tree.
* :func:`module_payload` returns the chosen module files (decompressed to ``.ko``) with
  their guest paths, the load order list and a ``modules.dep`` for just those modules.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import lzma
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from hvstack.errors import HypervisorError
from hvstack.files import publish, write_bytes
from hvstack.images import kmod
from hvstack.images.tools import run

META_PACKAGE = "linux-image-amd64"
APT_TIMEOUT = 60.0
DOWNLOAD_TIMEOUT = 900.0
EXTRACT_TIMEOUT = 600.0
DEPMOD_TIMEOUT = 300.0

WANTED_MODULES: tuple[str, ...] = (
    # disks: emulated IDE (Gen 1), AHCI, virtio-blk and virtio-scsi (Gen 2)
    "ata_piix",
    "ata_generic",
    "ahci",
    "sd_mod",
    "virtio_pci",
    "virtio_blk",
    "virtio_scsi",
    # the data partition; ext4's metadata checksums need a crc32c implementation
    "ext4",
    "crc32c_generic",
    # integration services channel, network, memory, entropy
    "virtio_console",
    "virtio_net",
    "e1000",
    # VLAN trunks in the guest (ip link add ... type vlan)
    "8021q",
    "virtio_balloon",
    # dynamic memory above the startup amount: blocks plugged and unplugged by the host
    "virtio_mem",
    "virtio_rng",
    # ACPI power button events for acpid
    "button",
    "evdev",
)
"""Module names the tiny guest loads (those built into the kernel are skipped)."""


@dataclass(frozen=True)
class KernelPackage:
    name: str
    version: str
    sha256: str

    @property
    def deb_name(self) -> str:
        """The file name ``apt-get download`` gives the package."""
        return f"{self.name}_{self.version.replace(':', '%3a')}_amd64.deb"


@dataclass(frozen=True)
class ExtractedKernel:
    release: str
    vmlinuz: Path
    config: Path
    modules_dir: Path


def parse_depends(text: str, prefix: str = "linux-image-") -> str | None:
    """Return the first ``Depends:`` package in ``apt-cache depends`` output with ``prefix``.

    >>> parse_depends("linux-image-amd64\\n  Depends: linux-image-6.1.0-9-amd64\\n")
    'linux-image-6.1.0-9-amd64'
    """
    for raw in text.splitlines():
        line = raw.strip().lstrip("|")
        if not line.startswith("Depends:"):
            continue
        name = line.removeprefix("Depends:").strip()
        if name.startswith(prefix):  # a <virtual> package cannot be downloaded
            return name
    return None


def parse_stanza(text: str) -> dict[str, str]:
    """Parse the first deb822 stanza of ``text`` (continuation lines are dropped)."""
    fields: dict[str, str] = {}
    for raw in text.splitlines():
        if not raw.strip():
            if fields:
                break
            continue
        if raw[0] in " \t":
            continue
        key, sep, value = raw.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


async def resolve_kernel_package(tools: Mapping[str, str]) -> KernelPackage:
    """Return the kernel package ``linux-image-amd64`` depends on, from the apt cache."""
    depends = await run([tools["apt-cache"], "depends", META_PACKAGE], timeout=APT_TIMEOUT)
    name = parse_depends(depends.decode())
    if name is None:
        raise HypervisorError(
            f"apt knows no kernel package that {META_PACKAGE} depends on; "
            "run apt-get update (with Debian's main component enabled)"
        )
    shown = await run([tools["apt-cache"], "show", "--no-all-versions", name], timeout=APT_TIMEOUT)
    fields = parse_stanza(shown.decode())
    if "Version" not in fields or "SHA256" not in fields:
        raise HypervisorError(f"apt-cache show {name} gave no version or SHA256")
    return KernelPackage(name, fields["Version"], fields["SHA256"].lower())


APT_STATE_PATHS: tuple[Path, ...] = (
    Path("/var/lib/apt/lists"),
    Path("/etc/apt/sources.list"),
    Path("/etc/apt/sources.list.d"),
    Path("/etc/apt/preferences"),
    Path("/etc/apt/preferences.d"),
)


def apt_state_stamp(paths: tuple[Path, ...] | None = None) -> str:
    """Return a hash of the names, sizes and mtimes of apt's lists and configuration."""
    entries: list[str] = []
    for base in APT_STATE_PATHS if paths is None else paths:
        if base.is_dir():
            files = sorted(p for p in base.iterdir() if p.is_file() and p.name != "lock")
        elif base.is_file():
            files = [base]
        else:
            continue
        for path in files:
            with contextlib.suppress(OSError):
                info = path.stat()
                entries.append(f"{path}:{info.st_size}:{info.st_mtime_ns}")
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()


async def resolve_kernel_package_cached(tools: Mapping[str, str], memo: Path) -> KernelPackage:
    """Like :func:`resolve_kernel_package`, remembered in ``memo`` while apt's state holds."""
    stamp = await asyncio.to_thread(apt_state_stamp)
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        data = json.loads(memo.read_text())
        if data["stamp"] == stamp:
            return KernelPackage(str(data["name"]), str(data["version"]), str(data["sha256"]))
    package = await resolve_kernel_package(tools)
    record = {"stamp": stamp, "name": package.name, "version": package.version}
    record["sha256"] = package.sha256
    memo.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(memo, (json.dumps(record, indent=1) + "\n").encode())
    return package


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


async def ensure_kernel_deb(
    package: KernelPackage, debs_dir: Path, tools: Mapping[str, str]
) -> Path:
    """Return the cached ``.deb`` of ``package``, downloading it first if needed."""
    debs_dir.mkdir(parents=True, exist_ok=True)
    target = debs_dir / package.deb_name
    if target.exists() and await asyncio.to_thread(_sha256, target) == package.sha256:
        return target
    partial = Path(tempfile.mkdtemp(prefix=".download-", dir=debs_dir))
    try:
        # apt drops privileges to _apt for downloads; let it write here.
        os.chmod(partial, 0o777)
        await run(
            [tools["apt-get"], "download", "-q", f"{package.name}={package.version}"],
            cwd=partial,
            timeout=DOWNLOAD_TIMEOUT,
        )
        files = sorted(partial.glob("*.deb"))
        if len(files) != 1:
            raise HypervisorError(f"apt-get download {package.name} left {len(files)} files")
        got = await asyncio.to_thread(_sha256, files[0])
        if got != package.sha256:
            raise HypervisorError(f"{files[0].name} has SHA256 {got}, apt expects {package.sha256}")
        os.chmod(files[0], 0o644)
        publish(files[0], target, replace=True)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def _find_release(root: Path) -> tuple[str, Path]:
    for base in (root / "lib" / "modules", root / "usr" / "lib" / "modules"):
        if base.is_dir():
            releases = sorted(p for p in base.iterdir() if p.is_dir())
            if len(releases) == 1:
                return releases[0].name, releases[0]
    raise HypervisorError(f"the kernel package unpacked in {root} has no single modules tree")


async def extract_kernel(deb: Path, dest: Path, tools: Mapping[str, str]) -> ExtractedKernel:
    """Unpack ``deb`` into ``dest`` and locate its kernel, config and modules."""
    dest.mkdir(parents=True, exist_ok=True)
    await run([tools["dpkg-deb"], "-x", deb, dest], timeout=EXTRACT_TIMEOUT)
    release, modules_dir = _find_release(dest)
    boot = dest / "boot"
    vmlinuz, config = boot / f"vmlinuz-{release}", boot / f"config-{release}"
    for needed in (vmlinuz, config):
        if not needed.is_file():
            raise HypervisorError(f"the kernel package has no {needed.relative_to(dest)}")
    if not (modules_dir / "modules.dep").is_file():
        base = modules_dir.parent.parent.parent
        await run([tools["busybox"], "depmod", "-b", base, release], timeout=DEPMOD_TIMEOUT)
    return ExtractedKernel(release, vmlinuz, config, modules_dir)


def _read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if path.name.endswith(".ko.zst"):
        raise HypervisorError(f"zstd-compressed kernel modules are not supported: {path.name}")
    return data


@dataclass(frozen=True)
class ModulePayload:
    release: str
    files: dict[str, bytes]
    """Guest path -> module content (uncompressed)."""
    load_order: tuple[str, ...]
    """Guest paths, dependencies first."""
    modules_dep: str


def module_payload(kernel: ExtractedKernel, wanted: tuple[str, ...]) -> ModulePayload:
    """Pick ``wanted`` modules and their dependencies from the unpacked kernel."""
    problems = kmod.check_kernel_config(kmod.parse_kernel_config(kernel.config.read_text()))
    if problems:
        raise HypervisorError(
            f"kernel {kernel.release} lacks built-in {', '.join(problems)}", missing=problems
        )
    deps = kmod.parse_modules_dep((kernel.modules_dir / "modules.dep").read_text())
    builtin_file = kernel.modules_dir / "modules.builtin"
    builtin = kmod.parse_modules_builtin(builtin_file.read_text() if builtin_file.is_file() else "")
    order = kmod.resolve_modules(wanted, deps, builtin)
    guest_dir = f"/lib/modules/{kernel.release}"
    files = {
        f"{guest_dir}/{kmod.plain_module_path(path)}": _read_module(kernel.modules_dir / path)
        for path in order
    }
    load = tuple(f"{guest_dir}/{kmod.plain_module_path(path)}" for path in order)
    return ModulePayload(kernel.release, files, load, kmod.filtered_modules_dep(order, deps))
