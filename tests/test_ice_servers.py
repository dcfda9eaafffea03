"""The iceServers answer: URLs from the configuration (hosts, wildcards, IPv6, overrides,
external coturn), REST credentials from the signing secret, ttl capped by grace."""

from __future__ import annotations

import pytest

from appliance.config.loader import load_config
from appliance.credentials.ice_servers import CredentialIssuer, embedded_urls, handed_out_urls
from appliance.credentials.ring import Secret, SecretRing
from turn.auth import Revocation, rest_password

NOW = 1_900_000_000.0


def config_of(tmp_path, text: str, env=None):
    path = tmp_path / "appliance.yaml"
    path.write_text(text)
    return load_config(path, env or {})


def test_defaults_are_one_stun_and_a_turn_url_per_listener(tmp_path):
    assert embedded_urls(config_of(tmp_path, "")) == [
        "stun:127.0.0.1:3478",
        "turn:127.0.0.1:3478?transport=udp",
        "turn:127.0.0.1:3478?transport=tcp",
        "turns:127.0.0.1:5349?transport=tcp",
    ]


def test_wildcard_listeners_advertise_the_external_address(tmp_path):
    config = config_of(
        tmp_path,
        "external_ip: 203.0.113.7\nturn: {udp: 0.0.0.0:3478, "
        "tcp: null, tls: 0.0.0.0:443, relay_ip: 0.0.0.0}\n",
    )
    assert embedded_urls(config) == [
        "stun:203.0.113.7:3478",
        "turn:203.0.113.7:3478?transport=udp",
        "turns:203.0.113.7:443?transport=tcp",
    ]


def test_credentials_host_names_every_url_and_ipv6_is_bracketed(tmp_path):
    named = config_of(tmp_path, "credentials: {host: turn.example.com}\nturn: {tls: null}\n")
    assert embedded_urls(named)[-1] == "turn:turn.example.com:3478?transport=tcp"
    v6 = config_of(tmp_path, "turn: {udp: '[::1]:3478', tcp: null, tls: null}\n")
    assert embedded_urls(v6) == ["stun:[::1]:3478", "turn:[::1]:3478?transport=udp"]


def test_only_udp_off_gives_stun_on_tcp(tmp_path):
    config = config_of(tmp_path, "turn: {udp: null, tls: null}\n")
    assert embedded_urls(config) == ["stun:127.0.0.1:3478", "turn:127.0.0.1:3478?transport=tcp"]


def test_the_edge_port_is_handed_out_after_udp_and_before_the_rest(tmp_path):
    config = config_of(tmp_path, "edge: {listen: 127.0.0.1:443}\n")
    assert embedded_urls(config) == [
        "stun:127.0.0.1:3478",
        "turn:127.0.0.1:3478?transport=udp",
        "turns:127.0.0.1:443?transport=tcp",
        "turn:127.0.0.1:3478?transport=tcp",
        "turns:127.0.0.1:5349?transport=tcp",
    ]


def test_with_the_standard_turn_ports_closed_the_edge_is_the_only_url(tmp_path):
    config = config_of(tmp_path, "edge: {listen: 127.0.0.1:8444}\nturn: {udp: null, tcp: null, tls: null}\n")
    assert embedded_urls(config) == ["turns:127.0.0.1:8444?transport=tcp"]
    answer = CredentialIssuer.from_config(config, lambda: SecretRing((Secret("k", "s" * 43, 1),))).issue("a")
    (entry,) = answer["iceServers"]
    assert entry["urls"] == "turns:127.0.0.1:8444?transport=tcp" and entry["username"].endswith(":a")


def test_the_edge_url_names_the_certificate_host_or_the_advertised_address(tmp_path):
    named = config_of(tmp_path, "credentials: {host: turn.example.com}\nedge: {listen: 0.0.0.0:443}\n")
    assert "turns:turn.example.com:443?transport=tcp" in embedded_urls(named)
    wildcard = config_of(
        tmp_path,
        "external_ip: 203.0.113.7\nedge: {listen: 0.0.0.0:443}\n"
        "turn: {udp: 0.0.0.0:3478, tcp: null, tls: null, relay_ip: 0.0.0.0}\n",
    )
    assert embedded_urls(wildcard) == [
        "stun:203.0.113.7:3478",
        "turn:203.0.113.7:3478?transport=udp",
        "turns:203.0.113.7:443?transport=tcp",
    ]
    v6 = config_of(tmp_path, "edge: {listen: '[::1]:443'}\nturn: {udp: null, tcp: null, tls: null}\n")
    assert embedded_urls(v6) == ["turns:[::1]:443?transport=tcp"]


