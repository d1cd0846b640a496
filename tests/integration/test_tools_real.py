"""exec with real processes and web_fetch against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from pathlib import Path

import pytest
from aiohttp import web

from goclaw.agent.tools import (
    BUILTIN_TOOLS,
    AllowListedTools,
    ToolError,
    invoke,
    parse_arguments,
)
from goclaw.fake_llm import serve_in_thread
from tests.tool_context import LOOPBACK, make_ctx

EXEC = BUILTIN_TOOLS["exec"]
WEB_FETCH = BUILTIN_TOOLS["web_fetch"]


@pytest.fixture
def ctx(tmp_path):
    # The test server listens on 127.0.0.1, which the SSRF guard refuses unless allowed.
    return make_ctx(tmp_path, allowed_networks=LOOPBACK)


def run(ctx, command):
    return invoke(EXEC, ctx, parse_arguments(EXEC, {"command": command}))


def fetch(ctx, url):
    return invoke(WEB_FETCH, ctx, parse_arguments(WEB_FETCH, {"url": url}))


def failure(function, *args):
    with pytest.raises(ToolError) as caught:
        function(*args)
    return caught.value


def live_members(pgid):
    """Processes of the group that are not zombies (PID 1 here may never reap them)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def wait_until_gone(pgid, seconds=2.0):
    deadline = time.monotonic() + seconds
    while live_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.01)
    return live_members(pgid)


# -- exec --------------------------------------------------------------------


def test_exit_code_stdout_and_stderr(ctx):
    result = run(ctx, "echo out; echo err >&2; exit 3")
    assert result == {"exit_code": 3, "stdout": "out\n", "stderr": "err\n", "truncated": False}


def test_runs_in_the_workspace_with_no_stdin(ctx):
    result = run(ctx, "pwd; echo $HOME; cat")
    assert result["stdout"] == f"{ctx.workspace}\n{ctx.workspace}\n"
    assert result["exit_code"] == 0


def test_the_environment_is_minimal(ctx, monkeypatch):
    monkeypatch.setenv("GOCLAW_SECRET_TEST", "1")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
    lines = run(ctx, "env")["stdout"].splitlines()
    names = {line.split("=", 1)[0] for line in lines}
    assert "GOCLAW_SECRET_TEST=1" not in lines and "sk-secret" not in "".join(lines)
    assert {"PATH", "HOME", "LANG"} <= names <= {"PATH", "HOME", "LANG", "PWD", "SHLVL", "_"}
    assert "PATH=/usr/local/bin:/usr/bin:/bin" in lines and "LANG=C.UTF-8" in lines


def test_the_shell_is_a_child_of_the_worker(ctx):
    assert run(ctx, "echo $PPID")["stdout"] == f"{os.getpid()}\n"


def test_a_command_killed_by_a_signal_is_a_result(ctx):
    assert run(ctx, "kill -9 $$")["exit_code"] == -signal.SIGKILL


def test_timeout_kills_the_whole_process_group(tmp_path):
    ctx = make_ctx(tmp_path, exec_timeout_seconds=0.5)
    started = time.monotonic()
    error = failure(run, ctx, "echo $$ > pgid; sh -c 'sleep 30 & sleep 30'")
    assert error.code == "timeout"
    assert "after 0.5s" in error.message
    assert time.monotonic() - started < 2
    pgid = int((tmp_path / "pgid").read_text())
    assert wait_until_gone(pgid) == []


def test_background_leftovers_are_killed_when_the_shell_exits(ctx):
    started = time.monotonic()
    result = run(ctx, "sleep 30 & echo $$ > pgid; echo started")  # sleep holds stdout
    assert result["stdout"] == "started\n" and result["exit_code"] == 0
    assert time.monotonic() - started < 2
    assert wait_until_gone(int((ctx.workspace / "pgid").read_text())) == []


def test_a_command_that_closes_its_pipes_is_still_waited_for(tmp_path):
    ctx = make_ctx(tmp_path, exec_timeout_seconds=5)
    result = run(ctx, "exec >/dev/null 2>&1; sleep 0.3; echo done > marker")
    assert result["exit_code"] == 0
    assert (tmp_path / "marker").read_text() == "done\n"


def test_output_is_capped_while_it_is_read(tmp_path):
    ctx = make_ctx(tmp_path, exec_output_bytes=1000, exec_timeout_seconds=10)
    started = time.monotonic()
    result = run(ctx, "yes | head -c 10000000")
    assert time.monotonic() - started < 2
    assert result["exit_code"] == 0 and result["truncated"] is True
    assert result["stdout"] == "y\n" * 500 and result["stderr"] == ""


def test_stdout_and_stderr_share_the_budget(tmp_path):
    ctx = make_ctx(tmp_path, exec_output_bytes=1000)
    result = run(ctx, "head -c 200000 /dev/zero; head -c 200000 /dev/zero >&2; echo end >&2")
    assert len(result["stdout"]) + len(result["stderr"]) == 1000
    assert result["truncated"] is True and result["exit_code"] == 0


def test_endless_output_ends_at_the_timeout_without_buffering_it(tmp_path):
    ctx = make_ctx(tmp_path, exec_timeout_seconds=0.5)
    started = time.monotonic()
    assert failure(run, ctx, "yes").code == "timeout"
    assert time.monotonic() - started < 2


def test_a_command_that_cannot_start_is_exec_failed(tmp_path):
    error = failure(run, make_ctx(tmp_path / "gone"), "true")
    assert error.code == "exec_failed" and "could not start /bin/sh" in error.message
    assert failure(run, make_ctx(tmp_path), "echo a\x00b").code == "exec_failed"


# -- web_fetch ---------------------------------------------------------------


