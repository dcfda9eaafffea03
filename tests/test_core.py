"""The sans-I/O TURN core, driven with a float clock and fake relay ports:
every request type, every error code, every lifetime (RFC 8489, RFC 8656)."""

from __future__ import annotations

import pytest

from turn import stun
from turn.allocation import PERMISSION_LIFETIME_S

from .turn_fakes import REALM, T0, CoreClient, channel_attr, error_code, lifetime_attr, make_core, peer_attr

PEER = ("8.8.8.8", 5000)
PEER2 = ("1.1.1.1", 6000)


def test_binding_needs_no_credentials():
    core, _ = make_core()
    client = CoreClient(core)
    reply = stun.parse(client.raw(client.build(stun.BINDING, auth=False)))
    assert reply.cls == stun.SUCCESS
    assert stun.xor_address(reply.get(stun.XOR_MAPPED_ADDRESS), reply.transaction_id) == client.addr
    assert reply.integrity_offset < 0 and reply.has_fingerprint


def test_binding_with_unknown_required_attribute_is_420():
    core, _ = make_core()
    client = CoreClient(core)
    reply = stun.parse(client.raw(client.build(stun.BINDING, [(0x0031, b"x")], auth=False)))
    assert error_code(reply) == 420
    assert reply.get(stun.UNKNOWN_ATTRIBUTES) == b"\x00\x31"


def test_allocate_without_credentials_is_401_with_realm_and_nonce():
    core, _ = make_core()
    client = CoreClient(core)
    reply = stun.parse(client.raw(client.build(stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, b"\x11\0\0\0")])))
    assert error_code(reply) == 401
    assert reply.get(stun.REALM) == REALM.encode()
    assert reply.get(stun.NONCE)
    assert reply.integrity_offset < 0


def test_allocate_success_carries_addresses_lifetime_and_integrity():
    core, opener = make_core()
    client = CoreClient(core)
    reply = client.allocate()
    assert reply.cls == stun.SUCCESS
    assert client.relayed(reply) == opener.opened[0].address
    assert stun.xor_address(reply.get(stun.XOR_MAPPED_ADDRESS), reply.transaction_id) == client.addr
    assert stun.u32(reply.get(stun.LIFETIME)) == 600
    assert reply.verify_integrity(client.key) and reply.has_fingerprint
    assert stun.SOFTWARE not in reply.attrs


def test_fingerprint_only_when_the_request_had_one_and_software_when_configured():
    core, _ = make_core(software="appliance-test")
    client = CoreClient(core, fingerprint=False)
    reply = client.allocate()
    assert not reply.has_fingerprint
    assert reply.get(stun.SOFTWARE) == b"appliance-test"


def test_wrong_password_is_401():
    core, _ = make_core()
    client = CoreClient(core, password="bm90IHRoZSBwYXNzd29yZA==")
    reply = client.allocate()
    assert error_code(reply) == 401
    assert core.counters["auth_bad_credentials"] >= 1
    assert len(core.table) == 0


def test_username_not_in_rest_form_is_401():
    core, _ = make_core()
    client = CoreClient(core)
    client.creds.username = "alice"
    assert error_code(client.allocate()) == 401


def test_secret_ring_tries_every_secret():
    core, _ = make_core(secrets=(b"new-secret-xxxxxxxxxx", b"core-secret-0123456789"))
    assert CoreClient(core).allocate().cls == stun.SUCCESS
    core.verifier.set_secrets((b"new-secret-xxxxxxxxxx",))
    assert error_code(CoreClient(core, addr=("198.51.100.21", 1)).allocate()) == 401


def test_missing_username_realm_or_nonce_is_400():
    core, _ = make_core()
    client = CoreClient(core)
    tid = bytes(12)
    b = stun.Builder(stun.ALLOCATE, stun.REQUEST, tid)
    b.add(stun.REQUESTED_TRANSPORT, b"\x11\0\0\0")
    b.add(stun.USERNAME, client.creds.username.encode())
    reply = stun.parse(client.raw(b.encode(client.key)))
    assert error_code(reply) == 400


