"""The tamper-evident audit log: every policy decision and approval, hash-chained.

Each record is appended twice: to the ``audit_log`` table and to a JSON Lines
file (``$GOCLAW_HOME/logs/audit.jsonl``). Two copies in two places mean that
whoever edits one leaves the other to contradict them, and either copy alone
still proves its own integrity:

- ``seq`` numbers records 1, 2, 3, ... without gaps (a gap is a deletion);
- ``prev_hash`` is the previous record's ``hash`` (the first record's is 64
  zeros), so the order is bound into the chain;
- ``hash`` is SHA-256 over the canonical JSON (sorted keys, no spaces, UTF-8)
  of the record's fields, its ``seq`` and its ``prev_hash``. Changing any byte
  of a record changes its hash; fixing up that hash breaks the next record's
  ``prev_hash``.

``audit_head`` holds the last ``seq`` and ``hash``. Appenders serialise on it
(SQLite's write transaction; ``SELECT ... FOR UPDATE`` on PostgreSQL), so
several processes append to one chain and never fork it, and a deleted tail of
the table is caught by comparing the chain's end with the head.

The file is written only after the database commit. The database is the
authority: a record that the file has and the database lacks would claim a
decision that never durably happened, while the reverse is only a copy that is
behind. If the process dies between the commit and the write, the file lags
the database. ``verify`` reports that as its own condition (``file_behind``,
naming the first missing seq), any later ``record`` catches up (the appender
writes every line the file lacks, from the database, up to its own), and
``resync_file`` repairs it explicitly. The file is appended under an exclusive
``flock``, each line in one ``write``, and the appender first reads the file's
last seq, so lines land in seq order even when process B commits after A but
reaches the file first. A final line with no newline can only be a write cut
short by a crash; it is cut off and rewritten from the database. The file is
not fsynced: the database commit is (``synchronous=FULL``), and the file can
always be rebuilt from it; on PostgreSQL with workers on several machines each
host's file holds the lines that host's processes wrote and caught up on.

Limits: truncating the file's tail looks exactly like a crash before the write
(``file_behind``); ``verify`` holds both copies in memory (fine to millions of
records, not beyond).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import fcntl
import functools
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from goclaw.errors import GoclawError
from goclaw.records import iso
from goclaw.store.database import Database

log = logging.getLogger(__name__)

GENESIS = "0" * 64
#: Where the file copy lives, relative to ``$GOCLAW_HOME``.
AUDIT_FILE = Path("logs") / "audit.jsonl"

#: The fields a caller supplies, in the order of the table's columns.
FIELDS = (
    "agent",
    "task_id",
    "session",
    "capability",
    "subject",
    "decision",
    "reason",
    "policy_version",
)
_COLUMNS = "seq, at, " + ", ".join(FIELDS) + ", prev_hash, hash"
_PAGE = 5000


def audit_path(home: str | os.PathLike[str]) -> Path:
    """The audit log's file copy for a goclaw home (every process appends to this one)."""
    return Path(home) / AUDIT_FILE


class AuditError(GoclawError):
    """The audit log could not be used."""


@dataclasses.dataclass(frozen=True)
class AuditRecord:
    seq: int
    at: float
    agent: str
    task_id: int | None
    session: str | None
    capability: str
    subject: str
    decision: str
    reason: str
    policy_version: str
    prev_hash: str
    hash: str

    @classmethod
    def from_row(cls, row: tuple) -> AuditRecord:
        values = list(row)
        values[3] = None if values[3] is None else int(values[3])
        return cls(*values)

    def hashed_fields(self) -> dict[str, Any]:
        """What the hash covers: everything but the hash itself."""
        return {
            "seq": self.seq,
            "at_us": _micros(self.at),
            **{name: getattr(self, name) for name in FIELDS},
            "prev_hash": self.prev_hash,
        }

    def compute_hash(self) -> str:
        return chain_hash(self.hashed_fields())

    def line(self) -> str:
        """The JSONL line (no newline): exactly the stored fields, sorted keys."""
        return _canonical(dataclasses.asdict(self))

    def as_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "time": iso(self.at)}


