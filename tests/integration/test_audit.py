"""The tamper-evident audit log: a hash chain in the database and in a JSONL file.

Every kind of tampering the issue names (one byte changed, one record deleted,
two records swapped), in either copy, makes ``verify`` name the first bad
record; appends from two processes keep one chain; a file that lags the
database is its own condition and ``resync_file`` repairs it; the CLI queries
and exits 1 on a broken chain.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from goclaw.audit import AuditError, AuditLog
from goclaw.store.database import Database
from goclaw.store.migrations import migrate

N = 6


def entry(i: int, **over):
    fields = {
        "agent": f"agent-{i % 2}",
        "task_id": 100 + i % 3,
        "session": f"s-{i}",
        "capability": "exec",
        "subject": f"ls -la /tmp/{i}",
        "decision": "deny" if i % 2 else "allow",
        "reason": f"rule {i} matched",
        "policy_version": "7",
    }
    return {**fields, **over}


@pytest.fixture
def log(db, tmp_path) -> AuditLog:
    audit = AuditLog(db, tmp_path / "logs" / "audit.jsonl")
    for i in range(1, N + 1):
        audit.record(**entry(i))
    return audit


def lines(log: AuditLog) -> list[str]:
    return log.path.read_text().splitlines()


def write_lines(log: AuditLog, new: list[str]) -> None:
    log.path.write_text("".join(line + "\n" for line in new))


def only(report, source):
    [problem] = [p for p in report.problems if p.source == source]
    return problem


def test_records_chain_and_verify_intact(log):
    records = log.query(limit=None)
    assert [r.seq for r in records] == list(range(1, N + 1))
    assert records[0].prev_hash == "0" * 64
    for before, after in itertools.pairwise(records):
        assert after.prev_hash == before.hash
    assert [json.loads(line)["hash"] for line in lines(log)] == [r.hash for r in records]
    report = log.verify()
    assert report.ok, report.summary()
    assert (report.records, report.file_records) == (N, N)


def test_query_filters_by_task_and_time(log):
    assert {r.task_id for r in log.query(task_id=101)} == {101}
    assert [r.seq for r in log.query(task_id=101)] == [1, 4]
    late = log.record(**entry(9), at=time.time() + 3600)
    assert [r.seq for r in log.query(since=time.time() + 60)] == [late.seq]
    assert [r.seq for r in log.query(limit=2)] == [N, late.seq]


def test_record_inside_a_callers_transaction_writes_the_line_after_its_commit(log, db):
    with db.transaction():
        rec = log.record(**entry(N + 1))
        assert len(lines(log)) == N  # not before the commit
    assert json.loads(lines(log)[-1])["seq"] == rec.seq
    assert log.verify().ok


# -- one byte changed ------------------------------------------------------------


def test_db_row_with_one_byte_changed_is_named(log, db):
    db.execute("UPDATE audit_log SET subject = ? WHERE seq = 3", ("ls -la /tmp/4",))
    report = log.verify()
    assert not report.ok
    first = report.first_bad
    assert (first.source, first.kind, first.seq) == ("database", "modified", 3)
    assert [p.source for p in report.problems] == ["database"]  # the file is intact


def test_file_line_with_one_byte_changed_is_named(log):
    text = lines(log)
    assert '"decision":"deny"' in text[2]
    text[2] = text[2].replace('"decision":"deny"', '"decision":"dena"')
    write_lines(log, text)
    first = log.verify().first_bad
    assert (first.source, first.kind, first.seq, first.line) == ("file", "modified", 3, 3)


def test_file_line_with_a_byte_that_breaks_the_json_is_named(log):
    raw = bytearray(log.path.read_bytes())
    second_line_start = raw.index(b"\n") + 1
    raw[second_line_start] = ord("[")
    log.path.write_bytes(bytes(raw))
    first = log.verify().first_bad
    assert (first.source, first.kind, first.line) == ("file", "modified", 2)


# -- one record deleted ----------------------------------------------------------


def test_deleted_record_is_named_in_both_copies(log, db):
    db.execute("DELETE FROM audit_log WHERE seq = 4")
    text = lines(log)
    del text[3]
    write_lines(log, text)
    report = log.verify()
    db_problem, file_problem = only(report, "database"), only(report, "file")
    assert (db_problem.kind, db_problem.seq) == ("deleted", 4)
    assert (file_problem.kind, file_problem.seq, file_problem.line) == ("deleted", 4, 4)
    assert report.first_bad == db_problem
    assert "seq 4 missing" in report.summary()


def test_deleted_last_record_is_caught_by_the_head(log, db):
    db.execute("DELETE FROM audit_log WHERE seq = ?", (N,))
    first = log.verify().first_bad
    assert (first.source, first.kind, first.seq) == ("database", "deleted", N)


# -- two records swapped ---------------------------------------------------------


def test_swapped_db_rows_are_named(log, db):
    columns = [
        "at",
        "agent",
        "task_id",
        "session",
        "capability",
        "subject",
        "decision",
        "reason",
        "policy_version",
        "prev_hash",
        "hash",
    ]
    two = db.fetchall(f"SELECT seq, {', '.join(columns)} FROM audit_log WHERE seq IN (2, 5)")
    rows = {row[0]: row[1:] for row in two}
    sets = ", ".join(f"{c} = ?" for c in columns)
    with db.transaction():
        db.execute(f"UPDATE audit_log SET {sets} WHERE seq = 2", (*rows[5],))
        db.execute(f"UPDATE audit_log SET {sets} WHERE seq = 5", (*rows[2],))
    report = log.verify()
    first = report.first_bad
    assert (first.source, first.kind, first.seq) == ("database", "reordered", 2)
    assert "seq 5" in first.detail
    assert [p.source for p in report.problems] == ["database"]


def test_swapped_file_lines_are_named(log):
    text = lines(log)
    text[1], text[4] = text[4], text[1]
    write_lines(log, text)
    first = log.verify().first_bad
    assert (first.source, first.kind, first.seq, first.line) == ("file", "reordered", 2, 2)
    assert "line 5" in first.detail


# -- the file lags the database --------------------------------------------------


def test_file_behind_the_database_is_distinct_and_resync_repairs_it(log):
    text = lines(log)
    write_lines(log, text[:3])  # as if the process died after three commits
    with log.path.open("a") as f:
        f.write(text[3][:40])  # and in the middle of writing the fourth line
    first = log.verify().first_bad
    assert (first.source, first.kind, first.seq, first.line) == ("file", "file_behind", 4, 4)
    assert "cut short" in first.detail
    assert log.resync_file() == N - 3  # cuts the torn line, writes seq 4..N
    assert lines(log) == text
    assert log.verify().ok
    write_lines(log, text[:2])
    first = log.verify().first_bad
    assert (first.source, first.kind, first.seq, first.line) == ("file", "file_behind", 3, 3)
    assert log.resync_file() == N - 2
    assert lines(log) == text
    assert log.verify().ok


def test_next_record_catches_up_a_lagging_file(log):
    text = lines(log)
    write_lines(log, text[:2])
    rec = log.record(**entry(N + 1))
    assert [json.loads(line)["seq"] for line in lines(log)] == list(range(1, rec.seq + 1))
    assert log.verify().ok


def test_resync_refuses_a_tampered_file(log):
    text = lines(log)
    text[0], text[1] = text[1], text[0]
    write_lines(log, text)
    with pytest.raises(AuditError, match="not resyncing"):
        log.resync_file()


# -- concurrency -----------------------------------------------------------------


def _append_many(url: str, path: str, worker: int, count: int) -> None:
    db = Database(url)
    audit = AuditLog(db, path)
    for i in range(count):
        audit.record(**entry(i, agent=f"proc-{worker}", task_id=worker))
    db.close()


def test_two_processes_appending_keep_one_chain(database_url, db, tmp_path):
    path = str(tmp_path / "logs" / "audit.jsonl")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(database_url, path, w, 40)) for w in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    audit = AuditLog(db, path)
    report = audit.verify()
    assert report.ok, report.summary()
    assert (report.records, report.file_records) == (80, 80)
    agents = [r.agent for r in audit.query(limit=None)]
    assert agents.count("proc-1") == agents.count("proc-2") == 40


# -- the CLI ---------------------------------------------------------------------


def cli(home: Path, url: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "GOCLAW_DATABASE_URL": url, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    return subprocess.run(
        [sys.executable, "-m", "goclaw.cli", "--home", str(home), "audit", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_queries_and_verifies(database_url, tmp_path):
    home = tmp_path / "home"
    db = Database(database_url)
    migrate(db)
    audit = AuditLog(db, home / "logs" / "audit.jsonl")
    old = audit.record(**entry(1), at=time.time() - 7200)
    for i in range(2, 5):
        audit.record(**entry(i))

    out = cli(home, database_url, "--json")
    assert out.returncode == 0, out.stderr
    assert [r["seq"] for r in json.loads(out.stdout)] == [1, 2, 3, 4]
    out = cli(home, database_url, "--task", "101", "--json")
    assert [r["seq"] for r in json.loads(out.stdout)] == [1, 4]
    out = cli(home, database_url, "--since", "1h", "--json")
    assert [r["seq"] for r in json.loads(out.stdout)] == [2, 3, 4]
    from goclaw.records import iso

    out = cli(home, database_url, "--since", iso(old.at + 1), "--json")
    assert [r["seq"] for r in json.loads(out.stdout)] == [2, 3, 4]
    out = cli(home, database_url, "--task", "102")
    assert out.returncode == 0 and "rule 2 matched" in out.stdout

    out = cli(home, database_url, "verify")
    assert out.returncode == 0, out.stderr
    assert "4 records" in out.stdout

    db.execute("UPDATE audit_log SET reason = 'rule 2 matcheD' WHERE seq = 2")
    db.close()
    out = cli(home, database_url, "verify")
    assert out.returncode == 1
    assert "database record seq 2: modified" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    out = cli(home, database_url, "verify", "--json")
    assert out.returncode == 1
    report = json.loads(out.stdout)
    assert report["first_bad"]["seq"] == 2 and report["first_bad"]["kind"] == "modified"