def test_stale_nonce_is_438_with_a_fresh_nonce():
    core, _ = make_core()
    client = CoreClient(core)
    assert client.allocate().cls == stun.SUCCESS
    old_nonce = client.nonce
    client.now = T0 + 601
    reply = stun.parse(client.raw(client.build(stun.REFRESH, [lifetime_attr(600)])))
    assert error_code(reply) == 438
    assert reply.get(stun.NONCE) and reply.get(stun.NONCE) != old_nonce
    assert client.send(stun.REFRESH, [lifetime_attr(600)]).cls == stun.SUCCESS


def test_nonce_from_another_client_address_is_stale():
    core, _ = make_core()
    first = CoreClient(core)
    first.allocate()
    other = CoreClient(core, addr=("198.51.100.99", 1))
    other.nonce = first.nonce
    reply = stun.parse(other.raw(other.build(stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, b"\x11\0\0\0")])))
    assert error_code(reply) == 438


def test_expired_username_refused_on_allocate_but_refresh_keeps_working():
    core, _ = make_core()
    client = CoreClient(core, expiry=int(T0) + 10)
    assert client.allocate().cls == stun.SUCCESS
    client.now = T0 + 300  # the username has expired
    assert client.send(stun.REFRESH, [lifetime_attr(600)]).cls == stun.SUCCESS
    assert client.send(stun.CREATE_PERMISSION, [peer_attr(PEER)]).cls == stun.SUCCESS
    late = CoreClient(core, addr=("198.51.100.30", 2), expiry=int(T0) - 1)
    assert error_code(late.allocate()) == 401
    assert core.counters["auth_expired"] == 1


def test_requested_transport_missing_is_400_and_tcp_is_442():
    core, _ = make_core()
    client = CoreClient(core)
    assert error_code(client.send(stun.ALLOCATE, [])) == 400
    assert error_code(client.send(stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, b"\x06\0\0\0")])) == 442
    assert len(core.table) == 0


def test_retransmitted_allocate_gets_the_same_answer_and_a_new_one_437():
    core, opener = make_core()
    client = CoreClient(core)
    client.allocate()  # learn the nonce
    client.send(stun.REFRESH, [lifetime_attr(0)])
    tid = b"R" * 12
    first = client.raw(client.build(stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, b"\x11\0\0\0")], tid))
    again = client.raw(client.build(stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, b"\x11\0\0\0")], tid))
    assert first == again and stun.parse(first).cls == stun.SUCCESS
    assert len([p for p in opener.opened if not p.closed]) == 1
    assert error_code(client.allocate()) == 437


def test_refresh_clamps_lifetime_and_zero_deletes():
    core, opener = make_core(max_lifetime_s=3600)
    client = CoreClient(core)
    client.allocate(lifetime_attr(30))  # below the default: raised to 600
    alloc = core.table.get(client.key_id)
    assert alloc.expires == T0 + 600
    assert stun.u32(client.send(stun.REFRESH, [lifetime_attr(99999)]).get(stun.LIFETIME)) == 3600
    assert stun.u32(client.send(stun.REFRESH, [lifetime_attr(100)]).get(stun.LIFETIME)) == 600
    assert stun.u32(client.send(stun.REFRESH, []).get(stun.LIFETIME)) == 600
    reply = client.send(stun.REFRESH, [lifetime_attr(0)])
    assert reply.cls == stun.SUCCESS and stun.u32(reply.get(stun.LIFETIME)) == 0
    assert opener.opened[0].closed and len(core.table) == 0
    assert error_code(client.send(stun.REFRESH, [lifetime_attr(600)])) == 437
    assert error_code(client.send(stun.CREATE_PERMISSION, [peer_attr(PEER)])) == 437


def test_allocation_expires_on_the_timer():
    core, opener = make_core()
    client = CoreClient(core)
    client.allocate()
    assert core.get_timer() is not None and core.get_timer() <= T0 + 600
    core.handle_timer(T0 + 599)
    assert len(core.table) == 1
    client.now = T0 + 500
    client.send(stun.REFRESH, [lifetime_attr(600)])  # now expires at T0+1100
    core.handle_timer(T0 + 601)
    assert len(core.table) == 1
    core.handle_timer(T0 + 1100)
    assert len(core.table) == 0 and opener.opened[0].closed


