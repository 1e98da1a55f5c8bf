"""The tiny image's disk layout and boot loader configuration (pure).

The disk boots on BIOS (Generation 1) and UEFI (Generation 2) alike::

    LBA 0        protective MBR; its boot code is syslinux's gptmbr.bin
    LBA 1-33     GPT header and partition entries
    1 MiB        partition 1 "hvboot": EFI System Partition, FAT16, label HVBOOT,
                 GPT attribute LegacyBIOSBootable (what gptmbr.bin looks for)
                   /vmlinuz, /initrd.img              kernel and the whole userspace
                   /ldlinux.sys, /ldlinux.c32         syslinux (BIOS), boot sector too
                   /syslinux.cfg                      BIOS boot config
                   /EFI/BOOT/BOOTX64.EFI              systemd-boot (UEFI removable-media path)
                   /loader/loader.conf, entries/tiny.conf   UEFI boot config
    33 MiB       partition 2 "hvdata": ext4, label hvdata, mounted on /data
    end          backup GPT

GPT rather than MBR because the UEFI specification defines the ESP by its GPT type,
so every firmware finds ``\\EFI\\BOOT\\BOOTX64.EFI`` on it; BIOS gets there through
gptmbr.bin, which loads the volume boot record of the partition marked legacy-bootable.

Contract: :func:`tiny_layout` gives the partition geometry, :func:`sfdisk_script`
the input for ``sfdisk`` on the image file, and :func:`syslinux_cfg` /
:func:`loader_conf` / :func:`loader_entry` boot the same kernel and initramfs with
:data:`KERNEL_CMDLINE` and no menu or timeout.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

SECTOR = 512
MIB = 1024 * 1024
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
LINUX_TYPE = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
BOOT_LABEL = "HVBOOT"
KERNEL_CMDLINE = ("memhp_default_state=online_movable swiotlb=4096 "
                  "console=tty0 console=ttyS0,115200")
"""The serial console comes last so that /dev/console is the serial port. Hot-plugged
memory (virtio-mem) comes online movable, so the host can unplug it again. A VM with
dynamic memory has an address space beyond 4 GiB, for which the kernel reserves a 64 MiB
bounce buffer by default; 8 MiB (4096 slabs) serves the emulated IDE disk's 32-bit DMA
and leaves the rest to the guest (a tiny guest's demand would be a third larger)."""
KERNEL_FILE = "vmlinuz"
INITRD_FILE = "initrd.img"


@dataclass(frozen=True)
class DiskLayout:
    """Partition geometry, in 512-byte sectors."""

    esp_start: int
    esp_sectors: int
    data_start: int
    data_sectors: int
    total_sectors: int

    @property
    def esp_offset(self) -> int:
        return self.esp_start * SECTOR

    @property
    def data_offset(self) -> int:
        return self.data_start * SECTOR

    @property
    def total_bytes(self) -> int:
        return self.total_sectors * SECTOR


def tiny_layout(esp_mib: int = 32, data_mib: int = 64) -> DiskLayout:
    """Return the layout: 1 MiB-aligned ESP and data partitions, 1 MiB for the backup GPT.

    >>> tiny_layout(32, 64).total_bytes // MIB
    98
    """
    per_mib = MIB // SECTOR
    esp_start = per_mib
    data_start = esp_start + esp_mib * per_mib
    total = data_start + data_mib * per_mib + per_mib
    return DiskLayout(esp_start, esp_mib * per_mib, data_start, data_mib * per_mib, total)


def stable_uuid(seed: str, role: str) -> str:
    """Return a UUID fixed by ``seed`` and ``role``, so equal inputs give equal disks."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"hvstack-tiny:{seed}:{role}")).upper()


def sfdisk_script(layout: DiskLayout, seed: str) -> str:
    """Return the sfdisk input that writes the GPT of ``layout``."""
    return (
        "label: gpt\n"
        f"label-id: {stable_uuid(seed, 'disk')}\n"
        "unit: sectors\n"
        "sector-size: 512\n"
        "\n"
        f"start={layout.esp_start}, size={layout.esp_sectors}, type={ESP_TYPE}, "
        f'uuid={stable_uuid(seed, "esp")}, name="hvboot", attrs="LegacyBIOSBootable"\n'
        f"start={layout.data_start}, size={layout.data_sectors}, type={LINUX_TYPE}, "
        f'uuid={stable_uuid(seed, "data")}, name="hvdata"\n'
    )


def syslinux_cfg(cmdline: str = KERNEL_CMDLINE) -> str:
    """Return syslinux.cfg: boot at once, echo to the first serial port too."""
    return (
        "SERIAL 0 115200\n"
        "DEFAULT tiny\n"
        "PROMPT 0\n"
        "TIMEOUT 0\n"
        "LABEL tiny\n"
        f"  LINUX /{KERNEL_FILE}\n"
        f"  INITRD /{INITRD_FILE}\n"
        f"  APPEND {cmdline}\n"
    )


def loader_conf() -> str:
    """Return systemd-boot's loader.conf: boot the one entry at once, no menu."""
    return "default tiny.conf\ntimeout 0\nconsole-mode keep\n"


def loader_entry(cmdline: str = KERNEL_CMDLINE) -> str:
    """Return the systemd-boot entry: the kernel's EFI stub loads the initramfs itself,
    so unlike GRUB 2.06 it boots in small VMs (GRUB ran out of memory at 256 MiB)."""
    return (
        "title hvstack tiny\n"
        f"linux /{KERNEL_FILE}\n"
        f"initrd /{INITRD_FILE}\n"
        f"options {cmdline}\n"
    )
