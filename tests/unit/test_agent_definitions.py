"""Agent definitions resolve prompts, workspaces and tools, and reload without a restart."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import pytest

from goclaw.agent.definitions import AgentCatalog, UnknownAgent, build_catalog
from goclaw.config import LOCAL_SYSTEM_PROMPT, ModelSettings, load_config
from goclaw.errors import ConfigError

TOOLS = ("read_file", "write_file", "list_dir", "exec", "web_fetch")
ONE = "agents:\n  default:\n    model: openai/gpt-4o-mini\n    system_prompt_file: SOUL.md\n"


class Files:
    """Writes files with an mtime that always moves, whatever the filesystem's granularity."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.tick = 1_000_000_000_000_000_000

    def write(self, name: str, text: str) -> Path:
        path = self.home / name
        path.write_text(text)
        self.tick += 1_000_000_000
        os.utime(path, ns=(self.tick, self.tick))
        return path


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def files(tmp_path):
    return Files(tmp_path)


@pytest.fixture
def clock():
    return Clock()


def catalog_of(home, env=None):
    return build_catalog(load_config(home, env=env or {}), TOOLS)


# build_catalog ------------------------------------------------------------------------------


def test_prompt_file_relative_to_home_workspace_and_models(files):
    files.write("SOUL.md", "You are terse.\n")
    files.write(
        "config.yaml",
        ONE + "    fallbacks: [local/smollm2]\n    tools: [read_file, exec]\n"
        "models:\n  openai/gpt-4o-mini:\n    api_base: http://127.0.0.1:8001/v1\n",
    )
    agent = catalog_of(files.home).get("default")
    assert agent.id == "default"
    assert agent.system_prompt == "You are terse.\n"
    assert agent.workspace == (files.home / "workspaces" / "default").resolve()
    assert agent.workspace.is_absolute()
    assert agent.models == ("openai/gpt-4o-mini", "local/smollm2")
    assert agent.model_settings["openai/gpt-4o-mini"].api_base == "http://127.0.0.1:8001/v1"
    assert agent.model_settings["local/smollm2"] == ModelSettings()
    assert set(agent.model_settings) == set(agent.models)
    assert len(agent.version) == 12
    assert agent.settings.tools == ("read_file", "exec")


def test_absolute_prompt_file_inline_prompt_and_workspaces(files, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    (elsewhere / "p.md").write_text("absolute")
    files.write(
        "config.yaml",
        f"agents:\n  a:\n    model: a/b\n    system_prompt_file: {elsewhere / 'p.md'}\n"
        f"    workspace: {elsewhere / 'ws'}\n"
        "  b:\n    model: a/b\n    system_prompt: inline\n    workspace: shared/../ws-b\n",
    )
    catalog = catalog_of(files.home)
    assert catalog.get("a").system_prompt == "absolute"
    assert catalog.get("a").workspace == (elsewhere / "ws").resolve()
    assert catalog.get("b").system_prompt == "inline"
    assert catalog.get("b").workspace == (files.home / "ws-b").resolve()


def test_missing_prompt_file_names_the_key(files):
    files.write("config.yaml", ONE)
    with pytest.raises(ConfigError, match=r"agents.default.system_prompt_file: file not found: .*"):
        catalog_of(files.home)


def test_prompt_file_that_is_not_text_names_the_key(files):
    files.write("config.yaml", ONE)
    (files.home / "SOUL.md").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match=r"agents.default.system_prompt_file: .*not UTF-8"):
        catalog_of(files.home)


def test_unknown_tool_names_the_key_and_lists_known_ones(files):
    files.write("config.yaml", "agents:\n  x:\n    model: a/b\n    tools: [read_file, shell]\n")
    with pytest.raises(ConfigError, match=r"agents.x.tools: unknown tool 'shell' \(known: exec, "):
        catalog_of(files.home)
    with pytest.raises(ConfigError, match=r"unknown tool 'read_file' \(known: none\)"):
        build_catalog(load_config(files.home, env={}), ())


def test_unknown_agent_lists_the_known_ones(files):
    catalog = catalog_of(files.home)
    with pytest.raises(UnknownAgent, match=r"unknown agent 'nope' \(known: default\)") as caught:
        catalog.get("nope")
    assert isinstance(caught.value, ConfigError) and caught.value.agent_id == "nope"
    assert "default" in catalog and "nope" not in catalog


