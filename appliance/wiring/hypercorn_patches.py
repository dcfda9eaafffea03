"""The one change the appliance makes to Hypercorn itself: WebSocket handshakes are answered
without permessage-deflate.

Hypercorn accepts permessage-deflate with context takeover, with no setting to change it,
so every WebSocket kept a zlib compressor and decompressor alive: about 100 KiB of a
140 KiB idle session (measured with bench/stomp_sessions.py and tracemalloc).  Without
context takeover the memory goes but each message pays for a fresh zlib state: 7k instead
of 10.5k status answers/s in the same bench.  Signaling messages are small, so the
appliance declines the extension, as RFC 6455 lets a server do; every client then speaks
uncompressed frames.

Hypercorn 0.18 builds the extension by name in `hypercorn.protocol.ws_stream`
(`extensions = [PerMessageDeflate()]` in `Handshake.accept`), so that module-level name is
what is replaced.  The patch reads the name before replacing it, so a Hypercorn that no
longer has it stops the start with an AttributeError instead of silently compressing
again; tests/test_hypercorn_patches.py fails in that case too, and when a handshake
offering the extension is answered with it.
"""

from __future__ import annotations

import hypercorn.protocol.ws_stream as ws_stream
from wsproto.extensions import PerMessageDeflate


class DeclinedDeflate(PerMessageDeflate):
    """permessage-deflate that accepts no offer: the handshake answer names no extension."""

    def accept(self, offer: str) -> None:
        return None


def decline_websocket_compression() -> None:
    """Make every Hypercorn WebSocket handshake in this process decline permessage-deflate."""
    built = ws_stream.PerMessageDeflate  # AttributeError if Hypercorn renamed it
    if built is not DeclinedDeflate:
        ws_stream.PerMessageDeflate = DeclinedDeflate  # type: ignore[misc]  # the patch itself
