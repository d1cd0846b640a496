"""The default-deny policy engine: ``policy.yaml`` as immutable snapshots, hot-reloaded.

Nothing is allowed unless the policy says so. The file::

    version: 1                      # required; the only format there is
    allow:                          # capabilities granted to every agent
      - tools.read_file             # tools.<built-in tool>: read_file, write_file, list_dir,
      - tools.web_fetch             #   exec, web_fetch
      - net.http                    # outbound HTTP (every hop of web_fetch), see domains
      - acp.read                    # ACP methods that only read
      - skills.*                    # skills.<name>; "skills.*" is every skill
      - mcp.github.*                # mcp.<server>.<tool>; "mcp.<server>.*", "mcp.*"
    domains:                        # hosts net.http may reach
      - api.example.com             # exactly this host
      - .example.org                # any subdomain of example.org (not example.org itself)
    paths:                          # where the file tools may read, write and list
      - .                           # relative: against the agent's workspace (. is all of it)
      - /srv/shared                 # absolute: this directory and everything under it
      - ~/notes                     # ~/: under the home of the user goclaw runs as
    networks:                       # non-public networks the SSRF guard may reach
      - 10.0.0.0/8                  #   (default none: public addresses only)
    approvals:                      # per tool: allowlist (default) | ask | deny
      exec: ask                     #   ask: an allowed call also waits for a human
    approval_timeout: 10m           # an unanswered request is denied after this
    agents:                         # per-agent overrides: they can only narrow
      coder:
        allow: [tools.read_file]    # replaces the global list for this agent
        paths: [src]                # must lie under a global entry of the same kind
        approvals: {write_file: ask}  # merged with the global modes, each as strict or stricter

Rules:

- Default deny. A capability not listed is refused; an absent or empty list
  (``allow``, ``domains``, ``paths``, ``networks``) allows nothing. A missing file
  denies everything (and says so in a warning).
- Wildcards: ``*`` only as the last part of ``skills.*``, ``mcp.*`` and
  ``mcp.<server>.*``. ``tools``, ``acp`` and ``net`` capabilities are listed one by one.
- ``domains``: an entry without a leading dot is one host; ``.example.org`` is every
  host that ends with ``.example.org``. IP literals may be listed as exact hosts.
  Matching is case-insensitive and ignores a trailing dot. Only ``http``/``https``.
- ``paths``: entries are normalised (``..`` collapsed, no symlinks followed: the
  decision is pure) and match themselves and everything below them, by whole
  components (``/srv/data`` does not match ``/srv/database``). A subject path is
  joined to the agent's workspace when relative and normalised the same way. The
  file tools still resolve symlinks and keep every access inside the workspace.
- ``approvals``: how a *built-in tool* call that the rules above allow is gated.
  ``allowlist`` (the default for a tool not listed): the allowlists decide alone.
  ``ask``: the call also needs a human's answer (``goclaw approvals``, ACP
  ``approval.respond``) unless a persisted allow-always rule covers it; no answer
  within ``approval_timeout`` (``90s``, ``10m``, ``1h``; default 10m) is a denial.
  ``deny``: the tool is refused even where the capability is granted. A human can
  never approve what the allowlists deny: ``ask`` only adds a gate.
- ``agents.<id>``: the keys ``allow``, ``domains``, ``paths``, ``networks``,
  ``approvals``; a key left out inherits the global value, a list given replaces
  it, and every entry must already be allowed globally (a narrower capability,
  host, suffix, path or network is fine; anything wider is an error naming its
  line). ``approvals`` is merged per tool with the global modes and may only make
  a tool stricter (allowlist < ask < deny). An agent without a section gets the
  global policy.
- Unknown keys, unknown capabilities, malformed hosts, paths and CIDRs, duplicate
  keys and YAML errors fail the load with ``FILE:LINE: key: why``.

``Policy.version`` is a short sha256 of the canonical content, so comments and
formatting do not change it and any change of meaning does. ``PolicyWatcher`` holds
the current snapshot and reloads it on change; an edit that does not load keeps the
previous policy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import json
import logging
import os
import posixpath
import re
import time
import types
import urllib.parse
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from goclaw.durations import parse_duration
from goclaw.errors import ConfigError
from goclaw.filewatch import ThrottledCheck, stamp

if TYPE_CHECKING:
    from goclaw.audit import AuditLog

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
#: The policy file, relative to ``$GOCLAW_HOME``.
POLICY_FILE = "policy.yaml"
#: The capability a rejected reload is audited under.
RELOAD_CAPABILITY = "policy.reload"
#: Hex digits kept of the sha256 that names a policy (as agent definitions do).
VERSION_LENGTH = 12
#: How stale ``PolicyWatcher.current()`` may be: an edit is seen within this (and < 1 s).
RELOAD_CHECK_SECONDS = 0.5

LIST_KEYS = ("allow", "domains", "paths", "networks")
RULE_KEYS = (*LIST_KEYS, "approvals")
TOP_KEYS = ("version", *RULE_KEYS, "approval_timeout", "agents")
#: Approval modes from the most permissive to the strictest; an agent may only move right.
APPROVAL_MODES = ("allowlist", "ask", "deny")
DEFAULT_APPROVAL_MODE = "allowlist"
DEFAULT_APPROVAL_TIMEOUT_SECONDS = 600.0
#: Fixed capabilities besides ``tools.<name>``, ``skills.<name>`` and ``mcp.<server>.<tool>``.
FIXED_CAPABILITIES = frozenset({"acp.read", "acp.mutate", "net.http"})
#: Capabilities whose subject is a file path judged by ``paths``.
PATH_CAPABILITIES = frozenset({"tools.read_file", "tools.write_file", "tools.list_dir"})
#: The capability whose subject is a URL judged by ``domains``.
HTTP_CAPABILITY = "net.http"

_AGENT_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


class PolicyError(ConfigError):
    """The policy file is invalid."""


@dataclasses.dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str
    capability: str
    subject: str
    policy_version: str


@dataclasses.dataclass(frozen=True)
class Rules:
    """What one agent (or every agent, globally) may do."""

    allow: frozenset[str] = frozenset()
    #: Lower-case; a leading dot marks a suffix.
    domains: tuple[str, ...] = ()
    #: Normalised; absolute, or relative to the agent's workspace.
    paths: tuple[str, ...] = ()
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    #: (tool, mode) pairs, sorted; a tool not listed is ``allowlist``.
    approvals: tuple[tuple[str, str], ...] = ()

    def approval_mode(self, tool: str) -> str:
        return dict(self.approvals).get(tool, DEFAULT_APPROVAL_MODE)

    def canonical(self) -> dict[str, Any]:
        return {
            "allow": sorted(self.allow),
            "domains": sorted(self.domains),
            "paths": sorted(self.paths),
            "networks": sorted(str(n) for n in self.networks),
            "approvals": dict(self.approvals),
        }


@dataclasses.dataclass(frozen=True)
class Policy:
    """One immutable, validated policy. ``decide`` is pure: no I/O, no clock."""

    rules: Rules
    agents: Mapping[str, Rules]
    version: str
    #: Where it came from, for messages.
    source: str = "policy.yaml"
    #: True when the file did not exist (everything is denied).
    missing: bool = False
    #: How long an ``ask`` request waits for a human before it counts as denied.
    approval_timeout: float = DEFAULT_APPROVAL_TIMEOUT_SECONDS

    def current(self) -> Policy:
        """A fixed policy is its own source (what ``PolicyWatcher.current`` is for a file)."""
        return self

    def rules_for(self, agent_id: str | None) -> Rules:
        """The agent's section, or the global rules (for ``None`` too: a non-agent caller)."""
        if agent_id is None:
            return self.rules
        return self.agents.get(agent_id, self.rules)

    def allowed_networks(
        self, agent_id: str | None
    ) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        """For ``ToolContext.allowed_networks``: non-public networks the SSRF guard may reach."""
        return self.rules_for(agent_id).networks

    def approval_mode(self, agent_id: str | None, tool: str) -> str:
        """``allowlist``, ``ask`` or ``deny`` for a call of built-in ``tool`` by this agent."""
        return self.rules_for(agent_id).approval_mode(tool)

    def decide(
        self,
        agent_id: str | None,
        capability: str,
        subject: str = "",
        *,
        workspace: str | os.PathLike[str] | None = None,
    ) -> Decision:
        """May ``agent_id`` use ``capability`` on ``subject``? Never raises.

        First the capability; then, for ``net.http``, the URL's host against
        ``domains``; for the file tools, the path (joined to ``workspace`` when
        relative) against ``paths``.
        """
        rules = self.rules_for(agent_id)
        who = "every agent" if agent_id is None else f"agent {agent_id!r}"

        def verdict(allowed: bool, reason: str) -> Decision:
            return Decision(allowed, reason, capability, subject, self.version)

        if _capability_problem(capability, None) is not None:
            return verdict(False, f"unknown capability {capability!r}")
        if self.missing:
            return verdict(False, f"no policy file at {self.source}: everything is denied")
        if not _grants(rules.allow, capability):
            return verdict(False, f"{capability} is not allowed for {who} ({self.source})")
        if capability == HTTP_CAPABILITY:
            host = _url_host(subject)
            if host is None:
                return verdict(False, f"{subject!r} is not an http(s) URL with a host")
            if not any(_domain_matches(entry, host) for entry in rules.domains):
                return verdict(False, f"host {host!r} is not in the domain allowlist for {who}")
            return verdict(True, f"{capability} to {host} allowed")
        if capability in PATH_CAPABILITIES:
            where = _subject_path(subject, workspace)
            if where is None:
                return verdict(False, f"path {subject!r} cannot be judged (no workspace)")
            base = None if workspace is None else posixpath.normpath(os.fspath(workspace))
            for entry in rules.paths:
                root = entry if entry.startswith("/") else _join(base, entry)
                if root is not None and _under(where, root):
                    return verdict(True, f"{capability} on {where} allowed by path {entry!r}")
            return verdict(False, f"path {where} is not in the path allowlist for {who}")
        return verdict(True, f"{capability} allowed")


