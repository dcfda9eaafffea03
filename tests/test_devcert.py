"""The development certificate: what it contains, that it is private, reused while good and
replaced when expired, mismatched or naming other hosts; and that TLS accepts it."""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from appliance.tls.devcert import VALID_DAYS, ensure_dev_certificate

UTC = datetime.UTC


def load(cert_path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(cert_path.read_bytes())


def not_after(cert: x509.Certificate) -> datetime.datetime:
    return getattr(cert, "not_valid_after_utc", None) or cert.not_valid_after.replace(tzinfo=UTC)


def test_creates_a_private_p256_certificate_with_the_sans(tmp_path):
    cert_path, key_path, created = ensure_dev_certificate(tmp_path / "certs")
    assert created and (cert_path, key_path) == (
        tmp_path / "certs" / "cert.pem",
        tmp_path / "certs" / "key.pem",
    )
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "certs").st_mode) == 0o700
    cert = load(cert_path)
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"
    assert cert.issuer == cert.subject  # self-signed
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert set(sans.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }
    lifetime = not_after(cert) - datetime.datetime.now(UTC)
    assert datetime.timedelta(days=VALID_DAYS - 1) < lifetime <= datetime.timedelta(days=VALID_DAYS)


def test_the_pair_loads_into_a_tls_server_context(tmp_path):
    cert_path, key_path, _ = ensure_dev_certificate(tmp_path)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(cert_path), str(key_path))


def test_reused_while_valid(tmp_path):
    first = ensure_dev_certificate(tmp_path)
    before = first[0].read_bytes(), first[1].read_bytes()
    again = ensure_dev_certificate(tmp_path)
    assert again == (first[0], first[1], False)
    assert (again[0].read_bytes(), again[1].read_bytes()) == before


def test_replaced_when_expired_or_about_to_expire(tmp_path):
    long_ago = datetime.datetime.now(UTC) - datetime.timedelta(days=VALID_DAYS + 1)
    cert_path, _, created = ensure_dev_certificate(tmp_path, now=long_ago)
    assert created and not_after(load(cert_path)) < datetime.datetime.now(UTC)
    assert ensure_dev_certificate(tmp_path)[2] is True
    assert not_after(load(cert_path)) > datetime.datetime.now(UTC)

    almost = datetime.datetime.now(UTC) - datetime.timedelta(days=VALID_DAYS, hours=-12)
    ensure_dev_certificate(tmp_path / "b", now=almost)  # 12 hours left
    assert ensure_dev_certificate(tmp_path / "b")[2] is True


def test_replaced_when_the_key_does_not_match(tmp_path):
    cert_path, key_path, _ = ensure_dev_certificate(tmp_path)
    other = ec.generate_private_key(ec.SECP256R1())
    key_path.write_bytes(
        other.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    assert ensure_dev_certificate(tmp_path)[2] is True
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(cert_path), str(key_path))  # a matching pair again


@pytest.mark.parametrize("damage", ["cert", "key", "both"])
def test_replaced_when_a_file_is_missing_or_garbage(tmp_path, damage):
    cert_path, key_path, _ = ensure_dev_certificate(tmp_path)
    if damage in ("cert", "both"):
        cert_path.unlink()
    if damage in ("key", "both"):
        key_path.write_text("not a key")
    assert ensure_dev_certificate(tmp_path)[2] is True
    assert load(cert_path) is not None


def test_replaced_when_other_names_are_asked_for(tmp_path):
    ensure_dev_certificate(tmp_path)
    cert_path, _, created = ensure_dev_certificate(tmp_path, hostnames=("relay.test",), ips=("192.0.2.1",))
    assert created
    sans = load(cert_path).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["relay.test"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("192.0.2.1")]
    assert ensure_dev_certificate(tmp_path, hostnames=("relay.test",), ips=("192.0.2.1",))[2] is False


def test_a_pre_existing_world_readable_key_is_replaced_by_a_private_one(tmp_path):
    key_path = tmp_path / "key.pem"
    key_path.write_text("old")
    os.chmod(key_path, 0o644)
    ensure_dev_certificate(tmp_path)
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cert.pem", "key.pem"]


def test_needs_a_hostname(tmp_path):
    with pytest.raises(ValueError, match="at least one hostname"):
        ensure_dev_certificate(tmp_path, hostnames=())