def test_implicit_default_agent_resolves_with_builtin_tools(files):
    agent = catalog_of(files.home).get("default")
    assert agent.models == ("local/smollm2",)
    assert agent.system_prompt == LOCAL_SYSTEM_PROMPT
    hosted = catalog_of(files.home, env={"OPENAI_API_KEY": "k"}).get("default")
    assert hosted.models == ("openai/gpt-4o-mini", "local/smollm2")


def test_version_follows_everything_a_definition_holds(files):
    files.write("SOUL.md", "one")
    files.write("config.yaml", ONE)
    first = catalog_of(files.home)
    assert catalog_of(files.home) == first  # same inputs, same versions
    files.write("SOUL.md", "two")
    second = catalog_of(files.home)
    assert second.get("default").version != first.get("default").version
    assert second.version != first.version
    files.write("config.yaml", ONE + "models:\n  openai/gpt-4o-mini:\n    timeout_seconds: 5\n")
    assert catalog_of(files.home).get("default").version != second.get("default").version
    # Settings of a model no agent uses change nothing.
    files.write("config.yaml", ONE + "models:\n  other/model:\n    timeout_seconds: 5\n")
    assert catalog_of(files.home).version == second.version


def test_definitions_are_immutable(files):
    catalog = catalog_of(files.home)
    agent = catalog.get("default")
    with pytest.raises(dataclasses.FrozenInstanceError):
        agent.system_prompt = "changed"  # type: ignore[misc]
    with pytest.raises(TypeError):
        catalog.agents["other"] = agent  # type: ignore[index]
    with pytest.raises(TypeError):
        agent.model_settings["x/y"] = ModelSettings()  # type: ignore[index]


def test_example_config_resolves(files):
    example = Path(__file__).resolve().parents[2] / "config.example.yaml"
    from tests.unit.test_config import example_blocks

    files.write("config.yaml", example_blocks(example.read_text()))
    files.write("SOUL.md", "soul")
    agent = catalog_of(files.home).get("default")
    assert agent.system_prompt == "soul"
    assert agent.settings.tools == TOOLS


# AgentCatalog: hot reload ------------------------------------------------------------------


def make_catalog(files, clock, env=None, **kw):
    return AgentCatalog(files.home, None, env or {}, TOOLS, clock=clock, **kw)


def test_reload_sees_added_changed_and_removed_agents_after_the_interval(files, clock):
    files.write("config.yaml", "agents:\n  a:\n    model: a/one\n")
    agents = make_catalog(files, clock)
    first = agents.current()
    assert list(first.agents) == ["a"]

    files.write("config.yaml", "agents:\n  a:\n    model: a/one\n  b:\n    model: b/one\n")
    clock.now += 0.5
    assert agents.current() is first  # not checked before the interval
    clock.now += 0.5
    added = agents.current()
    assert list(added.agents) == ["a", "b"]

    files.write("config.yaml", "agents:\n  a:\n    model: a/two\n  b:\n    model: b/one\n")
    clock.now += 1
    changed = agents.current()
    assert changed.get("a").models == ("a/two",)
    assert changed.get("b") == added.get("b")

    files.write("config.yaml", "agents:\n  b:\n    model: b/one\n")
    clock.now += 1
    removed = agents.current()
    assert list(removed.agents) == ["b"]
    with pytest.raises(UnknownAgent):
        removed.get("a")
    assert agents.last_error is None


def test_unchanged_files_keep_the_same_catalog(files, clock):
    files.write("config.yaml", "agents:\n  a:\n    model: a/one\n")
    agents = make_catalog(files, clock)
    first = agents.current()
    clock.now += 5
    assert agents.current() is first
    # Touched but equal: reloaded, and the same version keeps the same object.
    files.write("config.yaml", "agents:\n  a:\n    model: a/one\n")
    clock.now += 5
    assert agents.current() is first


def test_a_running_task_keeps_its_snapshot(files, clock):
    files.write("SOUL.md", "before")
    files.write("config.yaml", ONE)
    agents = make_catalog(files, clock)
    held = agents.current()  # what a running task took at its start
    agent = held.get("default")
    files.write("SOUL.md", "after, and longer")
    files.write("config.yaml", "agents:\n  other:\n    model: x/y\n")
    clock.now += 1
    assert list(agents.current().agents) == ["other"]
    assert list(held.agents) == ["default"]
    assert held.get("default") is agent and agent.system_prompt == "before"


def test_prompt_file_edit_reloads(files, clock):
    files.write("SOUL.md", "one")
    files.write("config.yaml", ONE)
    agents = make_catalog(files, clock)
    files.write("SOUL.md", "two")
    clock.now += 1
    assert agents.current().get("default").system_prompt == "two"


