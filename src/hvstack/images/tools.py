"""Running the host tools the image builders use: lookup, argv runs, timeouts.

Contract:

* :func:`require_tools` finds every named tool on ``PATH`` plus the sbin directories
  and returns their absolute paths; when any is missing it raises one
  :class:`~hvstack.errors.HypervisorError` naming all missing tools and the Debian
  packages that provide them (``apt-get install ...``).
* :func:`run` runs one tool through :func:`hvstack.runner.run` (argv list, stdin from
  ``input`` or closed, a timeout, the process group killed on timeout or cancellation)
  with the sbin directories on ``PATH`` and ``LC_ALL=C``, and returns its stdout as
  bytes. A non-zero exit raises ``HypervisorError`` carrying the tool, exit code and
  the tail of stderr.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from hvstack import runner
from hvstack.errors import HypervisorError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 120.0
_EXTRA_PATH = ("/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/local/bin", "/usr/bin", "/bin")

TOOL_PACKAGES: Mapping[str, str] = {
    "apt-get": "apt",
    "apt-cache": "apt",
    "dpkg-deb": "dpkg",
    "dpkg-query": "dpkg",
    "ldd": "libc-bin",
    "busybox": "busybox-static",
    "qemu-ga": "qemu-guest-agent",
    "radvd": "radvd",
    "mformat": "mtools",
    "mmd": "mtools",
    "mcopy": "mtools",
    "syslinux": "syslinux",
    "mke2fs": "e2fsprogs",
    "sfdisk": "fdisk",
    "qemu-img": "qemu-utils",
}
"""Which Debian package provides each tool, for the missing-tool message."""


def search_path() -> str:
    """Return ``PATH`` with the sbin and bin directories appended (root tools live there)."""
    parts = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p]
    parts += [p for p in _EXTRA_PATH if p not in parts]
    return os.pathsep.join(parts)


def require_tools(names: Sequence[str]) -> dict[str, str]:
    """Return ``{name: absolute path}`` for every tool, or raise naming the missing ones."""
    path = search_path()
    found: dict[str, str] = {}
    missing: list[str] = []
    for name in names:
        where = shutil.which(name, path=path)
        if where is None:
            missing.append(name)
        else:
            found[name] = where
    if missing:
        packages = sorted({TOOL_PACKAGES.get(name, name) for name in missing})
        raise HypervisorError(
            f"the image builder needs {', '.join(missing)}, which "
            f"{'is' if len(missing) == 1 else 'are'} not installed; "
            f"install with: apt-get install {' '.join(packages)}",
            missing=missing,
            packages=packages,
        )
    return found


async def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    input: bytes | None = None,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    ok_codes: tuple[int, ...] = (0,),
) -> bytes:
    """Run ``argv`` and return its stdout; raise an HvError if it fails or times out."""
    args = [os.fspath(a) for a in argv]
    tool = Path(args[0]).name
    full_env = {**os.environ, "PATH": search_path(), "LC_ALL": "C", **(env or {})}
    return await runner.run(args, timeout=timeout, input=input, cwd=cwd, env=full_env,
                            ok_codes=ok_codes, package=TOOL_PACKAGES.get(tool, tool))
