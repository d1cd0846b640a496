"""What a tool is, how its arguments are checked, and the one call that runs it.

The agent loop owns the conversation; this module owns the contract between the
loop and a tool. Every failure a tool can have ends as a ``ToolError`` with a
code the model is shown, so a bad argument, a refused path or a crashing tool
costs the model one turn, never the run.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import jsonschema
import referencing.exceptions

from goclaw.errors import GoclawError

#: OpenAI accepts tool names of this shape only; checked when a tool is defined.
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
#: jsonschema quotes the offending value; a 5 MB ``content`` must not come back whole.
_MESSAGE_CHARS = 300
_MAX_MESSAGES = 5


class ToolError(GoclawError):
    """A failure the model is told about (never crashes the run)."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")

    def __reduce__(self) -> tuple[type[ToolError], tuple[str, str]]:
        # Process workers pickle exceptions; the default would call __init__ with one argument.
        return (type(self), (self.code, self.message))


@dataclasses.dataclass(frozen=True)
class ToolLimits:
    """Caps that keep one tool call from holding a worker thread or its memory for long."""

    exec_timeout_seconds: float = 30.0
    exec_output_bytes: int = 64 * 1024
    read_max_bytes: int = 256 * 1024
    write_max_bytes: int = 1024 * 1024
    list_max_entries: int = 1000
    fetch_timeout_seconds: float = 15.0
    fetch_max_bytes: int = 512 * 1024

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            if getattr(self, field.name) <= 0:
                raise ValueError(f"ToolLimits.{field.name} must be positive")


class ApprovalRequired(Exception):
    """The policy says ``ask`` and no human has answered for this call yet.

    Not a ``ToolError``: the model is not told anything. The agent loop turns it
    into a durable approval request and parks the task (``goclaw/approvals.py``).
    """

    def __init__(self, capability: str, subject: str, policy_version: str, timeout: float):
        super().__init__(f"{capability} {subject!r} needs a human's approval")
        self.capability = capability
        self.subject = subject
        self.policy_version = policy_version
        self.timeout = timeout


class PolicyHook(Protocol):
    """What tools ask before they act. The agent layer's ``EnginePolicyHook`` is the
    real one (``policy.yaml``); ``AllowListedTools`` stands in where there is none."""

    def check(self, ctx: ToolContext, capability: str, subject: str) -> None:
        """Raise ToolError('policy_denied', why) to refuse, ApprovalRequired to ask."""

    def allowed_networks(self, ctx: ToolContext) -> tuple[Any, ...]:
        """Non-public networks outbound requests may reach for this context."""

    def version(self) -> str | None:
        """The policy version decisions are made under now (None: no policy file)."""

    def refused(self, ctx: ToolContext, capability: str, subject: str, reason: str) -> None:
        """Record a refusal made past the policy (the SSRF guard) where decisions are kept."""


class AllowListedTools:
    """A stand-in policy for tests and embedding: a tool may run iff it is listed.

    It judges ``tools.<name>`` capabilities only. Finer ones that a tool asks
    for while it runs (``net.http`` for every hop of ``web_fetch``) pass: being
    allowed the tool is being allowed what it does. Workers use the policy
    engine (``policy.yaml``) instead.
    """

    def __init__(self, allowed: Iterable[str]) -> None:
        self.allowed = frozenset(allowed)

    def check(self, ctx: ToolContext, capability: str, subject: str) -> None:
        kind, _, name = capability.partition(".")
        if kind == "tools" and name not in self.allowed:
            raise ToolError("policy_denied", f"agent {ctx.agent_id!r} may not use tool {name!r}")

    def allowed_networks(self, ctx: ToolContext) -> tuple[Any, ...]:
        return ctx.allowed_networks

    def version(self) -> str | None:
        return None

    def refused(self, ctx: ToolContext, capability: str, subject: str, reason: str) -> None:
        return None

    def __repr__(self) -> str:
        return f"AllowListedTools({sorted(self.allowed)!r})"


@dataclasses.dataclass(frozen=True)
class ToolContext:
    """Where and for whom a tool runs; one per agent turn, shared by its tool calls."""

    workspace: Path
    agent_id: str
    task_id: int
    session_key: str
    limits: ToolLimits = ToolLimits()
    #: Deny everything unless told otherwise: a forgotten policy fails closed.
    policy: PolicyHook = dataclasses.field(default_factory=lambda: AllowListedTools(()))
    #: How outbound tools resolve host names (``socket.getaddrinfo``'s signature); None for
    #: the real one. Tests inject one to play DNS, rebinding included.
    resolver: Callable[..., Any] | None = None
    #: For ``AllowListedTools`` only (the policy engine reads ``networks`` from the policy):
    #: ``ipaddress`` networks the SSRF guard lets outbound requests reach although they are
    #: not public (loopback, private, link-local...); empty: only public addresses.
    allowed_networks: tuple[Any, ...] = ()
    #: The model's id for the tool call being run ("" outside one): approvals key on it.
    call_id: str = ""


