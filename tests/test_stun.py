"""The STUN codec: RFC 5769 test vectors, round trips, and cross-checks with aioice's codec."""

from __future__ import annotations

import struct

import pytest
from aioice import stun as aioice_stun

from turn import stun

# RFC 5769 §2.1-§2.4 (the RFC's bytes, written as hex).
SAMPLE_REQUEST = bytes.fromhex(
    "000100582112a442b7e7a701bc34d686fa87dfae802200105354554e20746573742063 6c69656e74".replace(" ", "")
    + "002400046e0001ff80290008932ff9b151263b36"
    "000600096576746a3a68367659202020"
    "000800149aeaa70cbfd8cb56781ef2b5b2d3f249c1b571a2"
    "80280004e57a3bcf"
)
SAMPLE_IPV4_RESPONSE = bytes.fromhex(
    "0101003c2112a442b7e7a701bc34d686fa87dfae"
    "8022000b7465737420766563746f7220"
    "002000080001a147e112a643"
    "000800142b91f599fd9e90c38c7489f92af9ba53f06be7d7"
    "80280004c07d4c96"
)
SAMPLE_IPV6_RESPONSE = bytes.fromhex(
    "010100482112a442b7e7a701bc34d686fa87dfae"
    "8022000b7465737420766563746f7220"
    "002000140002a1470113a9faa5d3f179bc25f4b5bed2b9d9"
    "00080014a382954e4be67bf11784c97c8292c275bfe3ed41"
    "80280004c8fb0b4c"
)
SAMPLE_LONG_TERM_REQUEST = bytes.fromhex(
    "000100602112a44278ad3433c6ad72c029da412e"
    "00060012e3839ee38388e383aae38383e382afe382b90000"
    "0015001c662f2f3439396b39353464364f4c33346f4c394653547679363473 41".replace(" ", "")
    + "0014000b6578616d706c652e6f726700"
    "00080014f67024656dd64a3e02b8e0712e85c9a28ca89666"
)
SHORT_TERM_PASSWORD = b"VOkJxbRl1RmTxUk/WvJxBt"


def test_vector_lengths_are_consistent():
    for vector in (SAMPLE_REQUEST, SAMPLE_IPV4_RESPONSE, SAMPLE_IPV6_RESPONSE, SAMPLE_LONG_TERM_REQUEST):
        assert struct.unpack_from("!H", vector, 2)[0] + 20 == len(vector)


def test_sample_request():
    msg = stun.parse(SAMPLE_REQUEST)
    assert (msg.method, msg.cls) == (stun.BINDING, stun.REQUEST)
    assert msg.transaction_id == bytes.fromhex("b7e7a701bc34d686fa87dfae")
    assert msg.get(stun.SOFTWARE) == b"STUN test client"
    assert msg.get(stun.USERNAME) == b"evtj:h6vY"
    assert msg.get(stun.PRIORITY) == bytes.fromhex("6e0001ff")
    assert msg.has_fingerprint
    assert msg.verify_integrity(SHORT_TERM_PASSWORD)
    assert not msg.verify_integrity(b"wrong")
    assert msg.unknown_required() == []


def test_sample_ipv4_response():
    msg = stun.parse(SAMPLE_IPV4_RESPONSE)
    assert (msg.method, msg.cls) == (stun.BINDING, stun.SUCCESS)
    assert stun.xor_address(msg.get(stun.XOR_MAPPED_ADDRESS), msg.transaction_id) == ("192.0.2.1", 32853)
    assert msg.get(stun.SOFTWARE) == b"test vector"
    assert msg.verify_integrity(SHORT_TERM_PASSWORD)


def test_sample_ipv6_response():
    msg = stun.parse(SAMPLE_IPV6_RESPONSE)
    addr = stun.xor_address(msg.get(stun.XOR_MAPPED_ADDRESS), msg.transaction_id)
    assert addr == ("2001:db8:1234:5678:11:2233:4455:6677", 32853)
    assert msg.verify_integrity(SHORT_TERM_PASSWORD)


