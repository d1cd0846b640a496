"""Configuration fails closed and names the key: defaults < config.yaml < environment."""

from __future__ import annotations

import pytest

from goclaw.config import LOCAL_SYSTEM_PROMPT, load_config, render_defaults, resolve_home
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


# Agents and models -------------------------------------------------------------------------

AGENT = "agents:\n  default:\n    model: openai/gpt-4o-mini\n"


def example_blocks(text):
    """The commented-out agents and models examples of a config file, uncommented."""
    lines = text.splitlines()
    blocks = []
    for head in ("# agents:", "# models:"):
        start = lines.index(head)
        block = []
        for line in lines[start:]:
            if not line.startswith("# ") or line == "#":
                break
            block.append(line[2:])
        blocks.append("\n".join(block) + "\n")
    return "".join(blocks)


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("agents: [a]\n", {}, "agents: must be a mapping"),
        (
            "agents:\n  Bad Id:\n    model: a/b\n",
            {},
            r"agents.Bad Id: invalid agent id .*must match",
        ),
        ("agents:\n  -x:\n    model: a/b\n", {}, "agents.-x: invalid agent id"),
        (f"agents:\n  {'a' * 64}:\n    model: a/b\n", {}, "invalid agent id"),
        ("agents:\n  default: [1]\n", {}, "agents.default: must be a mapping"),
        ("agents:\n  default: {}\n", {}, "agents.default.model: required"),
        (
            "agents:\n  default:\n    modle: a/b\n",
            {},
            "agents.default: unknown key 'modle' .known: model, ",
        ),
        (
            "agents:\n  default:\n    model: gpt4\n",
            {},
            "agents.default.model: 'gpt4' is not a model",
        ),
        ("agents:\n  default:\n    model: /gpt4\n", {}, "agents.default.model: .* provider/name"),
        (
            AGENT + "    fallbacks: a/b\n",
            {},
            "agents.default.fallbacks: expected a list of strings, got the string",
        ),
        (AGENT + "    fallbacks: [3]\n", {}, r"agents.default.fallbacks\[0\]: expected a string"),
        (AGENT + "    fallbacks: {a: b}\n", {}, "agents.default.fallbacks: expected a list"),
        (AGENT + "    fallbacks: [nope]\n", {}, "agents.default.fallbacks: 'nope' is not a model"),
        (
            AGENT + "    fallbacks: [openai/gpt-4o-mini]\n",
            {},
            "agents.default.fallbacks: repeats the model",
        ),
        (
            AGENT + "    fallbacks: [a/b, a/b]\n",
            {},
            "agents.default.fallbacks: 'a/b' is listed twice",
        ),
        (
            AGENT + "    system_prompt: x\n    system_prompt_file: S\n",
            {},
            "agents.default: set system_prompt or system_prompt_file, not both",
        ),
        (AGENT + "    tools: read_file\n", {}, "agents.default.tools: expected a list of strings"),
        (AGENT + "    tools: [Read]\n", {}, "agents.default.tools: 'Read' is not a tool name"),
        (AGENT + "    tools: [exec, exec]\n", {}, "agents.default.tools: 'exec' is listed twice"),
        (
            AGENT + "    concurrency: 0\n",
            {},
            "agents.default.concurrency: must be at least 1, got 0",
        ),
        (
            AGENT + "    max_iterations: 0\n",
            {},
            "agents.default.max_iterations: must be at least 1, got 0",
        ),
        (
            AGENT + "    max_tool_calls: -1\n",
            {},
            "agents.default.max_tool_calls: must be at least 0",
        ),
        (
            AGENT + "    keep_recent_messages: 0\n",
            {},
            "agents.default.keep_recent_messages: must be at least 1",
        ),
        (
            AGENT + "    task_timeout_seconds: 0\n",
            {},
            "agents.default.task_timeout_seconds: must be greater than 0",
        ),
        (
            AGENT + "    task_timeout_seconds: .inf\n",
            {},
            "agents.default.task_timeout_seconds: must be a finite",
        ),
        (
            AGENT + "    compact_at: 0\n",
            {},
            "agents.default.compact_at: must be greater than 0 and at most 1",
        ),
        (
            AGENT + "    compact_at: 1.5\n",
            {},
            "agents.default.compact_at: must be greater than 0 and at most 1",
        ),
        (
            AGENT + "    temperature: 2.5\n",
            {},
            "agents.default.temperature: must be between 0 and 2",
        ),
        (
            AGENT + "    temperature: warm\n",
            {},
            "agents.default.temperature: expected float or null",
        ),
        (
            AGENT + "    max_output_tokens: 0\n",
            {},
            "agents.default.max_output_tokens: must be at least 1",
        ),
        (AGENT + "    concurrency: 2.5\n", {}, "agents.default.concurrency: expected int"),
        ("", {"GOCLAW_AGENTS__DEFAULT__MODLE": "a/b"}, "agents.default: unknown key 'modle'"),
        ("", {"GOCLAW_AGENTS__NEW__CONCURRENCY": "2"}, "agents.new.model: required"),
        (
            "",
            {"GOCLAW_AGENTS__DEFAULT__CONCURRENCY": "x"},
            "agents.default.concurrency: expected int",
        ),
        (
            "",
            {"GOCLAW_AGENTS__DEFAULT": "a/b"},
            "GOCLAW_AGENTS__DEFAULT: expected GOCLAW_AGENTS__<ID>__<KEY>",
        ),
        ("", {"GOCLAW_AGENTS__A.B__MODEL": "a/b"}, "agents.a.b: invalid agent id"),
        (
            "",
            {"GOCLAW_MODELS__X__API_BASE": "http://x"},
            "models cannot be set from the environment",
        ),
        ("models: [a]\n", {}, "models: must be a mapping"),
        ("models:\n  gpt4: {}\n", {}, "models.gpt4: 'gpt4' is not a model string"),
        ("models:\n  1: {}\n", {}, "models: 1 is not a model string"),
        ("models:\n  a/b: [1]\n", {}, "models.a/b: must be a mapping"),
        (
            "models:\n  a/b:\n    api_bse: x\n",
            {},
            "models.a/b: unknown key 'api_bse' .known: api_base, ",
        ),
        ("models:\n  a/b:\n    api_base: ftp://x\n", {}, "models.a/b.api_base: must be an http"),
        (
            "models:\n  openai/gpt-4o-mini:\n    api_key_env: sk-secret\n",
            {},
            "models.openai/gpt-4o-mini.api_key_env: must be the name of an env",
        ),
        (
            "models:\n  a/b:\n    timeout_seconds: 0\n",
            {},
            "models.a/b.timeout_seconds: must be greater than 0",
        ),
        (
            "models:\n  a/b:\n    context_window: -1\n",
            {},
            "models.a/b.context_window: must be at least 0",
        ),
        (
            "models:\n  a/b:\n    cooldown_seconds: -1\n",
            {},
            "models.a/b.cooldown_seconds: must be 0 or more",
        ),
        (
            "models:\n  a/b:\n    input_cost_per_token: -1\n",
            {},
            "models.a/b.input_cost_per_token: must be 0 or more",
        ),
        (
            "models:\n  a/b:\n    api_key: sk-secret\n",
            {},
            "models.a/b.api_key: API keys never go in config.yaml",
        ),
    ],
)
def test_invalid_agents_and_models_name_the_key(tmp_path, text, env, message):
    write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(tmp_path, env=env)
    assert "sk-secret" not in str(caught.value)


