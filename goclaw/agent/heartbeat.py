"""The ``heartbeat`` task kind: an agent wakes with ``HEARTBEAT.md`` and speaks only if it must.

The scheduler queues one per fire of ``heartbeat.<agent>`` (only within the
agent's active hours), in the session ``heartbeat:<agent>``. The worker runs an
ordinary turn with the workspace's ``HEARTBEAT.md`` as the prompt, then:

- a reply that is just ``HEARTBEAT_OK`` is *suppressed*: nothing is delivered;
- a reply delivered in the last 24 hours, word for word, is *deduplicated*;
- anything else is *delivered*: a ``heartbeat.alert`` event on the session's
  stream, which gateway subscribers (and later chat channels) receive.

The outcome is the task's result, so ``goclaw cron history`` shows it.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import Any

from goclaw.agent.definitions import UnknownAgent
from goclaw.app import App
from goclaw.context import TaskContext
from goclaw.errors import PermanentTaskError
from goclaw.store.kv import KeyValue

HEARTBEAT_KIND = "heartbeat"
HEARTBEAT_FILE = "HEARTBEAT.md"
HEARTBEAT_OK = "HEARTBEAT_OK"
ALERT_EVENT = "heartbeat.alert"
DEDUP_SECONDS = 24 * 3600
_KV_NAMESPACE = "heartbeat-alerts"
_INSTRUCTION = (
    "This is a scheduled heartbeat. Do what the checklist above asks. If nothing needs the "
    f"user's attention, reply with exactly {HEARTBEAT_OK} and nothing else."
)


def heartbeat_session(agent_id: str) -> str:
    return f"heartbeat:{agent_id}"


def register_heartbeat_kind(app: App, runtime: Any) -> None:
    """Add ``heartbeat`` to ``app``; ``runtime`` is the worker's ``AgentRuntime``."""

    @app.kind(HEARTBEAT_KIND)
    def heartbeat(ctx: TaskContext, agent: str) -> dict[str, Any]:
        return run_heartbeat(runtime, ctx, agent)


def run_heartbeat(
    runtime: Any, ctx: TaskContext, agent_id: str, *, clock: Callable[[], float] = time.time
) -> dict[str, Any]:
    try:
        definition = runtime.catalog.current().get(agent_id)
    except UnknownAgent as exc:
        raise PermanentTaskError(str(exc), code="unknown_agent") from exc
    path = definition.workspace / HEARTBEAT_FILE
    try:
        checklist = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        checklist = ""
    except (OSError, UnicodeDecodeError) as exc:
        raise PermanentTaskError(f"cannot read {path}: {exc}") from exc
    if not checklist:  # nothing to check: no model call, nothing to say
        return {"outcome": "skipped", "why": f"{path} is missing or empty"}
    session = heartbeat_session(agent_id)
    turn = runtime.run_turn(
        ctx, prompt=f"{checklist}\n\n{_INSTRUCTION}", agent=agent_id, session=session
    )
    reply = (turn.get("reply") or "").strip()
    if reply == HEARTBEAT_OK:
        return {"outcome": "suppressed", "reply": reply}
    broker = runtime.broker
    alerts = KeyValue(broker.db, _KV_NAMESPACE)
    key = f"{agent_id}:{hashlib.sha256(reply.encode()).hexdigest()[:32]}"
    now = clock()
    with broker.transaction():
        last = alerts.get(key)
        if last is not None and now - float(last) < DEDUP_SECONDS:
            return {"outcome": "deduplicated", "reply": reply, "first_sent_at": float(last)}
        alerts.put(key, repr(now).encode())
        broker.note(ctx.task_id, ALERT_EVENT, {"agent": agent_id, "text": reply})
    return {"outcome": "delivered", "reply": reply}
