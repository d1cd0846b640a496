"""Huey storage backed by the broker: dequeue leases a task, nothing is deleted on read.

Huey's consumer calls ``dequeue()`` in each worker thread and runs what it
gets. Here ``dequeue`` is one broker transaction that

1. records the outcomes reported since the last one (any thread's),
2. takes a prefetched claim, or claims a task, and moves it to RUNNING,
3. tops up the prefetch buffer (those tasks stay visibly CLAIMED),

and only then hands Huey a message rebuilt from the task row. Threads that
ask at the same time share that transaction (group commit): the thread
holding the exchange serves every queued request, so one fsync covers them. A task whose
kind is unknown or whose payload does not fit is failed in that same
transaction and never reaches Huey. Outcomes come back through Huey's
post-execute hook and signals and are committed by the next ``dequeue`` or
by ``flush`` at shutdown; until then the lease keeper keeps their leases.

Idle threads block on the doorbell (``blocking = True`` tells Huey's
consumer not to sleep-poll), waking on a ring, when the next delayed task
falls due, or after ``idle_poll_seconds`` at most.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any, Protocol

from huey.exceptions import CancelExecution
from huey.registry import Message
from huey.signals import SIGNAL_INTERRUPTED
from huey.storage import BaseStorage

from goclaw.broker import POSITIONAL_KEY, Broker, Outcome, decode_payload
from goclaw.context import TaskContext
from goclaw.doorbell import Listener
from goclaw.errors import DatabaseError, PermanentTaskError, TaskCanceled, TaskParked
from goclaw.leases import Holdings, LeaseKeeper, Reaper, ServiceThread
from goclaw.records import Claim
from goclaw.store.kv import KeyValue

log = logging.getLogger(__name__)


class KindIndex(Protocol):
    """What the storage needs to know about task kinds (implemented by ``App``)."""

    def validate(self, claim: Claim) -> tuple[str, str] | None: ...

    def huey_name(self, kind: str) -> str: ...

    def kind_of(self, huey_name: str) -> str: ...


class GoclawStorage(BaseStorage):
    blocking = True
    priority = True

    def __init__(
        self,
        name: str = "default",
        *,
        broker: Broker,
        kinds: KindIndex,
        concurrency: int = 1,
        prefetch: int = 1,
        worker_id: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(name)
        self.broker = broker
        self.queue = name
        self.kinds = kinds
        self.concurrency = concurrency
        self.prefetch = max(prefetch, 0)
        self.base_worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
        self.serializer: Any = None  # set by App: Huey's serializer
        self.kv = KeyValue(broker.db, name)
        self.holdings = Holdings()
        self._pending: list[tuple[Claim, Outcome]] = []
        self._requests: list[_Request] = []
        self._pending_lock = threading.Lock()
        self._thread = _ThreadState()
        self._exchange_lock = threading.Lock()
        self._pid: int | None = None
        self._creator_pid = os.getpid()
        self._process_lock = threading.Lock()
        self._services: list[ServiceThread] = []
        self.listener: Listener | None = None
        self.worker_id = self.base_worker_id

    # -- per-process services ------------------------------------------------

    def start_process_services(self) -> None:
        """Register this process as a worker and start its listener, keeper and reaper.

        Lazy and keyed on the pid: Huey's process workers fork after the
        storage exists, and each child needs its own connection and threads.
        """
        with self._process_lock:
            pid = os.getpid()
            if self._pid == pid:
                return
            if pid != self._creator_pid:
                # A forked process worker: its own connection, ledger and id.
                self.broker.db.close()
                self.holdings = Holdings()
                self._pending = []
                self._requests = []
                self._services = []
                self.worker_id = f"{self.base_worker_id}/{pid}"
            self._pid = pid
            broker = self.broker
            broker.register_worker(
                self.worker_id,
                hostname=socket.gethostname(),
                pid=pid,
                queue=self.queue,
                concurrency=self.concurrency,
            )
            self.listener = broker.doorbell.listen(broker.db, self.queue, self.concurrency)
            # The keeper writes under the exchange lock: on PostgreSQL, a renew
            # and an exchange of the same process locking the same rows in
            # different orders deadlock.
            keeper = LeaseKeeper(broker, self.holdings, self.worker_id, self._exchange_lock)
            reaper = Reaper(broker, self.worker_id)
            # Connections are per thread: each service closes its own on exit.
            close = broker.db.close
            self._services = [
                ServiceThread("goclaw-lease-keeper", keeper.loop, keeper.interval, on_exit=close),
                ServiceThread("goclaw-reaper", reaper.loop, reaper.interval, on_exit=close),
            ]
            for service in self._services:
                service.start()
            log.info("worker %s serving queue %r", self.worker_id, self.queue)

    def stop_process_services(self) -> None:
        for service in self._services:
            service.stop()
        if self.listener is not None:
            self.listener.close()
        if self._pid == os.getpid():
            try:
                self.broker.worker_stopped(self.worker_id)
            except DatabaseError:
                log.warning("could not mark worker %s stopped", self.worker_id)

    # -- the queue -------------------------------------------------------------

    def dequeue(self) -> bytes | None:
        self.start_process_services()
        self._report_dropped()
        try:
            claim = self._exchange()
        except DatabaseError as exc:
            log.warning("claim failed, retrying: %s", exc)
            time.sleep(0.05)
            return None
        if claim is None:
            self._wait_for_work()
            return None
        if self.listener is not None:
            self.listener.pass_on()  # more may be waiting: wake the next idle thread
        self._thread.current = claim
        return self._message(claim)

    def _report_dropped(self) -> None:
        """Fail the task this thread last ran if Huey dropped it without a hook.

        Huey's worker loop logs and forgets a task when ``execute`` raises
        outside the task body (a storage error in its revoke check, say).
        Its lease would otherwise be renewed forever; reported as an error,
        it is retried like any other failure.
        """
        claim, self._thread.current = self._thread.current, None
        if claim is None:
            return
        with self.holdings.lock:
            ctx = self.holdings.running.get(claim.task_id)
        if ctx is not None and not ctx.reported:
            log.error("task %s ended without an outcome; reporting it failed", claim.task_id)
            self._queue_report(
                claim.message_id,
                Outcome("error", error="the worker lost the task (see the worker log)"),
            )

    def _exchange(self) -> Claim | None:
        """Report, start and claim in one transaction, shared by every waiting thread.

        Group commit, leader/follower: each thread queues a request, and
        whichever thread holds the exchange lock serves every queued request
        (and every queued outcome) in its transaction, so threads that finish
        together share one fsync. A follower whose request was served while
        it waited just takes its result.
        """
        request = _Request()
        with self._pending_lock:
            self._requests.append(request)
        with self._exchange_lock:
            if not request.done:
                self._serve_requests()
        if request.error is not None:
            raise request.error
        self._thread.kv_empty = request.kv_empty
        return request.claim

    def _serve_requests(self) -> None:
        broker = self.broker
        pool = _ClaimPool(self, list(self.holdings.buffer))
        reports: list[tuple[Claim, Outcome]] = []
        served: list[_Request] = []
        try:
            with broker.transaction():
                while True:
                    new_reports, requests = self._take_work()
                    if not new_reports and not requests:
                        break
                    # Recorded before they are applied: if the transaction
                    # fails, every one of them goes back (a dropped report
                    # would leave its task RUNNING under a live lease).
                    reports += new_reports
                    served += requests
                    for claim, outcome in new_reports:
                        result = broker.report(claim, outcome)
                        if not result.accepted:
                            log.warning(
                                "report for task %s rejected: %s", claim.task_id, result.detail
                            )
                    for request in requests:
                        request.claim = self._start_next(pool)
                pool.top_up()
                kv_empty = self.kv.is_empty()
        except BaseException as exc:
            self._return_pending(reports)
            for request in served:
                request.claim, request.error, request.done = None, exc, True
            raise
        with self.holdings.lock:
            self.holdings.buffer.clear()
            self.holdings.buffer.extend(pool.remaining())
            for claim, _ in reports:
                self.holdings.running.pop(claim.task_id, None)
            for request in served:
                if request.claim is not None:
                    self.holdings.running[request.claim.task_id] = TaskContext(request.claim)
        for request in served:
            request.kv_empty = kv_empty
            request.done = True

    def _start_next(self, pool: _ClaimPool) -> Claim | None:
        """The next claim that can run here, moved to RUNNING; bad ones are failed."""
        while (candidate := pool.next()) is not None:
            problem = self.kinds.validate(candidate)
            if problem is not None:
                code, message = problem
                self.broker.report(candidate, Outcome.permanent(message, code))
                continue
            if self.broker.start(candidate):
                return candidate
        return None

    def _take_work(self) -> tuple[list[tuple[Claim, Outcome]], list[_Request]]:
        with self._pending_lock:
            reports, self._pending = self._pending, []
            requests, self._requests = self._requests, []
        return reports, requests

    def _wait_for_work(self) -> None:
        settings = self.broker.settings
        timeout = settings.idle_poll_seconds
        try:
            due = self.broker.next_due(self.queue)
        except DatabaseError:
            due = None
        if due is not None:
            timeout = min(timeout, max(due - self.broker.clock(), 0.001))
        if self.listener is not None:
            self.listener.wait(timeout)
        else:
            time.sleep(timeout)

    def _message(self, claim: Claim) -> bytes:
        args, kwargs = decode_payload(claim.payload)
        message = Message(
            claim.message_id,
            self.kinds.huey_name(claim.kind),
            None,  # eta: run_after was already honoured by the claim
            0,  # retries: the broker retries, never Huey
            0,
            claim.priority,
            tuple(args),
            kwargs,
        )
        return self.serializer.serialize(message)

    # -- outcomes --------------------------------------------------------------

    def context_for(self, message_id: str) -> TaskContext:
        with self.holdings.lock:
            for ctx in self.holdings.running.values():
                if ctx.claim.message_id == message_id:
                    return ctx
        raise LookupError(f"no running task with message id {message_id}")

    def report_execution(self, task: Any, value: Any, exc: BaseException | None) -> None:
        """Huey post-execute hook: queue the outcome for the next commit."""
        if exc is None:
            outcome = Outcome.succeeded(value)
        elif isinstance(exc, PermanentTaskError):
            outcome = Outcome.permanent(str(exc), exc.code)
        elif isinstance(exc, TaskCanceled | CancelExecution):
            outcome = Outcome.canceled(str(exc) or "canceled")
        elif isinstance(exc, TaskParked):
            outcome = Outcome.parked(str(exc), exc.until)
        else:
            outcome = Outcome.error_from(exc)
        self._queue_report(task.id, outcome)

    def report_signal(self, signal: str, task: Any, *args: Any) -> None:
        """Huey signals for paths that skip post-execute (revoked, expired, interrupted)."""
        if signal == SIGNAL_INTERRUPTED:
            self._queue_report(task.id, Outcome.released())
            self.flush()  # the consumer is exiting: nothing else will commit it
        else:
            self._queue_report(task.id, Outcome.canceled(f"huey: {signal}"))

    def _queue_report(self, message_id: str, outcome: Outcome) -> None:
        try:
            ctx = self.context_for(message_id)
        except LookupError:
            log.debug("outcome for unknown message %s ignored", message_id)
            return
        with self._pending_lock:
            if ctx.reported:
                return  # already reported (CancelExecution emits a signal and the hook)
            ctx.reported = True
            self._pending.append((ctx.claim, outcome))

    def flush(self) -> None:
        """Commit pending outcomes and release prefetched claims (worker shutdown)."""
        with self._exchange_lock:
            reports = self._take_pending()
            with self.holdings.lock:
                buffered = list(self.holdings.buffer)
                self.holdings.buffer.clear()
            reports += [(claim, Outcome.released()) for claim in buffered]
            if not reports:
                return
            try:
                with self.broker.transaction():
                    for claim, outcome in reports:
                        self.broker.report(claim, outcome)
            except DatabaseError:
                log.exception(
                    "could not record %d outcome(s); their leases will expire and the "
                    "tasks will run again",
                    len(reports),
                )
                return
            self.holdings.forget([claim.task_id for claim, _ in reports])

    def on_worker_shutdown(self) -> None:
        """Huey shutdown hook, run by each worker thread or process as it exits."""
        self.flush()
        if os.getpid() != self._creator_pid:
            # A forked process worker: its keeper and listener die with it.
            self.stop_process_services()
        self.broker.db.close()  # this thread's connection

    def _take_pending(self) -> list[tuple[Claim, Outcome]]:
        with self._pending_lock:
            reports, self._pending = self._pending, []
        return reports

    def _return_pending(self, reports: list[tuple[Claim, Outcome]]) -> None:
        with self._pending_lock:
            self._pending = reports + self._pending

    # -- Huey's API path: tasks enqueued with huey.enqueue / task() calls -----

    def enqueue(self, data: bytes, priority: float | None = None) -> None:
        message = self.serializer.deserialize(data)
        self._submit_message(message, eta=message.eta)

    def add_to_schedule(self, data: bytes, ts: dt.datetime) -> None:
        message = self.serializer.deserialize(data)
        self._submit_message(message, eta=ts)

    def _submit_message(self, message: Message, eta: dt.datetime | None) -> None:
        unsupported = [
            name
            for name in ("on_complete", "on_error", "chord_config", "expires", "timeout")
            if getattr(message, name, None)
        ]
        if unsupported:
            raise ValueError(
                f"goclaw tasks do not support Huey's {', '.join(unsupported)}: "
                "submit follow-up work as separate tasks"
            )
        args = dict(message.kwargs or {})
        if message.args:
            args[POSITIONAL_KEY] = list(message.args)
        delay = 0.0
        if eta is not None:
            if eta.tzinfo is None:
                eta = eta.replace(tzinfo=dt.UTC)
            delay = eta.timestamp() - self.broker.clock()
        self.broker.submit(
            self.kinds.kind_of(message.name),
            args,
            queue=self.queue,
            priority=int(message.priority or 0),
            max_attempts=(message.retries + 1) if message.retries else None,
            delay=delay,
            ref=message.id,
        )

    def queue_size(self) -> int:
        return self.broker.queue_depth(self.queue)

    def enqueued_items(self, limit: int | None = None) -> list[bytes]:
        return []

    def flush_queue(self) -> None:
        raise NotImplementedError(
            "goclaw never deletes tasks; cancel them with `goclaw task cancel`"
        )

    def read_schedule(self, ts: dt.datetime) -> list[bytes]:
        return []  # delayed tasks wait in the tasks table (run_after), not in a schedule

    def schedule_size(self) -> int:
        return 0

    def scheduled_items(self, limit: int | None = None) -> list[bytes]:
        return []

    def flush_schedule(self) -> None:
        pass

    # -- Huey's key-value data (revocations, locks, counters) ----------------

    def put_data(self, key: str, value: bytes, is_result: bool = False) -> None:
        self._thread.kv_empty = False
        self.kv.put(str(key), bytes(value))

    def peek_data(self, key: str) -> Any:
        from huey.constants import EmptyData

        value = self.kv.get(str(key))
        return EmptyData if value is None else value

    def pop_data(self, key: str) -> Any:
        from huey.constants import EmptyData

        value = self.kv.pop(str(key))
        return EmptyData if value is None else value

    def peek_many(self, keys: list[str]) -> dict[str, bytes]:
        """Huey checks two revocation keys before every task: one query, or none.

        None when the exchange that handed this thread its task saw no Huey
        data at all, the usual case: the revocation check then happens at
        claim time, microseconds before execute, instead of a query per task.
        """
        if self._thread.kv_empty:
            return {}
        return self.kv.get_many([str(k) for k in keys])

    def has_data_for_key(self, key: str) -> bool:
        return self.kv.get(str(key)) is not None

    def put_if_empty(self, key: str, value: bytes, ttl: float | None = None) -> bool:
        self._thread.kv_empty = False
        return self.kv.put_if_empty(str(key), bytes(value))

    def delete_data(self, key: str) -> bool:
        # Huey deletes each task's revocation key after it runs; usually there is none.
        if self._thread.kv_empty and str(key).startswith("r:"):
            return False
        return self.kv.delete(str(key))

    def incr(self, key: str, amount: int = 1) -> int:
        return self.kv.incr(str(key), amount)

    def delete_counter(self, key: str) -> None:
        self.kv.delete(str(key))

    def result_store_size(self) -> int:
        return self.kv.size()

    def result_items(self) -> dict[str, bytes]:
        return self.kv.items()

    def flush_results(self) -> None:
        self.kv.flush()

    def close(self) -> None:
        self.broker.db.close()


class _ThreadState(threading.local):
    #: The claim this worker thread was last handed.
    current: Claim | None = None
    #: The kv table held nothing for this queue at that claim's exchange.
    kv_empty: bool = False


class _Request:
    """One worker thread's wish for its next task, served by the current leader."""

    __slots__ = ("claim", "done", "error", "kv_empty")

    def __init__(self) -> None:
        self.claim: Claim | None = None
        self.error: BaseException | None = None
        self.done = False
        self.kv_empty = False


class _ClaimPool:
    """Claims available to one exchange: the prefetch buffer, then fresh claims."""

    def __init__(self, storage: GoclawStorage, buffered: list[Claim]) -> None:
        self.storage = storage
        self.candidates = buffered
        self.taken = 0
        self.exhausted = False

    def next(self) -> Claim | None:
        if self.taken == len(self.candidates) and not self._claim(1 + self.storage.prefetch):
            return None
        self.taken += 1
        return self.candidates[self.taken - 1]

    def top_up(self) -> None:
        """Refill the prefetch buffer, unless this exchange found the queue empty."""
        room = self.storage.prefetch - (len(self.candidates) - self.taken)
        if room > 0 and self.taken > 0:
            self._claim(room)

    def remaining(self) -> list[Claim]:
        return self.candidates[self.taken :]

    def _claim(self, limit: int) -> bool:
        if self.exhausted:
            return False
        storage = self.storage
        fresh = storage.broker.claim(storage.worker_id, queue=storage.queue, limit=limit)
        self.candidates += fresh
        self.exhausted = len(fresh) < limit
        return bool(fresh)


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
