"""Approvals in-process: a real broker and database, the real policy engine, audit log and
fake model server. ``ask`` parks the task (no worker slot held), an answer wakes it, no
answer is a denial, allow-always persists. Restarts of real processes: tests/acceptance."""

from __future__ import annotations

import json
import time

import pytest

from goclaw.approvals import ApprovalError
from goclaw.states import TaskState
from tests.integration.agent_harness import agent_harness, tool_error, tool_messages

POLICY = """\
version: 1
allow: [tools.read_file, tools.write_file, tools.list_dir]
paths: [.]
approvals: {write_file: ask}
approval_timeout: 30s
"""

WRITE = {"name": "write_file", "arguments": {"path": "out.txt", "content": "hello"}}


@pytest.fixture
def home(tmp_path):
    path = tmp_path / "home"
    path.mkdir()
    return path


def script(*replies):
    return {"replies": list(replies)}


def decisions(h, capability="tools.write_file"):
    return [(r.decision, r.reason) for r in h.audit.query(limit=1000) if r.capability == capability]


def test_ask_parks_the_task_and_an_approval_resumes_it(broker, home):
    replies = script({"tool_calls": [{"id": "w1", **WRITE}]}, {"content": "written"})
    with agent_harness(broker, home, replies) as h:
        h.use_policy(POLICY)
        parked = h.turn("write it")
        task = broker.get(parked.task_id)
        # Parked: no lease, no attempt used, claimable only at the deadline.
        assert task.state == TaskState.RETRY_WAIT and task.lease_owner is None
        assert task.attempts == 0
        [request] = h.approvals.list()
        assert request.task_id == parked.task_id and request.capability == "tools.write_file"
        assert request.subject == "out.txt" and request.arguments["content"] == "hello"
        assert task.run_after == pytest.approx(request.expires_at)
        assert request.expires_at - request.created_at == pytest.approx(30)
        [required] = parked.of_type("approval.required")
        assert required["approval_id"] == request.id and required["tool"] == "write_file"
        assert parked.of_type("run.waiting")[0]["approvals"] == [request.id]
        assert not (h.workspace / "out.txt").exists()
        assert broker.claim("other-worker") == []  # nothing due while it waits

        answered = h.approvals.respond(request.id, approve=True, by="test")
        assert answered.state == "approved"
        assert broker.get(parked.task_id).run_after <= time.time()
        resumed = h.run_next()
    assert resumed.task_id == parked.task_id and resumed.error is None, resumed.error
    assert resumed.result["reply"] == "written"
    assert (h.workspace / "out.txt").read_text() == "hello"
    assert broker.get(parked.task_id).state == TaskState.SUCCEEDED
    # The model saw exactly one result for the call, the real one.
    [result] = tool_messages(h.requests()[-1])
    assert tool_error(result) is None and json.loads(result["content"])["bytes"] == 5
    verdicts = [d for d, _ in decisions(h)]
    assert verdicts == ["ask", "approve", "allow"]
    types = [e.type for e in broker.events(parked.task_id)]
    assert "task.parked" in types and "approval.resolved" in types and "task.woken" in types
    policy_versions = {e["policy_version"] for e in resumed.of_type("run.started")}
    assert policy_versions == {h.policy.current().version}
    assert h.audit.verify().ok


def test_a_denial_is_told_to_the_model_and_the_turn_goes_on(broker, home):
    replies = script({"tool_calls": [{"id": "w1", **WRITE}]}, {"content": "understood"})
    with agent_harness(broker, home, replies) as h:
        h.use_policy(POLICY)
        parked = h.turn("write it")
        [request] = h.approvals.list()
        h.approvals.respond(request.id, approve=False, by="test", note="not today")
        resumed = h.run_next()
    assert resumed.result["reply"] == "understood"
    [result] = tool_messages(h.requests()[-1])
    assert tool_error(result) == "approval_denied" and "not today" in result["content"]
    assert not (h.workspace / "out.txt").exists()
    assert [d for d, _ in decisions(h)] == ["ask", "deny"]
    assert broker.get(parked.task_id).state == TaskState.SUCCEEDED


