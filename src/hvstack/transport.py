"""How a client reaches the host service: address, TLS trust and token, in one place
for the REST client (httpx) and the WebSocket client (websockets).

``endpoint(host, token, fingerprint, ca_file)`` resolves each setting from its argument,
else the environment (``HV_HOST``, ``HV_TOKEN``, ``HV_FINGERPRINT``, ``HV_CA_FILE``):

- ``unix:PATH``: plain HTTP over the socket; the kernel's peer credentials are the
  authentication, a token is not needed;
- ``tcp:HOST:PORT``: HTTPS. The server's certificate is trusted if the SHA-256 of its
  DER form equals the pinned fingerprint, else if it verifies against ``HV_CA_FILE``,
  else against the system's CAs. A pinned certificate is checked right after the
  handshake, before any request (and its token) is sent;
- ``http+tcp:HOST:PORT``: plain HTTP, only when the address says so.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import ssl
from dataclasses import dataclass, field
from typing import Any

from hvstack.errors import InvalidInput
from hvstack.host.config import ListenAddress, default_listen, parse_listen


def parse_fingerprint(text: str) -> bytes:
    """A SHA-256 fingerprint as hex, with or without ':' separators or a ``sha256:``
    prefix (as ``hv serve`` and ``openssl x509 -fingerprint -sha256`` print it)."""
    cleaned = re.sub(r"[\s:]", "", text.strip().lower().removeprefix("sha256:")
                     .removeprefix("sha256 fingerprint="))
    if not re.fullmatch(r"[0-9a-f]{64}", cleaned):
        raise InvalidInput(f"'{text}' is not a SHA-256 fingerprint (64 hex digits)")
    return bytes.fromhex(cleaned)


def _check_pin(der: bytes | None, pin: bytes) -> None:
    seen = hashlib.sha256(der or b"").digest()
    if der is None or not hmac.compare_digest(seen, pin):
        raise ssl.SSLCertVerificationError(
            f"the server's certificate has fingerprint {seen.hex(':').upper()}, not the "
            f"pinned {pin.hex(':').upper()}")


def pinned_context(pin: bytes) -> ssl.SSLContext:
    """A client context that trusts exactly the certificate whose SHA-256 is ``pin``."""

    class PinnedSocket(ssl.SSLSocket):
        def do_handshake(self, block: bool = False) -> None:
            super().do_handshake(block)
            _check_pin(self.getpeercert(binary_form=True), pin)

    class PinnedObject(ssl.SSLObject):
        def do_handshake(self) -> None:
            super().do_handshake()
            _check_pin(self.getpeercert(binary_form=True), pin)

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False  # the pin names the certificate; no CA vouches for it
    context.verify_mode = ssl.CERT_NONE
    context.sslsocket_class = PinnedSocket
    context.sslobject_class = PinnedObject
    return context


def client_context(fingerprint: str | None, ca_file: str | None) -> ssl.SSLContext:
    if fingerprint:
        return pinned_context(parse_fingerprint(fingerprint))
    if ca_file:
        if not os.path.isfile(ca_file):
            raise InvalidInput(f"CA file '{ca_file}' does not exist")
        return ssl.create_default_context(cafile=ca_file)
    return ssl.create_default_context()


@dataclass(frozen=True)
class Endpoint:
    address: ListenAddress
    token: str | None = None
    ssl: ssl.SSLContext | None = field(default=None, compare=False)

    @property
    def tls(self) -> bool:
        return self.ssl is not None

    def url(self, path: str, websocket: bool = False) -> str:
        scheme = ("wss" if self.tls else "ws") if websocket else ("https" if self.tls else "http")
        where = "hv" if self.address.kind == "unix" else self.address.netloc
        return f"{scheme}://{where}{path}"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def httpx_options(self) -> dict[str, Any]:
        """What ``httpx.HTTPTransport`` needs: ``uds`` and ``verify``. Without TLS the
        context is never used: an empty one spares loading the CA bundle (a tenth of
        hv's start-up)."""
        verify = self.ssl if self.ssl is not None else ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if self.address.kind == "unix":
            return {"uds": self.address.path, "verify": verify}
        return {"verify": verify}


def endpoint(host: str | None = None, token: str | None = None,
             fingerprint: str | None = None, ca_file: str | None = None) -> Endpoint:
    address = parse_listen(host) if host else default_listen()
    token = token or os.environ.get("HV_TOKEN") or None
    if address.kind != "tcp" or not address.tls:
        return Endpoint(address, token)
    context = client_context(fingerprint or os.environ.get("HV_FINGERPRINT"),
                             ca_file or os.environ.get("HV_CA_FILE"))
    return Endpoint(address, token, context)
