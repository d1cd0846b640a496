"""``goclaw bench queue`` end to end, small: real worker, real Huey consumer, raw loop."""

from __future__ import annotations

from pathlib import Path

import pytest

from goclaw.bench import run_queue_bench

RATES = (
    "goclaw_tasks_per_s",
    "huey_tasks_per_s",
    "raw_tasks_per_s",
    "goclaw_drain_tasks_per_s",
    "huey_drain_tasks_per_s",
    "drain_ratio_vs_huey",
)
LATENCIES = ("submit_to_start_p50_ms", "submit_to_start_p99_ms", "submit_to_start_max_ms")


@pytest.mark.slow
def test_bench_runs_all_three_and_cleans_up() -> None:
    messages: list[str] = []
    result = run_queue_bench(
        n_tasks=50, workers=2, latency_samples=5, rounds=1, progress=messages.append
    )

    for key in (*RATES, *LATENCIES, "ratio_vs_huey", "ratio_vs_raw", "fsync_probe_ms"):
        assert isinstance(result[key], float), key
        assert result[key] > 0, key
    assert result["tasks"] == 50
    assert result["workers"] == 2
    assert result["goclaw_verified"] is True
    assert result["latency_samples"] == 5
    assert result["notes"]
    bench_dir = Path(next(m for m in messages if m.startswith("bench dir ")).split(" ", 2)[2])
    assert not bench_dir.exists(), "the temporary bench dir must be removed"


@pytest.mark.slow
def test_bench_keeps_its_files_in_a_given_dir(tmp_path: Path) -> None:
    result = run_queue_bench(
        n_tasks=20, workers=1, latency_samples=5, rounds=1, workdir=tmp_path / "bench"
    )
    assert result["goclaw_verified"] is True
    (run_dir,) = (tmp_path / "bench").iterdir()
    assert (run_dir / "goclaw-home" / "goclaw.db").exists()
    assert (run_dir / "goclaw-worker-1.log").exists()
    assert (run_dir / "huey" / "bench_huey_app.py").exists()


@pytest.mark.slow
def test_agent_bench_measures_both_sides(tmp_path: Path) -> None:
    from goclaw.bench_agent import run_agent_bench

    result = run_agent_bench(turns=3, warmup=1, workdir=str(tmp_path))
    for key in ("direct_p50_ms", "goclaw_p50_ms", "worker_overhead_p50_ms"):
        assert result[key] > 0, key
    assert result["added_p50_ms"] == pytest.approx(
        result["goclaw_p50_ms"] - result["direct_p50_ms"], abs=0.02
    )
    assert result["event_writes_per_turn"] >= 1 and result["chunk_deltas_per_turn"] > 1
    assert result["worker_rss_idle_mb"] > 50 and result["worker_rss_after_mb"] > 50


@pytest.mark.slow
def test_gateway_bench_streams_and_fans_out(tmp_path: Path) -> None:
    from goclaw.bench_gateway import run_gateway_bench

    result = run_gateway_bench(
        requests=3, warmup=0, clients=20, rate=50, seconds=1, chunk_delay_ms=2, workdir=tmp_path
    )
    for side in ("direct", "goclaw"):
        for measure in ("ttft", "total"):
            assert result[f"{side}_{measure}_p50_ms"] > 0, (side, measure)
    assert result["added_ttft_p50_ms"] == pytest.approx(
        result["goclaw_ttft_p50_ms"] - result["direct_ttft_p50_ms"], abs=0.02
    )
    assert result["requests"] == 3 and result["chunk_events_per_reply"] >= 1
    # Fan-out: every event reached its one subscriber, once, in order.
    assert result["fanout_clients"] == 20
    assert result["fanout_events_expected"] == 50
    assert result["fanout_events_delivered"] == 50
    for key in ("duplicates", "out_of_order", "misrouted", "backpressure_notices"):
        assert result[f"fanout_{key}"] == 0, key
    assert result["fanout_latency_p99_ms"] is not None
    for key in ("idle", "subscribed", "after_close"):
        assert result[f"gateway_rss_{key}_mb"] > 20, key
    [run] = tmp_path.glob("run-*")  # kept, in a fresh directory of its own
    assert (run / "gateway.log").exists() and (run / "writer.json").exists()