# -- loading -------------------------------------------------------------------------


def default_known_tools() -> frozenset[str]:
    """The built-in tool names and the skill tools (imported late: the agent layer sits
    above this module). WASM skills are judged as ``skills.<name>``, not ``tools.``."""
    from goclaw.agent.tools import BUILTIN_TOOLS, SKILL_TOOLS

    return frozenset({*BUILTIN_TOOLS, *SKILL_TOOLS})


def load_policy(path: str | os.PathLike[str], known_tools: Collection[str] | None = None) -> Policy:
    """Read and validate ``path``; a missing file is a policy that denies everything."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return deny_all(str(path))
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise PolicyError(f"{path}: not UTF-8 text ({exc.reason})") from exc
    return parse_policy(text, str(path), known_tools)


def deny_all(source: str = "policy.yaml") -> Policy:
    """What a missing file means: no capability for anyone."""
    rules = Rules()
    version = _version(rules, {}, DEFAULT_APPROVAL_TIMEOUT_SECONDS)
    return Policy(rules, types.MappingProxyType({}), version, source, missing=True)


def parse_policy(
    text: str, source: str = "policy.yaml", known_tools: Collection[str] | None = None
) -> Policy:
    """Validate ``text``; every ``PolicyError`` reads ``SOURCE:LINE: key: why``."""
    tools = frozenset(default_known_tools() if known_tools is None else known_tools)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = mark.line + 1 if mark else 1
        problem = getattr(exc, "problem", None) or str(exc)
        raise PolicyError(f"{source}:{line}: not valid YAML: {problem}") from None
    return _Parser(source, tools).policy(root)


class _Parser:
    def __init__(self, source: str, known_tools: frozenset[str]) -> None:
        self.source = source
        self.known_tools = known_tools
        self._constructor = yaml.constructor.SafeConstructor()

    def fail(self, node: yaml.Node | None, key: str, why: str) -> PolicyError:
        line = node.start_mark.line + 1 if node is not None else 1
        where = f"{key}: " if key else ""
        return PolicyError(f"{self.source}:{line}: {where}{why}")

    def policy(self, root: yaml.Node | None) -> Policy:
        if not isinstance(root, yaml.MappingNode):
            raise self.fail(root, "", "the top level must be a mapping (version: 1, allow: ...)")
        top = self.mapping(root, "", TOP_KEYS)
        if "version" not in top:
            raise self.fail(root, "version", f"missing (write version: {FORMAT_VERSION})")
        vnode = top["version"][1]
        if self.scalar(vnode, "version") != FORMAT_VERSION:
            raise self.fail(vnode, "version", f"must be {FORMAT_VERSION}")
        rules = self.rules(top, "", None)
        agents: dict[str, Rules] = {}
        if "agents" in top:
            anode = top["agents"][1]
            if not isinstance(anode, yaml.MappingNode):
                raise self.fail(anode, "agents", "must be a mapping of agent id to a section")
            for agent_id, (knode, section) in self.mapping(anode, "agents", None).items():
                key = f"agents.{agent_id}"
                if not _AGENT_ID.match(agent_id):
                    raise self.fail(knode, key, f"invalid agent id {agent_id!r}")
                if not isinstance(section, yaml.MappingNode):
                    raise self.fail(section, key, "must be a mapping (allow, domains, ...)")
                fields = self.mapping(section, key, RULE_KEYS)
                agents[agent_id] = self.rules(fields, f"{key}.", rules)
        timeout = DEFAULT_APPROVAL_TIMEOUT_SECONDS
        if "approval_timeout" in top:
            tnode = top["approval_timeout"][1]
            try:
                timeout = parse_duration(self.scalar(tnode, "approval_timeout"))
            except ValueError as exc:
                raise self.fail(tnode, "approval_timeout", str(exc)) from None
        return Policy(
            rules,
            types.MappingProxyType(agents),
            _version(rules, agents, timeout),
            self.source,
            approval_timeout=timeout,
        )

    def mapping(
        self, node: yaml.MappingNode, key: str, allowed: Collection[str] | None
    ) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for knode, vnode in node.value:
            name = self.scalar(knode, key or "(top level)")
            full = f"{key}.{name}" if key else str(name)
            if not isinstance(name, str):
                raise self.fail(knode, full, "keys must be strings")
            if allowed is not None and name not in allowed:
                raise self.fail(knode, full, f"unknown key (known: {', '.join(allowed)})")
            if name in out:
                raise self.fail(knode, full, "duplicate key")
            out[name] = (knode, vnode)
        return out

    def scalar(self, node: yaml.Node, key: str) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            raise self.fail(node, key, "expected a single value, not a list or mapping")
        return self._constructor.construct_object(node)

    def strings(self, node: yaml.Node, key: str) -> list[tuple[yaml.Node, str]]:
        if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
            return []
        if not isinstance(node, yaml.SequenceNode):
            raise self.fail(node, key, "must be a list")
        items = []
        for index, item in enumerate(node.value):
            value = self.scalar(item, f"{key}[{index}]")
            if not isinstance(value, str) or not value.strip():
                raise self.fail(item, f"{key}[{index}]", f"expected a non-empty string: {value!r}")
            items.append((item, value.strip()))
        return items

    def rules(
        self, fields: dict[str, tuple[yaml.Node, yaml.Node]], prefix: str, parent: Rules | None
    ) -> Rules:
        """Global rules (``parent`` None) or an agent's, each entry checked against ``parent``."""
        values: dict[str, Any] = {"approvals": self.approvals(fields, prefix, parent)}
        for name in LIST_KEYS:
            if name not in fields:
                values[name] = getattr(parent if parent is not None else Rules(), name)
                continue
            key = prefix + name
            entries = []
            for index, (item, raw) in enumerate(self.strings(fields[name][1], key)):
                ikey = f"{key}[{index}]"
                try:
                    entries.append(_PARSE[name](raw, self.known_tools, parent))
                except ValueError as exc:
                    raise self.fail(item, ikey, str(exc)) from None
            values[name] = frozenset(entries) if name == "allow" else tuple(dict.fromkeys(entries))
        return Rules(**values)

    def approvals(
        self, fields: dict[str, tuple[yaml.Node, yaml.Node]], prefix: str, parent: Rules | None
    ) -> tuple[tuple[str, str], ...]:
        """Tool -> mode; an agent's entries merge over ``parent``'s and may only tighten."""
        modes = dict(parent.approvals) if parent is not None else {}
        if "approvals" not in fields:
            return tuple(sorted(modes.items()))
        key = prefix + "approvals"
        node = fields["approvals"][1]
        if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
            return tuple(sorted(modes.items()))
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, key, "must be a mapping of tool name to allowlist|ask|deny")
        for tool, (knode, vnode) in self.mapping(node, key, None).items():
            tkey = f"{key}.{tool}"
            if tool not in self.known_tools:
                known = ", ".join(sorted(self.known_tools)) or "none"
                raise self.fail(knode, tkey, f"unknown tool (tools: {known})")
            mode = self.scalar(vnode, tkey)
            if mode not in APPROVAL_MODES:
                raise self.fail(vnode, tkey, f"must be one of {', '.join(APPROVAL_MODES)}")
            inherited = modes.get(tool, DEFAULT_APPROVAL_MODE)
            if parent is not None and APPROVAL_MODES.index(mode) < APPROVAL_MODES.index(inherited):
                raise self.fail(
                    vnode, tkey, f"{mode} widens the global policy's {inherited} for {tool}"
                )
            modes[tool] = mode
        return tuple(sorted(modes.items()))


