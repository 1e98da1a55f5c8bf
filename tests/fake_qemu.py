"""A fake ``qemu-system-x86_64`` executable: daemonizes and serves QMP, runs no guest.

It reads what the host service's argv gives QEMU (``-chardev socket,id=qmp,path=...``,
``-pidfile``, ``-name guest=<id>,...``), and behaves as QEMU with ``-daemonize``: the
parent exits 0 only once the daemon is set up (its QMP socket listening, its pidfile
written), or exits 1 with QEMU's message on stderr. The daemon serves
:class:`tests.fake_qmp.FakeQmp` and exits on ``quit``.

``HV_FAKE_QEMU`` chooses the behaviour: ``ok`` (default), ``late-socket`` (the socket
appears 0.3 s after start: the connect race), ``locked`` (a disk is in use).
:func:`install` writes an executable wrapper that runs this module with the current
interpreter, for ``MachineSpec.binary``.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCKED = ('qemu-system-x86_64: -blockdev {"driver":"file"}: Failed to get "write" lock\n'
          "Is another process using the image [/srv/disk.qcow2]?\n")


def install(folder: Path) -> Path:
    """Write an executable that runs this fake; return its path."""
    wrapper = folder / "fake-qemu"
    wrapper.write_text(f"#!{sys.executable}\nimport sys\nsys.path[:0] = "
                       f"[{str(REPO)!r}, {str(REPO / 'src')!r}]\n"
                       "from tests.fake_qemu import main\nsys.exit(main(sys.argv[1:]))\n")
    wrapper.chmod(0o755)
    return wrapper


def _option(argv: list[str], flag: str, key: str | None = None, ident: str = "") -> str:
    for index, arg in enumerate(argv[:-1]):
        if arg != flag:
            continue
        value = argv[index + 1]
        if key is None:
            return value
        parts = dict(p.split("=", 1) for p in value.split(",") if "=" in p)
        if not ident or parts.get("id") == ident:
            return parts[key]
    raise SystemExit(f"fake qemu: no {flag} {key or ''}")


async def _serve(qmp_path: str, pidfile: str, ready: int, late: bool) -> None:
    from tests.fake_qmp import FakeQmp

    if late:
        await asyncio.sleep(0.3)
    server = FakeQmp(qmp_path)
    quit_asked = asyncio.Event()
    server.quit_hook = quit_asked.set
    await server.start()
    Path(pidfile).write_text(f"{os.getpid()}\n")
    os.write(ready, b"1")
    os.close(ready)
    await quit_asked.wait()
    await asyncio.sleep(0.05)  # let the answer to quit go out
    await server.close()


def main(argv: list[str]) -> int:
    mode = os.environ.get("HV_FAKE_QEMU", "ok")
    if mode == "locked":
        sys.stderr.write(LOCKED)
        return 1
    qmp_path = _option(argv, "-chardev", "path", ident="qmp")
    pidfile = _option(argv, "-pidfile")
    read_end, write_end = os.pipe()
    if os.fork():
        os.close(write_end)
        return 0 if os.read(read_end, 1) == b"1" else 1
    os.close(read_end)
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # as QEMU does once set up: the parent's pipes close
        os.dup2(null, fd)
    asyncio.run(_serve(qmp_path, pidfile, write_end, late=mode == "late-socket"))
    os._exit(0)
