"""``/metrics`` over real HTTP on 127.0.0.1, from real broker operations, on both databases."""

from __future__ import annotations

import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from goclaw.agent.sessions import SessionStore
from goclaw.broker import Broker, Outcome
from goclaw.config import load_config
from goclaw.errors import DatabaseError
from goclaw.fake_llm import serve_in_thread
from goclaw.gateway.metrics import GatewayMetrics
from goclaw.gateway.server import create_app
from goclaw.gateway.state import STATE
from goclaw.worker import open_broker
from tests.gateway_support import write_home

TOKEN = "t" * 32
T0 = 1_000_000.0
Samples = dict[str, dict[frozenset, float]]


@pytest.fixture
def home(tmp_path):
    return write_home(tmp_path, TOKEN)


@pytest.fixture
def gateway(home, database_url) -> Iterator[tuple[str, Broker, object]]:
    config = load_config(home, env={"GOCLAW_DATABASE_URL": database_url})
    broker = open_broker(config)
    try:
        app = create_app(config, broker)
        with serve_in_thread(app) as origin:
            yield origin, broker, app
    finally:
        broker.close()


def fetch(url: str, token: str | None = TOKEN) -> tuple[int, str, str]:
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers["Content-Type"], exc.read().decode()


def scrape(origin: str) -> Samples:
    status, ctype, text = fetch(f"{origin}/metrics")
    assert status == 200, text
    assert ctype.startswith("text/plain; version=0.0.4")
    return parse(text)


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[frozenset(sample.labels.items())] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get(name, {}).get(frozenset(labels.items()))


def histogram(samples: Samples, name: str, **labels: str) -> tuple[float | None, float | None]:
    """(count, sum) of one labelled histogram."""
    return value(samples, f"{name}_count", **labels), value(samples, f"{name}_sum", **labels)


def run_lifecycle(broker: Broker) -> None:
    """Six tasks through claims, runs, a retry, dead letters, lease expiries and cancels.

    Each task has a queue of its own so that each claim takes the task meant.
    """
    lease = broker.settings.lease_seconds
    # A: claimed 0.5 s after submission, runs 2 s, succeeds.
    [a] = broker.submit("echo", {"text": "hi"}, queue="qa", now=T0)
    [claim] = broker.claim("w1", queue="qa", now=T0 + 0.5)
    assert broker.start(claim, now=T0 + 1)
    assert broker.report(claim, Outcome.succeeded("hi"), now=T0 + 3).accepted
    # B: two attempts, both raise: a retry, then DEAD_LETTER (retries_exhausted).
    [b] = broker.submit("fail", queue="qb", max_attempts=2, now=T0)
    [claim] = broker.claim("w1", queue="qb", now=T0 + 1)
    assert broker.start(claim, now=T0 + 1)
    broker.report(claim, Outcome.error_from(RuntimeError("one")), now=T0 + 1.25)
    retry_at = broker.get(b.task_id).run_after
    assert retry_at > T0 + 1.25
    [claim] = broker.claim("w1", queue="qb", now=retry_at + 2)
    assert broker.start(claim, now=retry_at + 2)
    broker.report(claim, Outcome.error_from(RuntimeError("two")), now=retry_at + 2.5)
    assert broker.get(b.task_id).state == "DEAD_LETTER"
    # C: one attempt, its worker vanishes while running: the reaper dead-letters it.
    [c] = broker.submit("sleep", {"seconds": 1}, queue="qc", max_attempts=1, now=T0)
    [claim] = broker.claim("w1", queue="qc", now=T0 + 2)
    assert broker.start(claim, now=T0 + 2)
    # D: submitted with a 10 s delay, claimed 0.5 s after it fell due; never started.
    [d] = broker.submit("noop", queue="qd", delay=10, now=T0)
    [claim] = broker.claim("w1", queue="qd", now=T0 + 10.5)
    # E: running, then canceled.
    [e] = broker.submit("noop", queue="qe", now=T0)
    [claim] = broker.claim("w1", queue="qe", now=T0 + 1)
    assert broker.start(claim, now=T0 + 1)
    broker.cancel(e.task_id, now=T0 + 6)
    assert broker.reap(now=T0 + 2 + lease + 1) == [c.task_id]
    # D's lease expires while CLAIMED: back to the queue, claimed again 3.5 s later.
    assert broker.reap(now=T0 + 10.5 + lease + 1) == [d.task_id]
    [claim] = broker.claim("w1", queue="qd", now=T0 + 10.5 + lease + 4.5)
    broker.cancel(d.task_id, now=T0 + 10.5 + lease + 5)
    # F: waits.
    broker.submit("noop", queue="qf", now=T0)
    assert a.created


