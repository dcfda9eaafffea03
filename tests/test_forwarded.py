"""Signaling clients behind a reverse proxy (signaling/forwarded.py): the client and scheme a
trusted proxy names in X-Forwarded-For / X-Forwarded-Proto or RFC 7239 Forwarded replace
the proxy's own in the ASGI scope; from any other peer the headers are ignored.  A table of
header cases, the middleware's hostile cases, and end to end through create_app (Quart's
test client, then a real Hypercorn): the per-address session cap applies to the forwarded
client, not to the proxy."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from contextlib import AsyncExitStack

import pytest
from hypercorn.asyncio import serve
from hypercorn.config import Config
from quart.testing.connections import WebsocketResponseError
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from demux.proxy import TrustedProxies
from signaling.admission import SessionLimits
from signaling.app import SignalingApp, create_app
from signaling.auth import StaticVerifier
from signaling.forwarded import (
    COUNT_FORWARDED,
    COUNT_MALFORMED,
    COUNT_UNTRUSTED,
    MAX_HEADER_CHARS,
    MAX_HOPS,
    PEER_KEY,
    TrustedForwarded,
    parse_forwarded,
    read_forwarding,
    transport_peer,
)
from signaling.guard import CapSettings, ClientGuard
from signaling.hypercorn_guard import ReceiveDrain, guard_listener
from signaling.stomp import Limits

from .netports import free_port_pair

TRUSTED = TrustedProxies(["10.0.0.0/8", "127.0.0.1", "2001:db8:1::/48"])
XFF, XFP, FWD = b"x-forwarded-for", b"x-forwarded-proto", b"forwarded"
CLIENT = "203.0.113.7"
MALFORMED = "malformed"  # an expected problem (its wording is the module's)

# (case, headers, (client, scheme) or MALFORMED for a problem with nothing believed)
CASES: list[tuple[str, list[tuple[bytes, bytes]], object]] = [
    ("no headers", [], (None, None)),
    ("xff one address", [(XFF, b"203.0.113.7")], ((CLIENT, 0), None)),
    ("xff with a port", [(XFF, b"203.0.113.7:5555")], ((CLIENT, 5555), None)),
    ("xff spaces and tabs", [(XFF, b" \t203.0.113.7 ")], ((CLIENT, 0), None)),
    ("xff: what the client wrote is ignored", [(XFF, b"6.6.6.6, 203.0.113.7")], ((CLIENT, 0), None)),
    (
        "xff: client garbage on the left is never read",
        [(XFF, b"<script>, %%, 203.0.113.7")],
        ((CLIENT, 0), None),
    ),
    (
        "xff: a chain of trusted proxies",
        [(XFF, b"6.6.6.6, 203.0.113.7, 10.1.2.3, 10.0.0.9")],
        ((CLIENT, 0), None),
    ),
    ("xff: all trusted, the left-most", [(XFF, b"10.0.0.1, 10.0.0.2")], (("10.0.0.1", 0), None)),
    ("xff: two lines join", [(XFF, b"6.6.6.6"), (XFF, b"203.0.113.7")], ((CLIENT, 0), None)),
    ("xff bare ipv6", [(XFF, b"2001:db8::1")], (("2001:db8::1", 0), None)),
    ("xff ipv6 canonical", [(XFF, b"2001:DB8:0:0::1")], (("2001:db8::1", 0), None)),
    ("xff bracketed ipv6", [(XFF, b"[2001:db8::1]")], (("2001:db8::1", 0), None)),
    ("xff bracketed ipv6 port", [(XFF, b"[2001:db8::1]:443")], (("2001:db8::1", 443), None)),
    ("xff: trusted ipv6 proxy skipped", [(XFF, b"203.0.113.7, 2001:db8:1::5")], ((CLIENT, 0), None)),
    ("xff unknown", [(XFF, b"unknown")], MALFORMED),
    ("xff hostname", [(XFF, b"proxy.example")], MALFORMED),
    ("xff empty", [(XFF, b"")], MALFORMED),
    ("xff trailing comma", [(XFF, b"203.0.113.7,")], MALFORMED),
    ("xff port too big", [(XFF, b"203.0.113.7:65536")], MALFORMED),
    ("xff port empty", [(XFF, b"203.0.113.7:")], MALFORMED),
    ("xff port not digits", [(XFF, b"203.0.113.7:8o")], MALFORMED),
    ("xff port unicode digits", [(XFF, "203.0.113.7:٣".encode())], MALFORMED),
    ("xff ipv6 zone", [(XFF, b"fe80::1%eth0")], MALFORMED),
    ("xff bracket unclosed", [(XFF, b"[2001:db8::1")], MALFORMED),
    ("xff bracket then junk", [(XFF, b"[2001:db8::1]x")], MALFORMED),
    ("xff: garbage right of the client", [(XFF, b"203.0.113.7, 10.0.0.1, junk")], MALFORMED),
    ("xff not ascii", [(XFF, "203.0.113.7\u00e9".encode("latin-1"))], MALFORMED),
    ("xff: a control character", [(XFF, b"203.0.113.7\r\nX-Evil: 1")], MALFORMED),
    ("xff too long", [(XFF, b"1.1.1.1," * (MAX_HEADER_CHARS // 8) + b"203.0.113.7")], MALFORMED),
    ("xff too long over lines", [(XFF, b"1" * (MAX_HEADER_CHARS // 2))] * 3, MALFORMED),
    (
        f"xff: client and {MAX_HOPS - 1} trusted",
        [(XFF, b", ".join([b"203.0.113.7"] + [b"10.0.0.1"] * (MAX_HOPS - 1)))],
        ((CLIENT, 0), None),
    ),
    (
        f"xff: client and {MAX_HOPS} trusted",
        [(XFF, b", ".join([b"203.0.113.7"] + [b"10.0.0.1"] * MAX_HOPS))],
        MALFORMED,
    ),
    ("xfp https", [(XFF, b"203.0.113.7"), (XFP, b"https")], ((CLIENT, 0), "https")),
    ("xfp case", [(XFF, b"203.0.113.7"), (XFP, b" HTTP ")], ((CLIENT, 0), "http")),
    ("xfp wss is https", [(XFF, b"203.0.113.7"), (XFP, b"wss")], ((CLIENT, 0), "https")),
    (
        "xfp appended: the client's hop",
        [(XFF, b"203.0.113.7, 10.0.0.2"), (XFP, b"https, http")],
        ((CLIENT, 0), "https"),
    ),
    (
        "xfp appended: the spoof ignored",
        [(XFF, b"6.6.6.6, 203.0.113.7"), (XFP, b"https, http")],
        ((CLIENT, 0), "http"),
    ),
    ("xfp set once: right-most", [(XFF, b"6.6.6.6, 203.0.113.7"), (XFP, b"https")], ((CLIENT, 0), "https")),
    ("xfp only", [(XFP, b"https")], (None, "https")),
    ("xfp only, bad", [(XFP, b"gopher")], MALFORMED),
    (
        "xfp bad: the client stays",
        [(XFF, b"203.0.113.7"), (XFP, b"javascript")],
        ((CLIENT, 0), None, MALFORMED),
    ),
    ("fwd rfc example", [(FWD, b"for=192.0.2.60;proto=http;by=203.0.113.43")], (("192.0.2.60", 0), "http")),
    ("fwd quoted ipv6 port", [(FWD, b'For="[2001:db8:cafe::17]:4711"')], (("2001:db8:cafe::17", 4711), None)),
    ("fwd quoted ipv4 port", [(FWD, b'for="192.0.2.60:47011"')], (("192.0.2.60", 47011), None)),
    ("fwd obfuscated port", [(FWD, b'for="192.0.2.60:_abc"')], (("192.0.2.60", 0), None)),
    ("fwd list", [(FWD, b"for=192.0.2.43, for=198.51.100.17")], (("198.51.100.17", 0), None)),
    (
        "fwd trusted skipped",
        [(FWD, b'for=192.0.2.43;proto=https, for="[2001:db8:1::1]"')],
        (("192.0.2.43", 0), "https"),
    ),
    ("fwd empty elements", [(FWD, b" , ,for=192.0.2.43;;")], (("192.0.2.43", 0), None)),
    (
        "fwd proto of the chosen element",
        [(FWD, b"for=192.0.2.43;proto=https, for=10.0.0.1;proto=http")],
        (("192.0.2.43", 0), "https"),
    ),
    ("fwd two lines", [(FWD, b"for=6.6.6.6"), (FWD, b"for=192.0.2.43")], (("192.0.2.43", 0), None)),
    (
        "fwd: a quoted non-address on the left is never read",
        [(FWD, b'for="<x>", for=192.0.2.43')],
        (("192.0.2.43", 0), None),
    ),
    ("fwd obfuscated node", [(FWD, b"for=_gazonk")], MALFORMED),
    ("fwd unknown", [(FWD, b"for=unknown")], MALFORMED),
    ("fwd no for", [(FWD, b"proto=https;by=10.0.0.1")], MALFORMED),
    ("fwd unbracketed ipv6", [(FWD, b'for="2001:db8::1"')], MALFORMED),
    ("fwd bracketed ipv4", [(FWD, b'for="[192.0.2.1]"')], MALFORMED),
    ("fwd ipv6 unquoted", [(FWD, b"for=[2001:db8::1]")], MALFORMED),
    ("fwd unterminated quote", [(FWD, b'for="192.0.2.1, for=192.0.2.43')], MALFORMED),
    ("fwd a backslash at the end", [(FWD, b'for="192.0.2.1\\')], MALFORMED),
    ("fwd two pairs without ;", [(FWD, b"for=192.0.2.1 for=192.0.2.2")], MALFORMED),
    ("fwd duplicate parameter", [(FWD, b"for=192.0.2.1;for=192.0.2.2")], MALFORMED),
    ("fwd no value", [(FWD, b"for=")], MALFORMED),
    ("fwd no =", [(FWD, b"for")], MALFORMED),
    ("fwd control char in quotes", [(FWD, b'for="192.0.2.1\x01"')], MALFORMED),
    (
        "fwd bad proto: the client stays",
        [(FWD, b"for=192.0.2.43;proto=file")],
        (("192.0.2.43", 0), None, MALFORMED),
    ),
    # Nearly every proxy writes X-Forwarded-For and passes a Forwarded header through, so a
    # Forwarded header next to it is the client's own and never believed.
    ("both: xff wins", [(FWD, b"for=6.6.6.6"), (XFF, b"203.0.113.7")], ((CLIENT, 0), None)),
    (
        "both: a broken forwarded does not matter",
        [(FWD, b'for="'), (XFF, b"203.0.113.7")],
        ((CLIENT, 0), None),
    ),
    ("unrelated headers", [(b"x-real-ip", b"6.6.6.6"), (b"host", b"example.org")], (None, None)),
]


@pytest.mark.parametrize("headers, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_forwarding_headers_from_a_trusted_proxy(headers, expected):
    got = read_forwarding(headers, TRUSTED)
    if expected == MALFORMED:
        assert (got.client, got.scheme) == (None, None) and got.problem
        return
    client, scheme, *problem = expected
    assert (got.client, got.scheme) == (client, scheme)
    assert bool(got.problem) == bool(problem)


def test_problems_never_quote_the_header():
    hostile = b'for="\\"\r\n[CRITICAL] forged line'
    for name in (XFF, FWD, XFP):
        problem = read_forwarding([(name, hostile)], TRUSTED).problem
        assert problem and "forged" not in problem and "\n" not in problem


def test_parse_forwarded_unquotes_and_lowercases_names():
    assert parse_forwarded('FOR="a\\"b";Proto=https, , by=x') == [
        {"for": 'a"b', "proto": "https"},
        {"by": "x"},
    ]


# ------------------------------------------------------------------ the middleware


def counting(counters: Counter[str]):
    def count(name: str) -> None:
        counters[name] += 1

    return count


def http_scope(peer, headers, scope_type="http") -> dict:
    return {
        "type": scope_type,
        "scheme": "ws" if scope_type == "websocket" else "http",
        "client": peer,
        "headers": headers,
        "path": "/",
    }


async def seen_by_app(middleware_for, scope: dict) -> dict:
    seen: list[dict] = []

    async def app(scope, receive, send):
        seen.append(scope)

    await middleware_for(app)(scope, None, None)
    return seen[0]


async def test_a_trusted_proxy_s_client_and_scheme_replace_its_own():
    counters: Counter[str] = Counter()
    scope = http_scope(("127.0.0.1", 40000), [(XFF, b"203.0.113.7:1234"), (XFP, b"https")], "websocket")
    seen = await seen_by_app(lambda app: TrustedForwarded(app, TRUSTED, counting(counters)), scope)
    assert seen["client"] == (CLIENT, 1234) and seen["scheme"] == "wss"
    assert transport_peer(seen) == ("127.0.0.1", 40000) == seen[PEER_KEY]
    assert scope["client"] == ("127.0.0.1", 40000)  # the server's own scope is left alone
    assert counters == Counter({COUNT_FORWARDED: 1})


async def test_an_http_scope_gets_http_schemes():
    scope = http_scope(("10.9.9.9", 1), [(FWD, b"for=192.0.2.1;proto=wss")])
    seen = await seen_by_app(lambda app: TrustedForwarded(app, TRUSTED), scope)
    assert seen["scheme"] == "https" and seen["client"] == ("192.0.2.1", 0)


async def test_headers_from_an_untrusted_peer_are_ignored_and_counted(caplog):
    middleware: list[TrustedForwarded] = []

    def make(app):
        middleware.append(TrustedForwarded(app, TRUSTED))
        return middleware[-1]

    caplog.set_level(logging.DEBUG, logger="signaling.forwarded")
    scope = http_scope(("198.51.100.9", 5000), [(XFF, b"203.0.113.7"), (XFP, b"https")])
    seen = await seen_by_app(make, scope)
    assert seen is scope and transport_peer(seen) == ("198.51.100.9", 5000)
    assert middleware[0].counters == Counter({COUNT_UNTRUSTED: 1})
    assert "203.0.113.7" not in caplog.text  # the header's text is never logged


async def test_nothing_is_believed_when_no_proxy_is_trusted():
    scope = http_scope(("127.0.0.1", 5000), [(XFF, b"203.0.113.7")])
    seen = await seen_by_app(lambda app: TrustedForwarded(app, TrustedProxies([])), scope)
    assert seen is scope


async def test_an_ipv4_mapped_proxy_is_the_ipv4_one():
    scope = http_scope(("::ffff:127.0.0.1", 5000, 0, 0), [(XFF, b"203.0.113.7")])
    seen = await seen_by_app(lambda app: TrustedForwarded(app, TRUSTED), scope)
    assert seen["client"] == (CLIENT, 0)


async def test_scopes_without_a_client_and_lifespan_pass_through():
    for scope in (http_scope(None, [(XFF, b"203.0.113.7")]), {"type": "lifespan"}):
        assert await seen_by_app(lambda app: TrustedForwarded(app, TRUSTED), scope) is scope


async def test_a_flood_of_malformed_headers_logs_a_bounded_few_escaped_lines(caplog):
    counters: Counter[str] = Counter()
    caplog.set_level(logging.DEBUG, logger="signaling.forwarded")
    seen = []

    async def app(scope, receive, send):
        seen.append(scope)

    middleware = TrustedForwarded(app, TRUSTED, counting(counters))
    for i in range(200):
        scope = http_scope(("127.0.0.1", i), [(XFF, b"203.0.113.7, \x1b[31m\r\nforged%d" % i)])
        await middleware(scope, None, None)
    assert all(s["client"][0] == "127.0.0.1" and PEER_KEY not in s for s in seen)
    assert counters == Counter({COUNT_MALFORMED: 200})
    assert len(caplog.records) <= 3
    assert "forged" not in caplog.text and "\x1b" not in caplog.text


# ------------------------------------------------------------------ end to end

TOKENS = {"tok-a": "alice"}
CONNECT = "CONNECT\naccept-version:1.2\nide:tok-a\n\n\x00"


def capped_app(trusted: TrustedProxies | None) -> SignalingApp:
    """The signaling app with one session per address, wrapped as the appliance wraps it."""
    guard = ClientGuard(caps=CapSettings(sessions=SessionLimits(max_per_address=1)))
    app = create_app("/imserver", StaticVerifier(TOKENS), Limits(), 64, guard=guard)
    inner = app.web.asgi_app if trusted is None else TrustedForwarded(app.web.asgi_app, trusted, guard.count)
    app.web.asgi_app = ReceiveDrain(inner, guard)  # type: ignore[method-assign]
    return app


async def admitted(
    app: SignalingApp, held: AsyncExitStack, peer: tuple[str, int], forwarded_for: str
) -> bool:
    """Whether a WebSocket from `peer` naming `forwarded_for` gets its session (Quart's test
    client; an admitted one is held open by `held`)."""
    try:
        ws = await held.enter_async_context(
            app.web.test_client().websocket(
                "/imserver/ws", headers={"X-Forwarded-For": forwarded_for}, scope_base={"client": peer}
            )
        )
        await ws.send(CONNECT)
        assert (await asyncio.wait_for(ws.receive(), 5)).startswith("CONNECTED")
    except WebsocketResponseError as refused:
        assert refused.response.status_code == 429
        return False
    return True


@pytest.mark.parametrize("forwarding", [True, False], ids=["with", "without the middleware"])
async def test_the_per_address_session_cap_applies_to_the_forwarded_client(forwarding):
    app = capped_app(TRUSTED if forwarding else None)
    proxy = "127.0.0.1"
    async with app.web.test_app(), AsyncExitStack() as held:
        first = await admitted(app, held, (proxy, 40001), "203.0.113.5")
        other_client = await admitted(app, held, (proxy, 40002), "203.0.113.6")
        same_client_again = await admitted(app, held, (proxy, 40003), "203.0.113.5")
        # From a peer that is not a proxy, the header is the client's own word.
        direct = await admitted(app, held, ("198.51.100.9", 40004), "203.0.113.7")
        spoofing = await admitted(app, held, ("198.51.100.9", 40005), "203.0.113.8")
    assert (first, direct, spoofing) == (True, True, False)
    assert (other_client, same_client_again) == ((True, False) if forwarding else (False, False))
    refused = app.guard.counters["refused_sessions_per_ip"]
    assert refused == (2 if forwarding else 3)


async def test_through_hypercorn_the_proxy_s_clients_are_capped_each():
    """A real Hypercorn with the signaling listener's guard: its scope's client is the TCP
    peer (127.0.0.1, a trusted proxy), the middleware puts the named client there."""
    app = capped_app(TRUSTED)
    port = free_port_pair()
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = config.errorlog = None
    guard_listener(config, app.guard)
    stop = asyncio.Event()
    server = asyncio.ensure_future(serve(app.web, config, shutdown_trigger=stop.wait))  # type: ignore[arg-type]

    async def session(forwarded_for: str):
        for _ in range(100):  # until the listener is up
            try:
                ws = await connect(
                    f"ws://127.0.0.1:{port}/imserver/ws",
                    additional_headers={"X-Forwarded-For": forwarded_for, "X-Forwarded-Proto": "https"},
                    open_timeout=5,
                )
            except OSError:
                await asyncio.sleep(0.05)
                continue
            await ws.send(CONNECT)
            assert str(await asyncio.wait_for(ws.recv(), 5)).startswith("CONNECTED")
            return ws
        raise AssertionError("the listener never came up")

    try:
        a = await session("203.0.113.5")
        b = await session("203.0.113.6")
        with pytest.raises(InvalidStatus) as refused:
            await session("203.0.113.5")
        assert refused.value.response.status_code == 429
        assert app.guard.counters[COUNT_FORWARDED] == 3
        await a.close()
        await b.close()
    finally:
        stop.set()
        await asyncio.wait_for(server, 10)
