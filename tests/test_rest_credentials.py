"""TURN REST credentials: known answers computed with openssl, so the formula is pinned
independently of our code (the relay and coturn verify exactly this)."""

from __future__ import annotations

import pytest

from turn.auth import make_credential, parse_rest_username
from turn.auth import rest_password as credential_for

SECRET = b"shared-secret-for-tests"


def test_known_answer_from_openssl():
    # printf '%s' "1700086400:alice" | openssl dgst -sha1 -hmac shared-secret-for-tests -binary | base64
    assert make_credential(SECRET, "alice", 1_700_000_000.9, 86400) == (
        "1700086400:alice",
        "J7kB0Y/1pifiX5T7ZFDHYzzA+xY=",
    )


def test_user_ids_may_contain_colons():
    username, credential = make_credential(SECRET, "user:with:colons", 1_700_000_000, 60)
    assert username == "1700000060:user:with:colons"
    assert credential == "QYIccPA2I+Qj+0GrOzgyV/Qtm3o=" == credential_for(SECRET, username)


def test_the_secret_and_the_username_both_matter():
    username, credential = make_credential(SECRET, "alice", 1_700_000_000, 86400)
    assert credential_for(SECRET + b"x", username) != credential
    assert credential_for(SECRET, username.replace("alice", "alicf")) != credential


@pytest.mark.parametrize("user, ttl, message", [("", 60, "user_id"), ("a", 0, "ttl_s"), ("a", -5, "ttl_s")])
def test_refuses_what_no_relay_would_accept(user, ttl, message):
    with pytest.raises(ValueError, match=message):
        make_credential(SECRET, user, 1_700_000_000, ttl)


def test_made_usernames_parse_back():
    username, _ = make_credential(SECRET, "user:with:colons", 1_700_000_000, 60)
    assert parse_rest_username(username) == (1_700_000_060, "user:with:colons")
    for bad in (
        "alice",
        ":alice",
        "12x:alice",
        "1700000060:",
        "9" * 13 + ":a",
        "²:x",
        "١٧٠٠:x",
        "1700000060²",
    ):  # digits int() refuses or reads otherwise
        assert parse_rest_username(bad) is None


def test_a_bare_expiry_is_a_username_with_no_user_part():
    # What `turnutils_uclient -W SECRET` sends without -u; coturn accepts it.
    assert parse_rest_username("1700000060") == (1_700_000_060, "")
