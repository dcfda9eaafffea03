"""Fuzz the running relay over the wire: mutated STUN/ChannelData datagrams and TCP/TLS streams.

    python bench/fuzz_relay.py [--datagrams N] [--frames N] [--batches N] [--seed S]
                               [--workers N] [--senders N] [--quick] [--out DIR]
    python bench/fuzz_relay.py --replay CASE.json

Starts the appliance as an operator runs it (`python -m appliance serve`, through
tests/interop/conftest.py's start_appliance, on free loopback ports) and, batch after
batch, throws at it:

- UDP: datagrams to the listener from many sources (127.0.0.2, .3, ...; two sockets
  each), built from real messages (Binding, Allocate with and without credentials,
  Refresh, CreatePermission, ChannelBind, Send, ChannelData on bound and unbound
  channels) and mutated at two levels: attribute lists re-signed with a valid
  MESSAGE-INTEGRITY (so mutations reach the handlers behind authentication: odd
  usernames, realms, nonces, lifetimes, addresses, duplicated and unknown attributes,
  MESSAGE-INTEGRITY and FINGERPRINT misplaced) and raw bytes (bit flips, inserts,
  truncation, length lies, padding, splices).  Each source keeps a real allocation
  with a channel to a sink peer, re-made before every batch.  A "peer" sends
  datagrams of every size to the relay ports, from a permitted and an unpermitted
  address.  The send rate adapts to the listener socket's kernel drop counter
  (/proc/net/udp), and what the kernel dropped is reported, not counted as processed.
  Two sender processes by default: making the inputs costs more than parsing them.
  The defaults (10^6 datagrams, 10^5 frames) take one to two minutes on two cores.
- TCP and TLS: many connections carrying mutated frames (some after a real
  allocation), in random fragments, with lying lengths, partial frames, garbage;
  slowloris connections dripping a byte a second; connections that allocate and
  never read while a peer floods their relay port.
- After each batch: the appliance's RSS and open descriptors (summed over its
  processes), "Traceback" in its log, its internal-error counter, and a legitimate
  client's Allocate + CreatePermission + ChannelBind + ChannelData round trip through
  the relay to a UDP echo peer, over UDP, TCP and TLS.

The peer policy denies everything but 127.0.0.0/8, and when `unshare` works (root)
the whole run happens in a private network namespace with only loopback, so nothing
the relay is tricked into sending can leave the machine.

Exit status 1 if the log shows a traceback, the internal-error counter moved, a
worker died, a legitimate check failed, the appliance did not stop cleanly, or RSS
grew by more than --rss-growth-mib (default 24 MiB) plus 10 % between the end of the
warm-up batch and the last batch.  The mix and shape of the inputs is a function of
--seed; their bytes also carry this run's timestamps, nonces and relay ports, and the
stream jobs run on threads, so two runs send the same mix, not identical traffic.
When a traceback shows up, the datagrams sent just before it are replayed one at a
time to find the one that triggers it (else each stream job of the batch is replayed),
and the input is saved under --out as a JSON case that --replay sends to a fresh
appliance.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import fcntl
import hashlib
import hmac
import itertools
import json
import multiprocessing
import os
import random
import selectors
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fuzzkit import LogWatch, add_common_options, metrics, report_memory, run_or_replay, verdict, write_case
from proc_stats import cpu_seconds, fd_count, process_tree, rss_kib

from tests.interop.conftest import REALM, start_appliance, stop_appliance
from tests.netports import free_port_pair
from turn import stun
from turn.auth import rest_password
from turn.client import ClientCredentials

RELAY_PORTS = (61000, 62999)  # outside Linux's ephemeral range and tests/netports' range
UDP_SOURCE_NET = "127.0.0."  # .2 .. .(1 + sources): fuzzing clients
STREAM_SOURCE_NET = "127.0.1."  # .1 .. .250: stream fuzzing clients, round robin
SINK_IP = "127.0.0.250"  # the peer the fuzz allocations bind channels to
STRANGER_IP = "127.0.0.251"  # a peer no allocation permits
LEGIT_IP = "127.0.0.1"  # the legitimate client, and its echo peer
MAX_UDP = 65507
NETNS_ENV = "FUZZ_RELAY_IN_NETNS"
KNOWN_TYPES = (
    stun.MAPPED_ADDRESS,
    stun.USERNAME,
    stun.MESSAGE_INTEGRITY,
    stun.ERROR_CODE,
    stun.UNKNOWN_ATTRIBUTES,
    stun.CHANNEL_NUMBER,
    stun.LIFETIME,
    stun.XOR_PEER_ADDRESS,
    stun.DATA_ATTR,
    stun.REALM,
    stun.NONCE,
    stun.XOR_RELAYED_ADDRESS,
    stun.REQUESTED_ADDRESS_FAMILY,
    stun.EVEN_PORT,
    stun.REQUESTED_TRANSPORT,
    stun.DONT_FRAGMENT,
    stun.MESSAGE_INTEGRITY_SHA256,
    stun.PASSWORD_ALGORITHM,
    stun.USERHASH,
    stun.XOR_MAPPED_ADDRESS,
    stun.RESERVATION_TOKEN,
    stun.PRIORITY,
    stun.USE_CANDIDATE,
    stun.PASSWORD_ALGORITHMS,
    stun.ALTERNATE_DOMAIN,
    stun.ICMP,
    stun.SOFTWARE,
    stun.ALTERNATE_SERVER,
    stun.FINGERPRINT,
    stun.ICE_CONTROLLED,
    stun.ICE_CONTROLLING,
    stun.RESPONSE_ORIGIN,
    stun.OTHER_ADDRESS,
    0x0000,
    0x7FFF,
    0xFFFF,
    0x0003,
    0x0004,
    0x0005,
)
GENERATOR_FAULTS: list[str] = []  # bugs of this script's generators, reported at the end
INTERESTING_U32 = (0, 1, 2, 599, 600, 601, 3600, 3601, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)
INTERESTING_U16 = (0, 1, 3, 4, 5, 19, 20, 21, 0x3FFF, 0x4000, 0x4FFF, 0x7FFF, 0x8000, 0xFFFC, 0xFFFF)


# ------------------------------------------------------------------ encoding helpers


def tlv(atype: int, value: bytes, declared: int | None = None, pad: bytes | None = None) -> bytes:
    """One attribute; `declared` lies about its length, `pad` replaces the zero padding."""
    padding = b"\x00" * (-len(value) & 3) if pad is None else pad
    return struct.pack("!HH", atype, len(value) if declared is None else declared & 0xFFFF) + value + padding


def assemble(
    mtype: int,
    tid: bytes,
    before: list[bytes],
    key: bytes | None = None,
    after: list[bytes] = (),
    fingerprint: str | None = "good",
) -> bytes:
    """A message with MESSAGE-INTEGRITY (if `key`) after `before`, then `after`, then
    FINGERPRINT as `fingerprint` says: good, bad, None, or twice."""
    body = b"".join(before)
    if key is not None:
        covered = struct.pack("!HH", mtype & 0xFFFF, len(body) + 24) + stun.MAGIC_COOKIE_BYTES + tid + body
        body += tlv(stun.MESSAGE_INTEGRITY, hmac.new(key, covered, hashlib.sha1).digest())
    body += b"".join(after)
    if fingerprint is not None:
        covered = struct.pack("!HH", mtype & 0xFFFF, len(body) + 8) + stun.MAGIC_COOKIE_BYTES + tid + body
        crc = stun.fingerprint_value(covered)
        if fingerprint == "bad":
            crc ^= 1
        body += struct.pack("!HHI", stun.FINGERPRINT, 4, crc)
        if fingerprint == "twice":
            body += struct.pack("!HHI", stun.FINGERPRINT, 4, crc)
    return struct.pack("!HH", mtype & 0xFFFF, len(body) & 0xFFFF) + stun.MAGIC_COOKIE_BYTES + tid + body


def key_for(secret: bytes, username: bytes, realm: str = REALM) -> bytes:
    """The long-term key the relay derives for `username` (any bytes) under `secret`."""
    try:
        text = username.decode("utf-8")
    except UnicodeDecodeError:
        password = "x"
        return hashlib.md5(username + f":{realm}:{password}".encode()).digest()
    return stun.long_term_key(text, realm, rest_password(secret, text))


def u16(value: int) -> bytes:
    return struct.pack("!H", value & 0xFFFF)


def channel_data(number: int, payload: bytes, stream: bool, declared: int | None = None) -> bytes:
    length = len(payload) if declared is None else declared & 0xFFFF
    frame = struct.pack("!HH", number & 0xFFFF, length) + payload
    if stream:
        frame += b"\x00" * (-len(payload) & 3)
    return frame


def attribute_offsets(data: bytes) -> list[tuple[int, int]]:
    """(offset, value length) of each attribute as the bytes frame them."""
    out, pos = [], stun.HEADER_LENGTH
    while pos + 4 <= len(data) and len(out) < 512:
        alen = struct.unpack_from("!H", data, pos + 2)[0]
        out.append((pos, alen))
        pos += 4 + alen + (-alen & 3)
    return out


def take_frame(buf: bytearray) -> bytes | None:
    """One STUN message or ChannelData off a stream buffer, or None if it is incomplete."""
    if len(buf) < 4:
        return None
    length = (buf[2] << 8) | buf[3]
    total = stun.HEADER_LENGTH + length if buf[0] < 0x40 else 4 + length + (-length & 3)
    if len(buf) < total:
        return None
    frame = bytes(buf[:total])
    del buf[:total]
    return frame


# ------------------------------------------------------------------ what the fuzzer knows


@dataclass
class Targets:
    """Addresses the generators aim at (all on loopback)."""

    secret: bytes
    server: tuple[str, int]  # UDP and TCP listener
    tls_port: int
    sink: tuple[str, int]
    echo: tuple[str, int]
    stranger: tuple[str, int]
    own: list  # the appliance's own endpoints: the policy must refuse them
    relayed: list = field(default_factory=list)  # relay addresses of fuzz allocations


@dataclass
class ClientState:
    """One fuzzing client: its credentials (with the nonce its IP got) and what it holds."""

    ip: str
    creds: ClientCredentials
    stream: bool = False
    relayed: tuple | None = None
    channel: int | None = None


def new_credentials(secret: bytes, label: str) -> ClientCredentials:
    return ClientCredentials.rest(secret, f"{int(time.time()) + 86400}:{label}", REALM)


class Generator:
    """Makes the inputs: valid seeds, attribute-level and byte-level mutations."""

    def __init__(self, rng: random.Random, targets: Targets) -> None:
        self.rng = rng
        self.t = targets
        self._keys: dict[bytes, bytes] = {}

    # -------------------------------------------------------- pieces

    def peer(self) -> tuple[str, int]:
        r = self.rng
        t = self.t
        choices = [
            t.sink,
            t.sink,
            t.sink,
            t.stranger,
            t.echo,
            (SINK_IP, r.randint(1, 65535)),
            ("127.0.0.1", r.randint(1, 65535)),
            ("127.0.0.1", 0),
            ("::1", t.sink[1]),
            ("::ffff:127.0.0.250", t.sink[1]),
            ("64:ff9b::7f00:fa", t.sink[1]),
            ("192.0.2.1", 9),
            ("2001:db8::1", 9),
            ("0.0.0.0", 0),
            ("255.255.255.255", 9),
            ("::", 0),
        ]
        choices.extend(t.own)
        if t.relayed:
            choices.append(r.choice(t.relayed))
        return r.choice(choices)

    def xor_peer(self, tid: bytes) -> bytes:
        r = self.rng
        if r.random() < 0.9:
            return stun.encode_xor_address(self.peer(), tid)
        return r.choice(
            [
                b"",
                b"\x00\x01",
                b"\x00\x01\x00\x00\x00\x00\x00",
                b"\x00\x03" + r.randbytes(6),
                b"\x01\x01" + r.randbytes(6),
                b"\x00\x02" + r.randbytes(18),
                b"\x00\x01" + r.randbytes(r.randint(0, 40)),
            ]
        )

    def channel_number(self) -> int:
        r = self.rng
        return r.choice(
            [
                r.randint(0x4000, 0x4FFF),
                r.randint(0x4000, 0x7FFF),
                0x4000,
                0x4FFF,
                0x5000,
                0x7FFF,
                0x3FFF,
                0x8000,
                0xFFFF,
                0,
            ]
        )

    def payload(self, stream: bool, big: float = 0.01) -> bytes:
        r = self.rng
        if r.random() < big:
            return r.randbytes(r.choice([1400, 9000, 65000 if stream else MAX_UDP - 80]))
        return r.randbytes(r.choice([0, 1, 2, 3, 4, r.randint(0, 200), r.randint(0, 1400)]))

    def username(self, st: ClientState) -> bytes:
        r = self.rng
        now = int(time.time())
        return r.choice(
            [
                st.creds.username.encode(),
                f"{now + 3600}:fuzz-{r.randint(0, 99)}".encode(),
                f"{now + 3600}".encode(),
                f"{now - 10}:expired".encode(),
                b"0:x",
                "\u00b2:x".encode(),
                "\u0661\u0662\u0663:x".encode(),
                b"-5:x",
                b"+5:x",
                b" 5:x",
                b"1e9:x",
                b"0x10:x",
                b"999999999999:x",
                b"9999999999999:x",
                f"{now + 3600}:".encode(),
                b":x",
                b"",
                f"{now + 3600}:\u00fc\u2603\U0001f600".encode(),
                f"{now + 3600}:a:b:c".encode(),
                f"{now + 3600}:x\x00y".encode(),
                b"x" * 513,
                b"x" * 514,
                b"9" * 763,
                b"9" * 764,
                b"\xff\xfe",
                b"\xc0\x80",
                f"{now + 3600}:\xff".encode("latin-1"),
                b"1" * r.randint(0, 3000),
            ]
        )

    def realm(self) -> bytes:
        return self.rng.choice(
            [REALM.encode()] * 4
            + [b"", REALM.upper().encode(), b"\xff", REALM.encode() + b"\x00", b"r" * 764]
        )

    def nonce(self, st: ClientState) -> bytes:
        r = self.rng
        good = st.creds.nonce or b""
        return r.choice(
            [good] * 4
            + [
                b"",
                r.randbytes(34).hex()[:34].encode(),
                b"\xff" * 34,
                b"zzzzzzzzzz" + good[10:],
                b"0000000000" + good[10:],
                good[:-1],
                good + b"0",
                b"n" * 800,
            ]
        )

    def key(self, username: bytes) -> bytes:
        key = self._keys.get(username)
        if key is None:
            if len(self._keys) > 4096:
                self._keys.clear()
            key = self._keys[username] = key_for(self.t.secret, username)
        return key

    # -------------------------------------------------------- seeds

    def template(self, st: ClientState, tid: bytes) -> tuple[int, int, list, bool]:
        """(method, class, [(type, value)], authenticated) of one valid-looking message."""
        r = self.rng
        u32 = struct.Struct("!I").pack
        kind = r.random()
        if kind < 0.12:
            attrs = []
            if r.random() < 0.5:
                attrs = [(stun.PRIORITY, u32(r.getrandbits(32))), (stun.ICE_CONTROLLING, r.randbytes(8))]
                if r.random() < 0.5:
                    attrs.append((stun.USE_CANDIDATE, b""))
            return stun.BINDING, r.choice([stun.REQUEST] * 4 + [stun.INDICATION]), attrs, r.random() < 0.2
        if kind < 0.30:
            attrs = [(stun.REQUESTED_TRANSPORT, bytes([r.choice([17] * 6 + [6, 0, 255]), 0, 0, 0]))]
            if r.random() < 0.2:
                attrs.append((stun.EVEN_PORT, bytes([r.choice([0, 0x80])])))
            if r.random() < 0.2:
                attrs.append((stun.REQUESTED_ADDRESS_FAMILY, bytes([r.choice([1, 2, 3, 0]), 0, 0, 0])))
            if r.random() < 0.1:
                attrs.append((stun.RESERVATION_TOKEN, r.randbytes(8)))
            if r.random() < 0.1:
                attrs.append((stun.DONT_FRAGMENT, b""))
            if r.random() < 0.3:
                attrs.append((stun.LIFETIME, u32(r.choice(INTERESTING_U32))))
            return stun.ALLOCATE, stun.REQUEST, attrs, r.random() < 0.7
        if kind < 0.40:
            # Rarely 0: a deleted allocation leaves the source answering 437 until the next batch.
            lifetime = r.choice([600] * 12 + [3600, 0xFFFFFFFF, 1, 0])
            attrs = [(stun.LIFETIME, u32(lifetime))] if r.random() < 0.8 else []
            if r.random() < 0.1:
                attrs.append((stun.REQUESTED_ADDRESS_FAMILY, bytes([r.choice([1, 2]), 0, 0, 0])))
            return stun.REFRESH, stun.REQUEST, attrs, True
        if kind < 0.55:
            count = r.choice([1, 1, 1, 2, 3, r.randint(1, 80)])
            return (
                stun.CREATE_PERMISSION,
                stun.REQUEST,
                [(stun.XOR_PEER_ADDRESS, self.xor_peer(tid)) for _ in range(count)],
                True,
            )
        if kind < 0.72:
            number = st.channel if st.channel is not None and r.random() < 0.5 else self.channel_number()
            return (
                stun.CHANNEL_BIND,
                stun.REQUEST,
                [
                    (stun.CHANNEL_NUMBER, struct.pack("!HH", number, r.choice([0, 0, 0, 1, 0xFFFF]))),
                    (stun.XOR_PEER_ADDRESS, self.xor_peer(tid)),
                ],
                True,
            )
        if kind < 0.95:
            attrs = [(stun.XOR_PEER_ADDRESS, self.xor_peer(tid)), (stun.DATA_ATTR, self.payload(st.stream))]
            if r.random() < 0.1:
                attrs.append((stun.DONT_FRAGMENT, b""))
            return stun.SEND, stun.INDICATION, attrs, False
        method = r.choice([stun.DATA, 0x000, 0x002, 0x005, 0x00A, 0x00B, 0xFFF, r.randint(0, 0xFFF)])
        return (
            method,
            r.choice([stun.REQUEST, stun.INDICATION, stun.SUCCESS, stun.ERROR]),
            [(stun.XOR_PEER_ADDRESS, self.xor_peer(tid))],
            r.random() < 0.5,
        )

    def seed(self, st: ClientState) -> bytes:
        """A well-formed message, signed when its template is authenticated."""
        tid = self.rng.randbytes(12)
        method, cls, attrs, auth = self.template(st, tid)
        before = [tlv(t, v) for t, v in attrs]
        key = None
        if auth and st.creds.nonce:
            before += [
                tlv(stun.USERNAME, st.creds.username.encode()),
                tlv(stun.REALM, REALM.encode()),
                tlv(stun.NONCE, st.creds.nonce),
            ]
            key = st.creds.key
        return assemble(
            stun.message_type(method, cls),
            tid,
            before,
            key,
            fingerprint="good" if self.rng.random() < 0.7 else None,
        )

    # -------------------------------------------------------- attribute-level mutation

    def mutate_value(self, value: bytes) -> bytes:
        r = self.rng
        op = r.randrange(9)
        if op == 0:
            return b""
        if op == 1:
            return r.randbytes(1)
        if op == 2:
            return r.randbytes(3)
        if op == 3 and value:
            return value[: r.randrange(len(value))]
        if op == 4:
            return value + r.randbytes(r.randint(1, 16))
        if op == 5 and value:
            v = bytearray(value)
            v[r.randrange(len(v))] ^= 1 << r.randrange(8)
            return bytes(v)
        if op == 6:
            return struct.pack("!I", r.choice(INTERESTING_U32))
        if op == 7:
            return b"\xff" * len(value)
        return r.randbytes(r.randint(0, 64))

    def structured(self, st: ClientState) -> bytes:
        """A seed whose attributes are mutated, then signed so the signature still verifies."""
        r = self.rng
        tid = r.randbytes(12)
        method, cls, attrs, auth = self.template(st, tid)
        attrs = [list(a) + [None, None] for a in attrs]  # type, value, declared, pad
        if auth or r.random() < 0.3:
            attrs += [
                [stun.USERNAME, st.creds.username.encode(), None, None],
                [stun.REALM, REALM.encode(), None, None],
                [stun.NONCE, st.creds.nonce or b"", None, None],
            ]
        limit = 65000 if st.stream else MAX_UDP - 200
        for _ in range(r.choice([1, 1, 1, 2, 3, 5])):
            op = r.randrange(13)
            i = r.randrange(len(attrs)) if attrs else 0
            if op == 0 and attrs:
                attrs[i][1] = self.mutate_value(attrs[i][1])
            elif op == 1 and attrs:
                copy = list(attrs[i])
                if r.random() < 0.5:
                    copy[1] = self.mutate_value(copy[1])
                attrs.insert(r.randint(0, len(attrs)), copy)
            elif op == 2 and attrs:
                del attrs[i]
            elif op == 3:
                atype = r.choice(KNOWN_TYPES) if r.random() < 0.6 else r.getrandbits(16)
                attrs.insert(r.randint(0, len(attrs)), [atype, r.randbytes(r.randint(0, 24)), None, None])
            elif op == 4:  # many unknown comprehension-required attributes
                raw = r.randbytes(2 * r.randint(20, 300))
                attrs.extend(
                    [
                        0x0030 + int.from_bytes(raw[j : j + 2], "big") % 0x7FD0,
                        raw[j : j + (j & 4)],
                        None,
                        None,
                    ]
                    for j in range(0, len(raw), 2)
                )
            elif op == 5:
                r.shuffle(attrs)
            elif op == 6:
                attrs.append([stun.USERNAME, self.username(st), None, None])
                attrs.insert(0, attrs.pop())
            elif op == 7:
                attrs.insert(0, [stun.REALM, self.realm(), None, None])
            elif op == 8:
                attrs.insert(0, [stun.NONCE, self.nonce(st), None, None])
            elif op == 9:
                atype = r.choice([stun.USERNAME, stun.DATA_ATTR, stun.SOFTWARE, stun.NONCE, 0x8888])
                attrs.insert(0, [atype, r.randbytes(r.randint(1000, limit)), None, None])
            elif op == 10 and attrs:
                attrs[i][2] = r.choice(
                    [0, 1, 3, 65535, len(attrs[i][1]) + 4, len(attrs[i][1]) - 1, r.getrandbits(16)]
                )
            elif op == 11 and attrs:
                attrs[i][3] = r.choice([b"", b"\xff\xff\xff", b"\x00" * 4, b"\x01"])
            elif op == 12:
                attrs.append([stun.LIFETIME, struct.pack("!I", r.choice(INTERESTING_U32)), None, None])
        chunks = [tlv(t, v, d, p) for t, v, d, p in attrs]
        total = sum(map(len, chunks))
        while total > limit and chunks:
            total -= len(chunks.pop(0))
        username = next((v for t, v, _, _ in attrs if t == stun.USERNAME), None)
        key = None
        mode = r.random()
        if username is not None and mode < 0.75:
            key = self.key(username)
        elif mode < 0.85:
            key = r.randbytes(16)
        cut = len(chunks)
        after: list[bytes] = []
        if r.random() < 0.1 and chunks:
            cut = r.randrange(len(chunks))  # attributes after MESSAGE-INTEGRITY
        elif r.random() < 0.05:
            after = [tlv(stun.MESSAGE_INTEGRITY, r.randbytes(r.choice([19, 20, 21, 32])))]
        elif r.random() < 0.05:
            after = [tlv(stun.MESSAGE_INTEGRITY_SHA256, r.randbytes(32))]
        fingerprint = r.choice(["good", "good", "good", None, None, "bad", "twice"])
        if r.random() < 0.03:
            after.append(tlv(stun.FINGERPRINT, r.randbytes(r.choice([0, 4, 8]))))
        mtype = stun.message_type(method, cls)
        if r.random() < 0.03:
            mtype = r.getrandbits(14)
        return assemble(mtype, tid, chunks[:cut], key, chunks[cut:] + after, fingerprint)

    # -------------------------------------------------------- byte-level mutation

    def mutate_bytes(self, data: bytes, stream: bool) -> bytes:
        r = self.rng
        d = bytearray(data)
        for _ in range(r.choice([1, 1, 2, 3, 6])):
            op = r.randrange(14)
            n = len(d)
            if op == 0 and n:
                d[r.randrange(n)] ^= 1 << r.randrange(8)
            elif op == 1 and n:
                d[r.randrange(n)] = r.choice([0, 1, 0x3F, 0x40, 0x7F, 0x80, 0xFF])
            elif op == 2:
                i = r.randint(0, n)
                d[i:i] = r.randbytes(r.randint(1, 16))
            elif op == 3 and n:
                i = r.randrange(n)
                del d[i : i + r.randint(1, 16)]
            elif op == 4 and n:
                del d[r.randrange(n) :]
            elif op == 5:
                d += r.randbytes(r.randint(1, 64))
            elif op == 6 and n >= 4:
                d[2:4] = u16(r.choice([*INTERESTING_U16, n - 20, n - 16, n - 24]))
            elif op == 7 and n > 24:
                offsets = attribute_offsets(bytes(d))
                if offsets:
                    pos, alen = r.choice(offsets)
                    d[pos + 2 : pos + 4] = u16(r.choice([*INTERESTING_U16, alen + 4, alen - 4, alen + 1]))
            elif op == 8 and n > 24:
                offsets = attribute_offsets(bytes(d))
                if offsets:
                    pos, _ = r.choice(offsets)
                    d[pos : pos + 2] = u16(r.choice(KNOWN_TYPES))
            elif op == 9 and n > 24:
                offsets = [o for o in attribute_offsets(bytes(d)) if o[0] + 4 + o[1] <= n]
                if offsets:
                    pos, alen = r.choice(offsets)
                    piece = bytes(d[pos : pos + 4 + alen + (-alen & 3)])
                    at, _ = r.choice(offsets)
                    if r.random() < 0.5:
                        d[at:at] = piece * r.randint(1, 4)
                    else:
                        del d[pos : pos + len(piece)]
            elif op == 10 and n >= 8:
                d[4:8] = r.randbytes(4)
            elif op == 11 and n:
                d[0] = (d[0] & 0x3F) | r.choice([0x40, 0x80, 0xC0]) if r.random() < 0.5 else r.getrandbits(8)
            elif op == 12:
                other = self.seed(ClientState("", ClientCredentials("", REALM, b"")))
                d = d[: r.randint(0, n)] + other[r.randint(0, len(other)) :]
            elif op == 13 and n > 24:
                for pos, alen in attribute_offsets(bytes(d)):
                    if alen & 3 and pos + 4 + alen < len(d):
                        d[pos + 4 + alen] = 0xFF
        if r.random() < 0.5 and len(d) >= 20:
            d[2:4] = u16(len(d) - 20)  # so the parser goes further
        limit = 65535 + 20 if stream else MAX_UDP
        return bytes(d[:limit])

    def channel(self, st: ClientState) -> bytes:
        r = self.rng
        number = st.channel if st.channel is not None and r.random() < 0.6 else self.channel_number()
        if not 0x4000 <= number <= 0x7FFF:
            number = r.randint(0x4000, 0x7FFF)  # the first byte is what makes it ChannelData
        payload = self.payload(st.stream, big=0.005)
        kind = r.random()
        if kind < 0.75:
            return channel_data(number, payload, st.stream)
        if kind < 0.9:
            declared = r.choice(
                [0, 1, len(payload) + 1, len(payload) + 4, max(0, len(payload) - 1), 65535, r.getrandbits(16)]
            )
            return channel_data(number, payload, st.stream, declared)
        return struct.pack("!H", number)[: r.randint(1, 2)] + r.randbytes(r.randint(0, 1))

    def garbage(self) -> bytes:
        r = self.rng
        size = r.choice([0, 1, 3, 4, 19, 20, 21, r.randint(0, 100), r.randint(0, 1500)])
        if r.random() < 0.002:
            size = MAX_UDP
        data = bytearray(r.randbytes(size))
        if data and r.random() < 0.5:
            data[0] = r.choice([0x00, 0x01, 0x3F, 0x40, 0x7F, 0x80, 0xC0, 0xFF])
        return bytes(data)

    # -------------------------------------------------------- one input

    def guarded(self, make, st: ClientState) -> bytes:
        """`make(st)`; a bug of this generator is recorded (and garbage sent) rather
        than ending a long run."""
        try:
            return make(st)
        except Exception as exc:  # noqa: BLE001 - any bug of ours, see GENERATOR_FAULTS
            GENERATOR_FAULTS.append(f"{make.__name__}: {type(exc).__name__}: {exc}")
            return self.garbage()

    def datagram(self, st: ClientState) -> bytes:
        k = self.rng.random()
        if k < 0.12:
            return self.seed(st)
        if k < 0.47:
            return self.structured(st)
        if k < 0.75:
            base = self.seed(st) if self.rng.random() < 0.6 else self.structured(st)
            return self.mutate_bytes(base, False)
        if k < 0.92:
            return self.channel(st)
        return self.garbage()

    def frame(self, st: ClientState) -> bytes:
        """A frame for a stream that keeps its framing (the message length is the real one)."""
        k = self.rng.random()
        if k < 0.25:
            return self.seed(st)
        if k < 0.7:
            data = self.structured(st)
        elif k < 0.85:
            data = self.mutate_bytes(self.seed(st), True)
        else:
            return channel_data(
                self.channel_number() if st.channel is None or self.rng.random() < 0.3 else st.channel,
                self.payload(True, big=0.002),
                True,
            )
        data = bytearray(data[: 65532 + 20])
        if len(data) < 20:
            data += bytes(20 - len(data))
        data[0] &= 0x3F
        body = len(data) - 20
        data += bytes(-body & 3)
        data[2:4] = struct.pack("!H", len(data) - 20)
        return bytes(data)

    def broken_frame(self, st: ClientState) -> bytes:
        """A frame that breaks the framing: lying length, partial, or not STUN at all."""
        r = self.rng
        kind = r.randrange(4)
        if kind == 0:
            frame = bytearray(self.seed(st))
            frame[2:4] = u16(r.choice([len(frame) - 20 + 4, 65532, 65535, 1, 2]))
            return bytes(frame)
        if kind == 1:
            frame = self.seed(st)
            return frame[: r.randint(1, len(frame) - 1)]
        if kind == 2:
            return channel_data(
                r.randint(0x4000, 0x7FFF),
                r.randbytes(r.randint(0, 50)),
                True,
                declared=r.choice([65535, 60000, 1000]),
            )
        return bytes([r.randint(0x80, 0xFF)]) + r.randbytes(r.randint(0, 200))


# ------------------------------------------------------------------ the appliance as a process


def listener_queue(port: int) -> tuple[int, int]:
    """(bytes queued, datagrams dropped) summed over the UDP sockets bound to 127.0.0.1:port."""
    local = f"0100007F:{port:04X}"
    queued = drops = 0
    with open("/proc/net/udp") as f:
        next(f)
        for line in f:
            fields = line.split()
            if fields[1] == local:
                queued += int(fields[4].split(":")[1], 16)
                drops += int(fields[-1])
    return queued, drops


# ------------------------------------------------------------------ peers


def echo_peer(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((LEGIT_IP, port))
        while True:
            data, addr = s.recvfrom(65536)
            with contextlib.suppress(OSError):
                s.sendto(data, addr)


def bring_up_loopback() -> None:
    """`ip link set lo up` without iproute2 (a fresh network namespace starts with lo down)."""
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifr = fcntl.ioctl(s, siocgifflags, struct.pack("16sH14x", b"lo", 0))
        flags = struct.unpack("16sH14x", ifr)[1]
        fcntl.ioctl(s, siocsifflags, struct.pack("16sH14x", b"lo", flags | iff_up))


# ------------------------------------------------------------------ clients that talk back


class Conversation:
    """Request/response over a UDP socket or a stream, for set-up and the legitimate checks."""

    def __init__(self, sock: socket.socket, stream: bool, server: tuple[str, int] | None = None) -> None:
        self.sock = sock
        self.stream = stream
        self.server = server
        self.buf = bytearray()

    def send(self, data: bytes) -> None:
        if self.stream:
            self.sock.sendall(data)
        else:
            self.sock.sendto(data, self.server)

    def receive(self, timeout: float) -> bytes | None:
        deadline = time.monotonic() + timeout
        while True:
            if self.stream:
                frame = take_frame(self.buf)
                if frame is not None:
                    return frame
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, ssl.SSLError, BlockingIOError):
                return None
            except OSError:
                return None
            if not self.stream:
                return data
            if not data:
                return None
            self.buf += data

    def request(
        self, creds: ClientCredentials, method: int, attrs, timeout: float = 1.0, tries: int = 3
    ) -> stun.Message | None:
        """The final answer (after 401/438 retries), or None if none came."""
        for _ in range(tries + 1):
            tid = os.urandom(12)
            self.send(creds.build(method, attrs, tid))
            reply = None
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                data = self.receive(deadline - time.monotonic())
                if data is None:
                    break
                if data[0] < 0x40:
                    try:
                        msg = stun.parse(data)
                    except stun.StunParseError:
                        continue
                    if msg.transaction_id == tid:
                        reply = msg
                        break
            if reply is None:
                if self.stream:
                    return None
                continue
            if creds.should_retry(reply):
                continue
            return reply
        return None


def error_text(reply: stun.Message | None) -> str:
    if reply is None:
        return "no answer"
    if reply.cls == stun.SUCCESS:
        return "ok"
    raw = reply.get(stun.ERROR_CODE)
    return f"{stun.decode_error(raw)[0]}" if raw else "error without ERROR-CODE"


def establish(
    conv: Conversation, creds: ClientCredentials, peer: tuple[str, int], channel: int, timeout: float = 1.0
) -> tuple[tuple | None, str]:
    """Allocate, permit `peer` and bind `channel` to it: (relayed address or None, outcome)."""
    transport = [(stun.REQUESTED_TRANSPORT, b"\x11\x00\x00\x00")]
    reply = conv.request(creds, stun.ALLOCATE, transport, timeout)
    relayed = None
    if reply is None or reply.cls != stun.SUCCESS:
        if error_text(reply) != "437":  # 437: this 5-tuple still holds one
            return None, f"allocate {error_text(reply)}"
    else:
        relayed = stun.xor_address(reply.get(stun.XOR_RELAYED_ADDRESS), reply.transaction_id)
    xpeer = (stun.XOR_PEER_ADDRESS, lambda tid: stun.encode_xor_address(peer, tid))
    reply = conv.request(creds, stun.CREATE_PERMISSION, [xpeer], timeout)
    if reply is None or reply.cls != stun.SUCCESS:
        return relayed, f"permission {error_text(reply)}"
    reply = conv.request(
        creds, stun.CHANNEL_BIND, [(stun.CHANNEL_NUMBER, struct.pack("!HH", channel, 0)), xpeer], timeout
    )
    if reply is None or reply.cls != stun.SUCCESS:
        return relayed, f"channel {error_text(reply)}"
    return relayed, "ok"


def legit_check(transport: str, targets: Targets, secret: bytes) -> str:
    """A legitimate client's full round trip through the relay to the echo peer: "ok" or why not."""
    creds = new_credentials(secret, f"legit-{transport}")
    try:
        if transport == "udp":
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((LEGIT_IP, 0))
            conv = Conversation(sock, False, targets.server)
        else:
            raw = socket.create_connection(
                (targets.server[0], targets.server[1] if transport == "tcp" else targets.tls_port),
                timeout=5,
                source_address=(LEGIT_IP, 0),
            )
            sock = client_tls().wrap_socket(raw) if transport == "tls" else raw
            conv = Conversation(sock, True)
    except OSError as exc:
        return f"connect: {exc}"
    with sock:
        try:
            relayed, outcome = establish(conv, creds, targets.echo, 0x4321, timeout=2.0)
            if outcome != "ok" or relayed is None:
                return outcome if outcome != "ok" else "allocate 437"
            for attempt in range(3):
                payload = os.urandom(120) + bytes([attempt])
                conv.send(channel_data(0x4321, payload, conv.stream))
                deadline = time.monotonic() + 2.0
                while time.monotonic() < deadline:
                    data = conv.receive(deadline - time.monotonic())
                    if data is None:
                        break
                    if data[:2] == b"\x43\x21" and data[4 : 4 + len(payload)] == payload:
                        reply = conv.request(creds, stun.REFRESH, [(stun.LIFETIME, b"\0\0\0\0")], 2.0)
                        return (
                            "ok"
                            if reply is not None and reply.cls == stun.SUCCESS
                            else f"delete {error_text(reply)}"
                        )
            return "no echo through the relay"
        except OSError as exc:
            return f"{type(exc).__name__}: {exc}"


