"""Rules for the guest-facing integration services, as pure functions (no I/O).

* :class:`GuestPolicy`: the host's limits for file copies and commands in guests
  (size limit, deny-list, chunk sizes, agent timeouts, the KVP folder in the guest).
  :meth:`GuestPolicy.from_env` reads ``HV_GUEST_COPY_MAX`` (a size, e.g. ``4G``) and
  ``HV_GUEST_DENY`` (a ``:``-list of guest folders) over the defaults.
* :func:`guest_path`: a guest path as the copy service accepts it: absolute, no ``..``
  components, no control characters, not under a denied folder; returned normalised.
* KVP (Hyper-V's data exchange): :func:`check_kvp_item` enforces Hyper-V's limits
  (key 1..512 bytes, value at most 2048 bytes of UTF-8, no control characters or line
  breaks, and no ``=`` in keys: the guest files hold ``key=value`` lines);
  :func:`format_kvp` and :func:`parse_kvp` write and read that file format.
* :func:`intrinsic_data`: the agent's answers turned into Hyper-V's intrinsic items;
  :func:`reachable_addresses`: the addresses among them another machine could use (no
  loopback, no link-local), what ``hv vm wait --for ip`` waits for.
"""

from __future__ import annotations

import ipaddress
import os
import posixpath
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from hvstack.errors import InvalidInput
from hvstack.units import parse_size

KVP_KEY_MAX = 512
KVP_VALUE_MAX = 2048
KVP_MAX_ITEMS = 1024
KVP_DIR = "/var/lib/hvstack/kvp"
GUEST_PATH_MAX = 4096


class GuestPathNotAllowed(InvalidInput):
    slug = "guest-path-not-allowed"
    title = "Guest path not allowed"


class FileTooLarge(InvalidInput):
    http_status = 413
    slug = "file-too-large"
    title = "File too large"


@dataclass(frozen=True)
class GuestPolicy:
    max_copy_bytes: int = 4 * 1024**3
    deny: tuple[str, ...] = ("/proc", "/sys", "/dev")
    write_chunk: int = 1024 * 1024  # raw bytes per guest-file-write (base64 grows it 4/3)
    read_chunk: int = 4 * 1024 * 1024  # per guest-file-read; the reply must fit READ_LIMIT
    agent_timeout: float = 10.0  # one agent call
    chunk_timeout: float = 60.0  # one chunk's agent call (TCG guests are slow)
    stall_timeout: float = 60.0  # the client side of a transfer not moving
    data_wait: float = 60.0  # a transfer's data connection must arrive within this
    verify_timeout: float = 600.0  # sha256sum of the largest file in the guest
    freeze_timeout: float = 60.0  # the guest syncs everything dirty before it freezes
    thaw_timeout: float = 10.0
    max_exec_input: int = 8 * 1024 * 1024
    kvp_dir: str = KVP_DIR

    @staticmethod
    def from_env(env: Mapping[str, str] | None = None) -> GuestPolicy:
        env = os.environ if env is None else env
        policy = GuestPolicy()
        changes: dict[str, Any] = {}
        if limit := env.get("HV_GUEST_COPY_MAX"):
            changes["max_copy_bytes"] = parse_size(limit, what="HV_GUEST_COPY_MAX")
        if deny := env.get("HV_GUEST_DENY"):
            changes["deny"] = tuple(
                guest_path(d, GuestPolicy(deny=()), what="denied folder")
                for d in deny.split(":") if d
            )
        return GuestPolicy(**{**asdict(policy), **changes})


def _has_control(text: str) -> bool:
    return any(unicodedata.category(ch) in ("Cc", "Zl", "Zp") for ch in text)