def test_agent_precedence_environment_over_file_over_defaults(tmp_path):
    write(
        tmp_path,
        AGENT + "    fallbacks: [a/b]\n    concurrency: 2\n    tools: [read_file]\n"
        "    temperature: 0.5\n",
    )
    env = {
        "GOCLAW_AGENTS__DEFAULT__MODEL": "openai/gpt-4o",
        "GOCLAW_AGENTS__DEFAULT__FALLBACKS": "a/b, c/d ,",
        "GOCLAW_AGENTS__DEFAULT__TOOLS": "",
        "GOCLAW_AGENTS__DEFAULT__MAX_OUTPUT_TOKENS": "256",
        "GOCLAW_AGENTS__DEFAULT__TEMPERATURE": "",
    }
    agent = load_config(tmp_path, env=env).agents["default"]
    assert agent.model == "openai/gpt-4o"
    assert agent.fallbacks == ("a/b", "c/d")
    assert agent.tools == ()
    assert agent.concurrency == 2  # from the file
    assert agent.max_iterations == 20 and agent.compact_at == 0.8  # defaults
    assert agent.max_output_tokens == 256
    assert agent.temperature is None  # an empty variable is null

    from_file = load_config(tmp_path, env={}).agents["default"]
    assert from_file.model == "openai/gpt-4o-mini" and from_file.fallbacks == ("a/b",)
    assert from_file.tools == ("read_file",) and from_file.temperature == 0.5


