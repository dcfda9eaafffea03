"""The STOMP destinations clients SEND to (docs/api.md §3.5), in one table, and what
each calls: presence, the call service, TURN credentials.

    /app/user/status                  presence: answered on /topic/user/status
    /app/call/request                 CallOp.REQUEST
    /app/call/response                CallOp.RESPOND
    /app/call/hangup                  CallOp.HANGUP
    /app/rtc/signaling                CallOp.SIGNAL
    /app/turn/get-turn-credentials    answered to the asking session only, on
                                      /user/queue/turn/get-turn-credentials

A handler gets the sending session and its parsed body; a SignalingError it
raises becomes a MESSAGE on the sender's /user/queue/errors (service.py).
What the calls answer, and where, is the registry's (calls/registry.py).  A
session that closes is reported to the call service as a LOST operation.
"""

from __future__ import annotations

import functools
import json

from .calls.service import CallOp, CallService
from .errors import bad_request
from .service import SignalingService
from .session import Session
from .turn_credentials import TurnCredentialService

STATUS_QUERY = "/app/user/status"
CALL_MESSAGES = {
    "/app/call/request": CallOp.REQUEST,
    "/app/call/response": CallOp.RESPOND,
    "/app/call/hangup": CallOp.HANGUP,
    "/app/rtc/signaling": CallOp.SIGNAL,
}
TURN_CREDENTIALS = "/app/turn/get-turn-credentials"
TURN_CREDENTIALS_ANSWER = "/user/queue/turn/get-turn-credentials"


def install_stomp_routes(
    service: SignalingService,
    calls: CallService | None = None,
    credentials: TurnCredentialService | None = None,
) -> None:
    """Route the table's destinations on `service`; a destination whose service is absent
    (no calls, no relay to hand credentials for) stays unrouted: 404."""
    service.route(STATUS_QUERY, service.presence.query)
    if calls is not None:
        for destination, op in CALL_MESSAGES.items():
            # Bound straight to the call service: nothing runs in between.
            service.route(destination, functools.partial(calls.sent_by, op))
        service.on_session_closed(
            lambda session, last: calls.session_closed(session.user_id, session.id, last)
        )
    if credentials is not None:
        # No Redis needed: the answer is this node's to give.
        service.route(TURN_CREDENTIALS, credentials_handler(credentials), needs_broker=False)


def credentials_handler(credentials: TurnCredentialService):
    def handle(session: Session, payload) -> None:
        # The contract sends {}; an empty body is as good.  Anything else is a mistake
        # worth telling the developer about.
        if payload is not None and not isinstance(payload, dict):
            raise bad_request("body must be a JSON object ({})")
        body = json.dumps(credentials.answer(session.user_id, "stomp"), separators=(",", ":")).encode()
        session.deliver(TURN_CREDENTIALS_ANSWER, body)

    return handle
