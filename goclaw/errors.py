"""One root for goclaw's errors; each docstring is the default message.

Control-flow signals that task code raises (``PermanentTaskError``,
``TaskCanceled``) live outside the root, as huey keeps ``RetryTask`` apart
from ``HueyException``: they are not faults of goclaw itself.
"""

from __future__ import annotations


class GoclawError(Exception):
    """goclaw failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class ConfigError(GoclawError):
    """The configuration is invalid."""


class DatabaseError(GoclawError):
    """The database could not be used."""


class SchemaTooNewError(DatabaseError):
    """The database schema is newer than this version of goclaw."""


class TaskNotFound(GoclawError):
    """No such task."""


class IllegalTransition(GoclawError):
    """That state change is not allowed for this task."""

    def __init__(self, task_id: int, current: str, wanted: str, why: str = "") -> None:
        self.task_id = task_id
        self.current = current
        self.wanted = wanted
        detail = f" ({why})" if why else ""
        super().__init__(f"task {task_id}: cannot move from {current} to {wanted}{detail}")


class PermanentTaskError(Exception):
    """Raised by task code for an error that retrying cannot fix (bad input).

    The task ends FAILED instead of RETRY_WAIT. ``code`` is the reason code
    recorded on the task.
    """

    def __init__(self, message: str, code: str = "bad_input") -> None:
        super().__init__(message)
        self.code = code


class TaskCanceled(Exception):
    """Raised inside task code when its task was canceled while it ran."""


class TaskParked(Exception):
    """Raised by task code that must wait for something outside it (a human's approval).

    The task gives up its lease and worker slot and waits in RETRY_WAIT until
    ``until`` (epoch seconds), or until someone wakes it (``Broker.wake``); the
    attempt does not count against ``max_attempts``: nothing failed.
    """

    def __init__(self, message: str, until: float) -> None:
        super().__init__(message)
        self.until = until

    def __reduce__(self) -> tuple[type[TaskParked], tuple[str, float]]:
        # Process workers pickle exceptions; the default would drop ``until``.
        return (type(self), (str(self), self.until))
