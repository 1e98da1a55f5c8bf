"""Host configuration: where data lives, where disks may live, how to listen.

Resolved from (highest first) explicit arguments, environment variables
(``HV_DATA_DIR``, ``HV_HOST``, ``HV_STORAGE_ROOTS`` as a ``:``-list, ``HV_ACCELERATOR``,
``HV_CACHE_DIR``, ``HV_MAX_REQUEST_BODY``, ``HV_MEMORY_RESERVE`` and ``HV_MEMORY_LIMIT``
as sizes, ``HV_MEMORY_INTERVAL``: seconds between dynamic memory rounds) and defaults:
``/var/lib/hvstack`` for root, else ``~/.local/share/hvstack``.

The service always listens on its unix socket (``hv.sock`` in the data directory, or
``--listen unix:PATH``, or a ``unix:`` ``$HV_HOST``); ``--listen tcp:HOST:PORT`` adds a
TCP listener, which serves TLS unless ``--insecure`` (allowed on loopback addresses
only). ``--default-switch none`` keeps the service from making the Default Switch;
``--mac-pool FIRST-LAST`` is the range new adapters' MACs come from. Addresses are
``unix:PATH``, ``tcp:HOST:PORT`` (TLS) or ``http+tcp:HOST:PORT``
(plain HTTP, said explicitly).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hvstack.errors import InvalidInput

DEFAULT_STOP_TIMEOUT = 60.0
DEFAULT_MAX_REQUEST_BODY = 1024 * 1024  # JSON requests; uploads stream with their own limit


DEFAULT_MAC_POOL = "52:54:00:00:00:00-52:54:00:ff:ff:ff"  # as network.policy's
PLAIN_TCP = "http+tcp:"  # the one address form for plain HTTP over TCP


@dataclass(frozen=True)
class ListenAddress:
    kind: str  # "unix" or "tcp"
    path: str = ""
    host: str = ""
    port: int = 0
    tls: bool = True  # tcp only: https unless the address says http+tcp

    @property
    def netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def origin(self) -> str:
        """The web origin of a TCP listener (what a browser sends as ``Origin``)."""
        return f"{'https' if self.tls else 'http'}://{self.netloc.lower()}"

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        return f"{'tcp:' if self.tls else PLAIN_TCP}{self.netloc}"


def parse_listen(text: str) -> ListenAddress:
    """Parse ``unix:PATH``, ``tcp:HOST:PORT`` or ``http+tcp:HOST:PORT`` (a bare path
    means unix)."""
    for prefix, tls in (("tcp:", True), (PLAIN_TCP, False)):
        if text.startswith(prefix):
            host, _, port = text[len(prefix):].rpartition(":")
            host = host.removeprefix("[").removesuffix("]")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise InvalidInput(f"listen address '{text}' is not {prefix}HOST:PORT")
            return ListenAddress("tcp", host=host, port=int(port), tls=tls)
    path = text[5:] if text.startswith("unix:") else text
    if not path:
        raise InvalidInput(f"listen address '{text}' has no socket path")
    return ListenAddress("unix", path=os.path.abspath(path))


def is_loopback(host: str) -> bool:
    """True for literal loopback addresses and ``localhost`` (never resolved: a name
    that resolves elsewhere must not pass)."""
    import ipaddress  # only the service needs it; every CLI command imports this module

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_data_dir() -> Path:
    if env := os.environ.get("HV_DATA_DIR"):
        return Path(env).absolute()
    if os.geteuid() == 0:
        return Path("/var/lib/hvstack")
    return Path.home() / ".local/share/hvstack"


def default_listen(data_dir: Path | None = None) -> ListenAddress:
    """Where a client reaches the service: ``$HV_HOST``, else the default socket."""
    if env := os.environ.get("HV_HOST"):
        return parse_listen(env)
    return ListenAddress("unix", path=str((data_dir or default_data_dir()) / "hv.sock"))


def _service_socket(data_dir: Path) -> ListenAddress:
    """The service's unix socket: a ``unix:`` ``$HV_HOST`` moves it, a TCP one (a
    client's setting) does not open a TCP listener."""
    address = default_listen(data_dir)
    if address.kind != "unix":
        return ListenAddress("unix", path=str(data_dir / "hv.sock"))
    return address


