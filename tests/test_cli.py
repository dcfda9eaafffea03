"""The command line: check-config exit codes and summary, serve's configuration errors,
credentials (verified by recomputing the HMAC), secret list (never the secret), healthcheck."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance.cli import main
from appliance.config.loader import load_config
from appliance.credentials.ring import Secret, SecretRing, ensure_ring, load_ring, save_ring

from .netports import distinct_port_pairs

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """The commands read APPLIANCE_CONFIG and APPLIANCE__* overrides: none leak in from outside."""
    import os

    for var in list(os.environ):
        if var.upper().startswith("APPLIANCE_"):
            monkeypatch.delenv(var)


def write_config(tmp_path, extra: str = "") -> str:
    path = tmp_path / "appliance.yaml"
    path.write_text(f"data_dir: {tmp_path / 'data'}\n{extra}")
    return str(path)


def rest_credential(secret: str, username: str) -> str:
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


# ------------------------------------------------------------------ check-config


def test_check_config_ok_prints_a_summary(tmp_path, capsys):
    good = write_config(
        tmp_path,
        "external_ip: 203.0.113.7\n"
        "turn: {udp: '0.0.0.0:3478', tls: null, relay_ip: 0.0.0.0, "
        "relay_ports: 61000-61100}\n",
    )
    assert main(["check-config", good]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == f"ok: {good}" and err == ""
    assert "udp 0.0.0.0:3478, tcp 127.0.0.1:3478, tls off" in out
    assert "0.0.0.0 (advertised as 203.0.113.7), ::1" in out
    assert "ports 61000-61100" in out
    assert str(tmp_path / "data" / "secrets.json") in out


def test_check_config_names_the_broker_without_its_password(tmp_path, capsys):
    assert main(["check-config", write_config(tmp_path)]) == 0
    assert "  broker:      memory (this node alone)" in capsys.readouterr().out
    shared = write_config(
        tmp_path,
        "broker: {url: 'redis://:hunter2@10.0.0.5:6379/1', node_ttl_s: 5}\ncredentials: {store: redis}\n",
    )
    assert main(["check-config", shared]) == 0
    out = capsys.readouterr().out
    assert "  broker:      redis redis://***@10.0.0.5:6379/1 (prefix appliance:, node ttl 5 s)" in out
    assert "hunter2" not in out
    assert "redis://***@10.0.0.5:6379/1 key appliance:secrets" in out  # the ring shares it


def test_check_config_error_exits_2_with_the_key_path(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("turn: {relay_ports: '9-1'}")
    assert main(["check-config", str(bad)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == "error: turn.relay_ports: low port 9 is above high port 1\n"


def test_check_config_of_a_missing_file(tmp_path, capsys):
    assert main(["check-config", str(tmp_path / "nope.yaml")]) == 2
    assert capsys.readouterr().err.startswith("error: (file): cannot read")


def test_check_config_sees_environment_overrides(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("APPLIANCE__TURN__WORKERS", "100")
    assert main(["check-config", write_config(tmp_path)]) == 2
    assert (
        capsys.readouterr().err
        == "error: turn.workers: must be in 1-64, got 100 (set by APPLIANCE__TURN__WORKERS)\n"
    )


def test_shipped_configuration_checks_ok(capsys):
    assert main(["check-config", str(ROOT / "config" / "appliance.yaml")]) == 0
    assert "udp 127.0.0.1:3478, tcp 127.0.0.1:3478, tls 127.0.0.1:5349" in capsys.readouterr().out


def test_check_config_warns_when_the_development_key_is_reachable(tmp_path, capsys):
    exposed = write_config(tmp_path, "http: {listen: '0.0.0.0:8443'}\n")
    assert main(["check-config", exposed]) == 0  # a warning, not an error
    out, err = capsys.readouterr()
    assert out.startswith(f"ok: {exposed}")
    assert err.startswith("warning: http.listen 0.0.0.0:8443 is not loopback") and err.count("\n") == 1
    assert "anyone who gets a token signed with it, or the key, logs in as any user" in err
    for remedy in ("auth.jwt_key", "APPLIANCE__AUTH__JWT_KEY", "auth.jwt_public_key", "auth.mode http"):
        assert remedy in err
    for safe in (
        "http: {listen: '127.0.0.1:8443'}",  # only this machine reaches it
        "http: {listen: '[::1]:8443'}",
        "http: {listen: null}\ncredentials: {external: ['turn:192.0.2.1:3478']}",
        "http: {listen: '0.0.0.0:8443'}\nauth: {jwt_key: " + "k" * 40 + "}",
        "http: {listen: '0.0.0.0:8443'}\nauth: {mode: http, introspect_url: 'https://im.example.com/check'}",
    ):
        assert main(["check-config", write_config(tmp_path, safe + "\n")]) == 0
        assert capsys.readouterr().err == "", safe


def test_serve_warns_at_start_when_the_development_key_is_reachable(tmp_path, capsys, monkeypatch):
    import appliance.process.supervisor

    monkeypatch.setattr(appliance.process.supervisor, "run", lambda config, tls_files, path: 0)  # no servers
    exposed = write_config(tmp_path, "turn: {tls: null}\nhttp: {listen: '0.0.0.0:8443', tls: false}\n")
    assert main(["serve", "--config", exposed]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "development JWT key" in warnings[0]


def ephemeral_range(tmp_path, text: str) -> Path:
    """A stand-in for /proc/sys/net/ipv4/ip_local_port_range (which holds "low\thigh\n")."""
    path = tmp_path / "ip_local_port_range"
    path.write_text(text)
    return path


def test_relay_ports_in_the_ephemeral_range_get_one_warning(tmp_path, capsys):
    from appliance.config.ephemeral_ports import warn_relay_ports_in_ephemeral_range as warn

    linux_default = ephemeral_range(tmp_path, "32768\t60999\n")
    for ports, warned in (
        ("49152-65535", True),
        ("32768-32768", True),
        ("60999-61010", True),
        ("20000-40000", True),
        ("61000-65535", False),
        ("20000-32767", False),
    ):
        warn(load_config(write_config(tmp_path, f"turn: {{relay_ports: {ports}}}\n")), linux_default)
        err = capsys.readouterr().err
        assert err.count("warning:") == err.count("\n") == int(warned), ports
    warn(load_config(write_config(tmp_path, "turn: {relay_ports: 49152-65535}\n")), linux_default)
    err = capsys.readouterr().err
    assert err.startswith(
        "warning: turn.relay_ports 49152-65535 overlaps this machine's "
        "ephemeral port range 32768-60999 (net.ipv4.ip_local_port_range)"
    )
    for remedy in ("outside it (e.g. 61000-65535)", "sysctl net.ipv4.ip_local_port_range"):
        assert remedy in err
    # No relay running, or no range to read (not Linux): nothing to say.
    no_relay = (
        "turn: {udp: null, tcp: null, tls: null, relay_ports: 49152-65535}\n"
        "credentials: {external: ['turn:192.0.2.1:3478']}\n"
    )
    warn(load_config(write_config(tmp_path, no_relay)), linux_default)
    warn(load_config(write_config(tmp_path, "turn: {relay_ports: 49152-65535}\n")), tmp_path / "nope")
    assert capsys.readouterr().err == ""


def test_check_config_and_serve_warn_about_the_ephemeral_range(tmp_path, capsys, monkeypatch):
    import functools

    import appliance.cli
    import appliance.process.supervisor
    from appliance.config.ephemeral_ports import warn_relay_ports_in_ephemeral_range as warn

    wide = ephemeral_range(tmp_path, "1024 65535\n")
    monkeypatch.setattr(
        appliance.cli, "warn_relay_ports_in_ephemeral_range", functools.partial(warn, range_file=wide)
    )
    monkeypatch.setattr(appliance.process.supervisor, "run", lambda config, tls_files, path: 0)  # no servers
    config = write_config(tmp_path, "turn: {tls: null}\n")
    for argv in (["check-config", config], ["serve", "--config", config]):
        assert main(argv) == 0
        warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
        assert len(warnings) == 1 and "ephemeral port range 1024-65535" in warnings[0], argv


def test_python_dash_m_runs_the_same_command_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("turn: {udpp: 1}")
    done = subprocess.run(
        [sys.executable, "-m", "appliance", "check-config", str(bad)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert (done.returncode, done.stderr) == (2, "error: turn.udpp: unknown key\n")


# ------------------------------------------------------------------ serve


def test_serve_with_a_bad_config_exits_2_before_touching_anything(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"data_dir: {tmp_path / 'data'}\nturn: {{udp: nowhere:3478}}")
    assert main(["serve", "--config", str(bad)]) == 2
    assert (
        capsys.readouterr().err
        == "error: turn.udp: 'nowhere' is not an IP address (hostnames are not allowed)\n"
    )
    assert not (tmp_path / "data").exists()  # no secret ring, no certificate


def test_serve_reads_appliance_config_from_the_environment(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "mounted.yaml"
    bad.write_text("log_level: chatty")
    monkeypatch.setenv("APPLIANCE_CONFIG", str(bad))
    assert main(["serve"]) == 2
    assert capsys.readouterr().err.startswith("error: log_level: must be one of")


# ------------------------------------------------------------------ credentials


def test_credentials_follow_the_rest_scheme(tmp_path, capsys):
    config = write_config(tmp_path)
    ensure_ring(tmp_path / "data" / "secrets.json", time.time())
    before = int(time.time())
    assert main(["credentials", "--user", "alice", "--ttl", "120", "--config", config]) == 0
    after = int(time.time())
    answer = json.loads(capsys.readouterr().out)
    assert set(answer) == {"username", "credential", "ttl", "iceServers"} and answer["ttl"] == 120
    expiry, user = answer["username"].split(":", 1)
    assert user == "alice" and before + 120 <= int(expiry) <= after + 120
    secret = load_ring(tmp_path / "data" / "secrets.json").current().value
    assert answer["credential"] == rest_credential(secret, answer["username"])


def test_credentials_use_the_current_secret_and_the_configured_ttl(tmp_path, capsys):
    config = write_config(tmp_path, "credentials: {ttl_s: 600}\n")
    now = int(time.time())
    current = Secret("k-new", "n" * 43, now - 50, None)  # past its 5 s activation
    save_ring(
        tmp_path / "data" / "secrets.json",
        SecretRing((Secret("k-old", "o" * 43, now - 100, now - 50), current)),
    )
    assert main(["credentials", "--user", "bob:phone", "--config", config]) == 0
    out = capsys.readouterr().out
    answer = json.loads(out)
    assert answer["ttl"] == 600 and answer["username"].endswith(":bob:phone")
    assert answer["credential"] == rest_credential(current.value, answer["username"])
    assert "n" * 43 not in out


def test_credentials_without_a_ring_say_how_to_get_one(tmp_path, capsys):
    config = write_config(tmp_path)
    assert main(["credentials", "--user", "a", "--config", config]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: secret ring: ") and "does not exist yet" in err
    assert "appliance serve" in err
    assert not (tmp_path / "data").exists()  # a read command creates nothing


def test_credentials_with_a_corrupt_ring_name_the_file(tmp_path, capsys):
    config = write_config(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "secrets.json").write_text("{")
    assert main(["credentials", "--user", "a", "--config", config]) == 2
    assert f"{tmp_path / 'data' / 'secrets.json'}: not valid JSON" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args", [["--user", "a", "--ttl", "0"], ["--user", "a", "--ttl", "x"], ["--user", ""], []]
)
def test_credentials_argument_errors_exit_2(args, capsys):
    with pytest.raises(SystemExit) as info:
        main(["credentials", *args])
    assert info.value.code == 2


# ------------------------------------------------------------------ secret list


def test_secret_list_shows_ids_ages_and_states_never_values(tmp_path, capsys, monkeypatch):
    config = write_config(tmp_path, "credentials: {ttl_s: 3600}\n")
    now = int(time.time())
    monkeypatch.setattr(time, "time", lambda: float(now))  # ages computed at a known instant
    ring = SecretRing(
        (
            Secret("k-current", "c" * 43, now - 7200, None),
            Secret("k-grace", "g" * 43, now - 90000, now - 600),
            Secret("k-gone", "x" * 43, now - 200000, now - 86400),
        )
    )
    save_ring(tmp_path / "data" / "secrets.json", ring)
    assert main(["secret", "list", "--config", config]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert "created     2h ago" in lines["k-current"] and "current" in lines["k-current"]
    assert "retired 10m ago, accepted 50m more" in lines["k-grace"]
    assert "retired 1d ago, no longer accepted" in lines["k-gone"]
    assert list(lines) == ["k-current", "k-grace", "k-gone"]  # newest first
    for secret in ring.secrets:
        assert secret.value not in out


def test_secret_list_without_a_ring(tmp_path, capsys):
    assert main(["secret", "list", "--config", write_config(tmp_path)]) == 2
    assert "does not exist yet" in capsys.readouterr().err


# ------------------------------------------------------------------ healthcheck


def test_healthcheck_fails_cleanly_when_nothing_listens(tmp_path, capsys):
    config = write_config(tmp_path, "turn: {udp: '127.0.0.1:9', tcp: null}\n")
    assert main(["healthcheck", "--config", config, "--timeout", "0.3"]) == 1
    assert "healthcheck: no STUN answer from 127.0.0.1:9" in capsys.readouterr().err


def test_healthcheck_without_a_listener(tmp_path, capsys):
    # No relay listener at all: the signaling must be off too (it would hand out no ICE server).
    config = write_config(tmp_path, "turn: {udp: null, tcp: null, tls: null}\nhttp: {listen: null}\n")
    assert main(["healthcheck", "--config", config]) == 1
    assert "no UDP, TCP, TLS or edge listener" in capsys.readouterr().err


def test_a_just_rotated_secret_signs_only_after_activation(tmp_path, capsys):
    config = write_config(tmp_path, "credentials: {ttl_s: 600}\n")
    now = int(time.time())
    old = Secret("k-old", "o" * 43, now - 1000, now - 100)
    save_ring(tmp_path / "data" / "secrets.json", SecretRing((old, Secret("k-new", "n" * 43, now))))
    assert main(["credentials", "--user", "bob", "--config", config]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["credential"] == rest_credential(old.value, answer["username"])
    # It is capped so that it expires when the old secret's grace ends.
    assert 490 <= answer["ttl"] <= 500


def test_credentials_list_the_embedded_relays_urls(tmp_path, capsys):
    config = write_config(
        tmp_path,
        "credentials: {host: turn.example.com, external: ['turns:coturn.example.com:443?transport=tcp']}\n",
    )
    ensure_ring(tmp_path / "data" / "secrets.json", time.time() - 60)
    assert main(["credentials", "--user", "alice", "--config", config]) == 0
    answer = json.loads(capsys.readouterr().out)
    urls = [e["urls"] for e in answer["iceServers"]]
    assert urls == [
        "stun:turn.example.com:3478",
        "turn:turn.example.com:3478?transport=udp",
        "turn:turn.example.com:3478?transport=tcp",
        "turns:turn.example.com:5349?transport=tcp",
        "turns:coturn.example.com:443?transport=tcp",
    ]
    assert all(e["url"] == e["urls"] for e in answer["iceServers"])
    stun_entry, *turn_entries = answer["iceServers"]
    assert stun_entry["username"] is None and stun_entry["credential"] is None
    assert {(e["username"], e["credential"]) for e in turn_entries} == {
        (answer["username"], answer["credential"])
    }


# ------------------------------------------------------------------ secret rotate / prune / coturn-config


def test_secret_rotate_then_list_then_prune(tmp_path, capsys):
    config = write_config(tmp_path, "credentials: {ttl_s: 600, secret_grace_s: 0}\n")
    path = tmp_path / "data" / "secrets.json"
    first, _ = ensure_ring(path, time.time() - 100)
    assert main(["secret", "rotate", "--config", config]) == 0
    out = capsys.readouterr().out
    ring = load_ring(path)
    assert len(ring.secrets) == 2 and ring.current().id != first.current().id
    assert ring.current().id in out and first.current().value not in out
    assert ring.current().value not in out
    assert main(["secret", "list", "--show", "--config", config]) == 0
    assert ring.current().value in capsys.readouterr().out
    assert main(["secret", "prune", "--config", config]) == 0
    assert first.current().id in capsys.readouterr().out
    assert [s.id for s in load_ring(path).secrets] == [ring.current().id]


def test_secret_rotate_refuses_a_corrupt_ring(tmp_path, capsys):
    config = write_config(tmp_path)
    path = tmp_path / "data" / "secrets.json"
    path.parent.mkdir(parents=True)
    path.write_text("[]")
    assert main(["secret", "rotate", "--config", config]) == 2
    assert str(path) in capsys.readouterr().err and path.read_text() == "[]"


def test_coturn_config_carries_every_accepted_secret_and_the_deny_list(tmp_path, capsys):
    config = write_config(tmp_path, "realm: example.org\n")
    now = int(time.time())
    ring = SecretRing(
        (
            Secret("k-gone", "g" * 43, now - 10**6, now - 10**6 + 1),
            Secret("k-old", "o" * 43, now - 100, now - 50),
            Secret("k-new", "n" * 43, now - 50),
        )
    )
    save_ring(tmp_path / "data" / "secrets.json", ring)
    assert main(["coturn-config", "--config", config]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "use-auth-secret" in lines and "realm=example.org" in lines
    secrets = [line.split("=", 1)[1] for line in lines if line.startswith("static-auth-secret=")]
    assert secrets == ["n" * 43, "o" * 43]
    assert "denied-peer-ip=10.0.0.0-10.255.255.255" in lines
    assert "denied-peer-ip=169.254.0.0-169.254.255.255" in lines
    assert "denied-peer-ip=::ffff:0:0-::ffff:ffff:ffff" in lines
    assert "denied-peer-ip=::ffff:0:0:0-::ffff:0:ffff:ffff" in lines  # SIIT (RFC 2765)


# ------------------------------------------------------------------ probe: where and as whom


def probe_args(*argv):
    from appliance.cli import build_parser

    return build_parser().parse_args(["probe", *argv])


def test_probe_mints_tokens_with_the_development_key(tmp_path, capsys):
    import asyncio

    from appliance.cli import _probe_target, _probe_users
    from appliance.wiring.auth import token_verifier

    config = load_config(write_config(tmp_path), {})
    users = _probe_users(config, probe_args())
    assert [u for u, _ in users] == ["probe-a", "probe-b"]
    assert capsys.readouterr().err.startswith("warning: created a new development JWT key")
    verifier = token_verifier(config)
    assert [asyncio.run(verifier.verify(t)) for _, t in users] == ["probe-a", "probe-b"]
    url, _ = _probe_target(config, probe_args())
    assert url == "https://127.0.0.1:8443/imserver"


def test_probe_takes_two_static_users_or_asks_for_tokens(tmp_path, capsys):
    from appliance.cli import _probe_users

    static = load_config(
        write_config(tmp_path, "auth: {mode: static, tokens: {t1: ann, t2: ann, t3: ben}}\n"), {}
    )
    assert _probe_users(static, probe_args()) == [("ann", "t1"), ("ben", "t3")]
    one_user = write_config(tmp_path, "auth: {mode: static, tokens: {t1: ann}}\n")
    assert main(["probe", "--config", one_user]) == 2
    assert "--user-a USER=TOKEN" in capsys.readouterr().err
    given = _probe_users(static, probe_args("--user-a", "x=1", "--user-b", "y=2=3"))
    assert given == [("x", "1"), ("y", "2=3")]


# ------------------------------------------------------------------ token: one key for every command


def test_token_warns_when_it_creates_the_development_key(tmp_path, capsys):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        config = write_config(tmp_path, f"http: {{listen: '127.0.0.1:{server.getsockname()[1]}'}}\n")
        key_file = tmp_path / "data" / "jwt.key"
        assert main(["token", "--user", "alice", "--config", config]) == 0
        out, err = capsys.readouterr()
        assert out.count(".") == 2  # a JWT
        assert err.startswith(f"warning: created a new development JWT key at {key_file}; ")
        assert "refuse" not in err  # nothing is listening
        key_file.unlink()
        server.listen()  # now "a server" answers on http.listen, with another key
        assert main(["token", "--user", "alice", "--config", config]) == 0
        err = capsys.readouterr().err
        assert err.startswith(f"warning: created a new development JWT key at {key_file}; ")
        assert "will refuse these tokens (401)" in err
        assert "Pass the same --config or APPLIANCE__DATA_DIR as that server" in err
        assert main(["token", "--user", "alice", "--config", config]) == 0
        assert capsys.readouterr().err == ""  # the key exists: no warning


# The default data_dir of root is /var/lib/appliance, and the tests may run as root: the
# commands below pretend to be an ordinary user so that their state goes to XDG_STATE_HOME
# under tmp_path, never to /var/lib or the real home.
AS_A_USER = (
    "import os, sys; os.geteuid = lambda: 1000; from appliance.cli import main; sys.exit(main(sys.argv[1:]))"
)


def test_token_from_another_directory_is_accepted_by_a_server_started_without_config(tmp_path):
    import httpx

    udp, tls, http, admin = distinct_port_pairs(4)
    env = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": str(ROOT),
        "HOME": str(tmp_path / "home"),
        "XDG_STATE_HOME": str(tmp_path / "state"),
        "APPLIANCE__TURN__UDP": f"127.0.0.1:{udp}",
        "APPLIANCE__TURN__TCP": f"127.0.0.1:{udp}",
        "APPLIANCE__TURN__TLS": f"127.0.0.1:{tls}",
        "APPLIANCE__HTTP__LISTEN": f"127.0.0.1:{http}",
        "APPLIANCE__ADMIN__LISTEN": f"127.0.0.1:{admin}",
    }
    data_dir = tmp_path / "state" / "appliance"
    serve_dir, other_dir = tmp_path / "serve", tmp_path / "elsewhere"
    serve_dir.mkdir()
    other_dir.mkdir()
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", AS_A_USER, "serve"],
            cwd=serve_dir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while "  data:" not in log_path.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        served = log_path.read_text()
        assert "what next:" in served, served

        # Start-up says where to go next, with this machine's addresses and the state's place.
        base = f"https://127.0.0.1:{http}/imserver"
        assert f"  demo page:   {base}/demo/" in served
        assert "  tokens:      appliance token --user NAME" in served
        assert f"  iceServers:  GET {base}/turn/get-turn-credentials" in served
        assert f"http://127.0.0.1:{admin}/healthz" in served
        assert f"http://127.0.0.1:{admin}/metrics" in served
        assert f"  data:        {data_dir}" in served
        assert not (serve_dir / "data").exists()

        minted = subprocess.run(
            [sys.executable, "-c", AS_A_USER, "token", "--user", "alice"],
            cwd=other_dir,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert (minted.returncode, minted.stderr) == (0, "")  # the server's key: no warning
        assert not (other_dir / "data").exists()

        # The development certificate is found in the same place too (what the probe trusts).
        trust = ssl.create_default_context(cafile=str(data_dir / "certs" / "cert.pem"))
        url = f"{base}/turn/get-turn-credentials"
        answer = httpx.get(url, headers={"ide": minted.stdout.strip()}, verify=trust, timeout=5)
        assert answer.status_code == 200 and answer.json()["code"] == 200, answer.text
        turn = [e for e in answer.json()["data"]["iceServers"] if e["username"] is not None]
        assert turn and all(e["username"].endswith(":alice") for e in turn)
        refused = httpx.get(url, headers={"ide": minted.stdout.strip() + "x"}, verify=trust, timeout=5)
        assert refused.status_code == 401
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log_path.read_text()
