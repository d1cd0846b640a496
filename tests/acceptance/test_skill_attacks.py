"""Issue 6 against real processes: hostile skills contained, quarantine, reload, a bundled skill.

A real ``goclaw worker`` runs the agent; ``FakeLLM`` over loopback plays the
model and calls the skills. Every hostile module is a project skill in the
stack's home, built from WebAssembly text here. After each attack the same
worker answers an ordinary turn.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from goclaw.agent.turns import submit_turn
from goclaw.audit import AuditLog, audit_path
from goclaw.fake_llm import FakeLLM, Script
from goclaw.states import TaskState
from tests.acceptance.conftest import Stack, wait_for
from tests.skill_support import (
    ok_wat,
    pack,
    replace_file,
    skill_wat,
    wasm_of,
    write_instructions,
    write_skill,
)

pytestmark = pytest.mark.slow
sqlite_only = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)

POLICY = """\
version: 1
allow: [skills.*, net.http]
domains: [127.0.0.1]
"""
#: Tight limits, so each attack is stopped in well under a second.
SKILL_SETTINGS = {
    "fuel": 5_000_000,
    "timeout_seconds": 0.5,
    "max_memory_bytes": 128 * 1024 * 1024,
    "quarantine_faults": 3,
}

_URL = "http://127.0.0.1:9/"
_LOG = '(import "goclaw" "log" (func $log (param i32 i32 i32)))'
_HTTP = '(import "goclaw" "http_get" (func $http_get (param i32 i32) (result i64)))'
_HUNDRED_MB = 100 * 1024 * 1024

#: name -> (WAT, extra manifest fields, the error code the model must see)
HOSTILE: dict[str, tuple[str, dict[str, Any], str]] = {
    "spin": (skill_wat("(loop $l (br $l)) (i64.const 0)"), {}, "skill_out_of_fuel"),
    "chatty": (
        # Host calls burn no fuel: only the epoch deadline stops this.
        skill_wat(
            "(loop $l (call $log (i32.const 0) (i32.const 64) (i32.const 1)) (br $l)) "
            "(i64.const 0)",
            imports=_LOG,
            data="x",
        ),
        {"limits": {"fuel": 1_000_000_000}},
        "skill_deadline",
    ),
    "grow_bomb": (
        skill_wat(
            "(loop $l (br_if $l (i32.ne (memory.grow (i32.const 1)) (i32.const -1)))) unreachable"
        ),
        {"limits": {"fuel": 100_000_000}},
        "skill_memory_limit",
    ),
    "recurse": (
        skill_wat("(call $down) (i64.const 0)", funcs="(func $down (call $down))"),
        {},
        "skill_trap",
    ),
    "flood": (
        # Grows to 101 MiB and claims 100 MB of output.
        skill_wat(
            "(drop (memory.grow (i32.const 1616))) "
            + pack("(i32.const 0)", f"(i32.const {_HUNDRED_MB})")
        ),
        {"limits": {"memory_bytes": 110 * 1024 * 1024}},
        "skill_bad_output",
    ),
    "sneaky_http": (
        skill_wat(
            f"(call $wrap_ok (call $http_get (i32.const 64) (i32.const {len(_URL)})))",
            imports=_HTTP,
            data=_URL,
        ),
        {},  # no `http` capability
        "skill_capability_denied",
    ),
    "private_http": (
        skill_wat(
            f"(call $wrap_ok (call $http_get (i32.const 64) (i32.const {len(_URL)})))",
            imports=_HTTP,
            data=_URL,
        ),
        {"capabilities": ["http"]},  # the policy allows 127.0.0.1; the SSRF guard does not
        "ssrf_blocked",
    ),
    "bad_import": (
        skill_wat("(i64.const 0)", imports='(import "goclaw" "nope" (func (param i32)))'),
        {},
        "skill_abi_mismatch",
    ),
    "future_abi": (skill_wat("(i64.const 0)", abi=2), {}, "skill_abi_mismatch"),
}


@pytest.fixture
def fake() -> Iterator[FakeLLM]:
    server = FakeLLM(Script([]))
    with server.running() as base_url:
        server.base_url = base_url
        yield server


def skill_stack(make_stack, fake: FakeLLM, tools: list[str], **settings: Any) -> Stack:
    """A stack whose default agent has ``tools``; skills from the project and the bundle."""
    stack = make_stack()
    user_dir = stack.home.parent / "user-skills"
    user_dir.mkdir(exist_ok=True)
    config = {
        "agents": {"default": {"model": "openai/fake", "tools": tools}},
        "models": {"openai/fake": {"api_base": fake.base_url, "timeout_seconds": 30}},
        "skills": {**SKILL_SETTINGS, "user_dir": str(user_dir), **settings},
    }
    (stack.home / "config.yaml").write_text(yaml.safe_dump(config))
    (stack.home / "policy.yaml").write_text(POLICY)
    return stack


def call(skill: str, **arguments: Any) -> list[dict[str, Any]]:
    """The model's side of one turn: call the skill, then answer."""
    return [{"tool_calls": [{"name": skill, "arguments": arguments}]}, {"content": "done"}]


