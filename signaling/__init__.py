"""The signaling service: STOMP over WebSocket/SockJS, the broker, presence and calls."""
