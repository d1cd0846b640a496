"""A ``ToolContext`` for tool tests: a workspace, every built-in tool allowed, given limits."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from goclaw.agent.tools import BUILTIN_TOOLS, AllowListedTools, PolicyHook, ToolContext, ToolLimits

#: Where the tests' own HTTP servers listen; the SSRF guard refuses it unless allowed.
LOOPBACK = (ipaddress.ip_network("127.0.0.1/32"),)


def make_ctx(
    workspace: Path,
    policy: PolicyHook | None = None,
    *,
    allowed_networks: Iterable[Any] = (),
    resolver: Any = None,
    **limits: Any,
) -> ToolContext:
    return ToolContext(
        workspace=workspace,
        agent_id="tester",
        task_id=1,
        session_key="s",
        limits=ToolLimits(**limits),
        policy=policy or AllowListedTools(BUILTIN_TOOLS),
        resolver=resolver,
        allowed_networks=tuple(allowed_networks),
    )
