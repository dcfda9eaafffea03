"""The relay rule (turn/allocation.py: when relayed data may pass), one table of cases run
against every packet path, so that no path can drift from the others.

Each case installs a permission and/or a channel for a peer at given times on a settable
clock, moves the clock to `at`, and sends three packets:

- ChannelData from the client on the channel   -> reaches the bound peer?
- a Send indication from the client to the peer -> reaches the peer?
- a datagram from the peer to the relayed address -> reaches the client as ChannelData,
  as a Data indication, or not at all?

The paths: "udp" (the UDP listener's fast path; a relay port sending through a UDP client
link; the core, for the Send indication), "tcp" and "tls" (a stream connection's ChannelData
path; a relay port sending through the connection), and "core" (the sans-I/O core with fake
relay ports, whose packet path is the Send indication: it checks that column).  The I/O
paths run on loopback against a real RelayNode; nothing waits on a timeout except where the
allocation is gone and no reply can order the packets.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import ssl
import struct
from dataclasses import dataclass

import pytest

from turn import stun
from turn.allocation import CHANNEL_LIFETIME_S, PERMISSION_LIFETIME_S, Allocation
from turn.client import ClientCredentials
from turn.core import RelaySettings
from turn.node import Endpoint, NodeSettings, RelayNode

from .netports import free_port_pair
from .test_relay_io import AllowAll, Clock, make_cert
from .turn_fakes import (
    T0,
    CoreClient,
    FakeClientLink,
    FakeOpener,
    channel_attr,
    lifetime_attr,
    make_core,
    peer_attr,
)

P = PERMISSION_LIFETIME_S  # 300 s
C = CHANNEL_LIFETIME_S  # 600 s
CHANNEL = 0x4000


@dataclass(frozen=True)
class Case:
    name: str
    at: float  # when the packets go, seconds after the Allocate
    channel_data: bool  # ChannelData from the client reaches the bound peer
    send: bool  # a Send indication reaches the peer
    from_peer: str | None  # "channel", "indication", or None: dropped
    bind_at: float | None = None  # ChannelBind (channel + permission) at this time
    permit_at: tuple[float, ...] = ()  # CreatePermission at these times
    strict: bool = False  # turn.strict_expiry
    username_ttl: float = 3600.0  # the username expires this long after the Allocate
    other_port: bool = False  # the peer sends from (and Send goes to) another port


CASES = [
    Case("nothing installed", at=0, channel_data=False, send=False, from_peer=None),
    Case("permission live", permit_at=(0,), at=P - 1, channel_data=False, send=True, from_peer="indication"),
    Case(
        "permission at its expiry instant",
        permit_at=(0,),
        at=P,
        channel_data=False,
        send=False,
        from_peer=None,
    ),
    Case("permission expired", permit_at=(0,), at=P + 1, channel_data=False, send=False, from_peer=None),
    Case("channel live", bind_at=0, at=0, channel_data=True, send=True, from_peer="channel"),
    Case(
        "channel live, its permission at its expiry instant",
        bind_at=0,
        at=P,
        channel_data=False,
        send=False,
        from_peer=None,
    ),
    Case(
        "channel live, permission renewed",
        bind_at=0,
        permit_at=(C - 200,),
        at=C - 1,
        channel_data=True,
        send=True,
        from_peer="channel",
    ),
    Case(
        "channel at its expiry instant, permission live",
        bind_at=0,
        permit_at=(C - 200,),
        at=C,
        channel_data=False,
        send=True,
        from_peer="indication",
    ),
    Case(
        "channel expired and cooling down, permission live",
        bind_at=0,
        permit_at=(C - 100,),
        at=C + 100,
        channel_data=False,
        send=True,
        from_peer="indication",
    ),
    Case(
        "peer sends from another port of the channel's IP",
        bind_at=0,
        at=0,
        other_port=True,
        channel_data=True,
        send=True,
        from_peer="indication",
    ),
    Case(
        "strict_expiry, username still valid",
        bind_at=0,
        at=50,
        strict=True,
        username_ttl=100,
        channel_data=True,
        send=True,
        from_peer="channel",
    ),
    Case(
        "username expired, strict_expiry off: the allocation lives on",
        bind_at=0,
        at=150,
        username_ttl=100,
        channel_data=True,
        send=True,
        from_peer="channel",
    ),
    Case(
        "username expired, strict_expiry on: the allocation ended with it",
        bind_at=0,
        at=150,
        strict=True,
        username_ttl=100,
        channel_data=False,
        send=False,
        from_peer=None,
    ),
]


def setup_steps(case: Case) -> list[tuple[float, str]]:
    steps = [(t, "permit") for t in case.permit_at]
    if case.bind_at is not None:
        steps.append((case.bind_at, "bind"))
    return sorted(steps)


def expected(case: Case) -> dict:
    return {"channel_data": case.channel_data, "send": case.send, "from_peer": case.from_peer}


def send_indication(peer, data: bytes) -> bytes:
    tid = os.urandom(12)
    b = stun.Builder(stun.SEND, stun.INDICATION, tid)
    b.add(stun.XOR_PEER_ADDRESS, stun.encode_xor_address(peer, tid))
    b.add(stun.DATA_ATTR, data)
    return b.encode()


# ------------------------------------------------------------------ the core


def send_outcome_in_core(case: Case) -> bool:
    """Whether a Send indication reaches the peer through the sans-I/O core."""
    core, opener = make_core(strict_expiry=case.strict)
    bound, source = ("8.8.8.8", 5000), ("8.8.8.8", 5001 if case.other_port else 5000)
    client = CoreClient(core, expiry=int(T0 + case.username_ttl))
    assert client.allocate(lifetime_attr(3600)).cls == stun.SUCCESS
    for t, step in setup_steps(case):
        client.now = T0 + t
        attrs = [channel_attr(CHANNEL), peer_attr(bound)] if step == "bind" else [peer_attr(bound)]
        assert (
            client.send(stun.CHANNEL_BIND if step == "bind" else stun.CREATE_PERMISSION, attrs).cls
            == stun.SUCCESS
        )
    client.now = T0 + case.at
    core.handle_timer(client.now)
    assert client.raw(send_indication(source, b"send-probe")) is None
    return opener.opened[0].sent == [(b"send-probe", source)]


# ------------------------------------------------------------------ over the wire


class Wire:
    """One client's connection to the node: datagrams (UDP) or a byte stream (TCP, TLS)."""

    def __init__(self, transport: str, port: int, tls_context: ssl.SSLContext | None) -> None:
        self.transport = transport
        self.port = port
        self.tls_context = tls_context
        self.sock: socket.socket | None = None
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        if self.transport == "udp":
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(self.sock, ("127.0.0.1", self.port))
        else:
            self.reader, self.writer = await asyncio.open_connection(
                "127.0.0.1", self.port, ssl=self.tls_context
            )

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        if self.writer is not None:
            self.writer.close()

    async def send(self, data: bytes) -> None:
        if self.sock is not None:
            await asyncio.get_running_loop().sock_sendall(self.sock, data)
        else:
            self.writer.write(data)
            await self.writer.drain()

    async def channel_data(self, number: int, payload: bytes) -> None:
        pad = b"" if self.sock is not None else b"\x00" * (-len(payload) & 3)
        await self.send(struct.pack("!HH", number, len(payload)) + payload + pad)

    async def recv(self, timeout: float = 2.0) -> bytes:
        """One STUN message or ChannelData frame (its padding dropped)."""
        if self.sock is not None:
            return await asyncio.wait_for(asyncio.get_running_loop().sock_recv(self.sock, 70000), timeout)
        head = await asyncio.wait_for(self.reader.readexactly(4), timeout)
        length = struct.unpack_from("!H", head, 2)[0]
        if head[0] < 0x40:
            return head + await self.reader.readexactly(16 + length)
        body = await self.reader.readexactly(length + (-length & 3))
        return head + body[:length]


