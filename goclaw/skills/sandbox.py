"""The wasmtime sandbox: one invocation of a WASM skill under fuel, memory and time limits.

One ``Sandbox`` per worker process holds the wasmtime ``Engine`` (fuel metering
and epoch interruption on), the ``Linker`` with the host functions, the thread
that advances the engine's epoch, and the compile cache. Each invocation gets a
fresh ``Store`` and instance: its own fuel budget (``Store.set_fuel``), memory
limit (``Store.set_limits``) and deadline (``Store.set_epoch_deadline``, checked
against the epoch the ticker advances every ``EPOCH_TICK_SECONDS``). Fuel stops
a loop that computes; the epoch stops one that waits in host calls, which burn
no fuel.

Every way a module can fail comes out as a ``SkillFault`` whose code names the
class of failure (``FAULT_CODES``). A host function that refuses (a capability
the manifest did not declare, the policy, the SSRF guard) raises a plain
``ToolError`` instead: that is the host doing its job, not the module failing.
The ABI is specified in ``docs/skills.md``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

import wasmtime

from goclaw.agent.tools.base import ToolContext, ToolError
from goclaw.skills.manifest import ABI_VERSION, Limits

log = logging.getLogger(__name__)

OUT_OF_FUEL = "skill_out_of_fuel"
DEADLINE = "skill_deadline"
MEMORY_LIMIT = "skill_memory_limit"
TRAP = "skill_trap"
BAD_OUTPUT = "skill_bad_output"
ABI_MISMATCH = "skill_abi_mismatch"
FAULT_CODES = (OUT_OF_FUEL, DEADLINE, MEMORY_LIMIT, TRAP, BAD_OUTPUT, ABI_MISMATCH)
#: The manifest did not declare the capability a host function needs.
CAPABILITY_DENIED = "skill_capability_denied"
#: The module's own ``{"error": ...}`` answer (not a fault).
SKILL_ERROR = "skill_error"

EPOCH_TICK_SECONDS = 0.01
#: Wasm stack for one invocation; recursion deeper than this traps (stack overflow).
MAX_WASM_STACK = 512 * 1024
WASM_PAGE = 65536
LOG_LINE_BYTES = 4096
LOG_LINES_PER_CALL = 100
KV_KEY_BYTES = 256
KV_VALUE_BYTES = 64 * 1024
KV_KEYS_PER_SKILL = 1000
#: ``http_get`` failures the module is told about; any other ToolError ends the call.
HTTP_SOFT_ERRORS = frozenset({"timeout", "fetch_failed", "bad_url"})

_I32 = wasmtime.ValType.i32()
_I64 = wasmtime.ValType.i64()
#: The host functions of ABI v1: name -> (params, results).
HOST_FUNCTIONS: Mapping[str, tuple[tuple[wasmtime.ValType, ...], tuple[wasmtime.ValType, ...]]] = {
    "log": ((_I32, _I32, _I32), ()),
    "http_get": ((_I32, _I32), (_I64,)),
    "kv_get": ((_I32, _I32), (_I64,)),
    "kv_set": ((_I32, _I32, _I32, _I32), (_I32,)),
    "kv_delete": ((_I32, _I32), (_I32,)),
}
HOST_MODULE = "goclaw"
_ABSENT = -1
_LOG_LEVELS = (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR)


class SkillFault(ToolError):
    """The module failed; ``code`` is one of ``FAULT_CODES``. Counted toward quarantine."""


class SkillStore(Protocol):
    """A skill's own key space (``KeyValue`` in a namespace per skill, or a dict for tests)."""

    def get(self, key: str) -> bytes | None: ...
    def put(self, key: str, value: bytes) -> None: ...
    def delete(self, key: str) -> bool: ...
    def size(self) -> int: ...


