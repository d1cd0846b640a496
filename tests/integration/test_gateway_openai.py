"""The official ``openai`` package against the gateway's /v1 over real HTTP on 127.0.0.1.

The turn behind each request is run by the in-process agent harness (the
real loop and router, a fake model server over HTTP), on a thread, as a
worker would; the gateway only queues it and streams its events.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import openai
import pytest

from goclaw.agent.sessions import SessionStore
from goclaw.states import TaskState
from tests.gateway_support import serve_gateway, write_home
from tests.integration.agent_harness import agent_harness

TOKEN = "o" * 32
REPLY = "Streaming through the gateway works, one small piece at a time."


@pytest.fixture
def home(tmp_path):
    return write_home(tmp_path, TOKEN)


@contextlib.contextmanager
def gateway(broker, home, script) -> Iterator[tuple[openai.OpenAI, object]]:
    with (
        agent_harness(broker, home, script) as harness,
        serve_gateway(broker, home, poll_seconds="0.01") as (url, _),
        openai.OpenAI(base_url=f"{url}/v1", api_key=TOKEN, max_retries=0) as client,
    ):
        yield client, harness


@contextlib.contextmanager
def worker(harness, broker, turns: int = 1) -> Iterator[None]:
    """Run the next ``turns`` queued turns on a thread, each as soon as it is queued."""

    def serve() -> None:
        try:
            for _ in range(turns):
                deadline = time.monotonic() + 20
                while broker.queue_depth("default") == 0 and time.monotonic() < deadline:
                    time.sleep(0.01)
                harness.run_next()
        finally:
            broker.db.close()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        yield
    finally:
        thread.join(30)


def script(*replies: str) -> dict:
    return {"replies": [{"content": r, "chunk_size": 5} for r in replies]}


def test_models_lists_the_agents(broker, home):
    with gateway(broker, home, script(REPLY)) as (client, _):
        assert [m.id for m in client.models.list()] == ["agent:default"]


def test_non_streaming_completion_with_a_durable_session(broker, home):
    with gateway(broker, home, script("Paris.", "French.")) as (client, harness):
        with worker(harness, broker, turns=2):
            first = client.chat.completions.with_raw_response.create(
                model="agent:default",
                messages=[{"role": "user", "content": "Capital of France?"}],
                user="ada",
            )
            second = client.chat.completions.create(
                model="agent:default",
                messages=[{"role": "user", "content": "And its language?"}],
                extra_headers={"X-Goclaw-Session": "ada"},
            )
        completion = first.parse()
        assert completion.choices[0].message.content == "Paris."
        assert completion.choices[0].finish_reason == "stop"
        assert first.headers["X-Goclaw-Session"] == "ada"
        assert completion.usage.total_tokens > 0
        assert second.choices[0].message.content == "French."
        history = SessionStore(broker.db).messages("ada")
        assert [m.role for m in history] == ["user", "assistant"] * 2
        # The second turn was sent the first one's history: the session is durable.
        assert "Capital of France?" in str(harness.requests()[-1]["messages"])


def test_streaming_completion_is_fed_by_the_workers_chunks(broker, home):
    with gateway(broker, home, script(REPLY)) as (client, harness), worker(harness, broker):
        stream = client.chat.completions.create(
            model="agent:default",
            messages=[{"role": "user", "content": "stream please"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
    deltas = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert len(deltas) > 3, "tokens arrive in pieces, not as one block"
    assert "".join(deltas) == REPLY
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].usage.completion_tokens > 0


def test_errors_have_the_openai_shape(broker, home):
    with gateway(broker, home, script(REPLY)) as (client, _):
        with pytest.raises(openai.NotFoundError) as unknown:
            client.chat.completions.create(
                model="agent:ghost", messages=[{"role": "user", "content": "hi"}]
            )
        assert unknown.value.body["code"] == "model_not_found"
        with pytest.raises(openai.BadRequestError) as no_user:
            client.chat.completions.create(
                model="agent:default", messages=[{"role": "system", "content": "hi"}]
            )
        assert no_user.value.body["param"] == "messages"
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(
                model="agent:default", messages=[{"role": "user", "content": "hi"}], n=2
            )
        wrong = openai.OpenAI(base_url=str(client.base_url), api_key="x" * 32, max_retries=0)
        with wrong, pytest.raises(openai.AuthenticationError):
            wrong.models.list()


def test_a_full_agent_queue_gets_429_with_retry_after(broker, home):
    with gateway(broker, home, script(REPLY)) as (client, harness):
        harness.configure({"max_queue_depth": 1})
        time.sleep(1.1)  # the gateway's catalog reloads within a second
        [submitted] = broker.submit("agent", {"prompt": "x"})  # not this agent's: not counted
        with pytest.raises(openai.APITimeoutError):
            # The first is accepted and waits for a worker that never comes.
            client.with_options(timeout=0.5).chat.completions.create(
                model="agent:default", messages=[{"role": "user", "content": "one"}]
            )
        with pytest.raises(openai.RateLimitError) as full:
            client.chat.completions.create(
                model="agent:default", messages=[{"role": "user", "content": "two"}]
            )
        assert full.value.response.headers["Retry-After"] == "2"
        assert full.value.body["code"] == "queue_saturated"
        assert broker.get(submitted.task_id).state is TaskState.QUEUED


def test_a_client_that_disconnects_does_not_cancel_unless_asked(broker, home):
    with gateway(broker, home, script(REPLY)) as (client, _):
        for cancel in (False, True):
            with pytest.raises(openai.APITimeoutError):
                client.with_options(timeout=0.5).chat.completions.create(
                    model="agent:default",
                    messages=[{"role": "user", "content": "then hang up"}],
                    user=f"hangup-{cancel}",
                    extra_headers={"X-Goclaw-Cancel-On-Disconnect": str(cancel).lower()},
                )
            deadline = time.monotonic() + 5
            [task] = [t for t in broker.tasks(kind="agent") if t.session_key == f"hangup-{cancel}"]
            wanted = TaskState.CANCELED if cancel else TaskState.QUEUED
            while broker.get(task.id).state is not wanted and time.monotonic() < deadline:
                time.sleep(0.05)
            assert broker.get(task.id).state is wanted
