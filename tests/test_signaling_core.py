"""The transport-free signaling core: sessions, user destinations, online status
(answers only to the asker, pushes only to watchers), /app routing and its errors,
bounded outboxes, token checks."""

from __future__ import annotations

import json
import time

import pytest

from signaling.auth import JwtVerifier, StaticVerifier, mint_jwt
from signaling.broker import MemoryBroker
from signaling.errors import SignalingError
from signaling.service import SignalingService
from signaling.session import Session
from signaling.stomp import ConnectRequested, StompServerConnection
from signaling.stomp_routes import install_stomp_routes

TOKENS = {"tok-a": "alice", "tok-b": "bob", "tok-c": "carol"}


def make_service(credentials=None) -> SignalingService:
    service = SignalingService(MemoryBroker(), StaticVerifier(TOKENS))
    install_stomp_routes(service, credentials=credentials)
    return service


def open_session(
    service,
    user: str,
    sid: str,
    subscribe=("/topic/user/status", "/user/queue/errors"),
    max_outbox: int = 1024,
) -> Session:
    conn = StompServerConnection()
    conn.receive_data(b"CONNECT\naccept-version:1.2\nide:x\n\n\x00", 0)
    conn.accept(0)
    session = Session(sid, user, conn, max_outbox=max_outbox)
    service.connected(session)
    for i, dest in enumerate(subscribe):
        send(service, session, f"SUBSCRIBE\nid:sub-{i}\ndestination:{dest}\n\n\x00")
    session.outbox.clear()
    return session


def send(service, session, raw: str) -> None:
    for event in session.conn.receive_data(raw.encode(), 0):
        service.handle(session, event)
    session.flush()


def status_query(service, session, users) -> None:
    body = json.dumps(users)
    send(
        service,
        session,
        f"SEND\ndestination:/app/user/status\ncontent-length:{len(body.encode())}\n\n{body}\x00",
    )


def messages(session) -> list[tuple[str, object]]:
    out = []
    while session.outbox:
        chunk = session.outbox.popleft()
        head, _, rest = chunk.partition(b"\n\n")
        lines = head.decode().split("\n")
        if lines[0] != "MESSAGE":
            continue
        headers = dict(line.split(":", 1) for line in lines[1:])
        out.append((headers["destination"], json.loads(rest[:-1].decode())))
    return out


def test_status_answer_goes_only_to_the_asking_session():
    svc = make_service()
    a1 = open_session(svc, "alice", "a1")
    a2 = open_session(svc, "alice", "a2")
    open_session(svc, "bob", "b1")
    status_query(svc, a1, ["bob", "carol"])
    assert messages(a1) == [
        (
            "/topic/user/status",
            [{"userId": "bob", "status": "ONLINE"}, {"userId": "carol", "status": "OFFLINE"}],
        )
    ]
    assert messages(a2) == []


def test_pushes_go_only_to_watchers_on_first_and_last_session():
    svc = make_service()
    watcher = open_session(svc, "alice", "a1")
    bystander = open_session(svc, "bob", "b1")
    status_query(svc, watcher, ["carol"])
    messages(watcher)
    c1 = open_session(svc, "carol", "c1")
    assert messages(watcher) == [("/topic/user/status", [{"userId": "carol", "status": "ONLINE"}])]
    c2 = open_session(svc, "carol", "c2")  # not her first session: no push
    assert messages(watcher) == []
    svc.closed(c1)
    assert messages(watcher) == []  # still online through c2
    svc.closed(c2)
    assert messages(watcher) == [("/topic/user/status", [{"userId": "carol", "status": "OFFLINE"}])]
    assert messages(bystander) == []


def test_watches_end_with_the_watching_session():
    svc = make_service()
    watcher = open_session(svc, "alice", "a1")
    status_query(svc, watcher, ["carol", "dave"])
    svc.closed(watcher)
    assert svc.presence.watched_count() == 0
    open_session(svc, "carol", "c1")  # nobody left to tell


