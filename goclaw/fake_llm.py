"""A scripted OpenAI-compatible model server, for tests and offline demos.

It speaks the real wire protocol, so the code under test (LiteLLM, the
``openai`` client) cannot tell it from a provider: JSON replies, SSE token
streaming, tool calls (whole and streamed in fragments), errors in OpenAI's
shape with ``Retry-After``, and slow or stalled streams. What it answers
comes from a script, in order, optionally per model, so a test states
exactly what "the model" does and can read back what it was sent.

Script (YAML or JSON)::

    replies:                      # used in order by any model without its own list
      - content: "Hello!"
      - tool_calls: [{name: read_file, arguments: {path: notes.txt}}]
      - status: 429
        retry_after: 1
      - content: "slow one"
        chunk_delay: 0.2          # seconds between streamed chunks
      - content: "never finishes"
        stall_after: 2            # stream 2 chunks, then hang
    models:
      backup: [{content: "from the fallback"}]
    repeat_last: false            # when a list runs out: repeat its last reply, or 500
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from goclaw.errors import ConfigError

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


@dataclasses.dataclass(frozen=True)
class Reply:
    content: str = ""
    tool_calls: tuple[dict[str, Any], ...] = ()
    status: int = 200
    retry_after: float | None = None
    error: str | None = None
    #: Characters per streamed content chunk.
    chunk_size: int = 4
    #: Seconds before the response starts, and between streamed chunks.
    delay: float = 0.0
    chunk_delay: float = 0.0
    #: Stream this many chunks, then hang until the client gives up.
    stall_after: int | None = None

    @classmethod
    def from_mapping(cls, where: str, data: Any) -> Reply:
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: a reply must be a mapping, got {type(data).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(fields)})")
        values = dict(data)
        calls = values.get("tool_calls") or ()
        if not isinstance(calls, list | tuple) or not all(
            isinstance(c, Mapping) and isinstance(c.get("name"), str) for c in calls
        ):
            raise ConfigError(f"{where}.tool_calls: a list of {{name, arguments}} mappings")
        values["tool_calls"] = tuple(dict(c) for c in calls)
        status = values.get("status", 200)
        if not isinstance(status, int) or not 200 <= status <= 599:
            raise ConfigError(f"{where}.status: an HTTP status code, got {status!r}")
        if int(values.get("chunk_size", 4)) < 1:
            raise ConfigError(f"{where}.chunk_size: must be at least 1")
        return cls(**values)


class Script:
    """Replies handed out in order, per model where the script says so."""

    def __init__(
        self,
        replies: list[Reply],
        models: dict[str, list[Reply]] | None = None,
        repeat_last: bool = False,
    ) -> None:
        self._queues = {None: list(replies), **{m: list(r) for m, r in (models or {}).items()}}
        self._last: dict[str | None, Reply] = {}
        self.repeat_last = repeat_last
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: str | Path) -> Script:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read the script: {exc}") from exc
        return cls.from_data(data, str(path))

    @classmethod
    def from_data(cls, data: Any, where: str = "script") -> Script:
        if isinstance(data, list):
            data = {"replies": data}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: must be a mapping with 'replies'")
        unknown = sorted(set(data) - {"replies", "models", "repeat_last"})
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r}")
        replies = [
            Reply.from_mapping(f"{where}.replies[{i}]", r)
            for i, r in enumerate(data.get("replies") or [])
        ]
        models = {
            name: [Reply.from_mapping(f"{where}.models.{name}[{i}]", r) for i, r in enumerate(rs)]
            for name, rs in (data.get("models") or {}).items()
        }
        return cls(replies, models, bool(data.get("repeat_last", False)))

    def next_for(self, model: str) -> Reply | None:
        key = model if model in self._queues else None
        with self._lock:
            queue = self._queues[key]
            if queue:
                self._last[key] = queue.pop(0)
                return self._last[key]
            return self._last.get(key) if self.repeat_last else None


class FakeLLM:
    """The server: an aiohttp app plus a record of every request it was sent."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[dict[str, Any]] = []
        self._ids = itertools.count(1)
        self.app = web.Application(client_max_size=8 * 1024 * 1024)
        self.app.router.add_post("/v1/chat/completions", self.chat_completions)
        self.app.router.add_get("/v1/models", self.models)
        self.app.router.add_get("/_fake/requests", self.recorded)

    async def models(self, request: web.Request) -> web.Response:
        names = sorted(m for m in self.script._queues if m) or ["fake-model"]
        return web.json_response(
            {
                "object": "list",
                "data": [{"id": n, "object": "model", "owned_by": "fake"} for n in names],
            }
        )

    async def recorded(self, request: web.Request) -> web.Response:
        return web.json_response(self.requests)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "request body is not valid JSON")
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return _error(400, "'messages' must be a list")
        self.requests.append(body)
        model = str(body.get("model", ""))
        reply = self.script.next_for(model)
        if reply is None:
            return _error(500, f"the fake model's script has no reply left for {model!r}")
        if reply.delay:
            await asyncio.sleep(reply.delay)
        if reply.status != 200:
            headers = {}
            if reply.retry_after is not None:
                headers["Retry-After"] = f"{reply.retry_after:g}"
            return _error(reply.status, reply.error or f"scripted {reply.status}", headers)
        completion_id = f"chatcmpl-fake-{next(self._ids)}"
        if body.get("stream"):
            return await self._stream(request, body, reply, completion_id, model)
        return web.json_response(_completion(body, reply, completion_id, model))

    async def _stream(
        self, request: web.Request, body: dict, reply: Reply, cid: str, model: str
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        created = int(time.time())

        def chunk(delta: dict, finish: str | None = None) -> dict:
            return {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }

        events = [chunk({"role": "assistant", "content": ""})]
        text = reply.content
        events += [
            chunk({"content": text[i : i + reply.chunk_size]})
            for i in range(0, len(text), reply.chunk_size)
        ]
        for index, call in enumerate(reply.tool_calls):
            arguments = _arguments(call)
            events.append(
                chunk(
                    {
                        "tool_calls": [
                            {
                                "index": index,
                                "id": call.get("id") or f"call_{cid[-6:]}_{index}",
                                "type": "function",
                                "function": {"name": call["name"], "arguments": ""},
                            }
                        ]
                    }
                )
            )
            half = len(arguments) // 2  # arguments arrive in fragments, as from real providers
            for part in (arguments[:half], arguments[half:]):
                if part:
                    events.append(
                        chunk({"tool_calls": [{"index": index, "function": {"arguments": part}}]})
                    )
        events.append(chunk({}, "tool_calls" if reply.tool_calls else "stop"))
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append({**chunk({}), "choices": [], "usage": _usage(body, reply)})
        for n, event in enumerate(events):
            if reply.stall_after is not None and n > reply.stall_after:  # n=0 is the role
                await asyncio.sleep(3600)  # hang; the client's timeout ends it
            await response.write(f"data: {json.dumps(event)}\n\n".encode())
            if reply.chunk_delay:
                await asyncio.sleep(reply.chunk_delay)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    @contextlib.contextmanager
    def running(self, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
        """Serve from a background thread; yields the base URL (``http://…/v1``)."""
        with serve_in_thread(self.app, host, port) as origin:
            yield f"{origin}/v1"


@contextlib.contextmanager
def serve_in_thread(app: web.Application, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run ``app`` on its own event loop in a daemon thread; yields ``http://HOST:PORT``.

    Port 0 lets the OS choose. Tests use it for any aiohttp app they serve
    over real loopback HTTP; everything is torn down on exit.
    """
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    address: list[str] = []

    async def start() -> None:
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = site._server.sockets[0].getsockname()  # port 0: the one the OS chose
        address.append(f"http://{bound[0]}:{bound[1]}")

    thread = threading.Thread(target=loop.run_forever, name="serve-in-thread", daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(10)

    async def stop() -> None:
        await runner.cleanup()
        # Handlers still running (a WebSocket whose client never closed it) end here, not
        # as "Task was destroyed but it is pending" when the closed loop is collected.
        rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in rest:
            task.cancel()
        await asyncio.gather(*rest, return_exceptions=True)

    try:
        yield address[0]
    finally:
        asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def serve(script: Script, host: str, port: int) -> None:
    """Run in the foreground until interrupted (``goclaw dev fake-llm``)."""
    web.run_app(FakeLLM(script).app, host=host, port=port, print=None)


def _completion(body: dict, reply: Reply, cid: str, model: str) -> dict:
    message: dict[str, Any] = {"role": "assistant", "content": reply.content or None}
    if reply.tool_calls:
        message["tool_calls"] = [
            {
                "id": call.get("id") or f"call_{cid[-6:]}_{i}",
                "type": "function",
                "function": {"name": call["name"], "arguments": _arguments(call)},
            }
            for i, call in enumerate(reply.tool_calls)
        ]
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": "tool_calls" if reply.tool_calls else "stop",
            }
        ],
        "usage": _usage(body, reply),
    }


def _arguments(call: Mapping[str, Any]) -> str:
    arguments = call.get("arguments", {})
    return arguments if isinstance(arguments, str) else json.dumps(arguments)


def _usage(body: dict, reply: Reply) -> dict[str, int]:
    """Rough token counts (4 characters a token), enough for cost accounting tests."""
    prompt = sum(len(str(m.get("content") or "")) for m in body["messages"]) // 4 + 1
    completion = (len(reply.content) + sum(len(_arguments(c)) for c in reply.tool_calls)) // 4 + 1
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> web.Response:
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return web.json_response(
        {"error": {"message": message, "type": kind, "param": None, "code": str(status)}},
        status=status,
        headers=dict(headers or {}),
    )
