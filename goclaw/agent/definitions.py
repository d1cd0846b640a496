"""Agent definitions: immutable snapshots of config.yaml's agents, reloaded while workers run.

``goclaw.config`` checks the shape of each agent; this module resolves what
config cannot see from the bottom layer (prompt files, workspaces, the tool
registry) into an ``AgentDefinition``. A task takes its definition from a
``Catalog`` once, at its start, and keeps it: a reload builds a new catalog
and never touches the old one, so a running task finishes under the
definition it started with.

Only ``agents`` and ``models`` reload. The other sections (database, broker,
worker) shape objects built once at startup, so changing them still needs a
restart; an edit to them is read, validated like any other, and otherwise
ignored until then.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
import types
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

from goclaw.config import AgentSettings, Config, ModelSettings, load_config
from goclaw.errors import ConfigError
from goclaw.filewatch import Stamp, ThrottledCheck, stamp

log = logging.getLogger(__name__)

#: Hex digits kept of a sha256: enough to tell versions apart in logs and events.
VERSION_LENGTH = 12


class UnknownAgent(ConfigError):
    """No agent by that id is configured."""

    def __init__(self, agent_id: str, known: Collection[str]) -> None:
        self.agent_id = agent_id
        super().__init__(f"unknown agent {agent_id!r} (known: {', '.join(known) or 'none'})")


@dataclasses.dataclass(frozen=True)
class AgentDefinition:
    """Everything a turn needs to know about its agent, resolved and fixed."""

    id: str
    settings: AgentSettings
    #: The text itself, so an edit to the prompt file cannot change a running task.
    system_prompt: str
    #: Absolute.
    workspace: Path
    #: ``(model, *fallbacks)``, in the order they are tried.
    models: tuple[str, ...]
    #: One entry per model in ``models``: its configured settings or the defaults.
    model_settings: Mapping[str, ModelSettings]
    #: Changes whenever anything above changes; recorded with a task to say what it ran under.
    version: str


@dataclasses.dataclass(frozen=True)
class Catalog:
    """One immutable snapshot of every agent."""

    agents: Mapping[str, AgentDefinition]
    version: str

    def get(self, agent_id: str) -> AgentDefinition:
        """Raise ``UnknownAgent`` (a ``ConfigError``) listing the ids there are, to fix a typo."""
        try:
            return self.agents[agent_id]
        except KeyError:
            raise UnknownAgent(agent_id, self.agents) from None

    def __contains__(self, agent_id: object) -> bool:
        return agent_id in self.agents


def build_catalog(config: Config, known_tools: Collection[str]) -> Catalog:
    """Resolve every agent of ``config``; raise ``ConfigError`` naming the agent's key.

    Prompt files and workspaces are relative to ``config.home``; every listed tool
    must be in ``known_tools`` so a typo fails at load, not at a model's tool call.
    """
    known_tools = frozenset(known_tools)  # once: a live collection may look at the disk
    definitions = {
        agent_id: _define(config, agent_id, settings, known_tools)
        for agent_id, settings in config.agents.items()
    }
    version = _digest({agent_id: d.version for agent_id, d in sorted(definitions.items())})
    return Catalog(agents=types.MappingProxyType(definitions), version=version)


def _define(
    config: Config, agent_id: str, settings: AgentSettings, known_tools: Collection[str]
) -> AgentDefinition:
    key = f"agents.{agent_id}"
    for tool in settings.tools:
        if tool not in known_tools:
            known = ", ".join(sorted(known_tools)) or "none"
            raise ConfigError(f"{key}.tools: unknown tool {tool!r} (known: {known})")
    prompt = settings.system_prompt
    path = _prompt_path(config, settings)
    if path is not None:
        prompt = _read_prompt(f"{key}.system_prompt_file", path)
    workspace = _under_home(config.home, settings.workspace or f"workspaces/{agent_id}")
    models = (settings.model, *settings.fallbacks)
    model_settings = {model: config.model_settings(model) for model in models}
    version = _digest(
        {
            "id": agent_id,
            "settings": dataclasses.asdict(settings),
            "system_prompt": prompt,
            "workspace": str(workspace),
            "models": {m: dataclasses.asdict(s) for m, s in model_settings.items()},
        }
    )
    return AgentDefinition(
        id=agent_id,
        settings=settings,
        system_prompt=prompt,
        workspace=workspace,
        models=models,
        model_settings=types.MappingProxyType(model_settings),
        version=version,
    )


def _prompt_path(config: Config, settings: AgentSettings) -> Path | None:
    if not settings.system_prompt_file:
        return None
    return _under_home(config.home, settings.system_prompt_file)


def _under_home(home: Path, raw: str) -> Path:
    path = Path(raw).expanduser()
    return (path if path.is_absolute() else home / path).resolve()


def _read_prompt(key: str, path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{key}: file not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{key}: {path} is not UTF-8 text ({exc.reason})") from None


def _digest(data: Any) -> str:
    text = json.dumps(data, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:VERSION_LENGTH]


#: How stale a worker's view of config.yaml may be: edits are seen within this.
RELOAD_CHECK_SECONDS = 1.0


class AgentCatalog:
    """The latest valid ``Catalog``, reloaded when config.yaml or a prompt file changes.

    Checked only inside ``current()`` and at most every ``check_interval`` seconds,
    with no thread: a worker that asks for an agent once per task pays one ``stat``
    per file at most once a second. A file's mtime, size and inode stand for its
    content; an editor that saves moves at least one of them.

    An edit that does not load keeps the previous catalog (workers keep serving the
    last good agents), sets ``last_error`` and logs one warning per bad version of
    the files, not one per call. The environment given at construction is copied
    and re-applied on every reload, as at startup. Only agents and models reload:
    see the module docstring.
    """

    def __init__(
        self,
        home: Path,
        config_path: Path | None,
        env: Mapping[str, str],
        known_tools: Collection[str],
        *,
        check_interval: float = RELOAD_CHECK_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Load once, now; a ``ConfigError`` here propagates: startup fails closed."""
        self._home = Path(home)
        self._config_path = Path(config_path) if config_path else None
        # With no --config, watch where config.yaml would be, so creating it is seen too.
        self._config_file = self._config_path or self._home / "config.yaml"
        self._env = dict(env)
        #: Kept as given: a live collection (skills) is asked afresh at each reload.
        self._known_tools = known_tools
        self._last_error: str | None = None
        self._prompt_files: tuple[Path, ...] = ()
        self._seen = self._stamps()
        self._catalog = self._reload()
        self._throttled_check = ThrottledCheck(self._check, check_interval, clock=clock)

    @classmethod
    def from_config(
        cls,
        config: Config,
        env: Mapping[str, str],
        known_tools: Collection[str],
        **kw: Any,
    ) -> AgentCatalog:
        """Watch the files ``config`` came from (read again now, so no edit slips between)."""
        return cls(config.home, config.path, env, known_tools, **kw)

    @property
    def last_error(self) -> str | None:
        """Why the newest edit was refused, until an edit loads again."""
        return self._last_error

    def current(self) -> Catalog:
        """The catalog to start a task under; hold on to it for the task's whole run."""
        self._throttled_check()
        return self._catalog

    def _check(self) -> None:
        stamps = self._stamps()
        if stamps == self._seen:
            return
        # Recorded before reading: an edit racing the read moves a stamp again, and the
        # next check reloads; a bad version is tried (and warned about) once.
        self._seen = stamps
        try:
            catalog = self._reload()
        except ConfigError as exc:
            self._last_error = str(exc)
            log.warning("agents not reloaded, keeping the previous ones: %s", exc)
            return
        self._last_error = None
        if catalog.version != self._catalog.version:
            log.info("agents reloaded: %s", _describe_change(self._catalog, catalog))
            self._catalog = catalog

    def _reload(self) -> Catalog:
        config = load_config(self._home, self._config_path, self._env)
        prompts = tuple(
            sorted({p for s in config.agents.values() if (p := _prompt_path(config, s))})
        )
        if prompts != self._prompt_files:
            # Watch a prompt file from the moment config names it, even while it is missing
            # (creating it then reloads), and stamp it before it is read, like config.yaml.
            self._prompt_files = prompts
            self._seen = (self._seen[0], *((path, stamp(path)) for path in prompts))
        return build_catalog(config, self._known_tools)

    def _stamps(self) -> tuple[tuple[Path, Stamp], ...]:
        files = (self._config_file, *self._prompt_files)
        return tuple((path, stamp(path)) for path in files)


def _describe_change(old: Catalog, new: Catalog) -> str:
    added = sorted(set(new.agents) - set(old.agents))
    removed = sorted(set(old.agents) - set(new.agents))
    changed = sorted(
        agent_id
        for agent_id in set(old.agents) & set(new.agents)
        if old.agents[agent_id].version != new.agents[agent_id].version
    )
    parts = [
        f"{label} {', '.join(ids)}"
        for label, ids in (("added", added), ("changed", changed), ("removed", removed))
        if ids
    ]
    return "; ".join(parts) or "model settings changed"
