"""``hv auth token create|list|revoke``: API tokens for the TCP listener.

A token is printed once, when created (``token`` in ``-o json``); the service keeps
only its hash. Over TCP these commands need a token themselves; over the unix socket
the caller's uid is checked instead.
"""

from __future__ import annotations

import typer
from rich.text import Text

from hvstack.cli.render import (
    HostOption,
    Output,
    OutputOption,
    client,
    console,
    err_console,
    print_json,
    table,
)
from hvstack.client import url_path

app = typer.Typer(help="Access to the API: tokens for the TCP listener.", no_args_is_help=True)
token_app = typer.Typer(help="API tokens: create, list, revoke.", no_args_is_help=True)
app.add_typer(token_app, name="token")

TOKEN_COLUMNS = [("name", "Name"), ("id", "Id"), ("created_at", "Created")]


@token_app.command("create")
def token_create(name: str, output: Output = OutputOption,
                 host: str | None = HostOption) -> None:
    """Create a token; it is printed this once and cannot be shown again."""
    with client(host) as api:
        created = api.post("/auth/tokens", {"name": name})
    if output is Output.json:
        print_json(created)
        return
    console.print(Text(created["token"]), soft_wrap=True)
    err_console.print(Text(f"token '{created['name']}' created: keep it now, it is not "
                           f"shown again (use it with --token or $HV_TOKEN)"))


@token_app.command("list")
def token_list(output: Output = OutputOption, host: str | None = HostOption) -> None:
    """List tokens (names and dates; the tokens themselves are not kept)."""
    with client(host) as api:
        tokens = api.get("/auth/tokens")
    print_json(tokens) if output is Output.json else table(tokens, TOKEN_COLUMNS)


@token_app.command("revoke")
def token_revoke(name: str, host: str | None = HostOption) -> None:
    """Revoke a token: the next request that presents it is refused."""
    with client(host) as api:
        api.request("DELETE", url_path("auth", "tokens", name))
    console.print(Text(f"token '{name}' revoked"))
