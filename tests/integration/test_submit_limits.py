"""Bad input at submit time gets a precise error, and nothing is written."""

from __future__ import annotations

import dataclasses

import pytest

from goclaw.broker import Broker


def test_oversized_payload_is_refused_with_the_limit_named(db, settings):
    broker = Broker(db, dataclasses.replace(settings, max_payload_bytes=2048))
    with pytest.raises(ValueError, match=r"over broker.max_payload_bytes \(2,048\)"):
        broker.submit("echo", {"text": "x" * 5000})
    assert broker.tasks() == []
    assert broker.submit("echo", {"text": "x" * 1000})[0].created


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"f": float("nan")}, "JSON-serialisable"),
        ({"f": object()}, "JSON-serialisable"),
        (["not", "a", "mapping"], "must be a mapping"),
    ],
)
def test_payload_must_be_a_json_object(broker, args, message):
    with pytest.raises(ValueError, match=message):
        broker.submit("echo", args)
    assert broker.tasks() == []


def test_count_and_attempts_are_checked(broker):
    with pytest.raises(ValueError, match="count must be at least 1"):
        broker.submit("noop", count=0)
    with pytest.raises(ValueError, match="max_attempts must be at least 1"):
        broker.submit("noop", max_attempts=0)
    with pytest.raises(ValueError, match="needs a kind"):
        broker.submit("")
