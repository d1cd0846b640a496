"""The policy at the gateway, over real HTTP and WebSocket on 127.0.0.1: every ACP method and
API route is acp.read or acp.mutate, refused precisely, audited either way, and a hot edit
applies to the next request of the same connection."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request

import aiohttp

from goclaw.audit import AuditLog, audit_path
from goclaw.gateway import jsonrpc
from tests.acp_client import AcpClient
from tests.gateway_support import TOKEN, serve_gateway, write_home
from tests.policy_support import write_policy

READ_ONLY = "version: 1\nallow: [acp.read]\n"


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def get(url: str) -> tuple[int, dict]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_read_only_clients_read_and_every_mutation_is_refused_and_audited(broker, tmp_path):
    home = write_home(tmp_path, TOKEN)
    policy = write_policy(home, READ_ONLY)
    audit = AuditLog(broker.db, audit_path(home))

    async def acp(url: str) -> tuple[dict, dict, dict, dict]:
        async with aiohttp.ClientSession() as http:
            client = await AcpClient.connect(http, url, TOKEN)
            hello = await client.hello()
            chat = await client.request("agent.chat", content="hi")
            listed = await client.request("task.list")
            # A hot edit that withdraws acp.read reaches the same connection within a second.
            policy.write_text("version: 1\nallow: []\n")
            deadline = time.monotonic() + 5
            while True:
                later = await client.request("task.list")
                if "error" in later or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
            await client.close()
            return hello, chat, listed, later

    with serve_gateway(broker, home) as (url, _):
        models_status, _ = get(f"{url}/v1/models")
        hello, chat, listed, later = asyncio.run(acp(url))
        status, body = post(
            f"{url}/v1/chat/completions",
            {"model": "agent:default", "messages": [{"role": "user", "content": "hi"}]},
        )
    assert models_status == 200 and hello["version"] == 1
    assert chat["error"]["code"] == jsonrpc.POLICY_DENIED
    assert chat["error"]["data"] == {"name": "policy_denied", "capability": "acp.mutate"}
    assert "acp.mutate is not allowed" in chat["error"]["message"]
    assert "tasks" in listed["result"]
    assert later["error"]["code"] == jsonrpc.POLICY_DENIED
    assert later["error"]["data"]["capability"] == "acp.read"
    assert status == 403 and body["error"]["code"] == "policy_denied"
    assert broker.tasks() == [], "nothing was queued"
    records = [(r.capability, r.subject.split(" from ")[0], r.decision) for r in audit.query()]
    assert ("acp.read", "system.hello", "allow") in records
    assert ("acp.mutate", "agent.chat", "deny") in records
    assert ("acp.read", "task.list", "allow") in records
    assert ("acp.read", "task.list", "deny") in records
    assert ("acp.mutate", "POST /v1/chat/completions", "deny") in records
    assert ("acp.read", "GET /v1/models", "allow") in records
    assert all(r.agent == "-" and r.policy_version for r in audit.query())
    assert audit.verify().ok


def test_models_need_acp_read(broker, tmp_path):
    home = write_home(tmp_path, TOKEN)
    write_policy(home, "version: 1\nallow: [acp.mutate]\n")
    with serve_gateway(broker, home) as (url, _):
        status, body = get(f"{url}/v1/models")
    assert status == 403 and "acp.read is not allowed" in body["error"]["message"]
