"""The skills a worker serves: discovered, staged in three phases, hot-reloaded, offered as tools.

``SkillRegistry.current()`` is an immutable ``Snapshot``. A reload (the skill
folders' stamps moved; checked at most once a second, from whichever thread
asks) builds a new snapshot: an unchanged WASM skill keeps its live version, a
changed one is *staged* (compile, instantiate, self-test) and goes live only if
every phase passes. Otherwise the version already serving stays, and the
rejection is logged and audited (``skills.reload``, decision ``reject``). A
skill whose first load fails is still listed, and its calls answer the fault
that stopped it, so the model and ``goclaw skill list`` see why.

Each invocation checks the quarantine, runs in the sandbox, and records any
fault (``goclaw.skills.quarantine``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import threading
import time
import types
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

from goclaw.agent.tools import (
    BUILTIN_TOOLS,
    SKILL_READ,
    SKILL_SEARCH,
    Tool,
    ToolContext,
    ToolError,
    registered_tools,
)
from goclaw.agent.tools.web import web_fetch
from goclaw.audit import AuditLog
from goclaw.config import Config
from goclaw.errors import GoclawError
from goclaw.filewatch import ThrottledCheck
from goclaw.skills.discovery import discover, missing_requirements, skill_sources, stamps
from goclaw.skills.manifest import Manifest
from goclaw.skills.quarantine import SkillHealth
from goclaw.skills.sandbox import CompiledModule, Invocation, MemoryStore, Sandbox, SkillFault
from goclaw.skills.search import SkillIndex
from goclaw.store.database import Database
from goclaw.store.kv import KeyValue

log = logging.getLogger(__name__)

RELOAD_CAPABILITY = "skills.reload"
RELOAD_CHECK_SECONDS = 1.0
#: Instruction skills named in the prompt; past this, the agent finds them with skill_search.
PROMPT_SKILLS = 20
QUARANTINED = "skill_quarantined"
#: The kv namespace of a skill's own key space.
KV_NAMESPACE = "skill:{}"
#: Where compiled modules are cached, under ``$GOCLAW_HOME``.
CACHE_DIR = Path("cache") / "wasm"


@dataclasses.dataclass(frozen=True)
class WasmSkill:
    manifest: Manifest
    source: str
    #: The version serving; None when no version ever passed staging.
    live: CompiledModule | None
    #: Why no version serves (``live`` None), or why the newest one was rejected.
    rejection: str | None = None
    #: The (manifest, module sha256) last rejected, so an unchanged reject is not retried.
    rejected: tuple[Manifest, str] | None = None
    #: The fault calls answer while nothing is live.
    fault: SkillFault | None = None


@dataclasses.dataclass(frozen=True)
class InstructionSkill:
    manifest: Manifest
    source: str
    #: What this machine lacks (``requires``); empty: eligible.
    missing: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Snapshot:
    wasm: Mapping[str, WasmSkill]
    instructions: Mapping[str, InstructionSkill]
    #: ``SKILL.md`` files that did not load: (folder, why).
    problems: tuple[tuple[Path, str], ...]
    tools: Mapping[str, Tool]
    index: SkillIndex

    def describe(self, name: str) -> WasmSkill | InstructionSkill | None:
        return self.wasm.get(name) or self.instructions.get(name)


class StagingError(GoclawError):
    """A new version failed a phase of staging; the version serving (if any) stays."""

    def __init__(self, phase: str, fault: SkillFault) -> None:
        super().__init__(f"{phase}: {fault.code}: {fault.message}")
        self.phase = phase
        self.fault = fault


class SkillRegistry:
    def __init__(
        self,
        config: Config,
        *,
        db: Database | None = None,
        audit: AuditLog | None = None,
        sandbox: Sandbox | None = None,
        env: Mapping[str, str] | None = None,
        check_interval: float = RELOAD_CHECK_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        fetch: Callable[[ToolContext, str], dict[str, Any]] = web_fetch,
    ) -> None:
        self.settings = config.skills
        self.sources = skill_sources(config)
        self.db = db
        self.audit = audit
        self.env = dict(os.environ if env is None else env)
        self.fetch = fetch
        self.sandbox = sandbox or Sandbox(
            config.home / CACHE_DIR, max_output_bytes=self.settings.max_output_bytes
        )
        self.health = None if db is None else SkillHealth(db, audit, self.settings)
        self._rebuild = threading.Lock()
        self._seen = stamps(self.sources)
        self._snapshot = self._build(None)
        self._throttled = ThrottledCheck(self._check, check_interval, clock=clock)

    # -- snapshots -----------------------------------------------------------

    def current(self) -> Snapshot:
        self._throttled()
        return self._snapshot

    def reload(self) -> Snapshot:
        """Look at the folders now (the CLI, tests); a worker relies on ``current``."""
        self._check()
        return self._snapshot

    def tools(self) -> Mapping[str, Tool]:
        """The ``Toolbox`` interface: the built-in tools and every skill's."""
        return {**registered_tools(), **self.current().tools}

    def _check(self) -> None:
        # One rebuild at a time (``reload`` and the throttled check may race): a rebuild
        # that read the folders earlier must not replace one that read them later.
        with self._rebuild:
            seen = stamps(self.sources)
            if seen == self._seen:
                return
            self._seen = seen
            self._snapshot = self._build(self._snapshot)

    def _build(self, previous: Snapshot | None) -> Snapshot:
        discovery = discover(self.sources, self.settings)
        wasm: dict[str, WasmSkill] = {}
        instructions: dict[str, InstructionSkill] = {}
        problems = list(discovery.problems)
        reserved = {*BUILTIN_TOOLS, *registered_tools(), SKILL_READ, SKILL_SEARCH}
        for name, found in discovery.skills.items():
            manifest = found.manifest
            if name in reserved:
                problems.append((manifest.folder, f"{manifest.path}: name: {name!r} is a tool"))
            elif manifest.is_wasm:
                old = previous.wasm.get(name) if previous else None
                wasm[name] = self._wasm(manifest, found.source, old)
            else:
                missing = tuple(missing_requirements(manifest, self.env))
                instructions[name] = InstructionSkill(manifest, found.source, missing)
        if previous is not None:
            self._keep_unreadable(previous, problems, wasm)
        for folder, why in problems:
            if previous is None or (folder, why) not in previous.problems:
                log.warning("skill in %s not loaded: %s", folder, why)
        tools: dict[str, Tool] = {SKILL_READ: self._read_tool(), SKILL_SEARCH: self._search_tool()}
        tools.update({name: self._tool(skill.manifest) for name, skill in wasm.items()})
        entries = [(n, s.manifest.description) for n, s in {**instructions, **wasm}.items()]
        return Snapshot(
            wasm=types.MappingProxyType(wasm),
            instructions=types.MappingProxyType(instructions),
            problems=tuple(problems),
            tools=types.MappingProxyType(tools),
            index=SkillIndex(entries),
        )

    def _keep_unreadable(
        self, previous: Snapshot, problems: list[tuple[Path, str]], wasm: dict[str, WasmSkill]
    ) -> None:
        """A live skill whose SKILL.md stopped loading keeps serving its last good version."""
        broken = dict(problems)
        for name, skill in previous.wasm.items():
            why = broken.get(skill.manifest.folder)
            if why is None or name in wasm or skill.live is None:
                continue
            wasm[name] = skill
            if skill.rejection != why:
                self._reject(name, "manifest", why)
                wasm[name] = dataclasses.replace(skill, rejection=why)

    def _wasm(self, manifest: Manifest, source: str, old: WasmSkill | None) -> WasmSkill:
        try:
            wasm = manifest.module.read_bytes()  # type: ignore[union-attr]
        except OSError as exc:
            staging = StagingError(
                "compile", SkillFault("skill_abi_mismatch", f"cannot read: {exc}")
            )
            return self._rejected(manifest, source, old, staging, "")
        sha256 = CompiledModule.digest(wasm)
        if old is not None:
            live = old.live
            if old.manifest == manifest and live is not None and live.sha256 == sha256:
                # Unchanged (or changed back): no new staging, and no stale rejection.
                return dataclasses.replace(old, rejection=None, rejected=None)
            if old.rejected == (manifest, sha256):
                return old  # the version rejected last time: not again
        try:
            live = self._stage(manifest, wasm)
        except StagingError as staging:
            return self._rejected(manifest, source, old, staging, sha256)
        except Exception as exc:  # a bug of ours must not take every other skill down
            log.exception("staging skill %s failed unexpectedly", manifest.name)
            staging = StagingError("staging", SkillFault("skill_trap", f"{type(exc).__name__}"))
            return self._rejected(manifest, source, old, staging, sha256)
        if old is not None:
            log.info("skill %s: new version %s is live", manifest.name, live.sha256[:12])
        return WasmSkill(manifest=manifest, source=source, live=live)

    def _rejected(
        self,
        manifest: Manifest,
        source: str,
        old: WasmSkill | None,
        staging: StagingError,
        sha256: str,
    ) -> WasmSkill:
        self._reject(manifest.name, staging.phase, str(staging.fault.message), staging.fault.code)
        why = str(staging)
        if old is not None and old.live is not None:
            return dataclasses.replace(old, rejection=why, rejected=(manifest, sha256))
        return WasmSkill(
            manifest=manifest,
            source=source,
            live=None,
            rejection=why,
            rejected=(manifest, sha256),
            fault=SkillFault(staging.fault.code, f"skill {manifest.name!r} did not load: {why}"),
        )

    def _stage(self, manifest: Manifest, wasm: bytes) -> CompiledModule:
        return stage(self.sandbox, manifest, wasm)

    def _reject(self, name: str, phase: str, why: str, code: str = "") -> None:
        reason = f"{phase} failed: {code + ': ' if code else ''}{why}"
        log.warning("skill %s: the new version is not used (%s)", name, reason)
        if self.audit is None:
            return
        try:
            self.audit.record(
                agent="-",
                task_id=None,
                session=None,
                capability=RELOAD_CAPABILITY,
                subject=name,
                decision="reject",
                reason=reason,
                policy_version="-",
            )
        except Exception:
            log.exception("could not audit the rejected reload of skill %s", name)

    # -- calls ---------------------------------------------------------------

    def invoke(self, name: str, ctx: ToolContext, arguments: Mapping[str, Any]) -> Any:
        """One call of WASM skill ``name`` (arguments already validated)."""
        skill = self.current().wasm.get(name)
        if skill is None:
            raise ToolError("unknown_tool", f"no skill named {name!r} is loaded")
        if self.health is not None:
            quarantine = self.health.quarantine_of(name)
            if quarantine is not None:
                raise ToolError(
                    QUARANTINED,
                    f"skill {name!r} is quarantined ({quarantine.reason}); "
                    f"`goclaw skill enable {name}` lifts it",
                )
        manifest = skill.manifest
        assert manifest.limits is not None
        try:
            if skill.live is None:
                assert skill.fault is not None
                raise skill.fault
            store = self._store(name)
            invocation = Invocation(
                skill=name,
                capabilities=manifest.capabilities,
                ctx=ctx,
                store=store,
                fetch=self.fetch,
                deadline=time.monotonic() + manifest.limits.timeout_seconds,
            )
            return self.sandbox.invoke(skill.live, manifest.limits, arguments, invocation)
        except SkillFault as fault:
            raise self._fault(name, fault, ctx) from None

    def _store(self, name: str) -> KeyValue | MemoryStore:
        return MemoryStore() if self.db is None else KeyValue(self.db, KV_NAMESPACE.format(name))

    def _fault(self, name: str, fault: SkillFault, ctx: ToolContext) -> SkillFault:
        log.warning("skill %s faulted in task %s: %s", name, ctx.task_id, fault)
        if self.health is None:
            return fault
        quarantine = self.health.record_fault(
            name,
            fault.code,
            fault.message,
            agent=ctx.agent_id,
            task_id=ctx.task_id or None,
            session=ctx.session_key or None,
            policy_version=ctx.policy.version() or "-",
        )
        if quarantine is None:
            return fault
        log.warning("skill %s is quarantined: %s", name, quarantine.reason)
        return SkillFault(
            fault.code,
            f"{fault.message} (this quarantined the skill: `goclaw skill enable {name}` lifts it)",
        )

    # -- tools ---------------------------------------------------------------

    def _tool(self, manifest: Manifest) -> Tool:
        return Tool(
            name=manifest.name,
            description=manifest.description,
            parameters=dict(manifest.input_schema),
            run=functools.partial(_run_skill, self, manifest.name),
            # A call that writes its key space must not run twice when a turn is retried.
            side_effect="kv" in manifest.capabilities,
            family="skills",
        )

    def _read_tool(self) -> Tool:
        return Tool(
            name=SKILL_READ,
            description=(
                "Load the full instructions of a skill listed under 'Skills' in your "
                "instructions (or found with skill_search). Read a skill before you follow it."
            ),
            parameters={
                "type": "object",
                "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 64}},
                "required": ["name"],
                "additionalProperties": False,
            },
            run=lambda ctx, arguments: self.read(arguments["name"]),
            subject_argument="name",
        )

    def _search_tool(self) -> Tool:
        return Tool(
            name=SKILL_SEARCH,
            description=(
                "Find skills by what they do: searches the names and descriptions of every "
                "skill and answers the best matches."
            ),
            parameters={
                "type": "object",
                "properties": {
                    "query": {"type": "string", "minLength": 1, "maxLength": 500},
                    "limit": {"type": "integer", "minimum": 1, "maximum": 20, "default": 5},
                },
                "required": ["query"],
                "additionalProperties": False,
            },
            run=lambda ctx, arguments: self.search(arguments["query"], arguments.get("limit", 5)),
            subject_argument="query",
        )

    def read(self, name: str) -> dict[str, Any]:
        """``skill_read``: the full text, loaded only now (progressive disclosure)."""
        snapshot = self.current()
        skill = snapshot.describe(name)
        if skill is None:
            raise ToolError("unknown_skill", f"no skill named {name!r}; try skill_search")
        if isinstance(skill, InstructionSkill) and skill.missing:
            needs = _and(skill.missing)
            raise ToolError("skill_ineligible", f"skill {name!r} cannot run here: it needs {needs}")
        manifest = skill.manifest
        text = manifest.body
        if isinstance(skill, WasmSkill):
            text = f"(This skill is the tool {name!r}: call it.)\n\n{text}"
        return {"name": name, "description": manifest.description, "instructions": text}

    def search(self, query: str, limit: int = 5) -> list[dict[str, Any]]:
        snapshot = self.current()
        results = []
        for name, score in snapshot.index.search(query, limit):
            skill = snapshot.describe(name)
            assert skill is not None
            entry: dict[str, Any] = {
                "name": name,
                "description": skill.manifest.description,
                "kind": "tool" if isinstance(skill, WasmSkill) else "instructions",
                "score": round(score, 3),
            }
            if isinstance(skill, InstructionSkill) and skill.missing:
                entry["ineligible"] = f"needs {_and(skill.missing)}"
            results.append(entry)
        return results

    def prompt_section(self, tool_names: Collection[str]) -> str:
        """What the system prompt says about instruction skills: names and descriptions only."""
        if SKILL_READ not in tool_names:
            return ""
        eligible = [s for s in self.current().instructions.values() if not s.missing]
        if not eligible:
            return ""
        eligible.sort(key=lambda s: s.manifest.name)
        lines = [
            "## Skills",
            "Instructions for these tasks are available. Before doing one, load its "
            "instructions with skill_read.",
        ]
        lines += [
            f"- {s.manifest.name}: {s.manifest.description}" for s in eligible[:PROMPT_SKILLS]
        ]
        if len(eligible) > PROMPT_SKILLS:
            lines.append(f"({len(eligible) - PROMPT_SKILLS} more: find them with skill_search.)")
        return "\n".join(lines)


