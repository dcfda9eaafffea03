"""Issue 17, hot reload of the TLS file paths: CertificateReloader.retarget points a running
context at other files (new handshakes get the new certificate, an established one keeps
its own, a pair that does not load changes nothing), and tls_files resolves which files
each listener serves from a configuration, as `appliance serve` does at the start."""

from __future__ import annotations

import json
import ssl
from pathlib import Path

import pytest

from appliance.config.loader import load_config
from appliance.tls.devcert import ensure_dev_certificate
from appliance.tls.files import TlsFiles, tls_files
from appliance.tls.reload import CertificateReloader
from appliance.wiring.relay import tls_context


def handshake(server_ctx: ssl.SSLContext) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """A TLS handshake in memory; (client, server) once both sides have finished."""
    client_ctx = ssl.create_default_context()
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="localhost")
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {client: False, server: False}
    for _ in range(10):
        for side in (client, server):
            if not done[side]:
                try:
                    side.do_handshake()
                    done[side] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return client, server
    raise AssertionError("the handshake did not finish")


def peer_certificate(client: ssl.SSLObject) -> bytes:
    der = client.getpeercert(binary_form=True)
    assert der is not None
    return der


def der_of(cert: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.read_text())


@pytest.fixture
def pairs(tmp_path) -> tuple[tuple[Path, Path], tuple[Path, Path]]:
    old = ensure_dev_certificate(tmp_path / "old")[:2]
    new = ensure_dev_certificate(tmp_path / "new")[:2]
    assert der_of(old[0]) != der_of(new[0])
    return old, new


def test_retarget_serves_the_new_files_to_new_handshakes_only(pairs):
    (old_cert, old_key), (new_cert, new_key) = pairs
    reloader = CertificateReloader()
    ctx = reloader.track("turn tls", tls_context(old_cert, old_key), old_cert, old_key)
    established, _ = handshake(ctx)

    reloader.retarget("turn tls", new_cert, new_key)

    assert peer_certificate(handshake(ctx)[0]) == der_of(new_cert)
    assert peer_certificate(established) == der_of(old_cert)  # it keeps its own
    # SIGHUP reloads from the new files from now on, not the old ones.
    ensure_dev_certificate(new_cert.parent, hostnames=("renewed.example",))  # new contents there
    assert reloader.reload() == []
    assert peer_certificate(handshake(ctx)[0]) == der_of(new_cert)


def test_retarget_to_a_pair_that_does_not_load_raises_and_changes_nothing(pairs, tmp_path):
    (old_cert, old_key), (new_cert, _) = pairs
    reloader = CertificateReloader()
    ctx = reloader.track("https", tls_context(old_cert, old_key), old_cert, old_key)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    for cert, key in ((garbage, old_key), (new_cert, old_key), (tmp_path / "missing.pem", old_key)):
        with pytest.raises(OSError):  # ssl.SSLError is one
            reloader.retarget("https", cert, key)
        assert peer_certificate(handshake(ctx)[0]) == der_of(old_cert)
    assert reloader.reload() == []  # still the old files
    assert peer_certificate(handshake(ctx)[0]) == der_of(old_cert)


def test_retarget_touches_only_the_contexts_of_its_name(pairs):
    (old_cert, old_key), (new_cert, new_key) = pairs
    reloader = CertificateReloader()
    turn = reloader.track("turn tls", tls_context(old_cert, old_key), old_cert, old_key)
    edge = reloader.track("edge", tls_context(old_cert, old_key), old_cert, old_key)
    reloader.retarget("edge", new_cert, new_key)
    assert peer_certificate(handshake(edge)[0]) == der_of(new_cert)
    assert peer_certificate(handshake(turn)[0]) == der_of(old_cert)


def config_file(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "appliance.yaml"
    path.write_text(json.dumps({"data_dir": str(tmp_path / "data"), **data}))  # JSON is YAML
    return path


def test_tls_files_are_the_configured_ones_or_the_development_certificate(pairs, tmp_path):
    (cert, key), _ = pairs
    said: list[str] = []
    defaults = load_config(config_file(tmp_path, {"http": {"tls": True}}), environ={})
    files = tls_files(defaults, said.append)
    dev_cert, dev_key = tmp_path / "data" / "certs" / "cert.pem", tmp_path / "data" / "certs" / "key.pem"
    assert files == TlsFiles(dev_cert, dev_key, dev_cert, dev_key)
    assert said[0].startswith(f"turn TLS: development certificate {dev_cert} (created)")
    assert said[1].startswith(f"http TLS: development certificate {dev_cert} (reused)")

    named = {"tls_cert": str(cert), "tls_key": str(key)}
    configured = load_config(config_file(tmp_path, {"turn": named, "http": {"tls": False}}), environ={})
    assert tls_files(configured) == TlsFiles(cert, key, None, None)  # plain http: no files
    no_tls = {"tls": None, "tcp_tls": False}
    assert tls_files(load_config(config_file(tmp_path, {"turn": no_tls}), environ={})).turn_cert is None