def test_environment_declares_a_new_agent(tmp_path):
    write(tmp_path, AGENT)
    env = {
        "GOCLAW_AGENTS__RE_SEARCH__MODEL": "anthropic/claude-3-5-haiku-latest",
        "GOCLAW_AGENTS__RE_SEARCH__TOOLS": "web_fetch,read_file",
    }
    agents = load_config(tmp_path, env=env).agents
    assert list(agents) == ["default", "re_search"]
    assert agents["re_search"].tools == ("web_fetch", "read_file")


def test_yaml_nulls_and_lists(tmp_path):
    write(
        tmp_path,
        AGENT + "    tools:\n    - read_file\n    - exec\n    fallbacks:\n"
        "    temperature: null\n  other:\n    model: local/smollm2\n"
        "models:\n  local/smollm2:\n",
    )
    config = load_config(tmp_path, env={})
    assert config.agents["default"].tools == ("read_file", "exec")
    assert config.agents["default"].fallbacks == ()
    assert config.agents["default"].temperature is None
    assert config.models["local/smollm2"] == config.model_settings("x/y")


def test_models_settings(tmp_path):
    write(
        tmp_path,
        AGENT + "models:\n  openai/gpt-4o-mini:\n    api_base: http://127.0.0.1:8001/v1\n"
        "    api_key_env: OPENAI_API_KEY\n    context_window: 128000\n"
        "    input_cost_per_token: 0.00000015\n",
    )
    config = load_config(tmp_path, env={})
    settings = config.model_settings("openai/gpt-4o-mini")
    assert settings.api_base == "http://127.0.0.1:8001/v1"
    assert settings.api_key_env == "OPENAI_API_KEY"
    assert settings.context_window == 128000 and settings.timeout_seconds == 60.0
    assert settings.input_cost_per_token == 1.5e-7 and settings.output_cost_per_token is None
    assert config.model_settings("other/model").api_base == ""


def test_implicit_default_agent_without_a_key_is_local(tmp_path):
    for env in ({}, {"OPENAI_API_KEY": ""}):
        agents = load_config(tmp_path, env=env).agents
        assert list(agents) == ["default"]
        agent = agents["default"]
        assert agent.model == "local/smollm2" and agent.fallbacks == ()
        assert agent.tools == ("read_file", "write_file", "list_dir")
        assert agent.system_prompt == LOCAL_SYSTEM_PROMPT


def test_implicit_default_agent_with_a_key_is_hosted_with_local_fallback(tmp_path):
    agent = load_config(tmp_path, env={"OPENAI_API_KEY": "k"}).agents["default"]
    assert agent.model == "openai/gpt-4o-mini" and agent.fallbacks == ("local/smollm2",)


def test_implicit_default_agent_gives_way_to_declared_agents(tmp_path):
    write(tmp_path, "agents:\n  helper:\n    model: a/b\n")
    assert list(load_config(tmp_path, env={"OPENAI_API_KEY": "k"}).agents) == ["helper"]
    write(tmp_path, "agents:\n")
    assert list(load_config(tmp_path, env={}).agents) == ["default"]


def test_environment_overrides_the_implicit_default_agent(tmp_path):
    env = {"OPENAI_API_KEY": "k", "GOCLAW_AGENTS__DEFAULT__CONCURRENCY": "2"}
    agent = load_config(tmp_path, env=env).agents["default"]
    assert agent.concurrency == 2 and agent.model == "openai/gpt-4o-mini"
    # Overriding one half of a coupled pair replaces the implicit other half.
    env = {
        "OPENAI_API_KEY": "k",
        "GOCLAW_AGENTS__DEFAULT__MODEL": "local/smollm2",
        "GOCLAW_AGENTS__DEFAULT__SYSTEM_PROMPT_FILE": "SOUL.md",
    }
    agent = load_config(tmp_path, env=env).agents["default"]
    assert agent.model == "local/smollm2" and agent.fallbacks == ()
    assert agent.system_prompt == "" and agent.system_prompt_file == "SOUL.md"


