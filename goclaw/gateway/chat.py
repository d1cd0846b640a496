"""Queueing a chat turn from any gateway surface (ACP, the OpenAI API).

Every chat goes through the durable queue as an ``agent`` task; the gateway
never calls a model. What the surfaces share is the admission check: an
agent whose queue already holds ``max_queue_depth`` waiting turns refuses
more with a retry-after hint, instead of letting a burst pile up work that
would time out before a worker reaches it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from goclaw.agent.definitions import AgentDefinition
from goclaw.agent.turns import agent_load, submit_turn
from goclaw.records import Submitted

if TYPE_CHECKING:
    from goclaw.gateway.state import GatewayState


class QueueSaturated(Exception):
    def __init__(self, agent_id: str, depth: int, limit: int, retry_after: float) -> None:
        super().__init__(
            f"agent {agent_id!r} has {depth} turns waiting (max_queue_depth {limit}); "
            f"retry after {retry_after:g}s"
        )
        self.agent_id = agent_id
        self.depth = depth
        self.limit = limit
        self.retry_after = retry_after

    def as_json(self) -> dict[str, Any]:
        return {
            "agent_id": self.agent_id,
            "depth": self.depth,
            "max": self.limit,
            "retry_after": self.retry_after,
        }


async def queue_turn(
    state: GatewayState,
    agent: AgentDefinition,
    content: str,
    *,
    session: str | None,
    idempotency_key: str | None,
) -> tuple[Submitted, str]:
    """Queue one turn unless the agent's queue is full (``QueueSaturated``).

    The depth check and the submit run back to back on the one database
    thread, so one gateway never overshoots the limit.
    """
    broker = state.broker
    limit = agent.settings.max_queue_depth

    def submit() -> tuple[Submitted, str] | int:
        depth = agent_load(broker, agent.id)["queued"]
        if depth >= limit:
            return depth
        return submit_turn(
            broker,
            agent=agent.id,
            prompt=content,
            session=session,
            queue=state.config.worker.queue,
            idempotency_key=idempotency_key,
        )

    outcome = await state.db(submit)
    if isinstance(outcome, int):
        raise QueueSaturated(agent.id, outcome, limit, state.settings.saturated_retry_after_seconds)
    return outcome
