"""The FastAPI application: ``create_app(root)`` wires routes and error rendering.

The API only routes: the host service and its operation objects are built and closed
by the composition root (:class:`~hvstack.host.root.HostRoot`) that whoever created
it (``hv serve`` or a test) owns; the app holds a reference and never starts or stops
it. Access checks wrap the app per
listener (:class:`hvstack.api.guard.ListenerGuard`); the token store is given by
``hv serve`` (an in-memory one otherwise).
"""

from __future__ import annotations

from fastapi import FastAPI

from hvstack import __version__
from hvstack.api import problems
from hvstack.api.body import BodyGuard, exempt_routes
from hvstack.api.paths import EscapedSlashGuard
from hvstack.api.routes import (
    checkpoints,
    console,
    exports,
    guest,
    host,
    metering,
    metrics,
    network,
    storage,
    storage_move,
    vms,
)
from hvstack.api.routes.auth import router as auth_router
from hvstack.host.auth import TokenStore
from hvstack.host.root import HostRoot


def create_app(root: HostRoot, tokens: TokenStore | None = None) -> FastAPI:
    service = root.service
    app = FastAPI(
        title="hvstack",
        version=__version__,
        description="The Hyper-V virtualization stack on KVM/QEMU: host service API.",
        openapi_url="/api/v1/openapi.json",
        docs_url="/api/v1/docs",
        redoc_url=None,
    )
    app.state.root = root
    app.state.tokens = tokens if tokens is not None else TokenStore(":memory:")
    app.include_router(auth_router)
    problems.install(app)
    app.add_middleware(EscapedSlashGuard)
    routers = (host.router, vms.router, console.router, storage.router, guest.router,
               network.router, checkpoints.router, exports.router, storage_move.router,
               metering.router, metrics.router)
    for router in routers:
        app.include_router(router)
    app.add_middleware(BodyGuard, limit=service.config.max_request_body,
                       exempt=exempt_routes(r for router in routers for r in router.routes))
    return app
