"""``goclaw bench policy``: what a policy check and its audit write add to one tool call.

Every tool call asks the policy engine first, and every decision is appended
to the audit log (a ``synchronous=FULL`` commit plus a JSON Lines write). One
run measures the same call, ``read_file`` on a small file through the real
``invoke``, three ways:

* **unchecked**: a policy hook that allows everything and records nothing
  (the call with checks disabled);
* **checked**: ``EnginePolicyHook`` without an audit log, so the decision only;
* **audited**: ``EnginePolicyHook`` with the real ``AuditLog``, the way a
  worker runs it.

The three alternate call by call, in a rotating order, so disk and CPU drift
hit all of them alike; the added cost is the difference of the medians. The
bare ``Policy.decide`` is timed too, for reference (pure, no I/O). At the end
the audit chain is verified, both copies, and its records counted.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from goclaw.agent.policy_hook import EnginePolicyHook
from goclaw.agent.tools import (
    AllowListedTools,
    PolicyHook,
    Tool,
    ToolContext,
    ToolError,
    get_tool,
    invoke,
)
from goclaw.audit import AuditLog
from goclaw.bench import BenchError, _nearest_rank, probe_fsync, run_per_call_bench
from goclaw.policy import Policy, parse_policy
from goclaw.store.database import Database
from goclaw.store.migrations import migrate

Progress = Callable[[str], None] | None

#: A policy as a deployment writes one: the built-in tools, some hosts, the workspace,
#: and the benchmark's agent narrowed by its own section (so the lookup goes through it).
POLICY_TEXT = """\
version: 1
allow:
  - tools.read_file
  - tools.write_file
  - tools.list_dir
  - tools.exec
  - tools.web_fetch
  - net.http
  - acp.read
  - acp.mutate
domains:
  - api.example.com
  - .example.org
paths:
  - .
agents:
  bench:
    allow: [tools.read_file, tools.list_dir, acp.read]
    domains: [api.example.com]
    paths: [notes, .]
"""
AGENT = "bench"
SUBJECT = "small.txt"
SMALL_TEXT = "A durable queue keeps every turn: leased, retried and recorded.\n"
#: Call with checks disabled, policy decision only, decision plus audit append.
VARIANTS = ("unchecked", "checked", "audited")


class AllowAll(AllowListedTools):
    """Checks disabled: every capability passes and nothing is recorded."""

    def __init__(self) -> None:
        super().__init__(())

    def check(self, ctx: ToolContext, capability: str, subject: str) -> None:
        return None


def run_policy_bench(
    *,
    calls: int = 2000,
    warmup: int = 100,
    workdir: str | os.PathLike[str] | None = None,
    progress: Progress = None,
) -> dict[str, Any]:
    """Time the three variants interleaved; the figures as one flat dict (``--json``)."""
    return run_per_call_bench(
        "goclaw-bench-policy-", _run, calls=calls, warmup=warmup, workdir=workdir, progress=progress
    )


def _run(base: Path, calls: int, warmup: int, say: Callable[[str], None]) -> dict[str, Any]:
    home = base / "home"
    workspace = base / "workspace"
    workspace.mkdir(parents=True)
    (workspace / SUBJECT).write_text(SMALL_TEXT)
    fsync_before = probe_fsync(base / "fsync-probe.db")
    say(f"fsync probe: {fsync_before:.3f} ms per synchronous=FULL commit")
    policy = parse_policy(POLICY_TEXT, "bench-policy.yaml")
    db = Database(f"sqlite:///{home / 'goclaw.db'}")
    with contextlib.closing(db):
        migrate(db)
        audit = AuditLog(db, home / "logs" / "audit.jsonl")
        hooks: dict[str, PolicyHook] = {
            "unchecked": AllowAll(),
            "checked": EnginePolicyHook(policy, audit=None),
            "audited": EnginePolicyHook(policy, audit=audit),
        }
        contexts = {name: _context(workspace, hook) for name, hook in hooks.items()}
        tool = get_tool("read_file", ["read_file"])
        say(f"{warmup} warm-up calls each way, then {calls} measured, alternating")
        samples: dict[str, list[float]] = {name: [] for name in VARIANTS}
        decide_us: list[float] = []
        for i in range(warmup + calls):
            shift = i % len(VARIANTS)
            for name in VARIANTS[shift:] + VARIANTS[:shift]:
                elapsed = _timed_call(name, tool, contexts[name])
                if i >= warmup:
                    samples[name].append(elapsed)
            elapsed = _timed_decide(policy, contexts["checked"])
            if i >= warmup:
                decide_us.append(elapsed)
        row = db.fetchone("SELECT COUNT(*) FROM audit_log")
        audit_records = int(row[0]) if row else 0
        report = audit.verify()
        say(report.summary())
    fsync_after = probe_fsync(base / "fsync-probe.db")
    for values in (*samples.values(), decide_us):
        values.sort()
    p50 = {name: statistics.median(values) for name, values in samples.items()}
    result: dict[str, Any] = {"calls": calls, "warmup": warmup}
    for name, values in (*samples.items(), ("decide", decide_us)):
        result[f"{name}_p50_us"] = round(statistics.median(values), 2)
        result[f"{name}_p99_us"] = round(_nearest_rank(values, 0.99), 2)
    for name in ("checked", "audited"):
        result[f"{name}_added_p50_us"] = round(p50[name] - p50["unchecked"], 2)
        result[f"{name}_ratio_p50"] = round(p50[name] / p50["unchecked"], 2)
    result.update(
        {
            "audited_calls": warmup + calls,
            "audit_records": audit_records,
            "verified": report.ok,
            "verify_ms": round(report.seconds * 1000, 2),
            "policy_version": policy.version,
            "fsync_ms_before": round(fsync_before, 3),
            "fsync_ms_after": round(fsync_after, 3),
        }
    )
    return result


def _context(workspace: Path, hook: PolicyHook) -> ToolContext:
    return ToolContext(
        workspace=workspace, agent_id=AGENT, task_id=1, session_key="bench-policy", policy=hook
    )


def _timed_call(name: str, tool: Tool, ctx: ToolContext) -> float:
    """Microseconds of one ``invoke``; the result is checked outside the timing."""
    started = time.perf_counter_ns()
    try:
        result = invoke(tool, ctx, {"path": SUBJECT})
    except ToolError as exc:
        raise BenchError(f"{name} call failed: {exc}") from exc
    elapsed = (time.perf_counter_ns() - started) / 1000
    if result["content"] != SMALL_TEXT:
        raise BenchError(f"{name} call: unexpected content {result['content'][:80]!r}")
    return elapsed


def _timed_decide(policy: Policy, ctx: ToolContext) -> float:
    """Microseconds of the bare decision the hooks make (no hook, no audit)."""
    started = time.perf_counter_ns()
    decision = policy.decide(ctx.agent_id, "tools.read_file", SUBJECT, workspace=ctx.workspace)
    elapsed = (time.perf_counter_ns() - started) / 1000
    if not decision.allowed:
        raise BenchError(f"the bench policy denies the call: {decision.reason}")
    return elapsed


__all__ = ["AllowAll", "run_policy_bench"]
