"""The ``goclaw`` command line: a thin layer over the broker.

Each command calls the same library API the tests call. Errors are one line
on stderr (``{"error": ...}`` on stdout under ``--json``) with exit status 1;
usage errors exit 2. Only ``goclaw worker`` and ``goclaw bench`` import Huey's
consumer; nothing here imports LiteLLM.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from goclaw.broker import Broker
from goclaw.config import Config, load_config
from goclaw.errors import GoclawError
from goclaw.records import iso
from goclaw.states import TERMINAL, TaskState

if TYPE_CHECKING:
    from goclaw.supervisor import Supervisor

console = Console()
err_console = Console(stderr=True)

STATE_STYLES = {
    "QUEUED": "cyan",
    "CLAIMED": "blue",
    "RUNNING": "yellow",
    "RETRY_WAIT": "magenta",
    "SUCCEEDED": "green",
    "FAILED": "red",
    "CANCELED": "dim",
    "DEAD_LETTER": "bold red",
}


class Context:
    """What every command shares: where the home is and how to open the broker."""

    def __init__(self, home: str | None, config_path: str | None) -> None:
        self.home = home
        self.config_path = config_path
        self._config: Config | None = None
        self._broker: Broker | None = None

    @property
    def config(self) -> Config:
        if self._config is None:
            self._config = load_config(self.home, self.config_path)
        return self._config

    @property
    def broker(self) -> Broker:
        if self._broker is None:
            from goclaw.worker import open_broker

            self._broker = open_broker(self.config)
        return self._broker


def command(func: Callable[..., Any]) -> Callable[..., Any]:
    """Run a command body; turn goclaw errors into one line and a non-zero exit."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        as_json = kwargs.get("as_json", False)
        try:
            return func(*args, **kwargs)
        except (GoclawError, ValueError) as exc:
            message = str(exc)
            if as_json:
                click.echo(json.dumps({"error": message}))
            else:
                err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
            sys.exit(1)

    return wrapper


json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")


def emit_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=None, default=str))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--home",
    type=click.Path(file_okay=False),
    envvar="GOCLAW_HOME",
    help="goclaw's home directory [default: $GOCLAW_HOME or ~/.goclaw].",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="Configuration file [default: HOME/config.yaml].",
)
@click.version_option(package_name="goclaw")
@click.pass_context
def main(ctx: click.Context, home: str | None, config_path: str | None) -> None:
    """goclaw: a durable orchestration kernel for AI agents."""
    ctx.obj = Context(home, config_path)


# -- init ----------------------------------------------------------------------

DEFAULT_POLICY = """\
# goclaw policy: default deny. Nothing is allowed unless listed here; an empty
# list allows nothing. Edits take effect within a second; an edit that does not
# load keeps the previous policy (see docs/ARCHITECTURE.md, "Policy").
version: 1
# Capabilities for every agent: tools.<tool> (read_file, write_file, list_dir,
# exec, web_fetch, skill_read, skill_search), net.http, acp.read, acp.mutate,
# skills.<name> (a WASM skill), mcp.<server>.<tool>.
allow:
  - tools.read_file
  - tools.write_file
  - tools.list_dir
  - tools.skill_read   # instruction skills: read one, search them
  - tools.skill_search
  - skills.text_stats  # bundled WASM skills that stay inside their sandbox
  - skills.tally       #   (url_check also needs net.http and its domains)
  - acp.read          # gateway clients may read (tasks, sessions, events)
  - acp.mutate        # and submit work, abort it, answer approvals
# Hosts net.http may reach: exact.host, or .suffix.host for its subdomains.
domains: []
# Where the file tools may go: relative entries are under the agent's workspace.
paths:
  - .
# Non-public networks (CIDR) outbound requests may reach; none by default.
networks: []
# Per tool: allowlist (the lists above decide), ask (a human must also approve:
# goclaw approvals list|approve|deny) or deny. An unanswered request is denied.
approvals:
  write_file: ask
approval_timeout: 10m
# Per-agent sections narrow the lists above for one agent, e.g.
# agents:
#   reader:
#     allow: [tools.read_file, tools.list_dir]
"""


@main.command()
@json_option
@click.pass_obj
@command
def init(obj: Context, as_json: bool) -> None:
    """Create HOME with config.yaml, policy.yaml, auth.token and the database.

    Safe to run again: existing files are kept as they are.
    """
    from goclaw.config import resolve_home

    home = resolve_home(obj.home)
    home.mkdir(parents=True, exist_ok=True)
    created, kept = [], []

    def write(name: str, text: str, mode: int = 0o644) -> None:
        path = home / name
        if path.exists():
            kept.append(name)
            return
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(path, mode)
        created.append(name)

    write("config.yaml", _example_config())
    write("policy.yaml", DEFAULT_POLICY)
    write("auth.token", secrets.token_urlsafe(32) + "\n", mode=0o600)
    obj.home = str(home)
    db_existed = obj.config.database_url.startswith("sqlite:") and (home / "goclaw.db").exists()
    broker = obj.broker
    (kept if db_existed else created).append("database")
    if as_json:
        emit_json(
            {"home": str(home), "created": created, "kept": kept, "database": broker.db.describe()}
        )
        return
    console.print(f"goclaw home: [bold]{home}[/]")
    for name in created:
        console.print(f"  [green]created[/] {name}")
    for name in kept:
        console.print(f"  [dim]kept[/]    {name}")


