"""``goclaw bench queue``: goclaw against what a user would pick instead, in one run.

This VM's fsync latency drifts by more than an order of magnitude within a
day, so an absolute tasks/s figure means little; what means something is a
ratio between measurements taken minutes apart on the same disk. One run
therefore measures, in the same directory:

* **goclaw** end to end: a real ``goclaw worker`` subprocess, a batch submit,
  every task leased, started and reported with ``synchronous=FULL``.
* **stock SqliteHuey**: the queue goclaw is built on, as a Huey user runs it
  (one commit per enqueue, Huey's own consumer, delete-on-read, no lease).
* **a raw sqlite3 lease loop**: the floor for any leasing queue on SQLite,
  claim and complete with two ``synchronous=FULL`` commits and nothing else.

plus **submit-to-start latency** on an idle goclaw worker (the doorbell path),
and an fsync probe at the start and the end so a reader can tell the regime.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import os
import random
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from goclaw.broker import Broker
from goclaw.config import load_config
from goclaw.errors import GoclawError

Progress = Callable[[str], None] | None

PHASE_TIMEOUT = 300.0
DEFAULT_ROUNDS = 2
POLL_SECONDS = 0.02
#: Each Huey task appends one fixed-width timestamp line to a file.
STAMP_FORMAT = b"%17.6f\n"
STAMP_BYTES = 18
#: Environment the bench must not inherit: the database lives in the bench dir.
DATABASE_ENV = ("GOCLAW_DATABASE_URL", "GOCLAW_DATABASE__URL", "GOCLAW_HOME")

HUEY_APP = '''\
"""Stock SqliteHuey with one no-op task; written by ``goclaw bench queue``."""
import os
import time

from huey import SqliteHuey

HERE = os.path.dirname(os.path.abspath(__file__))
huey = SqliteHuey("bench", filename=os.path.join(HERE, "huey.db"))

_DONE = os.environ.get("GOCLAW_BENCH_DONE_FILE")
_FD = os.open(_DONE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if _DONE else None
_STARTED = os.environ.get("GOCLAW_BENCH_START_FILE")


@huey.on_startup()
def record_start():
    # Runs in each worker thread just before its first dequeue.
    if _STARTED:
        fd = os.open(_STARTED, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(fd, b"%17.6f\\n" % time.time())
        os.close(fd)


@huey.task()
def noop():
    # One O_APPEND write: the bench's only way to see a task ran, at ~1 us.
    os.write(_FD, b"%17.6f\\n" % time.time())
'''


class BenchError(GoclawError):
    """The benchmark could not complete."""


@dataclasses.dataclass(frozen=True)
class Throughput:
    tasks_per_s: float
    seconds: float
    detail: dict[str, Any] = dataclasses.field(default_factory=dict)


# -- the entry point -------------------------------------------------------------


def run_queue_bench(
    *,
    n_tasks: int,
    workers: int,
    latency_samples: int = 50,
    workdir: str | os.PathLike[str] | None = None,
    progress: Progress = None,
    rounds: int = DEFAULT_ROUNDS,
    phase_timeout: float = PHASE_TIMEOUT,
) -> dict[str, Any]:
    """Measure goclaw, stock SqliteHuey and a raw sqlite3 lease loop on one disk.

    Each round runs raw, Huey, goclaw in that order; with ``rounds > 1`` the
    best round of each is reported, since a disk that drifts mid-run can only
    make a measurement slower. The latency samples are taken on the last
    round's goclaw worker right after its throughput measurement.
    """
    if n_tasks < 1 or workers < 1 or latency_samples < 1 or rounds < 1:
        raise ValueError("tasks, workers, latency samples and rounds must be at least 1")
    say = progress or (lambda _msg: None)
    with bench_workdir(workdir, "goclaw-bench-", say) as base:
        return _run(base, n_tasks, workers, latency_samples, rounds, phase_timeout, say)


@contextlib.contextmanager
def bench_workdir(workdir: str | None, prefix: str, say: Callable[[str], None]) -> Iterator[Path]:
    """A fresh directory for one run: temporary and removed after, or a new one under
    ``workdir`` that is kept (and said so), for looking at the logs and databases."""
    if workdir is None:
        base = Path(tempfile.mkdtemp(prefix=prefix))
    else:
        Path(workdir).mkdir(parents=True, exist_ok=True)
        base = Path(tempfile.mkdtemp(prefix="run-", dir=workdir))
    try:
        yield base
    finally:
        if workdir is None:
            shutil.rmtree(base, ignore_errors=True)
        else:
            say(f"bench files kept in {base}")


def run_per_call_bench(
    prefix: str,
    run: Callable[[Path, int, int, Callable[[str], None]], dict[str, Any]],
    *,
    calls: int,
    warmup: int,
    workdir: str | os.PathLike[str] | None,
    progress: Callable[[str], None] | None,
) -> dict[str, Any]:
    """The frame of the benches that time one call many times (policy, skill): checks the
    counts, then ``run(base, calls, warmup, say)`` in a work directory."""
    if calls < 1 or warmup < 0:
        raise ValueError("calls must be at least 1 and warmup at least 0")
    say = progress or (lambda _message: None)
    with bench_workdir(workdir, prefix, say) as base:
        return run(base, calls, warmup, say)


def _run(
    base: Path,
    n_tasks: int,
    workers: int,
    samples: int,
    rounds: int,
    timeout: float,
    say: Callable[[str], None],
) -> dict[str, Any]:
    say(f"bench dir {base}")
    fsync_start = probe_fsync(base / "probe.db")
    say(f"fsync probe: {fsync_start:.3f} ms per synchronous=FULL commit")
    home = base / "goclaw-home"
    env = _goclaw_env(home)
    broker = _open_bench_broker(home, env)
    raw: list[Throughput] = []
    huey: list[Throughput] = []
    goclaw: list[Throughput] = []
    latencies: list[float] = []
    verified = True
    try:
        for r in range(1, rounds + 1):
            raw.append(measure_raw(base / f"raw-{r}.db", n_tasks, workers, timeout))
            say(f"round {r}: raw sqlite3 lease loop {raw[-1].tasks_per_s:.0f} tasks/s")
            huey.append(measure_huey(base / "huey", n_tasks, workers, timeout, r))
            say(f"round {r}: stock SqliteHuey {huey[-1].tasks_per_s:.0f} tasks/s")
            log = base / f"goclaw-worker-{r}.log"
            with GoclawWorker(home, env, workers, log, timeout) as worker:
                worker.wait_live(broker)
                goclaw.append(measure_goclaw(broker, worker, n_tasks, timeout))
                verified = verified and goclaw[-1].detail["verified"]
                say(f"round {r}: goclaw {goclaw[-1].tasks_per_s:.0f} tasks/s")
                if r == rounds:
                    say(f"submit-to-start latency: {samples} samples on the idle worker")
                    latencies = measure_latency(broker, worker, samples, timeout)
    finally:
        broker.close()
    fsync_end = probe_fsync(base / "probe-end.db")
    best_raw, best_huey, best_goclaw = (max(runs, key=_rate) for runs in (raw, huey, goclaw))
    ordered = sorted(latencies)
    result: dict[str, Any] = {
        "tasks": n_tasks,
        "workers": workers,
        "rounds": rounds,
        "goclaw_tasks_per_s": _r(best_goclaw.tasks_per_s),
        "huey_tasks_per_s": _r(best_huey.tasks_per_s),
        "raw_tasks_per_s": _r(best_raw.tasks_per_s),
        "ratio_vs_huey": _r(best_goclaw.tasks_per_s / best_huey.tasks_per_s),
        "ratio_vs_raw": _r(best_goclaw.tasks_per_s / best_raw.tasks_per_s),
        "submit_to_start_p50_ms": _r(statistics.median(ordered)),
        "submit_to_start_p99_ms": _r(_nearest_rank(ordered, 0.99)),
        "submit_to_start_max_ms": _r(ordered[-1]),
        "goclaw_verified": verified,
        "fsync_probe_ms": _r(fsync_start),
        "fsync_probe_end_ms": _r(fsync_end),
        "goclaw_runs_tasks_per_s": [_r(t.tasks_per_s) for t in goclaw],
        "huey_runs_tasks_per_s": [_r(t.tasks_per_s) for t in huey],
        "raw_runs_tasks_per_s": [_r(t.tasks_per_s) for t in raw],
        "goclaw_submit_ms": _r(best_goclaw.detail["submit_s"] * 1000),
        "huey_enqueue_ms": _r(best_huey.detail["enqueue_s"] * 1000),
        "huey_drain_tasks_per_s": _r(n_tasks / best_huey.detail["drain_s"]),
        # Like for like without the submit side, where goclaw's batch insert is
        # one commit and stock Huey's API is one commit per task.
        "goclaw_drain_tasks_per_s": _r(n_tasks / best_goclaw.detail["drain_s"]),
        "drain_ratio_vs_huey": _r(best_huey.detail["drain_s"] / best_goclaw.detail["drain_s"]),
        "goclaw_worker_cpu_ms_per_task": _opt(best_goclaw.detail["cpu_ms_per_task"]),
        "huey_consumer_cpu_ms_per_task": _opt(best_huey.detail["cpu_ms_per_task"]),
        "raw_cpu_ms_per_task": _opt(best_raw.detail["cpu_ms_per_task"]),
        "latency_samples": len(ordered),
        "notes": _notes(rounds, samples),
    }
    return result


def _notes(rounds: int, samples: int) -> str:
    overrides = sorted(k for k in os.environ if k.startswith("GOCLAW_") and k not in DATABASE_ENV)
    parts = [
        f"Order per round: raw, huey, goclaw; {rounds} round(s), best of each reported "
        "(the *_runs_* lists hold every round). All three on the same disk, "
        "WAL + synchronous=FULL, the same number of worker threads.",
        "goclaw: worker subprocess started and idle before the clock starts; timed from "
        "just before one batch submit of N noop tasks to the latest task.succeeded "
        "event time (the report's transaction, one commit per task with the next start).",
        "huey: stock SqliteHuey (defaults) and huey_consumer -k thread -q; timed as the "
        "N enqueue calls (one commit each, before the consumer starts) plus the drain, "
        "from the first worker thread's on_startup hook to the last task's timestamp; "
        "the consumer's interpreter start-up is not timed, as goclaw's is not.",
        "raw: stdlib sqlite3 in-process: one batch insert, then each thread loops "
        "BEGIN IMMEDIATE claim (UPDATE ... RETURNING) COMMIT, BEGIN IMMEDIATE complete "
        "COMMIT; timed from the insert to the last thread's exit.",
        f"latency: {samples} single noop submits on the last round's idle goclaw worker, "
        "after its throughput run, each after the previous one succeeded plus 10-30 ms; "
        "task.started.at - task.submitted.at from the events (p99 is nearest-rank).",
        "*_cpu_ms_per_task: CPU of the goclaw worker process, of the Huey consumer from its "
        "first worker's start, of the raw bench threads (whole process), per task, from "
        "/proc (null where unavailable); on 2 cores, CPU and not fsync often sets the pace.",
        "fsync_probe_ms: median of 20 one-row synchronous=FULL WAL commits at the start "
        "(fsync_probe_end_ms at the end); this VM drifts ~0.05-2 ms, so compare ratios.",
    ]
    if overrides:
        parts.append(f"goclaw settings overridden by the environment: {', '.join(overrides)}.")
    return " ".join(parts)


# -- the disk ------------------------------------------------------------------


def probe_fsync(path: Path, commits: int = 20) -> float:
    """Median milliseconds of one one-row ``synchronous=FULL`` WAL commit on this disk."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=wal")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("CREATE TABLE IF NOT EXISTS p (x INTEGER)")
        conn.execute("INSERT INTO p VALUES (0)")  # warm-up
        times = []
        for i in range(commits):
            started = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO p VALUES (?)", (i,))
            conn.execute("COMMIT")
            times.append((time.perf_counter() - started) * 1000)
        return statistics.median(times)
    finally:
        conn.close()


