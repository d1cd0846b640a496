"""One agent turn: think, act, observe, until the model answers without tools.

A turn is the body of one ``agent`` task. Everything it learns is written to
the session as it happens, so the turn is resumable at every step: a retry
after a crash reads what its earlier attempt committed and goes on from
there. The user message and the final reply are each written once, and the
next step is decided from the durable tail of the turn:

- no messages yet: write the user message, then ask the model;
- the last is an assistant message with tool calls: run the calls that have
  no result (side effects go through the ``EffectLedger``), then ask again;
- the last is a final assistant message: the turn is done, whatever crashed
  after it was written.

Bounds: ``max_iterations`` model replies per turn, ``max_tool_calls`` tool
calls (after which tools are withdrawn so the model must answer), a
detector for the same call with the same arguments giving the same result,
and ``task_timeout_seconds``. Tool problems (unknown tool, invalid
arguments, a refusal, an exception) go back to the model as tool errors;
none of them ends the turn.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from goclaw.agent.compaction import compact
from goclaw.agent.definitions import AgentDefinition
from goclaw.agent.effects import INTERRUPTED, EffectLedger
from goclaw.agent.events import RunEvents
from goclaw.agent.routing import CallHooks, CallRecord, ContextOverflow, ModelError, ModelRouter
from goclaw.agent.sessions import History, SessionStore
from goclaw.agent.tools import (
    AllowListedTools,
    ApprovalRequired,
    PolicyHook,
    RegisteredTools,
    Toolbox,
    ToolContext,
    ToolError,
    ToolLimits,
    authorize,
    execute,
    get_tool,
    parse_arguments,
    tools_for,
)
from goclaw.agent.untrusted import BLOCKED, UNTRUSTED_TOOLS, guard
from goclaw.approvals import Approvals
from goclaw.context import TaskContext
from goclaw.doorbell import Doorbell
from goclaw.errors import PermanentTaskError, TaskCanceled, TaskParked
from goclaw.redact import Scrubber

log = logging.getLogger(__name__)

#: Tool calls of one reply run in parallel, up to this many at once.
MAX_PARALLEL_TOOLS = 8
#: The same call, arguments and result this many times ends the turn (a repeat first warns).
REPEAT_LIMIT = 3
REPEATED = "repeated_call"
#: Provider overflows in a row the turn compacts for before it gives up.
MAX_OVERFLOW_COMPACTIONS = 2


class RunFailed(Exception):
    """A turn failed in a way a later attempt may fix (the broker retries it)."""


@dataclasses.dataclass
class AgentServices:
    """What every turn in a worker process shares."""

    sessions: SessionStore
    effects: EffectLedger
    router: ModelRouter
    tool_limits: ToolLimits = dataclasses.field(default_factory=ToolLimits)
    policy_for: Callable[[AgentDefinition], PolicyHook] = lambda agent: AllowListedTools(
        agent.settings.tools
    )
    #: Event coalescing (see RunEvents); short in tests, 50 ms by default.
    coalesce_seconds: float = 0.05
    #: Rung after each event write, so followers (the gateway) need not poll.
    doorbell: Doorbell | None = None
    #: Applied to every tool result before the model, the session or an event sees it.
    scrubber: Scrubber = dataclasses.field(default_factory=Scrubber)
    #: Where ``ask`` tool calls wait for a human (None: the policy hook refuses them).
    approvals: Approvals | None = None
    #: The tools there are: the built-ins, plus skills in a worker (``SkillRegistry``).
    toolbox: Toolbox = dataclasses.field(default_factory=RegisteredTools)


@dataclasses.dataclass(frozen=True)
class TurnResult:
    session_key: str
    reply: str
    model: str | None
    iterations: int
    tool_calls: int

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class AgentTurn:
    """One attempt at one turn of ``agent`` in ``session_key``, answering ``prompt``."""

    def __init__(
        self,
        services: AgentServices,
        ctx: TaskContext,
        agent: AgentDefinition,
        *,
        session_key: str,
        prompt: str,
        worker: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.services = services
        self.ctx = ctx
        self.agent = agent
        self.session_key = session_key
        self.prompt = prompt
        self.clock = clock
        self.task_id = ctx.task_id
        self.sessions = services.sessions
        self.db = services.sessions.db
        self._calls: list[tuple[CallRecord, str]] = []
        self.events = RunEvents(
            services.sessions.db,
            services.sessions,
            task_id=ctx.task_id,
            session_key=session_key,
            worker=worker,
            doorbell=services.doorbell,
            coalesce_seconds=services.coalesce_seconds,
        )
        self.deadline = clock() + agent.settings.task_timeout_seconds
        self.hooks = CallHooks(
            on_delta=lambda delta, reply: self.events.chunk(delta, reply=reply),
            on_failover=lambda event: self.events.emit("provider.failover", **event),
            on_call=self._account,
            check=self._check,
        )
        agent.workspace.mkdir(parents=True, exist_ok=True)
        self.tool_context = ToolContext(
            workspace=agent.workspace,
            agent_id=agent.id,
            task_id=ctx.task_id,
            session_key=session_key,
            limits=services.tool_limits,
            policy=services.policy_for(agent),
        )
        # The tools as they are now, kept for the whole turn like the agent's definition.
        self.tools = services.toolbox.tools()
        missing = [name for name in agent.settings.tools if name not in self.tools]
        if missing:  # a skill that was removed, or never loaded: offer the rest
            log.warning("agent %s: tools not available now: %s", agent.id, ", ".join(missing))
        offered = [name for name in agent.settings.tools if name in self.tools]
        self.tool_schemas = [t.schema() for t in tools_for(offered, self.tools)]
        section = services.toolbox.prompt_section(offered)
        self.system_prompt = agent.system_prompt + (f"\n\n{section}" if section else "")
        self.model: str | None = None

    # -- the turn ------------------------------------------------------------

    def run(self) -> TurnResult:
        with self.db.transaction():  # one commit: the session, run.started, the user message
            self.sessions.ensure(self.session_key, self.agent.id)
            self.events.emit(
                "run.started",
                agent=self.agent.id,
                agent_version=self.agent.version,
                attempt=self.ctx.attempt,
                models=list(self.agent.models),
                policy_version=self.tool_context.policy.version(),
            )
            if not self.sessions.turn_messages(self.session_key, self.task_id):
                self.sessions.append(
                    self.session_key, self.task_id, [{"role": "user", "content": self.prompt}]
                )
        try:
            return self._run()
        except TaskParked:
            raise  # waiting for a human, recorded by _park: not a failure
        except TaskCanceled as exc:
            self._failed("canceled", str(exc), retry=False)
            raise
        except PermanentTaskError as exc:
            self._failed(exc.code, str(exc), retry=False)
            raise
        except ModelError as exc:
            self._failed(exc.reason, str(exc), retry=exc.retryable)
            if exc.retryable:
                raise RunFailed(f"{exc.reason}: {exc}") from exc
            raise PermanentTaskError(str(exc), code=exc.reason) from exc
        except Exception as exc:
            self._failed("error", f"{type(exc).__name__}: {exc}", retry=True)
            raise

    def _run(self) -> TurnResult:
        overflows = 0
        while True:
            self._check()
            history = self.sessions.history(self.session_key, self.task_id)
            turn = [m for m in history.messages if m.task_id == self.task_id]
            iterations = sum(1 for m in turn if m.role == "assistant")
            calls_made = sum(len(m.message.get("tool_calls") or ()) for m in turn)
            last = turn[-1].message if turn else None
            if last and last["role"] == "assistant" and not last.get("tool_calls"):
                # An earlier attempt wrote the final reply and crashed before reporting.
                with self.db.transaction():
                    return self._completed(last.get("content") or "", iterations, calls_made)
            if last and last["role"] == "assistant":
                self._act(last["tool_calls"], turn)
                continue
            if iterations >= self.agent.settings.max_iterations:
                raise PermanentTaskError(
                    f"the turn reached max_iterations ({self.agent.settings.max_iterations}) "
                    "without a final answer",
                    code="max_iterations",
                )
            offer_tools = calls_made < self.agent.settings.max_tool_calls
            messages = self._request(history, offer_tools)
            if self._needs_compaction(messages, offer_tools) and self._compact(history):
                continue
            try:
                reply = self.services.router.complete(
                    self.agent,
                    messages,
                    tools=self.tool_schemas if offer_tools else (),
                    hooks=self.hooks,
                    deadline=self.deadline,
                )
            except ContextOverflow as exc:
                overflows += 1
                if overflows > MAX_OVERFLOW_COMPACTIONS or not self._compact(history):
                    raise PermanentTaskError(
                        f"the conversation does not fit the model's context window even after "
                        f"compaction ({exc})",
                        code="context_overflow",
                    ) from exc
                continue
            overflows = 0
            self.model = reply.model
            # One commit: the last chunks, the reply, its accounting (and the end of the run).
            with self.db.transaction():
                self.events.flush()
                self._write_calls()
                self.sessions.append(self.session_key, self.task_id, [reply.message()])
                if not reply.tool_calls:
                    return self._completed(reply.content, iterations + 1, calls_made)

    def _completed(self, reply: str, iterations: int, calls_made: int) -> TurnResult:
        """Record run.completed (inside the caller's transaction) and build the result."""
        result = TurnResult(self.session_key, reply, self.model, iterations, calls_made)
        self._write_calls()
        self.events.emit(
            "run.completed",
            reply=result.reply,
            model=result.model,
            iterations=result.iterations,
            tool_calls=result.tool_calls,
            usage=self.sessions.usage(task_id=self.task_id).as_json(),
            **self.events.stats(),
        )
        return result

    # -- think ---------------------------------------------------------------

    def _request(self, history: History, offer_tools: bool) -> list[dict[str, Any]]:
        system = self.system_prompt
        if history.summary:
            system = f"{system}\n\nSummary of the conversation so far:\n{history.summary}"
        messages = [{"role": "system", "content": system}, *history.openai_messages()]
        if not offer_tools and self.tool_schemas:
            messages.append(
                {
                    "role": "system",
                    "content": "The tool-call budget for this turn is spent: answer now "
                    "with what you have.",
                }
            )
        return messages

    def _needs_compaction(self, messages: list[dict[str, Any]], offer_tools: bool) -> bool:
        model = self.agent.models[0]
        budget = self.services.router.context_window(self.agent, model) * (
            self.agent.settings.compact_at
        )
        tools = self.tool_schemas if offer_tools else []
        # A token is at least one byte of UTF-8: a request with fewer bytes than the
        # budget fits, and the tokenizer (milliseconds per call) is not needed.
        if len(json.dumps([messages, tools], ensure_ascii=False).encode()) <= budget:
            return False
        return self.services.router.count_tokens(model, messages, tools) > budget

    def _compact(self, history: History) -> bool:
        """Summarise (or drop) older messages; False when nothing more can go."""

        def summarise(request: list[dict[str, Any]]) -> str:
            reply = self.services.router.complete(
                self.agent,
                request,
                hooks=dataclasses.replace(
                    self.hooks, on_delta=lambda d, r: None, on_call=self._account_summary
                ),
                deadline=self.deadline,
                stream=False,
            )
            return reply.content

        done = compact(
            history.messages,
            previous_summary=history.summary,
            keep_recent=self.agent.settings.keep_recent_messages,
            summarise=summarise,
        )
        if done is None:
            return False
        with self.db.transaction():
            self._write_calls()
            self.sessions.compact(self.session_key, upto=done.upto, summary=done.summary)
            self.events.emit(
                "compaction", method=done.method, messages=done.messages, upto_seq=done.upto
            )
        return True

    # -- act and observe -----------------------------------------------------

    def _act(self, calls: list[dict[str, Any]], turn: list) -> None:
        """Run a reply's tool calls (in parallel) and append their results in call order."""
        earlier = _earlier_calls(turn)
        budget = self.agent.settings.max_tool_calls - sum(
            len(m.message.get("tool_calls") or ()) for m in turn[:-1] if m.role == "assistant"
        )
        for call in calls:
            self.events.emit(
                "tool.call",
                id=call["id"],
                name=call["function"]["name"],
                arguments=call["function"]["arguments"],
            )
        workers = max(1, min(len(calls), MAX_PARALLEL_TOOLS))
        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="tool") as pool:
            futures = [
                pool.submit(self._call_tool_in_thread, call, allowed=index < budget)
                for index, call in enumerate(calls)
            ]
            outputs = [f.result() for f in futures]
        waiting = [
            (call, out)
            for call, out in zip(calls, outputs, strict=True)
            if isinstance(out, ApprovalRequired)
        ]
        if waiting:
            self._park(waiting)
        results = []
        for call, (raw, error) in zip(calls, outputs, strict=True):
            # Secrets and credential-shaped strings never reach the model, history or events.
            content = self.services.scrubber.scrub(raw)
            name = call["function"]["name"]
            if error is None and name in UNTRUSTED_TOOLS:
                content, error = self._untrusted(call, content)
            key = (name, _canonical(call["function"]["arguments"]), _digest(content))
            if error is None:
                earlier[key] += 1
                if earlier[key] >= REPEAT_LIMIT:
                    raise PermanentTaskError(
                        f"the model called {name} with the same arguments {earlier[key]} times "
                        "and got the same result each time",
                        code="repeated_tool_call",
                    )
                if earlier[key] == REPEAT_LIMIT - 1:
                    error = REPEATED
                    content = json.dumps(
                        {
                            "error": REPEATED,
                            "message": "this exact call already returned this exact result "
                            "earlier in the turn; use that result instead of calling again",
                            "result_digest": key[2],
                        }
                    )
            self.events.emit(
                "tool.result",
                id=call["id"],
                name=name,
                ok=error is None,
                error=error,
                content=content[:2000],
            )
            results.append({"role": "tool", "tool_call_id": call["id"], "content": content})
        with self.db.transaction():
            self._write_calls()
            self.sessions.append(self.session_key, self.task_id, results)

    def _untrusted(self, call: dict[str, Any], content: str) -> tuple[str, str | None]:
        """Mark external content as data for the model, and run the agent's injection guard.

        Findings are logged and recorded as a ``guard.flagged`` event whatever the
        action; ``warn`` also tells the model, ``block`` withholds the content.
        """
        name = call["function"]["name"]
        target = _arguments_object(call["function"]["arguments"]).get("url", "")
        action = self.agent.settings.injection_guard
        guarded = guard(f"{name} {target}".strip(), content, action)
        if guarded.findings:
            patterns = [f.pattern for f in guarded.findings]
            log.warning(
                "task %s: %s output matches injection patterns %s (injection_guard: %s)",
                self.task_id,
                name,
                ", ".join(patterns),
                action,
            )
            self.events.emit(
                "guard.flagged",
                id=call["id"],
                name=name,
                action=action,
                patterns=patterns,
                excerpts=[f.excerpt for f in guarded.findings],
            )
        return guarded.content, (BLOCKED if guarded.blocked else None)

    def _call_tool_in_thread(
        self, call: dict[str, Any], *, allowed: bool
    ) -> tuple[str, str | None] | ApprovalRequired:
        """``_call_tool`` on a pool thread, which then closes the database connection that
        the policy, the audit log or the effect ledger opened for it: the thread ends."""
        try:
            return self._call_tool(call, allowed=allowed)
        finally:
            self.db.close()

    def _call_tool(
        self, call: dict[str, Any], *, allowed: bool
    ) -> tuple[str, str | None] | ApprovalRequired:
        """The tool message content for one call, and its error code (None on success);
        or the ``ApprovalRequired`` the policy raised, for ``_act`` to park the turn on."""
        name = call["function"]["name"]
        try:
            if not allowed:
                raise ToolError(
                    "budget_exhausted",
                    f"the tool-call budget of this turn ({self.agent.settings.max_tool_calls}) "
                    "is spent",
                )
            tool = get_tool(name, self.agent.settings.tools, self.tools)
            arguments = parse_arguments(tool, call["function"]["arguments"])
            ctx = dataclasses.replace(self.tool_context, call_id=call["id"])
            # Before the ledger: a call that waits for approval has not begun.
            authorize(tool, ctx, arguments)
            if not tool.side_effect:
                return self._output(execute(tool, ctx, arguments)), None
            ledger = self.services.effects
            recorded = ledger.begin(self.task_id, call["id"], name, arguments)
            if recorded is not None:
                if recorded.state == "done":
                    return self._output(recorded.result), None
                raise ToolError(
                    INTERRUPTED,
                    "an earlier attempt of this turn crashed while this call was running, so "
                    "whether it took effect is unknown; it was not run again. Check the "
                    "workspace before retrying it.",
                )
            try:
                result = execute(tool, ctx, arguments)
            except ToolError as exc:
                ledger.finish(self.task_id, call["id"], {"error": exc.code, "message": exc.message})
                raise
            ledger.finish(self.task_id, call["id"], result)
            return self._output(result), None
        except ToolError as exc:
            return _tool_error(exc.code, exc.message), exc.code
        except ApprovalRequired as exc:
            return exc

    def _park(self, waiting: list[tuple[dict[str, Any], ApprovalRequired]]) -> None:
        """Ask a human for each gated call and give the worker slot back until answered.

        The requests, their ``approval.required`` events and ``run.waiting`` commit
        together; the task then parks until the earliest deadline (an answer wakes
        it sooner). The next attempt re-runs this reply's calls: those answered go
        ahead or are refused, the others wait again. Raises ``TaskParked``.
        """
        approvals = self.services.approvals
        if approvals is None:  # pragma: no cover - the hook refuses ask without a store
            raise PermanentTaskError("a tool needs approval and no approval store is set")
        requests = []
        with self.db.transaction():
            for call, asked in waiting:
                arguments = self.services.scrubber.scrub_value(
                    _arguments_object(call["function"]["arguments"])
                )
                request, created = approvals.request(
                    task_id=self.task_id,
                    call_id=call["id"],
                    agent=self.agent.id,
                    session_key=self.session_key,
                    capability=asked.capability,
                    subject=self.services.scrubber.scrub(asked.subject),
                    arguments=arguments,
                    policy_version=asked.policy_version,
                    timeout=asked.timeout,
                )
                requests.append(request)
                if created:
                    self.events.emit(
                        "approval.required",
                        approval_id=request.id,
                        call_id=request.call_id,
                        tool=call["function"]["name"],
                        capability=request.capability,
                        subject=request.subject,
                        arguments=request.arguments,
                        expires_at=request.expires_at,
                    )
            until = min(r.expires_at for r in requests)
            self.events.emit(
                "run.waiting",
                approvals=[r.id for r in requests],
                until=until,
                **self.events.stats(),
            )
        ids = ", ".join(str(r.id) for r in requests)
        raise TaskParked(f"waiting for approval {ids}", until=until)

    def _output(self, result: Any) -> str:
        """A tool's result as the model will read it, secrets redacted inside it first."""
        return _tool_output(self.services.scrubber.scrub_value(result))

    # -- bookkeeping ---------------------------------------------------------

    def _check(self) -> None:
        self.ctx.check()
        if self.clock() > self.deadline:
            raise PermanentTaskError(
                f"the turn ran past task_timeout_seconds "
                f"({self.agent.settings.task_timeout_seconds:g})",
                code="task_timeout",
            )

    def _account(self, record: CallRecord, purpose: str = "turn") -> None:
        """Keep a model call's figures for the next commit (never a commit of its own)."""
        self._calls.append((record, purpose))

    def _account_summary(self, record: CallRecord) -> None:
        self._account(record, purpose="compaction")

    def _write_calls(self) -> None:
        calls, self._calls = self._calls, []
        for record, purpose in calls:
            self.sessions.record_model_call(
                task_id=self.task_id,
                session_key=self.session_key,
                agent_id=self.agent.id,
                model=record.model,
                purpose=purpose,
                outcome=record.outcome,
                prompt_tokens=record.prompt_tokens,
                completion_tokens=record.completion_tokens,
                cost=record.cost,
                latency_ms=record.latency_ms,
            )

    def _failed(self, reason: str, message: str, *, retry: bool) -> None:
        try:
            with self.db.transaction():
                self._write_calls()
                self.events.emit(
                    "run.failed",
                    reason=reason,
                    error=message[:2000],
                    will_retry=retry,
                    **self.events.stats(),
                )
        except Exception:  # the database may be why the run failed: never mask that
            log.exception("could not record run.failed for task %s", self.task_id)


