"""The operators' HTTP API on its own listener (`admin.listen`, loopback by default).

    GET  /admin/                the operator page (ops/console: live charts of /metrics, the
                                tables below with their buttons); `/` redirects there.  Its
                                files are open (they hold no data), what it shows is asked
                                with the token
    GET  /healthz               the process is up (always open: it reveals nothing)
    GET  /readyz                listeners bound, secret ring loaded, broker reachable,
                                not draining (else 503)
    GET  /metrics               Prometheus text
    GET  /admin/secrets         ids, ages and states of the ring (never the values)
    POST /admin/secrets/rotate  a new current secret; the old one stays in grace
    POST /admin/secrets/prune   drop secrets past their grace
    GET  /admin/sessions[?user=ID]  signaling sessions of every node (with the Redis broker)
    DELETE /admin/sessions?user=ID  disconnect the user's sessions on every node (ERROR frame)
    GET  /admin/calls           live calls of every node, each by the node that owns it
    GET  /admin/allocations[?user=ID]  live allocations of this node, every relay process
                                (user, username expiry, client address and transport,
                                relayed address, created, expires, permissions, channels,
                                relayed payload since the Allocate: packetsToPeer, bytesToPeer,
                                packetsToClient, bytesToClient; the rate each way over the
                                last second: bitsPerSecondToPeer, bitsPerSecondToClient)
    GET  /admin/revocations     revoked users in force (user, issuedAt, until)
    POST /admin/revocations     {"user": ID, "until": epoch|null}: end the user's allocations on
                                every relay process sharing the ring store, and refuse its
                                credentials until `until` (null: end live allocations only)
    DELETE /admin/allocations?user=ID  end the user's live allocations (the same, until = now)
    POST /admin/reload          read the configuration file again, as SIGHUP does:
                                {"result": applied|unchanged|refused, "applied": [keys],
                                "needsRestart": [keys], "error"}; 422 when refused

`/metrics` and `/admin/*` need `Authorization: Bearer <admin.token>` when a
token is set.  Without one (allowed on loopback only) metrics are open and
the secret endpoints, POST /admin/revocations and DELETE /admin/sessions and
/admin/allocations answer 403: changing secrets or disconnecting and revoking users
over HTTP always needs a token, while `appliance secret rotate` and `appliance revoke`
on the machine itself do not.  Listings hold at most oversight.MAX_ROWS rows
(`truncated` says more existed); user ids and addresses are client text, escaped
by the JSON encoder and by `loggable` in log lines.
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

from signaling.client_text import loggable
from signaling.oversight import MAX_ROWS, Listing, Oversight, OversightBusy

from ..credentials.ring import MAX_USER_CHARS as MAX_REVOKED_USER_CHARS
from ..credentials.ring import SecretRing, SecretRingError, prune, revoke, rotate
from ..credentials.store import FileRingStore, RedisRingStore
from ..credentials.watcher import RingWatcher
from .console.site import install_console
from .metrics import render

log = logging.getLogger("appliance.admin")

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class AdminContext:
    """What the admin API reads and acts on, provided by the supervisor (process.supervisor)."""

    token: str | None
    watcher: RingWatcher
    store: FileRingStore | RedisRingStore
    grace_s: int
    activation_s: int
    registry: object  # prometheus CollectorRegistry
    readiness: Callable[[], dict[str, bool]]
    secrets_changed: Callable[[], Awaitable[None]]  # re-read the ring here and in every worker
    clock: Callable[[], float] = time.time
    refusals: Counter = field(default_factory=Counter)
    signaling: Oversight | None = None  # None: no signaling on this node
    # This node's live allocations and whether a process had more than it listed; None: no relay.
    allocations: Callable[[], tuple[list[dict], bool]] | None = None
    # Read the configuration file again (process.config_reload): the outcome as JSON
    # ({"result": ..., ...}); None: nothing to reload here.
    reload_config: Callable[[], dict] | None = None


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


MAX_USER_CHARS = 1024  # longer than any user id the signaling accepts
MAX_BODY_BYTES = 4096  # a revocation is a user id and a time


def describe_revocations(ring: SecretRing, now: float) -> dict:
    """The revocations in force, newest first."""
    rows = [
        {"user": r.user, "issuedAt": r.issued_at, "until": r.until, "refusing": r.refuses(now)}
        for r in sorted(ring.in_force(now), key=lambda r: r.issued_at, reverse=True)
    ]
    return {"revocations": rows, "count": len(rows)}


def listing_json(listing: Listing, key: str, node: str) -> dict:
    """A Listing as the admin API answers it: the rows under `key`, who answered."""
    return {
        "node": node,
        key: listing.rows,
        "count": len(listing.rows),
        "truncated": listing.truncated,
        "nodes": listing.nodes,
        "unanswered": listing.unanswered,
    }


def create_admin_app(ctx: AdminContext) -> Quart:
    app = Quart("admin")
    install_console(app)

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

    def require_action_access() -> None:
        if ctx.token is None:
            raise AdminRefusal(403, "set admin.token to disconnect or revoke users over HTTP")
        require_token()

    def oversight() -> Oversight:
        if ctx.signaling is None:
            raise AdminRefusal(404, "no signaling on this node (http.listen is off)")
        return ctx.signaling

    def user_arg(required: bool) -> str | None:
        user = request.args.get("user")
        if user is None or user == "":
            if required:
                raise AdminRefusal(400, "name the user: ?user=ID")
            return None
        if len(user) > MAX_USER_CHARS:
            raise AdminRefusal(400, f"user must be at most {MAX_USER_CHARS} characters")
        return user

    def limit_arg() -> int:
        text = request.args.get("limit")
        if text is None:
            return MAX_ROWS
        if not text.isdigit() or not 1 <= int(text) <= MAX_ROWS:
            raise AdminRefusal(400, f"limit must be a whole number from 1 to {MAX_ROWS}")
        return int(text)

    @app.errorhandler(OversightBusy)
    async def busy(err: OversightBusy):
        response = jsonify({"error": "too many questions to the other nodes at once; try again"})
        response.status_code = 503
        response.headers["Retry-After"] = "1"
        return response

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

    @app.get("/admin/sessions")
    async def list_sessions():
        require_token()
        over = oversight()
        listing = await over.sessions(user_arg(required=False), limit_arg())
        return jsonify(listing_json(listing, "sessions", over.node))

    @app.delete("/admin/sessions")
    async def disconnect_sessions():
        require_action_access()
        over = oversight()
        user = user_arg(required=True)
        assert user is not None  # required
        result = await over.disconnect(user)
        log.warning(
            "admin: disconnect of user %s: %d session(s) on %d node(s)%s",
            loggable(user),
            result.total,
            len(result.per_node),
            f", no answer from {len(result.unanswered)}" if result.unanswered else "",
        )
        return jsonify(
            {
                "user": user,
                "disconnected": result.total,
                "perNode": result.per_node,
                "unanswered": result.unanswered,
            }
        )

    @app.get("/admin/allocations")
    async def list_allocations():
        require_token()
        if ctx.allocations is None:
            raise AdminRefusal(404, "no relay on this node")
        user, limit = user_arg(required=False), limit_arg()
        rows, truncated = ctx.allocations()
        now = ctx.clock()
        if user is not None:
            rows = [row for row in rows if row["user"] == user]
        rows = sorted(rows, key=lambda row: row["created"])
        shown = [{**row, "ageSeconds": max(0, int(now - row["created"]))} for row in rows[:limit]]
        return jsonify(
            {"allocations": shown, "count": len(shown), "truncated": truncated or len(rows) > limit}
        )

    async def revoke_user(user: str, until: float | None) -> dict:
        if len(user) > MAX_REVOKED_USER_CHARS or not user.isprintable():
            raise AdminRefusal(
                400, f"user must be printable text of at most {MAX_REVOKED_USER_CHARS} characters"
            )
        record = await asyncio.to_thread(revoke, ctx.store.update, user, ctx.clock(), until)
        log.warning(
            "admin: user %s revoked: allocations before %.3f end, credentials refused until %.0f",
            loggable(user),
            record.issued_at,
            record.until,
        )
        await ctx.secrets_changed()  # every relay process reads the ring now, not at its next poll
        return {"user": record.user, "issuedAt": record.issued_at, "until": record.until}

    @app.get("/admin/revocations")
    async def list_revocations():
        require_token()
        return jsonify(describe_revocations(ctx.watcher.current_ring(), ctx.clock()))

    @app.post("/admin/revocations")
    async def post_revocation():
        require_action_access()
        request.max_content_length = MAX_BODY_BYTES
        body = await request.get_json(force=True, silent=True)
        if not isinstance(body, dict) or not isinstance(body.get("user"), str) or not body["user"]:
            raise AdminRefusal(400, 'send {"user": ID, "until": unix seconds or null}')
        until = body.get("until")
        if until is not None and (
            not isinstance(until, (int, float)) or isinstance(until, bool) or not 0 <= until < 2**40
        ):
            raise AdminRefusal(400, "until must be unix seconds or null")
        return jsonify(await revoke_user(body["user"], until))

    @app.delete("/admin/allocations")
    async def end_allocations():
        require_action_access()
        user = user_arg(required=True)
        assert user is not None  # required
        return jsonify(await revoke_user(user, None))

    @app.post("/admin/reload")
    async def reload_config():
        if ctx.token is None:
            raise AdminRefusal(403, "set admin.token to reload over HTTP (or send SIGHUP on this machine)")
        require_token()
        if ctx.reload_config is None:
            raise AdminRefusal(404, "no configuration reload in this process")
        outcome = ctx.reload_config()
        response = jsonify(outcome)
        response.status_code = 422 if outcome["result"] == "refused" else 200
        return response

    @app.get("/admin/calls")
    async def list_calls():
        require_token()
        over = oversight()
        listing = await over.live_calls(limit_arg())
        return jsonify(listing_json(listing, "calls", over.node))

    return app
