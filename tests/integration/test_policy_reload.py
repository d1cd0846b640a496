"""Hot reload of policy.yaml on real files, and the tools' hook auditing every decision."""

from __future__ import annotations

import logging
import time

import pytest

from goclaw.agent.policy_hook import EnginePolicyHook
from goclaw.agent.tools import BUILTIN_TOOLS, ToolError, invoke
from goclaw.audit import AuditLog
from goclaw.policy import PolicyError, PolicyWatcher
from tests.tool_context import make_ctx

GOOD = "version: 1\nallow: [tools.read_file, acp.read]\npaths: [.]\n"
NARROWER = "version: 1\nallow: [acp.read]\n"
GARBAGE = "version: 1\nallow:\n  - acp.read\n  - tools.teleport\n"


def write(path, text: str) -> None:
    # Through a temporary file and a rename, as editors save: the stamp always moves.
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def wait_for(predicate, timeout: float = 1.0) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(0.02)
    raise AssertionError(f"not within {timeout} s")


def test_an_invalid_policy_at_startup_fails_naming_the_line(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(GARBAGE)
    with pytest.raises(PolicyError, match=r"policy\.yaml:4: allow\[1\]: unknown tool capability"):
        PolicyWatcher(path)


def test_a_missing_file_denies_everything_and_says_so(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="goclaw.policy"):
        watcher = PolicyWatcher(tmp_path / "policy.yaml")
    assert watcher.current().missing
    decision = watcher.current().decide("a", "acp.read")
    assert not decision.allowed and decision.reason.startswith("no policy file at ")
    assert "every capability is denied" in caplog.text


def test_reload_valid_edit_garbage_edit_and_fix(tmp_path, db, caplog):
    path = tmp_path / "policy.yaml"
    path.write_text(GOOD)
    audit = AuditLog(db, tmp_path / "audit.jsonl")

    def on_rejected(reason: str, version: str) -> None:
        audit.record(
            agent="-",
            task_id=None,
            session=None,
            capability="policy.reload",
            subject=str(path),
            decision="rejected",
            reason=reason,
            policy_version=version,
        )

    watcher = PolicyWatcher(path, on_rejected=on_rejected)
    first = watcher.current()
    assert first.decide("a", "tools.read_file", "x", workspace=tmp_path).allowed

    # A valid edit is in force within 1 s.
    write(path, NARROWER)
    wait_for(lambda: watcher.current().version != first.version)
    second = watcher.current()
    assert not second.decide("a", "tools.read_file", "x", workspace=tmp_path).allowed

    # Garbage keeps the previous policy, logs one warning naming the line, audits why.
    with caplog.at_level(logging.WARNING, logger="goclaw.policy"):
        write(path, GARBAGE)
        # last_error is only set by a check, and checks happen inside current().
        wait_for(lambda: watcher.current() is second and watcher.last_error is not None)
        for _ in range(3):
            time.sleep(0.2)
            assert watcher.current() is second
    warnings = [r.getMessage() for r in caplog.records if r.name == "goclaw.policy"]
    assert len(warnings) == 1
    assert "policy.yaml:4: allow[1]" in warnings[0]
    assert second.version in warnings[0]
    rows = db.fetchall(
        "SELECT capability, decision, reason, policy_version FROM audit_log ORDER BY seq"
    )
    assert len(rows) == 1
    capability, decision, reason, version = rows[0]
    assert (capability, decision, version) == ("policy.reload", "rejected", second.version)
    assert "policy.yaml:4: allow[1]: unknown tool capability 'tools.teleport'" in reason
    assert '"decision":"rejected"' in (tmp_path / "audit.jsonl").read_text()
    assert audit.verify().ok

    # Fixing it reloads again.
    write(path, GOOD)
    wait_for(lambda: watcher.current().version == first.version)
    assert watcher.last_error is None

    # Comments alone do not make a new version.
    write(path, "# hello\n" + GOOD)
    time.sleep(0.6)
    assert watcher.current().version == first.version


def test_deleting_the_file_denies_everything(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(GOOD)
    watcher = PolicyWatcher(path, check_interval=0.05)
    path.unlink()
    wait_for(lambda: watcher.current().missing)
    assert not watcher.current().decide("a", "acp.read").allowed


def test_the_hook_allows_and_denies_and_audits_both(tmp_path, db):
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "notes.txt").write_text("hi")
    (tmp_path / "secret.txt").write_text("no")
    path = tmp_path / "policy.yaml"
    path.write_text(GOOD)
    watcher = PolicyWatcher(path)
    audit = AuditLog(db, tmp_path / "audit.jsonl")
    ctx = make_ctx(workspace, EnginePolicyHook(watcher, audit))
    version = watcher.current().version

    assert invoke(BUILTIN_TOOLS["read_file"], ctx, {"path": "notes.txt"})
    with pytest.raises(ToolError) as denied_path:
        invoke(BUILTIN_TOOLS["read_file"], ctx, {"path": "../secret.txt"})
    assert denied_path.value.code == "policy_denied"
    assert "path allowlist" in denied_path.value.message
    with pytest.raises(ToolError) as denied_tool:
        invoke(BUILTIN_TOOLS["exec"], ctx, {"command": "ls"})
    assert denied_tool.value.code == "policy_denied"
    assert "tools.exec is not allowed" in denied_tool.value.message

    rows = db.fetchall(
        "SELECT agent, task_id, session, capability, subject, decision, policy_version "
        "FROM audit_log ORDER BY seq"
    )
    assert [tuple(r) for r in rows] == [
        ("tester", 1, "s", "tools.read_file", "notes.txt", "allow", version),
        ("tester", 1, "s", "tools.read_file", "../secret.txt", "deny", version),
        ("tester", 1, "s", "tools.exec", "ls", "deny", version),
    ]
    assert audit.verify().ok


def test_the_hook_without_an_audit_log_still_decides(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(NARROWER)
    hook = EnginePolicyHook(PolicyWatcher(path))
    ctx = make_ctx(tmp_path, hook)
    hook.check(ctx, "acp.read", "")
    with pytest.raises(ToolError, match="policy_denied"):
        hook.check(ctx, "net.http", "https://example.com/")
