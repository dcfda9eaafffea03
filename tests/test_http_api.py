"""The HTTP envelope: unknown paths, wrong methods and failures all answer
{"code", "msg", "data"} with the matching status and no stack trace."""

from __future__ import annotations

from signaling.app import create_app
from signaling.auth import StaticVerifier
from signaling.http_api import ApiError, authenticated_user, envelope
from signaling.stomp import Limits


def make_app():
    verifier = StaticVerifier({"tok-a": "alice"})
    app = create_app("/imserver", verifier, Limits(), 64)

    @app.route("/imserver/test/whoami")
    async def whoami():
        return envelope(data={"userId": await authenticated_user(verifier)})

    @app.route("/imserver/test/boom")
    async def boom():
        raise RuntimeError("secret internals")

    @app.route("/imserver/test/busy")
    async def busy():
        raise ApiError(1001, "callee busy")

    return app


async def test_unknown_path_is_a_404_envelope():
    client = make_app().test_client()
    response = await client.get("/imserver/nothing-here")
    assert response.status_code == 404
    assert await response.get_json() == {"code": 404, "msg": "not found", "data": None}


async def test_wrong_method_is_405_envelope():
    response = await make_app().test_client().post("/imserver/test/whoami")
    assert response.status_code == 405 and (await response.get_json())["code"] == 405


async def test_ide_token_is_required_and_checked():
    client = make_app().test_client()
    response = await client.get("/imserver/test/whoami")
    assert response.status_code == 401 and (await response.get_json())["code"] == 401
    response = await client.get("/imserver/test/whoami", headers={"ide": "bad"})
    assert response.status_code == 401
    response = await client.get("/imserver/test/whoami", headers={"ide": "tok-a"})
    assert await response.get_json() == {"code": 200, "msg": "ok", "data": {"userId": "alice"}}


async def test_failures_are_500_without_internals():
    response = await make_app().test_client().get("/imserver/test/boom")
    body = await response.get_data(as_text=True)
    assert response.status_code == 500 and "secret internals" not in body
    assert (await response.get_json())["code"] == 500


async def test_business_errors_go_out_with_status_200():
    response = await make_app().test_client().get("/imserver/test/busy")
    assert response.status_code == 200
    assert await response.get_json() == {"code": 1001, "msg": "callee busy", "data": None}
