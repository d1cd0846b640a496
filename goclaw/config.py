"""Configuration: defaults, then ``config.yaml``, then the environment.

Every setting is a typed field of a frozen dataclass, so one walker can read
YAML and environment variables, reject unknown keys, and name the exact key
that is wrong. Invalid configuration fails closed: nothing starts.

Environment overrides use ``GOCLAW_<SECTION>__<KEY>`` (for example
``GOCLAW_BROKER__LEASE_SECONDS=5``); ``GOCLAW_DATABASE_URL`` is accepted as
the documented short form of ``GOCLAW_DATABASE__URL``. Agents take
``GOCLAW_AGENTS__<ID>__<KEY>`` (the id is lower-cased; list fields are
comma-separated). ``models`` has no environment form: its keys are model
strings such as ``openai/gpt-4o-mini``, and ``/`` cannot appear in a variable
name.

This module is the bottom layer: it checks the shape of agents and models but
knows nothing of tools or prompt files; ``goclaw.agent.definitions`` resolves
those, and reloads agents while workers run.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from goclaw.errors import ConfigError

HOME_ENV = "GOCLAW_HOME"
DEFAULT_HOME = "~/.goclaw"
ENV_PREFIX = "GOCLAW_"
ENV_ALIASES = {"GOCLAW_DATABASE_URL": ("database", "url")}

AGENT_ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
TOOL_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")
ENV_NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

#: The agent a task runs under when it names none, and the one goclaw
#: declares by itself when config.yaml declares no agents.
DEFAULT_AGENT_ID = "default"
#: A model that runs on this machine with no account, so a fresh install answers.
LOCAL_MODEL = "local/smollm2"
HOSTED_MODEL = "openai/gpt-4o-mini"
HOSTED_MODEL_KEY_ENV = "OPENAI_API_KEY"
IMPLICIT_TOOLS = ("read_file", "write_file", "list_dir")
IMPLICIT_SYSTEM_PROMPT = "You are a helpful assistant."
#: SmolLM2-135M drifts into French and rambles unless told this (measured).
LOCAL_SYSTEM_PROMPT = "You are a helpful assistant. Answer in one short English sentence."
#: What an agent does with external content that looks like a prompt injection
#: (``goclaw.agent.untrusted`` imports this tuple, so there is one list).
INJECTION_GUARD_ACTIONS = ("log", "warn", "block")


@dataclasses.dataclass(frozen=True)
class DatabaseSettings:
    #: ``sqlite:///PATH`` or ``postgresql://…``; empty means SQLite at ``$GOCLAW_HOME/goclaw.db``.
    url: str = ""
    #: Seconds a SQLite connection waits for the write lock before failing.
    busy_timeout_seconds: float = 10.0

    def validate(self) -> None:
        if self.url and not self.url.startswith(("sqlite:", "postgresql:", "postgres:")):
            raise ConfigError(
                f"database.url: unsupported scheme in {self.url!r} "
                "(use sqlite:///PATH or postgresql://USER@HOST:PORT/DB)"
            )
        _positive("database.busy_timeout_seconds", self.busy_timeout_seconds)


@dataclasses.dataclass(frozen=True)
class BrokerSettings:
    #: How long a claim is valid without a heartbeat.
    lease_seconds: float = 30.0
    #: How often a worker renews the leases of the tasks it runs.
    heartbeat_seconds: float = 10.0
    #: Attempts before a task is dead-lettered, unless the task sets its own.
    max_attempts: int = 5
    #: The same error this many times in a row dead-letters a task early.
    poison_pill_threshold: int = 3
    #: First retry delay; doubles per attempt, with jitter, up to the cap.
    retry_base_seconds: float = 1.0
    retry_max_seconds: float = 300.0
    #: Longest a claimed-but-idle worker sleeps before looking again, even without a doorbell.
    idle_poll_seconds: float = 1.0
    #: How often a running task's cancellation is checked (cancel is seen within this).
    cancel_check_seconds: float = 0.25
    #: Largest JSON payload a task may carry; bigger ones are refused at submit.
    max_payload_bytes: int = 1_048_576

    def validate(self) -> None:
        for name in (
            "lease_seconds",
            "heartbeat_seconds",
            "retry_base_seconds",
            "retry_max_seconds",
            "idle_poll_seconds",
            "cancel_check_seconds",
        ):
            _positive(f"broker.{name}", getattr(self, name))
        if self.heartbeat_seconds * 2 > self.lease_seconds:
            raise ConfigError(
                f"broker.heartbeat_seconds: {self.heartbeat_seconds} must be at most half of "
                f"broker.lease_seconds ({self.lease_seconds}), or leases expire between heartbeats"
            )
        if self.max_payload_bytes < 1024:
            raise ConfigError(
                f"broker.max_payload_bytes: must be at least 1024, got {self.max_payload_bytes}"
            )
        if self.max_attempts < 1:
            raise ConfigError(f"broker.max_attempts: must be at least 1, got {self.max_attempts}")
        if self.poison_pill_threshold < 2:
            raise ConfigError(
                "broker.poison_pill_threshold: must be at least 2, "
                f"got {self.poison_pill_threshold}"
            )
        if self.retry_max_seconds < self.retry_base_seconds:
            raise ConfigError(
                "broker.retry_max_seconds: must not be below broker.retry_base_seconds"
            )


@dataclasses.dataclass(frozen=True)
class WorkerSettings:
    #: Tasks one worker process runs at once (Huey worker threads or processes).
    concurrency: int = 4
    queue: str = "default"
    #: ``thread`` or ``process`` (Huey's worker types).
    worker_type: str = "thread"
    #: Tasks a process may hold claimed beyond those it runs (visible as CLAIMED).
    #: 1 lets a finishing thread start its next task in the same commit; 0 is
    #: fairest to other workers when tasks are long.
    prefetch: int = 1
    #: Import the model library (LiteLLM: ~2 s, ~170 MB) when the worker starts,
    #: so the first agent turn does not wait for it; false defers it to that turn.
    preload_models: bool = True

    def validate(self) -> None:
        if self.concurrency < 1:
            raise ConfigError(f"worker.concurrency: must be at least 1, got {self.concurrency}")
        if self.worker_type not in ("thread", "process"):
            raise ConfigError(
                f"worker.worker_type: must be 'thread' or 'process', got {self.worker_type!r}"
            )
        if not self.queue:
            raise ConfigError("worker.queue: must not be empty")
        if not 0 <= self.prefetch <= 1000:
            raise ConfigError(f"worker.prefetch: must be between 0 and 1000, got {self.prefetch}")


@dataclasses.dataclass(frozen=True)
class GatewaySettings:
    """The gateway process: where it listens and what one client may ask of it."""

    host: str = "127.0.0.1"
    port: int = 18789
    #: Origins a browser's WebSocket upgrade may come from (exact ``scheme://host[:port]``).
    #: Clients that send no Origin header (programs, not browsers) are not affected.
    allowed_origins: tuple[str, ...] = ()
    #: Largest HTTP request body (the OpenAI API's JSON).
    max_body_bytes: int = 1_048_576
    #: Largest ACP text frame; bigger ones get a JSON-RPC error and the socket stays open.
    max_frame_bytes: int = 1_048_576
    #: Open WebSocket connections at once; more are refused with 503.
    max_connections: int = 2000
    #: Messages waiting to be sent on one WebSocket before its subscriptions are paused
    #: and the client is told ``system.backpressure``.
    send_queue_size: int = 512
    #: Events read per page when a subscriber replays from a cursor.
    replay_page_size: int = 500
    #: Requests (HTTP requests and ACP frames) per second, per token and per client IP.
    rate_limit_per_second: float = 200.0
    #: Burst above the rate before requests get 429.
    rate_limit_burst: int = 400
    #: How often the gateway looks for new events to stream when no doorbell rings (workers
    #: ring one after each event commit; this is the fallback if a ring is lost).
    poll_seconds: float = 0.05
    #: The hint sent with a 429 / queue-saturated error when an agent's queue is full.
    saturated_retry_after_seconds: float = 2.0

    def validate(self) -> None:
        if not self.host:
            raise ConfigError("gateway.host: must not be empty")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"gateway.port: must be between 0 and 65535, got {self.port}")
        for origin in self.allowed_origins:
            if not re.match(r"^https?://[^/\s]+$", origin):
                raise ConfigError(
                    f"gateway.allowed_origins: {origin!r} is not an origin "
                    "(scheme://host[:port], no path)"
                )
        for name in ("max_body_bytes", "max_frame_bytes"):
            _at_least(f"gateway.{name}", getattr(self, name), 1024)
        for name in ("max_connections", "send_queue_size", "replay_page_size", "rate_limit_burst"):
            _at_least(f"gateway.{name}", getattr(self, name), 1)
        for name in ("rate_limit_per_second", "poll_seconds", "saturated_retry_after_seconds"):
            _positive(f"gateway.{name}", getattr(self, name))
            _finite(f"gateway.{name}", getattr(self, name))


@dataclasses.dataclass(frozen=True)
class AgentSettings:
    """One named agent as config.yaml declares it (tools and prompt files not yet resolved)."""

    #: A LiteLLM model string, ``provider/name``. Required for every declared agent.
    model: str = ""
    #: Models tried in order when the model fails.
    fallbacks: tuple[str, ...] = ()
    system_prompt: str = ""
    #: Read at load time; relative to ``$GOCLAW_HOME`` unless absolute.
    system_prompt_file: str = ""
    tools: tuple[str, ...] = ()
    #: Relative to ``$GOCLAW_HOME`` unless absolute; empty means ``workspaces/<agent id>``.
    workspace: str = ""
    #: Tasks of this agent one worker process runs at once.
    concurrency: int = 4
    #: Turns of this agent waiting in the queue before the gateway refuses more (429).
    max_queue_depth: int = 1000
    #: Model calls per turn.
    max_iterations: int = 20
    #: Tool calls per turn (the tool-call budget).
    max_tool_calls: int = 50
    task_timeout_seconds: float = 600.0
    #: Compaction starts when history reaches this share of the context window.
    compact_at: float = 0.8
    #: The most recent messages, which compaction never summarises.
    keep_recent_messages: int = 6
    #: None leaves the provider's default.
    temperature: float | None = None
    max_output_tokens: int | None = None
    #: External content (``web_fetch``) that looks like a prompt injection is only logged
    #: (``log``), marked for the model (``warn``), or withheld from it (``block``).
    injection_guard: str = "warn"
    #: The heartbeat: wake every so often (``30m``) with ``HEARTBEAT.md`` (in the
    #: workspace) as the prompt; None: no heartbeat. ``HH:MM-HH:MM`` limits it to active
    #: hours in ``heartbeat_timezone`` (the range may wrap past midnight).
    heartbeat_every: str | None = None
    heartbeat_active_hours: str | None = None
    heartbeat_timezone: str = "UTC"

    def validate(self, key: str) -> None:
        """``key`` is ``agents.<id>``: an agent's errors must say which agent."""
        if not self.model:
            raise ConfigError(
                f"{key}.model: required (a LiteLLM model string such as {HOSTED_MODEL})"
            )
        _model_string(f"{key}.model", self.model)
        seen = {self.model}
        for fallback in self.fallbacks:
            _model_string(f"{key}.fallbacks", fallback)
            if fallback == self.model:
                raise ConfigError(f"{key}.fallbacks: repeats the model {fallback!r}")
            if fallback in seen:
                raise ConfigError(f"{key}.fallbacks: {fallback!r} is listed twice")
            seen.add(fallback)
        if self.system_prompt and self.system_prompt_file:
            raise ConfigError(f"{key}: set system_prompt or system_prompt_file, not both")
        tools: set[str] = set()
        for tool in self.tools:
            if not TOOL_NAME_PATTERN.match(tool):
                raise ConfigError(
                    f"{key}.tools: {tool!r} is not a tool name "
                    "(lower-case letters, digits and '_', starting with a letter)"
                )
            if tool in tools:
                raise ConfigError(f"{key}.tools: {tool!r} is listed twice")
            tools.add(tool)
        for name in ("concurrency", "max_iterations", "keep_recent_messages", "max_queue_depth"):
            _at_least(f"{key}.{name}", getattr(self, name), 1)
        _at_least(f"{key}.max_tool_calls", self.max_tool_calls, 0)
        _positive(f"{key}.task_timeout_seconds", self.task_timeout_seconds)
        _finite(f"{key}.task_timeout_seconds", self.task_timeout_seconds)
        if not 0 < self.compact_at <= 1:
            raise ConfigError(
                f"{key}.compact_at: must be greater than 0 and at most 1, got {self.compact_at}"
            )
        if self.temperature is not None and not 0 <= self.temperature <= 2:
            raise ConfigError(
                f"{key}.temperature: must be between 0 and 2 (or null), got {self.temperature}"
            )
        if self.max_output_tokens is not None:
            _at_least(f"{key}.max_output_tokens", self.max_output_tokens, 1)
        if self.injection_guard not in INJECTION_GUARD_ACTIONS:
            raise ConfigError(
                f"{key}.injection_guard: must be one of {', '.join(INJECTION_GUARD_ACTIONS)}, "
                f"got {self.injection_guard!r}"
            )
        if self.heartbeat_every is not None:
            from goclaw.cron.spec import parse_spec

            heartbeat = {"every": self.heartbeat_every, "timezone": self.heartbeat_timezone}
            if self.heartbeat_active_hours:
                heartbeat["active_hours"] = self.heartbeat_active_hours
            try:
                parse_spec({**heartbeat, "kind": "heartbeat"}, f"{key}.heartbeat")
            except ConfigError as exc:
                why = str(exc).replace(f"{key}.heartbeat.", f"{key}.heartbeat_")
                raise ConfigError(why) from None
        elif self.heartbeat_active_hours:
            raise ConfigError(f"{key}.heartbeat_active_hours: needs heartbeat_every")


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """How to reach one model string; a model without an entry uses these defaults."""

    #: Empty: the provider's own endpoint.
    api_base: str = ""
    #: The name of an environment variable holding the key; the key itself never goes in
    #: config.yaml, which is copied, shared and committed.
    api_key_env: str = ""
    #: Per model request; also the stall timeout of a stream.
    timeout_seconds: float = 60.0
    #: Tokens; 0 takes it from LiteLLM's model map at run time.
    context_window: int = 0
    #: How long a failing deployment is skipped when no Retry-After says otherwise.
    cooldown_seconds: float = 30.0
    #: None keeps LiteLLM's offline cost map.
    input_cost_per_token: float | None = None
    output_cost_per_token: float | None = None

    def validate(self, key: str) -> None:
        """``key`` is ``models.<model string>``."""
        if self.api_base and not self.api_base.startswith(("http://", "https://")):
            raise ConfigError(
                f"{key}.api_base: must be an http:// or https:// URL, got {self.api_base!r}"
            )
        if self.api_key_env and not ENV_NAME_PATTERN.match(self.api_key_env):
            # Never echo the value: a key pasted here by mistake must not reach a log.
            raise ConfigError(
                f"{key}.api_key_env: must be the name of an environment variable "
                "(letters, digits and '_'), not the key itself; put the key in that variable"
            )
        _positive(f"{key}.timeout_seconds", self.timeout_seconds)
        _finite(f"{key}.timeout_seconds", self.timeout_seconds)
        _at_least(f"{key}.context_window", self.context_window, 0)
        if not 0 <= self.cooldown_seconds < math.inf:
            raise ConfigError(
                f"{key}.cooldown_seconds: must be 0 or more, got {self.cooldown_seconds}"
            )
        for name in ("input_cost_per_token", "output_cost_per_token"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < math.inf:
                raise ConfigError(f"{key}.{name}: must be 0 or more (or null), got {value}")


@dataclasses.dataclass(frozen=True)
class SchedulerSettings:
    """``goclaw scheduler``: how often it looks for due fire times, and what counts as late."""

    #: Seconds between passes over the schedules (a fire is queued within about this).
    tick_seconds: float = 1.0
    #: A fire time this late is *missed* (the scheduler was down): its schedule's
    #: ``misfire`` policy decides (``skip``, or ``run_once``: one catch-up).
    misfire_grace_seconds: float = 60.0

    def validate(self) -> None:
        for name in ("tick_seconds", "misfire_grace_seconds"):
            _positive(f"scheduler.{name}", getattr(self, name))
            _finite(f"scheduler.{name}", getattr(self, name))
        if self.misfire_grace_seconds < self.tick_seconds:
            raise ConfigError(
                "scheduler.misfire_grace_seconds: must be at least scheduler.tick_seconds"
            )


@dataclasses.dataclass(frozen=True)
class SkillSettings:
    """Where skills are found, and the sandbox limits of a WASM skill (docs/skills.md)."""

    #: The user's skills: the second place looked in, after ``$GOCLAW_HOME/skills``.
    user_dir: str = "~/.goclaw/skills"
    #: The skills shipped with goclaw, looked in last; empty: this checkout's ``skills/``.
    bundled_dir: str = ""
    #: Defaults for one invocation; a manifest may change them up to the ceilings below.
    fuel: int = 100_000_000
    memory_bytes: int = 16 * 1024 * 1024
    timeout_seconds: float = 5.0
    max_fuel: int = 1_000_000_000
    max_memory_bytes: int = 256 * 1024 * 1024
    max_timeout_seconds: float = 30.0
    #: The largest output a module may return (bigger is ``skill_bad_output``).
    max_output_bytes: int = 1_048_576
    #: This many faults within the window quarantine a skill until ``goclaw skill enable``.
    quarantine_faults: int = 3
    quarantine_window_seconds: float = 600.0

    def validate(self) -> None:
        for name in ("fuel", "memory_bytes", "max_fuel", "max_memory_bytes"):
            _at_least(f"skills.{name}", getattr(self, name), 1)
        _at_least("skills.max_output_bytes", self.max_output_bytes, 1024)
        _at_least("skills.quarantine_faults", self.quarantine_faults, 1)
        for name in ("timeout_seconds", "max_timeout_seconds", "quarantine_window_seconds"):
            _positive(f"skills.{name}", getattr(self, name))
            _finite(f"skills.{name}", getattr(self, name))
        for name in ("fuel", "memory_bytes", "timeout_seconds"):
            if getattr(self, name) > getattr(self, f"max_{name}"):
                raise ConfigError(
                    f"skills.{name}: {getattr(self, name)} is above its ceiling "
                    f"skills.max_{name} ({getattr(self, f'max_{name}')})"
                )


SECTIONS: dict[str, type] = {
    "database": DatabaseSettings,
    "broker": BrokerSettings,
    "worker": WorkerSettings,
    "gateway": GatewaySettings,
    "skills": SkillSettings,
    "scheduler": SchedulerSettings,
}
#: Sections that are mappings of names to settings rather than settings themselves.
NAMED_SECTIONS = ("agents", "models", "cron")


def _empty_mapping() -> Mapping[str, Any]:
    return types.MappingProxyType({})


@dataclasses.dataclass(frozen=True)
class Config:
    home: Path
    path: Path | None
    database: DatabaseSettings
    broker: BrokerSettings
    worker: WorkerSettings
    gateway: GatewaySettings = dataclasses.field(default_factory=GatewaySettings)
    skills: SkillSettings = dataclasses.field(default_factory=SkillSettings)
    scheduler: SchedulerSettings = dataclasses.field(default_factory=SchedulerSettings)
    #: Read-only (``MappingProxyType``) so a Config stays a snapshot; never empty once loaded.
    agents: Mapping[str, AgentSettings] = dataclasses.field(default_factory=_empty_mapping)
    #: Only the model strings config.yaml lists; see ``model_settings``.
    models: Mapping[str, ModelSettings] = dataclasses.field(default_factory=_empty_mapping)
    #: Named schedules (``goclaw.cron.spec.ScheduleSpec``), checked at load.
    cron: Mapping[str, Any] = dataclasses.field(default_factory=_empty_mapping)

    @property
    def database_url(self) -> str:
        return self.database.url or f"sqlite:///{self.home / 'goclaw.db'}"

    def model_settings(self, model: str) -> ModelSettings:
        """A model string without an entry in ``models`` still runs, on the defaults."""
        return self.models.get(model) or ModelSettings()


def resolve_home(home: str | os.PathLike[str] | None = None) -> Path:
    """``--home`` wins, then ``$GOCLAW_HOME``, then ``~/.goclaw``."""
    raw = home or os.environ.get(HOME_ENV) or DEFAULT_HOME
    return Path(raw).expanduser().resolve()


def load_config(
    home: str | os.PathLike[str] | None = None,
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> Config:
    """Build the effective configuration; raise ``ConfigError`` naming the bad key."""
    env = os.environ if env is None else env
    home_path = resolve_home(home)
    config_path = Path(path) if path else home_path / "config.yaml"
    raw: dict[str, Any] = {}
    if config_path.exists():
        raw = _read_yaml(config_path)
    elif path:
        raise ConfigError(f"config file not found: {config_path}")

    known = (*SECTIONS, *NAMED_SECTIONS)
    unknown = sorted(set(raw) - set(known), key=str)
    if unknown:
        raise ConfigError(
            f"{config_path}: unknown section {unknown[0]!r} (known: {', '.join(known)})"
        )
    overrides, agent_overrides = _env_overrides(env)
    sections = {}
    for name, cls in SECTIONS.items():
        values = raw.get(name) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{name}: must be a mapping, got {type(values).__name__}")
        values = {**values, **overrides.get(name, {})}
        section = _build_section(name, cls, values)
        section.validate()
        sections[name] = section
    return Config(
        home=home_path,
        path=config_path if config_path.exists() else None,
        **sections,
        agents=_build_agents(raw.get("agents"), agent_overrides, env),
        models=_build_models(raw.get("models")),
        cron=_build_cron(raw.get("cron")),
    )


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


class _FromEnv(str):
    """A value that came from the environment, where a list is written ``a,b`` and null as ``""``.

    In YAML the same bare string for a list field is a mistake worth refusing
    (``tools: read_file``), so the coercion needs to know where a string came from.
    """


def _env_overrides(
    env: Mapping[str, str],
) -> tuple[dict[str, dict[str, str]], dict[str, dict[str, str]]]:
    """Return overrides per section and, apart, per agent id."""
    found: dict[str, dict[str, str]] = {}
    agents: dict[str, dict[str, str]] = {}
    for key, value in env.items():
        if key in ENV_ALIASES:
            section, field = ENV_ALIASES[key]
        elif key.startswith(ENV_PREFIX) and "__" in key:
            section, _, field = key[len(ENV_PREFIX) :].lower().partition("__")
            if section == "agents":
                # Setting names never contain "__", so the last one separates the key.
                agent_id, sep, field = field.rpartition("__")
                if not sep:
                    raise ConfigError(f"{key}: expected {ENV_PREFIX}AGENTS__<ID>__<KEY>")
                agents.setdefault(agent_id, {})[field] = _FromEnv(value)
                continue
            if section == "models":
                raise ConfigError(
                    f"{key}: models cannot be set from the environment (model strings contain "
                    "'/'); set them in config.yaml and keep API keys in the variable that "
                    "models.<model>.api_key_env names"
                )
            if section not in SECTIONS:
                continue
        else:
            continue
        found.setdefault(section, {})[field] = _FromEnv(value)
    return found, agents


def _implicit_default_agent(env: Mapping[str, str]) -> dict[str, Any]:
    """The agent a config without agents gets: hosted when a key is at hand, else local."""
    if env.get(HOSTED_MODEL_KEY_ENV):
        models: dict[str, Any] = {"model": HOSTED_MODEL, "fallbacks": [LOCAL_MODEL]}
        prompt = IMPLICIT_SYSTEM_PROMPT
    else:
        models = {"model": LOCAL_MODEL, "fallbacks": []}
        prompt = LOCAL_SYSTEM_PROMPT
    return {**models, "tools": list(IMPLICIT_TOOLS), "system_prompt": prompt}


def _build_agents(
    raw: Any, overrides: Mapping[str, Mapping[str, str]], env: Mapping[str, str]
) -> Mapping[str, AgentSettings]:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"agents: must be a mapping of agent id to settings, got {type(raw).__name__}"
        )
    declared: dict[str, dict[str, Any]] = {}
    for agent_id, values in raw.items():
        _agent_id(agent_id)
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ConfigError(
                f"agents.{agent_id}: must be a mapping of settings, got {type(values).__name__}"
            )
        declared[agent_id] = dict(values)
    implicit = not declared
    if implicit:
        declared[DEFAULT_AGENT_ID] = _implicit_default_agent(env)
    for agent_id, values in overrides.items():
        _agent_id(agent_id)
        base = declared.get(agent_id, {})
        if implicit and agent_id == DEFAULT_AGENT_ID:
            # The implicit agent's values are goclaw's, not the user's: an override of one of
            # a coupled pair replaces the pair, or it would clash with the implicit half.
            if "model" in values and "fallbacks" not in values:
                base = {k: v for k, v in base.items() if k != "fallbacks"}
            if "system_prompt_file" in values and "system_prompt" not in values:
                base = {k: v for k, v in base.items() if k != "system_prompt"}
        declared[agent_id] = {**base, **values}
    agents = {}
    for agent_id, values in declared.items():
        key = f"agents.{agent_id}"
        settings = _build_named(key, AgentSettings, values)
        settings.validate(key)
        agents[agent_id] = settings
    return types.MappingProxyType(agents)


def _build_models(raw: Any) -> Mapping[str, ModelSettings]:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"models: must be a mapping of model string to settings, got {type(raw).__name__}"
        )
    models = {}
    for model, values in raw.items():
        if not isinstance(model, str):
            raise ConfigError(f"models: {model!r} is not a model string (provider/name)")
        key = f"models.{model}"
        _model_string(key, model)
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ConfigError(f"{key}: must be a mapping of settings, got {type(values).__name__}")
        if "api_key" in values:
            raise ConfigError(
                f"{key}.api_key: API keys never go in config.yaml; put the key in an "
                "environment variable and name that variable in api_key_env"
            )
        settings = _build_named(key, ModelSettings, values)
        settings.validate(key)
        models[model] = settings
    return types.MappingProxyType(models)


