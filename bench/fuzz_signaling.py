"""Fuzz the running signaling service over the wire: mutated STOMP frames over native
WebSocket and SockJS, with a bystander whose calls must keep working throughout.

    python bench/fuzz_signaling.py [--frames N] [--batches N] [--seed S] [--concurrency N]
                                   [--quick] [--out DIR]
    python bench/fuzz_signaling.py --replay CASE.json

Starts the appliance as an operator runs it (`python -m appliance serve`, through
tests/interop/conftest.py's start_appliance, on free loopback ports) with JWT auth
(tokens minted here for 400 fuzz users) and real per-address caps: `stomp.per_ip_exempt`
is 127.0.0.0/26 only, so sources 127.0.0.2-63 count as a local reverse proxy and sources
127.0.0.64-199 are capped per address like clients on the internet (connections, sessions,
new sessions per second); the work is spread over them so the fuzz still gets through.
Batch after batch, jobs of these kinds run concurrently until the batch's share of
--frames STOMP frames has been written:

- STOMP sessions over the native WebSocket, SockJS's websocket transport and SockJS
  xhr_send with an xhr, xhr_streaming or eventsource receiver (one source address per
  SockJS session): CONNECT with good and bad tokens, SUBSCRIBEs, SENDs to every /app
  destination of docs/api.md with JSON bodies (presence queries, call request/response/hangup,
  rtc signaling, TURN credentials), and pairs of sessions that really call each other;
  mixed in: JSON mutations (types, missing fields, deep nesting, huge strings and arrays,
  invalid UTF-8, lone surrogates, 5000-digit numbers, truncation), header mutations
  (CR/LF/NUL, bad escapes, huge and many headers, duplicate and lying content-length),
  odd commands and heart-beats, byte-level mutations, frames coalesced, split over
  several WebSocket messages or SockJS envelopes, WebSocket fragments, binary messages;
  some clients keep sending after their ERROR.
- Handshakes with mutated headers, paths and userIds; raw WebSocket protocol junk
  (reserved opcodes and bits, unmasked frames, bad close codes, oversized lengths);
  SockJS HTTP junk (envelope mutations, duplicate and lying Content-Length, chunked
  junk, header injection, huge requests); disconnects mid-frame; bursts from one capped
  address past its caps.
- Held through each batch: slowloris handshakes and request bodies dripping a byte at a
  time, clients that never read while asking for large answers, sessions that never send
  CONNECT.

A bystander process (the `websockets` library, two users from their own capped address)
does a presence query and a full call (request, accept, offer, hangup) round trip every
0.2 s from before the first batch (idle) to the end, each step within 10 s.

After each batch: the appliance's RSS and descriptors (its process tree), its TCP
sockets on the signaling port in CLOSE-WAIT (/proc/net/tcp and tcp6, state 08; if any,
waited for up to --grace seconds), "Traceback" in its log (and where each came from: the
exception and its innermost frame), its /metrics (sessions, protocol errors, slow
consumers, refusals, aborts, error answers by code: a 500 is an internal error), the
sessions it still holds once every fuzz connection is gone (a session its log shows
connected and never closed --session-grace seconds later has leaked), and the bystander's
latencies in the batch.

Exit status 1 if the log shows a traceback, a SEND was answered 500, CLOSE-WAIT persists
past the grace, the bystander missed a round trip, fuzz sessions are still registered at
the end, the appliance died or did not stop cleanly, fewer than --frames frames were
written, or RSS after the last batch exceeds RSS after the warm-up batch x 1.10 +
--rss-growth-mib (default 32 MiB).  The mix and shape of the inputs is a function of
--seed (tokens, timestamps and the interleaving of concurrent jobs are not).  When a
traceback shows up at a new site, the jobs running around it are replayed one at a time on
fresh connections to find one that triggers it there; when a session leaks, the jobs whose
clients were that user at that time are replayed until one leaves a session behind.  The
input found (every byte written, connection by connection, with the pauses) is saved under
--out as a JSON case that --replay sends to a fresh appliance, saying whether it logs a
traceback or leaves a session registered.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import base64
import contextlib
import functools
import itertools
import json
import multiprocessing
import os
import random
import re
import socket
import struct
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jwt
from fuzzkit import (
    LogTail,
    LogWatch,
    add_common_options,
    metrics,
    report_memory,
    run_or_replay,
    verdict,
    write_case,
)
from proc_stats import cpu_seconds, fd_count, process_tree, rss_kib

from tests.interop.conftest import start_appliance, stop_appliance

HOST = "127.0.0.1"
# URL queries a client controls that must never become an identity or a log line as they are
# (a newline, NUL, over-long, not UTF-8, bad escapes, two userIds); the same order in every
# list that starts with them keeps a seed's choices.
ODD_USER_QUERIES = (
    "",
    "?userId=",
    "?userId=%0Aforged",
    "?userId=%00",
    "?userId=" + "u" * 129,
    "?userId=%ff%fe",
    "?userId=%zz",
    "?userId=a&userId=b",
)
PREFIX = "/imserver"
JWT_KEY = "fuzz-signaling-hs256-key-" + "0123456789abcdef" * 3  # 64+ bytes: HS512 too, quietly
EXEMPT_NET = "127.0.0.0/26"  # .0-.63: "a local proxy"
EXEMPT_SOURCES = tuple(f"127.0.0.{i}" for i in range(2, 64))
CAPPED_SOURCES = tuple(f"127.0.0.{i}" for i in range(64, 160))  # capped like the internet
BURST_SOURCES = tuple(f"127.0.0.{i}" for i in range(160, 192))  # bursts past the caps
HOLDER_SOURCES = tuple(f"127.0.0.{i}" for i in range(192, 200))  # slowloris, deaf, silent
BYSTANDER_IP = "127.0.0.200"
BYSTANDERS = ("bystander-alice", "bystander-bob")
FUZZ_USERS = tuple(f"fz{i:03d}" for i in range(400))
TCP_CLOSE_WAIT = "08"
SERVER_FRAMES = ("CONNECTED", "MESSAGE", "RECEIPT", "ERROR", "heart-beat")
TCP_ESTABLISHED = "01"

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10
WRITE_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 5.0
JOB_TIMEOUT_S = 40.0
ROUND_TRIP_TIMEOUT_S = 10.0

APP_DESTINATIONS = (
    "/app/user/status",
    "/app/call/request",
    "/app/call/response",
    "/app/call/hangup",
    "/app/rtc/signaling",
    "/app/turn/get-turn-credentials",
)
USER_QUEUES = (
    "/user/queue/errors",
    "/user/queue/call/request",
    "/user/queue/call/response",
    "/user/queue/call/down",
    "/user/queue/call/hangup",
    "/user/queue/call/timeout",
    "/user/queue/rtc/signaling",
    "/user/queue/turn/get-turn-credentials",
)
SUBSCRIPTIONS = ("/topic/user/status", *USER_QUEUES)
SDP = (
    "v=0\r\no=- 4611731400430051336 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0\r\n"
    "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\na=rtpmap:111 opus/48000/2\r\n"
)
HARNESS_FAULTS: list[str] = []  # bugs of this script (not of the appliance), reported at the end


# ------------------------------------------------------------------ tokens


class Tokens:
    """JWTs for the fuzz users (HS256 with the appliance's key), and bad ones."""

    def __init__(self) -> None:
        self._good: dict[str, str] = {}

    def good(self, user: str) -> str:
        token = self._good.get(user)
        if token is None:
            token = self._good[user] = jwt.encode(
                {"sub": user, "exp": int(time.time()) + 86400}, JWT_KEY, algorithm="HS256"
            )
        return token

    def bad(self, rng: random.Random, user: str) -> str:
        now = int(time.time())
        kind = rng.randrange(14)
        if kind == 0:
            return jwt.encode({"sub": user, "exp": now - 3600}, JWT_KEY, algorithm="HS256")
        if kind == 1:
            return jwt.encode({"sub": user, "exp": now + 3600}, "another-key-" + "x" * 32, algorithm="HS256")
        if kind == 2:
            return self.good(rng.choice(FUZZ_USERS))  # someone else's: 403
        if kind == 3:
            return jwt.encode({"exp": now + 3600}, JWT_KEY, algorithm="HS256")
        if kind == 4:
            return jwt.encode(
                {"sub": user + "\nINJECTED log line", "exp": now + 3600}, JWT_KEY, algorithm="HS256"
            )
        if kind == 5:
            return jwt.encode(
                {"sub": "u" * rng.choice([128, 129, 5000]), "exp": now + 3600}, JWT_KEY, algorithm="HS256"
            )
        if kind == 6:
            head = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=").decode()
            body = base64.urlsafe_b64encode(json.dumps({"sub": user, "exp": now + 3600}).encode())
            return f"{head}.{body.rstrip(b'=').decode()}."
        if kind == 7:
            return jwt.encode({"sub": user, "exp": now + 3600}, JWT_KEY, algorithm="HS512")
        if kind == 8:
            return jwt.encode({"sub": user, "exp": now + 3600, "nbf": now + 3600}, JWT_KEY, algorithm="HS256")
        if kind == 9:
            return (
                jwt.encode({"sub": 12345, "exp": now + 3600}, JWT_KEY, algorithm="HS256")
                if rng.random() < 0.5
                else jwt.encode({"sub": "", "exp": "tomorrow"}, JWT_KEY, algorithm="HS256")
            )
        if kind == 10:
            good = self.good(user)
            return good[: rng.randrange(len(good))]
        if kind == 11:
            good = bytearray(self.good(user).encode())
            good[rng.randrange(len(good))] ^= 1 << rng.randrange(7)
            return good.decode("latin-1")
        if kind == 12:
            return rng.choice(
                [
                    "",
                    " ",
                    "a.b.c",
                    "Bearer " + self.good(user),
                    "é\u2028x",
                    "\\c\\n",
                    "x" * rng.choice([4096, 8200]),
                ]
            )
        return rng.choice(["tok-alice", "null", "undefined", "0", "[]"])


# ------------------------------------------------------------------ STOMP frames and mutations


def b(text: str | bytes) -> bytes:
    return text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass")


def stomp_frame(command: str | bytes, headers=(), body: bytes = b"", length: bool = True) -> bytes:
    lines = [b(command)] + [b(k) + b":" + b(v) for k, v in headers]
    if length:
        lines.append(b"content-length:%d" % len(body))
    return b"\n".join(lines) + b"\n\n" + body + b"\x00"


def send_frame(destination: str | bytes, body: bytes, extra=()) -> bytes:
    return stomp_frame(
        "SEND", [("destination", destination), ("content-type", "application/json"), *extra], body
    )


def connect_frame(token: str, rng: random.Random) -> bytes:
    headers = [
        ("accept-version", rng.choice(["1.2", "1.1,1.2", "1.0,1.1,1.2", "1.1", "1.0"])),
        ("ide", token),
        ("heart-beat", rng.choice(["0,0", "0,0", "10000,10000", "0,5000"])),
    ]
    if rng.random() < 0.3:
        headers.append(("host", rng.choice(["127.0.0.1", "appliance.local", ""])))
    rng.shuffle(headers)
    return stomp_frame(rng.choice(["CONNECT"] * 9 + ["STOMP"]), headers, length=False)


def depth_nest(depth: int, inner: str = "1") -> str:
    open_, close = ("[", "]") if depth % 2 else ('{"a":', "}")
    return open_ * depth + inner + close * depth


class Gen:
    """Makes a job's inputs from its own random stream: valid frames first, then mutations."""

    def __init__(self, rng: random.Random, tokens: Tokens, user: str, peer: str, call_id: str) -> None:
        self.r = rng
        self.tokens = tokens
        self.user = user
        self.peer = peer
        self.call_id = call_id
        self.sub_ids = itertools.count()

    # -------------------------------------------------------- valid

    def ids(self) -> list:
        r = self.r
        n = r.choice([1, 1, 2, 3, 5, 10, 50, 200])
        pool = [self.peer, self.user, *BYSTANDERS, "nobody", "张三"]
        return [r.choice(pool) if r.random() < 0.5 else r.choice(FUZZ_USERS) for _ in range(n)]

    def body(self, destination: str) -> object:
        r = self.r
        if destination == "/app/user/status":
            return self.ids()
        if destination == "/app/call/request":
            return {
                "callId": self.call_id,
                "type": r.choice(["VIDEO", "AUDIO"]),
                "callee": self.peer if r.random() < 0.8 else r.choice(FUZZ_USERS),
                "callerUserName": r.choice(["Alice", "爱丽丝", "A"]),
                "calleeUserName": "Bob",
            }
        if destination == "/app/call/response":
            return {"callId": self.call_id, "type": r.choice(["ACCEPT", "ACCEPT", "REJECT"])}
        if destination == "/app/call/hangup":
            return {"callId": self.call_id}
        if destination == "/app/rtc/signaling":
            kind = r.choice(["OFFER", "ANSWER", "ICE_CANDIDATE"])
            payload = (
                SDP
                if kind != "ICE_CANDIDATE"
                else {
                    "candidate": "candidate:1 1 udp 2122260223 127.0.0.1 54321 typ host",
                    "sdpMid": "0",
                    "sdpMLineIndex": 0,
                }
            )
            return {"callId": self.call_id, "type": kind, "payload": payload}
        return {}

    def valid_send(self, destination: str | None = None) -> bytes:
        destination = destination or self.r.choice(APP_DESTINATIONS)
        return send_frame(destination, json.dumps(self.body(destination), ensure_ascii=False).encode())

    def connect(self, good: bool = True) -> bytes:
        token = self.tokens.good(self.user) if good else self.tokens.bad(self.r, self.user)
        return connect_frame(token, self.r)

    def subscribe(self, destination: str | None = None) -> bytes:
        destination = destination or self.r.choice(SUBSCRIPTIONS)
        return stomp_frame(
            "SUBSCRIBE",
            [("id", f"s{next(self.sub_ids)}"), ("destination", destination), ("ack", "auto")],
            length=False,
        )

    # -------------------------------------------------------- mutations

    def fuzz_frame(self) -> tuple[bytes, str]:
        """One frame for a connected session, and its mutation class."""
        r = self.r
        x = r.random()
        destination = r.choice(APP_DESTINATIONS)
        if x < 0.50:
            return self.valid_send(destination), "valid"
        if x < 0.76:
            return send_frame(destination, self.mutated_json(self.body(destination))), "json"
        if x < 0.88:
            return self.header_mutation(destination), "header"
        if x < 0.94:
            return self.command_oddity(), "command"
        if x < 0.995:
            return self.mutate_bytes(self.valid_send(destination)), "bytes"
        return self.huge_frame(destination), "huge"

    def mutated_json(self, obj: object) -> bytes:
        r = self.r
        text = json.dumps(obj, ensure_ascii=False)
        kind = r.randrange(22)
        if kind == 0 and isinstance(obj, dict) and obj:
            obj = dict(obj)
            del obj[r.choice(list(obj))]
        elif kind == 1 and isinstance(obj, dict) and obj:
            obj = dict(obj)
            obj[r.choice(list(obj))] = r.choice(
                [
                    None,
                    0,
                    -1,
                    1.5,
                    True,
                    [],
                    {},
                    "",
                    " ",
                    "\u0000",
                    "x" * 101,
                    "x" * r.randint(1000, 20000),
                    ["a"],
                    {"callId": self.call_id},
                    2**64,
                    "\ud800",
                ]
            )
        elif kind == 2:
            return depth_nest(r.choice([31, 32, 33, 64, 1000, 20000])).encode()
        elif kind == 3 and isinstance(obj, dict):
            obj = dict(obj, payload=json.loads(depth_nest(r.choice([30, 31, 40]))))
        elif kind == 4:
            return text.encode()[: r.randrange(max(1, len(text.encode())))]
        elif kind == 5:
            data = bytearray(text.encode())
            for _ in range(r.randint(1, 4)):
                data.insert(r.randrange(len(data) + 1), r.choice([0x80, 0xC0, 0xFF, 0xFE, 0xED, 0xF4]))
            return bytes(data)
        elif kind == 6:
            return (
                text[:-1]
                + ', "n": '
                + r.choice(["NaN", "Infinity", "-Infinity", "1e999", "9" * 5000, "-0", "0.1e-999999"])
                + text[-1:]
            ).encode()
        elif kind == 7:
            return r.choice(
                [
                    b"",
                    b" ",
                    b"\n",
                    b"null",
                    b"[]",
                    b"{}",
                    b"true",
                    b'""',
                    b"0",
                    b"x",
                    b"\xef\xbb\xbf" + text.encode(),
                    text.encode() + b" trailing",
                    text.encode() + b"\x00junk",
                ]
            )
        elif kind == 8:
            return json.dumps([f"id-{i}" for i in range(r.choice([199, 200, 201, 1000, 5000]))]).encode()
        elif kind == 9:
            return json.dumps(
                [
                    r.choice(
                        [
                            "",
                            "a\nb",
                            "\u0000",
                            "x" * 129,
                            "\u2028",
                            "\u202eevil",
                            "😀" * 40,
                            "a\\nb",
                            5,
                            None,
                            ["x"],
                            {"a": 1},
                        ]
                    )
                    for _ in range(r.randint(1, 20))
                ]
            ).encode()
        elif kind == 10 and isinstance(obj, dict):
            pairs = ", ".join(f'"{k}": {json.dumps(v)}' for k, v in obj.items())
            return ("{" + pairs + ", " + pairs.replace(self.call_id, "other") + "}").encode()
        elif kind == 11:
            return json.dumps({f"k{i}": i for i in range(r.choice([100, 5000]))}).encode()
        elif kind == 12:
            return text.replace('"', "'").encode()
        elif kind == 13:
            return json.dumps(obj, ensure_ascii=True).replace("\\u", "\\ud800\\u").encode()
        elif kind == 14 and isinstance(obj, dict):
            obj = dict(obj, type=r.choice(["video", "", "OFFER", "ACCEPT", "HANGUP", "\u0000", 7]))
        elif kind == 15 and isinstance(obj, dict):
            obj = dict(
                obj,
                callId=r.choice(
                    [
                        "",
                        " ",
                        "x" * 100,
                        "x" * 101,
                        "c-shared",
                        "\n",
                        "呼叫",
                        None,
                        42,
                        self.call_id + "\u0000",
                    ]
                ),
            )
        elif kind == 16 and isinstance(obj, dict):
            obj = dict(
                obj, callee=r.choice([self.user, "", "nobody", "x" * 129, "a\nb", None, self.peer.upper()])
            )
        elif kind == 17 and isinstance(obj, dict):
            obj = dict(
                obj,
                payload=r.choice(
                    [None, "", 5, [], {"candidate": None}, {"candidate": "x" * 60000}, "x" * 60000]
                ),
            )
        elif kind == 18:
            return (text * r.randint(2, 5)).encode()
        elif kind == 19:
            return b"[" + b",".join([b'"fz001"'] * r.choice([200, 201])) + b"]"
        elif kind == 20:
            return bytes(r.getrandbits(8) for _ in range(r.randint(1, 200)))
        else:
            obj = [obj] if r.random() < 0.5 else {"wrapped": obj}
        return json.dumps(obj, ensure_ascii=r.random() < 0.3).encode("utf-8", "surrogatepass")

    def header_mutation(self, destination: str) -> bytes:
        r = self.r
        body = json.dumps(self.body(destination), ensure_ascii=False).encode()
        base = [("destination", destination), ("content-type", "application/json")]
        kind = r.randrange(20)
        n = len(body)
        if kind == 0:
            return stomp_frame(
                "SEND",
                base + [("content-length", str(n)), ("content-length", str(n + 7))],
                body,
                length=False,
            )
        if kind == 1:
            return stomp_frame(
                "SEND",
                base + [("content-length", str(r.randint(0, n + 50))), ("content-length", str(n))],
                body,
                length=False,
            )
        if kind == 2:
            return stomp_frame(
                "SEND", base + [("content-length", str(max(0, n - r.randint(1, 10))))], body, length=False
            )
        if kind == 3:
            return stomp_frame(
                "SEND",
                base + [("content-length", str(n + r.choice([1, 2, 10, 100, 60000])))],
                body,
                length=False,
            )
        if kind == 4:
            return stomp_frame(
                "SEND",
                base
                + [
                    (
                        "content-length",
                        r.choice(
                            ["-1", "+5", " 5", "5 ", "1e3", "0x10", "99999999999", "٣", "", "abc", "9" * 30]
                        ),
                    )
                ],
                body,
                length=False,
            )
        if kind == 5:
            return stomp_frame("SEND", base, body.replace(b",", b",\x00", 1), length=False)
        if kind == 6:
            return stomp_frame(
                "SEND", [("destination", destination + r.choice(["\r", "\rx", "\r\r"]))] + base[1:], body
            )
        if kind == 7:
            return stomp_frame(
                "SEND",
                [("destination", destination + "\ncontent-length:0")] + base[1:],
                body,
                length=r.random() < 0.5,
            )
        if kind == 8:
            return stomp_frame("SEND", base + [("x-nul", "a\x00b")], body)
        if kind == 9:
            return stomp_frame(
                "SEND",
                base + [("x-esc", r.choice(["\\c", "\\n", "\\r", "\\\\", "\\t", "a\\", "\\", "\\x41"]))],
                body,
            )
        if kind == 10:
            size = r.choice([1000, 8100, 8185, 8186, 8192, 8193, 20000])
            return stomp_frame("SEND", base + [("x-big", "v" * size)], body)
        if kind == 11:
            count = r.choice([10, 61, 62, 63, 64, 65, 500])
            return stomp_frame("SEND", base + [(f"x-h{i}", str(i)) for i in range(count)], body)
        if kind == 12:
            return stomp_frame("SEND", base + [("destination", "/app/nowhere")], body)
        if kind == 13:
            return stomp_frame("SEND", [("destination", "/topic/user/status")] + base, body)
        if kind == 14:
            return stomp_frame("SEND", base, body).replace(
                b"content-type:", r.choice([b"content-type", b":content-type:", b"content type:"]), 1
            )
        if kind == 15:
            return stomp_frame("SEND", base + [("x-bytes", b"\xff\xfe\xc0\xaf")], body)
        if kind == 16:
            return stomp_frame("SEND", base + [("receipt", f"r-{r.randrange(1000)}")], body)
        if kind == 17:
            return stomp_frame("SEND", base, body).replace(b"\n", b"\r\n")
        if kind == 18:
            return stomp_frame("SEND", [("Destination", destination)] + base[1:], body)
        return stomp_frame(
            "SEND",
            [
                (
                    "destination",
                    r.choice(
                        [
                            "",
                            "/app/",
                            "/app",
                            "/app/user/status/",
                            "/app/../app/user/status",
                            "/APP/user/status",
                            "/app/" + "x" * 5000,
                            "/app/\u5f20\u4e09",
                            "/app/user/status\\c",
                            "/user/queue/errors",
                        ]
                    ),
                )
            ]
            + base[1:],
            body,
        )

    def command_oddity(self) -> bytes:
        r = self.r
        kind = r.randrange(16)
        if kind == 0:
            return stomp_frame(
                r.choice(
                    [
                        "send",
                        "SENDX",
                        "MESSAGE",
                        "ERROR",
                        "CONNECTED",
                        "RECEIPT",
                        "GET / HTTP/1.1",
                        "\u00a0SEND",
                        "SEND ",
                        "SEND\r",
                    ]
                ),
                [("destination", "/app/user/status")],
                b"[]",
            )
        if kind == 1:
            return self.connect(good=r.random() < 0.5)  # already connected
        if kind == 2:
            return stomp_frame(
                r.choice(["ACK", "NACK"]), [("id", r.choice(["1", "", "x" * 300]))], length=False
            )
        if kind == 3:
            return stomp_frame(
                r.choice(["BEGIN", "COMMIT", "ABORT"]),
                [("transaction", "t1")] if r.random() < 0.7 else [],
                length=False,
            )
        if kind == 4:
            return stomp_frame(
                "UNSUBSCRIBE",
                [("id", r.choice(["s0", "s999", ""]))] if r.random() < 0.8 else [],
                length=False,
            )
        if kind == 5:
            return stomp_frame(
                "SUBSCRIBE", [("id", "s0"), ("destination", "/topic/user/status")], length=False
            )
        if kind == 6:
            return stomp_frame("SUBSCRIBE", [("destination", "/user/queue/errors")], length=False)
        if kind == 7:
            return stomp_frame(
                "SUBSCRIBE",
                [
                    ("id", f"w{r.randrange(10**6)}"),
                    (
                        "destination",
                        r.choice(
                            [
                                "",
                                "/topic/other",
                                "/user/queue/../errors",
                                "/app/user/status",
                                "/user/" + self.peer + "/queue/x",
                                "/user/queue/" + "x" * 3000,
                                "/topic/user/status\\n",
                            ]
                        ),
                    ),
                ],
                length=False,
            )
        if kind == 8:
            return b"".join(
                stomp_frame(
                    "SUBSCRIBE",
                    [("id", f"m{r.randrange(10**6)}-{i}"), ("destination", "/user/queue/errors")],
                    length=False,
                )
                for i in range(r.choice([20, 101]))
            )
        if kind == 9:
            return r.choice(
                [b"\n", b"\r\n", b"\n" * 1000, b"\r\n" * 50, b"\r", b"\n\r", b"\x00", b"\x00" * 100, b" "]
            )
        if kind == 10:
            return stomp_frame("DISCONNECT", [("receipt", "bye")] if r.random() < 0.7 else [], length=False)
        if kind == 11:
            return stomp_frame("SEND", [("destination", "/app/user/status")], b"[]", length=False)[:-1]
        if kind == 12:
            return b'SEND\ndestination:/app/user/status\n\n["fz001"]'  # no NUL: swallows what follows
        if kind == 13:
            return self.valid_send() + self.valid_send()[: r.randint(1, 30)]
        if kind == 14:
            return stomp_frame(
                "SEND", [("destination", "/app/user/status"), ("transaction", "t1")], b'["fz001"]'
            )
        return b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + self.r.randbytes(40)

    def mutate_bytes(self, data: bytes) -> bytes:
        r = self.r
        out = bytearray(data)
        for _ in range(r.randint(1, 4)):
            if not out:
                out += r.randbytes(r.randint(1, 10))
            op = r.randrange(11)
            i = r.randrange(len(out))
            if op == 0:
                out[i] ^= 1 << r.randrange(8)
            elif op == 1:
                out[i] = r.getrandbits(8)
            elif op == 2:
                out[i:i] = r.randbytes(r.randint(1, 16))
            elif op == 3:
                del out[i : i + r.randint(1, 16)]
            elif op == 4:
                out[i:i] = out[i : i + r.randint(1, 64)]
            elif op == 5:
                del out[i:]
            elif op == 6:
                out[i:i] = b"\x00"
            elif op == 7:
                out = bytearray(
                    bytes(out).replace(b"\n", r.choice([b"\r\n", b"\r", b"\n\n"]), r.randint(1, 3))
                )
            elif op == 8:
                out[0:0] = r.choice([b"\n", b"\r\n", b"\xef\xbb\xbf", r.randbytes(4), b"\x00"])
            elif op == 9:
                out += r.choice([b"\n", b"garbage", r.randbytes(8), b"\x00\x00"])
            else:
                j = r.randrange(len(out))
                out[i], out[j] = out[j], out[i]
        return bytes(out)

    def huge_frame(self, destination: str) -> bytes:
        r = self.r
        size = r.choice([60000, 65400, 65536, 70000, 300000, 1_100_000])
        if r.random() < 0.5:
            body = json.dumps({"callId": self.call_id, "type": "OFFER", "payload": "v" * size}).encode()
        else:
            body = json.dumps([f"user-{i:07d}" for i in range(size // 15)]).encode()
        return send_frame(destination, body)


# ------------------------------------------------------------------ SockJS envelopes


def envelope(frames: list[bytes], rng: random.Random) -> bytes:
    """The frames as a SockJS client sends them: a JSON array of strings (or one string)."""
    texts, clean = [], True
    for frame in frames:
        try:
            texts.append(frame.decode("utf-8"))
        except UnicodeDecodeError:  # its bytes travel as lone surrogates, \udcXX
            texts.append(frame.decode("utf-8", "surrogateescape"))
            clean = False
    value: object = texts[0] if len(texts) == 1 and rng.random() < 0.1 else texts
    ascii_only = not clean or rng.random() < 0.5
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


def junk_envelope(rng: random.Random, frames: list[bytes]) -> bytes:
    """A SockJS payload that is not a JSON array of strings, or is one but monstrous."""
    good = envelope(frames, rng)
    kind = rng.randrange(18)
    return [
        b"",
        b"xyz",
        good[:-1],
        b"[" + good + b"]",
        b"[" * rng.choice([2, 100, 100000]),
        b'[1, null, {}, ["a"]]',
        b'"' + b"x" * rng.choice([100, 70000, 1_000_000]) + b'"',
        b"["
        + b",".join(
            [json.dumps(send_frame("/app/user/status", b'["fz001"]').decode()).encode()]
            * rng.choice([50, 1000])
        )
        + b"]",
        b"\xff\xfe" + good,
        b'["\\ud800\\udc00\\ud800"]',
        b"\xef\xbb\xbf" + good,
        b"null",
        b"{}",
        good + b"garbage",
        good + b"\x00",
        b'["a", ' * 2000 + b'"b"' + b"]" * 2000,
        b'["' + b"\\" * 1001 + b'"]',
        b"[" + b'"x",' * 200000 + b'"x"]',
    ][kind]


# ------------------------------------------------------------------ the wire, recorded


class Tape:
    """What one job wrote, connection by connection, in order: enough to replay it."""

    def __init__(self) -> None:
        self.steps: list[list] = []  # [connection, source, delay_s, op, data]
        self.last = time.monotonic()
        self.numbers = itertools.count()

    def add(self, conn: int, source: str, op: str, data: bytes = b"") -> None:
        now = time.monotonic()
        self.steps.append([conn, source, round(min(now - self.last, 1.0), 3), op, data])
        self.last = now


class Closed(Exception):
    """The server closed the connection (or it broke) under a job."""


class Conn:
    """One TCP connection to the signaling port from `source`; every write taped."""

    def __init__(self, tape: Tape, source: str, port: int, rcvbuf: int | None = None) -> None:
        self.tape = tape
        self.no = next(tape.numbers)
        self.source = source
        self.port = port
        self.rcvbuf = rcvbuf
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.buf = bytearray()
        self.closed = False

    async def open(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if self.rcvbuf:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
            sock.bind((self.source, 0))
            sock.setblocking(False)
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (HOST, self.port)), 5.0)
        except BaseException:
            sock.close()
            raise
        self.reader, self.writer = await asyncio.open_connection(sock=sock, limit=1 << 20)

    async def write(self, data: bytes) -> None:
        if self.closed or self.writer is None or self.writer.is_closing():
            raise Closed("write after close")
        self.tape.add(self.no, self.source, "write", data)
        try:
            self.writer.write(data)
            await asyncio.wait_for(self.writer.drain(), WRITE_TIMEOUT_S)
        except (TimeoutError, OSError) as exc:
            raise Closed(f"write: {type(exc).__name__}") from None

    async def read_some(self, timeout: float = READ_TIMEOUT_S) -> bytes:
        if self.buf:
            data = bytes(self.buf)
            self.buf.clear()
            return data
        return await self._read(timeout)

    async def read_exactly(self, n: int, timeout: float = READ_TIMEOUT_S) -> bytes:
        while len(self.buf) < n:
            self.buf += await self._read(timeout)
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def read_until(self, marker: bytes, limit: int, timeout: float = READ_TIMEOUT_S) -> bytes:
        while True:
            i = self.buf.find(marker)
            if i >= 0:
                out = bytes(self.buf[: i + len(marker)])
                del self.buf[: i + len(marker)]
                return out
            if len(self.buf) > limit:
                raise Closed("line too long")
            self.buf += await self._read(timeout)

    async def _read(self, timeout: float) -> bytes:
        try:
            data = await asyncio.wait_for(self.reader.read(1 << 16), timeout)
        except OSError as exc:
            raise Closed(f"read: {type(exc).__name__}") from None
        if not data:
            raise Closed("eof")
        return data

    def close(self, rst: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        if self.writer is None:
            return
        self.tape.add(self.no, self.source, "rst" if rst else "fin")
        if rst:
            with contextlib.suppress(OSError, AttributeError):
                self.writer.get_extra_info("socket").setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
            self.writer.transport.abort()
        else:
            self.writer.close()


# ------------------------------------------------------------------ WebSocket, our own framing


def xor_mask(data: bytes, key: bytes) -> bytes:
    if not data:
        return data
    n = len(data)
    pad = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(pad, "little")).to_bytes(n, "little")


def ws_frame(
    opcode: int,
    payload: bytes,
    fin: bool = True,
    rsv: int = 0,
    mask: bool = True,
    key: bytes | None = None,
    declared: int | None = None,
) -> bytes:
    n = len(payload) if declared is None else declared
    head = bytes([(0x80 if fin else 0) | (rsv & 7) << 4 | (opcode & 0xF)])
    bit = 0x80 if mask else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 65536:
        head += bytes([bit | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([bit | 127]) + (n & (2**64 - 1)).to_bytes(8, "big")
    if mask:
        key = key if key is not None else os.urandom(4)
        return head + key + xor_mask(payload, key)
    return head + payload


def ws_handshake(
    path: str | bytes, protocols: list[str] | None, extra: list[bytes] = (), key: str | None = None
) -> bytes:
    key = key or base64.b64encode(os.urandom(16)).decode()
    lines = [
        b"GET " + b(path) + b" HTTP/1.1",
        b"Host: 127.0.0.1",
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Key: " + key.encode(),
        b"Sec-WebSocket-Version: 13",
    ]
    if protocols:
        lines.append(b"Sec-WebSocket-Protocol: " + ", ".join(protocols).encode())
    lines += list(extra)
    return b"\r\n".join(lines) + b"\r\n\r\n"


def status_of(head: bytes) -> int:
    try:
        return int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return 0


class WebSocket:
    """A client WebSocket over a Conn: frames of any shape out, the server's messages in."""

    def __init__(self, conn: Conn, rng: random.Random) -> None:
        self.conn = conn
        self.rng = rng

    async def handshake(self, request: bytes) -> int:
        await self.conn.write(request)
        head = await self.conn.read_until(b"\r\n\r\n", 1 << 16)
        return status_of(head)

    def key(self) -> bytes:
        return self.rng.choice([b"\x00\x00\x00\x00", self.rng.randbytes(4), self.rng.randbytes(4)])

    async def send(self, opcode: int, payload: bytes, fin: bool = True) -> None:
        await self.conn.write(ws_frame(opcode, payload, fin=fin, key=self.key()))

    async def send_message(self, data: bytes, text: bool) -> None:
        """One message, now and then in fragments (a ping between them)."""
        opcode = OP_TEXT if text else OP_BINARY
        r = self.rng
        if len(data) < 2 or r.random() < 0.9:
            await self.send(opcode, data)
            return
        cuts = sorted(r.sample(range(1, len(data)), min(len(data) - 1, r.randint(1, 5))))
        pieces = [data[i:j] for i, j in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        out = b""
        for k, piece in enumerate(pieces):
            out += ws_frame(opcode if k == 0 else OP_CONT, piece, fin=k == len(pieces) - 1, key=self.key())
            if r.random() < 0.2 and k < len(pieces) - 1:
                out += ws_frame(OP_PING, b"p", key=self.key())
        await self.conn.write(out)

    async def recv(self, timeout: float) -> tuple[int, bytes]:
        """The next message (opcode, payload), whole; control frames too."""
        message, opcode = b"", None
        while True:
            b0, b1 = await self.conn.read_exactly(2, timeout)
            n = b1 & 0x7F
            if n == 126:
                n = int.from_bytes(await self.conn.read_exactly(2, timeout), "big")
            elif n == 127:
                n = int.from_bytes(await self.conn.read_exactly(8, timeout), "big")
            if n > 1 << 26:
                raise Closed(f"server frame of {n} bytes")
            if b1 & 0x80:
                await self.conn.read_exactly(4, timeout)  # servers do not mask; tolerate it
            payload = await self.conn.read_exactly(n, timeout) if n else b""
            op = b0 & 0x0F
            if op >= OP_CLOSE:
                return op, payload
            if op != OP_CONT:
                opcode = op
            message += payload
            if b0 & 0x80:
                return opcode if opcode is not None else OP_BINARY, message


# ------------------------------------------------------------------ STOMP clients over each transport


class Job:
    """One job's bookkeeping: its tape, connections, counts and what the server said."""

    def __init__(self, index: int, kind: str, seed: int, port: int, tokens: Tokens, batch: int) -> None:
        self.index = index
        self.kind = kind
        self.seed = seed
        self.port = port
        self.tokens = tokens
        self.batch = batch
        self.rng = random.Random(seed)
        self.tape = Tape()
        self.conns: list[Conn] = []
        self.frames = Counter()  # mutation class -> frames written
        self.transport_frames = Counter()  # transport -> frames written
        self.after_end = 0  # frames written after the server's ERROR/close
        self.refused = 0  # handshakes and requests refused with 429/503
        self.statuses = Counter()  # HTTP statuses of handshakes and SockJS requests
        self.server = Counter()  # what came back: CONNECTED, MESSAGE, ERROR, ...
        self.planned = 0
        self.tasks: list[asyncio.Task] = []
        self.clients: list[Client] = []
        self.odd: list[str] = []  # what the server sent that was no STOMP frame
        self.started = 0.0
        self.finished = 0.0

    def conn(self, source: str, rcvbuf: int | None = None) -> Conn:
        c = Conn(self.tape, source, self.port, rcvbuf)
        self.conns.append(c)
        return c

    def count(self, transport: str, cls: str, n: int = 1, ended: bool = False) -> None:
        self.frames[cls] += n
        self.transport_frames[transport] += n
        if ended:
            self.after_end += n

    @property
    def total(self) -> int:
        return sum(self.frames.values())

    def close_all(self) -> None:
        for c in self.conns:
            c.close(rst=self.rng.random() < 0.3)
        for task in self.tasks:
            task.cancel()


class Client:
    """One STOMP client as a job drives it, whatever carries it."""

    transport = "?"

    def __init__(
        self,
        job: Job,
        source: str,
        user: str | None,
        url_user: str | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.job = job
        self.r = rng if rng is not None else job.rng
        self.source = source
        self.user = user
        self.url_user = user if url_user is None else url_user
        self.ended = False  # the server sent ERROR, or hung up
        self.gone = asyncio.Event()  # the server hung up (close frame, c[...], EOF)
        self.recent: deque[str] = deque(maxlen=48)
        self.activity = asyncio.Event()
        self.tasks: list[asyncio.Task] = []
        self.conns: list[Conn] = []
        self.odd_origins = False  # SockJS requests may carry odd Origin headers
        self.opened_at = time.time()
        self.closed_at: float | None = None
        job.clients.append(self)

    def new_conn(self, rcvbuf: int | None = None) -> Conn:
        conn = self.job.conn(self.source, rcvbuf)
        self.conns.append(conn)
        return conn

    def query(self) -> str:
        r = self.r
        if self.url_user is None or r.random() < 0.03:
            return r.choice([*ODD_USER_QUERIES, "?" + "a=1&" * 2000, "?userId=" + urllib.parse.quote("张三")])
        return "?userId=" + urllib.parse.quote(self.url_user, safe="")

    def heard(self, text: str) -> None:
        command = text.split("\n", 1)[0] if text != "\n" else "heart-beat"
        if command not in SERVER_FRAMES:
            command = "other"
            if len(self.job.odd) < 2:  # not a STOMP frame: worth a look
                self.job.odd.append(f"{self.transport} {text[:120]!r}")
        self.job.server[command] += 1
        self.recent.append(text[:2048])
        if command == "ERROR":
            self.ended = True
        self.activity.set()

    def note(self, status: int) -> None:
        """The HTTP status of a handshake or SockJS request: counted, and refusals too."""
        self.job.statuses[status] += 1
        if status in (429, 503):
            self.job.refused += 1

    def hung_up(self) -> None:
        self.ended = True
        self.gone.set()
        self.activity.set()

    async def wait_for(self, needle: str, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if any(needle in m for m in self.recent):
                return True
            left = deadline - loop.time()
            if self.ended or left <= 0:
                return False
            self.activity.clear()
            try:
                await asyncio.wait_for(self.activity.wait(), left)
            except TimeoutError:
                return False

    def spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.append(task)
        self.job.tasks.append(task)

    async def open(self) -> bool:
        raise NotImplementedError

    async def send(self, frames: list[bytes]) -> None:
        raise NotImplementedError

    async def junk(self) -> None:
        """One transport-level junk message (counted as a frame)."""
        raise NotImplementedError

    async def finish(self) -> None:
        self.closed_at = time.time()
        for conn in self.conns:
            conn.close(rst=self.r.random() < 0.3)
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


class NativeWs(Client):
    transport = "ws"

    def __init__(self, *args, rcvbuf: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.conn = self.new_conn(rcvbuf)
        self.ws = WebSocket(self.conn, self.r)
        self.deaf = rcvbuf is not None

    def path(self) -> str:
        return f"{PREFIX}/ws{self.query()}"

    def protocols(self) -> list[str] | None:
        return self.r.choice([["v10.stomp", "v11.stomp", "v12.stomp"], ["v12.stomp"], ["v11.stomp"], None])

    async def open(self, request: bytes | None = None) -> bool:
        await self.conn.open()
        status = await self.ws.handshake(request or ws_handshake(self.path(), self.protocols()))
        self.note(status)
        if status != 101:
            self.conn.close()
            return False
        if not self.deaf:
            self.spawn(self._read())
        return True

    async def _read(self) -> None:
        try:
            while True:
                op, payload = await self.ws.recv(3600)
                if op in (OP_TEXT, OP_BINARY):
                    self.heard_message(payload.decode("utf-8", "replace"))
                elif op == OP_CLOSE:
                    self.job.server["ws-close"] += 1
                    self.hung_up()
                    with contextlib.suppress(Closed):
                        await self.ws.send(OP_CLOSE, payload[:2])
                    return
                elif op == OP_PING:
                    with contextlib.suppress(Closed):
                        await self.ws.send(OP_PONG, payload)
        except (TimeoutError, Closed):
            self.hung_up()

    def heard_message(self, text: str) -> None:
        """A text or binary message from the server: one STOMP frame here, SockJS frames
        on SockJsWs."""
        self.heard(text)

    async def send(self, frames: list[bytes]) -> None:
        r = self.r
        data = b"".join(frames)
        if r.random() < 0.05:
            data = b"\n" * r.randint(1, 3) + data  # heart-beats between frames
        mode = r.random()
        if mode < 0.75:
            await self._message(data)
        elif mode < 0.85:
            await self.ws.send_message(data, text=False)
        else:  # split over several messages
            cuts = (
                sorted(r.sample(range(1, len(data)), min(len(data) - 1, r.randint(1, 6))))
                if len(data) > 1
                else []
            )
            for i, j in zip([0, *cuts], [*cuts, len(data)], strict=True):
                await self._message(data[i:j])

    async def _message(self, data: bytes) -> None:
        try:
            data.decode("utf-8")
            text = True
        except UnicodeDecodeError:
            text = self.r.random() < 0.1  # invalid UTF-8 as text: 1007
        await self.ws.send_message(data, text=text)

    async def junk(self) -> None:
        await self.conn.write(ws_junk(self.r))

    async def finish(self) -> None:
        r = self.r
        how = r.random()
        try:
            if how < 0.4 and not self.ended:
                await self.send([stomp_frame("DISCONNECT", [("receipt", "bye")], length=False)])
                await self.wait_for("RECEIPT", 2.0)
            if how < 0.8:
                await self.ws.send(OP_CLOSE, struct.pack("!H", 1000))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.gone.wait(), 2.0)
        except Closed:
            pass
        self.conn.close(rst=how >= 0.9)
        await super().finish()


def ws_junk(r: random.Random) -> bytes:
    """A WebSocket frame (or a few) breaking RFC 6455 one way or another."""
    key = r.randbytes(4)
    kind = r.randrange(16)
    if kind == 0:
        return ws_frame(r.choice([3, 4, 5, 6, 7, 11, 12, 13, 14, 15]), b"x", key=key)
    if kind == 1:
        return ws_frame(OP_TEXT, b"\n", rsv=r.randint(1, 7), key=key)
    if kind == 2:
        return ws_frame(OP_TEXT, b"\n", mask=False)
    if kind == 3:
        return ws_frame(OP_PING, b"p" * 126, key=key)
    if kind == 4:
        return ws_frame(OP_PING, b"p", fin=False, key=key)
    if kind == 5:
        return ws_frame(OP_CONT, b"\n", key=key)
    if kind == 6:
        return ws_frame(OP_TEXT, b"SEND\n", fin=False, key=key) + ws_frame(OP_TEXT, b"x", key=key)
    if kind == 7:
        code = r.choice([0, 999, 1004, 1005, 1006, 1015, 2999, 5000, 65535])
        return ws_frame(OP_CLOSE, struct.pack("!H", code), key=key)
    if kind == 8:
        return ws_frame(
            OP_CLOSE, struct.pack("!H", 1000) + r.choice([b"\xff\xfe", b"x" * 123, b"\xc0\x80"]), key=key
        )
    if kind == 9:
        return ws_frame(OP_CLOSE, b"\x03", key=key)
    if kind == 10:
        return ws_frame(OP_TEXT, b"", declared=2**63 + 5, key=key)
    if kind == 11:
        return bytes([0x81, 0x80 | 126, 0, 5]) + key + xor_mask(b"\n\n\n\n\n", key)  # non-minimal length
    if kind == 12:
        return b"".join(ws_frame(OP_PING, b"%d" % i, key=key) for i in range(r.choice([10, 200])))
    if kind == 13:
        return b"".join(
            ws_frame(OP_TEXT if i == 0 else OP_CONT, b"\n", fin=i == 999, key=key) for i in range(1000)
        )
    if kind == 14:
        return ws_frame(OP_PONG, r.randbytes(20), key=key)
    return ws_frame(OP_TEXT, b"", key=key)


class SockJsWs(NativeWs):
    transport = "sockjs-ws"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.session = f"w{self.job.batch}x{self.job.index}x{self.r.getrandbits(24):x}"

    def path(self) -> str:
        server = self.r.choice(["000", "123", "999", "a"])
        return f"{PREFIX}/ws/{server}/{self.session}/websocket{self.query()}"

    def protocols(self) -> list[str] | None:
        return None

    def heard_message(self, text: str) -> None:
        heard_sockjs(self, text)

    async def send(self, frames: list[bytes]) -> None:
        r = self.r
        if r.random() < 0.08 and len(frames) == 1 and len(frames[0]) > 2:  # one frame over two messages
            cut = r.randrange(1, len(frames[0]))
            messages = [envelope([frames[0][:cut]], r), envelope([frames[0][cut:]], r)]
        else:
            messages = [envelope(frames, r)]
        for message in messages:
            await self.ws.send_message(message, text=r.random() < 0.95)

    async def junk(self) -> None:
        if self.r.random() < 0.3:
            await self.conn.write(ws_junk(self.r))
        else:
            await self.ws.send_message(junk_envelope(self.r, [self.job_frame()]), text=self.r.random() < 0.7)

    def job_frame(self) -> bytes:
        return send_frame("/app/user/status", b'["fz001"]')


def heard_sockjs(client: Client, text: str) -> None:
    """A SockJS frame from the server: o, h, a[...] (STOMP frames) or c[...]."""
    for line in text.split("\n"):
        if not line:
            continue
        if line.startswith("a["):
            try:
                messages = json.loads(line[1:])
            except ValueError:
                client.job.server["bad-sockjs-frame"] += 1
                continue
            for m in messages:
                client.heard(m)
        elif line.startswith("c["):
            client.job.server["sockjs-close"] += 1
            client.recent.append(line)
            client.hung_up()
        elif line in ("o", "h") or set(line) == {"h"}:
            client.job.server[f"sockjs-{line[:1]}"] += 1
            client.recent.append(line[:1])
            client.activity.set()


def http_request(
    method: str, path: str | bytes, body: bytes = b"", headers: list[bytes] = (), length: bool = True
) -> bytes:
    lines = [b(method) + b" " + b(path) + b" HTTP/1.1", b"Host: 127.0.0.1"] + list(headers)
    if length:
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


async def read_response(conn: Conn, timeout: float, on_chunk=None) -> tuple[int, bytes]:
    """(status, body) of one HTTP/1.1 response; a chunked body is handed to `on_chunk`
    piece by piece as it arrives (a stream), or returned whole."""
    head = await conn.read_until(b"\r\n\r\n", 1 << 16, timeout)
    status = status_of(head)
    fields = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        fields[name.strip().lower()] = value.strip().lower()
    if status in (204, 304) or 100 <= status < 200:
        return status, b""
    if fields.get(b"transfer-encoding") == b"chunked":
        body = bytearray()
        while True:
            size_line = await conn.read_until(b"\r\n", 1024, timeout)
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                await conn.read_until(b"\r\n", 1 << 16, timeout)
                return status, bytes(body)
            chunk = (await conn.read_exactly(size + 2, timeout))[:-2]
            if on_chunk is not None:
                on_chunk(chunk)
            elif len(body) < 1 << 20:
                body += chunk
    if b"content-length" in fields:
        n = int(fields[b"content-length"])
        return status, await conn.read_exactly(n, timeout) if n else b""
    body = bytearray()
    with contextlib.suppress(Closed):
        while len(body) < 1 << 20:
            body += await conn.read_some(timeout)
    return status, bytes(body)


class SockJsXhr(Client):
    """xhr_send for what the client sends; the receiver polls (xhr), streams (xhr_streaming,
    eventsource) or never comes back after the open frame (none)."""

    transport = "sockjs-xhr"

    def __init__(self, *args, receiver: str = "xhr", rcvbuf: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.receiver = receiver
        self.rcvbuf = rcvbuf
        self.session = f"x{self.job.batch}x{self.job.index}x{self.r.getrandbits(24):x}"
        self.base = f"{PREFIX}/ws/{self.r.choice(['000', '042', '999'])}/{self.session}"
        self.sender: Conn | None = None

    def origin(self) -> list[bytes]:
        """No Origin (as every non-browser client), or now and then an odd one."""
        if not self.odd_origins or self.r.random() < 0.97:
            return []
        return [
            self.r.choice(
                [
                    b"Origin: http://127.0.0.1",
                    b"Origin: null",
                    b"Origin: https://evil.example",
                    b"Origin: http://" + b"o" * 3000,
                    b"Origin: \xff\xfe",
                ]
            )
        ]

    async def open(self) -> bool:
        conn = self.new_conn(self.rcvbuf)
        await conn.open()
        if self.receiver == "deaf-stream":  # a stream nobody reads
            await conn.write(http_request("POST", f"{self.base}/xhr_streaming{self.query()}"))
            await asyncio.sleep(0.2)
            return True
        kind = self.receiver if self.receiver != "none" else "xhr"
        if kind == "eventsource":
            request = http_request("GET", f"{self.base}/eventsource{self.query()}", length=False)
        else:
            request = http_request("POST", f"{self.base}/{kind}{self.query()}", headers=self.origin())
        await conn.write(request)
        if self.receiver in ("none", "xhr"):
            status, body = await read_response(conn, READ_TIMEOUT_S)
            self.note(status)
            if status != 200:
                return False
            heard_sockjs(self, body.decode("utf-8", "replace"))
            if self.receiver == "xhr":
                self.spawn(self._poll(conn))
            return True
        self.spawn(self._stream(conn))
        return await self.wait_for("o", READ_TIMEOUT_S) and not self.ended

    async def _poll(self, conn: Conn) -> None:
        try:
            while not self.ended:
                await conn.write(http_request("POST", f"{self.base}/xhr", headers=self.origin()))
                status, body = await read_response(conn, 60)
                self.note(status)
                if status != 200:
                    break
                heard_sockjs(self, body.decode("utf-8", "replace"))
        except (TimeoutError, Closed, ValueError):
            pass
        self.hung_up()

    async def _stream(self, conn: Conn) -> None:
        pending = bytearray()

        def on_chunk(chunk: bytes) -> None:
            pending.extend(chunk)
            cut = pending.rfind(b"\n")
            if cut >= 0:
                text = pending[: cut + 1].decode("utf-8", "replace")
                del pending[: cut + 1]
                if self.receiver == "eventsource":
                    text = "\n".join(line[6:] for line in text.split("\r\n") if line.startswith("data: "))
                heard_sockjs(self, text)

        try:
            status, _ = await read_response(conn, 60, on_chunk)
            self.note(status)
        except (TimeoutError, Closed, ValueError):
            pass
        self.hung_up()

    async def _sender(self) -> Conn:
        if self.sender is None or self.sender.closed:
            self.sender = self.new_conn()
            await self.sender.open()
        return self.sender

    async def post(self, body: bytes, headers: list[bytes] = (), length: bool = True) -> int:
        conn = await self._sender()
        await conn.write(
            http_request("POST", f"{self.base}/xhr_send", body, [*self.origin(), *headers], length)
        )
        try:
            status, _ = await read_response(conn, READ_TIMEOUT_S)
        except (TimeoutError, Closed, ValueError):
            conn.close()
            return 0
        self.note(status)
        if status == 404:
            self.hung_up()  # the session is gone
        return status

    async def send(self, frames: list[bytes]) -> None:
        r = self.r
        body = envelope(frames, r)
        x = r.random()
        if x < 0.9:
            await self.post(body, [b"Content-Type: text/plain;charset=UTF-8"])
        elif x < 0.95:
            chunked = b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"
            await self.post(chunked, [b"Transfer-Encoding: chunked"], length=False)
        else:
            await self.post(body, [b"Content-Length: %d" % len(body)])  # the same length twice

    async def junk(self) -> None:
        await self.post(junk_envelope(self.r, [send_frame("/app/user/status", b'["fz001"]')]))


TRANSPORTS = {
    "ws": NativeWs,
    "sockjs-ws": SockJsWs,
    "xhr": SockJsXhr,
    "xhr_streaming": SockJsXhr,
    "eventsource": SockJsXhr,
}


def make_client(
    job: Job,
    transport: str,
    source: str,
    user: str | None,
    url_user: str | None = None,
    rcvbuf: int | None = None,
    rng: random.Random | None = None,
) -> Client:
    if transport in ("xhr", "xhr_streaming", "eventsource", "none", "deaf-stream"):
        return SockJsXhr(job, source, user, url_user, rng, receiver=transport, rcvbuf=rcvbuf)
    return TRANSPORTS[transport](job, source, user, url_user, rng, rcvbuf=rcvbuf)


# ------------------------------------------------------------------ jobs


def pick_source(r: random.Random) -> str:
    return r.choice(EXEMPT_SOURCES) if r.random() < 0.5 else r.choice(CAPPED_SOURCES)


def subscriptions_for(role: str, r: random.Random) -> list[str]:
    if role == "caller":
        return [
            "/user/queue/errors",
            "/user/queue/call/response",
            "/user/queue/rtc/signaling",
            "/user/queue/call/hangup",
            "/user/queue/call/timeout",
        ]
    if role == "callee":
        return [
            "/user/queue/errors",
            "/user/queue/call/request",
            "/user/queue/rtc/signaling",
            "/user/queue/call/hangup",
            "/user/queue/call/down",
        ]
    return r.sample(SUBSCRIPTIONS, r.randint(1, len(SUBSCRIPTIONS)))


async def run_session(
    job: Job,
    client: Client,
    gen: Gen,
    budget: int,
    role: str = "solo",
    ready: asyncio.Event | None = None,
    partner_ready: asyncio.Event | None = None,
) -> None:
    """A STOMP session: CONNECT (mostly with a good token), SUBSCRIBEs, the call flow of its
    role, then fuzzed frames until `budget` frames are written or the server ended it."""
    r = client.r
    t = client.transport
    keep_sending = r.random() < 0.1  # and go on after the ERROR, as a broken client does
    sent = after_end = 0

    async def put(frames: list[bytes], cls: str) -> None:
        nonlocal sent
        await client.send(frames)
        job.count(t, cls, len(frames), ended=client.ended)
        sent += len(frames)

    try:
        if not await client.open():
            return
        if r.random() < 0.04:
            await put([r.choice([gen.valid_send(), gen.subscribe(), gen.command_oddity()])], "preconnect")
        await put([gen.connect(good=role != "solo" or r.random() < 0.88)], "connect")
        if r.random() < 0.85:
            await client.wait_for("CONNECTED", 3.0)
        subs = [gen.subscribe(d) for d in subscriptions_for(role, r)]
        k = r.randint(1, 3)
        for i in range(k):
            if subs[i::k]:
                await put(subs[i::k], "valid")
        if ready is not None:
            ready.set()
        if role == "callee":
            if await client.wait_for("call/request", 3.0):
                await put([gen.valid_send("/app/call/response")], "valid")
        elif role == "caller":
            if partner_ready is not None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(partner_ready.wait(), 3.0)
            request = {
                "callId": gen.call_id,
                "type": "VIDEO",
                "callee": gen.peer,
                "callerUserName": "Caller",
                "calleeUserName": "Callee",
            }
            await put([send_frame("/app/call/request", json.dumps(request).encode())], "valid")
            await client.wait_for("call/response", 3.0)
        while sent < budget:
            if client.ended:
                if not keep_sending or after_end >= 30:
                    break
                after_end += 1
            x = r.random()
            if x < 0.015:
                await client.junk()
                job.count(t, "transport", ended=client.ended)
                sent += 1
                continue
            if x < 0.05:
                await asyncio.sleep(r.choice([0.01, 0.05, 0.2]))
            classes: Counter = Counter()
            frames = []
            for _ in range(1 if r.random() < 0.8 else r.randint(2, 6)):
                frame, cls = gen.fuzz_frame()
                frames.append(frame)
                classes[cls] += 1
            await client.send(frames)
            for cls, n in classes.items():
                job.count(t, cls, n, ended=client.ended)
            sent += len(frames)
        if role == "caller" and not client.ended:
            await put([gen.valid_send("/app/call/hangup")], "valid")
    except Closed:
        pass
    finally:
        if ready is not None:
            ready.set()
        await client.finish()


def job_gen(job: Job, user: str, peer: str, call_id: str | None = None) -> Gen:
    r = job.rng
    call_id = call_id or (f"c{job.batch}-{job.index}" if r.random() < 0.9 else "c-shared")
    return Gen(random.Random(r.getrandbits(64)), job.tokens, user, peer, call_id)


async def job_session(job: Job) -> None:
    r = job.rng
    user, peer = r.choice(FUZZ_USERS), r.choice(FUZZ_USERS)
    client = make_client(job, job.kind, pick_source(r), user, rng=random.Random(r.getrandbits(64)))
    client.odd_origins = True
    await run_session(job, client, job_gen(job, user, peer), job.planned)


async def job_pair(job: Job) -> None:
    """Two sessions that call each other (each on its own transport and address), fuzzing
    around a call that really rings, is answered and carries signaling."""
    r = job.rng
    caller_user, callee_user = r.sample(FUZZ_USERS, 2)
    call_id = f"p{job.batch}-{job.index}"
    kinds = ("ws", "ws", "sockjs-ws", "xhr", "xhr_streaming")
    callee = make_client(
        job, r.choice(kinds), pick_source(r), callee_user, rng=random.Random(r.getrandbits(64))
    )
    caller = make_client(
        job, r.choice(kinds), pick_source(r), caller_user, rng=random.Random(r.getrandbits(64))
    )
    ready = asyncio.Event()
    results = await asyncio.gather(
        run_session(
            job,
            callee,
            job_gen(job, callee_user, caller_user, call_id),
            job.planned // 2,
            "callee",
            ready=ready,
        ),
        run_session(
            job,
            caller,
            job_gen(job, caller_user, callee_user, call_id),
            job.planned // 2,
            "caller",
            partner_ready=ready,
        ),
        return_exceptions=True,
    )
    for result in results:
        if isinstance(result, BaseException) and not isinstance(
            result, (Closed, OSError, asyncio.TimeoutError)
        ):
            raise result


def bad_handshake(r: random.Random, path: str, protocols: list[str] | None, gen: Gen) -> bytes:
    """A WebSocket upgrade request broken (or just odd) in one way."""
    key = base64.b64encode(r.randbytes(16)).decode()
    good = ws_handshake(path, protocols, key=key)
    base_path = path.split("?", 1)[0]
    kind = r.randrange(21)
    extra: list[bytes] = []
    if kind == 0:
        return good.replace(b"Sec-WebSocket-Key: " + key.encode() + b"\r\n", b"")
    if kind == 1:
        return good.replace(
            b"Version: 13", r.choice([b"Version: 8", b"Version: 99", b"Version: ", b"Version: 13, 8"])
        )
    if kind == 2:
        return good.replace(b"Upgrade: websocket\r\n", r.choice([b"", b"Upgrade: h2c\r\n"]))
    if kind == 3:
        extra = [b"X-Pad: " + b"a" * r.choice([8000, 16000, 70000])]
    elif kind == 4:
        extra = [b"X-H%d: v" % i for i in range(r.choice([100, 300, 2000]))]
    elif kind == 5:
        extra = [r.choice([b"X-A: b\rc", b"X-A: b\x00c", b"X-A: b\x7fc", b"X-\xff: b"])]
    elif kind == 6:
        return good.replace(b"\r\n", b"\n")
    elif kind == 7:
        extra = [b"X-A: b", b" folded", b"X-B : c"]
    elif kind == 8:
        return good.replace(b"Host: 127.0.0.1\r\n", r.choice([b"", b"Host: a\r\nHost: b\r\n"]))
    elif kind == 9:
        path = base_path + r.choice([*ODD_USER_QUERIES, "?userId=" + "u" * 9000])
    elif kind == 10:
        path = r.choice(
            [
                "//imserver/ws",
                f"{PREFIX}/ws/",
                f"{PREFIX}/ws/../ws",
                f"{PREFIX}/WS",
                f"{PREFIX}/ws%00",
                f"{PREFIX}/ws/000/../x/websocket",
                f"{PREFIX}/ws/000/a.b/websocket",
                f"{PREFIX}/ws/000//websocket",
                f"{PREFIX}/ws/000/s/websocketx",
                "/" + "x" * 9000,
                "*",
                "http://127.0.0.1" + path,
            ]
        )
    elif kind == 11:
        protocols = r.choice(
            [
                ["v12.stomp, junk"],
                ["v13.stomp"],
                [""],
                [f"p{i}" for i in range(200)],
                ["v12.stomp"] * 50,
                ["v12.stomp\x00"],
            ]
        )
    elif kind == 12:
        extra = [
            r.choice(
                [
                    b"Origin: http://evil.example",
                    b"Origin: null",
                    b"Origin: http://" + b"o" * 5000,
                    b"Origin: \xff",
                    b"Origin: http://127.0.0.1",
                    b"Origin: a\r\nX-Injected: 1",
                ]
            )
        ]
    elif kind == 13:
        return good.replace(b"HTTP/1.1", b"HTTP/1.0", 1)
    elif kind == 14:
        return good.replace(b"GET ", r.choice([b"POST ", b"get ", b"GET  ", b"CONNECT ", b"PRI "]), 1)
    elif kind == 15:
        return good + ws_frame(OP_TEXT, gen.connect(), key=r.randbytes(4))  # CONNECT in the same write
    elif kind == 16:
        key = r.choice(["abc", "", "=" * 24, "x" * 1000])
    elif kind == 17:
        return r.randbytes(r.randint(1, 2000))
    elif kind == 18:
        extra = [
            b"Connection: close",
            b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits",
        ]
    elif kind == 19:
        extra = [b"Content-Length: 10", b"Transfer-Encoding: chunked"]
    return ws_handshake(path, protocols, extra, key)


async def job_handshake(job: Job) -> None:
    r = job.rng
    user = r.choice(FUZZ_USERS)
    transport = r.choice(["ws", "ws", "sockjs-ws"])
    client = make_client(job, transport, pick_source(r), user)
    gen = job_gen(job, user, r.choice(FUZZ_USERS))
    request = bad_handshake(r, client.path(), client.protocols(), gen)
    job.count(transport, "handshake")
    try:
        if await client.open(request):
            await client.send([gen.connect()])
            job.count(transport, "connect", ended=client.ended)
            for _ in range(r.randint(0, 3)):
                frame, cls = gen.fuzz_frame()
                await client.send([frame])
                job.count(transport, cls, ended=client.ended)
    except (TimeoutError, Closed):
        pass
    finally:
        await client.finish()


def http_junk(r: random.Random, client: SockJsXhr, gen: Gen) -> tuple[bytes, str]:
    """A request to the SockJS endpoints broken (or odd) in one way, and what follows it:
    "" (read the answer), "last" (the connection is unusable after it), "hijack"."""
    base = client.base
    env = envelope([gen.valid_send()], r)
    send = f"{base}/xhr_send"
    ct = [b"Content-Type: text/plain;charset=UTF-8"]
    kind = r.randrange(26)
    if kind == 0:
        return http_request("POST", send, env, [*ct, b"Content-Length: %d" % (len(env) + 5)]), "last"
    if kind == 1:
        return http_request("POST", send, env, [*ct, b"Content-Length: %d" % len(env)]), ""
    if kind == 2:
        return http_request(
            "POST",
            send,
            env,
            [*ct, b"Content-Length: %d" % (len(env) + r.choice([1, 100, 10**6]))],
            length=False,
        ), "last"
    if kind == 3:
        return http_request(
            "POST", send, env, [*ct, b"Content-Length: %d" % max(0, len(env) - 5)], length=False
        ), "last"
    if kind == 4:
        return http_request(
            "POST", send, b"zz\r\n" + env + b"\r\n0\r\n\r\n", [b"Transfer-Encoding: chunked"], length=False
        ), "last"
    if kind == 5:
        return http_request(
            "POST", send, b"%x\r\n" % len(env) + env + b"\r\n0\r\n\r\n", [b"Transfer-Encoding: chunked"]
        ), "last"
    if kind == 6:
        return http_request(
            "POST", send, b"%x\r\n" % (len(env) + 10) + env, [b"Transfer-Encoding: chunked"], length=False
        ), "last"
    if kind == 7:
        return http_request(
            "POST", send, env, [r.choice([b"X-A: b\rc", b"X-A: b\x00c", b"X-A: b\nc", b"X-\x01: b"])]
        ), "last"
    if kind == 8:
        return http_request("POST", send, env, ct).replace(b"\r\n", b"\n"), "last"
    if kind == 9:
        return http_request("POST", send, env, [b"X-A: b", b" folded"]), "last"
    if kind == 10:
        return http_request("POST", send, env, [b"X-Pad: " + b"a" * r.choice([16000, 70000])]), "last"
    if kind == 11:
        return http_request(
            "POST", send, env, [b"X-H%d: v" % i for i in range(r.choice([100, 300, 3000]))]
        ), "last"
    if kind == 12:
        return http_request("POST", send, env).replace(
            b"Host: 127.0.0.1\r\n", r.choice([b"", b"Host: a\r\nHost: b\r\n"])
        ), ""
    if kind == 13:
        line = r.choice(
            [
                b"POST  " + b(send) + b" HTTP/1.1",
                b"POST " + b(send),
                b"POST " + b(send) + b" HTTP/2.0",
                b"post " + b(send) + b" HTTP/1.1",
                b"POST http://127.0.0.1" + b(send) + b" HTTP/1.1",
                b"POST " + b(send) + b" HTTP/1.1 extra",
            ]
        )
        request = http_request("POST", send, env)
        return line + request[request.index(b"\r\n") :], "last"
    if kind == 14:
        return http_request("POST", send + "?" + "a" * r.choice([4000, 20000]), env), "last"
    if kind == 15:
        path = r.choice(
            [
                f"{PREFIX}/ws/000/{client.session}.x/xhr_send",
                f"{PREFIX}/ws/000//xhr_send",
                b(send) + b"\xff",
                send + "%00",
                f"{base}/jsonp",
                f"{base}/htmlfile",
                f"{base}/xhr_sendx",
                f"{PREFIX}/ws/000/{client.session}/xhr_send/x",
                f"{PREFIX}/ws/{'9' * 3000}/s/xhr_send",
            ]
        )
        return http_request("POST", path, env), ""
    if kind == 16:
        method = r.choice(["GET", "PUT", "DELETE", "HEAD", "PATCH", "TRACE"])
        return http_request(
            method, send, env if method != "HEAD" else b""
        ), "last" if method == "HEAD" else ""
    if kind == 17:
        return http_request(
            "OPTIONS",
            send,
            headers=[
                b"Origin: http://evil.example",
                b"Access-Control-Request-Headers: " + r.choice([b"x-a", b"a" * 6000, b"x\ty", b"\xff"]),
            ],
        ), ""
    if kind == 18:
        return http_request("POST", send, env, [*ct, b"Expect: 100-continue"]), ""
    if kind == 19:
        return http_request("POST", send, junk_envelope(r, [gen.valid_send()]), ct), ""
    if kind == 20:
        frames = [gen.valid_send("/app/user/status") for _ in range(r.choice([50, 300, 2000]))]
        return http_request("POST", send, envelope(frames, r), ct), ""
    if kind == 21:
        return http_request(
            "POST",
            send,
            env[:-1] + b"," + b'"x",' * 8000 + b'"x"]',
            [*ct, b"Content-Length: %d" % (17 * 1024 * 1024)],
            length=False,
        ), "last"
    if kind == 22:
        return http_request("POST", send, env.replace(b"status", b"stat\xff\xfeus"), ct), ""
    if kind == 23:
        return http_request("POST", send, env, ct) * 2, "last"
    if kind == 24:
        return http_request(
            "GET",
            r.choice(
                [
                    f"{PREFIX}/ws/info?t={r.random()}",
                    f"{PREFIX}/ws",
                    f"{PREFIX}/ws/",
                    f"{PREFIX}/ws/info" + "?x" * 3000,
                ]
            ),
            headers=[b"Origin: " + r.choice([b"null", b"http://evil.example"])],
            length=False,
        ), ""
    return http_request("POST", send, env, ct), "hijack"


async def job_http(job: Job) -> None:
    r = job.rng
    user = r.choice(FUZZ_USERS)
    source = pick_source(r)
    client = SockJsXhr(job, source, user, receiver=r.choice(["xhr", "none"]))
    gen = job_gen(job, user, r.choice(FUZZ_USERS))
    try:
        if await client.open():
            await client.send([gen.connect()])
            job.count(client.transport, "connect")
        for _ in range(r.randint(2, 10)):
            request, then = http_junk(r, client, gen)
            if then == "hijack":  # the same session from another address
                conn = Conn(job.tape, r.choice([s for s in CAPPED_SOURCES if s != source]), job.port)
                job.conns.append(conn)
                client.conns.append(conn)
            else:
                conn = await client._sender()
            if conn.writer is None:
                await conn.open()
            try:
                await conn.write(request)
                job.count(client.transport, "http")
                if then == "last":
                    await asyncio.sleep(0.2)
                    conn.close(rst=r.random() < 0.5)
                    continue
                status, _ = await read_response(conn, 2.0)
                client.note(status)
            except (TimeoutError, Closed, ValueError):
                conn.close()
            if then == "hijack":
                conn.close()
    except (TimeoutError, Closed):
        pass
    finally:
        await client.finish()


async def job_wsproto(job: Job) -> None:
    r = job.rng
    user = r.choice(FUZZ_USERS)
    transport = r.choice(["ws", "ws", "sockjs-ws"])
    client = make_client(job, transport, pick_source(r), user)
    gen = job_gen(job, user, r.choice(FUZZ_USERS))
    try:
        if await client.open():
            await client.send([gen.connect()])
            job.count(transport, "connect")
            for _ in range(r.randint(0, 4)):
                frame, cls = gen.fuzz_frame()
                await client.send([frame])
                job.count(transport, cls, ended=client.ended)
            for _ in range(r.randint(1, 5)):
                await client.conn.write(ws_junk(r))
                job.count(transport, "wsproto", ended=client.ended)
                if client.ended:
                    break
                await asyncio.sleep(0.02)
    except (TimeoutError, Closed):
        pass
    finally:
        await client.finish()


async def job_midframe(job: Job) -> None:
    """A client that goes away in the middle of a WebSocket frame, a STOMP frame, a request
    body or a stream the server is writing."""
    r = job.rng
    user = r.choice(FUZZ_USERS)
    gen = job_gen(job, user, r.choice(FUZZ_USERS))
    kind = r.randrange(6)
    transport = r.choice(["ws", "sockjs-ws"]) if kind < 4 else ("xhr" if kind == 4 else "xhr_streaming")
    client = make_client(job, transport, pick_source(r), user)
    try:
        if not await client.open():
            return
        await client.send([gen.connect()])
        job.count(client.transport, "connect")
        frame = gen.valid_send("/app/user/status")
        if kind == 0:
            data = ws_frame(OP_TEXT, frame, key=r.randbytes(4))
            await client.conn.write(data[: r.randrange(1, len(data))])
        elif kind == 1:
            await client.ws.send(OP_TEXT, frame[:-1])
        elif kind == 2:
            await client.conn.write(
                ws_frame(OP_TEXT, b"x" * 1000, declared=1 << 20, key=r.randbytes(4))[:1014]
            )
        elif kind == 3:
            await client.send([frame[: len(frame) // 2]])
        elif kind == 4:
            body = envelope([frame], r)
            conn = await client._sender()
            await conn.write(
                http_request(
                    "POST",
                    f"{client.base}/xhr_send",
                    body[: len(body) // 2],
                    [b"Content-Length: %d" % len(body)],
                    length=False,
                )
            )
        else:
            await client.send([frame] * 5)
            await asyncio.sleep(0.05)
        job.count(client.transport, "midframe")
        for conn in client.conns:
            conn.close(rst=r.random() < 0.5)
    except (TimeoutError, Closed):
        pass
    finally:
        await client.finish()


async def job_cap_burst(job: Job) -> None:
    """One capped address opening sessions past its burst at once: the rest get 429."""
    r = job.rng
    source = BURST_SOURCES[job.index % len(BURST_SOURCES)]
    transport = r.choice(["ws", "xhr"])
    clients = [
        make_client(job, transport, source, r.choice(FUZZ_USERS), rng=random.Random(r.getrandbits(32)))
        for _ in range(r.choice([70, 140]))
    ]
    try:
        opened = await asyncio.gather(*(c.open() for c in clients), return_exceptions=True)
        for client, ok in zip(clients, opened, strict=True):
            if ok is True:
                gen = job_gen(job, client.user, r.choice(FUZZ_USERS))
                with contextlib.suppress(Closed, asyncio.TimeoutError):
                    await client.send([gen.connect(), gen.valid_send("/app/user/status")])
                    job.count(client.transport, "valid", 2)
        await asyncio.sleep(0.5)
    finally:
        for client in clients:
            await client.finish()


JOB_KINDS = {  # kind: (weight, runner, frames it plans)
    "ws": (30, job_session, (3, 8, 15, 30, 60, 100, 150)),
    "sockjs-ws": (14, job_session, (3, 8, 15, 30, 60, 100, 150)),
    "xhr": (8, job_session, (3, 8, 15, 30, 60, 100)),
    "xhr_streaming": (6, job_session, (3, 8, 15, 30, 60, 100)),
    "eventsource": (2, job_session, (3, 8, 15, 30)),
    "pair": (12, job_pair, (20, 40, 80, 160)),
    "handshake": (7, job_handshake, (3,)),
    "http": (6, job_http, (8,)),
    "wsproto": (6, job_wsproto, (6,)),
    "midframe": (6, job_midframe, (2,)),
    "cap_burst": (0.4, job_cap_burst, (100,)),
}


def new_job(seed: int, batch: int, index: int, port: int, tokens: Tokens) -> Job:
    r = random.Random(f"{seed}/{batch}/{index}")
    kind = r.choices(list(JOB_KINDS), [w for w, _, _ in JOB_KINDS.values()])[0]
    job = Job(index, kind, r.getrandbits(64), port, tokens, batch)
    job.planned = r.choice(JOB_KINDS[kind][2])
    return job


async def run_job(job: Job) -> Job:
    job.started = time.monotonic()
    try:
        await asyncio.wait_for(JOB_KINDS[job.kind][1](job), JOB_TIMEOUT_S)
    except (TimeoutError, Closed, OSError, asyncio.IncompleteReadError):
        pass
    except Exception:  # noqa: BLE001 -- a bug of this script: reported, the run goes on
        HARNESS_FAULTS.append(f"job {job.index} ({job.kind}): {traceback.format_exc(limit=4)}")
    finally:
        job.close_all()
        job.finished = time.monotonic()
    return job


# ------------------------------------------------------------------ held through a batch


class Holders:
    """Connections held through a batch: slowloris handshakes and request bodies, clients
    that never read while asking for large answers, sessions that never CONNECT."""

    def __init__(
        self, batch: int, port: int, tokens: Tokens, seed: int, slow: int, deaf: int, silent: int
    ) -> None:
        self.job = Job(-batch, "holders", seed, port, tokens, batch)
        self.counts = (slow, deaf, silent)
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task] = []
        self.cut_off = 0  # held connections the server ended first

    def start(self) -> None:
        slow, deaf, silent = self.counts
        loop = asyncio.get_running_loop()
        self.tasks = (
            [loop.create_task(self._guard(self._slowloris(i))) for i in range(slow)]
            + [loop.create_task(self._guard(self._deaf(i))) for i in range(deaf)]
            + [loop.create_task(self._guard(self._silent(i))) for i in range(silent)]
        )

    async def finish(self) -> None:
        self.stop.set()
        await asyncio.wait(self.tasks, timeout=15)
        for task in self.tasks:
            task.cancel()
        self.job.close_all()

    async def _guard(self, coro) -> None:
        try:
            await coro
        except (TimeoutError, Closed, OSError):
            self.cut_off += 1  # a deaf client cut off, a slowloris refused: expected
        except Exception:  # noqa: BLE001 -- a bug of this script
            HARNESS_FAULTS.append(f"holders: {traceback.format_exc(limit=4)}")

    async def _hold(self) -> None:
        await self.stop.wait()

    async def _slowloris(self, i: int) -> None:
        r = random.Random(f"{self.job.seed}/slow/{i}")
        conn = self.job.conn(HOLDER_SOURCES[i % len(HOLDER_SOURCES)])
        await conn.open()
        kind = i % 3
        session = f"slow{self.job.batch}x{i}"
        if kind == 0:
            head, payload = b"", ws_handshake(f"{PREFIX}/ws?userId=fz001", ["v12.stomp"])
        elif kind == 1:
            head, payload = b"", ws_handshake(f"{PREFIX}/ws/000/{session}/websocket", None)
        else:
            body = envelope([send_frame("/app/user/status", b'["fz001"]')], r)
            request = http_request("POST", f"{PREFIX}/ws/000/{session}/xhr_send", body)
            head, payload = request[: -len(body)], body
        if head:
            await conn.write(head)
        for pos in range(len(payload)):
            await conn.write(payload[pos : pos + 1])
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stop.wait(), r.uniform(0.3, 1.0))
            if self.stop.is_set():
                return

    async def _deaf(self, i: int) -> None:
        r = random.Random(f"{self.job.seed}/deaf/{i}")
        user = FUZZ_USERS[-1 - i]
        transport = "ws" if i % 2 == 0 else "deaf-stream"
        client = make_client(
            self.job, transport, HOLDER_SOURCES[(i + 3) % len(HOLDER_SOURCES)], user, rcvbuf=4096, rng=r
        )
        if not await client.open():
            return
        gen = Gen(r, self.job.tokens, user, "fz001", f"deaf{i}")
        big = json.dumps([f"someone-with-a-long-user-id-{k:04d}" for k in range(200)]).encode()
        await client.send([gen.connect(), gen.subscribe("/topic/user/status")])
        self.job.count(client.transport, "deaf", 2)
        for _ in range(25):
            if self.stop.is_set():
                break
            await client.send([send_frame("/app/user/status", big)] * 10)
            self.job.count(client.transport, "deaf", 10)
            await asyncio.sleep(0.05)
        await self._hold()

    async def _silent(self, i: int) -> None:
        r = random.Random(f"{self.job.seed}/silent/{i}")
        client = make_client(
            self.job,
            ("ws", "sockjs-ws", "none")[i % 3],
            HOLDER_SOURCES[(i + 5) % len(HOLDER_SOURCES)],
            FUZZ_USERS[i],
            rng=r,
        )
        await client.open()
        await self._hold()


# ------------------------------------------------------------------ the bystander (its own process)


class BystanderSession:
    """A well-behaved STOMP client (the `websockets` library) with its inbox of MESSAGEs."""

    def __init__(self, ws, user: str) -> None:
        self.ws = ws
        self.user = user
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def open(cls, port: int, user: str) -> BystanderSession:
        import websockets

        ws = await websockets.connect(
            f"ws://{HOST}:{port}{PREFIX}/ws?userId={user}",
            subprotocols=["v12.stomp"],
            local_addr=(BYSTANDER_IP, 0),
            open_timeout=ROUND_TRIP_TIMEOUT_S,
            ping_interval=None,
            close_timeout=2,
            compression=None,
        )
        token = jwt.encode({"sub": user, "exp": int(time.time()) + 86400}, JWT_KEY, algorithm="HS256")
        await ws.send(f"CONNECT\naccept-version:1.1,1.2\nide:{token}\nheart-beat:0,0\n\n\x00")
        first = await asyncio.wait_for(ws.recv(), ROUND_TRIP_TIMEOUT_S)
        if not first.startswith("CONNECTED\n"):
            await ws.close()
            raise RuntimeError(f"CONNECT answered {first[:200]!r}")
        for i, destination in enumerate(SUBSCRIPTIONS):
            await ws.send(f"SUBSCRIBE\nid:b{i}\ndestination:{destination}\n\n\x00")
        return cls(ws, user)

    async def _read(self) -> None:
        try:
            async for message in self.ws:
                text = message if isinstance(message, str) else message.decode("utf-8", "replace")
                if text.strip("\n") == "":
                    continue
                head, _, body = text.partition("\n\n")
                lines = head.split("\n")
                headers = dict(line.split(":", 1) for line in lines[1:] if ":" in line)
                if lines[0] == "MESSAGE":
                    try:
                        value = json.loads(body.rstrip("\x00"))
                    except ValueError:
                        value = body
                    await self.inbox.put((headers.get("destination"), value))
                elif lines[0] == "ERROR":
                    await self.inbox.put(("ERROR", headers.get("message")))
        except Exception as exc:  # noqa: BLE001 -- the connection's end, whatever it was
            await self.inbox.put(("CLOSED", repr(exc)))
        await self.inbox.put(("CLOSED", "connection closed"))

    async def send(self, destination: str, body: object) -> None:
        data = json.dumps(body, ensure_ascii=False)
        await self.ws.send(
            f"SEND\ndestination:{destination}\ncontent-type:application/json\n"
            f"content-length:{len(data.encode())}\n\n{data}\x00"
        )

    async def expect(self, destination: str, check) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ROUND_TRIP_TIMEOUT_S
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError(f"{self.user}: nothing on {destination} within {ROUND_TRIP_TIMEOUT_S:g} s")
            try:
                where, value = await asyncio.wait_for(self.inbox.get(), left)
            except TimeoutError:
                continue
            if where in ("ERROR", "CLOSED"):
                raise RuntimeError(f"{self.user}: {where} {value}")
            if where == destination and check(value):
                return

    async def close(self) -> None:
        self.reader.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), 3)


async def bystander_round(alice: BystanderSession, bob: BystanderSession, n: int) -> tuple[float, float]:
    """(status round trip, call round trip) in seconds: alice asks for bob's status; alice
    calls bob, bob accepts, alice sends an offer and hangs up, each delivered."""
    a, b_ = alice.user, bob.user
    t0 = time.monotonic()
    await alice.send("/app/user/status", [b_])
    await alice.expect("/topic/user/status", lambda v: v == [{"userId": b_, "status": "ONLINE"}])
    t1 = time.monotonic()
    call_id = f"bystander-{os.getpid()}-{n}"
    await alice.send(
        "/app/call/request",
        {
            "callId": call_id,
            "type": "VIDEO",
            "callee": b_,
            "callerUserName": "Alice",
            "calleeUserName": "Bob",
        },
    )
    await bob.expect(
        "/user/queue/call/request", lambda v: v.get("callId") == call_id and v.get("caller") == a
    )
    await bob.send("/app/call/response", {"callId": call_id, "type": "ACCEPT"})
    await alice.expect("/user/queue/call/response", lambda v: v == {"callId": call_id, "type": "ACCEPT"})
    await alice.send("/app/rtc/signaling", {"callId": call_id, "type": "OFFER", "payload": SDP})
    await bob.expect("/user/queue/rtc/signaling", lambda v: v.get("callId") == call_id and v.get("from") == a)
    await alice.send("/app/call/hangup", {"callId": call_id})
    await bob.expect("/user/queue/call/hangup", lambda v: v == {"callId": call_id})
    return t1 - t0, time.monotonic() - t1


async def bystander_loop(port: int, pipe, interval: float) -> None:
    pair: tuple[BystanderSession, BystanderSession] | None = None
    n = 0
    while not pipe.poll():
        now = time.time()
        if pair is None:
            try:
                pair = (
                    await BystanderSession.open(port, BYSTANDERS[0]),
                    await BystanderSession.open(port, BYSTANDERS[1]),
                )
            except Exception as exc:  # noqa: BLE001 -- any failure is the bystander's failure
                pipe.send((now, "connect", False, 0.0, f"{type(exc).__name__}: {exc}"))
                await asyncio.sleep(1.0)
                continue
        try:
            status_s, call_s = await bystander_round(*pair, n)
            pipe.send((now, "round", True, status_s, f"{call_s:.6f}"))
        except Exception as exc:  # noqa: BLE001
            pipe.send((now, "round", False, 0.0, f"{type(exc).__name__}: {exc}"))
            for session in pair:
                await session.close()
            pair = None
        n += 1
        await asyncio.sleep(interval)
    if pair is not None:
        for session in pair:
            await session.close()
    pipe.send(("done",))


def bystander_main(port: int, pipe, interval: float) -> None:
    asyncio.run(bystander_loop(port, pipe, interval))


class Bystander:
    """The bystander process and what it reported: (time, kind, ok, status_s, detail).

    A thread takes its reports as they come: a pipe nobody reads fills up, and the
    bystander would then stand still in its send (while a reproducer is looked for, say)."""

    def __init__(self, port: int, interval: float) -> None:
        ctx = multiprocessing.get_context("fork")
        self.pipe, child = ctx.Pipe()
        self.proc = ctx.Process(target=bystander_main, args=(port, child, interval), daemon=True)
        self.proc.start()
        child.close()
        self.records: list[tuple] = []
        self.done = threading.Event()
        self.reader = threading.Thread(target=self._collect, daemon=True)
        self.reader.start()

    def _collect(self) -> None:
        with contextlib.suppress(EOFError, OSError):
            while True:
                item = self.pipe.recv()
                if item[0] == "done":
                    break
                self.records.append(item)
        self.done.set()

    def rounds(self) -> int:
        return sum(1 for r in self.records if r[1] == "round")

    def window(self, t0: float, t1: float) -> list[tuple]:
        return [r for r in list(self.records) if t0 <= r[0] < t1]

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.pipe.send("stop")
        self.done.wait(30)
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)


@dataclass
class Latency:
    ok: int = 0
    failed: int = 0
    status: list = field(default_factory=list)
    call: list = field(default_factory=list)
    failures: list = field(default_factory=list)

    @classmethod
    def of(cls, records: list[tuple]) -> Latency:
        out = cls()
        for _, kind, ok, status_s, detail in records:
            if ok:
                out.ok += 1
                out.status.append(status_s)
                out.call.append(float(detail))
            else:
                out.failed += 1
                out.failures.append(f"{kind}: {detail}")
        return out


def ms(values: list, q: float) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    return f"{1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]:.0f}"


# ------------------------------------------------------------------ the appliance as a process


def signaling_sockets(port: int) -> Counter:
    """States of the TCP sockets on the appliance's side of its signaling connections (local
    port `port`), from /proc/net/tcp and tcp6 (tests/interop/test_hostile_connections.py
    reads them the same way; that module is not imported for it, as it pulls in aioice and
    stomp.py)."""
    states: Counter = Counter()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port:
                    states[fields[3]] += 1
    return states


def signaling_metrics(admin_port: int) -> dict:
    try:
        return {k: v for k, v in metrics(admin_port).items() if k.startswith("appliance_signaling_")}
    except OSError as exc:
        return {"error": str(exc)}


SESSION_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) .*session (\S+) of user (.*) "
    r"(connected|closed)$"
)


class LogDigest(LogTail):
    """What the appliance's log says, read as it grows: the sessions it connected and has not
    (yet) said closed -- who leaked one, and when (service.py logs both ends of every session)
    -- and where each traceback came from (its exception and innermost frame)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.open: dict[str, tuple[str, float]] = {}  # session id -> (user, when connected)
        self.lines: dict[str, list[str]] = {}  # its log lines, while it is open
        self.sites: Counter = Counter()  # "Error at file:line" -> tracebacks
        self.examples: dict[str, str] = {}  # site -> its first exception line
        self._frame: str | None = None  # inside a traceback: the last frame

    def poll(self) -> None:
        for line in self.read_new().splitlines():
            if line == "Traceback (most recent call last):":
                self._frame = "?"
                continue
            if self._frame is not None:
                if line.startswith("  File "):
                    where = line.split('"')[1] if '"' in line else line
                    self._frame = (
                        where.replace(str(ROOT) + "/", "") + ":" + line.split(", line ")[-1].split(",")[0]
                    )
                elif line and not line[0].isspace() and not line.startswith(("During handling", "The above")):
                    site = f"{line.split(':')[0]} at {self._frame}"
                    self.sites[site] += 1
                    self.examples.setdefault(site, line[:240])
                    self._frame = None
                continue
            m = SESSION_LINE.match(line)
            if m is not None:
                stamp, millis, sid, user, what = m.groups()
                if what == "connected":
                    with contextlib.suppress(ValueError, SyntaxError):
                        user = ast.literal_eval(user)
                    when = time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + int(millis) / 1000
                    self.open[sid] = (user, when)
                    self.lines[sid] = [line]
                else:
                    self.open.pop(sid, None)
                    self.lines.pop(sid, None)
            elif " session " in line:
                for sid in self.lines:
                    if f"session {sid} " in line and len(self.lines[sid]) < 20:
                        self.lines[sid].append(line)

    def none_open_since(self, since: float) -> bool:
        """No session that connected at `since` or later is still open."""
        self.poll()
        return not any(when >= since for user, when in self.open.values() if user not in BYSTANDERS)

    def leaked(self, before: float) -> dict[str, tuple[str, float]]:
        """Sessions still open that connected before `before` (wall time), bystanders aside."""
        self.poll()
        return {sid: v for sid, v in self.open.items() if v[1] < before and v[0] not in BYSTANDERS}


def only_leaks_left(run: Run) -> bool:
    """No fuzz session is registered but those already reported as leaked.  Called once every
    fuzz connection is closed: a session may take the SockJS disconnect delay (5 s) and a tick
    to end after its last connection went, so what is still here --session-grace seconds after
    the closes has leaked.  (How long ago a session connected says nothing: a long job's
    session is old when its client leaves.)"""
    count = signaling_metrics(run.relay.admin_port).get("appliance_signaling_sessions", -1) - len(BYSTANDERS)
    return count <= len(run.leaks_seen & run.sessions.leaked(time.time()).keys())


async def settle(check, grace: float) -> tuple[bool, float]:
    """Wait up to `grace` seconds for `check()`; (it held, seconds waited)."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > grace:
            return False, time.monotonic() - started
        await asyncio.sleep(0.25)
    return True, time.monotonic() - started


# ------------------------------------------------------------------ replay and reproducers


async def play_tape(steps: list, port: int, pause_cap: float = 0.3) -> None:
    """Write what a job wrote, connection by connection, in the same order and pieces;
    what comes back is read and dropped."""
    tape = Tape()
    conns: dict[int, Conn] = {}
    readers = []

    async def drain(conn: Conn) -> None:
        with contextlib.suppress(Closed, asyncio.TimeoutError, OSError):
            while True:
                await conn.read_some(3600)

    for number, source, delay, op, data in steps:
        if delay:
            await asyncio.sleep(min(delay, pause_cap))
        conn = conns.get(number)
        if conn is None:
            if op != "write":
                continue
            conn = conns[number] = Conn(tape, source, port)
            try:
                await conn.open()
            except (TimeoutError, OSError):
                conn.closed = True
                continue
            readers.append(asyncio.get_running_loop().create_task(drain(conn)))
        if conn.closed:
            continue
        if op == "write":
            with contextlib.suppress(Closed):
                await conn.write(data)
        else:
            conn.close(rst=op == "rst")
    await asyncio.sleep(0.5)
    for conn in conns.values():
        conn.close()
    for task in readers:
        task.cancel()


def save_case(out: Path, name: str, job: Job, note: str) -> Path:
    steps = [[n, source, delay, op, data.hex()] for n, source, delay, op, data in job.tape.steps]
    return write_case(
        out, name, {"kind": job.kind, "batch": job.batch, "job": job.index, "note": note, "steps": steps}
    )


def describe_case(path: Path, limit: int = 6) -> str:
    """The first writes of a saved case, escaped, for the report."""
    case = json.loads(path.read_text())
    lines = [f"{case['kind']} job {case['job']} of batch {case['batch']}: {case['note']}"]
    writes = [s for s in case["steps"] if s[3] == "write"]
    for n, source, _, _, data in writes[:limit]:
        raw = bytes.fromhex(data)
        lines.append(f"  conn {n} from {source}, {len(raw)} bytes: {raw[:300]!r}")
    if len(writes) > limit:
        lines.append(f"  ... {len(writes) - limit} more writes")
    return "\n".join(lines)


async def locate(
    jobs: list[Job],
    suspects: set[int],
    port: int,
    digest: LogDigest,
    out: Path,
    batch: int,
    budget_s: float,
    wanted: set[str],
) -> list[str]:
    """Replay the batch's jobs one at a time (those running when a traceback was logged
    first); for each traceback site in `wanted`, save the first job whose input alone makes
    the appliance log a traceback there."""
    order = [j for j in jobs if j.index in suspects] + [j for j in jobs if j.index not in suspects]
    deadline = time.monotonic() + budget_s
    found = []
    await asyncio.sleep(1.1)  # the service logs at most 5 tracebacks a second
    digest.poll()
    for job in order:
        if not wanted or time.monotonic() > deadline:
            break
        before = Counter(digest.sites)
        await play_tape(job.tape.steps, port)
        await asyncio.sleep(0.3)
        digest.poll()
        hit = {site for site, n in digest.sites.items() if n > before[site]} & wanted
        if hit:
            site = min(hit)
            name = f"batch{batch}-job{job.index}-{job.kind}-{site.split()[0]}"
            found.append(
                str(
                    save_case(
                        out, name, job, f"this job's input alone: traceback, {site}: {digest.examples[site]}"
                    )
                )
            )
            wanted -= hit
    return found


def suspect_clients(jobs: list[Job], user: str, when: float) -> list[str]:
    """The clients that were `user` around `when`: job kind, transport, receiver, and when
    they opened and closed relative to `when` (what a leak's cause is looked for in)."""
    found = []
    for job in jobs:
        for c in job.clients:
            if c.user == user and c.opened_at - 1 <= when <= (c.closed_at or time.time()) + 1:
                receiver = f"/{c.receiver}" if isinstance(c, SockJsXhr) else ""
                closed = "open" if c.closed_at is None else f"closed {c.closed_at - when:+.2f} s"
                found.append(
                    f"{job.kind} job {job.index}: {c.transport}{receiver}, opened "
                    f"{c.opened_at - when:+.2f} s, {closed}, ended={c.ended}"
                )
    return found or ["none found"]


async def locate_leak(
    jobs: list[Job],
    leaked: dict[str, tuple[str, float]],
    port: int,
    sessions: LogDigest,
    out: Path,
    batch: int,
    budget_s: float,
    grace: float,
) -> list[str]:
    """Replay the jobs whose clients were that user at that time; save the first whose input
    alone leaves a session registered `grace` seconds after all its connections closed."""
    deadline = time.monotonic() + budget_s
    tried: set[int] = set()
    for sid, (user, when) in leaked.items():
        for job in jobs:
            if job.index in tried or not any(
                c.user == user and c.opened_at - 1 <= when <= (c.closed_at or time.time()) + 1
                for c in job.clients
            ):
                continue
            if time.monotonic() > deadline:
                return []
            tried.add(job.index)
            start = time.time()
            await play_tape(job.tape.steps, port)
            closed, _ = await settle(functools.partial(sessions.none_open_since, start), grace)
            if not closed:
                history = " | ".join(sessions.lines.get(sid, [])[:6])
                return [
                    str(
                        save_case(
                            out,
                            f"batch{batch}-job{job.index}-{job.kind}-leak",
                            job,
                            f"session leak: after this input a session stays registered "
                            f"(connected, never closed); in the run: {history}",
                        )
                    )
                ]
    return []


# ------------------------------------------------------------------ batches


@dataclass
class BatchRow:
    batch: int
    frames: Counter
    classes: Counter
    jobs: int
    refused: int
    server: Counter
    statuses: Counter
    after_end: int
    rss_kib: int
    fds: int
    close_wait_end: int
    close_wait_after: int
    established: int
    sessions: float
    leaked: int
    tracebacks: int
    errors_500: float
    latency: Latency
    cpu_percent: float
    seconds: float
    settle_seconds: float
    kinds: Counter


def print_row(row: BatchRow, header: bool) -> None:
    if header:
        print(
            f"{'batch':>5} {'frames':>7} {'ws':>6} {'sj-ws':>6} {'sj-xhr':>6} {'jobs':>5} {'429':>4} "
            f"{'ERRORs':>6} {'RSS MiB':>7} {'fds':>4} {'CW end/aft':>10} {'estab':>5} {'sess':>4} "
            f"{'leak':>4} "
            f"{'tb':>3} "
            f"{'500s':>4} {'status p50/max ms':>17} {'call p50/max ms':>15} {'by ok/fail':>10} "
            f"{'cpu%':>5} {'secs':>5} {'+chk':>4}",
            flush=True,
        )
    f = row.frames
    lat = row.latency
    print(
        f"{row.batch:>5} {sum(f.values()):>7} {f['ws']:>6} {f['sockjs-ws']:>6} {f['sockjs-xhr']:>6} "
        f"{row.jobs:>5} {row.refused:>4} {row.server['ERROR']:>6} {row.rss_kib / 1024:>7.1f} {row.fds:>4} "
        f"{f'{row.close_wait_end}/{row.close_wait_after}':>10} {row.established:>5} {row.sessions:>4.0f} "
        f"{row.leaked:>4} {row.tracebacks:>3} {row.errors_500:>4.0f} "
        f"{ms(lat.status, 0.5) + '/' + ms(lat.status, 1.0):>17} "
        f"{ms(lat.call, 0.5) + '/' + ms(lat.call, 1.0):>15} {f'{lat.ok}/{lat.failed}':>10} "
        f"{row.cpu_percent:>5.0f} {row.seconds:>5.1f} {row.settle_seconds:>4.0f}",
        flush=True,
    )
    for failure in lat.failures[:3]:
        print(f"      bystander: {failure}", flush=True)


@dataclass
class Run:
    args: argparse.Namespace
    relay: object
    tokens: Tokens
    logwatch: LogWatch
    bystander: Bystander
    out: Path
    rows: list = field(default_factory=list)
    cases: list = field(default_factory=list)
    reasons: list = field(default_factory=list)
    next_index: int = 0
    sessions: LogDigest | None = None
    leaks_seen: set = field(default_factory=set)
    sites_tried: Counter = field(default_factory=Counter)  # traceback site -> locate attempts
    fuzz_window: tuple | None = None  # wall-clock start and end of the fuzz
    held: Counter = field(default_factory=Counter)  # held connections: total, cut_off
    odd: list = field(default_factory=list)  # server messages that were no STOMP frame


async def run_batch(run: Run, batch: int, quota: int) -> tuple[list[Job], Holders, set[int]]:
    """Jobs, `concurrency` at a time, until `quota` frames are written; the holders meanwhile."""
    args = run.args
    port = run.relay.http_port
    holders = Holders(
        batch, port, run.tokens, args.seed * 1000 + batch, args.slowloris, args.deaf, args.silent
    )
    holders.start()
    pending: dict[asyncio.Task, Job] = {}
    jobs: list[Job] = []
    suspects: set[int] = set()
    sent = 0

    def note_suspects() -> None:
        now = time.monotonic()
        suspects.update(j.index for j in pending.values())
        suspects.update(j.index for j in jobs if now - j.finished < 2.0)

    while True:
        while len(pending) < args.concurrency and sent + sum(j.planned for j in pending.values()) < quota:
            job = new_job(args.seed, batch, run.next_index, port, run.tokens)
            run.next_index += 1
            pending[asyncio.get_running_loop().create_task(run_job(job))] = job
        if not pending or run.relay.proc.poll() is not None:
            break
        done, _ = await asyncio.wait(pending, timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            job = pending.pop(task)
            jobs.append(job)
            sent += job.total
        if run.logwatch.poll():
            note_suspects()
    for task in pending:
        task.cancel()
    await holders.finish()
    if run.logwatch.poll():
        note_suspects()
    return jobs, holders, suspects


async def fuzz(run: Run) -> None:
    args = run.args
    relay = run.relay
    per_batch = args.frames // args.batches
    for batch in range(1, args.batches + 1):
        quota = per_batch if batch < args.batches else args.frames - per_batch * (args.batches - 1)
        wall0, started = time.time(), time.monotonic()
        cpu0 = cpu_seconds(process_tree(relay.proc.pid))
        tb0 = run.logwatch.tracebacks
        run.sessions.poll()
        sites0 = Counter(run.sessions.sites)
        jobs, holders, suspects = await run_batch(run, batch, quota)
        fuzz_seconds = time.monotonic() - started
        cpu1 = cpu_seconds(process_tree(relay.proc.pid))
        await asyncio.sleep(0.5)  # the closes reach the appliance
        if relay.proc.poll() is not None:
            run.reasons.append(f"appliance exited with {relay.proc.returncode} in batch {batch}")
            break
        close_wait_end = signaling_sockets(relay.http_port)[TCP_CLOSE_WAIT]
        gone, _ = await settle(lambda: signaling_sockets(relay.http_port)[TCP_CLOSE_WAIT] == 0, args.grace)
        states = signaling_sockets(relay.http_port)
        # Every fuzz session ends with its connections (SockJS ones once no receiver came back
        # for 5 s): the sessions gauge goes back to the bystander's two, or some leaked.
        await settle(functools.partial(only_leaks_left, run), args.session_grace + 1)
        leaked = run.sessions.leaked(time.time())
        new_leaks = {k: v for k, v in leaked.items() if k not in run.leaks_seen}
        run.leaks_seen.update(leaked)
        pids = process_tree(relay.proc.pid)
        m = signaling_metrics(relay.admin_port)
        run.logwatch.poll()
        everything = [*jobs, holders.job]
        frames, classes, server, statuses, kinds = Counter(), Counter(), Counter(), Counter(), Counter()
        for job in everything:
            frames.update(job.transport_frames)
            classes.update(job.frames)
            server.update(job.server)
            statuses.update(job.statuses)
            kinds[job.kind] += 1
        row = BatchRow(
            batch,
            frames,
            classes,
            len(jobs),
            sum(j.refused for j in everything),
            server,
            statuses,
            sum(j.after_end for j in everything),
            rss_kib(pids),
            fd_count(pids),
            close_wait_end,
            states[TCP_CLOSE_WAIT],
            states[TCP_ESTABLISHED],
            m.get("appliance_signaling_sessions", -1),
            len(leaked),
            run.logwatch.tracebacks - tb0,
            m.get("appliance_signaling_errors_total{code=500}", 0.0),
            Latency.of(run.bystander.window(wall0, time.time())),
            100 * (cpu1 - cpu0) / fuzz_seconds,
            fuzz_seconds,
            time.monotonic() - started - fuzz_seconds,
            kinds,
        )
        run.rows.append(row)
        run.held.update(total=sum(holders.counts), cut_off=holders.cut_off)
        run.odd += [f"{job.kind} job {job.index}: {odd}" for job in everything for odd in job.odd][
            : 5 - len(run.odd)
        ]
        print_row(row, header=batch == 1)
        if not gone:
            run.reasons.append(
                f"{states[TCP_CLOSE_WAIT]} connections still in CLOSE-WAIT {args.grace:g} s "
                f"after batch {batch}"
            )
        if new_leaks:
            for sid, (user, when) in list(new_leaks.items())[:3]:
                print(
                    f"      leaked session {sid} of {user!r}: "
                    + " | ".join(run.sessions.lines.get(sid, [])[1:4]),
                    flush=True,
                )
                print(
                    "        its user's clients then: " + "; ".join(suspect_clients(everything, user, when)),
                    flush=True,
                )
        run.sessions.poll()
        new_sites = {site for site, n in run.sessions.sites.items() if n > sites0[site]}
        for site in sorted(new_sites):
            print(
                f"      traceback: {site} ({run.sessions.sites[site] - sites0[site]}x): "
                f"{run.sessions.examples[site][:160]}",
                flush=True,
            )
        wanted = {site for site in new_sites if run.sites_tried[site] < 2}
        if wanted:
            run.sites_tried.update(wanted)
            found = await locate(
                everything[:-1],
                suspects,
                relay.http_port,
                run.sessions,
                run.out,
                batch,
                args.locate_s,
                set(wanted),
            )
            run.cases += found
            for case in found:
                run.sites_tried.update({site: 2 for site in wanted if site in Path(case).read_text()})
            if len(found) < len(wanted):
                print(
                    f"      batch {batch}: no single job reproduced {len(wanted) - len(found)} of the "
                    f"traceback sites on replay",
                    flush=True,
                )
        if new_leaks and sum("-leak" in c for c in run.cases) < 2:
            found = await locate_leak(
                everything,
                new_leaks,
                relay.http_port,
                run.sessions,
                run.out,
                batch,
                args.locate_s,
                args.session_grace,
            )
            run.cases += found
            if not found:
                print(f"      batch {batch}: no single job reproduced the session leak on replay", flush=True)
            run.leaks_seen.update(run.sessions.leaked(time.time()))


# ------------------------------------------------------------------ the run


def appliance_settings() -> dict:
    """JWT auth with our key; per-address caps on all but 127.0.0.0/26; the calls' defaults."""
    return {
        "auth": {"mode": "jwt", "jwt_key": JWT_KEY},
        "stomp": {"per_ip_exempt": [EXEMPT_NET]},
        "calls": {"ring_timeout_s": 30, "grace_s": 10},
    }


def run(args: argparse.Namespace) -> int:
    total_started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="fuzz-signaling-"))
    out = Path(args.out) if args.out else workdir / "cases"
    relay = start_appliance(workdir / "appliance", **appliance_settings())
    print(
        f"appliance pid {relay.proc.pid}, signaling http://127.0.0.1:{relay.http_port}{PREFIX}, admin "
        f"{relay.admin_port}, log {relay.log_path}",
        flush=True,
    )
    print(
        f"{args.frames} frames in {args.batches} batches, seed {args.seed}, {args.concurrency} jobs at once; "
        f"per-address caps on {CAPPED_SOURCES[0]}-{HOLDER_SOURCES[-1]} and the bystander "
        f"({BYSTANDER_IP}), none on {EXEMPT_NET}",
        flush=True,
    )
    logwatch = LogWatch(relay.log_path)
    bystander = Bystander(relay.http_port, args.interval)
    run_state = Run(args, relay, Tokens(), logwatch, bystander, out, sessions=LogDigest(relay.log_path))
    final: dict = {}
    idle = Latency()
    sessions_left = None
    try:
        deadline = time.monotonic() + 30
        while bystander.rounds() < args.idle_rounds and time.monotonic() < deadline:
            time.sleep(0.1)
        idle = Latency.of(bystander.window(0, time.time()))
        print(
            f"bystander idle: {idle.ok} round trips, status p50 {ms(idle.status, 0.5)} ms, max "
            f"{ms(idle.status, 1.0)} ms; call p50 {ms(idle.call, 0.5)} ms, max {ms(idle.call, 1.0)} ms; "
            f"failed {idle.failed}",
            flush=True,
        )
        fuzz_started = time.time()
        asyncio.run(fuzz(run_state))
        run_state.fuzz_window = (fuzz_started, time.time())

        async def final_settle() -> bool:
            await settle(functools.partial(only_leaks_left, run_state), args.session_grace + 1)
            close_wait = await settle(
                lambda: signaling_sockets(relay.http_port)[TCP_CLOSE_WAIT] == 0, args.grace
            )
            return close_wait[0]

        if relay.proc.poll() is None:
            close_wait_ok = asyncio.run(final_settle())
            final = metrics(relay.admin_port)
            sessions_left = final.get("appliance_signaling_sessions", -1) - len(BYSTANDERS)
            if sessions_left > 0:
                run_state.reasons.append(
                    f"{sessions_left:.0f} fuzz sessions still registered at the end "
                    f"(their connections long gone)"
                )
            if not close_wait_ok:
                run_state.reasons.append("CLOSE-WAIT at the end, past the grace")
    finally:
        bystander.stop()
        code = stop_appliance(relay)
    logwatch.poll()
    fuzz_window = run_state.fuzz_window or (0, time.time())
    during = Latency.of([r for r in bystander.records if fuzz_window[0] <= r[0] < fuzz_window[1]])
    return summarize(run_state, idle, during, final, code, sessions_left, time.monotonic() - total_started)


def summarize(
    run: Run,
    idle: Latency,
    during: Latency,
    m: dict,
    code: int | None,
    sessions_left: float | None,
    seconds: float,
) -> int:
    args, rows = run.args, run.rows
    if not rows:
        print("no batch completed")
        return 1
    frames, classes, server, statuses, kinds = Counter(), Counter(), Counter(), Counter(), Counter()
    for row in rows:
        frames.update(row.frames)
        classes.update(row.classes)
        server.update(row.server)
        statuses.update(row.statuses)
        kinds.update(row.kinds)
    print()
    print(
        f"frames written: {sum(frames.values())} (native WebSocket {frames['ws']}, SockJS websocket "
        f"{frames['sockjs-ws']}, SockJS xhr_send {frames['sockjs-xhr']}), "
        f"{sum(r.after_end for r in rows)} of them after the server's ERROR or close"
    )
    print("by mutation: " + ", ".join(f"{k} {v}" for k, v in classes.most_common()))
    print(
        f"jobs: {sum(r.jobs for r in rows)} (" + ", ".join(f"{k} {v}" for k, v in kinds.most_common()) + ")"
    )
    print("handshake/HTTP statuses: " + ", ".join(f"{k} {v}" for k, v in sorted(statuses.items())))
    print("what came back: " + ", ".join(f"{k!r} {v}" for k, v in server.most_common(12)))
    for odd in run.odd:
        print(f"  not a STOMP frame, from the server: {odd}")
    sig = {k[len("appliance_signaling_") :]: v for k, v in m.items() if k.startswith("appliance_signaling_")}
    print("signaling metrics: " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(sig.items()) if v))
    print(
        f"held connections (slowloris, never reading, never CONNECTing): {run.held['total']}, "
        f"{run.held['cut_off']} of them ended by the server before their batch did"
    )
    rss_past_limit = report_memory(rows, args.warmup, args.rss_growth_mib)
    print(
        f"CLOSE-WAIT right after a batch: max {max(r.close_wait_end for r in rows)}; after the grace "
        f"({args.grace:g} s): max {max(r.close_wait_after for r in rows)}; fuzz sessions left at the end: "
        f"{'-' if sessions_left is None else f'{sessions_left:.0f}'}"
    )
    print(f"bystander round trips: idle {idle.ok} ok; during the fuzz {during.ok} ok, {during.failed} failed")
    print(
        f"  status query ms  idle p50 {ms(idle.status, 0.5)} p95 {ms(idle.status, 0.95)} max "
        f"{ms(idle.status, 1.0)} | fuzz p50 {ms(during.status, 0.5)} p95 {ms(during.status, 0.95)} max "
        f"{ms(during.status, 1.0)}"
    )
    print(
        f"  call (request..hangup) ms  idle p50 {ms(idle.call, 0.5)} p95 {ms(idle.call, 0.95)} max "
        f"{ms(idle.call, 1.0)} | fuzz p50 {ms(during.call, 0.5)} p95 {ms(during.call, 0.95)} max "
        f"{ms(during.call, 1.0)}"
    )
    slow = sorted(
        (
            (max(r[3], float(r[4])), r[0])
            for r in run.bystander.records
            if r[2] and max(r[3], float(r[4])) > 1.0
        ),
        reverse=True,
    )
    if slow:
        print(
            f"  bystander round trips slower than 1 s: {len(slow)}; the slowest: "
            + ", ".join(f"{s_:.1f} s at {time.strftime('%H:%M:%S', time.localtime(t))}" for s_, t in slow[:3])
            + " (an event loop held up: look at the appliance log around then)"
        )
    print(
        f"tracebacks in the log: {run.logwatch.tracebacks}; exit code on SIGTERM: {code}; "
        f"took {seconds:.0f} s"
    )
    if HARNESS_FAULTS:
        print(f"harness faults (bugs of this script): {len(HARNESS_FAULTS)}, first: {HARNESS_FAULTS[0]}")
    if run.sessions.sites:
        print(
            "tracebacks by site: " + "; ".join(f"{site} x{n}" for site, n in run.sessions.sites.most_common())
        )
    for excerpt in list(run.logwatch.excerpts.values())[:4]:
        print("---- from the appliance log:\n" + excerpt)
    if len(run.logwatch.excerpts) > 4:
        print(f"---- and {len(run.logwatch.excerpts) - 4} more distinct tracebacks in {run.relay.log_path}")
    for case in run.cases:
        print(f"reproducer: {case}\n{describe_case(Path(case))}")
    failures = list(run.reasons)
    if run.logwatch.tracebacks:
        failures.append("traceback in the log")
    if m.get("appliance_signaling_errors_total{code=500}", 0):
        failures.append("SENDs answered 500 (internal errors)")
    if idle.failed or during.failed or any(r.latency.failed for r in rows):
        failures.append("the bystander missed round trips")
    if code != 0:
        failures.append(f"appliance exit code {code} on SIGTERM")
    if rss_past_limit:
        failures.append("RSS grew past the limit")
    if sum(frames.values()) < args.frames:
        failures.append(f"only {sum(frames.values())} of {args.frames} frames written")
    return verdict(failures)


def replay(args: argparse.Namespace) -> int:
    """Send a saved case to a fresh appliance; say whether its log shows a traceback and
    whether a session it opened is still registered --session-grace seconds later."""
    case = json.loads(Path(args.replay).read_text())
    steps = [[n, source, delay, op, bytes.fromhex(data)] for n, source, delay, op, data in case["steps"]]
    workdir = Path(tempfile.mkdtemp(prefix="fuzz-signaling-replay-"))
    relay = start_appliance(workdir, **appliance_settings())
    logwatch = LogWatch(relay.log_path)
    sessions = LogDigest(relay.log_path)
    try:
        start = time.time()
        asyncio.run(play_tape(steps, relay.http_port, pause_cap=args.replay_pause))
        closed, _ = asyncio.run(
            settle(functools.partial(sessions.none_open_since, start), args.session_grace)
        )
        time.sleep(0.5)
    finally:
        stop_appliance(relay)
    logwatch.poll()
    for excerpt in logwatch.excerpts.values():
        print(excerpt)
    for sid, lines in sessions.lines.items():
        print(f"session {sid} still registered after {args.session_grace:g} s:\n  " + "\n  ".join(lines))
    for site, n in sessions.sites.items():
        print(f"traceback {site} x{n}: {sessions.examples[site]}")
    print(f"tracebacks: {logwatch.tracebacks}; sessions left: {0 if closed else len(sessions.open)}")
    return 1 if logwatch.tracebacks or not closed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--frames", type=int, default=100_000, help="STOMP frames to write, in all")
    parser.add_argument("--concurrency", type=int, default=32, help="jobs running at once")
    parser.add_argument("--slowloris", type=int, default=12, help="slow connections held each batch")
    parser.add_argument("--deaf", type=int, default=4, help="never-reading sessions each batch")
    parser.add_argument("--silent", type=int, default=6, help="sessions that never CONNECT, each batch")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between bystander round trips")
    parser.add_argument("--idle-rounds", type=int, default=20, help="bystander round trips before the fuzz")
    parser.add_argument("--grace", type=float, default=15.0, help="seconds CLOSE-WAIT may take to clear")
    parser.add_argument(
        "--session-grace",
        type=float,
        default=12.0,
        help="seconds the sessions of a batch may take to end (SockJS: 5 s without a receiver)",
    )
    parser.add_argument(
        "--locate-s",
        type=float,
        default=120.0,
        help="time to look for a reproducer, per batch and kind of failure",
    )
    parser.add_argument(
        "--replay-pause",
        type=float,
        default=1.0,
        help="longest pause kept between a case's writes on --replay",
    )
    add_common_options(parser, rss_growth_mib=32.0)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.frames = min(args.frames, 3000)
        args.batches = min(args.batches, 2)
        args.concurrency = min(args.concurrency, 16)
        args.slowloris = min(args.slowloris, 3)
        args.deaf = min(args.deaf, 2)
        args.silent = min(args.silent, 2)
        args.idle_rounds = min(args.idle_rounds, 5)
        args.session_grace = min(args.session_grace, 8.0)
        args.locate_s = min(args.locate_s, 15.0)
    return run_or_replay(args, run, replay)


if __name__ == "__main__":
    sys.exit(main())
