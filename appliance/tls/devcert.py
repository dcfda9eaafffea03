"""A self-signed certificate for development, so TLS works with no setup.

Generated under data_dir/certs on first start (EC P-256, one year, SANs for
localhost and the loopback addresses), reused while it is valid, matches its
key and names what was asked for, replaced otherwise.  Production
configurations name their own files (turn.tls_cert / turn.tls_key).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

VALID_DAYS = 365
RENEW_BEFORE = datetime.timedelta(days=1)  # never hand out a certificate about to expire
BACKDATE = datetime.timedelta(minutes=5)  # tolerate clients whose clock is slightly behind


def _not_valid_after(cert: x509.Certificate) -> datetime.datetime:
    try:
        return cert.not_valid_after_utc  # cryptography >= 42
    except AttributeError:
        return cert.not_valid_after.replace(tzinfo=datetime.UTC)


def _wanted_names(hostnames: Iterable[str], ips: Iterable[str]) -> list[x509.GeneralName]:
    return [x509.DNSName(h) for h in hostnames] + [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]


def _reusable(cert_path: Path, key_path: Path, names: list, now: datetime.datetime) -> bool:
    """True if both files load, belong together, cover `names` and stay valid a while."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, TypeError, x509.ExtensionNotFound):
        return False
    same_key = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return same_key and set(sans) == set(names) and _not_valid_after(cert) > now + RENEW_BEFORE


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    # A crash mid-write leaves the old file or the new one, and the key is never
    # readable by others, not even for a moment (mkstemp creates it 0600).
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def ensure_dev_certificate(
    directory: Path,
    hostnames: Iterable[str] = ("localhost",),
    ips: Iterable[str] = ("127.0.0.1", "::1"),
    *,
    now: datetime.datetime | None = None,
) -> tuple[Path, Path, bool]:
    """Return (cert.pem, key.pem, created) in `directory`, generating them when needed.

    `now` (timezone-aware) defaults to the current time; tests pass another.
    """
    hostnames, ips = tuple(hostnames), tuple(ips)
    if not hostnames:
        raise ValueError("a development certificate needs at least one hostname")
    now = now or datetime.datetime.now(datetime.UTC)
    directory = Path(directory)
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    names = _wanted_names(hostnames, ips)
    if _reusable(cert_path, key_path, names, now):
        return cert_path, key_path, False

    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0]),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "appliance development"),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    # Key first: a crash between the two writes leaves a mismatched pair, which
    # _reusable rejects, so the next start regenerates both.
    _write_atomic(key_path, key_pem, 0o600)
    _write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert_path, key_path, True
