"""The task API: task kinds registered on a Huey instance backed by goclaw's broker.

``App`` is the one object task code and workers share. Kinds are Huey tasks
(``name=`` is the kind), so Huey's decorator, consumer and signals stay the
API; what differs is the storage, which leases instead of deleting on read.
Arguments travel as a JSON object and are checked against the kind's
signature before the task starts, so a malformed payload fails the task
(FAILED, ``bad_payload``) instead of crashing a worker thread.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import huey

from goclaw.broker import Broker, decode_payload
from goclaw.context import TaskContext
from goclaw.errors import PermanentTaskError
from goclaw.huey_storage import GoclawStorage
from goclaw.records import Claim
from goclaw.states import Reason


@dataclasses.dataclass(frozen=True)
class KindSpec:
    name: str
    func: Callable[..., Any]
    signature: inspect.Signature
    wants_context: bool
    #: The name Huey's registry knows the kind by (``module.name``).
    huey_name: str


class App:
    """Kinds plus the Huey instance whose storage is the durable broker."""

    def __init__(
        self,
        broker: Broker,
        *,
        queue: str = "default",
        concurrency: int = 1,
        prefetch: int = 1,
        worker_id: str | None = None,
    ) -> None:
        self.broker = broker
        self.queue = queue
        self.kinds: dict[str, KindSpec] = {}
        self._by_huey_name: dict[str, str] = {}
        self.huey = huey.Huey(
            queue,
            results=False,
            utc=True,
            storage_class=GoclawStorage,
            broker=broker,
            kinds=self,
            concurrency=concurrency,
            prefetch=prefetch,
            worker_id=worker_id,
        )
        self.storage: GoclawStorage = self.huey.storage
        self.storage.serializer = self.huey.serializer
        self.huey.post_execute(name="goclaw-report")(self.storage.report_execution)
        self.huey.on_shutdown(name="goclaw-flush")(self.storage.on_worker_shutdown)
        self.huey.signal(
            huey.signals.SIGNAL_REVOKED,
            huey.signals.SIGNAL_EXPIRED,
            huey.signals.SIGNAL_INTERRUPTED,
        )(self.storage.report_signal)
        # CancelExecution raised by a pre-execute hook skips post-execute.
        self.huey.signal(huey.signals.SIGNAL_CANCELED)(self.storage.report_signal)

    def kind(self, name: str | None = None) -> Callable[[Callable[..., Any]], Any]:
        """Register a task kind; a first parameter named ``ctx`` receives a ``TaskContext``.

        Returns Huey's task wrapper, so calling the decorated function enqueues
        a durable task through Huey's API (``echo(text="hi")``) and
        ``.call_local()`` runs it in-process.
        """

        def register(func: Callable[..., Any]) -> Any:
            kind = name or func.__name__
            if kind in self.kinds:
                raise ValueError(f"task kind {kind!r} is already registered")
            signature = inspect.signature(func)
            params = list(signature.parameters)
            wants_context = bool(params) and params[0] == "ctx"

            def run(*args: Any, task: huey.api.Task, **kwargs: Any) -> Any:
                if wants_context:
                    return func(self.storage.context_for(task.id), *args, **kwargs)
                return func(*args, **kwargs)

            run.__name__ = kind
            run.__module__ = func.__module__
            wrapper = self.huey.task(name=kind, context=True)(run)
            huey_name = self.huey._registry.task_to_string(wrapper.task_class)
            self.kinds[kind] = KindSpec(kind, func, signature, wants_context, huey_name)
            self._by_huey_name[huey_name] = kind
            return wrapper

        return register

    def huey_name(self, kind: str) -> str:
        return self.kinds[kind].huey_name

    def kind_of(self, huey_name: str) -> str:
        return self._by_huey_name.get(huey_name, huey_name)

    def validate(self, claim: Claim) -> tuple[str, str] | None:
        """Why a claimed task cannot run here, as ``(reason, message)``, or None."""
        spec = self.kinds.get(claim.kind)
        if spec is None:
            known = ", ".join(sorted(self.kinds)) or "none"
            return (
                Reason.UNKNOWN_KIND,
                f"unknown task kind {claim.kind!r} (this worker runs: {known})",
            )
        try:
            args, kwargs = decode_payload(claim.payload)
        except ValueError as exc:
            return Reason.BAD_PAYLOAD, str(exc)
        leading = (None,) if spec.wants_context else ()
        try:
            spec.signature.bind(*leading, *args, **kwargs)
        except TypeError as exc:
            return Reason.BAD_PAYLOAD, f"arguments do not fit kind {claim.kind!r}: {exc}"
        return None


__all__ = ["App", "KindSpec", "PermanentTaskError", "TaskContext"]
