"""What can be checked of the Dockerfile without a Docker engine: it copies every
package the distribution ships, installs and runs the way the README says, and its
environment is a configuration the appliance accepts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from appliance.config import ConfigError, HostPort, load_config

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def env_block() -> dict[str, str]:
    text = DOCKERFILE.replace("\\\n", " ")
    env = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(re.findall(r"(\w+)=(\S+)", line))
    return env


def test_every_shipped_package_is_copied():
    packages = re.search(r'include = \[([^\]]*)\]', (ROOT / "pyproject.toml").read_text()).group(1)
    for name in re.findall(r'"(\w+)\*"', packages):
        assert re.search(rf"^COPY {name} \./{name}$", DOCKERFILE, re.M), f"{name} is not copied"


def test_install_and_run_steps_are_the_readmes():
    readme = (ROOT / "README.md").read_text()
    assert "npm ci --prefix appliance/demo && pip install '.[probe]' && appliance serve" in readme
    assert re.search(r"^RUN npm ci --prefix appliance/demo\b", DOCKERFILE, re.M)
    assert re.search(r"^COPY --from=demo-libraries \S+/appliance/demo/node_modules "
                     r"\./appliance/demo/node_modules$", DOCKERFILE, re.M)
    assert re.search(r"^RUN pip install --no-cache-dir '\.\[probe\]'$", DOCKERFILE, re.M)
    assert 'CMD ["appliance", "serve"]' in DOCKERFILE
    assert 'CMD ["appliance", "healthcheck"]' in DOCKERFILE
    assert re.search(r"^USER appliance$", DOCKERFILE, re.M)
    for port in ("3478/udp", "3478/tcp", "5349/tcp", "8443/tcp"):
        assert port in DOCKERFILE


def test_container_environment_is_a_valid_configuration():
    env = {k: v for k, v in env_block().items() if k.startswith("APPLIANCE__")}
    with pytest.raises(ConfigError) as info:
        load_config(None, env)                    # no public address given: refused, by name
    assert info.value.key == "turn.relay_ip" and "external_ip" in info.value.reason
    config = load_config(None, {**env, "APPLIANCE__EXTERNAL_IP": "203.0.113.7"})
    assert config.turn.udp == HostPort("0.0.0.0", 3478)
    assert config.http.listen == HostPort("0.0.0.0", 8443)
    assert str(config.data_dir) == "/var/lib/appliance"