class MemoryStore:
    """A ``SkillStore`` in a dict: the self-test's scratch space."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    def get(self, key: str) -> bytes | None:
        return self.data.get(key)

    def put(self, key: str, value: bytes) -> None:
        self.data[key] = value

    def delete(self, key: str) -> bool:
        return self.data.pop(key, None) is not None

    def size(self) -> int:
        return len(self.data)


@dataclasses.dataclass
class Invocation:
    """What the host functions of one call can reach."""

    skill: str
    capabilities: frozenset[str]
    ctx: ToolContext
    store: SkillStore
    #: ``http_get`` answers through this (``web_fetch`` with the policy and the SSRF guard).
    fetch: Callable[[ToolContext, str], dict[str, Any]]
    deadline: float
    log_lines: int = 0
    #: The first error a host function met; it ends the call (see ``Sandbox._running``).
    error: BaseException | None = None


@dataclasses.dataclass(frozen=True)
class CompiledModule:
    """A module that compiled and whose imports and exports match the ABI."""

    module: wasmtime.Module
    sha256: str
    #: True when it came from the cache rather than the compiler.
    cached: bool

    @staticmethod
    def digest(wasm: bytes) -> str:
        """What names a module: the sha256 of its bytes."""
        return hashlib.sha256(wasm).hexdigest()


class Sandbox:
    """One engine for the process; thread-safe (each invocation has its own store)."""

    def __init__(self, cache_dir: Path | None = None, *, max_output_bytes: int = 1 << 20) -> None:
        config = wasmtime.Config()
        config.consume_fuel = True
        config.epoch_interruption = True
        config.max_wasm_stack = MAX_WASM_STACK
        # The ABI offers no threads; and no compiler thread pool, which a process worker
        # forked from this one would inherit broken (skill modules are small to compile).
        config.wasm_threads = False
        config.parallel_compilation = False
        self.engine = wasmtime.Engine(config)
        self.max_output_bytes = max_output_bytes
        self.cache = ModuleCache(self.engine, cache_dir)
        self._linker = self._build_linker()
        self._current = threading.local()
        self._ticker_lock = threading.Lock()
        self._ticker: threading.Thread | None = None

    # -- compile -------------------------------------------------------------

    def compile(self, wasm: bytes) -> CompiledModule:
        """Compile (or take from the cache) and check the imports and exports."""
        module, sha256, cached = self.cache.load(wasm)
        check_interface(module)
        return CompiledModule(module=module, sha256=sha256, cached=cached)

    def instantiate(self, compiled: CompiledModule, limits: Limits, invocation: Invocation) -> None:
        """Instantiate once and check the ABI version: staging's second phase.

        ``invocation`` serves the host calls a start function makes.
        """
        store = self._store(limits)
        with self._running(invocation, store, limits) as instance:
            instance.exports = self._instantiate(store, compiled, limits)

    # -- invoke --------------------------------------------------------------

    def _store(self, limits: Limits) -> wasmtime.Store:
        self._start_ticker()
        store = wasmtime.Store(self.engine)
        store.set_fuel(limits.fuel)
        store.set_limits(memory_size=limits.memory_bytes)
        store.set_epoch_deadline(math.ceil(limits.timeout_seconds / EPOCH_TICK_SECONDS) + 1)
        return store

    def invoke(
        self,
        compiled: CompiledModule,
        limits: Limits,
        arguments: Mapping[str, Any],
        invocation: Invocation,
    ) -> Any:
        """Run the module once on ``arguments``; answer its ``ok`` value or raise."""
        try:
            data = canonical_json(arguments)
        except UnicodeEncodeError as exc:  # a lone surrogate: there is no UTF-8 for it
            raise ToolError("invalid_arguments", f"arguments are not valid text: {exc}") from None
        store = self._store(limits)
        with self._running(invocation, store, limits) as instance:
            exports = instance.exports = self._instantiate(store, compiled, limits)
            pointer = exports.alloc(store, len(data))
            if not isinstance(pointer, int) or pointer <= 0:
                raise SkillFault(BAD_OUTPUT, f"alloc({len(data)}) returned {pointer!r}")
            _write(store, exports.memory, pointer, data, "alloc")
            packed = exports.run(store, pointer, len(data))
        return self._output(store, exports.memory, packed)

    @contextlib.contextmanager
    def _running(
        self, invocation: Invocation, store: wasmtime.Store, limits: Limits
    ) -> Iterator[_Instance]:
        """Serve host calls from ``invocation`` while wasm runs; turn every way it can end
        into a ``SkillFault`` or the host's own refusal.

        A host function never raises into wasmtime: wasmtime-py hands a callback's
        exception back through one process-wide variable, so with invocations in several
        threads one could receive another's error. It keeps the error in its
        ``Invocation`` instead and stops the module by taking its fuel away; the error is
        raised here, whether the module then trapped or returned.
        """
        instance = _Instance()
        self._current.invocation = invocation
        try:
            yield instance
        except wasmtime.Trap as trap:
            if invocation.error is None:
                raise _classify_trap(trap, store, instance.exports, limits) from None
        finally:
            self._current.invocation = None
        if invocation.error is not None:
            raise invocation.error

    def _instantiate(
        self, store: wasmtime.Store, compiled: CompiledModule, limits: Limits
    ) -> _Exports:
        declared = _declared_memory_bytes(compiled.module)
        if declared > limits.memory_bytes:
            raise SkillFault(
                MEMORY_LIMIT,
                f"the module's memory starts at {declared} bytes, over its limit of "
                f"{limits.memory_bytes}",
            )
        try:
            instance = self._linker.instantiate(store, compiled.module)
        except wasmtime.Trap:
            raise  # a start function or data segment trapped: classified like any trap
        except wasmtime.WasmtimeError as exc:
            raise SkillFault(ABI_MISMATCH, f"cannot instantiate: {_first_line(exc)}") from None
        found = instance.exports(store)
        abi = found["goclaw_abi"]
        assert isinstance(abi, wasmtime.Global)  # check_interface saw to it
        version = abi.value(store)
        if version != ABI_VERSION:
            raise SkillFault(
                ABI_MISMATCH, f"the module speaks skill ABI {version}, goclaw speaks {ABI_VERSION}"
            )
        return _Exports(memory=found["memory"], alloc=found["alloc"], run=found["run"])

    def _output(self, store: wasmtime.Store, memory: wasmtime.Memory, packed: Any) -> Any:
        pointer, length = _unpack(packed)
        if length > self.max_output_bytes:
            raise SkillFault(
                BAD_OUTPUT,
                f"the output is {length} bytes, over the limit of {self.max_output_bytes} "
                "(skills.max_output_bytes)",
            )
        raw = _read(store, memory, pointer, length, None)
        try:
            answer = json.loads(
                raw.decode("utf-8"), parse_constant=_not_json, object_pairs_hook=_unique_keys
            )
        except UnicodeDecodeError as exc:
            raise SkillFault(BAD_OUTPUT, f"the output is not UTF-8: {exc.reason}") from None
        except (json.JSONDecodeError, _NotJSON) as exc:
            raise SkillFault(BAD_OUTPUT, f"the output is not JSON: {exc}") from None
        if isinstance(answer, dict) and set(answer) == {"ok"}:
            return answer["ok"]
        if isinstance(answer, dict) and set(answer) == {"error"}:
            error = answer["error"]
            if (
                isinstance(error, dict)
                and isinstance(error.get("code"), str)
                and isinstance(error.get("message"), str)
            ):
                raise ToolError(SKILL_ERROR, f"{error['code']}: {error['message']}")
        raise SkillFault(
            BAD_OUTPUT,
            'the output must be {"ok": VALUE} or {"error": {"code": ..., "message": ...}}, '
            f"got {raw[:120].decode('utf-8', 'replace')!r}",
        )

    # -- the epoch ------------------------------------------------------------

    def _start_ticker(self) -> None:
        if self._ticker is not None:
            return
        with self._ticker_lock:
            if self._ticker is None:
                self._ticker = threading.Thread(target=self._tick, name="wasm-epoch", daemon=True)
                self._ticker.start()

    def _tick(self) -> None:
        while True:
            time.sleep(EPOCH_TICK_SECONDS)
            self.engine.increment_epoch()

    # -- host functions ------------------------------------------------------

    def _build_linker(self) -> wasmtime.Linker:
        linker = wasmtime.Linker(self.engine)
        handlers = {
            "log": self._host_log,
            "http_get": self._host_http_get,
            "kv_get": self._host_kv_get,
            "kv_set": self._host_kv_set,
            "kv_delete": self._host_kv_delete,
        }
        for name, (params, results) in HOST_FUNCTIONS.items():
            linker.define_func(
                HOST_MODULE,
                name,
                wasmtime.FuncType(list(params), list(results)),
                self._guarded(handlers[name], -1 if results else None),
                access_caller=True,
            )
        return linker

    def _guarded(self, handler: Callable[..., Any], failed: int | None) -> Callable[..., Any]:
        """``handler`` with its errors kept in the invocation rather than raised."""

        def host_function(caller: wasmtime.Caller, *args: int) -> Any:
            invocation = getattr(self._current, "invocation", None)
            if invocation is None:  # cannot happen: every entry into wasm sets one
                wasmtime.Store.set_fuel(caller, 0)  # type: ignore[arg-type]
                return failed
            if invocation.error is not None:
                return failed  # already stopping
            try:
                return handler(invocation, caller, *args)
            except BaseException as exc:
                invocation.error = exc
                # Store.set_fuel only needs a context, which a Caller has: no fuel left
                # stops the module at its next check, and the error above is raised.
                wasmtime.Store.set_fuel(caller, 0)  # type: ignore[arg-type]
                return failed

        return host_function

    def _needs(self, invocation: Invocation, capability: str, function: str, subject: str) -> None:
        if capability in invocation.capabilities:
            return
        reason = (
            f"skill {invocation.skill!r} called {function} without the {capability!r} "
            "capability (add it to the capabilities in its SKILL.md)"
        )
        ctx = invocation.ctx
        ctx.policy.refused(ctx, f"skills.{invocation.skill}", subject or function, reason)
        raise ToolError(CAPABILITY_DENIED, reason)

    def _host_log(
        self,
        invocation: Invocation,
        caller: wasmtime.Caller,
        level: int,
        pointer: int,
        length: int,
    ) -> None:
        invocation.log_lines += 1
        if invocation.log_lines > LOG_LINES_PER_CALL:
            return
        text = _read(caller, _memory(caller), pointer, min(length, LOG_LINE_BYTES), "log")
        line = text.decode("utf-8", "replace")
        if length > LOG_LINE_BYTES:
            line += f" [cut: {length} bytes]"
        if invocation.log_lines == LOG_LINES_PER_CALL:
            line += f" [the last line this call may log: {LOG_LINES_PER_CALL} at most]"
        log.log(
            _LOG_LEVELS[min(max(level, 0), 3)],
            "skill %s (task %s): %s",
            invocation.skill,
            invocation.ctx.task_id,
            line,
        )

    def _host_http_get(
        self, invocation: Invocation, caller: wasmtime.Caller, pointer: int, length: int
    ) -> int:
        raw = _read(caller, _memory(caller), pointer, length, "http_get")
        url = raw.decode("utf-8", "replace")
        self._needs(invocation, "http", "http_get", url)
        left = invocation.deadline - time.monotonic()
        if left <= 0:
            answer: dict[str, Any] = {"error": {"code": "timeout", "message": "no time left"}}
        else:
            ctx = invocation.ctx
            limits = dataclasses.replace(
                ctx.limits, fetch_timeout_seconds=min(ctx.limits.fetch_timeout_seconds, left)
            )
            try:
                answer = invocation.fetch(dataclasses.replace(ctx, limits=limits), url)
            except ToolError as exc:
                if exc.code not in HTTP_SOFT_ERRORS:
                    raise  # a refusal: audited where it was made, and the call ends
                answer = {"error": {"code": exc.code, "message": exc.message}}
        return _give(caller, canonical_json(answer), "http_get")

    def _host_kv_get(
        self, invocation: Invocation, caller: wasmtime.Caller, pointer: int, length: int
    ) -> int:
        key = _key(caller, pointer, length, "kv_get")
        self._needs(invocation, "kv", "kv_get", key or "")
        value = None if key is None else invocation.store.get(key)
        return _ABSENT if value is None else _give(caller, value, "kv_get")

    def _host_kv_set(
        self,
        invocation: Invocation,
        caller: wasmtime.Caller,
        key_ptr: int,
        key_len: int,
        val_ptr: int,
        val_len: int,
    ) -> int:
        key = _key(caller, key_ptr, key_len, "kv_set")
        self._needs(invocation, "kv", "kv_set", key or "")
        if key is None or val_len > KV_VALUE_BYTES:
            return 1
        value = _read(caller, _memory(caller), val_ptr, val_len, "kv_set")
        store = invocation.store
        if store.get(key) is None and store.size() >= KV_KEYS_PER_SKILL:
            return 2
        store.put(key, value)
        return 0

    def _host_kv_delete(
        self, invocation: Invocation, caller: wasmtime.Caller, pointer: int, length: int
    ) -> int:
        key = _key(caller, pointer, length, "kv_delete")
        self._needs(invocation, "kv", "kv_delete", key or "")
        return 0 if key is not None and invocation.store.delete(key) else 1


@dataclasses.dataclass(frozen=True)
class _Exports:
    memory: Any
    alloc: Any
    run: Any


@dataclasses.dataclass
class _Instance:
    """What ``_running`` knows of the instance, to judge a trap by its memory."""

    exports: _Exports | None = None


class ModuleCache:
    """Compiled modules by content hash: in memory, and on disk across restarts.

    A file is native code that ``Module.deserialize_file`` maps and runs, so the
    directory must be as trusted as the worker itself: it is created private
    (0700) under ``$GOCLAW_HOME``. The key includes the wasmtime version and the
    engine settings; a file wasmtime refuses (another version, a torn write) is
    compiled again and replaced.
    """

    def __init__(self, engine: wasmtime.Engine, directory: Path | None) -> None:
        self.engine = engine
        self.directory = directory
        self._memo: dict[str, wasmtime.Module] = {}
        self._lock = threading.Lock()
        self.fingerprint = (
            f"wasmtime-{metadata.version('wasmtime')};fuel;epoch;stack={MAX_WASM_STACK}"
        )
        #: How many modules were compiled, and how many came from disk, since start.
        self.compiled = 0
        self.loaded = 0

    def load(self, wasm: bytes) -> tuple[wasmtime.Module, str, bool]:
        sha256 = CompiledModule.digest(wasm)
        with self._lock:
            if sha256 in self._memo:
                return self._memo[sha256], sha256, True
        key = hashlib.sha256(f"{self.fingerprint}\n{sha256}".encode()).hexdigest()
        module = self._from_disk(key)
        cached = module is not None
        if module is None:
            try:
                module = wasmtime.Module(self.engine, wasm)
            except wasmtime.WasmtimeError as exc:
                raise SkillFault(ABI_MISMATCH, f"not a valid module: {_first_line(exc)}") from None
            self.compiled += 1
            log.info("compiled module %s", sha256[:12])
            self._to_disk(key, module)
        else:
            self.loaded += 1
            log.info("module %s loaded from the cache", sha256[:12])
        with self._lock:
            self._memo[sha256] = module
        return module, sha256, cached

    def _path(self, key: str) -> Path | None:
        return None if self.directory is None else self.directory / f"{key}.cwasm"

    def _from_disk(self, key: str) -> wasmtime.Module | None:
        path = self._path(key)
        if path is None or not path.exists():
            return None
        try:
            return wasmtime.Module.deserialize_file(self.engine, str(path))
        except wasmtime.WasmtimeError as exc:
            log.warning("compiled module %s is unusable, compiling again: %s", path, exc)
            path.unlink(missing_ok=True)
            return None

    def _to_disk(self, key: str, module: wasmtime.Module) -> None:
        path = self._path(key)
        if path is None:
            return
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            handle, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            with os.fdopen(handle, "wb") as out:
                out.write(module.serialize())
            os.replace(tmp, path)
        except OSError as exc:  # a full disk costs a recompile next start, nothing more
            log.warning("cannot cache the compiled module in %s: %s", path.parent, exc)


def check_interface(module: wasmtime.Module) -> None:
    """Refuse a module whose imports or exports do not match ABI v1 (``docs/skills.md``)."""
    for imported in module.imports:
        where = f"{imported.module}::{imported.name}"
        if imported.module != HOST_MODULE or imported.name not in HOST_FUNCTIONS:
            known = ", ".join(f"{HOST_MODULE}::{name}" for name in HOST_FUNCTIONS)
            raise SkillFault(
                ABI_MISMATCH, f"imports {where}, which the host does not provide (it has {known})"
            )
        params, results = HOST_FUNCTIONS[imported.name]
        if not _func_type_is(imported.type, params, results):
            raise SkillFault(ABI_MISMATCH, f"imports {where} with the wrong type {imported.type}")
    exports = {export.name: export.type for export in module.exports}
    expected: dict[str, tuple[type, Callable[[Any], bool], str]] = {
        "memory": (wasmtime.MemoryType, lambda t: True, "a memory"),
        "goclaw_abi": (
            wasmtime.GlobalType,
            lambda t: str(t.content) == "i32",
            "a global i32 holding the ABI version",
        ),
        "alloc": (wasmtime.FuncType, lambda t: _func_type_is(t, (_I32,), (_I32,)), "(i32) -> i32"),
        "run": (
            wasmtime.FuncType,
            lambda t: _func_type_is(t, (_I32, _I32), (_I64,)),
            "(i32, i32) -> i64",
        ),
    }
    for name, (kind, fits, description) in expected.items():
        found = exports.get(name)
        if found is None:
            raise SkillFault(ABI_MISMATCH, f"no export {name!r} ({description}): not skill ABI v1")
        if not isinstance(found, kind) or not fits(found):
            raise SkillFault(ABI_MISMATCH, f"export {name!r} must be {description}, is {found}")


class _NotJSON(ValueError):
    pass


def _not_json(constant: str) -> Any:
    raise _NotJSON(f"{constant} is not a JSON value")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise _NotJSON(f"an object repeats a key ({sorted(keys)})")
    return dict(pairs)


def canonical_json(value: Any) -> bytes:
    """The form arguments reach a module in (``docs/skills.md``, ABI step 2)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode()