def test_ipv6_family_when_only_ipv4_relays_is_440():
    core, _ = make_core(families=frozenset({stun.FAMILY_IPV4}))
    client = CoreClient(core)
    reply = client.allocate((stun.REQUESTED_ADDRESS_FAMILY, b"\x02\0\0\0"))
    assert error_code(reply) == 440
    assert error_code(client.allocate((stun.REQUESTED_ADDRESS_FAMILY, b"\x07\0\0\0"))) == 440


def test_ipv6_allocation_and_family_mismatches():
    from .turn_fakes import FakeOpener

    opener = FakeOpener({stun.FAMILY_IPV4: "10.9.0.1", stun.FAMILY_IPV6: "2001:db8:9::1"})
    core, _ = make_core(opener=opener, families=frozenset({stun.FAMILY_IPV4, stun.FAMILY_IPV6}))
    client = CoreClient(core)
    reply = client.allocate((stun.REQUESTED_ADDRESS_FAMILY, b"\x02\0\0\0"))
    assert client.relayed(reply)[0] == "2001:db8:9::1"
    assert error_code(client.send(stun.CREATE_PERMISSION, [peer_attr(PEER)])) == 443
    assert error_code(client.send(stun.REFRESH, [(stun.REQUESTED_ADDRESS_FAMILY, b"\x01\0\0\0")])) == 443
    assert client.send(stun.CREATE_PERMISSION, [peer_attr(("2606:4700::1111", 1))]).cls == stun.SUCCESS


def test_external_ip_is_advertised():
    core, opener = make_core(external_ip="192.0.2.77")
    client = CoreClient(core)
    relayed = client.relayed(client.allocate())
    assert relayed == ("192.0.2.77", opener.opened[0].address[1])


def test_create_permission_several_peers_and_refusals():
    core, _ = make_core(max_permissions=3)
    client = CoreClient(core)
    client.allocate()
    alloc = core.table.get(client.key_id)
    assert client.send(stun.CREATE_PERMISSION, [peer_attr(PEER), peer_attr(PEER2)]).cls == stun.SUCCESS
    assert set(alloc.permissions) == {"8.8.8.8", "1.1.1.1"}
    assert error_code(client.send(stun.CREATE_PERMISSION, [])) == 400
    reply = client.send(stun.CREATE_PERMISSION, [peer_attr(("9.9.9.9", 1)), peer_attr(("10.0.0.1", 1))])
    assert error_code(reply) == 403
    assert "9.9.9.9" not in alloc.permissions  # all or nothing
    assert client.send(stun.CREATE_PERMISSION, [peer_attr(("9.9.9.9", 1))]).cls == stun.SUCCESS
    assert error_code(client.send(stun.CREATE_PERMISSION, [peer_attr(("4.4.4.4", 1))])) == 508
    assert client.send(stun.CREATE_PERMISSION, [peer_attr(PEER)]).cls == stun.SUCCESS  # a refresh


@pytest.mark.parametrize(
    "peer",
    [
        ("127.0.0.1", 1),
        ("169.254.169.254", 80),
        ("192.168.1.1", 1),
        ("100.64.0.1", 1),
        ("224.0.0.1", 1),
        ("0.0.0.0", 1),
    ],
)
def test_denied_peers_are_403(peer):
    core, _ = make_core()
    client = CoreClient(core)
    client.allocate()
    assert error_code(client.send(stun.CREATE_PERMISSION, [peer_attr(peer)])) == 403
    assert error_code(client.send(stun.CHANNEL_BIND, [channel_attr(0x4000), peer_attr(peer)])) == 403


def test_allow_peers_overrides_the_deny_list():
    core, _ = make_core(allow=("10.1.0.0/16",))
    client = CoreClient(core)
    client.allocate()
    assert client.send(stun.CREATE_PERMISSION, [peer_attr(("10.1.2.3", 1))]).cls == stun.SUCCESS
    assert error_code(client.send(stun.CREATE_PERMISSION, [peer_attr(("10.2.0.1", 1))])) == 403


