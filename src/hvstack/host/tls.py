"""The TCP listener's certificate: the one given, or a self-signed pair kept in the data
directory (``tls/cert.pem``, ``tls/key.pem``, made once with ``cryptography``).

Clients that do not trust a CA for it pin its SHA-256 fingerprint (of the DER form),
which :func:`tls_pair` returns for the service to print.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from hvstack.errors import InvalidInput
from hvstack.host.config import HostConfig

VALIDITY_DAYS = 3650


@dataclass(frozen=True)
class TlsPair:
    cert: Path
    key: Path
    fingerprint: str  # SHA-256 of the certificate's DER, hex pairs joined by ':'
    self_signed: bool


def fingerprint_of_pem(pem: str) -> str:
    """The fingerprint of the first certificate in ``pem`` (the server's own; a chain
    may follow it)."""
    start = pem.index(ssl.PEM_HEADER)
    end = pem.index(ssl.PEM_FOOTER, start) + len(ssl.PEM_FOOTER)
    der = ssl.PEM_cert_to_DER_cert(pem[start:end])
    return ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


def _names(host: str) -> list[str]:
    names = ["localhost", "127.0.0.1", "::1", socket.gethostname()]
    if host not in ("0.0.0.0", "::"):
        names.append(host)
    return list(dict.fromkeys(names))


def _self_signed(host: str, cert_path: Path, key_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for name in _names(host):
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                            f"hvstack on {socket.gethostname()}"[:64])])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALIDITY_DAYS))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _write_private(key_path, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    _write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM))


def tls_pair(config: HostConfig) -> TlsPair:
    """The certificate and key for the TCP listener, made on first use if none was given."""
    if config.tls_cert is not None and config.tls_key is not None:
        cert, key, self_signed = config.tls_cert, config.tls_key, False
    else:
        cert, key, self_signed = config.tls_dir / "cert.pem", config.tls_dir / "key.pem", True
        if not (cert.is_file() and key.is_file()):
            _self_signed(config.tcp.host if config.tcp else "localhost", cert, key)
    try:
        fingerprint = fingerprint_of_pem(cert.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"cannot read the TLS certificate {cert}: {exc}",
                           path=str(cert)) from None
    return TlsPair(cert, key, fingerprint, self_signed)
