"""Configuration fails closed and names the key: defaults < config.yaml < environment."""

from __future__ import annotations

import pytest

from goclaw.config import load_config, render_defaults, resolve_home
from goclaw.errors import ConfigError


def write(tmp_path, text):
    (tmp_path / "config.yaml").write_text(text)
    return tmp_path


def test_defaults_without_a_file(tmp_path):
    config = load_config(tmp_path, env={})
    assert config.broker.lease_seconds == 30 and config.broker.heartbeat_seconds == 10
    assert config.database_url == f"sqlite:///{tmp_path.resolve() / 'goclaw.db'}"
    assert config.path is None


def test_precedence_environment_over_file_over_defaults(tmp_path):
    write(tmp_path, "broker:\n  lease_seconds: 40\n  max_attempts: 7\n")
    config = load_config(tmp_path, env={"GOCLAW_BROKER__LEASE_SECONDS": "50"})
    assert config.broker.lease_seconds == 50.0
    assert config.broker.max_attempts == 7
    url = "postgresql://u@h:5432/db"
    assert load_config(tmp_path, env={"GOCLAW_DATABASE_URL": url}).database_url == url


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("brokr: {}\n", {}, "unknown section 'brokr'"),
        ("broker:\n  lease: 3\n", {}, "broker.lease: unknown key"),
        ("broker:\n  max_attempts: many\n", {}, "broker.max_attempts: expected int"),
        ("broker:\n  max_attempts: 1.5\n", {}, "broker.max_attempts: expected int"),
        ("broker:\n  lease_seconds: true\n", {}, "broker.lease_seconds: expected float"),
        ("broker:\n  max_attempts: 0\n", {}, "broker.max_attempts: must be at least 1"),
        ("broker:\n  lease_seconds: 10\n  heartbeat_seconds: 6\n", {}, "at most half"),
        ("broker: [1]\n", {}, "broker: must be a mapping"),
        ("worker:\n  worker_type: greenlet\n", {}, "worker.worker_type"),
        ("database:\n  url: mysql://x\n", {}, "database.url: unsupported scheme"),
        ("broker:\n  lease_seconds: [\n", {}, "not valid YAML"),
        ("- a\n", {}, "top level must be a mapping"),
        ("", {"GOCLAW_BROKER__LEASE_SECONDS": "soon"}, "broker.lease_seconds: expected float"),
        ("", {"GOCLAW_WORKER__NOPE": "1"}, "worker.nope: unknown key"),
    ],
)
def test_invalid_configuration_names_the_key(tmp_path, text, env, message):
    write(tmp_path, text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(tmp_path, env=env)


def test_yaml_error_names_the_line(tmp_path):
    write(tmp_path, "broker:\n  lease_seconds: 3\n  bad: a: b\n")
    with pytest.raises(ConfigError, match="line 3"):
        load_config(tmp_path, env={})


def test_explicit_missing_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path, tmp_path / "nope.yaml", env={})


def test_home_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("GOCLAW_HOME", str(tmp_path / "env"))
    assert resolve_home() == (tmp_path / "env").resolve()
    assert resolve_home(tmp_path / "flag") == (tmp_path / "flag").resolve()
    monkeypatch.delenv("GOCLAW_HOME")
    assert resolve_home().name == ".goclaw"


def test_rendered_defaults_load_back(tmp_path):
    write(tmp_path, render_defaults())
    assert load_config(tmp_path, env={}).broker == load_config(tmp_path / "x", env={}).broker


def test_example_config_is_valid_and_complete(tmp_path):
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "config.example.yaml"
    write(tmp_path, example.read_text())
    assert load_config(tmp_path, env={}).broker == load_config(tmp_path / "x", env={}).broker
