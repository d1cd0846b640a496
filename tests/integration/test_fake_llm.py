"""The fake model server speaks OpenAI's wire protocol: proven with the official client."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

from goclaw.errors import ConfigError
from goclaw.fake_llm import FakeLLM, Script


@pytest.fixture
def serve():
    servers = []
    clients = []

    def start(data):
        server = FakeLLM(Script.from_data(data))
        context = server.running()
        url = context.__enter__()
        servers.append(context)
        client = openai.OpenAI(base_url=url, api_key="sk-fake", max_retries=0, timeout=5)
        clients.append(client)
        return server, client

    yield start
    for client in clients:
        client.close()
    for context in servers:
        context.__exit__(None, None, None)


def test_plain_reply_with_usage(serve):
    server, client = serve([{"content": "The capital of France is Paris."}])
    reply = client.chat.completions.create(
        model="primary", messages=[{"role": "user", "content": "Capital of France?"}]
    )
    assert reply.choices[0].message.content == "The capital of France is Paris."
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.total_tokens > 0
    assert server.requests[0]["messages"][0]["content"] == "Capital of France?"


def test_streamed_chunks_concatenate_to_the_reply(serve):
    _, client = serve([{"content": "streaming, four characters at a time", "chunk_size": 4}])
    stream = client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks, usage = [], None
    for event in stream:
        if event.usage:
            usage = event.usage
        for choice in event.choices:
            if choice.delta.content:
                chunks.append(choice.delta.content)
    assert "".join(chunks) == "streaming, four characters at a time"
    assert len(chunks) == 9 and usage is not None


def test_tool_calls_whole_and_streamed(serve):
    call = {"name": "read_file", "arguments": {"path": "notes.txt"}}
    _, client = serve([{"tool_calls": [call]}, {"tool_calls": [call]}])
    tools = [{"type": "function", "function": {"name": "read_file", "parameters": {}}}]
    messages = [{"role": "user", "content": "read my notes"}]

    whole = client.chat.completions.create(model="m", messages=messages, tools=tools)
    (made,) = whole.choices[0].message.tool_calls
    assert whole.choices[0].finish_reason == "tool_calls"
    assert (made.function.name, json.loads(made.function.arguments)) == (
        "read_file",
        {"path": "notes.txt"},
    )

    name, arguments, finish = "", "", None
    for event in client.chat.completions.create(
        model="m", messages=messages, tools=tools, stream=True
    ):
        for choice in event.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or ():
                name += delta.function.name or ""
                arguments += delta.function.arguments or ""
    assert (name, json.loads(arguments), finish) == (
        "read_file",
        {"path": "notes.txt"},
        "tool_calls",
    )


def test_rate_limit_and_server_errors_in_openai_shape(serve):
    _, client = serve([{"status": 429, "retry_after": 1}, {"status": 500}, {"content": "ok"}])
    with pytest.raises(openai.RateLimitError) as limited:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert limited.value.response.headers["retry-after"] == "1"
    assert limited.value.body["type"] == "rate_limit_error"
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    ok = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert ok.choices[0].message.content == "ok"


def test_per_model_replies_and_an_exhausted_script(serve):
    _, client = serve(
        {
            "replies": [{"content": "default"}],
            "models": {"backup": [{"content": "from the backup"}]},
        }
    )
    ask = {"messages": [{"role": "user", "content": "x"}]}
    backup = client.chat.completions.create(model="backup", **ask)
    assert backup.choices[0].message.content == "from the backup"
    assert client.chat.completions.create(model="primary", **ask).choices[0].message.content == (
        "default"
    )
    with pytest.raises(openai.InternalServerError, match="no reply left"):
        client.chat.completions.create(model="primary", **ask)


def test_a_stalled_stream_hangs_until_the_client_gives_up(serve):
    _, client = serve([{"content": "abcdefghijkl", "chunk_size": 2, "stall_after": 2}])
    slow = client.with_options(timeout=httpx.Timeout(1.0))
    received = []
    started = time.monotonic()
    # Mid-stream, the client surfaces httpx's own timeout (it wraps only pre-stream ones).
    with pytest.raises(httpx.ReadTimeout):
        for event in slow.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}], stream=True
        ):
            for choice in event.choices:
                if choice.delta.content:
                    received.append(choice.delta.content)
    assert received == ["ab", "cd"]
    assert time.monotonic() - started < 5


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"replies": [{"contnet": "typo"}]}, r"replies\[0\]: unknown key 'contnet'"),
        ({"replies": [{"status": 99}]}, r"replies\[0\].status"),
        ({"replies": [{"tool_calls": [{"arguments": {}}]}]}, "tool_calls"),
        ({"answers": []}, "unknown key 'answers'"),
    ],
)
def test_a_bad_script_is_refused_naming_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        Script.from_data(data)


def test_the_cli_serves_a_script_file(tmp_path):
    script = tmp_path / "script.yaml"
    script.write_text("replies:\n  - content: from the command line\n")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "goclaw.cli",
            "dev",
            "fake-llm",
            "--port",
            str(port),
            "--script",
            str(script),
        ],
        env=os.environ.copy(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=2
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                assert time.monotonic() < deadline, "the fake model server did not start"
                time.sleep(0.1)
        reply = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}]
        )
        assert reply.choices[0].message.content == "from the command line"
        client.close()
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stderr.close()