def _build_cron(raw: Any) -> Mapping[str, Any]:
    """``cron:`` entries as schedule specs (an invalid one fails the whole load)."""
    from goclaw.cron.spec import check_name, parse_spec

    if raw is None:
        return _empty_mapping()
    if not isinstance(raw, dict):
        raise ConfigError(f"cron: must be a mapping of schedule names, got {type(raw).__name__}")
    specs = {}
    for name, entry in raw.items():
        try:
            check_name(name)
        except ConfigError as exc:
            raise ConfigError(f"cron: {exc}") from None
        specs[name] = parse_spec(entry, f"cron.{name}")
    return types.MappingProxyType(specs)


def _build_named(key: str, cls: type, values: dict[str, Any]) -> Any:
    """Like ``_build_section``, but the entry's name is part of the key, so say it apart."""
    known = [f.name for f in dataclasses.fields(cls)]
    for name in values:
        if name not in known:
            raise ConfigError(f"{key}: unknown key {name!r} (known: {', '.join(known)})")
    return _build_section(key, cls, values)


def _build_section(name: str, cls: type, values: dict[str, Any]) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"{name}.{key}: unknown key (known: {', '.join(fields)})")
        kwargs[key] = _coerce(f"{name}.{key}", fields[key].type, value)
    return cls(**kwargs)


