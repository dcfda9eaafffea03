"""TURN REST credentials: the shared-secret ring (ring.py), where it is kept (store.py, a
file or a Redis key), how each process follows it (watcher.py), what the signaling hands
clients from it (ice_servers.py) and the coturn lines that accept the same credentials
(coturn.py)."""
