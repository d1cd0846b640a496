"""Model calls through ``litellm.Router``, with failover we can see and explain.

An agent names a chain of models: its ``model`` and then its ``fallbacks``.
Each is one Router deployment. A request goes to the first deployment whose
circuit is closed; on a 429, a 5xx, a timeout or a connection error that
deployment's circuit opens for ``Retry-After`` seconds (or the model's
``cooldown_seconds``) and the request moves to the next one, with a
``provider.failover`` event naming from, to and why. An authentication
error takes the deployment out until its configuration (base URL, key)
changes. A bad request is not retried anywhere, and a context overflow is
raised to the caller, which compacts the history instead.

The chain is walked here rather than by the Router's own ``fallbacks`` so
that every hop is an event, and so a cooldown honours ``Retry-After``
exactly. When every deployment is cooling down the call waits for the
first to reopen if that fits the run's deadline, and otherwise raises a
retryable error: the broker's backoff takes over and no worker slot waits.

LiteLLM is imported here and only here, lazily: importing it costs seconds
and 170 MB, which the gateway and the CLI must not pay.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import email.utils
import hashlib
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from goclaw.agent.definitions import AgentDefinition
from goclaw.config import ModelSettings
from goclaw.errors import GoclawError

log = logging.getLogger(__name__)

#: Longest a call waits inline for a Retry-After to end before handing back to the broker.
MAX_INLINE_WAIT_SECONDS = 10.0
#: Longest cooldown a Retry-After header can impose (a hostile or broken value is capped).
MAX_RETRY_AFTER_SECONDS = 600.0
#: Marks, in a call's set of tried deployments, that it has used its one inline wait.
WAITED = "<waited>"
#: Context window assumed for a model LiteLLM's map does not know and the config does not set.
DEFAULT_CONTEXT_WINDOW = 8192


class ModelError(GoclawError):
    """A model call failed for a reason the caller must act on."""

    #: Retrying the task later may succeed.
    retryable = False

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class ContextOverflow(ModelError):
    """The request does not fit the model's context window: compact, do not fail over."""


class ModelsUnavailable(ModelError):
    """Every deployment in the chain is cooling down or failed: try the task again later."""

    retryable = True


@dataclasses.dataclass(frozen=True)
class Failure:
    """How a provider error is handled: its reason code, and the cooldown it asks for."""

    reason: str
    failover: bool
    retry_after: float | None = None
    status: int | None = None
    message: str = ""


@dataclasses.dataclass
class ModelReply:
    model: str
    content: str
    tool_calls: list[dict[str, Any]]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    latency_ms: float = 0.0

    def message(self) -> dict[str, Any]:
        """The reply as an OpenAI assistant message, as history stores it."""
        message: dict[str, Any] = {"role": "assistant", "content": self.content or None}
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        return message


@dataclasses.dataclass(frozen=True)
class CallRecord:
    """One request to one deployment, for accounting (``model_calls``)."""

    model: str
    outcome: str  # ok | a Failure.reason
    prompt_tokens: int
    completion_tokens: int
    cost: float
    latency_ms: float


@dataclasses.dataclass
class CallHooks:
    """How a call reports what happens while it runs (events, accounting, cancellation)."""

    on_delta: Callable[[str, int], None] = lambda delta, reply: None
    on_failover: Callable[[dict[str, Any]], None] = lambda event: None
    on_call: Callable[[CallRecord], None] = lambda record: None
    #: Raises to abandon the call (cancellation, lost lease).
    check: Callable[[], None] = lambda: None
    #: Numbers each model reply attempt of a run, so clients can tell partial replies apart.
    replies: Iterator[int] = dataclasses.field(default_factory=itertools.count)


