"""Running ``hv`` in a thread against a host service served in-process (guest tests)."""

from __future__ import annotations

import asyncio

from typer.testing import CliRunner, Result

from hvstack.cli.main import app

runner = CliRunner()


async def hv(host: str, *args: str, stdin: str | None = None) -> Result:
    def invoke() -> Result:
        return runner.invoke(app, list(args), env={"HV_HOST": host}, input=stdin)

    return await asyncio.to_thread(invoke)
