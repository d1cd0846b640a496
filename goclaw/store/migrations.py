"""Versioned, forward-only schema migrations recorded in a ledger.

Each migration is a numbered list of statements written once for both
dialects, with ``{serial_pk}`` and ``{double}`` filled in per dialect. The
``schema_migrations`` table records what ran. A database whose ledger names a
version this code does not know is refused: an older goclaw must never write
to a schema it does not understand.
"""

from __future__ import annotations

import dataclasses
import time

from goclaw.errors import SchemaTooNewError
from goclaw.store.database import Database

_TYPES = {
    "sqlite": {"serial_pk": "INTEGER PRIMARY KEY AUTOINCREMENT", "double": "REAL", "blob": "BLOB"},
    "postgresql": {
        "serial_pk": "BIGSERIAL PRIMARY KEY",
        "double": "DOUBLE PRECISION",
        "blob": "BYTEA",
    },
}


@dataclasses.dataclass(frozen=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "task lifecycle, events, workers, leaders, kv",
        (
            """CREATE TABLE tasks (
                id {serial_pk},
                kind TEXT NOT NULL,
                queue TEXT NOT NULL,
                payload TEXT NOT NULL,
                state TEXT NOT NULL,
                priority INTEGER NOT NULL DEFAULT 0,
                attempts INTEGER NOT NULL DEFAULT 0,
                max_attempts INTEGER NOT NULL,
                run_after {double} NOT NULL,
                idempotency_key TEXT UNIQUE,
                ref TEXT UNIQUE,
                lease_owner TEXT,
                lease_token INTEGER NOT NULL DEFAULT 0,
                lease_expires_at {double},
                error_streak INTEGER NOT NULL DEFAULT 0,
                last_error TEXT,
                reason TEXT,
                result TEXT,
                created_at {double} NOT NULL,
                updated_at {double} NOT NULL,
                finished_at {double}
            )""",
            # The claim reads this index in claim order and never sorts.
            """CREATE INDEX tasks_claim_order ON tasks (queue, priority DESC, run_after, id)
               WHERE state IN ('QUEUED', 'RETRY_WAIT')""",
            """CREATE INDEX tasks_lease_expiry ON tasks (lease_expires_at)
               WHERE state IN ('CLAIMED', 'RUNNING')""",
            # goclaw tasks --state, newest first; counts per state.
            "CREATE INDEX tasks_state ON tasks (state, id)",
            """CREATE TABLE task_events (
                id {serial_pk},
                task_id INTEGER NOT NULL REFERENCES tasks (id),
                type TEXT NOT NULL,
                from_state TEXT,
                to_state TEXT,
                at {double} NOT NULL,
                lease_token INTEGER,
                worker TEXT,
                detail TEXT
            )""",
            "CREATE INDEX task_events_task ON task_events (task_id, id)",
            """CREATE TABLE workers (
                id TEXT PRIMARY KEY,
                hostname TEXT NOT NULL,
                pid INTEGER NOT NULL,
                queue TEXT NOT NULL,
                concurrency INTEGER NOT NULL,
                started_at {double} NOT NULL,
                heartbeat_at {double} NOT NULL,
                stopped_at {double}
            )""",
            # Huey's auxiliary data (revocation flags, locks); never task state.
            """CREATE TABLE kv (
                namespace TEXT NOT NULL,
                key TEXT NOT NULL,
                value {blob} NOT NULL,
                PRIMARY KEY (namespace, key)
            )""",
            """CREATE TABLE leaders (
                role TEXT PRIMARY KEY,
                owner TEXT NOT NULL,
                expires_at {double} NOT NULL
            )""",
        ),
    ),
    Migration(
        2,
        "agent sessions, messages, tool effects, model calls, session-ordered events",
        (
            # One row per conversation. ``next_seq`` hands out the per-session
            # sequence numbers of both messages and agent events; taking them
            # with an UPDATE also serialises writers of one session.
            # ``summary`` stands in for every message with seq <= summary_upto.
            """CREATE TABLE sessions (
                key TEXT PRIMARY KEY,
                agent_id TEXT NOT NULL,
                next_seq INTEGER NOT NULL DEFAULT 1,
                summary TEXT,
                summary_upto INTEGER NOT NULL DEFAULT 0,
                created_at {double} NOT NULL,
                updated_at {double} NOT NULL
            )""",
            # The durable history: OpenAI-shaped messages, written once each.
            """CREATE TABLE session_messages (
                id {serial_pk},
                session_key TEXT NOT NULL REFERENCES sessions (key),
                seq INTEGER NOT NULL,
                task_id INTEGER NOT NULL,
                role TEXT NOT NULL,
                message TEXT NOT NULL,
                created_at {double} NOT NULL,
                UNIQUE (session_key, seq)
            )""",
            "CREATE INDEX session_messages_task ON session_messages (task_id, seq)",
            # Side-effecting tool calls, keyed by (task, tool-call id): a retry
            # replays a finished call's result and never repeats the effect.
            """CREATE TABLE tool_effects (
                task_id INTEGER NOT NULL,
                call_id TEXT NOT NULL,
                tool TEXT NOT NULL,
                arguments TEXT NOT NULL,
                state TEXT NOT NULL,
                result TEXT,
                started_at {double} NOT NULL,
                finished_at {double},
                PRIMARY KEY (task_id, call_id)
            )""",
            # Every model request: tokens, cost and latency per task, session,
            # agent and model (accounting, metrics, benchmarks).
            """CREATE TABLE model_calls (
                id {serial_pk},
                task_id INTEGER NOT NULL,
                session_key TEXT NOT NULL,
                agent_id TEXT NOT NULL,
                model TEXT NOT NULL,
                purpose TEXT NOT NULL,
                outcome TEXT NOT NULL,
                prompt_tokens INTEGER NOT NULL DEFAULT 0,
                completion_tokens INTEGER NOT NULL DEFAULT 0,
                cost {double} NOT NULL DEFAULT 0,
                latency_ms {double} NOT NULL,
                at {double} NOT NULL
            )""",
            "CREATE INDEX model_calls_task ON model_calls (task_id)",
            "CREATE INDEX model_calls_session ON model_calls (session_key)",
            # Agent events (run.started, chunk, tool.call, ...) share the task
            # event log; they carry their session and a per-session sequence.
            "ALTER TABLE task_events ADD COLUMN session_key TEXT",
            "ALTER TABLE task_events ADD COLUMN seq INTEGER",
            """CREATE UNIQUE INDEX task_events_session ON task_events (session_key, seq)
               WHERE session_key IS NOT NULL""",
        ),
    ),
    Migration(
        3,
        "session-bound tasks, event retention watermarks",
        (
            # A task that belongs to a session (an agent turn) writes its state
            # changes into the session's sequence too, so one cursor (the seq)
            # follows a whole conversation, commit-ordered on both dialects.
            "ALTER TABLE tasks ADD COLUMN session_key TEXT",
            """CREATE INDEX tasks_session ON tasks (session_key, state)
               WHERE session_key IS NOT NULL""",
            # Retention: the highest seq (per session) and event id (per task)
            # whose events were purged. A replay from below it is a gap.
            "ALTER TABLE sessions ADD COLUMN events_purged_upto BIGINT NOT NULL DEFAULT 0",
            "ALTER TABLE tasks ADD COLUMN events_purged_upto BIGINT NOT NULL DEFAULT 0",
        ),
    ),
    Migration(
        4,
        "tamper-evident audit log",
        (
            # Append-only, hash-chained (goclaw/audit.py). ``seq`` is handed out
            # by the writer under the head row's lock, so it has no gaps: a gap
            # is a deleted record. ``at`` is epoch seconds to the microsecond.
            """CREATE TABLE audit_log (
                seq BIGINT PRIMARY KEY,
                at {double} NOT NULL,
                agent TEXT NOT NULL,
                task_id BIGINT,
                session TEXT,
                capability TEXT NOT NULL,
                subject TEXT NOT NULL,
                decision TEXT NOT NULL,
                reason TEXT NOT NULL,
                policy_version TEXT NOT NULL,
                prev_hash TEXT NOT NULL,
                hash TEXT NOT NULL
            )""",
            "CREATE INDEX audit_log_task ON audit_log (task_id, seq)",
            "CREATE INDEX audit_log_at ON audit_log (at)",
            # One row: the chain's last seq and hash. Appenders lock it (FOR
            # UPDATE on PostgreSQL; SQLite's write lock), which serialises them
            # into one chain; it also exposes a deleted tail of the log.
            """CREATE TABLE audit_head (
                id INTEGER PRIMARY KEY CHECK (id = 1),
                seq BIGINT NOT NULL,
                hash TEXT NOT NULL
            )""",
            "INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, '" + "0" * 64 + "')",
        ),
    ),
    Migration(
        5,
        "durable approvals and allow-always rules",
        (
            # One row per gated tool call (goclaw/approvals.py). A turn that meets
            # an ``ask`` tool parks its task; the answer (or the deadline) wakes it.
            """CREATE TABLE approvals (
                id {serial_pk},
                task_id BIGINT NOT NULL REFERENCES tasks(id),
                call_id TEXT NOT NULL,
                agent TEXT NOT NULL,
                session_key TEXT,
                capability TEXT NOT NULL,
                subject TEXT NOT NULL,
                arguments TEXT NOT NULL,
                policy_version TEXT NOT NULL,
                state TEXT NOT NULL,
                scope TEXT,
                created_at {double} NOT NULL,
                expires_at {double} NOT NULL,
                decided_at {double},
                decided_by TEXT,
                note TEXT,
                UNIQUE (task_id, call_id)
            )""",
            "CREATE INDEX approvals_state ON approvals (state, expires_at)",
            # Allow-always: a human's standing yes to one (agent, capability, subject).
            """CREATE TABLE approval_rules (
                id {serial_pk},
                agent TEXT NOT NULL,
                capability TEXT NOT NULL,
                subject TEXT NOT NULL,
                created_at {double} NOT NULL,
                created_by TEXT NOT NULL,
                approval_id BIGINT,
                UNIQUE (agent, capability, subject)
            )""",
        ),
    ),
    Migration(
        6,
        "skill faults and quarantine",
        (
            # Every fault of a WASM skill (docs/skills.md, "Faults"), kept for `skill show`.
            """CREATE TABLE skill_faults (
                id {serial_pk},
                skill TEXT NOT NULL,
                code TEXT NOT NULL,
                message TEXT NOT NULL,
                task_id BIGINT,
                agent TEXT,
                at {double} NOT NULL
            )""",
            "CREATE INDEX skill_faults_by_skill ON skill_faults (skill, at)",
            # One row per skill that was ever quarantined; quarantined_at NULL: lifted.
            # Faults before lifted_at no longer count toward the next quarantine.
            """CREATE TABLE skill_quarantine (
                skill TEXT PRIMARY KEY,
                quarantined_at {double},
                reason TEXT,
                lifted_at {double},
                lifted_by TEXT
            )""",
        ),
    ),
    Migration(
        7,
        "schedules and their fires",
        (
            # One row per schedule: from config.yaml (source 'config'), from `goclaw cron
            # add` or ACP (source 'runtime'), or an agent's heartbeat (source 'heartbeat').
            # last_fire_at: the latest fire time handled (queued, caught up or skipped).
            """CREATE TABLE schedules (
                name TEXT PRIMARY KEY,
                source TEXT NOT NULL,
                spec TEXT NOT NULL,
                enabled INTEGER NOT NULL,
                created_at {double} NOT NULL,
                updated_at {double} NOT NULL,
                last_fire_at {double}
            )""",
            # What became of each fire time: its task, or that it was skipped (a window of
            # missed fires is one row, `missed` counts them). Unique per fire time.
            """CREATE TABLE schedule_fires (
                id {serial_pk},
                schedule TEXT NOT NULL,
                fire_at {double} NOT NULL,
                outcome TEXT NOT NULL,
                task_id BIGINT,
                missed INTEGER NOT NULL DEFAULT 0,
                recorded_at {double} NOT NULL,
                UNIQUE (schedule, fire_at)
            )""",
        ),
    ),
)

