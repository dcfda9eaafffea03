"""The server side of one STOMP connection, sans-I/O (the h11 style).

    conn = StompServerConnection(limits, now=now)
    for event in conn.receive_data(data, now): ...   # the application reacts
    conn.accept(now) / conn.reject(message) / conn.send_message(...)
    for chunk in conn.data_to_send(): transport.write(chunk)   # one frame per chunk
    conn.handle_timer(now) at conn.get_timer()

The application decides who may connect (ConnectRequested -> accept or
reject); this class owns the protocol: version and heart-beat negotiation,
subscriptions, receipts, limits, and ERROR-then-close on any violation.

Errors go two ways, as in h11 and wsproto.  The client's mistakes are events:
a frame that breaks the protocol (or a client gone silent past its heart-beat)
ends the connection and `receive_data`/`handle_timer` return ConnectionFailed.
The application's mistakes raise LocalProtocolError: a call the connection's
state does not allow is a bug in the caller.  What the application may
legitimately do in each state, because the client (or a timer) can close the
connection while the application is busy elsewhere:

    receive_data    any state; nothing happens once closed (data behind the
                    frame that closed it, or from a transport that races)
    accept          CONNECTING only; anything else raises (accepting twice, or
                    after the CONNECT deadline closed the connection, is a bug:
                    check `closed` after any await)
    reject          CONNECTING; a no-op once closed (the deadline or a shutdown
                    won the race); raises before a CONNECT or once connected
                    (there is nothing to reject: use close_with_error)
    close_with_error  any state; a no-op once closed
    send_message    CONNECTED; a no-op once closed (a MESSAGE for a session
                    that has just closed is normal: the fan-out races the
                    close); raises before CONNECTED (no subscription exists yet)
    handle_timer    any state; nothing happens unless connected
    get_timer, data_to_send, has_output, closed   any state
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .frames import HEARTBEAT, Frame, FrameError, FrameParser, ParserLimits, encode

SUPPORTED_VERSIONS = ("1.2", "1.1", "1.0")
HEARTBEAT_GRACE = 2.0  # a peer may be this many intervals late before it is declared gone
SEND_REFUSAL_WINDOW_S = 10.0


# How many SENDs one session may make: a token bucket, and a count of what it refused.
class TokenBucket:
    """`rate` tokens a second, at most `burst` saved up; a rate of 0 means no limit."""

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = max(1, burst)
        self._tokens = float(self.burst)
        self._last = now

    def take(self, now: float) -> bool:
        """Spend one token if there is one."""
        if self.rate <= 0:
            return True
        if now > self._last:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class WindowCount:
    """Events counted in fixed windows of `window_s`: enough to tell a client that keeps
    pushing past its budget from one that overshot once."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._start = float("-inf")
        self.count = 0

    def add(self, now: float) -> int:
        """Count one event; how many the current window holds."""
        if now - self._start >= self.window_s:
            self._start, self.count = now, 0
        self.count += 1
        return self.count


class LocalProtocolError(Exception):
    """The application called a method the connection's state does not allow: a bug in
    the caller, never the client's doing (see the table in the module docstring)."""


@dataclass(frozen=True)
class Limits:
    max_frame_bytes: int = 65536
    max_headers: int = 64
    max_header_line_bytes: int = 8192
    max_subscriptions: int = 100
    heartbeat_ms: tuple[int, int] = (10000, 10000)  # (we send every, we want every)
    # The SEND budget: one client must not keep the event loop busy for everyone.  Past it a
    # SEND is refused (SendRefused: the application answers 429); at this many refusals within
    # SEND_REFUSAL_WINDOW_S the application ends the session.  A rate of 0: no budget.
    send_rate: float = 50.0
    send_burst: int = 200
    send_refusals_to_close: int = 50
    # What the application holds a session's messages to (the service, presence, auth).
    max_watched: int = 1000
    max_json_depth: int = 32
    max_user_id_chars: int = 128


# ---------------------------------------------------------------- events


@dataclass
class ConnectRequested:
    frame: Frame
    version: str