def _example_config() -> str:
    example = Path(__file__).resolve().parent.parent / "config.example.yaml"
    if example.exists():
        return example.read_text(encoding="utf-8")
    from goclaw.config import render_defaults

    return render_defaults()


# -- worker --------------------------------------------------------------------


@main.command()
@click.option("--concurrency", "-c", type=click.IntRange(min=1), help="Tasks run at once.")
@click.option("--queue", "-q", help="Queue to serve [default: worker.queue].")
@click.option("--worker-type", type=click.Choice(["thread", "process"]), help="Huey worker type.")
@click.option(
    "--kinds",
    "kind_modules",
    multiple=True,
    metavar="MODULE",
    help="Import MODULE and call its register(app) to add task kinds (repeatable).",
)
@click.option("--verbose", "-v", is_flag=True, help="Log every task.")
@click.option("--json", "as_json", is_flag=True, help="Log one JSON object per line.")
@click.pass_obj
@command
def worker(
    obj: Context,
    concurrency: int | None,
    queue: str | None,
    worker_type: str | None,
    kind_modules: tuple[str, ...],
    verbose: bool,
    as_json: bool,
) -> None:
    """Claim and run tasks until stopped (SIGINT: finish running tasks; SIGTERM: release them)."""
    from goclaw.worker import run_worker

    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonLogFormatter()
        if as_json
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler])
    logging.getLogger("goclaw").setLevel(logging.INFO)
    if not verbose:
        logging.getLogger("huey").setLevel(logging.WARNING)
    run_worker(
        obj.config,
        concurrency=concurrency,
        queue=queue,
        worker_type=worker_type,
        kind_modules=kind_modules,
    )


class JsonLogFormatter(logging.Formatter):
    """One JSON object per log line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "at": iso(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
            "thread": record.threadName,
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


# -- submit --------------------------------------------------------------------


def parse_args(pairs: tuple[str, ...]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; a VALUE that parses as JSON is taken as JSON (1.5, true, [1])."""
    args: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--arg")
        try:
            args[key] = json.loads(raw)
        except ValueError:
            args[key] = raw
    return args


@main.command()
@click.argument("prompt", required=False)
@click.option("--kind", "-k", help="Task kind (noop, sleep, fail, echo, ...).")
@click.option(
    "--arg",
    "-a",
    "arg_pairs",
    multiple=True,
    metavar="KEY=VALUE",
    help="Task argument (repeatable); VALUE is read as JSON when it parses: 1.5, true, [1].",
)
@click.option(
    "--count",
    "-n",
    type=click.IntRange(min=1, max=100_000),
    default=1,
    show_default=True,
    help="Fan out N identical tasks, in one transaction.",
)
@click.option("--priority", "-p", type=int, default=0, show_default=True, help="Higher runs first.")
@click.option("--max-attempts", type=click.IntRange(min=1), help="[default: broker.max_attempts]")
@click.option("--idempotency-key", help="Repeat submissions with this key return the same task.")
@click.option("--queue", "-q", default=None, help="[default: worker.queue]")
@click.option("--delay", type=click.FloatRange(min=0), default=0, help="Seconds before it may run.")
@click.option("--wait", "-w", is_flag=True, help="Follow the task(s) until they end.")
@click.option("--timeout", type=float, default=None, help="With --wait: give up after N seconds.")
@click.option(
    "--agent",
    "agent_id",
    default="default",
    show_default=True,
    help="With a PROMPT: the agent that answers it.",
)
@click.option(
    "--session",
    "-s",
    "session_key",
    default=None,
    help="With a PROMPT: continue this session [default: a new one].",
)
@json_option
@click.pass_obj
@command
def submit(
    obj: Context,
    prompt: str | None,
    kind: str | None,
    arg_pairs: tuple[str, ...],
    count: int,
    priority: int,
    max_attempts: int | None,
    idempotency_key: str | None,
    queue: str | None,
    delay: float,
    wait: bool,
    timeout: float | None,
    agent_id: str,
    session_key: str | None,
    as_json: bool,
) -> None:
    """Queue work: a PROMPT for an agent, or a task of --kind KIND.

    With a PROMPT, --wait streams the agent's reply into the terminal as it
    is generated; the session key is printed so a later prompt can continue
    the conversation with --session.
    """
    if prompt is not None and kind is not None:
        raise click.UsageError("give either a PROMPT or --kind, not both")
    if prompt is None and kind is None:
        raise click.UsageError("give a PROMPT or --kind KIND")
    if prompt is not None:
        if count != 1 or arg_pairs or delay:
            raise click.UsageError("--count, --arg and --delay apply to --kind tasks only")
        submit_prompt(
            obj,
            prompt,
            agent_id=agent_id,
            session_key=session_key,
            queue=queue,
            priority=priority,
            max_attempts=max_attempts,
            idempotency_key=idempotency_key,
            wait=wait,
            timeout=timeout,
            as_json=as_json,
        )
        return
    args = parse_args(arg_pairs)
    broker = obj.broker
    submitted = broker.submit(
        kind,
        args,
        queue=queue or obj.config.worker.queue,
        priority=priority,
        max_attempts=max_attempts,
        idempotency_key=idempotency_key,
        delay=delay,
        count=count,
    )
    ids = [s.task_id for s in submitted]
    if not wait:
        if as_json:
            emit_json({"task_ids": ids})
        else:
            for s in submitted:
                note = "" if s.created else "  (existing: same idempotency key)"
                click.echo(f"{s.task_id}{note}")
        return
    final = follow(broker, ids, timeout=timeout, out=None if as_json else console)
    if as_json:
        emit_json({"task_ids": ids, "tasks": [final[i].as_json() for i in ids]})
    if any(final[i].state is not TaskState.SUCCEEDED for i in ids):
        sys.exit(1)


