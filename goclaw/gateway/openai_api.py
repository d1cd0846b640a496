"""The OpenAI-compatible API: ``POST /v1/chat/completions`` and ``GET /v1/models``.

Any OpenAI client can talk to a goclaw agent. The request becomes a durable
agent turn (``model: "agent:<id>"``); the reply is the worker's, streamed as
server-sent events from its ``chunk`` events (``stream: true``) or returned
whole when the turn ends. The gateway itself never calls a model.

Sessions: the agent keeps the conversation, so only the *last* user message
of ``messages`` is the new turn; earlier messages are the client's copy of a
history goclaw already has. ``X-Goclaw-Session`` (or else ``user``) names
the session; with neither, each request starts a new one, whose key comes
back in the ``X-Goclaw-Session`` response header. Sampling parameters
(``temperature``, ``max_tokens``, …) belong to the agent's config and are
ignored; ``n > 1`` and client-side ``tools`` are refused.

A client that disconnects does not cancel its turn: the work was accepted
and finishes, and its result stays in the session. Send
``X-Goclaw-Cancel-On-Disconnect: true`` to cancel it instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

from aiohttp import web

from goclaw import event_log
from goclaw.agent.definitions import UnknownAgent
from goclaw.agent.sessions import SessionStore, Usage
from goclaw.agent.turns import check_session_key
from goclaw.config import DEFAULT_AGENT_ID
from goclaw.errors import IllegalTransition
from goclaw.gateway import access, client_json
from goclaw.gateway.chat import QueueSaturated, queue_turn
from goclaw.gateway.limits import client_keys, retry_after_header
from goclaw.gateway.pump import Encoded, Subscription
from goclaw.gateway.responses import openai_error
from goclaw.gateway.state import STATE, GatewayState
from goclaw.records import Task
from goclaw.states import TERMINAL, TaskState

MODEL_PREFIX = "agent:"
SESSION_HEADER = "X-Goclaw-Session"
TASK_HEADER = "X-Goclaw-Task-Id"
CANCEL_HEADER = "X-Goclaw-Cancel-On-Disconnect"
#: Events buffered per request before it falls back to reading from the database.
FOLLOW_BUFFER = 256
#: How often a waiting non-streaming request checks that its client is still there.
DISCONNECT_CHECK_SECONDS = 0.5
TRUE_WORDS = {"1", "true", "yes", "on"}


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


async def _denied(request: web.Request, capability: str) -> web.Response | None:
    """The policy's no to this route as OpenAI's 403 (None: allowed, and audited)."""
    try:
        await access.authorize(
            request.app[STATE],
            capability,
            f"{request.method} {request.path}",
            client_keys(request)[1],
        )
    except access.AccessDenied as exc:
        return openai_error(403, str(exc), "permission_error", code="policy_denied")
    return None


async def list_models(request: web.Request) -> web.Response:
    if (denied := await _denied(request, access.READ)) is not None:
        return denied
    catalog = request.app[STATE].agents.current()
    return web.json_response(
        {
            "object": "list",
            "data": [
                {
                    "id": f"{MODEL_PREFIX}{agent_id}",
                    "object": "model",
                    "created": 0,
                    "owned_by": "goclaw",
                }
                for agent_id in sorted(catalog.agents)
            ],
        }
    )


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    if (denied := await _denied(request, access.MUTATE)) is not None:
        return denied
    try:
        body = await _read_body(request, state)
        agent_id, prompt, session, stream = _parse(body, request)
        agent = state.agents.current().get(agent_id)
        submitted, session = await queue_turn(
            state, agent, prompt, session=session, idempotency_key=None
        )
    except BadRequest as exc:
        return openai_error(400, str(exc), "invalid_request_error", param=exc.param, code=exc.code)
    except UnknownAgent as exc:
        return openai_error(
            404, str(exc), "invalid_request_error", param="model", code="model_not_found"
        )
    except QueueSaturated as exc:
        return openai_error(
            429,
            str(exc),
            "rate_limit_exceeded",
            code="queue_saturated",
            headers={"Retry-After": retry_after_header(exc.retry_after)},
        )
    turn = _Turn(state, request, submitted.task_id, session, str(body["model"]))
    if stream:
        return await turn.stream(include_usage=_include_usage(body))
    return await turn.complete()


async def _read_body(request: web.Request, state: GatewayState) -> dict[str, Any]:
    limit = state.settings.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise BadRequest(f"request body is over gateway.max_body_bytes ({limit:,} bytes)")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise BadRequest(f"request body is over gateway.max_body_bytes ({limit:,} bytes)") from None
    try:
        body = client_json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}"[:300]) from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    if not client_json.storable(body):
        raise BadRequest("strings must not contain NUL or unpaired UTF-16 surrogates")
    return body


def _parse(body: dict[str, Any], request: web.Request) -> tuple[str, str, str | None, bool]:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("model is required: 'agent:<id>'", "model")
    agent_id = model.removeprefix(MODEL_PREFIX) or DEFAULT_AGENT_ID
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty array", "messages")
    prompt = None
    for message in reversed(messages):
        if not isinstance(message, dict):
            raise BadRequest("each message must be an object", "messages")
        if message.get("role") == "user":
            prompt = _text_of(message.get("content"))
            break
    if not prompt or not prompt.strip():
        raise BadRequest("messages must end with a user message that has text", "messages")
    if body.get("n", 1) != 1:
        raise BadRequest("n must be 1: an agent gives one reply per turn", "n")
    if body.get("tools") or body.get("functions"):
        raise BadRequest(
            "tools are the agent's own (config.yaml); a request cannot add them", "tools"
        )
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("stream must be a boolean", "stream")
    session = request.headers.get(SESSION_HEADER) or body.get("user") or None
    if session is not None:
        if not isinstance(session, str):
            raise BadRequest("user must be a string", "user")
        try:
            check_session_key(session)
        except ValueError as exc:
            raise BadRequest(str(exc), "user") from None
    return agent_id, prompt, session, stream


def _text_of(content: Any) -> str | None:
    """A message's text: a string, or the text parts of a content array."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        text = "\n".join(p for p in parts if isinstance(p, str))
        return text or None
    return None


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


