"""The ACP methods, one function each, and the table ``dispatch`` reads.

Every method validates its params strictly (unknown names are an error, so a
typo is not silently ignored), runs its database work on the database thread,
and returns a JSON-able result or raises ``RpcError``. Mutating methods
(``agent.chat``, ``agent.abort``) need ``system.hello`` first: a client that
has not agreed a protocol version must not change anything.

No method runs a model: ``agent.chat`` queues a durable task and returns its
id; the reply arrives as ``session.event`` notifications from the worker's
events.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Awaitable, Callable
from importlib.metadata import version as package_version
from typing import TYPE_CHECKING, Any

from goclaw import event_log
from goclaw.agent.definitions import AgentDefinition, UnknownAgent
from goclaw.agent.sessions import SessionStore
from goclaw.agent.turns import agent_load, check_session_key
from goclaw.approvals import PENDING, ApprovalError
from goclaw.approvals import SCOPES as APPROVAL_SCOPES
from goclaw.approvals import STATES as APPROVAL_STATES
from goclaw.config import DEFAULT_AGENT_ID
from goclaw.cron.scheduler import Scheduler
from goclaw.cron.spec import ScheduleError, check_name, parse_spec
from goclaw.cron.store import ScheduleStore
from goclaw.gateway import access, jsonrpc
from goclaw.gateway.chat import queue_turn
from goclaw.gateway.jsonrpc import Message, RpcError, invalid_params
from goclaw.states import TaskState

if TYPE_CHECKING:
    from goclaw.gateway.acp import Connection

#: Protocol versions this server speaks (inclusive).
PROTOCOL_VERSIONS = (1, 1)
MAX_LIST = 500
MAX_IDEMPOTENCY_KEY = 200
MAX_ID = 2**63 - 1

Method = Callable[["Connection", dict[str, Any]], Awaitable[Any]]


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    fn: Method
    mutating: bool = False


METHODS: dict[str, MethodSpec] = {}


def method(name: str, *, mutating: bool = False) -> Callable[[Method], Method]:
    def register(fn: Method) -> Method:
        METHODS[name] = MethodSpec(fn, mutating)
        return fn

    return register


async def dispatch(conn: Connection, message: Message) -> Any:
    spec = METHODS.get(message.method)
    if spec is None:
        raise RpcError(jsonrpc.METHOD_NOT_FOUND, f"no method {message.method[:80]!r}")
    if spec.mutating and conn.version is None:
        raise RpcError(
            jsonrpc.HELLO_REQUIRED, f"{message.method} changes state: call system.hello first"
        )
    capability = access.MUTATE if spec.mutating else access.READ
    try:
        await access.authorize(conn.state, capability, message.method, conn.keys[1])
    except access.AccessDenied as exc:
        raise RpcError(jsonrpc.POLICY_DENIED, str(exc), {"capability": capability}) from None
    return await spec.fn(conn, message.params)


# -- params ---------------------------------------------------------------------


class Params:
    """Typed access to one request's params; whatever is not read is an unknown name."""

    def __init__(self, params: dict[str, Any]) -> None:
        self._params = params
        self._read: set[str] = set()

    def get(self, name: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        self._read.add(name)
        value = self._params.get(name, default)
        if value is None:
            return default
        if isinstance(value, bool) and bool not in _as_tuple(kind):
            raise invalid_params(f"{name} must be {_kind_name(kind)}, not a boolean")
        if not isinstance(value, kind):
            raise invalid_params(f"{name} must be {_kind_name(kind)}, not {type(value).__name__}")
        return value

    def required(self, name: str, kind: type | tuple[type, ...]) -> Any:
        value = self.get(name, kind)
        if value is None:
            raise invalid_params(f"{name} is required")
        return value

    def id(self, name: str, *, required: bool = True) -> int | None:
        """A row id: a positive 64-bit integer (anything else names no row)."""
        value = self.required(name, int) if required else self.get(name, int)
        if value is not None and not 1 <= value <= MAX_ID:
            raise invalid_params(f"{name} must be between 1 and {MAX_ID}, got {value}")
        return value

    def count(self, name: str, default: int, *, low: int = 0, high: int = MAX_LIST) -> int:
        value = self.get(name, int, default)
        if not low <= value <= high:
            raise invalid_params(f"{name} must be between {low} and {high}, got {value}")
        return value

    def done(self) -> None:
        unknown = sorted(set(self._params) - self._read)
        if unknown:
            raise invalid_params(f"unknown param {unknown[0]!r}")


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", bool: "a boolean", dict: "an object"}
    return " or ".join(names.get(k, k.__name__) for k in _as_tuple(kind))


# -- system -----------------------------------------------------------------------


@method("system.hello")
async def system_hello(conn: Connection, params: dict[str, Any]) -> dict[str, Any]:
    p = Params(params)
    low = p.count("min_version", 1, low=1, high=1_000_000)
    high = p.count("max_version", low, low=1, high=1_000_000)
    client = p.get("client", dict, {})
    p.done()
    if high < low:
        raise invalid_params(f"max_version ({high}) is below min_version ({low})")
    ours_low, ours_high = PROTOCOL_VERSIONS
    chosen = min(high, ours_high)
    if chosen < max(low, ours_low):
        raise RpcError(
            jsonrpc.VERSION_MISMATCH,
            f"no common protocol version: the client speaks {low}..{high}, "
            f"this server {ours_low}..{ours_high}",
            {"supported": list(PROTOCOL_VERSIONS)},
        )
    conn.version = chosen
    conn.client = client
    settings = conn.state.settings
    return {
        "version": chosen,
        "server": f"goclaw/{package_version('goclaw')}",
        "methods": sorted(METHODS),
        "limits": {
            "max_frame_bytes": settings.max_frame_bytes,
            "send_queue_size": settings.send_queue_size,
            "replay_page_size": settings.replay_page_size,
        },
    }


@method("system.status")
async def system_status(conn: Connection, params: dict[str, Any]) -> dict[str, Any]:
    Params(params).done()
    state = conn.state

    def read() -> dict[str, Any]:
        workers = state.broker.live_workers()
        return {"tasks": state.broker.counts(), "workers": [w.as_json() for w in workers]}

    status = await state.db(read)
    return {
        "server": f"goclaw/{package_version('goclaw')}",
        "protocol": conn.version,
        "uptime_seconds": round(time.time() - state.started_at, 3),
        "connections": state.connections,
        "subscriptions": len(conn.subscriptions),
        **status,
    }


# -- agents ---------------------------------------------------------------------------


def _agent(conn: Connection, agent_id: str) -> Any:
    try:
        return conn.state.agents.current().get(agent_id)
    except UnknownAgent as exc:
        raise RpcError(jsonrpc.NOT_FOUND, str(exc), {"what": "agent"}) from None


def describe_agent(agent: AgentDefinition) -> dict[str, Any]:
    return {
        "id": agent.id,
        "models": list(agent.models),
        "tools": list(agent.settings.tools),
        "concurrency": agent.settings.concurrency,
        "max_queue_depth": agent.settings.max_queue_depth,
    }


@method("agent.list")
async def agent_list(conn: Connection, params: dict[str, Any]) -> dict[str, Any]:
    Params(params).done()
    catalog = conn.state.agents.current()
    return {"agents": [describe_agent(catalog.get(i)) for i in sorted(catalog.agents)]}


@method("agent.status")
async def agent_status(conn: Connection, params: dict[str, Any]) -> dict[str, Any]:
    p = Params(params)
    agent_id = p.get("agent_id", str, DEFAULT_AGENT_ID)
    p.done()
    agent = _agent(conn, agent_id)
    load = await conn.state.db(agent_load, conn.state.broker, agent.id)
    return {**describe_agent(agent), **load}


@method("agent.chat", mutating=True)
async def agent_chat(conn: Connection, params: dict[str, Any]) -> dict[str, Any]:
    p = Params(params)
    agent_id = p.get("agent_id", str, DEFAULT_AGENT_ID)
    session_key = p.get("session_key", str)
    content = p.required("content", str)
    idempotency_key = p.get("idempotency_key", str)
    p.done()
    if not content.strip():
        raise invalid_params("content is empty")
    if session_key is not None:
        check_session_key(session_key)
    if idempotency_key is not None and not 0 < len(idempotency_key) <= MAX_IDEMPOTENCY_KEY:
        raise invalid_params(f"idempotency_key must be 1 to {MAX_IDEMPOTENCY_KEY} characters")
    agent = _agent(conn, agent_id)
    submitted, session = await queue_turn(
        conn.state,
        agent,
        content,
        session=session_key,
        idempotency_key=idempotency_key and f"acp:{idempotency_key}",
    )
    return {"task_id": submitted.task_id, "session_key": session, "created": submitted.created}


@method("agent.abort", mutating=True)
async def agent_abort(conn: Connection, params: dict[str, Any]) -> dict[str, Any]:
    p = Params(params)
    task_id = p.id("task_id")
    reason = p.get("reason", str, "aborted over ACP")
    p.done()
    task = await conn.state.db(conn.state.broker.cancel, task_id, reason=reason[:500])
    return {"task_id": task.id, "state": task.state.value}


# -- tasks ------------------------------------------------------------------------------


@method("task.get")
async def task_get(conn: Connection, params: dict[str, Any]) -> dict[str, Any]:
    p = Params(params)
    task_id = p.id("task_id")
    p.done()
    task = await conn.state.db(conn.state.broker.get, task_id)
    return task.as_json()


@method("task.list")
async def task_list(conn: Connection, params: dict[str, Any]) -> dict[str, Any]:
    p = Params(params)
    state = p.get("state", str)
    kind = p.get("kind", str)
    limit = p.count("limit", 50, low=1)
    p.done()
    if state is not None and state not in TaskState.__members__:
        raise invalid_params(f"state must be one of {', '.join(TaskState.__members__)}")
    tasks = await conn.state.db(conn.state.broker.tasks, state=state, kind=kind, limit=limit)
    return {"tasks": [t.as_json() for t in tasks]}


# -- sessions -------------------------------------------------------------------------


@method("session.list")
async def session_list(conn: Connection, params: dict[str, Any]) -> dict[str, Any]:
    p = Params(params)
    limit = p.count("limit", 50, low=1)
    p.done()
    sessions = await conn.state.db(SessionStore(conn.state.broker.db).list, limit=limit)
    return {"sessions": [s.as_json() for s in sessions]}


@method("session.history")
async def session_history(conn: Connection, params: dict[str, Any]) -> dict[str, Any]:
    p = Params(params)
    key = p.required("session_key", str)
    after = p.count("after", 0, high=MAX_ID)
    limit = p.count("limit", 100, low=1)
    p.done()
    store = SessionStore(conn.state.broker.db)

    def read() -> dict[str, Any]:
        info = store.get(key)
        if info is None:
            raise event_log.SessionNotFound(f"session {key!r} does not exist")
        messages = store.messages(key, after=after, limit=limit)
        return {**info.as_json(), "messages": [m.as_json() for m in messages]}

    return await conn.state.db(read)


@method("session.events.subscribe")
async def events_subscribe(conn: Connection, params: dict[str, Any]) -> dict[str, Any]:
    p = Params(params)
    session_key = p.get("session_key", str)
    task_id = p.id("task_id", required=False)
    after = p.count("from_event_id", 0, high=MAX_ID)
    p.done()
    if (session_key is None) == (task_id is None):
        raise invalid_params("give session_key or task_id (exactly one)")
    db = conn.state.broker.db

    def open_stream() -> tuple[event_log.Stream, int]:
        stream = event_log.resolve(db, session_key=session_key, task_id=task_id)
        event_log.check_replay(db, stream, after)
        return stream, event_log.head(db, stream)

    stream, head = await conn.state.db(open_stream)
    sub = conn.new_subscription(stream)
    # Replay runs beside the reader: a client far behind must not block its own requests.
    sub.attaching = conn.state.pump.start_subscription(sub, after)
    conn.watch_replay(sub)
    return {
        "subscription": sub.id,
        "from_event_id": after,
        "head_event_id": head,
        "cursor": "seq" if stream.by_seq else "event_id",
    }


@method("session.events.unsubscribe")
async def events_unsubscribe(conn: Connection, params: dict[str, Any]) -> dict[str, Any]:
    p = Params(params)
    sub_id = p.required("subscription", str)
    p.done()
    sub = conn.subscriptions.get(sub_id)
    if sub is None:
        raise RpcError(
            jsonrpc.NOT_FOUND, f"no subscription {sub_id[:40]!r}", {"what": "subscription"}
        )
    conn.close_subscription(sub)
    return {"subscription": sub_id, "last_event_id": sub.position}


# -- approvals ------------------------------------------------------------------------


@method("approval.list")
async def approval_list(conn: Connection, params: dict[str, Any]) -> dict[str, Any]:
    """Requests (pending by default) and the allow-always rules in force."""
    p = Params(params)
    state = p.get("state", str, PENDING)
    limit = p.count("limit", 100, low=1)
    p.done()
    if state != "all" and state not in APPROVAL_STATES:
        raise invalid_params(f"state must be all or one of {', '.join(APPROVAL_STATES)}")
    approvals = conn.state.approvals

    def read() -> dict[str, Any]:
        listed = approvals.list(state=None if state == "all" else state, limit=limit)
        return {
            "approvals": [a.as_json() for a in listed],
            "rules": [r.as_json() for r in approvals.rules()],
        }

    return await conn.state.db(read)


@method("approval.respond", mutating=True)
async def approval_respond(conn: Connection, params: dict[str, Any]) -> dict[str, Any]:
    """Approve or deny a pending request; the parked run resumes at once either way."""
    p = Params(params)
    approval_id = p.id("approval_id")
    decision = p.required("decision", str)
    scope = p.get("scope", str, "once")
    note = p.get("note", str, "")
    p.done()
    if decision not in ("approve", "deny"):
        raise invalid_params("decision must be approve or deny")
    if scope not in APPROVAL_SCOPES:
        raise invalid_params(f"scope must be one of {', '.join(APPROVAL_SCOPES)}")
    try:
        answered = await conn.state.db(
            conn.state.approvals.respond,
            approval_id,
            approve=decision == "approve",
            scope=scope,
            note=note[:500],
            by=f"acp:{conn.keys[1]}",
        )
    except ApprovalError as exc:
        code = jsonrpc.NOT_FOUND if exc.code == "not_found" else jsonrpc.CONFLICT
        raise RpcError(code, str(exc), {"what": "approval"}) from None
    return answered.as_json()


# -- schedules ------------------------------------------------------------------------


def _check_schedule_name(name: str) -> None:
    try:
        check_name(name)
    except ScheduleError as exc:
        raise invalid_params(str(exc)) from None


async def _on_schedule(conn: Connection, name: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Run a store or scheduler call on the schedule ``name`` on the database thread. Its
    refusal keeps the store's message: ``not_found`` if no such schedule exists, else
    ``conflict`` (the name is taken, or config.yaml owns the schedule)."""
    store = ScheduleStore(conn.state.broker.db)

    def call() -> Any:
        try:
            return fn(*args)
        except ScheduleError as exc:
            code = jsonrpc.NOT_FOUND if store.get(name) is None else jsonrpc.CONFLICT
            raise RpcError(code, str(exc), {"what": "schedule"}) from None

    return await conn.state.db(call)


@method("cron.list")
async def cron_list(conn: Connection, params: dict[str, Any]) -> dict[str, Any]:
    Params(params).done()
    schedules = await conn.state.db(ScheduleStore(conn.state.broker.db).list)
    return {"schedules": [s.as_json() for s in schedules]}


@method("cron.add", mutating=True)
async def cron_add(conn: Connection, params: dict[str, Any]) -> dict[str, Any]:
    """A runtime schedule, checked as a ``cron:`` entry of config.yaml would be."""
    p = Params(params)
    name = p.required("name", str)
    raw = p.required("spec", dict)
    p.done()
    _check_schedule_name(name)
    try:
        spec = parse_spec(raw, f"cron.{name}")
    except ScheduleError as exc:
        raise invalid_params(str(exc)) from None
    store = ScheduleStore(conn.state.broker.db)
    schedule = await _on_schedule(conn, name, store.add, name, spec)
    return {"schedule": schedule.as_json()}


@method("cron.remove", mutating=True)
async def cron_remove(conn: Connection, params: dict[str, Any]) -> dict[str, Any]:
    p = Params(params)
    name = p.required("name", str)
    p.done()
    _check_schedule_name(name)
    await _on_schedule(conn, name, ScheduleStore(conn.state.broker.db).remove, name)
    return {"removed": name}


async def _set_enabled(conn: Connection, params: dict[str, Any], enabled: bool) -> dict[str, Any]:
    p = Params(params)
    name = p.required("name", str)
    p.done()
    _check_schedule_name(name)
    store = ScheduleStore(conn.state.broker.db)
    schedule = await _on_schedule(conn, name, store.set_enabled, name, enabled)
    return {"schedule": schedule.as_json()}


@method("cron.enable", mutating=True)
async def cron_enable(conn: Connection, params: dict[str, Any]) -> dict[str, Any]:
    """Fires missed while it was disabled are not caught up."""
    return await _set_enabled(conn, params, True)


@method("cron.disable", mutating=True)
async def cron_disable(conn: Connection, params: dict[str, Any]) -> dict[str, Any]:
    return await _set_enabled(conn, params, False)


@method("cron.run_now", mutating=True)
async def cron_run_now(conn: Connection, params: dict[str, Any]) -> dict[str, Any]:
    """Queue the schedule's work now, outside its times (its history says ``manual``)."""
    p = Params(params)
    name = p.required("name", str)
    p.done()
    _check_schedule_name(name)
    config = conn.state.config
    scheduler = Scheduler(conn.state.broker, config.scheduler, queue=config.worker.queue)
    fired = await _on_schedule(conn, name, scheduler.run_now, name)
    return {"fire_at": fired.fire_at, "task_id": fired.task_id}


@method("cron.history")
async def cron_history(conn: Connection, params: dict[str, Any]) -> dict[str, Any]:
    """Fires newest first, each with its task's state now."""
    p = Params(params)
    name = p.required("name", str)
    limit = p.count("limit", 50, low=1)
    p.done()
    _check_schedule_name(name)
    store = ScheduleStore(conn.state.broker.db)
    fires = await _on_schedule(conn, name, store.history, name, limit)
    return {"fires": [f.as_json() for f in fires]}
