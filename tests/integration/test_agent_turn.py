"""Agent turns end to end in-process: broker, sessions, router, tools, fake provider."""

from __future__ import annotations

import dataclasses
import json

import pytest

from goclaw.agent.runtime import build_scrubber, stored_secrets
from goclaw.secrets import KEY_ENV, SecretStore, generate_key
from goclaw.states import TaskState
from tests.integration.agent_harness import agent_harness, tool_error, tool_messages


@pytest.fixture
def home(tmp_path):
    path = tmp_path / "home"
    path.mkdir()
    return path


def test_multi_turn_session_remembers_earlier_turns(broker, home):
    script = {"replies": [{"content": "Nice to meet you, Ada."}, {"content": "You are Ada."}]}
    with agent_harness(broker, home, script) as h:
        first = h.turn("My name is Ada.")
        second = h.turn("What is my name?")
    assert first.result["reply"] == "Nice to meet you, Ada."
    assert second.result["reply"] == "You are Ada."
    sent = [m["content"] for m in h.requests()[1]["messages"]]
    assert sent[1:] == ["My name is Ada.", "Nice to meet you, Ada.", "What is my name?"]
    stored = h.sessions.messages("s1")
    assert [(m.role, m.task_id) for m in stored] == [
        ("user", first.task_id),
        ("assistant", first.task_id),
        ("user", second.task_id),
        ("assistant", second.task_id),
    ]
    assert broker.get(second.task_id).state == TaskState.SUCCEEDED


def test_tool_round_trip_reads_the_file_and_answers_with_it(broker, home):
    script = {
        "replies": [
            {"tool_calls": [{"id": "c1", "name": "read_file", "arguments": {"path": "notes.txt"}}]},
            {"content": "The notes say 42."},
        ]
    }
    with agent_harness(broker, home, script) as h:
        (h.workspace / "notes.txt").write_text("the answer is 42")
        turn = h.turn("What do my notes say?")
    assert turn.error is None, turn.error
    [result] = tool_messages(h.requests()[1])
    assert result["tool_call_id"] == "c1"
    assert "the answer is 42" in result["content"]
    assert turn.result["reply"] == "The notes say 42."
    assert [e["name"] for e in turn.of_type("tool.call")] == ["read_file"]
    assert turn.of_type("tool.result")[0]["ok"] is True


def test_chunks_arrive_in_order_and_concatenate_to_the_final_message(broker, home):
    text = "Streaming works one small piece at a time, in order, to the very end."
    with agent_harness(broker, home, {"replies": [{"content": text, "chunk_size": 3}]}) as h:
        turn = h.turn("stream please")
    chunks = [e for e in turn.events if e.type == "chunk"]
    assert len(chunks) > 3
    seqs = [e.seq for e in turn.events if e.seq is not None]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert turn.streamed == text == turn.result["reply"]
    [completed] = turn.of_type("run.completed")
    assert completed["reply"] == text
    # One session sequence orders the task's state changes and its agent events.
    assert all(e.session_key == "s1" and e.seq for e in turn.events)
    kinds = [e.type for e in sorted(turn.events, key=lambda e: e.seq)]
    assert kinds[:4] == ["task.submitted", "task.claimed", "task.started", "run.started"]
    assert kinds[-2:] == ["run.completed", "task.succeeded"]


def test_invalid_arguments_unknown_tool_and_a_failing_tool_go_back_to_the_model(broker, home):
    calls = [
        {"id": "a", "name": "read_file", "arguments": {"path": 3}},
        {"id": "b", "name": "launch_rockets", "arguments": {}},
        {"id": "c", "name": "list_dir", "arguments": {"path": "plain.txt"}},
        {"id": "d", "name": "read_file", "arguments": "{not json"},
    ]
    script = {"replies": [{"tool_calls": calls}, {"content": "I could not do any of that."}]}
    with agent_harness(broker, home, script) as h:
        (h.workspace / "plain.txt").write_text("x")
        turn = h.turn("do things")
    assert turn.error is None, turn.error
    results = tool_messages(h.requests()[1])
    assert [m["tool_call_id"] for m in results] == ["a", "b", "c", "d"]
    assert [tool_error(m) for m in results] == [
        "invalid_arguments",
        "unknown_tool",
        "not_a_directory",
        "invalid_arguments",
    ]
    assert turn.result["reply"] == "I could not do any of that."