def _run_skill(
    registry: SkillRegistry, name: str, ctx: ToolContext, arguments: dict[str, Any]
) -> Any:
    return registry.invoke(name, ctx, arguments)


def _and(items: Collection[str]) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def stage(sandbox: Sandbox, manifest: Manifest, wasm: bytes) -> CompiledModule:
    """Compile, instantiate, self-test; raise ``StagingError`` naming the phase that failed."""
    assert manifest.limits is not None
    try:
        compiled = sandbox.compile(wasm)
    except SkillFault as fault:
        raise StagingError("compile", fault) from None
    try:
        sandbox.instantiate(compiled, manifest.limits, _self_test_call(manifest))
    except ToolError as exc:
        raise StagingError("instantiate", _as_fault(exc)) from None
    for index, example in enumerate(manifest.examples):
        phase = f"self-test examples[{index}]"
        try:
            output = sandbox.invoke(
                compiled, manifest.limits, example.input, _self_test_call(manifest)
            )
        except ToolError as exc:
            raise StagingError(phase, _as_fault(exc)) from None
        if example.output is not None and output != example.output:
            fault = SkillFault(
                "skill_bad_output",
                f"answered {json.dumps(output)[:200]}, the manifest expects "
                f"{json.dumps(example.output)[:200]}",
            )
            raise StagingError(phase, fault)
    return compiled


