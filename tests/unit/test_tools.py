"""Built-in tools without processes or sockets: argument checks, the registry, the policy
hook, and file access that no path, absolute or relative or symlinked, can take out of
the workspace."""

from __future__ import annotations

import os
import pickle
import stat

import jsonschema
import pytest

from goclaw.agent.tools import (
    BUILTIN_TOOLS,
    AllowListedTools,
    Tool,
    ToolContext,
    ToolError,
    ToolLimits,
    get_tool,
    invoke,
    parse_arguments,
    register,
    tools_for,
)
from goclaw.agent.tools.files import LIST_DIR, READ_FILE, WRITE_FILE
from tests.tool_context import make_ctx


@pytest.fixture
def outside(tmp_path):
    """A directory next to the workspace, holding a file the agent must never see."""
    path = tmp_path / "outside"
    path.mkdir()
    (path / "secret.txt").write_text("top secret")
    return path


@pytest.fixture
def ctx(tmp_path):
    workspace = tmp_path / "ws"
    workspace.mkdir()
    return make_ctx(workspace)


class Recorder:
    """A policy hook that remembers what it was asked and may refuse one capability."""

    def __init__(self, deny=None):
        self.seen = []
        self.deny = deny

    def check(self, ctx, capability, subject):
        self.seen.append((capability, subject))
        if capability == self.deny:
            raise ToolError("policy_denied", f"{subject} is not for you")


def call(tool, ctx, **arguments):
    return invoke(tool, ctx, parse_arguments(tool, arguments))


def refused(code, tool, ctx, **arguments):
    with pytest.raises(ToolError) as caught:
        call(tool, ctx, **arguments)
    assert caught.value.code == code, caught.value
    return caught.value


# -- arguments -------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ('{"path": 3}', "path: 3 is not of type 'string'"),
        ("{}", "'path' is a required property"),
        ('{"path": "a", "mode": "w"}', "('mode' was unexpected)"),
        ('{"path": ""}', "path: '' should be non-empty"),
        ('{"path": ', "arguments are not valid JSON: Expecting value: line 1 column 10"),
        ("[1, 2]", "arguments must be a JSON object, not list"),
        ('"a.txt"', "arguments must be a JSON object, not str"),
    ],
)
def test_bad_arguments_are_named_precisely(raw, message):
    with pytest.raises(ToolError) as caught:
        parse_arguments(READ_FILE, raw)
    assert caught.value.code == "invalid_arguments"
    assert message in caught.value.message


def test_every_problem_is_reported_and_huge_values_are_cut():
    with pytest.raises(ToolError) as caught:
        parse_arguments(WRITE_FILE, {"path": 1, "content": list(range(10_000))})
    message = caught.value.message
    assert message.startswith("content: [0, 1, 2") and "path: 1 is not of type" in message
    assert len(message) < 700


@pytest.mark.parametrize("raw", ["", "  ", None, {}])
def test_no_arguments_mean_an_empty_object(raw):
    assert parse_arguments(LIST_DIR, raw) == {}


def test_arguments_come_back_as_a_new_dict():
    raw = {"path": "a.txt"}
    parsed = parse_arguments(READ_FILE, raw)
    assert parsed == raw and parsed is not raw
    assert parse_arguments(READ_FILE, '{"path": "a.txt"}') == raw


# -- errors, limits, definitions --------------------------------------------


def test_tool_error_carries_its_code_and_survives_pickling():
    error = ToolError("not_found", "a.txt: no such file")
    assert (error.code, error.message) == ("not_found", "a.txt: no such file")
    assert str(error) == "not_found: a.txt: no such file"
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.code, copy.message, str(copy)) == (error.code, error.message, str(error))


def test_limits_must_be_positive():
    with pytest.raises(ValueError, match="exec_timeout_seconds"):
        ToolLimits(exec_timeout_seconds=0)


def schema(**properties):
    return {"type": "object", "properties": properties, "additionalProperties": False}


def test_a_broken_definition_fails_when_defined():
    with pytest.raises(ValueError, match="must match"):
        Tool("read file", "d", schema(), lambda ctx, a: None)
    with pytest.raises(ValueError, match="type object"):
        Tool("t", "d", {"type": "string"}, lambda ctx, a: None)
    with pytest.raises(jsonschema.SchemaError):
        Tool("t", "d", {"type": "object", "properties": {"x": {"type": 5}}}, lambda ctx, a: None)


