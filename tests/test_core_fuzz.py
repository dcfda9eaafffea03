"""Random and mutated bytes against the codec and the core: only StunParseError
escapes the parser, nothing escapes the core, and garbage allocates nothing."""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from turn import stun

from .turn_fakes import T0, CoreClient, make_core

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def valid_messages() -> list[bytes]:
    core, _ = make_core()
    client = CoreClient(core)
    client.allocate()  # learn a nonce so the messages carry credentials
    return [
        client.build(stun.BINDING, auth=False),
        client.build(stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, b"\x11\0\0\0")]),
        client.build(stun.REFRESH, [(stun.LIFETIME, struct.pack("!I", 600))]),
        client.build(
            stun.CHANNEL_BIND,
            [
                (stun.CHANNEL_NUMBER, b"\x40\x00\0\0"),
                (stun.XOR_PEER_ADDRESS, lambda tid: stun.encode_xor_address(("8.8.8.8", 1), tid)),
            ],
        ),
    ]


SEEDS = valid_messages()


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "truncate", "length", "attrlen", "insert"]))
        if kind == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate" and data:
            del data[draw(st.integers(0, len(data) - 1)) :]
        elif kind == "length" and len(data) >= 4:
            data[2:4] = struct.pack("!H", draw(st.integers(0, 0xFFFF)))
        elif kind == "attrlen" and len(data) >= 24:
            i = 20 + 4 * draw(st.integers(0, (len(data) - 24) // 4)) + 2
            data[i : i + 2] = struct.pack("!H", draw(st.integers(0, 0xFFFF)))
        elif kind == "insert":
            i = draw(st.integers(0, len(data)))
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


@FUZZ
@given(st.binary(max_size=200))
def test_parser_random_bytes(data):
    try:
        stun.parse(data)
    except stun.StunParseError:
        pass


@FUZZ
@given(mutated())
def test_parser_mutated_messages(data):
    try:
        msg = stun.parse(data)
    except stun.StunParseError:
        return
    msg.unknown_required()
    msg.verify_integrity(b"key")


@FUZZ
@given(st.one_of(st.binary(max_size=200), mutated()))
def test_core_never_raises_and_garbage_allocates_nothing(data):
    core, opener = make_core()
    client = CoreClient(core)
    client.allocate()
    baseline = len(opener.opened)
    fresh = CoreClient(core, addr=("198.51.100.77", 9))
    reply = fresh.raw(data)
    if reply is not None:
        stun.parse(reply)  # whatever we answer is well-formed STUN
    new_allocation = core.table.get(fresh.key_id)
    if new_allocation is not None:
        # Only a request whose integrity still verifies may allocate.
        msg = stun.parse(data)
        assert msg.verify_integrity(client.key)
    else:
        assert len(opener.opened) == baseline
    core.handle_timer(T0 + 10)
