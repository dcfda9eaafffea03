"""turn/source_budget.py: token buckets per source (IPv4 address, IPv6 /64) that bound the
error replies the relay sends to sources that have not authenticated, in a table that
never grows past its bound."""

from __future__ import annotations

import pytest

from turn.source_budget import SourceBudget, source_key

T0 = 1_900_000_000.0


def spend(budget: SourceBudget, host: str, times: list[float]) -> int:
    """How many of the replies asked for at `times` the budget allowed."""
    return sum(budget.allow(host, t) for t in times)


@pytest.mark.parametrize(
    "rate, burst, times, allowed",
    [
        # A new source gets its whole burst at one instant, and not one more.
        (20, 100, [T0] * 150, 100),
        (20, 1, [T0] * 5, 1),
        (0.5, 3, [T0] * 10, 3),
        # Refill: 20/s is one token per 50 ms after the burst is spent.
        (20, 100, [T0] * 100 + [T0 + 0.049], 100),
        (20, 100, [T0] * 100 + [T0 + 0.051], 101),
        (20, 100, [T0] * 100 + [T0 + 1.0] * 30, 120),
        # Refill stops at the burst: a long quiet spell is worth `burst`, not more.
        (20, 10, [T0] * 10 + [T0 + 3600] * 50, 20),
        # Steady pace at the rate is never refused; twice the rate gets half through.
        (20, 1, [T0 + i * 0.05 for i in range(200)], 200),
        (20, 1, [T0 + i * 0.025 for i in range(200)], 100),
        # A refused request spends nothing: the source is back to one per 1/rate at once.
        (10, 5, [T0] * 1000 + [T0 + 0.1], 6),
        # rate 0: no limit.
        (0, 1, [T0] * 10_000, 10_000),
    ],
)
def test_burst_and_refill(rate, burst, times, allowed):
    assert spend(SourceBudget(rate, burst), "203.0.113.9", times) == allowed


def test_rate_zero_keeps_no_table():
    budget = SourceBudget(0, 1)
    for i in range(1000):
        assert budget.allow(f"10.0.{i // 256}.{i % 256}", T0)
    assert len(budget) == 0


@pytest.mark.parametrize(
    "a, b, same",
    [
        # IPv4: one bucket per address.
        ("198.51.100.1", "198.51.100.1", True),
        ("198.51.100.1", "198.51.100.2", False),
        # IPv6: one bucket per /64, whatever the spelling.
        ("2001:db8:1:2::1", "2001:db8:1:2:ffff:ffff:ffff:ffff", True),
        ("2001:db8:1:2::1", "2001:0DB8:0001:0002:0:0:0:9", True),
        ("2001:db8::1", "2001:db8:0:0:1::", True),
        ("2001:db8:1:2::1", "2001:db8:1:3::1", False),
        ("2001:db8::1", "2001:db9::1", False),
        ("::1", "::2", True),
        ("fe80::1%eth0", "fe80::2%eth1", True),  # a zone is not part of the address
        ("fe80::1%eth0", "fe80:0:0:1::1", False),
        # IPv4-mapped IPv6 is the IPv4 address, in either spelling.
        ("::ffff:198.51.100.1", "198.51.100.1", True),
        ("::ffff:c633:6401", "198.51.100.1", True),
        ("::FFFF:198.51.100.1", "198.51.100.2", False),
        # Only ::ffff:0:0/96 is mapped: other embedded IPv4 forms are IPv6 sources.
        ("64:ff9b::198.51.100.1", "198.51.100.1", False),
        ("64:ff9b::198.51.100.1", "64:ff9b::198.51.100.2", True),
        ("::198.51.100.1", "198.51.100.1", False),
    ],
)
def test_sources_are_ipv4_addresses_and_ipv6_slash_64s(a, b, same):
    assert (source_key(a) == source_key(b)) is same
    budget = SourceBudget(1, 2)
    assert spend(budget, a, [T0] * 2) == 2
    assert budget.allow(b, T0) is not same  # `a` spent the bucket `b` would use


def test_an_ipv6_attacker_cannot_multiply_buckets_inside_its_slash_64():
    budget = SourceBudget(20, 100)
    hosts = [f"2001:db8:aa:bb:{i >> 16:x}:{i & 0xFFFF:x}::1" for i in range(5000)]
    assert sum(budget.allow(h, T0) for h in hosts) == 100
    assert len(budget) == 1


def test_text_that_is_no_address_is_its_own_bucket_and_never_raises():
    budget = SourceBudget(1, 1)
    for junk in ["", ":", "::::", "not:an:address", "1.2.3.4:5", "fe80::1%", "%"]:
        assert budget.allow(junk, T0)
        assert not budget.allow(junk, T0)


@pytest.mark.parametrize(
    "max_sources, sources",
    [
        (2, 10),
        (16, 1000),
        (1000, 50_000),
    ],
)
def test_the_table_never_grows_past_its_bound(max_sources, sources):
    budget = SourceBudget(20, 1, max_sources=max_sources)
    peak = 0
    for i in range(sources):
        assert budget.allow(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", T0 + i * 1e-3)
        peak = max(peak, len(budget))
    assert peak <= max_sources


def test_a_full_table_forgets_the_sources_not_seen_for_a_generation():
    budget = SourceBudget(1, 1, max_sources=8)  # generations of 4
    assert budget.allow("192.0.2.1", T0)  # spent, throttled
    assert budget.allow("192.0.2.2", T0)
    for i in range(3, 8):  # fills, then rotates
        assert budget.allow(f"192.0.2.{i}", T0)
        assert not budget.allow("192.0.2.1", T0)  # seen again: kept throttled
    # .2 was not seen while the table filled twice over: forgotten, a new source again.
    for i in range(8, 16):
        budget.allow(f"192.0.2.{i}", T0)
    assert budget.allow("192.0.2.2", T0)
    assert len(budget) <= 8


def test_a_throttled_source_is_remembered_while_it_keeps_sending():
    # The flooder that is being refused keeps its empty bucket however many other
    # sources pass, as long as it sends once per generation.
    budget = SourceBudget(0.001, 1, max_sources=64)
    assert budget.allow("203.0.113.66", T0)
    for i in range(10_000):
        budget.allow(f"10.1.{i >> 8 & 255}.{i & 255}", T0)
        if i % 16 == 0:
            assert not budget.allow("203.0.113.66", T0)


@pytest.mark.parametrize("rate, burst, max_sources", [(-1, 1, 10), (1, 0, 10), (1, 1, 1)])
def test_nonsense_settings_are_refused(rate, burst, max_sources):
    with pytest.raises(ValueError):
        SourceBudget(rate, burst, max_sources)