class CircuitBreaker:
    """Per-deployment cooldowns and exclusions, shared by every run in a process.

    A cooldown set by a provider's ``Retry-After`` is strict: the deployment
    is not asked again before it ends. One set by our own estimate
    (``cooldown_seconds``) only moves the deployment behind healthy ones; it
    is still probed when nothing healthy is left.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._open_until: dict[str, tuple[float, bool]] = {}
        self._disabled: dict[str, str] = {}
        self._lock = threading.Lock()

    def state(self, key: str) -> tuple[str, float]:
        """``ok``, ``cooling`` or ``retry_after`` with the seconds left, or ``disabled``."""
        with self._lock:
            if key in self._disabled:
                return "disabled", 0.0
            until, strict = self._open_until.get(key, (0.0, False))
            left = until - self.clock()
            if left <= 0:
                return "ok", 0.0
            return ("retry_after" if strict else "cooling"), left

    def trip(self, key: str, seconds: float, *, strict: bool = False) -> None:
        with self._lock:
            self._open_until[key] = (self.clock() + seconds, strict)

    def disable(self, key: str, why: str) -> None:
        with self._lock:
            self._disabled[key] = why

    def reset(self, key: str) -> None:
        with self._lock:
            self._open_until.pop(key, None)

    def why_disabled(self, key: str) -> str:
        with self._lock:
            return self._disabled.get(key, "")


@dataclasses.dataclass(frozen=True)
class Deployment:
    model: str
    settings: ModelSettings
    api_key: str | None
    #: Identity for the circuit breaker: changes when the model's connection settings do.
    key: str
    #: Why it cannot be used at all (a key variable that is not set), or "".
    unusable: str = ""


class ModelRouter:
    """Calls an agent's model chain through ``litellm.Router`` with explicit failover."""

    def __init__(
        self,
        *,
        env: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.env = os.environ if env is None else env
        self.clock = clock
        self.sleep = sleep
        self.breaker = CircuitBreaker(clock)
        self._routers: dict[str, Any] = {}
        self._windows: dict[str, int] = {}
        self._lock = threading.Lock()

    # -- public --------------------------------------------------------------

    def complete(
        self,
        agent: AgentDefinition,
        messages: Sequence[dict[str, Any]],
        *,
        tools: Sequence[dict[str, Any]] = (),
        hooks: CallHooks | None = None,
        deadline: float | None = None,
        stream: bool = True,
    ) -> ModelReply:
        """One model reply for ``messages``, from the first deployment that can give it.

        Each deployment is tried at most once per call, so a call is bounded
        by the chain's length: closed circuits first, in chain order; then
        deployments cooling down on our own estimate (a half-open probe);
        then, after one short wait, those whose ``Retry-After`` ends soon.
        """
        hooks = hooks or CallHooks()
        deployments = [self.deployment(agent, model) for model in agent.models]
        router = self._router(deployments)
        tried: set[str] = set()
        last: Failure | None = None
        while (dep := self._pick(deployments, tried, deadline, hooks)) is not None:
            tried.add(dep.key)
            hooks.check()
            started = self.clock()
            reply_index = next(hooks.replies)
            emitted = [False]
            try:
                reply = self._call(
                    router,
                    agent,
                    dep,
                    messages,
                    tools,
                    hooks,
                    self._timeout(dep, deadline),
                    stream,
                    reply_index,
                    emitted,
                )
            except Exception as exc:
                if isinstance(exc, GoclawError) or not _from_provider(exc):
                    raise
                last = classify(exc)
                hooks.on_call(CallRecord(dep.model, last.reason, 0, 0, 0.0, self._ms(started)))
                self._after_failure(dep, last)
                if not last.failover:
                    if last.reason == "context_overflow":
                        raise ContextOverflow(last.reason, last.message) from exc
                    raise ModelError(last.reason, last.message) from exc
                following = self._pick(deployments, tried, deadline, hooks, dry_run=True)
                log.warning(
                    "model %s failed (%s: %s); %s",
                    dep.model,
                    last.reason,
                    last.message[:200],
                    f"failing over to {following.model}" if following else "no fallback left",
                )
                if following is not None:
                    hooks.on_failover(
                        {
                            "from": dep.model,
                            "to": following.model,
                            "reason": last.reason,
                            "status": last.status,
                            "retry_after": last.retry_after,
                            "partial": emitted[0],
                            "error": last.message[:500],
                        }
                    )
                continue
            self.breaker.reset(dep.key)
            reply.latency_ms = self._ms(started)
            hooks.on_call(
                CallRecord(
                    dep.model,
                    "ok",
                    reply.prompt_tokens,
                    reply.completion_tokens,
                    reply.cost,
                    reply.latency_ms,
                )
            )
            return reply
        raise self._unavailable(deployments, last)

    def deployment(self, agent: AgentDefinition, model: str) -> Deployment:
        settings = agent.model_settings.get(model) or ModelSettings()
        api_key: str | None = None
        unusable = ""
        if settings.api_key_env:
            api_key = self.env.get(settings.api_key_env) or None
            if api_key is None:
                unusable = f"the environment variable {settings.api_key_env} is not set"
        elif settings.api_base:
            api_key = "goclaw-no-key"  # a local server: the SDK insists on some key
        fingerprint = hashlib.sha256(
            repr((model, settings.api_base, api_key)).encode()
        ).hexdigest()[:16]
        return Deployment(model, settings, api_key, f"{model}#{fingerprint}", unusable)

    def context_window(self, agent: AgentDefinition, model: str | None = None) -> int:
        """Tokens the model accepts: configured, else LiteLLM's offline map, else a default."""
        model = model or agent.models[0]
        settings = agent.model_settings.get(model) or ModelSettings()
        if settings.context_window:
            return settings.context_window
        if model not in self._windows:
            self._windows[model] = self._known_window(model)
        return self._windows[model]

    def _known_window(self, model: str) -> int:
        if model.startswith("local/"):
            from goclaw.agent.local_model import local_context_window

            return local_context_window(model) or DEFAULT_CONTEXT_WINDOW
        litellm = import_litellm()
        try:
            info = litellm.get_model_info(model)
        except Exception:
            return DEFAULT_CONTEXT_WINDOW
        return int(info.get("max_input_tokens") or info.get("max_tokens") or DEFAULT_CONTEXT_WINDOW)

    def count_tokens(
        self, model: str, messages: Sequence[dict[str, Any]], tools: Sequence[dict] = ()
    ) -> int:
        litellm = import_litellm()
        try:
            return int(
                litellm.token_counter(
                    model=model, messages=list(messages), tools=list(tools) or None
                )
            )
        except Exception:  # an unknown model or message shape: estimate, never fail the run
            text = sum(len(str(m.get("content") or "")) for m in messages)
            return text // 4 + 4 * len(messages)

    # -- internals -----------------------------------------------------------

    def _pick(
        self,
        deployments: list[Deployment],
        tried: set[str],
        deadline: float | None,
        hooks: CallHooks,
        *,
        dry_run: bool = False,
    ) -> Deployment | None:
        """The next deployment to try in this call, or None when none is left."""
        left = [d for d in deployments if d.key not in tried and not d.unusable]
        states = {d.key: self.breaker.state(d.key) for d in left}
        for wanted in ("ok", "cooling"):
            for dep in left:
                if states[dep.key][0] == wanted:
                    return dep
        # Only Retry-After cooldowns are left. Wait once per call for the
        # soonest, if it ends soon enough, and try it (again) after that.
        if WAITED in tried:
            return None
        room = MAX_INLINE_WAIT_SECONDS if deadline is None else deadline - self.clock()
        waiting = []
        for i, dep in enumerate(deployments):
            state, seconds = self.breaker.state(dep.key)
            if state == "retry_after" and seconds <= min(room, MAX_INLINE_WAIT_SECONDS):
                waiting.append((seconds, i, dep))
        if not waiting:
            return None
        wait, _, dep = min(waiting)
        if not dry_run:
            end = self.clock() + wait
            while (remaining := end - self.clock()) > 0:
                hooks.check()
                self.sleep(min(remaining, 0.1))
            tried.discard(dep.key)
            tried.add(WAITED)
        return dep

    def _after_failure(self, dep: Deployment, failure: Failure) -> None:
        if failure.reason == "auth_error":
            self.breaker.disable(dep.key, failure.message)
        elif failure.failover:
            if failure.retry_after is not None:
                seconds = min(failure.retry_after, MAX_RETRY_AFTER_SECONDS)
                self.breaker.trip(dep.key, seconds, strict=True)
            else:
                self.breaker.trip(dep.key, dep.settings.cooldown_seconds)

    def _unavailable(self, deployments: list[Deployment], last: Failure | None) -> ModelError:
        """Why no deployment could answer: retryable unless only configuration can fix it."""
        reasons = []
        retryable = False
        for dep in deployments:
            if dep.unusable:
                reasons.append(f"{dep.model}: {dep.unusable}")
                continue
            state, left = self.breaker.state(dep.key)
            if state == "disabled":
                reasons.append(f"{dep.model}: disabled ({self.breaker.why_disabled(dep.key)})")
            else:
                retryable = True
                reasons.append(
                    f"{dep.model}: {last.reason if last else state}"
                    + (f", retry after {left:.1f}s" if state == "retry_after" else "")
                )
        summary = "; ".join(reasons)
        if not retryable:
            return ModelError(
                "no_model_available", f"no usable model until the configuration changes ({summary})"
            )
        return ModelsUnavailable(
            last.reason if last else "unavailable", f"no model answered ({summary})"
        )

    def _timeout(self, dep: Deployment, deadline: float | None) -> float:
        timeout = dep.settings.timeout_seconds
        if deadline is not None:
            timeout = min(timeout, max(deadline - self.clock(), 0.5))
        return timeout

    def _ms(self, started: float) -> float:
        return round((self.clock() - started) * 1000, 3)

    def _router(self, deployments: list[Deployment]) -> Any:
        key = "|".join(d.key for d in deployments)
        with self._lock:
            router = self._routers.get(key)
            if router is None:
                if any(d.model.startswith("local/") for d in deployments):
                    from goclaw.agent.local_model import install_local_provider

                    install_local_provider()
                litellm = import_litellm()
                router = litellm.Router(
                    model_list=[_model_entry(d) for d in deployments],
                    num_retries=0,
                    # Cooldowns are ours (CircuitBreaker): Retry-After exact, events per hop.
                    disable_cooldowns=True,
                )
                self._routers[key] = router
            return router

    def _call(
        self,
        router: Any,
        agent: AgentDefinition,
        dep: Deployment,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[dict[str, Any]],
        hooks: CallHooks,
        timeout: float,
        stream: bool,
        reply_index: int,
        emitted: list[bool],
    ) -> ModelReply:
        """One request, run on this thread's own event loop.

        ``Router.completion`` (sync) starts a new event loop for every call;
        ``acompletion`` on a loop kept per thread costs half the time of even a
        plain ``litellm.completion`` (measured: 17 ms vs 28 ms for the same
        streamed reply). Hooks run inside the coroutine: the loop serves this
        thread only, so their blocking database writes stall nobody else.
        """
        params: dict[str, Any] = {"timeout": timeout}
        if tools:
            params["tools"] = list(tools)
        if agent.settings.temperature is not None:
            params["temperature"] = agent.settings.temperature
        if agent.settings.max_output_tokens is not None:
            params["max_tokens"] = agent.settings.max_output_tokens
        request = self._stream if stream else self._complete
        coroutine = request(router, dep, list(messages), params, hooks, reply_index, emitted)
        return _thread_loop().run_until_complete(coroutine)

    async def _complete(
        self,
        router: Any,
        dep: Deployment,
        messages: list[dict[str, Any]],
        params: dict[str, Any],
        hooks: CallHooks,
        reply_index: int,
        emitted: list[bool],
    ) -> ModelReply:
        response = await router.acompletion(model=dep.key, messages=messages, **params)
        choice = response.choices[0].message
        calls = [
            _tool_call(c.id, c.function.name, c.function.arguments)
            for c in (choice.tool_calls or [])
        ]
        return self._reply(dep, choice.content or "", calls, getattr(response, "usage", None))

    async def _stream(
        self,
        router: Any,
        dep: Deployment,
        messages: list[dict[str, Any]],
        params: dict[str, Any],
        hooks: CallHooks,
        reply_index: int,
        emitted: list[bool],
    ) -> ModelReply:
        response = await router.acompletion(
            model=dep.key,
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
            **params,
        )
        text: list[str] = []
        calls: dict[int, dict[str, Any]] = {}
        usage = None
        try:
            async for chunk in response:
                hooks.check()
                usage = getattr(chunk, "usage", None) or usage
                if not chunk.choices:
                    continue
                delta = chunk.choices[0].delta
                if delta.content:
                    text.append(delta.content)
                    emitted[0] = True
                    hooks.on_delta(delta.content, reply_index)
                for part in delta.tool_calls or []:
                    slot = calls.setdefault(
                        part.index or 0, {"id": None, "name": "", "arguments": ""}
                    )
                    if part.id:
                        slot["id"] = part.id
                    if part.function is not None:
                        slot["name"] += part.function.name or ""
                        slot["arguments"] += part.function.arguments or ""
        finally:
            close = getattr(response, "aclose", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    await close()
        finished = [
            _tool_call(c["id"] or f"call_{reply_index}_{i}", c["name"], c["arguments"])
            for i, c in sorted(calls.items())
        ]
        return self._reply(dep, "".join(text), finished, usage)

    def _reply(
        self, dep: Deployment, content: str, calls: list[dict[str, Any]], usage: Any
    ) -> ModelReply:
        prompt = int(getattr(usage, "prompt_tokens", 0) or 0)
        completion = int(getattr(usage, "completion_tokens", 0) or 0)
        return ModelReply(
            dep.model, content, calls, prompt, completion, cost(dep, prompt, completion)
        )


def cost(dep: Deployment, prompt_tokens: int, completion_tokens: int) -> float:
    """Dollars for a call: the configured prices, else LiteLLM's offline map, else 0."""
    settings = dep.settings
    if settings.input_cost_per_token is not None or settings.output_cost_per_token is not None:
        return prompt_tokens * (settings.input_cost_per_token or 0.0) + completion_tokens * (
            settings.output_cost_per_token or 0.0
        )
    try:
        prompt_cost, completion_cost = import_litellm().cost_per_token(
            model=dep.model, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens
        )
    except Exception:  # not in the map (local models, private deployments)
        return 0.0
    return float(prompt_cost) + float(completion_cost)


def classify(exc: BaseException) -> Failure:
    """Map a LiteLLM/OpenAI exception onto goclaw's failover rules."""
    litellm = import_litellm()
    errors = litellm.exceptions
    original = getattr(exc, "original_exception", None)
    if isinstance(exc, errors.MidStreamFallbackError) and isinstance(original, BaseException):
        exc = original
    status = getattr(exc, "status_code", None)
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    retry_after = retry_after_seconds(exc)

    def failure(reason: str, failover: bool) -> Failure:
        return Failure(reason, failover, retry_after, status, message)

    if isinstance(exc, errors.ContextWindowExceededError):
        return failure("context_overflow", False)
    if isinstance(exc, errors.AuthenticationError | errors.PermissionDeniedError):
        return failure("auth_error", True)
    if isinstance(exc, errors.RateLimitError):
        return failure("rate_limited", True)
    if isinstance(exc, errors.Timeout):
        return failure("timeout", True)
    if isinstance(exc, errors.APIConnectionError):
        # A read timeout inside a stream surfaces as a connection error.
        timed_out = "timed out" in message.lower() or "timeout" in message.lower()
        return failure("timeout" if timed_out else "connection_error", True)
    if isinstance(
        exc,
        errors.BadRequestError
        | errors.NotFoundError
        | errors.UnprocessableEntityError
        | errors.UnsupportedParamsError,
    ):
        return failure("bad_request", False)
    if isinstance(status, int) and 400 <= status < 500 and status not in (408, 409, 425, 429):
        return failure("bad_request", False)
    # 5xx, stream breaks and anything else from the provider's side.
    return failure("server_error" if isinstance(status, int) else "provider_error", True)


def retry_after_seconds(exc: BaseException) -> float | None:
    """``Retry-After`` from the error's response headers: seconds, or an HTTP date."""
    headers = getattr(exc, "litellm_response_headers", None)
    if headers is None:
        response = getattr(exc, "response", None)
        headers = getattr(response, "headers", None)
    if not headers:
        return None
    value = headers.get("retry-after") or headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


def _tool_call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": arguments or ""},
    }


def _model_entry(dep: Deployment) -> dict[str, Any]:
    params: dict[str, Any] = {"model": dep.model, "timeout": dep.settings.timeout_seconds}
    if dep.settings.api_base:
        params["api_base"] = dep.settings.api_base
    if dep.api_key:
        params["api_key"] = dep.api_key
    return {"model_name": dep.key, "litellm_params": params}


def _from_provider(exc: BaseException) -> bool:
    """True for errors raised by LiteLLM, the OpenAI SDK or the HTTP stack under them."""
    module = type(exc).__module__
    return module.startswith(("litellm", "openai", "httpx", "httpcore", "aiohttp")) or isinstance(
        exc, TimeoutError | ConnectionError
    )


class _LoopHolder:
    """Owns one thread's event loop and closes it when the thread ends."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()

    def __del__(self) -> None:
        if not self.loop.is_closed() and not self.loop.is_running():
            self.loop.close()


class _ThreadLoop(threading.local):
    holder: _LoopHolder | None = None


_loops = _ThreadLoop()


def _thread_loop() -> asyncio.AbstractEventLoop:
    """This thread's event loop for model calls, created on first use and kept."""
    if _loops.holder is None or _loops.holder.loop.is_closed():
        _loops.holder = _LoopHolder()
    return _loops.holder.loop


def import_litellm() -> Any:
    import litellm

    litellm.suppress_debug_info = True
    # goclaw accounts tokens and cost itself and registers no LiteLLM callbacks; its
    # per-stream logging (a deep copy and a callback dispatch per reply) is pure cost.
    litellm.disable_streaming_logging = True
    return litellm
