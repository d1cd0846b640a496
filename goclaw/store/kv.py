"""A small durable key-value table for Huey's auxiliary data (revocations, locks, counters).

The task lifecycle never touches it; it exists so Huey features that keep
flags in storage (``revoke``, ``lock_task``, chord counters) keep working.
"""

from __future__ import annotations

from goclaw.store.database import Database


class KeyValue:
    def __init__(self, db: Database, namespace: str) -> None:
        self.db = db
        self.namespace = namespace

    def put(self, key: str, value: bytes) -> None:
        with self.db.transaction():
            self.db.execute(
                "INSERT INTO kv (namespace, key, value) VALUES (?, ?, ?) "
                "ON CONFLICT (namespace, key) DO UPDATE SET value = excluded.value",
                (self.namespace, key, value),
            )

    def put_if_empty(self, key: str, value: bytes) -> bool:
        with self.db.transaction():
            row = self.db.fetchone(
                "INSERT INTO kv (namespace, key, value) VALUES (?, ?, ?) "
                "ON CONFLICT DO NOTHING RETURNING key",
                (self.namespace, key, value),
            )
        return row is not None

    def get(self, key: str) -> bytes | None:
        row = self.db.fetchone(
            "SELECT value FROM kv WHERE namespace = ? AND key = ?", (self.namespace, key)
        )
        return None if row is None else bytes(row[0])

    def get_many(self, keys: list[str]) -> dict[str, bytes]:
        if not keys:
            return {}
        marks = ", ".join("?" * len(keys))
        rows = self.db.fetchall(
            f"SELECT key, value FROM kv WHERE namespace = ? AND key IN ({marks})",
            (self.namespace, *keys),
        )
        return {k: bytes(v) for k, v in rows}

    def pop(self, key: str) -> bytes | None:
        # Most keys Huey asks about (revocation flags) are absent: read before
        # taking the write lock, so the common case costs no write transaction.
        if self.get(key) is None:
            return None
        with self.db.transaction():
            row = self.db.fetchone(
                "DELETE FROM kv WHERE namespace = ? AND key = ? RETURNING value",
                (self.namespace, key),
            )
        return None if row is None else bytes(row[0])

    def delete(self, key: str) -> bool:
        return self.pop(key) is not None

    def incr(self, key: str, amount: int = 1) -> int:
        with self.db.transaction():
            current = self.get(key)
            value = int(current or b"0") + amount
            self.put(key, str(value).encode())
        return value

    def items(self) -> dict[str, bytes]:
        rows = self.db.fetchall("SELECT key, value FROM kv WHERE namespace = ?", (self.namespace,))
        return {k: bytes(v) for k, v in rows}

    def is_empty(self) -> bool:
        row = self.db.fetchone("SELECT 1 FROM kv WHERE namespace = ? LIMIT 1", (self.namespace,))
        return row is None

    def size(self) -> int:
        row = self.db.fetchone("SELECT COUNT(*) FROM kv WHERE namespace = ?", (self.namespace,))
        return int(row[0])

    def flush(self) -> None:
        with self.db.transaction():
            self.db.execute("DELETE FROM kv WHERE namespace = ?", (self.namespace,))
