"""Long-term credentials from the TURN REST scheme, and stateless nonces.

The signaling hands out `username = "<expiry unix time>:<userId>"` with
`password = base64(HMAC-SHA1(secret, username))`; the STUN key is then
`MD5(username:realm:password)` (RFC 8489 §9.2.2).  The relay never stores
passwords: it recomputes them from the secret ring, trying every secret, so a
secret rotation needs no coordination with clients.

Nonces carry their issue time and an HMAC binding them to the client's IP, so
any worker process holding the same nonce key can check a nonce that another
worker issued, and none of them keeps per-client state.

A revocation names a user whose allocations made before `issued_at` end at once, and
whose credentials (still valid by their signature and expiry) are refused while
`until` is ahead: a leaked credential stops working without a secret rotation.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass

from .stun import Message, long_term_key

NONCE_MAC_BYTES = 12


def rest_password(secret: bytes, username: str) -> str:
    """The TURN REST password (the credential) for `username` under `secret`."""
    return base64.b64encode(hmac.new(secret, username.encode(), hashlib.sha1).digest()).decode()


def make_credential(secret: bytes, user_id: str, now: float, ttl_s: int) -> tuple[str, str]:
    """(username, credential) for `user_id`, valid until `now + ttl_s` (whole seconds).

    What the signaling and `appliance credentials` hand out, and exactly what
    this relay (or a coturn with `use-auth-secret`) verifies.  `user_id` may
    contain ':'; the expiry is everything before the first one.
    """
    if not user_id:
        raise ValueError("user_id must be non-empty")
    if ttl_s <= 0:
        raise ValueError(f"ttl_s must be positive, got {ttl_s}")
    username = f"{int(now) + int(ttl_s)}:{user_id}"
    return username, rest_password(secret, username)


def parse_rest_username(username: str) -> tuple[int, str] | None:
    """Split "expiry:userId"; None if the username is not of that form.

    A bare "expiry" is accepted with an empty user part, as coturn, pion and
    STUNner accept it under the TURN REST scheme (`turnutils_uclient -W SECRET`
    without -u sends one).  The expiry is ASCII digits only: str.isdigit() also
    accepts digits such as "²", which int() then refuses.
    """
    expiry, sep, user_id = username.partition(":")
    if (sep and not user_id) or not expiry.isascii() or not expiry.isdigit() or len(expiry) > 12:
        return None
    return int(expiry), user_id


class NonceBook:
    """Issues and checks stateless nonces: hex issue time + truncated HMAC."""

    def __init__(self, key: bytes, lifetime_s: float) -> None:
        self._key = key
        self._lifetime_s = lifetime_s

    def _mac(self, stamp: str, client_ip: str) -> str:
        mac = hmac.new(self._key, f"{stamp}|{client_ip}".encode(), hashlib.sha256).digest()
        return mac[:NONCE_MAC_BYTES].hex()

    def issue(self, client_ip: str, now: float) -> str:
        stamp = f"{int(now):010x}"
        return stamp + self._mac(stamp, client_ip)

    def is_fresh(self, nonce: str, client_ip: str, now: float) -> bool:
        """True if this relay issued `nonce` to `client_ip` and it has not expired.

        An unknown nonce (forged, or from before a restart) is treated like an
        expired one: the client gets 438 and a fresh nonce, and retries.
        """
        if len(nonce) != 10 + 2 * NONCE_MAC_BYTES:
            return False
        stamp = nonce[:10]
        try:
            issued = int(stamp, 16)
        except ValueError:
            return False
        if not hmac.compare_digest(nonce[10:], self._mac(stamp, client_ip)):
            return False
        return issued <= now + 5 and now - issued < self._lifetime_s


@dataclass(frozen=True)
class Revocation:
    """`user`'s allocations made before `issued_at` end; its credentials are refused while
    now < `until` (until == issued_at: end what is live, refuse nothing new).  Unix seconds."""

    user: str
    issued_at: float
    until: float

    def refuses(self, now: float) -> bool:
        return now < self.until

    def ends(self, created: float) -> bool:
        """Whether an allocation of this user created at `created` is ended by it."""
        return created < self.issued_at


class RestVerifier:
    """Finds the long-term key that verifies a request, trying each secret, and knows
    which users are revoked."""

    def __init__(
        self, realm: str, secrets: tuple[bytes, ...], revocations: tuple[Revocation, ...] = ()
    ) -> None:
        self.realm = realm
        self.secrets = secrets
        self.revocations: dict[str, Revocation] = {}
        self.set_revocations(revocations)

    def set_secrets(self, secrets: tuple[bytes, ...]) -> None:
        self.secrets = secrets

    def set_revocations(self, revocations: tuple[Revocation, ...]) -> None:
        """The revocations in force (the ring's); for a user named twice the later wins."""
        self.revocations = {r.user: r for r in revocations}

    def revocation_for(self, user_id: str) -> Revocation | None:
        return self.revocations.get(user_id)

    def refuses(self, user_id: str, now: float) -> bool:
        """True if `user_id`'s credentials are refused at `now`, whatever they verify with."""
        r = self.revocations.get(user_id)
        return r is not None and r.refuses(now)

    def key_for(self, msg: Message, username: str) -> bytes | None:
        """The key (current secret first) whose MESSAGE-INTEGRITY matches, else None."""
        for secret in self.secrets:
            key = long_term_key(username, self.realm, rest_password(secret, username))
            if msg.verify_integrity(key):
                return key
        return None
