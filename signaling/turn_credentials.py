"""TURN credentials on the wire (docs/api.md §6): STOMP `/app/turn/get-turn-credentials`,
answered to the asking session only on `/user/queue/turn/get-turn-credentials`,
and its HTTP twin `GET {prefix}/turn/get-turn-credentials` in the envelope.

What goes into the answer (URLs, the REST pair, the ttl) is the `issue`
callable's business: the appliance builds it from the configuration and the
live secret ring, so this module knows nothing of secrets.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Callable

from quart import Quart

from .errors import bad_request
from .http_api import authenticated_user, envelope
from .service import SignalingService
from .session import Session

REQUEST_DESTINATION = "/app/turn/get-turn-credentials"
ANSWER_DESTINATION = "/user/queue/turn/get-turn-credentials"

Issue = Callable[[str], dict]


class TurnCredentialService:
    def __init__(self, issue: Issue) -> None:
        self.issue = issue
        self.counters: Counter[str] = Counter()

    def answer(self, user_id: str, transport: str) -> dict:
        self.counters[transport] += 1
        return self.issue(user_id)

    def install(self, signaling: SignalingService) -> None:
        def handler(_service, session: Session, payload) -> None:
            # The contract sends {}; an empty body is as good.  Anything else is a mistake
            # worth telling the developer about.
            if payload is not None and not isinstance(payload, dict):
                raise bad_request("body must be a JSON object ({})")
            body = json.dumps(self.answer(session.user_id, "stomp"), separators=(",", ":")).encode()
            session.deliver(ANSWER_DESTINATION, body)

        signaling.route(REQUEST_DESTINATION, handler, needs_broker=False)   # no Redis needed

    def install_http(self, app: Quart, prefix: str, verifier) -> None:
        @app.get(f"{prefix}/turn/get-turn-credentials")
        async def http_turn_credentials():
            user = await authenticated_user(verifier)
            return envelope(data=self.answer(user, "http"))
