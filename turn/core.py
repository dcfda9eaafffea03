"""The relay's sans-I/O core: STUN/TURN requests in, responses out.

`TurnCore.handle_stun(data, client, now)` takes one STUN message from a client
(a `ClientLink`, allocation.py) and returns the bytes to send back to it (or
None).  Relay ports are opened through an injected `RelayOpener`,
so this module never touches a socket or a clock; tests drive it with fake
relays and a float `now`.

Request processing follows RFC 8489 §6.3 and §9.2.4 (long-term credentials)
and RFC 8656 §7-§12.  Handlers raise `Reject(code)`; one place turns that
into an error response with the right attributes and integrity.
"""

from __future__ import annotations

import logging
import secrets
import struct
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

from ratelog import RateLimitedLog

from . import stun
from .allocation import (
    CHANNEL_MAX,
    CHANNEL_MIN,
    DEFAULT_LIFETIME_S,
    Allocation,
    AllocationTable,
    ClientLink,
    RelayOpener,
    RelayPort,
)
from .auth import NonceBook, RestVerifier, parse_rest_username
from .bandwidth import BandwidthCaps
from .ledger import Ledger, LocalLedger
from .policy import PeerPolicy
from .source_budget import SourceBudget
from .stun import Address, BadAttribute, Builder, Message

log = logging.getLogger("turn")

UDP_TRANSPORT = 17
RESERVATION_LIFETIME_S = 30.0
SWEEP_INTERVAL_S = 30.0

# For the operator (appliance/ops/metrics.py), `counters` also holds how long allocations
# lasted, from the Allocate's success to their end for any reason: how many ended within
# each bound of ALLOCATION_SECONDS_BUCKETS ("allocation_seconds_bucket_<i>", not cumulative,
# the last index for the longer ones) and their sum in milliseconds (an int like every
# counter).  Kept there, they travel with the other figures (RelayNode.stats, a worker's
# pipe) and the histograms of several relay processes add bucket by bucket.
ALLOCATION_SECONDS_BUCKETS = (10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0, 86400.0)
# "allocations_open_<transport>" in `counters` is a level, not a count of events: the live
# allocations per client transport (ClientLink.transport_name), up at Allocate and down at
# the end, so that it too adds up across processes (and ops.metrics leaves it out of an
# exited worker's totals).
OPEN_BY_TRANSPORT = "allocations_open_"


@dataclass(frozen=True)
class RelaySettings:
    realm: str
    max_lifetime_s: int = 3600
    user_quota: int = 10  # 0 = unlimited
    total_quota: int = 10000  # 0 = unlimited
    max_permissions: int = 64
    max_channels: int = 64
    software: str | None = None
    external_ip: str | None = None  # advertised instead of the bound IPv4
    external_ip6: str | None = None  # advertised instead of the bound IPv6
    families: frozenset[int] = frozenset({stun.FAMILY_IPV4})
    strict_expiry: bool = False  # expired usernames refused on live allocations too
    unauth_replies_per_s: float = 20.0  # error replies to a source with no allocation; 0 = off
    unauth_reply_burst: int = 100
    max_bps: int = 0  # per allocation, each direction; 0 = no cap
    user_max_bps: int = 0  # per user id in this process, each direction
    total_max_bps: int = 0  # this process, each direction


METHOD_NAMES = {
    stun.BINDING: "Binding",
    stun.ALLOCATE: "Allocate",
    stun.REFRESH: "Refresh",
    stun.CREATE_PERMISSION: "CreatePermission",
    stun.CHANNEL_BIND: "ChannelBind",
}


class Reject(Exception):
    def __init__(
        self,
        code: int,
        key: bytes | None = None,
        with_nonce: bool = False,
        unknown: list[int] | None = None,
        detail: str = "",
    ) -> None:
        super().__init__(code)
        self.code = code
        self.detail = detail
        self.key = key
        self.with_nonce = with_nonce
        self.unknown = unknown


@contextmanager
def malformed_is(code: int, key: bytes, detail: str = "") -> Iterator[None]:
    """Answer a malformed attribute read inside the block with `code`, with integrity.
    (Outside such a block BadAttribute reaches _handle_stun: a 400 without integrity.)"""
    try:
        yield
    except BadAttribute as exc:
        raise Reject(code, key, detail=detail or str(exc)) from None


