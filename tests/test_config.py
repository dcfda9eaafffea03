"""Configuration loading: defaults, every validator with its key path, env overrides,
and config/appliance.yaml documenting exactly the defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.config import AppConfig, ConfigError, HostPort, describe, load_config

ROOT = Path(__file__).resolve().parent.parent


def load_text(tmp_path, text: str, env=None) -> AppConfig:
    path = tmp_path / "appliance.yaml"
    path.write_text(text)
    return load_config(path, env or {})


def error_of(tmp_path, text: str, env=None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text, env)
    return info.value


def test_no_file_gives_safe_defaults():
    config = load_config(None, {})
    assert config.turn.udp == HostPort("127.0.0.1", 3478)
    assert config.turn.tls == HostPort("127.0.0.1", 5349)
    assert config.turn.deny_peers == ("recommended",)
    assert config.turn.relay_ports == (49152, 65535)
    assert config.secrets_path() == Path("data") / "secrets.json"


def test_shipped_yaml_documents_exactly_the_defaults():
    shipped = load_config(ROOT / "config" / "appliance.yaml", {})
    defaults = load_config(None, {})
    assert shipped.turn == defaults.turn
    assert shipped.credentials == defaults.credentials
    assert (shipped.realm, shipped.external_ip, shipped.log_level) == \
        (defaults.realm, defaults.external_ip, defaults.log_level)
    text = (ROOT / "config" / "appliance.yaml").read_text()
    for key, _, _ in describe():
        assert f"{key.rsplit('.', 1)[-1]}:" in text, f"{key} is not documented"


@pytest.mark.parametrize("text, key, reason", [
    ("turn: {udpp: 1}", "turn.udpp", "unknown key"),
    ("bogus: 1", "bogus", "unknown key"),
    ("turn: {udp: 'localhost:3478'}", "turn.udp", "not an IP address"),
    ("turn: {udp: '127.0.0.1:0'}", "turn.udp", "not in 1-65535"),
    ("turn: {udp: '::1:3478'}", "turn.udp", "[addr]:port"),
    ("turn: {relay_ports: '70000-70001'}", "turn.relay_ports", "out of range"),
    ("turn: {relay_ports: '5000-4000'}", "turn.relay_ports", "above high port"),
    ("turn: {relay_ports: 'lots'}", "turn.relay_ports", "low-high"),
    ("turn: {relay_ip: '::1'}", "turn.relay_ip", "not an IPv4"),
    ("turn: {relay_ip6: '10.0.0.1'}", "turn.relay_ip6", "not an IPv6"),
    ("turn: {relay_ip: 0.0.0.0}", "turn.relay_ip", "external_ip"),
    ("turn: {user_quota: ten}", "turn.user_quota", "expected an integer"),
    ("turn: {user_quota: true}", "turn.user_quota", "expected an integer"),
    ("turn: {max_lifetime_s: 10}", "turn.max_lifetime_s", "at least 600"),
    ("turn: {workers: 0}", "turn.workers", "1-64"),
    ("turn: {allow_peers: [10.0.0.0/8, nope]}", "turn.allow_peers", "'nope'"),
    ("turn: {deny_peers: recommended}", "turn.deny_peers", "expected a list"),
    ("turn: {tls_cert: /nonexistent/cert.pem, tls_key: /nonexistent/key.pem}", "turn.tls_cert",
     "does not exist"),
    ("turn: {tls_cert: /etc/hostname}", "turn.tls_key", "go together"),
    ("turn: {relay_ip: null, relay_ip6: null}", "turn.relay_ip", "no relay address"),
    ("turn: {tcp: '127.0.0.1:5349'}", "turn.tls", "same address"),
    ("external_ip: 0.0.0.0", "external_ip", "unspecified"),
    ("log_level: loud", "log_level", "one of"),
    ("realm: ''", "realm", "non-empty"),
    ("credentials: {ttl_s: 5}", "credentials.ttl_s", "at least 60"),
    ("turn: 5", "turn", "expected a mapping"),
    ("- a list", "(top level)", "mapping"),
])
def test_bad_values_name_their_key(tmp_path, text, key, reason):
    err = error_of(tmp_path, text)
    assert err.key == key
    assert reason in err.reason
    assert str(err).startswith(f"{key}: ")


def test_unreadable_yaml_and_missing_file(tmp_path):
    assert "not valid YAML" in str(error_of(tmp_path, "turn: [unclosed"))
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml", {})


def test_null_disables_a_listener_and_ipv6_listener(tmp_path):
    config = load_text(tmp_path, "turn: {tls: null, udp: '[::]:3478'}")
    assert config.turn.tls is None
    assert config.turn.udp == HostPort("::", 3478) and str(config.turn.udp) == "[::]:3478"


def test_environment_overrides(tmp_path):
    env = {"APPLIANCE__TURN__UDP": "0.0.0.0:3479", "APPLIANCE__REALM": "example.org",
           "APPLIANCE__TURN__TLS": "null", "appliance__turn__allow_peers": "[10.1.0.0/16]",
           "APPLIANCE__CREDENTIALS__TTL_S": "600", "OTHER": "x"}
    config = load_text(tmp_path, "realm: file.org\nturn: {user_quota: 3}", env)
    assert config.realm == "example.org"
    assert config.turn.udp == HostPort("0.0.0.0", 3479)
    assert config.turn.tls is None
    assert config.turn.allow_peers == ("10.1.0.0/16",)
    assert config.turn.user_quota == 3
    assert config.credentials.ttl_s == 600


@pytest.mark.parametrize("var, message", [("APPLIANCE__TURN__NOPE", "unknown key turn.nope"),
                                           ("APPLIANCE__REALM__X", "not a section"),
                                           ("APPLIANCE__", "malformed")])
def test_bad_environment_overrides_name_the_variable(var, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, {var: "1"})
    assert info.value.key == var and message in info.value.reason


def test_env_override_values_are_validated():
    with pytest.raises(ConfigError, match="turn.workers"):
        load_config(None, {"APPLIANCE__TURN__WORKERS": "100"})


def test_relative_paths_resolve_against_the_config_file(tmp_path):
    (tmp_path / "c.pem").write_text("x")
    (tmp_path / "k.pem").write_text("x")
    config = load_text(tmp_path, "data_dir: state\nturn: {tls_cert: c.pem, tls_key: k.pem}\n"
                                 "credentials: {secrets_file: s/ring.json}")
    assert config.data_dir == tmp_path / "state"
    assert config.turn.tls_cert == tmp_path / "c.pem"
    assert config.secrets_path() == tmp_path / "s" / "ring.json"


def test_production_example_fails_only_on_its_certificate_paths():
    with pytest.raises(ConfigError) as info:
        load_config(ROOT / "config" / "examples" / "production.yaml", {})
    assert info.value.key == "turn.tls_cert"
