"""The `appliance` command line.

Exit codes: 0 success; 1 a runtime failure (nothing answered, a file could not
be written); 2 a configuration, secret-ring or usage error, or a listener that
cannot bind, with the key's path or the file's name on stderr.  No command prints a secret value except
`secret list --show` and `coturn-config`, whose output is meant for a file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import ssl
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from turn import stun

from .config.ephemeral_ports import warn_relay_ports_in_ephemeral_range
from .config.loader import load_config
from .config.schema import AppConfig, ConfigError, HostPort
from .credentials.coturn import coturn_config_lines
from .credentials.ice_servers import CredentialIssuer, handed_out_urls
from .credentials.ring import Secret, SecretRing, SecretRingError, prune, revoke, rotate
from .credentials.store import ring_store, safe_url
from .process.listeners import ListenerError

# Imported where they are used, for measured reasons: process.supervisor (the signaling,
# Quart and Hypercorn: about 0.3 s), wiring.auth and signaling.auth (PyJWT and httpx: about
# 70 ms), tls.devcert (cryptography: about 25 ms), and for the probe alone aiortc (an
# optional extra) and asyncio with ssl (about 30 ms).
# No other command needs them (the container's healthcheck runs every 30 s), nor does a
# spawned relay worker, which imports this module again as its __main__'s.

CONFIG_ENV = "APPLIANCE_CONFIG"  # the container's mounted file, used when --config is absent


def _config_path(arg: str | None) -> str | None:
    """--config, else $APPLIANCE_CONFIG when that file exists, else None (the defaults)."""
    if arg:
        return arg
    env = os.environ.get(CONFIG_ENV)
    return env if env and Path(env).exists() else None


def _load(arg: str | None) -> AppConfig:
    return load_config(_config_path(arg))


def _duration(seconds: float) -> str:
    """3725 -> "1h2m": the two largest units, which is what an operator reads."""
    seconds = int(max(0, seconds))
    parts = [
        (seconds // 86400, "d"),
        (seconds % 86400 // 3600, "h"),
        (seconds % 3600 // 60, "m"),
        (seconds % 60, "s"),
    ]
    shown = [f"{n}{unit}" for n, unit in parts if n][:2]
    return "".join(shown) or "0s"


def _warn_dev_key_exposed(config: AppConfig) -> None:
    """Say so on stderr when clients' tokens are checked with the generated development key
    on a listener other machines reach: whoever obtains a token signed with it, or the key
    file itself, is whichever user they like."""
    listen = config.http.listen
    if not config.auth.uses_dev_key() or listen is None or listen.is_loopback():
        return
    print(
        f"warning: http.listen {listen} is not loopback, yet clients' tokens are checked with "
        f"a development JWT key generated on this machine (under {config.data_dir}): anyone "
        "who gets a token signed with it, or the key, logs in as any user. Set auth.jwt_key "
        "(APPLIANCE__AUTH__JWT_KEY) or auth.jwt_public_key to your IM backend's key, or "
        "auth.mode http with auth.introspect_url",
        file=sys.stderr,
    )


# ------------------------------------------------------------------ commands


def cmd_check_config(args) -> int:
    config = load_config(args.file)
    _warn_dev_key_exposed(config)
    warn_relay_ports_in_ephemeral_range(config)
    t = config.turn
    relay = ", ".join(
        f"{ip} (advertised as {ext})" if ext else ip
        for ip, ext in ((t.relay_ip, config.external_ip), (t.relay_ip6, config.external_ip6))
        if ip
    )
    tls_files = (
        f"{t.tls_cert}, {t.tls_key}"
        if t.tls_cert
        else f"development certificate under {config.data_dir / 'certs'}"
    )
    print(f"ok: {args.file}")
    print(f"  listeners:   udp {t.udp or 'off'}, tcp {t.tcp or 'off'}, tls {t.tls or 'off'}")
    if t.tls:
        print(f"  tls files:   {tls_files}")
    print(
        f"  relay:       {relay or 'off'}; ports {t.relay_ports[0]}-{t.relay_ports[1]}; {t.workers} worker(s)"
    )
    print(f"  realm:       {config.realm}")
    print(
        f"  secrets:     {_ring_where(config)} (grace {_duration(config.credentials.grace_s())}, "
        f"activation {config.credentials.activation_s} s)"
    )
    print(f"  ice servers: {', '.join(handed_out_urls(config)) or 'none'}")
    h, a = config.http, config.admin
    scheme = "https" if h.tls else "http"
    print(f"  signaling:   {f'{scheme}://{h.listen}{h.prefix}' if h.listen else 'off'}")
    if h.listen:
        b = config.broker
        print(
            "  broker:      "
            + (
                f"redis {safe_url(b.url)} (prefix {b.prefix}, node ttl {b.node_ttl_s} s)"
                if b.url
                else "memory (this node alone)"
            )
        )
    print(
        f"  admin:       {a.listen or 'off'}"
        + (f" (token {'set' if a.token else 'not set: secret endpoints disabled'})" if a.listen else "")
    )
    return 0


def cmd_serve(args) -> int:
    path = _config_path(args.config)
    config = load_config(path)
    print(f"configuration: {path or 'built-in defaults'}", file=sys.stderr)
    _warn_dev_key_exposed(config)
    warn_relay_ports_in_ephemeral_range(config)
    store = ring_store(config)
    ring, created = store.ensure(time.time())
    print(
        f"secret ring: {store.where} ({'created' if created else 'loaded'}, current {ring.current().id})",
        file=sys.stderr,
    )
    from .process.supervisor import run
    from .tls.files import tls_files

    files = tls_files(config, announce=lambda line: print(line, file=sys.stderr))
    return run(config, files, path)  # `path`: read again on SIGHUP and POST /admin/reload


def _answers(listener: HostPort) -> bool:
    """Something accepts TCP connections on the listener (reached from this machine)."""
    try:
        with socket.create_connection((listener.local_host(), listener.port), timeout=0.5):
            return True
    except OSError:
        return False


def _signing_key(config: AppConfig) -> str:
    """The HS256 key tokens are signed with.  A development key created here rather than by
    `appliance serve` means this command looks at another data_dir than the server that
    made its key, so tokens signed with it would be refused there (401): say so."""
    from .wiring.auth import DEV_JWT_KEY_FILE, jwt_signing_key

    key, created = jwt_signing_key(config)
    if created:
        warning = (
            f"warning: created a new development JWT key at "
            f"{config.data_dir / DEV_JWT_KEY_FILE}; only an appliance with this "
            f"data_dir accepts tokens signed with it"
        )
        listen = config.http.listen
        if listen is not None and _answers(listen):
            warning += (
                f".  A server is answering on http.listen {listen} with another "
                "data_dir: it will refuse these tokens (401).  Pass the same --config "
                "or APPLIANCE__DATA_DIR as that server"
            )
        print(warning, file=sys.stderr)
    return key


def cmd_token(args) -> int:
    """A development JWT for a user, signed with the HS256 key the signaling checks."""
    from signaling.auth import mint_jwt

    config = _load(args.config)
    if config.auth.mode != "jwt" or config.auth.jwt_public_key is not None:
        print(
            "error: tokens can be minted only in auth.mode jwt with an HS256 key "
            "(auth.jwt_key or the development key)",
            file=sys.stderr,
        )
        return 2
    print(mint_jwt(_signing_key(config), args.user, time.time(), args.ttl))
    return 0


def _ring_where(config: AppConfig) -> str:
    c = config.credentials
    if c.store == "redis":
        return f"redis {safe_url(config.ring_redis_url())} key {c.redis_key}"
    return str(config.secrets_path())


def _existing_ring(config: AppConfig) -> SecretRing:
    store = ring_store(config)
    if not store.exists():
        raise SecretRingError(
            f"{store.where} does not exist yet; `appliance serve` creates it on first start"
        )
    return store.load()


def cmd_credentials(args) -> int:
    """What the signaling would hand this user now: the REST pair and the iceServers."""
    config = _load(args.config)
    ring = _existing_ring(config)
    issuer = CredentialIssuer.from_config(config, lambda: ring)
    if args.ttl is not None:
        issuer.ttl_s = args.ttl
    answer = issuer.issue(args.user)
    turn = next((e for e in answer["iceServers"] if e["username"] is not None), None)
    pair = {"username": turn["username"], "credential": turn["credential"]} if turn else {}
    print(json.dumps({**pair, **answer}, indent=2 if args.pretty else None))
    return 0


def _secret_state(s: Secret, ring: SecretRing, now: float, grace_s: int, signing: Secret) -> str:
    if s is ring.current():
        return "current" + ("" if s is signing else ", activating (not signing yet)")
    suffix = ", signing until the current one activates" if s is signing else ""
    if s.retired is None:
        return "previous (accepted until retired)" + suffix
    left = s.retired + grace_s - now
    since = f"retired {_duration(now - s.retired)} ago"
    return (
        f"{since}, accepted {_duration(left)} more"
        if left > 0
        else f"{since}, no longer accepted (prune removes it)"
    ) + suffix


def _print_ring(config: AppConfig, ring: SecretRing, show: bool = False) -> None:
    now = time.time()
    c = config.credentials
    signing = ring.signing(now, c.grace_s(), c.activation_s)
    print(f"{ring_store(config).where}:")
    for s in sorted(ring.secrets, key=lambda s: s.created, reverse=True):
        value = f"  {s.value}" if show else ""
        print(
            f"  {s.id:12}  created {_duration(now - s.created):>6} ago  "
            f"{_secret_state(s, ring, now, c.grace_s(), signing)}{value}"
        )


def cmd_secret_list(args) -> int:
    config = _load(args.config)
    _print_ring(config, _existing_ring(config), show=args.show)
    return 0


def cmd_secret_rotate(args) -> int:
    config = _load(args.config)
    _existing_ring(config)
    ring, secret = rotate(ring_store(config).update, time.time())
    c = config.credentials
    print(
        f"rotated: {secret.id} is the current secret; credentials are signed with it after "
        f"{c.activation_s} s, and the previous secret stays accepted for {_duration(c.grace_s())}."
    )
    print(
        "A running appliance picks the change up within seconds (or now: kill -HUP). "
        "External coturn servers need the new `appliance coturn-config` output."
    )
    _print_ring(config, ring)
    return 0


def cmd_secret_prune(args) -> int:
    config = _load(args.config)
    _existing_ring(config)
    dropped = prune(ring_store(config).update, time.time(), config.credentials.grace_s())
    print(
        f"pruned {len(dropped)} secret(s) past grace"
        + (f": {', '.join(s.id for s in dropped)}" if dropped else "")
    )
    return 0


def cmd_coturn_config(args) -> int:
    config = _load(args.config)
    print(
        "\n".join(coturn_config_lines(config, _existing_ring(config), time.time(), ring_store(config).where))
    )
    return 0


def _probe_users(config: AppConfig, args) -> list[tuple[str, str]]:
    """Two (user, token) pairs: given, minted with the HS256 key, or from static tokens."""
    given = [args.user_a, args.user_b]
    if all(given):
        return [tuple(g.split("=", 1)) for g in given]
    a = config.auth
    if a.mode == "jwt" and a.jwt_public_key is None:
        from signaling.auth import mint_jwt

        key = _signing_key(config)
        return [(u, mint_jwt(key, u, time.time(), 600)) for u in ("probe-a", "probe-b")]
    if a.mode == "static":
        pairs, seen = [], set()
        for token, user in a.tokens:
            if user not in seen:
                pairs.append((user, token))
                seen.add(user)
        if len(pairs) >= 2:
            return pairs[:2]
    raise ConfigError(
        "auth",
        "the probe cannot make tokens in this auth mode: give --user-a USER=TOKEN and --user-b USER=TOKEN",
    )


def _probe_target(config: AppConfig, args) -> tuple[str, Path | None]:
    """The signaling base URL and the CA file to trust (the development certificate)."""
    h = config.http
    if args.signaling:
        url = args.signaling
    elif h.listen is None:
        raise ConfigError("http.listen", "the signaling is off here: give --signaling URL")
    else:
        url = h.local_url()
    ca = args.ca
    if ca is None and (config.turn.tls_cert is None or config.http.tls_cert is None):
        dev = config.data_dir / "certs" / "cert.pem"
        ca = dev if dev.exists() else None
    return url, ca


def cmd_probe(args) -> int:
    try:
        from .probe.self_test import run_probe
    except ImportError as exc:
        print(
            f"error: the probe needs aiortc and websockets ({exc.name} is missing): "
            "pip install 'appliance[probe]'",
            file=sys.stderr,
        )
        return 2
    import asyncio
    import ssl

    config = _load(args.config)
    users = _probe_users(config, args)
    url, ca = _probe_target(config, args)
    if ca is not None:
        os.environ["SSL_CERT_FILE"] = str(ca)  # aioice's turns: context trusts it too
    ssl_context = (
        ssl.create_default_context(cafile=str(ca) if ca else None) if url.startswith("https") else None
    )
    report = asyncio.run(run_probe(url, users, args.turn or [], ssl_context))
    if args.json:
        print(json.dumps(report.as_dict()))
    else:
        print("\n".join(report.lines()))
    return 0 if report.failure is None else 1


def cmd_healthcheck(args) -> int:
    """STUN Binding to the relay's own listener: the container health check.  The first of
    turn.udp, turn.tcp, turn.tls and edge.listen that is on (over TLS for the last two: an
    appliance whose only TURN port is the edge is healthy when the edge answers TURN)."""
    config = _load(args.config)
    t = config.turn
    targets = (("udp", t.udp), ("tcp", t.tcp), ("tls", t.tls), ("edge", config.edge.listen))
    kind, target = next(((k, a) for k, a in targets if a is not None), ("", None))
    if target is None:
        print("healthcheck: no UDP, TCP, TLS or edge listener configured", file=sys.stderr)
        return 1
    host = target.local_host()  # a wildcard listener: loopback, e.g. inside the container
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    tid = os.urandom(12)
    request = stun.Builder(stun.BINDING, stun.REQUEST, tid).encode(fingerprint=True)
    try:
        with socket.socket(family, socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM) as raw:
            raw.settimeout(args.timeout)
            raw.connect((host, target.port))
            with _over_tls(raw) if kind in ("tls", "edge") else raw as sock:
                sock.sendall(request)
                reply = stun.parse(sock.recv(2048))
    except (OSError, stun.StunParseError) as exc:
        print(f"healthcheck: no STUN answer from {target}: {exc}", file=sys.stderr)
        return 1
    if reply.transaction_id != tid or reply.cls != stun.SUCCESS:
        print(f"healthcheck: unexpected answer from {target}", file=sys.stderr)
        return 1
    print(f"ok: {target} answers STUN")
    return 0


def _over_tls(raw: socket.socket) -> ssl.SSLSocket:
    """`raw` wrapped in TLS naming TURN by ALPN (RFC 7443), as the edge routes it.  The
    certificate is not checked: this is the appliance asking itself whether it answers."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["stun.turn"])
    return ctx.wrap_socket(raw)


