"""How the CLI reaches the service beyond ``--host``: ``--token``, ``--fingerprint`` and
``--ca-file``, given before the command (``hv --token T vm list``).

The root callback sets :data:`current_connection` on every invocation; every command's
client (:func:`hvstack.cli.render.client`, the console) reads it. None falls back to the
environment variable (``HV_TOKEN``, ``HV_FINGERPRINT``, ``HV_CA_FILE``).
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass


@dataclass(frozen=True)
class Connection:
    token: str | None = None
    fingerprint: str | None = None
    ca_file: str | None = None


current_connection: ContextVar[Connection] = ContextVar(
    "hv_connection", default=Connection())  # noqa: B039 (frozen: not mutable)
