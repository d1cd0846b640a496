"""Hostile and broken WASM skills through a real ``SkillRegistry``: each one costs one tool error
with the exact fault code, and the same registry goes on serving a well-behaved skill.

The limits are small (fuel in the hundred thousands, deadlines of 0.3 s) so that every
failure mode runs in milliseconds. The SQLite database only keeps faults and the audit;
where the database itself matters (kv, quarantine) ``test_skill_registry`` runs on both.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from pathlib import Path
from unittest.mock import ANY

import pytest

from goclaw.agent.tools import BUILTIN_TOOLS, AllowListedTools, ToolError
from goclaw.audit import AuditLog
from goclaw.skills.registry import SkillRegistry
from goclaw.skills.sandbox import SkillFault
from tests.skill_support import (
    DATA,
    KV_IMPORTS,
    LOG_IMPORT,
    answer_wat,
    audit_records,
    free_port,
    http_wat,
    json_server,
    make_config,
    make_registry,
    ok_wat,
    open_db,
    pack,
    skill_wat,
    write_skill,
)
from tests.tool_context import LOOPBACK, make_ctx

GOOD = "good"
MIB = 1024 * 1024

LOOP = skill_wat("(loop $forever (br $forever)) (i64.const 0)")
LOG_LOOP = skill_wat(
    f"(loop $forever (call $log (i32.const 1) (i32.const {DATA}) (i32.const 4)) (br $forever))"
    " (i64.const 0)",
    data="tick",
    imports=LOG_IMPORT,
)
#: Grows one page at a time until memory.grow says -1, then traps.
GROW_UNTIL_REFUSED = skill_wat(
    "(block $full (loop $more"
    " (br_if $full (i32.eq (memory.grow (i32.const 1)) (i32.const -1))) (br $more)))"
    " unreachable"
)
#: Grows for ever, taking no notice of the -1.
GROW_FOR_EVER = skill_wat(
    "(loop $more (drop (memory.grow (i32.const 1))) (br $more)) (i64.const 0)"
)
RECURSE = skill_wat(
    "(i64.extend_i32_u (call $deep (i32.const 0)))",
    funcs="(func $deep (param $n i32) (result i32)"
    " (i32.add (call $deep (i32.add (local.get $n) (i32.const 1))) (i32.const 1)))",
)
HUNDRED_MIB = 100 * MIB
#: Grows 100 MiB (1600 pages) and answers all of it.
HUGE_OUTPUT = skill_wat(
    "(drop (memory.grow (i32.const 1600)))"
    + pack("(i32.const 65536)", f"(i32.const {HUNDRED_MIB})")
)
OUTSIDE = skill_wat(pack("(i32.const 65000)", "(i32.const 1000)"))


@pytest.fixture
def sqlite_db(sqlite_url):
    database = open_db(sqlite_url)
    yield database
    database.close()


@pytest.fixture
def audit(sqlite_db, tmp_path):
    return AuditLog(sqlite_db, tmp_path / "audit.jsonl")


@pytest.fixture
def home(tmp_path):
    return tmp_path / "home"


@pytest.fixture
def ctx(tmp_path):
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    return make_ctx(workspace)


class RecordingPolicy(AllowListedTools):
    """Every built-in tool allowed; every refusal made past the policy kept."""

    def __init__(self) -> None:
        super().__init__(BUILTIN_TOOLS)
        self.refusals: list[tuple[str, str, str]] = []

    def refused(self, ctx, capability: str, subject: str, reason: str) -> None:
        self.refusals.append((capability, subject, reason))


def registry_with(
    home: Path, db, audit, skills: dict[str, tuple[str | bytes, dict]], **settings
) -> SkillRegistry:
    """A registry serving ``skills`` (name -> (wat, manifest fields)) and the good one."""
    settings.setdefault("quarantine_faults", 1000)  # quarantine has its own tests
    config = make_config(home, **settings)
    write_skill(home / "skills" / GOOD, GOOD, ok_wat("fine"))
    for name, (wat, fields) in skills.items():
        write_skill(home / "skills" / name, name, wat, **fields)
    return make_registry(config, db, audit)


def failure(registry: SkillRegistry, name: str, ctx, arguments=None) -> ToolError:
    with pytest.raises(ToolError) as caught:
        registry.invoke(name, ctx, arguments or {})
    return caught.value


def fault(registry, name, ctx, code: str) -> SkillFault:
    """Call ``name``, which must fault with ``code``; then check the registry still serves."""
    error = failure(registry, name, ctx)
    assert isinstance(error, SkillFault), error
    assert error.code == code, error
    assert_still_serving(registry, ctx)
    return error


def assert_still_serving(registry, ctx) -> None:
    assert registry.invoke(GOOD, ctx, {}) == "fine"


# -- the process keeps serving --------------------------------------------------------


def test_a_good_skill_answers(home, sqlite_db, audit, ctx):
    registry = registry_with(home, sqlite_db, audit, {})
    snapshot = registry.current()
    assert snapshot.wasm[GOOD].live is not None
    assert snapshot.wasm[GOOD].rejection is None
    assert GOOD in snapshot.tools
    assert_still_serving(registry, ctx)


def test_an_endless_loop_runs_out_of_fuel(home, sqlite_db, audit, ctx):
    registry = registry_with(
        home, sqlite_db, audit, {"spin": (LOOP, {"limits": {"fuel": 100_000}})}
    )
    error = fault(registry, "spin", ctx, "skill_out_of_fuel")
    assert "100000" in error.message
    # A fault is recorded and audited (capability skills.NAME, decision fault).
    assert [f.code for f in registry.health.faults("spin")] == ["skill_out_of_fuel"]
    (record,) = audit_records(audit, capability="skills.spin", decision="fault")
    assert record.reason.startswith("skill_out_of_fuel: ")
    assert record.agent == "tester" and record.task_id == 1


def test_a_loop_around_host_calls_meets_the_deadline(home, sqlite_db, audit, ctx):
    # Host calls burn no fuel worth the name: with a budget of 10^9 only the epoch stops it.
    limits = {"fuel": 1_000_000_000, "timeout_seconds": 0.3}
    registry = registry_with(home, sqlite_db, audit, {"chatty": (LOG_LOOP, {"limits": limits})})
    started = time.monotonic()
    error = failure(registry, "chatty", ctx)
    elapsed = time.monotonic() - started
    assert error.code == "skill_deadline", error
    assert "0.3 s" in error.message
    assert 0.25 <= elapsed < 2.0
    assert_still_serving(registry, ctx)


@pytest.mark.parametrize(
    ("wat", "fuel"),
    [(GROW_UNTIL_REFUSED, 10_000_000), (GROW_FOR_EVER, 300_000)],
    ids=["grow-until-refused-then-trap", "grow-ignoring-refusals"],
)
def test_a_memory_grow_bomb_hits_the_memory_limit(home, sqlite_db, audit, ctx, wat, fuel):
    limits = {"memory_bytes": MIB, "fuel": fuel}
    registry = registry_with(home, sqlite_db, audit, {"bomb": (wat, {"limits": limits})})
    error = fault(registry, "bomb", ctx, "skill_memory_limit")
    assert str(MIB) in error.message


def test_unbounded_recursion_is_a_stack_overflow_trap(home, sqlite_db, audit, ctx):
    registry = registry_with(home, sqlite_db, audit, {"deep": (RECURSE, {})})
    error = fault(registry, "deep", ctx, "skill_trap")
    assert "stack overflow" in error.message


def test_unreachable_is_a_trap_naming_it(home, sqlite_db, audit, ctx):
    registry = registry_with(home, sqlite_db, audit, {"oops": (skill_wat("unreachable"), {})})
    error = fault(registry, "oops", ctx, "skill_trap")
    assert "unreachable" in error.message


# -- outputs ----------------------------------------------------------------------


def test_a_100_mib_output_is_over_the_output_limit(home, sqlite_db, audit, ctx):
    registry = registry_with(
        home,
        sqlite_db,
        audit,
        {"huge": (HUGE_OUTPUT, {"limits": {"memory_bytes": 110 * MIB}})},
        max_memory_bytes=128 * MIB,
    )
    error = fault(registry, "huge", ctx, "skill_bad_output")
    assert str(HUNDRED_MIB) in error.message
    assert "skills.max_output_bytes" in error.message
    assert str(registry.settings.max_output_bytes) in error.message


def test_an_output_outside_the_memory_is_bad_output(home, sqlite_db, audit, ctx):
    registry = registry_with(home, sqlite_db, audit, {"outside": (OUTSIDE, {})})
    error = fault(registry, "outside", ctx, "skill_bad_output")
    assert "outside the memory" in error.message


@pytest.mark.parametrize(
    "answer",
    [
        b'{"result":1}',
        b'{"ok":1,"error":{"code":"x","message":"y"}}',
        b'{"error":"no"}',
        b'{"error":{"code":"x"}}',
        b"[1]",
        b'"ok"',
        b"not json",
        b"",
        b'{"ok":"\xff"}',
    ],
    ids=[
        "other-key",
        "both-keys",
        "error-not-object",
        "error-no-message",
        "array",
        "string",
        "not-json",
        "empty",
        "not-utf8",
    ],
)
def test_an_output_not_of_the_abi_shape_is_bad_output(home, sqlite_db, audit, ctx, answer):
    registry = registry_with(home, sqlite_db, audit, {"shape": (answer_wat(answer), {})})
    fault(registry, "shape", ctx, "skill_bad_output")


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_an_output_with_non_json_numbers_is_bad_output(home, sqlite_db, audit, ctx, constant):
    # docs/skills.md: the output is JSON; NaN and Infinity are not (RFC 8259), and a
    # result holding them cannot be sent on to a model as JSON.
    registry = registry_with(
        home, sqlite_db, audit, {"nan": (answer_wat(f'{{"ok":{constant}}}'), {})}
    )
    fault(registry, "nan", ctx, "skill_bad_output")


def test_the_modules_own_error_is_skill_error_and_not_a_fault(home, sqlite_db, audit, ctx):
    wat = answer_wat('{"error":{"code":"x","message":"y"}}')
    registry = registry_with(home, sqlite_db, audit, {"refuser": (wat, {})})
    error = failure(registry, "refuser", ctx)
    assert not isinstance(error, SkillFault)
    assert (error.code, error.message) == ("skill_error", "x: y")
    assert registry.health.faults("refuser") == []
    assert audit_records(audit, capability="skills.refuser") == []
    assert_still_serving(registry, ctx)


def test_arguments_reach_the_module_in_canonical_form(home, sqlite_db, audit, ctx):
    # run answers {"ok": <its input>}: the input is the canonical JSON of the arguments.
    echo = skill_wat(
        "(call $wrap_ok (call $pack (local.get $ptr) (local.get $len)))",
    )
    registry = registry_with(home, sqlite_db, audit, {"echo": (echo, {})})
    arguments = {"b": [1, 2], "a": "h\u00e9\n\u0001", "c": {"z": None, "y": True}}
    assert registry.invoke("echo", ctx, arguments) == arguments


# -- http_get ---------------------------------------------------------------------


def test_http_get_without_the_capability_is_denied_and_reported(home, sqlite_db, audit, tmp_path):
    url = f"http://127.0.0.1:{free_port()}/"
    registry = registry_with(home, sqlite_db, audit, {"fetcher": (http_wat(url), {})})
    policy = RecordingPolicy()
    ctx = make_ctx(tmp_path, policy)
    error = failure(registry, "fetcher", ctx)
    assert not isinstance(error, SkillFault)  # the host refusing is not the module failing
    assert error.code == "skill_capability_denied"
    assert "'http'" in error.message
    ((capability, subject, reason),) = policy.refusals
    assert (capability, subject) == ("skills.fetcher", url)
    assert "capability" in reason
    assert registry.health.faults("fetcher") == []
    assert_still_serving(registry, ctx)


def test_http_get_to_loopback_is_refused_by_the_ssrf_guard(home, sqlite_db, audit, tmp_path):
    with json_server({"secret": True}) as url:
        registry = registry_with(
            home, sqlite_db, audit, {"fetcher": (http_wat(url), {"capabilities": ["http"]})}
        )
        policy = RecordingPolicy()
        ctx = make_ctx(tmp_path, policy)  # no allowed networks: only public addresses
        error = failure(registry, "fetcher", ctx)
    assert error.code == "ssrf_blocked", error
    assert [(c, s) for c, s, _ in policy.refusals] == [("net.http", url)]
    assert registry.health.faults("fetcher") == []
    assert_still_serving(registry, ctx)


def test_http_get_to_an_allowed_server_answers_the_module(home, sqlite_db, audit, tmp_path):
    with json_server({"hello": "world"}) as url:
        registry = registry_with(
            home, sqlite_db, audit, {"fetcher": (http_wat(url), {"capabilities": ["http"]})}
        )
        ctx = make_ctx(tmp_path, allowed_networks=LOOPBACK)
        answer = registry.invoke("fetcher", ctx, {})
    assert answer["status"] == 200
    assert answer["content_type"] == "application/json"
    assert answer["content"] == '{"hello": "world"}'
    assert answer["truncated"] is False
    assert_still_serving(registry, ctx)


def test_a_failed_request_is_an_answer_for_the_module(home, sqlite_db, audit, tmp_path):
    url = f"http://127.0.0.1:{free_port()}/"  # nothing listens there
    registry = registry_with(
        home, sqlite_db, audit, {"fetcher": (http_wat(url), {"capabilities": ["http"]})}
    )
    ctx = make_ctx(tmp_path, allowed_networks=LOOPBACK)
    answer = registry.invoke("fetcher", ctx, {})
    assert answer["error"]["code"] == "fetch_failed", answer
    assert_still_serving(registry, ctx)


def test_a_slow_server_cannot_hold_a_call_past_its_deadline(home, sqlite_db, audit, tmp_path):
    with json_server({"late": True}, delay=3.0) as url:
        registry = registry_with(
            home,
            sqlite_db,
            audit,
            {
                "fetcher": (
                    http_wat(url),
                    {"capabilities": ["http"], "limits": {"timeout_seconds": 0.3}},
                )
            },
        )
        ctx = make_ctx(tmp_path, allowed_networks=LOOPBACK)
        started = time.monotonic()
        try:
            outcome = registry.invoke("fetcher", ctx, {})
        except ToolError as exc:
            outcome = exc.code
        elapsed = time.monotonic() - started
    # The fetch gets what is left of the skill's time: the module hears "timeout", or the
    # deadline stops it as it resumes. Either way the call ends at about 0.3 s.
    assert outcome in ("skill_deadline", {"error": {"code": "timeout", "message": ANY}})
    assert elapsed < 1.5
    assert_still_serving(registry, ctx)


def test_a_host_call_with_a_pointer_outside_the_memory_is_a_trap(home, sqlite_db, audit, ctx):
    wat = skill_wat(
        "(call $log (i32.const 1) (i32.const 65530) (i32.const 100)) (i64.const 0)",
        imports=LOG_IMPORT,
    )
    registry = registry_with(home, sqlite_db, audit, {"wild": (wat, {})})
    error = fault(registry, "wild", ctx, "skill_trap")
    assert "log" in error.message


def test_log_lines_are_tagged_cut_at_4_kib_and_at_most_100_a_call(
    home, sqlite_db, audit, ctx, caplog
):
    many = skill_wat(
        f"""(local $i i32)
        (loop $more
          (call $log (i32.const 0) (i32.const {DATA}) (i32.const 4))
          (local.set $i (i32.add (local.get $i) (i32.const 1)))
          (br_if $more (i32.lt_u (local.get $i) (i32.const 150))))
        {pack(f"(i32.const {DATA + 4})", "(i32.const 11)")}""",
        data='line{"ok":true}',
        imports=LOG_IMPORT,
    )
    long = skill_wat(
        f"(call $log (i32.const 3) (i32.const {DATA + 11}) (i32.const 5000))"
        + pack(f"(i32.const {DATA})", "(i32.const 11)"),
        data='{"ok":true}' + "x" * 5000,
        imports=LOG_IMPORT,
    )
    registry = registry_with(home, sqlite_db, audit, {"many": (many, {}), "long": (long, {})})
    with caplog.at_level(logging.DEBUG, logger="goclaw.skills.sandbox"):
        assert registry.invoke("many", ctx, {}) is True
        assert registry.invoke("long", ctx, {}) is True
    lines = [r for r in caplog.records if r.name == "goclaw.skills.sandbox"]
    from_many = [r.getMessage() for r in lines if "skill many " in r.getMessage()]
    assert len(from_many) == 100
    assert from_many[0] == "skill many (task 1): line"
    assert "the last line this call may log" in from_many[-1]
    (from_long,) = [r for r in lines if "skill long " in r.getMessage()]
    assert from_long.levelno == logging.ERROR
    assert from_long.getMessage().endswith("x" * 4096 + " [cut: 5000 bytes]")


# -- the ABI ----------------------------------------------------------------------

ABI_BREAKERS = {
    "unknown_import": (skill_wat(imports='(import "goclaw" "nope" (func $nope))'), "compile"),
    "abi_two": (skill_wat(abi=2), "instantiate"),
    "no_abi": (skill_wat(abi=None), "compile"),
    "no_run": (skill_wat(export_run=False), "compile"),
    "wasi": (
        skill_wat(
            imports='(import "wasi_snapshot_preview1" "fd_write"'
            " (func $fd_write (param i32 i32 i32 i32) (result i32)))"
        ),
        "compile",
    ),
    "wrong_type": (
        skill_wat(imports='(import "goclaw" "log" (func $log (param i32 i32)))'),
        "compile",
    ),
    "garbage": (b"\x00asm but not really a module", "compile"),
}


@pytest.mark.parametrize("name", sorted(ABI_BREAKERS))
def test_a_module_off_the_abi_is_listed_and_answers_abi_mismatch(home, sqlite_db, audit, ctx, name):
    wat, phase = ABI_BREAKERS[name]
    registry = registry_with(home, sqlite_db, audit, {name: (wat, {})})
    skill = registry.current().wasm[name]
    assert skill.live is None
    assert skill.rejection.startswith(f"{phase}: skill_abi_mismatch"), skill.rejection
    assert name in registry.current().tools  # listed, so the model sees why it fails
    error = fault(registry, name, ctx, "skill_abi_mismatch")
    assert "did not load" in error.message
    (record,) = audit_records(audit, capability="skills.reload", subject=name)
    assert record.decision == "reject"
    assert record.reason.startswith(f"{phase} failed: skill_abi_mismatch")


def test_a_module_whose_memory_starts_over_its_limit_does_not_load(home, sqlite_db, audit, ctx):
    wat = skill_wat(pages=32)  # 2 MiB
    registry = registry_with(
        home, sqlite_db, audit, {"fat": (wat, {"limits": {"memory_bytes": MIB}})}
    )
    assert registry.current().wasm["fat"].rejection.startswith("instantiate: skill_memory_limit")
    fault(registry, "fat", ctx, "skill_memory_limit")


def test_a_start_function_calling_the_host_does_not_break_loading(home, sqlite_db, audit, ctx):
    # A start function runs at instantiation, which staging does outside an invocation:
    # the host function must not crash the registry (every skill of the worker with it).
    wat = skill_wat(
        data="hi",
        imports=LOG_IMPORT,
        funcs=f"(func $init (call $log (i32.const 1) (i32.const {DATA}) (i32.const 2)))"
        " (start $init)",
    )
    registry = registry_with(home, sqlite_db, audit, {"starter": (wat, {})})
    assert "starter" in registry.current().wasm
    assert_still_serving(registry, ctx)


# -- kv ---------------------------------------------------------------------------


def test_kv_without_the_capability_is_denied(home, sqlite_db, audit, tmp_path):
    wat = skill_wat(
        f"(call $wrap_ok (call $kv_get (i32.const {DATA}) (i32.const 1)))",
        data="k",
        imports=KV_IMPORTS,
    )
    registry = registry_with(home, sqlite_db, audit, {"nokv": (wat, {})})
    policy = RecordingPolicy()
    ctx = make_ctx(tmp_path, policy)
    error = failure(registry, "nokv", ctx)
    assert error.code == "skill_capability_denied"
    assert "'kv'" in error.message
    assert [(c, s) for c, s, _ in policy.refusals] == [("skills.nokv", "k")]
    assert registry.health.faults("nokv") == []
    assert_still_serving(registry, ctx)


# -- threads ----------------------------------------------------------------------


def test_concurrent_invocations_keep_their_own_errors(home, tmp_path):
    """A worker runs a turn's tool calls in a thread pool, and the sandbox says it is
    thread-safe: one call's host refusal must never become another call's error."""
    denied = skill_wat(
        f"(call $wrap_ok (call $kv_get (i32.const {DATA}) (i32.const 1)))",
        data="k",
        imports=KV_IMPORTS,
    )
    # No database: the faults are not kept, so nothing is quarantined however many there are.
    registry = registry_with(
        home, None, None, {"nokv": (denied, {}), "spin": (LOOP, {"limits": {"fuel": 20_000}})}
    )
    ctx = make_ctx(tmp_path)
    seen: dict[str, collections.Counter] = {"nokv": collections.Counter()}
    seen["spin"] = collections.Counter()
    stop = threading.Event()
    expected = {"nokv": "skill_capability_denied", "spin": "skill_out_of_fuel"}

    def call(name: str) -> None:
        deadline = time.monotonic() + 1.5
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                registry.invoke(name, ctx, {})
                outcome = "answered"
            except ToolError as exc:
                outcome = exc.code
            except Exception as exc:
                outcome = type(exc).__name__
            seen[name][outcome] += 1
            if outcome != expected[name]:
                stop.set()

    threads = [threading.Thread(target=call, args=(name,)) for name in expected]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert {name: set(counts) for name, counts in seen.items()} == {
        name: {code} for name, code in expected.items()
    }, dict(seen)