def submit_prompt(
    obj: Context,
    prompt: str,
    *,
    agent_id: str,
    session_key: str | None,
    queue: str | None,
    priority: int,
    max_attempts: int | None,
    idempotency_key: str | None,
    wait: bool,
    timeout: float | None,
    as_json: bool,
) -> None:
    """Queue one agent turn; with ``wait``, stream its reply as the worker writes it."""
    from goclaw.agent.definitions import build_catalog
    from goclaw.agent.turns import follow_turn, submit_turn
    from goclaw.skills.discovery import KnownTools

    build_catalog(obj.config, KnownTools(obj.config)).get(
        agent_id
    )  # unknown agent: fail here, not later
    broker = obj.broker
    submitted, session_key = submit_turn(
        broker,
        agent=agent_id,
        prompt=prompt,
        session=session_key,
        queue=queue or obj.config.worker.queue,
        priority=priority,
        max_attempts=max_attempts,
        idempotency_key=idempotency_key,
    )
    task_id = submitted.task_id
    if not wait:
        if as_json:
            emit_json({"task_id": task_id, "session_key": session_key})
        else:
            click.echo(f"{task_id}  session {session_key}")
        return
    if not as_json:
        err_console.print(f"[dim]task {task_id} · session {session_key}[/]", highlight=False)
    try:
        outcome = follow_turn(
            broker,
            task_id,
            timeout=timeout,
            on_text=None if as_json else _write_text,
            on_note=None if as_json else _write_note,
        )
    except TimeoutError as exc:
        raise GoclawError(str(exc)) from exc
    if as_json:
        emit_json({"task_id": task_id, "session_key": session_key, **outcome.as_json()})
    else:
        click.echo()
        if outcome.state is not TaskState.SUCCEEDED:
            err_console.print(
                f"[bold red]{outcome.state.value}[/] {outcome.error or ''}", highlight=False
            )
    if outcome.state is not TaskState.SUCCEEDED:
        sys.exit(1)