def test_no_answer_before_the_deadline_is_a_denial(broker, home):
    replies = script({"tool_calls": [{"id": "w1", **WRITE}]}, {"content": "gave up"})
    with agent_harness(broker, home, replies) as h:
        h.use_policy(POLICY.replace("approval_timeout: 30s", "approval_timeout: 0.5s"))
        parked = h.turn("write it")
        assert broker.claim("early") == []
        time.sleep(0.6)  # the parked task falls due exactly at the deadline
        resumed = h.run_next()
        [request] = h.approvals.list(state="expired")
        with pytest.raises(ApprovalError, match="already expired"):
            h.approvals.respond(request.id, approve=True, by="late")
    assert resumed.task_id == parked.task_id and resumed.result["reply"] == "gave up"
    [result] = tool_messages(h.requests()[-1])
    assert tool_error(result) == "approval_timeout"
    assert not (h.workspace / "out.txt").exists()
    assert request.state == "expired" and request.decided_by == "timeout"
    assert decisions(h)[-1][0] == "deny" and "deadline" in decisions(h)[-1][1]


def test_allow_always_is_persisted_and_covers_the_same_call_later(broker, home):
    replies = script(
        {"tool_calls": [{"id": "w1", **WRITE}]},
        {"content": "first"},
        {"tool_calls": [{"id": "w2", **WRITE}]},
        {"content": "second"},
    )
    with agent_harness(broker, home, replies) as h:
        h.use_policy(POLICY)
        h.turn("write it")
        [request] = h.approvals.list()
        h.approvals.respond(request.id, approve=True, scope="always", by="test")
        assert h.run_next().result["reply"] == "first"
        [rule] = h.approvals.rules()
        assert (rule.agent, rule.capability, rule.subject) == (
            "default",
            "tools.write_file",
            "out.txt",
        )
        again = h.turn("write it again")
        assert again.result["reply"] == "second"  # no park, no new request
        assert len(h.approvals.list(state=None)) == 1
        assert "allow-always rule" in decisions(h)[-1][1]
        h.approvals.revoke_rule(rule.id, by="test")
        assert h.approvals.rules() == []


def test_deny_mode_and_a_missing_capability_refuse_without_asking(broker, home):
    replies = script(
        {
            "tool_calls": [
                {"id": "e1", "name": "write_file", "arguments": {"path": "a", "content": ""}}
            ]
        },
        {"tool_calls": [{"id": "e2", "name": "exec", "arguments": {"command": "id"}}]},
        {"content": "done"},
    )
    with agent_harness(broker, home, replies) as h:
        h.configure({"tools": ["write_file", "exec"]})
        h.use_policy(POLICY.replace("write_file: ask", "write_file: deny"))
        turn = h.turn("try both")
    assert turn.result["reply"] == "done"
    errors = [tool_error(m) for m in tool_messages(h.requests()[-1])]
    assert errors == ["policy_denied", "policy_denied"]
    assert h.approvals.list(state=None) == []
    assert decisions(h)[-1][0] == "deny" and "set to deny" in decisions(h)[-1][1]
    assert decisions(h, "tools.exec")[-1][0] == "deny"


def test_an_answered_request_cannot_be_answered_again(broker, home):
    replies = script({"tool_calls": [{"id": "w1", **WRITE}]}, {"content": "ok"})
    with agent_harness(broker, home, replies) as h:
        h.use_policy(POLICY)
        h.turn("write it")
        [request] = h.approvals.list()
        h.approvals.respond(request.id, approve=False, by="first")
        with pytest.raises(ApprovalError, match="already denied"):
            h.approvals.respond(request.id, approve=True, by="second")
        with pytest.raises(ApprovalError, match="does not exist") as missing:
            h.approvals.respond(10**6, approve=True, by="x")
        assert missing.value.code == "not_found"


def test_a_canceled_task_leaves_the_pending_list_and_cannot_be_answered(broker, home):
    replies = script({"tool_calls": [{"id": "w1", **WRITE}]}, {"content": "never"})
    with agent_harness(broker, home, replies) as h:
        h.use_policy(POLICY)
        parked = h.turn("write it")
        [request] = h.approvals.list()
        broker.cancel(parked.task_id, reason="changed my mind")
        assert h.approvals.list() == []
        assert [a.id for a in h.approvals.list(state=None)] == [request.id]
        with pytest.raises(ApprovalError, match="is CANCELED, nothing waits"):
            h.approvals.respond(request.id, approve=True, by="late")
    assert not (h.workspace / "out.txt").exists()
