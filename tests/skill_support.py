"""Helpers for the skill tests: WebAssembly text for ABI v1 modules, skill folders, registries.

``skill_wat`` builds a whole module around a ``run`` body: the exports the ABI
asks for (``memory``, ``goclaw_abi``, a bump ``alloc`` that grows the memory
when it must, ``run``), a ``$pack`` function, and a ``$wrap_ok`` function that
turns a packed answer from a host function into ``{"ok": ANSWER}``. Data given
to it starts at ``DATA``.

``write_skill`` writes a skill folder (``SKILL.md`` plus the module built with
``wasmtime.wat2wasm``); every file is replaced atomically (a new inode), so a
registry's stamps see the change even within one timestamp tick.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import wasmtime
import yaml

from goclaw.audit import AuditLog, AuditRecord
from goclaw.config import Config, load_config
from goclaw.skills.registry import SkillRegistry
from goclaw.skills.sandbox import Sandbox
from goclaw.store.database import Database
from goclaw.store.migrations import migrate

#: Where ``skill_wat``'s data segment starts; the fixed strings live below it.
DATA = 64
_OK_OPEN = 8  # '{"ok":' (6 bytes) at 8, '}' at 14
_HEAP = 4096

LOG_IMPORT = '(import "goclaw" "log" (func $log (param i32 i32 i32)))'
HTTP_IMPORT = '(import "goclaw" "http_get" (func $http_get (param i32 i32) (result i64)))'
KV_IMPORTS = """
  (import "goclaw" "kv_get" (func $kv_get (param i32 i32) (result i64)))
  (import "goclaw" "kv_set" (func $kv_set (param i32 i32 i32 i32) (result i32)))
  (import "goclaw" "kv_delete" (func $kv_delete (param i32 i32) (result i32)))