def _write_text(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _write_note(note: str) -> None:
    sys.stdout.flush()
    err_console.print(f"[dim]{note}[/]", highlight=False)


def follow(broker: Broker, ids: list[int], *, timeout: float | None, out: Console | None) -> dict:
    """Print each task's state changes as they happen until every task has ended."""
    deadline = None if timeout is None else time.monotonic() + timeout
    cursor = 0
    watching = set(ids)
    while True:
        # Snapshot states first: every event up to a terminal state is
        # committed with it, so the drain below prints the last one too.
        tasks = {i: broker.get(i) for i in ids}
        while True:
            events = broker.events(after=cursor, limit=5000)
            for event in events:
                cursor = event.event_id
                if event.task_id in watching and out is not None:
                    print_event(event, out)
            if len(events) < 5000:
                break
        if all(t.state in TERMINAL for t in tasks.values()):
            return tasks
        if deadline is not None and time.monotonic() > deadline:
            pending = [i for i, t in tasks.items() if t.state not in TERMINAL]
            raise GoclawError(f"timed out waiting for task(s) {pending}")
        time.sleep(0.05)


def print_event(event: Any, out: Console) -> None:
    style = STATE_STYLES.get(event.to_state or "", "")
    detail = ""
    if event.detail:
        data = json.loads(event.detail)
        detail = "  " + ", ".join(f"{k}={v}" for k, v in data.items())
    out.print(
        f"[dim]{iso(event.at)}[/] task {event.task_id}: {event.type} "
        f"{event.from_state or '-'} -> [{style}]{event.to_state}[/]{detail}",
        highlight=False,
    )


# -- inspecting ----------------------------------------------------------------


@main.command()
@click.option(
    "--state", "-s", type=click.Choice([s.value for s in TaskState], case_sensitive=False)
)
@click.option("--kind", "-k")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@json_option
@click.pass_obj
@command
def tasks(obj: Context, state: str | None, kind: str | None, limit: int, as_json: bool) -> None:
    """List tasks, newest first."""
    rows = obj.broker.tasks(state=state.upper() if state else None, kind=kind, limit=limit)
    if as_json:
        emit_json([t.as_json() for t in rows])
        return
    table = Table("id", "kind", "state", "attempts", "priority", "created", "reason")
    for t in rows:
        style = STATE_STYLES.get(t.state.value, "")
        table.add_row(
            str(t.id),
            t.kind,
            f"[{style}]{t.state.value}[/]",
            f"{t.attempts}/{t.max_attempts}",
            str(t.priority),
            iso(t.created_at) or "",
            t.reason or "",
        )
    console.print(table)


@main.group()
def task() -> None:
    """Inspect or control one task."""


@task.command("show")
@click.argument("task_id", type=int)
@json_option
@click.pass_obj
@command
def task_show(obj: Context, task_id: int, as_json: bool) -> None:
    """A task with its full event history."""
    record = obj.broker.get(task_id)
    events = obj.broker.events(task_id, limit=100_000)
    if as_json:
        emit_json({**record.as_json(), "events": [e.as_json() for e in events]})
        return
    data = record.as_json()
    for key in (
        "id",
        "kind",
        "state",
        "attempts",
        "max_attempts",
        "priority",
        "args",
        "result",
        "last_error",
        "reason",
        "lease_owner",
        "lease_token",
        "lease_expires_at",
        "created_at",
        "finished_at",
    ):
        if data.get(key) is not None:
            value = json.dumps(data[key]) if key in ("args", "result") else data[key]
            console.print(f"[bold]{key:>16}[/] {value}", highlight=False)
    table = Table("event", "type", "from", "to", "at", "token", "worker", "detail")
    for e in events:
        table.add_row(
            str(e.event_id),
            e.type,
            e.from_state or "-",
            e.to_state or "-",
            iso(e.at) or "",
            "" if e.lease_token is None else str(e.lease_token),
            e.worker or "",
            e.detail or "",
        )
    console.print(table)


@task.command("cancel")
@click.argument("task_id", type=int)
@click.option("--reason", default="", help="Recorded with the cancel event.")
@json_option
@click.pass_obj
@command
def task_cancel(obj: Context, task_id: int, reason: str, as_json: bool) -> None:
    """Cancel a task in any non-terminal state (a running task stops within a second)."""
    print_moved(obj.broker.cancel(task_id, reason=reason), as_json)


@task.command("retry")
@click.argument("task_id", type=int)
@json_option
@click.pass_obj
@command
def task_retry(obj: Context, task_id: int, as_json: bool) -> None:
    """Re-queue a FAILED or DEAD_LETTER task with a fresh set of attempts."""
    print_moved(obj.broker.retry(task_id), as_json)


def print_moved(record: Any, as_json: bool) -> None:
    """What cancel and retry print: the task as their transaction left it."""
    if as_json:
        emit_json(record.as_json())
    else:
        click.echo(f"task {record.id}: {record.state.value}")


@main.command()
@click.option("--host", help="Address to listen on [default: gateway.host, 127.0.0.1].")
@click.option("--port", type=click.IntRange(0, 65535), help="[default: gateway.port, 18789]")
@click.pass_obj
@command
def gateway(obj: Context, host: str | None, port: int | None) -> None:
    """Serve ACP (JSON-RPC over WebSocket at /ws), the OpenAI-compatible API (/v1),
    /healthz and /metrics. Every route but /healthz needs the bearer token in
    HOME/auth.token."""
    from goclaw.gateway.server import run_gateway

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    run_gateway(obj.config, host=host, port=port)


# -- up ------------------------------------------------------------------------


@main.command()
@click.option(
    "--workers",
    "n_workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Worker processes to run.",
)
@click.option(
    "--concurrency",
    "-c",
    type=click.IntRange(min=1),
    help="Tasks each worker runs at once [default: worker.concurrency].",
)
@click.option("--host", help="Gateway address [default: gateway.host, 127.0.0.1].")
@click.option("--port", type=click.IntRange(1, 65535), help="[default: gateway.port, 18789]")
@click.option(
    "--grace-seconds",
    type=click.FloatRange(min=0),
    default=20.0,
    show_default=True,
    help="On Ctrl-C, how long the children get to stop before SIGKILL.",
)
@click.option(
    "--restart-delay",
    type=click.FloatRange(min=0.05),
    default=0.5,
    show_default=True,
    help="Wait before restarting a child that exited; doubles (to 10 s) while it keeps crashing.",
)
@click.pass_obj
@command
def up(
    obj: Context,
    n_workers: int,
    concurrency: int | None,
    host: str | None,
    port: int | None,
    grace_seconds: float,
    restart_delay: float,
) -> None:
    """Run the whole stack in the foreground: a gateway and --workers workers.

    Each is a `goclaw gateway` / `goclaw worker` child process with this HOME and
    config, supervised: one that exits is restarted (with a log line; the delay
    doubles while it keeps crashing). Ctrl-C or SIGTERM stops them in order:
    workers finish their running tasks, the gateway closes; anything still
    running after --grace-seconds (or at a second Ctrl-C) is SIGKILLed, and the
    exit status is then 1 instead of 0. If `goclaw up` is killed, its children
    die with it. One log line per start, exit and restart goes to stderr; the
    children write to the same terminal. Needs HOME/auth.token (`goclaw init`
    writes it).
    """
    import threading

    from goclaw.gateway.auth import read_token
    from goclaw.policy import load_policy, policy_path
    from goclaw.supervisor import Backoff, Supervisor, stack_specs

    config = obj.config
    read_token(config.home)  # the gateway would refuse to start: say so before anything starts
    load_policy(policy_path(config.home))  # so would every child, and over and over
    host = host or config.gateway.host
    port = config.gateway.port if port is None else port
    _require_free_port(host, port)
    specs = stack_specs(
        config.home,
        Path(obj.config_path).resolve() if obj.config_path else None,
        workers=n_workers,
        concurrency=concurrency,
        host=host,
        port=port,
    )
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    supervisor = Supervisor(
        specs,
        grace_seconds=grace_seconds,
        backoff=Backoff(initial=restart_delay, maximum=max(10.0, restart_delay)),
    )
    url = gateway_url(host, port)
    threading.Thread(
        target=_announce_when_healthy, args=(url, supervisor), name="healthz", daemon=True
    ).start()
    sys.exit(supervisor.run())


def _require_free_port(host: str, port: int) -> None:
    """Fail before starting anything when the gateway could not listen (another `goclaw up`?)."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the gateway does
            sock.bind(address)
    except OSError as exc:
        raise GoclawError(
            f"the gateway cannot listen on {host}:{port}: {exc.strerror or exc}"
            " (is another goclaw up running? pick one with --port)"
        ) from exc


def gateway_url(host: str, port: int) -> str:
    """Where a client on this machine reaches a gateway listening on ``host:port``."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def get_health(url: str, timeout: float = 1.0) -> dict[str, Any] | None:
    """The gateway's ``/healthz`` report, or None while it does not answer 200."""
    import http.client
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=timeout) as response:
            return json.loads(response.read()) if response.status == 200 else None
    except (OSError, http.client.HTTPException, ValueError):  # refused, 503, cut off, not JSON
        return None