def test_repeated_identical_call_is_flagged_then_stops_the_turn(broker, home):
    same = {"tool_calls": [{"name": "read_file", "arguments": {"path": "n.txt"}}]}
    script = {"replies": [same, same, same, {"content": "never reached"}]}
    with agent_harness(broker, home, script) as h:
        (h.workspace / "n.txt").write_text("same every time")
        turn = h.turn("loop")
    assert tool_error(tool_messages(h.requests()[2])[-1]) == "repeated_call"
    assert broker.get(turn.task_id).state == TaskState.FAILED
    assert broker.get(turn.task_id).reason == "repeated_tool_call"
    assert turn.of_type("run.failed")[0]["reason"] == "repeated_tool_call"


def test_max_iterations_fails_the_turn_with_a_reason(broker, home):
    def call(n):
        return {"tool_calls": [{"name": "list_dir", "arguments": {"path": f"d{n}"}}]}

    with agent_harness(broker, home, {"replies": [call(n) for n in range(5)]}) as h:
        h.configure({"max_iterations": 3})
        turn = h.turn("go on forever")
    task = broker.get(turn.task_id)
    assert task.state == TaskState.FAILED and task.reason == "max_iterations"
    assert len(h.requests()) == 3


def test_tool_budget_withdraws_tools_so_the_model_must_answer(broker, home):
    calls = [{"name": "list_dir", "arguments": {"path": d}} for d in ("a", "b", "c")]
    script = {"replies": [{"tool_calls": calls}, {"content": "done with what I had"}]}
    with agent_harness(broker, home, script) as h:
        h.configure({"max_tool_calls": 2})
        for d in ("a", "b", "c"):
            (h.workspace / d).mkdir()
        turn = h.turn("list a lot")
    results = tool_messages(h.requests()[1])
    assert [tool_error(m) for m in results] == [None, None, "budget_exhausted"]
    assert "tools" not in h.requests()[1]
    assert turn.result["reply"] == "done with what I had"


def test_parallel_tool_results_keep_call_order(broker, home):
    calls = [
        {"id": f"c{i}", "name": "read_file", "arguments": {"path": f"f{i}.txt"}} for i in range(6)
    ]
    script = {"replies": [{"tool_calls": calls}, {"content": "ok"}]}
    with agent_harness(broker, home, script) as h:
        for i in range(6):
            (h.workspace / f"f{i}.txt").write_text(f"file {i}")
        h.turn("read them all")
    results = tool_messages(h.requests()[1])
    assert [m["tool_call_id"] for m in results] == [f"c{i}" for i in range(6)]
    assert all(f"file {i}" in m["content"] for i, m in enumerate(results))


def test_tokens_and_cost_are_accounted_per_task_and_session(broker, home):
    script = {"replies": [{"content": "one"}, {"content": "two"}]}
    with agent_harness(broker, home, script) as h:
        h.configure({"model": "openai/gpt-4o-mini"}, models={"openai/gpt-4o-mini": {}})
        first = h.turn("hello")
        second = h.turn("again")
    a = h.sessions.usage(task_id=first.task_id)
    b = h.sessions.usage(task_id=second.task_id)
    both = h.sessions.usage(session_key="s1")
    assert a.model_calls == 1 and a.prompt_tokens > 0 and a.cost > 0
    assert both.prompt_tokens == a.prompt_tokens + b.prompt_tokens
    assert both.cost == pytest.approx(a.cost + b.cost)
    assert json.loads(json.dumps(first.of_type("run.completed")[0]["usage"]))["cost"] > 0


# -- failover -----------------------------------------------------------------

CHAIN = {"model": "openai/primary", "fallbacks": ["openai/backup"]}


