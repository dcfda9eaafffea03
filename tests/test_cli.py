"""The command line: check-config, credentials (verified by recomputing the HMAC),
secret list (never the secret), probe against a live relay, devcert reuse."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

from appliance.cli import main
from appliance.devcert import ensure_dev_certificate
from appliance.secret_ring import load_ring


def write_config(tmp_path, extra: str = "") -> str:
    path = tmp_path / "appliance.yaml"
    path.write_text(f"data_dir: {tmp_path / 'data'}\n{extra}")
    return str(path)


def test_check_config_ok_and_error(tmp_path, capsys):
    good = write_config(tmp_path)
    assert main(["check-config", good]) == 0
    assert "ok:" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("turn: {relay_ports: '9-1'}")
    assert main(["check-config", str(bad)]) == 2
    assert "error: turn.relay_ports:" in capsys.readouterr().err


def test_serve_with_a_bad_config_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("turn: {udp: nowhere}")
    assert main(["serve", "--config", str(bad)]) == 2
    assert "turn.udp" in capsys.readouterr().err


def test_credentials_follow_the_rest_scheme(tmp_path, capsys):
    config = write_config(tmp_path)
    from appliance.secret_ring import ensure_ring
    ensure_ring(tmp_path / "data" / "secrets.json", time.time())
    assert main(["credentials", "--user", "alice", "--ttl", "120", "--config", config]) == 0
    answer = json.loads(capsys.readouterr().out)
    expiry, user = answer["username"].split(":")
    assert user == "alice" and abs(int(expiry) - (time.time() + 120)) < 5
    secret = load_ring(tmp_path / "data" / "secrets.json").current().value.encode()
    expected = base64.b64encode(hmac.new(secret, answer["username"].encode(), hashlib.sha1).digest())
    assert answer["credential"] == expected.decode()


def test_secret_list_never_prints_the_secret(tmp_path, capsys):
    config = write_config(tmp_path)
    from appliance.secret_ring import ensure_ring
    ring, _ = ensure_ring(tmp_path / "data" / "secrets.json", time.time())
    assert main(["secret", "list", "--config", config]) == 0
    out = capsys.readouterr().out
    assert ring.current().id in out and "current" in out
    assert ring.current().value not in out


def test_missing_secret_ring_is_a_clear_error(tmp_path, capsys):
    config = write_config(tmp_path)
    assert main(["credentials", "--user", "a", "--config", config]) == 2
    assert "secret ring" in capsys.readouterr().err


def test_probe_fails_cleanly_when_nothing_listens(tmp_path, capsys):
    config = write_config(tmp_path, "turn: {udp: '127.0.0.1:9', tcp: null}\n")
    assert main(["probe", "--config", config, "--timeout", "0.3"]) == 1
    assert "no STUN answer" in capsys.readouterr().err


def test_dev_certificate_is_created_once_and_private(tmp_path):
    import stat
    cert, key, created = ensure_dev_certificate(tmp_path / "certs")
    assert created and cert.exists()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert ensure_dev_certificate(tmp_path / "certs")[2] is False
