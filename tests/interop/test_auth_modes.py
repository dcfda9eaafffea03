"""Token checking modes end to end, with stomp.py as the client: `http` (a real HTTP
introspection backend on loopback answers who a token belongs to) and `jwt`
(tokens minted by `appliance token`, expired ones refused)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import stomp
from stomp.exception import ConnectFailedException

from .conftest import start_appliance, stop_appliance


class Backend(BaseHTTPRequestHandler):
    users = {"im-token-alice": "alice"}
    asked: list[str] = []

    def do_POST(self):
        token = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["token"]
        Backend.asked.append(token)
        user = self.users.get(token)
        body = json.dumps({"code": 200, "data": {"userId": user}} if user else {"code": 401}).encode()
        self.send_response(200 if user else 401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def stomp_connect(relay, user: str, token: str):
    conn = stomp.WSConnection(
        [("127.0.0.1", relay.http_port)],
        ws_path=f"/imserver/ws?userId={user}",
        heartbeats=(0, 0),
        reconnect_attempts_max=1,
    )
    conn.connect(headers={"ide": token}, wait=True)
    return conn


@pytest.fixture
def backend():
    server = HTTPServer(("127.0.0.1", 0), Backend)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/introspect"
    server.shutdown()
    server.server_close()


def test_http_introspection_mode(tmp_path, backend):
    relay = start_appliance(
        tmp_path / "http-mode", auth={"mode": "http", "introspect_url": backend, "cache_s": 60}
    )
    try:
        conn = stomp_connect(relay, "alice", "im-token-alice")
        conn.disconnect()
        conn = stomp_connect(relay, "alice", "im-token-alice")  # answered from the cache
        conn.disconnect()
        assert Backend.asked.count("im-token-alice") == 1
        with pytest.raises(ConnectFailedException):
            stomp_connect(relay, "alice", "forged")
        with pytest.raises(ConnectFailedException):
            stomp_connect(relay, "bob", "im-token-alice")  # alice's token, bob's URL
        assert "forged" not in relay.log() and "im-token-alice" not in relay.log()
    finally:
        assert stop_appliance(relay) == 0


def test_jwt_mode_with_appliance_token(tmp_path):
    relay = start_appliance(tmp_path / "jwt-mode", auth={"mode": "jwt", "jwt_key": "k" * 40})
    config = tmp_path / "jwt-mode" / "appliance.yaml"
    try:

        def mint(user: str, ttl: int) -> str:
            return subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "appliance",
                    "token",
                    "--user",
                    user,
                    "--ttl",
                    str(ttl),
                    "--config",
                    str(config),
                ],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()

        stomp_connect(relay, "carol", mint("carol", 60)).disconnect()
        with pytest.raises(ConnectFailedException):
            stomp_connect(relay, "carol", mint("carol", -120))  # expired
        assert mint("carol", 60) not in relay.log()
    finally:
        assert stop_appliance(relay) == 0