def test_server_error_fails_over_to_the_fallback_with_an_event(broker, home):
    script = {
        "models": {
            "primary": [{"status": 500}],
            "backup": [{"content": "from the fallback"}],
        }
    }
    with agent_harness(broker, home, script) as h:
        h.configure(CHAIN)
        turn = h.turn("hello")
    assert turn.result["reply"] == "from the fallback"
    [failover] = turn.of_type("provider.failover")
    assert failover["from"] == "openai/primary" and failover["to"] == "openai/backup"
    assert failover["reason"] == "server_error" and failover["status"] == 500
    assert [r["model"] for r in h.requests()] == ["primary", "backup"]


def test_rate_limit_honours_retry_after_before_asking_the_primary_again(broker, home):
    script = {
        "models": {
            "primary": [{"status": 429, "retry_after": 1}, {"content": "primary is back"}],
            "backup": [{"content": "backup 1"}, {"content": "backup 2"}],
        }
    }
    with agent_harness(broker, home, script) as h:
        h.configure(CHAIN)
        first = h.turn("one")
        second = h.turn("two")  # within Retry-After: the primary is not asked
        import time

        time.sleep(1.1)
        third = h.turn("three")
    [failover] = first.of_type("provider.failover")
    assert failover["reason"] == "rate_limited" and failover["retry_after"] == 1.0
    assert [t.result["reply"] for t in (first, second, third)] == [
        "backup 1",
        "backup 2",
        "primary is back",
    ]
    assert [r["model"] for r in h.requests()] == ["primary", "backup", "backup", "primary"]


def test_single_model_waits_out_a_short_retry_after(broker, home):
    script = {"replies": [{"status": 429, "retry_after": 0.5}, {"content": "after waiting"}]}
    with agent_harness(broker, home, script) as h:
        turn = h.turn("patience")
    assert turn.result["reply"] == "after waiting"


def test_auth_error_takes_the_deployment_out(broker, home):
    script = {
        "models": {
            "primary": [{"status": 401}],
            "backup": [{"content": "b1"}, {"content": "b2"}],
        }
    }
    with agent_harness(broker, home, script) as h:
        h.configure(CHAIN)
        first = h.turn("one")
        second = h.turn("two")
    assert first.of_type("provider.failover")[0]["reason"] == "auth_error"
    assert second.of_type("provider.failover") == []
    assert [r["model"] for r in h.requests()] == ["primary", "backup", "backup"]


def test_bad_request_fails_without_failover(broker, home):
    script = {"models": {"primary": [{"status": 400, "error": "malformed"}], "backup": []}}
    with agent_harness(broker, home, script) as h:
        h.configure(CHAIN)
        turn = h.turn("bad")
    task = broker.get(turn.task_id)
    assert task.state == TaskState.FAILED and task.reason == "bad_request"
    assert [r["model"] for r in h.requests()] == ["primary"]


def test_stalled_stream_times_out_and_fails_over_mid_reply(broker, home):
    script = {
        "models": {
            "primary": [{"content": "this will never finish", "stall_after": 2}],
            "backup": [{"content": "complete answer"}],
        }
    }
    with agent_harness(broker, home, script) as h:
        h.configure(CHAIN, models={"openai/primary": {"timeout_seconds": 1}})
        turn = h.turn("hello")
    [failover] = turn.of_type("provider.failover")
    assert failover["reason"] == "timeout" and failover["partial"] is True
    replies = {c["reply"] for c in turn.of_type("chunk")}
    assert len(replies) == 2
    final = "".join(c["delta"] for c in turn.of_type("chunk") if c["reply"] == max(replies))
    assert final == turn.result["reply"] == "complete answer"


# -- compaction ---------------------------------------------------------------

LONG = "word " * 120  # about 120 tokens