# -- raw floor -----------------------------------------------------------------

RAW_SCHEMA = (
    "CREATE TABLE t (id INTEGER PRIMARY KEY, state TEXT NOT NULL, owner TEXT, "
    "token INTEGER NOT NULL DEFAULT 0, lease_expires REAL)",
    "CREATE INDEX t_claimable ON t (id) WHERE state = 'QUEUED'",
)
RAW_CLAIM = (
    "UPDATE t SET state = 'RUNNING', owner = ?, token = token + 1, lease_expires = ? "
    "WHERE id = (SELECT id FROM t WHERE state = 'QUEUED' ORDER BY id LIMIT 1) "
    "RETURNING id, token"
)
RAW_COMPLETE = "UPDATE t SET state = 'DONE', owner = NULL WHERE id = ? AND token = ?"


def _raw_connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=wal")
    conn.execute("PRAGMA synchronous=FULL")
    return conn


def measure_raw(path: Path, n_tasks: int, workers: int, timeout: float) -> Throughput:
    """The floor for a leasing queue on SQLite: two durable commits per task, nothing else.

    No events, no attempts, no Huey, no subprocess: what remains is the cost
    any design that leases and fences with ``synchronous=FULL`` must pay, so
    goclaw's distance from it is its own overhead.
    """
    setup = _raw_connect(path)
    for statement in RAW_SCHEMA:
        setup.execute(statement)
    errors: list[BaseException] = []
    deadline = time.monotonic() + timeout

    def loop(owner: str) -> None:
        conn = _raw_connect(path)
        try:
            while time.monotonic() < deadline:
                conn.execute("BEGIN IMMEDIATE")
                rows = conn.execute(RAW_CLAIM, (owner, time.time() + 30)).fetchall()
                conn.execute("COMMIT")
                if not rows:
                    return
                conn.execute("BEGIN IMMEDIATE")
                conn.execute(RAW_COMPLETE, rows[0])
                conn.execute("COMMIT")
        except BaseException as exc:
            errors.append(exc)
        finally:
            conn.close()

    try:
        cpu_before = _own_cpu_seconds()
        started = time.perf_counter()
        setup.execute("BEGIN IMMEDIATE")
        setup.executemany("INSERT INTO t (state) VALUES ('QUEUED')", [()] * n_tasks)
        setup.execute("COMMIT")
        threads = [
            threading.Thread(target=loop, args=(f"raw-{i}",), daemon=True) for i in range(workers)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(max(deadline - time.monotonic(), 0) + 5)
        elapsed = time.perf_counter() - started
        cpu = _per_task_ms(cpu_before, _own_cpu_seconds(), n_tasks)
        if errors:
            raise BenchError(f"raw sqlite3 loop failed: {errors[0]!r}")
        done = setup.execute("SELECT COUNT(*) FROM t WHERE state = 'DONE'").fetchone()[0]
    finally:
        setup.close()
    if done != n_tasks:
        raise BenchError(f"raw sqlite3 loop: {done} of {n_tasks} done within {timeout:.0f}s")
    return Throughput(n_tasks / elapsed, elapsed, {"cpu_ms_per_task": cpu})


# -- stock Huey ----------------------------------------------------------------


def measure_huey(
    directory: Path, n_tasks: int, workers: int, timeout: float, round_no: int
) -> Throughput:
    """Stock SqliteHuey as a Huey user runs it: ``noop()`` N times, then ``huey_consumer``.

    This is the queue goclaw wraps, at its defaults (WAL, SQLite's default
    ``synchronous=FULL``, delete-on-read, no lease): what goclaw's durability
    costs is measured against it. Each enqueue is its own commit, because
    that is what calling a Huey task does.
    """
    directory.mkdir(exist_ok=True)
    app_file = directory / "bench_huey_app.py"
    if not app_file.exists():
        app_file.write_text(HUEY_APP, encoding="utf-8")
    done_file = directory / f"done-{round_no}.txt"
    start_file = directory / f"started-{round_no}.txt"
    app = _import_huey_app(app_file)
    try:
        leftover = app.huey.pending_count()
        if leftover:
            raise BenchError(f"stock Huey queue holds {leftover} task(s) before the round")
        started = time.time()
        for _ in range(n_tasks):
            app.noop()
        enqueue_s = time.time() - started
    finally:
        app.huey.storage.close()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(directory), os.environ.get("PYTHONPATH")])),
        "GOCLAW_BENCH_DONE_FILE": str(done_file),
        "GOCLAW_BENCH_START_FILE": str(start_file),
    }
    command = [
        sys.executable,
        "-m",
        "huey.bin.huey_consumer",
        "bench_huey_app.huey",
        "-w",
        str(workers),
        "-k",
        "thread",
        "-q",
    ]
    log = directory / f"huey-consumer-{round_no}.log"
    cpu_at_start: list[float | None] = []
    with Subprocess("stock Huey consumer", command, env, directory, log) as consumer:
        assert consumer.proc is not None
        pid = consumer.proc.pid
        want = n_tasks * STAMP_BYTES

        def drained() -> bool:
            if not cpu_at_start and _size(start_file):  # its CPU from here on is the drain's
                cpu_at_start.append(process_cpu_seconds(pid))
            return _size(done_file) >= want

        consumer.wait_for(drained, timeout, f"stock Huey draining {n_tasks} tasks")
        cpu = _per_task_ms(
            cpu_at_start[0] if cpu_at_start else None, process_cpu_seconds(pid), n_tasks
        )
    stamps = _read_stamps(done_file)
    starts = _read_stamps(start_file)
    if len(stamps) != n_tasks or not starts:
        raise BenchError(f"stock Huey ran {len(stamps)} of {n_tasks} tasks")
    drain_s = max(stamps) - min(starts)
    total = enqueue_s + drain_s
    detail = {"enqueue_s": enqueue_s, "drain_s": drain_s, "cpu_ms_per_task": cpu}
    return Throughput(n_tasks / total, total, detail)


