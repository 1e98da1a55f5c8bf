"""The root error of hvstack and its tree.

Every error a user can cause or see derives from :class:`HvError`. Errors carry data
(the VM, its state, what was required) so the API can render them as problem+json and
the CLI as one line with exit code 2. Nothing else is caught at the boundaries.

    HvError                                                                  (500)
    ├── InvalidInput            bad names, sizes, paths, option strings      (400)
    │   ├── PathNotAllowed      a path outside the storage roots            (400)
    │   └── TooLarge            a request body over the service's limit      (413)
    ├── NotFound                a VM, disk, image or job that does not exist (404)
    ├── NotAuthenticated        no valid token on a TCP listener             (401)
    ├── AccessDenied            a foreign Origin, a peer not allowed         (403)
    ├── Conflict                                                             (409)
    │   ├── AlreadyExists       a name or file that is taken
    │   ├── InvalidState        the VM's state does not allow the operation
    │   ├── ResourceBusy        a disk in use by another running VM
    │   ├── StaleRevision       a stored record changed since it was read
    │   ├── ServiceDisabled     an integration service that is turned off
    │   ├── MeteringDisabled    resource metering of the VM is not enabled
    │   └── NetworkUnavailable  no CAP_NET_ADMIN: switches and taps refused
    ├── InsufficientResources   more memory/CPUs than the host has           (422)
    │   └── NoSpace             a host file system (or the store on it) is full (507)
    ├── OperationTimeout        something outside did not answer in time     (504)
    │   └── WaitTimedOut        ``vm wait``: the condition did not hold in time
    ├── Cancelled               a job that a user cancelled                  (409)
    ├── Interrupted             a job that a restart of the service ended     (500)
    ├── HypervisorError         QEMU or a system tool failed                 (500)
    └── InvalidTransition       a state change the state machine does not have (500)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar


class HvError(Exception):
    """Root of every hvstack error; ``data`` is JSON-safe detail for clients."""

    http_status: ClassVar[int] = 500
    slug: ClassVar[str] = "error"
    title: ClassVar[str] = "hvstack error"

    def __init__(self, message: str, **data: str | int | float | bool | list[str] | None) -> None:
        super().__init__(message)
        self.message = message
        self.data: Mapping[str, str | int | float | bool | list[str] | None] = data

    def __str__(self) -> str:
        return self.message


class InvalidInput(HvError):
    http_status = 400
    slug = "invalid-input"
    title = "Invalid input"


class PathNotAllowed(InvalidInput):
    slug = "path-not-allowed"
    title = "Path outside the storage roots"


class TooLarge(InvalidInput):
    http_status = 413
    slug = "too-large"
    title = "Request body too large"


class NotFound(HvError):
    http_status = 404
    slug = "not-found"
    title = "Not found"


class NotAuthenticated(HvError):
    http_status = 401
    slug = "not-authenticated"
    title = "Not authenticated"


class AccessDenied(HvError):
    http_status = 403
    slug = "access-denied"
    title = "Access denied"


class Conflict(HvError):
    http_status = 409
    slug = "conflict"
    title = "Conflict"


class AlreadyExists(Conflict):
    slug = "already-exists"
    title = "Already exists"


class InvalidState(Conflict):
    slug = "invalid-state"
    title = "Operation not allowed in this state"

    def __init__(self, vm: str, state: str, operation: str, required: list[str], *,
                 advice: str | None = None, already: bool = False) -> None:
        # ``operation`` is a verb phrase: "start", "change the memory of".
        if already:
            message = f"cannot {operation} VM '{vm}': it is already {state}"
        else:
            message = (f"cannot {operation} VM '{vm}' while it is {state}: "
                       f"{advice or 'it must be ' + ' or '.join(required)}")
        super().__init__(
            message,
            vm=vm,
            state=state,
            operation=operation,
            required=required,
        )


class ResourceBusy(Conflict):
    slug = "resource-busy"
    title = "Resource in use"


class StaleRevision(Conflict):
    """A compare-and-swap in the store failed: someone else changed the record first."""

    slug = "stale-revision"
    title = "Changed meanwhile"


class ServiceDisabled(Conflict):
    slug = "integration-service-disabled"
    title = "Integration service disabled"

    def __init__(self, vm: str, service: str) -> None:
        super().__init__(
            f"the {service.replace('_', ' ')} integration service of VM '{vm}' is disabled; "
            f"enable it with: hv vm set {vm} --enable {service.replace('_', '-')}",
            vm=vm, service=service,
        )


class MeteringDisabled(Conflict):
    slug = "metering-disabled"
    title = "Resource metering not enabled"

    def __init__(self, vm: str) -> None:
        super().__init__(
            f"metering is not enabled for VM '{vm}'; enable it with: "
            f"hv vm metering enable {vm}", vm=vm)


class NetworkUnavailable(Conflict):
    """The host service cannot manage bridges and taps; ``reason`` says why (the
    backend's words). User-mode NAT adapters work without it."""

    slug = "network-unavailable"
    title = "Cannot manage network devices"

    def __init__(self, doing: str, reason: str) -> None:
        super().__init__(
            f"cannot {doing}: this host service cannot manage network devices ({reason}); "
            "it needs CAP_NET_ADMIN (run hv serve as root). Adapters in user-mode NAT "
            "still work", reason=reason)


class InsufficientResources(HvError):
    http_status = 422
    slug = "insufficient-resources"
    title = "Insufficient resources"


class NoSpace(InsufficientResources):
    """A host file system is full: a disk, a saved state or the store cannot be written."""

    http_status = 507
    slug = "no-space"
    title = "No space left on the host"


class OperationTimeout(HvError):
    http_status = 504
    slug = "timeout"
    title = "Operation timed out"


class WaitTimedOut(OperationTimeout):
    slug = "wait-timeout"
    title = "Condition not met in time"


class Cancelled(HvError):
    http_status = 409
    slug = "cancelled"
    title = "Cancelled"


class Interrupted(HvError):
    slug = "interrupted"
    title = "Interrupted by a restart of the host service"


class HypervisorError(HvError):
    http_status = 500
    slug = "hypervisor-error"
    title = "Hypervisor error"


class InvalidTransition(HvError):
    """A programming error: the code tried a state change the state machine lacks."""

    http_status = 500
    slug = "invalid-transition"
    title = "Invalid state transition"


ERROR_TYPES: dict[str, type[HvError]] = {
    cls.slug: cls
    for cls in (
        HvError,
        InvalidInput,
        PathNotAllowed,
        TooLarge,
        NotFound,
        Conflict,
        AlreadyExists,
        InvalidState,
        ResourceBusy,
        NotAuthenticated,
        AccessDenied,
        ServiceDisabled,
        NetworkUnavailable,
        InsufficientResources,
        NoSpace,
        OperationTimeout,
        WaitTimedOut,
        Cancelled,
        Interrupted,
        HypervisorError,
        InvalidTransition,
    )
}
