"""What `/app/turn/get-turn-credentials` answers (docs/api.md §6): the iceServers list.

The URLs come from the configuration -- by default one STUN URL and a TURN
URL per enabled relay listener (the edge listener's TLS port among them), on
`credentials.host` or the advertised address -- plus any external coturn
servers.  Every TURN entry carries the same REST credential, signed with the
ring's signing secret, so it works on the embedded relay and on every coturn
sharing the ring.

A user the ring's revocations refuse (`appliance revoke --user ID --until T`) gets the
STUN entries only until T: a fresh credential would be refused by the embedded relay
anyway, and an external coturn, which knows nothing of revocations, would accept it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from turn.auth import make_credential

from ..config.schema import AppConfig, HostPort
from .ring import SecretRing

_WILDCARDS = ("0.0.0.0", "::")


def _url_host(config: AppConfig, listener: HostPort) -> str:
    """credentials.host, else the advertised address, else the listener's own address."""
    host = config.credentials.host
    if host is None:
        ipv6 = ":" in listener.host
        advertised = config.external_ip6 if ipv6 else config.external_ip
        host = advertised or listener.host
        if host in _WILDCARDS:
            host = config.external_ip or config.external_ip6 or "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def embedded_urls(config: AppConfig) -> list[str]:
    """One stun: URL and a turn:/turns: URL for each enabled relay listener.

    The order is the order of preference a client should see: UDP first (the cheapest
    path), then TURN over TLS on the edge port (edge.listen, usually 443: it crosses the
    networks that let nothing else out), then TCP and the TLS listener."""
    t = config.turn
    urls = []
    stun_listener = t.udp or t.tcp
    if stun_listener is not None:
        urls.append(f"stun:{_url_host(config, stun_listener)}:{stun_listener.port}")
    if t.udp is not None:
        urls.append(f"turn:{_url_host(config, t.udp)}:{t.udp.port}?transport=udp")
    edge = config.edge.listen
    if edge is not None:
        urls.append(f"turns:{_url_host(config, edge)}:{edge.port}?transport=tcp")
    if t.tcp is not None:
        urls.append(f"turn:{_url_host(config, t.tcp)}:{t.tcp.port}?transport=tcp")
    if t.tls is not None:
        urls.append(f"turns:{_url_host(config, t.tls)}:{t.tls.port}?transport=tcp")
    return urls


def handed_out_urls(config: AppConfig) -> list[str]:
    """credentials.ice_servers (or the embedded defaults), then credentials.external."""
    c = config.credentials
    own = list(c.ice_servers) if c.ice_servers is not None else embedded_urls(config)
    return own + [u for u in c.external if u not in own]


class CredentialIssuer:
    """Makes the iceServers answer for a user from the live secret ring.

    `ring` returns the ring currently in force (the supervisor's RingWatcher keeps
    it), so a rotation changes what is handed out without a restart.
    """

    def __init__(
        self,
        urls: list[str],
        ttl_s: int,
        grace_s: int,
        activation_s: int,
        ring: Callable[[], SecretRing],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.urls = urls
        self.ttl_s = ttl_s
        self.grace_s = grace_s
        self.activation_s = activation_s
        self.ring = ring
        self.clock = clock

    @classmethod
    def from_config(
        cls, config: AppConfig, ring: Callable[[], SecretRing], clock: Callable[[], float] = time.time
    ) -> CredentialIssuer:
        c = config.credentials
        return cls(handed_out_urls(config), c.ttl_s, c.grace_s(), c.activation_s, ring, clock)

    def issue(self, user_id: str) -> dict:
        """{"iceServers": [...], "ttl": seconds} for `user_id` (STUN entries only while the
        ring's revocations refuse the user)."""
        now = self.clock()
        ring = self.ring()
        if any(r.user == user_id and r.refuses(now) for r in ring.in_force(now)):
            stun_only = [url for url in self.urls if not url.startswith(("turn:", "turns:"))]
            servers = [{"urls": url, "url": url, "username": None, "credential": None} for url in stun_only]
            return {"iceServers": servers, "ttl": self.ttl_s}
        secret = ring.signing(now, self.grace_s, self.activation_s)
        ttl = self.ttl_s
        if secret.retired is not None:
            # Signing with a secret on its way out (a new one is still activating):
            # the credential must not outlive the secret's acceptance.
            ttl = max(1, min(ttl, int(secret.retired + self.grace_s - now)))
        username, credential = make_credential(secret.value.encode(), user_id, now, ttl)
        servers = []
        for url in self.urls:
            turn = url.startswith(("turn:", "turns:"))
            servers.append(
                {
                    "urls": url,
                    "url": url,
                    "username": username if turn else None,
                    "credential": credential if turn else None,
                }
            )
        return {"iceServers": servers, "ttl": ttl}
