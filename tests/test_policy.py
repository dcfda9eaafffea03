"""The peer policy: every denied range at its edges, embedded-IPv4 forms, allow
overrides, the appliance's own listeners, and relay-to-relay traffic."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from turn.policy import RECOMMENDED_DENY, build_policy, normalise


def policy(**kw):
    args = dict(
        deny_specs=["recommended"],
        allow_specs=[],
        own_endpoints=[("192.0.2.10", 3478)],
        relay_addresses=["127.0.0.1"],
        relay_ports=(49152, 65535),
    )
    args.update(kw)
    return build_policy(**args)


@pytest.mark.parametrize("network", RECOMMENDED_DENY, ids=str)
def test_every_recommended_range_is_denied_at_both_edges(network):
    p = policy(relay_addresses=[])
    for ip in (network.network_address, network.broadcast_address):
        assert not p.permits_ip(str(ip)), ip


@pytest.mark.parametrize(
    "ip",
    [
        "9.255.255.255",
        "11.0.0.0",
        "100.63.255.255",
        "100.128.0.0",
        "126.255.255.255",
        "128.0.0.0",
        "169.253.255.255",
        "169.255.0.0",
        "172.15.255.255",
        "172.32.0.0",
        "192.167.255.255",
        "192.169.0.0",
        "223.255.255.255",
        "8.8.8.8",
        "2606:4700::1111",
        "2a00:1450::1",
    ],
)
def test_public_neighbours_are_permitted(ip):
    assert policy().permits(ip, 5000)


# Every way to write an IPv4 peer: plainly, and each IPv6 form that carries it.
FORMS = {
    "plain": lambda v: v,
    "v4-mapped": lambda v: (0xFFFF << 32) | v,  # ::ffff:a.b.c.d, RFC 4291 §2.5.5.2
    "SIIT": lambda v: (0xFFFF << 48) | v,  # ::ffff:0:a.b.c.d, RFC 2765 §2.1
    "NAT64": lambda v: (0x64FF9B << 96) | v,  # 64:ff9b::a.b.c.d, RFC 6052 §2.1
    "6to4": lambda v: (0x2002 << 112) | (v << 80),  # 2002:AABB:CCDD::, RFC 3056 §2
    "Teredo": lambda v: (
        (0x20010000 << 96)
        | (0x4136E378 << 64)  # server 65.54.227.120,
        | (0x8000 << 48)
        | (0x63BF << 32)  # flags, obfuscated port,
        | (v ^ 0xFFFFFFFF)
    ),  # obfuscated client, RFC 4380 §4
}


def form(name: str, v4: str | int) -> str:
    value = FORMS[name](int(ipaddress.IPv4Address(v4)))
    return str(ipaddress.IPv4Address(value) if name == "plain" else ipaddress.IPv6Address(value))


def relay_policy():
    """This relay sends from 127.0.0.1 (relay ports 49152-65535) and listens on 127.0.0.1:60000,
    inside the relay range, so that only the listener rule refuses that port."""
    return policy(own_endpoints=[("127.0.0.1", 60000)], relay_addresses=["127.0.0.1"])


IPV4_VERDICTS = [
    ("8.8.8.8", 53, True),  # the public Internet
    ("1.1.1.1", 60000, True),
    ("127.0.0.1", 50000, True),  # this relay on a relay port: another allocation
    ("127.0.0.1", 22, False),  # this relay, but not a relay port
    ("127.0.0.1", 60000, False),  # the appliance's own listener
    ("127.0.0.2", 50000, False),  # loopback, but not this relay
    ("169.254.169.254", 80, False),  # cloud metadata
    ("10.0.0.1", 80, False),
    ("172.16.0.1", 80, False),
    ("192.168.1.1", 80, False),
    ("0.0.0.0", 80, False),
    ("0.1.2.3", 80, False),
    ("100.64.0.1", 80, False),
    ("192.0.0.9", 80, False),
    ("192.0.2.1", 80, False),
    ("192.88.99.1", 80, False),
    ("198.18.0.1", 80, False),
    ("198.19.255.255", 80, False),
    ("198.51.100.1", 80, False),
    ("203.0.113.1", 80, False),
    ("224.0.0.1", 80, False),
    ("239.255.255.250", 1900, False),
    ("240.0.0.1", 80, False),
    ("255.255.255.255", 80, False),
]


@pytest.mark.parametrize("name", FORMS)
@pytest.mark.parametrize("v4, port, permitted", IPV4_VERDICTS)
def test_every_form_of_an_ipv4_address_gets_its_verdict(v4, port, permitted, name):
    p = relay_policy()
    assert p.permits(form(name, v4), port) is permitted
    assert p.permits_ip(form(name, v4)) is (permitted or v4 == "127.0.0.1")


IPV6_VERDICTS = [
    ("2606:4700::1111", True),
    ("2a00:1450:4001::1", True),
    ("2001:4860:4860::8888", True),
    ("2001:200::1", True),  # just past 2001::/23
    ("3fff:1000::1", True),  # just past 3fff::/20
    ("::", False),
    ("::1", False),
    ("::2", False),  # the rest of ::/8
    ("ff:ffff::1", False),
    ("::8.8.8.8", False),  # deprecated IPv4-compatible
    ("64:ff9b:1::a00:1", False),  # local-use NAT64: where the IPv4 sits is local
    ("64:ff9b:1::808:808", False),
    ("100::1", False),  # discard-only
    ("100:0:0:1::1", False),  # dummy prefix
    ("1fff:ffff::1", False),  # reserved
    ("2001:2::1", False),  # benchmarking
    ("2001:10::1", False),  # ORCHID
    ("2001:20::1", False),  # ORCHIDv2
    ("2001:db8::1", False),  # documentation
    ("3fff::1", False),  # documentation
    ("3fff:fff:ffff::1", False),
    ("4000::1", False),  # reserved
    ("5f00::1", False),  # SRv6 SIDs
    ("8000::1", False),  # reserved
    ("fc00::1", False),  # unique local
    ("fd12:3456::1", False),
    ("fe80::1", False),  # link-local
    ("fe80::1%eth0", False),
    ("fec0::1", False),  # deprecated site-local
    ("feff:ffff::1", False),
    ("ff02::1", False),  # multicast
]


@pytest.mark.parametrize("ip, permitted", IPV6_VERDICTS)
def test_ipv6_ranges_get_their_verdict(ip, permitted):
    p = relay_policy()
    assert p.permits(ip, 5000) is permitted
    assert p.permits_ip(ip) is permitted


def test_normalise_unwraps_to_the_reached_ipv4():
    for name in FORMS:
        assert normalise(ipaddress.ip_address(form(name, "10.1.2.3"))) == ipaddress.ip_address("10.1.2.3"), (
            name
        )
    assert normalise(ipaddress.ip_address("::ffff:0:169.254.169.254")) == ipaddress.ip_address(
        "169.254.169.254"
    )
    assert normalise(ipaddress.ip_address("2001:0:4136:e378:8000:63bf:f5fe:fdfc")) == ipaddress.ip_address(
        "10.1.2.3"
    )


def test_allow_overrides_deny_but_never_own_endpoints():
    p = policy(allow_specs=["10.0.0.0/8", "192.0.2.10"])
    assert p.permits("10.20.30.40", 1)
    assert p.permits("192.0.2.10", 3479)
    assert not p.permits("192.0.2.10", 3478)  # our own listener
    assert p.permits_ip("192.0.2.10")  # a permission is only an IP


def test_unspecified_listener_is_refused_on_every_relay_address():
    p = policy(
        own_endpoints=[("0.0.0.0", 3478)],
        relay_addresses=["203.0.113.5", "127.0.0.1"],
        allow_specs=["203.0.113.0/24"],
    )
    assert not p.permits("203.0.113.5", 3478)
    assert not p.permits("127.0.0.1", 3478)
    assert p.permits("203.0.113.5", 50000)


def test_relay_to_own_relay_address_only_on_relay_ports():
    p = policy()
    assert p.permits_ip("127.0.0.1")
    assert p.permits("127.0.0.1", 50000)
    assert not p.permits("127.0.0.1", 22)
    assert not p.permits("127.0.0.2", 50000)  # loopback but not our relay


def test_bad_specs_name_the_entry():
    with pytest.raises(ValueError, match="'nonsense'"):
        policy(deny_specs=["nonsense"])
    with pytest.raises(ValueError, match="'recommended'"):
        policy(allow_specs=["recommended"])


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([22, 50000, 60000]))
def test_embedded_forms_get_the_ipv4_verdict(value, port):
    p = relay_policy()
    verdict = p.permits(form("plain", value), port)
    for name in FORMS:
        assert p.permits(form(name, value), port) == verdict, (name, value, port)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**128 - 1), st.integers(0, 65535))
def test_any_ipv6_gets_a_verdict(value, port):
    p = policy()
    p.permits(str(ipaddress.IPv6Address(value)), port)


def test_the_appliances_signaling_and_admin_ports_are_never_relay_targets(tmp_path):
    from appliance.config.loader import load_config
    from appliance.wiring.relay import peer_policy

    path = tmp_path / "appliance.yaml"
    path.write_text(
        "turn: {allow_peers: [127.0.0.1]}\nhttp: {listen: 127.0.0.1:8443}\nadmin: {listen: 127.0.0.1:9090}\n"
    )
    p = peer_policy(load_config(path, {}))
    assert p.permits("127.0.0.1", 5000)
    for port in (3478, 5349, 8443, 9090):
        assert not p.permits("127.0.0.1", port), port
