"""A ``ToolContext`` for tool tests: a workspace, every built-in tool allowed, given limits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from goclaw.agent.tools import BUILTIN_TOOLS, AllowListedTools, PolicyHook, ToolContext, ToolLimits


def make_ctx(workspace: Path, policy: PolicyHook | None = None, **limits: Any) -> ToolContext:
    return ToolContext(
        workspace=workspace,
        agent_id="tester",
        task_id=1,
        session_key="s",
        limits=ToolLimits(**limits),
        policy=policy or AllowListedTools(BUILTIN_TOOLS),
    )
