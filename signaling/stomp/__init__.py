"""A sans-I/O STOMP 1.0-1.2 server side: frame codec, incremental parser and connection state.

Nothing here does I/O or reads a clock: the transports feed bytes and `now`
in and write out what the connection returns.  The client's protocol errors
come back as the ConnectionFailed event; the application's wrong-state calls
raise LocalProtocolError (connection.py says which calls are allowed when).
"""

from .connection import (
    ConnectionFailed,
    ConnectRequested,
    DisconnectRequested,
    Limits,
    LocalProtocolError,
    MessageSent,
    SendRefused,
    StompServerConnection,
    Subscribed,
    Unsubscribed,
)
from .frames import Frame, FrameError

__all__ = [
    "ConnectRequested",
    "ConnectionFailed",
    "DisconnectRequested",
    "Frame",
    "FrameError",
    "Limits",
    "LocalProtocolError",
    "MessageSent",
    "SendRefused",
    "StompServerConnection",
    "Subscribed",
    "Unsubscribed",
]
