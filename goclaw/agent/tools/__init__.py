"""The tools an agent's model may call, and the registry the agent loop looks them up in.

The registry starts with the built-in tools; ``register`` is the door for
more (skills, later). An agent only ever sees the tools it is allowed: an
unknown name and a name it was not given fail alike, so a model cannot probe
for tools it does not have.
"""

from __future__ import annotations

import types
from collections.abc import Collection, Iterable, Mapping
from typing import Protocol

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
    "SKILL_READ",
    "SKILL_SEARCH",
    "SKILL_TOOLS",
    "AllowListedTools",
    "ApprovalRequired",
    "PolicyHook",
    "RegisteredTools",
    "Tool",
    "ToolContext",
    "ToolError",
    "ToolLimits",
    "Toolbox",
    "authorize",
    "execute",
    "get_tool",
    "invoke",
    "parse_arguments",
    "register",
    "registered_tools",
    "tools_for",
]

#: The instruction-skill tools ``goclaw.skills`` provides (names fixed here, so that
#: config and policy can name them without loading any skill).
SKILL_READ = "skill_read"
SKILL_SEARCH = "skill_search"
SKILL_TOOLS = (SKILL_READ, SKILL_SEARCH)

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


def registered_tools() -> Mapping[str, Tool]:
    """The built-in tools and those added with ``register``."""
    return types.MappingProxyType(_registry)


class Toolbox(Protocol):
    """Where a turn gets its tools: the built-ins, or a worker's skill registry too."""

    def tools(self) -> Mapping[str, Tool]:
        """Every tool there is now, by name; a turn takes this once, at its start."""

    def prompt_section(self, tool_names: Collection[str]) -> str:
        """Text for the system prompt of an agent with these tools ("" for none)."""


class RegisteredTools:
    """The ``Toolbox`` of the built-in tools and those added with ``register``."""

    def tools(self) -> Mapping[str, Tool]:
        return registered_tools()

    def prompt_section(self, tool_names: Collection[str]) -> str:
        return ""


def get_tool(
    name: str, allowed: Iterable[str], available: Mapping[str, Tool] | None = None
) -> Tool:
    """The tool ``name`` if this agent may use it; the error lists what it may use instead.

    ``available``: the tools there are (default: ``registered_tools()``).
    """
    available = _registry if available is None else available
    allowed = list(allowed)
    tool = available.get(name)
    if tool is None or name not in allowed:
        has = ", ".join(a for a in allowed if a in available) or "no tools"
        raise ToolError("unknown_tool", f"no tool named {name!r} (this agent has: {has})")
    return tool


def tools_for(names: Iterable[str], available: Mapping[str, Tool] | None = None) -> list[Tool]:
    """The tools named, in order and once each, as the model is offered them."""
    available = _registry if available is None else available
    tools: list[Tool] = []
    for name in dict.fromkeys(names):
        tool = available.get(name)
        if tool is None:
            raise ToolError("unknown_tool", f"no tool named {name!r}")
        tools.append(tool)
    return tools
