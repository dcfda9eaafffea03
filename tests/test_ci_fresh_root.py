"""The parts of CI's fresh-root harness that read files: the README's two commands (run
verbatim, so a third line or a lost one must stop CI, not run something else) and the apt
sources (Debian's own archive only, never a third-party repository a fresh box lacks)."""

from __future__ import annotations

import pytest

from .ci_harness import fresh_root

ROOT = fresh_root.CHECKOUT


def test_the_readme_has_exactly_the_two_commands():
    install, test = fresh_root.readme_commands(ROOT / "README.md")
    assert install.endswith("&& appliance serve") and "python3 -m venv .venv" in install
    assert test.endswith("&& python -m pytest") and "pip install -e '.[dev]'" in test


@pytest.mark.parametrize(
    "block, problem",
    [
        ("# only a comment\n", "has 0 commands"),
        ("one\n# two\nthree\nfour\n", "has 3 commands"),
    ],
)
def test_a_readme_without_two_commands_stops_ci(tmp_path, block, problem):
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n```sh\n{block}```\n\n```sh\nlater block\n```\n")
    with pytest.raises(SystemExit, match=problem):
        fresh_root.readme_commands(readme)


def test_only_debians_archive_for_this_release_is_taken(tmp_path):
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text(
        "deb [arch=amd64] http://mirror.example/debian bookworm main contrib\n"
        "# deb http://commented.example/debian bookworm main\n"
        "deb https://cloud.example/apt cloud-sdk-bookworm main\n"
    )
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main\n\n"
        "Types: deb deb-src\nURIs: http://security.example/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n\n"
        "Types: deb\nEnabled: no\nURIs: http://disabled.example/debian\nSuites: bookworm\n"
    )
    (tmp_path / "sources.list.d" / "node.sources").write_text(
        "Types: deb\nURIs: https://node.example/node_20.x\nSuites: nodistro\nComponents: main\n"
    )
    archives = fresh_root.debian_archives(tmp_path)
    assert archives == [
        ("http://mirror.example/debian", "bookworm"),
        ("http://mirror.example/debian", "bookworm-updates"),
        ("http://security.example/debian-security", "bookworm-security"),
    ]
    text = fresh_root.sources_file(archives)
    assert text.count("Types: deb\n") == 2 and "Suites: bookworm bookworm-updates\n" in text
    assert "example/node" not in text and "cloud" not in text


def test_no_debian_source_stops_ci(tmp_path):
    (tmp_path / "sources.list").write_text("deb https://node.example/node_20.x nodistro main\n")
    with pytest.raises(SystemExit, match="no apt source for Debian bookworm"):
        fresh_root.debian_archives(tmp_path)
