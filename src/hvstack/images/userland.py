"""Host binaries copied into a guest initramfs, with the shared libraries they need.

Contract:

* :func:`parse_ldd` reads ``ldd`` output into the absolute paths of the libraries and
  the dynamic loader (the vDSO is skipped); a library ``not found`` raises
  :class:`~hvstack.errors.HypervisorError`. A static binary has none.
* :func:`binary_closure` runs ``ldd`` on a host binary and returns those paths.
* :func:`add_binary` puts a binary at its guest path and each library at the path
  ``ldd`` printed (so the loader's default search finds them without ld.so.cache);
  symlinks on the host are followed, the guest gets plain files.
* :func:`add_busybox` installs busybox as ``/bin/busybox`` with one symlink per applet
  at the path ``busybox --list-full`` gives, and ``/init`` pointing at it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

from hvstack.errors import HypervisorError
from hvstack.images.cpio import Initramfs
from hvstack.images.tools import run

LDD_TIMEOUT = 30.0
_NOT_DYNAMIC = ("not a dynamic executable", "statically linked")


def parse_ldd(text: str) -> list[str]:
    """Return the library and loader paths named in ``ldd`` output, in order.

    >>> parse_ldd("\\tlinux-vdso.so.1 (0x1)\\n\\tlibc.so.6 => /lib/libc.so.6 (0x2)\\n"
    ...           "\\t/lib64/ld-linux-x86-64.so.2 (0x3)\\n")
    ['/lib/libc.so.6', '/lib64/ld-linux-x86-64.so.2']
    """
    paths: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or any(marker in line for marker in _NOT_DYNAMIC):
            continue
        if "=>" in line:
            name, _, rest = line.partition("=>")
            target = rest.strip()
            if target.startswith("not found"):
                raise HypervisorError(f"shared library {name.strip()} not found", library=name)
            path = target.split(" (", 1)[0].strip()
        else:
            path = line.split(" (", 1)[0].strip()
        if path.startswith("/") and path not in paths:
            paths.append(path)
    return paths


async def binary_closure(binary: Path, tools: Mapping[str, str]) -> list[str]:
    """Return the shared libraries and loader ``binary`` needs (none if static)."""
    out = await run([tools["ldd"], binary], timeout=LDD_TIMEOUT, ok_codes=(0, 1))
    return parse_ldd(out.decode(errors="replace"))


def files_digest(paths: list[Path]) -> str:
    """Return one SHA256 over the names and contents of ``paths`` (for cache keys)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(str(path).encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def add_binary(root: Initramfs, host: Path, guest: str, libraries: list[str]) -> None:
    """Copy ``host`` to ``guest`` and each of ``libraries`` to its own path."""
    root.add_file(guest, host.read_bytes(), 0o755)
    for library in libraries:
        root.add_file(library, Path(library).read_bytes(), 0o755)


def add_busybox(root: Initramfs, host: Path, applets: list[str], libraries: list[str]) -> None:
    """Install busybox at /bin/busybox, its applet links, and /init."""
    add_binary(root, host, "/bin/busybox", libraries)
    for applet in applets:
        guest = "/" + applet.strip().lstrip("/")
        if guest in ("/", "/bin/busybox") or guest.endswith("/linuxrc"):
            continue
        root.symlink(guest, "/bin/busybox")
    root.symlink("/init", "/bin/busybox")


async def busybox_applets(busybox: Path) -> list[str]:
    """Return busybox's applet paths (``bin/sh``, ``sbin/init``, ...)."""
    out = await run([busybox, "--list-full"], timeout=LDD_TIMEOUT)
    applets = [line.strip() for line in out.decode().splitlines() if line.strip()]
    if "sbin/init" not in applets or "bin/sh" not in applets:
        raise HypervisorError(f"{busybox} lacks the init or sh applet")
    return applets