def _announce_when_healthy(url: str, supervisor: Supervisor) -> None:
    """Log the gateway's URL once it answers /healthz, so the user knows where to connect."""
    while not supervisor.stopping:
        health = get_health(url, timeout=0.5)
        if health is not None:
            live = health.get("workers", {}).get("live", 0)
            logging.getLogger("goclaw.up").info(
                "gateway ready at %s (live workers: %d; Ctrl-C stops everything)", url, live
            )
            return
        time.sleep(0.1)


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """``90s``, ``15m``, ``12h``, ``7d`` (a bare number is seconds)."""
    raw = text.strip().lower()
    unit = DURATION_UNITS.get(raw[-1:])
    number = raw[:-1] if unit else raw
    try:
        value = float(number) * (unit or 1)
    except ValueError:
        raise click.BadParameter(
            f"{text!r}: expected a duration such as 90s, 15m, 12h or 7d"
        ) from None
    if not value >= 0:
        raise click.BadParameter(f"{text!r}: must not be negative")
    return value


@main.group()
def events() -> None:
    """The task event log: retention."""


@events.command("purge")
@click.option(
    "--older-than",
    required=True,
    help="Purge the events of tasks that ended longer ago than this (90s, 15m, 12h, 7d).",
)
@json_option
@click.pass_obj
@command
def events_purge(obj: Context, older_than: str, as_json: bool) -> None:
    """Delete the events of tasks that ended before a cutoff (the tasks themselves,
    their results, sessions and messages stay). A client that later replays from
    before the cut gets a precise replay_gap error, not a silently shorter stream."""
    from goclaw import event_log

    cutoff = time.time() - parse_duration(older_than)
    purged = event_log.purge(obj.broker.db, finished_before=cutoff)
    if as_json:
        emit_json({**purged.as_json(), "finished_before": iso(cutoff)})
    else:
        click.echo(
            f"purged {purged.events} events of {purged.tasks} tasks ended before {iso(cutoff)}"
        )


@main.group("secrets")
def secrets_group() -> None:
    """Provider keys encrypted in the database (AES-256-GCM, key from GOCLAW_ENCRYPTION_KEY)."""


def _secret_store(obj: Context) -> Any:
    from goclaw.secrets import SecretStore, load_key

    key = load_key()  # before opening the database: fail closed, and fast
    return SecretStore(obj.broker.db, key)


@secrets_group.command("set")
@click.argument("name")
@json_option
@click.pass_obj
@command
def secrets_set(obj: Context, name: str, as_json: bool) -> None:
    """Store NAME's value, read from stdin when piped, else prompted for (hidden).
    Never pass the value as an argument: it would land in the shell history."""
    from goclaw.secrets import validate_name

    validate_name(name)
    store = _secret_store(obj)
    if sys.stdin.isatty():
        value = click.prompt(f"{name}", hide_input=True, confirmation_prompt=True)
    else:
        value = sys.stdin.read().rstrip("\r\n")
    store.set(name, value)
    if as_json:
        emit_json({"name": name, "stored": True, "shadowed_by_env": bool(os.environ.get(name))})
        return
    click.echo(f"stored secret {name}")
    if os.environ.get(name):
        err_console.print(
            f"[yellow]note:[/] {name} is also set in the environment, which takes precedence",
            highlight=False,
        )


@secrets_group.command("list")
@json_option
@click.pass_obj
@command
def secrets_list(obj: Context, as_json: bool) -> None:
    """The stored secrets' names (never their values)."""
    names = _secret_store(obj).names()
    if as_json:
        emit_json(names)
        return
    for name in names:
        click.echo(name)


@secrets_group.command("remove")
@click.argument("name")
@json_option
@click.pass_obj
@command
def secrets_remove(obj: Context, name: str, as_json: bool) -> None:
    """Delete a stored secret."""
    from goclaw.secrets import validate_name

    validate_name(name)
    if not _secret_store(obj).remove(name):
        raise GoclawError(f"secret {name} does not exist")
    if as_json:
        emit_json({"name": name, "removed": True})
    else:
        click.echo(f"removed secret {name}")


@secrets_group.command("keygen")
def secrets_keygen() -> None:
    """Print a new GOCLAW_ENCRYPTION_KEY (32 random bytes, base64url)."""
    from goclaw.secrets import generate_key

    click.echo(generate_key())