@dataclasses.dataclass(frozen=True, eq=False)
class Tool:
    """A function the model may call, described the way the model sees it.

    Compared and hashed by identity: a tool is one registered object, and its
    schema dict would make a field-wise hash fail.
    """

    name: str
    description: str
    #: JSON Schema (Draft 2020-12) for the arguments object.
    parameters: dict[str, Any]
    #: Returns a JSON-serialisable result (a str or a dict); raises ToolError to fail.
    run: Callable[[ToolContext, dict[str, Any]], Any]
    #: True for tools that change the world (write_file, exec): the loop records them in
    #: an idempotency ledger so that a retried task does not repeat them blindly.
    side_effect: bool = False
    #: The argument that policy and audit judge (a path, a command, a URL).
    subject_argument: str | None = None
    #: The policy capability's family: ``tools.<name>`` for built-ins, ``skills.<name>``
    #: for WASM skills (``goclaw.skills``).
    family: str = "tools"

    def __post_init__(self) -> None:
        # A broken definition is a programming error: fail when the tool is defined, not
        # when a model first calls it.
        if not _NAME.match(self.name):
            raise ValueError(f"tool name {self.name!r} must match {_NAME.pattern}")
        if self.parameters.get("type") != "object":
            raise ValueError(f"tool {self.name!r}: parameters must be a JSON Schema of type object")
        jsonschema.Draft202012Validator.check_schema(self.parameters)

    @property
    def capability(self) -> str:
        return f"{self.family}.{self.name}"

    def subject(self, arguments: dict[str, Any]) -> str:
        """What policy and audit see; an omitted argument counts as its schema default."""
        if self.subject_argument is None:
            return ""
        if self.subject_argument in arguments:
            return str(arguments[self.subject_argument])
        spec = self.parameters.get("properties", {}).get(self.subject_argument, {})
        return str(spec.get("default", ""))

    def schema(self) -> dict[str, Any]:
        """The tool in OpenAI's function-calling format."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }


def parse_arguments(tool: Tool, raw: str | dict[str, Any] | None) -> dict[str, Any]:
    """Decode and validate the model's arguments, explaining exactly what is wrong.

    The message goes back to the model, which can only fix what it is told: it
    names the field and the problem (``path: 3 is not of type 'string'``).
    """
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        arguments: Any = {}
    elif isinstance(raw, str):
        try:
            arguments = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ToolError("invalid_arguments", f"arguments are not valid JSON: {exc}") from exc
    else:
        arguments = raw
    if not isinstance(arguments, dict):
        raise ToolError(
            "invalid_arguments",
            f"arguments must be a JSON object, not {type(arguments).__name__}",
        )
    validator = jsonschema.Draft202012Validator(tool.parameters)
    try:
        errors = sorted(
            validator.iter_errors(arguments), key=lambda e: [str(p) for p in e.absolute_path]
        )
    except referencing.exceptions.Unresolvable as exc:  # a skill's schema with a bad $ref
        raise ToolError(
            "invalid_arguments", f"the tool's schema cannot be checked: {exc}"
        ) from None
    if errors:
        problems = [_describe(error) for error in errors[:_MAX_MESSAGES]]
        if len(errors) > _MAX_MESSAGES:
            problems.append(f"and {len(errors) - _MAX_MESSAGES} more")
        raise ToolError("invalid_arguments", "; ".join(problems))
    return dict(arguments)


def _describe(error: jsonschema.ValidationError) -> str:
    message = error.message
    if len(message) > _MESSAGE_CHARS:
        message = message[: _MESSAGE_CHARS - 3] + "..."
    where = ".".join(str(part) for part in error.absolute_path)
    return f"{where}: {message}" if where else message


def authorize(tool: Tool, ctx: ToolContext, arguments: dict[str, Any]) -> None:
    """Ask the policy whether this call may run: ToolError refuses, ApprovalRequired waits.

    A policy hook that itself crashes refuses the call (``tool_crashed``)
    rather than letting it through.
    """
    try:
        ctx.policy.check(ctx, tool.capability, tool.subject(arguments))
    except (ToolError, ApprovalRequired):
        raise
    except Exception as exc:
        raise ToolError("tool_crashed", f"policy check: {type(exc).__name__}: {exc}") from exc


def execute(tool: Tool, ctx: ToolContext, arguments: dict[str, Any]) -> Any:
    """Run an authorised call; whatever goes wrong comes back as a ToolError."""
    try:
        return tool.run(ctx, arguments)
    except (ToolError, ApprovalRequired):
        raise
    except Exception as exc:
        raise ToolError("tool_crashed", f"{type(exc).__name__}: {exc}") from exc


def invoke(tool: Tool, ctx: ToolContext, arguments: dict[str, Any]) -> Any:
    """``authorize`` then ``execute``: the whole of one tool call."""
    authorize(tool, ctx, arguments)
    return execute(tool, ctx, arguments)
