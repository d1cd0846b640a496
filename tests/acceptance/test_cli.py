"""The ``goclaw`` CLI as a script sees it: JSON shapes, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from goclaw.states import TaskState


def run(env, *args, check=True):
    result = subprocess.run(
        [sys.executable, "-m", "goclaw.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.fixture
def env(tmp_path):
    return {**os.environ, "GOCLAW_HOME": str(tmp_path / "home")}


def test_init_is_idempotent_and_keeps_the_token_private(env, tmp_path):
    first = json.loads(run(env, "init", "--json").stdout)
    assert set(first["created"]) == {"config.yaml", "policy.yaml", "auth.token", "database"}
    home = tmp_path / "home"
    token = (home / "auth.token").read_text()
    assert stat.S_IMODE((home / "auth.token").stat().st_mode) == 0o600
    second = json.loads(run(env, "init", "--json").stdout)
    assert second["created"] == []
    assert (home / "auth.token").read_text() == token, "init never overwrites"
    # --home beats GOCLAW_HOME.
    other = tmp_path / "other"
    third = json.loads(run(env, "--home", str(other), "init", "--json").stdout)
    assert third["home"] == str(other) and (other / "goclaw.db").exists()


def test_json_shapes_for_scripts(stack):
    out = stack.cli_json("submit", "--kind", "echo", "--arg", "text=hi", "--count", "2")
    assert list(out) == ["task_ids"] and len(out["task_ids"]) == 2
    stack.worker(concurrency=1)
    stack.wait_terminal(out["task_ids"])

    listed = stack.cli_json("tasks", "--state", "SUCCEEDED")
    assert {t["id"] for t in listed} == set(out["task_ids"])
    for row in listed:
        assert {"id", "kind", "state", "attempts", "created_at"} <= set(row)

    shown = stack.cli_json("task", "show", str(out["task_ids"][0]))
    assert shown["result"] == {"text": "hi"}
    assert [e["type"] for e in shown["events"]] == [
        "task.submitted",
        "task.claimed",
        "task.started",
        "task.succeeded",
    ]
    for event in shown["events"]:
        assert {"event_id", "type", "from", "to", "at"} <= set(event)

    status = stack.cli_json("status")
    assert status["counts"]["SUCCEEDED"] == 2
    assert status["live_workers"] == 1 and status["expired_leases"] == 0


def test_submit_options_and_wait(stack):
    first = stack.cli_json("submit", "-k", "noop", "--idempotency-key", "once", "--priority", "5")
    again = stack.cli_json("submit", "-k", "noop", "--idempotency-key", "once")
    assert first == again
    task = stack.broker.get(first["task_ids"][0])
    assert task.priority == 5 and task.max_attempts == stack.config.broker.max_attempts

    stack.worker(concurrency=2)
    ok = stack.cli("submit", "-k", "echo", "-a", "text=waited", "--wait")
    assert "task.succeeded" in ok.stdout and "SUCCEEDED" in ok.stdout
    failed = stack.cli(
        "submit", "-k", "fail", "--max-attempts", "1", "--wait", "--json", check=False
    )
    assert failed.returncode == 1
    body = json.loads(failed.stdout)
    assert body["tasks"][0]["state"] == TaskState.DEAD_LETTER


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("task", "show", "999999"), "task 999999 does not exist"),
        (("task", "retry", "999999"), "task 999999 does not exist"),
        (("submit", "write a poem", "--agent", "nobody"), "unknown agent"),
    ],
)
def test_errors_are_one_line_and_non_zero(stack, args, message):
    result = stack.cli(*args, check=False)
    assert result.returncode == 1
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    as_json = stack.cli(*args, "--json", check=False)
    assert as_json.returncode == 1 and message in json.loads(as_json.stdout)["error"]


def test_bad_config_fails_closed_naming_the_key(env, tmp_path):
    run(env, "init")
    config = tmp_path / "home" / "config.yaml"
    config.write_text("broker:\n  lease_secnds: 5\n")
    result = run(env, "status", check=False)
    assert result.returncode == 1
    assert "broker.lease_secnds: unknown key" in result.stderr
    config.write_text("broker:\n  lease_seconds: 4\n  heartbeat_seconds: 3\n")
    result = run(env, "status", check=False)
    assert "heartbeat_seconds" in result.stderr and result.returncode == 1


def test_usage_errors_exit_2(env):
    result = run(env, "submit", check=False)
    assert result.returncode == 2 and "give a PROMPT or --kind KIND" in result.stderr
    result = run(env, "submit", "-k", "noop", "--arg", "novalue", check=False)
    assert result.returncode == 2 and "KEY=VALUE" in result.stderr