@main.group(invoke_without_command=True)
@click.option("--task", "task_id", type=int, help="Only records of this task.")
@click.option("--since", help="Only records at or after this: an ISO timestamp or 15m, 2h, 7d.")
@click.option("--limit", "-n", type=click.IntRange(min=1), default=100, show_default=True)
@json_option
@click.pass_context
@command
def audit(
    ctx: click.Context, task_id: int | None, since: str | None, limit: int, as_json: bool
) -> None:
    """The tamper-evident audit log of policy decisions and approvals (newest last)."""
    if ctx.invoked_subcommand is not None:
        return
    log = _audit_log(ctx.obj)
    records = log.query(task_id=task_id, since=_audit_since(since), limit=limit)
    if as_json:
        emit_json([r.as_json() for r in records])
        return
    for r in records:
        task_text = f"task {r.task_id}" if r.task_id is not None else "-"
        click.echo(
            f"{r.seq:>6}  {iso(r.at)}  {r.agent}  {task_text}  {r.capability}  "
            f"{r.subject!r}  {r.decision}  {r.reason}  (policy {r.policy_version})"
        )


@audit.command("verify")
@json_option
@click.pass_obj
@command
def audit_verify(obj: Context, as_json: bool) -> None:
    """Check the hash chain of the database and of HOME/logs/audit.jsonl; exit 1 if broken."""
    report = _audit_log(obj).verify()
    if as_json:
        emit_json(report.as_json())
        if not report.ok:
            sys.exit(1)
        return
    if not report.ok:
        raise GoclawError(f"audit log broken: {report.summary()}")
    click.echo(report.summary())


@audit.command("resync")
@json_option
@click.pass_obj
@command
def audit_resync(obj: Context, as_json: bool) -> None:
    """Append to the file the records it lacks (after a crash between commit and write)."""
    written = _audit_log(obj).resync_file()
    if as_json:
        emit_json({"written": written})
    else:
        click.echo(f"appended {written} records to the audit file")


def _audit_log(obj: Context) -> Any:
    from goclaw.audit import AuditLog, audit_path

    return AuditLog(obj.broker.db, audit_path(obj.config.home))


def _audit_since(text: str | None) -> float | None:
    if text is None:
        return None
    from goclaw.audit import parse_since

    try:
        return parse_since(text)
    except ValueError:
        return time.time() - parse_duration(text)


@main.group()
def approvals() -> None:
    """Tool calls waiting for a human (policy mode "ask"), and allow-always rules."""


def _approvals(obj: Context) -> Any:
    from goclaw.approvals import Approvals

    return Approvals(obj.broker, _audit_log(obj))


def _who() -> str:
    import getpass

    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return f"cli:uid{os.getuid()}"


@approvals.command("list")
@click.option(
    "--state",
    type=click.Choice(["pending", "approved", "denied", "expired", "all"]),
    default="pending",
    show_default=True,
)
@click.option("--limit", "-n", type=click.IntRange(min=1), default=50, show_default=True)
@json_option
@click.pass_obj
@command
def approvals_list(obj: Context, state: str, limit: int, as_json: bool) -> None:
    """Approval requests, newest first (pending ones by default)."""
    found = _approvals(obj).list(state=None if state == "all" else state, limit=limit)
    if as_json:
        emit_json([a.as_json() for a in found])
        return
    if not found:
        click.echo(f"no {'' if state == 'all' else state + ' '}approval requests")
        return
    now = time.time()
    for a in found:
        left = f"  expires in {a.expires_at - now:.0f}s" if a.state_at(now) == "pending" else ""
        click.echo(
            f"{a.id:>5}  {a.state_at(now):<8}  {a.agent}  task {a.task_id}  {a.capability}  "
            f"{a.subject!r}{left}"
        )


def _respond(obj: Context, approval_id: int, approve: bool, scope: str, note: str, as_json: bool):
    from goclaw.approvals import ApprovalError

    try:
        answered = _approvals(obj).respond(
            approval_id, approve=approve, scope=scope, note=note, by=_who()
        )
    except ApprovalError as exc:
        raise GoclawError(str(exc)) from None
    if as_json:
        emit_json(answered.as_json())
    else:
        how = f" ({answered.scope})" if approve else ""
        click.echo(
            f"approval {answered.id}: {answered.state}{how}; task {answered.task_id} resumes"
        )


@approvals.command("approve")
@click.argument("approval_id", type=int)
@click.option("--always", is_flag=True, help="Also allow this agent this exact call from now on.")
@click.option("--note", default="", help="Recorded with the answer in the audit log.")
@json_option
@click.pass_obj
@command
def approvals_approve(obj: Context, approval_id: int, always: bool, note: str, as_json: bool):
    """Let a waiting tool call run (once, or --always)."""
    _respond(obj, approval_id, True, "always" if always else "once", note, as_json)


@approvals.command("deny")
@click.argument("approval_id", type=int)
@click.option("--note", default="", help="Told to the model and recorded in the audit log.")
@json_option
@click.pass_obj
@command
def approvals_deny(obj: Context, approval_id: int, note: str, as_json: bool) -> None:
    """Refuse a waiting tool call; the model is told it was denied."""
    _respond(obj, approval_id, False, "once", note, as_json)


@approvals.command("rules")
@json_option
@click.pass_obj
@command
def approvals_rules(obj: Context, as_json: bool) -> None:
    """Allow-always rules: (agent, capability, subject) that need no human any more."""
    rules = _approvals(obj).rules()
    if as_json:
        emit_json([r.as_json() for r in rules])
        return
    if not rules:
        click.echo("no allow-always rules")
    for r in rules:
        click.echo(
            f"{r.id:>5}  {r.agent}  {r.capability}  {r.subject!r}  by {r.created_by} "
            f"at {iso(r.created_at)}"
        )


