"""Running the host service: the store, the service and the API on one event loop.

This is the process's composition root, above every layer (it wires api/ onto host/).

``serve`` holds an exclusive lock on the data directory (one service per directory),
serves the API on a unix socket or TCP, and on SIGTERM/SIGINT stops serving, applies
the VMs' automatic stop actions (unless ``detach_on_exit``) and exits. A crash or
SIGKILL leaves the VMs running; the next start reattaches to them.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import logging
import os
import signal
import socket
from collections.abc import Iterator

import uvicorn

from hvstack.api.app import create_app
from hvstack.errors import Conflict
from hvstack.host.config import HostConfig
from hvstack.host.guest_ops import thaw_leftovers
from hvstack.host.service import HostService
from hvstack.host.store import SqliteStore
from hvstack.hypervisor.qemu.driver import QemuDriver

log = logging.getLogger(__name__)


class QuietServer(uvicorn.Server):
    """uvicorn without its own signal handling: the service decides how to stop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _lock_data_dir(config: HostConfig) -> int:
    config.data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(config.data_dir / "hv.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise Conflict(
            f"another host service is already running with data directory {config.data_dir}"
        ) from None
    return fd


def _prepare_unix_socket(path: str) -> None:
    if not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # stale: nobody listens (we hold the data directory lock)
    else:
        raise Conflict(f"something is already listening on {path}")
    finally:
        probe.close()


async def serve(config: HostConfig, ready: asyncio.Event | None = None) -> None:
    lock_fd = _lock_data_dir(config)
    store = SqliteStore(config.data_dir / "hvstack.db")
    service = HostService(config, store, QemuDriver())
    app = None
    try:
        await service.startup()
        app = create_app(service)
        await thaw_leftovers(service)  # a freeze left by a crashed service must not stay
        # Everything built so far lives as long as the service: keeping it out of the
        # collector's generations removes most full-collection pauses from requests.
        gc.freeze()
        if config.listen.kind == "unix":
            _prepare_unix_socket(config.listen.path)
            uconfig = uvicorn.Config(app, uds=config.listen.path, log_level="warning",
                                     lifespan="off")
        else:
            uconfig = uvicorn.Config(app, host=config.listen.host, port=config.listen.port,
                                     log_level="warning", lifespan="off")
        server = QuietServer(uconfig)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))
        log.info("hvstack host service listening on %s (accelerator %s: %s)", config.listen,
                 service.facts.accelerator.name, service.facts.accelerator.reason)
        serving = asyncio.create_task(server.serve())
        while not server.started and not serving.done():
            await asyncio.sleep(0.02)
        if config.listen.kind == "unix" and server.started:
            os.chmod(config.listen.path, 0o660)
        if ready is not None:
            ready.set()
        await serving
    finally:
        if app is not None:
            await app.state.guest_ops.close()
        await service.shutdown()
        store.close()
        os.close(lock_fd)
