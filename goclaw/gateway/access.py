"""The policy at the gateway: every ACP method and API route is ``acp.read`` or ``acp.mutate``.

The bearer token says who may talk to the gateway at all; ``policy.yaml``
says what talking may do. Each request is judged by the current policy (the
same hot-reloaded file the workers read, global rules: a client is not an
agent) and the decision is audited, allowed or not, before the handler runs.
An audit append that fails refuses the request: no unrecorded decision acts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from goclaw.policy import Decision

if TYPE_CHECKING:
    from goclaw.gateway.state import GatewayState

READ = "acp.read"
MUTATE = "acp.mutate"


class AccessDenied(Exception):
    """The policy refused a request; ``decision.reason`` says why."""

    def __init__(self, decision: Decision) -> None:
        super().__init__(decision.reason)
        self.decision = decision


async def authorize(state: GatewayState, capability: str, subject: str, client: str) -> None:
    """Judge and audit one request; raise ``AccessDenied`` on no."""
    decision = await state.db(_judge, state, capability, subject, client)
    if not decision.allowed:
        raise AccessDenied(decision)


def _judge(state: GatewayState, capability: str, subject: str, client: str) -> Decision:
    """On the database thread: the watcher's reload check (which audits a refused edit)
    and the record both write to the database, and neither may block the event loop."""
    decision = state.policy.current().decide(None, capability, subject)
    state.audit.record(
        agent="-",
        task_id=None,
        session=None,
        capability=capability,
        subject=f"{subject} from {client}",
        decision="allow" if decision.allowed else "deny",
        reason=decision.reason,
        policy_version=decision.policy_version,
    )
    return decision
