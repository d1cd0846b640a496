"""The policy engine as the tools' ``PolicyHook``: one call per decision, each one audited.

``goclaw.policy`` decides; this module is the agent-side adapter (it lives here
because it speaks ``ToolContext``/``ToolError``, which the policy module below
must not import). Every decision, allowed or denied, is appended to the audit
log when one is given, with the version of the policy that made it.

A built-in tool call that the allowlists allow then meets its approval mode:
``allowlist`` runs it, ``deny`` refuses it, ``ask`` runs it only with a human's
yes: an allow-always rule, or an approved request for this very call. With no
answer yet it raises ``ApprovalRequired`` and the agent loop parks the task; a
request past its deadline is recorded as expired and refused.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from typing import Protocol

from goclaw.agent.tools.base import ApprovalRequired, ToolContext, ToolError
from goclaw.approvals import APPROVED, DENIED, EXPIRED, Approvals
from goclaw.audit import AuditLog
from goclaw.policy import Decision, Policy

TOOL_PREFIX = "tools."


class PolicySource(Protocol):
    """A ``PolicyWatcher`` (hot-reloaded) or a fixed ``Policy``."""

    def current(self) -> Policy: ...


class EnginePolicyHook:
    """Ask the current policy; audit the answer; raise ``ToolError('policy_denied')`` on no.

    The policy is taken afresh for each decision, so a narrowing edit applies to
    running tasks too (within the watcher's reload time). An audit append that
    fails raises, and the call is refused: no unrecorded decision acts.
    """

    def __init__(
        self,
        source: PolicySource,
        audit: AuditLog | None = None,
        approvals: Approvals | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.source = source
        self.audit = audit
        #: Without a store an ``ask`` tool is refused: nobody could answer.
        self.approvals = approvals
        self.clock = clock

    def check(self, ctx: ToolContext, capability: str, subject: str) -> None:
        policy = self.source.current()
        decision = policy.decide(ctx.agent_id, capability, subject, workspace=ctx.workspace)
        if not decision.allowed:
            self._deny(ctx, decision, decision.reason)
        mode = "allowlist"
        if capability.startswith(TOOL_PREFIX):
            mode = policy.approval_mode(ctx.agent_id, capability[len(TOOL_PREFIX) :])
        if mode == "deny":
            self._deny(ctx, decision, f"{capability} is set to deny for agent {ctx.agent_id!r}")
        if mode == "ask":
            self._ask(ctx, policy, decision)
            return
        self._record(ctx, decision, "allow", decision.reason)

    def allowed_networks(
        self, ctx: ToolContext
    ) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return self.source.current().allowed_networks(ctx.agent_id)

    def version(self) -> str | None:
        return self.source.current().version

    def refused(self, ctx: ToolContext, capability: str, subject: str, reason: str) -> None:
        version = self.source.current().version
        self._record(ctx, Decision(False, reason, capability, subject, version), "deny", reason)

    # -- ask -----------------------------------------------------------------

    def _ask(self, ctx: ToolContext, policy: Policy, decision: Decision) -> None:
        """Pass with a human's yes; refuse on a no or a timeout; else ask for one."""
        capability, subject = decision.capability, decision.subject
        if self.approvals is None:
            self._deny(ctx, decision, f"{capability} needs approval and no approval store is set")
        rule = self.approvals.rule_for(ctx.agent_id, capability, subject)
        if rule is not None:
            why = f"allow-always rule {rule.id} by {rule.created_by}"
            self._record(ctx, decision, "allow", why)
            return
        request = self.approvals.for_call(ctx.task_id, ctx.call_id) if ctx.call_id else None
        if request is None:
            self._record(ctx, decision, "ask", f"{capability} needs a human's approval")
            raise ApprovalRequired(capability, subject, policy.version, policy.approval_timeout)
        state = request.state_at(self.clock())
        if state == APPROVED:
            self._record(ctx, decision, "allow", f"approval {request.id} by {request.decided_by}")
            return
        if state == DENIED:
            why = f"approval {request.id} was denied by {request.decided_by}"
            if request.note:
                why += f": {request.note}"
            raise ToolError("approval_denied", why)  # the answer itself was audited
        if state == EXPIRED:
            self.approvals.expire(request)  # audits the denial once
            raise ToolError(
                "approval_timeout",
                f"approval {request.id} got no answer before its deadline: denied",
            )
        raise ApprovalRequired(capability, subject, request.policy_version, 0.0)

    # -- audit ---------------------------------------------------------------

    def _deny(self, ctx: ToolContext, decision: Decision, reason: str) -> None:
        self._record(ctx, decision, "deny", reason)
        raise ToolError("policy_denied", reason)

    def _record(self, ctx: ToolContext, decision: Decision, verdict: str, reason: str) -> None:
        if self.audit is None:
            return
        self.audit.record(
            agent=ctx.agent_id,
            task_id=ctx.task_id,
            session=ctx.session_key or None,
            capability=decision.capability,
            subject=decision.subject or "-",
            decision=verdict,
            reason=reason,
            policy_version=decision.policy_version,
        )

    def __repr__(self) -> str:
        return f"EnginePolicyHook({self.source!r}, audit={self.audit is not None})"
