"""The demo page's routes: page, own files and the npm-installed libraries served; the
config the page reads; tokens minted only with the development JWT key, on a loopback
listener, for a request from loopback; nothing served when `http.demo` is off."""

from __future__ import annotations

import pytest

from appliance.config.loader import load_config
from appliance.demo.site import LIBRARIES, install_demo, libraries_installed
from appliance.wiring.auth import dev_token_minter, token_verifier
from appliance.wiring.signaling import signaling_app
from signaling.app import create_app
from signaling.auth import StaticVerifier
from signaling.stomp import Limits


def peer(address: str) -> dict:
    """The ASGI scope of a request whose connection comes from `address`."""
    return {"client": (address, 50123)}


LOCAL = peer("127.0.0.1")


def config_of(tmp_path, text: str = ""):
    path = tmp_path / "appliance.yaml"
    path.write_text(f"data_dir: {tmp_path / 'data'}\n" + text)
    return load_config(path, {})


def bare_app(tmp_path, minter=None, directory=None):
    app = create_app("/imserver", StaticVerifier({"t": "alice"}), Limits(), 64).web
    kwargs = {"directory": directory} if directory else {}
    install_demo(app, "/imserver", minter, **kwargs)
    return app.test_client()


async def test_page_and_own_files_are_served(tmp_path):
    client = bare_app(tmp_path)
    redirect = await client.get("/imserver/demo")
    assert redirect.status_code in (301, 302) and redirect.headers["Location"].endswith("/imserver/demo/")
    page = await client.get("/imserver/demo/")
    assert page.status_code == 200 and page.mimetype == "text/html"
    assert b'src="lib/stomp.umd.min.js"' in await page.get_data()
    script = await client.get("/imserver/demo/demo.js")
    assert script.mimetype == "text/javascript" and b"get-turn-credentials" in await script.get_data()
    assert (await client.get("/imserver/demo/../pyproject.toml")).status_code == 404
    assert (await client.get("/imserver/demo/package.json")).status_code == 404


async def test_libraries_come_from_node_modules(tmp_path):
    if not libraries_installed():
        pytest.skip("npm ci --prefix appliance/demo has not run")
    client = bare_app(tmp_path)
    for name in LIBRARIES:
        response = await client.get(f"/imserver/demo/lib/{name}")
        assert response.status_code == 200 and len(await response.get_data()) > 10_000
    assert (await client.get("/imserver/demo/lib/other.js")).status_code == 404


async def test_missing_libraries_say_how_to_install_them(tmp_path):
    client = bare_app(tmp_path, directory=tmp_path)
    response = await client.get("/imserver/demo/lib/sockjs.min.js")
    assert response.status_code == 404
    assert "npm ci --prefix appliance/demo" in (await response.get_json())["msg"]
    config = await (await client.get("/imserver/demo/config.json")).get_json()
    assert config["data"]["librariesInstalled"] is False


async def test_dev_tokens_are_minted_only_with_the_development_key(tmp_path):
    dev = config_of(tmp_path)
    minter = dev_token_minter(dev)
    assert minter is not None
    client = signaling_app(dev).web.test_client()
    config = await (await client.get("/imserver/demo/config.json", scope_base=LOCAL)).get_json()
    assert config["data"] == {
        "prefix": "/imserver",
        "devTokens": True,
        "librariesInstalled": libraries_installed(),
    }
    answer = await (
        await client.post("/imserver/demo/token", json={"userId": "alice"}, scope_base=LOCAL)
    ).get_json()
    assert await token_verifier(dev).verify(answer["data"]["token"]) == "alice"
    bad = await client.post("/imserver/demo/token", json={"userId": ""}, scope_base=LOCAL)
    assert (await bad.get_json())["code"] == 400

    own_key = config_of(tmp_path, "auth: {jwt_key: " + "k" * 40 + "}\n")
    assert dev_token_minter(own_key) is None
    refused = (
        await signaling_app(own_key)
        .web.test_client()
        .post("/imserver/demo/token", json={"userId": "alice"}, scope_base=LOCAL)
    )
    assert refused.status_code == 403


