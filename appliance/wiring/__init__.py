"""Builds the relay (turn/) and the signaling (signaling/) from the configuration: the
relay's settings and peer policy (relay.py), the token checks (auth.py), the signaling app
and its Hypercorn settings (signaling.py), and the one change made to Hypercorn itself
(hypercorn_patches.py)."""
