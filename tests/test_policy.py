"""The peer policy: every denied range at its edges, embedded-IPv4 forms, allow
overrides, the appliance's own listeners, and relay-to-relay traffic."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from turn.policy import RECOMMENDED_DENY, build_policy, normalise


def policy(**kw):
    args = dict(deny_specs=["recommended"], allow_specs=[], own_endpoints=[("192.0.2.10", 3478)],
                relay_addresses=["127.0.0.1"], relay_ports=(49152, 65535))
    args.update(kw)
    return build_policy(**args)


@pytest.mark.parametrize("network", RECOMMENDED_DENY, ids=str)
def test_every_recommended_range_is_denied_at_both_edges(network):
    p = policy(relay_addresses=[])
    for ip in (network.network_address, network.broadcast_address):
        assert not p.permits_ip(str(ip)), ip


@pytest.mark.parametrize("ip", ["9.255.255.255", "11.0.0.0", "100.63.255.255", "100.128.0.0",
                                "126.255.255.255", "128.0.0.0", "169.253.255.255", "169.255.0.0",
                                "172.15.255.255", "172.32.0.0", "192.167.255.255", "192.169.0.0",
                                "223.255.255.255", "8.8.8.8", "2606:4700::1111", "2a00:1450::1"])
def test_public_neighbours_are_permitted(ip):
    assert policy().permits(ip, 5000)


@pytest.mark.parametrize("ip", ["::ffff:127.0.0.1", "::ffff:169.254.169.254", "::ffff:10.1.2.3",
                                "::10.1.2.3", "64:ff9b::a01:203", "64:ff9b::7f00:1",
                                "2002:a01:203::", "2002:a9fe:a9fe::1",
                                "2001:0:4136:e378:8000:63bf:f5fe:fdfc",   # Teredo to 10.1.2.3
                                "fe80::1%eth0", "::", "::1"])
def test_embedded_and_special_forms_are_denied(ip):
    assert not policy(relay_addresses=[]).permits_ip(ip)


def test_embedded_public_forms_are_permitted():
    p = policy()
    for ip in ("::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1"):
        assert p.permits(ip, 53), ip


def test_normalise_unwraps_to_the_reached_ipv4():
    assert normalise(ipaddress.ip_address("2001:0:4136:e378:8000:63bf:f5fe:fdfc")) == \
        ipaddress.ip_address("10.1.2.3")
    assert normalise(ipaddress.ip_address("64:ff9b::c000:201")) == ipaddress.ip_address("192.0.2.1")


def test_allow_overrides_deny_but_never_own_endpoints():
    p = policy(allow_specs=["10.0.0.0/8", "192.0.2.10"])
    assert p.permits("10.20.30.40", 1)
    assert p.permits("192.0.2.10", 3479)
    assert not p.permits("192.0.2.10", 3478)          # our own listener
    assert p.permits_ip("192.0.2.10")                 # a permission is only an IP


def test_unspecified_listener_is_refused_on_every_relay_address():
    p = policy(own_endpoints=[("0.0.0.0", 3478)], relay_addresses=["203.0.113.5", "127.0.0.1"],
               allow_specs=["203.0.113.0/24"])
    assert not p.permits("203.0.113.5", 3478)
    assert not p.permits("127.0.0.1", 3478)
    assert p.permits("203.0.113.5", 50000)


def test_relay_to_own_relay_address_only_on_relay_ports():
    p = policy()
    assert p.permits_ip("127.0.0.1")
    assert p.permits("127.0.0.1", 50000)
    assert not p.permits("127.0.0.1", 22)
    assert not p.permits("127.0.0.2", 50000)          # loopback but not our relay


def test_bad_specs_name_the_entry():
    with pytest.raises(ValueError, match="'nonsense'"):
        policy(deny_specs=["nonsense"])
    with pytest.raises(ValueError, match="'recommended'"):
        policy(allow_specs=["recommended"])


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_embedded_forms_get_the_ipv4_verdict(value):
    p = policy(relay_addresses=[])
    v4 = ipaddress.IPv4Address(value)
    verdict = p.permits_ip(str(v4))
    mapped = ipaddress.IPv6Address((0xFFFF << 32) | value)
    nat64 = ipaddress.IPv6Address((0x64FF9B << 96) | value)
    six_to_four = ipaddress.IPv6Address((0x2002 << 112) | (value << 80))
    for form in (mapped, nat64, six_to_four):
        assert p.permits_ip(str(form)) == verdict, (v4, form)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**128 - 1), st.integers(0, 65535))
def test_any_ipv6_gets_a_verdict(value, port):
    p = policy()
    p.permits(str(ipaddress.IPv6Address(value)), port)


def test_the_appliances_signaling_and_admin_ports_are_never_relay_targets(tmp_path):
    from appliance.config import load_config
    from appliance.relay_wiring import peer_policy

    path = tmp_path / "appliance.yaml"
    path.write_text("turn: {allow_peers: [127.0.0.1]}\nhttp: {listen: 127.0.0.1:8443}\n"
                    "admin: {listen: 127.0.0.1:9090}\n")
    p = peer_policy(load_config(path, {}))
    assert p.permits("127.0.0.1", 5000)
    for port in (3478, 5349, 8443, 9090):
        assert not p.permits("127.0.0.1", port), port
