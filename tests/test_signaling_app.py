"""The signaling app as the process sees it: `create_app` hands back its parts in a
SignalingApp; the call timers run with the app's lifecycle, not inside a service; and
the feature services (calls, TURN credentials, the core) load no web framework."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

from signaling.app import SignalingApp, create_app
from signaling.auth import StaticVerifier
from signaling.broker import MemoryBroker
from signaling.calls.registry import CallRegistry
from signaling.calls.service import CallOp, CallService
from signaling.guard import ClientGuard
from signaling.lifecycle import run_call_timers
from signaling.session import Session
from signaling.stomp import Limits, StompServerConnection
from signaling.turn_credentials import TurnCredentialService

from .test_broker_contract import eventually

TOKENS = {"tok-a": "alice", "tok-b": "bob"}


def test_create_app_hands_back_its_parts():
    broker, guard = MemoryBroker(), ClientGuard()
    app = create_app(
        "/imserver",
        StaticVerifier(TOKENS),
        Limits(),
        64,
        broker=broker,
        guard=guard,
        issue_credentials=lambda user: {"iceServers": []},
    )
    assert isinstance(app, SignalingApp)
    assert app.broker is broker and app.service.broker is broker and app.guard is guard
    assert type(app.calls) is CallService and app.calls.broker is broker
    assert isinstance(app.credentials, TurnCredentialService)
    assert create_app("/imserver", StaticVerifier(TOKENS), Limits(), 64).credentials is None


async def test_credentials_asked_over_http_and_stomp_are_counted_apart():
    app = create_app(
        "/imserver",
        StaticVerifier(TOKENS),
        Limits(),
        64,
        issue_credentials=lambda user: {"iceServers": [], "ttl": 9, "user": user},
    )
    response = await app.web.test_client().get(
        "/imserver/turn/get-turn-credentials", headers={"ide": "tok-a"}
    )
    assert (await response.get_json())["data"] == {"iceServers": [], "ttl": 9, "user": "alice"}
    alice = stomp_session(app, "alice", "a1", "/user/queue/turn/get-turn-credentials")
    send(app, alice, "/app/turn/get-turn-credentials", {})
    assert app.credentials is not None and dict(app.credentials.counters) == {"http": 1, "stomp": 1}


def stomp_session(app: SignalingApp, user: str, sid: str, *destinations: str) -> Session:
    conn = StompServerConnection()
    conn.receive_data(b"CONNECT\naccept-version:1.2\n\n\x00", 0)
    conn.accept(0)
    session = Session(sid, user, conn)
    app.service.connected(session)
    for i, destination in enumerate(destinations):
        for event in conn.receive_data(f"SUBSCRIBE\nid:{i}\ndestination:{destination}\n\n\x00", 0):
            app.service.handle(session, event)
    session.take()
    return session


def send(app: SignalingApp, session: Session, destination: str, body) -> None:
    frame = f"SEND\ndestination:{destination}\n\n{json.dumps(body)}\x00".encode()
    for event in session.conn.receive_data(frame, 0):
        app.service.handle(session, event)


async def test_ring_timeouts_fire_while_the_app_serves():
    app = create_app("/imserver", StaticVerifier(TOKENS), Limits(), 64, ring_timeout_s=0.2)
    async with app.web.test_app():  # before_serving .. after_serving
        alice = stomp_session(app, "alice", "a1", "/user/queue/call/timeout", "/user/queue/errors")
        stomp_session(app, "bob", "b1", "/user/queue/call/request")
        send(
            app,
            alice,
            "/app/call/request",
            {"callId": "c1", "callee": "bob", "type": "AUDIO", "callerUserName": "A", "calleeUserName": "B"},
        )
        assert app.calls.registry.calls
        await eventually(lambda: bool(alice.outbox), timeout=3.0)  # nobody answers
        head, _, body = alice.take()[0].partition(b"\n\n")
        assert b"destination:/user/queue/call/timeout" in head
        assert json.loads(body[:-1]) == {"callId": "c1"}
        assert not app.calls.registry.calls


def test_the_services_load_no_web_framework():
    services = (
        "signaling.calls.service",
        "signaling.calls.cluster",
        "signaling.turn_credentials",
        "signaling.service",
        "signaling.stomp_routes",
        "signaling.lifecycle",
    )
    probe = (
        f"import sys\nfor m in {services!r}: __import__(m)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('quart', 'werkzeug')))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert loaded.stdout.strip() == "[]"


class TimerFailingOnce(CallService):
    """A call service whose first timer hits a bug (what a fault in one call's timer does)."""

    failed = False

    def handle_timer(self) -> None:
        if not self.failed:
            self.failed = True
            raise RuntimeError("a bug in one call's timer")
        super().handle_timer()


async def test_a_failing_call_timer_is_logged_and_the_timers_go_on(caplog):
    broker = MemoryBroker()
    bob = StompServerConnection()
    bob.receive_data(b"CONNECT\naccept-version:1.2\n\n\x00", 0)
    bob.accept(0)
    broker.register(Session("b1", "bob", bob))  # the callee is online
    calls = TimerFailingOnce(broker, CallRegistry(ring_timeout_s=0.1, grace_s=1.0), 65536)
    calls.run_local(
        CallOp.REQUEST,
        "alice",
        None,
        {"callId": "c1", "callee": "bob", "type": "AUDIO", "callerUserName": "A", "calleeUserName": "B"},
        calls.clock(),
    )
    assert calls.registry.calls
    timers = asyncio.get_running_loop().create_task(run_call_timers(calls))
    try:
        await eventually(lambda: not calls.registry.calls, timeout=5.0)  # the ring timeout fired
    finally:
        timers.cancel()
    assert calls.failed and "a call timer failed" in caplog.text
