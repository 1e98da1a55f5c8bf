"""Who may use the API: bearer tokens for TCP, peer credentials for the unix socket.

Tokens: ``hvt_<id>_<secret>``, the secret 32 random bytes. Only the SHA-256 of the
secret is stored (table ``api_tokens`` in the service's SQLite file), so the token is
shown once, when created; a presented token is found by its id and its secret compared
in constant time. Every check reads the table, so a revoked token fails on the very
next request. Every token grants everything the API offers (there are no roles yet).

Unix socket peers: :func:`peer_allowed` is the decision (root, the service's own user,
or a member of the socket's group), :func:`peer_policy` gathers what it needs.
"""

from __future__ import annotations

import grp
import hashlib
import hmac
import os
import pwd
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from hvstack.errors import AlreadyExists, InvalidInput, NotFound

TOKEN_PREFIX = "hvt"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_TOKEN = re.compile(r"hvt_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_tokens (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    secret_sha256 BLOB NOT NULL,
    created_at REAL NOT NULL
);
"""


@dataclass(frozen=True)
class TokenInfo:
    id: str
    name: str
    created_at: float


@dataclass(frozen=True)
class NewToken:
    info: TokenInfo
    token: str  # shown once, never stored


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def check_token_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise InvalidInput(
            "a token name is 1 to 64 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit", name=name)
    return name


class TokenStore:
    """API tokens in a SQLite file (the service's database, or ``:memory:``)."""

    def __init__(self, path: Path | str) -> None:
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def create(self, name: str) -> NewToken:
        check_token_name(name)
        token_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        info = TokenInfo(token_id, name, time.time())
        with self._lock:
            try:
                self._db.execute("INSERT INTO api_tokens VALUES (?,?,?,?)",
                                 (token_id, name, _digest(secret), info.created_at))
            except sqlite3.IntegrityError:
                raise AlreadyExists(f"a token named '{name}' already exists",
                                    name=name) from None
        return NewToken(info, f"{TOKEN_PREFIX}_{token_id}_{secret}")

    def list(self) -> list[TokenInfo]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, name, created_at FROM api_tokens ORDER BY created_at").fetchall()
        return [TokenInfo(*row) for row in rows]

    def revoke(self, name: str) -> None:
        with self._lock:
            cur = self._db.execute("DELETE FROM api_tokens WHERE name=?", (name,))
        if cur.rowcount == 0:
            raise NotFound(f"there is no token named '{name}'", name=name)

    def verify(self, token: str) -> TokenInfo | None:
        """The token's record if ``token`` is valid now, else None."""
        match = _TOKEN.fullmatch(token)
        if match is None:
            return None
        token_id, secret = match.groups()
        with self._lock:
            row = self._db.execute(
                "SELECT name, secret_sha256, created_at FROM api_tokens WHERE id=?",
                (token_id,)).fetchone()
        if row is None or not hmac.compare_digest(bytes(row[1]), _digest(secret)):
            return None
        return TokenInfo(token_id, row[0], row[2])

    def close(self) -> None:
        with self._lock:
            self._db.close()


@dataclass(frozen=True)
class PeerPolicy:
    """What the unix socket's peer check needs: the service's user, the socket's group
    and that group's listed members (user names, from /etc/group)."""

    service_uid: int
    group_gid: int
    group_members: frozenset[str]


def peer_allowed(uid: int, gid: int, policy: PeerPolicy, user_name: str | None,
                 user_gid: int | None) -> bool:
    """The unix socket's access rule. ``uid``/``gid`` are the peer's credentials
    (SO_PEERCRED); ``user_name``/``user_gid`` the peer user's name and primary group
    from the user database (None when the uid has no entry)."""
    if uid in (0, policy.service_uid):
        return True
    if policy.group_gid in (gid, user_gid):
        return True
    return user_name is not None and user_name in policy.group_members


def peer_policy(group_gid: int) -> PeerPolicy:
    """The policy as the user database says now (read per connection, so a change of
    group membership needs no restart)."""
    try:
        members: Collection[str] = grp.getgrgid(group_gid).gr_mem
    except KeyError:
        members = ()
    return PeerPolicy(os.geteuid(), group_gid, frozenset(members))


def user_of(uid: int) -> tuple[str | None, int | None]:
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return None, None
    return entry.pw_name, entry.pw_gid
