#!/usr/bin/env python3
"""CI: the README's two set-up commands, verbatim, on a fresh Debian 12 root.

A fresh Debian box is the judge of the README, so CI does not test this
machine (which carries whatever earlier sessions installed): it builds a
Debian 12 minbase root with debootstrap, gives it only what any Debian machine
that reaches the same registries has (the apt sources of Debian's own archive,
the apt, pip and npm configuration and the CA certificates of this machine,
never a registry host written here), clones the checkout into it, and runs the
two commands exactly as README.md prints them:

1. command 1 (install and run on the embedded defaults) in the background,
   checked from outside the root: a STUN Binding on 127.0.0.1:3478 and
   `GET https://127.0.0.1:8443/imserver/ws/info`, then SIGTERM to the appliance,
   which must exit 0; then the same again, as on a machine that already ran it
   (the installs find everything there, the appliance reuses its data);
2. command 2 (install, ruff, mypy, then the tests), whose exit code is CI's verdict,
   while the ports a coturn.service would hold (3478, 3479, 5349 and 5350, UDP
   and TCP, every interface) are taken: on a systemd Debian, installing coturn
   starts one, and the tests must not collide with it.

Each command runs in private mount and PID namespaces (unshare): /dev, /sys and
/proc are mounted for the root there and vanish with it, and any daemon a
package's install script started inside is ended when the command's shell
exits.  The network is the machine's own, so the checks above and the tests'
loopback servers need no forwarding.

Environment: KEEP_ROOT=1 keeps the root afterwards (its path is printed);
CI=true and REQUIRE_INTEROP=1 reach command 2.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent
SUITE = "bookworm"
SUITES = {SUITE, f"{SUITE}-updates", f"{SUITE}-security"}
ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PROJECT_IN_ROOT = "/work/appliance"  # ../shared beside it, as on a developer's machine
COMMAND_1_DEADLINE_S = 25 * 60  # installs, then the first answers
SMOKE_STUN = ("127.0.0.1", 3478)
SMOKE_INFO_URL = "https://127.0.0.1:8443/imserver/ws/info"
CONFIG_FILES = [  # copied when present: how this machine reaches registries
    "etc/apt/apt.conf.d",
    "etc/apt/auth.conf.d",
    "etc/pip.conf",
    "etc/xdg/pip",
    "root/.config/pip",
    "root/.pip",
    "etc/npmrc",
    "usr/etc/npmrc",
    "root/.npmrc",
    "usr/local/share/ca-certificates",
    "etc/resolv.conf",
]


def say(text: str) -> None:
    print(f"fresh-root: {text}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ README and apt sources


def readme_commands(readme: Path) -> list[str]:
    """The lines of README.md's first ```sh block that are not comments: exactly two."""
    block = re.search(r"^```sh\n(.*?)^```", readme.read_text(), re.S | re.M)
    if block is None:
        raise SystemExit("README.md has no ```sh block with the set-up commands")
    commands = [
        line for line in block.group(1).splitlines() if line.strip() and not line.lstrip().startswith("#")
    ]
    if len(commands) != 2:
        raise SystemExit(f"README.md's first ```sh block has {len(commands)} commands, not 2")
    return commands


def _deb822_stanzas(text: str):
    for stanza in re.split(r"\n\s*\n", text):
        fields, key = {}, None
        for line in stanza.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            if line[0] in " \t" and key:
                fields[key] += " " + line.strip()
            else:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                fields[key] = value.strip()
        if fields:
            yield fields