def is_denied(path: str, deny: Sequence[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deny)


def guest_path(path: str, policy: GuestPolicy, *, what: str = "guest path") -> str:
    """``path`` normalised, or InvalidInput / GuestPathNotAllowed saying why not."""
    if not path.startswith("/"):
        raise InvalidInput(f"{what} '{path}' must be absolute (start with '/')", path=path)
    if len(path) > GUEST_PATH_MAX:
        raise InvalidInput(f"{what} is longer than {GUEST_PATH_MAX} characters")
    if _has_control(path):
        raise InvalidInput(f"{what} {path!r} must not contain control characters",
                           path=repr(path))
    if ".." in path.split("/"):
        raise GuestPathNotAllowed(f"{what} '{path}' must not contain '..'", path=path)
    normal = posixpath.normpath(path)
    if normal.startswith("//"):
        normal = "/" + normal.lstrip("/")
    if is_denied(normal, policy.deny):
        raise GuestPathNotAllowed(
            f"{what} '{normal}' is in a folder the host does not allow "
            f"({', '.join(policy.deny)})", path=normal, deny=list(policy.deny),
        )
    return normal


def guest_file_path(path: str, policy: GuestPolicy, *, what: str = "guest path") -> str:
    """A guest path that names a file (not '/' and not ending in '/')."""
    normal = guest_path(path, policy, what=what)
    if normal == "/" or path.endswith("/"):
        raise InvalidInput(f"{what} '{path}' names a folder; give the file's full path",
                           path=path)
    return normal


def check_size(size: int, policy: GuestPolicy, path: str) -> None:
    if size > policy.max_copy_bytes:
        raise FileTooLarge(
            f"{path} is {size} bytes; this host copies files of at most "
            f"{policy.max_copy_bytes} bytes into or out of guests",
            size=size, limit=policy.max_copy_bytes,
        )


# -- KVP -------------------------------------------------------------------------------


def check_kvp_item(key: str, value: str | None = None) -> None:
    """Raise InvalidInput (400) unless ``key`` (and ``value``) keep Hyper-V's limits."""
    if not key:
        raise InvalidInput("a KVP key must not be empty")
    encoded = key.encode("utf-8", errors="surrogatepass")
    if len(encoded) > KVP_KEY_MAX:
        raise InvalidInput(f"KVP key is {len(encoded)} bytes long; at most {KVP_KEY_MAX} "
                           "bytes of UTF-8 are allowed", key=key[:64])
    if "=" in key:
        raise InvalidInput(f"KVP key '{key}' must not contain '='", key=key)
    if _has_control(key):
        raise InvalidInput(f"KVP key {key!r} must not contain control characters",
                           key=repr(key))
    if value is None:
        return
    size = len(value.encode("utf-8", errors="surrogatepass"))
    if size > KVP_VALUE_MAX:
        raise InvalidInput(f"KVP value of '{key}' is {size} bytes long; at most "
                           f"{KVP_VALUE_MAX} bytes of UTF-8 are allowed", key=key)
    if _has_control(value):
        raise InvalidInput(f"KVP value of '{key}' must not contain control characters",
                           key=key)
    for text in (key, value):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidInput(f"KVP item '{key[:64]}' is not valid UTF-8") from None


def format_kvp(pool: Mapping[str, str]) -> bytes:
    """The guest file: one ``key=value`` line per item, sorted by key."""
    return "".join(f"{k}={pool[k]}\n" for k in sorted(pool)).encode()


def parse_kvp(data: bytes) -> tuple[dict[str, str], int]:
    """Items of a guest KVP file and how many lines were ignored (not ``key=value``, or
    beyond the limits). A key given twice keeps its last value."""
    pool: dict[str, str] = {}
    ignored = 0
    for raw in data.decode("utf-8", errors="replace").split("\n"):
        line = raw.removesuffix("\r")
        if not line:
            continue
        key, sep, value = line.partition("=")
        try:
            if not sep:
                raise InvalidInput("no '='")
            check_kvp_item(key, value)
        except InvalidInput:
            ignored += 1
            continue
        pool[key] = value
    if len(pool) > KVP_MAX_ITEMS:
        ignored += len(pool) - KVP_MAX_ITEMS
        pool = dict(list(pool.items())[:KVP_MAX_ITEMS])
    return pool, ignored


# -- intrinsic data ----------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    mac: str | None
    ipv4: tuple[str, ...]
    ipv6: tuple[str, ...]


@dataclass(frozen=True)
class FilesystemInfo:
    mountpoint: str
    type: str
    device: str | None
    total_bytes: int | None
    used_bytes: int | None


@dataclass(frozen=True)
class IntrinsicData:
    """What the guest reports about itself (Hyper-V's intrinsic exchange items)."""

    items: dict[str, str] = field(default_factory=dict)
    adapters: tuple[AdapterInfo, ...] = ()
    filesystems: tuple[FilesystemInfo, ...] = ()
    errors: dict[str, str] = field(default_factory=dict)  # agent command -> why it failed

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _adapters(interfaces: Any) -> tuple[AdapterInfo, ...]:
    found = []
    for nic in interfaces if isinstance(interfaces, list) else []:
        addresses = nic.get("ip-addresses") or []
        v4 = tuple(a["ip-address"] for a in addresses if a.get("ip-address-type") == "ipv4")
        v6 = tuple(a["ip-address"] for a in addresses if a.get("ip-address-type") == "ipv6")
        found.append(AdapterInfo(str(nic.get("name", "")), nic.get("hardware-address"), v4, v6))
    return tuple(found)


def _filesystems(fsinfo: Any) -> tuple[FilesystemInfo, ...]:
    found = []
    for fs in fsinfo if isinstance(fsinfo, list) else []:
        disks = fs.get("disk") or []
        device = disks[0].get("dev") if disks and isinstance(disks[0], dict) else None
        found.append(FilesystemInfo(str(fs.get("mountpoint", "")), str(fs.get("type", "")),
                                    device, fs.get("total-bytes"), fs.get("used-bytes")))
    return tuple(found)


def intrinsic_data(answers: Mapping[str, Any], errors: Mapping[str, str]) -> IntrinsicData:
    """Hyper-V's intrinsic items from the agent's answers, keyed by agent command."""
    osinfo = answers.get("guest-get-osinfo") or {}
    host = answers.get("guest-get-host-name") or {}
    adapters = _adapters(answers.get("guest-network-get-interfaces"))
    items: dict[str, str] = {}
    if name := host.get("host-name"):
        items["FullyQualifiedDomainName"] = str(name)
    os_name = osinfo.get("pretty-name") or osinfo.get("name")
    if not os_name and osinfo.get("kernel-release"):
        os_name = "Linux"  # no os-release file in the guest
    for key, value in (
        ("OSName", os_name),
        ("OSVersion", osinfo.get("version") or osinfo.get("version-id")),
        ("OSId", osinfo.get("id")),
        ("OSKernelRelease", osinfo.get("kernel-release")),
        ("OSKernelVersion", osinfo.get("kernel-version")),
        ("ProcessorArchitecture", osinfo.get("machine")),
    ):
        if value:
            items[key] = str(value)
    v4 = [a for nic in adapters for a in nic.ipv4]
    v6 = [a for nic in adapters for a in nic.ipv6]
    if v4:
        items["NetworkAddressIPv4"] = ";".join(v4)
    if v6:
        items["NetworkAddressIPv6"] = ";".join(v6)
    return IntrinsicData(items, adapters, _filesystems(answers.get("guest-get-fsinfo")),
                         dict(errors))


def reachable_addresses(adapters: Sequence[AdapterInfo]) -> list[str]:
    """The guest's IPv4 then IPv6 addresses, without loopback and link-local ones (a
    guest has those before any network configured it)."""
    found = []
    for text in [a for nic in adapters for a in nic.ipv4] + [
            a for nic in adapters for a in nic.ipv6]:
        try:
            address = ipaddress.ip_address(text.split("%")[0])
        except ValueError:
            continue
        if not (address.is_loopback or address.is_link_local or address.is_unspecified):
            found.append(text)
    return found