def _parse_capability(raw: str, known_tools: frozenset[str], parent: Rules | None) -> str:
    problem = _capability_problem(raw, known_tools)
    if problem:
        raise ValueError(problem)
    if parent is not None and not _covered_capability(parent.allow, raw):
        raise ValueError(f"{raw} widens the global policy, which does not allow it")
    return raw


def _parse_domain(raw: str, _tools: frozenset[str], parent: Rules | None) -> str:
    entry = raw.lower().rstrip(".") if raw != "." else raw
    suffix = entry.startswith(".")
    host = entry[1:] if suffix else entry
    if entry.startswith("*"):
        raise ValueError(f"{raw!r}: no wildcards; write .{entry.lstrip('*.')} for subdomains")
    is_ip = not suffix and _ip(host) is not None
    if not is_ip and (not host or not all(_LABEL.match(label) for label in host.split("."))):
        raise ValueError(f"{raw!r} is not a host name (exact.host, .suffix.host or an IP address)")
    if parent is not None and not any(_domain_covers(g, entry) for g in parent.domains):
        raise ValueError(f"{raw} widens the global policy's domains")
    return entry


def _parse_path(raw: str, _tools: frozenset[str], parent: Rules | None) -> str:
    if "\x00" in raw:
        raise ValueError("contains a NUL byte")
    if raw.startswith("~"):
        if not (raw == "~" or raw.startswith("~/")):
            raise ValueError(f"{raw!r}: only ~/ (the current user's home) is supported")
        raw = os.path.expanduser(raw)
    entry = posixpath.normpath(raw)
    if not entry.startswith("/") and (entry == ".." or entry.startswith("../")):
        raise ValueError(f"{raw!r} leaves the workspace; use an absolute path")
    if parent is not None and not any(
        g.startswith("/") == entry.startswith("/") and _under(entry, g) for g in parent.paths
    ):
        raise ValueError(f"{raw} widens the global policy's paths")
    return entry


