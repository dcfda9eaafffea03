"""A small asyncio STOMP client over a native WebSocket, for `appliance probe`.

It speaks the client contract (CONNECT with `ide`, SUBSCRIBE, SEND JSON,
MESSAGEs routed by destination) with the signaling's own frame codec, on the
`websockets` library.  The signaling's STOMP conformance is proven against
stomp.py and @stomp/stompjs; this client exists so the probe runs on the
same event loop as aiortc, without threads.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections import defaultdict
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # websockets is the optional `probe` extra, imported when used
    from websockets.asyncio.client import ClientConnection

from signaling.stomp.frames import SERVER_COMMANDS, Frame, FrameParser, encode

VERSION = "1.2"


class StompRefused(Exception):
    """The server answered CONNECT with an ERROR frame (bad or missing token, wrong user)."""


class StompClient:
    def __init__(self, url: str, user: str, token: str, ssl_context: ssl.SSLContext | None) -> None:
        self.url = url
        self.user = user
        self.token = token
        self.ssl_context = ssl_context
        self.queues: defaultdict[str, asyncio.Queue] = defaultdict(asyncio.Queue)
        self.errors: asyncio.Queue = asyncio.Queue()
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task | None = None
        self._subscriptions = 0

    async def connect(self, timeout: float) -> None:
        """Open the WebSocket and log in; StompRefused if the token is refused, OSError
        (or a websockets error) if the signaling cannot be reached."""
        import websockets
        from websockets.typing import Subprotocol

        self._ws = ws = await asyncio.wait_for(
            websockets.connect(
                self.url, subprotocols=[Subprotocol("v12.stomp")], ssl=self.ssl_context, max_size=2**20
            ),
            timeout,
        )
        await self._send(
            Frame(
                "CONNECT",
                {"accept-version": VERSION, "host": "appliance", "ide": self.token, "heart-beat": "0,0"},
            )
        )
        parser = FrameParser(commands=SERVER_COMMANDS)
        while True:
            data = await asyncio.wait_for(ws.recv(), timeout)
            frames = [
                f
                for f in parser.feed(data.encode() if isinstance(data, str) else data)
                if isinstance(f, Frame)
            ]
            if frames:
                break
        first = frames[0]
        if first.command == "ERROR":
            raise StompRefused(first.get("message", "refused"))
        if first.command != "CONNECTED":
            raise StompRefused(f"unexpected {first.command} frame")
        self._reader = asyncio.get_running_loop().create_task(self._read(ws, parser))

    async def _read(self, ws: ClientConnection, parser: FrameParser) -> None:
        try:
            async for data in ws:
                for frame in parser.feed(data.encode() if isinstance(data, str) else data):
                    if not isinstance(frame, Frame):
                        continue
                    if frame.command == "MESSAGE":
                        body = json.loads(frame.body.decode("utf-8"))
                        self.queues[frame.get("destination", "")].put_nowait(body)
                    elif frame.command == "ERROR":
                        self.errors.put_nowait(frame.get("message", ""))
        except Exception as exc:  # the connection ended: whoever waits times out with a reason
            self.errors.put_nowait(f"connection lost: {exc}")

    async def _send(self, frame: Frame) -> None:
        if self._ws is None:
            raise ConnectionError("not connected")
        await self._ws.send(encode(frame, VERSION).decode("utf-8"))

    async def subscribe(self, destination: str) -> None:
        self._subscriptions += 1
        await self._send(Frame("SUBSCRIBE", {"id": f"sub-{self._subscriptions}", "destination": destination}))

    async def send(self, destination: str, body) -> None:
        await self._send(
            Frame(
                "SEND",
                {"destination": destination, "content-type": "application/json"},
                json.dumps(body).encode(),
            )
        )

    async def next(self, destination: str, timeout: float):
        """The next MESSAGE body on `destination`; TimeoutError if none comes in time."""
        return await asyncio.wait_for(self.queues[destination].get(), timeout)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        if self._ws is not None:
            try:
                await self._send(Frame("DISCONNECT"))
                await self._ws.close()
            except Exception:
                pass
