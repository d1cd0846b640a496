"""Huey stays the task API: tasks enqueued through Huey land durably in goclaw's table."""

from __future__ import annotations

import datetime as dt

import pytest

from goclaw.app import App
from goclaw.states import TaskState


@pytest.fixture
def app(broker):
    app = App(broker, queue="default")

    @app.kind("add")
    def add(a, b=0):
        return a + b

    app.add = add
    return app


def test_calling_a_kind_enqueues_a_durable_task(app, broker):
    app.add(2, b=3)
    (task,) = broker.tasks()
    assert (task.kind, task.state) == ("add", TaskState.QUEUED)
    assert task.ref, "Huey's task id is kept as the task's ref"
    assert '"_args":[2]' in task.payload and '"b":3' in task.payload


def test_huey_schedule_becomes_run_after(app, broker):
    eta = dt.datetime.now(dt.UTC).replace(tzinfo=None) + dt.timedelta(seconds=60)
    app.add.schedule(args=(1,), eta=eta)
    (task,) = broker.tasks()
    assert task.run_after >= broker.clock() + 55
    assert broker.claim("w") == []


def test_unsupported_huey_features_are_refused(app):
    with pytest.raises(ValueError, match="on_complete"):
        app.huey.enqueue(app.add.s(1).then(app.add, 2))


def test_storage_runs_a_claimed_task_through_huey(app, broker):
    app.add(4, b=5)
    data = app.storage.dequeue()
    task = app.huey.deserialize_task(data)
    app.huey.execute(task)
    app.storage.flush()
    (record,) = broker.tasks()
    assert record.state is TaskState.SUCCEEDED and record.result == "9"
    app.storage.stop_process_services()


def run_one(app):
    data = app.storage.dequeue()
    assert data is not None
    app.huey.execute(app.huey.deserialize_task(data))


def test_an_exchange_that_fails_loses_no_report(app, broker, monkeypatch):
    """A report whose transaction fails (a deadlock, a full disk) is retried, not dropped:
    a dropped report leaves its task RUNNING under a lease its worker keeps renewing."""
    from goclaw.errors import DatabaseError

    for n in range(3):
        app.add(n)
    run_one(app)  # task 1 ran; its outcome waits for the next exchange
    real = broker.report

    def deadlock(*args, **kwargs):
        raise DatabaseError("deadlock detected")

    monkeypatch.setattr(broker, "report", deadlock)
    assert app.storage.dequeue() is None  # the exchange failed as a whole
    monkeypatch.setattr(broker, "report", real)
    run_one(app)
    run_one(app)
    app.storage.flush()
    assert [t.state for t in broker.tasks()] == [TaskState.SUCCEEDED] * 3
    app.storage.stop_process_services()


def test_a_task_huey_drops_without_a_hook_is_failed_not_held(app, broker, monkeypatch):
    """If Huey's execute raises outside the task body, no hook runs; the worker must
    not keep that task's lease alive forever."""
    app.add(1)
    data = app.storage.dequeue()
    assert data is not None
    # What Huey's Worker.loop does when execute raises: log it and move on.
    app.storage.flush()
    assert broker.tasks()[0].state is TaskState.RUNNING
    app.storage.dequeue()  # the same thread asks for more work
    app.storage.flush()
    task = broker.tasks()[0]
    assert task.state is TaskState.RETRY_WAIT
    assert "lost the task" in task.last_error
    app.storage.stop_process_services()


def test_huey_revoke_still_cancels_a_task(app, broker):
    """Revocation keys are checked at claim time; a revoked kind's task is canceled."""
    app.add(1)
    app.add.revoke()  # Huey's API: revoke every task of this kind
    run_one(app)
    app.storage.flush()
    (task,) = broker.tasks()
    assert task.state is TaskState.CANCELED
    app.add.restore()
    app.add(2)
    run_one(app)
    app.storage.flush()
    assert broker.tasks()[0].state is TaskState.SUCCEEDED
    app.storage.stop_process_services()
