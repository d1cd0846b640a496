"""Retry delays grow exponentially, stay within their jitter band and respect the cap."""

from __future__ import annotations

from goclaw.backoff import retry_delay


def test_exponential_with_equal_jitter_and_cap():
    for attempt, full in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (9, 10.0), (40, 10.0)]:
        low = retry_delay(attempt, base=1.0, cap=10.0, rand=lambda: 0.0)
        high = retry_delay(attempt, base=1.0, cap=10.0, rand=lambda: 1.0)
        assert (low, high) == (full / 2, full)


def test_jitter_spreads_delays():
    import random

    rng = random.Random(7)
    delays = {round(retry_delay(3, base=1.0, cap=60, rand=rng.random), 6) for _ in range(50)}
    assert len(delays) > 40 and all(2.0 <= d <= 4.0 for d in delays)
