"""What the gateway tests share: a home with an auth token, and a gateway served in-thread."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from aiohttp import web

from goclaw.broker import Broker
from goclaw.config import load_config
from goclaw.fake_llm import serve_in_thread
from goclaw.gateway.server import create_app
from tests.policy_support import write_policy

TOKEN = "s3cr3t-T0ken-0123456789abcdefXYZ"


def write_home(tmp_path: Path, token: str = TOKEN) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    (path / "auth.token").write_text(token + "\n")
    write_policy(path)
    return path


@contextlib.contextmanager
def serve_gateway(
    broker: Broker, home: Path, **gateway: str
) -> Iterator[tuple[str, web.Application]]:
    """The real app on 127.0.0.1 over ``broker``; ``gateway`` sets ``gateway.*`` keys
    (as ``GOCLAW_GATEWAY__<KEY>`` would)."""
    env = {f"GOCLAW_GATEWAY__{key.upper()}": value for key, value in gateway.items()}
    app = create_app(load_config(home, env=env), broker)
    with serve_in_thread(app) as url:
        yield url, app
