"""The auth matrix and the per-client limits, against a real gateway on 127.0.0.1.

Every route the app registers (read from ``app.router.routes()``, so a new route is covered
the day it is added) and every HTTP method is refused with 401, in the OpenAI error shape
and with ``WWW-Authenticate``, without the exact token; ``/healthz`` is the one public path.
A WebSocket upgrade is refused before it happens, whether the token comes in the
Authorization header or in the ``bearer.<token>`` subprotocol browsers use, so no ACP method
can be reached. A browser's Origin must be on the allowlist. Then the rate limit (429 /
-32008) and the body limit, after which the gateway still serves.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from goclaw.gateway.acp_methods import METHODS
from tests.gateway_support import serve_gateway, write_home

TOKEN = "s3cr3t-T0ken-0123456789abcdefXYZ"
PUBLIC = "/healthz"
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
UNAUTHORIZED = {"type": "unauthorized", "param": None, "code": "invalid_api_key"}


@pytest.fixture
def home(tmp_path):
    return write_home(tmp_path, TOKEN)


gateway = serve_gateway


def routes(app: web.Application) -> list[tuple[str, str]]:
    """(method, path) for every route the app serves."""
    found = []
    for route in app.router.routes():
        path = route.resource.canonical if route.resource is not None else None
        assert path and "{" not in path, f"a route this test cannot fill in yet: {route}"
        found.append(("GET" if route.method == "*" else route.method, path))
    return sorted(set(found))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def one_char_off(position: int) -> str:
    char = TOKEN[position]
    return TOKEN[:position] + ("a" if char != "a" else "b") + TOKEN[position + 1 :]


BASIC = base64.b64encode(f"goclaw:{TOKEN}".encode()).decode()
#: Every way of not presenting the exact token in an ordinary request.
BAD_CREDENTIALS: dict[str, dict[str, str]] = {
    "none": {},
    "wrong": bearer("wrong"),
    "one char off (first)": bearer(one_char_off(0)),
    "one char off (middle)": bearer(one_char_off(len(TOKEN) // 2)),
    "one char off (last)": bearer(one_char_off(len(TOKEN) - 1)),
    "one char short": bearer(TOKEN[:-1]),
    "one char long": bearer(TOKEN + "x"),
    "twice": bearer(f"{TOKEN} {TOKEN}"),
    "other case": bearer(TOKEN.swapcase()),
    "empty bearer": {"Authorization": "Bearer "},
    "bearer alone": {"Authorization": "Bearer"},
    "empty header": {"Authorization": ""},
    "basic scheme": {"Authorization": f"Basic {BASIC}"},
    "basic scheme, bare token": {"Authorization": f"Basic {TOKEN}"},
    "token scheme": {"Authorization": f"Token {TOKEN}"},
    "no scheme": {"Authorization": TOKEN},
    "another header": {"X-Api-Key": TOKEN},
    "subprotocol without an upgrade": {"Sec-WebSocket-Protocol": f"bearer.{TOKEN}"},
    "cookie": {"Cookie": f"token={TOKEN}"},
}
#: The right token, spelled every way HTTP allows (the scheme is case-insensitive).
GOOD_CREDENTIALS = {
    "Bearer": bearer(TOKEN),
    "bearer": {"Authorization": f"bearer {TOKEN}"},
    "BEARER": {"Authorization": f"BEARER {TOKEN}"},
}


async def call(
    session: aiohttp.ClientSession, method: str, url: str, headers: dict[str, str], **kw: Any
) -> tuple[int, Any, Any]:
    """(status, headers, JSON body or None)."""
    async with session.request(method, url, headers=headers, **kw) as response:
        raw = await response.read()
        body = None
        if raw and response.content_type == "application/json":
            body = json.loads(raw)
        return response.status, response.headers, body


def assert_openai_error(body: Any, **expected: Any) -> None:
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    for key, value in expected.items():
        assert error[key] == value, (key, error)


def assert_unauthorized(status: int, headers: Any, body: Any, method: str, what: str) -> None:
    assert status == 401, f"{what}: {status}"
    assert headers.get("WWW-Authenticate", "").startswith("Bearer "), f"{what}: {headers}"
    if method != "HEAD":  # a HEAD answer has no body
        assert_openai_error(body, **UNAUTHORIZED)


# -- HTTP ------------------------------------------------------------------------------------


def test_every_route_refuses_every_wrong_credential_but_healthz(broker, home):
    with gateway(broker, home, rate_limit_per_second="100000", rate_limit_burst="100000") as (
        url,
        app,
    ):
        registered = routes(app)
        assert ("GET", PUBLIC) in registered and len(registered) >= 5, registered

        async def scenario() -> int:
            sent = 0
            async with aiohttp.ClientSession() as session:
                for method, path in registered:
                    for label, headers in BAD_CREDENTIALS.items():
                        status, got, body = await call(session, method, url + path, headers)
                        sent += 1
                        what = f"{method} {path} with {label}"
                        if path == PUBLIC:
                            assert status == 200, f"{what}: {status}"
                            if method == "GET":
                                assert body["status"] == "ok", body
                        else:
                            assert_unauthorized(status, got, body, method, what)
            return sent

        sent = asyncio.run(scenario())
        assert sent == len(registered) * len(BAD_CREDENTIALS)


def test_every_method_on_every_path_needs_the_token(broker, home):
    """Not only the registered method: auth runs before routing, so a wrong method, an
    unknown path or a path spelled differently says nothing to a client without the token."""
    with gateway(broker, home, rate_limit_per_second="100000", rate_limit_burst="100000") as (
        url,
        app,
    ):
        paths = sorted({path for _, path in routes(app)})
        variants = ["/nope", "/v1", "/v1/models/", "/healthz/", "/HEALTHZ", "/v1/%6Dodels"]

        async def scenario() -> None:
            async with aiohttp.ClientSession() as session:
                for path in paths + variants:
                    for method in HTTP_METHODS:
                        for label in ("none", "wrong", "one char off (last)"):
                            headers = BAD_CREDENTIALS[label]
                            status, got, body = await call(session, method, url + path, headers)
                            what = f"{method} {path} with {label}"
                            if path != PUBLIC:
                                assert_unauthorized(status, got, body, method, what)
                            elif method in ("GET", "HEAD"):
                                assert status == 200, what
                            else:
                                assert status == 405, f"{what}: {status}"  # public, not writable

        asyncio.run(scenario())


def test_the_right_token_gets_past_auth_on_every_route(broker, home):
    with gateway(broker, home, rate_limit_per_second="100000", rate_limit_burst="100000") as (
        url,
        app,
    ):
        registered = routes(app)

        async def scenario() -> None:
            async with aiohttp.ClientSession() as session:
                for method, path in registered:
                    for label, headers in GOOD_CREDENTIALS.items():
                        status, _, body = await call(session, method, url + path, headers)
                        what = f"{method} {path} with {label}: {status} {body}"
                        assert status != 401 and status < 500, what
                status, _, body = await call(session, "GET", url + "/v1/models", bearer(TOKEN))
                assert status == 200 and body["data"][0]["id"] == "agent:default"

        asyncio.run(scenario())


# -- WebSocket upgrades --------------------------------------------------------------------


def ws_url(url: str) -> str:
    return url.replace("http://", "ws://") + "/ws"


async def refused(session: aiohttp.ClientSession, url: str, **kw: Any) -> int:
    """The status a WebSocket handshake is refused with (fails if it is accepted)."""
    with pytest.raises(aiohttp.WSServerHandshakeError) as handshake:
        ws = await session.ws_connect(ws_url(url), **kw)
        await ws.close()
    return handshake.value.status


async def accepted(session: aiohttp.ClientSession, url: str, **kw: Any) -> str | None:
    """Open, prove the connection serves ACP, close; the subprotocol the server chose."""
    ws = await session.ws_connect(ws_url(url), **kw)
    try:
        await ws.send_str('{"jsonrpc":"2.0","id":1,"method":"agent.list"}')
        reply = json.loads((await ws.receive(10)).data)
        assert reply["id"] == 1 and "result" in reply, reply
        return ws.protocol
    finally:
        await ws.close()


def test_a_websocket_upgrade_needs_the_token_in_a_header_or_the_subprotocol(broker, home):
    with gateway(broker, home) as (url, _):

        async def scenario() -> None:
            async with aiohttp.ClientSession() as session:
                for label, headers in BAD_CREDENTIALS.items():
                    if label == "subprotocol without an upgrade":
                        continue  # with the upgrade it is the right token: accepted below
                    assert await refused(session, url, headers=headers) == 401, label
                for protocols in [
                    (f"bearer.{TOKEN[:-1]}",),
                    ("acp.v1", f"bearer.{one_char_off(3)}"),
                    ("acp.v1", "bearer.wrong"),
                    ("acp.v1", "bearer."),
                    ("acp.v1", "bearer"),
                    ("acp.v1", f"Bearer.{TOKEN}"),
                    ("acp.v1", f"token.{TOKEN}"),
                    ("acp.v1",),
                ]:
                    assert await refused(session, url, protocols=protocols) == 401, protocols
                # A wrong Authorization header is not rescued by a right subprotocol.
                status = await refused(
                    session, url, headers=bearer("wrong"), protocols=("acp.v1", f"bearer.{TOKEN}")
                )
                assert status == 401

                for label, headers in GOOD_CREDENTIALS.items():
                    assert await accepted(session, url, headers=headers) is None, label
                # The browser way: the token rides in the subprotocol list, next to acp.v1,
                # which is the one the server picks (never echoing the token back).
                chosen = await accepted(session, url, protocols=("acp.v1", f"bearer.{TOKEN}"))
                assert chosen == "acp.v1"
                assert await accepted(session, url, protocols=(f"bearer.{TOKEN}",)) is None

        asyncio.run(scenario())


def test_the_token_never_reaches_the_log(broker, home, caplog):
    caplog.set_level(logging.DEBUG)
    with gateway(broker, home) as (url, _):

        async def scenario() -> None:
            async with aiohttp.ClientSession() as session:
                await accepted(session, url, headers=bearer(TOKEN))
                await accepted(session, url, protocols=("acp.v1", f"bearer.{TOKEN}"))
                await accepted(session, url, protocols=(f"bearer.{TOKEN}",))

        asyncio.run(scenario())
    leaks = [r.getMessage() for r in caplog.records if TOKEN in r.getMessage()]
    assert not leaks, leaks


def masked_frame(text: str) -> bytes:
    """A client-to-server WebSocket text frame (RFC 6455 5.2: clients mask)."""
    payload = text.encode()
    mask = b"\x01\x02\x03\x04"
    header = bytes([0x81])
    if len(payload) < 126:
        header += bytes([0x80 | len(payload)])
    else:
        header += bytes([0x80 | 126]) + len(payload).to_bytes(2, "big")
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def test_no_acp_method_runs_behind_a_refused_upgrade(broker, home):
    """A client that ignores the 401 and writes frames anyway reaches no method: the bytes
    after a refused handshake are read as HTTP (and refused), never as ACP."""
    params = {"agent.chat": {"content": "hi"}, "agent.abort": {"task_id": 1}}
    frames = [
        json.dumps({"jsonrpc": "2.0", "id": i, "method": name, "params": params.get(name, {})})
        for i, name in enumerate(["system.hello", *sorted(METHODS)])
    ]
    with gateway(broker, home) as (url, _):
        host, port = url.removeprefix("http://").split(":")

        async def attempt(auth: str) -> bytes:
            reader, writer = await asyncio.open_connection(host, int(port))
            try:
                handshake = (
                    f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                    "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                    f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{auth}\r\n"
                )
                writer.write(handshake.encode() + b"".join(masked_frame(f) for f in frames))
                await writer.drain()
                return await asyncio.wait_for(reader.read(), 10)  # until the server closes
            finally:
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()

        async def scenario() -> None:
            for auth in ["", "Authorization: Bearer wrong\r\n", f"X-Token: {TOKEN}\r\n"]:
                answer = await attempt(auth)
                assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
                assert b" 101 " not in answer and b"jsonrpc" not in answer, answer

        asyncio.run(scenario())
    assert sum(broker.counts().values()) == 0, "agent.chat must not have queued a task"


def test_a_browser_origin_must_be_on_the_allowlist(broker, home):
    allowed = "http://localhost:3000"
    with gateway(broker, home, allowed_origins=allowed) as (url, _):

        async def scenario() -> None:
            async with aiohttp.ClientSession() as session:
                for origin in [
                    "http://evil.example",
                    "null",
                    "http://localhost:3001",
                    "https://localhost:3000",
                    "http://localhost",
                    "http://localhost:3000.evil.example",
                    "http://evil.example/http://localhost:3000",
                ]:
                    headers = {"Origin": origin, **bearer(TOKEN)}
                    assert await refused(session, url, headers=headers) == 403, origin
                # The refusal is the OpenAI error shape too.
                upgrade = {
                    "Origin": "http://evil.example",
                    "Upgrade": "websocket",
                    "Connection": "Upgrade",
                    "Sec-WebSocket-Version": "13",
                    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                    **bearer(TOKEN),
                }
                status, _, body = await call(session, "GET", url + "/ws", upgrade)
                assert status == 403
                assert_openai_error(body, type="forbidden", code="origin_not_allowed")
                # Without the token the origin is not even looked at.
                for origin in [allowed, "http://evil.example"]:
                    status = await refused(session, url, headers={"Origin": origin})
                    assert status == 401, origin

                # An allowed origin, with the token either way a browser can send it.
                await accepted(session, url, headers={"Origin": allowed, **bearer(TOKEN)})
                chosen = await accepted(
                    session,
                    url,
                    headers={"Origin": allowed},
                    protocols=("acp.v1", f"bearer.{TOKEN}"),
                )
                assert chosen == "acp.v1"
                # Programs send no Origin at all: not affected by the allowlist.
                assert await accepted(session, url, headers=bearer(TOKEN)) is None

        asyncio.run(scenario())


# -- limits --------------------------------------------------------------------------------------


def test_the_rate_limit_answers_429_then_32008_and_spares_healthz(broker, home):
    with gateway(broker, home, rate_limit_per_second="5", rate_limit_burst="5") as (url, _):

        async def scenario() -> None:
            async with aiohttp.ClientSession() as session:
                models = url + "/v1/models"
                started = time.monotonic()
                for n in range(5):
                    status, _, _ = await call(session, "GET", models, bearer(TOKEN))
                    assert status == 200, f"request {n + 1}: {status}"
                status, headers, body = await call(session, "GET", models, bearer(TOKEN))
                # 5 tokens a second: the burst must be spent faster than one refills.
                assert time.monotonic() - started < 0.2, "too slow a machine for this test"
                assert status == 429
                assert int(headers["Retry-After"]) >= 1
                assert_openai_error(body, type="rate_limit_exceeded", code="rate_limited")

                # /healthz is never limited, and the rest of the gateway is not affected.
                for _ in range(20):
                    assert (await call(session, "GET", url + "/healthz", {}))[0] == 200
                # Auth comes first: a wrong token is 401 even while the client is limited.
                status, _, body = await call(session, "GET", models, bearer("wrong"))
                assert status == 401
                # The upgrade is a request like any other.
                assert await refused(session, url, headers=bearer(TOKEN)) == 429

                await asyncio.sleep(1.1)  # the bucket refills (5 a second, 5 at most)
                ws = await session.ws_connect(ws_url(url), headers=bearer(TOKEN))
                try:
                    # The upgrade spent one unit of the burst: 4 frames pass, the 5th does not.
                    for n in range(4):
                        await ws.send_str(json.dumps({"jsonrpc": "2.0", "id": n, "method": "x"}))
                        reply = json.loads((await ws.receive(10)).data)
                        assert reply["id"] == n and reply["error"]["code"] == -32601, reply
                    # A limited notification gets no reply: the next message is the request's.
                    await ws.send_str('{"jsonrpc":"2.0","method":"agent.list"}')
                    await ws.send_str('{"jsonrpc":"2.0","id":"over","method":"agent.list"}')
                    reply = json.loads((await ws.receive(10)).data)
                    assert reply["id"] == "over", reply
                    assert reply["error"]["code"] == -32008, reply
                    assert reply["error"]["data"]["name"] == "rate_limited"
                    assert reply["error"]["data"]["retry_after"] > 0
                    # The connection stays open; once the bucket refills, requests pass.
                    await asyncio.sleep(1.1)
                    await ws.send_str('{"jsonrpc":"2.0","id":"later","method":"agent.list"}')
                    reply = json.loads((await ws.receive(10)).data)
                    assert reply["id"] == "later" and "result" in reply, reply
                finally:
                    await ws.close()

        asyncio.run(scenario())


def chat_body(size: int, **extra: Any) -> bytes:
    """A chat-completions body of exactly ``size`` bytes."""
    body = {"model": "agent:default", "messages": [{"role": "user", "content": ""}], **extra}
    empty = len(json.dumps(body).encode())
    body["messages"][0]["content"] = "x" * (size - empty)
    raw = json.dumps(body).encode()
    assert len(raw) == size
    return raw


def test_a_body_over_max_body_bytes_is_refused_and_the_gateway_serves_on(broker, home):
    limit = 2048
    with gateway(
        broker,
        home,
        max_body_bytes=str(limit),
        rate_limit_per_second="100000",
        rate_limit_burst="100000",
    ) as (url, _):
        chat = url + "/v1/chat/completions"
        json_type = {"Content-Type": "application/json"}

        async def chunked(raw: bytes):
            for start in range(0, len(raw), 512):
                yield raw[start : start + 512]

        async def scenario() -> None:
            async with aiohttp.ClientSession() as session:
                headers = {**bearer(TOKEN), **json_type}
                # Just over, well over, and with no Content-Length (chunked): all 400.
                for size in [limit + 1, 4 * limit, 1_000_000]:
                    status, _, body = await call(
                        session, "POST", chat, headers, data=chat_body(size)
                    )
                    assert status == 400, (size, status, body)
                    assert_openai_error(body, type="invalid_request_error")
                    assert "max_body_bytes" in body["error"]["message"], body
                status, _, body = await call(
                    session, "POST", chat, headers, data=chunked(chat_body(4 * limit))
                )
                assert status == 400, (status, body)
                assert "max_body_bytes" in body["error"]["message"], body

                # At the limit the body is read: this one is refused for its content instead.
                exact = chat_body(limit, model="")
                status, _, body = await call(session, "POST", chat, headers, data=exact)
                assert status == 400 and body["error"]["param"] == "model", body

                # Without the token the size does not matter: 401 first.
                status, got, body = await call(
                    session, "POST", chat, json_type, data=chat_body(4 * limit)
                )
                assert_unauthorized(status, got, body, "POST", "big body without a token")

                # The gateway keeps serving.
                assert (await call(session, "GET", url + "/healthz", {}))[0] == 200
                status, _, body = await call(session, "GET", url + "/v1/models", bearer(TOKEN))
                assert status == 200 and body["object"] == "list"

        asyncio.run(scenario())
