"""The "what next" block `appliance serve` logs once its listeners are up: where the demo
page, tokens, ICE servers, health and metrics are, and where the generated state lives.

Addresses are the ones to use from this machine (loopback for a wildcard listener).
Nothing secret is printed: tokens and keys are only named, never shown.
"""

from __future__ import annotations

from ..config.schema import AppConfig


def _token_hint(config: AppConfig) -> str:
    if config.auth.uses_dev_key():
        return (
            "appliance token --user NAME (run it with this server's --config or "
            "APPLIANCE__DATA_DIR, if you gave one)"
        )
    if config.auth.mode == "static":
        return "the tokens listed in auth.tokens"
    if config.auth.mode == "http":
        return "from your IM backend (checked at auth.introspect_url)"
    return "from your IM backend, signed with your JWT key"


def next_steps(config: AppConfig) -> str:
    lines = ["what next:"]
    h, admin = config.http, config.admin
    if h.listen is not None:
        base = h.local_url()
        if h.demo:
            lines.append(f"  demo page:   {base}/demo/")
        lines.append(f"  tokens:      {_token_hint(config)}")
        lines.append(f"  iceServers:  GET {base}/turn/get-turn-credentials (header ide: TOKEN)")
    if admin.listen is not None:
        url = f"http://{admin.listen.local()}"
        bearer = " (Authorization: Bearer admin.token)" if admin.token else ""
        lines.append(f"  health:      {url}/healthz")
        lines.append(f"  metrics:     {url}/metrics{bearer}")
    lines.append(f"  data:        {config.data_dir}")
    return "\n".join(lines)
