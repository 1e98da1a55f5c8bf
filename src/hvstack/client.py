"""The Python client of the host service's REST API (httpx), used by the CLI.

``Client(host, token=, fingerprint=, ca_file=)`` takes ``unix:PATH``, ``tcp:HOST:PORT``
(HTTPS) or ``http+tcp:HOST:PORT`` (default from ``$HV_HOST``, else the default socket);
the token and the server certificate's trust default from ``$HV_TOKEN``,
``$HV_FINGERPRINT`` and ``$HV_CA_FILE`` (see :mod:`hvstack.transport`). Errors come
back as :class:`ApiError` carrying the server's problem+json; a host service that cannot
be reached is :class:`ApiError` too.
"""

from __future__ import annotations

import ssl
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote


def _import_httpx_without_its_cli() -> None:
    """Import httpx without ``httpx._main``, its own command line tool, which its package
    imports when click and rich are installed (they are, for hv): about 40 ms of every
    hv command. A ``None`` in sys.modules makes that one import fail, which httpx
    expects (it then defines a stub ``httpx.main``); the entry is removed afterwards, so
    ``import httpx._main`` works as usual later."""
    if "httpx" in sys.modules or "httpx._main" in sys.modules:
        return
    sys.modules["httpx._main"] = None  # type: ignore[assignment]
    try:
        import httpx  # noqa: F401
    finally:
        sys.modules.pop("httpx._main", None)


_import_httpx_without_its_cli()

import httpx  # noqa: E402

from hvstack.transport import endpoint  # noqa: E402

WAIT_CHUNK = 3600.0  # one long poll of wait_vm when it waits without a limit


def segment(value: str) -> str:
    """``value`` percent-encoded as one URL path segment: '/', '%', '?', '#' and every
    other reserved character are escaped, so a name can never reach another object.
    '.' and '..' are escaped too: URL normalization would remove them as dot-segments."""
    if value in (".", ".."):
        return value.replace(".", "%2E")
    return quote(value, safe="")


def url_path(*parts: str) -> str:
    """``/PART/PART...`` with each part escaped by :func:`segment`: ``url_path("vms",
    name, "start")``. Build every path that holds a name or an id with it. An empty
    part would name another route (``/vms//start``): it is :class:`ApiError` 400."""
    if not all(parts):
        raise ApiError(400, {"title": "Invalid input",
                             "detail": "a name or id must not be empty"})
    return "".join("/" + segment(part) for part in parts)


class ApiError(Exception):
    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        self.status = status
        self.problem = problem
        super().__init__(str(problem.get("detail") or problem.get("title") or status))


def unreachable(address: str, exc: BaseException) -> ApiError:
    """The error for a service that cannot be reached, or whose certificate is not
    trusted (then saying how to trust it)."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, ssl.SSLError):
        cause = cause.__cause__ or cause.__context__
    if cause is not None:
        reason = cause.args[0] if len(cause.args) == 1 else cause
        return ApiError(0, {"title": "TLS failed", "detail":
                            f"TLS with the host service at {address} failed ({reason}); "
                            f"trust its certificate with --fingerprint or $HV_FINGERPRINT "
                            f"(hv serve prints it) or $HV_CA_FILE"})
    return ApiError(0, {"title": "Cannot connect", "detail":
                        f"cannot reach the host service at {address}: is 'hv serve' "
                        f"running? ({exc or type(exc).__name__})"})


class Client:
    def __init__(self, host: str | None = None, timeout: float = 120.0, *,
                 token: str | None = None, fingerprint: str | None = None,
                 ca_file: str | None = None) -> None:
        self.endpoint = endpoint(host, token, fingerprint, ca_file)
        self.address = self.endpoint.address
        transport = httpx.HTTPTransport(**self.endpoint.httpx_options())
        self._http = httpx.Client(transport=transport, base_url=self.endpoint.url("/api/v1"),
                                  headers=self.endpoint.headers(), timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except (httpx.ConnectError, httpx.RemoteProtocolError, FileNotFoundError) as exc:
            raise unreachable(str(self.address), exc) from exc
        except httpx.TimeoutException as exc:
            raise ApiError(0, {"title": "Timeout", "detail":
                               f"the host service at {self.address} did not answer in time"}
                           ) from exc
        if response.status_code >= 400:
            try:
                problem = response.json()
            except ValueError:
                problem = {"detail": response.text or response.reason_phrase}
            raise ApiError(response.status_code, problem)
        if response.headers.get("content-type", "").startswith("application/json"):
            return response.json()
        return response.text

    @contextmanager
    def stream(self, method: str, path: str, **kwargs: Any) -> Iterator[httpx.Response]:
        """A response whose body is read as it arrives (``iter_bytes``). Errors before
        the body are ApiError; a body that breaks off raises httpx.HTTPError."""
        try:
            with self._http.stream(method, path, **kwargs) as response:
                if response.status_code >= 400:
                    response.read()
                    try:
                        problem = response.json()
                    except ValueError:
                        problem = {"detail": response.text or response.reason_phrase}
                    raise ApiError(response.status_code, problem)
                yield response
        except (httpx.ConnectError, FileNotFoundError) as exc:
            raise unreachable(str(self.address), exc) from exc

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, body: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        return self.request("POST", path, json=body, **kwargs)

    def wait_job(self, job: dict[str, Any],
                 on_progress: Callable[[dict[str, Any]], None] | None = None,
                 timeout: float | None = None) -> dict[str, Any]:
        """Follow a job until it ends; return its final view, raise ApiError if it failed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while job["state"] == "running":
            if deadline is not None and time.monotonic() > deadline:
                raise ApiError(0, {"detail": f"job {job['id']} is still running"})
            job = self.get(url_path("jobs", job["id"]), params={"wait": 0.5})
            if on_progress:
                on_progress(job)
        if job["state"] != "completed":
            error = job.get("error") or {"detail": f"job {job['state']}"}
            raise ApiError(int(error.get("status", 500)), error)
        return job

    def discard_saved_state(self, ref: str) -> dict[str, Any]:
        """Turn a Saved VM Off without starting it (its saved memory is deleted);
        return the finished job. Hyper-V's Remove-VMSavedState."""
        job = self.post(url_path("vms", ref, "stop"), {"mode": "discard-saved-state"})
        return self.wait_job(job)

    def wait_vm(self, ref: str, condition: str, timeout: float | None = None
                ) -> dict[str, Any]:
        """Block until the VM meets ``condition`` (heartbeat, ip, running, off) and
        return the server's view of it; ApiError with problem type
        ``/problems/wait-timeout`` (504) if ``timeout`` seconds pass first. Without a
        timeout it waits for good, one long poll of :data:`WAIT_CHUNK` after another."""
        path = url_path("vms", ref, "wait")
        while True:
            chunk = WAIT_CHUNK if timeout is None else timeout
            try:
                result: dict[str, Any] = self.request(
                    "GET", path, params={"for": condition, "timeout": chunk},
                    timeout=httpx.Timeout(chunk + 30.0, connect=10.0))
                return result
            except ApiError as exc:
                if timeout is None and exc.problem.get("type") == "/problems/wait-timeout":
                    continue
                raise