@dataclass
class Subscribed:
    id: str
    destination: str
    frame: Frame


@dataclass
class Unsubscribed:
    id: str
    destination: str


@dataclass
class MessageSent:
    destination: str
    frame: Frame


@dataclass
class SendRefused:
    """A SEND over the session's budget, dropped; `message` says so (safe to show the client).

    With `close_message` it was one refusal too many: the connection reads nothing more
    and the application, once it has answered, ends the session with
    `close_with_error(close_message)`.  (Closing here would drop the answers to the
    refusals that came in the same data: a closed connection sends no MESSAGE.)"""

    destination: str
    message: str
    close_message: str | None = None


@dataclass
class DisconnectRequested:
    receipt: str | None


@dataclass
class ConnectionFailed:
    """The client broke the protocol (an ERROR frame saying so is queued) or went silent
    past its heart-beat (nothing is queued: nobody would read it); either way the
    connection is closed.  `message` says which, safe to log (through loggable)."""

    message: str


# What receive_data and handle_timer return.
Event = (
    ConnectRequested
    | Subscribed
    | Unsubscribed
    | MessageSent
    | SendRefused
    | DisconnectRequested
    | ConnectionFailed
)


class State(enum.Enum):
    AWAITING_CONNECT = "awaiting CONNECT"
    CONNECTING = "CONNECT received, awaiting the application's decision"
    CONNECTED = "connected"
    CLOSED = "closed"


def negotiate_heartbeat(client: str | None, ours: tuple[int, int]) -> tuple[int, int]:
    """(ms between our heart-beats, ms we expect between the client's); 0 = none."""
    cx, cy = 0, 0
    if client:
        parts = client.split(",")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise FrameError(f"bad heart-beat header {client[:30]!r}")
        cx, cy = (int(p) for p in parts)
    sx, sy = ours
    send = max(sx, cy) if sx and cy else 0
    expect = max(cx, sy) if cx and sy else 0
    return send, expect


def negotiate_version(accept: str | None) -> str | None:
    offered = {"1.0"} if not accept else {v.strip() for v in accept.split(",")}
    return next((v for v in SUPPORTED_VERSIONS if v in offered), None)


