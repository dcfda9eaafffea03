"""The shared-secret ring file: round trip, atomic 0600 writes, refusals, grace ordering."""

from __future__ import annotations

import json
import os
import stat

import pytest

from appliance.secret_ring import (Secret, SecretRing, SecretRingError, ensure_ring, load_ring,
                                   new_secret, save_ring)

NOW = 1_900_000_000


def test_ensure_creates_then_loads(tmp_path):
    path = tmp_path / "d" / "secrets.json"
    ring, created = ensure_ring(path, NOW)
    assert created and len(ring.secrets) == 1
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    again, created = ensure_ring(path, NOW + 5)
    assert not created and again == ring


def test_round_trip_and_no_leftover_temp_files(tmp_path):
    path = tmp_path / "secrets.json"
    ring = SecretRing((new_secret(NOW), Secret("k-old", "o" * 32, NOW - 100, NOW - 10)))
    save_ring(path, ring)
    assert load_ring(path) == ring
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secrets.json"]


def test_accepted_puts_current_first_and_drops_secrets_past_grace():
    current = Secret("k-new", "n" * 32, NOW, None)
    recent = Secret("k-mid", "m" * 32, NOW - 1000, NOW - 100)
    expired = Secret("k-old", "o" * 32, NOW - 5000, NOW - 4000)
    ring = SecretRing((expired, recent, current))
    assert ring.current() is current
    assert ring.accepted(NOW, grace_s=3600) == (b"n" * 32, b"m" * 32)
    assert ring.accepted(NOW, grace_s=50) == (b"n" * 32,)


def test_repr_never_shows_the_secret():
    secret = new_secret(NOW)
    assert secret.value not in repr(secret)
    assert secret.value not in repr(SecretRing((secret,)))


@pytest.mark.parametrize("content, reason", [
    ("{not json", "not valid JSON"),
    ('{"version": 2, "secrets": []}', "expected"),
    ('{"version": 1, "secrets": []}', "non-empty"),
    ('{"version": 1, "secrets": [{"id": "a"}]}', "needs id, value and created"),
    ('{"version": 1, "secrets": [{"id": "a", "value": "short", "created": 1}]}', "malformed"),
    ('{"version": 1, "secrets": [{"id": "a", "value": "%s", "created": 1, "retired": 2}]}' % ("x" * 20),
     "no current secret"),
])
def test_corrupt_files_are_refused_with_the_file_name(tmp_path, content, reason):
    path = tmp_path / "secrets.json"
    path.write_text(content)
    with pytest.raises(SecretRingError) as info:
        load_ring(path)
    assert str(path) in str(info.value) and reason in str(info.value)


def test_unreadable_file(tmp_path):
    with pytest.raises(SecretRingError, match="cannot read"):
        load_ring(tmp_path / "missing.json")


def test_file_format_is_documented_json(tmp_path):
    path = tmp_path / "secrets.json"
    save_ring(path, SecretRing((Secret("k-1", "v" * 20, NOW, None),)))
    assert json.loads(path.read_text()) == {
        "version": 1, "secrets": [{"id": "k-1", "value": "v" * 20, "created": NOW, "retired": None}]}
