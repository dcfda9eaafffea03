"""Text a client controls: checked where it becomes an identity, escaped where it is logged.

A userId travels into log lines, STOMP headers (CONNECTED's `user-name`,
which STOMP 1.2 never escapes), Redis keys and TURN usernames.  One with a
line break or another control character could forge a log line or a header,
and one of megabytes would be copied everywhere, so user ids are refused at
the door: the URL's `userId` and the token's user alike.

Everything else a client sends may still reach a log line (a callId, a
destination, a path); `loggable` is how it gets there.
"""

from __future__ import annotations

import re

DEFAULT_MAX_USER_ID_CHARS = 128
LOGGED_CHARS = 120

# C0 and C1 controls, DEL, and the Unicode line and paragraph separators: anything a
# terminal, a log shipper or a STOMP parser could take for the end of a line.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def user_id_problem(user: str, max_chars: int = DEFAULT_MAX_USER_ID_CHARS) -> str | None:
    """Why `user` cannot be a user id (a phrase safe to show the client), or None if it can."""
    if not user:
        return "is empty"
    if len(user) > max_chars:
        return f"is longer than {max_chars} characters"
    if _CONTROL.search(user):
        return "contains a control character"
    return None


def loggable(text: object, limit: int = LOGGED_CHARS) -> str:
    """`text` as one quoted, escaped, bounded log token: no line break, no control character
    and no terminal escape survives (repr escapes every non-printable character)."""
    if text is None:
        return "-"
    text = str(text)
    if len(text) > limit:
        return repr(text[:limit]) + f"...({len(text)} chars)"
    return repr(text)