@dataclass
class Credentials:
    username: str
    user_id: str
    expiry: int
    key: bytes


class Traffic:
    """Relayed packets and bytes each way.  The hot paths add whole batches at once
    (one attribute write per readable event, not per packet)."""

    __slots__ = ("to_peer_packets", "to_peer_bytes", "to_client_packets", "to_client_bytes")

    def __init__(self) -> None:
        self.to_peer_packets = self.to_peer_bytes = 0
        self.to_client_packets = self.to_client_bytes = 0


class TurnCore:
    def __init__(
        self,
        settings: RelaySettings,
        verifier: RestVerifier,
        nonces: NonceBook,
        policy: PeerPolicy,
        relays: RelayOpener,
        ledger: Ledger | None = None,
    ) -> None:
        self.settings = settings
        self.verifier = verifier
        self.nonces = nonces
        self.policy = policy
        self.relays = relays
        self.table = AllocationTable()
        # Quotas are counted here, not in `table`: the ledger may be the node's, shared
        # with the other relay processes.
        self.ledger = ledger if ledger is not None else LocalLedger()
        self.counters: Counter[str] = Counter()
        self.traffic = Traffic()
        self.bandwidth = BandwidthCaps(settings.max_bps, settings.user_max_bps, settings.total_max_bps)
        self.draining = False
        # token -> (held port, expiry, user id it counts against)
        self._reservations: dict[bytes, tuple[RelayPort, float, str]] = {}
        self._next_sweep = 0.0
        # The latest `now` a request or the timer brought: when an allocation ends where no
        # clock is at hand (its TCP/TLS connection closed, close_all), the node's timer ran
        # at most a second before (turn/node.py), which is precision enough for a duration.
        self._last_now = 0.0
        self._failures = RateLimitedLog(log)
        # Refused credentials are logged for the operator, but a client that sends them by
        # the thousand must not write a line each.
        self._refusals = RateLimitedLog(log, burst=10)
        # Error replies to sources without an allocation, per source: a UDP source can be
        # forged, and a 401 is five times the Allocate that earns it.
        self.unauth_replies = SourceBudget(settings.unauth_replies_per_s, settings.unauth_reply_burst)
        # Allocations whose meters came from caps an apply() replaced, by client key: their
        # user counts live there, so they detach there (bounded by the allocation table).
        self._earlier_caps: dict[Hashable, BandwidthCaps] = {}

    # ------------------------------------------------------------ new settings

    def apply(self, settings: RelaySettings, policy: PeerPolicy) -> None:
        """Take new settings and a new peer policy (a configuration reload) without touching
        a live allocation: its permissions, channels, lifetime and bandwidth meters stay as
        they are.  From the next request on, quotas, lifetimes, permission and channel
        limits, SOFTWARE, strict expiry and the policy are the new ones; new bandwidth caps
        meter the allocations made from now on; a new unauthenticated-reply budget starts
        full.  The realm and address families are the node's (a restart changes them)."""
        if (settings.realm, settings.families) != (self.settings.realm, self.settings.families):
            raise ValueError("the realm and address families change only with a restart")
        old = self.settings
        caps = (settings.max_bps, settings.user_max_bps, settings.total_max_bps)
        if caps != (old.max_bps, old.user_max_bps, old.total_max_bps):
            for alloc in self.table.by_client.values():
                self._earlier_caps.setdefault(alloc.client_key, self.bandwidth)
            self.bandwidth = BandwidthCaps(*caps)
        if (settings.unauth_replies_per_s, settings.unauth_reply_burst) != (
            old.unauth_replies_per_s,
            old.unauth_reply_burst,
        ):
            self.unauth_replies = SourceBudget(settings.unauth_replies_per_s, settings.unauth_reply_burst)
        self.settings = settings
        self.policy = policy

    # ------------------------------------------------------------ entry points

    def handle_stun(self, data: bytes, client: ClientLink, now: float) -> bytes | None:
        """The answer to one STUN message, or None.  Never raises: a message that hits a
        bug is counted, logged at a bounded rate and answered 500 (if it is a request),
        so one client's crafted bytes cannot stop the loop every other client shares."""
        try:
            return self._handle_stun(data, client, now)
        except Exception:
            self.counters["internal_errors_stun"] += 1
            self.counters["internal_errors"] += 1
            self._failures.exception(
                now, "internal error on a STUN message from %s/%s", client.transport_name, client.address[0]
            )
        try:
            msg = stun.parse(data)
            if msg.cls == stun.REQUEST and self._may_send_error(client, now):
                self.counters["error_500"] += 1
                return self._error(msg, Reject(500), client.address, now)
        except Exception:
            pass  # not even an error response can be made: stay silent
        return None

    def _handle_stun(self, data: bytes, client: ClientLink, now: float) -> bytes | None:
        try:
            msg = stun.parse(data)
        except stun.StunParseError:
            self.counters["malformed"] += 1
            return None
        if msg.cls == stun.REQUEST:
            try:
                return self._request(msg, client, now)
            except Reject as rej:
                if not self._may_send_error(client, now):
                    return None
                self.counters[f"error_{rej.code}"] += 1
                if log.isEnabledFor(logging.DEBUG):
                    log.debug(
                        "%s from %s/%s: %d (%s)",
                        METHOD_NAMES.get(msg.method, msg.method),
                        client.transport_name,
                        client.address[0],
                        rej.code,
                        rej.detail or stun.REASONS.get(rej.code),
                    )
                return self._error(msg, rej, client.address, now)
            except BadAttribute:
                if not self._may_send_error(client, now):
                    return None
                self.counters["error_400"] += 1
                return self._error(msg, Reject(400), client.address, now)
        if msg.cls == stun.INDICATION and msg.method == stun.SEND:
            self._send_indication(msg, client.key, now)
        else:
            self.counters["ignored"] += 1
        return None

    def _may_send_error(self, client: ClientLink, now: float) -> bool:
        """Whether an error response may go out: always to a client with an allocation
        (it authenticated, so its address is real), else while its source's budget lasts.
        Checked before the reply is built, so a suppressed one costs no nonce or HMAC."""
        if self.table.get(client.key) is not None or self.unauth_replies.allow(client.address[0], now):
            return True
        self.counters["unauth_replies_suppressed"] += 1
        return False

    def internal_error(self, now: float, path: str) -> None:
        """A bug on one of the I/O layer's packet paths (`path`: udp_listener, relay_port,
        stream), which caught it: counted by path and logged with its traceback at a
        bounded rate.  Call it from the except block."""
        self.counters[f"internal_errors_{path}"] += 1
        self.counters["internal_errors"] += 1
        self._failures.exception(now, "internal error on the relay's %s path", path)

    def data_indication(self, alloc: Allocation, peer: Address, data: bytes) -> bytes:
        """A Data indication carrying `data` from `peer` (no channel bound)."""
        txid = secrets.token_bytes(12)  # unpredictable: a client sees it
        b = Builder(stun.DATA, stun.INDICATION, txid)
        b.add(stun.XOR_PEER_ADDRESS, stun.encode_xor_address(peer, txid))
        b.add(stun.DATA_ATTR, data)
        return b.encode(fingerprint=alloc.fingerprint)

    def client_gone(self, client_key: Hashable) -> None:
        """The client's connection closed (TCP/TLS): its allocation ends."""
        alloc = self.table.get(client_key)
        if alloc is not None:
            self._delete(alloc, "connection closed")

    def get_timer(self) -> float | None:
        times = [t for t in (self.table.next_expiry(), self._next_sweep or None) if t is not None]
        times.extend(exp for _, exp, _ in self._reservations.values())
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        self._last_now = now
        for alloc in self.table.pop_expired(now):
            self._close(alloc, "expired")
        for token, (port, exp, user_id) in list(self._reservations.items()):
            if exp <= now:
                del self._reservations[token]
                port.close()
                self.ledger.release(user_id)
        if now >= self._next_sweep:
            for alloc in self.table.by_client.values():
                alloc.sweep(now)
            self._next_sweep = now + SWEEP_INTERVAL_S if self.table.by_client else 0.0

    def end_revoked(self, now: float) -> int:
        """End at once every allocation the verifier's revocations name (made before the
        revocation was issued); returns how many ended.  Called when the set changes."""
        ended = 0
        for alloc in list(self.table.by_client.values()):
            r = self.verifier.revocation_for(alloc.user_id)
            if r is not None and r.ends(alloc.created):
                self._last_now = max(self._last_now, now)
                self._delete(alloc, "revoked")
                ended += 1
        self.counters["allocations_revoked"] += ended
        return ended

    def close_all(self, reason: str) -> None:
        for alloc in list(self.table.by_client.values()):
            self._delete(alloc, reason)
        for port, _, user_id in self._reservations.values():
            port.close()
            self.ledger.release(user_id)
        self._reservations.clear()

    # ------------------------------------------------------------ requests

    def _request(self, msg: Message, client: ClientLink, now: float) -> bytes:
        self._last_now = now  # requests only: nothing is added on a relayed packet's path
        if msg.method == stun.BINDING:
            unknown = msg.unknown_required()
            if unknown:
                raise Reject(420, unknown=unknown)
            self.counters["binding"] += 1
            b = Builder(stun.BINDING, stun.SUCCESS, msg.transaction_id)
            b.add(stun.XOR_MAPPED_ADDRESS, stun.encode_xor_address(client.address, msg.transaction_id))
            return self._finish(b, None, msg.has_fingerprint)
        if msg.method != stun.ALLOCATE and msg.method not in self._handlers:
            raise Reject(400)
        creds = self._authenticate(msg, client.address, now)
        unknown = msg.unknown_required()
        if unknown:
            raise Reject(420, creds.key, unknown=unknown)
        if self.verifier.refuses(creds.user_id, now):
            self.counters["auth_revoked"] += 1
            self._refusals.info(
                now, "%s refused: user %r is revoked", METHOD_NAMES.get(msg.method, msg.method), creds.user_id
            )
            raise Reject(401, with_nonce=True)
        if creds.expiry < now and self.settings.strict_expiry and msg.method != stun.ALLOCATE:
            # (an expired Allocate is refused below in either mode)
            self.counters["auth_expired"] += 1
            raise Reject(401, with_nonce=True)
        alloc = self.table.get(client.key)
        if msg.method == stun.ALLOCATE:
            if alloc is not None:
                if alloc.txid == msg.transaction_id:
                    return alloc.response  # a retransmission (RFC 8656 §7.2)
                raise Reject(437, creds.key)
            if creds.expiry < now:
                self.counters["auth_expired"] += 1
                self._refusals.info(
                    now,
                    "allocate refused: expired username for user %r from %s",
                    creds.user_id,
                    client.address[0],
                )
                raise Reject(401, with_nonce=True)
            return self._allocate(msg, creds, client, now)
        if alloc is None:
            raise Reject(437, creds.key)
        if alloc.username != creds.username:
            raise Reject(441, creds.key)
        return self._handlers[msg.method](self, msg, creds, alloc, now)

    def _authenticate(self, msg: Message, client_addr: Address, now: float) -> Credentials:
        if msg.integrity_offset < 0:
            raise Reject(401, with_nonce=True)
        raw_user = msg.get(stun.USERNAME)
        raw_realm = msg.get(stun.REALM)
        raw_nonce = msg.get(stun.NONCE)
        if raw_user is None or raw_realm is None or raw_nonce is None:
            raise Reject(400)
        nonce = stun.text(raw_nonce)
        if not self.nonces.is_fresh(nonce, client_addr[0], now):
            raise Reject(438, with_nonce=True)
        username = stun.text(raw_user, 513)
        parsed = parse_rest_username(username)
        key = None
        if parsed is not None and stun.text(raw_realm) == self.verifier.realm:
            key = self.verifier.key_for(msg, username)
        if parsed is None or key is None:  # key is None whenever parsed is
            self.counters["auth_bad_credentials"] += 1
            self._refusals.info(now, "auth failure from %s: credentials do not verify", client_addr[0])
            raise Reject(401, with_nonce=True)
        # A bare "<expiry>" username has no user part: its quota is the username's own.
        return Credentials(username, parsed[1] or username, parsed[0], key)

    def _lifetime(self, msg: Message) -> int:
        """The lifetime LIFETIME asks for, within the configured bounds; 0 stays 0."""
        requested = msg.lifetime()
        if requested is None:
            return DEFAULT_LIFETIME_S
        if requested == 0:
            return 0
        return max(min(requested, self.settings.max_lifetime_s), DEFAULT_LIFETIME_S)

    def _within_credentials(self, lifetime: int, creds: Credentials, now: float) -> int:
        """With strict_expiry, an allocation does not outlive its username."""
        if self.settings.strict_expiry:
            return max(1, min(lifetime, int(creds.expiry - now)))
        return lifetime

    def _allocate(self, msg: Message, creds: Credentials, client: ClientLink, now: float) -> bytes:
        """A new allocation for `client` (RFC 8656 §7.2)."""
        key = creds.key
        if self.draining:
            # Shutting down: existing allocations keep relaying, new ones go elsewhere
            # (508: the client may try another server).
            self.counters["refused_draining"] += 1
            raise Reject(508, key)
        with malformed_is(400, key):
            protocol = msg.requested_transport()
            if protocol is None:
                raise Reject(400, key, detail="REQUESTED-TRANSPORT missing")
            if protocol != UDP_TRANSPORT:
                raise Reject(442, key)
            token = msg.reservation_token()
            family = msg.requested_address_family()
            even_port = msg.even_port()
        if token is not None and (family is not None or even_port is not None):
            raise Reject(400, key, detail="a RESERVATION-TOKEN already names the port")
        # A malformed LIFETIME is answered by _handle_stun (400 without integrity).
        lifetime = self._within_credentials(self._lifetime(msg) or DEFAULT_LIFETIME_S, creds, now)
        if token is not None:
            relay, reserved = self._claim_reservation(token, creds), None
            family = stun.address_family(relay.address[0])
        else:
            family = stun.FAMILY_IPV4 if family is None else family
            relay, reserved = self._open_relay(family, even_port, creds)
        return self._add_allocation(msg, creds, client, family, relay, reserved, lifetime, now)

    def _claim_reservation(self, token: bytes, creds: Credentials) -> RelayPort:
        """The port an earlier Allocate's EVEN-PORT R bit held under `token`."""
        held = self._reservations.get(token)
        if held is None:
            raise Reject(508, creds.key)
        relay, _, holder = held
        # The reservation already counts against its holder; another user who
        # presents the token takes the count over.
        if holder != creds.user_id:
            self._admit(creds.user_id, 1, creds.key)
            self.ledger.release(holder)
        del self._reservations[token]
        return relay

    def _open_relay(
        self, family: int, even_port: bool | None, creds: Credentials
    ) -> tuple[RelayPort, RelayPort | None]:
        """A fresh relay port (even when EVEN-PORT was sent), and the next one held too
        when its R bit was set; counted against the user's quota."""
        key = creds.key
        if family not in (stun.FAMILY_IPV4, stun.FAMILY_IPV6) or family not in self.settings.families:
            raise Reject(440, key)
        reserve_next = bool(even_port)
        # A reserved port counts like an allocation: it holds a port just the same.
        count = 2 if reserve_next else 1
        self._admit(creds.user_id, count, key)
        try:
            opened = self.relays.open(family, even_port is not None, reserve_next)
        except BaseException:
            self.ledger.release(creds.user_id, count)
            raise
        if opened is None:
            self.ledger.release(creds.user_id, count)
            self.counters["relay_ports_exhausted"] += 1
            raise Reject(508, key)
        return opened

    def _add_allocation(
        self,
        msg: Message,
        creds: Credentials,
        client: ClientLink,
        family: int,
        relay: RelayPort,
        reserved: RelayPort | None,
        lifetime: int,
        now: float,
    ) -> bytes:
        """Register the allocation and answer the Allocate (kept for retransmissions)."""
        s = self.settings
        advertised_ip = (s.external_ip if family == stun.FAMILY_IPV4 else s.external_ip6) or relay.address[0]
        alloc = Allocation(
            client,
            creds.username,
            creds.user_id,
            family,
            relay,
            (advertised_ip, relay.address[1]),
            now + lifetime,
            msg.has_fingerprint,
            created=now,
        )
        relay.allocation = alloc
        self.bandwidth.attach(alloc, now)
        self.table.add(alloc)
        self.ledger.mark_port(family, relay.address[1], True)
        tid = msg.transaction_id
        b = Builder(stun.ALLOCATE, stun.SUCCESS, tid)
        b.add(stun.XOR_RELAYED_ADDRESS, stun.encode_xor_address(alloc.relayed_address, tid))
        b.add(stun.LIFETIME, struct.pack("!I", lifetime))
        b.add(stun.XOR_MAPPED_ADDRESS, stun.encode_xor_address(client.address, tid))
        if reserved is not None:
            new_token = secrets.token_bytes(8)
            self._reservations[new_token] = (reserved, now + RESERVATION_LIFETIME_S, creds.user_id)
            b.add(stun.RESERVATION_TOKEN, new_token)
        alloc.txid = tid
        alloc.response = self._finish(b, creds.key, msg.has_fingerprint)
        self.counters["allocations_created"] += 1
        self.counters[OPEN_BY_TRANSPORT + client.transport_name] += 1
        log.info(
            "allocation %s for user %r from %s/%s, lifetime %ds",
            relay.address,
            creds.user_id,
            client.transport_name,
            client.address[0],
            lifetime,
        )
        return alloc.response

    def _admit(self, user_id: str, count: int, key: bytes) -> None:
        s = self.settings
        refusal = self.ledger.admit(user_id, count, s.user_quota, s.total_quota)
        if refusal:
            self.counters["user_quota_exceeded" if refusal == 486 else "total_quota_exceeded"] += 1
            raise Reject(refusal, key)

    def _refresh(self, msg: Message, creds: Credentials, alloc: Allocation, now: float) -> bytes:
        with malformed_is(443, creds.key):  # a malformed family matches no allocation's
            family = msg.requested_address_family()
        if family is not None and family != alloc.family:
            raise Reject(443, creds.key)
        lifetime = self._lifetime(msg)
        if lifetime == 0:
            self._delete(alloc, "refreshed to 0")
        else:
            lifetime = self._within_credentials(lifetime, creds, now)
            alloc.expires = now + lifetime
            self.table.schedule(alloc)
        b = Builder(stun.REFRESH, stun.SUCCESS, msg.transaction_id)
        b.add(stun.LIFETIME, struct.pack("!I", lifetime))
        return self._finish(b, creds.key, msg.has_fingerprint)

    def _peer(self, peer: Address, alloc: Allocation, key: bytes) -> Address:
        """`peer`, if it is of the allocation's address family (else 443)."""
        if stun.address_family(peer[0]) != alloc.family:
            raise Reject(443, key)
        return peer

    def _create_permission(self, msg: Message, creds: Credentials, alloc: Allocation, now: float) -> bytes:
        ips = []
        # Peers are decoded and judged one by one: the first bad one decides the answer.
        for peer in msg.xor_peer_addresses():
            ip = self._peer(peer, alloc, creds.key)[0]
            if not self.policy.permits_ip(ip):
                self.counters["peer_denied"] += 1
                raise Reject(403, creds.key)
            ips.append(ip)
        if not ips:
            raise Reject(400, creds.key, detail="XOR-PEER-ADDRESS required")
        new = {ip for ip in ips if not alloc.permits(ip, now)}
        if new and alloc.live_permissions(now) + len(new) > self.settings.max_permissions:
            raise Reject(508, creds.key)
        for ip in ips:
            alloc.permit(ip, now)
        b = Builder(stun.CREATE_PERMISSION, stun.SUCCESS, msg.transaction_id)
        return self._finish(b, creds.key, msg.has_fingerprint)

    def _channel_bind(self, msg: Message, creds: Credentials, alloc: Allocation, now: float) -> bytes:
        key = creds.key
        raw_peer = msg.get(stun.XOR_PEER_ADDRESS)
        with malformed_is(400, key):
            number = msg.channel_number()
        if number is None or raw_peer is None:
            raise Reject(400, key, detail="CHANNEL-NUMBER and XOR-PEER-ADDRESS required")
        if not CHANNEL_MIN <= number <= CHANNEL_MAX:
            raise Reject(400, key, detail=f"channel 0x{number:04x} out of range")
        # Decoded only once the number passed: a malformed peer is then a 400 without
        # integrity (BadAttribute reaches _handle_stun).
        peer = self._peer(stun.xor_address(raw_peer, msg.transaction_id), alloc, key)
        if not self.policy.permits(peer[0], peer[1]):
            self.counters["peer_denied"] += 1
            raise Reject(403, key)
        bound = alloc.channels.get(number)
        if bound is not None and bound[0] != peer:
            raise Reject(400, key, detail="channel bound to another peer")
        other = alloc.channel_of_peer.get(peer)
        if other is not None and other != number:
            raise Reject(400, key, detail="peer bound to another channel")
        if bound is None and alloc.live_channels(now) >= self.settings.max_channels:
            raise Reject(508, key)
        if peer[0] not in alloc.permissions and alloc.live_permissions(now) >= self.settings.max_permissions:
            raise Reject(508, key)
        alloc.bind_channel(number, peer, now)
        b = Builder(stun.CHANNEL_BIND, stun.SUCCESS, msg.transaction_id)
        return self._finish(b, key, msg.has_fingerprint)

    # Allocate is handled before the table lookup (_request).
    _handlers: ClassVar[dict[int, Callable[[TurnCore, Message, Credentials, Allocation, float], bytes]]] = {
        stun.REFRESH: _refresh,
        stun.CREATE_PERMISSION: _create_permission,
        stun.CHANNEL_BIND: _channel_bind,
    }

    # ------------------------------------------------------------ indications

    def _send_indication(self, msg: Message, client_key: Hashable, now: float) -> None:
        alloc = self.table.get(client_key)
        data = msg.data()
        try:
            peer = msg.xor_peer_address()
        except BadAttribute:
            peer = None
        if (
            alloc is None
            or peer is None
            or data is None
            or not alloc.permits(peer[0], now)
            or stun.address_family(peer[0]) != alloc.family
            or not self.policy.permits(peer[0], peer[1])
        ):
            self.counters["send_dropped"] += 1
            return
        meter = alloc.to_peer_meter
        if meter is not None and not meter.take(len(data), now):
            self.counters["bandwidth_dropped_to_peer"] += 1
            return
        alloc.relay.sendto(data, peer)
        self.traffic.to_peer_packets += 1
        self.traffic.to_peer_bytes += len(data)
        alloc.to_peer_packets += 1
        alloc.to_peer_bytes += len(data)

    # ------------------------------------------------------------ helpers

    def _finish(self, b: Builder, key: bytes | None, fingerprint: bool) -> bytes:
        if self.settings.software:
            b.add(stun.SOFTWARE, self.settings.software.encode()[:763])
        return b.encode(key, fingerprint)

    def _error(self, msg: Message, rej: Reject, client_addr: Address, now: float) -> bytes:
        b = Builder(msg.method, stun.ERROR, msg.transaction_id)
        b.add(stun.ERROR_CODE, stun.encode_error(rej.code))
        if rej.unknown:
            b.add(stun.UNKNOWN_ATTRIBUTES, b"".join(struct.pack("!H", t) for t in rej.unknown[:32]))
        if rej.with_nonce:
            b.add(stun.REALM, self.verifier.realm.encode())
            b.add(stun.NONCE, self.nonces.issue(client_addr[0], now).encode())
        return self._finish(b, rej.key, msg.has_fingerprint)

    def _delete(self, alloc: Allocation, reason: str) -> None:
        if alloc.closed:
            return  # ended already: its counts and port are released once only
        self.table.remove(alloc)
        self._close(alloc, reason)

    def _close(self, alloc: Allocation, reason: str) -> None:
        alloc.relay.allocation = None
        self._earlier_caps.pop(alloc.client_key, self.bandwidth).detach(alloc)
        self.ledger.mark_port(alloc.family, alloc.relay.address[1], False)
        self.ledger.release(alloc.user_id)
        alloc.relay.close()
        self.counters["allocations_deleted"] += 1
        self._count_ended(alloc)
        log.info("allocation %s for user %r ended: %s", alloc.relay.address, alloc.user_id, reason)

    def _count_ended(self, alloc: Allocation) -> None:
        """Count an allocation that ended: its duration in the histogram, and one fewer
        open on its client's transport (see ALLOCATION_SECONDS_BUCKETS)."""
        seconds = max(0.0, self._last_now - alloc.created)  # a wall clock may step back
        self.counters[f"allocation_seconds_bucket_{bisect_left(ALLOCATION_SECONDS_BUCKETS, seconds)}"] += 1
        self.counters["allocation_seconds_sum_ms"] += round(seconds * 1000)
        self.counters[OPEN_BY_TRANSPORT + alloc.client.transport_name] -= 1