def test_sample_long_term_request():
    msg = stun.parse(SAMPLE_LONG_TERM_REQUEST)
    username = stun.text(msg.get(stun.USERNAME))
    assert username == "\u30de\u30c8\u30ea\u30c3\u30af\u30b9"
    assert stun.text(msg.get(stun.NONCE)) == "f//499k954d6OL34oL9FSTvy64sA"
    assert stun.text(msg.get(stun.REALM)) == "example.org"
    key = stun.long_term_key(username, "example.org", "TheMatrIX")
    assert msg.verify_integrity(key)
    assert not msg.has_fingerprint


@pytest.mark.parametrize("vector", [SAMPLE_REQUEST, SAMPLE_IPV4_RESPONSE, SAMPLE_IPV6_RESPONSE])
def test_any_flipped_bit_breaks_fingerprint_or_integrity(vector):
    for position in range(20, len(vector) - 8):
        corrupted = bytearray(vector)
        corrupted[position] ^= 0x01
        with pytest.raises(stun.StunParseError):
            stun.parse(bytes(corrupted))  # the FINGERPRINT no longer matches


def test_flipped_bit_without_fingerprint_breaks_integrity():
    corrupted = bytearray(SAMPLE_LONG_TERM_REQUEST)
    corrupted[30] ^= 0x40
    msg = stun.parse(bytes(corrupted))
    key = stun.long_term_key("\u30de\u30c8\u30ea\u30c3\u30af\u30b9", "example.org", "TheMatrIX")
    assert not msg.verify_integrity(key)


def test_rebuilt_ipv4_response_verifies():
    tid = bytes.fromhex("b7e7a701bc34d686fa87dfae")
    b = stun.Builder(stun.BINDING, stun.SUCCESS, tid)
    b.add(stun.SOFTWARE, b"test vector")
    b.add(stun.XOR_MAPPED_ADDRESS, stun.encode_xor_address(("192.0.2.1", 32853), tid))
    data = b.encode(SHORT_TERM_PASSWORD, fingerprint=True)
    # Same layout as the vector: only the padding byte of SOFTWARE differs
    # (the RFC pads with a space, we pad with zero), so compare the values.
    assert len(data) == len(SAMPLE_IPV4_RESPONSE)
    assert data[:20] == SAMPLE_IPV4_RESPONSE[:20]
    assert data[36:48] == SAMPLE_IPV4_RESPONSE[36:48]
    msg = stun.parse(data)
    assert msg.verify_integrity(SHORT_TERM_PASSWORD)


@pytest.mark.parametrize(
    "method",
    [
        stun.BINDING,
        stun.ALLOCATE,
        stun.REFRESH,
        stun.SEND,
        stun.DATA,
        stun.CREATE_PERMISSION,
        stun.CHANNEL_BIND,
    ],
)
@pytest.mark.parametrize("cls", [stun.REQUEST, stun.INDICATION, stun.SUCCESS, stun.ERROR])
def test_message_type_round_trip(method, cls):
    mtype = stun.message_type(method, cls)
    assert mtype & 0xC000 == 0
    assert stun.split_type(mtype) == (method, cls)


def test_known_message_types():
    assert stun.message_type(stun.BINDING, stun.REQUEST) == 0x0001
    assert stun.message_type(stun.BINDING, stun.SUCCESS) == 0x0101
    assert stun.message_type(stun.ALLOCATE, stun.ERROR) == 0x0113
    assert stun.message_type(stun.DATA, stun.INDICATION) == 0x0017
    assert stun.message_type(stun.CHANNEL_BIND, stun.SUCCESS) == 0x0109


@pytest.mark.parametrize("addr", [("203.0.113.9", 1), ("0.0.0.0", 65535), ("2001:db8::1", 3478), ("::", 0)])
def test_xor_address_round_trip(addr):
    tid = bytes(range(12))
    assert stun.xor_address(stun.encode_xor_address(addr, tid), tid) == addr


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"\x00\x01\x00",
        b"\x00\x03\x00\x00\x00\x00\x00\x00",
        b"\x00\x01\x00\x00\x00\x00\x00",
        b"\x01\x01" + b"\x00" * 6,
    ],
)
def test_malformed_addresses_are_bad_attributes(value):
    with pytest.raises(stun.BadAttribute):
        stun.xor_address(value, bytes(12))