def debian_archives(apt: Path = Path("/etc/apt")) -> list[tuple[str, str]]:
    """(uri, suite) of this machine's sources for Debian's own archive and this release.

    Third-party repositories (a newer Node, cloud tools) are left out: a fresh
    Debian box does not have them."""
    found = []
    for path in [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*"))]:
        if not path.is_file():
            continue
        text = path.read_text()
        if path.suffix == ".sources":
            for fields in _deb822_stanzas(text):
                if "deb" not in fields.get("types", "").split() or fields.get("enabled") == "no":
                    continue
                for uri in fields.get("uris", "").split():
                    found += [(uri, s) for s in fields.get("suites", "").split() if s in SUITES]
        else:
            for line in text.splitlines():
                words = re.sub(r"\[[^]]*\]", "", line).split()
                if len(words) >= 3 and words[0] == "deb" and words[2] in SUITES:
                    found.append((words[1], words[2]))
    if not any(suite == SUITE for _, suite in found):
        raise SystemExit(f"no apt source for Debian {SUITE} on this machine to take the mirror from")
    return list(dict.fromkeys(found))


def sources_file(archives: list[tuple[str, str]]) -> str:
    stanzas = []
    for uri in dict.fromkeys(u for u, _ in archives):
        suites = " ".join(s for u, s in archives if u == uri)
        stanzas.append(
            f"Types: deb\nURIs: {uri}\nSuites: {suites}\nComponents: main\n"
            "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        )
    return "\n".join(stanzas)


# ------------------------------------------------------------------ the root


def build_root(root: Path, archives: list[tuple[str, str]]) -> None:
    mirror = next(uri for uri, suite in archives if suite == SUITE)
    subprocess.run(
        ["debootstrap", "--variant=minbase", SUITE, str(root), mirror], check=True, stdout=subprocess.DEVNULL
    )
    (root / "etc/apt/sources.list").unlink(missing_ok=True)
    (root / "etc/apt/sources.list.d/debian.sources").write_text(sources_file(archives))
    for name in CONFIG_FILES:
        source = Path("/") / name
        if source.is_dir():
            shutil.copytree(source, root / name, dirs_exist_ok=True)
        elif source.is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / name)
    (root / "etc/hosts").write_text("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n")
    project = root / PROJECT_IN_ROOT.lstrip("/")
    project.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "clone", "--quiet", str(CHECKOUT), str(project)], check=True)
    shared = CHECKOUT.parent / "shared"
    if shared.is_dir():
        shutil.copytree(shared, project.parent / "shared")


def in_root(root: Path, command: str, env: dict[str, str], **popen) -> subprocess.Popen:
    """`bash -c command` in the project inside the root, in new mount and PID namespaces."""
    variables = {
        "PATH": ROOT_PATH,
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "TERM": "dumb",
        "DEBIAN_FRONTEND": "noninteractive",
        **env,
    }
    inner = [
        "/usr/bin/env",
        "-i",
        *(f"{k}={v}" for k, v in variables.items()),
        "/bin/bash",
        "-c",
        f"cd {PROJECT_IN_ROOT} && {command}",
    ]
    setup = (
        'mount --rbind /dev "$0/dev" && mount -t tmpfs -o mode=1777 shm "$0/dev/shm" '
        '&& mount -t sysfs sysfs "$0/sys" && exec chroot "$0" "$@"'
    )
    return subprocess.Popen(
        [
            "unshare",
            "--mount",
            "--pid",
            "--fork",
            f"--mount-proc={root}/proc",
            "/bin/bash",
            "-c",
            setup,
            str(root),
            *inner,
        ],
        **popen,
    )