def _import_huey_app(path: Path) -> Any:
    # Huey names a task by its module, so the bench must import it under the
    # name the consumer will: bench_huey_app.
    spec = importlib.util.spec_from_file_location("bench_huey_app", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _read_stamps(path: Path) -> list[float]:
    try:
        return [float(line) for line in path.read_text().split()]
    except FileNotFoundError:
        return []


# -- goclaw ----------------------------------------------------------------------


def _goclaw_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DATABASE_ENV}
    env["GOCLAW_HOME"] = str(home)
    return env


def _open_bench_broker(home: Path, env: dict[str, str]) -> Broker:
    from goclaw.worker import open_broker

    config = load_config(home=home, env=env)
    return open_broker(config)


class Subprocess:
    """A child process whose output goes to a log file and which never outlives the bench."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], cwd: Path, log: Path):
        self.name = name
        self.command = command
        self.env = env
        self.cwd = cwd
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Subprocess:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.command,
                env=self.env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def check(self) -> None:
        """Raise with the tail of the log if the process has exited."""
        assert self.proc is not None
        code = self.proc.poll()
        if code is not None:
            raise BenchError(f"{self.name} exited with status {code}; log tail:\n{self.tail()}")

    def tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"

    def wait_for(
        self, ready: Callable[[], bool], timeout: float, what: str, poll: float = POLL_SECONDS
    ) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            self.check()
            if time.monotonic() > deadline:
                raise BenchError(
                    f"{what}: timed out after {timeout:.0f}s; {self.name} log tail:\n{self.tail()}"
                )
            time.sleep(poll)

    def stop(self, grace: float = 30.0) -> None:
        """SIGINT (graceful for both consumers), then SIGKILL if it will not go."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class GoclawWorker(Subprocess):
    """``goclaw worker`` in a subprocess, over the bench's own home."""

    def __init__(self, home: Path, env: dict[str, str], workers: int, log: Path, timeout: float):
        command = [
            sys.executable,
            "-m",
            "goclaw.cli",
            "--home",
            str(home),
            "worker",
            "--concurrency",
            str(workers),
        ]
        super().__init__("goclaw worker", command, env, home.parent, log)
        self.timeout = timeout

    def wait_live(self, broker: Broker) -> None:
        assert self.proc is not None
        pid = self.proc.pid

        def live() -> bool:
            return any(w.pid == pid for w in broker.live_workers())

        self.wait_for(live, self.timeout, "goclaw worker start-up")
        # A worker imports LiteLLM in the background after it registers
        # (worker.preload_models): seconds of CPU that must not land in a measurement.
        settled_rss(pid)