def _parse_network(
    raw: str, _tools: frozenset[str], parent: Rules | None
) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        net = ipaddress.ip_network(raw, strict=True)
    except ValueError as exc:
        raise ValueError(f"{raw!r} is not a CIDR network: {exc}") from None
    if parent is not None and not any(
        net.version == g.version and net.subnet_of(g)  # type: ignore[arg-type]
        for g in parent.networks
    ):
        raise ValueError(f"{raw} widens the global policy's networks")
    return net


_PARSE: dict[str, Callable[[str, frozenset[str], Rules | None], Any]] = {
    "allow": _parse_capability,
    "domains": _parse_domain,
    "paths": _parse_path,
    "networks": _parse_network,
}


def _version(rules: Rules, agents: Mapping[str, Rules], approval_timeout: float) -> str:
    data = {
        "format": FORMAT_VERSION,
        "rules": rules.canonical(),
        "agents": {agent_id: r.canonical() for agent_id, r in sorted(agents.items())},
        "approval_timeout": approval_timeout,
    }
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:VERSION_LENGTH]


# -- matching ------------------------------------------------------------------------


def _capability_problem(cap: str, known_tools: frozenset[str] | None) -> str | None:
    """Why ``cap`` is not a capability (None when it is); ``known_tools`` None skips the list."""
    if cap in FIXED_CAPABILITIES:
        return None
    kind, _, rest = cap.partition(".")
    parts = rest.split(".") if rest else []
    if kind == "tools" and len(parts) == 1:
        if known_tools is not None and parts[0] not in known_tools:
            known = ", ".join(sorted(known_tools)) or "none"
            return f"unknown tool capability {cap!r} (tools: {known})"
        ok = bool(_NAME.match(parts[0]))
    elif kind == "skills":
        ok = len(parts) == 1 and (parts[0] == "*" or bool(_NAME.match(parts[0])))
    elif kind == "mcp":
        ok = parts == ["*"] or (
            len(parts) == 2
            and bool(_NAME.match(parts[0]))
            and (parts[1] == "*" or bool(_NAME.match(parts[1])))
        )
    else:
        ok = False
    if ok:
        return None
    known = "tools.<tool>, acp.read, acp.mutate, net.http, skills.<name>, mcp.<server>.<tool>"
    return f"unknown capability {cap!r} (known: {known})"


