"""``local/smollm2`` through a real ``litellm.Router``: a real model on the CPU, no mocks.

Skipped, with the reason, where the ``local`` extra is missing; ``make test`` installs
it, so in CI these run. The model loads once per process (about half a second) and
every reply is capped at a few tokens, so the module takes seconds.

Greedy decoding (``temperature=0``) makes the answers repeatable. The system prompt
is there because SmolLM2-135M's greedy answer to the bare question wanders off into
French; told to answer in one English sentence it says "The capital of France is Paris."
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import pytest

from goclaw.agent.local_model import (
    LOCAL_CONTEXT_WINDOW,
    install_local_provider,
    local_context_window,
    local_model_available,
)

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

# LiteLLM 1.106.2 under pydantic warns the first time it builds a Message or a Delta
# (its ChatCompletionReasoningItem TypedDict marks an item ReadOnly). That is LiteLLM's
# model definition, nothing this provider does, and under "error" it would break
# whichever test first touches a response.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Item 'summary' on TypedDict class 'ChatCompletionReasoningItem':UserWarning"
)

QUESTION = [
    {"role": "system", "content": "Answer in one short English sentence."},
    {"role": "user", "content": "What is the capital of France?"},
]
ASK: dict[str, Any] = {"temperature": 0, "max_tokens": 24}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


@pytest.fixture(scope="module")
def litellm() -> Any:
    why = local_model_available()
    if why is not None:
        pytest.skip(why)
    import litellm

    install_local_provider()
    return litellm


def make_router(litellm: Any, model: str = "local/smollm2") -> Any:
    return litellm.Router(
        model_list=[{"model_name": "local", "litellm_params": {"model": model}}], num_retries=0
    )


@pytest.fixture(scope="module")
def router(litellm: Any) -> Any:
    router = make_router(litellm)
    router.completion(model="local", messages=QUESTION, max_tokens=1)  # load the model once
    return router


def streamed(response: Any) -> tuple[list[str], Any]:
    deltas, usage = [], None
    for chunk in response:
        if chunk.choices and chunk.choices[0].delta.content:
            deltas.append(chunk.choices[0].delta.content)
        usage = getattr(chunk, "usage", None) or usage
    return deltas, usage


def test_answers_the_question(router: Any) -> None:
    response = router.completion(model="local", messages=QUESTION, **ASK)

    assert "Paris" in response.choices[0].message.content
    assert response.usage.prompt_tokens > 0
    assert response.usage.completion_tokens > 0
    assert response._hidden_params["response_cost"] == 0


def test_streams_token_deltas_that_add_up_to_the_answer(router: Any) -> None:
    whole = router.completion(model="local", messages=QUESTION, **ASK)

    deltas, usage = streamed(
        router.completion(
            model="local",
            messages=QUESTION,
            stream=True,
            stream_options={"include_usage": True},
            **ASK,
        )
    )

    assert len(deltas) > 1
    assert "".join(deltas) == whole.choices[0].message.content != ""
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (
        whole.usage.prompt_tokens,
        whole.usage.completion_tokens,
    )


def test_an_unknown_local_model_names_the_known_ones(litellm: Any) -> None:
    router = make_router(litellm, "local/no-such-model")

    with pytest.raises(litellm.NotFoundError, match=r"local/no-such-model.*known: local/smollm2"):
        router.completion(model="local", messages=QUESTION, max_tokens=1)


def test_tools_are_ignored_and_it_answers_in_text(router: Any) -> None:
    response = router.completion(model="local", messages=QUESTION, tools=TOOLS, **ASK)

    assert response.choices[0].message.content
    assert not response.choices[0].message.tool_calls


def test_tool_traffic_in_the_history_does_not_break_the_template(router: Any) -> None:
    history = [
        *QUESTION,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "user", "content": [{"type": "text", "text": "And the weather?"}]},
    ]

    response = router.completion(model="local", messages=history, tools=TOOLS, **ASK)

    assert response.choices[0].message.content


def test_calls_from_several_threads_take_turns(router: Any) -> None:
    answers: list[str] = []
    errors: list[BaseException] = []

    def ask(stream: bool) -> None:
        try:
            if stream:
                deltas, _ = streamed(
                    router.completion(model="local", messages=QUESTION, stream=True, **ASK)
                )
                answers.append("".join(deltas))
            else:
                response = router.completion(model="local", messages=QUESTION, **ASK)
                answers.append(response.choices[0].message.content)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(i % 2 == 0,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert errors == []
    assert len(answers) == 4
    assert all("Paris" in answer for answer in answers)


def test_a_stream_dropped_half_read_does_not_keep_the_model(router: Any) -> None:
    # As when a caller fails mid-stream and the traceback keeps the stream alive.
    abandoned = router.completion(model="local", messages=QUESTION, stream=True, **ASK)
    next(iter(abandoned))

    started = time.monotonic()
    response = router.completion(model="local", messages=QUESTION, timeout=30, **ASK)

    assert "Paris" in response.choices[0].message.content
    assert time.monotonic() - started < 10
    del abandoned


def test_async_calls_stream_too(router: Any) -> None:
    async def ask() -> tuple[str, list[str]]:
        whole = await router.acompletion(model="local", messages=QUESTION, **ASK)
        response = await router.acompletion(model="local", messages=QUESTION, stream=True, **ASK)
        deltas = [
            chunk.choices[0].delta.content
            async for chunk in response
            if chunk.choices and chunk.choices[0].delta.content
        ]
        return whole.choices[0].message.content, deltas

    whole, deltas = asyncio.run(ask())

    assert len(deltas) > 1
    assert "".join(deltas) == whole


def test_a_prompt_beyond_the_window_is_a_context_overflow(litellm: Any, router: Any) -> None:
    too_long = [{"role": "user", "content": "word " * LOCAL_CONTEXT_WINDOW}]

    with pytest.raises(litellm.ContextWindowExceededError, match="context window of 2048"):
        router.completion(model="local", messages=too_long, max_tokens=1)


def test_without_the_extra_the_error_says_how_to_install_it(litellm: Any) -> None:
    # A fresh interpreter where llama_cpp cannot be imported, as without the extra.
    script = textwrap.dedent(
        """
        import sys
        sys.modules["llama_cpp"] = None
        import litellm
        from goclaw.agent.local_model import install_local_provider, local_model_available
        print(local_model_available())
        install_local_provider()
        router = litellm.Router(
            model_list=[{"model_name": "local", "litellm_params": {"model": "local/smollm2"}}],
            num_retries=0,
        )
        try:
            router.completion(model="local", messages=[{"role": "user", "content": "hi"}])
        except litellm.ServiceUnavailableError as exc:
            print(type(exc).__name__, exc)
        """
    )
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}

    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )

    hint = "install the extra: pip install 'goclaw[local]'"
    assert out.stdout.startswith(f"llama-cpp-python is not installed; {hint}\n"), out.stderr
    assert "ServiceUnavailableError litellm.ServiceUnavailableError: local/smollm2 cannot run" in (
        out.stdout
    )
    assert out.stdout.count(hint) == 2


def test_context_window_is_known_without_litellm_model_map() -> None:
    assert local_context_window("local/smollm2") == LOCAL_CONTEXT_WINDOW
    assert local_context_window("local/no-such-model") is None
    assert local_context_window("openai/gpt-4o-mini") is None