def test_schema_is_openai_function_format():
    assert READ_FILE.schema() == {
        "type": "function",
        "function": {
            "name": "read_file",
            "description": READ_FILE.description,
            "parameters": READ_FILE.parameters,
        },
    }
    for tool in BUILTIN_TOOLS.values():
        assert tool.parameters["additionalProperties"] is False
        assert len(tool.description) > 80
    assert {t.name for t in BUILTIN_TOOLS.values() if t.side_effect} == {"write_file", "exec"}


def test_subject_is_what_the_policy_judges():
    assert READ_FILE.subject({"path": "a.txt"}) == "a.txt"
    assert LIST_DIR.subject({}) == "."  # the schema's default
    assert BUILTIN_TOOLS["exec"].subject({"command": "ls"}) == "ls"
    assert READ_FILE.capability == "tools.read_file"


# -- registry ----------------------------------------------------------------


def test_builtin_tools():
    assert list(BUILTIN_TOOLS) == ["read_file", "write_file", "list_dir", "exec", "web_fetch"]


def test_unknown_and_unlisted_tools_fail_alike():
    with pytest.raises(ToolError) as caught:
        get_tool("rm_rf", ["read_file", "list_dir"])
    assert caught.value.code == "unknown_tool"
    assert caught.value.message == "no tool named 'rm_rf' (this agent has: read_file, list_dir)"
    with pytest.raises(ToolError) as caught:
        get_tool("exec", ["read_file"])
    assert caught.value.code == "unknown_tool" and "this agent has: read_file" in str(caught.value)
    with pytest.raises(ToolError, match="this agent has: no tools"):
        get_tool("exec", [])
    assert get_tool("exec", iter(["exec"])) is BUILTIN_TOOLS["exec"]


def test_tools_for_keeps_the_order_and_refuses_unknown_names():
    assert [t.name for t in tools_for(["exec", "read_file", "exec"])] == ["exec", "read_file"]
    with pytest.raises(ToolError) as caught:
        tools_for(["read_file", "teleport"])
    assert caught.value.code == "unknown_tool" and "'teleport'" in caught.value.message


def test_registered_tools_are_found_and_names_are_taken_once(ctx):
    tool = register(Tool("unit_test_echo", "Echo.", schema(), lambda ctx, a: "echoed"))
    assert get_tool("unit_test_echo", ["unit_test_echo"]) is tool
    assert tools_for(["unit_test_echo"]) == [tool]
    with pytest.raises(ValueError, match="already registered"):
        register(Tool("read_file", "Shadow.", schema(), lambda ctx, a: None))
    assert BUILTIN_TOOLS["read_file"] is READ_FILE


# -- invoke and the policy hook ----------------------------------------------


def test_a_crashing_tool_becomes_tool_crashed(ctx):
    ctx = make_ctx(ctx.workspace, policy=Recorder())
    tool = Tool("crash", "Crashes.", schema(), lambda ctx, a: 1 / 0)
    with pytest.raises(ToolError) as caught:
        invoke(tool, ctx, {})
    assert caught.value.code == "tool_crashed"
    assert caught.value.message == "ZeroDivisionError: division by zero"
    assert isinstance(caught.value.__cause__, ZeroDivisionError)


def test_a_tool_error_passes_through_unchanged(ctx):
    def run(ctx, arguments):
        raise ToolError("not_found", "nothing here")

    ctx = make_ctx(ctx.workspace, policy=Recorder())
    with pytest.raises(ToolError) as caught:
        invoke(Tool("t", "T.", schema(), run), ctx, {})
    assert (caught.value.code, caught.value.message) == ("not_found", "nothing here")


def test_the_allow_list_refuses_unlisted_tools_before_they_run(ctx):
    ctx = make_ctx(ctx.workspace, policy=AllowListedTools(["read_file"]))
    error = refused("policy_denied", WRITE_FILE, ctx, path="a.txt", content="x")
    assert error.message == "agent 'tester' may not use tool 'write_file'"
    assert not (ctx.workspace / "a.txt").exists()
    # Capabilities other than tools.* (net.http) are not the allow-list's to judge.
    AllowListedTools(["read_file"]).check(ctx, "net.http", "http://example.com/")


def test_a_context_without_a_policy_allows_nothing(tmp_path):
    ctx = ToolContext(workspace=tmp_path, agent_id="a", task_id=1, session_key="s")
    refused("policy_denied", LIST_DIR, ctx)