BOOL_WORDS = {
    "true": True,
    "yes": True,
    "on": True,
    "1": True,
    "false": False,
    "no": False,
    "off": False,
    "0": False,
}


def _coerce(key: str, type_name: Any, value: Any) -> Any:
    """Accept YAML scalars and environment strings; refuse anything ambiguous."""
    wanted = type_name if isinstance(type_name, str) else type_name.__name__
    if wanted == "tuple[str, ...]":
        return _coerce_list(key, value)
    if wanted.endswith(" | None"):
        if value is None or (isinstance(value, _FromEnv) and not value.strip()):
            return None
        wanted = wanted.removesuffix(" | None")
    try:
        if wanted == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if wanted == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if wanted == "str":
            if not isinstance(value, str | int | float) or isinstance(value, bool):
                raise ValueError
            return str(value)
        if wanted == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in BOOL_WORDS:
                return BOOL_WORDS[value.strip().lower()]
            raise ValueError
    except (TypeError, ValueError):
        nullable = " or null" if type_name != wanted else ""
        raise ConfigError(f"{key}: expected {wanted}{nullable}, got {value!r}") from None
    raise ConfigError(f"{key}: unsupported setting type {wanted}")  # pragma: no cover


def _coerce_list(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, _FromEnv):
        return tuple(item.strip() for item in value.split(",") if item.strip())
    if value is None:
        return ()
    if isinstance(value, str):
        raise ConfigError(
            f"{key}: expected a list of strings, got the string {value!r} "
            f"(write a YAML list: [{value}])"
        )
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected a list of strings, got {value!r}")
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise ConfigError(f"{key}[{index}]: expected a string, got {item!r}")
    return tuple(value)


