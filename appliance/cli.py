"""The `appliance` command line."""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

from turn import stun
from turn.auth import rest_password, rest_username

from .config import AppConfig, ConfigError, load_config
from .secret_ring import SecretRingError, ensure_ring, load_ring

CONFIG_ENV = "APPLIANCE_CONFIG"


def _config_path(arg: str | None) -> str | None:
    """--config, else $APPLIANCE_CONFIG when that file exists (the container's volume)."""
    if arg:
        return arg
    env = os.environ.get(CONFIG_ENV)
    return env if env and Path(env).exists() else None


def _load(arg: str | None) -> AppConfig:
    return load_config(_config_path(arg))


def cmd_check_config(args) -> int:
    config = load_config(args.file)
    t = config.turn
    print(f"ok: {args.file}")
    print(f"  turn: udp={t.udp} tcp={t.tcp} tls={t.tls} relay={t.relay_ip},{t.relay_ip6} "
          f"ports={t.relay_ports[0]}-{t.relay_ports[1]} workers={t.workers}")
    print(f"  realm={config.realm} data_dir={config.data_dir} secrets={config.secrets_path()}")
    return 0


def cmd_serve(args) -> int:
    config = _load(args.config)
    ring, created = ensure_ring(config.secrets_path(), time.time())
    print(f"secret ring: {config.secrets_path()} ({'created' if created else 'loaded'}, "
          f"{len(ring.secrets)} secret(s))", file=sys.stderr)
    cert, key = config.turn.tls_cert, config.turn.tls_key
    if config.turn.tls is not None and cert is None:
        from .devcert import ensure_dev_certificate
        cert, key, made = ensure_dev_certificate(config.data_dir / "certs")
        print(f"development TLS certificate: {cert} ({'created' if made else 'reused'}); "
              "set turn.tls_cert/tls_key for production", file=sys.stderr)
    from .server import run
    return run(config, cert, key)


def cmd_credentials(args) -> int:
    config = _load(args.config)
    ring = load_ring(config.secrets_path())
    ttl = args.ttl or config.credentials.ttl_s
    username = rest_username(args.user, time.time(), ttl)
    print(json.dumps({"username": username,
                      "credential": rest_password(ring.current().value.encode(), username),
                      "ttl": ttl}))
    return 0


def cmd_secret_list(args) -> int:
    config = _load(args.config)
    ring = load_ring(config.secrets_path())
    current = ring.current()
    now = time.time()
    for s in sorted(ring.secrets, key=lambda s: s.created, reverse=True):
        state = "current" if s is current else ("retired" if s.retired else "previous")
        print(f"{s.id}  {state:8}  age {int(now - s.created)}s")
    return 0


def cmd_probe(args) -> int:
    """STUN Binding to the relay's own listener: the container health check."""
    config = _load(args.config)
    t = config.turn
    target = t.udp or t.tcp
    if target is None:
        print("probe: no UDP or TCP listener configured", file=sys.stderr)
        return 1
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(target.host, target.host)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    tid = os.urandom(12)
    request = stun.Builder(stun.BINDING, stun.REQUEST, tid).encode(fingerprint=True)
    kind = socket.SOCK_DGRAM if t.udp else socket.SOCK_STREAM
    try:
        with socket.socket(family, kind) as sock:
            sock.settimeout(args.timeout)
            sock.connect((host, target.port))
            sock.sendall(request)
            reply = stun.parse(sock.recv(2048))
    except (OSError, stun.StunParseError) as exc:
        print(f"probe: no STUN answer from {target}: {exc}", file=sys.stderr)
        return 1
    if reply.transaction_id != tid or reply.cls != stun.SUCCESS:
        print(f"probe: unexpected answer from {target}", file=sys.stderr)
        return 1
    print(f"ok: {target} answers STUN")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="appliance", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the appliance")
    p.add_argument("--config", help="YAML configuration (default: embedded defaults)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("check-config", help="validate a configuration file")
    p.add_argument("file")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("credentials", help="print TURN REST credentials for a user")
    p.add_argument("--user", required=True)
    p.add_argument("--ttl", type=int, help="seconds (default credentials.ttl_s)")
    p.add_argument("--config")
    p.set_defaults(func=cmd_credentials)

    p = sub.add_parser("secret", help="the shared-secret ring")
    secret_sub = p.add_subparsers(dest="secret_command", required=True)
    q = secret_sub.add_parser("list", help="ids, ages and states (never the secrets)")
    q.add_argument("--config")
    q.set_defaults(func=cmd_secret_list)

    p = sub.add_parser("probe", help="STUN Binding to the configured listener (health check)")
    p.add_argument("--config")
    p.add_argument("--timeout", type=float, default=2.0)
    p.set_defaults(func=cmd_probe)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except SecretRingError as exc:
        print(f"error: secret ring: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