@dataclasses.dataclass(frozen=True)
class Problem:
    """The first bad record of one copy, and why."""

    #: ``database`` or ``file``.
    source: str
    #: ``modified``, ``deleted``, ``reordered``, ``file_behind``, ``diverged``.
    kind: str
    #: The seq the chain expected at this point.
    seq: int
    #: The file's line number (1-based); None for the database.
    line: int | None
    detail: str

    def message(self, file_name: str = "the file") -> str:
        where = (
            f"database record seq {self.seq}"
            if self.source == "database"
            else f"{file_name} line {self.line} (seq {self.seq})"
        )
        return f"{where}: {self.kind}: {self.detail}"

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    #: Records in the database chain and lines in the file.
    records: int
    file_records: int
    file_path: str
    #: At most one per copy (its first bad record), the database's first.
    problems: tuple[Problem, ...]
    seconds: float

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first_bad(self) -> Problem | None:
        return self.problems[0] if self.problems else None

    def summary(self) -> str:
        if self.ok:
            return f"audit log intact: {self.records} records in the database and {self.file_path}"
        return "; ".join(p.message(self.file_path) for p in self.problems)

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "records": self.records,
            "file_records": self.file_records,
            "file": self.file_path,
            "problems": [p.as_json() for p in self.problems],
            "first_bad": self.first_bad.as_json() if self.first_bad else None,
            "message": self.summary(),
            "seconds": round(self.seconds, 4),
        }


def chain_hash(fields: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical(fields).encode()).hexdigest()


