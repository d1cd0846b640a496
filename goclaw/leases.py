"""What a worker process holds, and the two loops that keep leases honest.

``Holdings`` is the per-process ledger of claims: prefetched (CLAIMED) and
running. ``LeaseKeeper`` renews those leases with a heartbeat and relays
cancellations to running tasks. ``Reaper`` returns expired leases to the
queue; it runs in every worker process but only the elected leader reaps, so
there is one reaper per database and it never rides along with a claim.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable

from goclaw.broker import Broker
from goclaw.context import TaskContext
from goclaw.records import Claim

log = logging.getLogger(__name__)

REAPER_ROLE = "reaper"


class Holdings:
    """Claims held by this process; shared by worker threads and the keeper."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.buffer: collections.deque[Claim] = collections.deque()
        self.running: dict[int, TaskContext] = {}

    def leases(self) -> list[Claim]:
        with self.lock:
            return [*self.buffer, *(ctx.claim for ctx in self.running.values())]

    def running_ids(self) -> list[int]:
        with self.lock:
            return list(self.running)

    def forget(self, task_ids: list[int]) -> None:
        with self.lock:
            for task_id in task_ids:
                self.running.pop(task_id, None)

    def mark_lost(self, task_ids: list[int]) -> None:
        lost = set(task_ids)
        with self.lock:
            self.buffer = collections.deque(c for c in self.buffer if c.task_id not in lost)
            for task_id in lost:
                ctx = self.running.get(task_id)
                if ctx is not None:
                    ctx.lease_lost.set()

    def mark_canceled(self, task_ids: list[int]) -> None:
        with self.lock:
            for task_id in task_ids:
                ctx = self.running.get(task_id)
                if ctx is not None:
                    ctx.canceled.set()


class LeaseKeeper:
    """Heartbeat: renew held leases every ``heartbeat_seconds``; check cancels more often."""

    def __init__(
        self,
        broker: Broker,
        holdings: Holdings,
        worker_id: str,
        write_lock: threading.Lock | None = None,
    ) -> None:
        self.broker = broker
        self.holdings = holdings
        self.worker_id = worker_id
        self.write_lock = write_lock or threading.Lock()
        self.interval = min(broker.settings.cancel_check_seconds, broker.settings.heartbeat_seconds)
        self._next_heartbeat = 0.0

    def loop(self, now: float) -> None:
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + self.broker.settings.heartbeat_seconds
            with self.write_lock, self.broker.transaction():
                lost = self.broker.renew(self.worker_id, self.holdings.leases(), now=now)
                self.broker.worker_heartbeat(self.worker_id, now=now)
            if lost:
                log.info("leases no longer held (finished, canceled or expired): %s", lost)
                self.holdings.mark_lost(lost)
        running = self.holdings.running_ids()
        if running:
            canceled = self.broker.canceled_among(running)
            if canceled:
                self.holdings.mark_canceled(canceled)


class Reaper:
    """Requeue (or dead-letter) tasks whose lease expired, if this process leads."""

    def __init__(self, broker: Broker, worker_id: str) -> None:
        self.broker = broker
        self.worker_id = worker_id
        lease = broker.settings.lease_seconds
        self.interval = max(0.05, min(1.0, lease / 4))
        self.leader_ttl = lease

    def loop(self, now: float) -> list[int]:
        if not self.broker.try_lead(REAPER_ROLE, self.worker_id, ttl=self.leader_ttl, now=now):
            return []
        reaped = self.broker.reap(now=now)
        if reaped:
            log.info("reaped %d task(s) with expired leases: %s", len(reaped), reaped[:20])
        return reaped


class ServiceThread:
    """Call ``loop(now)`` every ``interval`` seconds until stopped; never die of an error."""

    def __init__(
        self,
        name: str,
        loop: Callable[[float], object],
        interval: float,
        clock: Callable[[], float] = time.time,
        on_exit: Callable[[], object] | None = None,
    ) -> None:
        self.name = name
        self._loop = loop
        self.interval = interval
        self._clock = clock
        self._on_exit = on_exit
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> ServiceThread:
        self._thread.start()
        return self

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    self._loop(self._clock())
                except Exception:
                    log.exception("%s failed; retrying in %.2fs", self.name, self.interval)
                self._stop.wait(self.interval)
        finally:
            if self._on_exit is not None:
                self._on_exit()
