"""A full disk loses nothing: submits fail loudly, accepted tasks wait, work resumes.

The SQLite home lives on a tiny tmpfs of its own, filled with ballast while a
real worker runs tasks. Needs permission to mount (root, as on CI); skips
with the reason otherwise.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess

import pytest

from goclaw.states import TaskState

from .conftest import Stack, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def tiny_fs(tmp_path):
    mountpoint = tmp_path / "tiny"
    mountpoint.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4M", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip() or result.returncode}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def fill(path) -> None:
    """Write ballast until the filesystem refuses another byte (unbuffered: a
    buffered writer would raise again on close with the bytes it still holds)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        size = 65536
        while size:
            try:
                os.write(fd, b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                size //= 2
    finally:
        os.close(fd)


def test_a_full_disk_refuses_new_work_and_loses_none_already_accepted(tiny_fs):
    stack = Stack(tiny_fs / "stack", f"sqlite:///{tiny_fs / 'stack' / 'goclaw.db'}", {})
    try:
        broker = stack.broker
        worker = stack.worker(concurrency=2)
        accepted = [s.task_id for s in broker.submit("sleep", {"seconds": 1.0}, count=4)]
        wait_for(lambda: len(broker.tasks(state=TaskState.RUNNING)) == 2, timeout=20)

        ballast = tiny_fs / "ballast"
        fill(ballast)
        # A new submit fails with the database's own words, and writes nothing.
        refused = stack.cli("submit", "--kind", "noop", check=False)
        assert refused.returncode == 1
        assert "full" in refused.stderr.lower(), refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
        # The running tasks finish into the full disk: their outcomes cannot be
        # committed, and the worker says so and keeps them.
        wait_for(
            lambda: "full" in worker.log().lower(),
            timeout=10,
            what=lambda: f"the worker to hit the full disk\n{worker.log()[-2000:]}",
        )
        assert worker.alive(), worker.log()[-2000:]
        live = {TaskState.QUEUED, TaskState.CLAIMED, TaskState.RUNNING}
        assert {t.state for t in broker.tasks()} <= live, "nothing could finish"

        ballast.unlink()
        final = stack.wait_terminal(accepted, timeout=60)
        assert {t.state for t in final.values()} == {TaskState.SUCCEEDED}
        succeeded = broker.db.fetchall(
            "SELECT task_id, COUNT(*) FROM task_events WHERE type = 'task.succeeded' "
            "GROUP BY task_id"
        )
        assert sorted(succeeded) == [(i, 1) for i in accepted]
        assert len(broker.tasks(limit=100)) == len(accepted), "the refused submit left no row"
        # And the worker serves new work once there is room again.
        again = broker.submit("noop")[0].task_id
        assert stack.wait_terminal([again])[again].state is TaskState.SUCCEEDED
    finally:
        stack.close()
        with contextlib.suppress(FileNotFoundError):
            (tiny_fs / "ballast").unlink()