def _agent_id(agent_id: Any) -> None:
    if not isinstance(agent_id, str) or not AGENT_ID_PATTERN.match(agent_id):
        raise ConfigError(
            f"agents.{agent_id}: invalid agent id {agent_id!r}: must match "
            f"{AGENT_ID_PATTERN.pattern} (lower-case letters, digits, '_' and '-', "
            "at most 63 characters)"
        )


def _model_string(key: str, model: str) -> None:
    provider, _, name = model.partition("/")
    if not provider or not name or model != model.strip():
        raise ConfigError(
            f"{key}: {model!r} is not a model string: it must look like provider/name "
            f"(for example {HOSTED_MODEL})"
        )


def _at_least(key: str, value: int, lowest: int) -> None:
    if value < lowest:
        raise ConfigError(f"{key}: must be at least {lowest}, got {value}")


def _finite(key: str, value: float) -> None:
    if not math.isfinite(value):
        raise ConfigError(f"{key}: must be a finite number, got {value}")


def _positive(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{key}: must be greater than 0, got {value}")


def render_defaults() -> str:
    """Every setting at its default, as YAML (used when config.example.yaml is not at hand).

    ``agents`` is left empty on purpose: the implicit default agent then picks a hosted or a
    local model from the environment at each start, which a written-out agent would freeze.
    """
    data = {name: dataclasses.asdict(cls()) for name, cls in SECTIONS.items()}
    header = "# goclaw configuration: every key at its default (see config.example.yaml).\n"
    example = {
        "agents": {"example": dataclasses.asdict(AgentSettings(model=HOSTED_MODEL))},
        "models": {HOSTED_MODEL: dataclasses.asdict(ModelSettings())},
    }
    commented = "".join(
        f"# {line}\n" for line in yaml.safe_dump(example, sort_keys=False).splitlines()
    )
    agents_note = (
        f"# No agents declared: goclaw runs one implicit agent {DEFAULT_AGENT_ID!r} "
        f"({LOCAL_MODEL}, or\n# {HOSTED_MODEL} with {LOCAL_MODEL} as fallback when "
        f"{HOSTED_MODEL_KEY_ENV} is set).\n"
        "# Every agent and model key (model is required, the rest are at their defaults):\n"
    )
    return (
        header
        + yaml.safe_dump(data, sort_keys=False)
        + agents_note
        + commented
        + "agents: {}\nmodels: {}\n"
    )
