"""Request bodies: capped before they are parsed, and only text that is valid Unicode.

:class:`BodyGuard` is an ASGI middleware in front of every HTTP route except those whose
endpoint is marked with :func:`streams_body` (uploads: they stream with their own limit):

* a body larger than ``limit`` bytes is refused with 413 problem+json: by its
  Content-Length before a byte is read, and, for a chunked body, as soon as the bytes
  received pass the limit; nothing past the limit is buffered;
* a JSON body holding a lone surrogate (``"\\ud800"``, which JSON can spell but UTF-8
  cannot hold) anywhere, in a key or a value, is refused with 400 before any route sees
  it, so nothing is stored; so is a body nested too deeply to parse.

Paths and query strings need no check here: the server percent-decodes them with
U+FFFD for bytes that are not UTF-8, so they never carry a surrogate. A body that passed
is handed on to the app unchanged.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hvstack.api.problems import problem_response
from hvstack.errors import HvError, InvalidInput, TooLarge

DEFAULT_LIMIT = 1024 * 1024
_STREAMS_BODY = "__hv_streams_body__"
F = TypeVar("F", bound=Callable[..., Any])


def streams_body(endpoint: F) -> F:
    """Mark a route that reads its body as a stream, with its own size limit."""
    setattr(endpoint, _STREAMS_BODY, True)
    return endpoint


def is_streaming(endpoint: Callable[..., Any]) -> bool:
    return bool(getattr(endpoint, _STREAMS_BODY, False))


Exempt = tuple[re.Pattern[str], frozenset[str]]


class BodyGuard:
    def __init__(self, app: ASGIApp, limit: int = DEFAULT_LIMIT,
                 exempt: Sequence[Exempt] = ()) -> None:
        self.app = app
        self.limit = limit
        self.exempt = list(exempt)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._exempt(scope):
            await self.app(scope, receive, send)
            return
        try:
            body = await self._read(scope, receive)
            _check_text(body)
        except HvError as exc:
            await problem_response(exc)(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)

    def _exempt(self, scope: Scope) -> bool:
        path, method = scope["path"], scope["method"]
        return any(regex.match(path) and method in methods for regex, methods in self.exempt)

    async def _read(self, scope: Scope, receive: Receive) -> bytes:
        declared = _content_length(scope)
        if declared is not None and declared > self.limit:
            raise self._too_large(f"{declared} bytes")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                raise self._too_large("more")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    def _too_large(self, what: str) -> TooLarge:
        return TooLarge(
            f"the request body has {what} than the limit of {self.limit} bytes"
            if what == "more" else
            f"the request body has {what}, more than the limit of {self.limit} bytes",
            limit=self.limit,
        )


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # later: the disconnect, as from the server

    return replay


def _check_text(body: bytes) -> None:
    # A surrogate reaches Python only through a \u escape or CESU-8 bytes (json.loads
    # decodes bytes with surrogatepass): without either, there is nothing to parse.
    if not body or (b"\\u" not in body and b"\xed" not in body):
        return
    try:
        value = json.loads(body)
    except RecursionError:
        raise InvalidInput("the request body is nested too deeply") from None
    except ValueError:
        return  # not JSON: the route's own parsing says what is wrong
    where = _surrogate_at(value, ())
    if where is not None:
        shown = ".".join(where) or "the body"
        raise InvalidInput(
            f"{shown}: text holds a lone surrogate (such as \\ud800), which is not a "
            "character; send valid Unicode", field=shown,
        )


def _bad(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _surrogate_at(value: object, path: tuple[str, ...]) -> tuple[str, ...] | None:
    """The path of the first string (key or value) in ``value`` that is not Unicode."""
    stack: list[tuple[object, tuple[str, ...]]] = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            if _bad(item):
                return where
        elif isinstance(item, dict):
            for key, sub in item.items():
                if _bad(key):
                    return (*where, key.encode("utf-8", "backslashreplace").decode())
                stack.append((sub, (*where, key)))
        elif isinstance(item, list):
            stack.extend((sub, (*where, str(i))) for i, sub in enumerate(item))
    return None


def exempt_routes(routes: Iterable[Any]) -> list[Exempt]:
    """The (path pattern, methods) of the routes marked with :func:`streams_body`."""
    found = []
    for route in routes:
        endpoint = getattr(route, "endpoint", None)
        if endpoint is not None and is_streaming(endpoint):
            found.append((route.path_regex, frozenset(route.methods or ())))
    return found
