"""Access rules as data: the unix socket's peer decision, tokens, origins, fingerprints,
listen addresses and the ``--insecure`` rule."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest

from hvstack.api.guard import normalize_origin
from hvstack.errors import AlreadyExists, InvalidInput, NotFound
from hvstack.host.auth import PeerPolicy, TokenStore, peer_allowed
from hvstack.host.config import ListenAddress, is_loopback, load_config, parse_listen
from hvstack.transport import endpoint, parse_fingerprint

SERVICE_UID = 1000
GROUP = 995
POLICY = PeerPolicy(service_uid=SERVICE_UID, group_gid=GROUP, group_members=frozenset({"ann"}))


@pytest.mark.parametrize(("uid", "gid", "name", "primary", "allowed"), [
    (0, 0, "root", 0, True),                    # root
    (SERVICE_UID, 1000, "svc", 1000, True),      # the service's own user
    (2001, GROUP, "bob", 2001, True),            # runs with the group as its gid
    (2002, 2002, "carl", GROUP, True),           # the group is its primary group
    (2003, 2003, "ann", 2003, True),             # listed member of the group
    (2004, 2004, "eve", 2004, False),            # none of those
    (2005, 2005, None, None, False),             # a uid without a user entry
    (65534, 65534, "nobody", 65534, False),
])
def test_peer_decision(uid: int, gid: int, name: str | None, primary: int | None,
                       allowed: bool) -> None:
    assert peer_allowed(uid, gid, POLICY, name, primary) is allowed


@pytest.fixture
def tokens(tmp_path: Path) -> TokenStore:
    return TokenStore(tmp_path / "hvstack.db")


def test_token_is_shown_once_and_stored_hashed(tokens: TokenStore, tmp_path: Path) -> None:
    new = tokens.create("ci")
    assert new.token.startswith("hvt_") and tokens.verify(new.token) == new.info
    secret = new.token.split("_", 2)[2]
    raw = sqlite3.connect(tmp_path / "hvstack.db").execute(
        "SELECT secret_sha256 FROM api_tokens").fetchall()
    assert raw == [(hashlib.sha256(secret.encode()).digest(),)]
    assert new.token.encode() not in (tmp_path / "hvstack.db").read_bytes()
    assert [t.name for t in tokens.list()] == ["ci"]


def test_token_checks(tokens: TokenStore) -> None:
    good = tokens.create("a").token
    other = tokens.create("b").token
    forged = good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB")
    swapped = good.rsplit("_", 1)[0] + "_" + other.split("_", 2)[2]
    for bad in ("", "hvt_", forged, swapped, good + "x", good.upper(), "Bearer " + good):
        assert tokens.verify(bad) is None, bad
    with pytest.raises(AlreadyExists):
        tokens.create("a")
    for name in ("", "-x", "a b", "a/b", "x" * 65, "\ud800", "n\u00e9"):
        with pytest.raises(InvalidInput):
            tokens.create(name)


def test_revocation_takes_effect_at_once(tokens: TokenStore, tmp_path: Path) -> None:
    token = tokens.create("gone").token
    second = TokenStore(tmp_path / "hvstack.db")  # another connection to the same file
    assert second.verify(token) is not None
    tokens.revoke("gone")
    assert second.verify(token) is None and tokens.verify(token) is None
    with pytest.raises(NotFound):
        tokens.revoke("gone")


@pytest.mark.parametrize(("origin", "expected"), [
    ("https://127.0.0.1:8443", "https://127.0.0.1:8443"),
    ("HTTPS://Host.Example:8443/", "https://host.example:8443"),
    ("https://host.example", "https://host.example:443"),
    ("http://[::1]:80", "http://[::1]:80"),
    ("null", None),
    ("file://", None),
    ("https://a:8443/path", None),
    ("https://user@a:8443", None),
    ("https://a:99999", None),
])
def test_normalize_origin(origin: str, expected: str | None) -> None:
    assert normalize_origin(origin) == expected


def test_fingerprints() -> None:
    digest = hashlib.sha256(b"x").digest()
    for text in (digest.hex(), digest.hex(":").upper(), "sha256:" + digest.hex(),
                 "SHA256 Fingerprint=" + digest.hex(":").upper()):
        assert parse_fingerprint(text) == digest
    for bad in ("", "abc", digest.hex()[:-1] + "g", digest.hex() + "00"):
        with pytest.raises(InvalidInput):
            parse_fingerprint(bad)


def test_listen_addresses() -> None:
    assert parse_listen("tcp:10.0.0.1:8443") == ListenAddress("tcp", host="10.0.0.1",
                                                               port=8443, tls=True)
    plain = parse_listen("http+tcp:[::1]:8080")
    assert plain == ListenAddress("tcp", host="::1", port=8080, tls=False)
    assert str(plain) == "http+tcp:[::1]:8080" and plain.origin == "http://[::1]:8080"
    assert parse_listen("tcp:Host.Example:8443").origin == "https://host.example:8443"
    for loop in ("127.0.0.1", "127.3.4.5", "::1", "localhost"):
        assert is_loopback(loop)
    for other in ("0.0.0.0", "::", "10.0.0.1", "localhost.evil.example", "example.com"):
        assert not is_loopback(other)


def test_client_endpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HV_TOKEN", "HV_FINGERPRINT", "HV_CA_FILE"):
        monkeypatch.delenv(name, raising=False)
    unix = endpoint("unix:/x.sock", token="t")
    assert unix.url("/api/v1") == "http://hv/api/v1" and unix.ssl is None
    assert unix.headers() == {"Authorization": "Bearer t"}
    tls = endpoint("tcp:h:1", fingerprint="00" * 32)
    assert tls.url("/a") == "https://h:1/a" and tls.url("/a", websocket=True) == "wss://h:1/a"
    assert tls.ssl is not None and tls.headers() == {}
    plain = endpoint("http+tcp:127.0.0.1:2")
    assert plain.url("/a", websocket=True) == "ws://127.0.0.1:2/a" and plain.ssl is None
    monkeypatch.setenv("HV_TOKEN", "from-env")
    assert endpoint("tcp:h:1", fingerprint="00" * 32).token == "from-env"


@pytest.mark.parametrize("args", [
    {"listen": ["tcp:0.0.0.0:8443"], "insecure": True},
    {"listen": ["tcp:192.0.2.1:8443"], "insecure": True},
    {"listen": ["http+tcp:[::]:8080"]},
    {"listen": ["tcp:localhost.example:8443"], "insecure": True},
])
def test_insecure_is_refused_off_loopback(tmp_path: Path, args: dict[str, object]) -> None:
    with pytest.raises(InvalidInput, match="loopback addresses only"):
        load_config(str(tmp_path), **args)  # type: ignore[arg-type]


def test_listener_options(tmp_path: Path) -> None:
    config = load_config(str(tmp_path), ["unix:/x/s.sock", "tcp:127.0.0.1:8443"])
    assert config.listen.path == "/x/s.sock" and config.tcp is not None and config.tcp.tls
    plain = load_config(str(tmp_path), ["tcp:127.0.0.1:8080"], insecure=True)
    assert plain.listen.path == str(tmp_path / "hv.sock")
    assert plain.tcp == ListenAddress("tcp", host="127.0.0.1", port=8080, tls=False)
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    for kwargs in ({"listen": ["tcp:a:1", "tcp:b:2"]},
                   {"listen": ["unix:/a", "unix:/b"]},
                   {"insecure": True},
                   {"listen": ["tcp:a:1"], "tls_cert": str(cert)},
                   {"listen": ["tcp:127.0.0.1:1"], "insecure": True, "tls_cert": str(cert),
                    "tls_key": str(cert)},
                   {"tls_cert": str(cert), "tls_key": str(cert)},
                   {"listen": ["tcp:a:1"], "tls_cert": str(cert),
                    "tls_key": str(tmp_path / "missing")}):
        with pytest.raises(InvalidInput):
            load_config(str(tmp_path), **kwargs)  # type: ignore[arg-type]


def test_service_ignores_a_tcp_hv_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HV_HOST", "tcp:0.0.0.0:8443")  # a client's setting
    config = load_config(str(tmp_path))
    assert config.listen == ListenAddress("unix", path=str(tmp_path / "hv.sock"))
    assert config.tcp is None