def record_calls(broker: Broker) -> None:
    sessions = SessionStore(broker.db)
    common = {"session_key": "s-1", "purpose": "turn"}
    sessions.record_model_call(
        task_id=1, agent_id="default", model="openai/gpt-4o", outcome="ok", prompt_tokens=100,
        completion_tokens=20, cost=0.0015, latency_ms=250, **common,
    )  # fmt: skip
    sessions.record_model_call(
        task_id=1, agent_id="default", model="openai/gpt-4o", outcome="ok", prompt_tokens=50,
        completion_tokens=10, cost=0.0005, latency_ms=750, **common,
    )  # fmt: skip
    sessions.record_model_call(
        task_id=2, agent_id="coder", model="local/smollm2", outcome="timeout",
        latency_ms=30_000, **common,
    )  # fmt: skip


def assert_lifecycle(s: Samples) -> None:
    lease = 30.0
    assert {state: value(s, "goclaw_tasks", state=state) for state in (
        "QUEUED", "CLAIMED", "RUNNING", "RETRY_WAIT", "SUCCEEDED", "FAILED", "CANCELED",
        "DEAD_LETTER",
    )} == {
        "QUEUED": 1, "CLAIMED": 0, "RUNNING": 0, "RETRY_WAIT": 0, "SUCCEEDED": 2, "FAILED": 0,
        "CANCELED": 2, "DEAD_LETTER": 2,
    }  # fmt: skip
    assert s["goclaw_lease_expiries_total"] == {
        frozenset({("kind", "sleep")}): 1,
        frozenset({("kind", "noop")}): 1,
    }
    assert s["goclaw_retries_total"] == {frozenset({("kind", "fail")}): 1}
    assert s["goclaw_dead_letters_total"] == {
        frozenset({("kind", "fail"), ("reason", "retries_exhausted")}): 1,
        frozenset({("kind", "sleep"), ("reason", "lease_expired")}): 1,
    }
    latency = "goclaw_claim_latency_seconds"
    assert histogram(s, latency, queue="qa") == (1, 0.5)
    count, total = histogram(s, latency, queue="qb")
    assert count == 2 and total == pytest.approx(3.0)
    assert value(s, f"{latency}_bucket", queue="qb", le="1.0") == 1
    assert value(s, f"{latency}_bucket", queue="qb", le="2.5") == 2
    assert histogram(s, latency, queue="qc") == (1, 2.0)
    # D's first claim: by the time it is ingested, the lease expiry has moved the row's
    # run_after past it, so it counts from the submission (10.5 s: the documented
    # fallback). Its second claim counts from the lease expiry (3.5 s).
    assert histogram(s, latency, queue="qd") == (2, 14.0)
    assert value(s, f"{latency}_bucket", queue="qd", le="5.0") == 1
    assert histogram(s, latency, queue="qe") == (1, 1.0)
    assert value(s, f"{latency}_count", queue="qf") is None
    duration = "goclaw_task_duration_seconds"
    assert set(s[f"{duration}_count"]) == {
        frozenset({("kind", k), ("outcome", o)})
        for k, o in [
            ("echo", "succeeded"),
            ("fail", "retry"),
            ("fail", "dead_letter"),
            ("sleep", "lease_expired"),
            ("noop", "canceled"),
        ]
    }
    assert histogram(s, duration, kind="echo", outcome="succeeded") == (1, 2.0)
    assert histogram(s, duration, kind="fail", outcome="retry") == (1, 0.25)
    count, total = histogram(s, duration, kind="fail", outcome="dead_letter")
    assert count == 1 and total == pytest.approx(0.5)
    assert histogram(s, duration, kind="sleep", outcome="lease_expired") == (1, lease + 1)
    assert histogram(s, duration, kind="noop", outcome="canceled") == (1, 5.0)