def client_tls() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the dev certificate; nothing secret crosses
    return ctx


# ------------------------------------------------------------------ UDP fuzzing


class UdpSource:
    """A fuzzing client socket on one of the 127.0.0.x source addresses."""

    def __init__(self, index: int, ip: str, secret: bytes) -> None:
        self.index = index
        self.ip = ip
        self.secret = secret
        self.generation = 0
        self.sock: socket.socket | None = None
        self.state = ClientState(ip, new_credentials(secret, f"fuzz-{index}"))
        self.renew()

    def renew(self) -> None:
        """A new socket (a new 5-tuple), e.g. when its allocation is no longer ours."""
        if self.sock is not None:
            self.sock.close()
        self.generation += 1
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((self.ip, 0))
        self.sock.setblocking(False)
        nonce = self.state.creds.nonce
        self.state = ClientState(self.ip, new_credentials(self.secret, f"fuzz-{self.index}"))
        self.state.creds.nonce = nonce


def prepare_sources(sources: list[UdpSource], targets: Targets, rng: random.Random) -> int:
    """Give each source a fresh nonce, an allocation, a permission and a channel to the
    sink (replies to fuzzing sources may be rate limited: what fails is retried next batch)."""
    channels = [rng.randint(0x4000, 0x4FFF) for _ in sources]

    def one(src: UdpSource, channel: int):
        conv = Conversation(src.sock, False, targets.server)
        try:
            return establish(conv, src.state.creds, targets.sink, channel, timeout=0.3)
        except OSError:
            return None, "socket error"

    with ThreadPoolExecutor(max_workers=16) as pool:
        outcomes = list(pool.map(one, sources, channels))
    ready = 0
    relayed = []
    for src, channel, (address, outcome) in zip(sources, channels, outcomes, strict=True):
        if outcome == "ok":
            ready += 1
            src.state.channel = channel
            if address is not None:
                src.state.relayed = address
        elif outcome.split()[-1] in ("437", "441", "443", "403"):
            src.renew()  # the 5-tuple's allocation is not what we think
        if src.state.relayed is not None:
            relayed.append(src.state.relayed)
        src.sock.setblocking(False)
    targets.relayed = relayed
    return ready