@dataclass(frozen=True)
class HostConfig:
    data_dir: Path
    storage_roots: tuple[Path, ...]
    listen: ListenAddress  # the unix socket, always served
    cache_dir: Path
    accelerator: str | None = None  # None or "auto": chosen from the host
    stop_timeout: float = DEFAULT_STOP_TIMEOUT
    detach_on_exit: bool = False  # leave VMs running when the service stops
    tcp: ListenAddress | None = None  # the TCP listener, if any (tls=False: --insecure)
    tls_cert: Path | None = None  # None: a self-signed pair kept in tls_dir
    tls_key: Path | None = None
    ovmf_code: Path = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
    ovmf_vars: Path = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
    qemu_binary: str = "qemu-system-x86_64"
    max_request_body: int = DEFAULT_MAX_REQUEST_BODY  # bytes of a request body the API reads
    # Virtual switches: make the Default Switch (NAT) on first start; the MACs new
    # adapters get (network.policy.MacPool's form).
    default_switch: bool = True
    mac_pool: str = DEFAULT_MAC_POOL
    # Dynamic memory: what the host keeps for itself (None: 10 % of its memory, at
    # least 1 GiB, at most 8 GiB), a limit on what its VMs have together (None: none),
    # and the seconds between the balancer's rounds.
    memory_reserve: int | None = None
    memory_limit: int | None = None
    memory_interval: float = 2.0
    metering_interval: float = 10.0  # seconds between samples of metered VMs

    @property
    def vms_dir(self) -> Path:
        return self.data_dir / "vms"

    @property
    def images_dir(self) -> Path:
        return self.data_dir / "images"

    @property
    def tls_dir(self) -> Path:
        return self.data_dir / "tls"

    @property
    def run_dir(self) -> Path:
        """Short per-host directory for sockets (unix socket paths must stay < 108 bytes):
        under /run for root, else under ``$XDG_RUNTIME_DIR`` (private to the user) or the
        temporary directory; the service checks who owns it before trusting it
        (:func:`hvstack.host.files.secure_run_dir`)."""
        digest = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:10]
        if os.geteuid() == 0:
            return Path("/run") / f"hvstack-{digest}"
        runtime = os.environ.get("XDG_RUNTIME_DIR")
        if runtime and os.path.isabs(runtime):
            return Path(runtime) / f"hvstack-{digest}"
        return Path(tempfile.gettempdir()) / f"hvstack-{digest}"


def _listeners(data: Path, listen: str | Sequence[str] | None, insecure: bool
               ) -> tuple[ListenAddress, ListenAddress | None]:
    texts = [listen] if isinstance(listen, str) else list(listen or ())
    addresses = [parse_listen(t) for t in texts]
    unix = [a for a in addresses if a.kind == "unix"]
    tcp = [a for a in addresses if a.kind == "tcp"]
    if len(unix) > 1 or len(tcp) > 1:
        raise InvalidInput("give at most one --listen unix:PATH and one --listen tcp:HOST:PORT")
    socket = unix[0] if unix else _service_socket(data)
    if not tcp:
        if insecure:
            raise InvalidInput("--insecure applies to a TCP listener: add --listen "
                               "tcp:HOST:PORT")
        return socket, None
    address = tcp[0]
    if insecure or not address.tls:
        if not is_loopback(address.host):
            raise InvalidInput(
                f"--insecure serves plain HTTP, which is allowed on loopback addresses only "
                f"(127.0.0.1, ::1, localhost), not on '{address.host}': drop --insecure to "
                f"serve TLS", host=address.host)
        address = ListenAddress("tcp", host=address.host, port=address.port, tls=False)
    return socket, address


