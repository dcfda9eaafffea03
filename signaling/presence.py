"""Online status (docs/api.md §4).

A user is ONLINE while at least one STOMP session of theirs is connected.
A status query is answered to the asking session only, and registers that
session as a watcher of those users; when one of them comes online or goes
offline, only their watchers get a push on /topic/user/status.  Watches end
with the watching session, so the tables hold nothing for closed sessions,
and one session watches at most `max_watched` users: without the bound, one
client querying 500,000 distinct ids grew the server by 200 MB.
"""

from __future__ import annotations

import json

from .broker import Broker
from .client_text import DEFAULT_MAX_USER_ID_CHARS, user_id_problem
from .errors import bad_request
from .session import Session

STATUS_DESTINATION = "/topic/user/status"
MAX_QUERY_IDS = 200
DEFAULT_MAX_WATCHED = 1000


def status_body(entries: list[tuple[str, bool]]) -> bytes:
    return json.dumps(
        [{"userId": u, "status": "ONLINE" if on else "OFFLINE"} for u, on in entries],
        ensure_ascii=False,
        separators=(",", ":"),
    ).encode()


class Presence:
    def __init__(
        self,
        broker: Broker,
        max_watched: int = DEFAULT_MAX_WATCHED,
        max_user_id_chars: int = DEFAULT_MAX_USER_ID_CHARS,
    ) -> None:
        self.broker = broker
        self.max_watched = max_watched
        self.max_user_id_chars = max_user_id_chars
        self._watchers: dict[str, dict[str, Session]] = {}  # watched user -> sessions by id
        self._watching: dict[str, set[str]] = {}  # session id -> watched users

    def query(self, session: Session, payload) -> None:
        """Answer a status query on the session's /topic/user/status and watch those users."""
        if not isinstance(payload, list) or not all(isinstance(u, str) for u in payload):
            raise bad_request("body must be a JSON array of userId strings")
        if len(payload) > MAX_QUERY_IDS:
            raise bad_request(f"at most {MAX_QUERY_IDS} userIds per query, got {len(payload)}")
        if any(user_id_problem(u, self.max_user_id_chars) for u in payload):
            raise bad_request(
                f"userIds must be 1-{self.max_user_id_chars} characters, without control characters"
            )
        users = list(dict.fromkeys(payload))
        watched = self._watching.get(session.id, set())
        adding = sum(1 for u in users if u not in watched)
        if len(watched) + adding > self.max_watched:
            # Refused whole, before anything is stored: the answer and the watches go together.
            raise bad_request(
                f"at most {self.max_watched} watched userIds per session: this "
                f"session watches {len(watched)}, the query adds {adding}"
            )
        watched = self._watching.setdefault(session.id, watched)
        for user in users:
            watched.add(user)
            self._watchers.setdefault(user, {})[session.id] = session
        session.deliver(STATUS_DESTINATION, status_body([(u, self.broker.is_online(u)) for u in users]))

    def changed(self, user_id: str, online: bool) -> int:
        """Push the user's new status to its watchers; how many sessions got it."""
        watchers = self._watchers.get(user_id)
        if not watchers:
            return 0
        body = status_body([(user_id, online)])
        return sum(1 for s in list(watchers.values()) if not s.closed and s.deliver(STATUS_DESTINATION, body))

    def forget(self, session: Session) -> None:
        for user in self._watching.pop(session.id, ()):
            watchers = self._watchers.get(user)
            if watchers is not None:
                watchers.pop(session.id, None)
                if not watchers:
                    del self._watchers[user]

    def watched_count(self) -> int:
        return len(self._watchers)