def test_the_hook_sees_capability_and_subject(ctx):
    recorder = Recorder(deny="tools.read_file")
    ctx = make_ctx(ctx.workspace, policy=recorder)
    call(LIST_DIR, ctx)
    refused("policy_denied", READ_FILE, ctx, path="notes/a.txt")
    assert recorder.seen == [("tools.list_dir", "."), ("tools.read_file", "notes/a.txt")]


def test_a_crashing_hook_refuses_the_call(ctx):
    class Broken:
        def check(self, ctx, capability, subject):
            raise KeyError("rules")

    ctx = make_ctx(ctx.workspace, policy=Broken())
    error = refused("tool_crashed", WRITE_FILE, ctx, path="a.txt", content="x")
    assert error.message == "policy check: KeyError: 'rules'"
    assert not (ctx.workspace / "a.txt").exists()


# -- confinement ---------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["../outside/secret.txt", "a/../../outside/secret.txt", "/etc/passwd", "/"]
)
@pytest.mark.parametrize("tool", [READ_FILE, WRITE_FILE, LIST_DIR])
def test_paths_that_leave_the_workspace_are_refused(ctx, outside, tool, path):
    arguments = {"path": path, "content": "pwned"} if tool is WRITE_FILE else {"path": path}
    refused("path_outside_workspace", tool, ctx, **arguments)
    assert (outside / "secret.txt").read_text() == "top secret"


def test_a_symlink_to_etc_does_not_escape(ctx):
    (ctx.workspace / "etc").symlink_to("/etc")
    (ctx.workspace / "passwd").symlink_to("/etc/passwd")
    refused("path_outside_workspace", READ_FILE, ctx, path="etc/passwd")
    refused("path_outside_workspace", READ_FILE, ctx, path="passwd")
    refused("path_outside_workspace", LIST_DIR, ctx, path="etc")
    refused("path_outside_workspace", WRITE_FILE, ctx, path="passwd", content="x")


def test_a_symlinked_directory_does_not_escape(ctx, outside):
    (ctx.workspace / "deep" / "er").mkdir(parents=True)
    (ctx.workspace / "deep" / "er" / "out").symlink_to(outside)
    refused("path_outside_workspace", READ_FILE, ctx, path="deep/er/out/secret.txt")
    refused("path_outside_workspace", LIST_DIR, ctx, path="deep/er/out")
    refused("path_outside_workspace", WRITE_FILE, ctx, path="deep/er/out/new.txt", content="x")
    refused("path_outside_workspace", WRITE_FILE, ctx, path="deep/er/out/x/y.txt", content="x")
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]


def test_writing_through_a_symlink_that_points_outside_is_refused(ctx, outside):
    (ctx.workspace / "link.txt").symlink_to(outside / "secret.txt")
    (ctx.workspace / "dangling.txt").symlink_to(outside / "new.txt")
    refused("path_outside_workspace", WRITE_FILE, ctx, path="link.txt", content="pwned")
    refused("path_outside_workspace", WRITE_FILE, ctx, path="dangling.txt", content="pwned")
    assert (outside / "secret.txt").read_text() == "top secret"
    assert not (outside / "new.txt").exists()
    assert (ctx.workspace / "link.txt").is_symlink()


def test_symlinks_and_absolute_paths_inside_the_workspace_are_fine(ctx):
    (ctx.workspace / "real.txt").write_text("real")
    (ctx.workspace / "alias.txt").symlink_to("real.txt")
    assert call(READ_FILE, ctx, path="alias.txt")["content"] == "real"
    assert call(READ_FILE, ctx, path=str(ctx.workspace / "real.txt"))["path"] == "real.txt"
    assert call(WRITE_FILE, ctx, path="alias.txt", content="new")["path"] == "real.txt"
    assert (ctx.workspace / "alias.txt").is_symlink()
    assert (ctx.workspace / "real.txt").read_text() == "new"


