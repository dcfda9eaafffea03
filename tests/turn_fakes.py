"""Fakes for driving the sans-I/O relay core: relay ports that record, a clock
that is just a float, and a client that does the 401 -> nonce -> retry dance."""

from __future__ import annotations

import struct

from turn import stun
from turn.auth import NonceBook, RestVerifier, rest_password
from turn.client import ClientCredentials
from turn.core import RelaySettings, TurnCore
from turn.policy import build_policy

REALM = "core.test"
SECRET = b"core-secret-0123456789"
T0 = 1_900_000_000.0


class AllowAll:
    """A peer policy that permits every peer (loopback tests relay to loopback)."""

    def permits_ip(self, ip):
        return True

    def permits(self, ip, port):
        return True


class FakeRelayPort:
    def __init__(self, opener: FakeOpener, ip: str, port: int) -> None:
        self.opener = opener
        self.address = (ip, port)
        self.allocation = None
        self.sent: list[tuple[bytes, tuple]] = []
        self.closed = False

    def sendto(self, data, addr) -> None:
        self.sent.append((bytes(data), addr))

    def close(self) -> None:
        self.closed = True
        self.opener.open_ports.discard(self.address[1])


class FakeOpener:
    def __init__(self, ips=None, ports=range(50000, 50100)) -> None:
        self.ips = ips or {stun.FAMILY_IPV4: "10.9.0.1"}
        self.free = list(ports)
        self.open_ports: set[int] = set()
        self.opened: list[FakeRelayPort] = []

    def open(self, family, even_port, reserve_next):
        ip = self.ips.get(family)
        if ip is None:
            return None
        for port in self.free:
            if port in self.open_ports or (even_port and port % 2):
                continue
            if reserve_next and port + 1 in self.open_ports:
                continue
            main = self._port(ip, port)
            extra = self._port(ip, port + 1) if reserve_next else None
            return main, extra
        return None

    def _port(self, ip, port) -> FakeRelayPort:
        relay = FakeRelayPort(self, ip, port)
        self.open_ports.add(port)
        self.opened.append(relay)
        return relay


def make_core(**overrides) -> tuple[TurnCore, FakeOpener]:
    opener = overrides.pop("opener", None) or FakeOpener()
    secrets = overrides.pop("secrets", (SECRET,))
    deny = overrides.pop("deny", ("recommended",))
    allow = overrides.pop("allow", ())
    settings = RelaySettings(realm=REALM, **overrides)
    policy = build_policy(deny, allow, [("10.9.0.1", 3478)], [], (49152, 65535))
    core = TurnCore(settings, RestVerifier(REALM, secrets), NonceBook(b"n" * 32, 600), policy, opener)
    return core, opener


def error_code(msg: stun.Message) -> int | None:
    raw = msg.get(stun.ERROR_CODE)
    return None if raw is None else stun.decode_error(raw)[0]


class FakeClientLink:
    """A client as the I/O layer presents it to the core (allocation.ClientLink);
    records what the relay sends it."""

    def __init__(self, key, address, transport_name: str = "udp") -> None:
        self.key = key
        self.address = address
        self.transport_name = transport_name
        self.sent: list[bytes] = []

    def send_channel_data(self, view, size) -> bool:
        self.sent.append(bytes(view[:size]))
        return True

    def send_data_indication(self, message) -> bool:
        self.sent.append(bytes(message))
        return True


class CoreClient:
    """One client 5-tuple talking to a TurnCore."""

    def __init__(
        self,
        core: TurnCore,
        user: str = "alice",
        addr=("198.51.100.20", 40000),
        transport: str = "udp",
        secret: bytes = SECRET,
        expiry: int | None = None,
        password: str | None = None,
        fingerprint: bool = True,
    ) -> None:
        self.core = core
        self.addr = addr
        self.key_id = addr if transport == "udp" else f"{transport}#{addr}"
        self.transport = transport
        self.link = FakeClientLink(self.key_id, addr, transport)
        username = f"{int(T0) + 3600 if expiry is None else expiry}:{user}"
        self.creds = ClientCredentials(
            username, REALM, stun.long_term_key(username, REALM, password or rest_password(secret, username))
        )
        self.fingerprint = fingerprint
        self.now = T0

    def raw(self, data: bytes) -> bytes | None:
        return self.core.handle_stun(data, self.link, self.now)

    def build(self, method: int, attrs=(), tid: bytes | None = None, auth: bool = True) -> bytes:
        if not auth:
            return ClientCredentials("", REALM, b"").build(method, attrs, tid, self.fingerprint)
        return self.creds.build(method, attrs, tid, self.fingerprint)

    def send(self, method: int, attrs=(), tid: bytes | None = None) -> stun.Message:
        """A request with credentials, fetching a nonce first when needed."""
        for _ in range(3):
            reply = stun.parse(self.raw(self.build(method, attrs, tid)))
            if not self.creds.should_retry(reply):
                return reply
        return reply

    @property
    def key(self) -> bytes:
        return self.creds.key

    @property
    def nonce(self) -> bytes | None:
        return self.creds.nonce

    @nonce.setter
    def nonce(self, value: bytes | None) -> None:
        self.creds.nonce = value

    def allocate(self, *extra) -> stun.Message:
        return self.send(stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, b"\x11\x00\x00\x00"), *extra])

    def relayed(self, reply: stun.Message):
        return stun.xor_address(reply.get(stun.XOR_RELAYED_ADDRESS), reply.transaction_id)


def peer_attr(addr):
    return (stun.XOR_PEER_ADDRESS, lambda tid: stun.encode_xor_address(addr, tid))


def channel_attr(number: int):
    return (stun.CHANNEL_NUMBER, struct.pack("!HH", number, 0))


def lifetime_attr(seconds: int):
    return (stun.LIFETIME, struct.pack("!I", seconds))
