"""Configuration: defaults, then ``config.yaml``, then the environment.

Every setting is a typed field of a frozen dataclass, so one walker can read
YAML and environment variables, reject unknown keys, and name the exact key
that is wrong. Invalid configuration fails closed: nothing starts.

Environment overrides use ``GOCLAW_<SECTION>__<KEY>`` (for example
``GOCLAW_BROKER__LEASE_SECONDS=5``); ``GOCLAW_DATABASE_URL`` is accepted as
the documented short form of ``GOCLAW_DATABASE__URL``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from goclaw.errors import ConfigError

HOME_ENV = "GOCLAW_HOME"
DEFAULT_HOME = "~/.goclaw"
ENV_PREFIX = "GOCLAW_"
ENV_ALIASES = {"GOCLAW_DATABASE_URL": ("database", "url")}


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


SECTIONS: dict[str, type] = {
    "database": DatabaseSettings,
    "broker": BrokerSettings,
    "worker": WorkerSettings,
}


@dataclasses.dataclass(frozen=True)
class Config:
    home: Path
    path: Path | None
    database: DatabaseSettings
    broker: BrokerSettings
    worker: WorkerSettings

    @property
    def database_url(self) -> str:
        return self.database.url or f"sqlite:///{self.home / 'goclaw.db'}"


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

    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(
            f"{config_path}: unknown section {unknown[0]!r} (known: {', '.join(SECTIONS)})"
        )
    overrides = _env_overrides(env)
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
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def _env_overrides(env: Mapping[str, str]) -> dict[str, dict[str, str]]:
    found: dict[str, dict[str, str]] = {}
    for key, value in env.items():
        if key in ENV_ALIASES:
            section, field = ENV_ALIASES[key]
        elif key.startswith(ENV_PREFIX) and "__" in key:
            section, _, field = key[len(ENV_PREFIX) :].lower().partition("__")
            if section not in SECTIONS:
                continue
        else:
            continue
        found.setdefault(section, {})[field] = value
    return found


def _build_section(name: str, cls: type, values: dict[str, Any]) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"{name}.{key}: unknown key (known: {', '.join(fields)})")
        kwargs[key] = _coerce(f"{name}.{key}", fields[key].type, value)
    return cls(**kwargs)


def _coerce(key: str, type_name: Any, value: Any) -> Any:
    """Accept YAML scalars and environment strings; refuse anything ambiguous."""
    wanted = type_name if isinstance(type_name, str) else type_name.__name__
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
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected {wanted}, got {value!r}") from None
    raise ConfigError(f"{key}: unsupported setting type {wanted}")  # pragma: no cover


def _positive(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{key}: must be greater than 0, got {value}")


def render_defaults() -> str:
    """Every setting at its default, as YAML (used when config.example.yaml is not at hand)."""
    data = {name: dataclasses.asdict(cls()) for name, cls in SECTIONS.items()}
    header = "# goclaw configuration: every key at its default (see config.example.yaml).\n"
    return header + yaml.safe_dump(data, sort_keys=False)