def run_turn(stack: Stack, prompt: str = "go", timeout: float = 60) -> int:
    submitted, _ = submit_turn(stack.broker, agent="default", prompt=prompt)
    task = stack.wait_terminal([submitted.task_id], timeout=timeout)[submitted.task_id]
    assert task.state == TaskState.SUCCEEDED, task
    return submitted.task_id


def tool_result(stack: Stack, task_id: int) -> dict[str, Any]:
    [result] = [e.data for e in stack.broker.events(task_id) if e.type == "tool.result"]
    return result


def audit(stack: Stack, *, task_id: int | None = None, capability: str | None = None) -> list:
    records = AuditLog(stack.broker.db, audit_path(stack.home)).query(task_id=task_id, limit=500)
    return [r for r in records if capability is None or r.capability == capability]


@sqlite_only
def test_hostile_skills_are_contained_with_their_codes_and_the_worker_keeps_serving(
    make_stack, fake
):
    stack = skill_stack(make_stack, fake, [*HOSTILE, "text_stats"], quarantine_faults=100)
    for name, (wat, fields, _) in HOSTILE.items():
        write_skill(stack.home / "skills" / name, name, wat, **fields)
    worker = stack.worker()
    for name, (_, _, code) in HOSTILE.items():
        fake.script = Script.from_data(
            {"replies": [*call(name), *call("text_stats", text="still here")]}
        )
        started = time.monotonic()
        task_id = run_turn(stack, f"run {name}")
        result = tool_result(stack, task_id)
        assert result["ok"] is False and result["error"] == code, (name, result)
        assert time.monotonic() - started < 10, name
        # The fault is audited (a refusal by the host is audited as a denial instead).
        decisions = {r.decision for r in audit(stack, task_id=task_id)}
        assert decisions & {"fault", "deny"}, (name, decisions)
        # The same worker serves the next turn, and a well-behaved skill in it.
        ordinary = run_turn(stack, "count")
        assert tool_result(stack, ordinary)["ok"] is True
        assert worker.alive()
    assert "still here" not in worker.log()  # arguments stay out of the log
    assert stack.cli_json("audit", "verify")["ok"] is True


def test_quarantine_survives_a_worker_restart_and_skill_enable_lifts_it(make_stack, fake):
    stack = skill_stack(make_stack, fake, ["spin"])
    write_skill(stack.home / "skills" / "spin", "spin", HOSTILE["spin"][0])
    worker = stack.worker()
    codes = []
    for _ in range(4):
        fake.script = Script.from_data({"replies": call("spin")})
        codes.append(tool_result(stack, run_turn(stack))["error"])
    assert codes == ["skill_out_of_fuel"] * 3 + ["skill_quarantined"]
    assert [r.decision for r in audit(stack, capability="skills.spin")].count("quarantine") == 1

    cache = stack.home / "cache" / "wasm"
    cached = {path.name: path.stat().st_mtime_ns for path in cache.iterdir()}
    assert cached, "the worker cached the compiled module"
    worker.kill()
    restarted = stack.worker()
    fake.script = Script.from_data({"replies": call("spin")})
    assert tool_result(stack, run_turn(stack))["error"] == "skill_quarantined"
    # The restarted worker took the module from the cache: nothing compiled, nothing written.
    assert {path.name: path.stat().st_mtime_ns for path in cache.iterdir()} == cached
    assert "loaded from the cache" in restarted.log()
    assert "compiled module" not in restarted.log()
    listed = {s["name"]: s for s in stack.cli_json("skill", "list")["skills"]}
    assert listed["spin"]["state"].startswith("quarantined")

    assert stack.cli_json("skill", "enable", "spin")["was_quarantined"] is True
    fake.script = Script.from_data({"replies": call("spin")})
    assert tool_result(stack, run_turn(stack))["error"] == "skill_out_of_fuel"


@sqlite_only
def test_a_reload_whose_self_test_traps_keeps_the_old_version_serving(make_stack, fake):
    stack = skill_stack(make_stack, fake, ["versioned"])
    folder = stack.home / "skills" / "versioned"
    examples = [{"input": {}, "output": "v1"}]
    write_skill(folder, "versioned", ok_wat("v1"), examples=examples)
    worker = stack.worker(concurrency=2)
    answers: list[str] = []
    stop = threading.Event()

    def keep_calling() -> None:
        while not stop.is_set():
            fake.script = Script.from_data({"replies": call("versioned")})
            answers.append(tool_result(stack, run_turn(stack))["content"])

    caller = threading.Thread(target=keep_calling)
    caller.start()
    try:
        wait_for(lambda: len(answers) >= 2, timeout=30, what="calls before the reload")
        # v2 answers "v2" but traps in its self-test (the example's input is {}).
        trapping = skill_wat(
            "(if (i32.le_u (local.get $len) (i32.const 2)) (then unreachable)) "
            + pack("(i32.const 64)", "(i32.const 11)"),
            data='{"ok":"v2"}',
        )
        replace_file(folder / "versioned.wasm", wasm_of(trapping))
        wait_for(
            lambda: any(r.decision == "reject" for r in audit(stack, capability="skills.reload")),
            timeout=15,
            what="the reload to be rejected",
        )
        before = len(answers)
        wait_for(lambda: len(answers) >= before + 2, timeout=30, what="calls after the reload")
    finally:
        stop.set()
        caller.join(timeout=60)
    assert answers and all(answer == "v1" for answer in answers), answers
    [rejected] = [r for r in audit(stack, capability="skills.reload") if r.decision == "reject"]
    assert "self-test" in rejected.reason and "skill_trap" in rejected.reason
    assert "versioned" in worker.log() and "self-test" in worker.log()


