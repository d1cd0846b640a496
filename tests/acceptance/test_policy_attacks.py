"""Issue 5's attacks against real processes: each one stopped, audited, the worker serving.

A real ``goclaw worker`` runs the agent; the model is ``FakeLLM`` over loopback and
plays the attacker, asking for the tool calls below. The policy is a real
``policy.yaml`` in the stack's home. After every attack the same worker answers an
ordinary turn. Approvals go through a real gateway (ACP) and the CLI, across SIGKILLs.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
import yaml

from goclaw.agent.turns import submit_turn
from goclaw.audit import AuditLog, audit_path
from goclaw.fake_llm import FakeLLM, Script
from goclaw.states import TaskState
from tests.acceptance.conftest import AUTH_TOKEN, Stack, wait_for
from tests.acp_client import AcpClient

pytestmark = pytest.mark.slow
#: For attacks the database plays no part in (the decision and its refusal happen in the
#: worker): SQLite only. What must be durable (parked runs, approvals across restarts, the
#: audit of a rejected reload) runs on both.
sqlite_only = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)

POLICY = """\
version: 1
allow: [tools.read_file, tools.write_file, tools.list_dir, tools.web_fetch, tools.exec,
        net.http, acp.read, acp.mutate]
paths: [.]
domains: [127.0.0.1, "::1", 169.254.169.254, localhost, 127.0.0.2]
networks: [127.0.0.2/32]
approvals: {exec: ask}
approval_timeout: {timeout}
"""


@pytest.fixture
def fake() -> Iterator[tuple[FakeLLM, str]]:
    server = FakeLLM(Script([]))
    with server.running() as base_url:
        yield server, base_url


def policy_stack(make_stack, fake, *, timeout: str = "60s", tools: list[str] | None = None):
    _, base_url = fake
    stack = make_stack()
    tools = tools or ["read_file", "write_file", "list_dir", "web_fetch", "exec"]
    config = {
        "agents": {"default": {"model": "openai/fake", "tools": tools}},
        "models": {"openai/fake": {"api_base": base_url, "timeout_seconds": 30}},
    }
    (stack.home / "config.yaml").write_text(yaml.safe_dump(config))
    (stack.home / "policy.yaml").write_text(POLICY.replace("{timeout}", timeout))
    workspace = stack.home / "workspaces" / "default"
    workspace.mkdir(parents=True)
    return stack, workspace


def attack(tool: str, **arguments: Any) -> list[dict[str, Any]]:
    """The model's side of one attack: the call, then a plain answer."""
    return [
        {"tool_calls": [{"name": tool, "arguments": arguments}]},
        {"content": f"{tool} attempted"},
    ]


def tool_results(stack: Stack, task_id: int) -> list[dict[str, Any]]:
    return [e.data for e in stack.broker.events(task_id) if e.type == "tool.result"]


def audited(stack: Stack, task_id: int) -> list[Any]:
    return AuditLog(stack.broker.db, audit_path(stack.home)).query(task_id=task_id, limit=100)


def run_turn(stack: Stack, prompt: str, timeout: float = 60) -> int:
    submitted, _ = submit_turn(stack.broker, agent="default", prompt=prompt)
    task = stack.wait_terminal([submitted.task_id], timeout=timeout)[submitted.task_id]
    assert task.state == TaskState.SUCCEEDED, task
    return submitted.task_id


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True