def assert_model_calls(s: Samples, extra_ok_calls: int = 0) -> None:
    gpt = {"agent": "default", "model": "openai/gpt-4o"}
    local = {"agent": "coder", "model": "local/smollm2"}
    assert value(s, "goclaw_model_calls_total", **gpt, outcome="ok") == 2 + extra_ok_calls
    assert value(s, "goclaw_model_calls_total", **local, outcome="timeout") == 1
    assert value(s, "goclaw_model_tokens_total", **gpt, direction="prompt") == 150 + (
        1000 * extra_ok_calls
    )
    assert value(s, "goclaw_model_tokens_total", **gpt, direction="completion") == 30
    assert value(s, "goclaw_model_tokens_total", **local, direction="prompt") == 0
    assert value(s, "goclaw_model_cost_usd_total", **gpt) == pytest.approx(
        0.002 + 0.01 * extra_ok_calls
    )
    count, total = histogram(s, "goclaw_model_latency_seconds", **gpt)
    assert count == 2 + extra_ok_calls and total == pytest.approx(1.0 + 2.0 * extra_ok_calls)
    assert value(s, "goclaw_model_latency_seconds_bucket", **gpt, le="0.25") == 1
    assert value(s, "goclaw_model_latency_seconds_bucket", **gpt, le="1.0") == 2
    assert histogram(s, "goclaw_model_latency_seconds", **local) == (1, 30.0)


def before_the_first_scrape(broker: Broker) -> None:
    """A run and a model call that a gateway's first scrape finds already there."""
    [task] = broker.submit("echo", queue="qa", now=T0 - 100)
    [claim] = broker.claim("w0", queue="qa", now=T0 - 99)
    broker.start(claim, now=T0 - 99)
    broker.report(claim, Outcome.succeeded(), now=T0 - 98)
    SessionStore(broker.db).record_model_call(
        task_id=task.task_id, session_key="s-0", agent_id="default", model="openai/gpt-4o",
        purpose="turn", outcome="ok", prompt_tokens=7, latency_ms=100,
    )  # fmt: skip


def assert_nothing_counted(s: Samples) -> None:
    """Nothing but the task gauge above zero."""
    nonzero = {
        (name, labels): v
        for name, samples in s.items()
        if not name.endswith("_created")
        for labels, v in samples.items()
        if v
    }
    assert nonzero == {("goclaw_tasks", frozenset({("state", "SUCCEEDED")})): 1}


def test_metrics_from_real_lifecycle_and_model_calls_counted_once(gateway):
    origin, broker, _ = gateway
    assert broker.settings.lease_seconds == 30.0
    # What is in the database at the first scrape is not counted: counters start there.
    before_the_first_scrape(broker)
    assert_nothing_counted(scrape(origin))
    run_lifecycle(broker)
    record_calls(broker)
    first = scrape(origin)
    assert_lifecycle(first)
    assert_model_calls(first)
    # Nothing new: the second scrape reads nothing old again, and counts nothing twice.
    second = scrape(origin)
    assert_lifecycle(second)
    assert_model_calls(second)
    assert {k: v for k, v in second.items() if not k.endswith("_created")} == {
        k: v for k, v in first.items() if not k.endswith("_created")
    }
    # New rows only: one more run and one more call.
    [g] = broker.submit("noop", queue="qa", now=T0 + 100)
    [claim] = broker.claim("w2", queue="qa", now=T0 + 100.25)
    broker.start(claim, now=T0 + 100.25)
    broker.report(claim, Outcome.succeeded(), now=T0 + 101.25)
    SessionStore(broker.db).record_model_call(
        task_id=g.task_id, session_key="s-2", agent_id="default", model="openai/gpt-4o",
        purpose="turn", outcome="ok", prompt_tokens=1000, cost=0.01, latency_ms=2000,
    )  # fmt: skip
    # A delayed submission claimed 0.5 s after it fell due: the delay is not lateness.
    broker.submit("noop", queue="qh", delay=10, now=T0 + 100)
    broker.claim("w2", queue="qh", now=T0 + 110.5)
    third = scrape(origin)
    assert histogram(third, "goclaw_claim_latency_seconds", queue="qa") == (2, 0.75)
    assert histogram(third, "goclaw_claim_latency_seconds", queue="qh") == (1, 0.5)
    assert histogram(third, "goclaw_task_duration_seconds", kind="noop", outcome="succeeded") == (
        1,
        1.0,
    )
    assert value(third, "goclaw_tasks", state="SUCCEEDED") == 3
    assert value(third, "goclaw_tasks", state="CLAIMED") == 1
    assert_model_calls(third, extra_ok_calls=1)
    assert value(third, "goclaw_lease_expiries_total", kind="noop") == 1


