"""TURN credentials (docs/api.md §6): what a user is handed to reach the relay.

Clients ask over STOMP (`/app/turn/get-turn-credentials`, stomp_routes.py) or
HTTP (`GET {prefix}/turn/get-turn-credentials`, http_routes.py); both call
`answer`, which counts the asking transport for the metrics.  What goes into
the answer (URLs, the REST pair, the ttl) is the `issue` callable's business:
the appliance builds it from the configuration and the live secret ring, so
this module knows nothing of secrets.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

Issue = Callable[[str], dict]


class TurnCredentialService:
    def __init__(self, issue: Issue) -> None:
        self.issue = issue
        self.counters: Counter[str] = Counter()  # answers by transport ("stomp", "http")

    def answer(self, user_id: str, transport: str) -> dict:
        """The iceServers answer for `user_id`, asked over `transport`."""
        self.counters[transport] += 1
        return self.issue(user_id)