@approvals.command("revoke")
@click.argument("rule_id", type=int)
@json_option
@click.pass_obj
@command
def approvals_revoke(obj: Context, rule_id: int, as_json: bool) -> None:
    """Delete an allow-always rule: its calls need a human again."""
    from goclaw.approvals import ApprovalError

    try:
        rule = _approvals(obj).revoke_rule(rule_id, by=_who())
    except ApprovalError as exc:
        raise GoclawError(str(exc)) from None
    if as_json:
        emit_json(rule.as_json())
    else:
        click.echo(f"revoked rule {rule.id}: {rule.agent} {rule.capability} {rule.subject!r}")


@main.group()
def session() -> None:
    """Conversations: their history and what they cost."""


@session.command("list")
@click.option("--limit", "-n", type=click.IntRange(min=1), default=20, show_default=True)
@json_option
@click.pass_obj
@command
def session_list(obj: Context, limit: int, as_json: bool) -> None:
    """Sessions, most recently active first."""
    from goclaw.agent.sessions import SessionStore

    found = SessionStore(obj.broker.db).list(limit=limit)
    if as_json:
        emit_json([s.as_json() for s in found])
        return
    table = Table("session", "agent", "messages", "updated")
    for info in found:
        table.add_row(info.key, info.agent_id, str(info.messages), iso(info.updated_at))
    console.print(table)


@session.command("show")
@click.argument("key")
@json_option
@click.pass_obj
@command
def session_show(obj: Context, key: str, as_json: bool) -> None:
    """A session's full history (compacted messages included), tokens and cost."""
    from goclaw.agent.sessions import SessionStore

    store = SessionStore(obj.broker.db)
    info = store.get(key)
    if info is None:
        raise GoclawError(f"session {key!r} does not exist")
    messages = store.messages(key)
    usage = store.usage(session_key=key)
    if as_json:
        emit_json(
            {
                **info.as_json(),
                "usage": usage.as_json(),
                "messages": [m.as_json() for m in messages],
            }
        )
        return
    for stored in messages:
        message = stored.message
        text = message.get("content") or ""
        for call in message.get("tool_calls") or ():
            text += f" → {call['function']['name']}({call['function']['arguments']})"
        console.print(
            f"[dim]{stored.seq:>4} task {stored.task_id}[/] [bold]{stored.role}:[/] {escape(text)}",
            highlight=False,
        )
    console.print(
        f"[dim]{usage.model_calls} model calls, {usage.prompt_tokens} prompt + "
        f"{usage.completion_tokens} completion tokens, ${usage.cost:.6f}[/]",
        highlight=False,
    )


@main.command("agents")
@json_option
@click.pass_obj
@command
def agents(obj: Context, as_json: bool) -> None:
    """The configured agents: models, tools, workspace, definition version."""
    from goclaw.agent.definitions import build_catalog
    from goclaw.skills.discovery import KnownTools

    catalog = build_catalog(obj.config, KnownTools(obj.config))
    rows = [
        {
            "id": agent.id,
            "models": list(agent.models),
            "tools": list(agent.settings.tools),
            "workspace": str(agent.workspace),
            "version": agent.version,
        }
        for agent in catalog.agents.values()
    ]
    if as_json:
        emit_json(rows)
        return
    table = Table("agent", "models", "tools", "workspace", "version")
    for row in rows:
        table.add_row(
            row["id"],
            " → ".join(row["models"]),
            ", ".join(row["tools"]),
            row["workspace"],
            row["version"],
        )
    console.print(table)


@main.command()
@json_option
@click.pass_obj
@command
def status(obj: Context, as_json: bool) -> None:
    """Tasks per state, live workers and expired leases."""
    broker = obj.broker
    counts = broker.counts()
    workers = broker.live_workers()
    expired = broker.expired_leases()
    if as_json:
        emit_json(
            {
                "database": broker.db.describe(),
                "counts": counts,
                "workers": [w.as_json() for w in workers],
                "live_workers": len(workers),
                "expired_leases": expired,
            }
        )
        return
    console.print(f"database: {broker.db.describe()}", highlight=False)
    table = Table("state", "tasks")
    for state, n in counts.items():
        table.add_row(f"[{STATE_STYLES[state]}]{state}[/]", str(n))
    console.print(table)
    console.print(f"live workers: {len(workers)}")
    for w in workers:
        console.print(
            f"  {w.id}  queue={w.queue} concurrency={w.concurrency} "
            f"heartbeat={iso(w.heartbeat_at)}",
            highlight=False,
        )
    console.print(f"expired leases: {expired}")


@main.command()
@json_option
@click.pass_obj
@command
def demo(obj: Context, as_json: bool) -> None:
    """Start the stack (goclaw up), talk to the default agent, run tasks through success,
    retry, dead letter and cancel; show them."""
    from goclaw.demo import run_demo

    code, summary = run_demo(obj.config, Console(quiet=True) if as_json else console)
    if as_json:
        emit_json(summary)
    sys.exit(code)


@main.group()
def dev() -> None:
    """Tools for developing against goclaw without a network."""


@dev.command("fake-llm")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(min=1, max=65535), default=8001, show_default=True)
@click.option(
    "--script",
    "script_path",
    type=click.Path(dir_okay=False, exists=True),
    required=True,
    help="YAML or JSON replies to serve, in order (see goclaw/fake_llm.py).",
)
@command
def dev_fake_llm(host: str, port: int, script_path: str) -> None:
    """Serve a scripted OpenAI-compatible model at http://HOST:PORT/v1."""
    from goclaw.fake_llm import Script, serve

    script = Script.load(script_path)
    err_console.print(f"fake model listening on http://{host}:{port}/v1", highlight=False)
    serve(script, host, port)


