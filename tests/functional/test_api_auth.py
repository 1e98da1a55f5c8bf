"""The listener guard in front of the app (tokens, Origin) and the token routes, in
process; the same rules over a real TLS listener are in tests/integration/test_auth.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from hvstack.api.app import create_app
from hvstack.api.guard import ListenerGuard
from hvstack.cli.main import app as cli
from hvstack.host.auth import TokenStore
from hvstack.host.root import HostRoot
from hvstack.host.service import HostService
from tests.functional.fakes import assert_problem, serve_on_unix_socket

OWN = "https://127.0.0.1:8443"


@pytest.fixture
def tokens(tmp_path: Path) -> TokenStore:
    return TokenStore(tmp_path / "tokens.db")


@pytest.fixture
async def tcp(service: HostService, tokens: TokenStore) -> AsyncIterator[httpx.AsyncClient]:
    """The app as the TCP listener serves it: a token on every request."""
    guarded = ListenerGuard(create_app(HostRoot(service), tokens=tokens), tokens=tokens,
                            own_origins=[OWN])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=guarded),
                                 base_url="https://127.0.0.1:8443/api/v1") as client:
        yield client


@pytest.fixture
async def local(service: HostService, tokens: TokenStore) -> AsyncIterator[httpx.AsyncClient]:
    """The app as the unix socket serves it: no token, Origin still checked."""
    guarded = ListenerGuard(create_app(HostRoot(service), tokens=tokens), tokens=None,
                            own_origins=[OWN])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=guarded),
                                 base_url="http://hv/api/v1") as client:
        yield client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_tcp_needs_a_valid_token(tcp: httpx.AsyncClient, tokens: TokenStore) -> None:
    response = await tcp.get("/vms")
    assert_problem(response, 401, "not-authenticated")
    assert response.headers["www-authenticate"] == "Bearer"
    for header in ("Bearer", "Bearer  ", "Basic abc", "hvt_x", "Bearer hvt_0_0"):
        assert_problem(await tcp.get("/vms", headers={"Authorization": header}), 401,
                       "not-authenticated")
    token = tokens.create("ci").token
    assert (await tcp.get("/vms", headers=bearer(token))).status_code == 200
    assert (await tcp.get("/vms", headers={"authorization": f"bearer {token}"})
            ).status_code == 200
    assert_problem(await tcp.get("/openapi.json"), 401, "not-authenticated")


async def test_token_routes_and_revocation(tcp: httpx.AsyncClient, tokens: TokenStore) -> None:
    admin = bearer(tokens.create("admin").token)
    created = await tcp.post("/auth/tokens", json={"name": "ci"}, headers=admin)
    assert created.status_code == 201, created.text
    body = created.json()
    assert set(body) == {"id", "name", "created_at", "token"} and body["name"] == "ci"
    ci = bearer(body["token"])
    assert (await tcp.get("/host", headers=ci)).status_code == 200
    listed = (await tcp.get("/auth/tokens", headers=ci)).json()
    assert [t["name"] for t in listed] == ["admin", "ci"]
    assert all("token" not in t for t in listed)
    assert_problem(await tcp.post("/auth/tokens", json={"name": "ci"}, headers=admin),
                   409, "already-exists")
    assert_problem(await tcp.post("/auth/tokens", json={"name": "a b"}, headers=admin),
                   400, "invalid-input")
    assert (await tcp.delete("/auth/tokens/ci", headers=admin)).status_code == 204
    assert_problem(await tcp.get("/host", headers=ci), 401, "not-authenticated")
    assert_problem(await tcp.delete("/auth/tokens/ci", headers=admin), 404, "not-found")
    # a token may revoke itself; its next request is refused
    assert (await tcp.delete("/auth/tokens/admin", headers=admin)).status_code == 204
    assert_problem(await tcp.get("/host", headers=admin), 401, "not-authenticated")


async def test_foreign_origin_is_refused(tcp: httpx.AsyncClient, local: httpx.AsyncClient,
                                        tokens: TokenStore) -> None:
    token = bearer(tokens.create("web").token)
    for origin in ("https://evil.example", "null", "http://127.0.0.1:8443",
                   "https://127.0.0.1:8444", "https://localhost:8443"):
        assert_problem(await tcp.get("/host", headers={**token, "Origin": origin}), 403,
                       "access-denied")
        assert_problem(await local.get("/host", headers={"Origin": origin}), 403,
                       "access-denied")
    # the Origin check comes first: no token and a foreign origin is 403, not 401
    assert_problem(await tcp.get("/host", headers={"Origin": "https://evil.example"}), 403,
                   "access-denied")
    for own in (OWN, OWN + "/", "HTTPS://127.0.0.1:8443"):
        assert (await tcp.get("/host", headers={**token, "Origin": own})).status_code == 200
        assert (await local.get("/host", headers={"Origin": own})).status_code == 200


async def test_unix_listener_needs_no_token(local: httpx.AsyncClient) -> None:
    assert (await local.get("/vms")).status_code == 200
    created = await local.post("/auth/tokens", json={"name": "t"})
    assert created.status_code == 201


async def test_cli_token_commands(service: HostService, tokens: TokenStore,
                                  tmp_path: Path) -> None:
    guarded = ListenerGuard(create_app(HostRoot(service), tokens=tokens), tokens=None)
    runner = CliRunner()
    async with serve_on_unix_socket(guarded, tmp_path / "hv.sock") as host:
        env = {"HV_HOST": host}

        def hv(*args: str) -> tuple[int, str, str]:
            result = runner.invoke(cli, list(args), env=env)
            return result.exit_code, result.stdout, result.stderr

        code, out, err = await asyncio.to_thread(hv, "auth", "token", "create", "ci")
        assert code == 0, err
        token = out.strip()
        assert tokens.verify(token) is not None and "not shown again" in err
        code, out, _ = await asyncio.to_thread(hv, "auth", "token", "list")
        assert code == 0 and "ci" in out and token not in out
        code, out, _ = await asyncio.to_thread(hv, "auth", "token", "create", "j", "-o", "json")
        assert code == 0 and '"token": "hvt_' in out
        code, out, _ = await asyncio.to_thread(hv, "auth", "token", "revoke", "ci")
        assert code == 0 and "revoked" in out and tokens.verify(token) is None
        code, _, err = await asyncio.to_thread(hv, "auth", "token", "revoke", "ci")
        assert code == 2 and err.strip() == "error: there is no token named 'ci'"
