"""``goclaw demo``: start a real worker, talk to an agent, then tour the task lifecycle.

What ``make run`` shows a new user: a two-turn conversation with the
``default`` agent, its replies streamed as the worker writes them (on the
local model when no provider key is set, so with no account and no
network), then a success, a retry that ends in the dead-letter queue, a task
canceled while it runs, and the final counts, all from a worker process
like production's.
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
        talked = _conversation(broker, config, console)

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
        summary["conversation"] = talked
        succeeded = all_done and final["echo"].state is TaskState.SUCCEEDED
        return (0 if succeeded and talked["ok"] else 1), summary
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


DEMO_QUESTIONS = ("What is the capital of France?", "What language do people speak there?")


def _conversation(broker: Broker, config: Config, console: Console) -> dict[str, Any]:
    """Two turns in one session with the default agent, each reply streamed as it is written."""
    from goclaw.agent.definitions import build_catalog
    from goclaw.agent.tools import BUILTIN_TOOLS
    from goclaw.agent.turns import follow_turn, new_session_key, submit_turn

    agent = build_catalog(config, BUILTIN_TOOLS).get("default")
    session = new_session_key(agent.id)
    console.rule(f"a conversation with the default agent ({', '.join(agent.models)})")
    if agent.models[0].startswith("local/"):
        from goclaw.agent.local_model import local_model_available

        missing = local_model_available()
        if missing:
            console.print(f"[red]the local model cannot run: {missing}[/]", highlight=False)
            return {"ok": False, "session_key": session, "error": missing}
    replies = []
    for question in DEMO_QUESTIONS:
        submitted, _ = submit_turn(broker, agent=agent.id, prompt=question, session=session)
        console.print(f"[bold]you:[/] {question}", highlight=False)
        console.print("[bold]agent:[/] ", end="", highlight=False)
        outcome = follow_turn(
            broker,
            submitted.task_id,
            timeout=300,
            on_text=lambda text: console.print(text, end="", highlight=False, markup=False),
        )
        console.print()
        if outcome.state is not TaskState.SUCCEEDED:
            console.print(f"[red]{outcome.state.value}: {outcome.error}[/]", highlight=False)
            return {"ok": False, "session_key": session, "error": outcome.error}
        replies.append(outcome.reply)
    console.print(
        f"\n[dim]session {session}: goclaw --home {config.home} submit "
        f'"..." --session {session} --wait[/]\n',
        highlight=False,
    )
    return {"ok": True, "session_key": session, "replies": replies}


def _wait_for_worker(broker: Broker, worker: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + 30
    while not any(w.pid == worker.pid for w in broker.live_workers()):
        if worker.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the worker did not start:\n{log_path.read_text()[-2000:]}")
        time.sleep(0.05)
