"""``GET /metrics``: the Prometheus text format (prometheus_client), behind the bearer token.

The gateway never runs a task and never calls a model (workers do, in other
processes), so every figure except the WebSocket ones is read from the
database: the task counts on each scrape, the rest ingested from
``task_events`` and ``model_calls``. The WebSocket figures are the gateway's
own, counted as they happen.

Metrics:

``goclaw_tasks{state}`` (gauge)
    Tasks in each of the eight states now (``Broker.counts``).
``goclaw_lease_expiries_total{kind}`` (counter)
    ``lease.expired`` events: the reaper took a task back from a worker that
    stopped renewing its lease (back to the queue, or to DEAD_LETTER).
``goclaw_retries_total{kind}`` (counter)
    ``task.retry_scheduled`` events: a run raised and the task waits for
    another attempt. Operator re-queues (``goclaw task retry``) are not counted.
``goclaw_dead_letters_total{kind,reason}`` (counter)
    Moves to DEAD_LETTER, by reason code: ``retries_exhausted``,
    ``poison_pill`` (``task.dead_lettered``) or ``lease_expired`` (the reaper).
``goclaw_claim_latency_seconds{queue}`` (histogram)
    From the moment a task became due to its ``task.claimed`` event. Due is
    the task's ``run_after`` for a fresh submission (so a delayed task is not
    late while it waits), ``retry_at`` after a retry, and the time of the event
    that put it back in the queue after a lease expiry, a release or a re-queue.
    ``task.submitted`` does not record ``run_after``, so it is read from the
    task row; if a later retry or expiry has moved it by the time the claim is
    ingested, the submission time stands in, which over-states the claim
    latency of a *delayed* submission by its delay (see ``_due``).
``goclaw_task_duration_seconds{kind,outcome}`` (histogram)
    One observation per run, from ``task.started`` to the event that ended the
    run. ``outcome`` is ``succeeded``, ``failed``, ``retry`` (raised, will be
    retried), ``dead_letter``, ``canceled``, ``lease_expired`` (the worker
    vanished), ``released`` (its worker shut down) or ``parked`` (it waits for an
    approval without holding a worker).
``goclaw_model_calls_total{agent,model,outcome}`` (counter)
    Model requests; ``outcome`` is ``ok`` or the failure class
    (``rate_limited``, ``timeout``, ...).
``goclaw_model_latency_seconds{agent,model}`` (histogram)
    The latency of every model request, whatever its outcome: a timeout's wait
    is latency a user felt. Split by outcome with ``goclaw_model_calls_total``.
``goclaw_model_tokens_total{agent,model,direction}`` (counter)
    Tokens the providers reported, ``direction`` ``prompt`` or ``completion``.
``goclaw_model_cost_usd_total{agent,model}`` (counter)
    Cost in US dollars, as accounted per call (configured prices or LiteLLM's
    offline cost map, computed by the worker).
``goclaw_ws_connections`` (gauge)
    Open WebSocket connections to this gateway.
``goclaw_ws_dropped_sends_total`` (counter)
    Events dropped from a connection's full send queue.
``goclaw_ws_backpressure_total`` (counter)
    ``system.backpressure`` notices sent to slow clients.

Counters and histograms also carry prometheus_client's ``_created`` series.

Scrape cost. Each scrape reads the task counts (one ``GROUP BY`` over the
``tasks_state`` index) and then only the rows added since the previous scrape:
a cursor per table (the highest ``id`` ingested), read forward in pages of
``PAGE_ROWS``. Event rows no metric uses (submissions, agent events such as
``chunk``) cost their read and nothing more; the others are completed with
their task's kind and queue and, for a claim or the end of a run, the earlier
event it is measured from, all by index. Measured on 20,000 finished tasks
(80,000 events, 20,000 model calls), in process on SQLite and PostgreSQL: the
first scrape takes 2 ms and 12 ms, one with nothing new 1.5 ms and 5 ms (mostly
the counts), one after 100 more tasks 4 ms and 10 ms.

Counters and histograms count what happened since the gateway's first
scrape, like any process's counters: a gateway restart is a counter reset,
which ``rate()`` and ``increase()`` are built for. (Prometheus only learns
from the second sample how a series moved, so counting from the gateway's
start instead would add nothing to it.) The first scrape places each cursor
at the end of its table, one ``MAX(id)`` and a read of the last
``START_WINDOW`` ids, so it costs the same on any size of database.

``GatewayMetrics(history=True)`` ingests the whole history instead, at a
first-scrape cost of about 5 µs a row (0.4 s on SQLite, 0.7 s on PostgreSQL
for the 20,000 tasks above). Its totals then survive a gateway restart, but
not one that follows a retention purge (``goclaw.event_log``): the re-ingested
totals would fall below the last scraped ones and read as a reset, which
``rate()`` would take for an increase of everything left. Either way,
several gateways on one database report the same events (aggregate them
with ``max``, not ``sum``). A long catch-up runs in steps of ``STEP_ROWS``
rows (``metrics_handler``), so it never holds the gateway's database thread
for long, and ``render`` exposes nothing until it is complete.

Ids are not commit-ordered on PostgreSQL: a serial id is taken when a row is
inserted, so a transaction holding id 41 can commit after one holding id 42
was read, and a plain ``id > cursor`` would skip 41 for ever. (On SQLite
writers are serialised and ids are commit-ordered, so this never happens
there, but the same code runs.) So every id at or below the cursor that was
missing when the cursor passed it is kept as a gap, in ranges, for
``gap_seconds`` (default 300 s, far longer than any goclaw transaction holds
an id; broker events are inserted just before their commit), and every scrape
re-reads those ranges: a row found there is counted and its id leaves the
gap, so no row is counted twice and a late commit is counted once. Ids of
rolled-back transactions never appear; their gaps expire. At most
``max_gaps`` ranges are kept (the oldest go first). This is a trailing window
of re-read ids with a record of those already counted, kept exact and small:
the window holds only the ids not yet seen, so a scrape re-reads nothing
when no transaction was in flight.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from goclaw.broker import Broker
from goclaw.errors import GoclawError
from goclaw.store.database import Database

#: Claim latency and run duration: a millisecond to an hour.
DURATION_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
    float("inf"),
)
#: A model request: 50 ms (a cached or tiny reply) to 5 minutes (a long stream).
MODEL_LATENCY_BUCKETS = (
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.0,
    4.0,
    8.0,
    15.0,
    30.0,
    60.0,
    120.0,
    300.0,
    float("inf"),
)

#: Rows read per query when catching up.
PAGE_ROWS = 5000
#: Ids below the end read by the first scrape, for rows still in flight then.
START_WINDOW = 1000
#: Rows per table per database-thread call while ``metrics_handler`` catches up
#: (some 25 ms on SQLite, 100 ms on PostgreSQL).
STEP_ROWS = 20_000
#: Ids per lookup by id.
LOOKUP_IDS = 1000
#: Gap ranges per re-read query (two bound parameters each).
GAP_RANGES = 200

#: Events that end a run that ``task.started`` began, and the outcome they mean.
RUN_ENDS = {
    "task.succeeded": "succeeded",
    "task.failed": "failed",
    "task.retry_scheduled": "retry",
    "task.dead_lettered": "dead_letter",
    "task.canceled": "canceled",
    "lease.expired": "lease_expired",
    "task.released": "released",
    "task.parked": "parked",
}
#: Events some metric reads; every other event only moves the cursor.
USED_EVENTS = frozenset({"task.claimed", *RUN_ENDS})
#: The events that make a task claimable: a claim's due time is measured from the last one.
BECOMES_DUE = (
    "task.submitted",
    "task.retry_scheduled",
    "lease.expired",
    "task.released",
    "task.requeued",
    "task.parked",
    "task.woken",
)

_IN_DUE = ", ".join(f"'{t}'" for t in BECOMES_DUE)
_IN_RUN_ENDS = ", ".join(f"'{t}'" for t in RUN_ENDS)
#: Every event row past the cursor, with no more than it needs: a dead letter's
#: detail (its reason); for a claim, the id of the event that made the task due
#: (``due_id``); for the end of a run, the id of that run's ``task.started``
#: (``started_id``). Each is one backward walk of ``task_events_task`` that stops
#: at the first match (past a run's agent events, for a run end); other
#: rows (submissions, agent events) cost their read and nothing more.
#: Everything here is an index lookup: joins to ``tasks`` and to the earlier
#: events are separate reads by id, which PostgreSQL's planner cannot
#: turn into hash joins over whole tables.
_EVENT_COLUMNS = (
    "e.id, e.type, e.from_state, e.to_state, e.at, e.task_id, "
    "CASE WHEN e.to_state = 'DEAD_LETTER' THEN e.detail END, "
    "CASE WHEN e.type = 'task.claimed' THEN ("
    "  SELECT x.id FROM task_events x "
    f"  WHERE x.task_id = e.task_id AND x.id < e.id AND x.type IN ({_IN_DUE}) "
    "  ORDER BY x.id DESC LIMIT 1) END, "
    f"CASE WHEN e.from_state = 'RUNNING' AND e.type IN ({_IN_RUN_ENDS}) THEN ("
    "  SELECT y.id FROM task_events y "
    "  WHERE y.task_id = e.task_id AND y.id < e.id AND y.type = 'task.started' "
    "  ORDER BY y.id DESC LIMIT 1) END"
)
_MODEL_CALL_COLUMNS = (
    "id, agent_id, model, outcome, prompt_tokens, completion_tokens, cost, latency_ms"
)


class _IdTail:
    """Which ids of one table are ingested: every id up to ``high``, except ``gaps``.

    ``gaps`` are ``[low, high, noticed_at]`` ranges, ascending and disjoint,
    of ids that were missing when the cursor passed them: rows there may still
    commit (PostgreSQL) and are re-read until ``gap_seconds`` have passed.
    """

    def __init__(self, table: str, *, gap_seconds: float, max_gaps: int, started: bool) -> None:
        self.table = table
        self.high = 0
        self.gaps: list[list[float]] = []
        self.gap_seconds = gap_seconds
        self.max_gaps = max_gaps
        #: False until the first scrape has placed the cursor (see ``GatewayMetrics``).
        self.started = started

    def start_at_end(self, db: Database, now: float) -> None:
        """Place the cursor at the table's end: what is there now is not counted.

        The last ``START_WINDOW`` ids are read so that those missing (rows of
        transactions still in flight) become gaps, counted when they commit.
        """
        top = db.fetchone(f"SELECT MAX(id) FROM {self.table}")[0] or 0
        self.high = max(int(top) - START_WINDOW, 0)
        ids = db.fetchall(f"SELECT id FROM {self.table} WHERE id > ? ORDER BY id", (self.high,))
        self.advance([r[0] for r in ids], now)
        self.started = True

    def expire(self, now: float) -> None:
        self.gaps = [g for g in self.gaps if now - g[2] < self.gap_seconds]
        if len(self.gaps) > self.max_gaps:
            del self.gaps[: len(self.gaps) - self.max_gaps]

    def advance(self, ids: Sequence[int], now: float) -> None:
        """``ids`` (ascending, all above ``high``) are ingested; what they skip is a gap."""
        previous = self.high
        for i in ids:
            if i > previous + 1:
                self.gaps.append([previous + 1, i - 1, now])
            previous = i
        self.high = previous
        if len(self.gaps) > self.max_gaps:
            del self.gaps[: len(self.gaps) - self.max_gaps]

    def fill(self, ids: Iterable[int]) -> None:
        """``ids`` were found inside gaps and ingested: cut them out."""
        found = sorted(ids)
        if not found:
            return
        kept: list[list[float]] = []
        for low, high, noticed in self.gaps:
            start = low
            for i in found:  # few: what committed late since the last scrape
                if start <= i <= high:
                    if i > start:
                        kept.append([start, i - 1, noticed])
                    start = i + 1
            if start <= high:
                kept.append([start, high, noticed])
        self.gaps = kept


class GatewayMetrics:
    """The gateway's metrics in a registry of its own (never prometheus_client's global one).

    Counters and histograms count from this object's first scrape, or, with
    ``history=True``, from the oldest rows the database still holds.
    """

    def __init__(
        self,
        *,
        history: bool = False,
        gap_seconds: float = 300.0,
        max_gaps: int = 1000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.clock = clock
        self._events = _IdTail(
            "task_events", gap_seconds=gap_seconds, max_gaps=max_gaps, started=history
        )
        self._calls = _IdTail(
            "model_calls", gap_seconds=gap_seconds, max_gaps=max_gaps, started=history
        )
        self._lock = threading.Lock()
        r = self.registry
        self.tasks = Gauge("goclaw_tasks", "Tasks in each state.", ["state"], registry=r)
        self.lease_expiries = Counter(
            "goclaw_lease_expiries",
            "Leases the reaper took back from workers that stopped renewing them.",
            ["kind"],
            registry=r,
        )
        self.retries = Counter(
            "goclaw_retries", "Runs that raised and were scheduled to retry.", ["kind"], registry=r
        )
        self.dead_letters = Counter(
            "goclaw_dead_letters", "Tasks moved to DEAD_LETTER.", ["kind", "reason"], registry=r
        )
        self.claim_latency = Histogram(
            "goclaw_claim_latency_seconds",
            "From a task falling due to its claim.",
            ["queue"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.task_duration = Histogram(
            "goclaw_task_duration_seconds",
            "From task.started to the event that ended the run.",
            ["kind", "outcome"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.model_calls = Counter(
            "goclaw_model_calls",
            "Model requests, by outcome.",
            ["agent", "model", "outcome"],
            registry=r,
        )
        self.model_latency = Histogram(
            "goclaw_model_latency_seconds",
            "Latency of model requests, whatever their outcome.",
            ["agent", "model"],
            buckets=MODEL_LATENCY_BUCKETS,
            registry=r,
        )
        self.model_tokens = Counter(
            "goclaw_model_tokens",
            "Tokens reported by the providers.",
            ["agent", "model", "direction"],
            registry=r,
        )
        self.model_cost = Counter(
            "goclaw_model_cost_usd",
            "Cost of model requests in USD.",
            ["agent", "model"],
            registry=r,
        )
        self.ws_connections = Gauge(
            "goclaw_ws_connections", "Open WebSocket connections.", registry=r
        )
        self.ws_dropped_sends = Counter(
            "goclaw_ws_dropped_sends", "Events dropped from a full send queue.", registry=r
        )
        self.ws_backpressure = Counter(
            "goclaw_ws_backpressure", "system.backpressure notices sent.", registry=r
        )

    # -- the gateway's own figures (event loop thread) -------------------------

    def ws_connected(self) -> None:
        self.ws_connections.inc()

    def ws_disconnected(self) -> None:
        self.ws_connections.dec()

    def ws_dropped(self, count: int = 1) -> None:
        if count > 0:
            self.ws_dropped_sends.inc(count)

    def ws_backpressured(self) -> None:
        self.ws_backpressure.inc()

    # -- a scrape (database thread) --------------------------------------------

    def ingest(self, broker: Broker, max_rows: int | None = None) -> bool:
        """Ingest up to ``max_rows`` new rows of each table; True once nothing is left.

        Blocking. ``metrics_handler`` calls it in steps before ``render`` so
        that catching up on a long history never holds the database thread for
        long: the gateway's other requests are served between steps.
        """
        db = broker.db
        with self._lock, _reading(db):
            now = self.clock()
            events = self._ingest(db, _EVENT_COLUMNS, self._events, self._on_events, now, max_rows)
            calls = self._ingest(
                db, _MODEL_CALL_COLUMNS, self._calls, self._on_calls, now, max_rows
            )
        return events and calls

    def render(self, broker: Broker) -> tuple[bytes, str]:
        """Bring the metrics fully up to date from the database; return (body, content type).

        Blocking: run it on the gateway's database thread. It never exposes a
        partly ingested history (after a restart, counters that fell back below
        their last scraped values would read as resets). A database error
        propagates and leaves every cursor where the last ingested page left it.
        """
        db = broker.db
        with self._lock, _reading(db):
            counts = broker.counts()
            now = self.clock()
            self._ingest(db, _EVENT_COLUMNS, self._events, self._on_events, now)
            self._ingest(db, _MODEL_CALL_COLUMNS, self._calls, self._on_calls, now)
            for state, count in counts.items():
                self.tasks.labels(state).set(count)
            return generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4

    def _ingest(
        self,
        db: Database,
        columns: str,
        tail: _IdTail,
        handle: Callable[[Database, list[tuple]], None],
        now: float,
        max_rows: int | None = None,
    ) -> bool:
        """Handle rows that committed in a gap, then rows past the cursor, page by page.

        True when the table's end was reached. ``handle`` does its reads
        before it updates any metric, so an error leaves the metrics and the
        cursor in step.
        """
        table = tail.table
        if not tail.started:
            tail.start_at_end(db, now)
        tail.expire(now)
        gaps = list(tail.gaps)
        for start in range(0, len(gaps), GAP_RANGES):
            chunk = gaps[start : start + GAP_RANGES]
            where = " OR ".join(["e.id BETWEEN ? AND ?"] * len(chunk))
            params = [int(v) for g in chunk for v in g[:2]]
            rows = db.fetchall(
                f"SELECT {columns} FROM {table} e WHERE {where} ORDER BY e.id", params
            )
            if rows:
                handle(db, rows)
                tail.fill(r[0] for r in rows)
        budget = max_rows
        while budget is None or budget > 0:
            limit = PAGE_ROWS if budget is None else min(PAGE_ROWS, budget)
            rows = db.fetchall(
                f"SELECT {columns} FROM {table} e WHERE e.id > ? ORDER BY e.id LIMIT ?",
                (tail.high, limit),
            )
            if rows:
                handle(db, rows)
                tail.advance([r[0] for r in rows], now)
            if len(rows) < limit:
                return True
            if budget is not None:
                budget -= len(rows)
        return False

    def _on_events(self, db: Database, rows: list[tuple]) -> None:
        used = [r for r in rows if r[1] in USED_EVENTS]
        tasks = _lookup(
            db,
            "SELECT id, kind, queue, run_after FROM tasks WHERE id {}",
            {r[5] for r in used},
        )
        earlier = _lookup(
            db,
            "SELECT id, type, at, detail FROM task_events WHERE id {}",
            {i for r in used for i in r[7:9] if i is not None},
        )
        for (
            _event_id,
            event_type,
            from_state,
            to_state,
            at,
            task_id,
            detail,
            due_id,
            started_id,
        ) in used:
            task = tasks.get(task_id)
            if task is None:  # pragma: no cover - the foreign key keeps the task
                continue
            _, kind, queue, run_after = task
            if event_type == "task.claimed":
                _, due_type, due_at, due_detail = earlier.get(due_id) or (None, None, None, None)
                due = _due(at, run_after, due_type, due_at, due_detail)
                if due is not None:
                    self.claim_latency.labels(queue).observe(max(at - due, 0.0))
                continue
            if event_type == "lease.expired":
                self.lease_expiries.labels(kind).inc()
            elif event_type == "task.retry_scheduled":
                self.retries.labels(kind).inc()
            if to_state == "DEAD_LETTER":
                reason = _loads(detail).get("reason") or (
                    "lease_expired" if event_type == "lease.expired" else "unknown"
                )
                self.dead_letters.labels(kind, str(reason)).inc()
            started = earlier.get(started_id)
            if from_state == "RUNNING" and started is not None:
                outcome = RUN_ENDS[event_type]
                self.task_duration.labels(kind, outcome).observe(max(at - started[2], 0.0))

    def _on_calls(self, db: Database, rows: list[tuple]) -> None:
        for _, agent, model, outcome, prompt, completion, cost, latency_ms in rows:
            self.model_calls.labels(agent, model, outcome).inc()
            self.model_latency.labels(agent, model).observe(max(latency_ms or 0.0, 0.0) / 1000)
            self.model_tokens.labels(agent, model, "prompt").inc(max(prompt or 0, 0))
            self.model_tokens.labels(agent, model, "completion").inc(max(completion or 0, 0))
            self.model_cost.labels(agent, model).inc(max(cost or 0.0, 0.0))


def _due(
    claimed_at: float,
    run_after: float,
    due_type: str | None,
    due_at: float | None,
    due_detail: str | None,
) -> float | None:
    """When the claimed task became due, from the event that made it claimable.

    After a retry or a park it is the event's ``retry_at``; after a lease
    expiry, a release, a re-queue or a wake, the event's own time. A fresh submission is due at
    its ``run_after`` (a ``run_after`` in the event's detail, should the broker
    ever record one there, else the task row's). A claim never changes the
    row's ``run_after``, and whatever changes it later (a retry, a lease expiry,
    a re-queue) sets it past the claim: then the submission time is all that is
    left, exact for an undelayed task.
    """
    if due_type is None:
        return run_after if run_after <= claimed_at else None
    detail = _loads(due_detail)
    if due_type in ("task.retry_scheduled", "task.parked"):
        retry_at = detail.get("retry_at")
        if isinstance(retry_at, int | float):
            return float(retry_at)
    elif due_type == "task.submitted" and due_at is not None:
        recorded = detail.get("run_after")
        if isinstance(recorded, int | float):
            return float(recorded)
        if due_at <= run_after <= claimed_at:
            return run_after
    return due_at


@contextlib.contextmanager
def _reading(db: Database) -> Iterator[None]:
    """The scrape's reads; on PostgreSQL in one transaction without JIT compilation.

    The per-page queries carry correlated subqueries, and on tables the
    planner has no statistics for yet their estimated cost passes
    ``jit_above_cost``: compiling then took about 100 ms a query, even for a
    page that turned out empty, to run 1-10 ms of work. ``SET LOCAL`` keeps
    the setting to this transaction. On SQLite a transaction would take the
    write lock, so the reads run as they are.
    """
    if db.is_sqlite:
        yield
        return
    with db.transaction():
        db.execute("SET LOCAL jit = off")
        yield


def _lookup(db: Database, sql: str, ids: set[int]) -> dict[int, tuple]:
    """Rows by id: ``sql`` ends in ``WHERE id {}`` and selects ``id`` first.

    PostgreSQL takes the ids as one array (``= ANY(?)``): a thousand bound
    parameters cost more to send and plan than the index probes themselves.
    """
    found: dict[int, tuple] = {}
    ordered = sorted(ids)
    for start in range(0, len(ordered), LOOKUP_IDS):
        chunk = ordered[start : start + LOOKUP_IDS]
        if db.is_sqlite:
            rows = db.fetchall(sql.format(f"IN ({', '.join('?' * len(chunk))})"), chunk)
        else:
            rows = db.fetchall(sql.format("= ANY(?)"), (chunk,))
        for row in rows:
            found[row[0]] = row
    return found


def _loads(detail: str | None) -> dict[str, Any]:
    if not detail:
        return {}
    try:
        value = json.loads(detail)
    except (TypeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


async def metrics_handler(request: web.Request) -> web.Response:
    from goclaw.gateway.state import STATE  # state.py imports this module: no cycle at import

    state = request.app[STATE]
    try:
        # Catch up in steps (other requests use the database thread between them),
        # then render what little is left.
        while not await state.db(state.metrics.ingest, state.broker, STEP_ROWS):
            pass
        body, ctype = await state.db(state.metrics.render, state.broker)
    except GoclawError as exc:
        return web.Response(status=503, text=f"metrics unavailable: {exc}\n")
    return web.Response(body=body, headers={"Content-Type": ctype})