class StompServerConnection:
    def __init__(self, limits: Limits = Limits(), server: str = "appliance", now: float = 0.0) -> None:
        self.limits = limits
        self.server = server
        self.state = State.AWAITING_CONNECT
        self.version = "1.2"
        self.subscriptions: dict[str, str] = {}  # id -> destination
        self.send_interval = 0.0  # seconds; 0 = no heart-beats
        self.expect_interval = 0.0
        self._parser = FrameParser(
            ParserLimits(limits.max_frame_bytes, limits.max_headers, limits.max_header_line_bytes)
        )
        self._out: list[bytes] = []
        self._last_received = now
        self._last_sent = now
        self._pending_heartbeat: str | None = None
        self._send_budget = TokenBucket(limits.send_rate, limits.send_burst, now)
        self._send_refusals = WindowCount(SEND_REFUSAL_WINDOW_S)
        self._input_stopped = False  # a SEND flood: the application is ending the session

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    # ------------------------------------------------------------ input

    def receive_data(self, data: bytes | str, now: float) -> list[Event]:
        """The events of the frames `data` completes.  Frames that follow a CONNECT wait,
        unparsed, until the application has accepted or rejected it (as a server that checks
        tokens synchronously would read them): call again with b"" after `accept` to get
        theirs.  What waits is bounded by max_frame_bytes."""
        if self.closed or self._input_stopped:
            return []
        if data:
            if isinstance(data, str):
                # surrogatepass: a str from a decoded JSON envelope may hold a lone surrogate;
                # as bytes it is invalid UTF-8, which the parser and body decoder refuse.
                data = data.encode("utf-8", "surrogatepass")
            self._last_received = now
            self._parser.add(data)
        events: list[Event] = []
        while self.state is not State.CONNECTING:
            try:
                item = self._parser.next()
            except FrameError as exc:
                events.append(self._fail(str(exc)))
                break
            if item is None:
                break
            if item is HEARTBEAT:
                continue
            try:
                events.extend(self._on_frame(item, now))
            except FrameError as exc:
                events.append(self._fail(str(exc)))
            if self.closed or self._input_stopped:
                break
        if self.state is State.CONNECTING and self._parser.buffered > self.limits.max_frame_bytes:
            events.append(self._fail(f"more than {self.limits.max_frame_bytes} bytes sent before CONNECTED"))
        return events

    def _on_frame(self, frame: Frame, now: float) -> list[Event]:
        command = frame.command
        if self.state is State.AWAITING_CONNECT:
            if command not in ("CONNECT", "STOMP"):
                raise FrameError(f"{command} before CONNECT")
            version = negotiate_version(frame.get("accept-version"))
            if version is None:
                raise FrameError("Supported protocol versions are " + ",".join(reversed(SUPPORTED_VERSIONS)))
            self.version = version
            self._parser.version = version
            self._pending_heartbeat = frame.get("heart-beat")
            negotiate_heartbeat(self._pending_heartbeat, self.limits.heartbeat_ms)  # validate now
            self.state = State.CONNECTING
            return [ConnectRequested(frame, version)]
        if command in ("CONNECT", "STOMP"):
            raise FrameError("already connected")
        events: list[Event] = []
        if command == "SEND":
            destination = self._required(frame, "destination")
            if self._send_budget.take(now):
                events.append(MessageSent(destination, frame))
            else:
                events.append(self._refuse_send(destination, now))
        elif command == "SUBSCRIBE":
            destination = self._required(frame, "destination")
            sub_id = frame.get("id") if self.version != "1.0" else frame.get("id", destination)
            if sub_id is None:
                raise FrameError("SUBSCRIBE without id")
            if sub_id in self.subscriptions:
                raise FrameError(f"subscription id {sub_id[:40]!r} already in use")
            if len(self.subscriptions) >= self.limits.max_subscriptions:
                raise FrameError(f"more than {self.limits.max_subscriptions} subscriptions")
            self.subscriptions[sub_id] = destination
            events.append(Subscribed(sub_id, destination, frame))
        elif command == "UNSUBSCRIBE":
            sub_id = frame.get("id") or (frame.get("destination") if self.version == "1.0" else None)
            if sub_id is None:
                raise FrameError("UNSUBSCRIBE without id")
            unsubscribed = self.subscriptions.pop(sub_id, None)
            if unsubscribed is None and self.version == "1.0":
                ids = [i for i, d in self.subscriptions.items() if d == sub_id]
                unsubscribed = sub_id if ids else None
                for i in ids:
                    del self.subscriptions[i]
            if unsubscribed is not None:
                events.append(Unsubscribed(sub_id, unsubscribed))
        elif command == "DISCONNECT":
            receipt = frame.get("receipt")
            if receipt is not None:
                self._queue(Frame("RECEIPT", {"receipt-id": receipt}))
            self.state = State.CLOSED
            return [DisconnectRequested(receipt)]
        # ACK, NACK, BEGIN, COMMIT, ABORT: subscriptions are auto-acknowledged and
        # there is nothing to transact, so they only earn their receipt.
        receipt = frame.get("receipt")
        if receipt is not None:
            self._queue(Frame("RECEIPT", {"receipt-id": receipt}))
        return events

    def _refuse_send(self, destination: str, now: float) -> SendRefused:
        limits = self.limits
        refused = SendRefused(
            destination,
            f"too many messages: at most {limits.send_rate:g} SEND "
            f"frames a second (burst {limits.send_burst}); slow down",
        )
        if self._send_refusals.add(now) >= limits.send_refusals_to_close:
            self._input_stopped = True
            refused.close_message = (
                f"too many SEND frames: {limits.send_refusals_to_close} over "
                f"the budget of {limits.send_rate:g}/s (burst "
                f"{limits.send_burst}) within {SEND_REFUSAL_WINDOW_S:g} s"
            )
        return refused

    @staticmethod
    def _required(frame: Frame, header: str) -> str:
        value = frame.get(header)
        if not value:
            raise FrameError(f"{frame.command} without {header}")
        return value

    # ------------------------------------------------------------ decisions and output

    def accept(self, now: float, session: str | None = None, user_name: str | None = None) -> None:
        """Answer the pending CONNECT with CONNECTED (version, heart-beat, server)."""
        if self.state is not State.CONNECTING:
            raise LocalProtocolError(f"accept() in state {self.state.value}")
        send_ms, expect_ms = negotiate_heartbeat(self._pending_heartbeat, self.limits.heartbeat_ms)
        self.send_interval, self.expect_interval = send_ms / 1000, expect_ms / 1000
        headers = {"version": self.version, "heart-beat": f"{send_ms},{expect_ms}", "server": self.server}
        if session:
            headers["session"] = session
        if user_name:
            headers["user-name"] = user_name
        self.state = State.CONNECTED
        self._last_received = now
        self._queue(Frame("CONNECTED", headers), now)

    def reject(self, message: str) -> None:
        """Refuse the pending CONNECT: ERROR, then closed.  A no-op if the connection closed
        while the application was deciding."""
        if self.state in (State.AWAITING_CONNECT, State.CONNECTED):
            raise LocalProtocolError(
                f"reject() in state {self.state.value}: no CONNECT is "
                "pending (close_with_error ends a connection)"
            )
        self._error(message)

    def close_with_error(self, message: str) -> None:
        """End a connection from the server's side (shutdown, a deadline, a flood, a slow
        consumer): ERROR, then closed.  A no-op if it is closed already."""
        self._error(message)

    def send_message(
        self,
        destination: str,
        subscription: str,
        body: bytes,
        headers: dict[str, str] | None = None,
        message_id: str = "",
        now: float | None = None,
    ) -> None:
        """A MESSAGE on `subscription`.  Dropped without a word once the connection is
        closed: a message for a session that has just gone is normal, not an error."""
        if self.state is State.CLOSED:
            return
        if self.state is not State.CONNECTED:
            raise LocalProtocolError(f"send_message() in state {self.state.value}")
        h = {
            "destination": destination,
            "subscription": subscription,
            "message-id": message_id or destination,
            "content-type": "application/json;charset=UTF-8",
        }
        if headers:
            h.update(headers)
        self._queue(Frame("MESSAGE", h, body), now)

    @property
    def has_output(self) -> bool:
        return bool(self._out)

    def data_to_send(self) -> list[bytes]:
        out, self._out = self._out, []
        return out

    # ------------------------------------------------------------ time

    def get_timer(self) -> float | None:
        if self.state is not State.CONNECTED:
            return None
        times = []
        if self.send_interval:
            times.append(self._last_sent + self.send_interval)
        if self.expect_interval:
            times.append(self._last_received + self.expect_interval * HEARTBEAT_GRACE)
        return min(times) if times else None

    def handle_timer(self, now: float) -> list[Event]:
        """Queue a heart-beat EOL when due; fail the connection if the client went silent."""
        if self.state is not State.CONNECTED:
            return []
        if self.expect_interval and now >= self._last_received + self.expect_interval * HEARTBEAT_GRACE:
            self.state = State.CLOSED  # a silent peer gets no ERROR: nobody would read it
            return [ConnectionFailed("heart-beat timeout")]
        if self.send_interval and now >= self._last_sent + self.send_interval:
            self._out.append(b"\n")
            self._last_sent = now
        return []

    # ------------------------------------------------------------ helpers

    def _queue(self, frame: Frame, now: float | None = None) -> None:
        self._out.append(encode(frame, self.version))
        if now is not None:
            self._last_sent = now

    def _error(self, message: str) -> None:
        if self.closed:
            return
        # The message header is one line; the body says it again for clients that show bodies.
        self._queue(Frame("ERROR", {"message": message[:200]}, message.encode()))
        self.state = State.CLOSED

    def _fail(self, message: str) -> ConnectionFailed:
        self._error(message)
        return ConnectionFailed(message)