class WireClient:
    def __init__(self, wire: Wire, username_ttl: float) -> None:
        self.wire = wire
        self.creds = ClientCredentials.rest(b"rule-secret", f"{int(T0 + username_ttl)}:alice", "rule.test")

    async def request(self, method: int, attrs) -> stun.Message:
        for _ in range(3):
            await self.wire.send(self.creds.build(method, attrs))
            reply = stun.parse(await self.wire.recv())
            if not self.creds.should_retry(reply):
                return reply
        return reply

    async def barrier(self) -> None:
        """A Binding round trip: the node has handled everything this client sent before
        it, and on loopback what it relayed is already in the peer's socket."""
        tid = os.urandom(12)
        await self.wire.send(stun.Builder(stun.BINDING, stun.REQUEST, tid).encode())
        while stun.parse(await self.wire.recv()).transaction_id != tid:
            pass


def peer_socket(ip: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((ip, 0))
    sock.setblocking(False)
    return sock


def received(sock: socket.socket) -> list[bytes]:
    datagrams = []
    while True:
        try:
            datagrams.append(sock.recv(70000))
        except BlockingIOError:
            return datagrams


def classify(frame: bytes, payload: bytes) -> str | None:
    """'channel' or 'indication' if `frame` carries `payload` from the peer, else None."""
    if 0x40 <= frame[0] <= 0x7F:
        return "channel" if frame[4:] == payload else None
    msg = stun.parse(frame)
    if (msg.method, msg.cls) == (stun.DATA, stun.INDICATION) and msg.data() == payload:
        return "indication"
    return None


@pytest.fixture(scope="module")
def tls_contexts(tmp_path_factory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    cert, key = make_cert(tmp_path_factory.mktemp("rule-cert"))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    return server, ssl.create_default_context(cafile=cert)


async def outcome_over_the_wire(case: Case, transport: str, tls_contexts) -> dict:
    clock = Clock()
    port = free_port_pair()
    endpoint = Endpoint("127.0.0.1", port)
    settings = NodeSettings(
        relay=RelaySettings(realm="rule.test", strict_expiry=case.strict),
        udp=endpoint if transport == "udp" else None,
        tcp=endpoint if transport == "tcp" else None,
        tls=endpoint if transport == "tls" else None,
        relay_ips={stun.FAMILY_IPV4: "127.0.0.1"},
        relay_ports=(57000, 57999),
        nonce_lifetime_s=600,
        reuse_port=False,
    )
    node = RelayNode(settings, (b"rule-secret",), os.urandom(32), AllowAll(), tls_contexts[0], clock=clock)
    await node.start()
    wire = Wire(transport, port, tls_contexts[1] if transport == "tls" else None)
    bound, other, control = peer_socket(), peer_socket(), peer_socket("127.0.0.2")
    source = other if case.other_port else bound
    try:
        await wire.open()
        client = WireClient(wire, case.username_ttl)
        reply = await client.request(
            stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, b"\x11\x00\x00\x00"), lifetime_attr(3600)]
        )
        assert reply.cls == stun.SUCCESS
        relayed = stun.xor_address(reply.get(stun.XOR_RELAYED_ADDRESS), reply.transaction_id)
        for t, step in setup_steps(case):
            clock.now = T0 + t
            attrs = [peer_attr(bound.getsockname())]
            if step == "bind":
                attrs.insert(0, channel_attr(CHANNEL))
            assert (
                await client.request(stun.CHANNEL_BIND if step == "bind" else stun.CREATE_PERMISSION, attrs)
            ).cls == stun.SUCCESS
        clock.now = T0 + case.at
        node.core.handle_timer(clock.now)

        await wire.channel_data(CHANNEL, b"cd-probe")
        await client.barrier()
        channel_data = received(bound) == [b"cd-probe"]

        await wire.send(send_indication(source.getsockname(), b"send-probe"))
        await client.barrier()
        sent = received(source) == [b"send-probe"]

        # The peer's datagram, then a marker from a peer whose own permission is live: the
        # relay port reads them in order, so whatever the client gets before the marker is
        # all the probe produced.
        marker = await client.request(stun.CREATE_PERMISSION, [peer_attr(control.getsockname())])
        source.sendto(b"peer-probe", relayed)
        frames = []
        if marker.cls == stun.SUCCESS:
            control.sendto(b"marker", relayed)
            while classify(frame := await wire.recv(), b"marker") is None:
                frames.append(frame)
        else:  # no allocation left to order anything: wait a little instead
            with pytest.raises(asyncio.TimeoutError):
                frames.append(await wire.recv(timeout=0.3))
        kinds = [classify(frame, b"peer-probe") for frame in frames]
        assert None not in kinds and len(kinds) <= 1, frames
        return {"channel_data": channel_data, "send": sent, "from_peer": kinds[0] if kinds else None}
    finally:
        wire.close()
        for sock in (bound, other, control):
            sock.close()
        await node.stop()