def test_channel_bind_rules():
    core, _ = make_core(max_channels=2)
    client = CoreClient(core)
    client.allocate()
    alloc = core.table.get(client.key_id)
    assert client.send(stun.CHANNEL_BIND, [channel_attr(0x4000), peer_attr(PEER)]).cls == stun.SUCCESS
    assert alloc.permissions["8.8.8.8"] == T0 + PERMISSION_LIFETIME_S
    for bad in (0x3FFF, 0x8000, 0xFFFF):
        assert error_code(client.send(stun.CHANNEL_BIND, [channel_attr(bad), peer_attr(PEER2)])) == 400
    assert error_code(client.send(stun.CHANNEL_BIND, [channel_attr(0x4000), peer_attr(PEER2)])) == 400
    assert error_code(client.send(stun.CHANNEL_BIND, [channel_attr(0x4001), peer_attr(PEER)])) == 400
    assert error_code(client.send(stun.CHANNEL_BIND, [channel_attr(0x4001)])) == 400
    assert client.send(stun.CHANNEL_BIND, [channel_attr(0x4000), peer_attr(PEER)]).cls == stun.SUCCESS
    assert client.send(stun.CHANNEL_BIND, [channel_attr(0x4FFF), peer_attr(PEER2)]).cls == stun.SUCCESS
    assert (
        error_code(client.send(stun.CHANNEL_BIND, [channel_attr(0x4002), peer_attr(("9.9.9.9", 1))])) == 508
    )


def test_expired_channel_cools_down_before_reuse():
    core, _ = make_core()
    client = CoreClient(core)
    client.allocate()
    client.send(stun.REFRESH, [lifetime_attr(3600)])
    client.send(stun.CHANNEL_BIND, [channel_attr(0x4000), peer_attr(PEER)])
    client.now = T0 + 601  # channel expired
    core.handle_timer(client.now)
    assert error_code(client.send(stun.CHANNEL_BIND, [channel_attr(0x4000), peer_attr(PEER2)])) == 400
    client.now = T0 + 901  # cool-down over
    core.handle_timer(client.now)
    assert client.send(stun.CHANNEL_BIND, [channel_attr(0x4000), peer_attr(PEER2)]).cls == stun.SUCCESS


def test_permissions_expire_after_300_seconds():
    core, _ = make_core()
    client = CoreClient(core)
    client.allocate()
    client.send(stun.CREATE_PERMISSION, [peer_attr(PEER)])
    alloc = core.table.get(client.key_id)
    core.handle_timer(T0 + 301)
    assert "8.8.8.8" not in alloc.permissions


def test_send_indication_needs_a_permission():
    core, opener = make_core()
    client = CoreClient(core)
    client.allocate()
    relay = opener.opened[0]

    def send_indication(peer, data):
        b = stun.Builder(stun.SEND, stun.INDICATION, bytes(12))
        b.add(stun.XOR_PEER_ADDRESS, stun.encode_xor_address(peer, bytes(12)))
        b.add(stun.DATA_ATTR, data)
        assert client.raw(b.encode()) is None

    send_indication(PEER, b"too early")
    assert relay.sent == []
    client.send(stun.CREATE_PERMISSION, [peer_attr(PEER)])
    send_indication(PEER, b"hello")
    assert relay.sent == [(b"hello", PEER)]
    client.now = T0 + 301
    send_indication(PEER, b"expired")
    assert len(relay.sent) == 1
    assert core.counters["send_dropped"] == 2


def test_data_indication_encodes_peer_and_data():
    core, _ = make_core()
    client = CoreClient(core)
    client.allocate()
    alloc = core.table.get(client.key_id)
    msg = stun.parse(core.data_indication(alloc, PEER, b"payload"))
    assert (msg.method, msg.cls) == (stun.DATA, stun.INDICATION)
    assert stun.xor_address(msg.get(stun.XOR_PEER_ADDRESS), msg.transaction_id) == PEER
    assert msg.get(stun.DATA_ATTR) == b"payload" and msg.has_fingerprint


