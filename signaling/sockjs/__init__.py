"""SockJS: the fallback transports sockjs-client uses when WebSockets are blocked."""