def _as_fault(exc: ToolError) -> SkillFault:
    """A host refusal during staging (a start function calling http_get) fails it too."""
    return exc if isinstance(exc, SkillFault) else SkillFault(exc.code, exc.message)


def stage_folder(manifest: Manifest, config: Config) -> CompiledModule:
    """Stage a skill outside any worker (``goclaw skill install``)."""
    assert manifest.module is not None
    try:
        wasm = manifest.module.read_bytes()
    except OSError as exc:
        raise StagingError("compile", SkillFault("skill_abi_mismatch", str(exc))) from None
    sandbox = Sandbox(config.home / CACHE_DIR, max_output_bytes=config.skills.max_output_bytes)
    return stage(sandbox, manifest, wasm)


def _self_test_call(manifest: Manifest) -> Invocation:
    """A self-test runs with a scratch key space and no network."""

    def no_network(ctx: ToolContext, url: str) -> dict[str, Any]:
        raise ToolError("policy_denied", "a self-test may not use the network")

    assert manifest.limits is not None
    return Invocation(
        skill=manifest.name,
        capabilities=manifest.capabilities,
        ctx=ToolContext(workspace=Path(os.devnull), agent_id="-", task_id=0, session_key=""),
        store=MemoryStore(),
        fetch=no_network,
        deadline=time.monotonic() + manifest.limits.timeout_seconds,
    )
