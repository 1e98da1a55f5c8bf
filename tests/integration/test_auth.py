"""Authentication and file permissions of a real ``hv serve``: TLS with the self-signed
certificate and fingerprint pinning, tokens and their revocation, the Origin rule on
HTTP and WebSocket, ``--insecure`` only on loopback, the unix socket's peer check,
private files, and a socket path that never replaces a file."""

from __future__ import annotations

import asyncio
import grp
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from hvstack.client import ApiError, Client
from hvstack.console_client import open_websocket
from hvstack.host.config import load_config
from hvstack.transport import parse_fingerprint, pinned_context
from tests.integration.hostproc import HV, HostProcess

NOBODY = 65534


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def fingerprint_in(log: str) -> str:
    match = re.search(r"HV_FINGERPRINT=([0-9A-F]{64})", log)
    assert match, log
    return match.group(1)


@pytest.fixture
def tls_host(tmp_path: Path) -> Iterator[tuple[HostProcess, str]]:
    address = f"tcp:127.0.0.1:{free_port()}"
    service = HostProcess(tmp_path / "data", ("--listen", address))
    service.start()
    try:
        yield service, address
    finally:
        service.stop()


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_tls_tokens_and_revocation(tls_host: tuple[HostProcess, str]) -> None:
    host, address = tls_host
    pin = fingerprint_in(host.log.read_text())
    # the printed fingerprint is the certificate's, in the form clients take
    assert parse_fingerprint(pin) == bytes.fromhex(pin)

    with pytest.raises(ApiError, match="TLS with the host service"), Client(address) as api:
        api.get("/host")  # a self-signed certificate is not trusted by default
    with pytest.raises(ApiError, match="pinned"), \
            Client(address, fingerprint="00" * 32) as api:
        api.get("/host")
    with Client(address, fingerprint=pin) as api, pytest.raises(ApiError) as no_token:
        api.get("/host")
    assert no_token.value.status == 401

    # tokens are made over the unix socket, where the peer check is the authentication
    created = host.json("auth", "token", "create", "ci")
    token = created["token"]
    with Client(address, token=token, fingerprint=pin) as api:
        assert api.get("/host")["version"]
    with Client(address, token=token, ca_file=str(host.data_dir / "tls" / "cert.pem")) as api:
        assert api.get("/vms") == []

    # the CLI over TCP: HV_TOKEN and HV_FINGERPRINT, or the options before the command
    env = {**host.env, "HV_HOST": address, "HV_FINGERPRINT": pin, "HV_TOKEN": token}
    run = subprocess.run([*HV, "auth", "token", "create", "other", "-o", "json"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    other = json.loads(run.stdout)["token"]
    cli_env = {**host.env, "HV_HOST": address}
    run = subprocess.run([*HV, "--token", other, "--fingerprint", pin, "vm", "list"],
                         env=cli_env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    run = subprocess.run([*HV, "vm", "list"], env={**cli_env, "HV_FINGERPRINT": pin},
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "needs a token" in run.stderr

    # revocation holds from the very next request, on a connection kept open
    with Client(address, token=token, fingerprint=pin) as api:
        assert api.get("/host")
        run = subprocess.run([*HV, "auth", "token", "revoke", "ci"], env={**env,
                             "HV_TOKEN": other}, capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        with pytest.raises(ApiError) as revoked:
            api.get("/host")
        assert revoked.value.status == 401
    names = [t["name"] for t in host.json("auth", "token", "list")]
    assert names == ["other"]


def test_origin_rule_on_http_and_websocket(tls_host: tuple[HostProcess, str]) -> None:
    host, address = tls_host
    pin = fingerprint_in(host.log.read_text())
    token = host.json("auth", "token", "create", "web")["token"]
    base = "https://" + address.removeprefix("tcp:")
    auth = {"Authorization": f"Bearer {token}"}
    with httpx.Client(verify=pinned_context(bytes.fromhex(pin)), base_url=base) as web:
        evil = web.get("/api/v1/host", headers={**auth, "Origin": "https://evil.example"})
        assert evil.status_code == 403 and evil.json()["type"] == "/problems/access-denied"
        assert web.get("/api/v1/host", headers={**auth, "Origin": base}).status_code == 200
    # the unix socket refuses a foreign origin too
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(host.socket))) as local:
        assert local.get("http://hv/api/v1/host",
                         headers={"Origin": "https://evil.example"}).status_code == 403

    async def websockets() -> None:
        url = "wss://" + address.removeprefix("tcp:") + "/api/v1/vms/none/console"
        context = pinned_context(bytes.fromhex(pin))
        for headers, origin, status in (({}, None, 401),
                                        (auth, "https://evil.example", 403)):
            with pytest.raises(InvalidStatus) as refused:
                async with connect(url, ssl=context, additional_headers=headers,
                                   origin=origin, open_timeout=30):  # type: ignore[arg-type]
                    pass
            assert refused.value.response.status_code == status
        # with the token, the request reaches the route (which finds no such VM)
        with pytest.raises(ApiError) as missing:
            async with open_websocket(address, "/vms/none/console", token=token,
                                      fingerprint=pin):
                pass
        assert missing.value.status == 404
        with pytest.raises(ApiError) as anonymous:
            async with open_websocket(address, "/vms/none/console", fingerprint=pin):
                pass
        assert anonymous.value.status == 401

    asyncio.run(websockets())
    assert " ERROR " not in host.log.read_text()  # a refusal is not a service error


def serve_fails(tmp_path: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("HV_HOST", "HV_DATA_DIR")}
    run = subprocess.run([*HV, "serve", "--data-dir", str(tmp_path / "data"), *args],
                         env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run.stdout + run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    return lines[0]


def test_insecure_only_on_loopback(tmp_path: Path) -> None:
    port = free_port()
    for listen in (f"tcp:0.0.0.0:{port}", f"tcp:[::]:{port}"):
        message = serve_fails(tmp_path, "--listen", listen, "--insecure")
        assert "allowed on loopback addresses only" in message
    with socket.socket() as probe:
        probe.bind(("0.0.0.0", port))  # nothing was left listening on it

    address = f"tcp:127.0.0.1:{free_port()}"
    host = HostProcess(tmp_path / "plain", ("--listen", address, "--insecure"))
    host.start()
    try:
        plain = "http+" + address
        with Client(plain) as api, pytest.raises(ApiError) as no_token:
            api.get("/host")
        assert no_token.value.status == 401  # plain HTTP still needs a token
        token = host.json("auth", "token", "create", "local")["token"]
        with Client(plain, token=token) as api:
            assert api.get("/vms") == []
        with Client(address, token=token) as api, pytest.raises(ApiError, match="TLS"):
            api.get("/vms")  # tcp: means TLS; plain HTTP only when the address says so
    finally:
        host.stop()


def test_file_modes_after_start_up(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "vms" / "old").mkdir(parents=True)
    os.chmod(data, 0o755)
    os.chmod(data / "vms", 0o755)
    (data / "vms" / "old" / "vm.json").write_text("{}")
    os.chmod(data / "vms" / "old" / "vm.json", 0o644)
    host = HostProcess(data)
    host.start()
    try:
        host.ok("disk", "create", str(data / "new.qcow2"), "--size", "1M")
        config = load_config(str(data))
        try:
            group = grp.getgrnam("hvstack").gr_gid if os.geteuid() == 0 else os.getegid()
        except KeyError:
            group = os.getegid()
        assert mode(data) == 0o750 and os.stat(data).st_gid == group
        assert mode(data / "hv.sock") == 0o660 and os.stat(data / "hv.sock").st_gid == group
        for private in ("hvstack.db", "vms/old/vm.json", "new.qcow2", "hv.lock"):
            assert mode(data / private) == 0o600, private
        assert mode(data / "vms") == 0o700
        assert mode(config.run_dir) == 0o700 and config.run_dir.owner() == \
            Path("/proc/self").owner()
    finally:
        host.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make another user's directory")
def test_run_dir_made_by_someone_else_is_not_trusted(tmp_path: Path) -> None:
    run_dir = load_config(str(tmp_path / "data")).run_dir
    run_dir.mkdir(mode=0o700)
    try:
        os.chown(run_dir, NOBODY, NOBODY)
        message = serve_fails(tmp_path)
        assert "refusing to use the runtime directory" in message
        assert run_dir.owner() == "nobody" or run_dir.stat().st_uid == NOBODY
    finally:
        shutil.rmtree(run_dir)


def test_listen_on_a_regular_file_is_refused(tmp_path: Path) -> None:
    victim = tmp_path / "notes.txt"
    victim.write_text("precious")
    message = serve_fails(tmp_path, "--listen", f"unix:{victim}")
    assert "is not a socket" in message
    assert victim.read_text() == "precious" and victim.is_file()


def _request(path: str) -> str:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(path)
        except OSError as exc:
            return f"refused {exc.errno}"
        s.sendall(b"GET /api/v1/vms HTTP/1.1\r\nHost: hv\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data.split(b"\r\n", 1)[0].decode()


def as_user(uid: int, gid: int, path: str) -> str:
    """``_request(path)`` from a forked child running as ``uid``/``gid`` (no other
    groups): the peer credentials the service sees are that child's."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            os.write(write_end, _request(path).encode())
        except BaseException as exc:
            os.write(write_end, f"child failed: {exc!r}".encode())
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        answer = reader.read().decode()
    os.waitpid(pid, 0)
    return answer


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as other users")
def test_unix_socket_peer_check(tmp_path: Path) -> None:
    public = Path(tempfile.mkdtemp(prefix="hv-peer-"))  # nobody can reach into tmp_path
    os.chmod(public, 0o755)
    sock = public / "hv.sock"
    host = HostProcess(tmp_path / "data", ("--listen", f"unix:{sock}"))
    host.env["HV_HOST"] = f"unix:{sock}"
    host.start()
    member = grp.getgrnam("hvstack").gr_gid

    try:
        assert as_user(NOBODY, NOBODY, str(sock)) == "refused 13"  # the socket's mode
        os.chmod(sock, 0o666)  # a mode mistake: the peer check still refuses
        assert as_user(NOBODY, NOBODY, str(sock)) == "HTTP/1.1 403 Forbidden"
        assert as_user(NOBODY, member, str(sock)) == "HTTP/1.1 200 OK"  # a member may
        assert "refused a connection on the unix socket from uid 65534" in \
            host.log.read_text()
    finally:
        host.stop()
        shutil.rmtree(public)
