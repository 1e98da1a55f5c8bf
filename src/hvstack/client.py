"""The Python client of the host service's REST API (httpx), used by the CLI.

``Client(host, token=, fingerprint=, ca_file=)`` takes ``unix:PATH``, ``tcp:HOST:PORT``
(HTTPS) or ``http+tcp:HOST:PORT`` (default from ``$HV_HOST``, else the default socket);
the token and the server certificate's trust default from ``$HV_TOKEN``,
``$HV_FINGERPRINT`` and ``$HV_CA_FILE`` (see :mod:`hvstack.transport`). Errors come
back as :class:`ApiError` carrying the server's problem+json; a host service that cannot
be reached is :class:`ApiError` too.

Virtual switches and VM network adapters have their own methods (``create_switch``,
``add_adapter``, ...): each sends the API's typed request, every name and MAC in the
path escaped with :func:`segment`.

File copies with a guest (Copy-VMFile) are :meth:`Client.copy_to_guest` and
:meth:`Client.copy_from_guest`: each runs the two-phase protocol of ``POST
/vms/{ref}/files`` and then the data connection, with sha256 checked on this side too.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import ssl
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
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
COPY_CHUNK = 1024 * 1024
API_PREFIX = "/api/v1"
VERIFY_WAIT = 3600.0  # the service's sha256sum in the guest after an upload

# A copy's progress: (bytes sent or received so far, bytes in all). Bytes, not the
# service's (percent, message) Progress: a client counts them exactly, and a byte bar
# shows the speed.
ByteProgress = Callable[[int, int], None]


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


def _api_error(response: httpx.Response) -> ApiError:
    """The service's problem+json of a failed response (its text if it is not JSON)."""
    try:
        problem = response.json()
    except ValueError:
        problem = {"detail": response.text or response.reason_phrase}
    return ApiError(response.status_code, problem)


