"""The configuration checks that involve edge.listen: it needs the signaling, an address of
its own, certificate files that go together, and it counts as a relay listener (relay
addresses required, and enough to hand out an ICE server); and which certificate it serves."""

from __future__ import annotations

import pytest

from appliance.config.loader import load_config
from appliance.config.schema import AppConfig, ConfigError, HostPort
from appliance.process.edge import edge_certificate
from appliance.tls.devcert import ensure_dev_certificate
from appliance.tls.files import TlsFiles

PORTS_CLOSED = "turn: {udp: null, tcp: null, tls: null}\n"


def load_text(tmp_path, text: str) -> AppConfig:
    path = tmp_path / "appliance.yaml"
    path.write_text(text)
    return load_config(path, {})


def error_of(tmp_path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)
    return info.value


def test_the_edge_alone_is_a_relay_and_hands_out_an_ice_server(tmp_path):
    config = load_text(tmp_path, "edge: {listen: 0.0.0.0:443}\n" + PORTS_CLOSED)
    assert config.edge.listen == HostPort("0.0.0.0", 443)


def test_the_edge_without_the_signaling_is_refused(tmp_path):
    err = error_of(tmp_path, "edge: {listen: 127.0.0.1:443}\nhttp: {listen: null}\n")
    assert err.key == "edge.listen"
    assert "http.listen is null" in err.reason and "turn.tls" in err.reason


@pytest.mark.parametrize(
    "other, text",
    [
        ("http.listen", "http: {listen: 127.0.0.1:9443}"),
        ("turn.tcp", "turn: {tcp: 127.0.0.1:9443}"),
        ("turn.tls", "turn: {tls: 127.0.0.1:9443}"),
    ],
)
def test_the_edge_needs_an_address_of_its_own(tmp_path, other, text):
    err = error_of(tmp_path, f"edge: {{listen: 127.0.0.1:9443}}\n{text}\n")
    assert err.key == "edge.listen" and f"same address as {other}" in err.reason


def test_the_edge_needs_a_relay_address(tmp_path):
    err = error_of(
        tmp_path,
        "edge: {listen: 127.0.0.1:443}\n"
        "turn: {udp: null, tcp: null, tls: null, relay_ip: null, relay_ip6: null}\n",
    )
    assert err.key == "turn.relay_ip"


def test_edge_certificate_files_go_together_and_must_exist(tmp_path):
    (tmp_path / "cert.pem").write_text("x")
    assert error_of(tmp_path, "edge: {tls_cert: cert.pem}\n").key == "edge.tls_key"
    err = error_of(tmp_path, "edge: {tls_cert: cert.pem, tls_key: key.pem}\n")
    assert err.key == "edge.tls_key" and "does not exist" in err.reason


def test_the_edge_certificate_is_its_own_else_https_else_the_development_one(tmp_path):
    cert, key, _ = ensure_dev_certificate(tmp_path / "mine")
    own = load_text(tmp_path, f"edge: {{listen: 127.0.0.1:443, tls_cert: {cert}, tls_key: {key}}}\n")
    http_files = TlsFiles(http_cert=tmp_path / "http.pem", http_key=tmp_path / "http.key")
    assert edge_certificate(own, http_files) == (cert, key)
    bare = load_text(tmp_path, f"data_dir: {tmp_path / 'data'}\nedge: {{listen: 127.0.0.1:443}}\n")
    assert edge_certificate(bare, http_files) == (tmp_path / "http.pem", tmp_path / "http.key")
    dev_cert, dev_key = edge_certificate(bare, TlsFiles())  # http.tls false: no https pair
    assert (dev_cert.parent, dev_key.parent) == (tmp_path / "data" / "certs", tmp_path / "data" / "certs")
    assert dev_cert.is_file() and dev_key.is_file()
