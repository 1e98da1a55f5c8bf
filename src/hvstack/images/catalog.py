"""The guest images hvstack can build, by name.

Contract: :data:`CATALOG` maps an image name to an :class:`ImageSpec` (a description,
the image format, the Debian packages the builder needs and the async builder).
:func:`build_image` builds the named image into ``cache_dir`` and returns its path;
an unknown name raises :class:`~hvstack.errors.NotFound` listing the known names.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from hvstack.errors import NotFound
from hvstack.images import tiny
from hvstack.progress import Progress

Builder = Callable[[Path, Progress | None], Awaitable[Path]]


@dataclass(frozen=True)
class ImageSpec:
    name: str
    description: str
    image_format: str
    apt_packages: tuple[str, ...]
    build: Builder


CATALOG: Mapping[str, ImageSpec] = MappingProxyType(
    {
        "tiny": ImageSpec(
            name="tiny",
            description=(
                "Debian kernel + busybox initramfs with qemu-ga; boots Generation 1 "
                "(SeaBIOS, IDE) and Generation 2 (OVMF, virtio); ext4 /data partition"
            ),
            image_format=tiny.IMAGE_FORMAT,
            apt_packages=tiny.TINY_APT_PACKAGES,
            build=tiny.build_tiny,
        ),
    }
)


def get_image(name: str) -> ImageSpec:
    """Return the catalog entry for ``name``."""
    spec = CATALOG.get(name)
    if spec is None:
        known = ", ".join(sorted(CATALOG))
        raise NotFound(f"no image named '{name}'; known images: {known}", image=name)
    return spec


async def build_image(name: str, cache_dir: Path, progress: Progress | None = None) -> Path:
    """Build (or take from the cache) the image ``name`` and return its path."""
    return await get_image(name).build(cache_dir, progress)
