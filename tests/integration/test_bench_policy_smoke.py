"""``goclaw bench policy``, small: the three variants run and every audited call is on record."""

from __future__ import annotations

from pathlib import Path

import pytest

from goclaw.bench_policy import run_policy_bench

VARIANTS = ("unchecked", "checked", "audited", "decide")


def test_policy_bench_measures_and_audits_every_call(tmp_path: Path) -> None:
    result = run_policy_bench(calls=50, warmup=5, workdir=str(tmp_path))

    for name in VARIANTS:
        for stat in ("p50", "p99"):
            value = result[f"{name}_{stat}_us"]
            assert isinstance(value, float) and value > 0, (name, stat)
        assert result[f"{name}_p99_us"] >= result[f"{name}_p50_us"], name
    for name in ("checked", "audited"):
        assert result[f"{name}_added_p50_us"] == pytest.approx(
            result[f"{name}_p50_us"] - result["unchecked_p50_us"], abs=0.02
        )
        assert result[f"{name}_ratio_p50"] > 0, name
    assert result["calls"] == 50 and result["warmup"] == 5
    # Every call of the audited variant, warm-up included, and nothing else.
    assert result["audited_calls"] == 55
    assert result["audit_records"] == 55
    assert result["verified"] is True
    assert all(not isinstance(v, (dict, list, tuple)) for v in result.values())
    [run] = tmp_path.glob("run-*")  # kept, in a fresh directory of its own
    assert (run / "home" / "logs" / "audit.jsonl").read_text().count("\n") == 55
