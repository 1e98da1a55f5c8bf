"""Kernel module selection: names, modules.dep parsing, load order, kernel config."""

from __future__ import annotations

import pytest

from hvstack.errors import HypervisorError
from hvstack.images import kmod

SAMPLE_DEP = """\
kernel/fs/ext4/ext4.ko: kernel/fs/jbd2/jbd2.ko kernel/fs/mbcache.ko kernel/lib/crc16.ko
kernel/fs/jbd2/jbd2.ko:
kernel/fs/mbcache.ko:
kernel/lib/crc16.ko:
kernel/crypto/crc32c_generic.ko:
kernel/drivers/scsi/sd_mod.ko: kernel/drivers/scsi/scsi_mod.ko kernel/drivers/scsi/scsi_common.ko
kernel/drivers/scsi/scsi_mod.ko: kernel/drivers/scsi/scsi_common.ko
kernel/drivers/scsi/scsi_common.ko:
kernel/drivers/ata/ata_piix.ko: kernel/drivers/ata/libata.ko kernel/drivers/scsi/scsi_mod.ko \
kernel/drivers/scsi/scsi_common.ko
kernel/drivers/ata/libata.ko: kernel/drivers/scsi/scsi_mod.ko kernel/drivers/scsi/scsi_common.ko
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio.ko \
kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/arch/x86/crypto/crc32c-intel.ko.xz:
"""


@pytest.fixture
def deps() -> dict[str, tuple[str, ...]]:
    return kmod.parse_modules_dep(SAMPLE_DEP)


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("kernel/fs/ext4/ext4.ko", "ext4"),
        ("kernel/arch/x86/crypto/crc32c-intel.ko.xz", "crc32c_intel"),
        ("kernel/drivers/net/virtio_net.ko.zst", "virtio_net"),
        ("ata_piix.ko.gz", "ata_piix"),
    ],
)
def test_module_name(path: str, name: str) -> None:
    assert kmod.module_name(path) == name


def test_parse_modules_dep(deps: dict[str, tuple[str, ...]]) -> None:
    assert deps["kernel/fs/ext4/ext4.ko"] == (
        "kernel/fs/jbd2/jbd2.ko",
        "kernel/fs/mbcache.ko",
        "kernel/lib/crc16.ko",
    )
    assert deps["kernel/fs/jbd2/jbd2.ko"] == ()
    assert len(deps) == 14


def test_parse_modules_dep_rejects_garbage() -> None:
    with pytest.raises(HypervisorError, match="malformed"):
        kmod.parse_modules_dep("no colon here\n")


def _assert_load_order(order: tuple[str, ...], deps: dict[str, tuple[str, ...]]) -> None:
    assert len(order) == len(set(order))
    for i, path in enumerate(order):
        for dep in deps[path]:
            assert order.index(dep) < i, f"{dep} must load before {path}"


def test_resolve_puts_dependencies_first(deps: dict[str, tuple[str, ...]]) -> None:
    order = kmod.resolve_modules(["ext4", "ata_piix", "sd_mod", "virtio_pci"], deps)
    _assert_load_order(order, deps)
    assert set(order) == {
        "kernel/fs/ext4/ext4.ko",
        "kernel/fs/jbd2/jbd2.ko",
        "kernel/fs/mbcache.ko",
        "kernel/lib/crc16.ko",
        "kernel/drivers/ata/ata_piix.ko",
        "kernel/drivers/ata/libata.ko",
        "kernel/drivers/scsi/scsi_mod.ko",
        "kernel/drivers/scsi/scsi_common.ko",
        "kernel/drivers/scsi/sd_mod.ko",
        "kernel/drivers/virtio/virtio_pci.ko",
        "kernel/drivers/virtio/virtio.ko",
        "kernel/drivers/virtio/virtio_ring.ko",
    }
    assert order[0] == "kernel/fs/jbd2/jbd2.ko"


def test_resolve_accepts_dashes_and_compressed(deps: dict[str, tuple[str, ...]]) -> None:
    assert kmod.resolve_modules(["crc32c-intel"], deps) == (
        "kernel/arch/x86/crypto/crc32c-intel.ko.xz",
    )


def test_resolve_skips_builtin(deps: dict[str, tuple[str, ...]]) -> None:
    builtin = kmod.parse_modules_builtin(
        "kernel/drivers/virtio/virtio_pci.ko\nkernel/fs/ext4/ext4.ko\n"
    )
    assert kmod.resolve_modules(["virtio_pci", "ext4", "crc16"], deps, builtin) == (
        "kernel/lib/crc16.ko",
    )


def test_resolve_reports_every_missing_module(deps: dict[str, tuple[str, ...]]) -> None:
    with pytest.raises(HypervisorError, match="e1000, evdev") as caught:
        kmod.resolve_modules(["ext4", "e1000", "evdev"], deps)
    assert caught.value.data["missing"] == ["e1000", "evdev"]


def test_resolve_optional_missing_is_fine(deps: dict[str, tuple[str, ...]]) -> None:
    assert kmod.resolve_modules(["virtio_rng"], deps, optional=["virtio-rng"]) == ()


def test_resolve_detects_cycles() -> None:
    deps = kmod.parse_modules_dep("a.ko: b.ko\nb.ko: a.ko\n")
    with pytest.raises(HypervisorError, match="cycle"):
        kmod.resolve_modules(["a"], deps)


def test_resolve_rejects_dangling_dependency() -> None:
    deps = kmod.parse_modules_dep("a.ko: gone.ko\n")
    with pytest.raises(HypervisorError, match=r"gone\.ko"):
        kmod.resolve_modules(["a"], deps)


def test_filtered_modules_dep_uses_plain_names(deps: dict[str, tuple[str, ...]]) -> None:
    order = kmod.resolve_modules(["crc32c_intel", "virtio_pci"], deps)
    text = kmod.filtered_modules_dep(order, deps)
    assert "kernel/arch/x86/crypto/crc32c-intel.ko:\n" in text
    assert (
        "kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio.ko "
        "kernel/drivers/virtio/virtio_ring.ko\n"
    ) in text
    assert ".xz" not in text


def test_kernel_config_check() -> None:
    config = kmod.parse_kernel_config(
        "# comment\nCONFIG_BLK_DEV_INITRD=y\nCONFIG_EXT4_FS=m\n"
        '# CONFIG_RD_GZIP is not set\nCONFIG_LOCALVERSION="-x"\n'
    )
    assert config == {
        "CONFIG_BLK_DEV_INITRD": "y",
        "CONFIG_EXT4_FS": "m",
        "CONFIG_LOCALVERSION": "-x",
    }
    assert kmod.check_kernel_config(config, ["CONFIG_BLK_DEV_INITRD", "CONFIG_RD_GZIP"]) == [
        "CONFIG_RD_GZIP"
    ]
    assert kmod.check_kernel_config(config, ["CONFIG_EXT4_FS"]) == ["CONFIG_EXT4_FS"]