class AuditLog:
    """Append, query and verify the audit log (the database is migrated already)."""

    def __init__(self, db: Database, jsonl_path: str | os.PathLike[str]) -> None:
        self.db = db
        self.path = Path(jsonl_path)

    # -- writing ---------------------------------------------------------------

    def record(
        self,
        *,
        agent: str,
        task_id: int | None,
        session: str | None,
        capability: str,
        subject: str,
        decision: str,
        reason: str,
        policy_version: str | int,
        at: float | None = None,
    ) -> AuditRecord:
        """Append one record to the database, then to the file; return it.

        The head row's lock is held from reading the last hash to the commit,
        so concurrent appenders (threads or processes) take turns and each
        links to the one before. The file line follows the commit (see the
        module docstring for a crash in between). Called inside a caller's
        transaction, the record joins it and its line is written when that
        transaction commits (a failure then is logged: the commit has happened).
        """
        values = {
            "agent": _text("agent", agent),
            "task_id": None if task_id is None else int(task_id),
            "session": None if session is None else _text("session", session),
            "capability": _text("capability", capability),
            "subject": _text("subject", subject),
            "decision": _text("decision", decision),
            "reason": _text("reason", reason, allow_empty=True),
            "policy_version": _text("policy_version", str(policy_version)),
        }
        when = _micros(time.time() if at is None else at) / 1_000_000
        joined = self.db.peewee.in_transaction()
        with self.db.transaction():
            lock = "" if self.db.is_sqlite else " FOR UPDATE"
            head = self.db.fetchone(f"SELECT seq, hash FROM audit_head WHERE id = 1{lock}")
            if head is None:
                raise AuditError("audit_head has no row: the database is not migrated")
            seq, prev = int(head[0]) + 1, head[1]
            draft = AuditRecord(seq=seq, at=when, prev_hash=prev, hash="", **values)
            rec = dataclasses.replace(draft, hash=draft.compute_hash())
            self.db.execute(
                f"INSERT INTO audit_log ({_COLUMNS}) VALUES ({', '.join('?' * 12)})",
                dataclasses.astuple(rec),
            )
            self.db.execute(
                "UPDATE audit_head SET seq = ?, hash = ? WHERE id = 1", (rec.seq, rec.hash)
            )
        if joined:
            self.db.after_commit(functools.partial(self._append_logged, rec))
            return rec
        try:
            self._append_through(rec.seq, rec)
        except (AuditError, OSError) as exc:
            raise AuditError(
                f"audit seq {rec.seq} is committed to the database but not to {self.path}: {exc}"
            ) from exc
        return rec

    def _append_logged(self, rec: AuditRecord) -> None:
        try:
            self._append_through(rec.seq, rec)
        except (AuditError, OSError) as exc:
            log.error("audit seq %s committed but not written to %s: %s", rec.seq, self.path, exc)

    def resync_file(self) -> int:
        """Append the lines the file lacks (after a crash between commit and write).

        Returns how many lines were written. Only a file that is a correct
        prefix of the database is extended: anything else is tampering that
        ``verify`` names, and is left as evidence.
        """
        report = self.verify()
        bad = [p for p in report.problems if p.kind != "file_behind"]
        if bad:
            raise AuditError(
                f"not resyncing: {bad[0].message(str(self.path))} (only a file that is "
                "behind the database is repaired)"
            )
        if report.ok:
            return 0
        head = self.db.fetchone("SELECT seq FROM audit_head WHERE id = 1")
        return self._append_through(int(head[0]) if head else 0)

    def _append_through(self, seq: int, own: AuditRecord | None = None) -> int:
        """Under the file lock, write every line from the file's last seq up to ``seq``."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            last = _cut_torn_tail_and_read_last_seq(fd)
            if last >= seq:
                return 0  # another appender already wrote it
            if own is not None and last == seq - 1:
                pending = [own]
            else:
                pending = list(self._iter_records(after=last, upto=seq))
            if pending:
                os.write(fd, "".join(r.line() + "\n" for r in pending).encode())
            return len(pending)
        finally:
            os.close(fd)  # releases the flock

    # -- reading ---------------------------------------------------------------

    def query(
        self,
        task_id: int | None = None,
        since: float | None = None,
        limit: int | None = 1000,
    ) -> list[AuditRecord]:
        """Records oldest first; with ``limit``, the newest ``limit`` that match."""
        where, params = [], []
        if task_id is not None:
            where.append("task_id = ?")
            params.append(int(task_id))
        if since is not None:
            where.append("at >= ?")
            params.append(float(since))
        sql = f"SELECT {_COLUMNS} FROM audit_log"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq DESC"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        rows = self.db.fetchall(sql, params)
        return [AuditRecord.from_row(row) for row in reversed(rows)]

    def _iter_records(self, *, after: int = 0, upto: int | None = None) -> Iterator[AuditRecord]:
        cursor = after
        while True:
            sql = f"SELECT {_COLUMNS} FROM audit_log WHERE seq > ?"
            params: list[Any] = [cursor]
            if upto is not None:
                sql += " AND seq <= ?"
                params.append(upto)
            rows = self.db.fetchall(sql + " ORDER BY seq LIMIT ?", [*params, _PAGE])
            for row in rows:
                yield AuditRecord.from_row(row)
            if len(rows) < _PAGE:
                return
            cursor = int(rows[-1][0])

    # -- verifying -------------------------------------------------------------

    def verify(self) -> VerifyReport:
        """Check both copies; name the first bad record of each.

        The database chain is checked on its own, then against the head row
        (a deleted tail); the file chain on its own, then record by record
        against the database (``diverged``), and finally for lag
        (``file_behind``: a correct prefix of the database, which
        ``resync_file`` repairs).
        """
        started = time.perf_counter()
        db_records = list(self._iter_records())
        head = self.db.fetchone("SELECT seq, hash FROM audit_head WHERE id = 1")
        problems: list[Problem] = []
        db_problem = _check_chain("database", [(None, r) for r in db_records])
        if db_problem is None and head is not None:
            db_problem = _check_head(db_records, int(head[0]), head[1])
        if db_problem:
            problems.append(db_problem)

        entries, torn = _read_file(self.path)
        file_problem = _check_chain("file", entries)
        if file_problem is None:
            upto = db_problem.seq - 1 if db_problem else None
            file_problem = _compare_with_database(entries, db_records, upto, torn)
        if file_problem:
            problems.append(file_problem)
        return VerifyReport(
            records=len(db_records),
            file_records=len(entries),
            file_path=str(self.path),
            problems=tuple(problems),
            seconds=time.perf_counter() - started,
        )


# -- chain checks ------------------------------------------------------------------

#: A file line: (line number, the record, or the reason it is not one).
_Entry = tuple[int | None, AuditRecord | str]


def _check_chain(source: str, entries: list[_Entry]) -> Problem | None:
    """Walk one copy in its stored order; the first record that breaks the chain."""
    seqs = {rec.seq: i for i, (_, rec) in enumerate(entries) if isinstance(rec, AuditRecord)}
    expected_seq, expected_prev = 1, GENESIS
    for index, (line, rec) in enumerate(entries):
        problem = functools.partial(Problem, source, seq=expected_seq, line=line)
        if isinstance(rec, str):
            return problem(kind="modified", detail=rec)
        if rec.compute_hash() != rec.hash:
            moved = _moved_from(rec, entries, index)
            if moved is not None:
                return problem(
                    kind="reordered",
                    detail=f"holds the record of seq {moved} (records were swapped or moved)",
                )
            return problem(kind="modified", detail="its hash does not match its contents")
        if rec.seq != expected_seq:
            later = seqs.get(expected_seq)
            if later is not None and later > index:
                where = _where(source, entries[later][0], expected_seq)
                return problem(
                    kind="reordered",
                    detail=f"holds seq {rec.seq}; seq {expected_seq} comes later ({where})",
                )
            if rec.seq > expected_seq:
                missing = (
                    f"seq {expected_seq}"
                    if rec.seq == expected_seq + 1
                    else f"seq {expected_seq}..{rec.seq - 1}"
                )
                return problem(
                    kind="deleted", detail=f"{missing} missing; the next record is seq {rec.seq}"
                )
            return problem(
                kind="reordered", detail=f"holds seq {rec.seq} again (duplicated or moved back)"
            )
        if rec.prev_hash != expected_prev:
            return problem(
                kind="deleted",
                detail=f"prev_hash does not match seq {expected_seq - 1}'s hash: "
                "the record before it was removed or replaced",
            )
        expected_seq, expected_prev = rec.seq + 1, rec.hash
    return None


def _moved_from(rec: AuditRecord, entries: list[_Entry], index: int) -> int | None:
    """Whether a record that fails its own hash is another seq's record, moved here.

    Either the whole record moved under a different seq (its hash checks out
    with that seq), or only its fields moved (they match another position's
    seq and prev_hash). Searched only for the first bad record.
    """
    for i, (_, other) in enumerate(entries):
        if i == index or not isinstance(other, AuditRecord):
            continue
        if dataclasses.replace(rec, seq=other.seq).compute_hash() == rec.hash:
            return other.seq
        fields = dataclasses.replace(rec, seq=other.seq, prev_hash=other.prev_hash)
        if fields.compute_hash() == other.hash:
            return other.seq
    return None


def _check_head(records: list[AuditRecord], seq: int, hash_: str) -> Problem | None:
    last_seq = records[-1].seq if records else 0
    last_hash = records[-1].hash if records else GENESIS
    if last_seq == seq and last_hash == hash_:
        return None
    if last_seq < seq:
        gone = f"seq {last_seq + 1}" if seq == last_seq + 1 else f"seq {last_seq + 1}..{seq}"
        return Problem(
            "database",
            "deleted",
            last_seq + 1,
            None,
            f"{gone} missing at the end of the log (audit_head records seq {seq})",
        )
    return Problem(
        "database",
        "modified",
        seq + 1,
        None,
        f"the chain ends at seq {last_seq} but audit_head records seq {seq} "
        "(a record was added or changed behind the writer's back)",
    )


def _compare_with_database(
    entries: list[_Entry], db_records: list[AuditRecord], upto: int | None, torn: bool
) -> Problem | None:
    """A file whose own chain holds: does it agree with the database, or lag it?

    ``upto``: the database's last good seq when its chain is broken; past it
    the database's own problem is the finding, and the file is not judged by it.
    """
    db_ok = upto is None
    by_seq = {r.seq: r for r in db_records}
    for line, rec in entries:
        assert isinstance(rec, AuditRecord)  # _check_chain passed
        if not db_ok and rec.seq > upto:
            return None
        other = by_seq.get(rec.seq)
        if other is None:
            return Problem(
                "file",
                "diverged",
                rec.seq,
                line,
                f"the database has no record seq {rec.seq}: the database lost records",
            )
        if other.hash != rec.hash:
            return Problem(
                "file",
                "diverged",
                rec.seq,
                line,
                "differs from the database's record of the same seq",
            )
    first = len(entries) + 1
    if len(entries) < len(db_records) and db_ok:
        last = db_records[-1].seq
        span = f"seq {first}" if first == last else f"seq {first}..{last}"
        cut = ", the last line cut short" if torn else ""
        return Problem(
            "file",
            "file_behind",
            first,
            first,
            f"{span} committed to the database but not (fully) written to the file "
            f"(a crash between commit and write{cut}); `goclaw audit resync` appends them",
        )
    if torn:
        return Problem(
            "file", "modified", first, first, "an incomplete last line the database does not have"
        )
    return None


def _read_file(path: Path) -> tuple[list[_Entry], bool]:
    """The file's lines, and whether its last line was cut short (then left out).

    Only a final line with no newline that is not a record counts as cut
    short: every line is written whole with its newline in one ``write``.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], False
    lines = data.split(b"\n")
    last = lines.pop()  # b"" when the file ends with a newline
    entries: list[_Entry] = [(n, _parse_line(raw)) for n, raw in enumerate(lines, start=1)]
    if not last:
        return entries, False
    parsed = _parse_line(last)
    if isinstance(parsed, str):
        return entries, True
    return [*entries, (len(entries) + 1, parsed)], False