def _tls_files(tcp: ListenAddress | None, cert: str | None, key: str | None
               ) -> tuple[Path | None, Path | None]:
    if cert is None and key is None:
        return None, None
    if cert is None or key is None:
        raise InvalidInput("give --tls-cert and --tls-key together")
    if tcp is None or not tcp.tls:
        raise InvalidInput("--tls-cert and --tls-key apply to a TLS listener: add --listen "
                           "tcp:HOST:PORT (without --insecure)")
    paths = Path(cert).absolute(), Path(key).absolute()
    for path in paths:
        if not path.is_file():
            raise InvalidInput(f"TLS file '{path}' does not exist", path=str(path))
    return paths


def load_config(
    data_dir: str | None = None,
    listen: str | Sequence[str] | None = None,
    storage_roots: list[str] | None = None,
    accelerator: str | None = None,
    detach_on_exit: bool = False,
    *,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    insecure: bool = False,
    default_switch: str = "default",
    mac_pool: str | None = None,
    memory_reserve: str | None = None,
    memory_limit: str | None = None,
) -> HostConfig:
    data = Path(data_dir).absolute() if data_dir else default_data_dir()
    if any(c in str(data) for c in ",=\n"):
        raise InvalidInput(f"data directory '{data}' must not contain ',', '=' or newlines")
    roots_env = os.environ.get("HV_STORAGE_ROOTS", "")
    roots = [Path(r).absolute() for r in (storage_roots or roots_env.split(":")) if r]
    roots.insert(0, data)
    cache = Path(os.environ.get("HV_CACHE_DIR") or data / "cache").absolute()
    accel = accelerator or os.environ.get("HV_ACCELERATOR") or None
    socket, tcp = _listeners(data, listen, insecure)
    cert, key = _tls_files(tcp, tls_cert, tls_key)
    max_body = DEFAULT_MAX_REQUEST_BODY
    if env_body := os.environ.get("HV_MAX_REQUEST_BODY"):
        from hvstack.units import parse_size

        max_body = parse_size(env_body, what="HV_MAX_REQUEST_BODY")
    if default_switch not in ("default", "none"):
        raise InvalidInput(f"--default-switch '{default_switch}' is not one of default, none")
    pool = DEFAULT_MAC_POOL
    if mac_pool is not None:
        from hvstack.network.policy import MacPool  # only the service needs it

        pool = str(MacPool.parse(mac_pool))
    reserve, limit = _memory_sizes(memory_reserve, memory_limit)
    interval = 2.0
    if env_interval := os.environ.get("HV_MEMORY_INTERVAL"):
        try:
            interval = float(env_interval)
        except ValueError:
            interval = -1.0
        if not 0.5 <= interval <= 60:
            raise InvalidInput(f"HV_MEMORY_INTERVAL '{env_interval}' is not a number of "
                               "seconds from 0.5 to 60", value=env_interval)
    return HostConfig(
        data_dir=data,
        storage_roots=tuple(dict.fromkeys(roots)),
        listen=socket,
        cache_dir=cache,
        accelerator=None if accel == "auto" else accel,
        detach_on_exit=detach_on_exit,
        tcp=tcp,
        tls_cert=cert,
        tls_key=key,
        max_request_body=max_body,
        default_switch=default_switch == "default",
        mac_pool=pool,
        memory_reserve=reserve,
        memory_limit=limit,
        memory_interval=interval,
    )


def _memory_sizes(reserve: str | None, limit: str | None) -> tuple[int | None, int | None]:
    """``--memory-reserve`` and ``--memory-limit`` (else ``$HV_MEMORY_RESERVE`` and
    ``$HV_MEMORY_LIMIT``) as bytes (512M, 4G; a bare number is bytes)."""
    from hvstack.units import parse_size

    sizes: list[int | None] = []
    for option, text, env in (("--memory-reserve", reserve, "HV_MEMORY_RESERVE"),
                              ("--memory-limit", limit, "HV_MEMORY_LIMIT")):
        value = text if text is not None else os.environ.get(env) or None
        sizes.append(None if value is None
                     else parse_size(value, what=option.lstrip("-"), bare_unit="M"))
    return sizes[0], sizes[1]