@sqlite_only
def test_an_agent_uses_bundled_skills_end_to_end(make_stack, fake):
    stack = skill_stack(make_stack, fake, ["text_stats", "tally", "skill_read", "skill_search"])
    (stack.home / "policy.yaml").write_text(
        "version: 1\nallow: [skills.text_stats, skills.tally, tools.skill_read, "
        "tools.skill_search]\n"
    )
    write_instructions(
        stack.home / "skills" / "release_notes",
        "release_notes",
        body="SECRET-STEPS: read the changelog, then group the entries by component.",
        description="How to write release notes for this project.",
    )
    write_instructions(
        stack.home / "skills" / "cloud_deploy",
        "cloud_deploy",
        description="Deploy to the cloud.",
        requires={"env": ["GOCLAW_TEST_NO_SUCH_VARIABLE"]},
    )
    stack.worker()
    text = "Grüße aus Köln 👋\nzweite Zeile"
    fake.script = Script.from_data(
        {
            "replies": [
                *call("skill_read", name="release_notes"),
                *call("skill_search", query="count words in a text"),
                *call("text_stats", text=text),
                *call("tally", counter="visits", add=2),
                *call("tally", counter="visits"),
            ]
        }
    )
    # Progressive disclosure: the prompt names eligible instruction skills, the text
    # comes only with skill_read, and an ineligible skill is left out.
    read = tool_result(stack, run_turn(stack, "write the release notes"))
    system = fake.requests[0]["messages"][0]["content"]
    assert "- release_notes: How to write release notes" in system
    assert "SECRET-STEPS" not in system and "cloud_deploy" not in system
    assert "SECRET-STEPS" in json.loads(read["content"])["instructions"]
    found = tool_result(stack, run_turn(stack, "which skill counts words?"))
    assert json.loads(found["content"])[0]["name"] == "text_stats"
    stats = tool_result(stack, run_turn(stack, "count this"))
    assert stats["ok"] is True
    assert json.loads(stats["content"]) == {
        "bytes": len(text.encode()),
        "chars": len(text),
        "words": len(text.split()),
        "lines": 2,
    }
    first = tool_result(stack, run_turn(stack, "tally"))
    second = tool_result(stack, run_turn(stack, "tally again"))
    assert json.loads(first["content"])["value"] == 2
    assert json.loads(second["content"])["value"] == 3
    # The model saw the skill as a tool, with the manifest's schema.
    request = next(
        r for r in fake.requests if any(t["function"]["name"] == "tally" for t in r["tools"])
    )
    [tally] = [t for t in request["tools"] if t["function"]["name"] == "tally"]
    assert tally["function"]["parameters"]["required"] == ["counter"]


@sqlite_only
def test_skill_install_stages_first_and_a_running_worker_picks_it_up(
    make_stack, fake, tmp_path: Path
):
    stack = skill_stack(make_stack, fake, ["text_stats"])
    spin = HOSTILE["spin"][0]
    broken = write_skill(tmp_path / "broken", "greeter", spin, examples=[{"input": {}}])
    result = stack.cli("skill", "install", str(broken), check=False)
    assert result.returncode == 1 and "skill_out_of_fuel" in result.stderr
    assert not (stack.home / "skills" / "greeter").exists()

    stack.worker()
    good = write_skill(tmp_path / "good", "greeter", ok_wat("hello"), examples=[{"input": {}}])
    assert stack.cli_json("skill", "install", str(good))["name"] == "greeter"
    config = yaml.safe_load((stack.home / "config.yaml").read_text())
    config["agents"]["default"]["tools"] = ["greeter"]
    (stack.home / "config.yaml").write_text(yaml.safe_dump(config))

    def greeted() -> bool:  # the worker re-reads config.yaml and the skills within a second
        fake.script = Script.from_data({"replies": call("greeter")})
        return tool_result(stack, run_turn(stack))["content"] == "hello"

    wait_for(greeted, timeout=20, what="the worker to offer the installed skill")
    tested = stack.cli_json("skill", "test", "greeter", "--input", "{}", "--agent", "default")
    assert tested["ok"] == "hello"
    shown = stack.cli_json("skill", "show", "greeter")
    assert shown["state"] == "live" and shown["source"] == "project" and shown["faults"] == []
    refused = stack.cli("skill", "remove", "text_stats", check=False)
    assert refused.returncode == 1 and "installed skill" in refused.stderr
    assert stack.cli_json("skill", "remove", "greeter")["name"] == "greeter"
    assert not (stack.home / "skills" / "greeter").exists()
