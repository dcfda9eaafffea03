"""What operators use on a running appliance: the admin HTTP API (admin.py), the Prometheus
metrics it serves (metrics.py), and the "what next" block logged at start (next_steps.py)."""