LATEST_VERSION = MIGRATIONS[-1].version

LEDGER_DDL = """CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    applied_at {double} NOT NULL
)"""


def current_version(db: Database) -> int:
    if not _ledger_exists(db):
        return 0
    row = db.fetchone("SELECT MAX(version) FROM schema_migrations")
    return int(row[0] or 0)


def migrate(db: Database, migrations: tuple[Migration, ...] = MIGRATIONS) -> list[int]:
    """Bring the schema up to date; return the versions applied now.

    Safe to call from several processes at once: each migration runs in a
    transaction that holds the write lock (SQLite) or an advisory lock
    (PostgreSQL) and re-reads the ledger first.
    """
    types = _TYPES[db.dialect]
    latest = migrations[-1].version
    applied: list[int] = []
    with db.transaction():
        _lock(db)
        db.execute(LEDGER_DDL.format(**types))
    for migration in migrations:
        with db.transaction():
            _lock(db)
            version = _refuse_newer(db, latest)
            if migration.version <= version:
                continue
            for statement in migration.statements:
                db.execute(statement.format(**types))
            db.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                (migration.version, migration.name, time.time()),
            )
            applied.append(migration.version)
    # Nothing pending: still refuse a schema from the future.
    _refuse_newer(db, latest)
    return applied


def _refuse_newer(db: Database, latest: int) -> int:
    version = current_version(db)
    if version > latest:
        raise SchemaTooNewError(
            f"the database at {db.describe()} has schema version {version}, "
            f"but this goclaw knows versions up to {latest}: upgrade goclaw "
            "(older code must not write to a newer schema)"
        )
    return version


def _lock(db: Database) -> None:
    if not db.is_sqlite:
        db.execute("SELECT pg_advisory_xact_lock(4242001)")


def _ledger_exists(db: Database) -> bool:
    if db.is_sqlite:
        sql = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
    else:
        sql = (
            "SELECT 1 FROM information_schema.tables "
            "WHERE table_schema = current_schema() AND table_name = 'schema_migrations'"
        )
    return db.fetchone(sql) is not None