class _QueueSink:
    """A bounded per-request buffer; on overflow the request re-reads from its cursor."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Encoded] = asyncio.Queue(FOLLOW_BUFFER)

    def room(self) -> int:
        return FOLLOW_BUFFER - self.queue.qsize()

    def offer(self, subscription: Subscription, item: Encoded) -> None:
        self.queue.put_nowait(item)

    async def put(self, subscription: Subscription, item: Encoded) -> None:
        await self.queue.put(item)


class _Turn:
    """Following one queued turn for one HTTP request."""

    def __init__(
        self, state: GatewayState, request: web.Request, task_id: int, session: str, model: str
    ) -> None:
        self.state = state
        self.request = request
        self.task_id = task_id
        self.session = session
        self.model = model
        self.id = f"chatcmpl-goclaw-{task_id}"
        self.created = int(time.time())
        self.cancel_on_disconnect = (
            request.headers.get(CANCEL_HEADER, "").strip().lower() in TRUE_WORDS
        )
        self.sink = _QueueSink()
        self._sub: Subscription | None = None
        self._attach: asyncio.Task | None = None
        self._reply_index: int | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {SESSION_HEADER: self.session, TASK_HEADER: str(self.task_id)}

    # -- following ---------------------------------------------------------------

    def _follow(self, after: int = 0) -> None:
        stream = event_log.Stream(session_key=self.session, task_id=self.task_id)
        self._sub = Subscription(
            f"http-{self.task_id}", stream, self.sink, on_overflow=self._resync
        )
        self._attach = self.state.pump.start_subscription(self._sub, after)

    def _resync(self, sub: Subscription) -> None:
        """Too slow a reader: drop the live feed and replay from where it stood."""
        self.state.pump.unsubscribe(sub)
        self._follow(sub.position)

    def _stop(self) -> None:
        if self._sub is not None:
            self.state.pump.unsubscribe(self._sub)
        if self._attach is not None and not self._attach.done():
            self._attach.cancel()

    async def _events(self):
        """This turn's events, until its task reaches a final state."""
        self._follow()
        try:
            while True:
                try:
                    item = await asyncio.wait_for(self.sink.queue.get(), DISCONNECT_CHECK_SECONDS)
                except TimeoutError:
                    if self._client_gone():
                        raise ConnectionResetError("the client disconnected") from None
                    continue
                yield item
                if item.event.to_state and TaskState(item.event.to_state) in TERMINAL:
                    return
        finally:
            self._stop()

    def _client_gone(self) -> bool:
        transport = self.request.transport
        return transport is None or transport.is_closing()

    def _text(self, item: Encoded) -> str:
        data = item.event.data or {}
        text = str(data.get("delta", ""))
        reply = data.get("reply")
        if self._reply_index is not None and reply != self._reply_index:
            text = "\n" + text
        self._reply_index = reply
        return text

    async def _disconnected(self) -> None:
        if self.cancel_on_disconnect:
            with contextlib.suppress(IllegalTransition):  # it already ended
                await self.state.db(
                    self.state.broker.cancel, self.task_id, reason="client disconnected"
                )

    async def _outcome(self) -> tuple[Task, Usage]:
        def read() -> tuple[Task, Usage]:
            task = self.state.broker.get(self.task_id)
            usage = SessionStore(self.state.broker.db).usage(task_id=self.task_id)
            return task, usage

        return await self.state.db(read)

    def _usage(self, usage: Usage) -> dict[str, int]:
        return {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        }

    # -- the two response shapes ----------------------------------------------------

    async def complete(self) -> web.StreamResponse:
        try:
            async for _ in self._events():
                pass
        except ConnectionResetError:
            await self._disconnected()
            raise
        task, usage = await self._outcome()
        if task.state is not TaskState.SUCCEEDED:
            return self._failed(task)
        result = json.loads(task.result) if task.result else {}
        reply = result.get("reply") if isinstance(result, dict) else None
        return web.json_response(
            {
                "id": self.id,
                "object": "chat.completion",
                "created": self.created,
                "model": self.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": reply or ""},
                        "finish_reason": "stop",
                    }
                ],
                "usage": self._usage(usage),
            },
            headers=self.headers,
        )

    def _failed(self, task: Task) -> web.Response:
        return openai_error(
            502 if task.state is not TaskState.CANCELED else 409,
            f"the turn ended {task.state.value}: {task.last_error or task.reason or ''}".strip(),
            "server_error" if task.state is not TaskState.CANCELED else "canceled",
            code=task.reason or task.state.value.lower(),
            headers=self.headers,
        )

    async def stream(self, *, include_usage: bool) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                **self.headers,
            }
        )
        await response.prepare(self.request)
        try:
            await self._send(response, {"role": "assistant", "content": ""})
            async for item in self._events():
                if item.event.type == "chunk":
                    await self._send(response, {"content": self._text(item)})
            task, usage = await self._outcome()
            if task.state is TaskState.SUCCEEDED:
                await self._send(response, {}, finish_reason="stop")
                if include_usage:
                    await self._data(response, {**self._chunk([]), "usage": self._usage(usage)})
                await response.write(b"data: [DONE]\n\n")
            else:
                error = {
                    "message": f"the turn ended {task.state.value}: {task.last_error or ''}",
                    "type": "server_error",
                    "code": task.reason or task.state.value.lower(),
                }
                await self._data(response, {"error": error})
            await response.write_eof()
        except (ConnectionResetError, ConnectionError):
            await self._disconnected()
        return response

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    async def _send(
        self, response: web.StreamResponse, delta: dict[str, Any], finish_reason: str | None = None
    ) -> None:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        await self._data(response, self._chunk([choice]))

    async def _data(self, response: web.StreamResponse, payload: dict[str, Any]) -> None:
        text = json.dumps(payload, separators=(",", ":"))
        await response.write(f"data: {text}\n\n".encode())
