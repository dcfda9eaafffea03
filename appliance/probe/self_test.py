"""`appliance probe`: an operator's end-to-end self-test of a running appliance.

Two users log in through the signaling (STOMP over WebSocket), fetch TURN
credentials the way clients do, and then, for each TURN URL handed out (or
given with --turn):

  allocation  both users allocate on the relay with those credentials (aioice)
  permission  one relayed address can send to the other through the relay
  media       a real call: call/request, ACCEPT, OFFER/ANSWER over
              /app/rtc/signaling, two aiortc peers with relay-only ICE, a data
              channel and a synthetic audio track; set-up time, round-trip
              time and throughput are measured through the relay; hang up

The first step that fails is named with what it saw (auth, signaling,
allocation, permission, media), so an operator knows where to look.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import ssl
import statistics
import time
from dataclasses import dataclass, field

from .stomp_client import StompClient, StompRefused

STEP_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 25.0
RTT_SAMPLES = 20
THROUGHPUT_BYTES = 1 << 20
CHUNK_BYTES = 16 * 1024

QUEUES = (
    "/user/queue/errors",
    "/user/queue/turn/get-turn-credentials",
    "/user/queue/call/request",
    "/user/queue/call/response",
    "/user/queue/call/hangup",
    "/user/queue/rtc/signaling",
)


class ProbeFailure(Exception):
    def __init__(self, step: str, detail: str) -> None:
        super().__init__(f"{step}: {detail}")
        self.step = step
        self.detail = detail


@dataclass
class UrlResult:
    url: str
    allocation_ms: float = 0.0
    setup_ms: float = 0.0
    rtt_ms: float = 0.0
    throughput_kib_s: float = 0.0
    audio_frames: int = 0
    path: tuple[str, str] = ("", "")


@dataclass
class ProbeReport:
    signaling: str
    users: tuple[str, str]
    login_ms: float = 0.0
    turn_urls: list[str] = field(default_factory=list)
    results: list[UrlResult] = field(default_factory=list)
    failure: ProbeFailure | None = None

    def as_dict(self) -> dict:
        return {
            "ok": self.failure is None,
            "signaling": self.signaling,
            "users": list(self.users),
            "loginMs": round(self.login_ms, 1),
            "turnUrls": self.turn_urls,
            "failedStep": self.failure.step if self.failure else None,
            "failure": self.failure.detail if self.failure else None,
            "results": [
                {
                    "url": r.url,
                    "allocationMs": round(r.allocation_ms, 1),
                    "setupMs": round(r.setup_ms, 1),
                    "rttMs": round(r.rtt_ms, 2),
                    "throughputKiBs": round(r.throughput_kib_s),
                    "audioFrames": r.audio_frames,
                    "path": list(r.path),
                }
                for r in self.results
            ],
        }

    def lines(self) -> list[str]:
        out = [f"probe: signaling {self.signaling} as {self.users[0]} and {self.users[1]}"]
        if self.login_ms:
            out.append(f"  ok    auth        both users logged in ({self.login_ms:.0f} ms)")
        if self.turn_urls:
            out.append(f"  ok    signaling   credentials for {len(self.turn_urls)} TURN URL(s)")
        for r in self.results:
            out.append(f"  {r.url}")
            out.append(f"    ok  allocation  both users allocated ({r.allocation_ms:.0f} ms)")
            out.append("    ok  permission  relayed data reached the other allocation")
            out.append(
                f"    ok  media       connected {r.path[0]}<->{r.path[1]} in {r.setup_ms:.0f} ms "
                f"from call/request; RTT {r.rtt_ms:.1f} ms; data {r.throughput_kib_s:,.0f} KiB/s; "
                f"{r.audio_frames} audio frames"
            )
        if self.failure:
            out.append(f"  FAIL  {self.failure.step}: {self.failure.detail}")
            out.append("probe failed")
        else:
            out.append("probe passed")
        return out


def _ms(since: float) -> float:
    return (time.monotonic() - since) * 1000


def _ws_url(signaling: str, user: str) -> str:
    base = signaling.rstrip("/")
    scheme, rest = base.split("://", 1)
    return f"{'wss' if scheme == 'https' else 'ws'}://{rest}/ws?userId={user}"


async def _login(report: ProbeReport, signaling: str, users, ssl_context) -> list[StompClient]:
    clients = []
    started = time.monotonic()
    for user, token in users:
        client = StompClient(_ws_url(signaling, user), user, token, ssl_context)
        try:
            await client.connect(STEP_TIMEOUT_S)
        except StompRefused as exc:
            raise ProbeFailure("auth", f"the signaling refused {user}'s token ({exc})") from None
        except Exception as exc:  # refused, reset, TLS, timeout, HTTP error: all "unreachable"
            raise ProbeFailure(
                "signaling", f"cannot open {client.url}: {str(exc) or type(exc).__name__}"
            ) from None
        clients.append(client)
        for queue in QUEUES:
            await client.subscribe(queue)
    report.login_ms = _ms(started)
    return clients


async def _expect(client: StompClient, destination: str, what: str):
    try:
        return await client.next(destination, STEP_TIMEOUT_S)
    except TimeoutError:
        errors = []
        while not client.errors.empty():
            errors.append(str(client.errors.get_nowait()))
        queued = client.queues["/user/queue/errors"]
        while not queued.empty():
            errors.append(str(queued.get_nowait()))
        detail = f"; errors: {'; '.join(errors)}" if errors else ""
        raise ProbeFailure(
            "signaling", f"{client.user} got no {what} within {STEP_TIMEOUT_S:.0f} s{detail}"
        ) from None


def _turn_entries(answer: dict, override: list[str]) -> list[dict]:
    turn = [e for e in answer.get("iceServers", []) if str(e.get("urls", "")).startswith("turn")]
    if not turn:
        raise ProbeFailure("signaling", "the credentials answer holds no TURN URL")
    if override:
        pair = turn[0]
        return [
            {"urls": url, "username": pair["username"], "credential": pair["credential"]} for url in override
        ]
    return turn


# ------------------------------------------------------------------ relay checks (aioice)


def _parse_turn(url: str) -> tuple[str, int, str, bool]:
    from aiortc.rtcicetransport import parse_stun_turn_uri

    parsed = parse_stun_turn_uri(url)
    return parsed["host"], parsed["port"], parsed["transport"] or "udp", parsed["scheme"] == "turns"


async def _check_relay(entry: dict) -> float:
    """Allocate twice and send from one relayed address to the other."""
    from aioice import stun as aioice_stun
    from aioice.turn import create_turn_endpoint

    host, port, transport, tls = _parse_turn(entry["urls"])
    received = asyncio.Event()

    class Receiver(asyncio.DatagramProtocol):
        def datagram_received(self, data, addr) -> None:
            received.set()

    endpoints = []
    started = time.monotonic()
    try:
        for _ in range(2):
            try:
                turn, _ = await asyncio.wait_for(
                    create_turn_endpoint(
                        Receiver,
                        (host, port),
                        entry["username"],
                        entry["credential"],
                        transport=transport,
                        ssl=ssl.create_default_context() if tls else None,
                    ),
                    STEP_TIMEOUT_S,
                )
            except aioice_stun.TransactionFailed as exc:
                code, reason = exc.response.attributes.get("ERROR-CODE", (0, ""))
                hint = (
                    (": the relay does not accept the signaling's secret (or the credentials expired)")
                    if code == 401
                    else ""
                )
                raise ProbeFailure(
                    "allocation", f"{entry['urls']} refused the Allocate with {code} {reason}{hint}"
                ) from None
            except (TimeoutError, aioice_stun.TransactionTimeout):
                raise ProbeFailure(
                    "allocation", f"no answer from the relay at {entry['urls']} within {STEP_TIMEOUT_S:.0f} s"
                ) from None
            except (OSError, ConnectionError, ssl.SSLError) as exc:
                raise ProbeFailure("allocation", f"cannot reach {entry['urls']}: {exc}") from None
            endpoints.append(turn)
        elapsed = _ms(started)
        first, second = (e.get_extra_info("sockname") for e in endpoints)
        # Each side needs a permission for the other's relayed address: the second binds a
        # channel to the first (its datagram is dropped there, no permission yet), then the
        # first sends to the second, which must now receive it.
        for sender, target in ((endpoints[1], first), (endpoints[0], second)):
            # aioice keeps its TURN client protocol private (name-mangled); its send_data
            # is the only way to send from the relayed address.
            inner = sender._TurnTransport__inner_protocol  # type: ignore[attr-defined]
            try:
                await asyncio.wait_for(inner.send_data(b"appliance-probe", target), STEP_TIMEOUT_S)
            except aioice_stun.TransactionFailed as exc:
                code, reason = exc.response.attributes.get("ERROR-CODE", (0, ""))
                raise ProbeFailure(
                    "permission",
                    f"the relay refused a channel to the relayed "
                    f"address {target[0]}:{target[1]} with {code} "
                    f"{reason} (turn.deny_peers / allow_peers)",
                ) from None
        target = second
        try:
            await asyncio.wait_for(received.wait(), STEP_TIMEOUT_S)
        except TimeoutError:
            raise ProbeFailure(
                "permission", f"data sent to {target[0]}:{target[1]} through the relay never arrived"
            ) from None
        return elapsed
    finally:
        for turn in endpoints:
            turn.close()


# ------------------------------------------------------------------ the call (aiortc)


def _peer(entry: dict):
    from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection
    from aiortc.rtcconfiguration import RTCIceTransportPolicy

    server = RTCIceServer(urls=entry["urls"], username=entry["username"], credential=entry["credential"])
    return RTCPeerConnection(
        RTCConfiguration(iceServers=[server], iceTransportPolicy=RTCIceTransportPolicy.RELAY)
    )


def _selected_path(pc) -> tuple[str, str]:
    try:
        nominated = pc.sctp.transport.transport._connection._nominated
        pair = next(iter(nominated.values()))
        return pair.local_candidate.type, pair.remote_candidate.type
    except (AttributeError, StopIteration):
        return ("?", "?")


async def _call(caller: StompClient, callee: StompClient, entry: dict, result: UrlResult) -> None:
    from aiortc import RTCSessionDescription
    from aiortc.mediastreams import AudioStreamTrack

    call_id = f"probe-{secrets.token_hex(6)}"
    started = time.monotonic()
    await caller.send(
        "/app/call/request",
        {
            "callId": call_id,
            "type": "AUDIO",
            "callee": callee.user,
            "callerUserName": caller.user,
            "calleeUserName": callee.user,
        },
    )
    request = await _expect(callee, "/user/queue/call/request", "call/request")
    if request.get("callId") != call_id:
        raise ProbeFailure("signaling", f"{callee.user} got call {request.get('callId')!r}, not {call_id}")
    await callee.send("/app/call/response", {"callId": call_id, "type": "ACCEPT"})
    response = await _expect(caller, "/user/queue/call/response", "call/response")
    if response.get("type") != "ACCEPT":
        raise ProbeFailure("signaling", f"the call was answered {response.get('type')!r}")

    a, b = _peer(entry), _peer(entry)
    try:
        channel = a.createDataChannel("probe")
        a.addTrack(AudioStreamTrack())  # synthetic audio
        opened = asyncio.Event()
        channel.on("open", opened.set)
        echoes: asyncio.Queue = asyncio.Queue()
        channel.on("message", echoes.put_nowait)
        track_future = asyncio.get_running_loop().create_future()
        received_bytes = [0]
        all_received = asyncio.Event()

        @b.on("datachannel")
        def on_channel(remote):
            @remote.on("message")
            def on_message(message):
                if isinstance(message, str):
                    remote.send(message)  # ping -> pong
                else:
                    received_bytes[0] += len(message)
                    if received_bytes[0] >= THROUGHPUT_BYTES:
                        all_received.set()

        @b.on("track")
        def on_track(track):
            if not track_future.done():
                track_future.set_result(track)

        await a.setLocalDescription(await a.createOffer())
        await caller.send(
            "/app/rtc/signaling", {"callId": call_id, "type": "OFFER", "payload": a.localDescription.sdp}
        )
        offer = await _expect(callee, "/user/queue/rtc/signaling", "OFFER")
        await b.setRemoteDescription(RTCSessionDescription(offer["payload"], "offer"))
        await b.setLocalDescription(await b.createAnswer())
        await callee.send(
            "/app/rtc/signaling", {"callId": call_id, "type": "ANSWER", "payload": b.localDescription.sdp}
        )
        answer = await _expect(caller, "/user/queue/rtc/signaling", "ANSWER")
        await a.setRemoteDescription(RTCSessionDescription(answer["payload"], "answer"))
        try:
            await asyncio.wait_for(opened.wait(), CONNECT_TIMEOUT_S)
        except TimeoutError:
            raise ProbeFailure(
                "media",
                f"ICE/DTLS did not connect through {entry['urls']} within "
                f"{CONNECT_TIMEOUT_S:.0f} s (ICE {a.iceConnectionState})",
            ) from None
        result.setup_ms = _ms(started)
        result.path = _selected_path(a)

        samples = []
        for i in range(RTT_SAMPLES):
            sent = time.monotonic()
            channel.send(f"ping {i}")
            try:
                await asyncio.wait_for(echoes.get(), STEP_TIMEOUT_S)
            except TimeoutError:
                raise ProbeFailure("media", "data channel pings stopped coming back") from None
            samples.append(_ms(sent))
        result.rtt_ms = statistics.median(samples)

        payload = os.urandom(CHUNK_BYTES)
        sent_at = time.monotonic()
        for _ in range(THROUGHPUT_BYTES // CHUNK_BYTES):
            while channel.bufferedAmount > 8 * CHUNK_BYTES:
                await asyncio.sleep(0.002)
            channel.send(payload)
        try:
            await asyncio.wait_for(all_received.wait(), CONNECT_TIMEOUT_S)
        except TimeoutError:
            raise ProbeFailure(
                "media", f"only {received_bytes[0]} of {THROUGHPUT_BYTES} bytes crossed the relay"
            ) from None
        result.throughput_kib_s = THROUGHPUT_BYTES / 1024 / max(time.monotonic() - sent_at, 1e-6)

        try:
            track = await asyncio.wait_for(track_future, STEP_TIMEOUT_S)
            for _ in range(10):
                await asyncio.wait_for(track.recv(), STEP_TIMEOUT_S)
                result.audio_frames += 1
        except TimeoutError:
            raise ProbeFailure("media", "no audio frames arrived through the relay") from None
    finally:
        await a.close()
        await b.close()
    await caller.send("/app/call/hangup", {"callId": call_id})
    await _expect(callee, "/user/queue/call/hangup", "call/hangup")


async def run_probe(
    signaling: str, users: list[tuple[str, str]], turn_override: list[str], ssl_context: ssl.SSLContext | None
) -> ProbeReport:
    report = ProbeReport(signaling, (users[0][0], users[1][0]))
    clients: list[StompClient] = []
    try:
        clients = await _login(report, signaling, users, ssl_context)
        caller, callee = clients
        await caller.send("/app/turn/get-turn-credentials", {})
        answer = await _expect(caller, "/user/queue/turn/get-turn-credentials", "TURN credentials")
        entries = _turn_entries(answer, turn_override)
        report.turn_urls = [e["urls"] for e in entries]
        for entry in entries:
            result = UrlResult(entry["urls"])
            result.allocation_ms = await _check_relay(entry)
            await _call(caller, callee, entry, result)
            report.results.append(result)
    except ProbeFailure as failure:
        report.failure = failure
    finally:
        for client in clients:
            await client.close()
    return report