@pytest.mark.parametrize(
    "listen, mints",
    [
        ("127.0.0.1:8443", True),
        ("127.0.0.2:8443", True),
        ("'[::1]:8443'", True),
        ("0.0.0.0:8443", False),
        ("'[::]:8443'", False),
        ("192.0.2.10:8443", False),
    ],
)
async def test_dev_tokens_need_a_loopback_listener(tmp_path, listen, mints):
    config = config_of(tmp_path, f"http: {{listen: {listen}}}\n")
    assert (dev_token_minter(config) is not None) is mints
    client = signaling_app(config).web.test_client()
    page = await (await client.get("/imserver/demo/config.json", scope_base=LOCAL)).get_json()
    assert page["data"]["devTokens"] is mints  # the page offers only what works
    answer = await client.post("/imserver/demo/token", json={"userId": "alice"}, scope_base=LOCAL)
    assert answer.status_code == (200 if mints else 403)
    if not mints:
        assert (await answer.get_json())[
            "msg"
        ] == "tokens are minted only with the development JWT key and a loopback http.listen"


@pytest.mark.parametrize(
    "address, local",
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("10.0.0.5", False),
        ("203.0.113.9", False),
        ("::ffff:10.0.0.5", False),
        ("2001:db8::1", False),
        ("<local>", False),  # Quart's stand-in when the peer is unknown
    ],
)
async def test_dev_tokens_only_for_requests_from_loopback(tmp_path, address, local):
    client = signaling_app(config_of(tmp_path)).web.test_client()
    page = await (await client.get("/imserver/demo/config.json", scope_base=peer(address))).get_json()
    assert page["data"]["devTokens"] is local
    answer = await client.post("/imserver/demo/token", json={"userId": "alice"}, scope_base=peer(address))
    body = await answer.get_json()
    if local:
        assert answer.status_code == 200 and body["data"]["token"]
    else:
        assert answer.status_code == 403 and body["code"] == 403 and body["data"] is None
        assert body["msg"] == (
            "development tokens are handed out only to requests from this "
            f"machine (loopback, no proxy), not {address}"
        )


async def test_dev_tokens_not_for_proxied_or_spoofed_requests(tmp_path):
    client = signaling_app(config_of(tmp_path)).web.test_client()
    for headers in ({"X-Forwarded-For": "203.0.113.9"}, {"Forwarded": "for=203.0.113.9"}):
        proxied = await client.post(
            "/imserver/demo/token", json={"userId": "alice"}, headers=headers, scope_base=LOCAL
        )  # a proxy on this machine
        assert proxied.status_code == 403
    spoofed = await client.post(
        "/imserver/demo/token",
        json={"userId": "alice"},
        headers={"Remote-Addr": "127.0.0.1"},
        scope_base=peer("203.0.113.9"),
    )
    assert spoofed.status_code == 403


async def test_demo_off_serves_nothing(tmp_path):
    client = signaling_app(config_of(tmp_path, "http: {demo: false}\n")).web.test_client()
    assert (await client.get("/imserver/demo/")).status_code == 404
    assert (await client.post("/imserver/demo/token", json={"userId": "a"})).status_code == 404


@pytest.mark.parametrize(
    "host, mints",
    [
        ("127.0.0.1:8443", True),
        ("localhost:8443", True),
        ("[::1]:8443", True),
        ("LOCALHOST", True),
        ("evil.example:8443", False),
        ("evil.example", False),
        ("127.0.0.1.evil.example:8443", False),
        ("", False),
    ],
)
async def test_dev_tokens_not_for_a_rebound_name(tmp_path, host, mints):
    # DNS rebinding: a page of evil.example, its name pointed at 127.0.0.1, reaches the
    # appliance from the user's browser on this machine; only its Host gives it away.
    client = signaling_app(config_of(tmp_path)).web.test_client()
    answer = await client.post(
        "/imserver/demo/token", json={"userId": "alice"}, headers={"Host": host}, scope_base=LOCAL
    )
    assert answer.status_code == (200 if mints else 403)
