"""The shared-secret ring file: round trip, atomic 0600 writes, refusals that name the file,
current/accepted ordering with grace, and secret values kept out of reprs."""

from __future__ import annotations

import json
import os
import re
import stat

import pytest

import appliance.credentials.ring as secret_ring
from appliance.credentials.ring import (
    Secret,
    SecretRing,
    SecretRingError,
    ensure_ring,
    load_ring,
    new_secret,
    prune_ring,
    rotate_ring,
    save_ring,
)

NOW = 1_900_000_000


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_new_secret_has_the_documented_shape():
    s = new_secret(NOW + 0.9)
    assert re.fullmatch(r"k-[0-9a-f]{8}", s.id)
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", s.value)  # token_urlsafe(32)
    assert (s.created, s.retired) == (NOW, None)
    assert new_secret(NOW).value != s.value


def test_ensure_creates_then_loads(tmp_path):
    path = tmp_path / "d" / "secrets.json"
    ring, created = ensure_ring(path, NOW)
    assert created and len(ring.secrets) == 1 and ring.current().created == NOW
    assert mode_of(path) == 0o600 and mode_of(path.parent) == 0o700
    again, created = ensure_ring(path, NOW + 5)
    assert not created and again == ring
    assert sorted(p.name for p in path.parent.iterdir()) == ["secrets.json"]


def test_ensure_never_replaces_an_existing_broken_ring(tmp_path):
    path = tmp_path / "secrets.json"
    path.write_text("{broken")
    with pytest.raises(SecretRingError, match="not valid JSON"):
        ensure_ring(path, NOW)
    assert path.read_text() == "{broken"