# ------------------------------------------------------------------ the table, every path


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_core_follows_the_rule(case):
    assert send_outcome_in_core(case) == case.send


@pytest.mark.parametrize("transport", ["udp", "tcp", "tls"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_io_paths_follow_the_rule(case, transport, tls_contexts):
    assert await outcome_over_the_wire(case, transport, tls_contexts) == expected(case)


# ------------------------------------------------------------------ the routes are the rule


def test_the_routes_the_hot_paths_read_always_say_what_the_rule_says():
    """The packet paths read an allocation's routes (a lookup and "until > now") instead of
    evaluating the rule; across random permissions, bindings, sweeps and clock jumps the
    routes give the rule's answer at every instant, stated here from its definition."""
    rng = random.Random(15)
    ips = ["8.8.8.8", "1.1.1.1", "9.9.9.9"]
    peers = [(ip, port) for ip in ips for port in (5000, 5001)]
    numbers = [0x4000, 0x4001, 0x4002, 0x7FFF]
    relay = FakeOpener().open(stun.FAMILY_IPV4, False, False)[0]
    alloc = Allocation(
        FakeClientLink(("198.51.100.1", 1), ("198.51.100.1", 1)),
        "u",
        "u",
        stun.FAMILY_IPV4,
        relay,
        relay.address,
        T0 + 10**6,
        False,
    )
    now = T0
    for _ in range(3000):
        op = rng.random()
        if op < 0.3:
            alloc.permit(rng.choice(ips), now)
        elif op < 0.6:
            number, peer = rng.choice(numbers), rng.choice(peers)
            bound = alloc.channels.get(number)
            other = alloc.channel_of_peer.get(peer)
            # core._channel_bind's rules: a number keeps its peer and a peer its number
            if (bound is None or bound[0] == peer) and (other is None or other == number):
                alloc.bind_channel(number, peer, now)
        elif op < 0.7:
            alloc.sweep(now)
        else:
            now += rng.choice([0.5, 1, 50, 100, 299, 300, 301, 600])
        # One route per binding, forgotten with it.
        assert set(alloc.channel_routes) == set(alloc.channels)
        assert set(alloc.peer_routes) == set(alloc.channel_of_peer)
        for at in (now, now + rng.choice([0, 1, 299, 300, 301, 599, 600, 900])):
            live = {ip for ip in alloc.permissions if alloc.permissions[ip] > at}
            to_peer = {
                n: peer for n, (peer, expiry) in alloc.channels.items() if expiry > at and peer[0] in live
            }
            to_client = {
                peer: n
                for peer, n in alloc.channel_of_peer.items()
                if alloc.channels[n][1] > at and peer[0] in live
            }
            assert {n: peer for n, (peer, until) in alloc.channel_routes.items() if until > at} == to_peer
            assert {peer: n for peer, (n, until) in alloc.peer_routes.items() if until > at} == to_client
            assert {ip for ip in ips if alloc.permits(ip, at)} == live
