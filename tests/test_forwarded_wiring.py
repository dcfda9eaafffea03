"""The appliance's signaling app believes X-Forwarded-For from `trusted_proxies` only, exempts
those proxies from the per-address caps, and /metrics says what it did with the headers."""

from __future__ import annotations

from appliance.config.loader import load_config
from appliance.ops.metrics import ApplianceCollector, metrics_registry, render
from appliance.wiring.signaling import client_guard, signaling_app

PROXY = {"client": ("10.0.0.5", 40001)}
FORWARDED = {"X-Forwarded-For": "203.0.113.9"}


def config_of(tmp_path, text: str = ""):
    path = tmp_path / "appliance.yaml"
    path.write_text(f"data_dir: {tmp_path / 'data'}\nhttp:\n  demo: false\n" + text)
    return load_config(path, {})


async def info_from_proxy(app) -> None:
    client = app.web.test_client()
    response = await client.get("/imserver/ws/info", headers=FORWARDED, scope_base=PROXY)
    assert response.status_code == 200


def forwarded_metric(app) -> str:
    text = render(metrics_registry(ApplianceCollector(None, signaling=app))).decode()
    return "\n".join(line for line in text.splitlines() if line.startswith("appliance_signaling_forwarded"))


async def test_a_trusted_proxy_names_the_client_and_is_not_capped_per_address(tmp_path):
    config = config_of(tmp_path, "trusted_proxies: [10.0.0.0/8]\n")
    app = signaling_app(config)
    await info_from_proxy(app)
    metric = forwarded_metric(app)
    assert 'appliance_signaling_forwarded_total{result="applied"} 1.0' in metric
    assert 'appliance_signaling_forwarded_total{result="untrusted"} 0.0' in metric
    assert client_guard(config).addresses.key("10.1.2.3") is None
    assert client_guard(config).addresses.key("203.0.113.9") is not None


async def test_without_trusted_proxies_the_header_is_ignored_and_counted(tmp_path):
    config = config_of(tmp_path)
    app = signaling_app(config)
    await info_from_proxy(app)
    metric = forwarded_metric(app)
    assert 'appliance_signaling_forwarded_total{result="applied"} 0.0' in metric
    assert 'appliance_signaling_forwarded_total{result="untrusted"} 1.0' in metric
    assert client_guard(config).addresses.key("10.1.2.3") is not None
