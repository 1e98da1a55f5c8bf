"""Assemble a bootable raw disk image file without mounting anything.

Contract: :func:`assemble_disk` writes a new raw image at ``raw`` with the partition
layout of :mod:`hvstack.images.layout`, using only tools that work on image files:

* ``sfdisk`` writes the GPT (and protective MBR) into the file;
* ``mformat`` / ``mmd`` / ``mcopy`` with ``image@@offset`` create and fill the FAT
  boot partition in place;
* ``syslinux --install --offset`` (the mtools-based installer) writes syslinux's boot
  sector and ``ldlinux.sys``/``ldlinux.c32`` into it, and syslinux's ``gptmbr.bin``
  becomes the MBR boot code (the first 440 bytes; the partition table stays);
* ``mke2fs -d -E offset=`` builds the ext4 data partition from a folder, in place.

No loop device, no mount, no root privileges beyond writing the file. Every tool run
has a timeout. UEFI boots systemd-boot from ``/EFI/BOOT/BOOTX64.EFI``, which reads
``/loader`` on the same partition.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from hvstack.errors import HypervisorError
from hvstack.images.layout import BOOT_LABEL, SECTOR, DiskLayout, sfdisk_script, stable_uuid
from hvstack.images.tools import run

TOOL_TIMEOUT = 120.0
GPTMBR = Path("/usr/lib/syslinux/mbr/gptmbr.bin")
SYSTEMD_BOOT_EFI = Path("/usr/lib/systemd/boot/efi/systemd-bootx64.efi")
EFI_BOOT_DIR = "/EFI/BOOT"
MBR_CODE_BYTES = 440
DATA_LABEL = "hvdata"
_MTOOLS_ENV = {"MTOOLS_SKIP_CHECK": "1"}


def boot_files_check() -> None:
    """Raise if syslinux's GPT MBR or systemd-boot's EFI binary is not on the host."""
    if not GPTMBR.is_file():
        raise HypervisorError(f"{GPTMBR} is missing; apt-get install syslinux-common")
    if not SYSTEMD_BOOT_EFI.is_file():
        raise HypervisorError(f"{SYSTEMD_BOOT_EFI} is missing; apt-get install systemd-boot-efi")


def _fat_serial(seed: str) -> str:
    return stable_uuid(seed, "fat").replace("-", "")[:8]


async def _mtools(tools: Mapping[str, str], tool: str, *args: str | Path) -> None:
    await run([tools[tool], *args], timeout=TOOL_TIMEOUT, env=_MTOOLS_ENV)


async def assemble_disk(
    raw: Path,
    layout: DiskLayout,
    seed: str,
    boot_files: Mapping[str, Path],
    data_dir: Path,
    tools: Mapping[str, str],
) -> None:
    """Create ``raw``: GPT, a FAT boot partition holding ``boot_files``, ext4 data.

    ``boot_files`` maps a path on the boot partition (``/vmlinuz``,
    ``/EFI/BOOT/BOOTX64.EFI``) to the host file to copy there.
    """
    with raw.open("wb") as handle:
        handle.truncate(layout.total_bytes)
    await run(
        [tools["sfdisk"], "--quiet", "--no-reread", "--no-tell-kernel", raw],
        input=sfdisk_script(layout, seed).encode(),
        timeout=TOOL_TIMEOUT,
    )
    fat = f"{raw}@@{layout.esp_offset}"
    await _mtools(
        tools,
        "mformat",
        "-i",
        fat,
        "-T",
        str(layout.esp_sectors),
        "-h",
        "64",
        "-s",
        "32",
        "-H",
        str(layout.esp_start),
        "-v",
        BOOT_LABEL,
        "-N",
        _fat_serial(seed),
        "::",
    )
    folders = sorted({str(Path(p).parent) for p in boot_files} - {"/"}, key=len)
    for folder in _with_parents(folders):
        await _mtools(tools, "mmd", "-i", fat, f"::{folder}")
    for guest, host in sorted(boot_files.items()):
        await _mtools(tools, "mcopy", "-i", fat, host, f"::{guest}")
    await run(
        [tools["syslinux"], "--install", "--offset", str(layout.esp_offset), raw],
        timeout=TOOL_TIMEOUT,
    )
    mbr = GPTMBR.read_bytes()[:MBR_CODE_BYTES]
    with raw.open("r+b") as handle:
        handle.write(mbr)
    await run(
        [
            tools["mke2fs"],
            "-q",
            "-F",
            "-t",
            "ext4",
            "-L",
            DATA_LABEL,
            "-U",
            stable_uuid(seed, "ext4").lower(),
            "-E",
            f"offset={layout.data_offset},root_owner=0:0,"
            f"hash_seed={stable_uuid(seed, 'ext4-hash').lower()}",
            "-d",
            data_dir,
            raw,
            f"{layout.data_sectors * SECTOR // 1024}k",
        ],
        timeout=TOOL_TIMEOUT,
    )


def _with_parents(folders: list[str]) -> list[str]:
    """Return ``folders`` and all their parents, parents first (``/A/B`` -> ``/A``, ``/A/B``)."""
    out: list[str] = []
    for folder in folders:
        parts = folder.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            path = "/" + "/".join(parts[:i])
            if path not in out:
                out.append(path)
    return out
