"""``goclaw bench skill``: what running a small skill in the wasmtime sandbox costs per call.

The skill is the bundled ``text_stats`` on a short text, its module compiled
once and then taken from the cache, as a worker runs it. Timed, interleaved
call by call so drift hits every variant alike:

* **python**: the same counting as a plain Python function (what a user would
  write as a built-in tool instead);
* **sandbox**: ``Sandbox.invoke`` alone: a fresh store and instance, the fuel,
  memory and deadline set, the input JSON in, the output JSON out;
* **tool**: the whole skill tool call through the registry (quarantine lookup
  in SQLite, then the sandbox), minus the policy check ``bench policy`` times.

Also measured once: compiling the module from scratch, and loading it from the
on-disk cache instead (what a restarted worker does).
"""

from __future__ import annotations

import contextlib
import os
import re
import statistics
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from goclaw.agent.tools import ToolContext, ToolError
from goclaw.bench import BenchError, _nearest_rank, run_per_call_bench
from goclaw.config import load_config
from goclaw.skills.discovery import BUNDLED_DIR
from goclaw.skills.manifest import read_manifest
from goclaw.skills.registry import SkillRegistry
from goclaw.skills.sandbox import Invocation, MemoryStore, Sandbox
from goclaw.store.database import Database
from goclaw.store.migrations import migrate

Progress = Callable[[str], None] | None
SKILL = "text_stats"
TEXT = "A durable queue keeps every turn: leased, retried and recorded.\nTwo lines."
VARIANTS = ("python", "sandbox", "tool")
#: A word, as text_stats counts them: a run of anything but the six ASCII whitespace characters.
WORD = re.compile(r"[^ \t\n\r\f\v]+")


def python_text_stats(text: str) -> dict[str, int]:
    """What ``text_stats`` answers, as a Python tool would compute it."""
    return {
        "bytes": len(text.encode()),
        "chars": len(text),
        "lines": text.count("\n") + (1 if text and not text.endswith("\n") else 0),
        "words": len(WORD.findall(text)),
    }


def run_skill_bench(
    *,
    calls: int = 2000,
    warmup: int = 100,
    workdir: str | os.PathLike[str] | None = None,
    progress: Progress = None,
) -> dict[str, Any]:
    return run_per_call_bench(
        "goclaw-bench-skill-", _run, calls=calls, warmup=warmup, workdir=workdir, progress=progress
    )


def _run(base: Path, calls: int, warmup: int, say: Callable[[str], None]) -> dict[str, Any]:
    home = base / "home"
    home.mkdir()
    (home / "config.yaml").write_text(
        yaml.safe_dump(
            {"skills": {"user_dir": str(base / "none"), "bundled_dir": str(BUNDLED_DIR)}}
        )
    )
    config = load_config(home, env={})
    manifest = read_manifest(BUNDLED_DIR / SKILL, config.skills)
    assert manifest.module is not None and manifest.limits is not None
    wasm = manifest.module.read_bytes()
    compile_ms, load_ms = _compile_and_load(home, wasm)
    say(f"compile {compile_ms:.2f} ms; from the cache {load_ms:.2f} ms")

    db = Database(f"sqlite:///{home / 'goclaw.db'}")
    with contextlib.closing(db):
        migrate(db)
        registry = SkillRegistry(config, db=db)
        live = registry.current().wasm[SKILL].live
        if live is None:
            raise BenchError(f"{SKILL} did not load: {registry.current().wasm[SKILL].rejection}")
        tool = registry.tools()[SKILL]
        ctx = ToolContext(workspace=base, agent_id="bench", task_id=1, session_key="")
        expected = python_text_stats(TEXT)
        sandbox = registry.sandbox

        def sandbox_call() -> Any:
            invocation = Invocation(
                skill=SKILL,
                capabilities=manifest.capabilities,
                ctx=ctx,
                store=MemoryStore(),
                fetch=lambda ctx, url: {},
                deadline=time.monotonic() + manifest.limits.timeout_seconds,
            )
            return sandbox.invoke(live, manifest.limits, {"text": TEXT}, invocation)

        runners: dict[str, Callable[[], Any]] = {
            "python": lambda: python_text_stats(TEXT),
            "sandbox": sandbox_call,
            "tool": lambda: tool.run(ctx, {"text": TEXT}),
        }
        say(f"{warmup} warm-up calls each way, then {calls} measured, alternating")
        samples: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for i in range(warmup + calls):
            shift = i % len(VARIANTS)
            for name in VARIANTS[shift:] + VARIANTS[:shift]:
                elapsed, answer = _timed(name, runners[name])
                if answer != expected:
                    raise BenchError(f"{name} answered {answer!r}, expected {expected!r}")
                if i >= warmup:
                    samples[name].append(elapsed)
    for values in samples.values():
        values.sort()
    p50 = {name: statistics.median(values) for name, values in samples.items()}
    result: dict[str, Any] = {"calls": calls, "warmup": warmup, "skill": SKILL}
    for name, values in samples.items():
        result[f"{name}_p50_us"] = round(p50[name], 2)
        result[f"{name}_p99_us"] = round(_nearest_rank(values, 0.99), 2)
    for name in ("sandbox", "tool"):
        result[f"{name}_added_p50_us"] = round(p50[name] - p50["python"], 2)
        result[f"{name}_ratio_p50"] = round(p50[name] / p50["python"], 1)
    result["target_p50_us"] = 1000
    result["compile_ms"] = round(compile_ms, 3)
    result["cache_load_ms"] = round(load_ms, 3)
    result["module_bytes"] = len(wasm)
    result["wasmtime"] = metadata.version("wasmtime")
    return result


def _compile_and_load(home: Path, wasm: bytes) -> tuple[float, float]:
    """Milliseconds to compile the module cold, and to load it from the disk cache."""
    cache = home / "bench-cache"
    started = time.perf_counter()
    Sandbox(cache).compile(wasm)
    compiled = time.perf_counter() - started
    started = time.perf_counter()
    loaded = Sandbox(cache).compile(wasm)  # a new process would hold a new engine too
    load = time.perf_counter() - started
    if not loaded.cached:
        raise BenchError("the second compile did not come from the cache")
    return compiled * 1000, load * 1000


def _timed(name: str, run: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter_ns()
    try:
        answer = run()
    except ToolError as exc:
        raise BenchError(f"{name} call failed: {exc}") from exc
    return (time.perf_counter_ns() - started) / 1000, answer


__all__ = ["python_text_stats", "run_skill_bench"]
