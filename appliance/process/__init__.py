"""The processes of `appliance serve`: the supervisor (supervisor.py, the main process) and
the relay workers it starts (worker_pool.py) and that each run relay_worker.py; the relay
node both kinds run (local_relay.py), and what they share: logging and event loop set-up
(bootstrap.py), signal handling (signals.py), listener binding (listeners.py), the
open-files limit (open_files.py)."""
