"""Versioned, forward-only migrations with a ledger; a newer schema is refused."""

from __future__ import annotations

import pytest

from goclaw.errors import SchemaTooNewError
from goclaw.store.database import Database
from goclaw.store.migrations import LATEST_VERSION, MIGRATIONS, Migration, current_version, migrate


def test_fresh_database_is_migrated_once(database_url):
    db = Database(database_url)
    assert current_version(db) == 0
    assert migrate(db) == [m.version for m in MIGRATIONS]
    assert migrate(db) == []
    assert current_version(db) == LATEST_VERSION
    rows = db.fetchall("SELECT version, name FROM schema_migrations ORDER BY version")
    assert [r[0] for r in rows] == [m.version for m in MIGRATIONS]
    db.close()


def test_a_new_migration_is_applied_forward(database_url):
    db = Database(database_url)
    migrate(db)
    extra = (
        *MIGRATIONS,
        Migration(
            LATEST_VERSION + 1, "add a column", ("ALTER TABLE workers ADD COLUMN note TEXT",)
        ),
    )
    assert migrate(db, extra) == [LATEST_VERSION + 1]
    db.execute("SELECT note FROM workers")
    db.close()


def test_newer_schema_is_refused_with_a_clear_message(database_url):
    db = Database(database_url)
    migrate(db)
    with db.transaction():
        db.execute(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
            (LATEST_VERSION + 5, "from the future", 0.0),
        )
    with pytest.raises(SchemaTooNewError, match=f"schema version {LATEST_VERSION + 5}.*upgrade"):
        migrate(db)
    db.close()


def test_sqlite_pragmas(sqlite_url):
    db = Database(sqlite_url)
    migrate(db)
    assert db.fetchone("PRAGMA journal_mode")[0] == "wal"
    assert db.fetchone("PRAGMA synchronous")[0] == 2  # FULL
    assert db.fetchone("PRAGMA foreign_keys")[0] == 1
    db.close()