def test_user_quota_is_486_and_total_quota_508():
    core, _ = make_core(user_quota=2, total_quota=3)
    for i in range(2):
        assert CoreClient(core, addr=("198.51.100.1", 1000 + i)).allocate().cls == stun.SUCCESS
    assert error_code(CoreClient(core, addr=("198.51.100.1", 1002)).allocate()) == 486
    assert CoreClient(core, user="bob", addr=("198.51.100.2", 1)).allocate().cls == stun.SUCCESS
    assert error_code(CoreClient(core, user="carol", addr=("198.51.100.3", 1)).allocate()) == 508


def test_no_free_relay_port_is_508():
    from .turn_fakes import FakeOpener

    core, _ = make_core(opener=FakeOpener(ports=range(50000, 50001)))
    assert CoreClient(core, addr=("198.51.100.1", 1)).allocate().cls == stun.SUCCESS
    assert error_code(CoreClient(core, addr=("198.51.100.1", 2)).allocate()) == 508


def test_unknown_required_attribute_is_420_after_auth_and_optional_ignored():
    core, _ = make_core()
    client = CoreClient(core)
    reply = client.allocate((0x0031, b"zz"))
    assert error_code(reply) == 420
    assert reply.get(stun.UNKNOWN_ATTRIBUTES) == b"\x00\x31"
    assert reply.verify_integrity(client.key)
    assert client.allocate((0x8031, b"zz")).cls == stun.SUCCESS


def test_another_username_on_the_same_five_tuple_is_441():
    core, _ = make_core()
    alice = CoreClient(core)
    alice.allocate()
    mallory = CoreClient(core, user="mallory")
    assert error_code(mallory.send(stun.REFRESH, [lifetime_attr(600)])) == 441


def test_unknown_method_is_400_and_other_indications_are_ignored():
    core, _ = make_core()
    client = CoreClient(core)
    reply = stun.parse(client.raw(client.build(0x00F, auth=False)))
    assert error_code(reply) == 400
    b = stun.Builder(stun.DATA, stun.INDICATION, bytes(12))
    assert client.raw(b.encode()) is None
    assert core.counters["ignored"] == 1


def test_even_port_reservation_token():
    core, opener = make_core()
    first = CoreClient(core, addr=("198.51.100.1", 1))
    reply = first.allocate((stun.EVEN_PORT, b"\x80"))
    port = first.relayed(reply)[1]
    assert port % 2 == 0
    token = reply.get(stun.RESERVATION_TOKEN)
    assert token is not None and len(token) == 8
    second = CoreClient(core, addr=("198.51.100.1", 2))
    assert second.relayed(second.allocate((stun.RESERVATION_TOKEN, token)))[1] == port + 1
    third = CoreClient(core, addr=("198.51.100.1", 3))
    assert error_code(third.allocate((stun.RESERVATION_TOKEN, token))) == 508
    assert error_code(third.allocate((stun.RESERVATION_TOKEN, token), (stun.EVEN_PORT, b"\x00"))) == 400


def test_reservation_expires_after_30_seconds():
    core, opener = make_core()
    client = CoreClient(core)
    client.allocate((stun.EVEN_PORT, b"\x80"))
    reserved = opener.opened[1]
    core.handle_timer(T0 + 29)
    assert not reserved.closed
    core.handle_timer(T0 + 31)
    assert reserved.closed


def test_tcp_client_gone_ends_its_allocation():
    core, opener = make_core()
    client = CoreClient(core, transport="tcp")
    client.allocate()
    core.client_gone(client.key_id)
    assert len(core.table) == 0 and opener.opened[0].closed


def test_malformed_attribute_values_are_400():
    core, _ = make_core()
    client = CoreClient(core)
    client.allocate()
    reply = client.send(stun.CREATE_PERMISSION, [(stun.XOR_PEER_ADDRESS, b"\x00\x01\x00")])
    assert error_code(reply) == 400
    reply = client.send(stun.REFRESH, [(stun.LIFETIME, b"\x00\x01")])
    assert error_code(reply) == 400


UDP = (stun.REQUESTED_TRANSPORT, b"\x11\0\0\0")
BAD_PEER = (stun.XOR_PEER_ADDRESS, b"\0\1\0")


