"""The policy engine as the tools' ``PolicyHook``: one call per decision, each one audited.

``goclaw.policy`` decides; this module is the agent-side adapter (it lives here
because it speaks ``ToolContext``/``ToolError``, which the policy module below
must not import). Every decision, allowed or denied, is appended to the audit
log when one is given, with the version of the policy that made it.
"""

from __future__ import annotations

from typing import Protocol

from goclaw.agent.tools.base import ToolContext, ToolError
from goclaw.audit import AuditLog
from goclaw.policy import Decision, Policy


class PolicySource(Protocol):
    """A ``PolicyWatcher`` (hot-reloaded) or a fixed ``Policy``."""

    def current(self) -> Policy: ...


class EnginePolicyHook:
    """Ask the current policy; audit the answer; raise ``ToolError('policy_denied')`` on no.

    The policy is taken afresh for each decision, so a narrowing edit applies to
    running tasks too (within the watcher's reload time). An audit append that
    fails raises, and ``invoke`` refuses the call: no unrecorded decision acts.
    """

    def __init__(self, source: PolicySource, audit: AuditLog | None = None) -> None:
        self.source = source
        self.audit = audit

    def decide(self, ctx: ToolContext, capability: str, subject: str) -> Decision:
        decision = self.source.current().decide(
            ctx.agent_id, capability, subject, workspace=ctx.workspace
        )
        if self.audit is not None:
            self.audit.record(
                agent=ctx.agent_id,
                task_id=ctx.task_id,
                session=ctx.session_key or None,
                capability=capability,
                subject=subject or "-",
                decision="allow" if decision.allowed else "deny",
                reason=decision.reason,
                policy_version=decision.policy_version,
            )
        return decision

    def check(self, ctx: ToolContext, capability: str, subject: str) -> None:
        decision = self.decide(ctx, capability, subject)
        if not decision.allowed:
            raise ToolError("policy_denied", decision.reason)

    def __repr__(self) -> str:
        return f"EnginePolicyHook({self.source!r}, audit={self.audit is not None})"