def measure_goclaw(
    broker: Broker, worker: GoclawWorker, n_tasks: int, timeout: float
) -> Throughput:
    """goclaw end to end: one batch submit, a real worker, every task durably reported.

    Each task is claimed, started, run by Huey's consumer and reported, each
    step a guarded update plus an event, committed with ``synchronous=FULL``.
    Verified afterwards: every task has exactly one ``task.succeeded`` event.
    """
    assert worker.proc is not None
    cpu_before = process_cpu_seconds(worker.proc.pid)
    started = time.time()
    submitted = broker.submit("noop", count=n_tasks)
    submit_s = time.time() - started
    ids = [s.task_id for s in submitted]
    low, high = min(ids), max(ids)
    if high - low + 1 != n_tasks:
        raise BenchError(f"goclaw: expected {n_tasks} consecutive task ids, got {low}..{high}")

    cursor = low

    def finished() -> bool:
        # Walk forward from the first task not yet seen SUCCEEDED: tasks finish
        # roughly in id order, so the whole wait reads each row about once and
        # the poller costs the worker no CPU worth mentioning.
        nonlocal cursor
        row = broker.db.fetchone(
            "SELECT id, state FROM tasks WHERE id BETWEEN ? AND ? AND state != 'SUCCEEDED' "
            "ORDER BY id LIMIT 1",
            (cursor, high),
        )
        if row is None:
            return True
        cursor, state = row
        if state in ("FAILED", "DEAD_LETTER", "CANCELED"):
            raise BenchError(f"goclaw: noop task {cursor} ended {state}")
        return False

    worker.wait_for(finished, timeout, f"goclaw draining {n_tasks} tasks")
    cpu = _per_task_ms(cpu_before, process_cpu_seconds(worker.proc.pid), n_tasks)
    rows = broker.db.fetchall(
        "SELECT task_id, COUNT(*), MAX(at) FROM task_events "
        "WHERE task_id BETWEEN ? AND ? AND type = 'task.succeeded' GROUP BY task_id",
        (low, high),
    )
    verified = len(rows) == n_tasks and all(count == 1 for _, count, _ in rows)
    finished_at = max(at for _, _, at in rows)
    elapsed = finished_at - started
    # The worker starts claiming at the submit's commit: the rest is the drain.
    drain_s = elapsed - submit_s
    detail = {
        "submit_s": submit_s,
        "drain_s": drain_s,
        "verified": verified,
        "cpu_ms_per_task": cpu,
    }
    return Throughput(n_tasks / elapsed, elapsed, detail)


