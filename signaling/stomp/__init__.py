"""A sans-I/O STOMP 1.0-1.2 server side: frame codec, incremental parser and connection state.

Nothing here does I/O or reads a clock: the transports feed bytes and `now`
in and write out what the connection returns.
"""

from .connection import (ConnectRequested, DisconnectRequested, Limits, MessageSent, ProtocolError,
                         SendRefused, StompServerConnection, Subscribed, Unsubscribed)
from .frames import Frame, FrameError

__all__ = [
    "ConnectRequested", "DisconnectRequested", "Frame", "FrameError", "Limits", "MessageSent",
    "ProtocolError", "SendRefused", "StompServerConnection", "Subscribed", "Unsubscribed",
]
