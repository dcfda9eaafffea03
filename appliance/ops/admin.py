"""The operators' HTTP API on its own listener (`admin.listen`, loopback by default).

    GET  /healthz               the process is up (always open: it reveals nothing)
    GET  /readyz                listeners bound, secret ring loaded, broker reachable,
                                not draining (else 503)
    GET  /metrics               Prometheus text
    GET  /admin/secrets         ids, ages and states of the ring (never the values)
    POST /admin/secrets/rotate  a new current secret; the old one stays in grace
    POST /admin/secrets/prune   drop secrets past their grace

`/metrics` and `/admin/*` need `Authorization: Bearer <admin.token>` when a
token is set.  Without one (allowed on loopback only) metrics are open and
the secret endpoints answer 403: changing secrets over HTTP always needs a
token, while `appliance secret rotate` on the machine itself does not.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from quart import Quart, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from ..credentials.ring import SecretRing, SecretRingError, prune, rotate
from ..credentials.watcher import RingWatcher
from .metrics import render

log = logging.getLogger("appliance.admin")

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class AdminContext:
    """What the admin API reads and acts on, provided by the supervisor (process.supervisor)."""

    token: str | None
    watcher: RingWatcher
    store: object  # credentials.store.FileRingStore | RedisRingStore
    grace_s: int
    activation_s: int
    registry: object  # prometheus CollectorRegistry
    readiness: Callable[[], dict[str, bool]]
    secrets_changed: Callable[[], Awaitable[None]]  # re-read the ring here and in every worker
    clock: Callable[[], float] = time.time
    refusals: Counter = field(default_factory=Counter)


class AdminRefusal(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def describe_ring(ring: SecretRing, now: float, grace_s: int, activation_s: int) -> dict:
    signing = ring.signing(now, grace_s, activation_s)
    current = ring.current()
    rows = []
    for s in sorted(ring.secrets, key=lambda s: s.created, reverse=True):
        accepted = SecretRing.still_accepted(s, now, grace_s)
        rows.append(
            {
                "id": s.id,
                "created": s.created,
                "retired": s.retired,
                "ageSeconds": int(now - s.created),
                "state": "current" if s is current else ("retired" if accepted else "expired"),
                "accepted": accepted,
                "signing": s is signing,
                "acceptedUntil": None if s.retired is None else s.retired + grace_s,
            }
        )
    return {"current": current.id, "signing": signing.id, "secrets": rows}


def create_admin_app(ctx: AdminContext) -> Quart:
    app = Quart("admin")

    def require_token() -> None:
        if ctx.token is None:
            return
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            ctx.refusals["missing_token"] += 1
            raise AdminRefusal(401, "missing bearer token")
        if not hmac.compare_digest(given.strip().encode(), ctx.token.encode()):
            ctx.refusals["wrong_token"] += 1
            log.warning("admin request with a wrong token from %s", request.remote_addr)
            raise AdminRefusal(401, "wrong bearer token")

    def require_secret_access() -> None:
        if ctx.token is None:
            raise AdminRefusal(
                403, "set admin.token to manage secrets over HTTP (or use `appliance secret` on this machine)"
            )
        require_token()

    @app.errorhandler(AdminRefusal)
    async def refused(err: AdminRefusal):
        response = jsonify({"error": err.message})
        response.status_code = err.status
        if err.status == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="appliance-admin"'
        return response

    @app.errorhandler(HTTPException)
    async def http_error(err: HTTPException):
        response = jsonify({"error": (err.name or "error").lower()})
        response.status_code = err.code or 500
        return response

    @app.errorhandler(SecretRingError)
    async def ring_error(err: SecretRingError):
        log.error("admin secret operation failed: %s", err)
        response = jsonify({"error": f"secret ring: {err}"})
        response.status_code = 500
        return response

    @app.get("/healthz")
    async def healthz():
        return jsonify({"status": "ok"})

    @app.get("/readyz")
    async def readyz():
        checks = ctx.readiness()
        ready = all(checks.values())
        response = jsonify({"ready": ready, "checks": checks})
        response.status_code = 200 if ready else 503
        return response

    @app.get("/metrics")
    async def metrics():
        require_token()
        return Response(render(ctx.registry), content_type=PROMETHEUS_TEXT)

    @app.get("/admin/secrets")
    async def list_secrets():
        require_secret_access()
        return jsonify(describe_ring(ctx.watcher.current_ring(), ctx.clock(), ctx.grace_s, ctx.activation_s))

    @app.post("/admin/secrets/rotate")
    async def rotate_secret():
        require_secret_access()
        now = ctx.clock()
        _, secret = await asyncio.to_thread(rotate, ctx.store.update, now)
        log.info("secret rotated over the admin API: new current %s", secret.id)
        await ctx.secrets_changed()
        return jsonify(
            {
                "current": secret.id,
                "signingFrom": secret.created + ctx.activation_s,
                **describe_ring(ctx.watcher.current_ring(), now, ctx.grace_s, ctx.activation_s),
            }
        )

    @app.post("/admin/secrets/prune")
    async def prune_secrets():
        require_secret_access()
        dropped = await asyncio.to_thread(prune, ctx.store.update, ctx.clock(), ctx.grace_s)
        if dropped:
            log.info("secrets pruned over the admin API: %s", ", ".join(s.id for s in dropped))
            await ctx.secrets_changed()
        return jsonify({"pruned": [s.id for s in dropped]})

    return app
