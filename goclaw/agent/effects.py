"""The ledger that keeps a side-effecting tool call from running twice.

``write_file`` and ``exec`` change the world, and a retried turn must not do
that again. Each such call is keyed by (task, tool-call id). The ``started``
row commits *before* the effect runs, and the result commits after it. A
retry that finds ``done`` replays the recorded result. One that finds only
``started`` knows the effect may or may not have happened: it is not
repeated, and the model is told so. That is at-most-once, which is the only
honest promise for an effect that cannot be checked afterwards.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from typing import Any

from goclaw.store.database import Database

INTERRUPTED = "interrupted"


@dataclasses.dataclass(frozen=True)
class Recorded:
    """What an earlier attempt left for one call: its result, or that it was cut off."""

    state: str  # done | started
    result: Any = None


class EffectLedger:
    def __init__(self, db: Database, *, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.clock = clock

    def begin(
        self, task_id: int, call_id: str, tool: str, arguments: dict[str, Any]
    ) -> Recorded | None:
        """Claim the call; None means it is new and the caller must run it now."""
        row = self.db.fetchone(
            "INSERT INTO tool_effects (task_id, call_id, tool, arguments, state, started_at) "
            "VALUES (?, ?, ?, ?, 'started', ?) ON CONFLICT DO NOTHING RETURNING task_id",
            (task_id, call_id, tool, json.dumps(arguments, sort_keys=True), self.clock()),
        )
        if row is not None:
            return None
        found = self.db.fetchone(
            "SELECT state, result FROM tool_effects WHERE task_id = ? AND call_id = ?",
            (task_id, call_id),
        )
        state, result = found if found else ("started", None)
        return Recorded(state, json.loads(result) if result is not None else None)

    def finish(self, task_id: int, call_id: str, result: Any) -> None:
        self.db.execute(
            "UPDATE tool_effects SET state = 'done', result = ?, finished_at = ? "
            "WHERE task_id = ? AND call_id = ?",
            (json.dumps(result, default=str), self.clock(), task_id, call_id),
        )