@pytest.mark.parametrize(
    "method, attrs, code, integrity",
    [
        # Allocate: checked in the RFC's order; a malformed LIFETIME is the one 400 without
        # integrity (it is read where any malformed attribute may be).
        (stun.ALLOCATE, [], 400, True),
        (stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, b"\x11\0\0")], 400, True),
        (stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, b"\x06\0\0\0")], 442, True),
        (
            stun.ALLOCATE,
            [(stun.REQUESTED_TRANSPORT, b"\x06\0\0\0"), (stun.REQUESTED_ADDRESS_FAMILY, b"\x01")],
            442,
            True,
        ),
        (stun.ALLOCATE, [UDP, (stun.RESERVATION_TOKEN, b"T" * 8), (stun.EVEN_PORT, b"\0")], 400, True),
        (stun.ALLOCATE, [UDP, (stun.REQUESTED_ADDRESS_FAMILY, b"\x01\0")], 400, True),
        (stun.ALLOCATE, [UDP, (stun.EVEN_PORT, b"\x80\0")], 400, True),
        (stun.ALLOCATE, [UDP, (stun.LIFETIME, b"\0\1")], 400, False),
        (stun.ALLOCATE, [UDP, (stun.REQUESTED_ADDRESS_FAMILY, b"\x07\0\0\0")], 440, True),
        (stun.ALLOCATE, [UDP, (stun.REQUESTED_ADDRESS_FAMILY, b"\x00\0\0\0")], 440, True),
        (
            stun.ALLOCATE,
            [UDP, (stun.REQUESTED_ADDRESS_FAMILY, b"\x07\0\0\0"), (stun.LIFETIME, b"\0\1")],
            400,
            False,
        ),
        (stun.ALLOCATE, [UDP, (stun.RESERVATION_TOKEN, b"x")], 508, True),
        # On a live allocation:
        (stun.REFRESH, [(stun.REQUESTED_ADDRESS_FAMILY, b"\x01")], 443, True),
        (stun.REFRESH, [(stun.REQUESTED_ADDRESS_FAMILY, b"\x02\0\0\0")], 443, True),
        (stun.CHANNEL_BIND, [(stun.CHANNEL_NUMBER, b"\x40\0"), peer_attr(PEER)], 400, True),
        (stun.CHANNEL_BIND, [channel_attr(0x4000), BAD_PEER], 400, False),
        (stun.CHANNEL_BIND, [channel_attr(0x3FFF), BAD_PEER], 400, True),
        (stun.CHANNEL_BIND, [BAD_PEER], 400, True),
        (stun.CREATE_PERMISSION, [peer_attr(("10.0.0.1", 1)), BAD_PEER], 403, True),
        (stun.CREATE_PERMISSION, [BAD_PEER, peer_attr(("10.0.0.1", 1))], 400, False),
    ],
)
def test_which_error_a_bad_request_gets_and_whether_it_carries_integrity(method, attrs, code, integrity):
    core, _ = make_core()
    client = CoreClient(core)
    if method != stun.ALLOCATE:
        client.allocate()
    reply = client.send(method, attrs)
    assert error_code(reply) == code
    assert (stun.MESSAGE_INTEGRITY in reply.attrs) == integrity


def test_garbage_is_counted_not_answered():
    core, _ = make_core()
    client = CoreClient(core)
    assert client.raw(b"\x00\x01\x00\x00garbage-garbage!") is None
    assert core.counters["malformed"] == 1


def test_close_all_closes_every_port():
    core, opener = make_core()
    for i in range(3):
        CoreClient(core, addr=("198.51.100.1", i + 1)).allocate()
    core.close_all("shutdown")
    assert len(core.table) == 0 and all(p.closed for p in opener.opened)


def test_deleted_allocations_are_not_kept_alive_by_the_expiry_heap():
    # 500 challenges to one address at one instant: past the default error-reply budget.
    core, _ = make_core(user_quota=0, unauth_replies_per_s=0)
    for i in range(500):
        client = CoreClient(core, addr=("198.51.100.1", 1000 + i))
        client.allocate()
        client.send(stun.REFRESH, [lifetime_attr(700)])
        client.send(stun.REFRESH, [lifetime_attr(0)])
    assert len(core.table) == 0
    assert len(core.table._heap) <= 64