def request_with(*attrs) -> stun.Message:
    b = stun.Builder(stun.ALLOCATE, stun.REQUEST, bytes(range(12)))
    for atype, value in attrs:
        b.add(atype, value)
    return stun.parse(b.encode())


def test_typed_attribute_getters_read_values():
    tid = bytes(range(12))
    peers = [("203.0.113.9", 7), ("2001:db8::1", 3478)]
    msg = request_with(
        (stun.LIFETIME, struct.pack("!I", 3600)),
        (stun.REQUESTED_TRANSPORT, b"\x11\xff\xff\xff"),  # RFFU bytes are ignored
        (stun.REQUESTED_ADDRESS_FAMILY, b"\x02\x00\x00\x00"),
        (stun.EVEN_PORT, b"\x80"),
        (stun.RESERVATION_TOKEN, b"T" * 8),
        (stun.CHANNEL_NUMBER, b"\x40\x01\xff\xff"),
        *[(stun.XOR_PEER_ADDRESS, stun.encode_xor_address(p, tid)) for p in peers],
        (stun.DATA_ATTR, b"payload"),
    )
    assert msg.lifetime() == 3600
    assert msg.requested_transport() == 17
    assert msg.requested_address_family() == stun.FAMILY_IPV6
    assert msg.even_port() is True
    assert request_with((stun.EVEN_PORT, b"\x00")).even_port() is False
    assert msg.reservation_token() == b"T" * 8
    assert msg.channel_number() == 0x4001
    assert msg.xor_peer_address() == peers[0]
    assert list(msg.xor_peer_addresses()) == peers
    assert msg.data() == b"payload"


def test_typed_attribute_getters_absent_and_malformed():
    empty = request_with()
    for getter in (
        empty.lifetime,
        empty.requested_transport,
        empty.requested_address_family,
        empty.even_port,
        empty.reservation_token,
        empty.channel_number,
        empty.xor_peer_address,
        empty.data,
    ):
        assert getter() is None, getter
    assert list(empty.xor_peer_addresses()) == []
    malformed = request_with(
        (stun.LIFETIME, b"\x00\x01"),
        (stun.REQUESTED_TRANSPORT, b"\x11\x00\x00"),
        (stun.REQUESTED_ADDRESS_FAMILY, b"\x01"),
        (stun.EVEN_PORT, b"\x80\x00"),
        (stun.CHANNEL_NUMBER, b"\x40\x00"),
        (stun.XOR_PEER_ADDRESS, b"\x00\x01\x00"),
    )
    for getter in (
        malformed.lifetime,
        malformed.requested_transport,
        malformed.requested_address_family,
        malformed.even_port,
        malformed.channel_number,
        malformed.xor_peer_address,
    ):
        with pytest.raises(stun.BadAttribute):
            getter()
    assert request_with((stun.RESERVATION_TOKEN, b"x")).reservation_token() == b"x"


def test_peer_addresses_are_decoded_one_by_one():
    tid = bytes(range(12))
    msg = request_with(
        (stun.XOR_PEER_ADDRESS, stun.encode_xor_address(("203.0.113.9", 7), tid)),
        (stun.XOR_PEER_ADDRESS, b"\x00\x01\x00"),
    )
    peers = msg.xor_peer_addresses()
    assert next(peers) == ("203.0.113.9", 7)  # the malformed second one is not read yet
    with pytest.raises(stun.BadAttribute):
        next(peers)


def test_error_code_round_trip():
    for code in (400, 401, 420, 437, 438, 441, 442, 443, 486, 508):
        assert stun.decode_error(stun.encode_error(code)) == (code, stun.REASONS[code])


def test_unknown_required_and_optional_attributes():
    b = stun.Builder(stun.ALLOCATE, stun.REQUEST, bytes(12))
    b.add(0x0031, b"x").add(0x8031, b"y").add(stun.REQUESTED_TRANSPORT, b"\x11\0\0\0")
    msg = stun.parse(b.encode())
    assert msg.unknown_required() == [0x0031]