def _func_type_is(kind: Any, params: tuple[Any, ...], results: tuple[Any, ...]) -> bool:
    if not isinstance(kind, wasmtime.FuncType):
        return False
    return [str(p) for p in kind.params] == [str(p) for p in params] and [
        str(r) for r in kind.results
    ] == [str(r) for r in results]


def _declared_memory_bytes(module: wasmtime.Module) -> int:
    for export in module.exports:
        if isinstance(export.type, wasmtime.MemoryType):
            return int(export.type.limits.min) * WASM_PAGE
    return 0


def _classify_trap(
    trap: wasmtime.Trap, store: wasmtime.Store, exports: _Exports | None, limits: Limits
) -> SkillFault:
    code = trap.trap_code
    what = _first_line(trap)
    if exports is not None:
        size = exports.memory.data_len(store)
        if size + WASM_PAGE > limits.memory_bytes and code != wasmtime.TrapCode.INTERRUPT:
            return SkillFault(
                MEMORY_LIMIT,
                f"stopped ({_trap_name(code)}) with its memory at {size} bytes, the limit "
                f"being {limits.memory_bytes}",
            )
    if code == wasmtime.TrapCode.OUT_OF_FUEL:
        return SkillFault(OUT_OF_FUEL, f"used up its fuel budget of {limits.fuel}")
    if code == wasmtime.TrapCode.INTERRUPT:
        return SkillFault(DEADLINE, f"still running at its {limits.timeout_seconds:g} s deadline")
    if code == wasmtime.TrapCode.STACK_OVERFLOW:
        return SkillFault(TRAP, "stack overflow (call stack exhausted: unbounded recursion?)")
    return SkillFault(TRAP, f"{_trap_name(code)}: {what}")


