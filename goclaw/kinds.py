"""Built-in task kinds for operations, tests and benchmarks.

They are deliberately tiny, and each exercises one path of the lifecycle:
``noop`` the bare queue cost, ``sleep`` a long task that honours
cancellation, ``fail`` retries and the dead-letter queue, ``echo`` results.
"""

from __future__ import annotations

from typing import Any

from goclaw.app import App
from goclaw.context import TaskContext
from goclaw.errors import PermanentTaskError

BUILTIN_KINDS = ("noop", "sleep", "fail", "echo")


def register_builtin_kinds(app: App) -> None:
    @app.kind("noop")
    def noop() -> None:
        return None

    @app.kind("sleep")
    def sleep(ctx: TaskContext, seconds: float = 1.0) -> dict[str, Any]:
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds < 0:
            raise PermanentTaskError(f"sleep: seconds must be a number >= 0, got {seconds!r}")
        ctx.sleep(float(seconds))
        return {"slept": seconds}

    @app.kind("fail")
    def fail(message: str = "failed on purpose") -> None:
        raise RuntimeError(str(message))

    @app.kind("echo")
    def echo(text: str = "") -> dict[str, Any]:
        return {"text": text}
