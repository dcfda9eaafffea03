"""The operator page at `/admin/` on the admin listener (`/` redirects there).

The page's files hold no data and are served without a token; every figure and table the
page shows comes from the admin API (`/metrics`, `/admin/*`), which it asks with the bearer
token the operator enters once (kept in the tab's sessionStorage).  The charting library
(uPlot) is the npm package, installed by `npm ci --prefix appliance/demo` with the demo
page's libraries and served straight from that node_modules, so nothing third-party is
copied into the repository.

Every file goes out with a Content-Security-Policy that allows scripts, styles and fetches
from this origin only (no inline script, no eval, no frames, no form posts), nosniff and
no-store: the page shows user ids and addresses, which are client text, and a policy that
forbids inline script is what keeps a markup mistake from becoming script execution.
"""

from __future__ import annotations

from pathlib import Path

from quart import Quart, Response, redirect, send_file
from werkzeug.exceptions import NotFound

from ...demo.site import DEMO_DIR

CONSOLE_DIR = Path(__file__).parent  # the page files sit next to this module
PAGE = "/admin/"
ASSETS = "/admin/console"  # the page's own files and, under lib/, the library's
PAGE_FILES = {
    "index.html": "text/html; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
}
LIBRARIES = {
    "uPlot.iife.min.js": ("node_modules/uplot/dist/uPlot.iife.min.js", "text/javascript; charset=utf-8"),
    "uPlot.min.css": ("node_modules/uplot/dist/uPlot.min.css", "text/css; charset=utf-8"),
}
CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "connect-src 'self'",
        "img-src 'self' data:",  # the empty data: favicon
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def library_installed(library_dir: Path = DEMO_DIR) -> bool:
    return all((library_dir / path).is_file() for path, _ in LIBRARIES.values())


def install_console(app: Quart, page_dir: Path = CONSOLE_DIR, library_dir: Path = DEMO_DIR) -> None:
    """The page's routes on the admin app: `/` and `/admin` redirect to `/admin/`."""

    async def serve(path: Path, mimetype: str) -> Response:
        if not path.is_file():
            raise NotFound()
        response = await send_file(path, mimetype=mimetype)
        response.headers.update(HEADERS)
        return response

    @app.get("/")
    async def console_root():
        return redirect(PAGE)

    @app.get("/admin")
    async def console_redirect():
        return redirect(PAGE)

    @app.get(PAGE)
    async def console_page():
        return await serve(page_dir / "index.html", PAGE_FILES["index.html"])

    @app.get(f"{ASSETS}/<name>")
    async def console_file(name: str):
        if name not in PAGE_FILES:
            raise NotFound()
        return await serve(page_dir / name, PAGE_FILES[name])

    @app.get(f"{ASSETS}/lib/<name>")
    async def console_library(name: str):
        if name not in LIBRARIES:
            raise NotFound()
        path, mimetype = LIBRARIES[name]
        return await serve(library_dir / path, mimetype)
