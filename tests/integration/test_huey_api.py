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
