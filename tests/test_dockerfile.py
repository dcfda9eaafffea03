"""What can be checked of the Dockerfile without a Docker engine: it copies every
package the distribution ships, installs and runs the way the README says, its
environment is a configuration the appliance accepts (relay ports published, no
development tokens handed out), and its .dockerignore, read by Docker's own rules,
keeps the sources and leaves generated secrets out of the image."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from docker.utils.build import exclude_paths

from appliance.cli import main
from appliance.config.loader import load_config
from appliance.config.schema import ConfigError, HostPort
from appliance.wiring.auth import dev_token_minter

from .ci_harness import fresh_root

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()
PUBLIC_IP = "203.0.113.7"
# Options the image adds to the README's commands that change what is installed in no way.
QUIET_OPTIONS = {"--no-install-recommends", "--no-cache-dir", "--no-audit", "--no-fund"}


def instructions() -> list[tuple[str, str]]:
    """(KEYWORD, arguments) of every Dockerfile instruction, continuation lines joined."""
    text = DOCKERFILE.replace("\\\n", " ")
    return [(m.group(1), m.group(2).strip()) for m in re.finditer(r"^([A-Z]+) (.*)$", text, re.M)]


def env_block() -> dict[str, str]:
    env = {}
    for keyword, args in instructions():
        if keyword == "ENV":
            env.update(re.findall(r"(\w+)=(\S+)", args))
    return env


def container_env() -> dict[str, str]:
    return {k: v for k, v in env_block().items() if k.startswith("APPLIANCE__")}


def container_config():
    return load_config(None, {**container_env(), "APPLIANCE__EXTERNAL_IP": PUBLIC_IP})


def run_commands() -> list[str]:
    """Every command of every RUN (split at &&), without QUIET_OPTIONS."""
    commands = []
    for keyword, args in instructions():
        if keyword == "RUN":
            for command in args.split("&&"):
                commands.append(" ".join(w for w in command.split() if w not in QUIET_OPTIONS))
    return commands


def apt_packages(text: str) -> set[str]:
    """The packages every `apt-get install` in the text names."""
    return {
        word
        for words in re.findall(r"apt-get install((?:[ \t]+[^\s;&|]+)+)", text)
        for word in words.split()
        if not word.startswith("-")
    }


def readme_install_command() -> str:
    """Command 1 of the README, as CI takes it from there."""
    return fresh_root.readme_commands(ROOT / "README.md")[0]


def test_every_shipped_package_is_copied():
    packages = re.search(r"include = \[([^\]]*)\]", (ROOT / "pyproject.toml").read_text()).group(1)
    for name in re.findall(r'"(\w+)\*"', packages):
        assert re.search(rf"^COPY {name} \./{name}$", DOCKERFILE, re.M), f"{name} is not copied"


def test_both_stages_are_the_readmes_debian():
    assert [args for keyword, args in instructions() if keyword == "FROM"] == [
        "debian:bookworm-slim AS demo-libraries",
        "debian:bookworm-slim",
    ]


def test_install_and_run_steps_are_the_readmes():
    commands = run_commands()
    image_packages = apt_packages("\n".join(commands))
    venv = next(c.split()[-1] for c in commands if c.startswith("python3 -m venv "))
    steps = [step.strip() for step in readme_install_command().split("&&")]
    assert steps[-1] == "appliance serve"
    for step in steps:
        if "apt-get install" in step:
            assert apt_packages(step) <= image_packages, step
        elif step.startswith("python3 -m venv "):
            pass  # the image's venv is `venv`, outside the sources
        elif step.startswith(". ") and step.endswith("/bin/activate"):
            assert env_block()["PATH"] == f"{venv}/bin:$PATH"
        elif step == "appliance serve":
            cmd = [args for keyword, args in instructions() if keyword == "CMD"]
            assert [json.loads(c) for c in cmd] == [["appliance", "serve"]]
        else:  # apt-get update, npm ci, pip install
            assert step in commands, f"the README's {step!r} is not a RUN step of the Dockerfile"
    assert "ca-certificates" in image_packages  # httpx to auth.introspect_url, the probe's TLS
    assert re.search(
        r"^COPY --from=demo-libraries \S+/appliance/demo/node_modules "
        r"\./appliance/demo/node_modules$",
        DOCKERFILE,
        re.M,
    )
    assert 'CMD ["appliance", "healthcheck"]' in DOCKERFILE
    assert re.search(r"^USER appliance$", DOCKERFILE, re.M)


def test_container_environment_is_a_valid_configuration():
    with pytest.raises(ConfigError) as info:
        load_config(None, container_env())  # no public address given: refused, by name
    assert info.value.key == "turn.relay_ip" and "external_ip" in info.value.reason
    config = container_config()
    assert config.turn.udp == HostPort("0.0.0.0", 3478)
    assert config.http.listen == HostPort("0.0.0.0", 8443)
    assert str(config.data_dir) == "/var/lib/appliance"


def test_every_listener_and_the_relay_ports_are_exposed():
    config = container_config()
    exposed = set(" ".join(args for keyword, args in instructions() if keyword == "EXPOSE").split())
    t = config.turn
    assert {
        f"{t.udp.port}/udp",
        f"{t.tcp.port}/tcp",
        f"{t.tls.port}/tcp",
        f"{config.http.listen.port}/tcp",
    } <= exposed
    low, high = t.relay_ports
    assert (low, high) == (61000, 61199)  # narrow enough to publish with -p, and
    assert low > 60999  # above Linux's ephemeral port range
    assert f"{low}-{high}/udp" in exposed


def test_container_mints_no_development_tokens(tmp_path, monkeypatch, capsys):
    config = container_config()
    assert config.auth.uses_dev_key()  # no key of the operator's yet ...
    assert dev_token_minter(config) is None  # ... but the listener is 0.0.0.0: none minted

    for var in [v for v in os.environ if v.startswith("APPLIANCE_")]:
        monkeypatch.delenv(var)
    for var, value in {**container_env(), "APPLIANCE__EXTERNAL_IP": PUBLIC_IP}.items():
        monkeypatch.setenv(var, value)
    mounted = tmp_path / "appliance.yaml"
    mounted.write_text("")
    assert main(["check-config", str(mounted)]) == 0
    assert capsys.readouterr().err.startswith("warning: http.listen 0.0.0.0:8443 is not loopback")
    monkeypatch.setenv("APPLIANCE__AUTH__JWT_KEY", "k" * 40)
    assert main(["check-config", str(mounted)]) == 0
    assert capsys.readouterr().err == ""


# Directories a run, an install or a build leaves in a checkout: never sources.
GENERATED_DIRS = {"data", "node_modules", "__pycache__"}
WOULD_BE_FILES = [
    "config/data/secrets.json",
    "config/data/jwt.key",
    "config/data/certs/key.pem",
    "data/secrets.json",
    "data/jwt.key",
    "data/certs/key.pem",
    "appliance/demo/node_modules/x",
    "tests/js/node_modules/x",
    ".venv/bin/python",
    "appliance/__pycache__/cli.cpython-311.pyc",
    "build/lib/appliance/cli.py",
    "dist/appliance-0.1.0-py3-none-any.whl",
    "appliance.egg-info/PKG-INFO",
    "test-artifacts/alice-websocket.png",
    ".git/HEAD",
]


def copied_source_files() -> list[str]:
    """The checkout's files under every COPY source (but the stage's), generated ones left out."""
    files = []
    for keyword, args in instructions():
        if keyword != "COPY" or args.startswith("--from"):
            continue
        for source in args.split()[:-1]:
            if (ROOT / source).is_file():
                files.append(source)
                continue
            for folder, dirs, names in os.walk(ROOT / source):
                dirs[:] = [d for d in dirs if d not in GENERATED_DIRS]
                files += [str((Path(folder) / n).relative_to(ROOT)) for n in names]
    return files


def test_dockerignore_keeps_the_sources_and_leaves_generated_state_out(tmp_path):
    sources = copied_source_files()
    assert "appliance/cli.py" in sources and "appliance/demo/package-lock.json" in sources
    for path in sources + WOULD_BE_FILES:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).touch()
    # Read the way the docker SDK's build() reads .dockerignore, matched by its rules.
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    context = exclude_paths(str(tmp_path), patterns)
    assert [path for path in WOULD_BE_FILES if path in context] == []
    assert [path for path in sources if path not in context] == []
