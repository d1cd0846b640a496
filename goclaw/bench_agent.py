"""``goclaw bench agent``: what goclaw adds to a model call, measured in one run.

A user who does not use goclaw calls LiteLLM directly. One run therefore
measures, against the same fake model server (``goclaw dev fake-llm`` in its
own process, streaming the same reply every time):

* **direct**: ``litellm.completion(..., stream=True)`` from this process,
  as most code calls it, the stream read to the end;
* **goclaw**: the same request as a one-iteration agent turn: submit, the
  doorbell, a real ``goclaw worker`` claiming under a lease, the session
  history read and written, the run's events (coalesced chunks included)
  committed, and the task reported, all with ``synchronous=FULL``.

The two alternate turn by turn, so disk and CPU drift hit both alike. The
added latency is the difference of the medians. The worker's own figures
(task created to finished, minus the model call it recorded) give the same
overhead from the server's side. Also reported: the worker's RSS at idle
and after the turns, and what durable streaming cost per turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from goclaw.bench import (
    BenchError,
    GoclawWorker,
    Subprocess,
    _goclaw_env,
    _nearest_rank,
    _open_bench_broker,
    probe_fsync,
    rss_kb,
)

Progress = Callable[[str], None] | None

#: The reply every request gets: about 75 tokens, streamed in 6-character chunks.
REPLY = (
    "A durable queue keeps every turn: it is leased, retried and recorded, and the reply "
    "streams to whoever follows the session, live or later, in order and without gaps."
)
PROMPT = "Say something about durable queues."
#: Pause between measurements, so one side's background work (LiteLLM's post-call
#: logging threads, on 2 cores) does not land in the other side's time.
SETTLE_SECONDS = 0.05
SYSTEM = "You are a helpful assistant."
MODEL = "openai/bench"


def run_agent_bench(
    *, turns: int = 100, warmup: int = 5, workdir: str | None = None, progress: Progress = None
) -> dict[str, Any]:
    say = progress or (lambda message: None)
    base = Path(workdir or tempfile.mkdtemp(prefix="goclaw-bench-agent-"))
    home = base / "home"
    home.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    api_base = f"http://127.0.0.1:{port}/v1"
    script = base / "script.yaml"
    script.write_text(
        yaml.safe_dump({"replies": [{"content": REPLY, "chunk_size": 6}], "repeat_last": True})
    )
    (home / "config.yaml").write_text(
        yaml.safe_dump(
            {
                "agents": {"bench": {"model": MODEL, "system_prompt": SYSTEM}},
                "models": {MODEL: {"api_base": api_base}},
            }
        )
    )
    env = _goclaw_env(home)
    fsync_before = probe_fsync(base / "fsync-probe.db")
    server_cmd = [sys.executable, "-m", "goclaw.cli", "dev", "fake-llm", "--port", str(port)]
    server_cmd += ["--script", str(script)]
    with Subprocess("fake-llm", server_cmd, env, base, base / "fake-llm.log") as server:
        server.wait_for(lambda: _answers(api_base), 30, "fake-llm start-up", poll=0.05)
        broker = _open_bench_broker(home, env)
        with (
            contextlib.closing(broker),
            GoclawWorker(home, env, 1, base / "worker.log", 60.0) as worker,
        ):
            worker.wait_live(broker)
            assert worker.proc is not None
            pid = worker.proc.pid
            rss_idle = rss_kb(pid)  # wait_live waited for it to settle
            litellm = _import_litellm()
            say(f"{warmup} warm-up turns each way, then {turns} measured, alternating")
            direct_ms: list[float] = []
            goclaw_ms: list[float] = []
            task_ids: list[int] = []
            for i in range(warmup + turns):
                direct = _direct_call(litellm, api_base)
                time.sleep(SETTLE_SECONDS)
                elapsed, task_id = _goclaw_turn(broker, worker, i)
                time.sleep(SETTLE_SECONDS)
                if i >= warmup:
                    direct_ms.append(direct)
                    goclaw_ms.append(elapsed)
                    task_ids.append(task_id)
            rss_after = rss_kb(pid)
            server_side = [_server_overhead_ms(broker, t) for t in task_ids]
            streaming = [_run_stats(broker, t) for t in task_ids]
            deltas = round(statistics.mean(s["deltas"] for s in streaming))
            say(f"the same {deltas} deltas a turn, one durable write each (no coalescing)")
            uncoalesced = _per_delta_writes_ms(broker, deltas, rounds=10)
    _close_implicit_loop()
    fsync_after = probe_fsync(base / "fsync-probe.db")
    for samples in (direct_ms, goclaw_ms, server_side):
        samples.sort()
    p50_direct = statistics.median(direct_ms)
    p50_goclaw = statistics.median(goclaw_ms)
    return {
        "turns": turns,
        "direct_p50_ms": round(p50_direct, 2),
        "direct_p90_ms": round(_nearest_rank(direct_ms, 0.9), 2),
        "goclaw_p50_ms": round(p50_goclaw, 2),
        "goclaw_p90_ms": round(_nearest_rank(goclaw_ms, 0.9), 2),
        "added_p50_ms": round(p50_goclaw - p50_direct, 2),
        "added_target_ms": 10.0,
        "worker_overhead_p50_ms": round(statistics.median(server_side), 2),
        "worker_overhead_p90_ms": round(_nearest_rank(server_side, 0.9), 2),
        "ratio_p50": round(p50_goclaw / p50_direct, 2),
        "chunk_deltas_per_turn": round(statistics.mean(s["deltas"] for s in streaming), 1),
        "event_writes_per_turn": round(statistics.mean(s["event_writes"] for s in streaming), 1),
        "event_write_ms_per_turn": round(
            statistics.mean(s["event_write_ms"] for s in streaming), 3
        ),
        "uncoalesced_write_ms_per_turn": round(uncoalesced, 3),
        "worker_rss_idle_mb": round(rss_idle / 1024, 1),
        "worker_rss_after_mb": round(rss_after / 1024, 1),
        "fsync_ms_before": round(fsync_before, 3),
        "fsync_ms_after": round(fsync_after, 3),
        "workdir": str(base),
    }


def _direct_call(litellm: Any, api_base: str) -> float:
    started = time.perf_counter()
    stream = litellm.completion(
        model=MODEL,
        api_base=api_base,
        api_key="bench",
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}],
        stream=True,
        stream_options={"include_usage": True},
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    if text != REPLY:
        raise BenchError(f"direct call: unexpected reply {text[:80]!r}")
    return (time.perf_counter() - started) * 1000


def _goclaw_turn(broker: Any, worker: GoclawWorker, index: int) -> tuple[float, int]:
    from goclaw.agent.turns import submit_turn

    started = time.perf_counter()
    submitted, _ = submit_turn(
        broker, agent="bench", prompt=PROMPT, session=f"bench-{os.getpid()}-{index}"
    )
    task_id = submitted.task_id

    def done() -> bool:
        row = broker.db.fetchone("SELECT state FROM tasks WHERE id = ?", (task_id,))
        if row and row[0] in ("FAILED", "DEAD_LETTER", "CANCELED", "RETRY_WAIT"):
            raise BenchError(f"goclaw turn {task_id} ended {row[0]}:\n{worker.tail()}")
        return bool(row) and row[0] == "SUCCEEDED"

    worker.wait_for(done, 60, f"goclaw turn {task_id}", poll=0.001)
    elapsed = (time.perf_counter() - started) * 1000
    result = json.loads(broker.get(task_id).result)
    if result["reply"] != REPLY:
        raise BenchError(f"goclaw turn {task_id}: unexpected reply {result['reply'][:80]!r}")
    return elapsed, task_id


def _per_delta_writes_ms(broker: Any, deltas: int, rounds: int) -> float:
    """Median ms a turn would spend if every token delta were its own durable event."""
    from goclaw.agent.events import RunEvents
    from goclaw.agent.sessions import SessionStore

    sessions = SessionStore(broker.db)
    sessions.ensure("bench-uncoalesced", "bench")
    [task] = broker.submit("noop", {})
    times = []
    for _ in range(rounds):
        events = RunEvents(
            broker.db,
            sessions,
            task_id=task.task_id,
            session_key="bench-uncoalesced",
            coalesce_seconds=0.0,
            coalesce_chars=1,
        )
        for i in range(deltas):
            events.chunk(REPLY[i % len(REPLY)], reply=0)
        times.append(events.write_seconds * 1000)
    return statistics.median(times)


def _server_overhead_ms(broker: Any, task_id: int) -> float:
    """Created-to-finished on the worker's clock, minus the model call it recorded."""
    task = broker.get(task_id)
    row = broker.db.fetchone(
        "SELECT COALESCE(SUM(latency_ms), 0) FROM model_calls WHERE task_id = ?", (task_id,)
    )
    return (task.finished_at - task.created_at) * 1000 - float(row[0])


def _run_stats(broker: Any, task_id: int) -> dict[str, float]:
    [completed] = [e.data for e in broker.events(task_id) if e.type == "run.completed"]
    return {k: completed[k] for k in ("deltas", "event_writes", "event_write_ms")}


def _close_implicit_loop() -> None:
    """Close the event loop LiteLLM's sync streaming path leaves set on this thread.

    Left open, it is garbage once something else sets a loop, and collecting
    it warns ``unclosed event loop`` in whatever runs next.
    """
    policy = asyncio.get_event_loop_policy()
    # The loop set on this thread, read without creating one (get_event_loop() would).
    loop = getattr(getattr(policy, "_local", None), "_loop", None)
    if loop is not None and not loop.is_running() and not loop.is_closed():
        loop.close()
        policy.set_event_loop(None)


def _import_litellm() -> Any:
    """LiteLLM as a user gets it: its defaults, not goclaw's settings (``import_litellm``)."""
    import litellm

    return litellm


def _answers(api_base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_base}/models", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


__all__ = ["run_agent_bench"]