def test_agents_and_models_are_read_only(tmp_path):
    config = load_config(tmp_path, env={})
    with pytest.raises(TypeError):
        config.agents["x"] = config.agents["default"]  # type: ignore[index]
    with pytest.raises(TypeError):
        config.models["a/b"] = config.model_settings("a/b")  # type: ignore[index]


def test_rendered_defaults_have_the_implicit_agent_and_a_valid_example(tmp_path):
    import dataclasses

    from goclaw.config import AgentSettings, ModelSettings

    text = render_defaults()
    write(tmp_path, text)
    assert load_config(tmp_path, env={}).agents == load_config(tmp_path / "x", env={}).agents
    write(tmp_path, example_blocks(text))
    config = load_config(tmp_path, env={})
    assert config.agents["example"] == AgentSettings(model="openai/gpt-4o-mini")
    assert config.models["openai/gpt-4o-mini"] == ModelSettings()
    for cls in (AgentSettings, ModelSettings):
        for field in dataclasses.fields(cls):
            assert f"    {field.name}:" in text


def test_example_agents_and_models_load_and_document_every_key(tmp_path):
    import dataclasses
    from pathlib import Path

    from goclaw.config import AgentSettings, ModelSettings

    text = (Path(__file__).resolve().parents[2] / "config.example.yaml").read_text()
    # As shipped, the example declares no agent: a new user gets the implicit default.
    write(tmp_path, text)
    assert list(load_config(tmp_path, env={}).agents) == ["default"]
    # Uncommented, the documented agents and models load as written.
    write(tmp_path, example_blocks(text))
    config = load_config(tmp_path, env={})
    agent = config.agents["default"]
    assert agent.fallbacks == ("anthropic/claude-3-5-haiku-latest", "local/smollm2")
    assert agent.system_prompt_file == "SOUL.md"
    assert config.models["openai/gpt-4o-mini"].api_key_env == "OPENAI_API_KEY"
    for cls in (AgentSettings, ModelSettings):
        for field in dataclasses.fields(cls):
            assert f"#     {field.name}:" in text, field.name
    assert "GOCLAW_AGENTS__DEFAULT__MODEL" in text


# Injection guard ---------------------------------------------------------------------------


def test_injection_guard_defaults_to_warn_even_for_the_implicit_agent(tmp_path):
    assert load_config(tmp_path, env={}).agents["default"].injection_guard == "warn"
    write(tmp_path, AGENT)
    assert load_config(tmp_path, env={}).agents["default"].injection_guard == "warn"


@pytest.mark.parametrize("action", ["log", "warn", "block"])
def test_injection_guard_from_file_and_environment(tmp_path, action):
    write(tmp_path, AGENT + f"    injection_guard: {action}\n")
    assert load_config(tmp_path, env={}).agents["default"].injection_guard == action
    write(tmp_path, AGENT)
    env = {"GOCLAW_AGENTS__DEFAULT__INJECTION_GUARD": action}
    assert load_config(tmp_path, env=env).agents["default"].injection_guard == action


@pytest.mark.parametrize(
    ("value", "env", "message"),
    [
        (
            "ignore",
            {},
            "agents.default.injection_guard: must be one of log, warn, block, got 'ignore'",
        ),
        ("Block", {}, "got 'Block'"),
        ('""', {}, "got ''"),
        ("[warn]", {}, "agents.default.injection_guard: expected str"),
        ("warn", {"GOCLAW_AGENTS__DEFAULT__INJECTION_GUARD": "deny"}, "got 'deny'"),
    ],
)
def test_invalid_injection_guard_names_the_key(tmp_path, value, env, message):
    import re

    write(tmp_path, AGENT + f"    injection_guard: {value}\n")
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(tmp_path, env=env)
