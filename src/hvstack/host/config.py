"""Host configuration: where data lives, where disks may live, how to listen.

Resolved from (highest first) explicit arguments, environment variables
(``HV_DATA_DIR``, ``HV_HOST``, ``HV_STORAGE_ROOTS`` as a ``:``-list, ``HV_ACCELERATOR``,
``HV_CACHE_DIR``, ``HV_MAX_REQUEST_BODY`` as a size) and defaults: ``/var/lib/hvstack``
for root, else ``~/.local/share/hvstack``; the listen address is the unix socket ``hv.sock`` in it.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hvstack.errors import InvalidInput

DEFAULT_STOP_TIMEOUT = 60.0
DEFAULT_MAX_REQUEST_BODY = 1024 * 1024  # JSON requests; uploads stream with their own limit


@dataclass(frozen=True)
class ListenAddress:
    kind: str  # "unix" or "tcp"
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.kind == "unix" else f"tcp:{self.host}:{self.port}"


def parse_listen(text: str) -> ListenAddress:
    """Parse ``unix:PATH`` or ``tcp:HOST:PORT`` (a bare path means unix)."""
    if text.startswith("tcp:"):
        host, _, port = text[4:].rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise InvalidInput(f"listen address '{text}' is not tcp:HOST:PORT")
        return ListenAddress("tcp", host=host.strip("[]"), port=int(port))
    path = text[5:] if text.startswith("unix:") else text
    if not path:
        raise InvalidInput(f"listen address '{text}' has no socket path")
    return ListenAddress("unix", path=os.path.abspath(path))


def default_data_dir() -> Path:
    if env := os.environ.get("HV_DATA_DIR"):
        return Path(env).absolute()
    if os.geteuid() == 0:
        return Path("/var/lib/hvstack")
    return Path.home() / ".local/share/hvstack"


def default_listen(data_dir: Path | None = None) -> ListenAddress:
    if env := os.environ.get("HV_HOST"):
        return parse_listen(env)
    return ListenAddress("unix", path=str((data_dir or default_data_dir()) / "hv.sock"))


@dataclass(frozen=True)
class HostConfig:
    data_dir: Path
    storage_roots: tuple[Path, ...]
    listen: ListenAddress
    cache_dir: Path
    accelerator: str | None = None  # None or "auto": chosen from the host
    stop_timeout: float = DEFAULT_STOP_TIMEOUT
    detach_on_exit: bool = False  # leave VMs running when the service stops
    ovmf_code: Path = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
    ovmf_vars: Path = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
    qemu_binary: str = "qemu-system-x86_64"
    max_request_body: int = DEFAULT_MAX_REQUEST_BODY  # bytes of a request body the API reads

    @property
    def vms_dir(self) -> Path:
        return self.data_dir / "vms"

    @property
    def images_dir(self) -> Path:
        return self.data_dir / "images"

    @property
    def run_dir(self) -> Path:
        """Short per-host directory for sockets (unix socket paths must stay < 108 bytes)."""
        digest = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:10]
        base = Path("/run") if os.geteuid() == 0 else Path(tempfile.gettempdir())
        return base / f"hvstack-{digest}"


def load_config(
    data_dir: str | None = None,
    listen: str | None = None,
    storage_roots: list[str] | None = None,
    accelerator: str | None = None,
    detach_on_exit: bool = False,
) -> HostConfig:
    data = Path(data_dir).absolute() if data_dir else default_data_dir()
    if any(c in str(data) for c in ",=\n"):
        raise InvalidInput(f"data directory '{data}' must not contain ',', '=' or newlines")
    roots_env = os.environ.get("HV_STORAGE_ROOTS", "")
    roots = [Path(r).absolute() for r in (storage_roots or roots_env.split(":")) if r]
    roots.insert(0, data)
    cache = Path(os.environ.get("HV_CACHE_DIR") or data / "cache").absolute()
    accel = accelerator or os.environ.get("HV_ACCELERATOR") or None
    max_body = DEFAULT_MAX_REQUEST_BODY
    if env_body := os.environ.get("HV_MAX_REQUEST_BODY"):
        from hvstack.units import parse_size

        max_body = parse_size(env_body, what="HV_MAX_REQUEST_BODY")
    return HostConfig(
        data_dir=data,
        storage_roots=tuple(dict.fromkeys(roots)),
        listen=parse_listen(listen) if listen else default_listen(data),
        cache_dir=cache,
        accelerator=None if accel == "auto" else accel,
        detach_on_exit=detach_on_exit,
        max_request_body=max_body,
    )