def _earlier_calls(turn: list) -> Counter:
    """(tool, arguments, result) of every call this turn has already completed."""
    asked: dict[str, tuple[str, str]] = {}
    seen: Counter = Counter()
    for stored in turn:
        message = stored.message
        for call in message.get("tool_calls") or ():
            function = call["function"]
            asked[call["id"]] = (function["name"], _canonical(function["arguments"]))
        if stored.role == "tool" and message.get("tool_call_id") in asked:
            name, arguments = asked[message["tool_call_id"]]
            content = message.get("content") or ""
            seen[(name, arguments, _repeated_digest(content) or _digest(content))] += 1
    return seen


def _repeated_digest(content: str) -> str | None:
    """The result a ``repeated_call`` warning stood in for (it counts as that result)."""
    if REPEATED not in content:
        return None
    try:
        data = json.loads(content)
    except ValueError:
        return None
    if isinstance(data, dict) and data.get("error") == REPEATED:
        return data.get("result_digest")
    return None


def _canonical(arguments: Any) -> str:
    try:
        value = json.loads(arguments) if isinstance(arguments, str) else arguments
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError):
        return str(arguments)


def _digest(content: str) -> str:
    return hashlib.sha256(content.encode()).hexdigest()[:16]


def _arguments_object(arguments: Any) -> dict[str, Any]:
    """The call's arguments as an object (they were validated before the policy ran)."""
    value = json.loads(arguments) if isinstance(arguments, str) and arguments.strip() else arguments
    return value if isinstance(value, dict) else {}


def _tool_output(result: Any) -> str:
    if isinstance(result, str):
        return result
    return json.dumps(result, ensure_ascii=False, default=str)


def _tool_error(code: str, message: str) -> str:
    return json.dumps({"error": code, "message": message}, ensure_ascii=False)