def processes_in(root: Path):
    """(pid, argv) of every process whose root directory is `root`."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.readlink(entry / "root") != str(root):
                continue
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        yield int(entry.name), [a.decode(errors="replace") for a in argv if a]


def appliance_pid(root: Path) -> int | None:
    """The `appliance serve` process command 1 started (relay workers are its children)."""
    serving = {
        pid: argv
        for pid, argv in processes_in(root)
        if any(a.endswith("/appliance") for a in argv) and "serve" in argv
    }
    return min(serving) if serving else None


# ------------------------------------------------------------------ checks from outside


def stun_answers(address: tuple[str, int]) -> bool:
    request_id = os.urandom(12)
    request = b"\x00\x01\x00\x00\x21\x12\xa4\x42" + request_id  # Binding request, RFC 8489
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.5)
        try:
            sock.sendto(request, address)
            answer = sock.recv(2048)
        except OSError:
            return False
    return answer[:2] == b"\x01\x01" and answer[8:20] == request_id


def sockjs_info(url: str) -> dict | None:
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # the development certificate
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as answer:
            return json.loads(answer.read())
    except (OSError, ValueError):
        return None


def tail(path: Path, lines: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def run_command_1(root: Path, command: str, log: Path, attempt: str) -> None:
    if stun_answers(SMOKE_STUN):
        raise SystemExit(
            f"command 1 ({attempt}): something already answers STUN on "
            f"{SMOKE_STUN[0]}:{SMOKE_STUN[1]}; the check would prove nothing"
        )
    started = time.monotonic()
    with open(log, "wb") as out:
        proc = in_root(root, command, {}, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    stun_ok = info = None
    while time.monotonic() - started < COMMAND_1_DEADLINE_S:
        if proc.poll() is not None:
            raise SystemExit(f"command 1 exited with {proc.returncode} before answering:\n{tail(log)}")
        stun_ok = stun_ok or stun_answers(SMOKE_STUN)
        info = info or (stun_ok and sockjs_info(SMOKE_INFO_URL))
        if stun_ok and info:
            break
        time.sleep(1)
    else:
        proc.kill()
        raise SystemExit(
            f"command 1: no answer in {COMMAND_1_DEADLINE_S} s (STUN {bool(stun_ok)}, "
            f"SockJS info {bool(info)}):\n{tail(log)}"
        )
    if info.get("websocket") is not True:
        raise SystemExit(f"command 1: unexpected SockJS info {info!r}")
    say(
        f"command 1 ({attempt}) answered after {time.monotonic() - started:.0f} s: STUN Binding on "
        f"{SMOKE_STUN[0]}:{SMOKE_STUN[1]}, {SMOKE_INFO_URL} {json.dumps(info)}"
    )
    pid = appliance_pid(root)
    if pid is None:
        raise SystemExit(f"command 1: no `appliance serve` process found in the root:\n{tail(log)}")
    os.kill(pid, signal.SIGTERM)
    try:
        code = proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise SystemExit(
            f"command 1: the appliance did not stop within 30 s of SIGTERM:\n{tail(log)}"
        ) from None
    if code != 0:
        raise SystemExit(f"command 1: exit code {code} after SIGTERM:\n{tail(log)}")
    say(f"command 1 ({attempt}): SIGTERM, exit 0 ({time.monotonic() - started:.0f} s in all)")


COTURN_SERVICE_PORTS = (3478, 3479, 5349, 5350)


def hold_coturn_ports() -> list[socket.socket]:
    """Sockets on the ports Debian's coturn.service listens on, as if it were running."""
    held = []
    for port in COTURN_SERVICE_PORTS:
        for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
            sock = socket.socket(socket.AF_INET, kind)
            sock.bind(("0.0.0.0", port))
            if kind == socket.SOCK_STREAM:
                sock.listen()
            held.append(sock)
    return held


def unmounted(root: Path) -> bool:
    mounts = Path("/proc/self/mounts").read_text().split("\n")
    return not any(f" {root}/" in line or f" {root} " in line for line in mounts)


def main() -> int:
    commands = readme_commands(CHECKOUT / "README.md")
    archives = debian_archives()
    workdir = Path(tempfile.mkdtemp(prefix="appliance-fresh-root.", dir="/var/tmp"))
    root = workdir / "root"
    try:
        started = time.monotonic()
        build_root(root, archives)
        say(
            f"Debian {SUITE} minbase root at {root} from {archives[0][0]} "
            f"in {time.monotonic() - started:.0f} s"
        )
        for attempt in ("first", "again"):
            run_command_1(root, commands[0], workdir / f"command-1-{attempt}.log", attempt)
        say(f"command 2, the test run, with ports {COTURN_SERVICE_PORTS} held as coturn.service would:")
        held = hold_coturn_ports()
        try:
            proc = in_root(
                root,
                commands[1],
                {"CI": os.environ.get("CI", "true"), "REQUIRE_INTEROP": "1"},
                stdin=subprocess.DEVNULL,
            )
            return proc.wait()  # pytest's closing lines stay the last ones printed
        finally:
            for sock in held:
                sock.close()
    finally:
        for pid, _ in processes_in(root):  # none should outlive their namespace
            os.kill(pid, signal.SIGKILL)
        if os.environ.get("KEEP_ROOT") == "1" or not unmounted(root):
            say(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