def test_invalid_edit_keeps_the_previous_catalog_and_warns_once(files, clock, caplog):
    files.write("config.yaml", "agents:\n  a:\n    model: a/one\n")
    agents = make_catalog(files, clock)
    good = agents.current()
    caplog.set_level(logging.WARNING, logger="goclaw.agent.definitions")

    files.write("config.yaml", "agents:\n  a:\n    model: a/one\n    max_iterations: 0\n")
    for _ in range(3):
        clock.now += 1
        assert agents.current() is good
    assert agents.last_error == "agents.a.max_iterations: must be at least 1, got 0"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "agents.a.max_iterations" in warnings[0].getMessage()

    files.write("config.yaml", "agents:\n  a:\n    model: a/one\n    tools: [shell]\n")
    clock.now += 1
    assert agents.current() is good
    assert "agents.a.tools: unknown tool 'shell'" in (agents.last_error or "")
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2

    files.write("config.yaml", "agents:\n  a:\n    model: a/two\n")
    clock.now += 1
    assert agents.current().get("a").models == ("a/two",)
    assert agents.last_error is None


def test_yaml_syntax_error_keeps_the_previous_catalog(files, clock):
    files.write("config.yaml", "agents:\n  a:\n    model: a/one\n")
    agents = make_catalog(files, clock)
    good = agents.current()
    files.write("config.yaml", "agents:\n  a: [\n")
    clock.now += 1
    assert agents.current() is good
    assert "not valid YAML" in (agents.last_error or "")


def test_creating_a_missing_prompt_file_fixes_the_edit(files, clock):
    files.write("config.yaml", "agents:\n  a:\n    model: a/one\n")
    agents = make_catalog(files, clock)
    files.write("config.yaml", ONE)
    clock.now += 1
    assert list(agents.current().agents) == ["a"]
    assert "agents.default.system_prompt_file: file not found" in (agents.last_error or "")
    files.write("SOUL.md", "now here")
    clock.now += 1
    assert agents.current().get("default").system_prompt == "now here"
    assert agents.last_error is None


def test_creating_config_yaml_replaces_the_implicit_agent(files, clock):
    agents = make_catalog(files, clock)
    assert list(agents.current().agents) == ["default"]
    files.write("config.yaml", "agents:\n  a:\n    model: a/one\n")
    clock.now += 1
    assert list(agents.current().agents) == ["a"]


def test_environment_is_reapplied_on_every_reload(files, clock):
    files.write("config.yaml", "agents:\n  a:\n    model: a/one\n")
    env = {"GOCLAW_AGENTS__A__MODEL": "a/env", "GOCLAW_AGENTS__B__MODEL": "b/env"}
    agents = make_catalog(files, clock, env=env)
    env.clear()  # the catalog keeps the environment it was given
    files.write("config.yaml", "agents:\n  a:\n    model: a/two\n    concurrency: 2\n")
    clock.now += 1
    catalog = agents.current()
    assert catalog.get("a").models == ("a/env",) and catalog.get("a").settings.concurrency == 2
    assert catalog.get("b").models == ("b/env",)


def test_first_load_fails_closed(files, clock):
    files.write("config.yaml", "agents:\n  a:\n    model: a/one\n    tools: [shell]\n")
    with pytest.raises(ConfigError, match=r"agents.a.tools: unknown tool 'shell'"):
        make_catalog(files, clock)
    files.write("config.yaml", "agents:\n  a:\n    model: a/one\n")
    config = load_config(files.home, env={})
    files.write("config.yaml", "agents:\n  a:\n    model: nope\n")
    with pytest.raises(ConfigError, match=r"agents\.a\.model"):
        AgentCatalog.from_config(config, {}, TOOLS, clock=clock)


def test_from_config_watches_an_explicit_path(files, clock):
    path = files.write("other.yaml", "agents:\n  a:\n    model: a/one\n")
    config = load_config(files.home, path, env={})
    agents = AgentCatalog.from_config(config, {}, TOOLS, clock=clock, check_interval=5)
    files.write("config.yaml", "agents:\n  ignored:\n    model: a/one\n")
    files.write("other.yaml", "agents:\n  b:\n    model: a/one\n")
    clock.now += 4
    assert list(agents.current().agents) == ["a"]
    clock.now += 1
    assert list(agents.current().agents) == ["b"]
    path.unlink()
    clock.now += 5
    assert list(agents.current().agents) == ["b"]
    assert "config file not found" in (agents.last_error or "")
