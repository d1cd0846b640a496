"""Open the database behind a URL and hide the two dialects' few differences.

goclaw writes its SQL once, with ``?`` placeholders; ``Database.execute``
rewrites them for psycopg. Everything above this module talks to a
``Database`` and never to sqlite3 or psycopg directly, and driver errors are
translated here into ``goclaw.errors.DatabaseError``.
"""

from __future__ import annotations

import contextlib
import functools
import re
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import peewee

from goclaw.errors import DatabaseError

SQLITE_PRAGMAS = (
    ("journal_mode", "wal"),
    # FULL: a commit is on disk before it is acknowledged, even in WAL mode.
    ("synchronous", "full"),
    ("foreign_keys", 1),
    ("cache_size", -16000),
)

_PARAM = re.compile(r"\?")


class Database:
    """A peewee database plus the dialect facts goclaw's SQL needs."""

    def __init__(self, url: str, *, busy_timeout_seconds: float = 10.0) -> None:
        self.url = url
        if url.startswith("sqlite:"):
            self.dialect = "sqlite"
            self.path = _sqlite_path(url)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.peewee: peewee.Database = peewee.SqliteDatabase(
                str(self.path),
                pragmas=SQLITE_PRAGMAS,
                timeout=busy_timeout_seconds,
                # Every transaction takes the write lock up front: a
                # read-then-write transaction that upgrades later can deadlock.
                lock_type="IMMEDIATE",
            )
        elif url.startswith(("postgresql:", "postgres:")):
            self.dialect = "postgresql"
            self.path = None
            try:
                import psycopg  # noqa: F401
            except ImportError as exc:
                raise DatabaseError(
                    "PostgreSQL needs psycopg: pip install 'goclaw[postgres]'"
                ) from exc
            self.peewee = peewee.PostgresqlDatabase(
                url.replace("postgres://", "postgresql://", 1),
                prefer_psycopg3=True,
                connect_timeout=5,
            )
        else:
            raise DatabaseError(f"unsupported database URL: {url!r}")

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    def describe(self) -> str:
        """The URL without a password, for logs and status output."""
        return re.sub(r"://([^:@/]+):[^@/]*@", r"://\1:***@", self.url)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        if not self.is_sqlite:
            sql = _to_pyformat(sql)
        try:  # inline, not translate_errors(): this is the hot path
            return self.peewee.execute_sql(sql, params)
        except (peewee.PeeweeException, sqlite3.Error) as exc:
            raise DatabaseError(f"{self.describe()}: {exc}") from exc

    def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        return self.execute(sql, params).fetchall()

    def fetchone(self, sql: str, params: Sequence[Any] = ()) -> tuple | None:
        return self.execute(sql, params).fetchone()

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if not rows:
            return
        if not self.is_sqlite:
            sql = _to_pyformat(sql)
        with self.translate_errors():
            cursor = self.peewee.cursor()
            cursor.executemany(sql, rows)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """One atomic unit; on SQLite it holds the write lock from its first statement.

        Nested calls join the outer transaction rather than opening a
        savepoint: an error anywhere aborts the whole unit, which is what
        every caller wants, and a savepoint per broker call costs two
        statements on the hot path.
        """
        if self.peewee.in_transaction():
            yield
            return
        with self.translate_errors(), self.peewee.atomic():
            yield

    def after_commit(self, fn: Any) -> None:
        """Run ``fn`` once the current transaction commits (never on rollback)."""
        if self.peewee.in_transaction():
            self.peewee._state.commit_callbacks.append(fn)
        else:
            fn()

    def close(self) -> None:
        if not self.peewee.is_closed():
            self.peewee.close()

    @contextlib.contextmanager
    def translate_errors(self) -> Iterator[None]:
        try:
            yield
        except peewee.PeeweeException as exc:
            raise DatabaseError(f"{self.describe()}: {exc}") from exc
        except sqlite3.Error as exc:
            raise DatabaseError(f"{self.describe()}: {exc}") from exc
        except Exception as exc:
            if type(exc).__module__.startswith("psycopg"):
                raise DatabaseError(f"{self.describe()}: {exc}".strip()) from exc
            raise


@functools.lru_cache(maxsize=256)
def _to_pyformat(sql: str) -> str:
    return _PARAM.sub("%s", sql)


def _sqlite_path(url: str) -> Path:
    # sqlite:///relative.db, sqlite:////abs/path.db, or sqlite:/abs/path.db
    rest = url[len("sqlite:") :]
    if rest.startswith("///"):
        rest = rest[3:]  # four slashes leave an absolute path
    elif rest.startswith("//"):
        rest = rest[2:]
    if not rest:
        raise DatabaseError(f"{url!r} names no file")
    return Path(rest).expanduser()