def _trap_name(code: Any) -> str:
    return "trap" if code is None else code.name.lower().replace("_", " ")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _unpack(packed: Any) -> tuple[int, int]:
    value = int(packed) & 0xFFFF_FFFF_FFFF_FFFF
    return value >> 32, value & 0xFFFF_FFFF


def _memory(caller: wasmtime.Caller) -> wasmtime.Memory:
    memory = caller.get("memory")
    assert isinstance(memory, wasmtime.Memory)  # check_interface saw to it
    return memory


def _read(
    store: Any, memory: wasmtime.Memory, pointer: int, length: int, call: str | None
) -> bytes:
    pointer &= 0xFFFF_FFFF
    length &= 0xFFFF_FFFF
    if pointer + length > memory.data_len(store):
        if call is None:
            raise SkillFault(
                BAD_OUTPUT, f"the output ({length} bytes at {pointer}) is outside the memory"
            )
        raise SkillFault(TRAP, f"{call}: {length} bytes at {pointer} are outside the memory")
    return bytes(memory.read(store, pointer, pointer + length))


def _write(store: Any, memory: wasmtime.Memory, pointer: int, data: bytes, call: str) -> None:
    if pointer + len(data) > memory.data_len(store):
        raise SkillFault(TRAP, f"{call} gave {pointer}, and {len(data)} bytes there overflow")
    memory.write(store, data, pointer)


def _give(caller: wasmtime.Caller, data: bytes, call: str) -> int:
    """Copy ``data`` into memory from the module's ``alloc``; answer it packed."""
    alloc = caller.get("alloc")
    assert isinstance(alloc, wasmtime.Func)
    pointer = alloc(caller, len(data))
    if not isinstance(pointer, int) or pointer <= 0:
        raise SkillFault(TRAP, f"{call}: alloc({len(data)}) returned {pointer!r}")
    _write(caller, _memory(caller), pointer, data, f"{call}: alloc")
    packed = (pointer << 32) | len(data)
    return packed - (1 << 64) if packed >= 1 << 63 else packed


def _key(caller: wasmtime.Caller, pointer: int, length: int, call: str) -> str | None:
    """The key as text; None when it is too long or not UTF-8 (the call answers 1)."""
    if length > KV_KEY_BYTES:
        return None
    raw = _read(caller, _memory(caller), pointer, length, call)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
