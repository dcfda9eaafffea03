"""`appliance sessions`: asks the admin listener (admin.listen, with admin.token) and prints
a table whose client text cannot drive the terminal; refusals and silence are exit 1, an
admin listener that is off is exit 2.  The admin listener is a stub HTTP server here (the
real one answers in tests/test_oversight.py and tests/interop/test_stomp_py.py)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from appliance.cli import main

TOKEN = "s" * 24
ANSWER = {
    "node": "n1",
    "sessions": [
        {
            "node": "n1",
            "user": "alice",
            "session": "a-1",
            "transport": "websocket",
            "address": "127.0.0.1:5000",
            "connectedSince": 1.0,
            "messagesIn": 3,
            "messagesOut": 4,
            "inCall": True,
            "callId": "c-9",
        },
        {
            "node": "n2",
            "user": "eve\x1b[2J\n",
            "session": "e-1",
            "transport": "sockjs-xhr",
            "address": "[::1]:6000",
            "connectedSince": 2.0,
            "messagesIn": 0,
            "messagesOut": 0,
            "inCall": False,
            "callId": None,
        },
    ],
    "count": 2,
    "truncated": False,
    "nodes": ["n1", "n2"],
    "unanswered": [],
}


@pytest.fixture
def admin_stub():
    seen: list[tuple[str, str | None]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append((self.path, self.headers.get("Authorization")))
            good = self.headers.get("Authorization") == f"Bearer {TOKEN}"
            body = json.dumps(ANSWER if good else {"error": "wrong bearer token"}).encode()
            self.send_response(200 if good else 401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], seen
    server.shutdown()
    server.server_close()
    thread.join(5)


def config_file(tmp_path, port: int | None, token: str | None = TOKEN) -> str:
    path = tmp_path / "appliance.yaml"
    lines = [f"data_dir: {tmp_path}", "admin:", f"  listen: {f'127.0.0.1:{port}' if port else 'null'}"]
    if token:
        lines.append(f"  token: {token}")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_sessions_prints_a_table_with_escaped_client_text(tmp_path, admin_stub, capsys):
    port, seen = admin_stub
    assert main(["sessions", "--user", "alice", "--config", config_file(tmp_path, port)]) == 0
    assert seen == [("/admin/sessions?user=alice", f"Bearer {TOKEN}")]
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["NODE", "USER", "TRANSPORT", "ADDRESS", "CONNECTED", "IN", "OUT", "CALL"]
    assert lines[1].split()[:4] == ["n1", "alice", "websocket", "127.0.0.1:5000"]
    assert lines[1].split()[-3:] == ["3", "4", "c-9"]
    assert "\x1b" not in out and "eve\\x1b[2J\\n" in lines[2]
    assert lines[-1] == "2 session(s) on 2 node(s)"


def test_sessions_json_is_the_admin_answer(tmp_path, admin_stub, capsys):
    port, _ = admin_stub
    assert main(["sessions", "--json", "--config", config_file(tmp_path, port)]) == 0
    assert json.loads(capsys.readouterr().out) == ANSWER


def test_sessions_refused_silent_or_off(tmp_path, admin_stub, capsys):
    port, _ = admin_stub
    assert main(["sessions", "--config", config_file(tmp_path, port, token="w" * 24)]) == 1
    assert "401: wrong bearer token" in capsys.readouterr().err
    (tmp_path / "dead").mkdir()
    with socket_port() as dead:
        assert main(["sessions", "--timeout", "2", "--config", config_file(tmp_path / "dead", dead)]) == 1
    assert "does not answer" in capsys.readouterr().err
    (tmp_path / "off").mkdir()
    assert main(["sessions", "--config", config_file(tmp_path / "off", None)]) == 2
    assert "admin.listen" in capsys.readouterr().err


class socket_port:
    """A loopback port nobody listens on (bound, not listening, for the block's length)."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return self.sock.getsockname()[1]

    def __exit__(self, *exc) -> None:
        self.sock.close()
