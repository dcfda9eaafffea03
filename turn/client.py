"""The client side of STUN long-term credentials, for the appliance's own tools.

The benchmark and the tests speak TURN to the relay (and to coturn) with raw
sockets; this builds their requests and follows the RFC 8489 §9.2.5 retry
rules, so each of them is only a socket loop.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from . import stun
from .auth import rest_password

AttrValue = bytes | Callable[[bytes], bytes]  # a callable gets the transaction id


@dataclass
class ClientCredentials:
    username: str
    realm: str
    key: bytes
    nonce: bytes | None = None

    @classmethod
    def rest(cls, secret: bytes, username: str, realm: str) -> ClientCredentials:
        """Credentials from the TURN REST scheme's shared secret."""
        return cls(username, realm, stun.long_term_key(username, realm, rest_password(secret, username)))

    def build(
        self,
        method: int,
        attrs: Iterable[tuple[int, AttrValue]] = (),
        tid: bytes | None = None,
        fingerprint: bool = True,
    ) -> bytes:
        """A request, authenticated once a nonce is known."""
        tid = tid or os.urandom(12)
        b = stun.Builder(method, stun.REQUEST, tid)
        for atype, value in attrs:
            b.add(atype, value(tid) if callable(value) else value)
        if self.nonce is None:
            return b.encode(None, fingerprint)
        b.add(stun.USERNAME, self.username.encode())
        b.add(stun.REALM, self.realm.encode())
        b.add(stun.NONCE, self.nonce)
        return b.encode(self.key, fingerprint)

    def should_retry(self, reply: stun.Message) -> bool:
        """Learn the nonce from a 401 (first time) or 438 (any time): retry then."""
        error = reply.get(stun.ERROR_CODE)
        if reply.cls != stun.ERROR or error is None:
            return False
        code = stun.decode_error(error)[0]
        if code == 438 or (code == 401 and self.nonce is None):
            self.nonce = reply.get(stun.NONCE)
            return self.nonce is not None
        return False
