"""``goclaw demo``: start the stack, talk to an agent, then tour the task lifecycle.

What ``make run`` shows a new user: ``goclaw up`` (a gateway and a worker,
supervised) as a child process, a two-turn conversation with the
``default`` agent through the gateway's OpenAI-compatible API, its replies
streamed as the worker writes them (on the
local model when no provider key is set, so with no account and no
network), then a success, a retry that ends in the dead-letter queue, a task
canceled while it runs, and the final counts, all from processes like
production's. At the end the stack is stopped the way Ctrl-C stops it.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from rich.console import Console

from goclaw.config import Config
from goclaw.errors import GoclawError
from goclaw.states import TERMINAL, TaskState

#: How long the demo's ``goclaw up`` gives its children to stop at the end.
STOP_GRACE_SECONDS = 20


def run_demo(config: Config, console: Console) -> tuple[int, dict[str, Any]]:
    """Returns an exit status and a summary: each demo task's final record."""
    from goclaw.cli import follow, gateway_url, print_event
    from goclaw.supervisor import die_with_parent_hook
    from goclaw.worker import open_broker

    broker = open_broker(config)
    log_path = Path(config.home) / "demo-up.log"
    port = _free_port()  # not gateway.port: 18789 may already be taken on this machine
    url = gateway_url("127.0.0.1", port)
    console.rule("[bold]goclaw demo")
    console.print(f"home: {config.home}\ndatabase: {broker.db.describe()}", highlight=False)
    command = [sys.executable, "-m", "goclaw.cli", "--home", str(config.home)]
    if config.path is not None:
        command += ["--config", str(config.path)]
    command += ["up", "--host", "127.0.0.1", "--port", str(port), "--concurrency", "2"]
    command += ["--grace-seconds", str(STOP_GRACE_SECONDS)]
    with log_path.open("wb") as log_file:
        # Its own process group: a Ctrl-C of the demo reaches it once, from the `finally`
        # below (a second SIGINT would tell it to skip the grace period); and it dies with us.
        stack = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            process_group=0,
            preexec_fn=die_with_parent_hook(),
        )
    ok: int | None = None
    try:
        _wait_for_stack(url, stack, log_path)
        console.print(
            f"goclaw up: gateway and a worker started (pid {stack.pid}, log {log_path})\n"
            f"gateway: {url}  (try: curl {url}/healthz)\n",
            highlight=False,
        )
        talked = _conversation(url, config, console)

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
        stack.send_signal(signal.SIGINT)  # what Ctrl-C does: workers finish, then everything exits
        try:
            stack.wait(STOP_GRACE_SECONDS + 10)
        except subprocess.TimeoutExpired:
            stack.kill()  # its children die with it (PR_SET_PDEATHSIG)
            stack.wait()
        broker.close()
        hint = f"goclaw --home {config.home} tasks"
        if ok is not None:
            hint += f"   |   goclaw --home {config.home} task show {ok}"
        console.print(
            f"\nstack stopped. Run it yourself: goclaw --home {config.home} up\nTry: {hint}",
            highlight=False,
        )


DEMO_QUESTIONS = ("What is the capital of France?", "What language do people speak there?")


def _conversation(url: str, config: Config, console: Console) -> dict[str, Any]:
    """Two turns in one session with the default agent, through the gateway's
    OpenAI-compatible API, each reply streamed (SSE) as the worker writes it."""
    from goclaw.agent.definitions import build_catalog
    from goclaw.agent.turns import new_session_key
    from goclaw.gateway.auth import read_token
    from goclaw.skills.discovery import KnownTools

    agent = build_catalog(config, KnownTools(config)).get("default")
    session = new_session_key(agent.id)
    console.rule(f"a conversation with the default agent ({', '.join(agent.models)})")
    if agent.models[0].startswith("local/"):
        from goclaw.agent.local_model import local_model_available

        missing = local_model_available()
        if missing:
            console.print(f"[red]the local model cannot run: {missing}[/]", highlight=False)
            return {"ok": False, "session_key": session, "error": missing}
    console.print(
        f"[dim]POST {url}/v1/chat/completions  model=agent:{agent.id}  stream=true  "
        f"X-Goclaw-Session: {session}[/]",
        highlight=False,
    )
    token = read_token(config.home)
    replies = []
    for question in DEMO_QUESTIONS:
        console.print(f"[bold]you:[/] {question}", highlight=False)
        console.print("[bold]agent:[/] ", end="", highlight=False)
        try:
            reply = _stream_chat(
                url,
                token,
                agent.id,
                session,
                question,
                on_text=lambda text: console.print(text, end="", highlight=False, markup=False),
            )
        except (OSError, GoclawError) as exc:
            console.print(f"\n[red]{exc}[/]", highlight=False)
            return {"ok": False, "session_key": session, "error": str(exc)}
        console.print()
        replies.append(reply)
    console.print(
        f"\n[dim]session {session}: goclaw --home {config.home} submit "
        f'"..." --session {session} --wait[/]\n',
        highlight=False,
    )
    return {"ok": True, "session_key": session, "replies": replies}


def _stream_chat(
    url: str, token: str, agent: str, session: str, question: str, *, on_text: Any
) -> str:
    """One streamed chat completion, read off the wire as any OpenAI client would."""
    body = {
        "model": f"agent:{agent}",
        "stream": True,
        "messages": [{"role": "user", "content": question}],
    }
    request = urllib.request.Request(
        f"{url}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={
            "Authorization": f"Bearer {token}",
            "Content-Type": "application/json",
            "X-Goclaw-Session": session,
        },
    )
    text: list[str] = []
    with urllib.request.urlopen(request, timeout=300) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            if "error" in chunk:
                raise GoclawError(chunk["error"]["message"])
            for choice in chunk.get("choices") or []:
                delta = choice["delta"].get("content")
                if delta:
                    on_text(delta)
                    text.append(delta)
    return "".join(text)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_stack(url: str, stack: subprocess.Popen, log_path: Path) -> None:
    """Until the gateway answers /healthz with a live worker (or ``goclaw up`` gives up)."""
    from goclaw.cli import get_health

    deadline = time.monotonic() + 60
    while True:
        health = get_health(url, timeout=1)
        if health is not None and health["workers"]["live"] > 0:
            return
        if stack.poll() is not None or time.monotonic() > deadline:
            raise GoclawError(f"goclaw up did not start:\n{log_path.read_text()[-2000:]}")
        time.sleep(0.1)
