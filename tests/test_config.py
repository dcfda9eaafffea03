"""Configuration loading: defaults, every validator with its key path, unknown and duplicate
keys, environment overrides, path resolution, and config/appliance.yaml stating the defaults."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from appliance.config.loader import describe, load_config
from appliance.config.schema import AppConfig, ConfigError, CredentialsConfig, HostPort, TurnConfig

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "config" / "appliance.yaml"
PRODUCTION = ROOT / "config" / "examples" / "production.yaml"


def load_text(tmp_path, text: str, env=None) -> AppConfig:
    path = tmp_path / "appliance.yaml"
    path.write_text(text)
    return load_config(path, env or {})


def error_of(tmp_path, text: str, env=None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text, env)
    return info.value


# ------------------------------------------------------------------ defaults


def test_no_file_gives_the_safe_defaults():
    config = load_config(None, {})
    assert config == AppConfig()
    t = config.turn
    assert (t.udp, t.tcp, t.tls) == (
        HostPort("127.0.0.1", 3478),
        HostPort("127.0.0.1", 3478),
        HostPort("127.0.0.1", 5349),
    )
    assert (t.relay_ip, t.relay_ip6, t.relay_ports) == ("127.0.0.1", "::1", (61000, 65535))
    assert (t.allow_peers, t.deny_peers) == ((), ("recommended",))
    assert (t.user_quota, t.total_quota, t.max_lifetime_s, t.workers) == (10, 10000, 3600, 1)
    assert (t.tls_cert, t.tls_key, t.software) == (None, None, None)
    assert config.credentials == CredentialsConfig(secrets_file=None, ttl_s=86400)
    assert config.secrets_path() == config.data_dir / "secrets.json"


def test_empty_file_and_empty_sections_give_the_defaults(tmp_path):
    assert load_text(tmp_path, "") == AppConfig()
    assert load_text(tmp_path, "# only a comment\n") == AppConfig()
    assert load_text(tmp_path, "turn:\ncredentials:\n") == AppConfig()


def test_shipped_yaml_states_exactly_the_defaults():
    assert load_config(SHIPPED, {}) == AppConfig()


def test_shipped_yaml_documents_every_option_with_a_comment():
    lines = SHIPPED.read_text().splitlines()
    for key, _, doc in describe():
        assert doc, f"{key} has no doc in the schema"
        name = key.rsplit(".", 1)[-1]
        # A computed default (data_dir) is shown commented out: writing it would fix one value.
        at = next(
            (i for i, line in enumerate(lines) if line.strip().startswith((f"{name}:", f"# {name}:"))), None
        )
        assert at is not None, f"{key} is missing from {SHIPPED.name}"
        # Walk up over the keys of its group (udp/tcp/tls share one comment) to the comment.
        indent = len(lines[at]) - len(lines[at].lstrip())
        i = at - 1
        while (
            i >= 0
            and lines[i].strip()
            and not lines[i].lstrip().startswith("#")
            and len(lines[i]) - len(lines[i].lstrip()) == indent
        ):
            i -= 1
        assert i >= 0 and lines[i].lstrip().startswith("#"), f"{key} has no comment above it"


def test_describe_lists_every_leaf_option_once():
    keys = [key for key, _, _ in describe()]
    assert len(keys) == len(set(keys))
    assert "turn.relay_ports" in keys and "credentials.ttl_s" in keys and "turn" not in keys


# ------------------------------------------------------------------ validators


@pytest.mark.parametrize(
    "text, key, reason",
    [
        # unknown keys at every depth
        ("bogus: 1", "bogus", "unknown key"),
        ("turn: {udpp: 1}", "turn.udpp", "unknown key"),
        ("credentials: {ttl: 5}", "credentials.ttl", "unknown key"),
        ("Realm: x", "Realm", "unknown key"),
        # shapes
        ("turn: 5", "turn", "expected a mapping, got 5"),
        ("turn: [udp]", "turn", "expected a mapping"),
        ("- a list", "(top level)", "must hold a mapping"),
        # listeners
        ("turn: {udp: 'localhost:3478'}", "turn.udp", "'localhost' is not an IP address"),
        ("turn: {udp: '127.0.0.1:0'}", "turn.udp", "port '0' is not in 1-65535"),
        ("turn: {udp: '127.0.0.1:65536'}", "turn.udp", "port '65536' is not in 1-65535"),
        ("turn: {udp: '127.0.0.1:x'}", "turn.udp", "port 'x' is not in 1-65535"),
        ("turn: {udp: '127.0.0.1:\uff13\uff14'}", "turn.udp", "is not in 1-65535"),  # fullwidth digits
        ("turn: {udp: '127.0.0.1'}", "turn.udp", "expected host:port"),
        ("turn: {udp: '::1:3478'}", "turn.udp", "[addr]:port"),
        ("turn: {udp: '[::1:3478'}", "turn.udp", "expected host:port or [addr]:port"),
        ("turn: {udp: '[127.0.0.1]:3478'}", "turn.udp", "brackets are for IPv6"),
        ("turn: {udp: 3478}", "turn.udp", "expected text, got 3478"),
        # relay addresses
        ("turn: {relay_ip: '::1'}", "turn.relay_ip", "'::1' is not an IPv4 address"),
        ("turn: {relay_ip: relay.example}", "turn.relay_ip", "is not an IP address"),
        ("turn: {relay_ip6: 10.0.0.1}", "turn.relay_ip6", "'10.0.0.1' is not an IPv6 address"),
        ("turn: {relay_ip: 0.0.0.0}", "turn.relay_ip", "set external_ip to"),
        ("turn: {relay_ip6: '::'}", "turn.relay_ip6", "set external_ip6 to"),
        ("turn: {relay_ip6: 1:2:3:4:5:6:7:8}", "turn.relay_ip6", "quote the value"),  # a YAML 1.1 number
        ("turn: {relay_ip: null, relay_ip6: null}", "turn.relay_ip", "neither relay_ip nor relay_ip6"),
        ("external_ip: 0.0.0.0", "external_ip", "unspecified"),
        ("external_ip: '2001:db8::1'", "external_ip", "not an IPv4 address"),
        ("external_ip6: 203.0.113.1", "external_ip6", "not an IPv6 address"),
        ("external_ip6: '::'", "external_ip6", "unspecified"),
        ("{external_ip: 203.0.113.1, turn: {relay_ip: null}}", "external_ip", "turn.relay_ip is null"),
        # port range
        ("turn: {relay_ports: '70000-70001'}", "turn.relay_ports", "low port 70000 is out of range 1-65535"),
        ("turn: {relay_ports: '1000-70000'}", "turn.relay_ports", "high port 70000 is out of range"),
        ("turn: {relay_ports: '0-10'}", "turn.relay_ports", "low port 0 is out of range"),
        ("turn: {relay_ports: '5000-4000'}", "turn.relay_ports", "low port 5000 is above high port 4000"),
        ("turn: {relay_ports: 'lots'}", "turn.relay_ports", '"low-high"'),
        ("turn: {relay_ports: '\u00b2-9'}", "turn.relay_ports", '"low-high"'),  # superscript two
        ("turn: {relay_ports: 50000}", "turn.relay_ports", '"low-high", got 50000'),
        ("turn: {relay_ports: null}", "turn.relay_ports", "may not be null"),
        # peers, item by item
        ("turn: {allow_peers: [10.0.0.0/8, nope]}", "turn.allow_peers[1]", "'nope' is not an IP"),
        ("turn: {allow_peers: [recommended]}", "turn.allow_peers[0]", "'recommended' is not an IP"),
        ("turn: {deny_peers: [recommended, 10.0.0.0/33]}", "turn.deny_peers[1]", "10.0.0.0/33"),
        ("turn: {deny_peers: recommended}", "turn.deny_peers", "expected a list"),
        ("turn: {allow_peers: [10]}", "turn.allow_peers[0]", "expected text"),
        # integers and their bounds
        ("turn: {user_quota: ten}", "turn.user_quota", "expected an integer, got 'ten'"),
        ("turn: {user_quota: true}", "turn.user_quota", "expected an integer, got True"),
        ("turn: {user_quota: 1.5}", "turn.user_quota", "expected an integer, got 1.5"),
        ("turn: {user_quota: -1}", "turn.user_quota", "at least 0"),
        ("turn: {total_quota: -1}", "turn.total_quota", "at least 0"),
        ("turn: {max_lifetime_s: 599}", "turn.max_lifetime_s", "at least 600, got 599"),
        ("turn: {max_permissions: 0}", "turn.max_permissions", "at least 1"),
        ("turn: {max_channels: 0}", "turn.max_channels", "at least 1"),
        ("turn: {nonce_lifetime_s: 29}", "turn.nonce_lifetime_s", "at least 30"),
        ("turn: {workers: 0}", "turn.workers", "must be in 1-64, got 0"),
        ("turn: {workers: 65}", "turn.workers", "must be in 1-64, got 65"),
        ("turn: {workers: null}", "turn.workers", "may not be null"),
        ("credentials: {ttl_s: 59}", "credentials.ttl_s", "at least 60"),
        # text
        ("log_level: loud", "log_level", "one of debug, info, warning, error"),
        ("log_level: INFO", "log_level", "one of"),
        ("realm: ''", "realm", "non-empty"),
        ("realm: 'a\"b'", "realm", "quotes"),
        ('realm: "a\\tb"', "realm", "control characters"),
        ("realm: 12", "realm", "expected text, got 12"),
        ("realm: " + "r" * 128, "realm", "at most 127 characters"),
        ("realm: null", "realm", "may not be null"),
        ("turn: {software: ''}", "turn.software", "non-empty"),
        ('turn: {software: "x\\ny"}', "turn.software", "control characters"),
        # paths and the TLS pair
        ("data_dir: ''", "data_dir", "empty"),
        ("data_dir: null", "data_dir", "may not be null"),
        (
            "turn: {tls_cert: /nonexistent/cert.pem, tls_key: /nonexistent/key.pem}",
            "turn.tls_cert",
            "/nonexistent/cert.pem does not exist",
        ),
        ("turn: {tls_cert: /etc/hostname}", "turn.tls_key", "go together"),
        ("turn: {tls_key: /etc/hostname}", "turn.tls_cert", "go together"),
        ("turn: {tls_cert: /, tls_key: /}", "turn.tls_cert", "is not a readable file"),
        # listeners that collide
        ("turn: {tcp: '127.0.0.1:5349'}", "turn.tls", "same address as turn.tcp"),
    ],
)
def test_bad_values_name_their_key(tmp_path, text, key, reason):
    err = error_of(tmp_path, text)
    assert (err.key, str(err)) == (key, f"{key}: {err.reason}")
    assert reason in err.reason


def test_missing_key_file_names_the_key_path(tmp_path):
    (tmp_path / "cert.pem").write_text("x")
    err = error_of(tmp_path, "turn: {tls_cert: cert.pem, tls_key: key.pem}")
    assert err.key == "turn.tls_key" and str(tmp_path / "key.pem") in err.reason


def test_certificate_files_are_checked_even_with_tls_disabled(tmp_path):
    err = error_of(tmp_path, "turn: {tls: null, tls_cert: c.pem, tls_key: k.pem}")
    assert err.key == "turn.tls_cert"


def test_unspecified_relay_address_is_fine_with_an_external_one(tmp_path):
    config = load_text(tmp_path, "external_ip: 203.0.113.7\nturn: {relay_ip: 0.0.0.0}")
    assert (config.turn.relay_ip, config.external_ip) == ("0.0.0.0", "203.0.113.7")


RELAY_OFF = "turn: {udp: null, tcp: null, tls: null, relay_ip: null, relay_ip6: null}\n"


def test_relaying_may_be_off_when_every_listener_is(tmp_path):
    config = load_text(tmp_path, RELAY_OFF + "credentials: {external: [turn:turn.example.com:3478]}")
    assert (config.turn.udp, config.turn.relay_ip, config.turn.relay_ip6) == (None, None, None)
    assert load_text(tmp_path, RELAY_OFF + "http: {listen: null}").http.listen is None


def test_signaling_without_any_ice_server_is_refused(tmp_path):
    err = error_of(tmp_path, RELAY_OFF)
    assert err.key == "credentials.external" and "no ICE server" in err.reason


@pytest.mark.parametrize(
    "url, problem",
    [
        ("http://turn.example.com", "must start with one of"),
        ("turn:::1", "in brackets"),
        ("turns:turn.example.com?transport=udp", "transport=udp is not possible"),
        ("turn:turn.example.com:0", "not in 1-65535"),
        ("stun:turn.example.com?transport=tcp", "stun URLs take no query"),
        ("turn:bad_host!", "not a host name"),
    ],
)
def test_bad_ice_urls_are_named_with_their_index(tmp_path, url, problem):
    err = error_of(tmp_path, f"credentials: {{ice_servers: [stun:ok.example.com, '{url}']}}")
    assert err.key == "credentials.ice_servers[1]" and problem in err.reason


def test_external_servers_must_be_turn_urls(tmp_path):
    err = error_of(tmp_path, "credentials: {external: ['stun:stun.example.com']}")
    assert err.key == "credentials.external[0]" and "turn: or turns:" in err.reason
    ok = load_text(tmp_path, "credentials: {external: ['turns:[2001:db8::1]:5349?transport=tcp']}")
    assert ok.credentials.external == ("turns:[2001:db8::1]:5349?transport=tcp",)


def test_an_empty_ice_server_list_is_refused(tmp_path):
    assert error_of(tmp_path, "credentials: {ice_servers: []}").key == "credentials.ice_servers"


def test_secret_grace_defaults_to_the_credential_lifetime(tmp_path):
    assert load_text(tmp_path, "credentials: {ttl_s: 600}").credentials.grace_s() == 600
    assert load_text(tmp_path, "credentials: {ttl_s: 600, secret_grace_s: 5}").credentials.grace_s() == 5
    assert error_of(tmp_path, "credentials: {secret_grace_s: -1}").key == "credentials.secret_grace_s"


def test_credentials_host_must_be_a_name_or_address(tmp_path):
    assert load_text(tmp_path, "credentials: {host: turn.example.com}").credentials.host == "turn.example.com"
    assert error_of(tmp_path, "credentials: {host: 'a b'}").key == "credentials.host"


def test_admin_off_loopback_needs_a_token(tmp_path):
    err = error_of(tmp_path, "admin: {listen: 0.0.0.0:9090}")
    assert err.key == "admin.token" and "loopback" in err.reason
    config = load_text(tmp_path, "admin: {listen: 0.0.0.0:9090, token: aaaaaaaaaaaaaaaaaaaa}")
    assert str(config.admin.listen) == "0.0.0.0:9090"
    assert error_of(tmp_path, "admin: {token: short}").key == "admin.token"
    assert load_text(tmp_path, "admin: {listen: null}").admin.listen is None


def test_duplicate_keys_are_refused_with_their_lines(tmp_path):
    err = error_of(tmp_path, "turn:\n  udp: null\n  workers: 2\n  udp: 127.0.0.1:3478\n")
    assert err.key == "turn.udp" and "duplicate key (lines 2 and 4)" in err.reason
    assert error_of(tmp_path, "realm: a\nrealm: b\n").key == "realm"


def test_unreadable_yaml_and_missing_file(tmp_path):
    err = error_of(tmp_path, "turn: [unclosed")
    assert err.key == "(file)" and "not valid YAML" in err.reason
    with pytest.raises(ConfigError, match="cannot read .*missing.yaml"):
        load_config(tmp_path / "missing.yaml", {})
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(tmp_path / "binary.yaml", {})


# ------------------------------------------------------------------ values that load


def test_listeners_parse_ipv4_ipv6_and_null(tmp_path):
    config = load_text(tmp_path, "turn: {tls: null, udp: '[::]:3478', tcp: '0.0.0.0:80'}")
    assert config.turn.tls is None
    assert config.turn.udp == HostPort("::", 3478) and str(config.turn.udp) == "[::]:3478"
    assert config.turn.tcp == HostPort("0.0.0.0", 80) and str(config.turn.tcp) == "0.0.0.0:80"


def test_hostport_round_trips_through_its_text():
    for text in ("127.0.0.1:3478", "[::1]:5349", "[2001:db8::1]:1"):
        assert str(HostPort.parse(text)) == text


def test_lists_and_ranges(tmp_path):
    config = load_text(
        tmp_path,
        "turn: {allow_peers: [10.1.0.0/16, '::1', 192.0.2.7], "
        "deny_peers: [recommended, 198.51.100.0/24], "
        "relay_ports: 40000 - 40010}",
    )
    assert config.turn.allow_peers == ("10.1.0.0/16", "::1", "192.0.2.7")
    assert config.turn.deny_peers == ("recommended", "198.51.100.0/24")
    assert config.turn.relay_ports == (40000, 40010)


def test_relative_paths_resolve_against_the_config_file(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # not the file's directory
    (tmp_path / "c.pem").write_text("x")
    (tmp_path / "k.pem").write_text("x")
    config = load_text(
        tmp_path,
        "data_dir: state\nturn: {tls_cert: c.pem, tls_key: k.pem}\ncredentials: {secrets_file: s/ring.json}",
    )
    assert config.data_dir == tmp_path / "state"
    assert (config.turn.tls_cert, config.turn.tls_key) == (tmp_path / "c.pem", tmp_path / "k.pem")
    assert config.secrets_path() == tmp_path / "s" / "ring.json"


@pytest.mark.parametrize(
    "euid, xdg_state_home, expected",
    [
        (0, "/xdg/state", "/var/lib/appliance"),  # root: a system service's state
        (1000, "/xdg/state", "/xdg/state/appliance"),
        (1000, None, "{home}/.local/state/appliance"),
        (1000, "relative", "{home}/.local/state/appliance"),  # the XDG spec ignores relative values
    ],
)
def test_the_default_data_dir_does_not_depend_on_the_working_directory(
    tmp_path, monkeypatch, euid, xdg_state_home, expected
):
    monkeypatch.setattr(os, "geteuid", lambda: euid)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    if xdg_state_home is None:
        monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    else:
        monkeypatch.setenv("XDG_STATE_HOME", xdg_state_home)
    want = Path(expected.format(home=tmp_path / "home"))
    for cwd in (tmp_path, ROOT):
        monkeypatch.chdir(cwd)
        assert load_config(None, {}).data_dir == want
        config = load_text(tmp_path, "realm: example.org")  # omitted in a file: the same
        assert config.data_dir == want and config.secrets_path() == want / "secrets.json"


def test_absolute_and_home_paths_are_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config = load_text(tmp_path, "data_dir: ~/state\ncredentials: {secrets_file: /srv/ring.json}")
    assert config.data_dir == tmp_path / "home" / "state"
    assert config.secrets_path() == Path("/srv/ring.json")


def test_the_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        AppConfig().realm = "x"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        TurnConfig().workers = 2  # type: ignore[misc]


# ------------------------------------------------------------------ environment


def test_environment_overrides_apply_on_top_of_the_file(tmp_path):
    env = {
        "APPLIANCE__TURN__UDP": "0.0.0.0:3479",
        "APPLIANCE__REALM": "example.org",
        "APPLIANCE__TURN__TLS": "null",
        "appliance__turn__allow_peers": "[10.1.0.0/16]",
        "APPLIANCE__CREDENTIALS__TTL_S": "600",
        "APPLIANCE__Turn__Workers": "4",
        "APPLIANCE_CONFIG": "/not/an/override",
        "OTHER": "x",
    }
    config = load_text(tmp_path, "realm: file.org\nturn: {user_quota: 3, workers: 2}", env)
    assert config.realm == "example.org"
    assert config.turn.udp == HostPort("0.0.0.0", 3479)
    assert config.turn.tls is None
    assert config.turn.allow_peers == ("10.1.0.0/16",)
    assert (config.turn.user_quota, config.turn.workers) == (3, 4)
    assert config.credentials.ttl_s == 600


def test_environment_overrides_without_a_file():
    config = load_config(
        None,
        {
            "APPLIANCE__EXTERNAL_IP": "203.0.113.7",
            "APPLIANCE__TURN__RELAY_IP": "0.0.0.0",
            "APPLIANCE__TURN__RELAY_IP6": "null",
        },
    )
    assert (config.external_ip, config.turn.relay_ip, config.turn.relay_ip6) == (
        "203.0.113.7",
        "0.0.0.0",
        None,
    )


@pytest.mark.parametrize(
    "var, raw, key, expected",
    [
        # Text that YAML would misread is taken as written.
        ("APPLIANCE__TURN__UDP", "[::1]:3478", "udp", HostPort("::1", 3478)),
        ("APPLIANCE__TURN__RELAY_IP6", "2001:db8::1", "relay_ip6", "2001:db8::1"),
        ("APPLIANCE__TURN__SOFTWARE", "1:30", "software", "1:30"),  # YAML 1.1 reads 90
        ("APPLIANCE__TURN__SOFTWARE", "true", "software", "true"),
        ("APPLIANCE__TURN__SOFTWARE", "", "software", None),
        ("APPLIANCE__TURN__ALLOW_PEERS", "['::1', 10.0.0.0/8]", "allow_peers", ("::1", "10.0.0.0/8")),
        ("APPLIANCE__TURN__ALLOW_PEERS", "[]", "allow_peers", ()),
        ("APPLIANCE__TURN__RELAY_PORTS", "40000-40100", "relay_ports", (40000, 40100)),
    ],
)
def test_environment_values_are_read_for_their_field(var, raw, key, expected):
    assert getattr(load_config(None, {var: raw}).turn, key) == expected


def test_a_whole_section_from_the_environment():
    config = load_config(None, {"APPLIANCE__TURN": "{udp: null, workers: 3}"})
    assert (config.turn.udp, config.turn.workers, config.turn.tcp) == (None, 3, TurnConfig().tcp)


def test_relative_environment_paths_resolve_against_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    elsewhere = tmp_path / "etc"
    elsewhere.mkdir()
    config = load_text(elsewhere, "credentials: {secrets_file: ring.json}", {"APPLIANCE__DATA_DIR": "state"})
    assert config.data_dir == tmp_path / "state"
    assert config.secrets_path() == elsewhere / "ring.json"


@pytest.mark.parametrize(
    "var, message",
    [
        ("APPLIANCE__TURN__NOPE", "unknown key turn.nope"),
        ("APPLIANCE__NOPE", "unknown key nope"),
        ("APPLIANCE__TURN__UDP__HOST", "turn.udp is not a section"),
        ("APPLIANCE__REALM__X", "realm is not a section"),
        ("APPLIANCE__", "malformed"),
        ("APPLIANCE__TURN____UDP", "malformed"),
    ],
)
def test_bad_override_names_name_the_variable(var, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, {var: "1"})
    assert info.value.key == var and message in info.value.reason


@pytest.mark.parametrize(
    "env, key, reason",
    [
        ({"APPLIANCE__TURN__WORKERS": "100"}, "turn.workers", "must be in 1-64, got 100"),
        ({"APPLIANCE__TURN__WORKERS": "many"}, "turn.workers", 'expected a number of processes or "auto"'),
        ({"APPLIANCE__TURN__UDP": "host:1"}, "turn.udp", "not an IP address"),
        ({"APPLIANCE__TURN__ALLOW_PEERS": "[::1]"}, "turn.allow_peers", "quote IPv6 items"),
        ({"APPLIANCE__TURN__ALLOW_PEERS": "[10.0.0.0/8, x]"}, "turn.allow_peers[1]", "'x'"),
        ({"APPLIANCE__TURN__RELAY_IP": "0.0.0.0"}, "turn.relay_ip", "set external_ip"),
        ({"APPLIANCE__TURN": "{udpp: 1}"}, "turn.udpp", "unknown key"),
    ],
)
def test_bad_override_values_name_the_key_and_the_variable(env, key, reason):
    with pytest.raises(ConfigError) as info:
        load_config(None, env)
    (var,) = env
    assert info.value.key == key
    assert reason in info.value.reason and info.value.reason.endswith(f"(set by {var})")


def test_overriding_a_key_of_a_section_set_whole_is_refused():
    with pytest.raises(ConfigError, match="conflicts with APPLIANCE__TURN") as info:
        load_config(None, {"APPLIANCE__TURN": "{workers: 2}", "APPLIANCE__TURN__UDP": "null"})
    assert info.value.key == "APPLIANCE__TURN__UDP"


def test_override_into_a_malformed_section_names_the_section(tmp_path):
    err = error_of(tmp_path, "turn: 5", {"APPLIANCE__TURN__UDP": "null"})
    assert err.key == "turn" and "expected a mapping" in err.reason


def test_environ_defaults_to_the_process_environment(monkeypatch):
    monkeypatch.setenv("APPLIANCE__REALM", "from-env.example")
    assert load_config().realm == "from-env.example"
    assert load_config(None, {}).realm == "appliance.local"


def test_file_errors_from_file_values_do_not_blame_the_environment(tmp_path):
    err = error_of(tmp_path, "turn: {workers: 0}", {"APPLIANCE__TURN__UDP": "null"})
    assert err.key == "turn.workers" and "set by" not in err.reason


# ------------------------------------------------------------------ the production example


def test_production_example_fails_only_on_its_certificate_paths(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(PRODUCTION, {})
    assert info.value.key == "turn.tls_cert"
    assert "/etc/appliance/certs/fullchain.pem does not exist" in info.value.reason
    # With the certificate files present, the rest of the example is valid.
    for name in ("cert.pem", "key.pem"):
        (tmp_path / name).write_text("x")
    config = load_config(
        PRODUCTION,
        {
            "APPLIANCE__TURN__TLS_CERT": str(tmp_path / "cert.pem"),
            "APPLIANCE__TURN__TLS_KEY": str(tmp_path / "key.pem"),
            "APPLIANCE__HTTP__TLS_CERT": str(tmp_path / "cert.pem"),
            "APPLIANCE__HTTP__TLS_KEY": str(tmp_path / "key.pem"),
        },
    )
    assert config.http.demo is False and config.admin.token is not None
    assert config.external_ip == "203.0.113.7" and config.turn.relay_ip == "0.0.0.0"
    assert config.turn.udp == HostPort("0.0.0.0", 3478)
    assert os.fspath(config.data_dir) == "/var/lib/appliance"


def test_workers_auto_is_one_per_core(tmp_path):
    import os

    cores = len(os.sched_getaffinity(0))
    assert load_text(tmp_path, "turn: {workers: auto}").turn.workers == min(cores, 64)
    assert load_text(tmp_path, "turn: {workers: 3}").turn.workers == 3
    assert load_text(tmp_path, "", {"APPLIANCE__TURN__WORKERS": "auto"}).turn.workers == min(cores, 64)
    assert "auto" in error_of(tmp_path, "turn: {workers: many}").reason
    assert error_of(tmp_path, "turn: {workers: 0}").key == "turn.workers"
