"""The core's per-message safety net: a message that hits a bug (here, a relay opener
that raises what no handler expects) is answered 500, counted, and logged at a bounded
rate; the core keeps serving everyone else."""

from __future__ import annotations

import logging

from ratelog import RateLimitedLog
from turn import stun

from .turn_fakes import T0, CoreClient, error_code, make_core


class BrokenOpener:
    def open(self, family, even_port, reserve_next):
        raise RuntimeError("a bug on the relay's path")


def test_a_request_that_hits_a_bug_is_answered_500_and_counted(caplog):
    core, _ = make_core()
    core.relays = BrokenOpener()
    client = CoreClient(core)
    with caplog.at_level(logging.ERROR, logger="turn"):
        replies = [client.allocate() for _ in range(20)]
    assert all(error_code(reply) == 500 for reply in replies)
    assert core.counters["internal_errors"] == 20 and core.counters["error_500"] == 20
    logged = [r for r in caplog.records if "internal error" in r.getMessage()]
    assert 1 <= len(logged) <= 5  # bounded: the rest only counted
    bystander = CoreClient(core, addr=("198.51.100.21", 40001))
    binding = stun.parse(bystander.raw(bystander.build(stun.BINDING, auth=False)))
    assert binding.cls == stun.SUCCESS  # everyone else is still served


def test_the_log_budget_refills_and_says_what_it_held_back(caplog):
    limited = RateLimitedLog(logging.getLogger("turn.test"), burst=2, interval_s=1.0)
    with caplog.at_level(logging.ERROR, logger="turn.test"):
        for i in range(10):
            try:
                raise ValueError(i)
            except ValueError:
                limited.exception(T0 + i * 0.01, "failure %d", i)
        try:
            raise ValueError("later")
        except ValueError:
            assert limited.exception(T0 + 1.5, "failure later")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["failure 0", "failure 1", "failure later (8 similar lines suppressed)"]


def test_a_user_id_with_control_characters_is_logged_escaped(caplog):
    # The user part of a REST username is whatever the secret's holder signed; a newline
    # in it must not start a forged line in the log.
    core, _ = make_core()
    client = CoreClient(core, user="mallory\nINFO turn: forged line\x00")
    with caplog.at_level(logging.INFO, logger="turn"):
        assert client.allocate().cls == stun.SUCCESS
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "forged" in text and "\nINFO turn: forged" not in text and "\x00" not in text


def test_refused_credentials_are_logged_at_a_bounded_rate(caplog):
    core, _ = make_core(unauth_replies_per_s=0)
    with caplog.at_level(logging.INFO, logger="turn"):
        for port in range(1000):
            client = CoreClient(core, addr=("198.51.100.30", 20000 + port), password="wrong")
            assert error_code(client.allocate()) == 401
    lines = [r for r in caplog.records if "auth failure" in r.getMessage()]
    assert 1 <= len(lines) <= 10
    assert core.counters["auth_bad_credentials"] == 1000  # every one still counted