def test_websocket_figures_and_exposition(gateway):
    origin, _, app = gateway
    metrics = app[STATE].metrics
    s = scrape(origin)
    assert value(s, "goclaw_ws_connections") == 0
    assert value(s, "goclaw_ws_dropped_sends_total") == 0
    assert value(s, "goclaw_ws_backpressure_total") == 0
    assert value(s, "goclaw_tasks", state="QUEUED") == 0
    metrics.ws_connected()
    metrics.ws_connected()
    metrics.ws_disconnected()
    metrics.ws_dropped(5)
    metrics.ws_dropped()
    metrics.ws_backpressured()
    s = scrape(origin)
    assert value(s, "goclaw_ws_connections") == 1
    assert value(s, "goclaw_ws_dropped_sends_total") == 6
    assert value(s, "goclaw_ws_backpressure_total") == 1
    _, _, text = fetch(f"{origin}/metrics")
    assert "# HELP goclaw_claim_latency_seconds" in text
    assert "# TYPE goclaw_task_duration_seconds histogram" in text


@pytest.mark.parametrize("token", [None, "wrong" * 8])
def test_metrics_need_the_token(gateway, token):
    origin, _, _ = gateway
    status, _, text = fetch(f"{origin}/metrics", token)
    assert status == 401 and "unauthorized" in text


def insert_event(broker: Broker, event_id: int, task_id: int) -> None:
    """A lease expiry row with an explicit id, as a late PostgreSQL commit would leave it."""
    broker.db.execute(
        "INSERT INTO task_events (id, task_id, type, from_state, to_state, at) "
        "VALUES (?, ?, 'lease.expired', 'CLAIMED', 'QUEUED', ?)",
        (event_id, task_id, T0),
    )


def test_a_row_committed_below_the_cursor_is_counted_once(gateway):
    """Ids are not commit-ordered on PostgreSQL: a row may appear below the cursor."""
    origin, broker, app = gateway
    [task] = broker.submit("noop", now=T0)
    assert value(scrape(origin), "goclaw_lease_expiries_total", kind="noop") is None
    high = broker.db.fetchone("SELECT MAX(id) FROM task_events")[0]
    insert_event(broker, high + 2, task.task_id)  # id high + 1 is "still in flight"
    assert value(scrape(origin), "goclaw_lease_expiries_total", kind="noop") == 1
    tail = app[STATE].metrics._events
    assert tail.high == high + 2 and [g[:2] for g in tail.gaps] == [[high + 1, high + 1]]
    insert_event(broker, high + 1, task.task_id)  # ... and commits now
    assert value(scrape(origin), "goclaw_lease_expiries_total", kind="noop") == 2
    assert tail.gaps == []
    assert value(scrape(origin), "goclaw_lease_expiries_total", kind="noop") == 2


def test_gaps_expire(gateway):
    """A gap is re-read for gap_seconds; an id that never commits (a rollback) is let go."""
    _, broker, _ = gateway
    now = [0.0]
    metrics = GatewayMetrics(gap_seconds=60, clock=lambda: now[0])
    [task] = broker.submit("noop", now=T0)
    metrics.render(broker)
    high = broker.db.fetchone("SELECT MAX(id) FROM task_events")[0]
    insert_event(broker, high + 3, task.task_id)
    metrics.render(broker)
    assert [g[:2] for g in metrics._events.gaps] == [[high + 1, high + 2]]
    now[0] = 59.0
    metrics.render(broker)
    assert len(metrics._events.gaps) == 1
    now[0] = 60.0
    metrics.render(broker)
    assert metrics._events.gaps == []
    insert_event(broker, high + 1, task.task_id)  # too late: not counted
    body, _ = metrics.render(broker)
    assert value(parse(body.decode()), "goclaw_lease_expiries_total", kind="noop") == 1


def claims_counted(metrics: GatewayMetrics) -> float | None:
    return metrics.registry.get_sample_value(
        "goclaw_claim_latency_seconds_count", {"queue": "default"}
    )


