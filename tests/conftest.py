"""Fixtures shared by every test layer.

``database_url`` runs a test on a real SQLite file and on a real PostgreSQL
schema of its own (dropped afterwards). PostgreSQL comes from
``GOCLAW_TEST_DATABASE_URL``, else ``postgresql://postgres@127.0.0.1:5432/test``;
where none answers, those tests skip with the reason, unless
``GOCLAW_REQUIRE_POSTGRES=1`` (set by CI) turns the skip into a failure.
"""

from __future__ import annotations

import functools
import os
import urllib.parse
import uuid
from collections.abc import Iterator

import pytest

from goclaw.broker import Broker
from goclaw.config import BrokerSettings
from goclaw.store.database import Database
from goclaw.store.migrations import migrate

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

PG_URL = os.environ.get("GOCLAW_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")

#: Short leases and retries so the slow paths run in seconds, not minutes.
FAST = BrokerSettings(
    lease_seconds=1.0,
    heartbeat_seconds=0.2,
    retry_base_seconds=0.01,
    retry_max_seconds=0.05,
    idle_poll_seconds=0.5,
    cancel_check_seconds=0.05,
)


@functools.cache
def postgres_unavailable() -> str | None:
    """Why PostgreSQL cannot be used here, or None when it can."""
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed (pip install 'goclaw[postgres]')"
    try:
        with psycopg.connect(PG_URL, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:
        return f"no PostgreSQL at {PG_URL}: {str(exc).strip().splitlines()[0]}"
    return None


def require_postgres() -> None:
    reason = postgres_unavailable()
    if reason is None:
        return
    if os.environ.get("GOCLAW_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"GOCLAW_REQUIRE_POSTGRES=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A URL whose search_path is a fresh schema, dropped after the test."""
    require_postgres()
    import psycopg

    schema = f"goclaw_t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in PG_URL else "?"
    options = urllib.parse.quote(f"-csearch_path={schema}")
    try:
        yield f"{PG_URL}{sep}options={options}"
    finally:
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'goclaw.db'}"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request) -> str:
    """The same test against SQLite and PostgreSQL."""
    name = "sqlite_url" if request.param == "sqlite" else "postgres_url"
    return request.getfixturevalue(name)


@pytest.fixture
def settings() -> BrokerSettings:
    return FAST


@pytest.fixture
def db(database_url) -> Iterator[Database]:
    database = Database(database_url)
    migrate(database)
    yield database
    database.close()


@pytest.fixture
def broker(db, settings) -> Iterator[Broker]:
    broker = Broker(db, settings)
    yield broker
    broker.close()