def _cell(text: object, width: int = 40) -> str:
    """Client text (a user id, an address) as one table cell: escaped when it holds anything
    a terminal would act on, cut to `width`."""
    text = str(text)
    shown = text if text.isprintable() else repr(text)[1:-1]
    return shown if len(shown) <= width else shown[: width - 1] + "~"


def _admin_listing(args, path: str) -> dict | None:
    """The admin listener's answer to GET `path` (`--user` passed on); None once printed as
    JSON (`--json`), else the answer for a table."""
    params = {"user": args.user} if args.user is not None else {}
    answer = _admin_json(_load(args.config), path, params, args.timeout)
    if args.json:
        print(json.dumps(answer))
        return None
    return answer


def _print_table(rows: Sequence[Sequence[str]]) -> None:
    """`rows` (a header first) in left-aligned columns."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def cmd_sessions(args) -> int:
    """The signaling sessions of every node, as a table (or the admin's JSON)."""
    answer = _admin_listing(args, "/admin/sessions")
    if answer is None:
        return 0
    now = time.time()
    rows = [("NODE", "USER", "TRANSPORT", "ADDRESS", "CONNECTED", "IN", "OUT", "CALL")]
    for r in answer.get("sessions", []):
        rows.append(
            (
                _cell(r.get("node"), 16),
                _cell(r.get("user")),
                _cell(r.get("transport"), 24),
                _cell(r.get("address")),
                _duration(now - float(r.get("connectedSince") or now)) + " ago",
                str(r.get("messagesIn", 0)),
                str(r.get("messagesOut", 0)),
                _cell(r.get("callId"), 24) if r.get("inCall") else "-",
            )
        )
    _print_table(rows)
    nodes = answer.get("nodes", [])
    summary = f"{answer.get('count', len(rows) - 1)} session(s) on {len(nodes)} node(s)"
    if answer.get("truncated"):
        summary += "; more exist (the listing is cut)"
    if answer.get("unanswered"):
        summary += f"; no answer from {', '.join(_cell(n, 16) for n in answer['unanswered'])}"
    print(summary)
    return 0


# ------------------------------------------------------------------ revoke

DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_until(text: str, now: float) -> float:
    """`appliance revoke --until`: unix seconds ("1900000000"), ISO 8601 ("2030-01-02T03:04:05Z";
    without a zone: UTC), or a duration from now ("90s", "30m", "1h", "2d")."""
    text = text.strip()
    if text.isascii() and text.isdigit() and len(text) <= 12:
        return float(text)
    unit = DURATION_UNITS.get(text[-1:].lower())
    number = text[:-1]
    if unit is not None and number.isascii() and number.isdigit() and len(number) <= 9:
        return now + int(number) * unit
    try:
        when = datetime.datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
    except ValueError:
        raise ValueError(
            f"expected unix seconds, ISO 8601 or a duration like 1h, got {text[:40]!r}"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.timestamp()


def _until(text: str) -> float:
    try:
        return parse_until(text, time.time())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_revoke(args) -> int:
    config = _load(args.config)
    _existing_ring(config)
    record = revoke(ring_store(config).update, args.user, time.time(), args.until)
    stamp = datetime.datetime.fromtimestamp(record.until, datetime.UTC).isoformat(timespec="seconds")
    print(
        f"revoked {args.user!r}: its allocations end on every relay process following {_ring_where(config)}"
    )
    if record.until > record.issued_at:
        print(f"its credentials are refused until {stamp} ({_duration(record.until - record.issued_at)})")
    else:
        print("its credentials are not refused: new allocations are accepted")
    return 0


# ------------------------------------------------------------------ allocations


def _admin_json(config: AppConfig, path: str, params: dict[str, str], timeout_s: float) -> dict:
    """GET `path` from this machine's admin listener (admin.listen, with admin.token): the
    answer's JSON.  A refusal is an OSError naming the admin's error."""
    import urllib.error  # here: no other command needs them (see the note on imports)
    import urllib.parse
    import urllib.request

    listen = config.admin.listen
    if listen is None:
        raise ConfigError("admin.listen", f"the admin listener is off: this command asks it for {path}")
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    request = urllib.request.Request(f"http://{listen.local()}{path}{query}")
    if config.admin.token:
        request.add_header("Authorization", f"Bearer {config.admin.token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        try:
            reason = json.load(exc).get("error", exc.reason)
        except ValueError:
            reason = exc.reason
        raise OSError(f"the admin listener {listen} answered {exc.code}: {reason}") from None
    except urllib.error.URLError as exc:
        raise OSError(f"the admin listener {listen} does not answer: {exc.reason}") from None


COUNT_UNITS = ("", "k", "M", "G")
BYTE_UNITS = (" B", " kB", " MB", " GB", " TB")


def _scaled(value: float, units: Sequence[str]) -> str:
    """`value` in the largest of `units` (each 1000 times the one before) that keeps it at
    1 or more: 980 -> "980", 12345 -> "12.3k" with ("", "k", "M", "G")."""
    for unit in units[:-1]:
        if abs(value) < 999.95:
            return f"{value:.0f}{unit}" if unit == units[0] else f"{value:.1f}{unit}"
        value /= 1000
    return f"{value:.1f}{units[-1]}"


def _traffic(packets: int | None, octets: int | None) -> str:
    """One direction's relayed traffic as a table cell: "12.3k pkt 1.9 MB"."""
    return f"{_scaled(int(packets or 0), COUNT_UNITS)} pkt {_scaled(int(octets or 0), BYTE_UNITS)}"


def _kbit_per_s(bits_per_second: int | None) -> str:
    return f"{int(bits_per_second or 0) / 1000:.1f}"


def cmd_allocations(args) -> int:
    """This node's live allocations (every relay process), as a table (or the admin's JSON):
    the traffic each way since the Allocate and its current rate."""
    answer = _admin_listing(args, "/admin/allocations")
    if answer is None:
        return 0
    now = time.time()
    rows = [
        (
            *("USER", "CLIENT", "TRANSPORT", "RELAYED", "AGE", "EXPIRES IN", "PERMS", "CHANNELS"),
            *("TO PEER", "KBIT/S", "TO CLIENT", "KBIT/S"),  # relayed payload, current rate
        )
    ]
    for r in answer.get("allocations", []):
        rows.append(
            (
                _cell(r.get("user")),
                _cell(r.get("client")),
                _cell(r.get("transport"), 8),
                _cell(r.get("relayed")),
                _duration(float(r.get("ageSeconds") or 0)),
                _duration(float(r.get("expires") or now) - now),
                str(r.get("permissions", 0)),
                str(r.get("channels", 0)),
                _traffic(r.get("packetsToPeer"), r.get("bytesToPeer")),
                _kbit_per_s(r.get("bitsPerSecondToPeer")),
                _traffic(r.get("packetsToClient"), r.get("bytesToClient")),
                _kbit_per_s(r.get("bitsPerSecondToClient")),
            )
        )
    _print_table(rows)
    summary = f"{answer.get('count', len(rows) - 1)} allocation(s)"
    if answer.get("truncated"):
        summary += "; more exist (the listing is cut)"
    print(summary)
    return 0


# ------------------------------------------------------------------ parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of seconds, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _user_id(text: str) -> str:
    if not text or not text.isprintable():
        raise argparse.ArgumentTypeError("must be non-empty printable text")
    return text


def _user_token(text: str) -> str:
    user, sep, token = text.partition("=")
    if not sep or not user or not token:
        raise argparse.ArgumentTypeError("expected USER=TOKEN")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="appliance", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    config_help = f"YAML configuration (default: ${CONFIG_ENV} if that file exists, else built-in)"

    p = sub.add_parser("serve", help="run the appliance")
    p.add_argument("--config", metavar="FILE", help=config_help)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("check-config", help="validate a configuration file and summarise it")
    p.add_argument("file", metavar="FILE")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("credentials", help="print TURN REST credentials for a user (JSON)")
    p.add_argument("--user", required=True, type=_user_id, metavar="ID")
    p.add_argument(
        "--ttl", type=_positive_int, metavar="S", help="lifetime in seconds (default: credentials.ttl_s)"
    )
    p.add_argument("--pretty", action="store_true", help="indent the JSON")
    p.add_argument("--config", metavar="FILE", help=config_help)
    p.set_defaults(func=cmd_credentials)

    p = sub.add_parser("secret", help="the shared-secret ring")
    secret_sub = p.add_subparsers(dest="secret_command", required=True, metavar="ACTION")
    q = secret_sub.add_parser("list", help="ids, ages and states (values only with --show)")
    q.add_argument("--show", action="store_true", help="print the secret values too")
    q.add_argument("--config", metavar="FILE", help=config_help)
    q.set_defaults(func=cmd_secret_list)
    q = secret_sub.add_parser(
        "rotate", help="make a new current secret; the old one stays accepted for credentials.secret_grace_s"
    )
    q.add_argument("--config", metavar="FILE", help=config_help)
    q.set_defaults(func=cmd_secret_rotate)
    q = secret_sub.add_parser("prune", help="drop secrets past their grace")
    q.add_argument("--config", metavar="FILE", help=config_help)
    q.set_defaults(func=cmd_secret_prune)

    p = sub.add_parser(
        "coturn-config",
        help="turnserver.conf lines that make a coturn accept exactly this appliance's credentials",
    )
    p.add_argument("--config", metavar="FILE", help=config_help)
    p.set_defaults(func=cmd_coturn_config)

    p = sub.add_parser("token", help="mint a development JWT for a user")
    p.add_argument("--user", required=True)
    p.add_argument("--ttl", type=int, default=86400, help="seconds (default 86400)")
    p.add_argument("--config")
    p.set_defaults(func=cmd_token)

    p = sub.add_parser(
        "probe",
        help="end-to-end self-test: two aiortc users call each other "
        "relay-only through the signaling and the relay",
    )
    p.add_argument("--config", metavar="FILE", help=config_help)
    p.add_argument(
        "--signaling",
        metavar="URL",
        help="signaling base URL, e.g. https://turn.example.com:8443/imserver "
        "(default: http.listen and http.prefix)",
    )
    p.add_argument(
        "--turn",
        metavar="URL",
        action="append",
        help="TURN URL to test instead of the ones handed out (repeatable)",
    )
    p.add_argument("--user-a", metavar="USER=TOKEN", type=_user_token)
    p.add_argument("--user-b", metavar="USER=TOKEN", type=_user_token)
    p.add_argument("--ca", metavar="FILE", type=Path, help="CA certificate to trust for TLS")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("sessions", help="signaling sessions of every node, from the admin listener")
    p.add_argument("--user", type=_user_id, metavar="ID", help="only this user's sessions")
    p.add_argument("--json", action="store_true", help="print the admin API's JSON answer")
    p.add_argument("--timeout", type=float, default=5.0, metavar="S")
    p.add_argument("--config", metavar="FILE", help=config_help)
    p.set_defaults(func=cmd_sessions)

    p = sub.add_parser(
        "revoke", help="end a user's allocations and refuse its credentials (every node sharing the ring)"
    )
    p.add_argument("--user", required=True, type=_user_id, metavar="ID")
    p.add_argument(
        "--until",
        type=_until,
        metavar="TIME",
        help="refuse its credentials until TIME: unix seconds, ISO 8601 (UTC if no zone) or a "
        "duration like 1h (default: end live allocations only)",
    )
    p.add_argument("--config", metavar="FILE", help=config_help)
    p.set_defaults(func=cmd_revoke)

    p = sub.add_parser("allocations", help="live TURN allocations of this node, from the admin listener")
    p.add_argument("--user", type=_user_id, metavar="ID", help="only this user's allocations")
    p.add_argument("--json", action="store_true", help="print the admin API's JSON answer")
    p.add_argument("--timeout", type=float, default=5.0, metavar="S")
    p.add_argument("--config", metavar="FILE", help=config_help)
    p.set_defaults(func=cmd_allocations)

    p = sub.add_parser("healthcheck", help="STUN Binding to the configured listener (health check)")
    p.add_argument("--config", metavar="FILE", help=config_help)
    p.add_argument("--timeout", type=float, default=2.0, metavar="S")
    p.set_defaults(func=cmd_healthcheck)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, ListenerError) as exc:  # a listener that cannot bind: its key
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except SecretRingError as exc:
        print(f"error: secret ring: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