def _local_error(detail: str, status: int = 400) -> ApiError:
    """A copy's problem with a file on this side, in the same form as the service's."""
    return ApiError(status, {"title": "Already exists" if status == 409 else "Invalid input",
                             "detail": detail})


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(COPY_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _data_path(started: dict[str, Any]) -> str:
    url: str = started["data_url"]
    return url.removeprefix(API_PREFIX)


def local_destination(source: str, destination: str | os.PathLike[str], *,
                      create_dirs: bool = False, overwrite: bool = False) -> Path:
    """Where a copy out of a guest lands: ``destination``, or the guest file's name in
    it when it is a folder; ApiError when that is not allowed (the folder is missing
    without ``create_dirs``, made here with it; the file exists without ``overwrite``)."""
    target = Path(destination)
    if target.is_dir():
        target = target / posixpath.basename(source)
    if target.is_dir():
        raise _local_error(f"{target} is a folder")
    if target.exists() and not overwrite:
        raise _local_error(f"{target} exists; --overwrite replaces it", 409)
    if not target.parent.is_dir():
        if not create_dirs:
            raise _local_error(f"folder {target.parent} does not exist; --create-dirs "
                               "makes it")
        target.parent.mkdir(parents=True, exist_ok=True)
    return target


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
            raise _api_error(response)
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
                    raise _api_error(response)
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

    def copy_to_guest(self, ref: str, source: str | os.PathLike[str], guest_path: str, *,
                      create_dirs: bool = False, overwrite: bool = False,
                      progress: ByteProgress | None = None) -> dict[str, Any]:
        """Copy the local file ``source`` to ``guest_path`` in VM ``ref``; return the
        finished copy job (its ``result`` has the guest path, size and sha256).

        ``POST /vms/{ref}/files`` announces the size and sha256, then the bytes go in
        the body of ``PUT data_url``, which answers once the guest's sha256sum matched
        and the file is in place. ApiError: the service's refusal as it is, or (status
        0) a copy that broke off, with the job's reason when the service can say; the
        guest's destination is then untouched."""
        path = Path(source)
        if not path.is_file():
            raise _local_error(f"{source} is not a file" if path.exists()
                               else f"{source} does not exist")
        size = path.stat().st_size
        sha = _sha256(path)
        started = self.post(url_path("vms", ref, "files"), {
            "direction": "to-guest", "guest_path": guest_path, "size": size, "sha256": sha,
            "create_dirs": create_dirs, "overwrite": overwrite})

        def chunks() -> Iterator[bytes]:
            sent = 0
            with path.open("rb") as f:
                while chunk := f.read(COPY_CHUNK):
                    yield chunk
                    sent += len(chunk)
                    if progress is not None:
                        progress(sent, size)

        try:
            job: dict[str, Any] = self.request(
                "PUT", _data_path(started), content=chunks(),
                headers={"Content-Type": "application/octet-stream",
                         "Content-Length": str(size)},
                timeout=httpx.Timeout(120.0, read=VERIFY_WAIT))
        except (ApiError, httpx.HTTPError) as exc:
            if isinstance(exc, ApiError) and exc.status:
                raise  # the service's answer
            why = self._job_error(started["transfer_id"]) or str(exc)
            raise ApiError(0, {"title": "Copy broke off", "detail":
                               f"the copy to {ref}:{started['guest_path']} broke off: {why}"}
                           ) from exc
        result = job.get("result") or {}
        if result.get("sha256") != sha:
            raise ApiError(0, {"title": "Copy damaged", "detail":
                               f"the guest reports sha256 {result.get('sha256')}, the local "
                               f"file has {sha}"})
        return job

    def _job_error(self, job_id: str) -> str | None:
        """Why a copy job failed, if the service can still say (after a broken upload)."""
        try:
            job = self.get(url_path("jobs", job_id), params={"wait": 5})
        except (ApiError, httpx.HTTPError):
            return None
        detail: str | None = (job.get("error") or {}).get("detail")
        return detail

    def copy_from_guest(self, ref: str, guest_path: str, destination: str | os.PathLike[str],
                        *, create_dirs: bool = False, overwrite: bool = False,
                        progress: ByteProgress | None = None) -> dict[str, Any]:
        """Copy ``guest_path`` in VM ``ref`` to the local ``destination`` (a folder keeps
        the file's name; see :func:`local_destination`); return ``{direction, vm,
        guest_path, path, size, sha256, transfer_id}``.

        ``POST /vms/{ref}/files`` gives the guest file's size and sha256 (taken in the
        guest), then ``GET data_url`` streams it into a temporary file beside the
        destination, which gets its name only when size and sha256 match. ApiError when
        it does not, or the copy broke off; the destination is then as it was."""
        from hvstack import files  # only copies need it: hv's other commands start faster
        from hvstack.errors import AlreadyExists

        target = local_destination(guest_path, destination, create_dirs=create_dirs,
                                   overwrite=overwrite)
        started = self.post(url_path("vms", ref, "files"), {"direction": "from-guest",
                                                            "guest_path": guest_path})
        size, want = int(started["size"]), started["sha256"]
        tmp = files.temp_path(target)
        digest, received = hashlib.sha256(), 0
        try:
            with open(tmp, "xb") as out:
                with self.stream("GET", _data_path(started),
                                 timeout=httpx.Timeout(120.0)) as reply:
                    for chunk in reply.iter_bytes(COPY_CHUNK):
                        out.write(chunk)
                        digest.update(chunk)
                        received += len(chunk)
                        if progress is not None:
                            progress(received, size)
                out.flush()
                os.fsync(out.fileno())
            if received != size or digest.hexdigest() != want:
                raise ApiError(0, {"title": "Copy damaged", "detail":
                                   f"the copy of {ref}:{guest_path} is incomplete or damaged "
                                   f"({received} of {size} bytes, sha256 "
                                   f"{digest.hexdigest()}, expected {want}); {target} was "
                                   "left as it was"})
            try:
                files.publish(tmp, target, replace=overwrite)
            except AlreadyExists:
                raise _local_error(f"{target} exists; --overwrite replaces it", 409) from None
        except httpx.HTTPError as exc:
            raise ApiError(0, {"title": "Copy broke off", "detail":
                               f"the copy of {ref}:{guest_path} broke off after {received} "
                               f"of {size} bytes ({exc}); {target} was left as it was"}
                           ) from exc
        finally:
            tmp.unlink(missing_ok=True)
        return {"direction": "from-guest", "vm": ref, "guest_path": started["guest_path"],
                "path": str(target), "size": received, "sha256": want,
                "transfer_id": started["transfer_id"]}

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

    # -- dynamic memory (Set-VMMemory, Get-VMMemory) ------------------------------------

    def set_memory(self, ref: str, *, dynamic: bool | None = None,
                   startup: int | str | None = None, minimum: int | str | None = None,
                   maximum: int | str | None = None, buffer_percent: int | None = None,
                   weight: int | None = None) -> dict[str, Any]:
        """Change VM ``ref``'s memory settings (sizes in bytes or as "512M"); return its
        view. Turning dynamic memory on or off and the startup memory need the VM Off;
        while it runs the minimum may only go down and the maximum only up."""
        body = {"dynamic_memory": dynamic, "memory_startup": startup,
                "memory_minimum": minimum, "memory_maximum": maximum,
                "memory_buffer_percent": buffer_percent, "memory_weight": weight}
        result: dict[str, Any] = self.request(
            "PATCH", url_path("vms", ref),
            json={k: v for k, v in body.items() if v is not None})
        return result

    def memory(self, ref: str) -> dict[str, Any]:
        """VM ``ref``'s memory: its settings, and while it runs its assigned memory,
        the guest's demand and the memory status (with the reason)."""
        vm = self.get(url_path("vms", ref))
        return {k: v for k, v in vm.items() if k.startswith(("memory_", "dynamic_memory"))}

    def host_info(self) -> dict[str, Any]:
        """The host, with its memory: total, reserved for the host, assigned to VMs,
        available."""
        result: dict[str, Any] = self.get("/host")
        return result

    def set_processor(self, ref: str, *, reserve: int | None = None, limit: int | None = None,
                      weight: int | None = None,
                      compatibility: bool | None = None) -> dict[str, Any]:
        """Set-VMProcessor -Reserve/-Maximum/-RelativeWeight: percentages of the VM's
        processors and a weight (1-10000), in any state; a running VM's change applies at
        once. Returns the VM's view: ``processor_controls_in_force`` says whether they
        are (``processor_controls`` why not). ``compatibility``
        (-CompatibilityForMigrationEnabled): a baseline processor model, so the VM can
        move between hosts with different processors; only while the VM is Off."""
        body = _present({"processor_reserve_percent": reserve,
                         "processor_limit_percent": limit, "processor_weight": weight,
                         "processor_compatibility": compatibility})
        result: dict[str, Any] = self.request("PATCH", url_path("vms", ref), json=body)
        return result

    # -- export and import (Export-VM, Export-VMSnapshot, Import-VM) ----------------

    def export_vm(self, ref: str, path: str) -> dict[str, Any]:
        """Start exporting VM ``ref`` into ``path/<its name>``; return the job (follow it
        with :meth:`wait_job`). A running VM is exported from one point in time."""
        result: dict[str, Any] = self.post(url_path("vms", ref, "export"), {"path": path})
        return result

    def export_checkpoint(self, ref: str, checkpoint: str, path: str) -> dict[str, Any]:
        """Start exporting VM ``ref`` as it was at ``checkpoint``; return the job."""
        result: dict[str, Any] = self.post(
            url_path("vms", ref, "checkpoints", checkpoint, "export"), {"path": path})
        return result

    def check_import(self, path: str, *, mode: str = "copy", new_id: bool = False,
                     name: str | None = None, dest: str | None = None) -> dict[str, Any]:
        """What importing the export at ``path`` would find: ``problems`` (each one
        that stops it) and ``notes``; nothing is changed."""
        body = _present({"path": path, "mode": mode, "new_id": new_id, "name": name,
                         "dest": dest})
        result: dict[str, Any] = self.post("/imports/check", body)
        return result

    def import_vm(self, path: str, *, mode: str = "copy", new_id: bool = False,
                  name: str | None = None, dest: str | None = None) -> dict[str, Any]:
        """Start importing the export at ``path`` (``mode`` copy or register); return the
        job. ApiError 400 listing every problem if the check fails."""
        body = _present({"path": path, "mode": mode, "new_id": new_id, "name": name,
                         "dest": dest})
        result: dict[str, Any] = self.post("/imports", body)
        return result

    # -- virtual switches and network adapters -------------------------------------

    def list_switches(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.get("/switches")
        return result

    def get_switch(self, ref: str) -> dict[str, Any]:
        result: dict[str, Any] = self.get(url_path("switches", ref))
        return result

    def create_switch(self, name: str, type: str, *, adapter: str | None = None,
                      subnet: str | None = None, host_address: str | None = None,
                      notes: str = "") -> dict[str, Any]:
        """New-VMSwitch: ``type`` external (``adapter``), internal, private or nat."""
        body = {"name": name, "type": type, "adapter": adapter, "subnet": subnet,
                "host_address": host_address, "notes": notes}
        result: dict[str, Any] = self.post("/switches", _present(body))
        return result

    def update_switch(self, ref: str, *, name: str | None = None, notes: str | None = None,
                      host_address: str | None = None) -> dict[str, Any]:
        body = _present({"name": name, "notes": notes, "host_address": host_address})
        result: dict[str, Any] = self.request("PATCH", url_path("switches", ref), json=body)
        return result

    def delete_switch(self, ref: str, force: bool = False) -> dict[str, Any]:
        """Delete a switch; one in use only with ``force`` (its ports disconnected)."""
        result: dict[str, Any] = self.request("DELETE", url_path("switches", ref),
                                              params={"force": str(force).lower()})
        return result

    def add_nat_mapping(self, ref: str, protocol: str, external_port: int, internal_ip: str,
                        internal_port: int) -> dict[str, Any]:
        """Add-NetNatStaticMapping on NAT switch ``ref``."""
        result: dict[str, Any] = self.post(url_path("switches", ref, "mappings"), {
            "protocol": protocol, "external_port": external_port,
            "internal_ip": internal_ip, "internal_port": internal_port})
        return result

    def remove_nat_mapping(self, ref: str, protocol: str, external_port: int) -> dict[str, Any]:
        result: dict[str, Any] = self.request(
            "DELETE", url_path("switches", ref, "mappings", protocol, str(external_port)))
        return result

    def list_adapters(self, vm: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.get(url_path("vms", vm, "adapters"))
        return result

    def add_adapter(self, vm: str, **fields: Any) -> dict[str, Any]:
        """Add-VMNetworkAdapter; ``fields`` as the API's AdapterBody (switch, mac,
        vlan, bandwidth_max, ...). Returns the VM."""
        result: dict[str, Any] = self.post(url_path("vms", vm, "adapters"), _present(fields))
        return result

    def update_adapter(self, vm: str, mac: str, /, **fields: Any) -> dict[str, Any]:
        """Connect (``switch=NAME``), disconnect (``switch=""``) or change the port
        settings of the adapter with MAC ``mac`` (``mac=`` in ``fields`` gives it a new
        one: the parameters before ``/`` are positional). Returns the VM."""
        result: dict[str, Any] = self.request("PATCH", url_path("vms", vm, "adapters", mac),
                                              json=_present(fields))
        return result

    def remove_adapter(self, vm: str, mac: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request("DELETE", url_path("vms", vm, "adapters", mac))
        return result

    def move_storage(self, ref: str, destination: str, disks: list[str] | None = None, *,
                     include_checkpoints: bool = True, bandwidth: int | str | None = None,
                     wait: bool = True) -> dict[str, Any]:
        """Move-VMStorage: move VM ``ref``'s disks (all, or those at ``disks``) into the
        folder ``destination`` while it runs. Returns the job (followed to its end
        unless ``wait`` is false)."""
        job: dict[str, Any] = self.post(url_path("vms", ref, "move-storage"), _present({
            "destination": destination, "disks": disks or [],
            "include_checkpoints": include_checkpoints, "bandwidth": bandwidth}))
        return self.wait_job(job) if wait else job


    # -- resource metering ----------------------------------------------------------

    def enable_metering(self, vm: str) -> dict[str, Any]:
        """Enable-VMResourceMetering (nothing changes if it is enabled); returns the
        totals."""
        result: dict[str, Any] = self.post(url_path("vms", vm, "metering", "enable"))
        return result

    def measure_vm(self, vm: str) -> dict[str, Any]:
        """Measure-VM: CPU, memory, disk and network totals since metering was enabled
        or last reset (ApiError 409 ``metering-disabled`` while it is not enabled)."""
        result: dict[str, Any] = self.get(url_path("vms", vm, "metering"))
        return result

    def reset_metering(self, vm: str) -> dict[str, Any]:
        """Reset-VMResourceMetering: the totals start again from now."""
        result: dict[str, Any] = self.post(url_path("vms", vm, "metering", "reset"))
        return result

    def disable_metering(self, vm: str) -> dict[str, Any]:
        """Disable-VMResourceMetering: returns the last totals, which are dropped."""
        result: dict[str, Any] = self.post(url_path("vms", vm, "metering", "disable"))
        return result

    def metrics(self) -> str:
        """The service's Prometheus exposition (``GET /metrics``) as text."""
        text: str = self.request("GET", self.endpoint.url("/metrics"))
        return text

    # -- checkpoints ----------------------------------------------------------------

    def list_checkpoints(self, vm: str) -> dict[str, Any]:
        """Get-VMCheckpoint: the VM's checkpoints (oldest first) and ``current``, the
        one its current state follows."""
        result: dict[str, Any] = self.get(url_path("vms", vm, "checkpoints"))
        return result

    def get_checkpoint(self, vm: str, checkpoint: str) -> dict[str, Any]:
        result: dict[str, Any] = self.get(url_path("vms", vm, "checkpoints", checkpoint))
        return result

    def create_checkpoint(self, vm: str, name: str | None = None, *,
                          wait: bool = True) -> dict[str, Any]:
        """Checkpoint-VM: returns the finished job (its result names the checkpoint),
        or the started one without ``wait``."""
        job: dict[str, Any] = self.post(url_path("vms", vm, "checkpoints"),
                                        _present({"name": name}))
        return self.wait_job(job) if wait else job

    def apply_checkpoint(self, vm: str, checkpoint: str, *, save_current: bool = False,
                         wait: bool = True) -> dict[str, Any]:
        """Restore-VMCheckpoint: the VM's unsaved current state is lost unless
        ``save_current`` checkpoints it first. Returns the (finished) job."""
        job: dict[str, Any] = self.post(url_path("vms", vm, "checkpoints", checkpoint, "apply"),
                                        {"save_current": save_current})
        return self.wait_job(job) if wait else job

    def rename_checkpoint(self, vm: str, checkpoint: str, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request(
            "PATCH", url_path("vms", vm, "checkpoints", checkpoint), json={"name": name})
        return result

    def delete_checkpoint(self, vm: str, checkpoint: str, *, subtree: bool = False,
                          wait: bool = True) -> dict[str, Any]:
        """Remove-VMCheckpoint (``subtree``: with every checkpoint below it); its data
        is merged so nothing else changes. Returns the (finished) merge job."""
        job: dict[str, Any] = self.request(
            "DELETE", url_path("vms", vm, "checkpoints", checkpoint),
            params={"subtree": str(subtree).lower()})
        return self.wait_job(job) if wait else job


def _present(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if v is not None}
