"""Submitting agent turns and following them, for the CLI and the gateway.

Nothing here imports LiteLLM or runs a model: a turn is a durable task of
kind ``agent``, and following it means reading its events from the database
(``run.started``, ``chunk``, ``tool.call``, ``tool.result``, ``run.completed``,
``run.failed``, and the task's own state changes).
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from goclaw import event_log
from goclaw.agent.sessions import SessionStore
from goclaw.broker import Broker
from goclaw.records import Submitted, TaskEvent
from goclaw.states import TERMINAL, TaskState

AGENT_KIND = "agent"


MAX_SESSION_KEY_CHARS = 200


def new_session_key(agent_id: str) -> str:
    return f"{agent_id}-{uuid.uuid4().hex[:12]}"


def check_session_key(key: str) -> str:
    """Session keys are names people and clients type: printable, at most 200 characters."""
    if not key or len(key) > MAX_SESSION_KEY_CHARS or not key.isprintable():
        raise ValueError(
            f"session key {key[:40]!r}: must be 1 to {MAX_SESSION_KEY_CHARS} printable characters"
        )
    return key


def submit_turn(
    broker: Broker,
    *,
    agent: str,
    prompt: str,
    session: str | None = None,
    queue: str = "default",
    priority: int = 0,
    idempotency_key: str | None = None,
    max_attempts: int | None = None,
) -> tuple[Submitted, str]:
    """Queue one turn; returns the task and the session key (a new one unless given)."""
    if not prompt.strip():
        raise ValueError("the prompt is empty")
    session = check_session_key(session) if session is not None else new_session_key(agent)
    with broker.transaction():
        # The session row first: the task's state changes take their seqs from it.
        SessionStore(broker.db).ensure(session, agent)
        [submitted] = broker.submit(
            AGENT_KIND,
            {"prompt": prompt, "agent": agent, "session": session},
            queue=queue,
            priority=priority,
            idempotency_key=idempotency_key,
            max_attempts=max_attempts,
            session_key=session,
        )
    return submitted, session


def agent_load(broker: Broker, agent_id: str) -> dict[str, int]:
    """Turns of ``agent_id`` by state, from the live states only (the gateway's queue check).

    A turn's agent is its session's: a session belongs to the agent that opened it.
    """
    rows = broker.db.fetchall(
        "SELECT t.state, COUNT(*) FROM tasks t JOIN sessions s ON s.key = t.session_key "
        "WHERE s.agent_id = ? AND t.kind = ? "
        "AND t.state IN ('QUEUED', 'RETRY_WAIT', 'CLAIMED', 'RUNNING') GROUP BY t.state",
        (agent_id, AGENT_KIND),
    )
    found = dict(rows)
    return {
        "queued": int(found.get("QUEUED", 0)) + int(found.get("RETRY_WAIT", 0)),
        "running": int(found.get("CLAIMED", 0)) + int(found.get("RUNNING", 0)),
    }


def follow(
    broker: Broker,
    task_id: int,
    *,
    timeout: float | None = None,
    poll_seconds: float = 0.05,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[TaskEvent]:
    """Yield the task's events as they are written, until it reaches a final state.

    Raises ``TimeoutError`` if it has not ended within ``timeout`` seconds.
    """
    deadline = None if timeout is None else clock() + timeout
    # The task's commit-ordered cursor (its session's seq for a turn): a serial id is not
    # commit-ordered on PostgreSQL, and following it could skip a late event.
    stream = event_log.resolve(broker.db, task_id=task_id)
    after = 0
    while True:
        events = event_log.read(broker.db, stream, after=after)
        for event in events:
            after = stream.cursor(event)
            yield event
        if not events:
            if TaskState(broker.get(task_id).state) in TERMINAL:
                # One last read: events committed just before the final state.
                for event in event_log.read(broker.db, stream, after=after):
                    after = stream.cursor(event)
                    yield event
                return
            if deadline is not None and clock() > deadline:
                raise TimeoutError(f"task {task_id} did not finish within {timeout:g}s")
            time.sleep(poll_seconds)


@dataclasses.dataclass(frozen=True)
class TurnOutcome:
    state: TaskState
    reply: str | None
    error: str | None
    result: dict[str, Any] | None

    def as_json(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "reply": self.reply,
            "error": self.error,
            "result": self.result,
        }


def follow_turn(
    broker: Broker,
    task_id: int,
    *,
    timeout: float | None = None,
    on_text: Callable[[str], None] | None = None,
    on_note: Callable[[str], None] | None = None,
) -> TurnOutcome:
    """Stream a turn's reply text (``on_text``) and its tool use and failovers (``on_note``)."""
    reply_index: int | None = None
    for event in follow(broker, task_id, timeout=timeout):
        data = event.data or {}
        if event.type == "chunk":
            if reply_index is not None and data.get("reply") != reply_index and on_text:
                on_text("\n")
            reply_index = data.get("reply")
            if on_text:
                on_text(str(data.get("delta", "")))
        elif on_note is None:
            continue
        elif event.type == "tool.call":
            on_note(f"→ {data.get('name')}({data.get('arguments')})")
        elif event.type == "tool.result" and not data.get("ok"):
            on_note(f"← {data.get('name')}: {data.get('error')}")
        elif event.type == "provider.failover":
            on_note(
                f"model {data.get('from')} failed ({data.get('reason')}); "
                f"continuing on {data.get('to')}"
            )
        elif event.type == "run.failed" and data.get("will_retry"):
            on_note(f"attempt failed ({data.get('reason')}); it will be retried")
        elif event.type == "approval.required":
            approval = data.get("approval_id")
            on_note(
                f"{data.get('tool')} {data.get('subject')!r} waits for approval {approval}: "
                f"goclaw approvals approve {approval}  (or deny {approval})"
            )
        elif event.type == "guard.flagged":
            on_note(f"{data.get('name')}: injection patterns {data.get('patterns')}")
    task = broker.get(task_id)
    result = json.loads(task.result) if task.result else None
    result = result if isinstance(result, dict) else None
    reply = result.get("reply") if result else None
    return TurnOutcome(TaskState(task.state), reply, task.last_error, result)