def _parse_line(raw: bytes) -> AuditRecord | str:
    try:
        obj = json.loads(raw.decode())
    except (UnicodeDecodeError, ValueError):
        return "the line is not valid JSON"
    names = [f.name for f in dataclasses.fields(AuditRecord)]
    if not isinstance(obj, dict) or sorted(obj) != sorted(names):
        return "the line does not have exactly the record's fields"
    try:
        rec = AuditRecord(**obj)
    except TypeError:
        return "the line does not have exactly the record's fields"
    if not isinstance(rec.seq, int) or not isinstance(rec.at, int | float):
        return "seq or at has the wrong type"
    if raw.decode() != rec.line():
        return "the line is not in canonical form (bytes were changed)"
    return rec


def _where(source: str, line: int | None, seq: int) -> str:
    return f"line {line}" if source == "file" else f"seq {seq}"


def _cut_torn_tail_and_read_last_seq(fd: int) -> int:
    """The seq of the file's last complete line (0 if none); cut a torn last line.

    Whole lines are written in one ``write``, so a last line without its
    newline is a write cut short by a crash; the database still has the record
    and the caller rewrites it.
    """
    size = os.lseek(fd, 0, os.SEEK_END)
    if size and os.pread(fd, 1, size - 1) != b"\n":
        size = _rfind_newline(fd, size) + 1
        os.ftruncate(fd, size)
    if size == 0:
        return 0
    start = _rfind_newline(fd, size - 1) + 1
    line = os.pread(fd, size - 1 - start, start)
    try:
        return int(json.loads(line)["seq"])
    except (ValueError, KeyError, TypeError):
        raise AuditError(
            "the last line of the audit file is not a record: run `goclaw audit verify`"
        ) from None


def _rfind_newline(fd: int, end: int) -> int:
    """The offset of the last newline before ``end``, or -1."""
    pos = end
    while pos > 0:
        step = min(65536, pos)
        pos -= step
        found = os.pread(fd, step, pos).rfind(b"\n")
        if found >= 0:
            return pos + found
    return -1


# -- helpers -----------------------------------------------------------------------


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _micros(at: float) -> int:
    """Times are kept to the microsecond, so a float read back hashes the same."""
    return round(float(at) * 1_000_000)


def _text(name: str, value: Any, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise AuditError(f"audit {name} must be a string, not {type(value).__name__}")
    if not value and not allow_empty:
        raise AuditError(f"audit {name} must not be empty")
    if "\x00" in value:
        raise AuditError(f"audit {name} must not contain NUL")
    return value


def parse_since(text: str) -> float:
    """An ISO timestamp (UTC when it names no zone) as epoch seconds."""
    parsed = dt.datetime.fromisoformat(text.strip())
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.timestamp()
