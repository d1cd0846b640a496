"""Control paths through real workers: cancel, retries, dead letters, poison, bad input, wake-up.

Each test drives the real CLI or broker against running ``goclaw worker``
processes, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import statistics
import time

import pytest

from goclaw.states import TaskState

from .conftest import wait_for

pytestmark = pytest.mark.slow


def test_cancel_while_running_is_seen_within_a_second(stack):
    broker = stack.broker
    stack.worker(concurrency=1)
    task_id = broker.submit("sleep", {"seconds": 60})[0].task_id
    wait_for(lambda: broker.get(task_id).state is TaskState.RUNNING, timeout=20)

    started = time.time()
    out = stack.cli_json("task", "cancel", str(task_id))
    assert out["state"] == "CANCELED"

    # The worker's task stops and reports; the report is fenced off (already CANCELED).
    rejected = wait_for(
        lambda: [e for e in broker.events(task_id) if e.type == "report.rejected"],
        timeout=5,
        what="the running task to notice its cancellation",
    )
    seen_after = rejected[0].at - started
    assert seen_after < 1.0, f"cancellation took {seen_after:.3f}s to reach the task"
    assert broker.get(task_id).state is TaskState.CANCELED
    # The worker slot is free again: the next task runs.
    follow_up = broker.submit("noop")[0].task_id
    assert stack.wait_terminal([follow_up])[follow_up].state is TaskState.SUCCEEDED


def test_cancel_while_queued_never_runs(stack):
    task_id = stack.broker.submit("echo", {"text": "never"}, delay=0.5)[0].task_id
    stack.cli("task", "cancel", str(task_id), "--reason", "changed my mind")
    stack.worker(concurrency=1)
    time.sleep(1.0)
    events = stack.broker.events(task_id)
    assert [e.type for e in events] == ["task.submitted", "task.canceled"]
    assert events[-1].detail == '{"reason":"changed my mind"}'


def test_retries_with_backoff_then_dead_letter_then_retry_from_dead_letter(stack):
    broker = stack.broker
    stack.worker(concurrency=2)
    exhausted = broker.submit("fail", {"message": "boom"}, max_attempts=2)[0].task_id
    task = stack.wait_terminal([exhausted])[exhausted]
    assert (task.state, task.reason, task.attempts) == (
        TaskState.DEAD_LETTER,
        "retries_exhausted",
        2,
    )
    types = [e.type for e in broker.events(exhausted)]
    assert types.count("task.retry_scheduled") == 1
    waits = [e for e in broker.events(exhausted) if e.to_state == "RETRY_WAIT"]
    reclaim = next(e for e in broker.events(exhausted) if e.from_state == "RETRY_WAIT")
    assert reclaim.at - waits[0].at >= 0.05 / 2, "the retry waited out its backoff"

    # Poison pill: the same error three times in a row ends it before max_attempts.
    poison = broker.submit("fail", {"message": "same"}, max_attempts=10)[0].task_id
    task = stack.wait_terminal([poison])[poison]
    assert (task.state, task.reason, task.attempts) == (TaskState.DEAD_LETTER, "poison_pill", 3)

    out = stack.cli_json("task", "retry", str(poison))
    assert out["state"] == "QUEUED" and out["attempts"] == 0
    task = stack.wait_terminal([poison])[poison]
    assert task.state is TaskState.DEAD_LETTER
    assert [e.type for e in broker.events(poison)].count("task.requeued") == 1


def test_unknown_kind_and_corrupt_payload_fail_and_the_worker_keeps_serving(stack):
    broker = stack.broker
    worker = stack.worker(concurrency=1)
    unknown = broker.submit("no-such-kind", {"x": 1})[0].task_id
    wrong_args = broker.submit("echo", {"nope": 1})[0].task_id
    with broker.transaction():  # one commit: no worker sees the row before it is damaged
        corrupt = broker.submit("echo", {"text": "x"})[0].task_id
        # A row written by something else (or damaged): not JSON at all.
        broker.db.execute("UPDATE tasks SET payload = ? WHERE id = ?", ("{not json", corrupt))
    bad_value = broker.submit("sleep", {"seconds": "soon"})[0].task_id
    good = broker.submit("echo", {"text": "still here"})[0].task_id

    final = stack.wait_terminal([unknown, wrong_args, corrupt, bad_value, good])
    assert (final[unknown].state, final[unknown].reason) == (TaskState.FAILED, "unknown_kind")
    assert "no-such-kind" in final[unknown].last_error
    assert (final[wrong_args].state, final[wrong_args].reason) == (TaskState.FAILED, "bad_payload")
    assert (final[corrupt].state, final[corrupt].reason) == (TaskState.FAILED, "bad_payload")
    assert "not valid JSON" in final[corrupt].last_error
    assert (final[bad_value].state, final[bad_value].reason) == (TaskState.FAILED, "bad_input")
    assert final[good].state is TaskState.SUCCEEDED
    assert final[good].result == '{"text":"still here"}'
    assert worker.alive()


def test_idle_worker_wakes_on_the_doorbell_not_by_polling(make_stack):
    # With a 5 s fallback poll, only the doorbell can explain a fast pickup.
    stack = make_stack(GOCLAW_BROKER__IDLE_POLL_SECONDS="5")
    broker = stack.broker
    stack.worker(concurrency=2)
    time.sleep(0.5)
    delays = []
    for _ in range(15):
        task_id = broker.submit("noop")[0].task_id
        stack.wait_terminal([task_id], timeout=10)
        events = {e.type: e.at for e in broker.events(task_id)}
        delays.append((events["task.started"] - events["task.submitted"]) * 1000)
        time.sleep(0.05)
    p50 = statistics.median(delays)
    print(f"\nsubmit-to-start ms: p50={p50:.2f} max={max(delays):.2f}")
    assert p50 < 50, delays
    assert max(delays) < 1000, delays


def test_priority_order_and_delay(stack):
    broker = stack.broker
    low = broker.submit("noop", priority=0)[0].task_id
    high = broker.submit("noop", priority=10)[0].task_id
    later = broker.submit("noop", priority=99, delay=1.0)[0].task_id
    stack.worker(concurrency=1)
    final = stack.wait_terminal([low, high, later])
    started = {i: next(e.at for e in broker.events(i) if e.type == "task.started") for i in final}
    assert started[high] < started[low], "higher priority first"
    assert started[later] - final[later].created_at >= 1.0, "delay honoured"


def test_a_worker_runs_kinds_from_a_module(stack, tmp_path):
    package = tmp_path / "userkinds"
    package.mkdir()
    (package / "resize.py").write_text(
        "from goclaw.errors import PermanentTaskError\n\n"
        "def register(app):\n"
        "    @app.kind('resize')\n"
        "    def resize(ctx, path, width):\n"
        "        if width <= 0:\n"
        "            raise PermanentTaskError('width must be positive')\n"
        "        return {'path': path, 'width': width, 'attempt': ctx.attempt}\n"
    )
    stack.env["PYTHONPATH"] = str(tmp_path)
    stack.worker("--kinds", "userkinds.resize", concurrency=1)
    ok = stack.broker.submit("resize", {"path": "a.png", "width": 64})[0].task_id
    bad = stack.broker.submit("resize", {"path": "a.png", "width": 0})[0].task_id
    final = stack.wait_terminal([ok, bad])
    assert final[ok].result == '{"path":"a.png","width":64,"attempt":1}'
    assert (final[bad].state, final[bad].reason) == (TaskState.FAILED, "bad_input")

    refused = stack.cli("worker", "--kinds", "userkinds.nothing_here", check=False)
    assert refused.returncode == 1 and "cannot import it" in refused.stderr
