"""The tools an agent's model may call, and the registry the agent loop looks them up in.

The registry starts with the built-in tools; ``register`` is the door for
more (skills, later). An agent only ever sees the tools it is allowed: an
unknown name and a name it was not given fail alike, so a model cannot probe
for tools it does not have.
"""

from __future__ import annotations

from collections.abc import Iterable

from goclaw.agent.tools.base import (
    AllowListedTools,
    ApprovalRequired,
    PolicyHook,
    Tool,
    ToolContext,
    ToolError,
    ToolLimits,
    authorize,
    execute,
    invoke,
    parse_arguments,
)
from goclaw.agent.tools.files import LIST_DIR, READ_FILE, WRITE_FILE
from goclaw.agent.tools.shell import EXEC
from goclaw.agent.tools.web import WEB_FETCH

__all__ = [
    "BUILTIN_TOOLS",
    "AllowListedTools",
    "ApprovalRequired",
    "PolicyHook",
    "Tool",
    "ToolContext",
    "ToolError",
    "ToolLimits",
    "authorize",
    "execute",
    "get_tool",
    "invoke",
    "parse_arguments",
    "register",
    "tools_for",
]

BUILTIN_TOOLS: dict[str, Tool] = {
    tool.name: tool for tool in (READ_FILE, WRITE_FILE, LIST_DIR, EXEC, WEB_FETCH)
}

_registry: dict[str, Tool] = dict(BUILTIN_TOOLS)


def register(tool: Tool) -> Tool:
    """Make ``tool`` available to agents that list it; a name is taken once, for good."""
    if tool.name in _registry:
        raise ValueError(f"a tool named {tool.name!r} is already registered")
    _registry[tool.name] = tool
    return tool


def get_tool(name: str, allowed: Iterable[str]) -> Tool:
    """The tool ``name`` if this agent may use it; the error lists what it may use instead."""
    allowed = list(allowed)
    tool = _registry.get(name)
    if tool is None or name not in allowed:
        has = ", ".join(a for a in allowed if a in _registry) or "no tools"
        raise ToolError("unknown_tool", f"no tool named {name!r} (this agent has: {has})")
    return tool


def tools_for(names: Iterable[str]) -> list[Tool]:
    """The tools named, in order and once each, as the model is offered them."""
    tools: list[Tool] = []
    for name in dict.fromkeys(names):
        tool = _registry.get(name)
        if tool is None:
            raise ToolError("unknown_tool", f"no tool named {name!r}")
        tools.append(tool)
    return tools