@pytest.mark.parametrize(
    "body, message",
    [
        ('{"u": 1}', "JSON array"),
        ('["a", 2]', "JSON array"),
        ("not json", "not valid JSON"),
        (json.dumps([f"u{i}" for i in range(201)]), "at most 200"),
        ('[""]', "1-128 characters"),
    ],
)
def test_bad_status_queries_are_400_on_the_senders_errors_queue(body, message):
    svc = make_service()
    asker = open_session(svc, "alice", "a1")
    other = open_session(svc, "bob", "b1")
    send(svc, asker, f"SEND\ndestination:/app/user/status\ncontent-length:{len(body)}\n\n{body}\x00")
    ((dest, payload),) = messages(asker)
    assert dest == "/user/queue/errors" and payload["code"] == 400 and message in payload["message"]
    assert not asker.conn.closed
    assert messages(other) == []


def test_two_hundred_ids_are_fine():
    svc = make_service()
    asker = open_session(svc, "alice", "a1")
    status_query(svc, asker, [f"u{i}" for i in range(200)])
    ((_, payload),) = messages(asker)
    assert len(payload) == 200


@pytest.mark.parametrize(
    "destination, code",
    [("/topic/user/status", 403), ("/queue/x", 403), ("/user/bob/queue/x", 403), ("/app/nothing", 404)],
)
def test_sends_outside_app_are_403_and_unknown_app_404(destination, code):
    svc = make_service()
    sender = open_session(svc, "alice", "a1")
    bob = open_session(svc, "bob", "b1", subscribe=("/topic/user/status", "/queue/x"))
    send(svc, sender, f"SEND\ndestination:{destination}\ncontent-length:2\n\n[]\x00")
    ((dest, payload),) = messages(sender)
    assert dest == "/user/queue/errors" and payload["code"] == code
    assert messages(bob) == []


def test_user_destinations_reach_every_session_of_the_user_that_subscribed():
    svc = make_service()
    b1 = open_session(svc, "bob", "b1", subscribe=("/user/queue/call/request",))
    b2 = open_session(svc, "bob", "b2", subscribe=("/user/queue/call/request",))
    b3 = open_session(svc, "bob", "b3", subscribe=())
    assert svc.broker.to_user("bob", "/user/queue/call/request", b'{"callId":"c"}') == 2
    assert messages(b1) == messages(b2) == [("/user/queue/call/request", {"callId": "c"})]
    assert messages(b3) == []
    assert svc.broker.to_user("bob", "/user/queue/call/request", b"{}", only={b2.id}) == 1
    assert messages(b1) == []


def test_a_client_that_stops_reading_is_cut_off_with_bounded_memory():
    svc = make_service()
    slow = open_session(svc, "bob", "b1", subscribe=("/user/queue/x",), max_outbox=10)
    for _ in range(10):
        svc.broker.to_user("bob", "/user/queue/x", b"{}")
    assert len(slow.outbox) == 10 and not slow.closed
    svc.broker.to_user("bob", "/user/queue/x", b"{}")
    assert slow.closed and slow.slow and len(slow.outbox) == 0
    svc.closed(slow)
    assert svc.counters["slow_consumers"] == 1
    assert not svc.broker.is_online("bob")


async def connect_event(token: str | None) -> ConnectRequested:
    conn = StompServerConnection()
    header = f"ide:{token}\n" if token else ""
    (event,) = conn.receive_data(f"CONNECT\naccept-version:1.2\n{header}\n\x00".encode(), 0)
    return event


async def test_authenticate_static_tokens():
    svc = make_service()
    assert await svc.authenticate(await connect_event("tok-a"), "alice") == "alice"
    for token, claimed, code in ((None, "alice", 401), ("nope", "alice", 401), ("tok-b", "alice", 403)):
        with pytest.raises(SignalingError) as info:
            await svc.authenticate(await connect_event(token), claimed)
        assert info.value.code == code