def test_attributes_after_integrity_are_ignored_and_duplicates_keep_first():
    key = b"k" * 16
    b = stun.Builder(stun.CREATE_PERMISSION, stun.REQUEST, bytes(12))
    b.add(stun.XOR_PEER_ADDRESS, stun.encode_xor_address(("198.51.100.1", 1), bytes(12)))
    b.add(stun.XOR_PEER_ADDRESS, stun.encode_xor_address(("198.51.100.2", 2), bytes(12)))
    data = b.encode(key)
    # Append an attribute after MESSAGE-INTEGRITY and fix the length.
    extra = struct.pack("!HH", stun.LIFETIME, 4) + b"\0\0\0\1"
    data = data[:2] + struct.pack("!H", len(data) - 20 + 8) + data[4:] + extra
    msg = stun.parse(data)
    assert msg.verify_integrity(key)
    assert stun.LIFETIME not in msg.attrs
    assert len(msg.get_all(stun.XOR_PEER_ADDRESS)) == 2
    assert stun.xor_address(msg.get(stun.XOR_PEER_ADDRESS), bytes(12))[0] == "198.51.100.1"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00" * 19,
        b"\xc0\x01\x00\x00" + stun.MAGIC_COOKIE_BYTES + bytes(12),
        b"\x00\x01\x00\x00\x00\x00\x00\x00" + bytes(12),
        b"\x00\x01\x00\x04" + stun.MAGIC_COOKIE_BYTES + bytes(12),
        b"\x00\x01\x00\x03" + stun.MAGIC_COOKIE_BYTES + bytes(12) + b"abc",
        b"\x00\x01\x00\x04" + stun.MAGIC_COOKIE_BYTES + bytes(12) + b"\x00\x06\x00\x08",
    ],
)
def test_malformed_messages(data):
    with pytest.raises(stun.StunParseError):
        stun.parse(data)


def test_aioice_parses_what_we_build():
    tid = bytes(range(12))
    key = b"secret-key"
    b = stun.Builder(stun.ALLOCATE, stun.SUCCESS, tid)
    b.add(stun.XOR_RELAYED_ADDRESS, stun.encode_xor_address(("192.0.2.7", 50000), tid))
    b.add(stun.LIFETIME, struct.pack("!I", 600))
    b.add(stun.XOR_MAPPED_ADDRESS, stun.encode_xor_address(("2001:db8::5", 4000), tid))
    data = b.encode(key, fingerprint=True)
    msg = aioice_stun.parse_message(data)
    assert msg.check_message_integrity(key)
    assert msg.message_method == aioice_stun.Method.ALLOCATE
    assert msg.attributes["XOR-RELAYED-ADDRESS"] == ("192.0.2.7", 50000)
    assert msg.attributes["XOR-MAPPED-ADDRESS"] == ("2001:db8::5", 4000)
    assert msg.attributes["LIFETIME"] == 600


def test_we_parse_what_aioice_builds():
    request = aioice_stun.Message(
        message_method=aioice_stun.Method.CHANNEL_BIND, message_class=aioice_stun.Class.REQUEST
    )
    request.attributes["CHANNEL-NUMBER"] = 0x4001
    request.attributes["XOR-PEER-ADDRESS"] = ("198.51.100.3", 7000)
    request.attributes["USERNAME"] = "1:bob"
    request.add_message_integrity(b"key")
    request.add_fingerprint()
    msg = stun.parse(bytes(request))
    assert (msg.method, msg.cls) == (stun.CHANNEL_BIND, stun.REQUEST)
    assert stun.xor_address(msg.get(stun.XOR_PEER_ADDRESS), msg.transaction_id) == ("198.51.100.3", 7000)
    assert msg.get(stun.CHANNEL_NUMBER)[:2] == b"\x40\x01"
    assert msg.verify_integrity(b"key")


def test_plain_address_unmaps_ipv4():
    assert stun.plain_address(("::ffff:192.0.2.1", 5, 0, 0)) == ("192.0.2.1", 5)
    assert stun.plain_address(("2001:db8::1", 5, 0, 0)) == ("2001:db8::1", 5)
