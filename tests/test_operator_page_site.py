"""The operator page's serving on the admin app (Quart's test client): `/` and `/admin`
redirect to `/admin/`; the page's files and the charting library go out without a token,
each with a strict Content-Security-Policy (no inline script, no eval, this origin only),
nosniff and no-store; any other name is a 404, with no way out of the page's directory;
the data behind the page still needs the token.  The page reads user ids only through
textContent (never innerHTML), and no script or style is inline in its HTML."""

from __future__ import annotations

import re

import pytest
from quart import Quart

from appliance.ops.console.site import CONSOLE_DIR, LIBRARIES, PAGE_FILES, install_console, library_installed

from .test_admin import BEARER, make_admin

PAGE_PATHS = ["/admin/", "/admin/console/console.js", "/admin/console/console.css"]


def csp_directives(header: str) -> dict[str, list[str]]:
    directives = {}
    for part in header.split(";"):
        name, *values = part.split()
        directives[name] = values
    return directives


async def test_root_and_admin_redirect_to_the_page(tmp_path):
    client, *_ = make_admin(tmp_path)
    for path in ("/", "/admin"):
        response = await client.get(path)
        assert response.status_code in (301, 302, 308) and response.headers["Location"].endswith("/admin/")


async def test_page_files_need_no_token_and_carry_a_strict_policy(tmp_path):
    client, *_ = make_admin(tmp_path)
    for path in PAGE_PATHS:
        response = await client.get(path)  # no Authorization header
        assert response.status_code == 200, path
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Cache-Control"] == "no-store"
        policy = csp_directives(response.headers["Content-Security-Policy"])
        assert policy["default-src"] == ["'none'"]
        assert policy["script-src"] == ["'self'"]  # no 'unsafe-inline', no 'unsafe-eval'
        assert policy["style-src"] == ["'self'"] and policy["connect-src"] == ["'self'"]
        assert policy["frame-ancestors"] == ["'none'"] and policy["form-action"] == ["'none'"]
    page = await client.get("/admin/")
    assert page.mimetype == "text/html"
    script = await client.get("/admin/console/console.js")
    assert script.mimetype == "text/javascript" and b"sessionStorage" in await script.get_data()
    assert (await client.get("/admin/console/console.css")).mimetype == "text/css"


async def test_the_data_behind_the_page_still_needs_the_token(tmp_path):
    client, *_ = make_admin(tmp_path)
    assert (await client.get("/metrics")).status_code == 401
    assert (await client.get("/admin/secrets")).status_code == 401
    assert (await client.get("/metrics", headers=BEARER)).status_code == 200


async def test_other_names_are_not_found(tmp_path):
    client, *_ = make_admin(tmp_path)
    for path in (
        "/admin/console/site.py",
        "/admin/console/__init__.py",
        "/admin/console/../site.py",
        "/admin/console/%2e%2e%2fsite.py",
        "/admin/console/lib/other.js",
        "/admin/console/lib/..%2f..%2fpackage.json",
        "/admin/console/index.htm",
        "/admin/nothing",
    ):
        response = await client.get(path)
        assert response.status_code == 404, path
        assert b"import" not in await response.get_data(), path


async def test_the_charting_library_is_served_from_node_modules(tmp_path):
    if not library_installed():
        pytest.skip("npm ci --prefix appliance/demo has not run")
    client, *_ = make_admin(tmp_path)
    for name in LIBRARIES:
        response = await client.get(f"/admin/console/lib/{name}")
        assert response.status_code == 200, name
        assert len(await response.get_data()) > 1000
        assert "Content-Security-Policy" in response.headers
    assert (await client.get("/admin/console/lib/uPlot.iife.min.js")).mimetype == "text/javascript"


async def test_a_missing_library_is_a_404_not_a_crash(tmp_path):
    app = Quart("bare")
    install_console(app, library_dir=tmp_path)
    client = app.test_client()
    assert (await client.get("/admin/console/lib/uPlot.iife.min.js")).status_code == 404
    assert (await client.get("/admin/")).status_code == 200


def test_no_inline_script_or_style_and_no_markup_from_data():
    html = (CONSOLE_DIR / "index.html").read_text()
    assert re.findall(r"<script\b[^>]*>", html) == [
        '<script src="console/lib/uPlot.iife.min.js">',
        '<script src="console/console.js">',
    ]
    assert "<style" not in html and " style=" not in html and not re.search(r"\son\w+=", html)
    script = (CONSOLE_DIR / "console.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in script, sink
    assert set(PAGE_FILES) == {p.name for p in CONSOLE_DIR.iterdir() if p.suffix in (".html", ".js", ".css")}