@dataclass
class UdpTally:
    sent: int = 0
    peer_sent: int = 0
    replies: int = 0
    sink_received: int = 0
    send_errors: int = 0
    drops: int = 0  # the listener's kernel drops over the batch (all senders)
    seconds: float = 0.0
    final_rate: float = 0.0

    def add(self, other: UdpTally) -> None:
        """Another sender's figures, which ran alongside (its seconds overlap ours)."""
        for name in ("sent", "peer_sent", "replies", "sink_received", "send_errors"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.seconds = max(self.seconds, other.seconds)


def share(total: int, parts: int, k: int) -> int:
    return total // parts + (k < total % parts)


def start_sender(
    k: int,
    count: int,
    sources: list,
    targets: Targets,
    sink: socket.socket,
    stranger: socket.socket,
    seed: int,
    batch: int,
    logwatch: LogWatch,
    rate: float,
):
    """A forked process sending `count` datagrams from `sources` (one core cannot both
    make the inputs and keep the relay busy); its tally and suspects come up a pipe."""
    ctx = multiprocessing.get_context("fork")
    receiver, sender = ctx.Pipe(duplex=False)

    def body() -> None:
        watch = LogWatch(logwatch.path)
        watch.offset = logwatch.offset
        gen = Generator(random.Random(f"{seed}/udp/{batch}/{k}"), targets)
        suspects: list = []
        tally = fuzz_udp(count, sources, targets, gen, sink, stranger, watch, suspects, rate)
        sender.send((tally, suspects))

    proc = ctx.Process(target=body, daemon=True)
    proc.start()
    sender.close()
    return proc, receiver


def fuzz_udp(
    count: int,
    sources: list[UdpSource],
    targets: Targets,
    gen: Generator,
    peer_sock: socket.socket,
    stranger_sock: socket.socket,
    logwatch: LogWatch,
    suspects: list,
    start_rate: float,
    chunk: int = 256,
) -> UdpTally:
    """Send `count` datagrams to the listener (and peer datagrams to relay ports), paced
    by the listener's kernel drop counter; windows before a log traceback go to `suspects`."""
    r = gen.rng
    tally = UdpTally()
    sel = selectors.DefaultSelector()
    for src in sources:
        sel.register(src.sock, selectors.EVENT_READ, src)
    sel.register(peer_sock, selectors.EVENT_READ, None)
    server = targets.server
    _, last_drops = listener_queue(server[1])
    rate = start_rate
    # What the relay may not have read yet when a traceback shows up: it lags by what
    # its socket queues, which the pacing keeps small.
    window: deque = deque(maxlen=16)
    started = time.monotonic()
    paced_from, paced_count = started, 0
    next_check = started + 0.25
    buf = bytearray(65536)
    while tally.sent < count:
        items = []
        n = min(chunk, count - tally.sent)
        for _ in range(n):
            src = r.choice(sources)
            data = gen.guarded(gen.datagram, src.state)
            items.append((src.index, "listener", data))
            try:
                src.sock.sendto(data, server)
            except BlockingIOError:
                tally.send_errors += 1
            except OSError:
                tally.send_errors += 1
        tally.sent += n
        # The relay side: a permitted peer (the sink) and a stranger write to relay ports.
        for _ in range(max(1, n // 16)):
            if targets.relayed and r.random() < 0.85:
                dest = r.choice(targets.relayed)
            else:
                dest = ("127.0.0.1", r.randint(*RELAY_PORTS))
            sock = peer_sock if r.random() < 0.8 else stranger_sock
            data = (
                r.randbytes(r.choice([0, 1, 4, r.randint(0, 200), r.randint(0, 1400), r.randint(0, 1400)]))
                if r.random() > 0.003
                else r.randbytes(MAX_UDP)
            )
            items.append(("sink" if sock is peer_sock else "stranger", f"{dest[0]}:{dest[1]}", data))
            with contextlib.suppress(OSError):
                sock.sendto(data, dest)
                tally.peer_sent += 1
        window.append(items)
        # Drain what came back, so nothing on our side backs up.
        for key, _ in sel.select(0):
            s = key.fileobj
            while True:
                try:
                    s.recv_into(buf)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    continue
                if key.data is None:
                    tally.sink_received += 1
                else:
                    tally.replies += 1
        paced_count += n
        now = time.monotonic()
        ahead = paced_from + paced_count / rate - now
        if ahead > 0:
            time.sleep(ahead)
        if now >= next_check:
            next_check = now + 0.25
            queued, drops = listener_queue(server[1])
            if drops > last_drops:
                rate = max(500.0, rate * 0.75)
            elif queued < 512 * 1024:
                rate = min(200000.0, rate * 1.08)
            last_drops = drops
            paced_from, paced_count = time.monotonic(), 0
        if logwatch.poll():
            suspects.append([item for chunk_items in window for item in chunk_items])
    for src in sources:
        with contextlib.suppress(KeyError, ValueError):
            sel.unregister(src.sock)
    sel.close()
    time.sleep(0.3)  # the relay catches up before the caller reads the drops
    tally.seconds = time.monotonic() - started
    tally.final_rate = rate
    return tally


# ------------------------------------------------------------------ stream fuzzing


@dataclass
class StreamJob:
    index: int
    transport: str  # tcp | tls
    kind: str  # mutated | authenticated | garbage | partial | lying
    frames: int
    seed: int


@dataclass
class StreamResult:
    job: StreamJob
    frames: int = 0
    sent_bytes: int = 0
    received_bytes: int = 0
    writes: list = field(default_factory=list)
    error: str = ""


def connect_stream(transport: str, targets: Targets, source_ip: str, timeout: float = 5.0):
    port = targets.server[1] if transport == "tcp" else targets.tls_port
    raw = socket.create_connection((targets.server[0], port), timeout=timeout, source_address=(source_ip, 0))
    if transport == "tls":
        try:
            return client_tls().wrap_socket(raw)
        except (OSError, ssl.SSLError):
            raw.close()
            raise
    return raw


def finish_stream(sock: socket.socket, transport: str, rng: random.Random) -> int:
    """Read what the relay still sends, then close (sometimes with a reset): bytes read."""
    received = 0
    try:
        if transport == "tcp":
            sock.shutdown(socket.SHUT_WR)  # the relay reads to here, then closes
            sock.settimeout(3.0)
        else:
            sock.settimeout(0.3)
        while True:
            data = sock.recv(65536)
            if not data:
                break
            received += len(data)
    except (OSError, ssl.SSLError):
        pass
    if rng.random() < 0.3:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    return received


def run_stream_job(job: StreamJob, targets: Targets, source_ip: str) -> StreamResult:
    rng = random.Random(job.seed)
    gen = Generator(rng, targets)
    result = StreamResult(job)
    st = ClientState(source_ip, new_credentials(targets.secret, f"stream-{job.index}"), stream=True)
    try:
        sock = connect_stream(job.transport, targets, source_ip)
    except (OSError, ssl.SSLError) as exc:
        result.error = f"connect: {exc}"
        return result
    try:
        if job.kind == "authenticated":
            conv = Conversation(sock, True)
            channel = rng.randint(0x4000, 0x4FFF)
            _, outcome = establish(conv, st.creds, targets.sink, channel, timeout=1.0)
            if outcome == "ok":
                st.channel = channel
        frames: list[bytes] = []
        if job.kind == "garbage":
            frames = [
                gen.garbage() + bytes([rng.randint(0x80, 0xFF)]) + rng.randbytes(rng.randint(0, 300))
                for _ in range(job.frames)
            ]
        else:
            frames = [gen.guarded(gen.frame, st) for _ in range(job.frames)]
            if job.kind == "lying":
                for _ in range(max(1, job.frames // 10)):
                    frames.insert(rng.randrange(len(frames) + 1), gen.guarded(gen.broken_frame, st))
            elif job.kind == "partial" or rng.random() < 0.2:
                frames.append(gen.guarded(gen.broken_frame, st))
        ends = list(itertools.accumulate(map(len, frames)))
        data = b"".join(frames)
        while result.sent_bytes < len(data):
            size = rng.choice([1, 2, 3, 7, 20, 64, 512, 4096, 16384, len(data)])
            piece = data[result.sent_bytes : result.sent_bytes + size]
            result.writes.append(piece)
            sock.sendall(piece)
            result.sent_bytes += len(piece)
    except (OSError, ssl.SSLError) as exc:
        # The relay closes a stream that lost its framing: what was written still counts.
        result.error = f"{type(exc).__name__}: {exc}"
    if frames:
        result.frames = bisect.bisect_right(ends, result.sent_bytes)
    result.received_bytes = finish_stream(sock, job.transport, rng)
    return result


class Holders:
    """Connections held through a batch: slowloris drips and allocations that never read."""

    def __init__(
        self, targets: Targets, rng: random.Random, slow: int, never_read: int, flood_datagrams: int
    ) -> None:
        self.targets = targets
        self.rng = rng
        self.slow = slow
        self.never_read = never_read
        self.flood_datagrams = flood_datagrams
        self.stop = threading.Event()
        self.frames = 0
        self.flooded = 0
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(60)

    def _run(self) -> None:
        r, t = self.rng, self.targets
        drips: list[tuple[socket.socket, bytes, int]] = []
        deaf: list[socket.socket] = []
        flood = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        flood.bind((SINK_IP, 0))
        try:
            for i in range(self.slow):
                transport = "tls" if i % 4 == 3 else "tcp"
                port = t.server[1] if transport == "tcp" else t.tls_port
                try:
                    # TLS ones never finish the handshake: the ClientHello comes a byte at a time.
                    s = socket.create_connection(
                        (t.server[0], port),
                        timeout=5,
                        source_address=(f"{STREAM_SOURCE_NET}{251 + i % 4}", 0),
                    )
                except OSError as exc:
                    self.errors.append(f"slowloris connect: {exc}")
                    continue
                payload = (
                    r.randbytes(200)
                    if transport == "tls"
                    else stun.Builder(stun.BINDING, stun.REQUEST, r.randbytes(12)).encode()
                )
                if transport == "tls":
                    payload = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + payload
                drips.append((s, payload, 0))
            targets_relayed = []
            for i in range(self.never_read):
                st = ClientState("", new_credentials(t.secret, f"deaf-{i}"), stream=True)
                try:
                    s = connect_stream("tcp", t, f"{STREAM_SOURCE_NET}{250}")
                    relayed, outcome = establish(
                        Conversation(s, True), st.creds, flood.getsockname(), 0x4000 + i, timeout=1.0
                    )
                except OSError as exc:
                    self.errors.append(f"never-read set-up: {exc}")
                    continue
                deaf.append(s)
                if outcome == "ok" and relayed is not None:
                    targets_relayed.append(relayed)
                s.setblocking(False)
            binding = stun.Builder(stun.BINDING, stun.REQUEST, b"\x01" * 12).encode()
            per_tick = max(1, self.flood_datagrams // 40)
            asked = 0
            while not self.stop.wait(0.05):
                for j, (s, payload, pos) in enumerate(drips):
                    if r.random() < 0.1:  # about two bytes a second
                        with contextlib.suppress(OSError):
                            s.send(payload[pos : pos + 1])
                            pos += 1
                            if pos == len(payload):
                                self.frames += 1
                                pos = 0  # and the next request, as slowly
                            drips[j] = (s, payload, pos)
                # The deaf connections ask for Binding answers they never read, and a peer
                # sends them data through their relay ports.
                if asked < self.flood_datagrams:
                    for s in deaf:
                        with contextlib.suppress(OSError):
                            s.send(binding * 20)
                            self.frames += 20
                    asked += 20
                for relayed in targets_relayed:
                    if self.flooded >= self.flood_datagrams:
                        break
                    for _ in range(per_tick):
                        with contextlib.suppress(OSError):
                            flood.sendto(r.randbytes(1000), relayed)
                            self.flooded += 1
        finally:
            for s, _, _ in drips:
                s.close()
            for s in deaf:
                with contextlib.suppress(OSError):
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()
            flood.close()


def stream_jobs(batch: int, frames: int, seed: int, first_index: int) -> list[StreamJob]:
    r = random.Random(f"{seed}/streams/{batch}")
    jobs, total, index = [], 0, first_index
    while total < frames:
        kind = r.choices(["mutated", "authenticated", "garbage", "partial", "lying"], [35, 35, 10, 10, 10])[0]
        n = min(frames - total, r.choice([1, 5, 20, 50, 100, 200, 300]))
        transport = "tls" if r.random() < 0.25 else "tcp"
        jobs.append(StreamJob(index, transport, kind, n, r.getrandbits(64)))
        total += n
        index += 1
    return jobs


# ------------------------------------------------------------------ reproducers


def sync_udp(sock: socket.socket, server: tuple[str, int]) -> None:
    """Wait until the relay has handled what `sock` sent (a Binding answered after it)."""
    tid = os.urandom(12)
    sock.settimeout(1.0)
    with contextlib.suppress(OSError):
        sock.sendto(stun.Builder(stun.BINDING, stun.REQUEST, tid).encode(), server)
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            data = sock.recv(65536)
            with contextlib.suppress(stun.StunParseError):
                if data[:1] < b"\x40" and stun.parse(data).transaction_id == tid:
                    break
    sock.setblocking(False)


def replay_items(items: list, sockets: dict, targets: Targets, logwatch: LogWatch, one_by_one: bool) -> list:
    """Send (source, destination, bytes) items; one by one: stop at the first that is
    followed by a new traceback, and return it; else all of them if a traceback followed."""
    hits = []
    for source, dest, data in items:
        sock = sockets.get(source)
        if sock is None:
            continue
        address = (
            targets.server if dest == "listener" else (dest.rsplit(":", 1)[0], int(dest.rsplit(":", 1)[1]))
        )
        with contextlib.suppress(OSError):
            sock.sendto(data, address)
        if one_by_one:
            if dest == "listener":
                sync_udp(sock, targets.server)  # answered after it: its log lines are out
            else:
                time.sleep(0.01)  # a relay port: no ordering to lean on
            if logwatch.poll():
                return [(source, dest, data)]
    if not one_by_one:
        time.sleep(0.5)
        if logwatch.poll():
            hits = items
    return hits


def replay_sockets(sources: list[UdpSource] | None, count: int) -> dict:
    sockets = {}
    for i in range(count):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((f"{UDP_SOURCE_NET}{2 + i // 2}", 0))
        s.setblocking(False)
        sockets[i] = s
    if sources is not None:
        for src in sources:
            sockets[src.index] = src.sock
    for name, ip in (("sink", SINK_IP), ("stranger", STRANGER_IP), ("sync", LEGIT_IP)):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((ip, 0))
        sockets[name] = s
    return sockets


def save_case(out: Path, name: str, kind: str, items: list, note: str) -> Path:
    if kind == "udp":
        body = [[str(s), d, data.hex()] for s, d, data in items]
    else:
        body = [piece.hex() for piece in items]
    return write_case(out, name, {"kind": kind, "note": note, "items": body})


def locate_udp(
    suspects: list, sources: list[UdpSource], targets: Targets, logwatch: LogWatch, out: Path, batch: int
) -> str | None:
    """Replay suspect windows one datagram at a time; save the first datagram that
    triggers a traceback."""
    sockets = replay_sockets(sources, 0)
    try:
        for n, window in enumerate(suspects[:3]):
            time.sleep(1.1)  # the relay logs at most a few tracebacks a second
            logwatch.poll()
            hits = replay_items(window, sockets, targets, logwatch, one_by_one=True)
            if hits:
                return str(
                    save_case(
                        out,
                        f"batch{batch}-udp-{n}-single",
                        "udp",
                        hits,
                        f"this datagram alone: {logwatch.last_signature}",
                    )
                )
    finally:
        for name in ("sink", "stranger", "sync"):
            sockets[name].close()
    return None


def locate(
    suspects: list,
    results: list[StreamResult],
    sources: list[UdpSource],
    targets: Targets,
    logwatch: LogWatch,
    out: Path,
    batch: int,
) -> list[str]:
    """One reproducer: a datagram, else a stream job, else the datagram windows in order
    (the trigger then needs the state that earlier inputs built)."""
    single = locate_udp(suspects, sources, targets, logwatch, out, batch)
    if single is not None:
        return [single]
    streams = locate_stream(results, targets, logwatch, out, batch)
    if streams:
        return streams
    return [
        str(
            save_case(
                out,
                f"batch{batch}-udp-{n}-window",
                "udp",
                window,
                "no single input reproduced it: these datagrams, in order",
            )
        )
        for n, window in enumerate(suspects[:3])
    ]


def locate_stream(
    results: list[StreamResult], targets: Targets, logwatch: LogWatch, out: Path, batch: int
) -> list[str]:
    """Replay each stream job's bytes on a fresh connection; save the first that reproduces."""
    for res in results:
        try:
            sock = connect_stream(res.job.transport, targets, LEGIT_IP)
            for piece in res.writes:
                sock.sendall(piece)
        except (OSError, ssl.SSLError):
            continue
        finish_stream(sock, res.job.transport, random.Random(0))
        time.sleep(0.1)
        if logwatch.poll():
            return [
                str(
                    save_case(
                        out,
                        f"batch{batch}-{res.job.transport}-job{res.job.index}",
                        res.job.transport,
                        res.writes,
                        f"stream job {res.job.kind}, these writes on one connection: "
                        f"{logwatch.last_signature}",
                    )
                )
            ]
    return []


# ------------------------------------------------------------------ the run


@dataclass
class BatchRow:
    batch: int
    datagrams: int
    kernel_drops: int
    peer_datagrams: int
    frames: int
    connections: int
    replies: int
    rss_kib: int
    fds: int
    tracebacks: int
    internal_errors: float
    allocations: float
    open_streams: float
    legit: dict
    seconds: float
    udp_rate: float
    cpu_percent: float


def print_row(row: BatchRow, header: bool) -> None:
    if header:
        print(
            f"{'batch':>5} {'datagrams':>10} {'k-drops':>8} {'peer':>7} {'frames':>7} {'conns':>6} "
            f"{'replies':>8} {'RSS MiB':>8} {'fds':>5} {'tb':>3} {'int.err':>7} {'allocs':>6} {'open':>4} "
            f"{'legit udp/tcp/tls':>17} {'dgram/s':>8} {'cpu%':>5} {'secs':>6}",
            flush=True,
        )
    legit = "/".join("ok" if v == "ok" else "FAIL" for v in row.legit.values())
    print(
        f"{row.batch:>5} {row.datagrams:>10} {row.kernel_drops:>8} {row.peer_datagrams:>7} "
        f"{row.frames:>7} {row.connections:>6} {row.replies:>8} {row.rss_kib / 1024:>8.1f} "
        f"{row.fds:>5} {row.tracebacks:>3} {row.internal_errors:>7.0f} {row.allocations:>6.0f} "
        f"{row.open_streams:>4.0f} "
        f"{legit:>17} {row.udp_rate:>8.0f} {row.cpu_percent:>5.0f} {row.seconds:>6.1f}",
        flush=True,
    )
    for name, value in row.legit.items():
        if value != "ok":
            print(f"      legit {name}: {value}", flush=True)


def run(args) -> int:
    total_started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="fuzz-relay-"))
    out = Path(args.out) if args.out else workdir / "cases"
    echo_port, sink_port = free_port_pair(), free_port_pair()
    ctx = multiprocessing.get_context("fork")
    echo = ctx.Process(target=echo_peer, args=(echo_port,), daemon=True)
    echo.start()
    relay = start_appliance(
        workdir / "appliance",
        workers=args.workers,
        extra_turn={
            "relay_ports": f"{RELAY_PORTS[0]}-{RELAY_PORTS[1]}",
            # Every relay target stays on this machine, whatever the fuzzer makes it ask.
            "deny_peers": ["0.0.0.0/0", "::/0"],
            "allow_peers": ["127.0.0.0/8"],
        },
    )
    secret = relay.secret.encode()
    print(
        f"appliance pid {relay.proc.pid}, workers {args.workers}, udp/tcp {relay.port}, "
        f"tls {relay.tls_port}, admin {relay.admin_port}, log {relay.log_path}",
        flush=True,
    )
    print(
        f"{args.datagrams} datagrams and {args.frames} stream frames in {args.batches} batches, "
        f"seed {args.seed}, network namespace: {'private' if os.environ.get(NETNS_ENV) else 'host'}",
        flush=True,
    )
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind((SINK_IP, sink_port))
    sink.setblocking(False)
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stranger.bind((STRANGER_IP, 0))
    stranger.setblocking(False)
    own = [("127.0.0.1", p) for p in (relay.port, relay.tls_port, relay.http_port, relay.admin_port)]
    targets = Targets(
        secret,
        (relay.host, relay.port),
        relay.tls_port,
        (SINK_IP, sink_port),
        (LEGIT_IP, echo_port),
        stranger.getsockname(),
        own,
    )
    rng = random.Random(args.seed)
    sources = [UdpSource(i, f"{UDP_SOURCE_NET}{2 + i // 2}", secret) for i in range(2 * args.sources)]
    logwatch = LogWatch(relay.log_path)
    rows: list[BatchRow] = []
    cases: list[str] = []
    per_batch_d = max(1, args.datagrams // args.batches)
    per_batch_f = max(1, args.frames // args.batches)
    rate = args.rate
    job_index = 0
    exit_reasons: list[str] = []
    try:
        for batch in range(1, args.batches + 1):
            started = time.monotonic()
            cpu0 = cpu_seconds(process_tree(relay.proc.pid))
            datagrams = (
                per_batch_d if batch < args.batches else args.datagrams - per_batch_d * (args.batches - 1)
            )
            frames = per_batch_f if batch < args.batches else args.frames - per_batch_f * (args.batches - 1)
            prepare_sources(sources, targets, rng)
            holders = Holders(
                targets,
                random.Random(f"{args.seed}/holders/{batch}"),
                slow=args.slowloris,
                never_read=args.never_read,
                flood_datagrams=args.flood,
            )
            jobs = stream_jobs(batch, frames, args.seed, job_index)
            job_index += len(jobs)
            suspects: list = []
            _, drops0 = listener_queue(relay.port)
            # Other senders first: a fork before this batch's threads start.
            children = [
                start_sender(
                    k,
                    share(datagrams, args.senders, k),
                    sources[k :: args.senders],
                    targets,
                    sink,
                    stranger,
                    args.seed,
                    batch,
                    logwatch,
                    rate,
                )
                for k in range(1, args.senders)
            ]
            holders.start()
            pool = ThreadPoolExecutor(max_workers=4)
            futures = [
                pool.submit(run_stream_job, job, targets, f"{STREAM_SOURCE_NET}{1 + job.index % 240}")
                for job in jobs
            ]
            gen = Generator(random.Random(f"{args.seed}/udp/{batch}/0"), targets)
            tally = fuzz_udp(
                share(datagrams, args.senders, 0),
                sources[:: args.senders],
                targets,
                gen,
                sink,
                stranger,
                logwatch,
                suspects,
                rate,
            )
            rate = tally.final_rate
            for proc, conn in children:
                child_tally, child_suspects = conn.recv()
                proc.join(30)
                tally.add(child_tally)
                suspects += child_suspects
            _, drops1 = listener_queue(relay.port)
            tally.drops = drops1 - drops0
            results = [f.result() for f in futures]
            pool.shutdown()
            holders.finish()
            time.sleep(0.5)  # let the relay see the closes
            pids = process_tree(relay.proc.pid)
            if relay.proc.poll() is not None:
                exit_reasons.append(f"appliance exited with {relay.proc.returncode}")
                break
            new_tb = logwatch.poll()
            legit = {t: legit_check(t, targets, secret) for t in ("udp", "tcp", "tls")}
            new_tb += logwatch.poll()
            if suspects or new_tb:
                cases += locate(suspects, results, sources, targets, logwatch, out, batch)
            m = metrics(relay.admin_port)
            frames_sent = sum(r.frames for r in results) + holders.frames
            row = BatchRow(
                batch,
                tally.sent,
                tally.drops,
                tally.peer_sent + holders.flooded,
                frames_sent,
                len(results) + args.slowloris + args.never_read,
                tally.replies,
                rss_kib(pids),
                fd_count(pids),
                new_tb,
                m.get("appliance_relay_internal_errors_total", 0.0),
                m.get("appliance_relay_allocations", 0.0),
                m.get("appliance_relay_stream_connections", 0.0),
                legit,
                time.monotonic() - started,
                tally.sent / tally.seconds if tally.seconds else 0,
                100 * (cpu_seconds(pids) - cpu0) / (time.monotonic() - started),
            )
            rows.append(row)
            print_row(row, header=batch == 1)
            for err in holders.errors[:3]:
                print(f"      holders: {err}", flush=True)
            stream_errors = [r.error for r in results if r.error.startswith("connect")]
            if stream_errors:
                print(
                    f"      {len(stream_errors)} stream connects failed, e.g. {stream_errors[0]}", flush=True
                )
        final_metrics = metrics(relay.admin_port)
    finally:
        for src in sources:
            src.sock.close()
        sink.close()
        stranger.close()
        code = stop_appliance(relay)
        echo.terminate()
        echo.join(5)
    logwatch.poll()
    return summarize(
        args,
        rows,
        logwatch,
        final_metrics,
        code,
        logwatch.worker_exits,
        cases,
        exit_reasons,
        time.monotonic() - total_started,
    )


def summarize(
    args,
    rows: list[BatchRow],
    logwatch: LogWatch,
    m: dict,
    code: int | None,
    dead_workers: int,
    cases: list[str],
    reasons: list[str],
    seconds: float,
) -> int:
    if not rows:
        print("no batch completed")
        return 1
    legit_total = sum(len(r.legit) for r in rows)
    legit_ok = sum(v == "ok" for r in rows for v in r.legit.values())
    datagrams = sum(r.datagrams for r in rows)
    drops = sum(r.kernel_drops for r in rows)
    print()
    print(
        f"datagrams sent to the listener: {datagrams} ({drops} dropped by the kernel, "
        f"{datagrams - drops} read by the relay); peer datagrams to relay ports: "
        f"{sum(r.peer_datagrams for r in rows)}"
    )
    print(
        f"stream frames sent: {sum(r.frames for r in rows)} over {sum(r.connections for r in rows)} "
        f"TCP/TLS connections"
    )
    print(
        f"relay counters: malformed {m.get('appliance_relay_malformed_packets_total', 0):.0f}, "
        f"dropped {m.get('appliance_relay_dropped_packets_total', 0):.0f}, "
        f"internal errors {m.get('appliance_relay_internal_errors_total', 0):.0f}, "
        f"allocations made {m.get('appliance_relay_allocations_created_total', 0):.0f}, "
        f"to peers {m.get('appliance_relay_packets_total{direction=to_peer}', 0):.0f}, "
        f"to clients {m.get('appliance_relay_packets_total{direction=to_client}', 0):.0f}"
    )
    errors = {
        k.split("code=")[1].rstrip("}"): v
        for k, v in m.items()
        if k.startswith("appliance_relay_errors_total{")
    }
    print("error replies by code: " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(errors.items())))
    rss_past_limit = report_memory(rows, args.warmup, args.rss_growth_mib)
    print(
        f"tracebacks in the log: {logwatch.tracebacks}; relay workers that died: {dead_workers}; "
        f"legit checks passed: {legit_ok}/{legit_total}; exit code on SIGTERM: {code}; "
        f"took {seconds:.0f} s"
    )
    if GENERATOR_FAULTS:
        print(
            f"generator faults (bugs of this script, garbage sent instead): {len(GENERATOR_FAULTS)}, "
            f"first: {GENERATOR_FAULTS[0]}"
        )
    for excerpt in logwatch.excerpts.values():
        print("---- from the appliance log:\n" + excerpt)
    for case in cases:
        print(f"reproducer: {case}")
    failures = list(reasons)
    if logwatch.tracebacks:
        failures.append("traceback in the log")
    if m.get("appliance_relay_internal_errors_total", 0):
        failures.append("internal errors counted")
    if dead_workers:
        failures.append("a relay worker died")
    if legit_ok != legit_total:
        failures.append("a legitimate check failed")
    if code != 0:
        failures.append(f"appliance exit code {code} on SIGTERM")
    if rss_past_limit:
        failures.append("RSS grew past the limit")
    return verdict(failures)


def replay(args) -> int:
    """Send a saved case to a fresh appliance and say whether its log shows a traceback."""
    case = json.loads(Path(args.replay).read_text())
    workdir = Path(tempfile.mkdtemp(prefix="fuzz-replay-"))
    relay = start_appliance(
        workdir,
        workers=args.workers,
        extra_turn={
            "relay_ports": f"{RELAY_PORTS[0]}-{RELAY_PORTS[1]}",
            "deny_peers": ["0.0.0.0/0", "::/0"],
            "allow_peers": ["127.0.0.0/8"],
        },
    )
    targets = Targets(
        relay.secret.encode(),
        (relay.host, relay.port),
        relay.tls_port,
        (SINK_IP, 9),
        (LEGIT_IP, 9),
        (STRANGER_IP, 9),
        [],
    )
    logwatch = LogWatch(relay.log_path)
    try:
        if case["kind"] == "udp":
            items = [(int(s) if s.isdigit() else s, d, bytes.fromhex(h)) for s, d, h in case["items"]]
            sockets = replay_sockets(None, 1 + max((s for s, _, _ in items if isinstance(s, int)), default=0))
            replay_items(items, sockets, targets, logwatch, one_by_one=False)
        else:
            sock = connect_stream(case["kind"], targets, LEGIT_IP)
            for piece in case["items"]:
                sock.sendall(bytes.fromhex(piece))
            finish_stream(sock, case["kind"], random.Random(0))
            time.sleep(0.5)
            logwatch.poll()
    finally:
        stop_appliance(relay)
    logwatch.poll()
    for excerpt in logwatch.excerpts.values():
        print(excerpt)
    print(f"tracebacks: {logwatch.tracebacks}")
    return 1 if logwatch.tracebacks else 0


def in_private_netns(argv: list[str]) -> int | None:
    """Run this script again inside a new network namespace with only loopback; None if
    that is not possible here (not root, no unshare), in which case the run stays put."""
    if os.environ.get(NETNS_ENV) or shutil.which("unshare") is None:
        return None
    script = str(Path(__file__).resolve())
    probe = subprocess.run(
        ["unshare", "--net", sys.executable, script, "--probe-netns"],
        capture_output=True,
        check=False,
        env=dict(os.environ, **{NETNS_ENV: "1"}),
    )
    if probe.returncode != 0:
        return None
    env = dict(os.environ, **{NETNS_ENV: "1"})
    return subprocess.run(
        ["unshare", "--net", sys.executable, script, *argv], env=env, check=False
    ).returncode


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--datagrams", type=int, default=1_000_000)
    parser.add_argument("--frames", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=1, help="the appliance's turn.workers")
    parser.add_argument("--sources", type=int, default=32, help="UDP source addresses (two sockets each)")
    parser.add_argument("--senders", type=int, default=2, help="processes sending the datagrams")
    parser.add_argument("--rate", type=float, default=20000, help="starting datagrams/s (it adapts)")
    parser.add_argument("--slowloris", type=int, default=16, help="slow connections held each batch")
    parser.add_argument("--never-read", type=int, default=2, help="never-reading allocations per batch")
    parser.add_argument(
        "--flood", type=int, default=2000, help="peer datagrams per batch to each never-reading allocation"
    )
    parser.add_argument("--no-netns", action="store_true", help="stay in this network namespace")
    add_common_options(parser, rss_growth_mib=24.0)
    parser.add_argument("--probe-netns", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe_netns:  # can a new namespace get a working loopback here?
        bring_up_loopback()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((f"{UDP_SOURCE_NET}2", 0))
        return 0
    if not args.no_netns:
        code = in_private_netns(argv)
        if code is not None:
            return code
    if os.environ.get(NETNS_ENV):
        bring_up_loopback()
    if args.quick:
        args.datagrams = min(args.datagrams, 3000)
        args.frames = min(args.frames, 400)
        args.batches = min(args.batches, 2)
        args.sources = min(args.sources, 8)
        args.slowloris = min(args.slowloris, 4)
        args.flood = min(args.flood, 300)
    return run_or_replay(args, run, replay)


if __name__ == "__main__":
    sys.exit(main())