def _grants(allow: frozenset[str], cap: str) -> bool:
    if "*" in cap:
        return False  # a request names one capability
    if cap in allow:
        return True
    kind, _, rest = cap.partition(".")
    if kind == "skills":
        return "skills.*" in allow
    if kind == "mcp":
        server = rest.split(".", 1)[0]
        return "mcp.*" in allow or f"mcp.{server}.*" in allow
    return False


def _covered_capability(allow: frozenset[str], cap: str) -> bool:
    """Whether an agent's entry ``cap`` (a wildcard too) is within the global ``allow``."""
    if cap in allow:
        return True
    if cap.endswith(".*"):
        return cap.startswith("mcp.") and "mcp.*" in allow
    return _grants(allow, cap)


def _domain_matches(entry: str, host: str) -> bool:
    if entry.startswith("."):
        return host.endswith(entry)
    return host == entry


def _domain_covers(global_entry: str, entry: str) -> bool:
    """Whether every host ``entry`` matches is matched by ``global_entry``."""
    if entry.startswith("."):
        return global_entry.startswith(".") and entry.endswith(global_entry)
    return _domain_matches(global_entry, entry)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None


def _url_host(url: str) -> str | None:
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname
    except ValueError:
        return None
    if parts.scheme.lower() not in ("http", "https") or not host:
        return None
    host = host.rstrip(".").lower()
    try:
        host = host.encode("idna").decode("ascii")
    except UnicodeError:
        return None
    return host or None