def test_a_symlinked_workspace_is_still_its_own_inside(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    ctx = make_ctx(tmp_path / "link")
    assert call(WRITE_FILE, ctx, path="a.txt", content="x")["path"] == "a.txt"
    assert (tmp_path / "real" / "a.txt").read_text() == "x"


def test_a_symlink_loop_and_a_nul_byte_are_errors_not_crashes(ctx):
    (ctx.workspace / "loop").symlink_to("loop")
    refused("not_found", READ_FILE, ctx, path="loop")
    refused("invalid_arguments", READ_FILE, ctx, path="a\x00b")


# -- files: the happy paths and their errors -------------------------------------


def test_write_then_read(ctx):
    written = call(WRITE_FILE, ctx, path="notes/today/plan.md", content="# Plan\nship it ✓\n")
    assert written == {"path": "notes/today/plan.md", "bytes": 19}
    read = call(READ_FILE, ctx, path="notes/today/plan.md")
    assert read == {"path": "notes/today/plan.md", "content": "# Plan\nship it ✓\n", "bytes": 19}


def test_write_replaces_atomically_and_keeps_the_mode(ctx):
    target = ctx.workspace / "run.sh"
    target.write_text("old")
    target.chmod(0o755)
    call(WRITE_FILE, ctx, path="run.sh", content="echo new\n")
    assert target.read_text() == "echo new\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    call(WRITE_FILE, ctx, path="fresh.txt", content="")
    assert stat.S_IMODE((ctx.workspace / "fresh.txt").stat().st_mode) == 0o644
    assert sorted(os.listdir(ctx.workspace)) == ["fresh.txt", "run.sh"]  # no temp files left


def test_write_errors(ctx):
    (ctx.workspace / "dir").mkdir()
    (ctx.workspace / "file.txt").write_text("x")
    refused("is_a_directory", WRITE_FILE, ctx, path="dir", content="x")
    refused("is_a_directory", WRITE_FILE, ctx, path=".", content="x")
    refused("not_a_directory", WRITE_FILE, ctx, path="file.txt/child.txt", content="x")
    refused("not_a_directory", WRITE_FILE, ctx, path="file.txt/a/b.txt", content="x")
    refused("invalid_arguments", WRITE_FILE, ctx, path="s.txt", content="\ud800")
    small = make_ctx(ctx.workspace, write_max_bytes=10)
    error = refused("too_large", WRITE_FILE, small, path="big.txt", content="x" * 11)
    assert error.message == "content: 11 bytes, the limit is 10"
    assert not (ctx.workspace / "big.txt").exists()


def test_read_errors(ctx):
    (ctx.workspace / "dir").mkdir()
    (ctx.workspace / "file.txt").write_text("x")
    os.mkfifo(ctx.workspace / "pipe")
    refused("not_found", READ_FILE, ctx, path="missing.txt")
    refused("not_found", READ_FILE, ctx, path="file.txt/child")
    refused("is_a_directory", READ_FILE, ctx, path="dir")
    refused("invalid_arguments", READ_FILE, ctx, path="pipe")  # and does not hang


def test_read_refuses_large_files_whole(ctx):
    (ctx.workspace / "big.txt").write_bytes(b"x" * 11)
    (ctx.workspace / "fits.txt").write_bytes(b"x" * 10)
    small = make_ctx(ctx.workspace, read_max_bytes=10)
    error = refused("too_large", READ_FILE, small, path="big.txt")
    assert error.message == "big.txt: 11 bytes, the limit is 10"
    assert call(READ_FILE, small, path="fits.txt")["bytes"] == 10


def test_read_replaces_undecodable_bytes(ctx):
    (ctx.workspace / "bin").write_bytes(b"ok \xff\xfe end")
    assert call(READ_FILE, ctx, path="bin") == {
        "path": "bin",
        "content": "ok \ufffd\ufffd end",
        "bytes": 9,
    }


def test_list_dir(ctx):
    (ctx.workspace / "b.txt").write_text("hello")
    (ctx.workspace / "a").mkdir()
    (ctx.workspace / "a" / "inner.txt").write_text("x")
    (ctx.workspace / "c").symlink_to("b.txt")
    assert call(LIST_DIR, ctx) == {
        "path": ".",
        "entries": [
            {"name": "a", "type": "dir", "size": None},
            {"name": "b.txt", "type": "file", "size": 5},
            {"name": "c", "type": "link", "size": None},
        ],
        "truncated": False,
    }
    assert call(LIST_DIR, ctx, path="a")["entries"] == [
        {"name": "inner.txt", "type": "file", "size": 1}
    ]


def test_list_dir_is_capped_at_the_first_names(ctx):
    for name in ["e", "d", "c", "b", "a"]:
        (ctx.workspace / name).write_text("")
    listing = call(LIST_DIR, make_ctx(ctx.workspace, list_max_entries=2))
    assert [e["name"] for e in listing["entries"]] == ["a", "b"]
    assert listing["truncated"] is True


def test_list_dir_errors(ctx):
    (ctx.workspace / "file.txt").write_text("x")
    refused("not_found", LIST_DIR, ctx, path="missing")
    refused("not_a_directory", LIST_DIR, ctx, path="file.txt")