def test_ensure_keeps_a_ring_another_process_created_first(tmp_path, monkeypatch):
    """Two processes starting together: the one that loses the race loads the winner's ring."""
    path = tmp_path / "secrets.json"
    theirs = SecretRing((new_secret(NOW),))
    real_link = os.link

    def link_after_the_other_process(src, dst):
        save_ring(dst, theirs)
        return real_link(src, dst)

    monkeypatch.setattr(secret_ring.os, "link", link_after_the_other_process)
    ring, created = ensure_ring(path, NOW)
    assert not created and ring == theirs == load_ring(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secrets.json"]


def test_round_trip_and_no_leftover_temp_files(tmp_path):
    path = tmp_path / "secrets.json"
    ring = SecretRing((new_secret(NOW), Secret("k-old", "o" * 32, NOW - 100, NOW - 10)))
    save_ring(path, ring)
    assert load_ring(path) == ring
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secrets.json"]
    assert mode_of(path) == 0o600


def test_save_replaces_atomically_and_tightens_the_mode(tmp_path):
    path = tmp_path / "secrets.json"
    path.write_text("old contents")
    os.chmod(path, 0o644)
    old_inode = os.stat(path).st_ino
    ring = SecretRing((new_secret(NOW),))
    save_ring(path, ring)
    # A new inode: readers holding the old file saw the old ring whole, never a partial write.
    assert os.stat(path).st_ino != old_inode
    assert mode_of(path) == 0o600 and load_ring(path) == ring


def test_a_failed_write_leaves_the_old_ring_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "secrets.json"
    old = SecretRing((new_secret(NOW),))
    save_ring(path, old)

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(secret_ring.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_ring(path, SecretRing((new_secret(NOW + 1),)))
    assert load_ring(path) == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secrets.json"]


def test_save_refuses_a_ring_without_a_current_secret(tmp_path):
    with pytest.raises(SecretRingError, match="no current"):
        save_ring(tmp_path / "secrets.json", SecretRing((Secret("k-1", "v" * 20, NOW, NOW),)))
    assert not (tmp_path / "secrets.json").exists()


def test_current_is_the_newest_non_retired():
    newest_retired = Secret("k-c", "c" * 32, NOW, NOW + 1)
    live_new = Secret("k-b", "b" * 32, NOW - 10, None)
    live_old = Secret("k-a", "a" * 32, NOW - 20, None)
    assert SecretRing((live_old, newest_retired, live_new)).current() is live_new


def test_accepted_puts_current_first_then_newest_first_within_grace():
    current = Secret("k-new", "n" * 32, NOW, None)
    recent = Secret("k-mid", "m" * 32, NOW - 1000, NOW - 100)
    older = Secret("k-old", "o" * 32, NOW - 5000, NOW - 900)
    ring = SecretRing((older, current, recent))
    assert ring.current() is current
    assert ring.accepted(NOW, grace_s=3600) == (b"n" * 32, b"m" * 32, b"o" * 32)
    assert ring.accepted(NOW, grace_s=500) == (b"n" * 32, b"m" * 32)
    assert ring.accepted(NOW, grace_s=50) == (b"n" * 32,)
    # The boundary: retired + grace == now is no longer accepted.
    assert ring.accepted(NOW, grace_s=100) == (b"n" * 32,)
    assert ring.accepted(NOW, grace_s=100.5) == (b"n" * 32, b"m" * 32)


def test_an_older_secret_not_yet_retired_stays_accepted_after_the_current():
    current = Secret("k-new", "n" * 32, NOW, None)
    previous = Secret("k-prev", "p" * 32, NOW - 10, None)
    assert SecretRing((previous, current)).accepted(NOW + 10**6, grace_s=0) == (b"n" * 32, b"p" * 32)


def test_a_ring_without_a_current_secret_raises():
    ring = SecretRing((Secret("k-1", "v" * 20, NOW, NOW),))
    with pytest.raises(SecretRingError, match="no current"):
        ring.current()
    with pytest.raises(SecretRingError, match="no current"):
        ring.accepted(NOW, 10)


def test_repr_never_shows_the_secret():
    secret = new_secret(NOW)
    assert secret.value not in repr(secret) and secret.value not in str(secret)
    assert secret.id in repr(secret)
    assert secret.value not in repr(SecretRing((secret,)))


def test_errors_never_show_the_secret(tmp_path):
    path = tmp_path / "secrets.json"
    value = "s3cret-value-that-must-not-leak"
    path.write_text(
        json.dumps({"version": 1, "secrets": [{"id": "k-1", "value": value, "created": "yesterday"}]})
    )
    with pytest.raises(SecretRingError) as info:
        load_ring(path)
    assert value not in str(info.value) and "k-1" in str(info.value)


def entry(**overrides) -> dict:
    item = {"id": "k-1", "value": "x" * 20, "created": 1, "retired": None}
    item.update(overrides)
    return {key: value for key, value in item.items() if value != "DROP"}


@pytest.mark.parametrize(
    "content, reason",
    [
        ("{not json", "not valid JSON (Expecting property name"),
        ("[]", 'expected {"version": 1'),
        ('{"secrets": []}', "found version None"),
        ('{"version": 2, "secrets": []}', "found version 2"),
        ('{"version": 1}', '"secrets" must be a non-empty list'),
        ('{"version": 1, "secrets": []}', '"secrets" must be a non-empty list'),
        ('{"version": 1, "secrets": ["k-1"]}', "secrets[0] needs id, value and created"),
        (json.dumps({"version": 1, "secrets": [entry(value="DROP")]}), "needs id, value and created"),
        (json.dumps({"version": 1, "secrets": [entry(created="DROP")]}), "needs id, value and created"),
        (json.dumps({"version": 1, "secrets": [entry(extra=1)]}), "unknown fields ['extra']"),
        (json.dumps({"version": 1, "secrets": [entry(id="")]}), "id must be non-empty"),
        (json.dumps({"version": 1, "secrets": [entry(value="short")]}), "at least 16 characters"),
        (json.dumps({"version": 1, "secrets": [entry(value=12345678901234567)]}), "value is malformed"),
        (json.dumps({"version": 1, "secrets": [entry(created=1.5)]}), "created and retired"),
        (json.dumps({"version": 1, "secrets": [entry(created=True)]}), "created and retired"),
        (json.dumps({"version": 1, "secrets": [entry(retired="no")]}), "created and retired"),
        (json.dumps({"version": 1, "secrets": [entry(), entry(value="y" * 20)]}), "'k-1' appears twice"),
        (json.dumps({"version": 1, "secrets": [entry(retired=2)]}), "no current secret"),
    ],
)
def test_corrupt_files_are_refused_with_the_file_name(tmp_path, content, reason):
    path = tmp_path / "secrets.json"
    path.write_text(content)
    with pytest.raises(SecretRingError) as info:
        load_ring(path)
    assert str(info.value).startswith(f"{path}: ") and reason in str(info.value)


def test_binary_garbage_is_refused(tmp_path):
    path = tmp_path / "secrets.json"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(SecretRingError, match="not valid JSON"):
        load_ring(path)


def test_unreadable_file(tmp_path):
    with pytest.raises(SecretRingError, match=r"missing.json: cannot read \(No such file"):
        load_ring(tmp_path / "missing.json")
    with pytest.raises(SecretRingError, match="cannot read"):
        load_ring(tmp_path)  # a directory


def test_file_format_is_the_documented_json(tmp_path):
    path = tmp_path / "secrets.json"
    save_ring(
        path, SecretRing((Secret("k-1", "v" * 20, NOW, None), Secret("k-0", "w" * 20, NOW - 9, NOW - 1)))
    )
    assert json.loads(path.read_text()) == {
        "version": 1,
        "secrets": [
            {"id": "k-1", "value": "v" * 20, "created": NOW, "retired": None},
            {"id": "k-0", "value": "w" * 20, "created": NOW - 9, "retired": NOW - 1},
        ],
    }


# ------------------------------------------------------------------ lifecycle: rotate, sign, prune


def test_rotation_retires_the_live_secret_and_keeps_it_accepted_through_grace():
    old = Secret("k-old", "o" * 32, NOW - 1000)
    new = Secret("k-new", "n" * 32, NOW)
    ring = SecretRing((old,)).rotated(new, NOW)
    assert ring.current() is new
    assert [s.retired for s in ring.secrets] == [NOW, None]
    assert ring.accepted(NOW + 99.9, 100) == (b"n" * 32, b"o" * 32)
    assert ring.accepted(NOW + 100, 100) == (b"n" * 32,)


def test_a_new_secret_signs_only_after_its_activation_delay():
    old = Secret("k-old", "o" * 32, NOW - 1000)
    ring = SecretRing((old,)).rotated(Secret("k-new", "n" * 32, NOW), NOW)
    assert ring.signing(NOW + 4.9, grace_s=100, activation_s=5).id == "k-old"
    assert ring.signing(NOW + 5, grace_s=100, activation_s=5).id == "k-new"
    # No grace: the old secret is no longer accepted, so the new one signs at once.
    assert ring.signing(NOW + 1, grace_s=0, activation_s=5).id == "k-new"


def test_a_first_ring_signs_with_its_only_secret_at_once():
    ring = SecretRing((Secret("k-1", "a" * 32, NOW),))
    assert ring.signing(NOW, grace_s=100, activation_s=5).id == "k-1"


def test_prune_drops_only_secrets_past_grace():
    ring = SecretRing(
        (
            Secret("k-a", "a" * 32, NOW - 500, NOW - 300),
            Secret("k-b", "b" * 32, NOW - 200, NOW - 50),
            Secret("k-c", "c" * 32, NOW - 50),
        )
    )
    kept, dropped = ring.pruned(NOW, grace_s=100)
    assert [s.id for s in dropped] == ["k-a"]
    assert [s.id for s in kept.secrets] == ["k-b", "k-c"]


def test_rotate_and_prune_on_the_file(tmp_path):
    path = tmp_path / "ring" / "secrets.json"
    first, _ = ensure_ring(path, NOW - 1000)
    ring, secret = rotate_ring(path, NOW)
    assert load_ring(path) == ring and ring.current() == secret
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert prune_ring(path, NOW + 10, grace_s=100) == ()
    dropped = prune_ring(path, NOW + 100, grace_s=100)
    assert [s.id for s in dropped] == [first.current().id]
    assert [s.id for s in load_ring(path).secrets] == [secret.id]


def test_rotating_a_corrupt_file_changes_nothing(tmp_path):
    path = tmp_path / "secrets.json"
    path.write_text("{not json")
    with pytest.raises(SecretRingError, match="not valid JSON"):
        rotate_ring(path, NOW)
    assert path.read_text() == "{not json"


def test_concurrent_rotations_keep_every_secret(tmp_path):
    import threading

    path = tmp_path / "secrets.json"
    ensure_ring(path, NOW)
    threads = [threading.Thread(target=rotate_ring, args=(path, NOW + i)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(load_ring(path).secrets) == 9


def test_a_rotation_within_the_same_second_still_signs_with_the_new_secret():
    ring = SecretRing((Secret("k-old", "o" * 32, NOW),)).rotated(Secret("k-new", "n" * 32, NOW), NOW)
    assert ring.signing(NOW + 1, grace_s=100, activation_s=1).id == "k-new"
    assert ring.signing(NOW + 0.5, grace_s=100, activation_s=1).id == "k-old"  # none activated yet