async def text(request):
    return web.Response(text="hello, world")


async def big(request):
    return web.Response(text="a" * 100_000)


async def latin1(request):
    return web.Response(body="café".encode("latin-1"), content_type="text/plain", charset="latin-1")


async def image(request):
    return web.Response(body=b"\x89PNG\r\n" + bytes(100), content_type="image/png")


async def missing(request):
    return web.Response(status=404, text="no such page")


async def slow(request):
    await asyncio.sleep(5)
    return web.Response(text="too late")


async def drip(request):
    """Headers at once, then a byte every 50 ms: each read is quick, the whole is not."""
    response = web.StreamResponse(headers={"Content-Type": "text/plain"})
    await response.prepare(request)
    try:
        for _ in range(200):
            await response.write(b".")
            await asyncio.sleep(0.05)
    except (ConnectionError, asyncio.CancelledError):
        pass
    return response


async def redirect(request):
    hops = int(request.match_info["n"])
    if hops == 0:
        return web.Response(text="landed")
    raise web.HTTPFound(f"/redirect/{hops - 1}")


async def to_file(request):
    raise web.HTTPFound("file:///etc/passwd")


@pytest.fixture(scope="module")
def server():
    app = web.Application()
    app.router.add_get("/text", text)
    app.router.add_get("/big", big)
    app.router.add_get("/latin1", latin1)
    app.router.add_get("/image", image)
    app.router.add_get("/missing", missing)
    app.router.add_get("/slow", slow)
    app.router.add_get("/drip", drip)
    app.router.add_get("/redirect/{n}", redirect)
    app.router.add_get("/to-file", to_file)
    with serve_in_thread(app) as origin:
        yield origin


def test_fetch_text(ctx, server):
    assert fetch(ctx, f"{server}/text") == {
        "url": f"{server}/text",
        "status": 200,
        "content_type": "text/plain; charset=utf-8",
        "content": "hello, world",
        "truncated": False,
    }


def test_fetch_decodes_the_declared_charset(ctx, server):
    assert fetch(ctx, f"{server}/latin1")["content"] == "café"


def test_an_error_status_is_a_result(ctx, server):
    result = fetch(ctx, f"{server}/missing")
    assert (result["status"], result["content"]) == (404, "no such page")


def test_the_body_is_cut_at_the_size_cap(tmp_path, server):
    result = fetch(
        make_ctx(tmp_path, fetch_max_bytes=1000, allowed_networks=LOOPBACK), f"{server}/big"
    )
    assert result["content"] == "a" * 1000 and result["truncated"] is True
    assert (
        fetch(make_ctx(tmp_path, allowed_networks=LOOPBACK), f"{server}/big")["truncated"] is False
    )


def test_binary_content_is_noted_not_returned(ctx, server):
    result = fetch(ctx, f"{server}/image")
    assert result["content_type"] == "image/png"
    assert (
        result["content"] == "[image/png body of 106 bytes not shown: web_fetch returns text only]"
    )


def test_a_slow_server_times_out(tmp_path, server):
    started = time.monotonic()
    error = failure(
        fetch,
        make_ctx(tmp_path, fetch_timeout_seconds=0.3, allowed_networks=LOOPBACK),
        f"{server}/slow",
    )
    assert error.code == "timeout" and "/slow" in error.message
    assert time.monotonic() - started < 1


def test_the_time_cap_is_for_the_whole_fetch_not_each_read(tmp_path, server):
    started = time.monotonic()
    error = failure(
        fetch,
        make_ctx(tmp_path, fetch_timeout_seconds=0.4, allowed_networks=LOOPBACK),
        f"{server}/drip",
    )
    assert error.code == "timeout"
    assert time.monotonic() - started < 1


def test_redirects_are_followed_and_each_hop_is_checked(tmp_path, server):
    class Recorder(AllowListedTools):
        def __init__(self):
            super().__init__(["web_fetch"])
            self.seen = []

        def check(self, ctx, capability, subject):
            if capability == "net.http":
                self.seen.append(subject)

    recorder = Recorder()
    result = fetch(
        make_ctx(tmp_path, policy=recorder, allowed_networks=LOOPBACK), f"{server}/redirect/5"
    )
    assert (result["url"], result["content"]) == (f"{server}/redirect/0", "landed")
    assert recorder.seen == [f"{server}/redirect/{n}" for n in range(5, -1, -1)]


def test_a_refused_hop_stops_the_fetch(tmp_path, server):
    class DenyLanding(AllowListedTools):
        def check(self, ctx, capability, subject):
            if subject.endswith("/redirect/0"):
                raise ToolError("policy_denied", f"{subject}: not allowed")

    error = failure(
        fetch,
        make_ctx(tmp_path, policy=DenyLanding(["web_fetch"]), allowed_networks=LOOPBACK),
        f"{server}/redirect/2",
    )
    assert error.code == "policy_denied"


def test_too_many_redirects(ctx, server):
    error = failure(fetch, ctx, f"{server}/redirect/6")
    assert error.code == "fetch_failed" and "more than 5 redirects" in error.message


@pytest.mark.parametrize(
    "url",
    ["ftp://example.com/", "file:///etc/passwd", "javascript:alert(1)", "http://", "x"],
)
def test_only_http_urls(ctx, url):
    assert failure(fetch, ctx, url).code == "bad_url"


def test_a_redirect_to_another_scheme_is_refused(ctx, server):
    error = failure(fetch, ctx, f"{server}/to-file")
    assert error.code == "bad_url" and "file:///etc/passwd" in error.message


def test_connection_refused(ctx):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    error = failure(fetch, ctx, f"http://127.0.0.1:{port}/")
    assert error.code == "fetch_failed" and "ConnectionRefusedError" in error.message