async def test_jwt_verifier():
    verifier = JwtVerifier.hs256("k" * 32)
    now = time.time()
    assert await verifier.verify(mint_jwt("k" * 32, "alice", now, 60)) == "alice"
    assert await verifier.verify(mint_jwt("k" * 32, "alice", now - 3600, 60)) is None  # expired
    assert await verifier.verify(mint_jwt("x" * 32, "alice", now, 60)) is None  # wrong key
    assert await verifier.verify("not.a.jwt") is None


async def test_jwt_public_key(tmp_path):
    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    token = jwt.encode({"sub": "bob", "exp": int(time.time()) + 60}, key, algorithm="ES256")
    assert await JwtVerifier.public_key(pem).verify(token) == "bob"
    no_exp = jwt.encode({"sub": "bob"}, key, algorithm="ES256")
    assert await JwtVerifier.public_key(pem).verify(no_exp) is None


async def test_http_introspection_verifier_asks_caches_and_fails_closed():
    import httpx

    from signaling.auth import HttpVerifier

    calls = []

    def backend(request: httpx.Request) -> httpx.Response:
        token = json.loads(request.content)["token"]
        calls.append(token)
        if token == "good":
            return httpx.Response(200, json={"userId": "alice"})
        if token == "enveloped":
            return httpx.Response(200, json={"code": 200, "msg": "ok", "data": {"userId": "bob"}})
        if token == "down":
            raise httpx.ConnectError("backend down")
        return httpx.Response(401, json={"code": 401})

    clock = [0.0]
    verifier = HttpVerifier(
        "http://im.test/introspect",
        cache_s=60,
        clock=lambda: clock[0],
        client=httpx.AsyncClient(transport=httpx.MockTransport(backend)),
    )
    assert await verifier.verify("good") == "alice"
    assert await verifier.verify("good") == "alice"
    assert calls == ["good"]  # the second answer came from the cache
    assert await verifier.verify("enveloped") == "bob"
    assert await verifier.verify("bad") is None
    assert await verifier.verify("down") is None  # unreachable backend: refused
    clock[0] = 61
    assert await verifier.verify("good") == "alice"
    assert calls.count("good") == 2


# ------------------------------------------------------------------ TURN credentials and shutdown


def credential_service():
    from signaling.turn_credentials import TurnCredentialService

    asked = []

    def issue(user):
        asked.append(user)
        return {
            "iceServers": [{"urls": "turn:t", "url": "turn:t", "username": f"9:{user}", "credential": "c"}],
            "ttl": 9,
        }

    return make_service(TurnCredentialService(issue)), asked


def test_turn_credentials_answer_only_the_asking_session():
    service, asked = credential_service()
    phone = open_session(
        service, "alice", "s1", ("/user/queue/turn/get-turn-credentials", "/user/queue/errors")
    )
    laptop = open_session(service, "alice", "s2", ("/user/queue/turn/get-turn-credentials",))
    send(service, phone, "SEND\ndestination:/app/turn/get-turn-credentials\n\n{}\x00")
    (answer,) = messages(phone)
    assert answer[0] == "/user/queue/turn/get-turn-credentials"
    assert answer[1]["iceServers"][0]["username"] == "9:alice" and asked == ["alice"]
    assert messages(laptop) == []
    send(service, phone, "SEND\ndestination:/app/turn/get-turn-credentials\n\n\x00")  # empty is fine
    assert len(messages(phone)) == 1
    send(service, phone, 'SEND\ndestination:/app/turn/get-turn-credentials\n\n"x"\x00')
    assert messages(phone) == [
        ("/user/queue/errors", {"code": 400, "message": "body must be a JSON object ({})"})
    ]


def test_shutdown_sends_every_session_an_error_and_closes_it():
    service = make_service()
    sessions = [open_session(service, user, f"s-{user}") for user in ("alice", "bob")]
    assert service.shutdown() == 2
    for session in sessions:
        assert session.closed
        assert session.outbox[-1].startswith(b"ERROR\nmessage:server shutting down\n")