# -- bench ---------------------------------------------------------------------


@main.group()
def bench() -> None:
    """Same-run comparisons against what a user would pick instead."""


@bench.command("queue")
@click.option("--tasks", "n_tasks", type=click.IntRange(min=10), default=2000, show_default=True)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Worker threads, for goclaw and for stock Huey alike.",
)
@click.option("--latency-samples", type=click.IntRange(min=5), default=50, show_default=True)
@click.option("--dir", "workdir", type=click.Path(file_okay=False), help="Where the databases go.")
@json_option
@command
def bench_queue(
    n_tasks: int, workers: int, latency_samples: int, workdir: str | None, as_json: bool
) -> None:
    """goclaw's durable lifecycle vs stock SqliteHuey vs a bare sqlite3 lease loop."""
    from goclaw.bench import run_queue_bench

    result = run_queue_bench(
        n_tasks=n_tasks,
        workers=workers,
        latency_samples=latency_samples,
        workdir=workdir,
        progress=None if as_json else print_progress,
    )
    print_measures(result, as_json)


def print_progress(message: str) -> None:
    err_console.print(f"[dim]{message}[/]", highlight=False)


def print_measures(result: dict[str, Any], as_json: bool) -> None:
    """A benchmark's figures: one JSON object, or a two-column table."""
    if as_json:
        emit_json(result)
        return
    table = Table("measure", "value")
    for key, value in result.items():
        table.add_row(key, f"{value:.2f}" if isinstance(value, float) else str(value))
    console.print(table)


@bench.command("agent")
@click.option("--turns", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True)
@click.option("--workdir", type=click.Path(file_okay=False), help="[default: a temp dir]")
@json_option
@command
def bench_agent(turns: int, warmup: int, workdir: str | None, as_json: bool) -> None:
    """Per-turn overhead of a goclaw agent turn vs a direct LiteLLM call (same fake server)."""
    from goclaw.bench_agent import run_agent_bench

    result = run_agent_bench(
        turns=turns,
        warmup=warmup,
        workdir=workdir,
        progress=None if as_json else print_progress,
    )
    print_measures(result, as_json)


def per_call_bench(func: Callable[..., Any]) -> Callable[..., Any]:
    """The options of the benches that time one call many times, interleaved."""
    for option in reversed(
        (
            click.option("--calls", type=click.IntRange(min=1), default=2000, show_default=True),
            click.option("--warmup", type=click.IntRange(min=0), default=100, show_default=True),
            click.option(
                "--workdir", type=click.Path(file_okay=False), help="[default: a temp dir]"
            ),
            json_option,
        )
    ):
        func = option(func)
    return func


@bench.command("policy")
@per_call_bench
@command
def bench_policy(calls: int, warmup: int, workdir: str | None, as_json: bool) -> None:
    """Per tool call: a policy check, and a check plus its durable audit write, vs no check."""
    from goclaw.bench_policy import run_policy_bench

    result = run_policy_bench(
        calls=calls,
        warmup=warmup,
        workdir=workdir,
        progress=None if as_json else print_progress,
    )
    print_measures(result, as_json)


@bench.command("skill")
@per_call_bench
@command
def bench_skill(calls: int, warmup: int, workdir: str | None, as_json: bool) -> None:
    """Per call of a small WASM skill (cached compile) vs the same function in Python."""
    from goclaw.bench_skill import run_skill_bench

    result = run_skill_bench(
        calls=calls,
        warmup=warmup,
        workdir=workdir,
        progress=None if as_json else print_progress,
    )
    print_measures(result, as_json)


@bench.command("gateway")
@click.option("--requests", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True)
@click.option(
    "--clients",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="WebSocket clients, each subscribed to its own session.",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0, min_open=True),
    default=500.0,
    show_default=True,
    help="Events per second in total, spread over the sessions.",
)
@click.option(
    "--seconds",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    help="How long the events are written at that rate.",
)
@click.option(
    "--chunk-delay-ms",
    type=click.FloatRange(min=0),
    default=10.0,
    show_default=True,
    help="The fake model's pause between streamed chunks.",
)
@click.option("--workdir", type=click.Path(file_okay=False), help="[default: a temp dir]")
@json_option
@command
def bench_gateway(
    requests: int,
    warmup: int,
    clients: int,
    rate: float,
    seconds: float,
    chunk_delay_ms: float,
    workdir: str | None,
    as_json: bool,
) -> None:
    """Time to first token through the gateway vs direct LiteLLM; WebSocket fan-out; RSS."""
    from goclaw.bench_gateway import run_gateway_bench

    result = run_gateway_bench(
        requests=requests,
        warmup=warmup,
        clients=clients,
        rate=rate,
        seconds=seconds,
        chunk_delay_ms=chunk_delay_ms,
        workdir=workdir,
        progress=None if as_json else print_progress,
    )
    print_measures(result, as_json)


if __name__ == "__main__":  # pragma: no cover
    # `python -m goclaw.cli`: run the imported module's group, the one the command
    # groups below were added to (this copy, __main__, has none of them).
    from goclaw.cli import main as imported_main

    imported_main()
else:
    # Command groups in their own modules, which import this one's helpers.
    from goclaw.cli_cron import cron, scheduler
    from goclaw.cli_skill import skill

    for group in (skill, cron, scheduler):
        main.add_command(group)

__all__ = ["main"]
