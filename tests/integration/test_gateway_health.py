"""The gateway's first routes over real HTTP on 127.0.0.1: auth and /healthz."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from goclaw.config import load_config
from goclaw.errors import ConfigError
from goclaw.fake_llm import serve_in_thread
from goclaw.gateway.server import create_app
from goclaw.worker import open_broker
from tests.gateway_support import write_home

TOKEN = "t" * 32


@pytest.fixture
def home(tmp_path):
    return write_home(tmp_path, TOKEN)


@pytest.fixture
def gateway(home, database_url) -> Iterator[tuple[str, object]]:
    config = load_config(home, env={"GOCLAW_DATABASE_URL": database_url})
    broker = open_broker(config)
    try:
        with serve_in_thread(create_app(config, broker)) as origin:
            yield origin, broker
    finally:
        broker.close()


def get(url: str, token: str | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            body = exc.read()
        try:
            return exc.code, json.loads(body or b"{}")
        except ValueError:
            return exc.code, {"text": body.decode(errors="replace")}


def test_healthz_reports_database_workers_and_queue_without_a_token(gateway):
    url, broker = gateway
    broker.submit("noop", count=3)
    broker.register_worker("w-test", hostname="h", pid=1, queue="default", concurrency=1)
    status, body = get(f"{url}/healthz")
    assert status == 200 and body["status"] == "ok"
    assert body["database"]["ok"] is True
    assert body["workers"]["live"] == 1 and body["queue"] == {"name": "default", "depth": 3}


@pytest.mark.parametrize("token", [None, "", "t" * 31, "t" * 33, "wrong" * 8])
def test_every_other_route_needs_the_exact_token(gateway, token):
    url, _ = gateway
    status, body = get(f"{url}/v1/models", token)
    assert status == 401 and body["error"]["type"] == "unauthorized"


def test_the_right_token_gets_past_auth(gateway):
    url, _ = gateway
    status, _ = get(f"{url}/no-such-route", TOKEN)
    assert status == 404


def test_healthz_is_503_when_the_database_is_unavailable(home, tmp_path):
    db_dir = tmp_path / "db"
    db_dir.mkdir()
    config = load_config(home, env={"GOCLAW_DATABASE_URL": f"sqlite:///{db_dir / 'g.db'}"})
    broker = open_broker(config)
    app = create_app(config, broker)
    broker.db.close()
    db_dir.rename(tmp_path / "moved")

    async def probe() -> tuple[int, dict]:
        from aiohttp.test_utils import TestClient, TestServer

        async with TestClient(TestServer(app)) as client:
            response = await client.get("/healthz")
            return response.status, await response.json()

    status, body = asyncio.run(probe())
    assert status == 503 and body["database"]["ok"] is False
    assert "unable to open database file" in body["database"]["error"]


def test_a_gateway_without_a_token_does_not_start(tmp_path, sqlite_url):
    config = load_config(tmp_path, env={"GOCLAW_DATABASE_URL": sqlite_url})
    broker = open_broker(config)
    try:
        with pytest.raises(ConfigError, match="run `goclaw init`"):
            create_app(config, broker)
    finally:
        broker.close()


def test_the_gateway_does_not_import_litellm():
    code = (
        "import sys, goclaw.gateway.server, goclaw.cli, goclaw.agent.turns; "
        "sys.exit('litellm' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