def measure_latency(
    broker: Broker, worker: GoclawWorker, samples: int, timeout: float
) -> list[float]:
    """Milliseconds from submit to start for single tasks on an idle worker.

    What an agent waiting on one tool call sees: the submit's commit, the
    doorbell, a worker thread waking and claiming. Each task is submitted
    after the previous one succeeded and a 10-30 ms pause, so every sample
    finds the worker's threads asleep on the doorbell.
    """
    ids = []
    for _ in range(samples):
        time.sleep(random.uniform(0.010, 0.030))
        task_id = broker.submit("noop")[0].task_id
        ids.append(task_id)

        def succeeded(task_id: int = task_id) -> bool:
            row = broker.db.fetchone("SELECT state FROM tasks WHERE id = ?", (task_id,))
            if row is not None and row[0] in ("FAILED", "DEAD_LETTER", "CANCELED"):
                raise BenchError(f"goclaw: latency sample task {task_id} ended {row[0]}")
            return row is not None and row[0] == "SUCCEEDED"

        worker.wait_for(succeeded, timeout, f"goclaw latency sample {task_id}", poll=0.005)
    latencies = []
    for task_id in ids:
        at = {e.type: e.at for e in broker.events(task_id)}
        latencies.append((at["task.started"] - at["task.submitted"]) * 1000)
    return latencies


