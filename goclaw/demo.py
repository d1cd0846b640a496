"""``goclaw demo``: start a real worker, run a few tasks through every path, show them.

What ``make run`` shows a new user until the agent runtime lands: a success,
a retry that ends in the dead-letter queue, a task canceled while it runs,
and the final counts, all from a worker process like production's.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from goclaw.broker import Broker
from goclaw.config import Config
from goclaw.states import TERMINAL, TaskState


def run_demo(config: Config, console: Console) -> tuple[int, dict[str, Any]]:
    """Returns an exit status and a summary: each demo task's final record."""
    from goclaw.cli import follow, print_event
    from goclaw.worker import open_broker

    broker = open_broker(config)
    log_path = Path(config.home) / "demo-worker.log"
    console.rule("[bold]goclaw demo")
    console.print(f"home: {config.home}\ndatabase: {broker.db.describe()}", highlight=False)
    with log_path.open("wb") as log_file:
        worker = subprocess.Popen(
            [sys.executable, "-m", "goclaw.cli", "--home", str(config.home), "worker", "-c", "2"],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_for_worker(broker, worker, log_path)
        console.print(f"worker started (pid {worker.pid}, log {log_path})\n", highlight=False)

        console.rule("an echo task")
        ok = broker.submit("echo", {"text": "hello from goclaw"})[0].task_id
        final = follow(broker, [ok], timeout=30, out=console)
        console.print(f"result: {final[ok].result}\n", highlight=False)

        console.rule("a task that always fails: retries with backoff, then the dead-letter queue")
        bad = broker.submit("fail", {"message": "demo failure"}, max_attempts=3)[0].task_id
        final = follow(broker, [bad], timeout=60, out=console)
        console.print(f"reason: {final[bad].reason}\n", highlight=False)

        console.rule("a long task canceled while it runs")
        long = broker.submit("sleep", {"seconds": 30})[0].task_id
        deadline = time.monotonic() + 30
        while broker.get(long).state is not TaskState.RUNNING and time.monotonic() < deadline:
            time.sleep(0.05)
        broker.cancel(long, reason="demo")
        time.sleep(0.5)  # the worker notices within a second and its report is fenced off
        for event in broker.events(long):
            print_event(event, console)

        console.rule("status")
        counts = {s: n for s, n in broker.counts().items() if n}
        console.print(counts)
        final = {name: broker.get(i) for name, i in (("echo", ok), ("fail", bad), ("sleep", long))}
        summary = {name: task.as_json() for name, task in final.items()}
        all_done = all(task.state in TERMINAL for task in final.values())
        return (0 if all_done and final["echo"].state is TaskState.SUCCEEDED else 1), summary
    finally:
        worker.send_signal(signal.SIGINT)
        try:
            worker.wait(20)
        except subprocess.TimeoutExpired:
            worker.kill()
        broker.close()
        console.print(
            "\nworker stopped. Try: goclaw --home "
            f"{config.home} tasks   |   goclaw --home {config.home} task show {ok}",
            highlight=False,
        )


def _wait_for_worker(broker: Broker, worker: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + 30
    while not any(w.pid == worker.pid for w in broker.live_workers()):
        if worker.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the worker did not start:\n{log_path.read_text()[-2000:]}")
        time.sleep(0.05)
