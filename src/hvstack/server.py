"""Running the host service: the store, the service and the API on one event loop.

This is the process's entry, above every layer: it opens the store, starts the host's
composition root (:class:`~hvstack.host.root.HostRoot`) and serves api/ on it.

``serve`` makes the data directory private (:mod:`hvstack.host.files`), holds an
exclusive lock on it (one service per directory), serves the API on its unix socket
(0660, root and the socket's group; peers checked by :mod:`hvstack.api.peer`) and, if
configured, on TCP (TLS and a token on every request unless ``--insecure`` on
loopback; :mod:`hvstack.api.guard`): two uvicorn servers on one loop, one app. On
SIGTERM/SIGINT it stops serving, applies the VMs' automatic stop actions (unless
``detach_on_exit``) and exits. A crash or SIGKILL leaves the VMs running; the next start
reattaches to them.
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
import ssl
import stat
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn
from starlette.types import ASGIApp

from hvstack.api.app import create_app
from hvstack.api.guard import ListenerGuard
from hvstack.api.peer import peer_checked_protocol
from hvstack.errors import AlreadyExists, Conflict, InvalidInput
from hvstack.host.auth import TokenStore
from hvstack.host.config import HostConfig, ListenAddress
from hvstack.host.files import AccessGroup, resolve_group, secure_data_dir, secure_run_dir
from hvstack.host.root import HostRoot, linux_network
from hvstack.host.store import SqliteStore
from hvstack.host.tls import TlsPair, tls_pair
from hvstack.hypervisor.qemu.driver import QemuDriver

log = logging.getLogger(__name__)
BACKLOG = 2048  # uvicorn's default


class _DenialIsNoError(logging.Filter):
    """uvicorn (websockets-sansio) logs a WebSocket refused with an HTTP response (the
    denial-response extension: 401, 403, 404 as problem+json) as "returned without
    completing handshake"; every refusal would be an ERROR line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "ASGI callable returned without completing handshake."


logging.getLogger("uvicorn.error").addFilter(_DenialIsNoError())


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
    """Make way for the socket at ``path``: only a stale socket is ever removed."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise AlreadyExists(f"{path} exists and is not a socket: refusing to replace it; "
                            f"choose another --listen unix:PATH", path=path)
    probe = socket.socket(socket.AF_UNIX)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # stale: nobody listens (we hold the data directory lock)
    else:
        raise Conflict(f"something is already listening on {path}")
    finally:
        probe.close()


def _bind_unix(path: str, gid: int) -> socket.socket:
    """The unix socket, 0660 for root and the group from the moment it exists (the
    umask keeps it private until the chmod), listening at once: while the service
    starts, clients wait in the backlog and no one takes it for a stale socket."""
    _prepare_unix_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chown(path, -1, gid)
        os.chmod(path, 0o660)
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


def _bind_tcp(address: ListenAddress) -> socket.socket:
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    try:
        return socket.create_server((address.host, address.port), family=family)
    except OSError as exc:
        raise Conflict(f"cannot listen on {address}: {exc.strerror or exc}") from None


def _check_tls(tls: TlsPair) -> None:
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(tls.cert, tls.key)
    except (ssl.SSLError, OSError) as exc:
        raise InvalidInput(f"cannot use the TLS certificate {tls.cert} and key {tls.key}: "
                           f"{exc}") from None


def _uvicorn(app: ASGIApp, **options: Any) -> QuietServer:
    return QuietServer(uvicorn.Config(app, log_level="warning", lifespan="off", **options))


def _listening(config: HostConfig, tls: TlsPair | None, group: AccessGroup) -> str:
    text = f"hvstack host service: data {config.data_dir}, listening on {config.listen}"
    text += f" (group '{group.name}')"
    if config.tcp is not None:
        text += f" and {config.tcp}"
        text += " (plain HTTP, loopback only)" if tls is None else " (TLS)"
    if tls is not None:
        text += (f"\nTLS certificate {tls.cert}, SHA-256 fingerprint:\n  {tls.fingerprint}"
                 f"\nclients: HV_HOST={config.tcp} HV_FINGERPRINT="
                 f"{tls.fingerprint.replace(':', '')} HV_TOKEN=... (hv auth token create NAME)")
    if group.note:
        text += f"\nnote: {group.note}"
    return text


async def _serve_all(servers: list[tuple[QuietServer, socket.socket]],
                     ready: asyncio.Event | None) -> None:
    """Serve every listener until a signal (or one of them failing) stops them all."""
    loop = asyncio.get_running_loop()

    def stop() -> None:
        for server, _ in servers:
            server.should_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    tasks = [asyncio.create_task(server.serve(sockets=[sock])) for server, sock in servers]
    try:
        while not all(s.started for s, _ in servers) and not any(t.done() for t in tasks):
            await asyncio.sleep(0.02)
        if ready is not None and all(s.started for s, _ in servers):
            ready.set()
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


async def serve(config: HostConfig, ready: asyncio.Event | None = None,
                announce: Callable[[str], None] | None = None) -> None:
    """Run the service; ``announce`` receives the one message saying where it listens
    (and the TLS certificate's fingerprint), once the listeners are bound."""
    group = resolve_group()
    secure_data_dir(config.data_dir, group)
    lock_fd = _lock_data_dir(config)
    store = tokens = None
    root = None
    sockets: list[socket.socket] = []
    try:
        secure_run_dir(config.run_dir)
        # Listeners first: a bad address or certificate fails before any VM is touched.
        sockets.append(_bind_unix(config.listen.path, group.gid))
        tls = None
        if config.tcp is not None:
            if config.tcp.tls:
                tls = tls_pair(config)
                _check_tls(tls)
            sockets.append(_bind_tcp(config.tcp))
        store = SqliteStore(config.data_dir / "hvstack.db")
        tokens = TokenStore(config.data_dir / "hvstack.db")
        root = await HostRoot.start(config, store, QemuDriver(), network=linux_network())
        app = create_app(root, tokens=tokens)
        origins = [config.tcp.origin] if config.tcp is not None else []
        servers = [(_uvicorn(ListenerGuard(app, tokens=None, own_origins=origins),
                             http=peer_checked_protocol(group.gid)), sockets[0])]
        if len(sockets) > 1:
            options = ({"ssl_certfile": str(tls.cert), "ssl_keyfile": str(tls.key)}
                       if tls is not None else {})
            servers.append((_uvicorn(ListenerGuard(app, tokens=tokens, own_origins=origins),
                                     **options), sockets[1]))
        # Everything built so far lives as long as the service: keeping it out of the
        # collector's generations removes most full-collection pauses from requests.
        gc.freeze()
        message = _listening(config, tls, group)
        log.info("%s (accelerator %s: %s)", message.splitlines()[0],
                 root.service.facts.accelerator.name, root.service.facts.accelerator.reason)
        if group.note:
            log.warning("%s", group.note)
        if announce is not None:
            announce(message)
        await _serve_all(servers, ready)
    finally:
        if root is not None:
            await root.close()
        for sock in sockets:
            sock.close()
        for db in (tokens, store):
            if db is not None:
                db.close()
        os.close(lock_fd)
