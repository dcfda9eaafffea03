"""The call demo page at `{prefix}/demo/` (`http.demo`).

Our own page files live next to this module, in appliance/demo/; the client libraries
it loads (@stomp/stompjs, sockjs-client) are the npm packages customers use, installed by
`npm ci --prefix appliance/demo` and served straight from node_modules, so nothing
third-party is copied into the repository.

`POST {prefix}/demo/token` mints a token for a user only in a development
setup (auth.mode jwt with the generated development key, http.listen on
loopback) and only to a request from this machine: a production appliance, or
one others can reach, never hands out tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from quart import Quart, redirect, request, send_file

from signaling.errors import SignalingError, bad_request
from signaling.http_api import envelope

from ..config.schema import is_loopback_address

DEMO_DIR = Path(__file__).parent  # the page files sit next to this module
PAGE_FILES = {
    "index.html": "text/html; charset=utf-8",
    "demo.js": "text/javascript; charset=utf-8",
    "demo.css": "text/css; charset=utf-8",
}
LIBRARIES = {
    "stomp.umd.min.js": "node_modules/@stomp/stompjs/bundles/stomp.umd.min.js",
    "sockjs.min.js": "node_modules/sockjs-client/dist/sockjs.min.js",
}
MAX_USER_ID = 100
# Set by a reverse proxy: the connection is then the proxy's, from loopback if it runs here,
# on behalf of a client anywhere.
PROXY_HEADERS = ("Forwarded", "X-Forwarded-For")


def libraries_installed(directory: Path = DEMO_DIR) -> bool:
    return all((directory / path).is_file() for path in LIBRARIES.values())


def local_request() -> bool:
    """The current request comes from this machine: a loopback peer, not relayed by a proxy,
    and addressed to a loopback name.  The last part stops DNS rebinding: a page of
    evil.example whose name the attacker points at 127.0.0.1 reaches this port from the
    user's own browser (a loopback peer, and its own origin), but its Host is evil.example."""
    return (
        is_loopback_address(request.remote_addr or "")
        and not any(name in request.headers for name in PROXY_HEADERS)
        and loopback_host(request.headers.get("Host", ""))
    )


def loopback_host(host: str) -> bool:
    """A Host header (name[:port]) that names this machine's loopback: localhost or a
    loopback address literal."""
    if host.startswith("["):  # [::1]:8443
        name = host[1 : host.find("]")] if "]" in host else ""
    elif host.count(":") == 1:  # 127.0.0.1:8443, localhost:8443
        name = host.split(":", 1)[0]
    else:  # no port (or a bare IPv6 literal, invalid anyway)
        name = host
    return name.lower() == "localhost" or is_loopback_address(name)


def install_demo(
    app: Quart, prefix: str, mint_token: Callable[[str], str] | None, directory: Path = DEMO_DIR
) -> None:
    base = f"{prefix}/demo"

    async def serve(path: Path, mimetype: str):
        if not path.is_file():
            raise SignalingError(404, "demo library not installed: run npm ci --prefix appliance/demo")
        response = await send_file(path, mimetype=mimetype)
        response.headers["Cache-Control"] = "no-cache"
        return response

    @app.get(base)
    async def demo_redirect():
        return redirect(f"{base}/")

    @app.get(f"{base}/")
    async def demo_page():
        return await serve(directory / "index.html", PAGE_FILES["index.html"])

    @app.get(f"{base}/<name>")
    async def demo_file(name: str):
        if name == "config.json":
            # True only when POST token would mint one for this very requester.
            dev_tokens = mint_token is not None and local_request()
            return envelope(
                data={
                    "prefix": prefix,
                    "devTokens": dev_tokens,
                    "librariesInstalled": libraries_installed(directory),
                }
            )
        if name not in PAGE_FILES:
            raise SignalingError(404)
        return await serve(directory / name, PAGE_FILES[name])

    @app.get(f"{base}/lib/<name>")
    async def demo_library(name: str):
        if name not in LIBRARIES:
            raise SignalingError(404)
        return await serve(directory / LIBRARIES[name], "text/javascript; charset=utf-8")

    @app.post(f"{base}/token")
    async def demo_token():
        if mint_token is None:
            raise SignalingError(
                403, "tokens are minted only with the development JWT key and a loopback http.listen"
            )
        if not local_request():
            raise SignalingError(
                403,
                "development tokens are handed out only to requests from "
                f"this machine (loopback, no proxy), not {request.remote_addr}",
            )
        body = await request.get_json(silent=True, force=True)
        user = body.get("userId") if isinstance(body, dict) else None
        if not isinstance(user, str) or not user.strip() or len(user) > MAX_USER_ID or not user.isprintable():
            raise bad_request("userId must be 1-100 printable characters")
        return envelope(data={"token": mint_token(user.strip())})