def test_history_near_the_window_is_summarised_and_recent_messages_kept(broker, home):
    script = {
        "replies": [
            {"content": LONG},
            {"content": "SUMMARY: the user wrote at length"},
            {"content": "short answer"},
        ]
    }
    with agent_harness(broker, home, script) as h:
        h.configure({"keep_recent_messages": 1}, models={"openai/fake": {"context_window": 400}})
        h.turn(LONG)
        turn = h.turn("and now?")
    [compaction] = turn.of_type("compaction")
    assert compaction["method"] == "summary" and compaction["messages"] == 2
    summary_request, final_request = h.requests()[1], h.requests()[2]
    assert "stream" not in summary_request or not summary_request["stream"]
    system = final_request["messages"][0]["content"]
    assert "SUMMARY: the user wrote at length" in system
    assert [m["content"] for m in final_request["messages"][1:]] == ["and now?"]
    assert turn.result["reply"] == "short answer"
    assert len(h.sessions.messages("s1")) == 4  # compaction never deletes


def test_failed_summary_falls_back_to_truncation(broker, home):
    script = {"replies": [{"content": LONG}, {"status": 500}, {"content": "still here"}]}
    with agent_harness(broker, home, script) as h:
        h.configure({"keep_recent_messages": 1}, models={"openai/fake": {"context_window": 400}})
        h.turn(LONG)
        turn = h.turn("and now?")
    assert turn.of_type("compaction")[0]["method"] == "truncation"
    assert "earlier messages were dropped" in h.requests()[2]["messages"][0]["content"]
    assert turn.result["reply"] == "still here"


OVERFLOW = {
    "status": 400,
    "error": "This model's maximum context length is 100 tokens. However, your messages "
    "resulted in 300 tokens. Please reduce the length of the messages.",
}


def test_provider_context_overflow_compacts_then_succeeds(broker, home):
    script = {
        "replies": [
            {"content": "first answer"},
            OVERFLOW,
            {"content": "SUMMARY"},
            {"content": "fits now"},
        ]
    }
    with agent_harness(broker, home, script) as h:
        h.configure({"keep_recent_messages": 1})
        h.turn("first question")
        turn = h.turn("second question")
    assert turn.of_type("provider.failover") == []
    assert turn.of_type("compaction")[0]["method"] == "summary"
    assert turn.result["reply"] == "fits now"


def test_overflow_that_cannot_be_compacted_fails_with_a_clear_reason(broker, home):
    with agent_harness(broker, home, {"replies": [OVERFLOW], "repeat_last": True}) as h:
        turn = h.turn("one enormous message")
    task = broker.get(turn.task_id)
    assert task.state == TaskState.FAILED and task.reason == "context_overflow"
    assert "context window" in task.last_error


@pytest.mark.parametrize("key", ["", "x" * 201, "tab\there"])
def test_bad_session_keys_are_refused_at_submit(broker, key):
    from goclaw.agent.turns import submit_turn

    with pytest.raises(ValueError, match="session key"):
        submit_turn(broker, agent="default", prompt="hi", session=key)
    assert broker.tasks() == []


def test_a_stored_secret_echoed_by_a_tool_reaches_neither_the_model_nor_the_events(broker, home):
    secret = "hunter2-correct-horse-battery-staple"
    env = {KEY_ENV: generate_key()}
    SecretStore.from_env(broker.db, env).set("BILLING_API_TOKEN", secret)
    script = {
        "replies": [
            {"tool_calls": [{"id": "c1", "name": "read_file", "arguments": {"path": "k.txt"}}]},
            {"content": "The file holds a token, which I cannot see."},
        ]
    }
    with agent_harness(broker, home, script) as h:
        (h.workspace / "k.txt").write_text(f"token: {secret}\nsk-{'a' * 40}\n")
        scrubber = build_scrubber(h.config, env, stored_secrets(broker.db, env))  # as a worker
        h.services = dataclasses.replace(h.services, scrubber=scrubber)
        turn = h.turn("What is in k.txt?")
    assert turn.result["reply"] == "The file holds a token, which I cannot see."
    model_input = json.dumps(h.requests()[-1]["messages"])
    assert "[REDACTED]" in model_input and secret not in model_input
    assert "sk-aaaa" not in model_input, "credential-shaped text is redacted too"
    rows = broker.db.fetchall("SELECT detail FROM task_events WHERE detail IS NOT NULL")
    stored = broker.db.fetchall("SELECT message FROM session_messages")
    assert not [r for r in rows + stored if secret in r[0]]
    assert any("[REDACTED]" in r[0] for r in rows)