def test_ice_servers_replace_the_edge_url_too(tmp_path):
    config = config_of(
        tmp_path, "edge: {listen: 127.0.0.1:443}\ncredentials: {ice_servers: ['turns:t.example.com:443']}\n"
    )
    assert handed_out_urls(config) == ["turns:t.example.com:443"]


def test_ice_servers_replace_the_defaults_and_external_ones_follow(tmp_path):
    config = config_of(
        tmp_path,
        "credentials: {ice_servers: [stun:stun.example.com, "
        "'turn:t.example.com:80?transport=tcp'], external: "
        "['turn:t.example.com:80?transport=tcp', turns:c.example.com]}\n",
    )
    assert handed_out_urls(config) == [
        "stun:stun.example.com",
        "turn:t.example.com:80?transport=tcp",
        "turns:c.example.com",
    ]


def issuer(ring: SecretRing, ttl_s=600, grace_s=600, activation_s=5, urls=None):
    urls = urls or ["stun:s.example.com", "turn:t.example.com?transport=udp"]
    return CredentialIssuer(urls, ttl_s, grace_s, activation_s, lambda: ring, clock=lambda: NOW)


def test_turn_entries_carry_the_rest_pair_and_stun_entries_nulls():
    secret = Secret("k-1", "s" * 43, int(NOW) - 100)
    answer = issuer(SecretRing((secret,))).issue("alice")
    stun_entry, turn_entry = answer["iceServers"]
    assert stun_entry == {
        "urls": "stun:s.example.com",
        "url": "stun:s.example.com",
        "username": None,
        "credential": None,
    }
    assert turn_entry["username"] == f"{int(NOW) + 600}:alice"
    assert turn_entry["credential"] == rest_password(secret.value.encode(), turn_entry["username"])
    assert turn_entry["urls"] == turn_entry["url"] and answer["ttl"] == 600


@pytest.mark.parametrize("retired_ago, expected_ttl", [(0, 600), (100, 500), (599, 1)])
def test_a_retiring_secret_never_signs_past_its_grace(retired_ago, expected_ttl):
    old = Secret("k-old", "o" * 43, int(NOW) - 10_000, int(NOW) - retired_ago)
    young = Secret("k-new", "n" * 43, int(NOW) - retired_ago)  # still activating (5 s)
    ring = SecretRing((old, young))
    answer = issuer(ring, activation_s=retired_ago + 5).issue("bob")
    entry = answer["iceServers"][1]
    assert entry["credential"] == rest_password(old.value.encode(), entry["username"])
    assert answer["ttl"] == expected_ttl


@pytest.mark.parametrize(
    "revocation, refused",
    [
        (Revocation("alice", NOW - 10, NOW + 3600), True),  # in force
        (Revocation("alice", NOW - 10, NOW - 10), False),  # ended live allocations, refuses nothing
        (Revocation("alice", NOW - 7200, NOW - 1), False),  # lapsed
        (Revocation("alicia", NOW - 10, NOW + 3600), False),  # someone else
    ],
)
def test_a_revoked_user_gets_stun_only_while_refused(revocation, refused):
    # An external coturn knows nothing of revocations: a fresh credential handed to a
    # revoked user would work there, so none is handed out.
    secret = Secret("k-1", "s" * 43, int(NOW) - 100)
    answer = issuer(SecretRing((secret,), (revocation,))).issue("alice")
    urls = [entry["urls"] for entry in answer["iceServers"]]
    if refused:
        assert urls == ["stun:s.example.com"]
        assert all(entry["credential"] is None for entry in answer["iceServers"])
    else:
        assert urls == ["stun:s.example.com", "turn:t.example.com?transport=udp"]
        assert answer["iceServers"][1]["credential"] is not None
