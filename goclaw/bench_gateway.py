"""``goclaw bench gateway``: what the gateway adds, and how it fans out, measured in one run.

Three measurements against one real ``goclaw gateway`` process on a fresh
home (SQLite, WAL, ``synchronous=FULL``):

* **Time to first token and total**, through the gateway and the queue:
  ``POST /v1/chat/completions`` with ``stream: true`` from the official
  ``openai`` client, to an agent run by a real ``goclaw worker``, against a
  direct ``litellm.completion(..., stream=True)`` to the same fake model
  server (``goclaw dev fake-llm`` in its own process, a paced stream). The
  two alternate request by request, so disk and CPU drift hit both alike.
  Each goclaw request is also split, from the event log's timestamps, into
  where its first token's time went.
* **Fan-out**: N WebSocket clients (one asyncio loop in this process), each
  subscribed over ACP to its own session, while a writer process appends
  ``chunk`` events with the real writer (``RunEvents``) at a steady rate,
  round-robin over the sessions. Delivery latency is the client's receive
  time minus the event's ``at`` (taken by the writer just before its commit).
  Every event must arrive, exactly once, in order.
* **Gateway RSS** (``/proc/<pid>/status`` VmRSS): idle after start-up,
  after the streamed requests, with every client subscribed, and after.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import secrets
import statistics
import sys
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
    bench_workdir,
    probe_fsync,
    process_cpu_seconds,
    rss_kb,
    settled_rss,
)
from goclaw.bench_agent import REPLY, _answers, _close_implicit_loop, _free_port, _import_litellm

Progress = Callable[[str], None] | None

MODEL = "openai/fake"
AGENT = "bench"
SYSTEM = "You are a helpful assistant."
PROMPT = "Say something about durable queues."
CHUNK_SIZE = 6
#: Pause between measurements, so one side's background work does not land in the other's.
SETTLE_SECONDS = 0.05
#: The issue's targets (reported beside the figures, never asserted).
TTFT_TARGET_MS = 25.0
FANOUT_P99_TARGET_MS = 100.0
RSS_TARGET_MB = 120.0
#: WebSocket connects (with their subscribe) in flight at once.
CONNECT_CONCURRENCY = 50
#: How long the fan-out waits for the last events once the writer has finished.
DRAIN_SECONDS = 20.0
START_TIMEOUT = 60.0
#: Gateway settings the bench overrides (one client IP opens every connection).
GATEWAY_ENV = {
    "GOCLAW_GATEWAY__RATE_LIMIT_PER_SECOND": "1000000",
    "GOCLAW_GATEWAY__RATE_LIMIT_BURST": "1000000",
}
#: What each fan-out event carries besides its number: about one coalesced chunk.
FANOUT_DELTA = "durable queues keep every turn, leased, retried and recorded. "


def run_gateway_bench(
    *,
    requests: int = 50,
    warmup: int = 5,
    clients: int = 1000,
    rate: float = 500.0,
    seconds: float = 10.0,
    chunk_delay_ms: float = 10.0,
    workdir: str | os.PathLike[str] | None = None,
    progress: Progress = None,
) -> dict[str, Any]:
    """Run all three measurements; the figures as one flat dict (``--json``)."""
    if requests < 1 or warmup < 0 or clients < 1 or rate <= 0 or seconds <= 0:
        raise ValueError("requests, clients, rate and seconds must be positive")
    say = progress or (lambda _message: None)
    with bench_workdir(workdir, "goclaw-bench-gateway-", say) as base:
        return _run(base, requests, warmup, clients, rate, seconds, chunk_delay_ms / 1000, say)


def _run(
    base: Path,
    requests: int,
    warmup: int,
    clients: int,
    rate: float,
    seconds: float,
    chunk_delay: float,
    say: Callable[[str], None],
) -> dict[str, Any]:
    say(f"bench dir {base}")
    nofile = _raise_nofile(2 * clients + 256)  # the gateway inherits it
    home = base / "home"
    home.mkdir(parents=True, exist_ok=True)
    fake_port, gateway_port = _free_port(), _free_port()
    api_base = f"http://127.0.0.1:{fake_port}/v1"
    gateway_url = f"http://127.0.0.1:{gateway_port}"
    script = base / "script.yaml"
    script.write_text(
        yaml.safe_dump(
            {
                "replies": [
                    {"content": REPLY, "chunk_size": CHUNK_SIZE, "chunk_delay": chunk_delay}
                ],
                "repeat_last": True,
            }
        )
    )
    (home / "config.yaml").write_text(
        yaml.safe_dump(
            {
                "agents": {AGENT: {"model": MODEL, "system_prompt": SYSTEM}},
                "models": {MODEL: {"api_base": api_base}},
            }
        )
    )
    # Clients may read and submit, as `goclaw init`'s policy lets them; each request is
    # judged and audited, so the figures include that.
    (home / "policy.yaml").write_text("version: 1\nallow: [acp.read, acp.mutate]\n")
    token = secrets.token_urlsafe(32)
    fd = os.open(home / "auth.token", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(token + "\n")
    env = {**_goclaw_env(home), **GATEWAY_ENV}
    if clients + 16 > 2000:  # gateway.max_connections' default
        env["GOCLAW_GATEWAY__MAX_CONNECTIONS"] = str(clients + 16)
    fsync_before = probe_fsync(base / "fsync-probe.db")
    say(f"fsync probe: {fsync_before:.3f} ms per synchronous=FULL commit")
    broker = _open_bench_broker(home, env)  # migrates before any child opens the database
    fake_cmd = [sys.executable, "-m", "goclaw.cli", "dev", "fake-llm", "--port", str(fake_port)]
    fake_cmd += ["--script", str(script)]
    gateway_cmd = [sys.executable, "-m", "goclaw.cli", "--home", str(home), "gateway"]
    gateway_cmd += ["--host", "127.0.0.1", "--port", str(gateway_port)]
    result: dict[str, Any] = {}
    with (
        contextlib.closing(broker),
        Subprocess("fake-llm", fake_cmd, env, base, base / "fake-llm.log") as fake,
        Subprocess("goclaw gateway", gateway_cmd, env, base, base / "gateway.log") as gateway,
    ):
        assert gateway.proc is not None
        gateway_pid = gateway.proc.pid
        fake.wait_for(lambda: _answers(api_base), START_TIMEOUT, "fake-llm start-up", poll=0.05)
        gateway.wait_for(
            lambda: _healthy(gateway_url), START_TIMEOUT, "gateway start-up", poll=0.05
        )
        rss_idle = settled_rss(gateway_pid)
        say(f"gateway idle RSS {rss_idle / 1024:.1f} MB")
        with GoclawWorker(home, env, 1, base / "worker.log", START_TIMEOUT) as worker:
            worker.wait_live(broker)
            say(
                f"{warmup} warm-up requests each way, then {requests} measured, alternating "
                f"(direct LiteLLM, then through the gateway)"
            )
            streamed = _measure_streaming(
                broker, worker, gateway_url, token, api_base, requests, warmup
            )
        _close_implicit_loop()
        rss_after_streaming = rss_kb(gateway_pid)
        result.update({"chunk_delay_ms": round(chunk_delay * 1000, 3), **streamed})
        say(f"fan-out: {clients} WebSocket clients, {rate:g} events/s for {seconds:g} s")
        fanout = asyncio.run(
            _fan_out(broker, gateway, home, env, base, gateway_url, token, clients, rate, seconds)
        )
        rss_subscribed = fanout.pop("_rss_subscribed_kb")
        rss_after_events = fanout.pop("_rss_after_events_kb")
        result.update(fanout)
        time.sleep(1.0)
        rss_after = rss_kb(gateway_pid)
        result.update(
            {
                "gateway_rss_idle_mb": _mb(rss_idle),
                "gateway_rss_target_mb": RSS_TARGET_MB,
                "gateway_rss_after_streaming_mb": _mb(rss_after_streaming),
                "gateway_rss_subscribed_mb": _mb(rss_subscribed),
                "gateway_rss_after_fanout_mb": _mb(rss_after_events),
                "gateway_rss_after_close_mb": _mb(rss_after),
            }
        )
    fsync_after = probe_fsync(base / "fsync-probe-end.db")
    result.update(
        {
            "fsync_ms_before": round(fsync_before, 3),
            "fsync_ms_after": round(fsync_after, 3),
            "nofile_limit": nofile,
            "notes": _notes(clients, rate, seconds, chunk_delay, env),
        }
    )
    return result


# -- time to first token ------------------------------------------------------------


def _measure_streaming(
    broker: Any,
    worker: GoclawWorker,
    gateway_url: str,
    token: str,
    api_base: str,
    requests: int,
    warmup: int,
) -> dict[str, Any]:
    from openai import OpenAI

    litellm = _import_litellm()
    client = OpenAI(base_url=f"{gateway_url}/v1", api_key=token, max_retries=0, timeout=60.0)
    direct: list[tuple[float, float]] = []
    through: list[dict[str, float]] = []
    try:
        for i in range(warmup + requests):
            d = _direct_stream(litellm, api_base)
            time.sleep(SETTLE_SECONDS)
            worker.check()
            g = _gateway_stream(client)
            time.sleep(SETTLE_SECONDS)
            if i >= warmup:
                direct.append(d)
                through.append(g)
    finally:
        client.close()
    for sample in through:
        sample.update(_where_the_time_went(broker, sample))
    direct_ttft = sorted(t for t, _ in direct)
    direct_total = sorted(t for _, t in direct)
    goclaw_ttft = sorted(s["ttft"] for s in through)
    goclaw_total = sorted(s["total"] for s in through)
    result: dict[str, Any] = {
        "requests": requests,
        "direct_ttft_p50_ms": _p50(direct_ttft),
        "direct_ttft_p95_ms": _p(direct_ttft, 0.95),
        "goclaw_ttft_p50_ms": _p50(goclaw_ttft),
        "goclaw_ttft_p95_ms": _p(goclaw_ttft, 0.95),
        "added_ttft_p50_ms": round(_p50(goclaw_ttft) - _p50(direct_ttft), 2),
        "added_ttft_target_ms": TTFT_TARGET_MS,
        "direct_total_p50_ms": _p50(direct_total),
        "direct_total_p95_ms": _p(direct_total, 0.95),
        "goclaw_total_p50_ms": _p50(goclaw_total),
        "goclaw_total_p95_ms": _p(goclaw_total, 0.95),
        "added_total_p50_ms": round(_p50(goclaw_total) - _p50(direct_total), 2),
    }
    # The goclaw side's first token, split by the event log's wall-clock stamps (p50 each).
    for key, label in (
        ("to_submitted", "ttft_p50_request_to_queued_ms"),
        ("queue", "ttft_p50_queued_to_started_ms"),
        ("setup", "ttft_p50_started_to_run_ms"),
        ("first_write", "ttft_p50_run_to_first_chunk_ms"),
        ("delivery", "ttft_p50_first_chunk_to_client_ms"),
    ):
        result[label] = _p50(sorted(s[key] for s in through))
    result["chunk_events_per_reply"] = round(statistics.mean(s["chunk_events"] for s in through), 1)
    return result


def _direct_stream(litellm: Any, api_base: str) -> tuple[float, float]:
    """(ms to the first content delta, ms to the end) of a direct LiteLLM stream."""
    started = time.perf_counter()
    first = None
    parts = []
    stream = litellm.completion(
        model=MODEL,
        api_base=api_base,
        api_key="bench",
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}],
        stream=True,
    )
    for chunk in stream:
        text = chunk.choices[0].delta.content if chunk.choices else None
        if text:
            if first is None:
                first = time.perf_counter()
            parts.append(text)
    ended = time.perf_counter()
    if "".join(parts) != REPLY or first is None:
        raise BenchError(f"direct call: unexpected reply {''.join(parts)[:80]!r}")
    return (first - started) * 1000, (ended - started) * 1000


def _gateway_stream(client: Any) -> dict[str, float]:
    """A streamed chat completion through the gateway: timings and the task it queued."""
    sent_wall = time.time()
    started = time.perf_counter()
    first = first_wall = None
    parts = []
    stream = client.chat.completions.create(
        model=f"agent:{AGENT}", messages=[{"role": "user", "content": PROMPT}], stream=True
    )
    task_id = int(stream.response.headers["X-Goclaw-Task-Id"])
    for chunk in stream:
        text = chunk.choices[0].delta.content if chunk.choices else None
        if text:
            if first is None:
                first, first_wall = time.perf_counter(), time.time()
            parts.append(text)
    ended = time.perf_counter()
    if "".join(parts) != REPLY or first is None or first_wall is None:
        raise BenchError(f"gateway task {task_id}: unexpected reply {''.join(parts)[:80]!r}")
    return {
        "task_id": task_id,
        "ttft": (first - started) * 1000,
        "total": (ended - started) * 1000,
        "sent_wall": sent_wall,
        "first_wall": first_wall,
    }


def _where_the_time_went(broker: Any, sample: dict[str, float]) -> dict[str, float]:
    events = broker.events(int(sample["task_id"]))
    at: dict[str, float] = {}
    for event in events:
        at.setdefault(event.type, event.at)
    chunks = [e.at for e in events if e.type == "chunk"]
    missing = {"task.submitted", "task.started", "run.started"} - set(at)
    if missing or not chunks:
        raise BenchError(f"gateway task {sample['task_id']}: no {sorted(missing) or 'chunk'}")
    first_chunk = min(chunks)
    return {
        "to_submitted": (at["task.submitted"] - sample["sent_wall"]) * 1000,
        "queue": (at["task.started"] - at["task.submitted"]) * 1000,
        "setup": (at["run.started"] - at["task.started"]) * 1000,
        "first_write": (first_chunk - at["run.started"]) * 1000,
        "delivery": (sample["first_wall"] - first_chunk) * 1000,
        "chunk_events": len(chunks),
    }


# -- fan-out -------------------------------------------------------------------------


class _Client:
    def __init__(self, index: int, session_key: str) -> None:
        self.index = index
        self.session_key = session_key
        self.ws: Any = None
        self.reader: asyncio.Task | None = None
        self.subscribed: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        #: (event number, latency in seconds, cursor) per session.event, in arrival order.
        self.events: list[tuple[int, float, int]] = []
        self.backpressure = 0
        self.other = 0


class _Tally:
    def __init__(self) -> None:
        self.received = 0


async def _fan_out(
    broker: Any,
    gateway: Subprocess,
    home: Path,
    env: dict[str, str],
    base: Path,
    gateway_url: str,
    token: str,
    n_clients: int,
    rate: float,
    seconds: float,
) -> dict[str, Any]:
    import aiohttp

    from goclaw.agent.sessions import SessionStore

    assert gateway.proc is not None
    gateway_pid = gateway.proc.pid
    prefix = f"bench-fanout-{os.getpid()}-"
    keys = [f"{prefix}{i}" for i in range(n_clients)]

    def prepare() -> int:
        sessions = SessionStore(broker.db)
        with broker.db.transaction():
            for key in keys:
                sessions.ensure(key, AGENT)
        # One task per session for its events to belong to; no worker runs them.
        submitted = broker.submit("noop", count=n_clients)
        ids = [s.task_id for s in submitted]
        if ids != list(range(ids[0], ids[0] + n_clients)):
            raise BenchError("fan-out: expected consecutive task ids")
        return ids[0]

    first_task = prepare()
    tally = _Tally()
    clients = [_Client(i, key) for i, key in enumerate(keys)]
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
    result: dict[str, Any] = {}
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        try:
            started = time.perf_counter()
            gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
            await asyncio.gather(
                *(_connect(c, http, gateway_url, token, gate, tally) for c in clients)
            )
            subscribe_s = time.perf_counter() - started
            await asyncio.sleep(1.0)
            rss_subscribed = rss_kb(gateway_pid)
            if any(c.events for c in clients):
                raise BenchError("fan-out: events arrived before the writer started")
            report = base / "writer.json"
            command = [sys.executable, "-m", "goclaw.bench_gateway", "write-events"]
            command += ["--prefix", prefix, "--sessions", str(n_clients)]
            command += ["--first-task", str(first_task), "--rate", str(rate)]
            command += ["--seconds", str(seconds), "--report", str(report)]
            cpu_before = process_cpu_seconds(gateway_pid)
            wall_before = time.perf_counter()
            with Subprocess("event writer", command, env, base, base / "writer.log") as writer:
                assert writer.proc is not None
                deadline = time.monotonic() + seconds * 3 + START_TIMEOUT
                while writer.proc.poll() is None:
                    gateway.check()
                    if time.monotonic() > deadline:
                        raise BenchError(f"event writer did not finish:\n{writer.tail()}")
                    await asyncio.sleep(0.05)
                if writer.proc.returncode != 0:
                    writer.check()
            written = json.loads(report.read_text())
            expected = written["events"]
            drain_deadline = time.monotonic() + DRAIN_SECONDS
            while tally.received < expected and time.monotonic() < drain_deadline:
                gateway.check()
                await asyncio.sleep(0.05)
            cpu_after = process_cpu_seconds(gateway_pid)
            wall = time.perf_counter() - wall_before
            await asyncio.sleep(0.5)  # anything extra (a duplicate) would arrive by now
            rss_after_events = rss_kb(gateway_pid)
        finally:
            await asyncio.gather(*(_close(c) for c in clients), return_exceptions=True)
    latencies = sorted(lat * 1000 for c in clients for _, lat, _ in c.events)
    numbers = [n for c in clients for n, _, _ in c.events]
    out_of_order = sum(
        1 for c in clients for a, b in zip(c.events, c.events[1:], strict=False) if b[2] <= a[2]
    )
    misrouted = sum(1 for c in clients for n, _, _ in c.events if n % n_clients != c.index)
    gateway_cpu = (
        None
        if cpu_before is None or cpu_after is None
        else round(100 * (cpu_after - cpu_before) / wall, 1)
    )
    result.update(
        {
            "fanout_clients": n_clients,
            "fanout_sessions": n_clients,
            "fanout_subscribe_s": round(subscribe_s, 2),
            "fanout_rate_target": float(rate),
            "fanout_rate_achieved": written["rate"],
            "fanout_seconds": written["seconds"],
            "fanout_events_expected": expected,
            "fanout_events_delivered": len(set(numbers)),
            "fanout_duplicates": len(numbers) - len(set(numbers)),
            "fanout_out_of_order": out_of_order,
            "fanout_misrouted": misrouted,
            "fanout_backpressure_notices": sum(c.backpressure for c in clients),
            "fanout_latency_p50_ms": _p50(latencies) if latencies else None,
            "fanout_latency_p95_ms": _p(latencies, 0.95) if latencies else None,
            "fanout_latency_p99_ms": _p(latencies, 0.99) if latencies else None,
            "fanout_latency_max_ms": round(latencies[-1], 2) if latencies else None,
            "fanout_p99_target_ms": FANOUT_P99_TARGET_MS,
            "fanout_writer_commit_p50_ms": written["commit_p50_ms"],
            "fanout_writer_commit_p99_ms": written["commit_p99_ms"],
            "fanout_gateway_cpu_pct": gateway_cpu,
            "_rss_subscribed_kb": rss_subscribed,
            "_rss_after_events_kb": rss_after_events,
        }
    )
    return result


async def _connect(
    client: _Client,
    http: Any,
    gateway_url: str,
    token: str,
    gate: asyncio.Semaphore,
    tally: _Tally,
) -> None:
    async with gate:
        client.ws = await http.ws_connect(
            gateway_url.replace("http://", "ws://") + "/ws",
            headers={"Authorization": f"Bearer {token}"},
            autoping=True,
        )
        client.reader = asyncio.create_task(_read(client, tally))
        request = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "session.events.subscribe",
            "params": {"session_key": client.session_key, "from_event_id": 0},
        }
        await client.ws.send_str(json.dumps(request))
        reply = await asyncio.wait_for(client.subscribed, START_TIMEOUT)
    if "error" in reply:
        raise BenchError(f"fan-out client {client.index}: subscribe failed: {reply['error']}")


async def _read(client: _Client, tally: _Tally) -> None:
    import aiohttp

    async for frame in client.ws:
        received = time.time()  # stamped before anything else is done with the frame
        if frame.type != aiohttp.WSMsgType.TEXT:
            continue
        message = json.loads(frame.data)
        method = message.get("method")
        if "id" in message:
            if not client.subscribed.done():
                client.subscribed.set_result(message)
        elif method == "session.event":
            params = message["params"]
            client.events.append((params["data"]["n"], received - params["at"], params["id"]))
            tally.received += 1
        elif method == "system.backpressure":
            client.backpressure += 1
        else:
            client.other += 1


async def _close(client: _Client) -> None:
    if client.ws is not None:
        await client.ws.close()
    if client.reader is not None:
        client.reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await client.reader


def write_events(
    *, prefix: str, sessions: int, first_task: int, rate: float, seconds: float
) -> dict[str, Any]:
    """The fan-out's writer (its own process): ``chunk`` events at a steady rate.

    Event k goes to session ``k % sessions`` through that session's
    ``RunEvents`` (one transaction each, as a worker's flush is), at
    ``start + k / rate``; a writer that falls behind writes the next one at
    once, and the rate achieved is reported.
    """
    from goclaw.agent.events import RunEvents
    from goclaw.agent.sessions import SessionStore
    from goclaw.config import load_config
    from goclaw.worker import open_broker

    broker = open_broker(load_config())
    try:
        store = SessionStore(broker.db)
        writers = [
            RunEvents(
                broker.db,
                store,
                task_id=first_task + i,
                session_key=f"{prefix}{i}",
                worker="bench-writer",
                doorbell=broker.doorbell,  # as a worker's turns ring it
            )
            for i in range(sessions)
        ]
        total = max(1, round(rate * seconds))
        commits = []
        started = time.monotonic()
        first_at = time.time()
        for k in range(total):
            wait = started + k / rate - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            before = time.perf_counter()
            writers[k % sessions].emit("chunk", delta=FANOUT_DELTA, reply=0, n=k)
            commits.append((time.perf_counter() - before) * 1000)
        elapsed = time.monotonic() - started
    finally:
        broker.close()
    commits.sort()
    return {
        "events": total,
        "seconds": round(elapsed, 3),
        # k events span k - 1 intervals; the last is written at about (total - 1) / rate.
        "rate": round((total - 1) / elapsed, 1) if total > 1 and elapsed > 0 else float(total),
        "first_at": first_at,
        "commit_p50_ms": round(statistics.median(commits), 3),
        "commit_p99_ms": round(_nearest_rank(commits, 0.99), 3),
    }


# -- helpers ---------------------------------------------------------------------------


def _raise_nofile(wanted: int) -> int:
    """Raise this process's open-file soft limit toward ``wanted`` (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = new
    return int(soft)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def _notes(clients: int, rate: float, seconds: float, chunk_delay: float, env: dict) -> str:
    overrides = sorted(k for k in env if k.startswith("GOCLAW_GATEWAY__"))
    return " ".join(
        [
            f"Streaming: the fake model streams {len(REPLY)} characters in {CHUNK_SIZE}-character "
            f"chunks, {chunk_delay * 1000:g} ms apart (the first content chunk comes after one "
            "delay). Direct: litellm.completion(stream=True) from this process, LiteLLM's "
            "defaults. Through the gateway: openai.OpenAI().chat.completions.create(model="
            f"'agent:{AGENT}', stream=True), a new session each, one worker process "
            "(concurrency 1). TTFT is to the first non-empty content delta; total to the end of "
            f"the stream. The two alternate, {SETTLE_SECONDS * 1000:g} ms apart; p95 is "
            "nearest-rank. The ttft_p50_*_to_* figures (medians) come from the event log's "
            "wall-clock stamps (task.submitted, task.started, run.started, the first chunk "
            "event) and the client's receive time.",
            f"Fan-out: {clients} sessions, one WebSocket client each (aiohttp, one event loop in "
            "the bench process, session.events.subscribe from 0, no hello), events round-robin "
            f"over the sessions at {rate:g}/s in total for {seconds:g} s (each session gets one "
            f"every {clients / rate:g} s), written by a separate process with RunEvents.emit, "
            "one synchronous=FULL commit each. Latency = client receive time - the event's "
            "'at' (stamped just before the writer's transaction, so it includes the commit).",
            "RSS: VmRSS of the gateway process: idle after start-up (settled), after the "
            "streamed requests, with every client subscribed (1 s after the last subscribe), "
            "after the events were delivered, and 1 s after the clients closed.",
            f"Gateway settings overridden: {', '.join(overrides)} (the rate limits by the "
            "bench: every client connects from one IP, and the default 200/s with a burst of "
            "400 would refuse the subscribes; any other by the environment).",
        ]
    )


def _p50(ordered: list[float]) -> float:
    return round(statistics.median(ordered), 2)


def _p(ordered: list[float], q: float) -> float:
    return round(_nearest_rank(ordered, q), 2)


def _mb(kb: int) -> float:
    return round(kb / 1024, 1)


def _writer_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m goclaw.bench_gateway")
    sub = parser.add_subparsers(dest="command", required=True)
    writer = sub.add_parser("write-events")
    writer.add_argument("--prefix", required=True)
    writer.add_argument("--sessions", type=int, required=True)
    writer.add_argument("--first-task", type=int, required=True)
    writer.add_argument("--rate", type=float, required=True)
    writer.add_argument("--seconds", type=float, required=True)
    writer.add_argument("--report", required=True)
    args = parser.parse_args(argv)
    report = write_events(
        prefix=args.prefix,
        sessions=args.sessions,
        first_task=args.first_task,
        rate=args.rate,
        seconds=args.seconds,
    )
    Path(args.report).write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(_writer_main(sys.argv[1:]))

__all__ = ["run_gateway_bench", "write_events"]
