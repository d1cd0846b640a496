"""``goclaw up``: the gateway and workers as supervised child processes, for real.

Each test runs a real ``goclaw up`` (its own session, so nothing here sends it
a terminal's signals) against SQLite and PostgreSQL, finds its children's pids
in its log lines, and checks what a user would: /healthz, a task completing, a
SIGKILLed child coming back, Ctrl-C stopping everything, and no child left
behind however ``goclaw up`` ends.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from goclaw.cli import get_health
from goclaw.states import TaskState
from goclaw.supervisor import Backoff, ChildSpec, Supervisor
from tests.acceptance.conftest import Stack, wait_for

pytestmark = pytest.mark.slow

TOKEN = "t" * 32
GRACE = 5.0
STARTED = re.compile(r"(?:started|restarted) (\S+) \(pid (\d+)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie awaiting its reaper counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


class Up:
    """One ``goclaw up`` process, its log and the pids of the children it reported."""

    def __init__(self, stack: Stack, *args: str) -> None:
        self.stack = stack
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = stack.home / f"up-{self.port}.log"
        with self.log_path.open("wb") as log_file:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "goclaw.cli", "up", "--port", str(self.port), *args],
                env=stack.env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def pids(self) -> dict[str, int]:
        """The latest pid of each child, from the supervisor's start/restart lines."""
        return {name: int(pid) for name, pid in STARTED.findall(self.log())}

    def all_pids(self) -> set[int]:
        return {int(pid) for _, pid in STARTED.findall(self.log())}

    def health(self) -> dict[str, Any] | None:
        return get_health(self.url, timeout=1)

    def wait_healthy(self, workers: int, timeout: float = 30) -> dict[str, Any]:
        """/healthz answers 200 and lists a live worker for each current worker child."""

        def ready() -> dict[str, Any] | None:
            assert self.proc.poll() is None, f"goclaw up exited\n{self.log()}"
            health = self.health()
            pids = [pid for name, pid in self.pids().items() if name.startswith("worker-")]
            if health is None or len(pids) < workers:
                return None
            ids = health["workers"]["ids"]
            return health if all(any(f":{pid}:" in i for i in ids) for pid in pids) else None

        return wait_for(ready, timeout=timeout, what=lambda: f"a healthy stack\n{self.log()}")

    def close(self) -> None:
        """SIGKILL whatever is left: ``goclaw up`` first, then any child it reported."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for pid in self.all_pids():
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def start_up(stack) -> Iterator[Callable[..., Up]]:
    """Start ``goclaw up`` (with an auth token in its home) with short grace and backoff."""
    started: list[Up] = []

    def start(*args: str, token: bool = True) -> Up:
        if token:
            (stack.home / "auth.token").write_text(TOKEN + "\n")
        up = Up(stack, "--grace-seconds", str(GRACE), "--restart-delay", "0.2", *args)
        started.append(up)
        return up

    yield start
    for up in started:
        up.close()


def test_up_starts_gateway_and_workers_and_runs_a_task(stack, start_up):
    begun = time.monotonic()
    up = start_up("--workers", "2", "--concurrency", "2")
    health = up.wait_healthy(workers=2)
    print(f"\nhealthy with 2 workers after {time.monotonic() - begun:.2f}s")
    assert set(up.pids()) == {"gateway", "worker-1", "worker-2", "scheduler"}
    assert health["status"] == "ok" and health["database"]["ok"] is True
    assert health["workers"]["live"] == 2
    # The supervisor says where the gateway is, once it answers.
    wait_for(lambda: f"gateway ready at {up.url}" in up.log(), timeout=5, what=up.log)
    # The workers serve the queue: a task submitted through the broker completes.
    [submitted] = stack.broker.submit("echo", {"text": "hi"})
    task = stack.wait_terminal([submitted.task_id], timeout=20)[submitted.task_id]
    assert task.state is TaskState.SUCCEEDED, up.log()
    # Each worker child got --concurrency.
    assert {w.concurrency for w in stack.broker.live_workers()} == {2}


def test_a_sigkilled_worker_or_gateway_is_restarted_with_a_log_line(stack, start_up):
    up = start_up()
    up.wait_healthy(workers=1)
    first = up.pids()

    killed = time.monotonic()
    os.kill(first["worker-1"], signal.SIGKILL)
    wait_for(
        lambda: up.pids()["worker-1"] != first["worker-1"],
        timeout=10,
        what=lambda: f"worker-1 to be restarted\n{up.log()}",
    )
    up.wait_healthy(workers=1)  # a live worker under the new pid
    print(f"\nworker back in /healthz {time.monotonic() - killed:.2f}s after SIGKILL")
    second = up.pids()
    assert second["worker-1"] != first["worker-1"]
    assert second["gateway"] == first["gateway"], "the other children are left alone"
    log = up.log()
    assert f"worker-1 (pid {first['worker-1']}) was killed by SIGKILL" in log
    assert f"restarted worker-1 (pid {second['worker-1']}, restart #1)" in log

    killed = time.monotonic()
    os.kill(first["gateway"], signal.SIGKILL)
    wait_for(
        lambda: up.pids()["gateway"] != first["gateway"] and up.health(),
        timeout=20,
        what=lambda: f"the gateway to come back\n{up.log()}",
    )
    print(f"gateway answering again {time.monotonic() - killed:.2f}s after SIGKILL")
    log = up.log()
    assert f"gateway (pid {first['gateway']}) was killed by SIGKILL" in log
    assert f"restarted gateway (pid {up.pids()['gateway']}, restart #1)" in log
    assert not alive(first["worker-1"]) and not alive(first["gateway"])
    # The restarted pair still does the work.
    [submitted] = stack.broker.submit("noop")
    task = stack.wait_terminal([submitted.task_id], timeout=20)[submitted.task_id]
    assert task.state is TaskState.SUCCEEDED


def test_sigint_stops_every_child_gracefully_and_exits_zero(stack, start_up):
    up = start_up("--workers", "2")
    up.wait_healthy(workers=2)
    pids = up.all_pids()
    # A task running when Ctrl-C arrives finishes: workers get SIGINT, not SIGTERM.
    [submitted] = stack.broker.submit("sleep", {"seconds": 1})
    wait_for(
        lambda: stack.broker.get(submitted.task_id).state is TaskState.RUNNING,
        timeout=20,
        what="the sleep task to start",
    )
    begun = time.monotonic()
    up.proc.send_signal(signal.SIGINT)
    assert up.proc.wait(GRACE + 5) == 0, up.log()
    took = time.monotonic() - begun
    print(f"\ngoclaw up stopped {took:.2f}s after SIGINT (a 1 s task was running)")
    assert took < GRACE, up.log()
    assert [pid for pid in pids if alive(pid)] == []
    log = up.log()
    assert "SIGINT: stopping every child" in log and "SIGKILL" not in log
    for name, pid in up.pids().items():
        assert f"{name} (pid {pid}) exited with status 0" in log
    assert stack.broker.get(submitted.task_id).state is TaskState.SUCCEEDED
    assert stack.broker.live_workers() == []


def test_children_die_with_a_sigkilled_supervisor(stack, start_up):
    up = start_up()
    up.wait_healthy(workers=1)
    pids = up.all_pids()
    up.proc.kill()
    up.proc.wait(10)
    wait_for(
        lambda: not any(alive(pid) for pid in pids),
        timeout=5,
        what=lambda: f"children {pids} to die with their parent",
    )


def test_no_auth_token_is_a_clear_error_and_starts_nothing(stack, start_up):
    up = start_up(token=False)
    assert up.proc.wait(30) == 1
    log = up.log()
    assert "auth.token" in log and "goclaw init" in log, log
    assert up.all_pids() == set() and "started" not in log
    assert stack.broker.live_workers() == []


def test_an_invalid_policy_is_an_error_naming_the_line_and_starts_nothing(stack, start_up):
    (stack.home / "policy.yaml").write_text("version: 1\nallow:\n  - tools.teleport\n")
    up = start_up()
    assert up.proc.wait(30) == 1
    log = up.log()
    assert "policy.yaml:3: allow[0]: unknown tool capability 'tools.teleport'" in log, log
    assert up.all_pids() == set() and "started" not in log


def test_a_taken_port_is_a_clear_error_and_starts_nothing(stack, start_up):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        up = start_up("--port", str(port))
        assert up.proc.wait(30) == 1
    log = up.log()
    assert f"cannot listen on 127.0.0.1:{port}" in log and "--port" in log, log
    assert up.all_pids() == set() and "started" not in log


@pytest.mark.parametrize("second_signal", [False, True], ids=["grace-expires", "second-ctrl-c"])
def test_stragglers_are_sigkilled_and_the_exit_status_says_so(stack, start_up, second_signal):
    up = start_up("--grace-seconds", "30" if second_signal else "1")
    up.wait_healthy(workers=1)
    pids = up.all_pids()
    # A worker given SIGINT finishes its running task first: this one outlasts any grace.
    [submitted] = stack.broker.submit("sleep", {"seconds": 60})
    wait_for(
        lambda: stack.broker.get(submitted.task_id).state is TaskState.RUNNING,
        timeout=20,
        what="the sleep task to start",
    )
    begun = time.monotonic()
    up.proc.send_signal(signal.SIGINT)
    if second_signal:
        wait_for(lambda: "SIGINT: stopping" in up.log(), timeout=5, what=up.log)
        up.proc.send_signal(signal.SIGINT)
    assert up.proc.wait(10) == 1, up.log()
    assert time.monotonic() - begun < 3
    log = up.log()
    why = "a second stop signal" if second_signal else "the grace period"
    assert f"worker-1 (pid {up.pids()['worker-1']}) still running after {why}: SIGKILL" in log
    if not second_signal:
        assert f"gateway (pid {up.pids()['gateway']}) exited with status 0" in log
    assert [pid for pid in pids if alive(pid)] == []


@pytest.mark.parametrize(
    ("stable_seconds", "delays"),
    [(30.0, ["0.1", "0.2", "0.4", "0.4"]), (0.0, ["0.1", "0.1", "0.1", "0.1"])],
    ids=["crash-loop-backs-off", "a-stable-run-resets-the-backoff"],
)
def test_a_crashing_child_is_restarted_with_a_growing_delay(caplog, stable_seconds, delays):
    """In-process: the supervisor's own loop, with a child that exits at once, every time."""
    crasher = ChildSpec("crasher", (sys.executable, "-c", "raise SystemExit(3)"))
    backoff = Backoff(initial=0.1, maximum=0.4, stable_seconds=stable_seconds)
    supervisor = Supervisor([crasher], grace_seconds=1, backoff=backoff)

    def exits() -> list[str]:
        return [r.getMessage() for r in caplog.records if "exited with status 3" in r.getMessage()]

    def stop_after_four_exits() -> None:
        wait_for(lambda: len(exits()) >= 4, timeout=20, what="four exits")
        supervisor.request_stop()

    caplog.set_level(logging.INFO, logger="goclaw.supervisor")
    threading.Thread(target=stop_after_four_exits, daemon=True).start()
    assert supervisor.run() == 0
    lines = exits()[:4]
    assert all(line.startswith("crasher (pid ") for line in lines), lines
    assert [re.search(r"restart #(\d+) in (\S+)s$", line).groups() for line in lines] == [
        (str(n), delay) for n, delay in enumerate(delays, 1)
    ]