# -- helpers ---------------------------------------------------------------------


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise BenchError(f"no VmRSS for process {pid}")


def settled_rss(pid: int, timeout: float = 30.0) -> int:
    """RSS once it stops growing for a second: the worker has finished its imports."""
    deadline = time.monotonic() + timeout
    last, stable_since = rss_kb(pid), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = rss_kb(pid)
        if now != last:
            last, stable_since = now, time.monotonic()
        elif time.monotonic() - stable_since >= 1.0:
            break
    return last


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds a process has used so far (Linux ``/proc``; else None)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def _per_task_ms(before: float | None, after: float | None, n_tasks: int) -> float | None:
    if before is None or after is None:
        return None
    return (after - before) * 1000 / n_tasks


def _rate(run: Throughput) -> float:
    return run.tasks_per_s


def _r(value: float) -> float:
    return round(float(value), 2)


def _opt(value: float | None) -> float | None:
    return None if value is None else _r(value)


def _nearest_rank(ordered: list[float], q: float) -> float:
    return ordered[max(math.ceil(q * len(ordered)) - 1, 0)]


__all__ = [
    "BenchError",
    "Throughput",
    "measure_goclaw",
    "measure_huey",
    "measure_latency",
    "measure_raw",
    "probe_fsync",
    "run_queue_bench",
]