"""


def wat_string(data: bytes | str) -> str:
    """A WebAssembly text string literal holding exactly ``data``."""
    raw = data.encode() if isinstance(data, str) else data
    chars = []
    for byte in raw:
        char = chr(byte)
        chars.append(char if 0x20 <= byte < 0x7F and char not in '"\\' else f"\\{byte:02x}")
    return '"' + "".join(chars) + '"'


def pack(pointer: str, length: str) -> str:
    """The WAT expression of ``(pointer << 32) | length`` (two i32 expressions)."""
    return (
        f"(i64.or (i64.shl (i64.extend_i32_u {pointer}) (i64.const 32)) "
        f"(i64.extend_i32_u {length}))"
    )


def skill_wat(
    run: str = "(i64.const 0)",
    *,
    data: bytes | str = b"",
    imports: str = "",
    funcs: str = "",
    pages: int = 1,
    abi: int | None = 1,
    export_run: bool = True,
) -> str:
    """A module speaking skill ABI v1 whose ``run`` (params $ptr $len, result i64) is ``run``.

    ``abi=None`` leaves the ``goclaw_abi`` export out; ``export_run=False`` the ``run`` one.
    """
    raw = data.encode() if isinstance(data, str) else data
    heap = max(_HEAP, (DATA + len(raw) + 15) // 16 * 16)
    pages = max(pages, -(-heap // 65536))  # room for the data
    abi_global = "" if abi is None else f'(global (export "goclaw_abi") i32 (i32.const {abi}))'
    run_export = '(export "run")' if export_run else ""
    return f"""(module
  {imports}
  (memory (export "memory") {pages})
  {abi_global}
  (global $heap (mut i32) (i32.const {heap}))
  (data (i32.const {_OK_OPEN}) "{{\\"ok\\":}}")
  (data (i32.const {DATA}) {wat_string(raw)})
  (func $alloc (export "alloc") (param $len i32) (result i32)
    (local $p i32) (local $end i32) (local $have i32)
    (local.set $p (global.get $heap))
    (local.set $end (i32.add (local.get $p) (local.get $len)))
    (local.set $have (i32.shl (memory.size) (i32.const 16)))
    (if (i32.gt_u (local.get $end) (local.get $have))
      (then
        (if (i32.eq
              (memory.grow (i32.add (i32.shr_u (i32.sub (local.get $end) (local.get $have))
                                               (i32.const 16))
                                    (i32.const 1)))
              (i32.const -1))
          (then unreachable))))
    (global.set $heap (i32.and (i32.add (local.get $end) (i32.const 15)) (i32.const -16)))
    (local.get $p))
  (func $pack (param $ptr i32) (param $len i32) (result i64)
    {pack("(local.get $ptr)", "(local.get $len)")})
  (func $wrap_ok (param $packed i64) (result i64)
    (local $src i32) (local $len i32) (local $out i32)
    (local.set $src (i32.wrap_i64 (i64.shr_u (local.get $packed) (i64.const 32))))
    (local.set $len (i32.wrap_i64 (local.get $packed)))
    (local.set $out (call $alloc (i32.add (local.get $len) (i32.const 7))))
    (memory.copy (local.get $out) (i32.const {_OK_OPEN}) (i32.const 6))
    (memory.copy (i32.add (local.get $out) (i32.const 6)) (local.get $src) (local.get $len))
    (i32.store8 (i32.add (local.get $out) (i32.add (local.get $len) (i32.const 6)))
                (i32.const 125))
    (call $pack (local.get $out) (i32.add (local.get $len) (i32.const 7))))
  {funcs}
  (func $run {run_export} (param $ptr i32) (param $len i32) (result i64)
    {run})
)"""


def answer_wat(text: str | bytes, **options: Any) -> str:
    """A module whose ``run`` answers ``text`` (normally a JSON object) from its data."""
    raw = text.encode() if isinstance(text, str) else text
    return skill_wat(pack(f"(i32.const {DATA})", f"(i32.const {len(raw)})"), data=raw, **options)


def ok_wat(value: Any) -> str:
    """A module that answers ``{"ok": value}``."""
    return answer_wat(json.dumps({"ok": value}, separators=(",", ":")))


def http_wat(url: str) -> str:
    """A module that ``http_get``s ``url`` and answers ``{"ok": THE HOST'S ANSWER}``."""
    raw = url.encode()
    return skill_wat(
        f"(call $wrap_ok (call $http_get (i32.const {DATA}) (i32.const {len(raw)})))",
        data=raw,
        imports=HTTP_IMPORT,
    )


def kv_wat(value: str, key: str = "k") -> str:
    """A module working on one key by its ``op`` argument (``{"op":"get|set|delete"}``).

    ``get`` answers ``{"ok": STORED}`` (the stored bytes must be JSON) or ``{"ok":null}``;
    ``set`` stores ``value`` and answers ``{"ok": kv_set's result}``; ``delete`` answers
    ``{"ok": kv_delete's result}``.
    """
    key_raw, value_raw = key.encode(), value.encode()
    null, digit = b'{"ok":null}', b'{"ok":0}'
    key_at = DATA
    value_at = key_at + len(key_raw)
    null_at = value_at + len(value_raw)
    digit_at = null_at + len(null)
    run = f"""(local $op i32) (local $r i64) (local $rc i32)
    ;; canonical arguments: {{"op":"... : the op's first letter is byte 7
    (local.set $op (i32.load8_u (i32.add (local.get $ptr) (i32.const 7))))
    (if (i32.eq (local.get $op) (i32.const 103))
      (then
        (local.set $r (call $kv_get (i32.const {key_at}) (i32.const {len(key_raw)})))
        (if (i64.eq (local.get $r) (i64.const -1))
          (then (return (call $pack (i32.const {null_at}) (i32.const {len(null)})))))
        (return (call $wrap_ok (local.get $r)))))
    (if (i32.eq (local.get $op) (i32.const 115))
      (then
        (local.set $rc (call $kv_set (i32.const {key_at}) (i32.const {len(key_raw)})
                                     (i32.const {value_at}) (i32.const {len(value_raw)}))))
      (else
        (local.set $rc (call $kv_delete (i32.const {key_at}) (i32.const {len(key_raw)})))))
    (i32.store8 (i32.const {digit_at + 6}) (i32.add (i32.const 48) (local.get $rc)))
    (call $pack (i32.const {digit_at}) (i32.const {len(digit)}))"""
    return skill_wat(run, data=key_raw + value_raw + null + digit, imports=KV_IMPORTS)


#: Arguments ``{"op": ...}`` for ``kv_wat`` modules.
KV_INPUT = {
    "type": "object",
    "properties": {"op": {"enum": ["get", "set", "delete"]}},
    "required": ["op"],
    "additionalProperties": False,
}


def flaky_wat(answer: Any = "fine") -> str:
    """``{"mode":"loop"}`` loops for ever; any other mode answers ``{"ok": answer}``."""
    raw = json.dumps({"ok": answer}, separators=(",", ":")).encode()
    run = f"""
    ;; canonical arguments: {{"mode":"... : the mode's first letter is byte 9
    (if (i32.eq (i32.load8_u (i32.add (local.get $ptr) (i32.const 9))) (i32.const 108))
      (then (loop $forever (br $forever))))
    (call $pack (i32.const {DATA}) (i32.const {len(raw)}))"""
    return skill_wat(run, data=raw)


def wasm_of(wat: str | bytes) -> bytes:
    """WebAssembly text built to a module; bytes are taken as the module itself."""
    return wat if isinstance(wat, bytes) else bytes(wasmtime.wat2wasm(wat))


def replace_file(path: Path, data: bytes | str) -> None:
    """Write ``path`` through a new file renamed over it (a new inode: stamps move)."""
    raw = data.encode() if isinstance(data, str) else data
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(handle, "wb") as out:
        out.write(raw)
    os.replace(tmp, path)


def manifest_text(name: str, *, body: str = "", **fields: Any) -> str:
    """A ``SKILL.md``: front matter from ``fields`` (None leaves a key out), then ``body``."""
    front: dict[str, Any] = {"name": name, "description": f"The {name} test skill."}
    front.update(fields)
    front = {key: value for key, value in front.items() if value is not None}
    dumped = yaml.safe_dump(front, sort_keys=False, allow_unicode=True)
    return f"---\n{dumped}---\n{body or f'# {name}'}\n"


def write_skill(folder: Path, name: str, wat: str | bytes, **manifest_fields: Any) -> Path:
    """A WASM skill in ``folder``: its ``SKILL.md`` and ``NAME.wasm`` built from ``wat``.

    ``manifest_fields`` go into the front matter (``abi``, ``module`` and ``input``
    have defaults; a value of None leaves the key out). Answers the folder.
    """
    folder = Path(folder)
    fields: dict[str, Any] = {
        "abi": 1,
        "module": f"{name}.wasm",
        "input": {"type": "object"},
    }
    fields.update(manifest_fields)
    replace_file(folder / fields["module"], wasm_of(wat))
    replace_file(folder / "SKILL.md", manifest_text(name, **fields))
    return folder


def write_instructions(folder: Path, name: str, body: str = "", **manifest_fields: Any) -> Path:
    """An instruction skill (no module) in ``folder``."""
    replace_file(Path(folder) / "SKILL.md", manifest_text(name, body=body, **manifest_fields))
    return Path(folder)


def make_config(home: Path, **skills: Any) -> Config:
    """``load_config(home)`` with a ``skills:`` section that reads no real skill folder.

    ``user_dir`` and ``bundled_dir`` default to empty folders beside ``home``;
    ``skills`` sets any other ``skills.*`` setting. Project skills go in ``home/skills``.
    """
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    (home / "skills").mkdir(exist_ok=True)
    section = {
        "user_dir": str(home.parent / f"{home.name}-user-skills"),
        "bundled_dir": str(home.parent / f"{home.name}-installed-skills"),
        **skills,
    }
    for key in ("user_dir", "bundled_dir"):
        Path(section[key]).mkdir(parents=True, exist_ok=True)
    (home / "config.yaml").write_text(yaml.safe_dump({"skills": section}), encoding="utf-8")
    return load_config(home, env={})


def open_db(url: str) -> Database:
    database = Database(url)
    migrate(database)
    return database


@functools.cache
def shared_sandbox(max_output_bytes: int = 1_048_576) -> Sandbox:
    """One sandbox (engine, epoch thread) for many registries: each new ``Sandbox`` starts an
    epoch thread that runs until the process ends, so tests share one where they can."""
    return Sandbox(None, max_output_bytes=max_output_bytes)


def make_registry(
    config: Config,
    db: Database | None,
    audit: AuditLog | None = None,
    *,
    shared: bool = True,
    **options: Any,
) -> SkillRegistry:
    """A registry that looks at the folders on every call (``check_interval=0``)."""
    if shared:
        options.setdefault(
            "sandbox", shared_sandbox(max_output_bytes=config.skills.max_output_bytes)
        )
    return SkillRegistry(config, db=db, audit=audit, check_interval=0, **options)


@contextlib.contextmanager
def json_server(body: Any, *, delay: float = 0.0) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 answering every GET with ``body`` as JSON (after ``delay``
    seconds, cut short when the server stops); yields its URL."""
    payload = json.dumps(body).encode()
    stopping = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if delay and stopping.wait(delay):
                return  # the test is over: answer nothing
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        stopping.set()
        server.shutdown()
        server.server_close()
        thread.join()


def free_port() -> int:
    """A port on 127.0.0.1 nothing listens on (bound and released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def audit_records(audit: AuditLog, **match: str) -> list[AuditRecord]:
    """The audit records (read back from the database) whose fields equal ``match``."""
    return [
        record
        for record in audit.query(limit=None)
        if all(getattr(record, key) == value for key, value in match.items())
    ]