def test_history_is_ingested_in_steps_and_rendered_whole(gateway):
    _, broker, _ = gateway
    broker.submit("noop", count=12, now=T0)
    claims = broker.claim("w", limit=12, now=T0 + 1)
    assert len(claims) == 12  # 24 events: 12 submitted, 12 claimed
    metrics = GatewayMetrics(history=True)
    steps, seen = [], []
    for _ in range(4):
        steps.append(metrics.ingest(broker, max_rows=7))
        seen.append(claims_counted(metrics))
    # Seven rows a step: ids 1-7 are submissions, 8-14 hold 2 claims, 15-21 seven more.
    assert steps == [False, False, False, True] and seen == [None, 2, 9, 12]
    metrics.render(broker)
    assert claims_counted(metrics) == 12
    # A restarted gateway: render takes the whole history at once, or by default none of it.
    broker.submit("noop", count=3, now=T0)
    broker.claim("w", limit=3, now=T0 + 2)
    with_history, from_now = GatewayMetrics(history=True), GatewayMetrics()
    with_history.render(broker)
    from_now.render(broker)
    assert claims_counted(with_history) == 15 and claims_counted(from_now) is None
    broker.submit("noop", now=T0)
    broker.claim("w", now=T0 + 3)
    with_history.render(broker)
    from_now.render(broker)
    assert claims_counted(with_history) == 16 and claims_counted(from_now) == 1


def test_the_handler_pages_and_steps_through_history(gateway, monkeypatch):
    import goclaw.gateway.metrics as module

    monkeypatch.setattr(module, "PAGE_ROWS", 3)
    monkeypatch.setattr(module, "STEP_ROWS", 5)
    origin, broker, _ = gateway
    before_the_first_scrape(broker)
    assert_nothing_counted(scrape(origin))
    run_lifecycle(broker)
    record_calls(broker)
    s = scrape(origin)
    assert_lifecycle(s)
    assert_model_calls(s)


@pytest.mark.postgres
def test_postgres_late_commit_below_the_cursor(home, postgres_url):
    """A real in-flight transaction holds a lower id while a higher one commits."""
    import psycopg

    config = load_config(home, env={"GOCLAW_DATABASE_URL": postgres_url})
    broker = open_broker(config)
    try:
        app = create_app(config, broker)
        with serve_in_thread(app) as origin:
            [task] = broker.submit("noop", now=T0)
            with psycopg.connect(postgres_url) as late:
                with late.transaction():
                    late.execute(
                        "INSERT INTO task_events (task_id, type, from_state, to_state, at) "
                        "VALUES (%s, 'lease.expired', 'CLAIMED', 'QUEUED', %s)",
                        (task.task_id, T0),
                    )
                    # A higher id, committed first (another task: the late insert holds
                    # a key-share lock on this one's row).
                    [other] = broker.submit("noop", now=T0 + 1)
                    s = scrape(origin)
                    assert value(s, "goclaw_lease_expiries_total", kind="noop") is None
                    assert value(s, "goclaw_tasks", state="QUEUED") == 2
                    tail = app[STATE].metrics._events
                    assert tail.high > 1 and tail.gaps
                s = scrape(origin)
                assert value(s, "goclaw_lease_expiries_total", kind="noop") == 1
                assert tail.gaps == [] and other.created
                s = scrape(origin)
                assert value(s, "goclaw_lease_expiries_total", kind="noop") == 1
    finally:
        broker.close()


def test_metrics_are_503_while_the_database_fails(gateway, monkeypatch):
    origin, broker, _ = gateway
    scrape(origin)  # the cursors start here
    broker.submit("noop", now=T0)
    [claim] = broker.claim("w", now=T0 + 1)

    def unavailable() -> dict[str, int]:
        raise DatabaseError(f"{broker.db.describe()}: database is locked")

    monkeypatch.setattr(broker, "counts", unavailable)
    status, _, text = fetch(f"{origin}/metrics")
    assert status == 503 and "metrics unavailable" in text and "database is locked" in text
    monkeypatch.undo()
    s = scrape(origin)
    assert value(s, "goclaw_claim_latency_seconds_count", queue="default") == 1
    assert value(s, "goclaw_tasks", state="CLAIMED") == 1 and claim.task_id


def test_the_gateway_with_metrics_does_not_import_litellm():
    code = (
        "import sys, goclaw.gateway.server, goclaw.gateway.metrics; "
        "assert 'prometheus_client' in sys.modules; "
        "assert 'litellm' not in sys.modules"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
