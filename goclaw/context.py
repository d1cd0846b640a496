"""The context a running task receives: its claim and its cancellation flags."""

from __future__ import annotations

import dataclasses
import threading

from goclaw.errors import TaskCanceled
from goclaw.records import Claim


@dataclasses.dataclass
class TaskContext:
    """What a running task may know about itself, passed as its ``ctx`` argument."""

    claim: Claim
    canceled: threading.Event = dataclasses.field(default_factory=threading.Event)
    #: Set when the lease could not be renewed: another worker may run the task now.
    lease_lost: threading.Event = dataclasses.field(default_factory=threading.Event)
    #: An outcome has been queued for this run (the worker reports each run once).
    reported: bool = False

    @property
    def task_id(self) -> int:
        return self.claim.task_id

    @property
    def attempt(self) -> int:
        return self.claim.attempts

    def should_stop(self) -> bool:
        return self.canceled.is_set() or self.lease_lost.is_set()

    def check(self) -> None:
        """Raise ``TaskCanceled`` if the task was canceled or its lease lost."""
        if self.canceled.is_set():
            raise TaskCanceled(f"task {self.task_id} was canceled")
        if self.lease_lost.is_set():
            raise TaskCanceled(f"task {self.task_id} lost its lease")

    def sleep(self, seconds: float) -> None:
        """Sleep, waking at once on cancellation (then raising ``TaskCanceled``)."""
        self.canceled.wait(seconds)
        self.check()