def _subject_path(subject: str, workspace: str | os.PathLike[str] | None) -> str | None:
    if "\x00" in subject:
        return None
    path = subject or "."
    if not path.startswith("/"):
        if workspace is None:
            return None
        path = posixpath.join(os.fspath(workspace), path)
    if not path.startswith("/"):
        return None  # a relative workspace: nothing absolute to judge
    return posixpath.normpath(path)


def _join(base: str | None, entry: str) -> str | None:
    if base is None or not base.startswith("/"):
        return None
    return posixpath.normpath(posixpath.join(base, entry))


def _under(path: str, root: str) -> bool:
    """``path`` is ``root`` or below it, by whole components (both normalised)."""
    if root in ("/", "."):
        return root == "/" or not path.startswith("/") or path == "."
    return path == root or path.startswith(root + "/")


# -- watching ------------------------------------------------------------------------


class PolicyWatcher:
    """The current ``Policy`` of a file, reloaded when the file changes.

    Like ``AgentCatalog``: no thread. ``current()`` stats the file at most once per
    ``check_interval`` (0.5 s), so a valid edit is in force within 1 s for every
    caller that asks, and a process that asks on every decision pays one ``stat``
    per half second. mtime, ctime, size and inode stand for the content.

    An edit that does not load keeps the previous policy: one warning naming the
    line, ``last_error``, and ``on_rejected(reason, kept_version)`` (once per bad
    version of the file, not once per call). A deleted file denies everything.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        known_tools: Collection[str] | None = None,
        on_rejected: Callable[[str, str], None] | None = None,
        check_interval: float = RELOAD_CHECK_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Load now; a ``PolicyError`` propagates, so startup fails closed naming the line."""
        self.path = Path(path)
        self._known_tools = frozenset(default_known_tools() if known_tools is None else known_tools)
        self._on_rejected = on_rejected
        self._last_error: str | None = None
        self._seen = stamp(self.path)
        self._policy = load_policy(self.path, self._known_tools)
        if self._policy.missing:
            log.warning("no policy file at %s: every capability is denied", self.path)
        self._throttled_check = ThrottledCheck(self._check, check_interval, clock=clock)

    @property
    def last_error(self) -> str | None:
        """Why the newest edit was refused, until an edit loads again."""
        return self._last_error

    def current(self) -> Policy:
        """The policy in force now (reloaded first if the file changed and it is time)."""
        self._throttled_check()
        return self._policy

    def _check(self) -> None:
        now = stamp(self.path)
        if now == self._seen:
            return
        # Recorded before reading: an edit racing the read moves the stamp again.
        self._seen = now
        try:
            policy = load_policy(self.path, self._known_tools)
        except PolicyError as exc:
            self._reject(str(exc))
            return
        self._last_error = None
        if policy.missing and not self._policy.missing:
            log.warning("policy file %s was removed: every capability is denied", self.path)
        if policy.version != self._policy.version:
            log.info("policy reloaded: version %s -> %s", self._policy.version, policy.version)
        self._policy = policy

    def _reject(self, reason: str) -> None:
        self._last_error = reason
        kept = self._policy.version
        log.warning("policy not reloaded, keeping version %s: %s", kept, reason)
        if self._on_rejected is not None:
            try:
                self._on_rejected(reason, kept)
            except Exception:
                log.exception("policy on_rejected callback failed")


def policy_path(home: str | os.PathLike[str]) -> Path:
    """The policy file of a goclaw home."""
    return Path(home) / POLICY_FILE


def watch_policy(path: str | os.PathLike[str], audit: AuditLog | None) -> PolicyWatcher:
    """A process's ``PolicyWatcher``: a refused edit is audited (``policy.reload``) as well
    as logged. Raises ``PolicyError`` for an invalid file: the process must not start."""

    def rejected(reason: str, kept_version: str) -> None:
        if audit is not None:
            audit.record(
                agent="-",
                task_id=None,
                session=None,
                capability=RELOAD_CAPABILITY,
                subject=str(path),
                decision="reject",
                reason=f"kept version {kept_version}: {reason}",
                policy_version=kept_version,
            )

    return PolicyWatcher(path, on_rejected=rejected)