def serve(host: str, handler: type) -> tuple[_Server, int]:
    server = _Server((host, 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


@sqlite_only
def test_every_attack_is_stopped_audited_and_the_worker_keeps_serving(make_stack, fake, tmp_path):
    hits: list[str] = []

    class Secret(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"internal secret")

        def log_message(self, *args: Any) -> None:
            pass

    secret, secret_port = serve("127.0.0.1", Secret)

    class Redirect(Secret):
        def do_GET(self) -> None:
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{secret_port}/private")
            self.end_headers()

    redirect, redirect_port = serve("127.0.0.2", Redirect)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "passwd").write_text("root:x:0:0")

    attacks = [
        ("read_file", {"path": "../../outside/passwd"}, "policy_denied"),
        ("read_file", {"path": "link/passwd"}, "path_outside_workspace"),
        ("read_file", {"path": str(outside / "passwd")}, "policy_denied"),
        ("web_fetch", {"url": f"http://127.0.0.1:{secret_port}/"}, "ssrf_blocked"),
        ("web_fetch", {"url": f"http://[::1]:{secret_port}/"}, "ssrf_blocked"),
        ("web_fetch", {"url": "http://169.254.169.254/latest/meta-data/"}, "ssrf_blocked"),
        ("web_fetch", {"url": f"http://localhost:{secret_port}/"}, "ssrf_blocked"),
        ("web_fetch", {"url": f"http://127.0.0.2:{redirect_port}/go"}, "ssrf_blocked"),
    ]
    replies: list[dict[str, Any]] = []
    for tool, arguments, _ in attacks:
        replies += [*attack(tool, **arguments), {"content": "an ordinary answer"}]
    server, _ = fake
    server.script = Script.from_data({"replies": replies})
    stack, workspace = policy_stack(make_stack, fake)
    os.symlink(outside, workspace / "link")
    worker = stack.worker()
    try:
        for tool, arguments, code in attacks:
            task_id = run_turn(stack, f"please {tool} {arguments}")
            [result] = tool_results(stack, task_id)
            assert result["ok"] is False and result["error"] == code, (arguments, result)
            assert "root:x" not in result["content"] and "internal secret" not in result["content"]
            denials = [r for r in audited(stack, task_id) if r.decision == "deny"]
            assert denials, f"{tool} {arguments} was not audited"
            assert all(r.agent == "default" and r.policy_version for r in denials)
            # The same worker serves the next, ordinary turn.
            run_turn(stack, "and now something harmless")
            assert worker.alive()
    finally:
        for server in (secret, redirect):
            server.shutdown()
            server.server_close()
    assert hits == [], "no request reached the private server"
    assert stack.cli_json("audit", "verify")["ok"] is True


@sqlite_only
def test_exec_without_the_capability_is_refused_and_audited(make_stack, fake):
    server, _ = fake
    server.script = Script.from_data({"replies": attack("exec", command="id")})
    stack, _ = policy_stack(make_stack, fake)
    (stack.home / "policy.yaml").write_text(
        POLICY.replace("tools.exec,", "").replace("{timeout}", "60s").replace("{exec: ask}", "{}")
    )
    stack.worker()
    task_id = run_turn(stack, "run id")
    [result] = tool_results(stack, task_id)
    assert result["error"] == "policy_denied" and "tools.exec is not allowed" in result["content"]
    [denied] = [r for r in audited(stack, task_id) if r.capability == "tools.exec"]
    assert denied.decision == "deny" and denied.subject == "id"


def test_exec_under_ask_with_no_answer_times_out_as_a_denial(make_stack, fake):
    server, _ = fake
    server.script = Script.from_data({"replies": attack("exec", command="touch pwned")})
    stack, workspace = policy_stack(make_stack, fake, timeout="2s")
    stack.worker(concurrency=1)
    submitted, _ = submit_turn(stack.broker, agent="default", prompt="touch it")
    wait_for(
        lambda: stack.broker.get(submitted.task_id).state == TaskState.RETRY_WAIT,
        timeout=30,
        what="the turn to park",
    )
    # Parked, the task holds no worker slot: a concurrency-1 worker runs another turn.
    server.script = Script.from_data(
        {"replies": [{"content": "meanwhile"}, *attack("exec", command="touch pwned")[1:]]}
    )
    run_turn(stack, "something else meanwhile")
    task = stack.wait_terminal([submitted.task_id], timeout=30)[submitted.task_id]
    assert task.state == TaskState.SUCCEEDED
    [result] = tool_results(stack, submitted.task_id)
    assert result["error"] == "approval_timeout"
    assert not (workspace / "pwned").exists()
    [request] = stack.cli_json("approvals", "list", "--state", "all")
    assert request["state"] == "expired" and request["decided_by"] == "timeout"
    verdicts = [r.decision for r in audited(stack, submitted.task_id)]
    assert verdicts == ["ask", "deny"]


def test_an_approval_given_after_the_gateway_and_worker_restart_resumes_the_run(make_stack, fake):
    server, _ = fake
    server.script = Script.from_data(
        {"replies": [*attack("exec", command="echo approved > done.txt")[:1], {"content": "ran"}]}
    )
    stack, workspace = policy_stack(make_stack, fake)
    worker = stack.worker()
    gateway = stack.gateway()
    port = int(gateway.url.rsplit(":", 1)[1])

    async def ask() -> tuple[dict[str, Any], int]:
        async with aiohttp.ClientSession() as http:
            acp = await AcpClient.connect(http, gateway.url, AUTH_TOKEN)
            await acp.hello()
            chat = await acp.call("agent.chat", content="write done.txt")
            await acp.call("session.events.subscribe", session_key=chat["session_key"])
            events = await acp.events_until(lambda e: e["type"] == "approval.required")
            listed = await acp.call("approval.list")
            await acp.close()
            [required] = [e for e in events if e["type"] == "approval.required"]
            assert [a["id"] for a in listed["approvals"]] == [required["data"]["approval_id"]]
            return required["data"], chat["task_id"]

    required, task_id = asyncio.run(ask())
    assert required["tool"] == "exec" and required["subject"] == "echo approved > done.txt"
    # Everything restarts while the request waits; nothing about it is in memory.
    worker.kill()
    gateway.kill()
    worker = stack.worker()
    gateway = stack.gateway(port)

    async def approve() -> dict[str, Any]:
        async with aiohttp.ClientSession() as http:
            acp = await AcpClient.connect(http, gateway.url, AUTH_TOKEN)
            await acp.hello()
            answered = await acp.call(
                "approval.respond", approval_id=required["approval_id"], decision="approve"
            )
            again = await acp.request(
                "approval.respond", approval_id=required["approval_id"], decision="deny"
            )
            await acp.close()
            assert again["error"]["data"]["name"] == "conflict"
            return answered

    answered = asyncio.run(approve())
    assert answered["state"] == "approved" and answered["decided_by"].startswith("acp:")
    task = stack.wait_terminal([task_id], timeout=30)[task_id]
    assert task.state == TaskState.SUCCEEDED and json.loads(task.result)["reply"] == "ran"
    assert (workspace / "done.txt").read_text().strip() == "approved"
    verdicts = [r.decision for r in audited(stack, task_id) if r.capability == "tools.exec"]
    assert verdicts == ["ask", "approve", "allow"]


@sqlite_only
def test_the_cli_answers_approvals(make_stack, fake):
    server, _ = fake
    server.script = Script.from_data(
        {"replies": [*attack("exec", command="echo hi")[:1], {"content": "denied, fine"}]}
    )
    stack, _ = policy_stack(make_stack, fake)
    stack.worker()
    # The user who submitted and waits is told what to run.
    waiting = subprocess.Popen(
        [sys.executable, "-m", "goclaw.cli", "submit", "say hi", "--wait", "--timeout", "60"],
        env=stack.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        [pending] = wait_for(
            lambda: stack.cli_json("approvals", "list"), timeout=30, what="a pending approval"
        )
        assert pending["capability"] == "tools.exec" and pending["subject"] == "echo hi"
        denied = stack.cli_json("approvals", "deny", str(pending["id"]), "--note", "no shell")
        assert denied["state"] == "denied" and denied["decided_by"].startswith("cli:")
        out, err = waiting.communicate(timeout=60)
    finally:
        waiting.kill()
    assert waiting.returncode == 0, err
    assert f"waits for approval {pending['id']}: goclaw approvals approve" in err
    assert "approval_denied" in err and "denied, fine" in out
    task = stack.broker.get(pending["task_id"])
    assert task.state == TaskState.SUCCEEDED
    [result] = tool_results(stack, task.id)
    assert result["error"] == "approval_denied" and "no shell" in result["content"]
    again = stack.cli("approvals", "approve", str(pending["id"]), check=False)
    assert again.returncode == 1 and "already denied" in again.stderr


def test_garbage_policy_while_workers_run_keeps_the_old_one_and_is_audited(make_stack, fake):
    server, _ = fake
    server.script = Script.from_data(
        {
            "replies": [
                *attack("read_file", path="notes.txt"),
                *attack("read_file", path="notes.txt"),
            ]
        }
    )
    stack, workspace = policy_stack(make_stack, fake)
    (workspace / "notes.txt").write_text("still readable")
    worker = stack.worker()
    before = stack.cli_json("audit", "--limit", "1000")
    (stack.home / "policy.yaml").write_text("version: 1\nallow: [tools.read_file\n\x00garbage")

    def rejected() -> list[dict[str, Any]]:
        records = stack.cli_json("audit", "--limit", "1000")[len(before) :]
        return [r for r in records if r["capability"] == "policy.reload"]

    [record] = wait_for(rejected, timeout=10, what="the rejected reload to be audited")
    assert record["decision"] == "reject" and "policy.yaml" in record["reason"]
    assert "policy not reloaded, keeping version" in worker.log()
    task_id = run_turn(stack, "read my notes")
    [result] = tool_results(stack, task_id)
    assert result["ok"] is True and "still readable" in result["content"]
    assert worker.alive()


@sqlite_only
def test_a_secret_echoed_by_a_tool_reaches_neither_the_model_nor_the_event_log(make_stack, fake):
    # Not shaped like a credential: only the configured value can give it away.
    secret = "correct-horse-battery-staple-42"
    server, base_url = fake
    server.script = Script.from_data({"replies": attack("read_file", path="settings.env")})
    stack = make_stack(FAKE_PROVIDER_KEY=secret)
    config = {
        "agents": {"default": {"model": "openai/fake", "tools": ["read_file"]}},
        "models": {
            "openai/fake": {
                "api_base": base_url,
                "timeout_seconds": 30,
                "api_key_env": "FAKE_PROVIDER_KEY",
            }
        },
    }
    (stack.home / "config.yaml").write_text(yaml.safe_dump(config))
    (stack.home / "policy.yaml").write_text(POLICY.replace("{timeout}", "60s"))
    workspace = stack.home / "workspaces" / "default"
    workspace.mkdir(parents=True)
    (workspace / "settings.env").write_text(f"PROVIDER_KEY={secret}\n")
    stack.worker()
    task_id = run_turn(stack, "show me the settings")
    model_input = json.dumps(server.requests[-1]["messages"])
    assert secret not in model_input
    assert "PROVIDER_KEY=[REDACTED]" in model_input
    rows = stack.broker.db.fetchall("SELECT detail FROM task_events WHERE task_id = ?", (task_id,))
    stored = " ".join(r[0] or "" for r in rows)
    assert secret not in stored and "PROVIDER_KEY=[REDACTED]" in stored
    messages = stack.broker.db.fetchall("SELECT message FROM session_messages")
    assert secret not in " ".join(m[0] for m in messages)
    assert all(secret not in w.log() for w in stack.workers)
