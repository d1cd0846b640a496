"""Agent turns through real worker processes and the fake model server over loopback.

The worker is a real ``goclaw worker`` subprocess; the model is ``FakeLLM``
in this process, reached over HTTP; crashes are real SIGKILLs (one of them
sent by a tool's own shell command to its parent, the worker).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from goclaw.agent.definitions import RELOAD_CHECK_SECONDS
from goclaw.agent.sessions import SessionStore
from goclaw.agent.turns import submit_turn
from goclaw.fake_llm import FakeLLM, Script
from goclaw.states import TaskState
from tests.acceptance.conftest import Stack, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def fake() -> Iterator[tuple[FakeLLM, str]]:
    server = FakeLLM(Script([]))
    with server.running() as base_url:
        yield server, base_url


def agent_stack(make_stack, fake, script: dict[str, Any], **agent: Any) -> Stack:
    server, base_url = fake
    server.script = Script.from_data(script)
    stack = make_stack()
    settings = {"model": "openai/fake", "tools": ["read_file", "write_file", "list_dir", "exec"]}
    settings.update(agent)
    chain = [settings["model"], *settings.get("fallbacks", [])]
    config = {
        "agents": {"default": settings},
        "models": {m: {"api_base": base_url, "timeout_seconds": 30} for m in chain},
    }
    (stack.home / "config.yaml").write_text(yaml.safe_dump(config))
    return stack


def events_of(stack: Stack, task_id: int, type: str) -> list[dict[str, Any]]:
    return [e.data for e in stack.broker.events(task_id) if e.type == type]


def turn_messages(stack: Stack, session: str, task_id: int) -> list[dict[str, Any]]:
    return [m.message for m in SessionStore(stack.broker.db).turn_messages(session, task_id)]


def test_cli_turns_stream_and_remember_the_session(make_stack, fake):
    script = {
        "replies": [
            {"content": "Hello Ada, nice to meet you.", "chunk_size": 2},
            {"tool_calls": [{"name": "read_file", "arguments": {"path": "notes.txt"}}]},
            {"content": "Your name is Ada and your notes say: buy milk."},
        ]
    }
    stack = agent_stack(make_stack, fake, script)
    workspace = stack.home / "workspaces" / "default"
    workspace.mkdir(parents=True)
    (workspace / "notes.txt").write_text("buy milk")
    stack.worker()
    first = stack.cli("submit", "I am Ada.", "--session", "ada", "--wait")
    assert "Hello Ada, nice to meet you." in first.stdout
    second = stack.cli_json("submit", "Who am I, and what do my notes say?", "-s", "ada", "--wait")
    assert second["state"] == "SUCCEEDED"
    assert second["reply"] == "Your name is Ada and your notes say: buy milk."
    server, _ = fake
    last = server.requests[-1]["messages"]
    assert [m["content"] for m in last if m["role"] == "user"] == [
        "I am Ada.",
        "Who am I, and what do my notes say?",
    ]
    assert any(m["role"] == "tool" and "buy milk" in m["content"] for m in last)
    chunks = events_of(stack, second["task_id"], "chunk")
    assert "".join(c["delta"] for c in chunks if c["reply"] == 1) == second["reply"]
    shown = stack.cli_json("session", "show", "ada")
    assert [m["role"] for m in shown["messages"]] == [
        "user",
        "assistant",
        "user",
        "assistant",
        "tool",
        "assistant",
    ]
    assert shown["usage"]["model_calls"] == 3 and shown["usage"]["prompt_tokens"] > 0
    assert [s["session_key"] for s in stack.cli_json("session", "list")] == ["ada"]
    [agent] = stack.cli_json("agents")
    assert agent["id"] == "default" and agent["models"] == ["openai/fake"]


def test_failover_in_a_worker_records_the_event(make_stack, fake):
    script = {
        "models": {
            "primary": [{"status": 429, "retry_after": 5}],
            "backup": [{"content": "served by the backup"}],
        }
    }
    stack = agent_stack(
        make_stack, fake, script, model="openai/primary", fallbacks=["openai/backup"]
    )
    stack.worker()
    submitted, _ = submit_turn(stack.broker, agent="default", prompt="hi")
    task = stack.wait_terminal([submitted.task_id])[submitted.task_id]
    assert task.state == TaskState.SUCCEEDED
    assert json.loads(task.result)["reply"] == "served by the backup"
    [failover] = events_of(stack, submitted.task_id, "provider.failover")
    assert failover["from"] == "openai/primary" and failover["to"] == "openai/backup"
    assert failover["reason"] == "rate_limited" and failover["retry_after"] == 5.0


def test_sigkill_mid_stream_retries_from_history_without_duplicates(make_stack, fake):
    slow = {"content": "a slow reply that streams for a long while " * 3, "chunk_delay": 0.1}
    script = {"replies": [slow, {"content": "the reply after the crash"}]}
    stack = agent_stack(make_stack, fake, script)
    worker = stack.worker()
    submitted, session = submit_turn(stack.broker, agent="default", prompt="tell me slowly")
    task_id = submitted.task_id
    wait_for(lambda: events_of(stack, task_id, "chunk"), timeout=20, what="the first chunk")
    worker.kill()
    stack.worker()
    task = stack.wait_terminal([task_id])[task_id]
    assert task.state == TaskState.SUCCEEDED, task.last_error
    messages = turn_messages(stack, session, task_id)
    assert [(m["role"], m["content"]) for m in messages] == [
        ("user", "tell me slowly"),
        ("assistant", "the reply after the crash"),
    ]
    assert [e["attempt"] for e in events_of(stack, task_id, "run.started")] == [1, 2]


def test_sigkill_right_after_exec_does_not_run_it_again(make_stack, fake):
    command = "echo ran >> effects.log; kill -9 $PPID; sleep 5"
    script = {
        "replies": [
            {"tool_calls": [{"id": "x1", "name": "exec", "arguments": {"command": command}}]},
            {"content": "the command's outcome is unknown, so I did not repeat it"},
        ]
    }
    stack = agent_stack(make_stack, fake, script)
    worker = stack.worker()
    submitted, session = submit_turn(stack.broker, agent="default", prompt="run it once")
    task_id = submitted.task_id
    wait_for(lambda: not worker.alive(), timeout=20, what="the command to kill its worker")
    stack.worker()
    task = stack.wait_terminal([task_id])[task_id]
    assert task.state == TaskState.SUCCEEDED, task.last_error
    log = stack.home / "workspaces" / "default" / "effects.log"
    assert log.read_text() == "ran\n"
    server, _ = fake
    [tool_result] = [m for m in server.requests[-1]["messages"] if m["role"] == "tool"]
    assert json.loads(tool_result["content"])["error"] == "interrupted"
    roles = [m["role"] for m in turn_messages(stack, session, task_id)]
    assert roles == ["user", "assistant", "tool", "assistant"]


def test_sigkill_after_write_file_replays_instead_of_rewriting(make_stack, fake):
    write = {"id": "w1", "name": "write_file", "arguments": {"path": "out.txt", "content": "v1"}}
    script = {
        "replies": [
            {"tool_calls": [write]},
            {"content": "never finishes", "stall_after": 0},
            {"content": "written once"},
        ]
    }
    stack = agent_stack(make_stack, fake, script)
    worker = stack.worker()
    submitted, session = submit_turn(stack.broker, agent="default", prompt="write it")
    task_id = submitted.task_id
    server, _ = fake
    wait_for(lambda: len(server.requests) >= 2, timeout=20, what="the stalled second request")
    target = stack.home / "workspaces" / "default" / "out.txt"
    assert target.read_text() == "v1"
    target.write_text("changed by the user")  # a second write_file would undo this
    worker.kill()
    stack.worker()
    task = stack.wait_terminal([task_id])[task_id]
    assert task.state == TaskState.SUCCEEDED, task.last_error
    assert target.read_text() == "changed by the user"
    assert len(events_of(stack, task_id, "tool.call")) == 1
    assert json.loads(task.result)["reply"] == "written once"
    roles = [m["role"] for m in turn_messages(stack, session, task_id)]
    assert roles == ["user", "assistant", "tool", "assistant"]


def test_running_worker_picks_up_config_edits_and_running_turns_keep_theirs(make_stack, fake):
    slow = {"content": "old definition, slowly " * 4, "chunk_delay": 0.05}
    script = {
        "models": {
            "first": [slow],
            "second": [{"content": "new model answers"}],
            "helper": [{"content": "the added agent answers"}],
        }
    }
    stack = agent_stack(make_stack, fake, script, model="openai/first")
    stack.worker()
    running, _ = submit_turn(stack.broker, agent="default", prompt="one")
    wait_for(lambda: events_of(stack, running.task_id, "chunk"), timeout=20, what="streaming")

    _, base_url = fake
    config = yaml.safe_load((stack.home / "config.yaml").read_text())
    config["agents"]["default"]["model"] = "openai/second"
    config["agents"]["helper"] = {"model": "openai/helper"}
    config["models"].update({m: {"api_base": base_url} for m in ("openai/second", "openai/helper")})
    (stack.home / "config.yaml").write_text(yaml.safe_dump(config))
    time.sleep(RELOAD_CHECK_SECONDS + 0.1)  # the longest a worker may take to look

    changed = stack.cli_json("submit", "two", "--wait", "--timeout", "30")
    added = stack.cli_json("submit", "three", "--agent", "helper", "--wait", "--timeout", "30")
    first = stack.wait_terminal([running.task_id])[running.task_id]
    assert json.loads(first.result)["model"] == "openai/first"
    assert changed["reply"] == "new model answers"
    assert added["reply"] == "the added agent answers"
    [old_start] = events_of(stack, running.task_id, "run.started")
    [new_start] = events_of(stack, changed["task_id"], "run.started")
    assert old_start["agent_version"] != new_start["agent_version"]

    del config["agents"]["helper"]
    (stack.home / "config.yaml").write_text(yaml.safe_dump(config))
    removed = stack.cli("submit", "four", "--agent", "helper", check=False)
    assert removed.returncode == 1 and "unknown agent 'helper'" in removed.stderr
    time.sleep(RELOAD_CHECK_SECONDS + 0.1)
    queued, _ = submit_turn(stack.broker, agent="helper", prompt="submitted around the CLI")
    gone = stack.wait_terminal([queued.task_id])[queued.task_id]
    assert gone.state == TaskState.FAILED and gone.reason == "unknown_agent"


def test_tool_errors_reach_the_model_and_the_turn_goes_on(make_stack, fake):
    calls = [
        {"id": "bad-args", "name": "read_file", "arguments": {"path": 7}},
        {"id": "no-such", "name": "teleport", "arguments": {}},
        {"id": "fails", "name": "read_file", "arguments": {"path": "../../etc/passwd"}},
    ]
    script = {"replies": [{"tool_calls": calls}, {"content": "none of that worked"}]}
    stack = agent_stack(make_stack, fake, script)
    stack.worker()
    answer = stack.cli_json("submit", "try things", "--wait", "--timeout", "30")
    assert answer["state"] == "SUCCEEDED" and answer["reply"] == "none of that worked"
    server, _ = fake
    results = [m for m in server.requests[-1]["messages"] if m["role"] == "tool"]
    assert [json.loads(m["content"])["error"] for m in results] == [
        "invalid_arguments",
        "unknown_tool",
        "policy_denied",  # the policy's path allowlist, before the tool's own confinement
    ]


def test_context_overflow_compacts_in_a_worker_and_fails_clearly_when_it_cannot(make_stack, fake):
    overflow = {
        "status": 400,
        "error": "This model's maximum context length is 50 tokens. However, your messages "
        "resulted in 90 tokens. Please reduce the length of the messages.",
    }
    script = {
        "replies": [
            {"content": "first answer"},
            overflow,
            {"content": "SUMMARY of the first exchange"},
            {"content": "answered after compaction"},
            overflow,
        ],
        "repeat_last": True,
    }
    stack = agent_stack(make_stack, fake, script, keep_recent_messages=1)
    stack.worker()
    stack.cli_json("submit", "first question", "-s", "long", "--wait", "--timeout", "30")
    second = stack.cli_json("submit", "second", "-s", "long", "--wait", "--timeout", "30")
    assert second["reply"] == "answered after compaction"
    assert events_of(stack, second["task_id"], "compaction")[0]["method"] == "summary"
    failing = stack.cli("submit", "x" * 500, "-s", "fresh", "--wait", "--json", check=False)
    third = json.loads(failing.stdout)
    assert failing.returncode == 1 and third["state"] == "FAILED"
    task = stack.broker.get(third["task_id"])
    assert task.reason == "context_overflow" and "context window" in task.last_error
