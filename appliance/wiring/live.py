"""The signaling's pieces a configuration reload replaces: how tokens are checked and how
credentials are handed out.  The signaling app holds these stand-ins from the start, and
a reload gives each a new whole object to delegate to (`replace`); a request in progress
finishes with the one it began with."""

from __future__ import annotations

from collections.abc import Callable

from signaling.auth import TokenVerifier


class LiveVerifier:
    """A TokenVerifier that delegates to the one the running configuration describes."""

    def __init__(self, verifier: TokenVerifier) -> None:
        self._verifier = verifier

    def replace(self, verifier: TokenVerifier) -> None:
        self._verifier = verifier

    async def verify(self, token: str) -> str | None:
        return await self._verifier.verify(token)


class LiveIssuer:
    """The iceServers answer (CredentialIssuer.issue) of the running configuration."""

    def __init__(self, issue: Callable[[str], dict]) -> None:
        self._issue = issue

    def replace(self, issue: Callable[[str], dict]) -> None:
        self._issue = issue

    def issue(self, user_id: str) -> dict:
        return self._issue(user_id)
